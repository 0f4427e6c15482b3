"""LETKF, ETKF and stochastic EnKF against independent references: the Kalman filter, a
per-grid-point NumPy LETKF written from Hunt et al. (2007), and hand-computed inflation."""

import math

import numpy as np
import pytest
import torch

from da_plugin.filters import ETKF, LETKF, EnKF, letkf_cpp
from da_plugin.filters.letkf import (
    NEWTON_SCHULZ_COEFFICIENTS,
    ensemble_weights,
    gaspari_cohn,
    grid_coordinates,
    inverse_sqrt_newton,
    newton_schulz_steps,
)
from da_plugin.obs import ObservationOperator


def gc_reference(distance: float, c: float) -> float:
    """Gaspari & Cohn (1999) eq. 4.10, as printed, with numpy.polyval."""
    z = abs(distance) / c
    if z <= 1:
        return np.polyval([-1 / 4, 1 / 2, 5 / 8, -5 / 3, 0, 1], z)
    if z < 2:
        return np.polyval([1 / 12, -1 / 2, 5 / 8, 5 / 3, -5, 4], z) - 2 / (3 * z)
    return 0.0


def letkf_point_loop(forecast, y, obs_index, sigma, grid_shape, radius, rho, centres=None):
    """LETKF one grid point at a time (Hunt et al. 2007, steps 1-8), identity observations.

    ``centres``: per point, (grid point, factor) pairs: the point's analysis is then the
    factor-weighted sum of the analyses with the weights of those points (weight interpolation)."""
    xb = forecast.numpy().astype(np.float64)  # [N, d]
    members, dim = xb.shape
    xbar = xb.mean(0)
    X = (xb - xbar).T  # [d, N]
    Yb = xb[:, obs_index]
    ybar = Yb.mean(0)
    Y = (Yb - ybar).T  # [m, N]
    c = math.sqrt(10 / 3) * radius
    coords = np.stack(np.unravel_index(np.arange(dim), grid_shape), 1)
    horizontal = coords if len(grid_shape) == 1 else coords[:, -2:]
    periods = np.array(grid_shape[-horizontal.shape[1]:])

    def weights(centre):
        delta = np.abs(horizontal[obs_index] - horizontal[centre])
        delta = np.minimum(delta, periods - delta)
        dist = np.sqrt((delta**2).sum(1))
        local = np.flatnonzero(dist < 2 * c)
        rinv = np.diag([gc_reference(dist[k], c) / sigma**2 for k in local])
        Yl = Y[local]
        C = Yl.T @ rinv
        Pa = np.linalg.inv((members - 1) / rho * np.eye(members) + C @ Yl)
        lam, Q = np.linalg.eigh((members - 1) * Pa)
        Wa = Q @ np.diag(np.sqrt(lam)) @ Q.T
        wa = Pa @ C @ (y.numpy()[local] - ybar[local])
        return Wa + wa[:, None]

    out = np.empty_like(xb)
    for point in range(dim):
        pairs = [(point, 1.0)] if centres is None else centres[point]
        out[:, point] = sum(factor * (xbar[point] + X[point] @ weights(centre)) for centre, factor in pairs)
    return torch.from_numpy(out)


def ensemble(members, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 2, dim, dtype=torch.float64)
    return 2.0 + torch.randn(members, dim, dtype=torch.float64, generator=gen) * scale


def test_gaspari_cohn_against_formula_and_radius_convention():
    c = 3.0
    distances = torch.linspace(0, 7, 141, dtype=torch.float64)
    ours = gaspari_cohn(distances / c)
    expected = torch.tensor([gc_reference(float(x), c) for x in distances], dtype=torch.float64)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    assert ours[0] == 1 and ours[distances >= 2 * c].abs().max() == 0
    # c = sqrt(10/3) r: the taper's curvature at 0 equals that of exp(-x^2 / (2 r^2))
    r, h = 2.0, 1e-5
    taper = lambda x: gaspari_cohn(torch.tensor(x / (math.sqrt(10 / 3) * r), dtype=torch.float64)).item()  # noqa: E731
    curvature = (taper(h) - 2 * taper(0.0) + taper(-h)) / h**2
    assert curvature == pytest.approx(-1 / r**2, rel=1e-4)


@pytest.mark.parametrize("operator", ["identity", "arctan"])
def test_letkf_without_localization_equals_etkf(operator):
    forecast = ensemble(6, 12)
    obs = ObservationOperator(operator, 0.5, torch.arange(0, 12, 2), 12)
    y = obs(forecast[0] + 0.3)
    local = LETKF(ensemble_size=6).analysis(forecast, y, obs)
    torch.testing.assert_close(local, ETKF(ensemble_size=6).analysis(forecast, y, obs), rtol=1e-10, atol=1e-10)
    # a radius much larger than the domain tapers every weight by ~1 only: close, not equal
    wide = LETKF(ensemble_size=6, localization_radius=1e4).analysis(forecast, y, obs)
    torch.testing.assert_close(wide, local, rtol=1e-6, atol=1e-6)


def test_etkf_is_the_kalman_update_of_the_ensemble_statistics():
    forecast = ensemble(30, 8, seed=1)
    indices = torch.tensor([0, 3, 4, 7])
    sigma = 0.7
    obs = ObservationOperator("identity", sigma, indices, 8)
    y = torch.tensor([1.0, 3.0, 2.5, 0.0], dtype=torch.float64)
    analysis = ETKF(ensemble_size=30).analysis(forecast, y, obs)
    mean, P = forecast.mean(0), torch.cov(forecast.T)
    H = torch.eye(8, dtype=torch.float64)[indices]
    gain = P @ H.T @ torch.linalg.inv(H @ P @ H.T + sigma**2 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(analysis.mean(0), mean + gain @ (y - H @ mean), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cov(analysis.T), (torch.eye(8, dtype=torch.float64) - gain @ H) @ P,
                               rtol=1e-9, atol=1e-10)


def test_etkf_and_enkf_match_the_kalman_filter_for_a_large_ensemble():
    gen = torch.Generator().manual_seed(2)
    mu = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    A = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    P = A @ A.T + 0.3 * torch.eye(3, dtype=torch.float64)
    forecast = mu + torch.randn(2000, 3, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(P).T
    obs = ObservationOperator("identity", 0.5, torch.tensor([0, 2]), 3)
    H = torch.eye(3, dtype=torch.float64)[[0, 2]]
    y = torch.tensor([2.0, 0.0], dtype=torch.float64)
    gain = P @ H.T @ torch.linalg.inv(H @ P @ H.T + 0.25 * torch.eye(2, dtype=torch.float64))
    mean, cov = mu + gain @ (y - H @ mu), (torch.eye(3, dtype=torch.float64) - gain @ H) @ P
    for f in (ETKF(ensemble_size=2000), EnKF(ensemble_size=2000)):
        analysis = f.analysis(forecast, y, obs, gen)
        torch.testing.assert_close(analysis.mean(0), mean, rtol=0, atol=0.1)
        torch.testing.assert_close(torch.cov(analysis.T), cov, rtol=0, atol=0.1)


GRIDS = [((30,), torch.arange(0, 30, 3), 2.5),
         ((2, 6, 8), torch.tensor([0, 5, 9, 17, 30, 44, 50, 61, 70, 83, 95]), 1.2)]


SOLVERS = [("eigh", "torch"), ("newton", "torch"), ("newton", "cpp")]  # (filter.solver, filter.backend)


@pytest.mark.parametrize("solver, backend", SOLVERS)
@pytest.mark.parametrize("grid_shape, obs_index, radius", GRIDS)
def test_batched_letkf_equals_point_loop(grid_shape, obs_index, radius, solver, backend):
    dim = math.prod(grid_shape)
    forecast = ensemble(7, dim, seed=3)
    obs = ObservationOperator("identity", 0.8, obs_index, dim, grid_shape)
    y = obs(forecast.mean(0)) + 0.5
    f = LETKF(ensemble_size=7, localization_radius=radius, inflation=1.1, batch_size=13, solver=solver,
              backend=backend)
    expected = letkf_point_loop(forecast, y, obs_index.numpy(), 0.8, grid_shape, radius, 1.1)
    torch.testing.assert_close(f.analysis(forecast, y, obs), expected, rtol=1e-9, atol=1e-9)


def periodic_linear(size, stride):
    """Per index of a periodic axis, the analysed indices (multiples of stride) and linear factors."""
    analysed = list(range(0, size, stride))
    pairs = []
    for i in range(size):
        left = (i // stride) * stride
        right = analysed[(i // stride + 1) % len(analysed)]
        span = (right - left) % size or size
        pairs.append([(left, 1 - (i - left) / span), (right, (i - left) / span)])
    return pairs


@pytest.mark.parametrize("solver, backend", SOLVERS)
@pytest.mark.parametrize("stride", [2, 4])
@pytest.mark.parametrize("grid_shape, obs_index, radius", GRIDS)
def test_weight_interpolation_equals_interpolated_point_loop(grid_shape, obs_index, radius, stride, solver, backend):
    """With analysis_stride k every point's analysis is the (bi)linear, periodic interpolation of the
    analyses it gets with the weights of the analysed points around it (every k-th per axis)."""
    dim = math.prod(grid_shape)
    forecast = ensemble(7, dim, seed=4)
    obs = ObservationOperator("identity", 0.8, obs_index, dim, grid_shape)
    y = obs(forecast.mean(0)) + 0.5
    horizontal = grid_shape[-2:]
    axes = [periodic_linear(n, stride) for n in horizontal]
    centres = []
    for point in range(dim):
        coords = np.unravel_index(point, grid_shape)[-len(horizontal):]
        level = point - np.ravel_multi_index(coords, horizontal)  # the first point of this level's slab
        pairs = [((), 1.0)]
        for axis, coord in enumerate(coords):
            pairs = [(c + (a,), f * g) for c, f in pairs for a, g in axes[axis][coord]]
        centres.append([(level + int(np.ravel_multi_index(c, horizontal)), f) for c, f in pairs])
    expected = letkf_point_loop(forecast, y, obs_index.numpy(), 0.8, grid_shape, radius, 1.1, centres)
    f = LETKF(ensemble_size=7, localization_radius=radius, inflation=1.1, batch_size=5, analysis_stride=stride,
              solver=solver, backend=backend)
    torch.testing.assert_close(f.analysis(forecast, y, obs), expected, rtol=1e-9, atol=1e-9)
    # by grid cell where the stride divides the grid, else location by location: both paths are tested
    by_cell = all(size % stride == 0 for size in horizontal)
    assert (f.neighbourhoods(obs, forecast.device, forecast.dtype).cells is not None) == by_cell


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-11), (torch.float32, 1e-4)])
def test_newton_inverse_square_root_against_eigendecomposition(dtype, tolerance):
    """Condition numbers 1 to 1e4 (a cycle's are below 20): Z = (a / s)^-1/2 to rounding (about
    condition number x eps)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.linalg.qr(torch.randn(6, 12, 12, generator=gen, dtype=torch.float64))[0]
    lam = 3.0 * torch.logspace(0, 4, 12, dtype=torch.float64) ** torch.linspace(0, 1, 6, dtype=torch.float64)[:, None]
    a = (q * lam[:, None, :]) @ q.mT
    root, scale = inverse_sqrt_newton(a.to(dtype), lower=3.0)
    expected = (q * (lam / scale).rsqrt()[:, None, :]) @ q.mT
    error = (root.double() - expected).abs().amax((-2, -1)) / expected.abs().amax((-2, -1))
    assert error.max() < tolerance


@pytest.mark.parametrize("eps", [torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps])
def test_newton_schulz_steps_end_for_every_starting_error(eps):
    """The error recursion reaches eps, or float64 rounding for float64's eps (where it once looped
    forever), and the steps it counts are the fewest that take the first step's error below eps."""
    for error in np.linspace(0.001, 0.999, 500):
        steps = newton_schulz_steps(error, eps)
        remaining = [error]
        for _ in range(steps):
            e = remaining[-1]
            remaining.append(1.0 - (1.0 - e) * sum(c * e**k for k, c in enumerate(NEWTON_SCHULZ_COEFFICIENTS)) ** 2)
        assert remaining[-1] <= max(eps, 4 * torch.finfo(torch.float64).eps)
        assert steps == 1 or remaining[-2] > eps


@pytest.mark.parametrize("members", [3, 15, 16, 20, 31, 33])
def test_cpp_kernel_weights_match_the_eigendecomposition(members):
    """letkf_kernel.cpp against ensemble_weights' eigh path (a LAPACK eigendecomposition per point), in
    float64 to rounding and in float32 as close as the batched Newton-Schulz path; padded neighbour
    entries (zero taper) included, member counts on both sides of the kernel's padded widths 16 and 32."""
    gen = torch.Generator().manual_seed(members)
    rows = 0.4 * torch.randn(50, members + 1, generator=gen, dtype=torch.float64)
    rows[:, :members] -= rows[:, :members].mean(1, keepdim=True)
    neighbours = torch.randint(0, 50, (37, 12), generator=gen)
    rinv = torch.rand(37, 12, generator=gen, dtype=torch.float64).mul_(2.0)
    rinv[:, 9:] = 0.0  # padding
    rinv[0] = 0.0  # a point without observations: weights I
    expected = ensemble_weights(rows[neighbours], rinv, "eigh")
    torch.testing.assert_close(letkf_cpp.local_weights(rows, neighbours, rinv), expected, rtol=1e-11, atol=1e-11)
    single = letkf_cpp.local_weights(rows.float(), neighbours, rinv.float())
    newton = ensemble_weights(rows.float()[neighbours], rinv.float(), "newton")
    assert (single.double() - expected).abs().max() <= 2 * (newton.double() - expected).abs().max() + 1e-6


def test_cpp_backend_settings_and_build_failure(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of torch, cpp, got 'cuda'"):
        LETKF(backend="cuda")
    with pytest.raises(ValueError, match="backend=cpp computes the Newton-Schulz weights.*solver='eigh'"):
        LETKF(backend="cpp")
    with pytest.raises(ValueError, match="ensemble_size=64"):
        LETKF(backend="cpp", solver="newton", ensemble_size=64)
    obs = ObservationOperator("identity", 1.0, torch.arange(40), 40)
    with pytest.raises(ValueError, match="backend=cpp runs on the CPU, found device meta"):
        LETKF(backend="cpp", solver="newton", localization_radius=2).prepare(obs, torch.device("meta"), torch.float32)

    def broken(**_):
        raise RuntimeError("Error building extension\nletkf_kernel.cpp:3: error: expected ';'\n")

    letkf_cpp.kernel.cache_clear()
    monkeypatch.setattr("torch.utils.cpp_extension.load", broken)
    try:
        with pytest.raises(ValueError, match="building letkf_kernel.cpp failed .*error: expected ';'.*backend=torch"):
            letkf_cpp.kernel()
    finally:
        letkf_cpp.kernel.cache_clear()


def test_grid_coordinates_match_numpy():
    flat = torch.arange(0, 2 * 6 * 8, 5)
    expected = np.stack(np.unravel_index(flat.numpy(), (2, 6, 8)), 1)
    np.testing.assert_array_equal(grid_coordinates(flat, (2, 6, 8)).numpy(), expected)


def test_inflation_variants_hand_computed():
    forecast = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)  # mean [2, 4], std [1.41, 2.83]
    analysis = torch.tensor([[2.0, 3.0], [2.5, 4.0]], dtype=torch.float64)  # mean [2.25, 3.5]
    torch.testing.assert_close(ETKF(ensemble_size=2, inflation=4.0).inflate_prior(forecast),
                               torch.tensor([[0.0, 0.0], [4.0, 8.0]], dtype=torch.float64))
    rtpp = ETKF(ensemble_size=2, rtpp=0.5).relax(forecast, analysis)
    # perturbations: analysis [[-.25, -.5], [.25, .5]], forecast [[-1, -2], [1, 2]] -> average
    torch.testing.assert_close(rtpp, torch.tensor([[1.625, 2.25], [2.875, 4.75]], dtype=torch.float64))
    rtps = ETKF(ensemble_size=2, rtps=0.5).relax(forecast, analysis)
    # spread: analysis sqrt(2)/4 and sqrt(2)/2, forecast sqrt(2) and 2 sqrt(2): factor 1 + .5 (sb - sa) / sa
    factors = torch.tensor([1 + 0.5 * 3, 1 + 0.5 * 3], dtype=torch.float64)
    expected = analysis.mean(0) + (analysis - analysis.mean(0)) * factors
    torch.testing.assert_close(rtps, expected)
    torch.testing.assert_close(rtps.std(0), 0.5 * analysis.std(0) + 0.5 * forecast.std(0))


def test_bad_input():
    with pytest.raises(ValueError, match="localization_radius must be > 0 grid units, got 0"):
        LETKF(localization_radius=0)
    with pytest.raises(ValueError, match="localization_radius must be > 0"):
        LETKF(localization_radius=-2.0)
    for cls in (LETKF, ETKF, EnKF):
        with pytest.raises(ValueError, match="ensemble_size must be >= 2"):
            cls(ensemble_size=1)
    with pytest.raises(ValueError, match="inflation must be a finite number >= 1"):
        ETKF(inflation=0.9)
    with pytest.raises(ValueError, match="at most one"):
        LETKF(rtps=0.5, rtpp=0.5)
    with pytest.raises(ValueError, match="solver must be one of eigh, newton, got 'qr'"):
        LETKF(solver="qr")
    with pytest.raises(ValueError, match="analysis_stride must be >= 1"):
        LETKF(analysis_stride=0)
    with pytest.raises(ValueError, match=r"observed indices must lie in \[0, 40\), found \[3, 45\]"):
        ObservationOperator("identity", 1.0, torch.tensor([3, 45]), 40)
    obs = ObservationOperator("identity", 1.0, torch.arange(40), 40)
    with pytest.raises(ValueError, match="forecast has 30 variables, the observation grid 40"):
        LETKF(ensemble_size=4, localization_radius=2).analysis(torch.zeros(4, 30), torch.zeros(40), obs)
