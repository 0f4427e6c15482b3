"""MPI plumbing of the data tools: stop every rank together on an error, publish outputs together.

`on_root` and `on_every_rank` turn a failure on any rank into a `PipelineError` raised on all of
them, so no rank is left waiting in a collective; `SharedStaging` lets every rank write into one
`megavit.atomic.Staging` that rank 0 publishes only after all ranks succeeded; `run_tool` maps
the outcome to an exit status. Functions take an mpi4py communicator but this module never
imports MPI, so it can be unit-tested in a plain process. Rules: docs/preprocessing.md.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from megavit.atomic import Staging
from megavit.data.sqg_netcdf import BLOCK_BYTES, InputError

T = TypeVar("T")


class PipelineError(RuntimeError):
    """Raised on every rank when any rank failed, with the failed ranks' messages."""


def _describe(error: Exception) -> str:
    return str(error) if isinstance(error, InputError) else f"{type(error).__name__}: {error}"


def on_root(comm: Any, work: Callable[[], T]) -> T:
    """Run `work` on rank 0 and broadcast its result; if it raised, raise PipelineError on every rank."""
    outcome = None
    if comm.rank == 0:
        try:
            outcome = (True, work())
        except Exception as error:  # any failure must reach the other ranks, or they would wait forever
            outcome = (False, _describe(error))
    ok, value = comm.bcast(outcome, root=0)
    if not ok:
        raise PipelineError(value)
    return value


def on_every_rank(comm: Any, work: Callable[[], T]) -> T:
    """Run `work` on every rank; if any rank raised, raise PipelineError on all with each failure."""
    try:
        value, message = work(), None
    except Exception as error:  # caught so that every rank reaches the allgather below
        value, message = None, _describe(error)
    failures = [(rank, m) for rank, m in enumerate(comm.allgather(message)) if m is not None]
    if failures:
        raise PipelineError("\n".join(m if comm.size == 1 else f"rank {r}: {m}" for r, m in failures))
    return value


class SharedStaging:
    """One `megavit.atomic.Staging` in `out_dir` for all ranks of `comm` (collective).

    Rank 0 creates it and broadcasts it; every rank writes into `file(name)`; `publish` moves the
    entries into `out_dir` on rank 0 once called on every rank (after they all succeeded), and
    leaving the `with` block discards what is still staged. A failed run leaves `out_dir` as it
    was (and removes it if this run created it).
    """

    def __init__(self, comm: Any, out_dir: str | Path):
        self.comm = comm
        self.staging: Staging = on_root(comm, lambda: Staging.create(out_dir))

    @property
    def path(self) -> Path:
        """The staging directory."""
        return self.staging.path

    def file(self, name: str) -> Path:
        """Staged path of output `name` (a path relative to out_dir); creates its directory."""
        return self.staging.file(name)

    def publish(self, names: Sequence[str]) -> None:
        """Move the staged top-level entries `names` into out_dir in order, replacing older ones; if a
        rename fails, out_dir is restored and every rank raises PipelineError."""
        on_root(self.comm, lambda: self.staging.publish(names))

    def __enter__(self) -> SharedStaging:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.comm.rank == 0:
            self.staging.discard()


def run_tool(comm: Any, body: Callable[[], None], prog: str) -> int:
    """Run a tool's body on every rank: exit status 0, or 1 on all ranks after a PipelineError.

    Anything else is a bug that may have left ranks waiting in a collective: abort the whole job.
    """
    try:
        body()
    except PipelineError as error:
        if comm.rank == 0:
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        return 1
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
    return 0


def progress(items: Sequence[T], comm: Any, unit: str) -> Iterable[T]:
    """`items` with a tqdm bar on rank 0 (counting its own share of the work), plain on other ranks."""
    if comm.rank != 0:
        return items
    return tqdm(items, desc=f"rank 0 of {comm.size}", unit=unit, file=sys.stderr)


def add_option(parser: Any, name: str, **kwargs: Any) -> None:
    """Add --NAME to a parser or argument group under both spellings, --out-dir and --out_dir
    (the paper's scripts used underscores); the value goes to args.out_dir unless `dest` is given."""
    dashed, underscored = name.replace("_", "-"), name.replace("-", "_")
    flags = [f"--{dashed}"] if dashed == underscored else [f"--{dashed}", f"--{underscored}"]
    parser.add_argument(*flags, **{"dest": underscored, **kwargs})


def add_block_option(parser: Any) -> None:
    """Add --block-mb MIB, the most frame data a rank moves at once (its memory bound), as args.block_bytes."""
    add_option(parser, "block-mb", dest="block_bytes", type=_mebibytes, default=BLOCK_BYTES, metavar="MIB",
               help=f"move frames in blocks of at most MIB mebibytes per rank (default {BLOCK_BYTES // 2**20})")


def _mebibytes(text: str) -> int:
    """A positive size in MiB, as bytes."""
    try:
        size = float(text)
    except ValueError:
        size = 0.0
    if not size > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of MiB, got {text!r}")
    return round(size * 2**20)
