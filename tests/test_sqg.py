"""The torch SQG model against independent references written from the equations in NumPy:
a per-mode 2x2 solve for the inversion, an exact triad-sum (Galerkin) Jacobian, the analytic
Jacobian of trigonometric fields, energy conservation, and the growth rate of the linear normal
mode of the jet from a meridional-Fourier eigenvalue problem (compared with Eady's 0.31 U f/(N H))."""

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from da_plugin.models import MODELS, SQG, sqg
from da_plugin.models.integrate import rk4
from da_plugin.models.sqg import invert, jacobian, tendency

INVISCID = {"tdiab": math.inf, "diff_efold": math.inf, "r": 0.0}


def wavenumbers(n: int, length: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Integer and dimensional (k, l) of numpy's full fft2 layout, ``[n, n]`` (rows l, columns k)."""
    ni = np.fft.fftfreq(n, 1.0 / n)
    nl, nk = np.meshgrid(ni, ni, indexing="ij")
    return nk, nl, 2 * np.pi * nk / length, 2 * np.pi * nl / length


def np_invert(theta_hat: np.ndarray, model: SQG) -> np.ndarray:
    """psi on both lids: psi = A cosh(mu z/H) + B sinh(mu z/H), d(psi)/dz = theta/s at z = 0, H."""
    _, _, k, l = wavenumbers(model.N, model.L)
    mu = np.hypot(k, l) * math.sqrt(model.nsq) * model.H / model.f
    q = theta_hat / model.scale
    psi = np.zeros_like(theta_hat)
    for i, j in zip(*np.nonzero(mu)):
        m = mu[i, j]
        system = np.array([[0.0, m / model.H], [m / model.H * math.sinh(m), m / model.H * math.cosh(m)]])
        a, b = np.linalg.solve(system, q[..., :, i, j].T)
        psi[..., 0, i, j] = a
        psi[..., 1, i, j] = a * math.cosh(m) + b * math.sinh(m)
    return psi


def np_theta_from_psi(psi_hat: np.ndarray, model: SQG) -> np.ndarray:
    """The inverse operator: theta = s d(psi)/dz on the lids, from psi on the lids."""
    _, _, k, l = wavenumbers(model.N, model.L)
    mu = np.hypot(k, l) * math.sqrt(model.nsq) * model.H / model.f
    mu_safe = np.where(mu > 0, mu, 1.0)
    a = psi_hat[..., 0, :, :]
    b = (psi_hat[..., 1, :, :] - a * np.cosh(mu_safe)) / np.sinh(mu_safe)
    dz0 = mu_safe / model.H * b
    dz1 = mu_safe / model.H * (a * np.sinh(mu_safe) + b * np.cosh(mu_safe))
    return model.scale * np.where(mu > 0, np.stack((dz0, dz1), -3), 0.0)


def np_jacobian_galerkin(a_hat: np.ndarray, b_hat: np.ndarray, model: SQG) -> np.ndarray:
    """J(a, b) projected on |k|, |l| < N/2 by summing over all triads p + q = m (no FFT products).

    a = sum_p a_p e^{i p.x} gives J = -sum_{p,q} (p_x q_y - p_y q_x) a_p b_q e^{i(p+q).x}.
    """
    n = model.N
    nk, nl, k, l = wavenumbers(n, model.L)
    keep = (np.abs(nk) < n // 2) & (np.abs(nl) < n // 2)
    out = np.zeros_like(a_hat)
    for i, j in zip(*np.nonzero(keep)):
        shifted_k = (nk + nk[i, j]).astype(int) % n  # m = p + q on the periodic index grid
        shifted_l = (nl + nl[i, j]).astype(int) % n
        total_ok = keep & (np.abs(nk + nk[i, j]) < n // 2) & (np.abs(nl + nl[i, j]) < n // 2)
        weight = -(k[i, j] * l - l[i, j] * k) * total_ok
        np.add.at(out, (..., shifted_l, shifted_k), a_hat[..., i, j][..., None, None] * weight * b_hat)
    return out


def np_tendency(theta: np.ndarray, model: SQG) -> np.ndarray:
    """d(theta)/dt on the grid: -J(psi, theta) + (theta_eq - theta)/tdiab + Ekman, from the equations."""
    n = model.N
    theta_hat = np.fft.fft2(theta, norm="forward")
    psi_hat = np_invert(theta_hat, model)
    adv = np_jacobian_galerkin(psi_hat, theta_hat, model)
    _, _, k, l = wavenumbers(n, model.L)
    # the jet: lid winds u = -d(psi)/dy = w sin(2 pi y/L), w = (U/2, -U/2), or (0, -U) if asymmetric
    wave = 2 * np.pi / model.L
    winds = (model.U / 2, -model.U / 2) if model.symmetric else (0.0, -model.U)
    y = np.arange(n) * model.L / n
    psi_jet = np.stack([np.outer(w / wave * np.cos(wave * y), np.ones(n)) for w in winds])
    theta_eq_hat = np_theta_from_psi(np.fft.fft2(psi_jet, norm="forward"), model)
    rhs = -adv + (theta_eq_hat - theta_hat) / model.tdiab
    ekman_sign = np.array([1.0, -1.0 if model.symmetric else 0.0])[:, None, None]
    rhs = rhs + model.scale * model.r * ekman_sign * (k**2 + l**2) * psi_hat
    return np.fft.ifft2(rhs, norm="forward").real


def smooth_field(model: SQG, seed: int, batch: tuple[int, ...] = (), kmax: int | None = None) -> torch.Tensor:
    """Random float64 theta (K), ``[*batch, 2, N, N]``, with modes |k|, |l| <= kmax only (no Nyquist)."""
    n = model.N
    kmax = n // 2 - 1 if kmax is None else kmax
    rng = np.random.default_rng(seed)
    spec = rng.normal(size=(*batch, 2, n, n)) + 1j * rng.normal(size=(*batch, 2, n, n))
    nk, nl, _, _ = wavenumbers(n, model.L)
    spec *= (np.abs(nk) <= kmax) & (np.abs(nl) <= kmax)
    field = np.fft.ifft2(spec).real
    return torch.tensor(3.0 * field / field.std())


def energy(theta: torch.Tensor, model: SQG) -> float:
    """Total energy per area (up to f^2/N^2): mean over the grid of psi_1 q_1 - psi_0 q_0, q = theta/s."""
    theta_hat = np.fft.fft2(theta.numpy(), norm="forward")
    psi = np.fft.ifft2(np_invert(theta_hat, model), norm="forward").real
    q = theta.numpy() / model.scale
    return float((psi[1] * q[1] - psi[0] * q[0]).mean())


def test_inversion_round_trip_and_reference():
    model = SQG(N=16)
    theta = smooth_field(model, seed=0)
    theta = theta - theta.mean(dim=(-2, -1), keepdim=True)
    theta_hat = torch.fft.rfft2(theta, norm="forward")
    psi_hat = invert(theta_hat, model.operators(torch.float64, "cpu"))
    psi = torch.fft.irfft2(psi_hat, s=(16, 16), norm="forward").numpy()
    back = np_theta_from_psi(np.fft.fft2(psi, norm="forward"), model)
    np.testing.assert_allclose(np.fft.ifft2(back, norm="forward").real, theta.numpy(), atol=1e-11)
    reference = np_invert(np.fft.fft2(theta.numpy(), norm="forward"), model)
    np.testing.assert_allclose(psi, np.fft.ifft2(reference, norm="forward").real, rtol=0, atol=1e-9 * np.abs(psi).max())


@pytest.mark.parametrize("p, q", [((3, 2), (1, -4)), ((10, 3), (9, -2))])
def test_jacobian_of_cosines_is_analytic(p, q):
    """J(cos(p.x), cos(q.x)) = (p x q)/2 [cos((p-q).x) - cos((p+q).x)], minus modes beyond N/2."""
    n, length = 32, 20.0e6
    model = SQG(N=n, L=length)
    ops = model.operators(torch.float64, "cpu")
    y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) * length / n,) * 2, indexing="ij")
    wave = 2 * math.pi / length
    phase = lambda v: wave * (v[0] * x + v[1] * y)  # noqa: E731
    cross = wave**2 * (p[0] * q[1] - p[1] * q[0])
    expected = 0.5 * cross * torch.cos(phase(np.subtract(p, q)))
    total = np.add(p, q)
    if max(abs(total)) < n // 2:  # (10, 3) + (9, -2) = (19, 1) is not resolved; it would alias onto (-13, 1)
        expected = expected - 0.5 * cross * torch.cos(phase(total))
    spectra = [torch.fft.rfft2(torch.cos(phase(v)), norm="forward") for v in (p, q)]
    result = torch.fft.irfft2(jacobian(*spectra, ops), s=(n, n), norm="forward")
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-12 * abs(cross))
    compat = SQG(N=n, L=length, sqgturb_compat=True).operators(torch.float64, "cpu")
    correct = jacobian(*spectra, ops)
    torch.testing.assert_close(jacobian(*spectra, compat), 2.25 * correct, rtol=0, atol=1e-14 * correct.abs().max())


def test_tendency_matches_numpy_reference():
    for model in (SQG(N=16, r=2.0, tdiab=5 * 86400.0), SQG(N=16, r=1.0, symmetric=False, U=20.0)):
        theta = model.jet() + smooth_field(model, seed=1)
        ops = model.operators(torch.float64, "cpu")
        ours = torch.fft.irfft2(tendency(torch.fft.rfft2(theta, norm="forward"), ops), s=(16, 16), norm="forward")
        reference = np_tendency(theta.numpy(), model)
        scale = np.abs(reference).max()
        np.testing.assert_allclose(ours.numpy(), reference, rtol=0, atol=1e-10 * scale)


def sqgturb_jacobian(a: np.ndarray, b: np.ndarray, model: SQG) -> np.ndarray:
    """sqgturb's dealiased J(a, b) on the grid: unnormalized numpy FFTs, spectra times 2.25 when
    zero-padded to 3N/2 (the N-grid Nyquist column conjugated into column N/2), no rescaling
    after the forward FFT of the product on the 3N/2 grid."""
    n, m, h = model.N, 3 * model.N // 2, model.N // 2
    _, _, k, l = wavenumbers(m, model.L)
    k, l = k[:, : m // 2 + 1], l[:, : m // 2 + 1]

    def padded_gradient(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        spec = np.fft.rfft2(field)
        pad = np.zeros((*spec.shape[:-2], m, m // 2 + 1), complex)
        for rows_n, rows_m in ((slice(0, h), slice(0, h)), (slice(n - h, n), slice(m - h, m))):
            pad[..., rows_m, :h] = 2.25 * spec[..., rows_n, :h]
            pad[..., rows_m, h] = np.conj(2.25 * spec[..., rows_n, h])
        return np.fft.irfft2(1j * k * pad, s=(m, m)), np.fft.irfft2(1j * l * pad, s=(m, m))

    ax, ay = padded_gradient(a)
    bx, by = padded_gradient(b)
    product = np.fft.rfft2(ax * by - ay * bx)
    out = np.zeros((*a.shape[:-2], n, h + 1), complex)
    out[..., :h, :h] = product[..., :h, :h]
    out[..., n - h:, :h] = product[..., m - h:, :h]
    return np.fft.irfft2(out, s=(n, n))


def test_compat_mode_reproduces_sqgturb_jacobian_including_nyquist_modes():
    model = SQG(N=16, sqgturb_compat=True)
    a, b = (smooth_field(model, seed, kmax=8) for seed in (2, 3))  # kmax = N/2: Nyquist modes present
    spectra = [torch.fft.rfft2(v, norm="forward") for v in (a, b)]
    ours = torch.fft.irfft2(jacobian(*spectra, model.operators(torch.float64, "cpu")), s=(16, 16), norm="forward")
    reference = sqgturb_jacobian(a.numpy(), b.numpy(), model)
    np.testing.assert_allclose(ours.numpy(), reference, rtol=0, atol=1e-12 * np.abs(reference).max())


def test_sqgturb_dynamics_are_the_true_ones_with_a_stronger_jet():
    """With J -> 2.25 J, phi = 2.25 theta obeys the true equations with theta_eq -> 2.25 theta_eq (U -> 2.25 U)
    (apart from the l = -N/2 row, which sqgturb keeps and the true 3/2 rule drops)."""
    compat, stronger = SQG(N=16, r=1.0, sqgturb_compat=True), SQG(N=16, r=1.0, U=2.25 * 30.0)
    theta = compat.jet() + smooth_field(compat, seed=6)
    rates = [tendency(torch.fft.rfft2(field, norm="forward"), model.operators(torch.float64, "cpu"))
             for model, field in ((compat, theta), (stronger, 2.25 * theta))]
    assert rates[0][..., 8, :].abs().max() > 1e-3 * rates[0].abs().max()
    rates[0][..., 8, :] = 0.0
    torch.testing.assert_close(2.25 * rates[0], rates[1], rtol=0, atol=1e-12 * rates[1].abs().max())


@pytest.mark.parametrize("symmetric", [True, False])
def test_jet_is_steady(symmetric):
    model = SQG(N=32, symmetric=symmetric, diff_efold=math.inf)
    jet = model.jet()
    assert jet[0].std() > 5.0
    assert torch.allclose(jet[..., :1], jet)  # zonal: a function of y only
    assert (model.step(jet, 30) - jet).abs().max() < 1e-12 * jet.abs().max()
    # hyperdiffusion alone nudges the jet's wave by exp(-dt/efold (1/16)^8) = 1 - 3e-12 per step
    diffused = SQG(N=32, symmetric=symmetric)
    assert (diffused.step(jet, 30) - jet).abs().max() < 30 * 4e-12 * jet.abs().max()


def test_energy_conserved_without_forcing_to_fourth_order_in_dt():
    base = SQG(N=32, **INVISCID)
    theta0 = base.jet() + smooth_field(base, seed=4, kmax=6)
    e0 = energy(theta0, base)
    errors = []
    for dt in (3600.0, 1800.0, 900.0):
        model = SQG(N=32, dt=dt, **INVISCID)
        errors.append(abs(energy(model.step(theta0, round(86400 / dt)), model) / e0 - 1))
    assert errors[0] < 1e-6
    assert errors[0] / errors[1] > 10 and errors[1] / errors[2] > 10  # 2^4 = 16 for RK4


def jet_normal_mode(model: SQG, zonal_wave: int, nmax: int) -> tuple[complex, np.ndarray]:
    """Fastest-growing linear mode exp(i k x + sigma t) of the jet, with meridional Fourier modes
    |n| <= nmax: d(theta'_i)/dt = -U_i(y) d(theta'_i)/dx - v'_i d(Theta_i)/dy.

    Returns (sigma, coefficients ``[2, 2 nmax + 1]``)."""
    wave = 2 * np.pi / model.L
    k = zonal_wave * wave
    ns = np.arange(-nmax, nmax + 1)
    size = len(ns)
    lid_wind = np.array([model.U / 2, -model.U / 2])  # U_i(y) = lid_wind[i] sin(wave y)
    psi_jet = model.U / (2 * wave) * np.array([1.0, -1.0])  # Psi_i = psi_jet[i] cos(wave y)
    mu1 = wave * math.sqrt(model.nsq) * model.H / model.f
    b1 = (psi_jet[1] - psi_jet[0] * math.cosh(mu1)) / math.sinh(mu1)
    theta_jet = model.scale * mu1 / model.H * np.array([b1, psi_jet[0] * math.sinh(mu1) + b1 * math.cosh(mu1)])
    matrix = np.zeros((2 * size, 2 * size), complex)
    for j, nj in enumerate(ns):
        mu = math.hypot(k, nj * wave) * math.sqrt(model.nsq) * model.H / model.f
        # psi' from theta' on this mode (from the 2x2 relation of np_invert), then v' = i k psi'
        coth, csch = math.cosh(mu) / math.sinh(mu), 1 / math.sinh(mu)
        inv = np.linalg.inv(model.scale * mu / model.H * np.array([[-coth, csch], [-csch, coth]]))
        for i in (0, 1):
            for shift, sign in ((1, 1.0), (-1, -1.0)):  # sin(wave y) = (e^{i wave y} - e^{-i wave y}) / 2i
                if 0 <= j + shift < size:
                    row = i * size + j + shift
                    matrix[row, i * size + j] -= sign * lid_wind[i] / 2j * 1j * k
                    gradient = -theta_jet[i] * wave  # d(Theta_i)/dy = gradient sin(wave y)
                    for src in (0, 1):
                        matrix[row, src * size + j] -= sign * gradient / 2j * 1j * k * inv[i, src]
    values, vectors = np.linalg.eig(matrix)
    best = np.argmax(values.real)
    return values[best], vectors[:, best].reshape(2, size)


def test_linear_growth_of_jet_normal_mode_and_eady_rate():
    n, zonal_wave, nmax = 32, 5, 15
    model = SQG(N=n, dt=3600.0, **INVISCID)
    sigma, coefficients = jet_normal_mode(model, zonal_wave, nmax)
    eady = 0.3098 * model.U * model.f / (math.sqrt(model.nsq) * model.H)  # uniform shear U/H
    # the jet's shear reaches U/H only at its core, so its fastest mode is a bit slower than Eady's
    assert 0.85 < sigma.real / eady < 0.95
    y, x = np.meshgrid(*(np.arange(n) * 2 * np.pi / n,) * 2, indexing="ij")
    mode = sum(coefficients[:, j, None, None] * np.exp(1j * (nj * y + zonal_wave * x))
               for j, nj in enumerate(range(-nmax, nmax + 1)))
    perturbation = torch.tensor(mode.real / np.abs(mode.real).max() * 1e-6)
    jet = model.jet()
    days = 4
    grown = model.step(jet + perturbation, days * 24) - jet
    rate = math.log(grown.norm() / perturbation.norm()) / (days * 86400)
    assert rate == pytest.approx(sigma.real, rel=1e-3)


def test_batched_equals_one_at_a_time_and_seeded_runs_repeat():
    model = SQG(N=32)
    def members() -> torch.Tensor:  # the jet with a strong seeded perturbation: a nonlinear regime
        return torch.stack([model.jet() + 10 * model.initial_state(torch.Generator().manual_seed(s), torch.float64)
                            for s in range(3)])

    states = members()
    assert (states[0] - states[1]).abs().max() > 1.0  # members differ
    batched = model.step(states, 10)
    for i in range(3):
        torch.testing.assert_close(batched[i], model.step(states[i], 10), rtol=0, atol=1e-12)
    again = model.step(members(), 10)
    assert torch.equal(again, batched)
    single = model.step(states.float(), 10)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), batched, rtol=0, atol=1e-3)


def reference_step(model: SQG, x: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` RK4 steps written plainly: the readable ``tendency``, fresh tensors, then hyperdiffusion."""
    ops = model.operators(x.dtype, "cpu")
    spec = torch.fft.rfft2(x, norm="forward")
    for _ in range(steps):
        spec = ops.hyperdiff * rk4(lambda s: tendency(s, ops), spec, model.dt)
    return torch.fft.irfft2(spec, s=(model.N, model.N), norm="forward")


@pytest.mark.parametrize("model", [SQG(N=16, r=2.0, tdiab=5 * 86400.0, dt=3600.0),
                                   SQG(N=16, r=1.0, symmetric=False, sqgturb_compat=True, dt=1800.0),
                                   SQG(N=18, sqgturb_compat=True, diff_efold=3600.0)])
def test_step_buffers_equal_the_plain_rk4_of_the_tendency(model):
    """The stepper (own layout, in-place buffers, conjugated compat column) against ``reference_step``,
    on states with Nyquist content (the modes each mode treats specially) and extra batch dimensions."""
    x = model.jet() + smooth_field(model, seed=7, batch=(2, 3), kmax=model.N // 2)
    expected = reference_step(model, x, 5)
    assert (expected - x).abs().max() > 0.1  # it moved
    torch.testing.assert_close(model.step(x, 5), expected, rtol=0, atol=1e-12 * expected.abs().max())
    torch.testing.assert_close(model.step(x.float(), 5).double(), expected, rtol=0, atol=1e-4 * expected.abs().max())


def test_groups_of_members_over_worker_threads_give_the_same_numbers(monkeypatch):
    model = SQG(N=32, sqgturb_compat=True)
    x = torch.stack([model.jet() + smooth_field(model, seed) for seed in range(5)])
    expected = reference_step(model, x, 3)
    threads = torch.get_num_threads()
    one_thread = model.step(x, 3) if threads == 1 else None
    torch.set_num_threads(2)  # two worker threads
    try:
        two_threads = model.step(x, 3)
        assert torch.get_num_threads() == 2  # restored after the step
        monkeypatch.setattr(sqg, "GROUP_BYTES", 1)  # one member per group
        grouped = model.step(x, 3)
    finally:
        torch.set_num_threads(threads)
    assert one_thread is None or torch.equal(one_thread, two_threads)  # the thread count changes nothing
    torch.testing.assert_close(grouped, expected, rtol=0, atol=1e-12 * expected.abs().max())
    torch.testing.assert_close(two_threads, expected, rtol=0, atol=1e-12 * expected.abs().max())


def test_worker_threads_step_under_the_callers_inference_mode(monkeypatch):
    """da-cycle steps under torch.inference_mode, which is per thread: the workers must take it (an
    inference tensor's groups are updated in place there), and buffers made then must serve later
    steps outside it. The numbers are those of a plain step."""
    model = SQG(N=32, sqgturb_compat=True)
    x = torch.stack([model.jet() + smooth_field(model, seed) for seed in range(4)])
    monkeypatch.setattr(sqg, "GROUP_BYTES", 1)  # one member per group: both workers busy
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sqg._workers.cache_clear()  # the buffers are made in inference mode below
        with torch.inference_mode():
            inside = model.step(x.clone(), 2)
        outside = model.step(x, 2)
    finally:
        torch.set_num_threads(threads)
    assert inside.is_inference() and not outside.is_inference()
    torch.testing.assert_close(inside.clone(), outside, rtol=0, atol=0)


def test_steps_from_several_threads_do_not_share_buffers_at_once():
    model = SQG(N=32)
    states = [model.jet() + smooth_field(model, seed) for seed in range(4)]
    expected = [model.step(x, 4) for x in states]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda x: model.step(x, 4), states))
        assert torch.get_num_threads() == 2  # restored by the last step to finish
    finally:
        torch.set_num_threads(threads)
    for result, reference in zip(results, expected, strict=True):
        assert torch.equal(result, reference)


def test_initial_state_and_registry():
    model = MODELS["sqg"]()
    state = model.initial_state(torch.Generator().manual_seed(0), torch.float32)
    assert state.shape == (2, 64, 64) and state.dtype == torch.float32
    assert 0.2 < state.std() < 0.4  # sqgturb's white noise of 100 m/s of pv is 0.31 K
    assert state.mean(dim=(-2, -1)).abs().max() < 1e-6
    preset = SQG.preset(256)
    assert (preset.N, preset.dt, preset.diff_efold) == (256, 240.0, 10800.0)


def test_bad_input_is_named():
    model = SQG(N=16)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 2, 16, 16\] .*found \[2, 32, 32\]"):
        model.step(torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="found \\[16, 16\\]"):
        model.step(torch.zeros(16, 16))
    with pytest.raises(ValueError, match="float32 or float64, found torch.int64"):
        model.step(torch.zeros(2, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="steps must be >= 0"):
        model.step(torch.zeros(2, 16, 16), -1)
    with pytest.raises(ValueError, match="N must be an even number >= 8, got 15"):
        SQG(N=15)
    with pytest.raises(ValueError, match="dt must be > 0"):
        SQG(dt=0.0)
    with pytest.raises(ValueError, match="no SQG preset for N=96"):
        SQG.preset(96)
