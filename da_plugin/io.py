"""Outputs of a DA run: CF netCDF diagnostics, JSON/YAML, and restart files.

The outputs are written into a staging directory (:func:`megavit.atomic.staged_output`) and
moved into ``output_dir`` only when the run succeeds, so a failed or interrupted run never
leaves partial files and never clobbers the outputs of an earlier run. A restart file
(``output_dir/restart.pt``) is the one thing a run writes while it goes: replaced atomically
every ``restart_every`` cycles, so a killed run leaves the last complete one.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from megavit.atomic import atomic_path

RESTART_FORMAT = 1
FIELD_SHAPE_ATTRIBUTE = "field_shape"  # global attribute: the grid of the flattened state dimension x


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


class AnalysisWriter:
    """Per-cycle CF-1.8 netCDF record of truth, analysis mean/spread, errors and observations.

    ``save_fields=False`` keeps only the scalar time series (for states too large to store
    every cycle). Records are buffered and written in blocks of consecutive cycles (at most
    ``BUFFER_BYTES`` of fields, and on :meth:`flush` and :meth:`close`): one netCDF write per
    cycle cost a third of a 40-variable LETKF cycle. A field's chunks hold a block's cycles (at most
    ``CHUNK_BYTES``), not netCDF's default of one cycle, which compressed and wrote a chunk per row
    and made flushing a 40-variable run cost half as much as its analyses. Fields are stored flat
    over ``x``; the global attribute ``field_shape`` gives the grid they unflatten to (``[d]`` for
    Lorenz-96, ``[levels, y, x]`` for SQG). ``shock`` is the standard deviation of the noise added to the
    truth at each cycle (0: none).
    """

    SCALARS = {
        "rmse_f": "forecast ensemble-mean root-mean-square error",
        "rmse_a": "analysis ensemble-mean root-mean-square error",
        "spread_f": "forecast ensemble spread (root-mean ensemble variance)",
        "spread_a": "analysis ensemble spread (root-mean ensemble variance)",
        "rmse_free": "free-running (no assimilation) ensemble-mean root-mean-square error",
    }

    BUFFER_BYTES = 16 * 2**20
    MAX_BUFFERED_CYCLES = 256
    CHUNK_BYTES = 4 * 2**20

    def __init__(self, path: Path, state_dim: int, obs_index: np.ndarray, save_fields: bool,
                 attributes: dict[str, Any], field_shape: tuple[int, ...] | None = None, units: str = "1",
                 time_units: str = "model time units"):
        self.save_fields = save_fields
        row_bytes = 4 * (3 * state_dim + len(obs_index)) if save_fields else 64
        self.buffered_cycles = max(1, min(self.MAX_BUFFERED_CYCLES, self.BUFFER_BYTES // row_bytes))
        self._rows: list[dict[str, Any]] = []  # consecutive cycles not yet in the file
        import netCDF4  # only writers of analysis files need it (the scale runs on GPU nodes do not)

        self.dataset = netCDF4.Dataset(path, "w", format="NETCDF4")
        ds = self.dataset
        ds.Conventions = "CF-1.8"
        ds.title = "Ensemble data assimilation cycling diagnostics"
        ds.institution = "da_plugin"
        ds.history = f"{datetime.now(UTC).isoformat(timespec='seconds')} created by da-cycle"
        for key, value in attributes.items():
            ds.setncattr(key, value)
        ds.setncattr(FIELD_SHAPE_ATTRIBUTE, np.asarray(field_shape or (state_dim,), dtype="i4"))
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
            var.units = units
        shock = ds.createVariable("shock", "f8", ("time",))
        shock.long_name = "standard deviation of the noise added to the truth (0: no shock)"
        shock.units = units
        fields = {
            "truth": "true state",
            "analysis_mean": "analysis ensemble mean",
            "analysis_spread": "analysis ensemble standard deviation",
        }
        if save_fields:
            for name, long_name in {**fields, "observation": "observed value"}.items():
                size = len(obs_index) if name == "observation" else state_dim
                rows = max(1, min(self.buffered_cycles, self.CHUNK_BYTES // (4 * max(size, 1))))
                var = ds.createVariable(name, "f4", ("time", "obs" if name == "observation" else "x"), zlib=True,
                                        chunksizes=(rows, max(size, 1)))
                var.long_name = long_name
                var.units = units

    def write(self, cycle: int, time: float, scalars: dict[str, float], shock: float = 0.0,
              fields: dict[str, np.ndarray] | None = None) -> None:
        """One cycle's record; ``fields`` (truth, analysis_mean, analysis_spread, observation) with
        save_fields. Buffered: in the file after :meth:`flush`."""
        if self._rows and cycle != self._rows[-1]["cycle"] + 1:
            self.flush()
        row = dict(cycle=cycle, time=time, shock=shock, **{name: scalars.get(name, np.nan) for name in self.SCALARS})
        if self.save_fields:
            row.update({name: np.array(values, dtype=np.float32) for name, values in fields.items()})
        self._rows.append(row)
        if len(self._rows) >= self.buffered_cycles:
            self.flush()

    def flush(self) -> None:
        """Write the buffered cycles into the file, one block per variable."""
        if not self._rows:
            return
        block = slice(self._rows[0]["cycle"], self._rows[-1]["cycle"] + 1)
        for name in self._rows[0]:
            if name != "cycle":
                self.dataset[name][block] = np.stack([row[name] for row in self._rows])
        self._rows.clear()

    def close(self) -> None:
        self.flush()
        self.dataset.close()

    def __enter__(self) -> AnalysisWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def write_restart(path: Path, state: dict[str, Any]) -> None:
    """Replace the restart file at ``path`` by ``state`` (tensors, arrays, plain containers), atomically."""
    with atomic_path(path) as tmp:
        torch.save({"format": RESTART_FORMAT, **state}, tmp)


def read_restart(path: Path) -> dict[str, Any]:
    """The state a :func:`write_restart` stored at ``path``; a ValueError when it is missing or not one."""
    if not path.is_file():
        raise ValueError(f"resume=true but there is no restart file {path} (restart_every > 0 writes one)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch.load raises many types for a damaged file
        raise ValueError(f"{path} cannot be read as a restart file: {err}") from None
    if not isinstance(state, dict) or state.get("format") != RESTART_FORMAT:
        raise ValueError(f"{path} is not a da-cycle restart file of format {RESTART_FORMAT}")
    return state
