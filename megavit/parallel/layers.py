"""Column- and row-parallel linear layers (after Megatron-LM tensor_parallel/layers.py).

Parameters carry attributes that the rest of the stack reads instead of guessing from names:

* ``tensor_model_parallel = True`` and ``partition_dim``: the parameter is this rank's slice
  along ``partition_dim`` of the full tensor (DeepSpeed counts such parameters on every TP rank
  in gradient norms, replicated ones only on TP rank 0);
* ``sequence_parallel = True``: the parameter is replicated across TP but, under sequence
  parallelism, only sees this rank's tokens, so its gradient is a partial sum that
  the hooks of :func:`sequence_parallel_grad_hooks` complete.

Full weights are drawn from the global RNG and sliced, so a layer built from one seed holds the
same numbers at every TP size (every TP rank must be seeded alike).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from megavit.parallel.mappings import (
    ProcessGroup,
    all_gather_to_tensor_parallel_region,
    copy_to_tensor_parallel_region,
    group_rank,
    group_size,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

INIT_STD = 0.02  # ViT/ClimaX truncated-normal init of linear weights


def divide(value: int, parts: int, name: str) -> int:
    """``value / parts``, or a ValueError naming ``name`` when it does not divide."""
    if value % parts:
        raise ValueError(f"{name}={value} is not divisible by the tensor-parallel size {parts}")
    return value // parts


def init_linear_weight(out_features: int, in_features: int) -> Tensor:
    """A full ``[out, in]`` weight from the global RNG: truncated normal, std 0.02."""
    weight = torch.empty(out_features, in_features)
    return nn.init.trunc_normal_(weight, std=INIT_STD)


def mark_sequence_parallel(module: nn.Module) -> None:
    """Tag every parameter of ``module`` as replicated but fed only this rank's tokens under SP."""
    for param in module.parameters():
        param.sequence_parallel = True


def _shard(full: Tensor, dim: int, group: ProcessGroup | None) -> nn.Parameter:
    shard = nn.Parameter(full.chunk(group_size(group), dim)[group_rank(group)].clone())
    shard.tensor_model_parallel = True
    shard.partition_dim = dim
    return shard


class ColumnParallelLinear(nn.Module):
    """Y = X A + b with A split by columns, A = [A_1, ..., A_p] (and b alike): rank i computes Y_i = X A_i + b_i.

    Args:
        in_features, out_features: sizes of the full layer; ``out_features`` must divide by the TP size.
        group: the TP group (``None``: no tensor parallelism).
        sequence_parallel: the input arrives split by tokens, ``[B, T/p, in]``, and is all-gathered
            (backward: reduce-scatter); otherwise it is replicated ``[B, T, in]`` and copied (backward:
            all-reduce).
        bias: add a bias (split like the columns).

    Output: ``[B, T, out/p]``, this rank's columns.
    """

    def __init__(self, in_features: int, out_features: int, *, group: ProcessGroup | None = None,
                 sequence_parallel: bool = False, bias: bool = True) -> None:
        super().__init__()
        divide(out_features, group_size(group), "out_features")
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.weight = _shard(init_linear_weight(out_features, in_features), 0, group)
        self.bias = _shard(torch.zeros(out_features), 0, group) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.sequence_parallel:
            x = all_gather_to_tensor_parallel_region(x, self.group)
        else:
            x = copy_to_tensor_parallel_region(x, self.group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Y = X A + b with A split by rows, A = [A_1; ...; A_p] and X by columns: Y = sum_i X_i A_i + b.

    Args:
        in_features, out_features: sizes of the full layer; ``in_features`` must divide by the TP size.
        group: the TP group (``None``: no tensor parallelism).
        sequence_parallel: reduce-scatter the partial sums to token shards ``[B, T/p, out]``
            (backward: all-gather); otherwise all-reduce to a replicated ``[B, T, out]``.
        bias: add a bias (replicated; added once, after the reduction). Under sequence
            parallelism it is tagged ``sequence_parallel``.

    Input: ``[B, T, in/p]``, this rank's slice of the features (a column layer's output).
    """

    def __init__(self, in_features: int, out_features: int, *, group: ProcessGroup | None = None,
                 sequence_parallel: bool = False, bias: bool = True) -> None:
        super().__init__()
        divide(in_features, group_size(group), "in_features")
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.weight = _shard(init_linear_weight(out_features, in_features), 1, group)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if bias and sequence_parallel:
            self.bias.sequence_parallel = True

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = reduce_from_tensor_parallel_region(y, self.group)
        return y if self.bias is None else y + self.bias


def sequence_parallel_grad_hooks(model: nn.Module, group: ProcessGroup | None) -> None:
    """Sum the gradients of ``sequence_parallel`` parameters over the TP group as backward makes them.

    Under sequence parallelism LayerNorms and row-layer biases see only this rank's tokens, so
    each rank computes a partial gradient. The sum happens in a hook, not after backward,
    because DeepSpeed (ZeRO, the pipeline engine) reduces and partitions gradients inside backward.
    """
    if group_size(group) == 1:
        return

    def summed(grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    for param in model.parameters():
        if getattr(param, "sequence_parallel", False):
            param.register_hook(summed)
