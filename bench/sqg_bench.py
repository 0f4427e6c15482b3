"""Benchmark the batched torch SQG model: member-steps per second at 64^2, 128^2 and 256^2.

Run:  .venv/bin/python bench/sqg_bench.py            (add --help for options)

Each resolution uses its sqgturb preset (dt, diffusion) and the true Jacobian; the state is a
spun-up-like field (jet plus noise; the cost of a step does not depend on the flow). A
measurement is ``SQG.step(x, steps)`` on a batch of members, after one warm-up call (which also
builds the cached spectral operators), CUDA-synchronized on GPU; the median of ``--repeats``
runs is reported as ms per step, member-steps per second and simulated days per wall-clock
second for the whole batch. The default CPU run takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from timing import add_device_options, selected_devices, timed  # bench/timing.py (scripts run from bench/)

from da_plugin.models.sqg import SQG


def check(device: torch.device, dtype: torch.dtype) -> None:
    """Agreement of the timed configuration with a float64 CPU run after 1 day at 64^2 (turbulent start)."""
    model = SQG.preset(64)
    x = model.jet() + 10 * model.initial_state(torch.Generator().manual_seed(0), torch.float64)
    reference = model.step(x, 72)
    diff = (model.step(x.to(device=device, dtype=dtype), 72).double().cpu() - reference).abs().max().item()
    print(f"check 64^2, 1 day ({device.type}, {dtype}): max |theta - float64 CPU| = {diff:.2e} K "
          f"(theta spans {reference.min():.1f} .. {reference.max():.1f} K)")


def bench_row(n: int, members: int, device: torch.device, dtype: torch.dtype, repeats: int) -> str:
    """One table row: ms per RK4 step of the batch, member-steps/s, simulated days per second."""
    model = SQG.preset(n)
    generator = torch.Generator().manual_seed(0)
    x = torch.stack([model.jet() + 10 * model.initial_state(generator, torch.float64) for _ in range(members)])
    x = x.to(device=device, dtype=dtype)
    steps = max(1, round(2 * 64**2 / n**2 * 8 / members))  # about the same work per call at every size
    ms = statistics.median(timed(lambda: model.step(x, steps), device, repeats)) / steps
    days_per_s = 1e3 / ms * model.dt / 86400
    return (f"{device.type:>6} {n:>5}^2 {members:>7} {model.dt:>6.0f} {ms:>10.2f} {members * 1e3 / ms:>13.0f} "
            f"{days_per_s:>10.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="grid sizes N (presets)")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 20], help="batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    add_device_options(parser, dtype="float32")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    print(f"SQG step (RK4, 3/2-rule dealiasing), dtype={args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    for device in selected_devices(args):
        check(device, dtype)
        print(f"{'device':>6} {'N':>7} {'members':>7} {'dt s':>6} {'ms/step':>10} {'member-steps/s':>13} "
              f"{'days/s':>10}   (days/s: simulated days per wall-clock second, whole batch)")
        for n in args.sizes:
            for members in args.members:
                print(bench_row(n, members, device, dtype, args.repeats), flush=True)


if __name__ == "__main__":
    main()
