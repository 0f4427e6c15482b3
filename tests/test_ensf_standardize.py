"""EnSF on a standardized state, stopped early, with spread relaxation (the SC24 SQG setting),
against independent computations: autograd for the chain rule, units for the standardization,
the schedule's own definition for the stopping time."""

import math

import pytest
import torch

from da_plugin.filters import EnSF
from da_plugin.filters.ensf import StandardizedObservations
from da_plugin.filters.ensf_schedule import reverse_sde_steps
from da_plugin.obs import ObservationOperator


@pytest.mark.parametrize("operator", ["identity", "arctan"])
def test_standardized_score_and_curvature_follow_the_chain_rule(operator):
    gen = torch.Generator().manual_seed(0)
    dim = 7
    obs = ObservationOperator(operator, 0.3, torch.tensor([0, 2, 3, 6]), dim)
    mean, spread = torch.randn(dim, generator=gen, dtype=torch.float64), torch.rand(dim, generator=gen,
                                                                                     dtype=torch.float64) + 0.5
    y = obs(torch.randn(dim, generator=gen, dtype=torch.float64))
    u = torch.randn(3, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    log_likelihood = -((y - obs(mean + spread * u)) ** 2).sum() / (2 * obs.sigma**2)
    (by_autograd,) = torch.autograd.grad(log_likelihood, u)
    standardized = StandardizedObservations(obs, mean, spread)
    torch.testing.assert_close(standardized.likelihood_score(u.detach(), y), by_autograd)
    # Gauss-Newton curvature: (d h / d u)^2 / sigma^2, with d h / d u = h'(x) spread
    x = (mean + spread * u).detach()
    slope = 1.0 / (1.0 + x**2) if operator == "arctan" else torch.ones_like(x)
    observed = torch.zeros(dim, dtype=torch.bool)
    observed[obs.indices] = True
    expected = torch.where(observed, (slope * spread) ** 2 / obs.sigma**2, 0.0)
    torch.testing.assert_close(standardized.likelihood_curvature(u.detach()), expected)


def test_a_standardized_analysis_does_not_depend_on_the_units():
    """Kelvin or millikelvin, offset or not: the same analysis in the state's units."""
    gen = torch.Generator().manual_seed(1)
    members, dim = 8, 50
    forecast = 3.0 + 2.0 * torch.randn(members, dim, generator=gen, dtype=torch.float64)
    obs = ObservationOperator("identity", 0.5, torch.arange(0, dim, 2), dim)
    y = obs(torch.randn(dim, generator=gen, dtype=torch.float64))
    ensf = EnSF(ensemble_size=members, steps=50, standardize=True, stop_time=0.5, backend="torch")
    reference = ensf.analysis(forecast, y, obs, torch.Generator().manual_seed(5))
    scale, offset = 1000.0, 273.0
    scaled_obs = ObservationOperator("identity", 0.5 * scale, obs.indices, dim)
    scaled = ensf.analysis(scale * forecast + offset, scale * y + offset, scaled_obs, torch.Generator().manual_seed(5))
    torch.testing.assert_close(scaled, scale * reference + offset)
    plain = EnSF(ensemble_size=members, steps=50, backend="torch")  # without standardization the units matter
    unscaled = plain.analysis(forecast, y, obs, torch.Generator().manual_seed(5))
    rescaled = plain.analysis(scale * forecast + offset, scale * y + offset, scaled_obs,
                              torch.Generator().manual_seed(5))
    assert not torch.allclose(rescaled, scale * unscaled + offset, rtol=1e-3)


def test_stop_time_shortens_the_steps_and_keeps_their_formula():
    steps = reverse_sde_steps(40, 0.05, 0.0, "linear", stop_time=0.5)
    full = reverse_sde_steps(80, 0.05, 0.0, "linear")
    assert len(steps) == 40
    for mine, reference in zip(steps, full[:40], strict=True):  # the same times: dt = 0.5 / 40 = 1 / 80
        assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(mine, reference, strict=True))


def test_full_spread_relaxation_keeps_the_forecast_spread_and_the_analysis_mean():
    gen = torch.Generator().manual_seed(2)
    forecast = torch.randn(10, 30, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 3.0, 30)
    obs = ObservationOperator("identity", 1.0, torch.arange(30), 30)
    y = obs(torch.zeros(30, dtype=torch.float64))
    relaxed = EnSF(ensemble_size=10, steps=50, standardize=True, stop_time=0.5, rtps=1.0, backend="torch")
    plain = EnSF(ensemble_size=10, steps=50, standardize=True, stop_time=0.5, backend="torch")
    analysis = relaxed.analysis(forecast, y, obs, torch.Generator().manual_seed(3))
    reference = plain.analysis(forecast, y, obs, torch.Generator().manual_seed(3))
    assert reference.std(0).mean() < 0.7 * forecast.std(0).mean()  # without relaxation the spread shrinks
    torch.testing.assert_close(analysis.std(0), forecast.std(0))
    torch.testing.assert_close(analysis.mean(0), reference.mean(0))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"filter.stop_time=1.0 is out of range: must be a number in \[0, 1\)"):
        EnSF(stop_time=1.0)
    with pytest.raises(ValueError, match=r"filter.min_spread=-1.0 is out of range: must be a finite number >= 0"):
        EnSF(min_spread=-1.0)
    with pytest.raises(ValueError, match=r"filter.rtps=1.5 is out of range: must be a number in \[0, 1\]"):
        EnSF(rtps=1.5)
    with pytest.raises(ValueError, match="filter.standardize runs on the torch backend"):
        EnSF(standardize=True, backend="triton")


def test_a_spread_floor_lets_the_observations_move_a_collapsed_ensemble():
    """All members equal (a forecast model that contracts them): standardized by their own spread
    the observations carry no weight; with min_spread they pull the analysis as for any prior of
    that spread."""
    forecast = torch.zeros(6, 40, dtype=torch.float64) + 1e-9 * torch.randn(6, 40, dtype=torch.float64,
                                                                              generator=torch.Generator().manual_seed(0))
    obs = ObservationOperator("identity", 1.0, torch.arange(40), 40)
    y = torch.ones(40, dtype=torch.float64)
    settings = dict(ensemble_size=6, steps=50, standardize=True, stop_time=0.5, backend="torch")
    stuck = EnSF(**settings).analysis(forecast, y, obs, torch.Generator().manual_seed(1))
    moved = EnSF(**settings, min_spread=1.0).analysis(forecast, y, obs, torch.Generator().manual_seed(1))
    assert stuck.mean().abs() < 1e-6
    assert 0.3 < moved.mean() < 1.0  # between the forecast (0) and the observations (1)
    assert moved.std(0).mean() > 0.1  # and the members differ again
