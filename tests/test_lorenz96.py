"""Lorenz-96 against an independent NumPy integrator written from the equations."""

import numpy as np
import pytest
import torch

from da_plugin.models import Lorenz96
from da_plugin.models.lorenz96 import HALO_LEFT, HALO_RIGHT, haloed_tendency, tendency


def numpy_tendency(x: np.ndarray, forcing: float) -> np.ndarray:
    """dx_k/dt with explicit modular indices, one variable at a time."""
    d = len(x)
    return np.array([(x[(k + 1) % d] - x[k - 2]) * x[k - 1] - x[k] + forcing for k in range(d)])


def numpy_integrate(x: np.ndarray, forcing: float, time: float, substeps: int) -> np.ndarray:
    """Heun's (2nd-order) method with many tiny steps: a different scheme for the same ODE."""
    h = time / substeps
    for _ in range(substeps):
        k1 = numpy_tendency(x, forcing)
        k2 = numpy_tendency(x + h * k1, forcing)
        x = x + 0.5 * h * (k1 + k2)
    return x


def test_tendency_matches_indexed_formula():
    x = np.random.default_rng(0).normal(size=7) * 3
    ours = tendency(torch.tensor(x), 8.0).numpy()
    np.testing.assert_allclose(ours, numpy_tendency(x, 8.0), rtol=1e-13)


def test_a_haloed_slab_gets_the_tendency_of_the_whole_state_bit_for_bit():
    x = 8.0 + torch.randn(2, 11, generator=torch.Generator().manual_seed(3))
    whole = tendency(x, 8.0)
    for start, stop in [(0, 4), (4, 9), (9, 11)]:
        haloed = x[:, torch.arange(start - HALO_LEFT, stop + HALO_RIGHT) % 11]
        torch.testing.assert_close(haloed_tendency(haloed, 8.0), whole[:, start:stop], rtol=0, atol=0)


def test_rk4_matches_independent_integrator_and_is_fourth_order():
    rng = np.random.default_rng(1)
    x0 = 8.0 + rng.normal(size=10)
    reference = numpy_integrate(x0, 8.0, 0.2, 20000)
    errors = []
    for dt in (0.02, 0.01):
        model = Lorenz96(dim=10, forcing=8.0, dt=dt)
        x = model.step(torch.tensor(x0), steps=round(0.2 / dt)).numpy()
        errors.append(np.abs(x - reference).max())
    assert errors[1] < 5e-5  # the Heun reference itself is good to about 1e-8
    assert 12 < errors[0] / errors[1] < 20  # 2^4 = 16 for a 4th-order scheme


def test_batched_equals_one_at_a_time_and_dtypes():
    model = Lorenz96(dim=13, forcing=8.0, dt=0.01)
    batch = 8.0 + torch.randn(3, 4, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    stepped = model.step(batch, steps=5)
    for i in range(3):
        for j in range(4):
            torch.testing.assert_close(stepped[i, j], model.step(batch[i, j], steps=5), rtol=0, atol=0)
    single = model.step(batch.float(), steps=5)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), stepped, rtol=1e-5, atol=1e-5)


def test_rejects_small_dim_and_wrong_state():
    with pytest.raises(ValueError, match="dim must be >= 4"):
        Lorenz96(dim=3)
    with pytest.raises(ValueError, match="has 5 variables"):
        Lorenz96(dim=6).step(torch.zeros(5))
