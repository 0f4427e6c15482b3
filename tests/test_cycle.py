"""da-cycle end to end: outputs, reproducibility, and bad input leaving nothing behind."""

import json
import subprocess
import sys
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import yaml

from da_plugin.cycle import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "cycles=30", "burn_in=5", "spinup_steps=200", "model.dim=40",
    "filter.ensemble_size=8", "progress=false",
]


def run_cli(tmp_path, *overrides, name="out"):
    out = tmp_path / name
    try:
        code = main([str(ROOT / "configs/da/l96_ensf.yaml"), *SMALL, f"output_dir={out}", *overrides])
    except SystemExit as exit_:  # a bad command line or config exits with 2, as argparse does
        code = exit_.code
    return code, out


def test_outputs_and_metrics(tmp_path):
    code, out = run_cli(tmp_path)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["analysis.nc", "config.yaml", "rmse.png", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("rmse_a", "rmse_f", "spread_a", "rmse_free", "cycles", "seconds_per_cycle"):
        assert key in summary
    assert summary["cycles"] == 30
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["filter"]["name"] == "ensf" and resolved["model"]["dim"] == 40
    with netCDF4.Dataset(out / "analysis.nc") as ds:
        assert ds.Conventions == "CF-1.8"
        truth, mean = ds["truth"][:], ds["analysis_mean"][:]
        assert truth.shape == (30, 40) and ds["observation"].shape == (30, 40)
        # the stored series is the RMSE of the stored fields, and the summary its mean after burn-in
        rmse = np.sqrt(((mean - truth) ** 2).mean(1))
        np.testing.assert_allclose(ds["rmse_a"][:], rmse, rtol=1e-4)
        np.testing.assert_allclose(summary["rmse_a"], rmse[5:].mean(), rtol=1e-4)
        np.testing.assert_allclose(ds["observation"][:], np.arctan(truth), atol=0.3)
    assert summary["rmse_a"] < summary["rmse_free"]


def test_same_seed_same_numbers(tmp_path):
    runs = [run_cli(tmp_path, f"seed={seed}", name=f"r{i}")[1] for i, seed in enumerate((4, 4, 5))]
    fields = []
    for out in runs:
        with netCDF4.Dataset(out / "analysis.nc") as ds:
            fields.append(ds["analysis_mean"][:])
    assert np.array_equal(fields[0], fields[1])
    assert not np.array_equal(fields[0], fields[2])


@pytest.mark.parametrize(
    "override, code, message",
    [
        ("filter.ensmble_size=4", 2, "unknown config key 'filter.ensmble_size'; did you mean ensemble_size"),
        ("obs.sigma=0", 2, "obs.sigma=0.0 is out of range: must be a finite number > 0"),
        ("obs.sigma=-1", 2, "obs.sigma=-1.0 is out of range: must be a finite number > 0"),
        ("model.dim=3", 2, "model.dim must be >= 4"),
        ("filter.name=enfs", 2, "did you mean ensf"),
        ("model.dt=5.0", 1, "non-finite value"),  # the truth blows up: NaN/inf observations
    ],
)
def test_bad_input_fails_cleanly(tmp_path, capsys, override, code, message):
    assert run_cli(tmp_path, override)[0] == code
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir_and_earlier_outputs_kept(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main([str(ROOT / "configs/da/l96_ensf.yaml"), *SMALL, f"output_dir={blocker}/run"])
    assert code == 1 and f"{blocker} is not a directory" in capsys.readouterr().err
    code, out = run_cli(tmp_path)
    before = (out / "summary.json").read_bytes()
    assert run_cli(tmp_path)[0] == 1  # a second run into the folder is refused before any work
    assert "already holds a run (summary.json, analysis.nc, config.yaml, rmse.png)" in capsys.readouterr().err
    assert run_cli(tmp_path, "model.dt=5.0", "overwrite=true")[0] == 1  # allowed, but it fails: nothing replaced
    assert (out / "summary.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["analysis.nc", "config.yaml", "rmse.png", "summary.json"]


def test_console_script_help_and_exit_code(tmp_path):
    script = Path(sys.executable).parent / "da-cycle"
    help_text = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
    assert "key=value" in help_text
    result = subprocess.run([script, str(ROOT / "configs/da/l96_ensf.yaml"), "sed=1"], capture_output=True, text=True)
    assert result.returncode == 2 and "did you mean seed" in result.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs/da").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path, tmp_path):
    from da_plugin.cycle import CycleConfig
    from da_plugin.scale.config import ScaleConfig
    from megavit.checkpoint.consolidated import save_consolidated
    from megavit.config import load_config, to_dict
    from megavit.model.config import ViTConfig
    from megavit.model.vit import ViT

    if path.name.endswith("_scale.yaml"):  # python -m da_plugin.scale configs
        assert load_config(ScaleConfig, path).model.dim >= 1000
        return
    overrides = []
    if yaml.safe_load(path.read_text())["model"]["name"] == "vit":  # the trained checkpoint may not exist here
        vit = ViTConfig(image_size=(64, 64), patch_size=8, embed_dim=16, num_layers=1, num_heads=2)
        save_consolidated(tmp_path / "vit", ViT(vit).state_dict(),
                          dict(model=to_dict(vit), step=0, data=dict(lead_hours=12.0), source={}))
        overrides.append(f"model.checkpoint={tmp_path / 'vit'}")
    config = load_config(CycleConfig, path, overrides)
    assert config.burn_in < config.cycles


@pytest.mark.slow
@pytest.mark.parametrize("name", ["letkf", "etkf"])
def test_kalman_filters_cycle_on_the_40_variable_benchmark(tmp_path, name):
    out = tmp_path / name
    code = main([str(ROOT / f"configs/da/l96_{name}.yaml"), "cycles=200", "burn_in=50", "progress=false",
                 "save_fields=false", f"output_dir={out}"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rmse_a"] < 0.3 and summary["rmse_free"] > 2.0


def test_divergence_is_reported(tmp_path, capsys):
    """A filter worse than the free run (EnSF, 6 members, a truth barely off its fixed point) is
    flagged in the summary and on stderr; without a free run it cannot be judged."""
    short = ["cycles=10", "burn_in=0", "spinup_steps=50"]
    code, out = run_cli(tmp_path, *short, "filter.ensemble_size=6")
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0 and summary["rmse_a"] > summary["rmse_free"] and summary["diverged"] is True
    assert "the filter diverged" in capsys.readouterr().err
    assert json.loads((run_cli(tmp_path, name="good")[1] / "summary.json").read_text())["diverged"] is False
    alone = run_cli(tmp_path, *short, "free_run=false", name="alone")[1]
    assert json.loads((alone / "summary.json").read_text())["diverged"] is None


def test_buffered_analysis_file_equals_cycle_by_cycle(tmp_path, monkeypatch):
    """analysis.nc written in blocks of 7 cycles holds what one write per cycle does."""
    from da_plugin.io import AnalysisWriter

    monkeypatch.setattr(AnalysisWriter, "MAX_BUFFERED_CYCLES", 1)
    one = run_cli(tmp_path, name="one")[1]
    monkeypatch.setattr(AnalysisWriter, "MAX_BUFFERED_CYCLES", 7)
    blocks = run_cli(tmp_path, name="blocks")[1]
    with netCDF4.Dataset(one / "analysis.nc") as a, netCDF4.Dataset(blocks / "analysis.nc") as b:
        assert len(b["time"]) == 30
        for name in ("time", "truth", "analysis_mean", "analysis_spread", "observation", "rmse_a", "rmse_free"):
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nature_run_in_the_ensembles_batch_equals_stepped_alone(tmp_path, monkeypatch, dtype):
    """A perfect-model twin steps truth, ensemble and free run in one Lorenz-96 batch; every number
    in the outputs is the one that stepping the truth on its own gives."""
    from da_plugin.cycle import CycleConfig, Twin
    from da_plugin.models.lorenz96 import Lorenz96
    from megavit.config import load_config

    config = load_config(CycleConfig, ROOT / "configs/da/l96_ensf.yaml", [*SMALL, f"dtype={dtype}"])
    assert Twin.start(config).joint_nature
    joint = run_cli(tmp_path, f"dtype={dtype}", name="joint")[1]
    monkeypatch.setattr(Lorenz96, "batch_invariant", False)
    alone = run_cli(tmp_path, f"dtype={dtype}", name="alone")[1]
    first, second = (json.loads((out / "summary.json").read_text()) for out in (joint, alone))
    first.pop("seconds_per_cycle"), second.pop("seconds_per_cycle")
    assert first == second
    with netCDF4.Dataset(joint / "analysis.nc") as a, netCDF4.Dataset(alone / "analysis.nc") as b:
        for name in ("truth", "analysis_mean", "analysis_spread", "observation", "rmse_a", "rmse_free"):
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
