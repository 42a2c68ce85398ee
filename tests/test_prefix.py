"""Expert-prefix cut (TRAPO.md "Per-prompt sampling: micro-groups", prefix cut)."""

import pytest

from trapo_lightning.prefix import prefix_cut

# index: a0 b1 c2 d3 \n4 \n5 e6 f7 g8 h9 \n10 \n11 i12 j13 k14 l15; length 16
SOLUTION = "abcd\n\nefgh\n\nijkl"


def test_snaps_forward_to_just_after_a_paragraph_break():
    # start = int(16 * 0.25) = 4, window end = int(16 * 0.55) = 8, "\n\n" at 4 -> cut at 4 + 2 = 6
    assert prefix_cut(SOLUTION, 0.25) == 6
    assert SOLUTION[:6] == "abcd\n\n"
    # start = int(16 * 0.5) = 8, window end = int(16 * 0.8) = 12, s[8:12] = "gh\n\n", break at 10 -> 12
    assert prefix_cut(SOLUTION, 0.5) == 12


def test_no_break_in_window_keeps_the_raw_offset():
    # start = int(16 * 0.75) = 12, s[12:16] = "ijkl" has no break -> 12
    assert prefix_cut(SOLUTION, 0.75) == 12
    # start = 8, window end = int(16 * 0.6) = 9, s[8:9] = "g" -> 8
    assert prefix_cut(SOLUTION, 0.5, snap_window=0.1) == 8
    # window end = int(16 * 0.7) = 11, s[8:11] = "gh\n" holds only half a break -> 8
    assert prefix_cut(SOLUTION, 0.5, snap_window=0.2) == 8
    # snap_window 0: empty window -> the raw offset int(16 * 0.25) = 4
    assert prefix_cut(SOLUTION, 0.25, snap_window=0.0) == 4


def test_ratio_zero_and_one():
    # "\n\nabcdefghij": length 12, a snap from 0 would search s[0:int(12 * 0.3) = 3] = "\n\na" and cut at 2;
    # ratio 0 means no prefix, so it must stay 0.
    assert prefix_cut("\n\nabcdefghij", 0.0) == 0
    assert prefix_cut(SOLUTION, 0.0) == 0
    assert prefix_cut(SOLUTION, 1.0) == 16
    assert prefix_cut("", 0.5) == 0


def test_custom_separator():
    # start = 8, s[8:12] = "gh\n\n", first "\n" at 10 -> 11
    assert prefix_cut(SOLUTION, 0.5, separator="\n") == 11


def test_cut_never_exceeds_the_solution():
    # start = int(4 * 0.5) = 2, window end = int(4 * 0.8) = 3; s[2:3] = "\n" -> 2 + 1 = 3 <= 4
    assert prefix_cut("ab\nc", 0.5, separator="\n") == 3
    # window reaching past the end: start = int(6 * 0.9) = 5, end = int(6 * 1.2) = 7, s[5:7] = "\n" -> 6 = len
    assert prefix_cut("abcde\n", 0.9, separator="\n") == 6


@pytest.mark.parametrize("ratio", [-0.1, 1.1])
def test_rejects_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match="ratio"):
        prefix_cut(SOLUTION, ratio)
