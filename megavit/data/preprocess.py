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
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from megavit.data.moments import Moments, combine_all
from megavit.checksum import sha256_of
from megavit.config import number
from megavit.data.mpi_tools import (
    PatientComm,
    SharedStaging,
    add_block_option,
    add_option,
    add_timeout_option,
    on_every_rank,
    on_root,
    progress,
    run_tool,
)
from megavit.data.shards import (
    META_FILE,
    SPLITS,
    STATISTICS,
    Shard,
    metadata,
    new_shard,
    write_metadata,
    write_statistics,
)
from megavit.data.sqg_netcdf import FrameReader, InputError, Timeline, expand_inputs, frame_blocks, open_run

DAY_BOUNDS = ("start_train_day", "start_val_day", "start_test_day", "end_day")


@dataclass
class Plan:
    """What to write: the input time line, each split's frame range and all shards in order."""

    timeline: Timeline
    splits: dict[str, tuple[int, int]]
    shards: list[Shard]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="netCDF files or directories of *.nc: pieces of one run, joined in time order")
    add_option(parser, "out-dir", required=True, help="output directory (created if missing)")
    for name, meaning in zip(DAY_BOUNDS, ("first day of train", "first day of val, end of train",
                                          "first day of test, end of val", "end of test (exclusive)"), strict=True):
        add_option(parser, name, type=number(float), required=True, help=f"{meaning}, in days of the time coordinate")
    add_option(parser, "num_shards", type=number(int, ge=1), required=True, help="shards per split")
    add_block_option(parser)
    add_timeout_option(parser)
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate the inputs and day bounds and lay out the shards (rank 0 only)."""
    bounds = [getattr(args, name) for name in DAY_BOUNDS]
    if not all(a < b for a, b in pairwise(bounds)):
        raise InputError(f"day bounds must satisfy start_train_day < start_val_day < start_test_day < end_day, "
                         f"got {', '.join(f'{b:g}' for b in bounds)}")
    timeline = Timeline.from_runs([open_run(path) for path in expand_inputs(args.input)])
    first, end = timeline.day_range()
    tolerance = timeline.tolerance_days
    if bounds[0] < first - tolerance or bounds[-1] > end + tolerance:
        raise InputError(f"days [{bounds[0]:g}, {bounds[-1]:g}) are beyond the data: {len(timeline.times)} frames "
                         f"every {timeline.step / 3600:g} h cover days [{first:g}, {end:g})")
    frames = [timeline.frame_at(day) for day in bounds]
    splits = dict(zip(SPLITS, pairwise(frames), strict=True))
    shards = []
    for (split, (a, b)), (day_a, day_b) in zip(splits.items(), pairwise(bounds), strict=True):
        n = b - a
        if n < args.num_shards:
            raise InputError(f"split '{split}' (days [{day_a:g}, {day_b:g})) has {n} frames, fewer than "
                             f"--num_shards {args.num_shards}")
        shards += [Shard(split, k, a + k * n // args.num_shards, a + (k + 1) * n // args.num_shards)
                   for k in range(args.num_shards)]
    return Plan(timeline=timeline, splits=splits, shards=shards)


def write_shard(reader: FrameReader, shard: Shard, path: str | Path,
                block_bytes: int) -> tuple[Moments, Moments] | None:
    """Write one shard block by block; for train shards return its (per-level, per-grid-point) moments."""
    grid = reader.timeline.grid
    out = new_shard(path, shard.stop - shard.start, grid)
    levels, points = [], []
    for a, b in frame_blocks(shard.start, shard.stop, out.itemsize * int(np.prod(grid)), block_bytes):
        block = reader.read(a, b)
        out[a - shard.start:b - shard.start] = block
        if shard.split == "train":
            levels.append(Moments.of(block, axis=(0, 2, 3)))
            points.append(Moments.of(block, axis=0))
    out.flush()
    del out  # closes the memory map before the file is renamed
    return (combine_all(levels), combine_all(points)) if levels else None


Written = tuple[dict[int, tuple[Moments, Moments]], dict[str, str]]
"""What a rank reports of its shards: train moments by shard number, SHA-256 by file name."""


def write_my_shards(plan: Plan, staging: SharedStaging, comm: Any, block_bytes: int) -> Written:
    """Write this rank's shards (shard numbers rank, rank + size, ...) and checksum each."""
    moments, digests = {}, {}
    with FrameReader(plan.timeline) as reader:
        for number in progress(range(comm.rank, len(plan.shards), comm.size), comm, "shard"):
            shard = plan.shards[number]
            result = write_shard(reader, shard, staging.file(shard.name), block_bytes)
            digests[shard.name] = sha256_of(staging.file(shard.name))
            if result is not None:
                moments[number] = result
    return moments, digests


def write_summary(plan: Plan, args: argparse.Namespace, gathered: list[Written], staging: SharedStaging) -> None:
    """Combine the train moments in shard order, write the statistics files and meta.json (rank 0)."""
    by_shard = {number: moments for part, _ in gathered for number, moments in part.items()}
    ordered = [by_shard[number] for number in sorted(by_shard)]
    levels = combine_all([level for level, _ in ordered])
    points = combine_all([point for _, point in ordered])
    write_statistics(staging.path, mean=levels.mean, std=levels.std, climatology=points.mean)
    digests = {name: digest for _, part in gathered for name, digest in part.items()}
    digests.update({name: sha256_of(staging.file(name)) for name in STATISTICS})
    write_metadata(staging.path, metadata(plan.timeline, plan.splits, plan.shards,
                                       days={name: getattr(args, name) for name in DAY_BOUNDS},
                                       num_shards=args.num_shards, digests=digests))


def convert(args: argparse.Namespace, comm: Any) -> None:
    """Validate on rank 0, write shards on all ranks, then statistics, then publish everything."""
    plan = on_root(comm, lambda: make_plan(args))
    with SharedStaging(comm, args.out_dir) as staging:
        local = on_every_rank(comm, lambda: write_my_shards(plan, staging, comm, args.block_bytes))
        gathered = comm.gather(local, root=0)
        on_root(comm, lambda: write_summary(plan, args, gathered, staging))
        staging.publish([*SPLITS, *STATISTICS, META_FILE])  # meta.json last: it vouches for the rest


def main(argv: Sequence[str] | None = None) -> int:
    """The nc2npy_mpi command: exit status 0, or 1 on every rank after an error."""
    from mpi4py import MPI  # imported here: initializing MPI is the command's business, not the library's

    args = parse_args(argv)
    comm = PatientComm(MPI.COMM_WORLD, args.timeout_s, "nc2npy_mpi")
    return run_tool(comm, lambda: convert(args, comm), "nc2npy_mpi")
