"""The ViT surrogate as da-cycle's forecast model: the rollout against the network called by hand,
batching, precision, the interval check, and a coupled cycle (SQG truth, ViT forecast)."""

import json
from pathlib import Path

import pytest
import torch

from da_plugin.cycle import CycleConfig, run
from da_plugin.models.surrogate import ViTSurrogate
from megavit.checkpoint.consolidated import save_consolidated
from megavit.config import ConfigError, load_config, to_dict
from megavit.model.config import ViTConfig
from megavit.model.vit import ViT

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [1.5, -2.0], [4.0, 3.0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, ViT]:
    """A tiny consolidated 16 x 16 ViT with a 12-h lead time and a per-level normalization."""
    config = ViTConfig(image_size=(16, 16), patch_size=4, embed_dim=16, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    model = ViT(config).eval()
    path = tmp_path_factory.mktemp("vit") / "consolidated"
    save_consolidated(path, model.state_dict(), dict(
        model=to_dict(config), step=0, data=dict(lead_hours=12.0, normalization=dict(mean=MEAN, std=STD)),
        source=dict(path="test")))
    return path, model


def by_hand(model: ViT, frames: torch.Tensor, steps: int) -> torch.Tensor:
    """Normalize, call the network with a 12-h lead time, denormalize; ``steps`` times."""
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        for _ in range(steps):
            frames = model((frames - mean) / std, torch.full((frames.shape[0],), 12.0)) * std + mean
    return frames


def test_rollout_matches_the_network_by_hand(checkpoint):
    path, model = checkpoint
    surrogate = ViTSurrogate(checkpoint=str(path), batch_size=3)
    assert surrogate.dt == 43200.0 and surrogate.state_shape == (2, 16, 16)
    x = 5.0 * torch.randn(7, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    out = surrogate.step(x, 2)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, by_hand(model, x, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(surrogate.step(x, 0), x)
    # batching over members (any leading dims) does not change a number
    whole = ViTSurrogate(checkpoint=str(path), batch_size=64).step(x.reshape(7, 1, 2, 16, 16), 2)
    torch.testing.assert_close(whole.reshape(x.shape), out, rtol=1e-6, atol=1e-6)


def test_bfloat16_forecast_is_close_and_keeps_the_state_dtype(checkpoint):
    path, _ = checkpoint
    x = 5.0 * torch.randn(4, 2, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    full = ViTSurrogate(checkpoint=str(path)).step(x, 1)
    half = ViTSurrogate(checkpoint=str(path), precision="bfloat16").step(x, 1)
    assert half.dtype == torch.float64
    assert (half - full).abs().max() < 0.05 * full.abs().max()


def test_bad_settings_fail_clearly(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(ValueError, match="no checkpoint at"):
        ViTSurrogate(checkpoint=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"found \[3, 2, 8, 8\]"):
        ViTSurrogate(checkpoint=str(path)).step(torch.zeros(3, 2, 8, 8))
    overrides = [f"model.checkpoint={path}", "truth.model.N=16"]
    with pytest.raises(ConfigError, match=r"interval 64800 is not a whole number .* trained lead time: 12 h"):
        load_config(CycleConfig, ROOT / "configs/da/sqg_vit_ensf.yaml", [*overrides, "obs.interval=64800.0"])
    with pytest.raises(ConfigError, match="ViTSurrogate cannot start a nature run"):
        load_config(CycleConfig, None, ["model.name=vit", f"model.checkpoint={path}", "obs.interval=43200.0"])


def test_coupled_cycle_sqg_truth_vit_forecast(checkpoint, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "coupled"
    config = load_config(CycleConfig, ROOT / "configs/da/sqg_vit_ensf.yaml", [
        f"model.checkpoint={path}", "truth.model.N=16", "cycles=3", "burn_in=0", "spinup_steps=60",
        "filter.ensemble_size=6", "filter.steps=10", "progress=false", "restart_every=0", f"output_dir={out}"])
    assert (config.forecast_steps, config.nature_steps) == (1, 36)
    summary = run(config)
    assert summary["model"] == "ViTSurrogate" and summary["cycles"] == 3
    assert json.loads((out / "summary.json").read_text())["rmse_a"] == summary["rmse_a"]
