"""tools/sqg_generate.py as a user runs it: netCDF layout, resume equal to a straight run, errors."""

import subprocess
import sys
from pathlib import Path

import netCDF4
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOOL = [sys.executable, str(ROOT / "tools/sqg_generate.py"), "--preset", "64", "--spinup-days", "1",
        "--output-interval-hours", "12", "--no-progress"]


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOL, *args], capture_output=True, text=True, timeout=300)


def test_a_resumed_run_equals_a_straight_run(tmp_path):
    straight, pieces = tmp_path / "straight.nc", tmp_path / "pieces.nc"
    assert generate("--days", "3", "--out", str(straight)).returncode == 0
    assert generate("--days", "1", "--out", str(pieces)).returncode == 0
    resumed = generate("--days", "3", "--out", str(pieces), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    with netCDF4.Dataset(straight) as a, netCDF4.Dataset(pieces) as b:
        assert a["pv"].dimensions == ("t", "z", "y", "x") and a["pv"].shape == (7, 2, 64, 64)
        assert a["pv"].units == "K" and a.N == 64 and a.sqgturb_compat in (1, True)
        np.testing.assert_array_equal(a["pv"][:], b["pv"][:])
        np.testing.assert_array_equal(a["t"][:], b["t"][:])
        assert 1.0 < float(np.std(a["pv"][-1])) < 50.0  # a finite, evolving temperature field


def test_existing_output_is_kept_and_mismatched_resume_is_named(tmp_path):
    out = tmp_path / "run.nc"
    assert generate("--days", "1", "--out", str(out)).returncode == 0
    before = out.read_bytes()
    again = generate("--days", "1", "--out", str(out))
    assert again.returncode != 0 and "resume" in again.stderr.lower()
    other = generate("--days", "2", "--out", str(out), "--resume", "--seed", "5")
    assert other.returncode != 0 and "seed" in other.stderr
    assert out.read_bytes() == before
