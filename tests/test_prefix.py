"""Expert-prefix cut in token space (TRAPO.md "Per-prompt sampling: micro-groups", prefix cut; issue 15).

`prefix_end` is checked on hand-made break positions, `token_breaks` on hand-made token texts and against a naive
decode of every prefix, and `ExpertPrefixer` on two byte-level BPEs built in code (tests/bpe_tokenizers.py): a
Qwen-style one that writes "\\n\\n" as one token everywhere, and a GPT-2-style one that writes it as "\\n" + "\\n"
before text but as one merged token at the end of a text, the seam a text cut tokenized on its own falls into.
"""

import re

import pytest

from bpe_tokenizers import gpt2_style, qwen_style
from trapo_lightning.data.records import PromptRecord
from trapo_lightning.prefix import PrefixCut, PrefixFallback, TokenBreaks, prefix_end, token_breaks
from trapo_lightning.sampling import ExpertPrefixer

BACK = PrefixCut(fallback=PrefixFallback.paragraph_before)
BACK_OR_LINE = PrefixCut(fallback=PrefixFallback.paragraph_before_or_line)

# 20 tokens; paragraph breaks after tokens 3, 8 and 16 (prefix lengths 4, 9, 17).
BREAKS = TokenBreaks(paragraph=(4, 9, 17), line=(4, 6, 9, 12, 17))


def test_snaps_forward_to_just_after_the_first_paragraph_break_in_the_window():
    # t = int(20 * 0.25) = 5, window end 20 * 0.55 = 11; first break token > 5 is token 8 (< 11) -> 9 tokens
    assert prefix_end(20, BREAKS, 0.25) == 9
    # t = int(20 * 0.6) = 12, window end 20 * 0.9 = 18; token 16 -> 17
    assert prefix_end(20, BREAKS, 0.6) == 17


def test_the_break_token_must_lie_strictly_after_the_threshold_and_strictly_before_the_window_end():
    # t = int(20 * 0.4) = 8: the break token 8 is not after t; token 16 is not before 20 * 0.7 = 14 -> t = 8
    assert prefix_end(20, BREAKS, 0.4) == 8
    # t = int(20 * 0.5) = 10, window end 20 * 0.8 = 16.0: token 16 is not < 16 -> t = 10
    assert prefix_end(20, BREAKS, 0.5) == 10
    # snap_window 0: window end 20 * 0.25 = 5 = t, nothing lies after t and before it -> t = 5
    assert prefix_end(20, BREAKS, 0.25, PrefixCut(snap_window=0.0)) == 5


def test_paragraph_before_looks_back_within_its_window():
    # ratio 0.4: no forward snap (above); look back to 8 - 20 * 0.1 = 6: break token 8 lies in [6, 8] -> 9
    assert prefix_end(20, BREAKS, 0.4, BACK) == 9
    # ratio 0.5: t = 10, back to 10 - 2 = 8: token 8 -> 9, one token shorter than the token boundary 10
    assert prefix_end(20, BREAKS, 0.5, BACK) == 9
    # look_back 0.05: back to 10 - 1 = 9, token 8 is outside -> t = 10
    assert prefix_end(20, BREAKS, 0.5, PrefixCut(fallback="paragraph_before", look_back=0.05)) == 10
    # a forward snap always wins: ratio 0.25 -> 9 as above, not the earlier break token 3
    assert prefix_end(20, BREAKS, 0.25, BACK) == 9


def test_paragraph_before_or_line_takes_the_nearest_line_break_when_no_paragraph_is_near():
    # paragraphs after tokens 3 and 16, line ends after tokens 3, 11 and 16
    sparse = TokenBreaks(paragraph=(4, 17), line=(4, 12, 17))
    # ratio 0.5: t = 10; forward paragraph token 16 is not < 16; back to 8 finds no paragraph token in [8, 10]
    assert prefix_end(20, sparse, 0.5) == 10
    assert prefix_end(20, sparse, 0.5, BACK) == 10
    # then a line-break token in [8, 10] (none), then the first one after 10 and before 16: token 11 -> 12
    assert prefix_end(20, sparse, 0.5, BACK_OR_LINE) == 12
    # a line-break token 9 in [8, 10] comes first, though token 11 lies nearer after -> 10
    assert prefix_end(20, TokenBreaks(paragraph=(4, 17), line=(4, 10, 12, 17)), 0.5, BACK_OR_LINE) == 10
    # a wider look back (10 - 20 * 0.35 = 3) reaches the paragraph token 3 first -> 4
    assert prefix_end(20, sparse, 0.5, PrefixCut(fallback="paragraph_before_or_line", look_back=0.35)) == 4
    # without any break the token boundary remains: ratio 0.95 -> t = 19; back to 17 misses token 16
    assert prefix_end(20, sparse, 0.95, BACK_OR_LINE) == 19


def test_ratio_zero_is_no_prefix_and_ratio_one_the_whole_solution():
    # a break after token 0 lies within every window from 0, yet ratio 0 means no prefix at all
    assert prefix_end(20, TokenBreaks(paragraph=(1,), line=(1,)), 0.0) == 0
    assert prefix_end(20, BREAKS, 1.0) == 20
    assert prefix_end(0, TokenBreaks(), 0.5) == 0


@pytest.mark.parametrize("ratio", [-0.1, 1.1])
def test_rejects_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match="ratio"):
        prefix_end(20, BREAKS, ratio)


def test_rejects_negative_windows():
    with pytest.raises(ValueError, match="snap_window and look_back"):
        PrefixCut(look_back=-0.1)
    assert PrefixCut(fallback="token").fallback is PrefixFallback.token


def test_a_blank_line_counts_where_the_token_that_completes_it_ends():
    # Qwen-style: ".\n\n" is one token (boundary 3); "\n" ends a line (6); "Done." ends the text, a sentence (8)
    assert token_breaks(["So", " x", ".\n\n", "Then", " y", ".\n", "Done", "."]) == TokenBreaks((3,), (3, 6, 8))
    # GPT-2-style: "." before "\n" ends a sentence (3), the first "\n" a line (4), the second a paragraph (5);
    # " \n" ends a line (9); "1." before " Go" is a list marker, not a sentence
    pieces = ["So", " x", ".", "\n", "\n", "Then", " y", ".", " \n", "1", ".", " Go"]
    assert token_breaks(pieces) == TokenBreaks((5,), (3, 4, 5, 8, 9))


def test_spaces_tabs_and_carriage_returns_around_a_blank_line():
    # "a\n  \n": spaces between the newlines (4); trailing spaces keep the blank line (5)
    assert token_breaks(["a", "\n", "  ", "\n", " ", "b"]).paragraph == (4, 5)
    # "\r\n\r\n": the second "\r\n" completes the blank line (3)
    assert token_breaks(["a", "\r\n", "\r\n", "b"]) == TokenBreaks((3,), (2, 3))
    # text after a newline run ends it; a decimal point is no sentence end; U+FFFD (half a character) is text
    assert token_breaks(["a\n\n", "b", "3", ".", "5", "\ufffd", "\n", "\n", "\ufffd"]) == TokenBreaks((1, 8), (1, 7, 8))


TRICKY = "So t.\r\n\r\nthe x \n \nthe y.\n the\t\n\t\nSo.\n\n\n  the end.\n1. So\n\nthe"


@pytest.mark.parametrize("make", [qwen_style, gpt2_style])
def test_token_breaks_agree_with_decoding_every_prefix(make):
    """The one-pass scan against the naive definition: decode ids[:b] for every b and look at its end."""
    tokenizer = make()
    ids = tokenizer(TRICKY, add_special_tokens=False)["input_ids"]
    breaks = token_breaks(tokenizer.batch_decode([[i] for i in ids]))
    texts = [tokenizer.decode(ids[:b]) for b in range(1, len(ids) + 1)]
    assert breaks.paragraph == tuple(b for b, text in enumerate(texts, 1) if re.search(r"\n[ \t\r]*\n[ \t]*$", text))
    newline_ends = {b for b, text in enumerate(texts, 1) if re.search(r"\n[ \t]*$", text)}
    assert newline_ends <= set(breaks.line)
    assert len(breaks.paragraph) >= 5  # five blank lines, some completed by several tokens in a row
    assert ExpertPrefixer(tokenizer).breaks(ids) == breaks  # the vocabulary-table lookup decodes the same pieces


# Qwen-style, 52 tokens; breaks after ".\n\n" tokens 11 and 23 -> boundaries 12 and 24; "12." ends token 39.
# GPT-2-style, 56 tokens; ".", "\n", "\n" at 11-13 and 25-27 -> paragraph boundaries 14 and 28; "12." token 43.
SOLUTION = "So the sum is 5.\n\nthe rest is 7.\n\nSo the answer is 12. It is the end."


def prefixer_and_record(make, cut: PrefixCut | None = None) -> tuple[ExpertPrefixer, PromptRecord]:
    tokenizer = make()
    ids = tuple(tokenizer(SOLUTION, add_special_tokens=False)["input_ids"])
    return ExpertPrefixer(tokenizer, cut), PromptRecord((), "Problem?", (SOLUTION,), "12", "test", (ids,))


@pytest.mark.parametrize("make", [qwen_style, gpt2_style])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.56, 0.9])
def test_the_prefix_is_a_prefix_of_the_solution_ids(make, ratio):
    # A text cut tokenized on its own is not: GPT-2-style after a blank line ("\n\n" merged at the end), and
    # Qwen-style at 0.56 and 0.9 where the character offset falls inside " the" ("So t" + "he").
    prefixer, record = prefixer_and_record(make)
    prefix = prefixer(record, ratio)
    assert 0 < len(prefix) < len(record.solution_ids)
    assert prefix == record.solution_ids[: len(prefix)]
    assert SOLUTION.startswith(prefixer.tokenizer.decode(prefix))


@pytest.mark.parametrize(
    "make, expected, text",
    [
        # t = int(52 * 0.25) = 13, window end 52 * 0.55 = 28.6: break token 11 is not after t, 23 is -> 24
        (qwen_style, 24, "So the sum is 5.\n\nthe rest is 7.\n\n"),
        # t = int(56 * 0.25) = 14, window end 30.8: token 13 is not after t, 27 is -> 28
        (gpt2_style, 28, "So the sum is 5.\n\nthe rest is 7.\n\n"),
    ],
)
def test_the_cut_snaps_just_after_a_blank_line_in_both_kinds(make, expected, text):
    prefixer, record = prefixer_and_record(make)
    prefix = prefixer(record, 0.25)
    assert len(prefix) == expected
    assert prefixer.tokenizer.decode(prefix) == text
    # the last SFT target is the token the solution itself has there, for GPT-2-style the second plain "\n"
    assert prefixer.tokenizer.decode(prefix[-1:]) == (".\n\n" if make is qwen_style else "\n")


@pytest.mark.parametrize(
    "make, cut, expected, text_end",
    [
        # Qwen-style, ratio 0.56: t = int(52 * 0.56) = 29, window end 52 * 0.86 = 44.72, no break token after 29
        (qwen_style, PrefixCut(), 29, "So the an"),  # the token boundary, inside "answer"
        (qwen_style, BACK, 29, "So the an"),  # back to 29 - 5.2 = 23.8: break token 23 is just outside
        (qwen_style, BACK_OR_LINE, 40, "is 12."),  # no line end in [23.8, 29]; "12." ends token 39 (< 44.72) -> 40
        # GPT-2-style: t = int(56 * 0.56) = 31, window end 48.16, no break token after 31
        (gpt2_style, PrefixCut(), 31, "So the "),
        (gpt2_style, BACK, 28, "is 7.\n\n"),  # back to 31 - 5.6 = 25.4: break token 27 -> 28
        (gpt2_style, BACK_OR_LINE, 28, "is 7.\n\n"),
    ],
)
def test_fallback_options_on_real_token_positions(make, cut, expected, text_end):
    prefixer, record = prefixer_and_record(make, cut)
    prefix = prefixer(record, 0.56)
    assert len(prefix) == expected
    assert prefixer.tokenizer.decode(prefix).endswith(text_end)


@pytest.mark.parametrize("make", [qwen_style, gpt2_style])
def test_ratio_one_is_the_whole_solution_and_eos_and_zero_is_nothing(make):
    prefixer, record = prefixer_and_record(make)
    assert prefixer(record, 1.0) == record.solution_ids + (prefixer.tokenizer.eos_token_id,)
    assert prefixer(record, 0.0) == ()


def test_a_record_with_a_solution_must_carry_its_ids():
    with pytest.raises(ValueError, match="has 1 solutions but token ids of 0: every solution needs its solutions_ids"):
        PromptRecord((1,), "Problem?", (SOLUTION,), "12", "train.jsonl:3")
    with pytest.raises(ValueError, match="has 2 solutions but token ids of 1"):
        PromptRecord((1,), "Problem?", (SOLUTION, SOLUTION), "12", "train.jsonl:3", ((5, 6), ()))
    with pytest.raises(ValueError, match="carries 3 solutions; at most 2 guide"):
        PromptRecord((1,), "Problem?", (SOLUTION,) * 3, "12", "train.jsonl:3", ((5,),) * 3)
    with pytest.raises(TypeError, match=r"solutions must be a tuple of non-empty strings \(one solution: \(text,\)\)"):
        PromptRecord((1,), "Problem?", SOLUTION, "12", "train.jsonl:3", ((5,),))  # a string is not a tuple of them
    benchmark = PromptRecord((1,), "Problem?", (), "12")  # no solution
    assert (benchmark.solution, benchmark.solution_ids, benchmark.trace_ids(1.0)) == ("", (), ())
