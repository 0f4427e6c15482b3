"""Tensor- and sequence-parallel communication as dual autograd functions (after Megatron-LM mappings.py).

Every function takes the tensor-parallel (TP) group explicitly. ``group=None`` means no tensor
parallelism: a group of one, for which every collective returns its input unchanged, so the
same layers run on a single GPU without ``torch.distributed``. (Note: unlike torch.distributed,
where ``None`` means the world group.)

Activations are ``[B, T, D]``: the *feature* dimension is the last one, the *token* dimension is 1.

=========================================  ==========================  ==========================
function                                   forward                     backward
=========================================  ==========================  ==========================
copy_to_tensor_parallel_region             identity                    all-reduce
reduce_from_tensor_parallel_region         all-reduce                  identity
scatter_to_tensor_parallel_region          split features              all-gather features
gather_from_tensor_parallel_region         all-gather features         split features
scatter_to_sequence_parallel_region        split tokens                all-gather tokens
gather_from_sequence_parallel_region       all-gather tokens           split tokens
all_gather_to_tensor_parallel_region       all-gather tokens           reduce-scatter tokens
reduce_scatter_to_sequence_parallel_region reduce-scatter tokens       all-gather tokens
=========================================  ==========================  ==========================

The first two bracket a TP region whose input every rank holds in full; the last two bracket
it under sequence parallelism, where the input arrives split by tokens. The split/gather pairs
move between replicated and split layouts where the other side is replicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = dist.ProcessGroup
FEATURE_DIM = -1
TOKEN_DIM = 1


def group_size(group: ProcessGroup | None) -> int:
    """Number of ranks in ``group`` (1 for ``None``)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    """This rank's index in ``group`` (0 for ``None``)."""
    return 0 if group is None else dist.get_rank(group)


def _chunks(x: Tensor, dim: int, group: ProcessGroup) -> tuple[Tensor, ...]:
    size = group_size(group)
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} cannot be split over {size} ranks")
    return x.chunk(size, dim)


def _all_reduce(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Sum over the group, into a new tensor (never modifies ``x``, which autograd may have saved)."""
    if group_size(group) == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _split(x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
    """This rank's chunk of ``x`` along ``dim``."""
    if group_size(group) == 1:
        return x
    return _chunks(x, dim, group)[group_rank(group)].contiguous()


def _all_gather(x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
    """Concatenation along ``dim`` of every rank's ``x``."""
    size = group_size(group)
    if size == 1:
        return x
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim)


def _reduce_scatter(x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
    """This rank's chunk along ``dim`` of the sum of every rank's ``x``."""
    if group_size(group) == 1:
        return x
    parts = [part.contiguous() for part in _chunks(x, dim, group)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup | None) -> Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup | None) -> Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _split(grad, ctx.dim, ctx.group), None, None


class _GatherReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _all_gather(grad, ctx.dim, ctx.group), None, None


def copy_to_tensor_parallel_region(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Enter a TP region with a replicated input: forward identity, backward all-reduce of the partial grads."""
    return _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Leave a TP region by summing partial results: forward all-reduce, backward identity."""
    return _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Keep this rank's slice of the features ``[..., D] -> [..., D/tp]``; backward all-gathers."""
    return _Split.apply(x, FEATURE_DIM, group)


def gather_from_tensor_parallel_region(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Concatenate feature slices ``[..., D/tp] -> [..., D]``; backward keeps this rank's slice."""
    return _Gather.apply(x, FEATURE_DIM, group)


def scatter_to_sequence_parallel_region(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Keep this rank's tokens of a replicated ``[B, T, D] -> [B, T/tp, D]``; backward all-gathers."""
    return _Split.apply(x, TOKEN_DIM, group)


def gather_from_sequence_parallel_region(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """All-gather tokens ``[B, T/tp, D] -> [B, T, D]`` for replicated use; backward keeps this rank's tokens."""
    return _Gather.apply(x, TOKEN_DIM, group)


def all_gather_to_tensor_parallel_region(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Enter a TP region from token shards ``[B, T/tp, D] -> [B, T, D]``; backward reduce-scatters the partial grads."""
    return _GatherReduceScatter.apply(x, TOKEN_DIM, group)


def reduce_scatter_to_sequence_parallel_region(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Leave a TP region into token shards: sum partial results and keep this rank's tokens; backward all-gathers."""
    return _ReduceScatterGather.apply(x, TOKEN_DIM, group)
