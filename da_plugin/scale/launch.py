"""Where this process sits in a multi-rank job, and joining the job's torch.distributed group.

torchrun, mpiexec and srun describe a rank differently: torchrun sets RANK and WORLD_SIZE,
mpiexec is asked through mpi4py (rank 0 then broadcasts a rendezvous address), srun sets
SLURM_PROCID and SLURM_NTASKS (MASTER_ADDR exported by the batch script). Whatever the
launcher, torch.distributed then does every tensor collective: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist


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


def local_device(choice: Literal["auto", "cpu", "cuda"], launch: Launch) -> torch.device:
    """The device of this rank: its node-local GPU (``auto`` when CUDA is visible, or ``cuda``), else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible to this rank")
    index = launch.local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
