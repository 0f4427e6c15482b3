"""The SQG ViT as DeepSpeed pipeline layer specs, and the same chain built whole for one stage.

The ViT is a plain chain (``ViT.stages``): embedding ``(frames, lead_time) -> tokens``, L blocks
``tokens -> tokens``, head ``tokens -> frames``. Each is recorded as a ``LayerSpec`` so that a
pipeline stage builds only its own layers. Layer i is built right after seeding torch with
``seed + i`` (DeepSpeed's ``seed_layers``), in :func:`build_pipeline` and :func:`build_chain`
alike, so every (tp, pp) layout starts from the same weights: a pipeline of any depth, or the
whole chain on one stage for ZeRO-2 (which DeepSpeed's pipeline engine does not support).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from megavit.model.vit import Block, ViTConfig, ViTEmbedding, ViTHead, mse_loss
from megavit.parallel.mpu import deepspeed_topology
from megavit.parallel.topology import ParallelDims


def layer_specs(config: ViTConfig, *, group: ProcessGroup | None, sequence_parallel: bool) -> list:
    """Embedding, blocks and head as ``LayerSpec`` (built on the stage that owns them)."""
    from deepspeed.pipe import LayerSpec  # deepspeed is slow to import

    every = config.checkpoint_every
    parallel = dict(group=group, sequence_parallel=sequence_parallel)
    return [LayerSpec(ViTEmbedding, config, **parallel),
            *(LayerSpec(Block, config, **parallel, checkpoint=every > 0 and i % every == 0)
              for i in range(config.num_layers)),
            LayerSpec(ViTHead, config, **parallel)]


def build_pipeline(config: ViTConfig, dims: ParallelDims, *, group: ProcessGroup | None, seed: int,
                   partition_method: Literal["parameters", "uniform"] = "parameters",
                   loss_fn: Callable[[Tensor, Tensor], Tensor] = mse_loss) -> nn.Module:
    """A DeepSpeed ``PipelineModule`` over ``dims.pp`` stages with our (pp, dp, tp) rank layout."""
    from deepspeed.pipe import PipelineModule

    config.check_layout(dims)
    return PipelineModule(layers=layer_specs(config, group=group, sequence_parallel=dims.sp_enabled),
                          topology=deepspeed_topology(dims), loss_fn=loss_fn, partition_method=partition_method,
                          seed_layers=True, base_seed=seed, seed_fn=_seed_torch, activation_checkpoint_interval=0)


def _seed_torch(seed) -> None:
    # DeepSpeed's default seeds Python's random with a NumPy integer on later stages, which it rejects
    torch.manual_seed(int(seed))


class Chain(nn.Module):
    """The whole layer chain on one stage, for the plain (non-pipeline) DeepSpeed engine.

    ``forward(frames, lead_time)`` -> predicted frames, like :class:`megavit.model.vit.ViT`.
    """

    def __init__(self, config: ViTConfig, *, group: ProcessGroup | None, sequence_parallel: bool, seed: int) -> None:
        super().__init__()
        layers = []
        for index, spec in enumerate(layer_specs(config, group=group, sequence_parallel=sequence_parallel)):
            torch.manual_seed(seed + index)
            layers.append(spec.build())
        self.layers = nn.ModuleList(layers)

    def forward(self, frames: Tensor, lead_time: Tensor) -> Tensor:
        x = (frames, lead_time)
        for layer in self.layers:
            x = layer(x)
        return x


def build_chain(config: ViTConfig, dims: ParallelDims, *, group: ProcessGroup | None, seed: int) -> Chain:
    """The same seeded layers as :func:`build_pipeline`, as one module (pp must be 1)."""
    if dims.pp != 1:
        raise ValueError(f"build_chain holds the whole model on one stage, but pp={dims.pp}")
    config.check_layout(dims)
    return Chain(config, group=group, sequence_parallel=dims.sp_enabled, seed=seed)
