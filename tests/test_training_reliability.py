"""megavit-train under hostile input (issue #17, training side): every bad input is one line naming
the key, file or directory, and the logged numbers mean what they say.

Fast tests build configs, DeepSpeed JSONs, shard directories and checkpoint pointers without
processes. Three short torchrun runs (tiny model, synthetic data, fp32, gloo) check the metrics:
a 2-stage pipeline without ZeRO against 2 data-parallel ranks under ZeRO-1 with another
micro-batch (grad norm, validation loss over a split not divisible by either global micro-batch,
learning rate), both against one process by hand, and a resume from step 1.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megavit.checkpoint import write_layout
from megavit.config import ConfigError, load_config
from megavit.data import SQGShards, SyntheticFrames
from megavit.data.shards import META_FILE, save_npz
from megavit.inference import load_surrogate
from megavit.model import mse_loss
from megavit.training.config import TrainConfig, batch_sizes, check_deepspeed_config, measures_grad_norm
from megavit.training.schedule import warmup_cosine
from megavit.training.train import main
from megavit.training.trainer import micro_batches, validation_batches

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs/vit/tiny.yaml")
DS_DIR = ROOT / "configs/deepspeed"


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    """Run megavit-train in this process; it must exit with ``code`` and one stderr line."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == code and len(lines) == 1 and lines[0].startswith("megavit-train: error: "), lines
    return lines[0]


# -- config validation (item 9): no processes -----------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1 is out of range: must be an integer >= 0"),
    ("parallel.sequence_parallel=true", "parallel.sequence_parallel=true needs parallel.tp >= 2"),
    ("optim.lr=.nan", "optim.lr=nan is out of range: must be a finite number > 0"),
    ("optim.lr=0", "optim.lr=0.0 is out of range: must be a finite number > 0"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio=2.0 is out of range: must be a number in [0, 1]"),
    ("optim.betas=[0.9,1.5]", "optim.betas=(0.9, 1.5) is out of range: must be two numbers in [0, 1)"),
    ("train.eval_batches=0", "train.eval_batches=0 is out of range: must be an integer >= 1, or null"),
    ("train.eval_every=-5", "train.eval_every=-5 is out of range: must be an integer >= 0"),
    ("train.steps=0", "train.steps=0 is out of range: must be an integer >= 1"),
    ("parallel.tp=0", "parallel.tp=0 is out of range: must be an integer >= 1"),
    ("data.lead=0", "data.lead=0 is out of range: must be an integer >= 1"),
    ("train.peak_tflops=.inf", "train.peak_tflops=inf is out of range: must be a finite number > 0"),
])
def test_config_values_out_of_range_are_one_line_errors(capsys, override, message):
    line = one_line_error(capsys, [TINY, "data.synthetic=true", override])
    assert message in line


def write_ds(tmp_path: Path, **changes) -> str:
    """configs/deepspeed/dp_fp32.json with ``changes`` (None removes a key), as a file."""
    ds = json.loads((DS_DIR / "dp_fp32.json").read_text())
    ds.update(changes)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({k: v for k, v in ds.items() if v is not None}))
    return str(path)


@pytest.mark.parametrize("changes, overrides, message", [
    ({"train_micro_batch_size_per_gpu": 0}, [], "train_micro_batch_size_per_gpu=0 in {} is out of range: "
                                                "must be an integer >= 1"),
    ({"gradient_accumulation_steps": 1.5}, [], "gradient_accumulation_steps=1.5 in {} is out of range"),
    ({"zero_optimization": {"stage": 3}}, [], "zero_optimization.stage=3 in {} is not supported: "
                                              "must be one of [0, 1, 2]"),
    ({"zero_optimization": {"stage": 2}}, ["parallel.pp=2"], "zero_optimization.stage=2 in {} does not work with "
                                                             "pipeline parallelism (parallel.pp=2)"),
    ({"zero_optimization": {"stage": 1, "compute_grad_norm": False}}, [], "zero_optimization.compute_grad_norm="
                                                                          "False in {} is not supported"),
    ({"zero_optimization": 2}, [], "zero_optimization=2 in {} must be an object"),
    ({"gradient_clipping": -1}, [], "gradient_clipping=-1 in {} is out of range: must be a finite number >= 0"),
    ({"fp16": {"enabled": True}}, [], "fp16.enabled=true in {} is not supported"),
    ({"train_micro_batch_size_per_gpu": None}, [], "{} sets neither train_micro_batch_size_per_gpu nor "
                                                   "train_batch_size"),
])
def test_bad_deepspeed_json_is_a_one_line_error(capsys, tmp_path, changes, overrides, message):
    path = write_ds(tmp_path, **changes)
    line = one_line_error(capsys, [TINY, "data.synthetic=true", *overrides, f"--deepspeed_config={path}"])
    assert message.format(path) in line


def test_unreadable_deepspeed_json_is_named(capsys, tmp_path):
    (tmp_path / "ds.json").write_text('{"train_micro_batch_size_per_gpu": ')
    line = one_line_error(capsys, [TINY, "data.synthetic=true", f"--deepspeed_config={tmp_path / 'ds.json'}"])
    assert f"DeepSpeed config {tmp_path / 'ds.json'} is not valid JSON" in line
    line = one_line_error(capsys, [TINY, "data.synthetic=true", f"--deepspeed_config={tmp_path}"])
    assert f"DeepSpeed config not found: {tmp_path}" in line


def test_batch_sizes_follow_deepspeeds_arithmetic():
    assert batch_sizes({"train_micro_batch_size_per_gpu": 4}, dp=2, source="x") == (4, 1)
    assert batch_sizes({"train_micro_batch_size_per_gpu": 4, "train_batch_size": 24}, dp=2, source="x") == (4, 3)
    assert batch_sizes({"gradient_accumulation_steps": 2, "train_batch_size": 24}, dp=2, source="x") == (6, 2)
    assert batch_sizes({"train_batch_size": 8}, dp=4, source="x") == (2, 1)
    with pytest.raises(ValueError, match=r"train_batch_size=10 in x does not match train_micro_batch_size_per_gpu="
                                         r"8 x gradient_accumulation_steps=1 x dp=1: must be a multiple of 8"):
        batch_sizes({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "train_batch_size": 10},
                    dp=1, source="x")
    with pytest.raises(ValueError, match="train_batch_size=16 .* dp=2"):  # all three given: must be equal
        batch_sizes({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 16},
                    dp=2, source="x")
    with pytest.raises(ValueError, match="train_batch_size=6 .* multiple of 4"):
        batch_sizes({"train_batch_size": 6}, dp=4, source="x")


def test_every_shipped_deepspeed_json_passes():
    config = load_config(TrainConfig, TINY, ["data.synthetic=true"])
    for path in sorted(DS_DIR.glob("*.json")):
        ds = json.loads(path.read_text())
        check_deepspeed_config(ds, config, str(path))
        assert measures_grad_norm(ds) == (path.stem != "dp_fp32"), path  # the one without ZeRO or bf16
    assert measures_grad_norm({"bfloat16": {"enabled": True}})  # DeepSpeed's other name for the section
    with pytest.raises(ConfigError, match="parallel.sequence_parallel=true needs parallel.tp >= 2"):
        load_config(TrainConfig, TINY, ["data.synthetic=true", "parallel.sequence_parallel=true"])


# -- the output directory (item 5) ------------------------------------------------------------------


def test_fresh_run_into_a_used_output_directory_is_refused(capsys, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    line = one_line_error(capsys, [TINY, "data.synthetic=true", f"train.output_dir={tmp_path}"])
    assert (f"output directory {tmp_path} already holds a run (checkpoints, metrics.jsonl); continue it with "
            f"--resume latest, or set train.overwrite=true") in line
    line = one_line_error(capsys, [TINY, "data.synthetic=true", f"train.output_dir={tmp_path}",
                                   "train.overwrite=true", "--resume", "latest"])
    assert "--resume latest and train.overwrite=true contradict each other" in line
    assert (tmp_path / "metrics.jsonl").is_file()  # nothing touched


# -- validation split (item 2): every sample once, for any layout ------------------------------------


@pytest.mark.parametrize("size", [1, 7, 13, 16, 50])
@pytest.mark.parametrize("micro, dp", [(1, 1), (8, 1), (3, 2), (4, 4), (5, 3)])
def test_validation_batches_cover_each_sample_exactly_once(size, micro, dp):
    seen, shares = [], []
    for rank in range(dp):
        full, rest = validation_batches(size, micro, dp, rank)
        assert all(len(b) == micro for b in full)
        assert len(full) == size // (micro * dp)  # the same number of passes on every rank
        assert (rest is None) == (size % (micro * dp) == 0)
        seen += [i for b in full for i in b] + list(rest or [])
        shares.append(rest)
    assert sorted(seen) == list(range(size))


# -- shards (items 6, 7): NaN/inf and truncated files named -----------------------------------------


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    """A minimal shard directory: one val shard of 6 frames on an 8 x 8 grid, and its statistics."""
    root = tmp_path / "shards"
    (root / "val").mkdir(parents=True)
    frames = np.random.default_rng(0).standard_normal((6, 2, 8, 8)).astype(np.float32)
    np.save(root / "val/shard_00000.npy", frames)
    save_npz(root / "normalize_mean.npz", {"pv": np.zeros(2)})
    save_npz(root / "normalize_std.npz", {"pv": np.ones(2)})
    meta = {"shape": [2, 8, 8], "dt_seconds": 10800.0,
            "splits": {"val": {"frames": 6, "shards": [{"file": "val/shard_00000.npy", "frames": 6}]}}}
    (root / META_FILE).write_text(json.dumps(meta))
    return root


def test_nan_or_inf_in_a_shard_stops_naming_split_file_and_frame(shard_dir):
    path = shard_dir / "val/shard_00000.npy"
    frames = np.load(path)
    frames[3, 1, 2, 2] = np.nan
    frames[5, 0, 0, 0] = np.inf
    np.save(path, frames)
    data = SQGShards(shard_dir, "val", lead=1)
    assert torch.isfinite(data[0][0]).all() and torch.isfinite(data[1][1]).all()  # frames 0-2 are fine
    with pytest.raises(ValueError, match=f"val split: shard {path} holds NaN or infinite values in frame 3"):
        data[2]  # frame 2 -> 3
    with pytest.raises(ValueError, match=f"val split: shard {path} holds NaN or infinite values in frame 5"):
        data[4]  # frame 4 -> 5


def test_truncated_or_damaged_data_files_are_named(shard_dir):
    path = shard_dir / "val/shard_00000.npy"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"shard {path} cannot be read \\(truncated or damaged\\?\\)"):
        SQGShards(shard_dir, "val")
    std = shard_dir / "normalize_std.npz"
    std.write_bytes(std.read_bytes()[:50])
    with pytest.raises(ValueError, match=f"statistics file {std} cannot be read"):
        SQGShards(shard_dir, "val")
    save_npz(std, {"pv": np.array([1.0, np.inf])})
    with pytest.raises(ValueError, match="standard deviations must be finite and > 0, found"):
        SQGShards(shard_dir, "val")
    save_npz(shard_dir / "normalize_mean.npz", {"pv": np.array([np.nan, 0.0])})
    with pytest.raises(ValueError, match="means must be finite"):
        SQGShards(shard_dir, "val")
    meta = shard_dir / META_FILE
    meta.write_text(meta.read_text()[:20])
    with pytest.raises(ValueError, match=f"{meta} is not valid JSON"):
        SQGShards(shard_dir, "val")


# -- file modes (item 8) ----------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_layout_and_latest_get_the_modes_a_plain_file_gets(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_layout(tmp_path, "step0000001", {"tp": 1})
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(previous)
    for name in ("step0000001/layout.json", "latest"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


# -- real training runs (items 1-4, 7, 8) -----------------------------------------------------------

VAL = 13  # val samples (synthetic_samples // 8): 8 + 5 on pp=2 (micro-batch 8), 3 x 4 + 1 on dp=2 (micro-batch 2)
COMMON = ["data.synthetic=true", f"data.synthetic_samples={8 * VAL}", "train.steps=2", "train.eval_every=0",
          "train.save_every=1", "train.eval_batches=null", "train.progress=false", "optim.warmup_steps=2",
          "model.num_layers=2"]


def torchrun(ranks: int, output: Path, ds_config: str, *overrides: str, resume: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(ROOT / "megavit/training/train.py"), TINY, *COMMON, f"train.output_dir={output}", *overrides,
               f"--deepspeed_config={ds_config}", *(["--resume", resume] if resume else [])]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def by_step(entries: list[dict], key: str) -> dict[int, float]:
    return {e["step"]: e[key] for e in entries if key in e}


PP2 = ("parallel.pp=2", "train.eval_every=1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """pp=2 without ZeRO (micro-batch 8), and dp=2 on the plain engine with ZeRO-1 (2 micro-batches of 2).

    Both train on the same 8 samples per step; their validation passes split the 13 val samples
    differently, and the second leaves DP rank 1 without a remainder. The pipeline run validates
    before and after every step, so its stages renegotiate activation shapes between training and
    the remainder's smaller micro-batch each time.
    """
    root = tmp_path_factory.mktemp("runs")
    torchrun(2, root / "pp2", str(DS_DIR / "dp_fp32.json"), *PP2)
    zero1 = dict(json.loads((DS_DIR / "zero1_fp32.json").read_text()), train_micro_batch_size_per_gpu=2,
                 gradient_accumulation_steps=2)
    (root / "zero1_micro2.json").write_text(json.dumps(zero1))
    torchrun(2, root / "dp2", str(root / "zero1_micro2.json"), "parallel.engine=plain")
    return {"pp2": root / "pp2", "dp2": root / "dp2"}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_grad_norm_without_zero_is_the_global_norm(runs):
    pp2, dp2 = metrics(runs["pp2"]), metrics(runs["dp2"])
    # the same 8 samples per step on both layouts; ZeRO-1's norm is DeepSpeed's own
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(list(by_step(pp2, key).values()), list(by_step(dp2, key).values()), rtol=1e-5,
                                   err_msg=key)
    # by hand: the step-1 weights, the step-2 batch, one process
    model = load_surrogate(runs["pp2"] / "checkpoints" / "step0000001").model.train()
    train = SyntheticFrames(8 * VAL, 2, (64, 64), seed=1234)
    (frames, lead), target = next(micro_batches(train, 8, 1, 0, seed=1234, first=1))
    mse_loss(model(frames, lead), target).backward()
    norm = torch.stack([p.grad.norm() for p in model.parameters()]).norm().item()
    np.testing.assert_allclose(by_step(pp2, "grad_norm")[2], norm, rtol=1e-5)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_validation_loss_scores_the_whole_split_alike_for_every_layout(runs):
    val = SyntheticFrames(VAL, 2, (64, 64), seed=1235)
    frames, target, lead = (torch.stack(column) for column in zip(*(val[i] for i in range(VAL))))
    model = load_surrogate(runs["pp2"] / "checkpoints" / "step0000002").model
    with torch.no_grad():
        by_hand = mse_loss(model(frames, lead), target).item()  # every sample once, all the same size
    for name, steps in (("pp2", [0, 1, 2]), ("dp2", [2])):
        logged = by_step(metrics(runs[name]), "val_loss")
        assert sorted(logged) == steps, name
        np.testing.assert_allclose(logged[2], by_hand, rtol=1e-5, err_msg=name)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_logged_learning_rate_is_the_one_the_step_used(runs):
    expected = [1e-3 * warmup_cosine(s - 1, warmup_steps=2, total_steps=2, min_ratio=0.1) for s in (1, 2)]
    assert expected == [5e-4, 1e-3]
    for name in ("pp2", "dp2"):
        np.testing.assert_allclose(list(by_step(metrics(runs[name]), "lr").values()), expected, rtol=1e-12)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_resume_trims_metrics_names_the_tag_and_refuses_damage(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["pp2"], run)
    original = metrics(run)
    # a torn last line, as a kill during a write leaves it
    with open(run / "metrics.jsonl", "a") as log:
        log.write('{"step": 3, "lo')
    result = torchrun(2, run, str(DS_DIR / "dp_fp32.json"), *PP2, resume="step0000001")
    assert f"megavit-train: resumed from {run / 'checkpoints' / 'step0000001'} at step 1" in result.stderr
    resumed = metrics(run)  # steps 0 and 1 as logged, the resume, then step 2 and its validation once each
    assert [e["step"] for e in original] == [0, 1, 1, 2, 2]
    assert resumed[:4] == [*original[:3], {"step": 1, "resumed_from": "step0000001"}]
    assert [e["step"] for e in resumed[4:]] == [2, 2]
    for key in ("loss", "grad_norm", "lr", "val_loss"):
        np.testing.assert_allclose(by_step(resumed, key)[2], by_step(original, key)[2], rtol=1e-6, err_msg=key)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("metrics.jsonl", "config.json", "checkpoints/latest", "checkpoints/step0000002/layout.json"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o666 & ~mask, name
    # a truncated model file: one line naming it, from the rank that reads it
    damaged = run / "checkpoints" / "step0000001" / "layer_02-model_00-model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:200])
    result = torchrun(2, run, str(DS_DIR / "dp_fp32.json"), *PP2, resume="step0000001", check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("megavit-train: error:")]
    assert result.returncode != 0 and errors, result.stderr[-2000:]
    assert f"checkpoint {run / 'checkpoints' / 'step0000001'} cannot be loaded: file {damaged} is truncated" \
        in errors[0]
