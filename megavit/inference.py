"""Forecasting with a trained ViT in one process: load any checkpoint, step physical frames forward.

    surrogate = load_surrogate("runs/vit_tiny/consolidated")            # or a checkpoint dir / tag
    next_frames = surrogate.step(frames)                                 # [..., V, H, W] in K
    trajectory = surrogate.rollout(frames, steps=4)                      # [steps, ..., V, H, W]

The model maps a normalized frame to the normalized frame one trained lead time later; the
:class:`Surrogate` applies the training data's per-level normalization on the way in and undoes
it on the way out, and batches over any leading (for example ensemble) dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from megavit.checkpoint.convert import read_weights
from megavit.checkpoint.deepspeed_files import CheckpointError
from megavit.config import build
from megavit.model.config import ViTConfig
from megavit.model.vit import ViT


@dataclass
class Surrogate:
    """A single-process ViT with the normalization and lead time it was trained with."""

    model: ViT
    mean: Tensor
    """Per-variable mean ``[V]`` subtracted before the model (zeros for synthetic training data)."""
    std: Tensor
    """Per-variable std ``[V]`` divided by before the model (ones for synthetic training data)."""
    lead_hours: float
    """Model time one step advances."""

    @property
    def config(self) -> ViTConfig:
        return self.model.config

    @torch.no_grad()
    def step(self, frames: Tensor) -> Tensor:
        """Frames ``[..., V, H, W]`` in physical units -> the frames one lead time later (same shape, dtype)."""
        shape = tuple(frames.shape)
        expected = (self.config.in_vars, *self.config.image_size)
        if shape[-3:] != expected:
            raise ValueError(f"frames have trailing shape {list(shape[-3:])}, the model expects {list(expected)}")
        parameter = next(self.model.parameters())
        scale = (slice(None), None, None)
        x = frames.reshape(-1, *expected).to(parameter.device, torch.float32)
        x = ((x - self.mean[scale]) / self.std[scale]).to(parameter.dtype)
        lead = torch.full((x.shape[0],), self.lead_hours, device=x.device, dtype=parameter.dtype)
        y = self.model(x, lead).float() * self.std[scale] + self.mean[scale]
        return y.reshape(shape).to(frames.device, frames.dtype)

    def rollout(self, frames: Tensor, steps: int) -> Tensor:
        """Autoregressive forecast: ``[steps, ..., V, H, W]``, entry k at (k + 1) lead times."""
        out = []
        for _ in range(steps):
            frames = self.step(frames)
            out.append(frames)
        return torch.stack(out)


def load_surrogate(path: str | Path, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> Surrogate:
    """A :class:`Surrogate` from a consolidated directory or a checkpoint of any (tp, pp, dp) layout."""
    weights, metadata = read_weights(path)
    config = build(ViTConfig, metadata["model"], "model")
    with torch.random.fork_rng(devices=[]):  # the initial weights are replaced by the file's
        model = ViT(config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit the model config stored with them: "
                              f"{' '.join(str(err).split())}") from None
    model = model.to(device=device, dtype=dtype).eval()
    data = metadata.get("data") or {}
    norm = data.get("normalization")
    variables = config.in_vars
    mean = torch.tensor(norm["mean"] if norm else [0.0] * variables, dtype=torch.float32, device=device)
    std = torch.tensor(norm["std"] if norm else [1.0] * variables, dtype=torch.float32, device=device)
    return Surrogate(model=model, mean=mean, std=std, lead_hours=float(data.get("lead_hours", 12.0)))
