"""EnSF against independent computations: a brute-force mixture score, the exact Gaussian
limit of the discretized reverse SDE, and the Kalman posterior."""

import pytest
import torch

from da_plugin.filters import EnSF
from da_plugin.filters.ensf_mixture import mixture_mean
from da_plugin.filters.ensf_schedule import alpha, damping_weight, sigma2
from da_plugin.obs import ObservationOperator


def brute_force_mixture_mean(z, forecast, alpha, sigma2):
    """m(z_i) = sum_j w_ij x_j, w_ij = softmax_j(-|z_i - alpha x_j|^2 / (2 sigma^2)), by loops."""
    out = torch.zeros_like(z)
    for i in range(z.shape[0]):
        logits = torch.stack([-((z[i] - alpha * x) ** 2).sum() / (2 * sigma2) for x in forecast])
        weights = torch.exp(logits - logits.max())
        weights /= weights.sum()
        out[i] = sum(w * x for w, x in zip(weights, forecast, strict=True))
    return out


def gaussian_limit_mean(f: EnSF, mu, P, H, r, y, forecast=None):
    """Mean of the discretized reverse SDE when the prior is exactly N(mu, P), by linear algebra.

    Mixture score (forecast=None): E[x0 | z_t] = mu + G_t (z - alpha mu), G_t = alpha P (alpha^2 P + sigma^2)^-1.
    One-to-one score: the member's own forecast ``forecast`` replaces E[x0 | z_t].
    """
    d = len(mu)
    eye = torch.eye(d, dtype=mu.dtype)
    mean = torch.zeros(d, dtype=mu.dtype)
    dt = 1.0 / f.steps
    for k in range(f.steps):
        t = 1.0 - k * dt
        a, s2 = alpha(t, f.eps_alpha), sigma2(t, f.eps_beta)
        drift = -(1 - f.eps_alpha) / a
        g2 = (1 - f.eps_beta) - 2 * drift * s2
        c_z, c_center, c_lik = 1 - dt * drift - dt * g2 / s2, dt * g2 * a / s2, dt * g2 * damping_weight(t, f.damping)
        if forecast is None:
            gain = a * P @ torch.linalg.inv(a * a * P + s2 * eye)
            A = c_z * eye + c_center * gain - c_lik * H.T @ H / r
            b = c_center * (mu - a * gain @ mu) + c_lik * H.T @ y / r
        else:
            A = c_z * eye - c_lik * H.T @ H / r
            b = c_center * forecast + c_lik * H.T @ y / r
        mean = A @ mean + b
    return mean


def linear_gaussian_problem(observed):
    gen = torch.Generator().manual_seed(1)
    mu = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64)
    A = torch.randn(4, 4, generator=gen, dtype=torch.float64) * 0.5
    P = A @ A.T + 0.5 * torch.eye(4, dtype=torch.float64)
    H = torch.eye(4, dtype=torch.float64)[observed]
    return mu, P, H


@pytest.mark.parametrize("chunk_size", [1 << 20, 3])
def test_mixture_mean_matches_brute_force(chunk_size):
    gen = torch.Generator().manual_seed(0)
    forecast = 5 + torch.randn(6, 10, dtype=torch.float64, generator=gen)
    z = torch.randn(6, 10, dtype=torch.float64, generator=gen)
    for a, s2 in [(0.3, 0.7), (0.9, 0.05)]:
        torch.testing.assert_close(mixture_mean(z, forecast, a, s2, chunk_size),
                                   brute_force_mixture_mean(z, forecast, a, s2), rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_mixture_converges_to_gaussian_limit_as_n_grows():
    mu, P, H = linear_gaussian_problem([0, 2])
    r, y = 0.49, torch.tensor([2.0, -1.0], dtype=torch.float64)
    obs = ObservationOperator("identity", r**0.5, torch.tensor([0, 2]), 4)
    f = EnSF(ensemble_size=2, prior_score="mixture")
    exact = gaussian_limit_mean(f, mu, P, H, r, y)
    chol = torch.linalg.cholesky(P)
    gen = torch.Generator().manual_seed(3)
    errors = {}
    for n in (100, 1600):
        trials = []
        for _ in range(3):
            forecast = mu + torch.randn(n, 4, dtype=torch.float64, generator=gen) @ chol.T
            trials.append((f.analysis(forecast, y, obs, gen).mean(0) - exact).norm())
        errors[n] = torch.stack(trials).mean().item()
    assert errors[1600] < 0.15, errors
    assert errors[1600] < 0.5 * errors[100], errors  # Monte-Carlo error ~ N^-1/2: 4x smaller


def test_one_to_one_member_follows_its_exact_linear_recursion():
    mu, P, H = linear_gaussian_problem([0, 1, 3])
    r, y = 0.25, torch.tensor([2.0, -1.0, 1.5], dtype=torch.float64)
    obs = ObservationOperator("identity", 0.5, torch.tensor([0, 1, 3]), 4)
    member = torch.tensor([0.5, 0.1, -0.7, 2.5], dtype=torch.float64)
    f = EnSF(ensemble_size=2)
    exact = gaussian_limit_mean(f, mu, P, H, r, y, forecast=member)
    copies = member.expand(20000, 4).clone()  # identical members: their spread is pure SDE noise
    mean = f.analysis(copies, y, obs, torch.Generator().manual_seed(0)).mean(0)
    torch.testing.assert_close(mean, exact, rtol=0, atol=0.02)


def test_mixture_near_kalman_posterior_for_precise_full_observations():
    """EnSF's damped likelihood (h = 1 - t) is not exact for linear-Gaussian problems; with
    precise observations its bias is about 2% of the increment here, and the ensemble mean
    approaches the Kalman mean up to that floor as N grows."""
    mu, P, H = linear_gaussian_problem([0, 1, 2, 3])
    r = 0.01
    y = torch.tensor([2.0, -1.0, 0.5, 1.0], dtype=torch.float64)
    kalman = mu + P @ torch.linalg.solve(P + r * torch.eye(4, dtype=torch.float64), y - mu)
    obs = ObservationOperator("identity", 0.1, torch.arange(4), 4)
    f = EnSF(ensemble_size=2, prior_score="mixture")
    bias = (gaussian_limit_mean(f, mu, P, H, r, y) - kalman).norm().item()
    assert bias < 0.03 * (kalman - mu).norm().item()
    chol = torch.linalg.cholesky(P)
    gen = torch.Generator().manual_seed(5)
    for n, tolerance in ((200, 0.35), (2000, 0.12)):
        forecast = mu + torch.randn(n, 4, dtype=torch.float64, generator=gen) @ chol.T
        error = (f.analysis(forecast, y, obs, gen).mean(0) - kalman).norm().item()
        assert error < tolerance, (n, error)


@pytest.mark.parametrize("prior_score", ["one_to_one", "mixture"])
def test_seeded_reproducible_and_members_distinct(prior_score):
    f = EnSF(ensemble_size=5, steps=20, prior_score=prior_score)
    obs = ObservationOperator("arctan", 0.05, torch.arange(0, 30, 2), 30)
    forecast = torch.ones(5, 30)  # identical members must still come out distinct
    y = obs(torch.full((30,), 0.5))
    a = f.analysis(forecast, y, obs, torch.Generator().manual_seed(7))
    b = f.analysis(forecast, y, obs, torch.Generator().manual_seed(7))
    c = f.analysis(forecast, y, obs, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.cdist(a, a).add(torch.eye(5) * 1e9).min() > 1e-3


def test_bad_input():
    with pytest.raises(ValueError, match=r"filter.ensemble_size=1 is out of range: must be an integer >= 2"):
        EnSF(ensemble_size=1)
    with pytest.raises(ValueError, match=r"filter.eps_alpha=.* is out of range: must be a number in \(0, 1\)"):
        EnSF(eps_alpha=1.5)
    obs = ObservationOperator("identity", 1.0, torch.arange(4), 4)
    y = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    with pytest.raises(ValueError, match="non-finite"):
        EnSF(ensemble_size=3).analysis(torch.zeros(3, 4), y, obs, torch.Generator())


@pytest.mark.parametrize("likelihood_step", ["explicit", "semi_implicit"])
@pytest.mark.parametrize("steps,sigma", [(10, 0.3), (10, 1.0), (3, 1.0)])
def test_steep_step_note_reports_the_factor_the_steps_apply(steps, sigma, likelihood_step):
    # identity observations make the one-to-one reverse SDE linear in z: a difference in the draw
    # at t = 1 reaches the analysis multiplied by every step's factor, keep - g with
    # g = likelihood / sigma^2, or keep - g / (1 + g) with the semi-implicit step
    dim = 3
    ensf = EnSF(ensemble_size=2, steps=steps, prior_score="one_to_one", backend="torch",
                likelihood_step=likelihood_step)
    obs = ObservationOperator("identity", sigma, torch.arange(dim), dim)
    forecast = torch.tensor([[0.3, -1.0, 2.0], [1.0, 0.5, -0.2]], dtype=torch.float64)
    y = torch.tensor([0.4, -0.8, 1.9], dtype=torch.float64)
    draws = torch.randn(steps + 1, 2, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    nudged = draws.clone()
    nudged[0, 1, 2] += 1e6  # linear: a large nudge keeps the difference clear of rounding
    difference = (ensf.reverse_sde(forecast, y, obs, lambda k: nudged[k])
                  - ensf.reverse_sde(forecast, y, obs, lambda k: draws[k]))[1, 2] / 1e6
    stiffness = [step.likelihood / sigma**2 for step in ensf.schedule()]
    if likelihood_step == "semi_implicit":
        stiffness = [g / (1 + g) for g in stiffness]
    factors = [step.keep - g for step, g in zip(ensf.schedule(), stiffness, strict=True)]
    torch.testing.assert_close(difference, torch.tensor(factors, dtype=torch.float64).prod(), rtol=1e-5, atol=0)
    note = ensf.steep_step_note(sigma)
    amplifying = sum(factor < -1 for factor in factors)
    if amplifying:
        assert f"{amplifying} of the filter.steps={steps}" in note and f"{min(factors):.2f}" in note
    else:
        assert note is None


def test_semi_implicit_step_keeps_stiff_identity_observations_stable():
    # sigma = 0.05 and K = 100: explicit steps multiply differences by down to -5 and the analysis
    # blows up; the semi-implicit step stays near the observations, which pull hard
    dim, sigma = 50, 0.05
    gen = torch.Generator().manual_seed(0)
    truth = torch.randn(dim, generator=gen, dtype=torch.float64)
    forecast = truth + torch.randn(20, dim, generator=gen, dtype=torch.float64)
    obs = ObservationOperator("identity", sigma, torch.arange(dim), dim)
    y = obs.sample(truth, gen)
    analyses = {}
    for likelihood_step in ("explicit", "semi_implicit"):
        ensf = EnSF(steps=100, backend="torch", likelihood_step=likelihood_step)
        analyses[likelihood_step] = ensf.analysis(forecast, y, obs, torch.Generator().manual_seed(1))
    assert not (analyses["explicit"].abs().max() < 1e10)  # huge, inf or NaN
    assert (analyses["semi_implicit"].mean(0) - y).abs().max() < 0.5
    assert EnSF(steps=100, likelihood_step="semi_implicit").steep_step_note(sigma) is None



def test_an_unknown_likelihood_step_is_refused():
    with pytest.raises(ValueError, match="likelihood_step"):
        EnSF(likelihood_step="implicit")
