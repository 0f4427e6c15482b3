"""SQG truth runs on disk: sqgturb-style netCDF files, written and read here only.

A run file holds ``pv(t, z, y, x)`` (potential-temperature anomaly in K, 2 levels: z = 0 and
z = H), coordinates ``x``, ``y``, ``z`` (m) and ``t`` (time with a units attribute; our files
write seconds of model time) and the model parameters as global attributes. The writer side
(`create_run`, `check_run`, `RunWriter`) serves the truth generator (da_plugin.models.sqg_truth);
the reader side (`open_run`, `Timeline`, `FrameReader`, `read_pv`) serves it and the
preprocessing tools (megavit.data.preprocess, megavit.data.split_runs), and also accepts
sqgturb's own files. Layout and rules: docs/sqg.md and docs/preprocessing.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np

from megavit.atomic import atomic_path

DAY = 86400.0  # seconds
PV_DIMENSIONS = ("t", "z", "y", "x")
LEVELS = 2
FORMAT = "NETCDF3_64BIT_OFFSET"  # a frame appended to a netCDF-3 file is complete or absent, see RunWriter
PV_COMMENT = ("pv is the potential-temperature anomaly in K, (f theta0 / g) times the model pv of sqgturb "
              "(whose own files store the model pv, in m/s, under units 'K')")
BLOCK_BYTES = 64 * 2**20  # default most bytes of frames moved between netCDF and disk at once
SPACING_RTOL = 0.01  # frame spacing may vary this much (float32 seconds round at large t)
_SECONDS_PER_UNIT = {
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": DAY, "day": DAY, "days": DAY,
}


class InputError(ValueError):
    """Bad input files or arguments; the message names the file, the variable, expected and found."""


# ---------------------------------------------------------------------------------------------
# Writing runs


def create_run(path: str | Path, *, n: int, length: float, height: float, title: str, creator: str,
               attributes: Mapping[str, Any]) -> None:
    """An empty run file (0 frames) of an ``n`` x ``n`` grid on a square of side ``length`` (m) with lids
    at z = 0 and ``height`` (m); ``attributes`` (the run's identity) follow title, history and comment
    as global attributes. Published atomically: ``path`` is a complete file or absent."""
    with atomic_path(path) as tmp, netCDF4.Dataset(tmp, "w", format=FORMAT) as ds:
        ds.title = title
        ds.history = f"{datetime.now(UTC).isoformat(timespec='seconds')} created by {creator}"
        ds.comment = PV_COMMENT
        for key, value in attributes.items():
            ds.setncattr(key, value)
        for name, size in zip(PV_DIMENSIONS, (None, LEVELS, n, n), strict=True):
            ds.createDimension(name, size)
        pv = ds.createVariable("pv", "f4", PV_DIMENSIONS)
        pv.units = "K"
        pv.long_name = "potential temperature anomaly at z = 0 and z = H"
        for name, values in (("x", np.arange(n) * length / n), ("y", np.arange(n) * length / n),
                             ("z", np.array([0.0, height]))):
            coordinate = ds.createVariable(name, "f4", (name,))
            coordinate.units = "meters"
            coordinate[:] = values
        t = ds.createVariable("t", "f8", ("t",))
        t.units = "seconds"
        t.long_name = "model time since the initial state"


def check_run(path: str | Path, identity: Mapping[str, Any], n: int) -> int:
    """Frames in the run file ``path``, after checking that its global attributes hold ``identity``
    and its pv is ``(t, 2, n, n)`` (before appending to it)."""
    try:
        ds = netCDF4.Dataset(path, "r")
    except OSError as err:
        raise InputError(f"{path}: cannot be read as netCDF ({err})") from None
    with ds:
        found = {key: _plain(ds.getncattr(key)) for key in ds.ncattrs()}
        differ = [f"{key}: file {found.get(key, 'missing')!r}, requested {value!r}" for key, value in identity.items()
                  if key not in found or not _same(found[key], value)]
        if differ:
            raise InputError(f"{path} does not match the requested run (different preset or options?): "
                             + "; ".join(differ))
        if "pv" not in ds.variables or ds.variables["pv"].shape[1:] != (LEVELS, n, n):
            raise InputError(f"{path}: expected pv(t, {LEVELS}, {n}, {n})")
        frames = len(ds.dimensions["t"])
        if frames:  # the content, not only the header: a file cut short holds fill values at its end
            _read_times(ds, str(path))
            read_pv(ds.variables["pv"], frames - 1, frames, str(path))
        return frames


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, str) or isinstance(a, str):
        return str(a) == str(b)
    return bool(np.all(np.asarray(a) == np.asarray(b)) or (np.isnan(a) and np.isnan(b)))


class RunWriter:
    """A run file open for writing frames. Each ``write`` is synced to disk, and netCDF-3 raises the
    header's record count only after the data, so a killed writer leaves a readable file."""

    def __init__(self, path: str | Path):
        self.dataset = netCDF4.Dataset(path, "a")

    def write(self, index: int, pv: np.ndarray, seconds: float) -> None:
        """Store frame ``index`` (appended, or rewritten): pv ``[2, n, n]`` in K at model time ``seconds``."""
        self.dataset.variables["pv"][index] = pv
        self.dataset.variables["t"][index] = seconds
        self.dataset.sync()

    def close(self) -> None:
        self.dataset.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Reading runs and their time line


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
                         f"{i + 1} (days {times[i] / DAY:g} and {times[i + 1] / DAY:g}), expected {nominal:g} s")
    return float((times[-1] - times[0]) / (len(times) - 1))


def frames_for_days(days: float, step: float, where: str) -> int:
    """Number of frames in `days` days of output every `step` seconds; must be a whole number >= 1."""
    frames = days * DAY / step
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
        return self.times / DAY

    @property
    def tolerance_days(self) -> float:
        """Day comparisons snap to frames within a quarter interval (float32 rounding of stored seconds)."""
        return 0.25 * self.step / DAY

    def day_range(self) -> tuple[float, float]:
        """The days covered, [first frame, last frame + one interval)."""
        return float(self.days[0]), float(self.days[-1] + self.step / DAY)

    def frame_at(self, day: float) -> int:
        """Index of the first frame at or after `day`: the frames in days [a, b) are frame_at(a):frame_at(b)."""
        return int(np.searchsorted(self.days, day - self.tolerance_days, side="left"))

    def pieces(self, start: int, stop: int) -> Iterator[tuple[Run, int, int]]:
        """(run, first, last) of each run's part of global frames [start, stop), in time order."""
        for run, offset in zip(self.runs, self.offsets, strict=True):
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


def frame_blocks(start: int, stop: int, frame_bytes: int, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, int]]:
    """Consecutive [a, b) blocks of frames [start, stop), each at most `block_bytes` (at least one frame),
    so that a rank's memory stays bounded however long the run."""
    size = max(1, block_bytes // max(1, frame_bytes))
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
