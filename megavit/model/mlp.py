"""Transformer MLP with the hidden features split across the TP group (column then row layer)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from megavit.parallel import ColumnParallelLinear, ParallelDropout, RowParallelLinear
from megavit.parallel.mappings import ProcessGroup


class ParallelMLP(nn.Module):
    """fc1 (column-parallel, D -> F/tp) -> GELU -> dropout -> fc2 (row-parallel, F/tp -> D).

    The hidden features are split across ranks, so their dropout uses the per-rank stream.
    x: ``[B, T, D]`` (``[B, T/tp, D]`` under sequence parallelism) -> same shape.
    """

    def __init__(self, dim: int, hidden: int, *, group: ProcessGroup | None = None,
                 sequence_parallel: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(dim, hidden, group=group, sequence_parallel=sequence_parallel)
        self.drop = ParallelDropout(dropout, group=group, split=True)
        self.fc2 = RowParallelLinear(hidden, dim, group=group, sequence_parallel=sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x))))
