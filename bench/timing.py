"""Wall-clock timing shared by the benchmarks (CUDA-synchronized when timing a GPU)."""

from __future__ import annotations

import time
from typing import Callable

import torch


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: bool = True) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` calls of ``fn`` (after one warm-up call)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return times
