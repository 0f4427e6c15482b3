"""Wall-clock timing shared by the benchmarks (CUDA-synchronized when timing a GPU)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

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


def add_device_options(parser: argparse.ArgumentParser, dtype: str = "float32") -> None:
    """--device, --dtype and --threads, as every benchmark takes them."""
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                        help="auto: CPU, then CUDA when available")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=dtype)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def selected_devices(args: argparse.Namespace) -> list[torch.device]:
    """The devices --device names (applying --threads first)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    names = {"cpu": ["cpu"], "cuda": ["cuda"], "auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}
    return [torch.device(name) for name in names[args.device]]
