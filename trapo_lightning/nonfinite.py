"""What to do when a step's loss or gradient is not finite (NaN or Inf).

One bad batch must not end a days-long run, and must never be papered over: the step is skipped (no optimizer
update, gradients dropped), counted and reported, and only a run of `max_consecutive` bad steps in a row, which
means the weights themselves have gone bad, stops training. NaN is never replaced by 0.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class StepAction(enum.Enum):
    step = "step"
    skip = "skip"
    stop = "stop"


@dataclass
class NonFiniteGuard:
    max_consecutive: int = 3
    """This many non-finite steps in a row stop the run (a checkpoint of the last good state is written first)."""
    skipped: int = 0
    """Non-finite steps skipped since the run started (resumes included)."""
    consecutive: int = 0

    def __post_init__(self) -> None:
        if self.max_consecutive < 1:
            raise ValueError(f"max_consecutive non-finite steps must be >= 1, got {self.max_consecutive}")

    def update(self, finite: bool) -> StepAction:
        """Record one step's outcome and say what to do with its gradients."""
        if finite:
            self.consecutive = 0
            return StepAction.step
        self.skipped += 1
        self.consecutive += 1
        return StepAction.stop if self.consecutive >= self.max_consecutive else StepAction.skip

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])


class NonFiniteLossError(RuntimeError):
    """Raised after `max_consecutive` non-finite steps in a row; the message names the steps and the checkpoint."""
