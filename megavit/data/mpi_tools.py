"""MPI plumbing of the data tools: stop every rank together on an error, publish outputs together.

`on_root` and `on_every_rank` turn a failure on any rank into a `PipelineError` raised on all of
them, so no rank is left waiting in a collective; `SharedStaging` lets every rank write into one
`megavit.atomic.Staging` that rank 0 publishes only after all ranks succeeded; `run_tool` maps
the outcome to an exit status (SIGTERM/SIGINT included: staging discarded, one line, 128 +
signal). `PatientComm` gives every collective a deadline, so a rank that died or stopped ends
the job with a message instead of a hang. Functions take an mpi4py communicator but this module
never imports MPI, so it can be unit-tested in a plain process. Rules: docs/preprocessing.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from megavit.atomic import Interrupted, Staging, interruptible
from megavit.config import number
from megavit.data.sqg_netcdf import BLOCK_BYTES, InputError

T = TypeVar("T")

TIMEOUT_S = 900.0
"""Default of --timeout-s: how long a rank waits in a collective for the others."""


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


class PatientComm:
    """The mpi4py communicator ``comm`` with a deadline on its collectives (bcast, gather, allgather).

    Each collective first waits for every rank in a polled non-blocking barrier; a rank that has not
    arrived within ``timeout_s`` (dead, stopped, hung) makes the waiting ranks print one line and
    abort the job, so no rank waits forever.
    """

    def __init__(self, comm: Any, timeout_s: float, prog: str) -> None:
        self.comm, self.timeout_s, self.prog = comm, timeout_s, prog

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    def bcast(self, obj: Any, root: int = 0) -> Any:
        self._everyone_arrived()
        return self.comm.bcast(obj, root=root)

    def gather(self, obj: Any, root: int = 0) -> Any:
        self._everyone_arrived()
        return self.comm.gather(obj, root=root)

    def allgather(self, obj: Any) -> list[Any]:
        self._everyone_arrived()
        return self.comm.allgather(obj)

    def Abort(self, code: int = 1) -> None:  # noqa: N802 (mpi4py's name)
        self.comm.Abort(code)

    def _everyone_arrived(self) -> None:
        arrival = self.comm.Ibarrier()
        deadline = time.monotonic() + self.timeout_s
        while not arrival.Test():
            if time.monotonic() > deadline:
                print(f"{self.prog}: error: rank {self.rank} waited {self.timeout_s:g} s for the other ranks, which "
                      f"did not arrive (a rank died, was stopped or hangs); aborting the job (--timeout-s sets "
                      f"the wait)", file=sys.stderr, flush=True)
                self.comm.Abort(1)
            time.sleep(0.005)


def run_tool(comm: Any, body: Callable[[], None], prog: str) -> int:
    """Run a tool's body on every rank: exit status 0, or 1 on all ranks after a PipelineError.

    SIGTERM or SIGINT ends the rank after its cleanup (rank 0 discards the staging) with one line
    and 128 + signal. Anything else is a bug that may have left ranks waiting in a collective:
    abort the whole job.
    """
    try:
        with interruptible():
            body()
    except PipelineError as error:
        if comm.rank == 0:
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as stop:
        print(f"{prog}: rank {comm.rank}: stopped by {stop}; nothing was published", file=sys.stderr, flush=True)
        return stop.exit_status
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


def add_timeout_option(parser: Any) -> None:
    """Add --timeout-s S, how long a rank waits for the others in a collective (`PatientComm`)."""
    add_option(parser, "timeout-s", type=number(float, gt=0), default=TIMEOUT_S, metavar="S",
               help=f"a rank waiting this long for the others stops the job (default {TIMEOUT_S:g})")


def _mebibytes(text: str) -> int:
    """A positive size in MiB, as bytes."""
    return round(number(float, gt=0)(text) * 2**20)
