"""Wall-clock timing with the device synchronised, per named stage.

Taught in: notebooks/07_timing_real_gpu_runs.ipynb.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Accumulates seconds per stage ("draft", "verify", "commit", ...). With `enabled=False`
    it only counts, so a fast path can skip the synchronisations."""

    def __init__(self, device="cpu", enabled: bool = True):
        self.device = device
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str):
        if not self.enabled:
            yield
            return
        sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[name] += time.perf_counter() - t0

    def as_dict(self) -> dict[str, float]:
        return dict(self.seconds)
