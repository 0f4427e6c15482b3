"""Split long SQG netCDF runs into files of a fixed number of frames, in parallel.

    mpiexec -n 4 python tools/sqg_split_mpi.py --input runs/long.nc --length-days 100 --out-dir runs/pieces

Piece k of INPUT.nc is written as INPUT_kkkk.nc with frames [k L, (k + 1) L) (the last piece
holds the remainder), all variables, dimensions, attributes and compression settings copied,
and global attributes source_file and source_frames ("start:stop") saying where it came from.
Pieces go to ranks round-robin; each rank writes its own files. Details: docs/preprocessing.md.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np

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
from megavit.data.sqg_netcdf import (
    InputError,
    expand_inputs,
    frame_blocks,
    frame_step,
    frames_for_days,
    open_run,
    read_pv,
)


@dataclass
class Piece:
    """Frames [start, stop) of `source`, written as `name`."""

    source: str
    start: int
    stop: int
    name: str


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="netCDF runs, or directories of *.nc")
    length = parser.add_mutually_exclusive_group(required=True)
    add_option(length, "length-days", type=number(float, gt=0), help="days per output file (a whole number of output intervals)")
    add_option(length, "steps-per-file", type=number(int, ge=1), help="frames per output file")
    add_option(parser, "out-dir", required=True, help="output directory (created if missing)")
    add_block_option(parser)
    add_timeout_option(parser)
    return parser.parse_args(argv)


def plan_pieces(paths: list[str], steps_per_file: int | None, length_days: float | None) -> list[Piece]:
    """Validate every input and cut it into pieces (rank 0 only)."""
    pieces = []
    for path in paths:
        run = open_run(path)
        steps = steps_per_file or frames_for_days(length_days, frame_step(run.times, path), path)
        stem = os.path.splitext(os.path.basename(path))[0]
        pieces += [Piece(path, a, min(a + steps, len(run.times)), f"{stem}_{k:04d}.nc")
                   for k, a in enumerate(range(0, len(run.times), steps))]
    names = [piece.name for piece in pieces]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise InputError(f"inputs with the same file name would write the same pieces: {clashes}")
    return pieces


def write_piece(piece: Piece, path: str | Path, block_bytes: int) -> None:
    """Copy frames [start, stop) of every time-dependent variable, and everything else whole."""
    with netCDF4.Dataset(piece.source) as source, netCDF4.Dataset(path, "w", format=source.data_model) as target:
        target.setncatts({name: source.getncattr(name) for name in source.ncattrs()})
        target.setncatts({"source_file": os.path.abspath(piece.source),
                          "source_frames": f"{piece.start}:{piece.stop}"})
        for dim in source.dimensions.values():
            length = piece.stop - piece.start if dim.name == "t" else len(dim)
            target.createDimension(dim.name, None if dim.isunlimited() else length)
        for variable in source.variables.values():
            copy_variable(variable, target, piece, block_bytes)


def copy_variable(variable: netCDF4.Variable, target: netCDF4.Dataset, piece: Piece, block_bytes: int) -> None:
    """Create `variable` in `target` with its type, attributes, compression and chunking, and copy its data."""
    variable.set_auto_scale(False)  # copy stored values; pv's mask stays on to detect missing data
    filters = variable.filters() or {}
    chunking = variable.chunking()
    shape = [piece.stop - piece.start if d == "t" else len(target.dimensions[d]) for d in variable.dimensions]
    copy = target.createVariable(
        variable.name, variable.dtype, variable.dimensions,
        compression="zlib" if filters.get("zlib") else None, complevel=filters.get("complevel", 4),
        shuffle=filters.get("shuffle", False), contiguous=chunking == "contiguous",
        chunksizes=[min(c, n) for c, n in zip(chunking, shape, strict=True)] if isinstance(chunking, list) else None,
        fill_value=getattr(variable, "_FillValue", None))
    copy.set_auto_scale(False)
    copy.setncatts({name: variable.getncattr(name) for name in variable.ncattrs() if name != "_FillValue"})
    if "t" not in variable.dimensions:
        copy[...] = variable[...]
        return
    axis = variable.dimensions.index("t")
    frame_bytes = variable.dtype.itemsize * int(np.prod([n for i, n in enumerate(variable.shape) if i != axis]))
    for a, b in frame_blocks(piece.start, piece.stop, frame_bytes, block_bytes):
        along_t = [slice(None)] * len(variable.dimensions)
        along_t[axis] = slice(a - piece.start, b - piece.start)
        if variable.name == "pv":
            copy[tuple(along_t)] = read_pv(variable, a, b, piece.source)
        else:
            source_t = list(along_t)
            source_t[axis] = slice(a, b)
            copy[tuple(along_t)] = variable[tuple(source_t)]


def split(args: argparse.Namespace, comm: Any) -> None:
    """Validate on rank 0, write pieces on all ranks, publish them once every rank succeeded."""
    pieces = on_root(comm, lambda: plan_pieces(expand_inputs(args.input), args.steps_per_file, args.length_days))
    with SharedStaging(comm, args.out_dir) as staging:
        def write_mine() -> None:
            for number in progress(range(comm.rank, len(pieces), comm.size), comm, "file"):
                write_piece(pieces[number], staging.file(pieces[number].name), args.block_bytes)
        on_every_rank(comm, write_mine)
        staging.publish([piece.name for piece in pieces])


def main(argv: Sequence[str] | None = None) -> int:
    """The sqg_split_mpi command: exit status 0, or 1 on every rank after an error."""
    from mpi4py import MPI  # imported here: initializing MPI is the command's business, not the library's

    args = parse_args(argv)
    comm = PatientComm(MPI.COMM_WORLD, args.timeout_s, "sqg_split_mpi")
    return run_tool(comm, lambda: split(args, comm), "sqg_split_mpi")
