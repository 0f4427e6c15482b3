"""Restart files: a run stopped after k cycles (an exception, or SIGKILL) and resumed ends with the
outputs of an uninterrupted run; resuming with other settings or without a file fails clearly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import netCDF4
import numpy as np
import pytest

from da_plugin import cycle as cycle_module
from da_plugin.cycle import CycleConfig, main, run
from megavit.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SQG_SMALL = ["cycles=6", "burn_in=1", "spinup_steps=60", "model.N=16", "filter.ensemble_size=6",
             "filter.localization_radius=2.0", "progress=false", "restart_every=2", "shocks.mode=observed"]
VARIABLES = ("time", "truth", "analysis_mean", "analysis_spread", "observation", "rmse_f", "rmse_a",
             "spread_f", "spread_a", "rmse_free", "shock")


def same_outputs(a: Path, b: Path) -> None:
    """summary.json numbers (not the timing) and every analysis.nc array agree exactly."""
    first, second = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    first.pop("seconds_per_cycle"), second.pop("seconds_per_cycle")
    assert first == second
    with netCDF4.Dataset(a / "analysis.nc") as one, netCDF4.Dataset(b / "analysis.nc") as two:
        for name in VARIABLES:
            np.testing.assert_array_equal(one[name][:], two[name][:], err_msg=name)


def test_stopped_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    run(load_config(CycleConfig, ROOT / "configs/da/sqg_letkf.yaml", [*SQG_SMALL, f"output_dir={whole}"]))

    stopped = tmp_path / "stopped"
    forecast = cycle_module.Twin.forecast

    def stop_at_cycle_5(twin, model, steps, cycle):
        if cycle == 5:
            raise KeyboardInterrupt
        forecast(twin, model, steps, cycle)

    monkeypatch.setattr(cycle_module.Twin, "forecast", stop_at_cycle_5)
    config = load_config(CycleConfig, ROOT / "configs/da/sqg_letkf.yaml", [*SQG_SMALL, f"output_dir={stopped}"])
    with pytest.raises(KeyboardInterrupt):
        run(config)
    monkeypatch.undo()
    assert not (stopped / "summary.json").exists()
    assert (stopped / "restart.pt").exists()  # written after cycles 2 and 4

    run(load_config(CycleConfig, ROOT / "configs/da/sqg_letkf.yaml",
                    [*SQG_SMALL, f"output_dir={stopped}", "resume=true"]))
    same_outputs(whole, stopped)


def test_resume_needs_the_same_settings_and_a_restart_file(tmp_path, capsys):
    base = [str(ROOT / "configs/da/l96_ensf.yaml"), "cycles=10", "burn_in=0", "spinup_steps=50",
            "model.dim=40", "filter.ensemble_size=6", "progress=false", "restart_every=3"]
    assert main([*base, f"output_dir={tmp_path / 'none'}", "resume=true"]) == 1
    assert "no restart file" in capsys.readouterr().err
    assert main([*base, f"output_dir={tmp_path / 'r'}"]) == 0
    assert main([*base, f"output_dir={tmp_path / 'r'}", "resume=true", "obs.sigma=0.1"]) == 1
    assert "obs: " in capsys.readouterr().err


def test_sigkill_and_resume_gives_the_uninterrupted_summary(tmp_path):
    """A real da-cycle process killed with SIGKILL after its first restart file, then resumed."""
    args = [sys.executable, "-m", "da_plugin.cycle", str(ROOT / "configs/da/l96_ensf.yaml"), "cycles=200",
            "burn_in=10", "spinup_steps=100", "model.dim=40", "filter.ensemble_size=8", "filter.steps=20",
            "progress=false", "restart_every=20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run([*args, f"output_dir={tmp_path / 'whole'}"], env=env, capture_output=True).returncode == 0

    killed = tmp_path / "killed"
    process = subprocess.Popen([*args, f"output_dir={killed}"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (killed / "restart.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "summary.json").exists(), "the run ended before it could be killed"
    resumed = subprocess.run([*args, f"output_dir={killed}", "resume=true"], env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()
    same_outputs(tmp_path / "whole", killed)
