"""Outputs of a DA run: CF netCDF diagnostics, JSON/YAML.

The files are written into a staging directory (:func:`megavit.atomic.staged_output`) and
moved into ``output_dir`` only when the run succeeds, so a failed or interrupted run never
leaves partial files and never clobbers the outputs of an earlier run.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


class AnalysisWriter:
    """Per-cycle CF-1.8 netCDF record of truth, analysis mean/spread, errors and observations.

    ``save_fields=False`` keeps only the scalar time series (for states too large to store
    every cycle).
    """

    SCALARS = {
        "rmse_f": "forecast ensemble-mean root-mean-square error",
        "rmse_a": "analysis ensemble-mean root-mean-square error",
        "spread_f": "forecast ensemble spread (root-mean ensemble variance)",
        "spread_a": "analysis ensemble spread (root-mean ensemble variance)",
        "rmse_free": "free-running (no assimilation) ensemble-mean root-mean-square error",
    }

    def __init__(self, path: Path, state_dim: int, obs_index: np.ndarray, save_fields: bool,
                 attributes: dict[str, Any], time_units: str = "model time units"):
        self.save_fields = save_fields
        import netCDF4  # only writers of analysis files need it (the scale runs on GPU nodes do not)

        self.dataset = netCDF4.Dataset(path, "w", format="NETCDF4")
        ds = self.dataset
        ds.Conventions = "CF-1.8"
        ds.title = "Ensemble data assimilation cycling diagnostics"
        ds.institution = "da_plugin"
        ds.history = f"{datetime.now(UTC).isoformat(timespec='seconds')} created by da-cycle"
        for key, value in attributes.items():
            ds.setncattr(key, value)
        ds.createDimension("time", None)
        ds.createDimension("x", state_dim)
        ds.createDimension("obs", len(obs_index))
        time = ds.createVariable("time", "f8", ("time",))
        time.units = time_units
        time.standard_name = "time"
        time.long_name = "model time at analysis"
        x = ds.createVariable("x", "i4", ("x",))
        x.long_name = "state variable index"
        x[:] = np.arange(state_dim)
        index = ds.createVariable("obs_index", "i4", ("obs",))
        index.long_name = "state variable index of each observation"
        index[:] = obs_index
        for name, long_name in self.SCALARS.items():
            var = ds.createVariable(name, "f8", ("time",))
            var.long_name = long_name
            var.units = "1"
        fields = {
            "truth": "true state",
            "analysis_mean": "analysis ensemble mean",
            "analysis_spread": "analysis ensemble standard deviation",
        }
        if save_fields:
            for name, long_name in fields.items():
                var = ds.createVariable(name, "f4", ("time", "x"), zlib=True)
                var.long_name = long_name
                var.units = "1"
            var = ds.createVariable("observation", "f4", ("time", "obs"), zlib=True)
            var.long_name = "observed value"
            var.units = "1"

    def write(self, cycle: int, time: float, scalars: dict[str, float], truth: np.ndarray,
              mean: np.ndarray, spread: np.ndarray, observation: np.ndarray) -> None:
        ds = self.dataset
        ds["time"][cycle] = time
        for name in self.SCALARS:
            ds[name][cycle] = scalars.get(name, np.nan)
        if self.save_fields:
            ds["truth"][cycle] = truth
            ds["analysis_mean"][cycle] = mean
            ds["analysis_spread"][cycle] = spread
            ds["observation"][cycle] = observation

    def close(self) -> None:
        self.dataset.close()
