"""A character-level tokenizer built in code, with a Qwen-style chat template.

The embedded default must run with no hub access, so its tokenizer is made here from the `tokenizers` library and
saved as an ordinary Hugging Face tokenizer; training then loads it back with `AutoTokenizer.from_pretrained`,
the same path a user's own model folder takes. One token per character keeps arithmetic digit-exact and makes
the paragraph-snapped prefix cut land exactly on token boundaries.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

UNK, PAD, IM_START, IM_END = "<|unk|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (UNK, PAD, IM_START, IM_END)
CHARACTERS = tuple(chr(i) for i in range(32, 127)) + ("\n",)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Printable ASCII plus newline, one id per character; `<|im_end|>` ends a turn and is the EOS."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=UNK, pad_token=PAD, eos_token=IM_END, additional_special_tokens=[IM_START]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
