"""Domain decomposition of a periodic 1-D state (Lorenz-96) over ranks.

The state's d variables are split into contiguous slabs, one per rank of a
``torch.distributed`` group (NCCL on GPU, gloo on CPU); ranks hold any number of ensemble
members for their slab. The L96 tendency at k needs x_{k-2}, x_{k-1} and x_{k+1}, so every
RK4 stage first exchanges a halo of 2 variables from the left neighbour and 1 from the right.
The EnSF analysis is local to each slab except for the mixture score's N x N distance
products, which are all-reduced.

Random numbers come from a counter-based generator keyed by (seed, stream, row, global
variable index), so a slab draws exactly the numbers the single-process run draws for those
variables, whatever the number of ranks.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from da_plugin.counter_rng import counter_normal_pair
from da_plugin.filters.ensf import EnSF
from da_plugin.filters.ensf_fused import fused_reverse_sde
from da_plugin.models.integrate import rk4
from da_plugin.obs import ObservationOperator

HALO_LEFT, HALO_RIGHT = 2, 1  # neighbours the Lorenz-96 tendency reads on each side


@dataclass(frozen=True)
class Launch:
    """This process's place in the job, as its launcher describes it."""

    rank: int
    world: int
    local_rank: int
    launcher: str  # torchrun | mpiexec | srun | single


def detect_launch() -> Launch:
    """Rank and world size from torchrun (RANK), mpiexec (mpi4py) or srun (SLURM_PROCID) variables."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if any(name in env for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        return Launch(comm.Get_rank(), comm.Get_size(), local, "mpiexec")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "srun")
    return Launch(0, 1, 0, "single")


def _rendezvous_address(launch: Launch) -> str:
    """tcp://host:port of rank 0: from MASTER_ADDR/MASTER_PORT, or under mpiexec broadcast by rank 0."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if launch.launcher == "mpiexec" and (host is None or port is None):
        from mpi4py import MPI

        if launch.rank == 0:
            with socket.socket() as probe:
                probe.bind(("", 0))
                free_port = probe.getsockname()[1]
            host, port = socket.gethostname(), str(free_port)
        host, port = MPI.COMM_WORLD.bcast((host, port), root=0)
    if host is None:
        raise ValueError(f"{launch.launcher} started {launch.world} ranks but MASTER_ADDR is not set; "
                           "export MASTER_ADDR (rank 0's host) and MASTER_PORT")
    return f"tcp://{host}:{port or 29500}"


def init_distributed(launch: Launch, backend: str, timeout_s: float) -> None:
    """Join the job's torch.distributed group (tensor collectives); a peer silent for
    ``timeout_s`` seconds makes every collective raise instead of hanging."""
    if launch.world == 1 or dist.is_initialized():
        return
    dist.init_process_group(backend, init_method=_rendezvous_address(launch), rank=launch.rank,
                            world_size=launch.world, timeout=timedelta(seconds=timeout_s))


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


def local_tendency(x: torch.Tensor, forcing: float, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Lorenz-96 dx/dt on this rank's slab ``[..., n]``, reading neighbours through the halo."""
    h = exchange_halo(x, group)
    n = x.shape[-1]
    xm2, xm1, xp1 = h[..., 0:n], h[..., 1:n + 1], h[..., 3:n + 3]
    return (xp1 - xm2) * xm1 - x + forcing


def rk4_step(x: torch.Tensor, forcing: float, dt: float, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """One RK4 step of the decomposed state: a halo exchange per stage."""
    return rk4(lambda state: local_tendency(state, forcing, group), x, dt)


def ensf_analysis(ensf: EnSF, forecast: torch.Tensor, y: torch.Tensor, obs: ObservationOperator, slab: Slab,
                  seed: int, cycle: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """EnSF analysis of this rank's slab ``[N, slab.size]`` of the forecast.

    ``obs`` and ``y`` are this slab's share of the observations (``full_obs.restrict(slab.start,
    slab.stop)`` and the matching entries of y), so no rank ever holds the global vectors.
    ``cycle`` picks the noise streams: any rank count gives the numbers of a single-process
    run with the same seed.
    """
    members = forecast.shape[0]
    first_draw = cycle * ensf.noise_draws  # even: draws 2p and 2p + 1 share a hash
    pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def noise(draw: int) -> torch.Tensor:
        pair, odd = divmod(first_draw + draw, 2)
        if pair not in pairs:  # the reverse SDE asks for draws in order: keep only the current pair
            pairs.clear()
            pairs[pair] = counter_normal_pair(seed, pair, members, slab.start, slab.stop, slab.dim, forecast.dtype,
                                              forecast.device)
        return pairs[pair][odd]

    def sum_over_ranks(partial: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(partial, group=group)
        return partial

    if ensf.uses_fused_kernel(forecast, obs):
        return fused_reverse_sde(ensf, forecast, y, obs, seed, first_draw, col_offset=slab.start, dim=slab.dim,
                                 sum_over_state=sum_over_ranks)
    return ensf.reverse_sde(forecast, y, obs, noise, sum_over_ranks)
