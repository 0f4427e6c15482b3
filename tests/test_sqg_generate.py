"""tools/sqg_generate.py (da_plugin.models.sqg_truth) as a user runs it: netCDF layout, resume equal to a
straight run, errors; and megavit.data.sqg_netcdf's writer read back by the preprocessing reader."""

import subprocess
import sys
from pathlib import Path

import netCDF4
import numpy as np
import pytest

from megavit.data.sqg_netcdf import FrameReader, InputError, RunWriter, Timeline, check_run, create_run, open_run

ROOT = Path(__file__).resolve().parent.parent
TOOL = [sys.executable, str(ROOT / "tools/sqg_generate.py"), "--preset", "64", "--spinup-days", "1",
        "--output-interval-hours", "12", "--no-progress"]


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOL, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
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


@pytest.mark.slow
def test_existing_output_is_kept_and_mismatched_resume_is_named(tmp_path):
    out = tmp_path / "run.nc"
    assert generate("--days", "1", "--out", str(out)).returncode == 0
    before = out.read_bytes()
    again = generate("--days", "1", "--out", str(out))
    assert again.returncode != 0 and "resume" in again.stderr.lower()
    other = generate("--days", "2", "--out", str(out), "--resume", "--seed", "5")
    assert other.returncode != 0 and "seed" in other.stderr
    assert out.read_bytes() == before


def test_a_run_written_from_python_reads_back(tmp_path):
    path = tmp_path / "nature.nc"
    identity = {"seed": 3, "dtype": "float32", "member": 0}
    create_run(path, n=8, length=1e6, height=1e4, title="test", creator="tests", attributes=identity)
    assert check_run(path, identity, 8) == 0
    frames = np.random.default_rng(0).normal(280.0, 5.0, (3, 2, 8, 8)).astype(np.float32)
    with RunWriter(path) as writer:
        for i, frame in enumerate(frames):
            writer.write(i, frame, 3600.0 * (i + 1))
    assert check_run(path, identity, 8) == 3
    run = open_run(str(path))
    assert run.grid == (2, 8, 8) and run.units == "K" and run.levels == [0.0, 1e4] and run.attributes["seed"] == 3
    np.testing.assert_array_equal(run.times, [3600.0, 7200.0, 10800.0])
    with FrameReader(Timeline.from_runs([run])) as reader:
        np.testing.assert_array_equal(reader.read(0, 3), frames)
    with pytest.raises(InputError, match="seed: file 3, requested 4"):
        check_run(path, {**identity, "seed": 4}, 8)
    with pytest.raises(InputError, match=r"expected pv\(t, 2, 16, 16\)"):
        check_run(path, identity, 16)


def test_resume_and_diagnose_refuse_a_file_cut_short(tmp_path):
    """A run file truncated on disk (a copy cut short, a full disk): both name the file instead of
    appending after zero-filled frames or averaging missing ones."""
    out = tmp_path / "run.nc"
    assert generate("--days", "2", "--out", str(out)).returncode == 0
    with open(out, "r+b") as handle:
        handle.truncate(out.stat().st_size - 20000)
    before = out.read_bytes()
    resumed = generate("--days", "3", "--out", str(out), "--resume")
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr
    assert resumed.stderr.strip().splitlines()[-1].startswith(f"sqg_generate: error: {out}: "), resumed.stderr
    assert out.read_bytes() == before  # nothing appended
    diagnosed = generate("--diagnose", str(out), "--from-day", "0")
    assert diagnosed.returncode == 2 and str(out) in diagnosed.stderr.strip().splitlines()[-1], diagnosed.stderr
