"""LETKF (Hunt, Kostelich & Szunyogh 2007, doi:10.1016/j.physd.2006.11.008) and global ETKF.

Both compute the analysis in the N-dimensional ensemble space. With obs-space perturbations
Y (``[L, N]``), innovation d = y - mean h(x) and R^-1 weights r (``[L]``):

    C = Y^T diag(r),   A = (N - 1) I + C Y = Q diag(lam) Q^T,
    w = A^-1 C d,      W = sqrt(N - 1) Q diag(lam^-1/2) Q^T,
    x^a_j = mean x^b + X^b' (w + W[:, j]).

The ETKF does this once with every observation. The LETKF does it for every grid point at
once, as a batch of N x N eigendecompositions, with the observations near that point and
R^-1 tapered by Gaspari-Cohn.

Localization radius convention (Sakov & Bertino 2011): ``localization_radius`` r is in grid
units and the Gaspari-Cohn half-width is c = sqrt(10/3) r, so the taper on R^-1 matches a
Gaussian exp(-x^2 / (2 r^2)) in curvature at 0: at x = r it is 0.635 (the Gaussian's
exp(-1/2) = 0.607), and it is zero beyond 2c = 3.65 r. Distances are periodic: along the
single axis of a 1-D state (Lorenz-96), and horizontally, over the last two axes, for
``(levels, ny, nx)`` states (SQG, where every level at a location shares its observations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from da_plugin.filters.ensemble import EnsembleKalmanMixin
from da_plugin.obs import ObservationOperator

GC_HALF_WIDTH_PER_RADIUS = math.sqrt(10.0 / 3.0)


def gaspari_cohn(ratio: torch.Tensor) -> torch.Tensor:
    """Gaspari & Cohn (1999) eq. 4.10 taper of ``ratio`` = distance / c; zero beyond 2."""
    z = ratio.abs()
    inner = (((-0.25 * z + 0.5) * z + 0.625) * z - 5.0 / 3.0) * z * z + 1.0
    outer = ((((z / 12.0 - 0.5) * z + 0.625) * z + 5.0 / 3.0) * z - 5.0) * z + 4.0 - 2.0 / (3.0 * z.clamp_min(1e-30))
    return torch.where(z <= 1, inner, torch.where(z < 2, outer, torch.zeros_like(z)))


def ensemble_transform(obs_pert: torch.Tensor, innovation: torch.Tensor,
                       rinv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ETKF weights: mean weights ``[B, N]`` and perturbation transforms ``[B, N, N]``.

    ``obs_pert`` is ``[B, L, N]`` (perturbations about the obs-space mean), ``innovation``
    ``[B, L]``, ``rinv`` ``[B, L]`` the (tapered) inverse observation variances.
    """
    members = obs_pert.shape[-1]
    c = obs_pert.transpose(-1, -2) * rinv.unsqueeze(-2)  # [B, N, L]
    a = c @ obs_pert
    a.diagonal(dim1=-2, dim2=-1).add_(members - 1.0)
    lam, q = torch.linalg.eigh(a)
    mean_weights = q @ ((q.transpose(-1, -2) @ (c @ innovation.unsqueeze(-1))) / lam.unsqueeze(-1))
    transform = (q * (math.sqrt(members - 1.0) * lam.rsqrt()).unsqueeze(-2)) @ q.transpose(-1, -2)
    return mean_weights.squeeze(-1), transform


def apply_transform(forecast: torch.Tensor, mean_weights: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """x^a_j = mean + X' (w + W[:, j]) for ``forecast`` ``[N, ..., B]`` and per-column weights
    (``[B, N]``, ``[B, N, N]``; the middle dims, such as levels, share a column's weights)."""
    mean = forecast.mean(0)
    pert = forecast - mean  # [N, ..., B]
    weights = transform + mean_weights.unsqueeze(-1)  # [B, N, N]
    return mean + torch.einsum("k...b,bkj->j...b", pert, weights)


@dataclass
class ETKF(EnsembleKalmanMixin):
    """Global ensemble transform Kalman filter (Bishop et al. 2001; symmetric square root)."""

    def analysis(self, forecast: torch.Tensor, y: torch.Tensor, obs: ObservationOperator,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Analysis ensemble ``[N, d]`` from forecast ``[N, d]`` and observations ``y`` ``[m]``."""
        obs.check(y)
        prior = self.inflate_prior(forecast)
        hx = obs(prior)
        obs_pert = (hx - hx.mean(0)).T.unsqueeze(0)  # [1, m, N]
        innovation = (y.to(hx) - hx.mean(0)).unsqueeze(0)
        rinv = torch.full_like(innovation, 1.0 / obs.sigma**2)
        mean_weights, transform = ensemble_transform(obs_pert, innovation, rinv)
        mean = prior.mean(0)
        analysis = mean + (transform[0] + mean_weights[0].unsqueeze(-1)).T @ (prior - mean)
        return self.relax(forecast, analysis)


@dataclass
class LETKF(EnsembleKalmanMixin):
    """Local ETKF: one ensemble transform per grid point, all points in one batched solve."""

    localization_radius: float | None = None  # grid units (Sakov & Bertino, see module docstring); None: global
    batch_size: int = 8192  # grid points per batched eigendecomposition (bounds memory)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._neighbours: dict = {}  # location_observations' cache; not a setting, so not a field
        if self.localization_radius is not None and not self.localization_radius > 0:
            raise ValueError(f"filter.localization_radius must be > 0 grid units, got {self.localization_radius}")
        if self.batch_size < 1:
            raise ValueError(f"filter.batch_size must be >= 1, got {self.batch_size}")

    def analysis(self, forecast: torch.Tensor, y: torch.Tensor, obs: ObservationOperator,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Analysis ensemble ``[N, d]`` from forecast ``[N, d]`` and observations ``y`` ``[m]``."""
        obs.check(y)
        if forecast.shape[-1] != obs.dim:
            raise ValueError(f"forecast has {forecast.shape[-1]} variables, the observation grid {obs.dim}")
        prior = self.inflate_prior(forecast)
        hx = obs(prior)
        obs_pert = (hx - hx.mean(0)).T  # [m, N]
        innovation = y.to(hx) - hx.mean(0)
        neighbours, taper = self.location_observations(obs, forecast.device, forecast.dtype)
        rinv = taper / obs.sigma**2
        locations = neighbours.shape[0]
        # the levels at one horizontal location share its observations, hence its weights
        columns = prior.reshape(prior.shape[0], -1, locations)  # [N, levels, locations]
        out = torch.empty_like(columns)
        for start in range(0, locations, self.batch_size):
            here = slice(start, start + self.batch_size)
            local = neighbours[here]  # [B, L]
            mean_weights, transform = ensemble_transform(obs_pert[local], innovation[local], rinv[here])
            out[..., here] = apply_transform(columns[..., here], mean_weights, transform)
        return self.relax(forecast, out.reshape(prior.shape))

    def local_observations(self, obs: ObservationOperator, device: torch.device,
                           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per grid point, the indices of observations within the cutoff (``[d, L]``) and their
        Gaspari-Cohn taper (``[d, L]``, zero on padding)."""
        neighbours, taper = self.location_observations(obs, device, dtype)
        point_location = torch.arange(obs.dim, device=device) % neighbours.shape[0]
        return neighbours[point_location], taper[point_location]

    def location_observations(self, obs: ObservationOperator, device: torch.device,
                              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`local_observations` per horizontal location (``[locations, L]``; every level at a
        location shares them). Cached per observation network."""
        key = (id(obs), obs.indices.data_ptr(), str(device), dtype)
        if key not in self._neighbours:
            self._neighbours.clear()
            self._neighbours[key] = self._find_neighbours(obs, device, dtype)
        return self._neighbours[key]

    def _find_neighbours(self, obs: ObservationOperator, device: torch.device,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        horizontal = obs.grid_shape if len(obs.grid_shape) == 1 else obs.grid_shape[-2:]
        locations = math.prod(horizontal)
        if self.localization_radius is None:
            everything = torch.arange(obs.size, device=device).expand(locations, -1)
            return everything, torch.ones(everything.shape, dtype=dtype, device=device)
        half_width = GC_HALF_WIDTH_PER_RADIUS * self.localization_radius
        # obs_at[location, k]: the k-th observation at a horizontal location (-1: none)
        site = obs.indices % locations
        order = torch.argsort(site, stable=True)
        rank = torch.arange(obs.size) - torch.searchsorted(site[order], site[order])
        obs_at = torch.full((locations, int(rank.max()) + 1), -1, dtype=torch.long)
        obs_at[site[order], rank] = order
        offsets = stencil(horizontal, 2 * half_width)  # [S, k] grid offsets inside the cutoff
        taper_of_offset = gaspari_cohn(offsets.double().square().sum(1).sqrt() / half_width)
        shape = torch.tensor(horizontal)
        per_location = []
        for start in range(0, locations, self.batch_size):
            here = torch.arange(start, min(start + self.batch_size, locations))
            coords = torch.stack(torch.unravel_index(here, horizontal), dim=1)  # [B, k]
            around = (coords.unsqueeze(1) + offsets) % shape  # [B, S, k]
            flat = torch.zeros(around.shape[:2], dtype=torch.long)
            for axis, size in enumerate(horizontal):
                flat = flat * size + around[..., axis]
            candidates = obs_at[flat].flatten(1)  # [B, S * per-location]
            weights = taper_of_offset.repeat_interleave(obs_at.shape[1]).expand_as(candidates)
            per_location.append((candidates, torch.where(candidates >= 0, weights, 0.0)))
        # pad every location's list to the largest local count; padded entries get zero taper
        count = max(int((taper > 0).sum(1).max()) for _, taper in per_location)
        if count == 0:
            raise ValueError(f"localization_radius {self.localization_radius} leaves every grid point "
                             "without observations")
        neighbours, tapers = [], []
        for candidates, taper in per_location:
            taper, pick = taper.topk(count, dim=1)
            neighbours.append(candidates.gather(1, pick).clamp_min(0))
            tapers.append(taper)
        return torch.cat(neighbours).to(device), torch.cat(tapers).to(device=device, dtype=dtype)


def stencil(horizontal: tuple[int, ...], cutoff: float) -> torch.Tensor:
    """Integer offsets ``[S, k]`` shorter than ``cutoff`` on a periodic grid, each location once."""
    axes = [torch.arange(-(n // 2), (n + 1) // 2) for n in horizontal]
    axes = [a[a.abs() < cutoff] for a in axes]
    offsets = torch.cartesian_prod(*axes).reshape(-1, len(horizontal))
    return offsets[offsets.double().square().sum(1) < cutoff**2]
