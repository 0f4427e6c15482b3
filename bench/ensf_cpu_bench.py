"""The compiled CPU EnSF analysis against the torch path and against its floor, on this CPU.

Run:  .venv/bin/python bench/ensf_cpu_bench.py            (add --help for options)

One analysis: N members, K steps, one-to-one prior score, arctan observations of every variable
(sigma 0.05), float32, timed three ways (seconds per analysis, best of --repeats):

* torch: the path of one operation per step over [N, d] (``filter.backend=torch``, torch.randn
  noise): what an analysis on the CPU cost before the compiled backend;
* compiled: ``filter.backend=compiled`` (:mod:`da_plugin.filters.ensf_cpu`), its first call
  (which compiles) reported apart;
* floor: the same blocks and calls drawing the same N d (K + 1) counter-based normals (in
  Box-Muller pairs) and taking one arctan per draw, kept only as a sum: the per-entry work no
  EnSF step can avoid, with the compiled kernel's code generator, on this CPU.

Also: the dispatch cost alone (the same number of calls on blocks of 16 columns) and the
analysis-mean RMSE of both paths against the truth, which agree statistically (the explicit steps
at sigma 0.05 amplify rounding, so the two paths' members differ).
"""

from __future__ import annotations

import argparse
import os

import torch
from ensf_bench import SIGMA_OBS, problem  # bench/ is on the path of a bench script
from timing import timed

from da_plugin.counter_rng import pair_key
from da_plugin.filters.ensf import EnSF
from da_plugin.filters.ensf_cpu import normal_pair, polynomial_atan, pseudo_steps


def _floor_pair(total: torch.Tensor, row_counters: torch.Tensor, column_counters: torch.Tensor,
                key: torch.Tensor) -> torch.Tensor:
    """total + atan of both draws of a Box-Muller pair: the floor's work for two steps."""
    first, second = normal_pair(row_counters + column_counters, key)
    return total + polynomial_atan(first) + polynomial_atan(second)


_compiled_floor_pair = torch.compile(_floor_pair, fullgraph=True, dynamic=False)


def floor_run(members: int, width: int, ensf: EnSF, columns: int) -> torch.Tensor:
    """The floor of one analysis: the compiled kernel's blocks and calls (one per Box-Muller pair),
    drawing its normals and taking an arctan of each."""
    pairs = len(pseudo_steps(ensf.schedule()))
    keys = [torch.tensor(pair_key(1, pair)) for pair in range(pairs)]
    row_counters = (torch.arange(members) * width).unsqueeze(1)
    column_counters = torch.arange(columns)
    sums = torch.empty(members, -(-width // columns) * columns)
    for start in range(0, width, columns):
        total = torch.zeros(members, columns)
        for key in keys:
            total = _compiled_floor_pair(total, row_counters + start, column_counters, key)
        sums[:, start:start + columns] = total
    return sums


def best_seconds(fn, repeats: int, warmup: bool = True) -> float:
    return min(timed(fn, torch.device("cpu"), repeats, warmup)) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1_000_000, help="state size d")
    parser.add_argument("--members", type=int, default=20, help="ensemble size N")
    parser.add_argument("--steps", type=int, default=100, help="reverse-SDE steps K")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the compiled path and the floor")
    parser.add_argument("--torch-repeats", type=int, default=2, help="timed runs of the torch path (no warm-up)")
    parser.add_argument("--block-elements", type=int, default=EnSF.block_elements,
                        help="EnSF.block_elements: entries per block")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    n, d, k = args.members, args.dim, args.steps
    settings = dict(ensemble_size=n, steps=k, block_elements=args.block_elements)
    plain, compiled = EnSF(**settings, backend="torch"), EnSF(**settings, backend="compiled")
    columns = min(d, max(16, args.block_elements // n // 16 * 16))
    print(f"EnSF d={d:,} N={n} K={k}, one-to-one, arctan obs of all variables (sigma {SIGMA_OBS}), float32; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), {os.cpu_count()} CPUs, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; blocks of {n} x {columns}")
    truth, forecast, obs, y, gen = problem(d, n, torch.device("cpu"), torch.float32)
    rmse = lambda ensemble: (ensemble.mean(0) - truth).pow(2).mean().sqrt().item()  # noqa: E731

    first = best_seconds(lambda: compiled.analysis(forecast, y, obs, gen), 1, warmup=False)
    compiled_s = best_seconds(lambda: compiled.analysis(forecast, y, obs, gen), args.repeats, warmup=False)
    compiled_rmse = rmse(compiled.analysis(forecast, y, obs, gen))
    floor_s = best_seconds(lambda: floor_run(n, d, compiled, columns), args.repeats)
    calls = -(-d // columns) * len(pseudo_steps(compiled.schedule()))
    dispatch_s = best_seconds(lambda: floor_run(n, 16 * calls // len(pseudo_steps(compiled.schedule())), compiled,
                                                16), args.repeats)
    torch_s = best_seconds(lambda: plain.analysis(forecast, y, obs, gen), args.torch_repeats, warmup=False)
    torch_rmse = rmse(plain.analysis(forecast, y, obs, gen))

    print(f"{'path':>10} {'s/analysis':>11} {'vs floor':>9} {'mean RMSE':>10}")
    print(f"{'torch':>10} {torch_s:>11.2f} {torch_s / floor_s:>8.2f}x {torch_rmse:>10.4f}")
    print(f"{'compiled':>10} {compiled_s:>11.2f} {compiled_s / floor_s:>8.2f}x {compiled_rmse:>10.4f}")
    print(f"{'floor':>10} {floor_s:>11.2f} {1.0:>8.2f}x")
    print(f"compiled: {torch_s / compiled_s:.1f}x faster than torch, {compiled_s / floor_s:.2f}x its floor; "
          f"first call (compiles) {first:.1f} s; forecast RMSE {rmse(forecast):.4f}; "
          f"{calls} kernel calls, whose dispatch alone takes {dispatch_s:.2f} s")


if __name__ == "__main__":
    main()
