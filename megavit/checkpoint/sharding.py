"""How each ViT parameter is split over tensor-parallel ranks, and merging or splitting it.

The parallel layers tag their parameters (``tensor_model_parallel``, ``partition_dim``), so the
rule is read from a model built on the meta device rather than guessed from names: column
layers split dim 0 of the weight and the bias, row layers dim 1 of the weight; everything else
is replicated. The fused QKV weight is laid out per head (``[heads, 3, head_dim]`` rows), so a
split along dim 0 hands each rank whole heads with their q, k and v together, and merging is a
plain concatenation.

Parameter names are those of :class:`megavit.model.vit.ViT`: ``layers.<i>.<name in layer i>``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megavit.model.config import ViTConfig
from megavit.model.vit import ViT


def partition_dims(config: ViTConfig) -> dict[str, int | None]:
    """Parameter name -> the dim it is split along over TP ranks (``None``: replicated)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # ViT reseeds the global generator
        model = ViT(config)
    return {name: param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
            for name, param in model.named_parameters()}


def parameter_shapes(config: ViTConfig) -> dict[str, torch.Size]:
    """Parameter name -> full (unsharded) shape, in the model's parameter order."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return {name: param.shape for name, param in ViT(config).named_parameters()}


def layer_of(name: str) -> int:
    """The layer index of a parameter name ``layers.<i>.*``."""
    return int(name.split(".", 2)[1])


def merge(shards: list[Tensor], dim: int | None, name: str) -> Tensor:
    """The full tensor from its TP shards (rank order); replicated shards must agree exactly."""
    if dim is not None:
        return torch.cat(shards, dim)
    for rank, shard in enumerate(shards[1:], 1):
        if not torch.equal(shard, shards[0]):
            raise ValueError(f"{name} is replicated over tensor-parallel ranks but differs between ranks 0 and {rank}")
    return shards[0]


def split(full: Tensor, dim: int | None, tp: int, rank: int, name: str) -> Tensor:
    """TP rank ``rank``'s shard of ``full`` (a contiguous copy; the tensor itself when replicated)."""
    if dim is None:
        return full
    if full.shape[dim] % tp:
        raise ValueError(f"{name}: dim {dim} of size {full.shape[dim]} cannot be split over tp={tp}")
    return full.chunk(tp, dim)[rank].clone()
