"""The trained ViT surrogate of SQG as a forecast model for ``da-cycle`` (``model.name: vit``).

A thin adapter over :func:`megavit.inference.load_surrogate`: states are SQG frames
``[..., 2, N, N]`` in K, as for :class:`da_plugin.models.sqg.SQG`; one model step is one trained
lead time (``dt = lead_hours`` in seconds), so an analysis interval of 12 h with a 12-h surrogate
is one step, rolled out autoregressively when the interval is several lead times. Members are
forecast in batches of ``batch_size`` frames, on the state's device, in the network precision
``precision`` (the state itself keeps its dtype).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from megavit.config import bounded, check_bounds
from megavit.inference import Surrogate, load_surrogate

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HOUR = 3600.0  # seconds


@dataclass
class ViTSurrogate:
    """A ViT checkpoint (consolidated directory, or a training checkpoint of any layout) forecasting SQG frames."""

    checkpoint: str = "runs/vit_tiny/consolidated"  # consolidated directory or checkpoint dir/tag
    precision: Literal["float32", "bfloat16"] = "float32"  # network weights and activations
    batch_size: int = bounded(64, ge=1)  # frames per forward pass (bounds activation memory)

    def __post_init__(self) -> None:
        check_bounds(self, "model")
        if not Path(self.checkpoint).exists():
            raise ValueError(f"model.checkpoint: no checkpoint at {self.checkpoint} (train one with "
                             "launch/train_vit.sh and convert it with tools/convert_checkpoint.py)")
        # loaded once on the CPU; moved to the state's device at the first forecast there
        self._surrogate = load_surrogate(self.checkpoint, device="cpu", dtype=PRECISIONS[self.precision])

    @property
    def lead_hours(self) -> float:
        """Model time one step advances, in hours (as trained)."""
        return self._surrogate.lead_hours

    @property
    def dt(self) -> float:
        """Model time one step advances, in seconds (the unit of SQG's ``dt``)."""
        return self.lead_hours * HOUR

    @property
    def state_shape(self) -> tuple[int, ...]:
        config = self._surrogate.config
        return (config.in_vars, *config.image_size)

    def step(self, x: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """Advance frames ``x`` (``[..., V, H, W]``, K) by ``steps`` lead times, in x's dtype and device."""
        if tuple(x.shape[-3:]) != self.state_shape:
            raise ValueError(f"ViT state must have shape [..., {', '.join(map(str, self.state_shape))}] "
                             f"(levels, y, x), found {list(x.shape)}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        surrogate = self._on(x.device)
        frames = x.reshape(-1, *self.state_shape)
        for _ in range(steps):
            frames = torch.cat([surrogate.step(chunk) for chunk in frames.split(self.batch_size)])
        return frames.reshape(x.shape)

    def _on(self, device: torch.device) -> Surrogate:
        """The surrogate with its weights and normalization on ``device`` (moved once, then kept there)."""
        if next(self._surrogate.model.parameters()).device != device:
            current = self._surrogate
            self._surrogate = replace(current, model=current.model.to(device), mean=current.mean.to(device),
                                      std=current.std.to(device))
        return self._surrogate
