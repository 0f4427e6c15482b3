"""Observation operators y = h(x[idx]) + N(0, sigma^2) and their likelihood scores.

An operator observes a fixed set of state variables (all, every ``stride``-th, or a fixed
random subset) through ``identity`` or ``arctan``. States are ``[..., d]`` tensors (the model
state flattened); an observation vector is ``[m]`` with ``m = len(indices)``. The operator
also knows the state's grid shape (``(d,)`` for Lorenz-96, ``(levels, ny, nx)`` for SQG), so
filters can locate observations on the grid for localization. A rank of a domain-decomposed
1-D state sees the operator restricted to its slab (:meth:`ObservationOperator.restrict`, or
:meth:`ObservationOperator.slab_from_config` without ever building the global one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from megavit.config import Bound, bounded, check_bounds

Operator = Literal["identity", "arctan"]


@dataclass
class ObsConfig:
    """How the truth is observed at each analysis time."""

    operator: Operator = "identity"
    sigma: float = bounded(1.0, gt=0)  # observation error standard deviation
    every: int = bounded(1, ge=1)  # forecast model steps between analyses
    interval: float | None = bounded(None, gt=0)  # model time between analyses (SQG, ViT: seconds); set: replaces every
    # every stride-th variable (offset 0); on a (levels, y, x) grid: every stride-th y and x
    stride: int = bounded(1, ge=1)
    random_fraction: float | None = bounded(None, gt=0, le=1)  # observe a fixed random subset of this fraction instead

    def __post_init__(self) -> None:
        check_bounds(self, "obs")
        if self.interval is not None and self.every != 1:
            raise ValueError("obs.interval and obs.every are alternatives: set one")
        if self.random_fraction is not None and self.stride != 1:
            raise ValueError("obs.random_fraction and obs.stride > 1 are exclusive: set one")


def strided_positions(start: int, stop: int, stride: int) -> range:
    """Positions in the observation vector of the observed variables in [start, stop) when every
    ``stride``-th variable is observed (offset 0)."""
    return range(-(-start // stride), -(-stop // stride))


class ObservationOperator:
    """h(x) = op(x[..., indices]) with Gaussian error of standard deviation ``sigma``."""

    def __init__(self, operator: Operator, sigma: float, indices: torch.Tensor, dim: int,
                 grid_shape: tuple[int, ...] | None = None):
        if operator not in ("identity", "arctan"):
            raise ValueError(f"unknown observation operator {operator!r}; valid: identity, arctan")
        Bound(gt=0).check(sigma, "observation sigma")
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= dim):
            raise ValueError(
                f"observed indices must lie in [0, {dim}), found [{int(indices.min())}, {int(indices.max())}]"
            )
        self.operator = operator
        self.sigma = float(sigma)
        self.indices = indices
        self.dim = dim
        self.grid_shape = tuple(grid_shape) if grid_shape is not None else (dim,)
        if math.prod(self.grid_shape) != dim:
            raise ValueError(f"grid shape {self.grid_shape} does not hold {dim} state variables")
        self._sorted = bool((indices[1:] > indices[:-1]).all())
        self._all = self._sorted and indices.numel() == dim

    @classmethod
    def from_config(cls, config: ObsConfig, grid_shape: tuple[int, ...],
                    generator: torch.Generator) -> ObservationOperator:
        """Operator for a state of ``grid_shape``; random subsets are drawn once from ``generator``."""
        dim = math.prod(grid_shape)
        if config.random_fraction is not None:
            count = max(1, round(config.random_fraction * dim))
            indices = torch.randperm(dim, generator=generator)[:count].sort().values
        elif len(grid_shape) == 3:  # (levels, y, x): a horizontal subgrid on every level
            mask = torch.zeros(grid_shape, dtype=torch.bool)
            mask[:, ::config.stride, ::config.stride] = True
            indices = mask.reshape(-1).nonzero().squeeze(1)
        else:
            indices = torch.arange(0, dim, config.stride)
        return cls(config.operator, config.sigma, indices, dim, grid_shape)

    @classmethod
    def slab_from_config(cls, config: ObsConfig, dim: int, start: int,
                         stop: int) -> tuple[ObservationOperator, range]:
        """``from_config(config, (dim,), ...).restrict(start, stop)`` without the global operator, whose
        index vector a rank of a 1e8-variable state should not hold: strided layouts only."""
        if config.random_fraction is not None:
            raise ValueError("obs.random_fraction draws its subset over the whole state; a slab can only take "
                             "obs.stride")
        positions = strided_positions(start, stop, config.stride)
        local = torch.arange(positions.start, positions.stop, dtype=torch.long) * config.stride - start
        return cls(config.operator, config.sigma, local, stop - start), positions

    def restrict(self, start: int, stop: int) -> tuple[ObservationOperator, torch.Tensor]:
        """The operator seen by the slab [start, stop) of a 1-D state, and the positions of its
        observations in the full observation vector (a slab may observe nothing)."""
        if self._sorted:
            low, high = torch.searchsorted(self.indices, torch.tensor([start, stop])).tolist()
            positions = torch.arange(low, high)
        else:
            positions = ((self.indices >= start) & (self.indices < stop)).nonzero().squeeze(1)
        return ObservationOperator(self.operator, self.sigma, self.indices[positions] - start, stop - start), positions

    @property
    def observes_all(self) -> bool:
        """Whether every state variable is observed, in order (the observation vector is then ``[d]``)."""
        return self._all

    @property
    def size(self) -> int:
        """Number of observations per analysis time."""
        return self.indices.numel()

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        """The observed variables x[..., indices] (``[..., m]``)."""
        return x if self._all else x[..., self.indices.to(x.device)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """h(x) for states ``[..., d]``, giving ``[..., m]``."""
        xo = self.observed(x)
        return torch.atan(xo) if self.operator == "arctan" else xo

    def sample(self, truth: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A noisy observation of ``truth`` (``[d]``)."""
        clean = self(truth)
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype, device=generator.device)
        return clean + self.sigma * noise.to(clean.device)

    def likelihood_score(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """grad_z log p(y | z) = J_h(z)^T (y - h(z)) / sigma^2, shape of ``z`` (``[..., d]``)."""
        zo = self.observed(z)
        if self.operator == "arctan":
            score_obs = (y - torch.atan(zo)) / ((1.0 + zo * zo) * self.sigma**2)
        else:
            score_obs = (y - zo) / self.sigma**2
        return self._on_state(score_obs, z)

    def likelihood_curvature(self, z: torch.Tensor) -> torch.Tensor:
        """J_h(z)^T J_h(z) / sigma^2 (the Gauss-Newton curvature of -log p(y | z)), shape of ``z``:
        1/sigma^2 (identity) or 1 / ((1 + z^2)^2 sigma^2) (arctan) where observed, 0 elsewhere."""
        zo = self.observed(z)
        if self.operator == "arctan":
            curvature_obs = (1.0 + zo * zo).square_().reciprocal_().div_(self.sigma**2)
        else:
            curvature_obs = torch.full_like(zo, self.sigma**-2)
        return self._on_state(curvature_obs, z)

    def _on_state(self, at_observed: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Values at the observed variables (``[..., m]``) spread onto the state's shape, 0 elsewhere."""
        if self._all:
            return at_observed
        spread = torch.zeros_like(z)
        spread[..., self.indices.to(z.device)] = at_observed
        return spread

    def check(self, y: torch.Tensor, where: str = "observations") -> None:
        """Reject observation vectors of the wrong size or with NaN/inf entries."""
        if y.shape[-1] != self.size:
            raise ValueError(f"{where}: expected {self.size} values, found {y.shape[-1]}")
        if torch.isfinite(y).all():  # the common case in two tensor ops (this runs twice a cycle)
            return
        bad = ~torch.isfinite(y)
        if bad.any():
            first = int(bad.nonzero()[0, -1])
            raise ValueError(
                f"{where}: {int(bad.sum())} non-finite value(s) (NaN/inf), first at observation "
                f"{first} (state variable {int(self.indices[first])})"
            )
