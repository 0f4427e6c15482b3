"""Observation operators: subsets, noise, and likelihood scores against finite differences."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from da_plugin.obs import ObsConfig, ObservationOperator, strided_positions


def log_likelihood(obs: ObservationOperator, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((y - obs(z)) ** 2).sum(-1) / obs.sigma**2


@pytest.mark.parametrize("operator", ["identity", "arctan"])
@pytest.mark.parametrize("indices", [torch.arange(6), torch.tensor([0, 2, 5])])
def test_likelihood_score_matches_finite_differences(operator, indices):
    gen = torch.Generator().manual_seed(0)
    obs = ObservationOperator(operator, 0.3, indices, dim=6)
    z = torch.randn(3, 6, dtype=torch.float64, generator=gen) * 2
    y = obs(torch.randn(6, dtype=torch.float64, generator=gen))
    score = obs.likelihood_score(z, y)
    eps = 1e-6
    for k in range(6):
        e = torch.zeros(6, dtype=torch.float64)
        e[k] = eps
        fd = (log_likelihood(obs, z + e, y) - log_likelihood(obs, z - e, y)) / (2 * eps)
        torch.testing.assert_close(score[:, k], fd, rtol=1e-6, atol=1e-6)


def test_subsets_from_config():
    gen = torch.Generator().manual_seed(0)
    strided = ObservationOperator.from_config(ObsConfig(stride=3), (10,), gen)
    assert strided.indices.tolist() == [0, 3, 6, 9]
    random_a = ObservationOperator.from_config(ObsConfig(random_fraction=0.3), (20,), torch.Generator().manual_seed(4))
    random_b = ObservationOperator.from_config(ObsConfig(random_fraction=0.3), (20,), torch.Generator().manual_seed(4))
    assert random_a.size == 6 and random_a.indices.tolist() == random_b.indices.tolist()
    assert random_a.indices.unique().numel() == 6


@pytest.mark.parametrize("stride", [1, 3])
def test_a_slab_from_the_config_is_the_restricted_global_operator(stride):
    config = ObsConfig(operator="arctan", sigma=0.2, stride=stride)
    full = ObservationOperator.from_config(config, (50,), torch.Generator())
    for start, stop in [(0, 17), (17, 18), (18, 50), (4, 5)]:
        restricted, positions = full.restrict(start, stop)
        slab, slab_positions = ObservationOperator.slab_from_config(config, 50, start, stop)
        assert list(slab_positions) == positions.tolist() == list(strided_positions(start, stop, stride))
        assert torch.equal(slab.indices, restricted.indices) and slab.dim == restricted.dim == stop - start
        assert (slab.operator, slab.sigma) == (restricted.operator, restricted.sigma)
    with pytest.raises(ValueError, match="random_fraction"):
        ObservationOperator.slab_from_config(ObsConfig(random_fraction=0.5), 50, 0, 10)


def test_noise_has_requested_sigma():
    obs = ObservationOperator("identity", 0.5, torch.arange(20000), 20000)
    y = obs.sample(torch.zeros(20000, dtype=torch.float64), torch.Generator().manual_seed(1))
    assert abs(y.std().item() - 0.5) < 0.01


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match=r"obs.sigma=0.0 is out of range: must be a finite number > 0"):
        ObsConfig(sigma=0.0)
    with pytest.raises(ValueError, match=r"observation sigma=-1.0 is out of range: must be a finite number > 0"):
        ObservationOperator("identity", -1.0, torch.arange(3), 3)
    with pytest.raises(ValueError, match=r"observed indices must lie in \[0, 4\)"):
        ObservationOperator("identity", 1.0, torch.tensor([1, 4]), 4)
    obs = ObservationOperator("arctan", 1.0, torch.arange(4), 4)
    with pytest.raises(ValueError, match="non-finite value.*observation 2"):
        obs.check(torch.tensor([0.0, 1.0, math.nan, math.inf]))
    with pytest.raises(ValueError, match="expected 4 values, found 3"):
        obs.check(torch.zeros(3))


@pytest.mark.parametrize("operator", ["identity", "arctan"])
def test_likelihood_curvature_is_the_squared_jacobian_over_sigma2(operator):
    dim, sigma = 7, 0.3
    obs = ObservationOperator(operator, sigma, torch.tensor([1, 4, 5]), dim)
    z = torch.linspace(-3, 3, 2 * dim, dtype=torch.float64).reshape(2, dim).requires_grad_()
    slopes, = torch.autograd.grad(obs(z).sum(), z)  # h is componentwise: the gradient holds h'(z) where observed
    torch.testing.assert_close(obs.likelihood_curvature(z.detach()), slopes**2 / sigma**2)


# property-based: any operator, any subset, any state, against plain per-element Python

OPERATORS = st.sampled_from(["identity", "arctan"])


@st.composite
def observed_states(draw):
    """(operator, sigma, sorted or shuffled indices, dim, state [2, dim]) with values of any magnitude."""
    dim = draw(st.integers(1, 40))
    indices = draw(st.lists(st.integers(0, dim - 1), min_size=0, max_size=dim, unique=True))
    if draw(st.booleans()):
        indices = sorted(indices)
    state = draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2 * dim, max_size=2 * dim))
    sigma = draw(st.floats(1e-3, 1e3))
    return draw(OPERATORS), sigma, indices, dim, torch.tensor(state, dtype=torch.float64).reshape(2, dim)


@settings(max_examples=150, deadline=None)
@given(case=observed_states())
def test_operator_picks_and_maps_each_observed_variable(case):
    operator, sigma, indices, dim, x = case
    obs = ObservationOperator(operator, sigma, torch.tensor(indices, dtype=torch.long), dim)
    h = obs(x)
    assert h.shape == (2, len(indices))
    for member in range(2):
        for k, i in enumerate(indices):
            value = x[member, i].item()
            expected = math.atan(value) if operator == "arctan" else value
            assert h[member, k].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    if operator == "arctan":
        assert (h.abs() < math.pi / 2 + 1e-12).all()
    # the likelihood terms live on the observed variables only
    y = torch.zeros(len(indices), dtype=torch.float64)
    unobserved = sorted(set(range(dim)) - set(indices))
    assert (obs.likelihood_score(x, y)[:, unobserved] == 0).all()
    assert (obs.likelihood_curvature(x)[:, unobserved] == 0).all()
    curvature = obs.likelihood_curvature(x)[:, indices]
    assert (curvature > 0).all() or not indices
    assert (curvature <= sigma**-2 * (1 + 1e-12)).all()


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 200), length=st.integers(0, 200), stride=st.integers(1, 17))
def test_strided_positions_match_a_brute_force_count(start, length, stride):
    stop = start + length
    observed = [i for i in range(0, stop + stride, stride)]  # every stride-th variable from 0
    expected = [k for k, i in enumerate(observed) if start <= i < stop]
    assert list(strided_positions(start, stop, stride)) == expected


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=30))
def test_check_rejects_exactly_the_non_finite_observations(values):
    obs = ObservationOperator("identity", 1.0, torch.arange(len(values)), len(values))
    bad = [k for k, v in enumerate(values) if not math.isfinite(v)]
    y = torch.tensor(values, dtype=torch.float64)
    if not bad:
        obs.check(y)
        return
    with pytest.raises(ValueError, match=rf"{len(bad)} non-finite value\(s\) \(NaN/inf\), first at observation "
                                         rf"{bad[0]} \(state variable {bad[0]}\)"):
        obs.check(y)


@settings(max_examples=150, deadline=None)
@given(sigma=st.floats(allow_nan=True, allow_infinity=True), stride=st.integers(-3, 5),
       fraction=st.none() | st.floats(allow_nan=True, allow_infinity=True))
def test_obs_config_accepts_exactly_the_valid_settings(sigma, stride, fraction):
    valid = (math.isfinite(sigma) and sigma > 0 and stride >= 1
             and (fraction is None or (0 < fraction <= 1 and stride == 1)))
    if valid:
        ObsConfig(sigma=sigma, stride=stride, random_fraction=fraction)
    else:
        with pytest.raises(ValueError, match=r"obs\.(sigma|stride|random_fraction)"):
            ObsConfig(sigma=sigma, stride=stride, random_fraction=fraction)
