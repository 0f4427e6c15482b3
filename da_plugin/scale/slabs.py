"""Domain decomposition of a periodic 1-D state (Lorenz-96) over ranks, and what a rank does with its slab.

The state's d variables are split into contiguous slabs, one per rank of a
``torch.distributed`` group (NCCL on GPU, gloo on CPU); ranks hold any number of ensemble
members for their slab. The L96 tendency at k needs x_{k-2}, x_{k-1} and x_{k+1}, so every
RK4 stage first exchanges a halo of 2 variables from the left neighbour and 1 from the right,
then applies :func:`da_plugin.models.lorenz96.haloed_tendency`. The EnSF analysis is local to
each slab except for the mixture score's N x N distance products, which are all-reduced; its
noise comes from the counter-based generator keyed by global variable index, so a slab draws
exactly the numbers the single-process run draws for those variables, whatever the number of
ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from da_plugin.counter_rng import CounterDraws
from da_plugin.filters.ensf import EnSF
from da_plugin.models.integrate import rk4
from da_plugin.models.lorenz96 import HALO_LEFT, HALO_RIGHT, haloed_tendency
from da_plugin.obs import ObservationOperator


@dataclass(frozen=True)
class Slab:
    """The contiguous block [start, stop) of a ``dim``-variable state owned by ``rank`` of ``world``."""

    dim: int
    rank: int
    world: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside a world of {self.world}")
        if self.dim // self.world < HALO_LEFT:
            raise ValueError(f"dim {self.dim} over {self.world} ranks leaves slabs of fewer than {HALO_LEFT} "
                             "variables; use fewer ranks")

    @property
    def start(self) -> int:
        base, extra = divmod(self.dim, self.world)
        return self.rank * base + min(self.rank, extra)

    @property
    def stop(self) -> int:
        base, extra = divmod(self.dim, self.world)
        return self.start + base + (self.rank < extra)

    @property
    def size(self) -> int:
        return self.stop - self.start


def exchange_halo(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``x`` (``[..., n]``, this rank's slab) with 2 periodic neighbours prepended and 1 appended."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        return torch.cat([x[..., -HALO_LEFT:], x, x[..., :HALO_RIGHT]], dim=-1)
    rank = dist.get_rank(group)
    left = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    right = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    from_left = torch.empty_like(x[..., :HALO_LEFT])
    from_right = torch.empty_like(x[..., :HALO_RIGHT])
    requests = [
        # my tail is my right neighbour's left halo (tag 1), my head my left neighbour's right halo (tag 2);
        # the tags keep the two messages apart when both neighbours are the same rank
        dist.isend(x[..., -HALO_LEFT:].contiguous(), right, group=group, tag=1),
        dist.isend(x[..., :HALO_RIGHT].contiguous(), left, group=group, tag=2),
        dist.irecv(from_left, left, group=group, tag=1),
        dist.irecv(from_right, right, group=group, tag=2),
    ]
    for request in requests:
        request.wait()
    return torch.cat([from_left, x, from_right], dim=-1)


def rk4_step(x: torch.Tensor, forcing: float, dt: float, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """One Lorenz-96 RK4 step of this rank's slab ``[..., n]``: a halo exchange per stage."""
    return rk4(lambda state: haloed_tendency(exchange_halo(state, group), forcing), x, dt)


def sum_over_ranks(partial_sum: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Complete a sum over state variables from each rank's share (in place)."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(partial_sum, group=group)
    return partial_sum


def slab_analysis(ensf: EnSF, forecast: torch.Tensor, y: torch.Tensor, obs: ObservationOperator, slab: Slab,
                  seed: int, cycle: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """EnSF analysis of this rank's slab ``[N, slab.size]`` of the forecast.

    ``obs`` and ``y`` are this slab's share of the observations (``full_obs.restrict(slab.start,
    slab.stop)`` and the matching entries of y), so no rank ever holds the global vectors.
    ``cycle`` picks the noise streams: any rank count gives the numbers of a single-process
    run with the same seed.
    """
    draws = CounterDraws(seed, first_draw=cycle * ensf.noise_draws, col_offset=slab.start, dim=slab.dim)
    return ensf.analysis(forecast, y, obs, draws, partial(sum_over_ranks, group=group))
