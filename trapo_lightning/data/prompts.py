"""The prompt of TRAPO.md ("Settings"), applied through the tokenizer's own chat template."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

PAPER_SYSTEM = "You are a helpful assistant."
PAPER_USER = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


@dataclass(frozen=True)
class PromptTemplate:
    """System message and user message template; `{problem}` is replaced by the problem text."""

    system: str | None = PAPER_SYSTEM
    user: str = PAPER_USER

    def __post_init__(self) -> None:
        if "{problem}" not in self.user:
            raise ValueError(f"prompt user template must contain '{{problem}}', got {self.user!r}")

    def text(self, tokenizer: PreTrainedTokenizerBase, problem: str) -> str:
        """The prompt as text: the chat template applied, generation prompt appended."""
        messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        messages.append({"role": "user", "content": self.user.format(problem=problem)})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def token_ids(self, tokenizer: PreTrainedTokenizerBase, problem: str) -> tuple[int, ...]:
        """The prompt's ids: its text tokenized as is, the template's own special tokens and nothing added."""
        return tuple(tokenizer(self.text(tokenizer, problem), add_special_tokens=False)["input_ids"])
