"""How DeepSpeed's ZeRO-1/2 and BF16 optimizers keep one rank's optimizer state, and the inverse.

Each model-parallel rank (a pipeline stage's TP shard) flattens its parameters, in module order,
into one fp32 buffer, zero-padded at the end to a multiple of ``2 * dp`` (DeepSpeed's
``nccl_start_alignment_factor`` times the DP size), and DP rank d owns the d-th of ``dp`` equal
slices: its fp32 master weights and the Adam moments of that slice. The files record each
parameter's fragment in the slice (``param_slice_mappings``) and the padding (on the last DP
rank only). ZeRO saves the last master-weight slice without its padding; the BF16 optimizer
saves it whole.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

ALIGNMENT_FACTOR = 2  # DeepSpeed's nccl_start_alignment_factor


def partition_size(total: int, dp: int) -> int:
    """Elements per DP slice of a flat buffer holding ``total`` elements."""
    alignment = ALIGNMENT_FACTOR * dp
    return -(-total // alignment) * alignment // dp


def split_flat(tensors: Sequence[Tensor], dp: int) -> list[Tensor]:
    """The ``dp`` padded slices of the flat fp32 concatenation of ``tensors``."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    size = partition_size(flat.numel(), dp)
    padded = torch.zeros(size * dp, dtype=torch.float32)
    padded[:flat.numel()] = flat
    return [slice_.clone() for slice_ in padded.split(size)]


def padding(total: int, dp: int, dp_rank: int) -> int:
    """The padding elements DP rank ``dp_rank`` holds (all of it sits on the last rank)."""
    return partition_size(total, dp) * dp - total if dp_rank == dp - 1 else 0


def join_flat(slices: Sequence[Tensor], shapes: Sequence[torch.Size]) -> list[Tensor]:
    """The tensors of ``shapes`` from a flat buffer's DP slices (padded or not), in order."""
    flat = torch.cat([s.reshape(-1) for s in slices])
    total = sum(shape.numel() for shape in shapes)
    if flat.numel() < total:
        raise ValueError(f"the optimizer slices hold {flat.numel()} elements, the parameters need {total}")
    return [chunk.reshape(shape).clone() for chunk, shape in zip(flat[:total].split([s.numel() for s in shapes]),
                                                                  shapes, strict=True)]


def slice_mappings(names: Sequence[str], numels: Sequence[int], dp: int, dp_rank: int) -> OrderedDict:
    """``param_slice_mappings`` of one DP slice: name -> fragment (numel, start in the slice)."""
    from deepspeed.utils.tensor_fragment import fragment_address

    size = partition_size(sum(numels), dp)
    low, high = dp_rank * size, (dp_rank + 1) * size
    mappings, offset = OrderedDict(), 0
    for name, numel in zip(names, numels, strict=True):
        start, stop = max(offset, low), min(offset + numel, high)
        if start < stop:
            mappings[name] = fragment_address(numel=stop - start, start=start - low)
        offset += numel
    return mappings
