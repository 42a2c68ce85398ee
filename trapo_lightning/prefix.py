"""Expert-prefix cut in token space, TRAPO.md "Per-prompt sampling: micro-groups" (prefix cut).

A guided rollout starts from the first `ratio` of the expert solution. The prefix is always a prefix of the
solution's own token ids, the ids the policy is trained to write, never text cut and tokenized on its own: with a
byte-level BPE, text that ends in a blank line tokenizes differently alone than inside the solution (a GPT-2-style
pre-tokenizer writes "\\n\\n" before text as two newline tokens but merges a trailing "\\n\\n" into one, a token the
policy then sees as its last SFT target although it would never write it there).

The cut is the authors' (`get_prefix_end_idx` in the reference code), in token positions: with `t = int(len *
ratio)`, the prefix ends just after the first paragraph break whose last token lies strictly after `t` and before
`len * (ratio + snap_window)`; without one it ends at `t`, a token boundary. `len` is the length of the tokenized
expert solution (TRAPO.md; the reference code measured it with the EOS appended, one token more). A paragraph break
is a token boundary where the text so far ends in a blank line, which covers Qwen's merged ".\\n\\n" token and the
second of GPT-2's two newline tokens alike. `PrefixFallback` offers other fallbacks than the bare token boundary.
Ratio 0 is no prefix at all, ratio 1 the whole solution (the caller appends the EOS).

Breaks are found in one pass over the per-token texts (`token_breaks`), never by decoding growing prefixes.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

_CLOSERS = "\"')]}$"  # may follow a sentence's final punctuation: `$x = 2$.`, `(see above.)`
_LIST_MARKER_CHARS = 3  # a "sentence" of at most this many characters is a list marker: "1.", "10.", "a)"


class PrefixFallback(str, Enum):
    """Where the prefix ends when no paragraph break lies in the forward snap window.

    token: at the token boundary `int(len * ratio)`, the authors' rule (it may fall inside a word).
    paragraph_before: just after the last paragraph break whose token lies within `look_back * len` before
        `int(len * ratio)` (at most at it), else at the token boundary.
    paragraph_before_or_line: as paragraph_before, then just after the nearest line break or sentence end: the last
        one within the look-back window, else the first one in the forward snap window; else at the token boundary.
        (Looking back first keeps the mean prefix length the authors': benchmarks/prefix_cuts.py.)
    """

    token = "token"
    paragraph_before = "paragraph_before"
    paragraph_before_or_line = "paragraph_before_or_line"


@dataclass(frozen=True)
class PrefixCut:
    """How the expert prefix is cut: the authors' forward snap to a paragraph break, and a fallback without one."""

    snap_window: float = 0.3
    """Look this fraction of the solution's tokens past `int(len * ratio)` for a paragraph break (the authors: 0.3)."""
    fallback: PrefixFallback = PrefixFallback.token
    """Where to cut without a paragraph break in the snap window (default: the token boundary, as the authors)."""
    look_back: float = 0.1
    """How far before `int(len * ratio)`, as a fraction of the solution's tokens, the `paragraph_before` fallbacks
    look for a paragraph break (and `paragraph_before_or_line` then for a line or sentence end)."""

    def __post_init__(self) -> None:
        if self.snap_window < 0.0 or self.look_back < 0.0:
            raise ValueError(f"snap_window and look_back must be >= 0, got {self.snap_window} and {self.look_back}")
        object.__setattr__(self, "fallback", PrefixFallback(self.fallback))


@dataclass(frozen=True)
class TokenBreaks:
    """Token boundaries of a solution, as prefix lengths b (the break's last token is b - 1), ascending."""

    paragraph: tuple[int, ...] = ()
    """The text of the first b tokens ends in a blank line: "\\n", spaces, tabs or "\\r", "\\n", spaces or tabs."""
    line: tuple[int, ...] = ()
    """The text of the first b tokens ends in a line break ("\\n", then spaces or tabs) or a sentence end (".", "!"
    or "?" after a non-space, maybe closing brackets, quotes or "$", the next token starting with whitespace, and the
    line longer than a list marker such as "1."). Holds the paragraphs too."""


def prefix_end(length: int, breaks: TokenBreaks, ratio: float, cut: PrefixCut = PrefixCut()) -> int:
    """Number of the solution's tokens in the expert prefix at `ratio`.

    Args:
        length: the number of tokens of the expert solution (without EOS).
        breaks: its paragraph and line breaks (`token_breaks`).
        ratio: fraction of the solution to use as prefix, in [0, 1].
        cut: the snap window and the fallback.

    Returns:
        e, so the prefix is `solution_ids[:e]`.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if ratio == 0.0:
        return 0
    if ratio == 1.0:
        return length
    threshold = int(length * ratio)
    window_end = length * (ratio + cut.snap_window)  # a break's last token must lie before it
    window_start = threshold - length * cut.look_back  # where the fallbacks' look back ends
    end = _first_after(breaks.paragraph, threshold, window_end)
    if end is None and cut.fallback is not PrefixFallback.token:
        end = _last_at_or_before(breaks.paragraph, threshold, window_start)
    if end is None and cut.fallback is PrefixFallback.paragraph_before_or_line:
        end = _last_at_or_before(breaks.line, threshold, window_start)
        if end is None:
            end = _first_after(breaks.line, threshold, window_end)
    return threshold if end is None else end


def _first_after(boundaries: Sequence[int], threshold: int, window_end: float) -> int | None:
    """The first boundary b whose last token b - 1 lies in (threshold, window_end)."""
    index = bisect_right(boundaries, threshold + 1)
    if index < len(boundaries) and boundaries[index] - 1 < window_end:
        return boundaries[index]
    return None


def _last_at_or_before(boundaries: Sequence[int], threshold: int, window_start: float) -> int | None:
    """The last boundary b whose last token b - 1 lies in [window_start, threshold]."""
    index = bisect_left(boundaries, threshold + 2) - 1
    if index >= 0 and boundaries[index] - 1 >= window_start:
        return boundaries[index]
    return None


def token_breaks(pieces: Sequence[str]) -> TokenBreaks:
    """The paragraph and line breaks of a token sequence, from the text of each token decoded on its own.

    One pass: the state is the trailing run of spaces, tabs, "\\r" and "\\n" of the text so far, carried from token
    to token, so a blank line split over several tokens ("\\n" + "\\n") counts at the token that completes it. A
    multi-byte character split across byte-level tokens decodes to U+FFFD in each piece; newlines are single ASCII
    bytes and never split, so breaks are found exactly all the same.
    """
    paragraph: list[int] = []
    line: list[int] = []
    after_newline = False  # the run holds a "\n" followed only by spaces, tabs and "\r"
    at_blank = at_line = False
    tail, line_chars = "", 0  # the last few characters of the text so far; characters since the last "\n"
    for b, piece in enumerate(pieces, start=1):
        body = piece.rstrip(" \t\r\n")
        if body:
            after_newline = at_blank = at_line = False
        for char in piece[len(body) :]:
            if char == "\n":
                at_blank, after_newline, at_line = after_newline, True, True
            elif char == "\r":
                at_blank = at_line = False
        newline = piece.rfind("\n")
        line_chars = len(piece) - newline - 1 if newline >= 0 else line_chars + len(piece)
        tail = (tail + piece)[-8:]
        following = pieces[b] if b < len(pieces) else " "
        if at_blank:
            paragraph.append(b)
        if at_line or (following[:1].isspace() and _ends_sentence(tail, line_chars)):
            line.append(b)
    return TokenBreaks(tuple(paragraph), tuple(line))


def _ends_sentence(tail: str, line_chars: int) -> bool:
    """Whether text ending in `tail`, whose last line is `line_chars` long, ends a sentence (not a list marker)."""
    text = tail.rstrip(_CLOSERS)
    if not text.endswith((".", "!", "?")) or len(text) < 2 or text[-2].isspace():
        return False
    if line_chars > len(tail):  # the line is longer than a list marker
        return True
    return len(tail[len(tail) - line_chars :].strip()) > _LIST_MARKER_CHARS
