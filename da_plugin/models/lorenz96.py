"""Lorenz-96 on batched torch tensors: dx_k/dt = (x_{k+1} - x_{k-2}) x_{k-1} - x_k + F.

Works on any ``[..., d]`` tensor (ensemble, batch of ensembles) with periodic boundaries,
any d >= 4, on CPU or GPU, in the tensor's own dtype; integrated with classical RK4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from da_plugin.models.integrate import rk4

HALO_LEFT, HALO_RIGHT = 2, 1  # neighbours the tendency at k reads: x_{k-2}, x_{k-1} and x_{k+1}


def _tendency(left2: torch.Tensor, left1: torch.Tensor, x: torch.Tensor, right1: torch.Tensor,
              forcing: float) -> torch.Tensor:
    """(x_{k+1} - x_{k-2}) x_{k-1} - x_k + F from the neighbour arrays."""
    return (right1 - left2).mul_(left1).sub_(x).add_(forcing)


def tendency(x: torch.Tensor, forcing: float) -> torch.Tensor:
    """dx/dt for periodic states ``x`` of shape ``[..., d]`` (one periodic pad instead of three rolls:
    the same arithmetic in fewer tensor operations)."""
    return haloed_tendency(torch.cat([x[..., -HALO_LEFT:], x, x[..., :HALO_RIGHT]], dim=-1), forcing)


def haloed_tendency(haloed: torch.Tensor, forcing: float) -> torch.Tensor:
    """dx/dt ``[..., n]`` of a slab given with its neighbours, ``[..., HALO_LEFT + n + HALO_RIGHT]``
    (a rank's share of a domain-decomposed state)."""
    n = haloed.shape[-1] - HALO_LEFT - HALO_RIGHT
    return _tendency(haloed[..., 0:n], haloed[..., 1:n + 1], haloed[..., 2:n + 2], haloed[..., 3:n + 3], forcing)


@dataclass
class Lorenz96:
    """The Lorenz-96 model as a forecast operator: ``step`` advances any ``[..., dim]`` batch."""

    dim: int = 40
    forcing: float = 8.0
    dt: float = 0.05  # model time step (the standard benchmark's 6 hours)
    # step is elementwise arithmetic along the last axis: a state's numbers do not depend on the batch
    # it is stepped in (da_plugin.cycle.Twin steps the nature run with the ensembles on this promise)
    batch_invariant: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.dim < 4:
            raise ValueError(f"model.dim must be >= 4 for Lorenz-96, got {self.dim}")
        if not self.dt > 0:
            raise ValueError(f"model.dt must be > 0, got {self.dt}")

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def step(self, x: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """Advance ``x`` (``[..., dim]``) by ``steps`` RK4 steps."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"Lorenz-96 state has {x.shape[-1]} variables, model.dim is {self.dim}")
        for _ in range(steps):
            x = rk4(lambda state: tendency(state, self.forcing), x, self.dt)
        return x

    def initial_state(self, generator: torch.Generator, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> torch.Tensor:
        """Rest state F with a small random perturbation, to be spun up onto the attractor."""
        noise = torch.randn(self.dim, generator=generator, dtype=torch.float64)
        return (self.forcing + 0.01 * noise).to(dtype=dtype, device=device)
