"""Dropout randomness that knows about tensor parallelism (after Megatron-LM tensor_parallel/random.py).

Two kinds of stream:

* the *shared* stream is torch's default generator (CPU and CUDA), seeded alike on every rank
  of a TP group with :func:`shared_seed`. Dropout on an activation that every TP rank holds in
  full must draw the same mask on every rank, or the replicas drift apart;
* a *per-rank* stream, entered with :func:`tensor_parallel_rng`, for activations split across
  the TP group (attention heads, MLP columns, or tokens under sequence parallelism): each rank
  must draw a different mask, or the slices of one layer share their dropout pattern.

Unlike Megatron's tracker there is no stored per-rank state: the per-rank seed is drawn from
the shared stream and offset by the TP rank. ``torch.utils.checkpoint`` restores the default
generators before recomputing a block, so the recomputation draws the same seed and therefore
the same masks as the first forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megavit.parallel.mappings import ProcessGroup, group_rank, group_size
from megavit.parallel.topology import ParallelDims

_REPLICA_STRIDE = 1_000_003  # seeds of different (dp, pp) replicas lie far apart
_RANK_STRIDE = 2_718_281  # offset between the per-rank streams of one TP group


def shared_seed(seed: int, dims: ParallelDims, rank: int) -> int:
    """Seed for the default generators of ``rank``: equal across its TP group, distinct across DP and PP."""
    replica = rank // dims.tp  # TP is innermost: ranks of one TP group share rank // tp
    return seed + _REPLICA_STRIDE * replica


@contextlib.contextmanager
def tensor_parallel_rng(group: ProcessGroup | None, device: torch.device) -> Iterator[None]:
    """Run the body on this TP rank's own stream; restore the shared stream afterwards.

    A group of one has a single stream, so the body then runs on the shared stream itself.
    """
    if group_size(group) == 1:
        yield
        return
    seed = int(torch.randint(2**62, (1,))) + _RANK_STRIDE * group_rank(group)  # CPU draw: no device sync
    cuda = device.type == "cuda"
    index = device.index if device.index is not None else torch.cuda.current_device() if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


class ParallelDropout(nn.Module):
    """Dropout on the shared stream for replicated activations, on the per-rank stream for split ones.

    Args:
        p: drop probability.
        group: the TP group.
        split: the activation is split across ``group`` (heads, columns or token shards).
    """

    def __init__(self, p: float, *, group: ProcessGroup | None = None, split: bool) -> None:
        super().__init__()
        self.p, self.group, self.split = p, group, split

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if not self.split:
            return F.dropout(x, self.p, training=True)
        with tensor_parallel_rng(self.group, x.device):
            return F.dropout(x, self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}, split={self.split}"
