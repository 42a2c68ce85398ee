"""Wall-clock seconds per phase of a training step (rollout, forward, backward, optimizer), logged every step as
`time/<phase>_s` so the step-time budget is visible in every run, not only in benchmarks. On CUDA the device is
synchronised at phase boundaries, otherwise asynchronous kernels would be charged to whichever phase waits."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, device: torch.device | None = None) -> None:
        self.sync = device is not None and device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self.seconds[name] += time.perf_counter() - start

    def metrics(self, prefix: str = "time") -> dict[str, float]:
        return {f"{prefix}/{name}_s": value for name, value in self.seconds.items()}

    def _synchronize(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
