"""Convert SQG netCDF runs into float32 .npy training shards for train/, val/ and test/, plus the
normalisation statistics and climatology of the train split.

    mpiexec -n 4 python tools/nc2npy_mpi.py --input runs/sqg64/ --out-dir data/sqg64 \\
        --start_train_day 100 --start_val_day 900 --start_test_day 950 --end_day 1000 --num_shards 8

Each split is cut into --num_shards shards of consecutive frames [n, 2, ny, nx]; shard k of
a split holds frames [k n / S, (k + 1) n / S) of it. Shards go to ranks round-robin, so the
files are byte-identical for any number of ranks. Layout, day rules and errors:
docs/preprocessing.md.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from sqg_data import (SECONDS_PER_DAY, FrameReader, InputError, Moments, Staging, Timeline, add_option,
                      combine_all, expand_inputs, frame_blocks, on_every_rank, on_root, open_run, progress,
                      run_tool, save_npz)

SPLITS = ("train", "val", "test")
STATISTICS = ("normalize_mean.npz", "normalize_std.npz", "climatology.npz")


@dataclass
class Shard:
    """Frames [start, stop) of the time line, stored as shard `index` of `split`."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.split}/shard_{self.index:05d}.npy"


@dataclass
class Plan:
    """What to write: the input time line, each split's frame range and all shards in order."""

    timeline: Timeline
    splits: dict[str, tuple[int, int]]
    shards: list[Shard]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="netCDF files or directories of *.nc: pieces of one run, joined in time order")
    add_option(parser, "out-dir", required=True, help="output directory (created if missing)")
    for name, meaning in (("start_train_day", "first day of train"),
                          ("start_val_day", "first day of val, end of train"),
                          ("start_test_day", "first day of test, end of val"),
                          ("end_day", "end of test (exclusive)")):
        add_option(parser, name, type=float, required=True, help=f"{meaning}, in days of the time coordinate")
    add_option(parser, "num_shards", type=int, required=True, help="shards per split")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate the inputs and day bounds and lay out the shards (rank 0 only)."""
    bounds = (args.start_train_day, args.start_val_day, args.start_test_day, args.end_day)
    if not all(a < b for a, b in zip(bounds, bounds[1:])):
        raise InputError(f"day bounds must satisfy start_train_day < start_val_day < start_test_day < end_day, "
                         f"got {', '.join(f'{b:g}' for b in bounds)}")
    if args.num_shards < 1:
        raise InputError(f"--num_shards must be at least 1, got {args.num_shards}")
    timeline = Timeline.from_runs([open_run(path) for path in expand_inputs(args.input)])
    first, end = timeline.day_range()
    tolerance = timeline.tolerance_days
    if bounds[0] < first - tolerance or bounds[-1] > end + tolerance:
        raise InputError(f"days [{bounds[0]:g}, {bounds[-1]:g}) are beyond the data: {len(timeline.times)} frames "
                         f"every {timeline.step / 3600:g} h cover days [{first:g}, {end:g})")
    frames = [timeline.frame_at(day) for day in bounds]
    splits = {split: (a, b) for split, a, b in zip(SPLITS, frames, frames[1:])}
    shards = []
    for (split, (a, b)), day_a, day_b in zip(splits.items(), bounds, bounds[1:]):
        n = b - a
        if n < args.num_shards:
            raise InputError(f"split '{split}' (days [{day_a:g}, {day_b:g})) has {n} frames, fewer than "
                             f"--num_shards {args.num_shards}")
        shards += [Shard(split, k, a + k * n // args.num_shards, a + (k + 1) * n // args.num_shards)
                   for k in range(args.num_shards)]
    return Plan(timeline=timeline, splits=splits, shards=shards)


def write_shard(reader: FrameReader, shard: Shard, path: str) -> tuple[Moments, Moments] | None:
    """Write one shard block by block; for train shards return its (per-level, per-grid-point) moments."""
    grid = reader.timeline.grid
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(shard.stop - shard.start, *grid))
    levels, points = [], []
    for a, b in frame_blocks(shard.start, shard.stop, out.itemsize * int(np.prod(grid))):
        block = reader.read(a, b)
        out[a - shard.start:b - shard.start] = block
        if shard.split == "train":
            levels.append(Moments.of(block, axis=(0, 2, 3)))
            points.append(Moments.of(block, axis=0))
    out.flush()
    del out  # closes the memory map before the file is renamed
    return (combine_all(levels), combine_all(points)) if levels else None


def write_my_shards(plan: Plan, staging: Staging, comm: MPI.Comm) -> dict[int, tuple[Moments, Moments]]:
    """Write this rank's shards (shard numbers rank, rank + size, ...); return train moments by shard number."""
    moments = {}
    with FrameReader(plan.timeline) as reader:
        for number in progress(range(comm.rank, len(plan.shards), comm.size), comm, "shard"):
            shard = plan.shards[number]
            result = write_shard(reader, shard, staging.file(shard.name))
            if result is not None:
                moments[number] = result
    return moments


def write_summary(plan: Plan, args: argparse.Namespace, gathered: list[dict[int, tuple[Moments, Moments]]],
                  staging: Staging) -> None:
    """Combine the train moments in shard order, write the statistics files and meta.json (rank 0)."""
    by_shard = {number: moments for part in gathered for number, moments in part.items()}
    ordered = [by_shard[number] for number in sorted(by_shard)]
    levels = combine_all([level for level, _ in ordered])
    points = combine_all([point for _, point in ordered])
    save_npz(staging.file("normalize_mean.npz"), {"pv": levels.mean})
    save_npz(staging.file("normalize_std.npz"), {"pv": levels.std})
    save_npz(staging.file("climatology.npz"), {"pv": points.mean})
    with open(staging.file("meta.json"), "w", encoding="utf-8") as file:
        json.dump(metadata(plan, args), file, indent=2)
        file.write("\n")


def metadata(plan: Plan, args: argparse.Namespace) -> dict:
    """Everything a reader needs besides the arrays: layout, time step, days, shards, sources."""
    timeline = plan.timeline
    first_run = timeline.runs[0]
    splits = {}
    for split, (a, b) in plan.splits.items():
        shards = [{"file": s.name, "frames": s.stop - s.start, "first_frame": s.start - a,
                   "time_seconds": [float(timeline.times[s.start]), float(timeline.times[s.stop - 1])]}
                  for s in plan.shards if s.split == split]
        splits[split] = {"frames": b - a, "first_day": float(timeline.days[a]), "shards": shards}
    return {
        "variable": "pv",
        "units": first_run.units,
        "layout": "each shard is a float32 C-order .npy array [frame, level, y, x] of consecutive frames",
        "shape": list(timeline.grid),
        "levels": first_run.levels,
        "dt_seconds": timeline.step,
        "days": {"start_train_day": args.start_train_day, "start_val_day": args.start_val_day,
                 "start_test_day": args.start_test_day, "end_day": args.end_day},
        "num_shards": args.num_shards,
        "statistics": {"files": list(STATISTICS), "key": "pv", "split": "train", "dtype": "float64",
                       "normalize_shape": [timeline.grid[0]], "climatology_shape": list(timeline.grid)},
        "splits": splits,
        "sources": [{"path": os.path.abspath(run.path), "frames": len(run.times),
                     "first_day": float(run.times[0] / SECONDS_PER_DAY)} for run in timeline.runs],
        "attributes": first_run.attributes,
    }


def convert(args: argparse.Namespace, comm: MPI.Comm) -> None:
    """Validate on rank 0, write shards on all ranks, then statistics, then publish everything."""
    plan = on_root(comm, lambda: make_plan(args))
    with Staging(comm, args.out_dir) as staging:
        local = on_every_rank(comm, lambda: write_my_shards(plan, staging, comm))
        gathered = comm.gather(local, root=0)
        on_root(comm, lambda: write_summary(plan, args, gathered, staging))
        staging.publish([*SPLITS, *STATISTICS, "meta.json"])  # meta.json last: it vouches for the rest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    return run_tool(comm, lambda: convert(args, comm), "nc2npy_mpi")


if __name__ == "__main__":
    raise SystemExit(main())
