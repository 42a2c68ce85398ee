"""Where expert-prefix cuts land (issue 15, items 1 and 2): the old text cut against the token-space cut and its
fallbacks, on two byte-level BPEs trained here (Qwen2's and GPT-2's pre-tokenizer regex; nothing downloaded).

Corpora: benchmarks/data/solutions.yaml (30 competition-style solutions written for this project: paragraphs,
LaTeX, long paragraphs, single newlines only, numbered steps) and the synthetic task's solutions. For each
tokenizer kind, method and ratio the table gives the share of cuts that end at a paragraph break, at a line or
sentence end, inside a word (letters or digits on both sides) or elsewhere (after a space or a symbol); how often
no paragraph break lay in the forward snap window (so the fallback decided); the mean prefix length past
int(len * ratio), in % of the solution; and the seam: prefixes whose ids are not a prefix of the solution's own
ids, because the text cut was tokenized on its own (the token-space cut has none by construction, checked here).

    python benchmarks/prefix_cuts.py              # a few seconds
    python benchmarks/prefix_cuts.py --markdown   # the table as Markdown, for docs/prefix_cuts.md
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from trapo_lightning.data.synthetic import SyntheticArithmetic
from trapo_lightning.prefix import PrefixCut, PrefixFallback, prefix_end, token_breaks

DATA = Path(__file__).parent / "data" / "solutions.yaml"
GPT2_PRETOKENIZE_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
KINDS = {"qwen": PRETOKENIZE_REGEX, "gpt2": GPT2_PRETOKENIZE_REGEX}
RATIOS = (0.25, 0.5)
METHODS = ("text (old)", *(f.value for f in PrefixFallback))
PLACES = ("paragraph", "line/sentence", "mid-word", "other")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=1200, help="BPE vocabulary of both tokenizers")
    parser.add_argument("--synthetic", type=int, default=200, help="synthetic solutions in the second corpus")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    return parser.parse_args()


def train_bpe(pattern: str, corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the given pre-tokenizer regex, trained on `corpus` (deterministic)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    assert "ĊĊ" in tokenizer.get_vocab(), "the blank-line merge the seam needs was not learned"
    return tokenizer


def training_corpus(solutions: list[str]) -> list[str]:
    # Real BPE corpora hold paragraphs led by a space or an indent (quotes, code), where a "\n\n" run is
    # pre-tokenized whole even by GPT-2's regex; that is where the merged blank-line token comes from.
    return solutions + ["\n\n ".join(s.split("\n\n")) for s in solutions]


def old_text_cut(solution: str, ratio: float, snap_window: float = 0.3) -> tuple[int, bool]:
    """The character cut this replaces: int(len * ratio) in characters, moved forward past a "\\n\\n" that lies
    wholly before int(len * (ratio + snap_window)), else kept; and whether it was kept (no break found)."""
    start, stop = int(len(solution) * ratio), int(len(solution) * (ratio + snap_window))
    found = solution.find("\n\n", start, stop)
    return (start, True) if found < 0 else (found + 2, False)


def place(prefix: str, rest: str) -> str:
    """Where a cut between the texts `prefix` and `rest` lands (token_breaks on the two texts as two 'tokens')."""
    breaks = token_breaks([prefix, rest])
    if 1 in breaks.paragraph:
        return "paragraph"
    if 1 in breaks.line:
        return "line/sentence"
    if prefix[-1:].isalnum() and rest[:1].isalnum():
        return "mid-word"
    return "other"


@dataclass
class Cut:
    place: str
    extra: float  # prefix tokens past int(len * ratio), as a fraction of the solution's tokens
    fell_back: bool  # no paragraph break in the forward snap window
    seam: bool  # the prefix's ids are not a prefix of the solution's ids


def cuts(tokenizer, solution: str, ratio: float) -> dict[str, Cut]:
    ids = tuple(tokenizer(solution, add_special_tokens=False)["input_ids"])
    breaks = token_breaks(tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False))
    threshold = int(len(ids) * ratio)
    fell_back = prefix_end(len(ids), breaks, ratio) not in breaks.paragraph
    cut, text_fell_back = old_text_cut(solution, ratio)
    old = tuple(tokenizer(solution[:cut], add_special_tokens=False)["input_ids"])
    seam = old != ids[: len(old)]
    result = {
        METHODS[0]: Cut(place(solution[:cut], solution[cut:]), (len(old) - threshold) / len(ids), text_fell_back, seam)
    }
    for fallback in PrefixFallback:
        end = prefix_end(len(ids), breaks, ratio, PrefixCut(fallback=fallback))
        prefix, rest = tokenizer.decode(ids[:end]), tokenizer.decode(ids[end:])
        assert prefix + rest == solution  # the token-space prefix is the solution's own ids: no seam
        result[fallback.value] = Cut(place(prefix, rest), (end - threshold) / len(ids), fell_back, False)
    return result


def table(corpora: dict[str, list[str]], tokenizers: dict) -> list[list[str]]:
    rows = []
    for corpus, solutions in corpora.items():
        for kind, tokenizer in tokenizers.items():
            for ratio in RATIOS:
                measured = [cuts(tokenizer, s, ratio) for s in solutions]
                for method in METHODS:
                    column = [m[method] for m in measured]
                    shares = [sum(c.place == p for c in column) / len(column) for p in PLACES]
                    rows.append(
                        [corpus, kind, method, f"{ratio:.2f}", *(f"{100 * s:.0f}%" for s in shares),
                         f"{100 * sum(c.fell_back for c in column) / len(column):.0f}%",
                         f"{100 * statistics.mean(c.extra for c in column):+.1f}%",
                         f"{sum(c.seam for c in column)}/{len(column)}"]
                    )
    return rows


HEADER = ["corpus", "BPE", "cut", "ratio", *PLACES, "no paragraph in window", "mean extra", "seam"]


def show(rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "---|" * len(HEADER))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    for row in [HEADER, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


def main() -> None:
    args = parse_args()
    written = [record["solution"] for record in yaml.safe_load(DATA.read_text())]
    synthetic = [r.solution for r in SyntheticArithmetic().records("train", args.synthetic)]
    tokenizers = {
        kind: train_bpe(pattern, training_corpus(written + synthetic), args.vocab_size)
        for kind, pattern in KINDS.items()
    }
    for kind, tokenizer in tokenizers.items():
        ids = tokenizer(written, add_special_tokens=False)["input_ids"]
        chars, tokens = sum(map(len, written)), sum(map(len, ids))
        print(f"{kind}: {len(tokenizer)} tokens, written corpus {tokens} tokens ({chars / tokens:.2f} chars/token)")
    show(table({"written": written, "synthetic": synthetic}, tokenizers), args.markdown)


if __name__ == "__main__":
    main()
