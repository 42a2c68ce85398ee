"""A small byte-level BPE tokenizer trained in code, laid out exactly like Qwen2's, with a chat template.

The embedded default must run with no hub access, so its tokenizer is trained here with the `tokenizers` library
on a fixed corpus (the paper's prompt and synthetic arithmetic text) and saved as an ordinary Hugging Face
tokenizer; training then loads it back with `AutoTokenizer.from_pretrained`, the path a user's own model folder
takes. `from_pretrained` on a Qwen2 folder rebuilds the tokenizer as `Qwen2Tokenizer` from vocab and merges, so
the normaliser, pre-tokenizer (Qwen2's own regex, imported, so the two cannot drift) and decoder are Qwen2's.
Like Qwen2 it splits numbers into single digits, so arithmetic stays digit-exact, and it is byte-level, so any
text round-trips. Words merge, so the paper's prompt is ~50 tokens, which keeps laptop rollouts cheap.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from trapo_lightning.data.prompts import PAPER_SYSTEM, PAPER_USER
from trapo_lightning.data.synthetic import SyntheticArithmetic

# Bump when the corpus or the layout changes: it is part of TinyRandomQwen2's spec, so cached folders get rewritten.
TOKENIZER_VERSION = "qwen2-byte-level-bpe-v3"
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus(samples: int = 500) -> list[str]:
    task = SyntheticArithmetic(seed=0)
    chat = [PAPER_SYSTEM, PAPER_USER.format(problem=""), "system\nuser\nassistant\n"]
    return chat * 50 + [r.problem + "\n" + r.solution for r in task.records("train", samples)]


def build_tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train the BPE on the fixed corpus (deterministic); `<|im_end|>` ends a turn and is the EOS."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=IM_END, unk_token=PAD, additional_special_tokens=[IM_START]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
