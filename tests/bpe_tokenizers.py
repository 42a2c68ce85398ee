"""Two byte-level BPE tokenizers built from hand-written merges, for tests where the exact tokens matter.

Both have Qwen2's chat-template layout (`trapo_lightning/models/tokenizer.py`: `<|im_end|>` is the EOS) and differ
where the expert-prefix seam lies, in how a newline run is pre-tokenized:

- `qwen_style()`: Qwen2's pre-tokenizer regex groups a newline run with the punctuation before it, and the merges
  "ĊĊ" and ".ĊĊ" make "\\n\\n" (and ".\\n\\n") one token wherever it stands, before text or at the end.
- `gpt2_style()`: GPT-2's regex (`\\s+(?!\\S)`) leaves the last whitespace of a run to the word after it, so
  "\\n\\n" before text is two tokens "\\n" + "\\n", while at the end of a text the run stays whole and merges
  into "ĊĊ": a text cut just after a blank line and tokenized on its own ends in a token the full text never has.

Every other character is a token of its own, except the words "the", " the" and "So", so a cut at a character
offset can split a token ("So t" + "he"). Token positions in the tests are then easy to count by hand.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from trapo_lightning.models.tokenizer import CHAT_TEMPLATE, IM_END, IM_START, PAD

GPT2_PRETOKENIZE_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BOS = "<|bos|>"
WORD_MERGES = [("t", "h"), ("th", "e"), ("Ġ", "the"), ("S", "o")]


def qwen_style(bos: bool = False) -> PreTrainedTokenizerFast:
    """Qwen2's regex; "\\n\\n" and ".\\n\\n" are single tokens everywhere."""
    return _build(PRETOKENIZE_REGEX, [("Ċ", "Ċ"), (".", "ĊĊ"), *WORD_MERGES], bos)


def gpt2_style(bos: bool = False) -> PreTrainedTokenizerFast:
    """GPT-2's regex; "\\n\\n" is "\\n" + "\\n" before text and one "ĊĊ" token at the end of a text."""
    return _build(GPT2_PRETOKENIZE_REGEX, [("Ċ", "Ċ"), *WORD_MERGES], bos)


def _build(pattern: str, merges: list[tuple[str, str]], bos: bool) -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = [PAD, IM_START, IM_END] + ([BOS] if bos else [])
    tokens = specials + alphabet + [left + right for left, right in merges]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    backend.add_special_tokens(specials)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    if bos:  # like Llama's tokenizers: BOS in front whenever special tokens are added
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, specials.index(BOS))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=IM_END, unk_token=PAD,
        additional_special_tokens=[IM_START], **({"bos_token": BOS} if bos else {}),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
