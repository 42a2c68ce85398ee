"""Phase timing: seconds accumulate per phase name (a scripted clock, so the test is about bookkeeping only)."""

import itertools

from trapo_lightning import timing
from trapo_lightning.timing import PhaseTimer


def test_phases_accumulate_and_are_named(monkeypatch):
    ticks = itertools.count(step=0.5)  # every perf_counter() call advances the clock by 0.5 s
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
    timer = PhaseTimer()
    with timer.phase("forward"):
        pass
    with timer.phase("backward"):
        pass
    with timer.phase("forward"):
        pass
    # each phase spans one tick (enter at t, exit at t + 0.5): forward twice = 1.0, backward once = 0.5
    assert timer.metrics() == {"time/forward_s": 1.0, "time/backward_s": 0.5}
