"""Weak and strong scaling of the decomposed EnSF (python -m da_plugin.scale) over processes,
and its speed at growing d on one device.

Run:  .venv/bin/python bench/ensf_scaling.py                    (CPU processes on this machine)
      .venv/bin/python bench/ensf_scaling.py --sizes 1000000 10000000 100000000   (one GPU)
      .venv/bin/python bench/ensf_scaling.py --collect runs/ensf_scaling   (tables of a Slurm study)

Each point is one torchrun job (one rank per process, cores/ranks threads each); its
seconds_per_analysis is the slowest rank's median over the cycles after the first.

* weak:   d = --per-rank-dim x ranks; efficiency = t(1) / t(ranks)
* strong: d = --total-dim;            efficiency = t(1) / (ranks x t(ranks))
* sizes:  one process on --device (cuda when present) at each d; achieved GB/s counts the bytes
          an analysis must move, 4 x (2 N d + 2 d), against the copy bandwidth measured here

On this 2-core machine only 1 and 2 ranks have a core each; larger counts share cores and
show the oversubscription, not the method. The fused kernel against its floors and the torch
version: bench/ensf_fused_bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def run_point(ranks: int, dim: int, args: argparse.Namespace, output: Path, device: str = "cpu") -> dict:
    """One torchrun job of da_plugin.scale; returns its summary."""
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "da_plugin.scale", str(ROOT / "configs/da/l96_ensf_scale.yaml"), f"model.dim={dim}",
               f"cycles={args.cycles}", f"spinup_steps={args.spinup_steps}", f"filter.steps={args.steps}",
               f"device={device}", "progress=false", f"output_dir={output}"]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return json.loads((output / "summary.json").read_text())


def table(study: str, rows: list[dict]) -> str:
    """Ranks, d, s/analysis and efficiency relative to the smallest rank count."""
    rows = sorted(rows, key=lambda r: r["ranks"])
    base = rows[0]
    lines = [f"{study} scaling", f"{'ranks':>6} {'d':>12} {'s/analysis':>11} {'s/forecast':>11} {'efficiency':>10} "
                                 f"{'rmse_a':>7}"]
    for r in rows:
        ideal = base["seconds_per_analysis"] * (1 if study == "weak" else base["ranks"] / r["ranks"])
        lines.append(f"{r['ranks']:>6} {r['dim']:>12,} {r['seconds_per_analysis']:>11.3f} "
                     f"{r['seconds_per_forecast']:>11.4f} {ideal / r['seconds_per_analysis']:>9.0%} "
                     f"{r['rmse_a']:>7.3f}")
    return "\n".join(lines)


def copy_bandwidth(device: torch.device, gbytes: float = 1.0) -> float:
    """Copy bandwidth of ``device`` in GB/s, counting bytes read plus bytes written (best of 5)."""
    source = torch.ones(int(gbytes * 1e9 / 4), device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(6):  # the first copy warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * gbytes / best


def sizes(dims: list[int], args: argparse.Namespace, scratch: Path) -> None:
    """s/analysis, s/forecast, achieved GB/s and peak memory of one process at each d."""
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the memory to the runs
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"{name}; copy bandwidth {bandwidth:.0f} GB/s; N=20, K={args.steps}, arctan obs of every variable")
    print(f"{'d':>12} {'s/analysis':>11} {'s/forecast':>11} {'GB/s':>7} {'of copy':>8} {'peak GiB':>9} {'kernel':>7}")
    for dim in dims:
        r = run_point(1, dim, args, scratch / f"size_{dim}", device=args.device)
        achieved = 4 * (2 * r["members"] * dim + 2 * dim) / r["seconds_per_analysis"] / 1e9
        print(f"{dim:>12,} {r['seconds_per_analysis']:>11.3f} {r['seconds_per_forecast']:>11.4f} {achieved:>7.2f} "
              f"{achieved / bandwidth:>8.2%} {r['peak_gpu_gib_max_rank']:>9.2f} {r['analysis_kernel']:>7}", flush=True)


def collect(directory: Path) -> None:
    """Print the tables of summaries laid out as <study>_<ranks>/summary.json (launch/ensf_scaling.slurm)."""
    for study in ("weak", "strong"):
        rows = [json.loads(p.read_text()) for p in sorted(directory.glob(f"{study}_*/summary.json"))]
        if rows:
            print(table(study, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="process counts")
    parser.add_argument("--per-rank-dim", type=int, default=50_000, help="weak scaling: variables per rank")
    parser.add_argument("--total-dim", type=int, default=100_000, help="strong scaling: total variables")
    parser.add_argument("--steps", type=int, default=100, help="reverse-SDE steps K")
    parser.add_argument("--cycles", type=int, default=4, help="analysis cycles per job (the first is not timed)")
    parser.add_argument("--spinup-steps", type=int, default=100)
    parser.add_argument("--sizes", type=int, nargs="+", metavar="D",
                        help="instead: one process at each of these d on --device, with achieved GB/s")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device for --sizes (default: cuda when present)")
    parser.add_argument("--collect", type=Path, help="only print tables from a directory of Slurm results")
    args = parser.parse_args()
    if args.collect:
        collect(args.collect)
        return
    if args.sizes:
        with tempfile.TemporaryDirectory() as scratch:
            sizes(args.sizes, args, Path(scratch))
        return
    print(f"CPU processes, {os.cpu_count()} cores; N=20, K={args.steps}, arctan obs of every variable")
    with tempfile.TemporaryDirectory() as scratch:
        for study in ("weak", "strong"):
            rows = []
            for ranks in args.ranks:
                dim = args.per_rank_dim * ranks if study == "weak" else args.total_dim
                rows.append(run_point(ranks, dim, args, Path(scratch) / f"{study}_{ranks}"))
            print(table(study, rows), flush=True)


if __name__ == "__main__":
    main()
