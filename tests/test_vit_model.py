"""The SQG ViT on one process: every named config, FLOP count, shapes, checkpointing, clear errors."""

import re
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megavit.config import ConfigError
from megavit.model import ViT, ViTConfig, count_parameters, flops_per_sample, load_vit_config, mse_loss
from megavit.model.attention import flash_attn_func
from megavit.model.vit import patchify, unpatchify
from megavit.parallel import ParallelDims

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "vit"
TINY = CONFIGS / "tiny.yaml"


def named_size(name: str) -> float | None:
    """Parameter count a config's name promises: 'sqg64_108m' -> 108e6, 'sqg128_1.2b' -> 1.2e9."""
    match = re.search(r"_(\d+(?:\.\d+)?)([mb])$", name)
    return None if match is None else float(match[1]) * {"m": 1e6, "b": 1e9}[match[2]]


def batch(config: ViTConfig, size: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frames, lead_time, target) drawn from ``seed`` on the current default device."""
    generator = torch.Generator().manual_seed(seed)
    shape = (size, config.in_vars, *config.image_size)
    frames, target = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    return frames, torch.rand(size, generator=generator), target


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_config_builds_runs_and_matches_its_name(path):
    config = load_vit_config(path)
    device = torch.device("cpu") if path.stem == "tiny" else torch.device("meta")  # meta: shapes, no memory
    with device:
        model = ViT(config)
        frames, lead_time, target = batch(config)
        prediction = model(frames, lead_time)
        mse_loss(prediction, target).backward()
    params = count_parameters(model)
    print(f"{path.stem}: {params / 1e6:.1f}M parameters, {flops_per_sample(config) / 1e12:.3f} TFLOP per sample")
    assert prediction.shape == frames.shape
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    expected = named_size(path.stem)
    assert path.stem == "tiny" or abs(params / expected - 1) < 0.05, f"{path.stem}: {params:,} parameters"


def test_flops_match_torch_flop_counter():
    config = load_vit_config(TINY, ["model.attention_backend=math"])  # math: bmm that the counter sees on CPU
    model = ViT(config)
    frames, lead_time, target = batch(config, size=3)
    with FlopCounterMode(display=False) as forward:
        model(frames, lead_time)
    with FlopCounterMode(display=False) as training:
        mse_loss(model(frames, lead_time), target).backward()
    assert forward.get_total_flops() == pytest.approx(3 * flops_per_sample(config, training=False), rel=1e-3)
    # backward skips the input gradient of the patch embedding, hence slightly under 3x forward
    assert training.get_total_flops() == pytest.approx(3 * flops_per_sample(config), rel=0.02)


def test_stage_shapes_and_chain():
    config = load_vit_config(TINY)
    model = ViT(config)
    frames, lead_time, _ = batch(config, size=3)
    tokens = model.embedding((frames, lead_time))
    assert tokens.shape == (3, config.num_tokens, config.embed_dim)
    for block in model.blocks:  # a pipeline may cut between any two layers: one tensor passes
        tokens = block(tokens)
        assert tokens.shape == (3, config.num_tokens, config.embed_dim)
    x = model.head(tokens)
    torch.testing.assert_close(x, model(frames, lead_time), rtol=0, atol=0)
    assert x.shape == (3, 2, *config.image_size)
    assert "pos_embed" not in dict(model.named_parameters())  # fixed, not learned
    patches = patchify(frames, config.patch_size)
    assert patches.shape == (3, 2, config.num_tokens, config.patch_size**2)
    flat = patches.permute(0, 2, 1, 3).reshape(3, config.num_tokens, -1)  # head layout: (variable, row, column)
    assert torch.equal(unpatchify(flat, 2, config.image_size, config.patch_size), frames)


def test_attention_backends_agree():
    outputs = []
    for backend in ("sdpa", "math"):
        torch.manual_seed(0)
        model = ViT(load_vit_config(TINY, [f"model.attention_backend={backend}"]))
        frames, lead_time, _ = batch(model.config)
        outputs.append(model(frames, lead_time))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


def gradients(overrides: list[str]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = ViT(load_vit_config(TINY, overrides))
    frames, lead_time, target = batch(model.config)
    torch.manual_seed(1)  # the dropout stream; checkpointing must replay it
    mse_loss(model(frames, lead_time), target).backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_gradients(every):
    dropout = ["model.dropout=0.1", "model.attention_dropout=0.1"]
    reference = gradients(dropout)
    checkpointed = gradients([*dropout, f"model.checkpoint_every={every}"])
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_layout_errors_name_the_values():
    config = load_vit_config(TINY)
    with pytest.raises(ValueError, match=r"num_heads=4 is not divisible by tp=3; hidden_size=64 is not divisible "
                                         r"by tp=3; ffn_hidden_size=256 is not divisible by tp=3"):
        config.check_layout(ParallelDims(tp=3, world_size=3))
    with pytest.raises(ValueError, match=r"num_layers=2 cannot be split evenly into pp=4"):
        config.check_layout(ParallelDims(pp=4, world_size=4))
    with pytest.raises(ValueError, match=r"num_tokens=64 is not divisible by tp=3 \(sequence parallelism\)"):
        load_vit_config(TINY, ["model.num_heads=3", "model.embed_dim=48"]).check_layout(
            ParallelDims(tp=3, world_size=3, sequence_parallel=True))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.attention_backend=flsh"],
         r"model.attention_backend: 'flsh' is not one of \['sdpa', 'flash', 'math'\]; did you mean flash"),
        (["model.embed_dm=32"], r"unknown config key 'model.embed_dm'; did you mean embed_dim"),
        (["model.num_heads=5"], r"embed_dim=64 is not divisible by num_heads=5"),
        (["model.patch_size=5"], r"image_size=\[64, 64\] must be two multiples of patch_size=5"),
        (["model.num_layers=two"], r"model.num_layers: expected int, found 'two'"),
        (["training.lr=1"], r"model overrides must have the form model.key=value"),
    ],
)
def test_config_errors_name_the_key_and_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_vit_config(TINY, overrides)


def test_direct_construction_checks_the_backend():
    with pytest.raises(ValueError, match=r"attention_backend='sdp' is not one of .*did you mean 'sdpa'"):
        ViTConfig(attention_backend="sdp")


@pytest.mark.skipif(flash_attn_func is not None, reason="flash_attn is installed here")
def test_flash_backend_without_flash_attn_is_a_clear_error():
    with pytest.raises(ImportError, match="attention_backend 'flash' needs the flash_attn package"):
        ViT(load_vit_config(TINY, ["model.attention_backend=flash"]))


def test_config_file_may_hold_other_sections(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(TINY.read_text() + "training:\n  lr: 5.0e-4\n")
    assert load_vit_config(path, ["model.num_layers=3"]) == ViTConfig(image_size=(64, 64), patch_size=8, num_layers=3)
    (tmp_path / "typo.yaml").write_text("model:\n  embed_dim: 64\n  num_layyers: 2\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.num_layyers'; did you mean num_layers"):
        load_vit_config(tmp_path / "typo.yaml")
    (tmp_path / "empty.yaml").write_text("training:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="has no 'model' section"):
        load_vit_config(tmp_path / "empty.yaml")
