"""Benchmark the batched LETKF.analysis against a per-grid-point Python loop.

Run:  .venv/bin/python bench/letkf_bench.py            (add --help for options)

Setup: a 1-D periodic grid of d Lorenz-96-like variables, every 2nd one observed (identity,
sigma 1), N members, Gaspari-Cohn localization of --radius grid units, no inflation. The
neighbour search (cached by LETKF after its first call) is timed once, on its own. The batched
analysis is timed after one warm-up call; the loop reference calls the same ensemble_weights
with B=1 per grid point, so the comparison isolates batching. When the loop over all d points
would exceed --max-loop-seconds it runs on a subset of points and is scaled linearly (marked *).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from timing import add_device_options, selected_devices, timed  # bench/timing.py (scripts run from bench/)

from da_plugin.filters.letkf import LETKF, apply_weights, ensemble_weights, obs_space
from da_plugin.obs import ObservationOperator


def problem(d: int, n: int, device: torch.device, dtype: torch.dtype,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, ObservationOperator]:
    """Truth ~ 8 + 3 N(0, 1), forecast = truth + N(0, 1), y = truth[::2] + N(0, 1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    truth = 8.0 + 3.0 * torch.randn(d, generator=gen, dtype=dtype, device=device)
    forecast = truth + torch.randn(n, d, generator=gen, dtype=dtype, device=device)
    obs = ObservationOperator("identity", 1.0, torch.arange(0, d, 2), d)
    return forecast, obs.sample(truth, gen), obs


def loop_analysis(letkf: LETKF, forecast: torch.Tensor, y: torch.Tensor, obs: ObservationOperator,
                  points: int | None = None) -> torch.Tensor:
    """LETKF written plainly: one B=1 ensemble transform per grid point (the first ``points``)."""
    rows = obs_space(forecast, y, obs).T  # [m, N + 1]: perturbations and innovation
    neighbours, taper = letkf.local_observations(obs, forecast.device, forecast.dtype)
    out = forecast.clone()
    for i in range(obs.dim if points is None else points):
        local = neighbours[i]
        weights = ensemble_weights(rows[local].unsqueeze(0), (taper[i] / obs.sigma**2).unsqueeze(0))
        out[:, i:i + 1] = apply_weights(forecast[:, i:i + 1], weights)
    return out


def check(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, d: int = 400) -> None:
    """The batched analysis and the loop should agree to rounding."""
    letkf = LETKF(ensemble_size=args.members, localization_radius=args.radius)
    forecast, y, obs = problem(d, args.members, device, dtype)
    diff = (letkf.analysis(forecast, y, obs) - loop_analysis(letkf, forecast, y, obs)).abs().max().item()
    print(f"check d={d} ({device.type}, {args.dtype}): max |batched - loop| = {diff:.2e}")


def bench_row(args: argparse.Namespace, d: int, device: torch.device, dtype: torch.dtype) -> str:
    """One table row: neighbour search, batched and loop timings, speed-up."""
    letkf = LETKF(ensemble_size=args.members, localization_radius=args.radius)
    forecast, y, obs = problem(d, args.members, device, dtype)
    search_ms = timed(lambda: letkf.local_observations(obs, device, dtype), device, 1, warmup=False)[0]
    width = letkf.local_observations(obs, device, dtype)[0].shape[1]
    batched = statistics.median(timed(lambda: letkf.analysis(forecast, y, obs), device, args.repeats))
    # estimate the per-point cost on a few points (also the warm-up), then fit the budget
    probe = min(d, 50)
    per_point_s = min(timed(lambda: loop_analysis(letkf, forecast, y, obs, probe), device, 2)) / 1e3 / probe
    points = max(1, min(d, int(args.max_loop_seconds / per_point_s)))
    loop_ms = timed(lambda: loop_analysis(letkf, forecast, y, obs, points), device, args.repeats, warmup=False)
    loop = statistics.median(loop_ms) * d / points
    mark = "" if points == d else f"*  (loop scaled from {points:,} points)"
    return (f"{device.type:>6} {d:>7,} {obs.size:>7,} {args.members:>3} {width:>3} {search_ms:>10.1f} "
            f"{batched:>11.2f} {1e3 / batched:>10.3g} {loop:>11.1f} {1e3 / loop:>9.3g} {loop / batched:>8.1f}x{mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[40, 400, 4000, 40000], help="state sizes d")
    parser.add_argument("--members", type=int, default=20, help="ensemble size N")
    parser.add_argument("--radius", type=float, default=4.0, help="localization radius in grid units")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--max-loop-seconds", type=float, default=20.0,
                        help="time budget per loop run; beyond it the loop covers fewer points and is scaled")
    add_device_options(parser, dtype="float64")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    print(f"LETKF N={args.members}, radius={args.radius}, inflation 1.0, identity obs of every 2nd variable, "
          f"sigma=1, dtype={args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for device in selected_devices(args):
        check(args, device, dtype)
        print(f"{'device':>6} {'d':>7} {'m':>7} {'N':>3} {'L':>3} {'search ms':>10} {'batched ms':>11} "
              f"{'batched/s':>10} {'loop ms':>11} {'loop/s':>9} {'speedup':>9}   (ms per analysis; * = scaled)")
        for d in args.dims:
            print(bench_row(args, d, device, dtype), flush=True)


if __name__ == "__main__":
    main()
