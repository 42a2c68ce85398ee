"""Where the policy comes from: a user's Hugging Face folder, or the tiny embedded default written as one."""

from trapo_lightning.models.sources import PolicySource, PretrainedFolder, TinyRandomQwen2

__all__ = ["PolicySource", "PretrainedFolder", "TinyRandomQwen2"]
