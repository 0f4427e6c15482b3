"""Kill tests: SIGKILL or SIGTERM in the middle of a real run, then what a user does next.

Each test starts the tool as a user would (a subprocess in its own session), waits until it is
visibly mid-way, kills it, and compares what is left and what a resume produces with an
uninterrupted run of the same settings. da-cycle's SIGKILL-and-resume is in test_restart.py, the
problem generator's in test_scale.py, the MPI tools' SIGTERM in test_preprocessing.py.
"""

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

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TQDM_DISABLE": "1"}


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {process.communicate()}")
        assert time.monotonic() < deadline, "the run did not get mid-way in time"
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def kill_group(process: subprocess.Popen, signum: int) -> tuple[str, str]:
    """``signum`` to the process and everything it started, as a batch system ends a job."""
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    return process.communicate(timeout=120)


def test_da_cycle_sigterm_keeps_the_earlier_run_and_leaves_nothing_behind(tmp_path):
    da_cycle = [sys.executable, "-m", "da_plugin.cycle", str(ROOT / "configs/da/l96_letkf.yaml"), "burn_in=0",
                "model.dim=40", "progress=false", f"output_dir={tmp_path / 'run'}"]
    assert subprocess.run([*da_cycle, "cycles=5"], env=ENV, capture_output=True).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    process = start([*da_cycle, "cycles=10000000", "overwrite=true"])
    wait_for(lambda: any(p.name.startswith(".staging-") for p in (tmp_path / "run").iterdir()), process)
    time.sleep(1.0)  # cycling
    _, err = kill_group(process, signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == ("da-cycle: stopped by SIGTERM; nothing was published (earlier outputs "
                                            "are unchanged)")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


@pytest.mark.slow
def test_sqg_generate_killed_then_resumed_equals_a_straight_run(tmp_path):
    generate = [sys.executable, str(ROOT / "tools/sqg_generate.py"), "--preset", "64", "--spinup-days", "0",
                "--days", "40", "--no-progress"]
    straight = subprocess.run([*generate, "--out", str(tmp_path / "straight.nc")], env=ENV, capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    killed = tmp_path / "killed.nc"
    process = start([*generate, "--out", str(killed)])

    def frames_on_disk() -> int:
        try:
            with netCDF4.Dataset(killed) as nc:
                return len(nc.dimensions["t"])
        except (OSError, RuntimeError, KeyError):  # read while the writer extends it
            return 0
    wait_for(lambda: frames_on_disk() > 20, process)
    kill_group(process, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL and frames_on_disk() < 321
    resumed = subprocess.run([*generate, "--out", str(killed), "--resume"], env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    with netCDF4.Dataset(tmp_path / "straight.nc") as a, netCDF4.Dataset(killed) as b:
        np.testing.assert_array_equal(a["t"][:], b["t"][:])
        np.testing.assert_array_equal(a["pv"][:], b["pv"][:])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_trainer_killed_then_resumed_logs_the_uninterrupted_losses(tmp_path):
    """SIGKILL to the whole torchrun job after a few checkpoints; --resume latest continues to the
    same loss at every step as a run that was never interrupted."""
    def train(output: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                str(ROOT / "megavit/training/train.py"), str(ROOT / "configs/vit/tiny.yaml"), "data.synthetic=true",
                "data.synthetic_samples=256", "train.steps=1500", "train.eval_every=0", "train.save_every=100",
                "train.eval_batches=1", "train.progress=false", "optim.warmup_steps=2", f"train.output_dir={output}",
                f"--deepspeed_config={ROOT / 'configs/deepspeed/dp_fp32.json'}"]

    def losses(output: Path) -> dict[int, float]:
        entries = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        return {e["step"]: e["loss"] for e in entries if "loss" in e}

    reference = subprocess.run(train(tmp_path / "reference"), env=ENV, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = tmp_path / "killed"
    process = start(train(killed))
    wait_for(lambda: (killed / "checkpoints" / "step0000200").is_dir(), process, timeout=300)
    kill_group(process, signal.SIGKILL)
    tag = (killed / "checkpoints" / "latest").read_text().strip()
    assert tag != "step0001500"  # killed mid-way
    resumed = subprocess.run([*train(killed), "--resume", "latest"], env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, found = losses(tmp_path / "reference"), losses(killed)
    assert sorted(found) == sorted(expected)
    np.testing.assert_allclose([found[s] for s in sorted(found)], [expected[s] for s in sorted(expected)], rtol=1e-6)
