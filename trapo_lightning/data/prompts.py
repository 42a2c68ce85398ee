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

    def token_ids(self, tokenizer: PreTrainedTokenizerBase, problem: str) -> tuple[int, ...]:
        messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        messages.append({"role": "user", "content": self.user.format(problem=problem)})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
