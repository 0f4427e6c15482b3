"""``plot-results``: compare da-cycle runs in figures and a table of time-mean errors.

``plot-results RUN_DIR [RUN_DIR ...] --out FIGDIR`` reads each run folder's ``summary.json`` and
``analysis.nc`` (:mod:`da_plugin.io`) and writes into FIGDIR:

* ``rmse_spread.png``: every run's analysis RMSE and spread (and free-run RMSE) over time;
* ``maps_<label>.png`` and ``spectra_<label>.png`` for runs whose fields lie on a 2-D grid (SQG):
  truth, analysis mean and error maps of each level, and their spectra, at one cycle: kinetic
  energy when ``config.yaml`` names the SQG nature run's parameters, else variance of the field;
* ``summary.md``: the markdown table of time-mean scores, also printed to stdout.

A grid is recognised from the fields' dimensions, ``(time, level, y, x)`` or ``(time, y, x)``, or,
for fields stored flattened as ``(time, x)`` (as da-cycle does), from the global attribute
``field_shape`` (the state's shape: ``[2, 64, 64]`` for SQG, ``[40]`` for Lorenz-96, which gets no maps).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np
import torch
import yaml

from da_plugin.io import FIELD_SHAPE_ATTRIBUTE
from da_plugin.models.sqg import SQG
from da_plugin.models.sqg_truth import kinetic_energy_spectrum
from da_plugin.plotting import RunSeries, isotropic_spectrum, plot_fields, plot_run_comparison, plot_spectra
from megavit.atomic import write_text_atomic
from megavit.config import ConfigError, build

PROG = "plot-results"
DAYS_PER_UNIT = {"s": 1 / 86400, "second": 1 / 86400, "seconds": 1 / 86400,
                 "h": 1 / 24, "hour": 1 / 24, "hours": 1 / 24, "d": 1.0, "day": 1.0, "days": 1.0}
TABLE_SCORES = ("rmse_a", "spread_a", "rmse_free")
SPECTRUM_NAMES = ("truth", "analysis mean", "analysis - truth")


class RunError(ValueError):
    """A run folder that cannot be read; the message names the folder or file and what is wrong."""


@dataclass
class Run:
    """What the figures and the table need of one run folder."""

    label: str
    path: Path
    summary: dict[str, Any]
    time: np.ndarray  # [T], in days when the file's time units allow it
    time_units: str  # "days", or the file's units (Lorenz-96: "model time units")
    scores: dict[str, np.ndarray]  # rmse_a, spread_a and (when stored) rmse_free [T]; NaN where not scored
    units: str  # of the fields and scores ("K" for SQG), "" when dimensionless
    grid: tuple[int, int, int] | None  # (levels, ny, nx) of the stored fields; None: no maps
    no_grid_reason: str  # why grid is None
    sqg: SQG | None  # the nature run's SQG parameters (config.yaml), for kinetic-energy spectra

    @property
    def analysis_file(self) -> Path:
        return self.path / "analysis.nc"

    @property
    def free(self) -> np.ndarray | None:
        """The free-run RMSE series; None when the run had no free ensemble."""
        series = self.scores.get("rmse_free")
        return None if series is None or np.isnan(series).all() else series

    @property
    def time_label(self) -> str:
        return f"time ({self.time_units})"

    @property
    def error_label(self) -> str:
        return f"RMSE / spread ({self.units})" if self.units else "RMSE / spread"


def load_run(path: Path, label: str) -> Run:
    """Read a run folder's summary and score series, and how its fields are laid out."""
    summary_file, analysis_file = path / "summary.json", path / "analysis.nc"
    if not summary_file.is_file():
        raise RunError(f"{path} has no summary.json")
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunError(f"{summary_file} is not readable JSON: {err}") from None
    if not analysis_file.is_file():
        raise RunError(f"{path} has no analysis.nc")
    try:
        dataset = netCDF4.Dataset(analysis_file)
    except OSError as err:
        raise RunError(f"{analysis_file} is not a readable netCDF file: {err}") from None
    with dataset:
        if missing := [name for name in ("time", "rmse_a", "spread_a") if name not in dataset.variables]:
            raise RunError(f"{analysis_file} has no variable {missing[0]!r}: not a da-cycle analysis file")
        time, time_units = _time_axis(dataset["time"])
        scores = {name: _read(dataset[name]) for name in TABLE_SCORES if name in dataset.variables}
        units = getattr(dataset["rmse_a"], "units", "")
        grid, no_grid_reason = _field_grid(dataset, analysis_file)
    sqg = _sqg_parameters(path / "config.yaml")
    if sqg is not None and grid is not None and grid != sqg.state_shape:
        raise RunError(f"{path}: config.yaml's SQG grid {sqg.state_shape} differs from the stored fields' {grid}")
    return Run(label, path, summary, time, time_units, scores, "" if units == "1" else units, grid, no_grid_reason,
               sqg)


def _sqg_parameters(config_file: Path) -> SQG | None:
    """The nature run's model from a run's config.yaml (``truth.model``, else ``model``) when it is SQG."""
    if not config_file.is_file():
        return None
    try:
        config = yaml.safe_load(config_file.read_text())
        section = (config.get("truth") or {}).get("model") or config.get("model") or {}
        if section.get("name") != "sqg":
            return None
        return build(SQG, {key: value for key, value in section.items() if key != "name"}, "model")
    except (OSError, yaml.YAMLError, AttributeError, ConfigError) as err:
        raise RunError(f"{config_file} does not hold a readable da-cycle config: {err}") from None


def _read(variable: netCDF4.Variable, index: int | slice = slice(None)) -> np.ndarray:
    """A variable's values (all, or at ``index`` along its first dimension) as float64, missing values as NaN."""
    return np.ma.filled(np.ma.asarray(variable[index], dtype=np.float64), np.nan)


def _time_axis(variable: netCDF4.Variable) -> tuple[np.ndarray, str]:
    """Analysis times and their units: days when the file's are seconds, hours or days, else the file's."""
    units = getattr(variable, "units", "model time units")
    first = units.split()[0].lower() if units.split() else ""
    if first in DAYS_PER_UNIT:
        return _read(variable) * DAYS_PER_UNIT[first], "days"
    return _read(variable), units


def _field_grid(dataset: netCDF4.Dataset, where: Path) -> tuple[tuple[int, int, int] | None, str]:
    """(levels, ny, nx) of the stored truth and analysis fields, or None and the reason there are no maps."""
    if "truth" not in dataset.variables or "analysis_mean" not in dataset.variables:
        return None, "fields not stored (save_fields=false)"
    shape = dataset["truth"].shape[1:]
    if len(shape) == 1 and FIELD_SHAPE_ATTRIBUTE in dataset.ncattrs():
        shape = _parse_shape(dataset.getncattr(FIELD_SHAPE_ATTRIBUTE), shape[0], where)
    if len(shape) == 1:
        return None, f"1-D state of {shape[0]} variables"
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise RunError(f"{where}: fields of shape {tuple(shape)}; expected (level, y, x), (y, x) or a flat state")
    return tuple(int(n) for n in shape), ""


def _parse_shape(value: Any, size: int, where: Path) -> tuple[int, ...]:
    """The field_shape attribute (an integer array, or text such as '2 64 64') checked against the flat size."""
    numbers = re.findall(r"\d+", value) if isinstance(value, str) else np.atleast_1d(value).tolist()
    shape = tuple(int(n) for n in numbers)
    if not shape or math.prod(shape) != size:
        raise RunError(f"{where}: global attribute {FIELD_SHAPE_ATTRIBUTE}={value!r} does not hold "
                       f"the {size} state variables")
    return shape


def read_fields(run: Run, cycle: int) -> tuple[np.ndarray, np.ndarray]:
    """Truth and analysis mean at ``cycle`` as ``[levels, ny, nx]`` arrays (run.grid must be set)."""
    with netCDF4.Dataset(run.analysis_file) as dataset:
        index = cycle % len(run.time)
        truth, mean = (_read(dataset[name], index).reshape(run.grid) for name in ("truth", "analysis_mean"))
    return truth, mean


def field_spectra(truth: np.ndarray, analysis: np.ndarray, sqg: SQG | None,
                  units: str) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """Spectra ``[levels, K]`` of truth, analysis mean and their difference (fields ``[levels, ny, nx]``)
    for wavenumbers 1 to Nyquist ``[K]``, and their axis label: kinetic energy (the SQG inversion of
    theta) when the SQG parameters are known, else the fields' variance."""
    fields = np.stack([truth, analysis, analysis - truth])
    if sqg is not None:
        k, spectra = kinetic_energy_spectrum(torch.from_numpy(fields), sqg)
        label = "kinetic energy (m² s⁻² per shell)"
    else:
        k, spectra = isotropic_spectrum(fields)
        label = f"variance ({units}² per shell)" if units else "variance per shell"
    shown = slice(1, min(truth.shape[-2:]) // 2 + 1)
    return k[shown], dict(zip(SPECTRUM_NAMES, spectra[..., shown], strict=True)), label


def time_means(run: Run, burn_in: int | None) -> dict[str, float]:
    """The table's scores: summary.json's time means, or the series' means after ``burn_in`` cycles."""
    if burn_in is None:
        return {name: run.summary[name] for name in TABLE_SCORES if name in run.summary}
    cycles = len(run.time)
    if burn_in >= cycles:
        raise RunError(f"--burn-in {burn_in} leaves nothing of {run.path}'s {cycles} cycles")
    return {name: float(np.mean(series[burn_in:])) for name, series in run.scores.items() if name in TABLE_SCORES}


def summary_table(runs: Sequence[Run], burn_in: int | None) -> str:
    """Markdown table of each run's time-mean analysis RMSE, spread and free-run RMSE."""
    lines = ["| run | model | filter | N | cycles | burn-in | rmse_a | spread_a | rmse_free | s/cycle |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        means = time_means(run, burn_in)
        summary = run.summary
        cells = [run.label, summary.get("model", "?"), summary.get("filter", "?"), summary.get("ensemble_size", "?"),
                 len(run.time), summary.get("burn_in", "?") if burn_in is None else burn_in,
                 *(_number(means.get(name)) for name in TABLE_SCORES), _number(summary.get("seconds_per_cycle"))]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4g}"


def file_label(label: str) -> str:
    """A run label as part of a file name: anything but letters, digits, '.', '-' and '_' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def write_figures(runs: Sequence[Run], out: Path, cycle: int) -> list[Path]:
    """All figures into ``out``; returns their paths. Runs without a grid get a note on stderr."""
    if len({(run.time_label, run.error_label) for run in runs}) > 1:
        axes = "; ".join(f"{run.label}: {run.time_label}, {run.error_label}" for run in runs)
        raise RunError(f"the runs' axes differ ({axes}); compare runs of one model")
    for run in runs:
        if run.grid is not None and not -len(run.time) <= cycle < len(run.time):
            raise RunError(f"--cycle {cycle} is outside {run.path}'s cycles 0..{len(run.time) - 1}")
    comparison = out / "rmse_spread.png"
    series = [RunSeries(run.label, run.time, run.scores["rmse_a"], run.scores["spread_a"], run.free) for run in runs]
    plot_run_comparison(comparison, series, runs[0].time_label, runs[0].error_label)
    written = [comparison]
    for run in runs:
        if run.grid is None:
            print(f"{PROG}: note: no maps or spectra for {run.label}: {run.no_grid_reason}", file=sys.stderr)
            continue
        truth, analysis = read_fields(run, cycle)
        when = f"{run.label}, cycle {cycle % len(run.time)} (time {run.time[cycle]:.4g} {run.time_units})"
        maps, spectra = (out / f"{kind}_{file_label(run.label)}.png" for kind in ("maps", "spectra"))
        plot_fields(maps, truth, analysis, when, run.units)
        k, by_name, label = field_spectra(truth, analysis, run.sqg, run.units)
        plot_spectra(spectra, k, by_name, when, label)
        written += [maps, spectra]
    return written


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare da-cycle runs: RMSE and spread over time on one figure, truth / analysis /\n"
        "error maps and variance spectra for runs on a 2-D grid (SQG), and a markdown table of\n"
        "time-mean scores (printed, and written to FIGDIR/summary.md).",
        epilog="example:\n  plot-results runs/sqg_ensf runs/sqg_letkf --labels EnSF,LETKF --out figures",
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="a da-cycle output_dir")
    parser.add_argument("--out", required=True, type=Path, metavar="FIGDIR", help="where figures and summary.md go")
    parser.add_argument("--labels", help="comma-separated run names, one per RUN_DIR (default: folder names)")
    parser.add_argument("--cycle", type=int, default=-1,
                        help="cycle of the maps and spectra, from 0; negative counts from the end (default: last)")
    parser.add_argument("--burn-in", type=int, metavar="N",
                        help="recompute the table's means from the series, skipping the first N cycles "
                        "(default: summary.json's means, after the run's own burn_in)")
    args = parser.parse_args(argv)
    args.labels = args.labels.split(",") if args.labels else [path.resolve().name for path in args.runs]
    if len(args.labels) != len(args.runs):
        parser.error(f"--labels has {len(args.labels)} names for {len(args.runs)} run folders")
    if len({file_label(label) for label in args.labels}) != len(args.labels):
        parser.error(f"run labels must differ in letters, digits, '.', '-' or '_' (they name files), "
                     f"got {','.join(args.labels)}; name the runs with --labels")
    if args.burn_in is not None and args.burn_in < 0:
        parser.error(f"--burn-in must be >= 0, got {args.burn_in}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = [load_run(path, label) for path, label in zip(args.runs, args.labels, strict=True)]
        table = summary_table(runs, args.burn_in)
        written = write_figures(runs, args.out, args.cycle)
        write_text_atomic(args.out / "summary.md", table)
    except (RunError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    print(table, end="")
    print(f"wrote {', '.join(str(path) for path in [*written, args.out / 'summary.md'])}")
    return 0
