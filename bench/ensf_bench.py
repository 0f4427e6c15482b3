"""Benchmark EnSF.analysis against a naive loop-over-members reference.

Run:  .venv/bin/python bench/ensf_bench.py            (add --help for options)

Setup: N members, K reverse-SDE steps, arctan observations of every variable (sigma 0.05).
Both implementations are timed (warm-up once, then best/median of --repeats); the loop is
timed on fewer steps and scaled linearly when a full run would exceed --max-loop-seconds.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics

import torch
from timing import add_device_options, selected_devices, timed  # bench/timing.py (scripts run from bench/)

from da_plugin.filters.ensf import EnSF
from da_plugin.obs import ObservationOperator

SIGMA_OBS = 0.05
CPU_DIMS = [10_000, 100_000, 1_000_000]
GPU_DIMS = [1_000_000, 10_000_000, 100_000_000]


def naive_analysis(forecast: torch.Tensor, y: torch.Tensor, sigma_obs: float, steps: int, eps_alpha: float,
                   eps_beta: float, generator: torch.Generator, run_steps: int | None = None) -> torch.Tensor:
    """EnSF (one_to_one prior, linear damping) written plainly: member by member, step by step."""
    out = torch.empty_like(forecast)
    dt = 1.0 / steps
    for i in range(forecast.shape[0]):
        x_i = forecast[i]
        z = torch.randn(x_i.shape, generator=generator, dtype=x_i.dtype, device=x_i.device)
        for k in range(steps if run_steps is None else run_steps):
            t = 1.0 - k * dt
            alpha = 1.0 - (1.0 - eps_alpha) * t
            sigma2 = eps_beta + (1.0 - eps_beta) * t
            f = -(1.0 - eps_alpha) / alpha
            g2 = (1.0 - eps_beta) - 2.0 * f * sigma2
            prior_score = -(z - alpha * x_i) / sigma2
            likelihood_score = (y - torch.atan(z)) / ((1.0 + z * z) * sigma_obs**2)
            score = prior_score + (1.0 - t) * likelihood_score
            noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
            z = z - dt * (f * z - g2 * score) + math.sqrt(dt) * math.sqrt(g2) * noise
        out[i] = z
    return out


def problem(d: int, n: int, device: torch.device, dtype: torch.dtype,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, ObservationOperator, torch.Tensor, torch.Generator]:
    """Truth ~ N(0, 3^2), forecast = truth + N(0, 1), y = atan(truth) + N(0, 0.05^2)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    truth = 3.0 * torch.randn(d, generator=gen, dtype=dtype, device=device)
    forecast = truth + torch.randn(n, d, generator=gen, dtype=dtype, device=device)
    obs = ObservationOperator("arctan", SIGMA_OBS, torch.arange(d), d)
    return truth, forecast, obs, obs.sample(truth, gen), gen


def peak_memory(device: torch.device) -> str:
    """Peak GPU memory allocated (since last reset), or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB rss"  # ru_maxrss is KiB on Linux


def check_accuracy(ensf: EnSF, device: torch.device, dtype: torch.dtype, d: int = 10_000) -> None:
    """Both implementations should give a similar ensemble-mean RMSE against the truth."""
    truth, forecast, obs, y, gen = problem(d, ensf.ensemble_size, device, dtype)
    rmse = lambda ens: (ens.mean(0) - truth).pow(2).mean().sqrt().item()  # noqa: E731
    a = ensf.analysis(forecast, y, obs, gen)
    b = naive_analysis(forecast, y, SIGMA_OBS, ensf.steps, ensf.eps_alpha, ensf.eps_beta, gen)
    print(f"check d={d} ({device.type}): mean RMSE forecast {rmse(forecast):.4f}, "
          f"EnSF {rmse(a):.4f}, loop {rmse(b):.4f}")


def bench_row(ensf: EnSF, d: int, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> str:
    """One table row: EnSF vs loop timings, speed-up, effective bandwidth and peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, forecast, obs, y, gen = problem(d, ensf.ensemble_size, device, dtype)
    n, k = ensf.ensemble_size, ensf.steps
    ensf_ms = timed(lambda: ensf.analysis(forecast, y, obs, gen), device, args.repeats)
    loop = lambda steps: naive_analysis(forecast, y, SIGMA_OBS, k, ensf.eps_alpha,  # noqa: E731
                                        ensf.eps_beta, gen, run_steps=steps)
    # estimate the full loop's cost from a 1-step run, then cut the steps to fit the budget
    estimate_s = k * min(timed(lambda: loop(1), device, 2)) / 1e3
    run_steps = max(1, min(k, int(k * args.max_loop_seconds / estimate_s)))
    loop_ms = [t * k / run_steps for t in timed(lambda: loop(run_steps), device, args.repeats, warmup=False)]
    note = "" if run_steps == k else f" (scaled from {run_steps} steps)"
    # bytes moved ~ N * d * element_size * 6 reads/writes per step (z, forecast, noise, temporaries) * K
    gbytes = n * d * forecast.element_size() * 6 * k / 1e9
    ensf_best, ensf_med = min(ensf_ms), statistics.median(ensf_ms)
    loop_best, loop_med = min(loop_ms), statistics.median(loop_ms)
    return (f"{device.type:>6} {d:>11,} {n:>3} {k:>4} {ensf_best:>10.1f} {ensf_med:>10.1f} "
            f"{loop_best:>11.1f} {loop_med:>11.1f} {loop_med / ensf_med:>7.1f}x "
            f"{gbytes / (ensf_best / 1e3):>7.1f} {peak_memory(device):>14}{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", help="state sizes d (default: CPU 1e4 1e5 1e6, GPU 1e6 1e7 1e8)")
    parser.add_argument("--members", type=int, default=20, help="ensemble size N")
    parser.add_argument("--steps", type=int, default=100, help="reverse-SDE steps K")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (after one warm-up)")
    parser.add_argument("--prior-score", choices=["one_to_one", "mixture"], default="one_to_one")
    parser.add_argument("--max-loop-seconds", type=float, default=60.0,
                        help="above this estimated time the loop runs fewer steps and is scaled")
    add_device_options(parser, dtype="float32")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    ensf = EnSF(ensemble_size=args.members, steps=args.steps, prior_score=args.prior_score)
    print(f"EnSF prior_score={args.prior_score}, dtype={args.dtype}, arctan obs of all variables, "
          f"sigma={SIGMA_OBS}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if args.prior_score != "one_to_one":
        print("note: the loop reference always uses the one_to_one prior score")
    for device in selected_devices(args):
        check_accuracy(ensf, device, dtype)
        print(f"{'device':>6} {'d':>11} {'N':>3} {'K':>4} {'EnSF best':>10} {'EnSF med':>10} "
              f"{'loop best':>11} {'loop med':>11} {'speedup':>8} {'GB/s':>7} {'peak mem':>14}"
              "   (times in ms/analysis)")
        for d in args.dims or (CPU_DIMS if device.type == "cpu" else GPU_DIMS):
            print(bench_row(ensf, d, device, dtype, args), flush=True)


if __name__ == "__main__":
    main()
