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

Two ways to the N x N inverse square root (``solver``): ``eigh``, a LAPACK eigendecomposition
per matrix, and ``newton``, a Newton-Schulz iteration of order 5 (:func:`inverse_sqrt_newton`) run
to machine precision on the whole batch at once with matrix products only. A's spectrum lies in
[N - 1, Gershgorin bound], so scaled by the middle of that interval it sits in (0, 2), where the
iteration converges: about seven batched products (float32, a cycled L96 ensemble) replace one
LAPACK call per point, 3-10x cheaper on CPU for N = 20. ``eigh`` stays the default, so earlier runs
reproduce bit for bit. With ``backend=cpp`` (CPU, ``newton``) the local weights of all points come
from one C++ call instead of about 60 batched tensor operations (:mod:`da_plugin.filters.letkf_cpp`),
whose per-operation overhead dominates small states' analyses.

Weight interpolation (``analysis_stride`` k > 1, Yang et al. 2009, doi:10.1002/qj.371): the
transforms are computed at every k-th location along each horizontal axis only and interpolated
(linearly, bilinearly on 2-D grids, periodically) to the locations between them, k (k^2) times
fewer local analyses for an RMSE cost that docs/results.md measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from da_plugin.filters import letkf_cpp
from da_plugin.filters.ensemble import EnsembleKalmanMixin
from da_plugin.obs import ObservationOperator

GC_HALF_WIDTH_PER_RADIUS = math.sqrt(10.0 / 3.0)


def gaspari_cohn(ratio: torch.Tensor) -> torch.Tensor:
    """Gaspari & Cohn (1999) eq. 4.10 taper of ``ratio`` = distance / c; zero beyond 2."""
    z = ratio.abs()
    inner = (((-0.25 * z + 0.5) * z + 0.625) * z - 5.0 / 3.0) * z * z + 1.0
    outer = ((((z / 12.0 - 0.5) * z + 0.625) * z + 5.0 / 3.0) * z - 5.0) * z + 4.0 - 2.0 / (3.0 * z.clamp_min(1e-30))
    return torch.where(z <= 1, inner, torch.where(z < 2, outer, torch.zeros_like(z)))


def ensemble_weights(local: torch.Tensor, rinv: torch.Tensor, solver: str = "eigh") -> torch.Tensor:
    """Batched ETKF weights W + w 1^T ``[B, N, N]`` (transform plus mean weights, module docstring).

    ``local`` is ``[B, L, N + 1]``: the obs-space perturbations Y about the obs-space mean with the
    innovation d as last column (one gather and, with ``newton``, one product C [Y | d] for both),
    ``rinv`` ``[B, L]`` the (tapered) inverse observation variances; ``solver`` ``eigh`` or
    ``newton`` (module docstring).
    """
    members = local.shape[-1] - 1
    obs_pert = local[..., :members]
    c = obs_pert.transpose(-1, -2) * rinv.unsqueeze(-2)  # [B, N, L]
    if solver == "newton":
        product = c @ local
        a, c_innovation = product[..., :members], product[..., members:]
        a.diagonal(dim1=-2, dim2=-1).add_(members - 1.0)
        root, scale = inverse_sqrt_newton(a, lower=members - 1.0)  # root = (a / scale)^-1/2
        # w = a^-1 C d = root (root C d) / scale; the two matrix-vector products as multiply-and-sum,
        # since CPU bmm pays per matrix as for a full product
        mean_weights = (root * (root * c_innovation.mT).sum(-1).unsqueeze(-2)).sum(-1, keepdim=True)
        return root.mul_(math.sqrt((members - 1.0) / scale)).add_(mean_weights, alpha=1.0 / scale)
    a = c @ obs_pert
    a.diagonal(dim1=-2, dim2=-1).add_(members - 1.0)
    lam, q = torch.linalg.eigh(a)
    mean_weights = q @ ((q.transpose(-1, -2) @ (c @ local[..., members:])) / lam.unsqueeze(-1))
    transform = (q * (math.sqrt(members - 1.0) * lam.rsqrt()).unsqueeze(-2)) @ q.transpose(-1, -2)
    return transform + mean_weights


def obs_space(prior: torch.Tensor, y: torch.Tensor, obs: ObservationOperator) -> torch.Tensor:
    """``[N + 1, m]``: the perturbations of h(prior) about their mean, one row per member, and the
    innovation y - mean h(prior) (transposed, the ``local`` rows of :func:`ensemble_weights`)."""
    hx = obs(prior)
    return torch.cat([hx, y.to(hx).unsqueeze(0)]).sub_(hx.mean(0))


# (1 - u)^-1/2 to degree 4 in u (binomial series): the polynomial of each Newton-Schulz step below
NEWTON_SCHULZ_COEFFICIENTS = (1.0, 1.0 / 2.0, 3.0 / 8.0, 5.0 / 16.0, 35.0 / 128.0)


def inverse_sqrt_newton(a: torch.Tensor, lower: float) -> tuple[torch.Tensor, float]:
    """(Z, s) with Z = (a / s)^-1/2 for a batch ``[B, n, n]`` of symmetric positive definite matrices
    with eigenvalues >= ``lower``, by a Newton-Schulz iteration of order 5 (Higham 2008, sec. 7.3 and
    eq. 6.35, taken to degree 4): from M = a / s and Z = I,

        U = I - M,   T = p(U) = I + U/2 + 3/8 U^2 + 5/16 U^3 + 35/128 U^4,   Z <- Z T,   M <- M T^2,

    p the series of (1 - u)^-1/2, so M -> I and Z -> (a / s)^-1/2 (all iterates are polynomials in
    a and commute). p costs two matrix products (U^2, then U^2 (5/16 U + 35/128 U^2)), a step at most
    five, against three for the quadratic Newton-Schulz step: the same precision in about half the
    products, the cost of small batches.

    The scale s is the middle of [lower, upper], upper the largest over the batch of the smaller of
    the Gershgorin and trace bounds on each matrix's largest eigenvalue, so every eigenvalue of a / s
    is 1 - e0 with |e0| <= (upper - lower) / (upper + lower) < 1. An eigenvalue's error then follows
    e <- 1 - (1 - e) p(e)^2, a series in e^5 with positive coefficients (so |e| bounds it from the
    larger of e0 and -e0), which fixes the steps needed for machine precision in advance: no
    residuals to compute or synchronize on. One scale for the whole batch (a number, not a tensor)
    needs the same steps as one per matrix, which the batch's largest bound sets anyway, in fewer
    tensor operations.
    """
    n = a.shape[-1]
    gershgorin = a.abs().sum(-1).amax(-1)
    trace = a.diagonal(dim1=-2, dim2=-1).sum(-1)
    upper = max(torch.minimum(gershgorin, trace.sub_((n - 1) * lower)).max().item(), lower) if a.numel() else lower
    steps = newton_schulz_steps((upper - lower) / (upper + lower), torch.finfo(a.dtype).eps)
    scale = 0.5 * (upper + lower)
    _, c1, c2, c3, c4 = NEWTON_SCHULZ_COEFFICIENTS  # c0 = 1
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    m = a / scale
    z = None
    for step in range(steps):
        u = eye - m
        u2 = u @ u
        t = torch.baddbmm(torch.add(eye, u, alpha=c1).add_(u2, alpha=c2), u2, torch.add(u, u2, alpha=c4 / c3),
                          alpha=c3)
        z = t if z is None else z @ t
        if step < steps - 1:
            m = m @ (t @ t)
    return (eye.expand_as(a).clone() if z is None else z), scale


def newton_schulz_steps(error: float, eps: float) -> int:
    """Steps of :func:`inverse_sqrt_newton` taking eigenvalue errors up to ``error`` below ``eps``
    (or, for float64's eps, to where the recursion stops shrinking in float64: converged)."""
    steps = 0
    while error > eps:
        series = sum(c * error**k for k, c in enumerate(NEWTON_SCHULZ_COEFFICIENTS))
        error, previous, steps = 1.0 - (1.0 - error) * series**2, error, steps + 1
        if error >= previous:
            break
    return steps


def apply_weights(forecast: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x^a_j = mean + X' weights[:, j] for ``forecast`` ``[N, ..., B]`` and per-column weights
    ``[B, N, N]`` (W + w 1^T: transform plus mean weights; the middle dims, such as levels, share
    a column's weights). The perturbations are laid out ``[B, levels, N]`` for one batched product
    (einsum's own layout made CPU bmm loop over the batch)."""
    mean = forecast.mean(0)
    pert = (forecast - mean).reshape(forecast.shape[0], -1, forecast.shape[-1]).permute(2, 1, 0).contiguous()
    # laid out as the forecast, which the relaxations' reductions over members then sum in its order
    return torch.bmm(pert, weights).permute(2, 1, 0).contiguous().reshape(forecast.shape).add_(mean)


SOLVERS = ("eigh", "newton")
BACKENDS = ("torch", "cpp")


@dataclass
class ETKF(EnsembleKalmanMixin):
    """Global ensemble transform Kalman filter (Bishop et al. 2001; symmetric square root)."""

    solver: Literal["eigh", "newton"] = "eigh"  # N x N inverse square root (module docstring)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver not in SOLVERS:
            raise ValueError(f"filter.solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")

    def analysis(self, forecast: torch.Tensor, y: torch.Tensor, obs: ObservationOperator,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Analysis ensemble ``[N, d]`` from forecast ``[N, d]`` and observations ``y`` ``[m]``."""
        obs.check(y)
        prior = self.inflate_prior(forecast)
        local = obs_space(prior, y, obs).T.unsqueeze(0)  # [1, m, N + 1]
        rinv = torch.full_like(local[..., 0], 1.0 / obs.sigma**2)
        weights = ensemble_weights(local, rinv, self.solver)[0]
        mean = prior.mean(0)
        analysis = mean + weights.T @ (prior - mean)
        return self.relax(forecast, analysis)


@dataclass
class Neighbourhoods:
    """What the LETKF precomputes for one observation network: per horizontal location its local
    observations and their taper, and for weight interpolation the analysed locations and each
    location's interpolation corners (indices into the analysed list) and factors."""

    neighbours: torch.Tensor  # [locations, L] observation indices (padding: index 0 with zero taper)
    taper: torch.Tensor  # [locations, L] Gaspari-Cohn taper
    rinv: torch.Tensor  # [locations, L] the taper over the observation variance
    analysed: torch.Tensor  # [A] locations where transforms are computed (all of them when the stride is 1)
    corners: torch.Tensor | None  # [locations, K] rows of the analysed list to interpolate from; None: stride 1
    factors: torch.Tensor | None  # [locations, K] their interpolation factors, summing to 1
    cells: Cells | None = None  # the same by grid cell, when the stride divides every horizontal axis


@dataclass
class Cells:
    """Weight interpolation by grid cell: the q = stride^k locations of a cell (from its lower corner
    on) share their K = 2^k corners, so each corner's transform is applied to all of them in one
    product, with no per-location copy of the weights."""

    order: torch.Tensor  # [locations] the locations, cell by cell
    corners: torch.Tensor  # [A, K] rows of the analysed list at each cell's corners
    factors: torch.Tensor  # [A, q, K] interpolation factors of the cell's locations, in ``order``

    @classmethod
    def of(cls, corners: torch.Tensor, factors: torch.Tensor, cells: int) -> Cells:
        """From per-location ``corners`` and ``factors`` (:func:`interpolation`): the first corner of a
        location is its cell's lower one, and every cell holds the same number of locations."""
        order = torch.argsort(corners[:, 0], stable=True)
        per_cell = len(order) // cells
        return cls(order, corners[order[::per_cell]], factors[order].view(cells, per_cell, -1))

    def to(self, device: torch.device) -> Cells:
        return Cells(self.order.to(device), self.corners.to(device), self.factors.to(device))

    def apply(self, columns: torch.Tensor, analysed: torch.Tensor) -> torch.Tensor:
        """:func:`apply_weights` of ``columns`` ``[N, levels, locations]`` with the interpolated
        ``analysed`` transforms ``[A, N, N]``: mean + sum_K factor_K X' W_K, per cell."""
        members, levels = columns.shape[:2]
        cells, per_cell, corners = self.factors.shape
        block = columns[..., self.order].view(members, levels, cells, per_cell).permute(2, 3, 1, 0)  # [A, q, lv, N]
        mean = block.mean(-1, keepdim=True)
        pert = (block - mean).reshape(cells, per_cell * levels, members)
        out = mean
        for corner in range(corners):
            product = torch.bmm(pert, analysed[self.corners[:, corner]]).view(cells, per_cell, levels, members)
            out = torch.addcmul(out, self.factors[:, :, corner, None, None], product)
        result = torch.empty_like(columns)
        result[..., self.order] = out.permute(3, 2, 0, 1).reshape(members, levels, -1)
        return result


@dataclass
class LETKF(ETKF):
    """Local ETKF: one ensemble transform per grid point, all points in one batched solve."""

    localization_radius: float | None = None  # grid units (Sakov & Bertino, see module docstring); None: global
    batch_size: int = 8192  # grid points per batched solve (bounds memory)
    analysis_stride: int = 1  # > 1: transforms at every k-th location, interpolated between (module docstring)
    # torch: batched tensor operations (any device); cpp: the local weights in one C++ call on the CPU
    # (solver=newton, N < 64; da_plugin/filters/letkf_cpp.py, built on first use)
    backend: Literal["torch", "cpp"] = "torch"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._neighbourhoods: dict = {}  # neighbourhoods' cache; not a setting, so not a field
        if self.localization_radius is not None and not self.localization_radius > 0:
            raise ValueError(f"filter.localization_radius must be > 0 grid units, got {self.localization_radius}")
        if self.batch_size < 1:
            raise ValueError(f"filter.batch_size must be >= 1, got {self.batch_size}")
        if self.analysis_stride < 1:
            raise ValueError(f"filter.analysis_stride must be >= 1 (1: a transform at every location), "
                             f"got {self.analysis_stride}")
        if self.backend not in BACKENDS:
            raise ValueError(f"filter.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "cpp" and (self.solver != "newton" or not 2 <= self.ensemble_size < 64):
            raise ValueError(f"filter.backend=cpp computes the Newton-Schulz weights of 2 to 63 members: it needs "
                             f"filter.solver=newton and ensemble_size < 64, found solver={self.solver!r}, "
                             f"ensemble_size={self.ensemble_size}")

    def analysis(self, forecast: torch.Tensor, y: torch.Tensor, obs: ObservationOperator,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Analysis ensemble ``[N, d]`` from forecast ``[N, d]`` and observations ``y`` ``[m]``."""
        obs.check(y)
        if forecast.shape[-1] != obs.dim:
            raise ValueError(f"forecast has {forecast.shape[-1]} variables, the observation grid {obs.dim}")
        prior = self.inflate_prior(forecast)
        rows = obs_space(prior, y, obs).T.contiguous()  # [m, N + 1], gathered per location below
        hood = self.neighbourhoods(obs, forecast.device, forecast.dtype)
        locations = hood.neighbours.shape[0]
        # the levels at one horizontal location share its observations, hence its weights
        columns = prior.reshape(prior.shape[0], -1, locations)  # [N, levels, locations]

        def weights_at(points: torch.Tensor | slice) -> torch.Tensor:
            if self.backend == "cpp":
                return letkf_cpp.local_weights(rows, hood.neighbours[points], hood.rinv[points])
            return ensemble_weights(rows[hood.neighbours[points]], hood.rinv[points], self.solver)

        if hood.corners is None:
            weights_of = weights_at
        else:
            analysed = torch.cat([weights_at(hood.analysed[start:start + self.batch_size])
                                  for start in range(0, len(hood.analysed), self.batch_size)])

            def weights_of(here: slice) -> torch.Tensor:
                corners = analysed[hood.corners[here]]  # [B, K, N, N]
                return torch.bmm(hood.factors[here].unsqueeze(1), corners.flatten(2)).view_as(corners[:, 0])

        if hood.cells is not None:
            return self.relax(forecast, hood.cells.apply(columns, analysed).reshape(prior.shape))
        if locations <= self.batch_size:  # one batch, no output buffer to copy into
            return self.relax(forecast, apply_weights(columns, weights_of(slice(None))).reshape(prior.shape))
        out = torch.empty_like(columns)
        for start in range(0, locations, self.batch_size):
            here = slice(start, start + self.batch_size)
            out[..., here] = apply_weights(columns[..., here], weights_of(here))
        return self.relax(forecast, out.reshape(prior.shape))

    def prepare(self, obs: ObservationOperator, device: torch.device, dtype: torch.dtype) -> None:
        """Build the neighbourhoods of ``obs`` now (once per network) and, with backend=cpp, the kernel,
        so cycles do not time them."""
        if self.backend == "cpp":
            if torch.device(device).type != "cpu":
                raise ValueError(f"filter.backend=cpp runs on the CPU, found device {device}")
            letkf_cpp.kernel()
        self.neighbourhoods(obs, device, dtype)

    def local_observations(self, obs: ObservationOperator, device: torch.device,
                           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per grid point, the indices of observations within the cutoff (``[d, L]``) and their
        Gaspari-Cohn taper (``[d, L]``, zero on padding)."""
        hood = self.neighbourhoods(obs, device, dtype)
        point_location = torch.arange(obs.dim, device=device) % hood.neighbours.shape[0]
        return hood.neighbours[point_location], hood.taper[point_location]

    def neighbourhoods(self, obs: ObservationOperator, device: torch.device, dtype: torch.dtype) -> Neighbourhoods:
        """The :class:`Neighbourhoods` of ``obs`` per horizontal location (every level at a location
        shares them). Cached per observation network."""
        key = (id(obs), obs.indices.data_ptr(), str(device), dtype)
        if key not in self._neighbourhoods:
            self._neighbourhoods.clear()
            horizontal = obs.grid_shape if len(obs.grid_shape) == 1 else obs.grid_shape[-2:]
            neighbours, taper = self._find_neighbours(obs, horizontal, device, dtype)
            rinv = taper / obs.sigma**2
            if self.analysis_stride == 1:
                hood = Neighbourhoods(neighbours, taper, rinv, torch.arange(len(neighbours), device=device),
                                      None, None)
            else:
                analysed, corners, factors = interpolation(horizontal, self.analysis_stride)
                factors = factors.to(dtype)
                cells = Cells.of(corners, factors, len(analysed)).to(device) \
                    if all(size % self.analysis_stride == 0 for size in horizontal) else None
                hood = Neighbourhoods(neighbours, taper, rinv, analysed.to(device), corners.to(device),
                                      factors.to(device), cells)
            self._neighbourhoods[key] = hood
        return self._neighbourhoods[key]

    def _find_neighbours(self, obs: ObservationOperator, horizontal: tuple[int, ...], device: torch.device,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
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
            coords = grid_coordinates(here, horizontal)  # [B, k]
            around = (coords.unsqueeze(1) + offsets) % shape  # [B, S, k]
            candidates = obs_at[flat_index(around, horizontal)].flatten(1)  # [B, S * per-location]
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


def grid_coordinates(flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Row-major coordinates ``[B, k]`` of flat indices on a grid of ``shape`` (torch.unravel_index
    without its one-time import of sympy, 1.3 s)."""
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = flat // size
    return torch.stack(coords[::-1], dim=1)


def flat_index(coords: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Row-major flat indices of coordinates ``[..., k]`` on a grid of ``shape``."""
    flat = torch.zeros(coords.shape[:-1], dtype=torch.long)
    for axis, size in enumerate(shape):
        flat = flat * size + coords[..., axis]
    return flat


def interpolation(horizontal: tuple[int, ...], stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight interpolation on a periodic grid: the analysed locations (every ``stride``-th along each
    axis, flat indices ``[A]``) and, per location, the 2^k analysed neighbours it is interpolated
    from (rows of the analysed list, ``[locations, 2^k]``) with their (bi)linear factors."""
    corners, factors, counts = [], [], []
    for size in horizontal:
        count = -(-size // stride)  # analysed points on this axis; the last interval wraps around
        point = torch.arange(size)
        left = point // stride
        span = torch.where(left < count - 1, stride, size - left * stride)
        fraction = (point - left * stride).double() / span
        corners.append(torch.stack([left, (left + 1) % count], dim=1))
        factors.append(torch.stack([1.0 - fraction, fraction], dim=1))
        counts.append(count)
    corner, factor = corners[0], factors[0]
    for axis in range(1, len(horizontal)):  # outer products over the axes, row-major
        corner = (corner[:, None, :, None] * counts[axis] + corners[axis][None, :, None, :]).flatten(0, 1).flatten(1)
        factor = (factor[:, None, :, None] * factors[axis][None, :, None, :]).flatten(0, 1).flatten(1)
    analysed_coords = torch.cartesian_prod(*[torch.arange(0, size, stride) for size in horizontal])
    return flat_index(analysed_coords.reshape(-1, len(horizontal)), horizontal), corner, factor
