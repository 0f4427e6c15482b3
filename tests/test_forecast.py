"""Forecasts from a checkpoint: ``megavit-forecast`` (megavit.inference) and ``evaluate-surrogate``
(da_plugin.surrogate_eval), on a small SQG truth run written by the real generator and a tiny ViT
saved as a consolidated checkpoint. Every number is checked against its own computation: netCDF
frames read with netCDF4 directly, rollouts by :class:`Surrogate`, RMSEs with numpy."""

import json
import subprocess
import sys
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import torch

from da_plugin import surrogate_eval
from da_plugin.models.sqg import SQG
from da_plugin.models.sqg_truth import Plan, run
from megavit import inference
from megavit.checkpoint.consolidated import save_consolidated
from megavit.checksum import sha256_of
from megavit.config import to_dict
from megavit.data.shards import STATISTICS, Shard, metadata, new_shard, write_metadata, write_statistics
from megavit.data.sqg_netcdf import DAY, Timeline, open_run
from megavit.inference import load_surrogate
from megavit.model.config import ViTConfig
from megavit.model.vit import ViT

GRID = 32
FRAME_HOURS, LEAD_HOURS = 3.0, 6.0  # the surrogate steps 2 frames at a time
FRAMES = 24


def write_truth(path: Path, n: int, frames: int) -> Path:
    """An SQG truth run of ``frames`` 3-hourly frames on an ``n`` x ``n`` grid after a 2-day spin-up."""
    model = SQG(N=n)
    interval = round(FRAME_HOURS * 3600 / model.dt)
    plan = Plan(model=model, seed=0, members=1, dtype="float32", interval_steps=interval, spinup_events=16,
                frames=frames, paths=(path,), restart=path.with_name(path.name + ".restart.npz"))
    run(plan, torch.device("cpu"), resume=False, progress=False)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The truth run, a run on another grid, and a tiny ViT (random weights, a normalization) for 32^2 frames."""
    root = tmp_path_factory.mktemp("forecast")
    config = ViTConfig(image_size=(GRID, GRID), patch_size=8, embed_dim=32, num_layers=1, num_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        weights = ViT(config).state_dict()
    save_consolidated(root / "vit", weights, {
        "model": to_dict(config), "step": 0,
        "data": {"lead_hours": LEAD_HOURS, "normalization": {"mean": [0.1, -0.2], "std": [2.0, 3.0]}}})
    return {"truth": write_truth(root / "truth.nc", GRID, FRAMES), "coarse": write_truth(root / "coarse.nc", 16, 2),
            "checkpoint": root / "vit"}


def stored_frames(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(pv, t) of a run file, read with netCDF4 alone."""
    with netCDF4.Dataset(path) as dataset:
        return np.asarray(dataset["pv"][:]), np.asarray(dataset["t"][:])


def forecast(files: dict[str, Path], output: Path, *extra: str) -> int:
    return inference.main(["--checkpoint", str(files["checkpoint"]), "--initial", str(files["truth"]),
                           "--output", str(output), "--no-progress", *extra])


def test_forecast_file_holds_the_rollout_of_the_initial_frame(files, tmp_path):
    truth, times = stored_frames(files["truth"])
    assert forecast(files, tmp_path / "a.nc", "--time-index", "5", "--steps", "3") == 0
    assert forecast(files, tmp_path / "b.nc", "--day", f"{times[5] / DAY}", "--steps", "3") == 0
    frames, seconds = stored_frames(tmp_path / "a.nc")
    expected = load_surrogate(files["checkpoint"]).rollout(torch.from_numpy(truth[5]), steps=3)
    np.testing.assert_array_equal(frames[0], truth[5])
    np.testing.assert_array_equal(frames[1:], expected.numpy())
    np.testing.assert_array_equal(seconds, times[5] + 3600 * LEAD_HOURS * np.arange(4))
    np.testing.assert_array_equal(stored_frames(tmp_path / "b.nc")[0], frames)
    written = open_run(str(tmp_path / "a.nc"))  # the SQG run reader takes it, with the truth's parameters
    assert written.attributes["N"] == GRID and written.attributes["output_interval"] == 3600 * LEAD_HOURS


@pytest.mark.parametrize("case, extra, message", [
    ("missing initial", ["--initial", "nowhere.nc"], "nowhere.nc: no such file"),
    ("other grid", ["--initial", "{coarse}"], "frames are 2x16x16 (levels, y, x) but the model"),
    ("no steps", ["--steps", "0"], "--steps must be >= 1, got 0"),
    ("index", ["--time-index", "24"], "--time-index 24 is out of range: the file has 24 frames"),
    ("day", ["--day", "0.01"], "no frame at day 0.01"),
    ("checkpoint", ["--checkpoint", "nowhere"], "checkpoint nowhere does not exist"),
])
def test_bad_forecast_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, case, extra, message):
    capsys.readouterr()  # later options win: extra replaces --steps 2, --initial, --checkpoint
    assert forecast(files, tmp_path / "out.nc", "--steps", "2", *(a.format(coarse=files["coarse"]) for a in extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megavit-forecast: error: ") and "\n" not in err and message in err, err
    assert not list(tmp_path.iterdir())


def test_existing_output_needs_overwrite(files, tmp_path, capsys):
    out = tmp_path / "f.nc"
    out.write_text("an earlier forecast")
    assert forecast(files, out, "--steps", "1") == 2
    assert f"{out} already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "an earlier forecast"
    assert forecast(files, out, "--steps", "1", "--overwrite") == 0
    assert stored_frames(out)[0].shape == (2, 2, GRID, GRID)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.nc"]  # no temporary files left behind


def test_evaluation_matches_numpy(files, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--checkpoint", str(files["checkpoint"]), "--run", str(files["truth"]), "--starts", "5", "--steps", "3",
            "--output-dir", str(out)]
    assert surrogate_eval.main(args) == 0
    table = capsys.readouterr().out
    assert "| RMSE (K) | 6 h | 12 h | 18 h |" in table and "| SQG model |" in table
    result = json.loads((out / surrogate_eval.JSON_FILE).read_text())
    assert (out / surrogate_eval.PLOT_FILE).stat().st_size > 0
    starts = np.array(result["starts"])
    assert len(set(starts)) == 5 and starts.max() < FRAMES - 6 and result["lead_hours"] == [6.0, 12.0, 18.0]
    truth = stored_frames(files["truth"])[0].astype(np.float64)
    verifying = truth[starts[:, None] + 2 * np.arange(1, 4)]  # [starts, leads, 2, y, x]
    rollout = load_surrogate(files["checkpoint"]).rollout(torch.from_numpy(truth[starts]).float(), 3)
    by_numpy = {"persistence": truth[starts][:, None] - verifying,
                "vit": rollout.transpose(0, 1).double().numpy() - verifying}
    for name, error in by_numpy.items():
        np.testing.assert_allclose(result["rmse_K"][name], np.sqrt((error**2).mean(axis=(0, 2, 3, 4))), rtol=1e-6)
    # the SQG model restarted from the stored state repeats the run it made, up to float32 rounding
    assert max(result["rmse_K"]["sqg"]) < 1e-3 * min(result["rmse_K"]["persistence"])
    rerun = surrogate_eval.main(args[:-2])  # same seed, same starts, nothing written
    assert rerun == 0 and table.splitlines()[-3:] == capsys.readouterr().out.splitlines()[-3:]


def test_shard_split_reads_as_one_sequence(files, tmp_path):
    """Two test shards written with megavit.data.shards read back as the run's frames, across the join."""
    timeline = Timeline.from_runs([open_run(str(files["truth"]))])
    truth = stored_frames(files["truth"])[0]
    shards = [Shard("test", 0, 4, 14), Shard("test", 1, 14, 24)]
    (tmp_path / "test").mkdir()
    for shard in shards:
        new_shard(tmp_path / shard.name, shard.stop - shard.start, truth.shape[1:])[:] = truth[shard.start:shard.stop]
    write_statistics(tmp_path, truth.mean(axis=(0, 2, 3)), truth.std(axis=(0, 2, 3)), truth.mean(axis=0))
    written = [shard.name for shard in shards] + list(STATISTICS)
    write_metadata(tmp_path, metadata(timeline, {"test": (4, 24)}, shards, {}, num_shards=2,
                                      digests={name: sha256_of(tmp_path / name) for name in written}))
    source = surrogate_eval.shard_source(tmp_path, "test")
    assert source.count == 20 and source.step_seconds == 3600 * FRAME_HOURS
    indices = np.array([0, 9, 10, 19])
    np.testing.assert_array_equal(source.read(indices), truth[4 + indices])
    assert surrogate_eval.main(["--checkpoint", str(files["checkpoint"]), "--shards", str(tmp_path),
                                "--starts", "3", "--steps", "2"]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--starts", "50"], "--starts 50: between 1 and 20 start frames"),
    (["--steps", "20"], "24 frames of 3 h cannot verify 20 leads of 6 h"),
])
def test_bad_evaluation_input_is_one_line(files, capsys, extra, message):
    args = ["--checkpoint", str(files["checkpoint"]), "--run", str(files["truth"]), "--steps", "2", *extra]
    assert surrogate_eval.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate-surrogate: error: ") and "\n" not in err and message in err, err


@pytest.mark.slow  # a fresh interpreter imports torch: about 10 s on the shared 2 cores
def test_help_shows_examples():
    result = subprocess.run([sys.executable, "-m", "megavit.inference", "--help"], capture_output=True, text=True,
                            check=True)
    assert "megavit-forecast --checkpoint runs/vit_tiny/consolidated" in result.stdout
    with pytest.raises(SystemExit) as exit_info:
        surrogate_eval.parse_args(["--help"])
    assert exit_info.value.code == 0
