"""The SQG ViT as a DeepSpeed ``PipelineModule``: the layers of :func:`megavit.model.vit.layer_specs`,
each built only on the stage that owns it.

Layer i is built right after seeding torch with ``seed + i`` (DeepSpeed's ``seed_layers``), as
:class:`megavit.model.vit.ViT` does, so every (tp, pp) layout starts from the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from megavit.model.config import ViTConfig
from megavit.model.vit import layer_specs, mse_loss
from megavit.parallel.mpu import deepspeed_topology
from megavit.parallel.topology import ParallelDims


def build_pipeline(config: ViTConfig, dims: ParallelDims, *, group: ProcessGroup | None, seed: int,
                   partition_method: Literal["parameters", "uniform"] = "parameters",
                   loss_fn: Callable[[Tensor, Tensor], Tensor] = mse_loss) -> nn.Module:
    """A DeepSpeed ``PipelineModule`` over ``dims.pp`` stages with our (pp, dp, tp) rank layout."""
    from deepspeed.pipe import LayerSpec, PipelineModule  # deepspeed is slow to import

    config.check_layout(dims)
    specs = [LayerSpec(spec.func, *spec.args, **spec.keywords)
             for spec in layer_specs(config, group=group, sequence_parallel=dims.sp_enabled)]
    return PipelineModule(layers=specs, topology=deepspeed_topology(dims), loss_fn=loss_fn,
                          partition_method=partition_method, seed_layers=True, base_seed=seed, seed_fn=_seed_torch,
                          activation_checkpoint_interval=0)


def _seed_torch(seed) -> None:
    # DeepSpeed's default seeds Python's random with a NumPy integer on later stages, which it rejects
    torch.manual_seed(int(seed))
