"""Observation operators: subsets, noise, and likelihood scores against finite differences."""

import math

import pytest
import torch

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
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        ObsConfig(sigma=0.0)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
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
