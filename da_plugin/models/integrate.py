"""Time integration shared by the forecast models."""

from __future__ import annotations

from collections.abc import Callable

import torch


def rk4(rhs: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dt: float) -> torch.Tensor:
    """One classical Runge-Kutta-4 step of length ``dt`` for dx/dt = rhs(x).

    x + dt/6 (k1 + 2 k2 + 2 k3 + k4), summed in that order; the in-place updates act only on
    temporaries of this function (fewer allocations for small states, the same numbers)."""
    k1 = rhs(x)
    k2 = rhs(k1.mul(0.5 * dt).add_(x))
    k3 = rhs(k2.mul(0.5 * dt).add_(x))
    k4 = rhs(k3.mul(dt).add_(x))
    return k2.mul(2.0).add_(k1).add_(k3.mul(2.0)).add_(k4).mul_(dt / 6.0).add_(x)
