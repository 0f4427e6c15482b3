"""megavit.data.shards reading shards written by tools/nc2npy_mpi.py: pairs, normalization and errors."""

import shutil
import subprocess
import sys
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import torch

from megavit.data import SQGShards, SyntheticFrames

ROOT = Path(__file__).resolve().parent.parent
FRAMES, N = 80, 16  # 3-hourly frames: 10 days


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    pv = (280.0 + 5.0 * rng.standard_normal((FRAMES, 2, N, N))).astype(np.float32)
    with netCDF4.Dataset(root / "run.nc", "w") as nc:
        for name, size in (("t", None), ("z", 2), ("y", N), ("x", N)):
            nc.createDimension(name, size)
        nc.createVariable("pv", np.float32, ("t", "z", "y", "x"))[:] = pv
        t = nc.createVariable("t", np.float64, ("t",))
        t.units = "seconds"
        t[:] = np.arange(FRAMES) * 3 * 3600.0
    subprocess.run([sys.executable, str(ROOT / "tools/nc2npy_mpi.py"), "--input", str(root / "run.nc"),
                    "--out-dir", str(root / "shards"), "--start_train_day", "0", "--start_val_day", "6",
                    "--start_test_day", "8", "--end_day", "10", "--num_shards", "2"],
                   check=True, capture_output=True, timeout=120)
    np.save(root / "pv.npy", pv)
    return root


def test_pairs_are_lead_frames_apart_and_normalized(shards):
    pv = np.load(shards / "pv.npy")
    data = SQGShards(shards / "shards", "train", lead=4, image_size=(N, N))
    train = pv[:48].astype(np.float64)  # days [0, 6): 48 frames
    mean, std = train.mean(axis=(0, 2, 3)), train.std(axis=(0, 2, 3))
    assert len(data) == 2 * (24 - 4)  # two shards of 24 frames, pairs inside a shard
    x, y, lead = data[len(data) - 1]  # last pair of the second shard: frames 43 -> 47
    np.testing.assert_allclose(x.numpy(), (pv[43] - mean[:, None, None]) / std[:, None, None], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y.numpy(), (pv[47] - mean[:, None, None]) / std[:, None, None], rtol=1e-5, atol=1e-5)
    assert lead.item() == pytest.approx(12.0)
    assert x.dtype == torch.float32 and x.shape == (2, N, N)


def test_missing_or_mismatched_data_is_named(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing meta.json.*nc2npy_mpi.py"):
        SQGShards(tmp_path, "train")
    with pytest.raises(ValueError, match="frames are 16x16 but the model expects 64x64"):
        SQGShards(shards / "shards", "train", image_size=(64, 64))
    with pytest.raises(ValueError, match="no split 'dev'"):
        SQGShards(shards / "shards", "dev")
    copy = tmp_path / "copy"
    shutil.copytree(shards / "shards", copy)
    (copy / "normalize_std.npz").unlink()
    with pytest.raises(FileNotFoundError, match="normalize_std.npz is missing"):
        SQGShards(copy, "train")


def test_synthetic_frames_are_seeded():
    a, b = SyntheticFrames(4, 2, (8, 8), seed=1), SyntheticFrames(4, 2, (8, 8), seed=1)
    assert torch.equal(a[3][0], b[3][0]) and not torch.equal(a[3][0], a[2][0])


def test_a_shard_or_statistics_file_changed_after_writing_is_named_by_its_checksum(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards / "shards", copy)
    shard = copy / "val" / "shard_00001.npy"
    frames = np.load(shard)
    np.save(shard, frames + 0.5)  # well-formed, same shape and dtype: only the checksum can tell
    with pytest.raises(ValueError, match=f"{shard}: checksum mismatch: {copy / 'meta.json'} lists sha256"):
        SQGShards(copy, "val")
    assert len(SQGShards(copy, "val", verify_checksums=False)) > 0  # the escape hatch for huge datasets
    SQGShards(copy, "train")  # the train split is untouched
    mean = copy / "normalize_mean.npz"
    mean.write_bytes(mean.read_bytes())  # same bytes: still fine
    SQGShards(copy, "train")
    shutil.copy(copy / "normalize_std.npz", mean)  # a valid statistics file, the wrong one
    with pytest.raises(ValueError, match="normalize_mean.npz: checksum mismatch"):
        SQGShards(copy, "train")
