"""Expert-prefix cut, TRAPO.md "Per-prompt sampling: micro-groups" (prefix cut).

A guided rollout starts from the first `ratio` of the expert solution. Cutting at a raw character offset would
often split a sentence or a formula, so the cut moves forward to just after the first paragraph break found
within `snap_window` (a fraction of the solution length) after the raw offset; the policy then continues from a
clean paragraph start. Without a break in the window the raw offset is kept, so the prefix never grows by more
than `snap_window` of the solution. Ratio 0 is no prefix at all (no snapping), ratio 1 is the whole solution.
"""


def prefix_cut(solution: str, ratio: float, snap_window: float = 0.3, separator: str = "\n\n") -> int:
    """Character index where the expert prefix of `solution` ends (exclusive).

    Args:
        solution: the expert solution text.
        ratio: fraction of the solution to use as prefix, in [0, 1].
        snap_window: how far past `len * ratio` (as a fraction of the length) to look for `separator`.
        separator: the paragraph break to snap to; it must lie wholly inside the window.

    Returns:
        The cut index c, so the prefix is `solution[:c]`.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if snap_window < 0.0:
        raise ValueError(f"snap_window must be >= 0, got {snap_window}")
    length = len(solution)
    if ratio == 0.0:
        return 0
    if ratio == 1.0:
        return length
    start = int(length * ratio)
    stop = int(length * (ratio + snap_window))
    found = solution.find(separator, start, stop)
    if found < 0:
        return start
    return min(found + len(separator), length)
