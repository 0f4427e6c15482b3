"""Architecture config of the SQG ViT: the ``model:`` section of ``configs/vit/*.yaml``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from megavit.config import ConfigError, bounded, build, check_bounds, load_mapping
from megavit.model.attention import check_attention_backend
from megavit.parallel import ParallelDims


@dataclasses.dataclass
class ViTConfig:
    """Architecture of the SQG ViT: the ``model:`` section of ``configs/vit/*.yaml``."""

    image_size: tuple[int, int] = (32, 32)
    """Grid (H, W) of one frame."""
    patch_size: int = bounded(4, ge=1)
    """Side p of the square patches; H and W must be multiples of it. Tokens T = (H/p)(W/p)."""
    in_vars: int = bounded(2, ge=1)
    """Variables V per frame: the two SQG boundary levels."""
    embed_dim: int = bounded(64, ge=1)
    """Token width D."""
    num_layers: int = bounded(2, ge=1)
    """Transformer blocks L."""
    num_heads: int = bounded(4, ge=1)
    """Attention heads (also of the variable aggregation); must divide embed_dim."""
    mlp_ratio: int = bounded(4, ge=1)
    """MLP hidden width as a multiple of embed_dim."""
    dropout: float = bounded(0.0, ge=0, lt=1)
    """Dropout on the MLP hidden features and on both residual branches of every block."""
    attention_dropout: float = bounded(0.0, ge=0, lt=1)
    """Dropout on the attention probabilities."""
    attention_backend: Literal["sdpa", "flash", "math"] = "sdpa"
    """sdpa: torch scaled_dot_product_attention (flash/cuDNN/memory-efficient kernels on GPU);
    flash: the flash-attn package (bf16/fp16, GPU); math: explicit softmax(q k^T) v, the reference."""
    checkpoint_every: int = bounded(0, ge=0)
    """Activation checkpointing: recompute every k-th block (blocks 0, k, 2k, ...) in backward;
    1 = every block, 0 = off."""

    def __post_init__(self) -> None:
        check_attention_backend(self.attention_backend)
        self.image_size = tuple(self.image_size)
        check_bounds(self, "model")  # the divisibility checks below need positive sizes
        problems = []
        if len(self.image_size) != 2 or any(s % self.patch_size for s in self.image_size):
            problems.append(f"image_size={list(self.image_size)} must be two multiples of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.embed_dim % 4:
            problems.append(f"embed_dim={self.embed_dim} must be a multiple of 4 (2-D sin-cos position embedding)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row, (H/p, W/p)."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_ratio * self.embed_dim

    def check_layout(self, dims: ParallelDims) -> None:
        """Raise ValueError naming every size that cannot be split over the (tp, dp, pp) grid ``dims``."""
        dims.check_model(num_heads=self.num_heads, hidden_size=self.embed_dim, ffn_hidden_size=self.mlp_hidden,
                         num_layers=self.num_layers, num_tokens=self.num_tokens)


def load_vit_config(path: str | Path, overrides: Sequence[str] = ()) -> ViTConfig:
    """The ``model:`` section of a YAML file plus dotted ``model.key=value`` overrides.

    Other top-level sections (training, data, ...) are left to their own loaders.
    """
    wrong = [item for item in overrides if not item.startswith("model.") or "=" not in item]
    if wrong:
        raise ConfigError(f"model overrides must have the form model.key=value, got {wrong}")
    section = load_mapping(path, overrides).get("model")
    if section is None:
        raise ConfigError(f"config file {path} has no 'model' section")
    return build(ViTConfig, section, "model")
