"""Shared helpers of the SQG preprocessing tools `sqg_split_mpi.py` and `nc2npy_mpi.py`.

One place for: opening and validating sqgturb-style netCDF runs (`pv(t, z, y, x)` plus a time
coordinate `t` with a units attribute), joining runs into one time line (day <-> frame index),
reading frames with missing-data checks, parallel statistics (Chan et al. moments), and the MPI
plumbing that stops every rank together on an error and publishes outputs only after all ranks
succeeded. Functions take an mpi4py communicator but this module never imports MPI, so it can
be unit-tested in a plain process. The rules are documented in docs/preprocessing.md.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import netCDF4
import numpy as np
from tqdm import tqdm

T = TypeVar("T")

SECONDS_PER_DAY = 86400.0
PV_DIMENSIONS = ("t", "z", "y", "x")
LEVELS = 2
BLOCK_BYTES = 64 * 2**20  # frames move between netCDF and disk in blocks of at most this size
SPACING_RTOL = 0.01  # frame spacing may vary this much (float32 seconds round at large t)
_SECONDS_PER_UNIT = {
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": SECONDS_PER_DAY, "day": SECONDS_PER_DAY, "days": SECONDS_PER_DAY,
}


class InputError(ValueError):
    """Bad input files or arguments; the message names the file, the variable, expected and found."""


class PipelineError(RuntimeError):
    """Raised on every rank when any rank failed, with the failed ranks' messages."""


# ---------------------------------------------------------------------------------------------
# Runs and their time line


@dataclass
class Run:
    """One validated netCDF run: path, frame times and grid (the data stays on disk)."""

    path: str
    times: np.ndarray  # [frames] seconds, float64, strictly increasing
    grid: tuple[int, int, int]  # (z, y, x)
    levels: list[float] | None  # values of the z coordinate, when the file has one
    units: str | None  # units attribute of pv
    attributes: dict[str, Any]  # global attributes as JSON-friendly values


def open_run(path: str) -> Run:
    """Open `path` and check it is an SQG run: pv(t, z=2, y, x) of floats and a time axis in known units."""
    try:
        dataset = netCDF4.Dataset(path)
    except OSError as error:  # netCDF4 raises on open for a file cut short
        raise InputError(f"{path}: cannot be read as netCDF ({error}); "
                         "is it truncated or still being written?") from error
    with dataset:
        _check_netcdf3_size(dataset, path)
        if "pv" not in dataset.variables:
            raise InputError(f"{path}: no variable 'pv' (expected pv{_dims(PV_DIMENSIONS)}); "
                             f"found variables {sorted(dataset.variables)}")
        pv = dataset.variables["pv"]
        if pv.dimensions != PV_DIMENSIONS:
            raise InputError(f"{path}: variable 'pv' has dimensions {_dims(pv.dimensions)}, "
                             f"expected {_dims(PV_DIMENSIONS)}")
        if pv.shape[1] != LEVELS:
            raise InputError(f"{path}: variable 'pv' has {pv.shape[1]} levels along z, expected {LEVELS}")
        if pv.dtype.kind != "f":
            raise InputError(f"{path}: variable 'pv' has type {pv.dtype}, expected floating point (float32)")
        if pv.shape[0] == 0:
            raise InputError(f"{path}: variable 'pv' has no frames (t has length 0)")
        levels = dataset.variables["z"][:].astype(float).tolist() if "z" in dataset.variables else None
        return Run(path=path, times=_read_times(dataset, path), grid=tuple(pv.shape[1:]), levels=levels,
                   units=getattr(pv, "units", None),
                   attributes={k: _plain(dataset.getncattr(k)) for k in dataset.ncattrs()})


def _check_netcdf3_size(dataset: netCDF4.Dataset, path: str) -> None:
    """netCDF-3 files open even when cut short (lost records read as zeros): check the size the header implies."""
    if not dataset.file_format.startswith("NETCDF3"):
        return
    implied = sum(variable.dtype.itemsize * int(np.prod(variable.shape)) for variable in dataset.variables.values())
    size = os.path.getsize(path)
    if size < implied:
        raise InputError(f"{path}: file has {size} bytes but its variables need at least {implied}: truncated")


def _read_times(dataset: netCDF4.Dataset, path: str) -> np.ndarray:
    """The time coordinate t in seconds, converted with its units attribute ('seconds', 'hours since ...')."""
    if "t" not in dataset.variables or dataset.variables["t"].dimensions != ("t",):
        raise InputError(f"{path}: no time coordinate variable t(t)")
    variable = dataset.variables["t"]
    units = getattr(variable, "units", None)
    unit = str(units).split(" since ")[0].strip().lower() if units is not None else None
    if unit not in _SECONDS_PER_UNIT:
        raise InputError(f"{path}: variable 't' has units {units!r}, expected seconds, minutes, hours or days "
                         f"(optionally 'UNIT since DATE')")
    values = variable[:]
    if np.ma.is_masked(values):
        raise InputError(f"{path}: variable 't' has missing values; is the file truncated?")
    times = np.ma.getdata(values).astype(np.float64) * _SECONDS_PER_UNIT[unit]
    if np.any(np.diff(times) <= 0):
        raise InputError(f"{path}: variable 't' is not strictly increasing")
    return times


def _dims(names: Sequence[str]) -> str:
    return f"({', '.join(names)})"


def _plain(value: Any) -> Any:
    """A netCDF attribute value as a plain Python value, for JSON."""
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


def frame_step(times: np.ndarray, where: str) -> float:
    """Seconds between frames; the frames of `where` must be uniformly spaced (to SPACING_RTOL)."""
    if len(times) < 2:
        raise InputError(f"{where}: needs at least 2 frames to define the output interval, found {len(times)}")
    steps = np.diff(times)
    nominal = float(np.median(steps))
    irregular = np.flatnonzero(np.abs(steps - nominal) > SPACING_RTOL * nominal)
    if irregular.size:
        i = int(irregular[0])
        raise InputError(f"{where}: frames are not uniformly spaced: {steps[i]:g} s between frames {i} and "
                         f"{i + 1} (days {times[i] / SECONDS_PER_DAY:g} and {times[i + 1] / SECONDS_PER_DAY:g}), "
                         f"expected {nominal:g} s")
    return float((times[-1] - times[0]) / (len(times) - 1))


def frames_for_days(days: float, step: float, where: str) -> int:
    """Number of frames in `days` days of output every `step` seconds; must be a whole number >= 1."""
    frames = days * SECONDS_PER_DAY / step
    if round(frames) < 1 or abs(frames - round(frames)) > 1e-6 * max(1.0, frames):
        raise InputError(f"{where}: {days:g} days is not a whole number of output intervals "
                         f"({step / 3600:g} h each)")
    return round(frames)


@dataclass
class Timeline:
    """Runs joined in time order into one uniformly spaced series of frames, addressed by global index."""

    runs: list[Run]  # in time order
    offsets: list[int]  # global index of each run's first frame
    times: np.ndarray  # [frames] seconds
    step: float  # seconds between frames

    @classmethod
    def from_runs(cls, runs: Sequence[Run]) -> Timeline:
        """Join runs (pieces of one long run, any order); grids must agree and the pieces must abut."""
        runs = sorted(runs, key=lambda run: run.times[0])
        for run in runs[1:]:
            if run.grid != runs[0].grid:
                raise InputError(f"{run.path}: pv grid (z, y, x) = {run.grid} differs from {runs[0].path}: "
                                 f"{runs[0].grid}")
        sizes = [len(run.times) for run in runs]
        times = np.concatenate([run.times for run in runs])
        if np.any(np.diff(times) <= 0):
            raise InputError(f"input runs overlap in time: {[run.path for run in runs]}")
        where = runs[0].path if len(runs) == 1 else f"{len(runs)} files {runs[0].path} ... {runs[-1].path}"
        return cls(runs=runs, offsets=np.cumsum([0, *sizes[:-1]]).tolist(), times=times,
                   step=frame_step(times, where))

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.runs[0].grid

    @property
    def days(self) -> np.ndarray:
        return self.times / SECONDS_PER_DAY

    @property
    def tolerance_days(self) -> float:
        """Day comparisons snap to frames within a quarter interval (float32 rounding of stored seconds)."""
        return 0.25 * self.step / SECONDS_PER_DAY

    def day_range(self) -> tuple[float, float]:
        """The days covered, [first frame, last frame + one interval)."""
        return float(self.days[0]), float(self.days[-1] + self.step / SECONDS_PER_DAY)

    def frame_at(self, day: float) -> int:
        """Index of the first frame at or after `day`: the frames in days [a, b) are frame_at(a):frame_at(b)."""
        return int(np.searchsorted(self.days, day - self.tolerance_days, side="left"))

    def pieces(self, start: int, stop: int) -> Iterator[tuple[Run, int, int]]:
        """(run, first, last) of each run's part of global frames [start, stop), in time order."""
        for run, offset in zip(self.runs, self.offsets):
            first, last = max(start, offset), min(stop, offset + len(run.times))
            if first < last:
                yield run, first - offset, last - offset


def read_pv(variable: netCDF4.Variable, start: int, stop: int, path: str) -> np.ndarray:
    """pv[start:stop] as a plain array; missing data (a truncated file) or NaN/inf raise InputError."""
    values = variable[start:stop]
    if np.ma.is_masked(values):
        bad = np.ma.getmaskarray(values).reshape(len(values), -1).any(axis=1)
        raise InputError(f"{path}: variable 'pv' has missing values (fill value) from frame "
                         f"{start + int(np.argmax(bad))}; is the file truncated or not completely written?")
    values = np.ma.getdata(values)
    finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
    if not finite.all():
        raise InputError(f"{path}: variable 'pv' has NaN or infinite values in frame "
                         f"{start + int(np.argmin(finite))}")
    return values


class FrameReader:
    """Reads global frames of a Timeline as float32 [n, z, y, x], keeping each file open once."""

    def __init__(self, timeline: Timeline):
        self.timeline = timeline
        self._datasets: dict[str, netCDF4.Dataset] = {}

    def read(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for run, first, last in self.timeline.pieces(start, stop):
            if run.path not in self._datasets:
                self._datasets[run.path] = netCDF4.Dataset(run.path)
            parts.append(read_pv(self._datasets[run.path].variables["pv"], first, last, run.path))
        return np.concatenate(parts).astype(np.float32, copy=False)

    def close(self) -> None:
        for dataset in self._datasets.values():
            dataset.close()
        self._datasets.clear()

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def frame_blocks(start: int, stop: int, frame_bytes: int) -> Iterator[tuple[int, int]]:
    """Consecutive [a, b) blocks of frames [start, stop), each at most BLOCK_BYTES (at least one frame)."""
    size = max(1, BLOCK_BYTES // max(1, frame_bytes))
    for first in range(start, stop, size):
        yield first, min(first + size, stop)


def expand_inputs(paths: Sequence[str]) -> list[str]:
    """Input files: each path as given, or the sorted *.nc files of a directory."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, name) for name in os.listdir(path)
                           if name.endswith(".nc") and not name.startswith("."))
            if not found:
                raise InputError(f"{path}: directory holds no .nc files")
            files.extend(found)
        elif os.path.exists(path):
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    return files


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass
class Moments:
    """Count, mean and M2 (sum of squared deviations) in float64, combinable in any grouping.

    Chan, Golub & LeVeque (1979) pairwise update, stable where sums of squares are not:
    delta = mean_b - mean_a, mean = mean_a + delta n_b / n, M2 = M2_a + M2_b + delta^2 n_a n_b / n.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray, axis: int | tuple[int, ...]) -> Moments:
        """Moments of `values` reduced over `axis` (two-pass, float64)."""
        values = np.asarray(values, dtype=np.float64)
        mean = values.mean(axis=axis, keepdims=True)
        m2 = np.square(values - mean).sum(axis=axis)
        return cls(count=values.size // m2.size, mean=mean.reshape(m2.shape), m2=m2)

    def combine(self, other: Moments) -> Moments:
        count = self.count + other.count
        delta = other.mean - self.mean
        return Moments(count=count, mean=self.mean + delta * (other.count / count),
                       m2=self.m2 + other.m2 + np.square(delta) * (self.count * other.count / count))

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0, as np.std)."""
        return np.sqrt(self.m2 / self.count)


def combine_all(parts: Sequence[Moments]) -> Moments:
    """Combine in a fixed binary tree over the given order: the result depends on the parts only."""
    if not parts:
        raise ValueError("combine_all needs at least one Moments")
    parts = list(parts)
    while len(parts) > 1:
        parts = [parts[i].combine(parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with fixed member timestamps, so equal arrays give byte-identical files."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for key, value in arrays.items():
            with archive.open(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as member:
                np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)


# ---------------------------------------------------------------------------------------------
# MPI: stop together, publish together


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


class Staging:
    """A hidden directory in out_dir that ranks write into; entries reach out_dir only through
    publish() (after every rank succeeded), and the directory is removed however the run ends.
    A failed run leaves out_dir as it was (and removes it if this run created it)."""

    def __init__(self, comm: Any, out_dir: str):
        self.comm, self.out_dir = comm, out_dir
        self.path, self._created = on_root(comm, self._make)

    def _make(self) -> tuple[str, bool]:
        created = not os.path.isdir(self.out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        return tempfile.mkdtemp(prefix=".staging-", dir=self.out_dir), created

    def file(self, name: str) -> str:
        """Staged path of output `name` (a path relative to out_dir); creates its directory."""
        path = os.path.join(self.path, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def publish(self, names: Sequence[str]) -> None:
        """Move the staged top-level entries `names` into out_dir in order, replacing older ones (collective).
        If a rename fails, the entries already swapped are swapped back."""
        replaced = os.path.join(self.path, ".replaced")

        def move() -> None:
            os.makedirs(replaced)
            done = []
            try:
                for name in names:
                    target = os.path.join(self.out_dir, name)
                    if os.path.lexists(target):
                        os.replace(target, os.path.join(replaced, name))
                    os.replace(os.path.join(self.path, name), target)
                    done.append(name)
            except OSError:
                for name in done:
                    os.replace(os.path.join(self.out_dir, name), os.path.join(self.path, name))
                for name in os.listdir(replaced):
                    os.replace(os.path.join(replaced, name), os.path.join(self.out_dir, name))
                raise
        on_root(self.comm, move)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.comm.rank == 0:
            shutil.rmtree(self.path, ignore_errors=True)
            if self._created and not os.listdir(self.out_dir):
                os.rmdir(self.out_dir)


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
    (the paper's scripts used underscores)."""
    dashed, underscored = name.replace("_", "-"), name.replace("-", "_")
    flags = [f"--{dashed}"] if dashed == underscored else [f"--{dashed}", f"--{underscored}"]
    parser.add_argument(*flags, dest=underscored, **kwargs)
