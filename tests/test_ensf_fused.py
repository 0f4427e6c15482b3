"""The fused Triton EnSF kernel against the torch reverse SDE with the same counter-based noise.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
these tests exercise the kernel's own code; on a GPU they run it compiled.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from da_plugin.counter_rng import box_muller, counter_normal, pair_key, splitmix64  # noqa: E402
from da_plugin.filters.ensf import EnSF  # noqa: E402
from da_plugin.filters.ensf_fused import check_fusable, fused_reverse_sde  # noqa: E402
from da_plugin.obs import ObservationOperator  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIM, MEMBERS, STEPS = 300, 5, 12


def problem(operator: str, indices: torch.Tensor, sigma: float = 0.5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    truth = 3.0 * torch.randn(DIM, generator=gen)
    forecast = truth + torch.randn(MEMBERS, DIM, generator=gen)
    obs = ObservationOperator(operator, sigma, indices, DIM)
    return forecast.to(DEVICE), obs.sample(truth, gen).to(DEVICE), obs


@pytest.mark.parametrize("prior_score", ["one_to_one", "mixture"])
@pytest.mark.parametrize("operator,indices", [("arctan", torch.arange(DIM)), ("identity", torch.arange(1, DIM, 3))])
def test_fused_kernel_matches_the_torch_reverse_sde(prior_score, operator, indices):
    forecast, y, obs = problem(operator, indices)
    ensf = EnSF(ensemble_size=MEMBERS, steps=STEPS, prior_score=prior_score, backend="torch")
    reference = ensf.reverse_sde(forecast, y, obs,
                                 noise=lambda k: counter_normal(11, k, MEMBERS, 0, DIM, DIM, device=DEVICE))
    fused = fused_reverse_sde(ensf, forecast, y, obs, seed=11)
    assert torch.isfinite(fused).all()
    # float32 with different log/cos/atan implementations: agreement to a few ulps of |z| ~ 10
    torch.testing.assert_close(fused, reference, rtol=0, atol=2e-5)
    assert (fused - forecast).abs().mean() > 0.1  # the analysis moved the members


def test_a_slab_and_a_block_of_members_draw_the_numbers_of_the_whole_state():
    forecast, y, obs = problem("arctan", torch.arange(DIM))
    ensf = EnSF(ensemble_size=MEMBERS, steps=STEPS)
    whole = fused_reverse_sde(ensf, forecast, y, obs, seed=5, first_draw=8)
    start, stop, rows = 101, 250, slice(2, 4)
    slab_obs, positions = obs.restrict(start, stop)
    part = fused_reverse_sde(ensf, forecast[rows, start:stop], y[positions.to(y.device)], slab_obs, seed=5,
                             first_draw=8, row_offset=2, col_offset=start, dim=DIM)
    torch.testing.assert_close(part, whole[rows, start:stop], rtol=0, atol=1e-6)


def test_counter_normals_are_standard_normal_and_keyed_by_stream():
    z = counter_normal(0, 0, 4, 0, 250_000, 250_000, torch.float64)
    assert abs(z.mean().item()) < 0.005 and abs(z.var().item() - 1.0) < 0.01
    assert abs((z**4).mean().item() - 3.0) < 0.05  # Gaussian kurtosis
    assert abs(torch.corrcoef(torch.stack([z[0], z[1]]))[0, 1].item()) < 0.01
    assert not torch.equal(counter_normal(0, 1, 1, 0, 100, 100), counter_normal(0, 2, 1, 0, 100, 100))


def test_hash_and_box_muller_against_python_integers():
    # the tensor SplitMix64 (wrapping int64) equals the exact Python-integer one, bit for bit
    counters = [0, 1, 12345, 2**40 + 7]
    key = pair_key(3, 2)  # draws 4 and 5
    expected = [splitmix64(c ^ (key % 2**64)) for c in counters]
    words = torch.tensor([e - 2**64 if e >= 2**63 else e for e in expected[:3]], dtype=torch.int64)
    for draw, odd in [(4, False), (5, True)]:
        normals = counter_normal(3, draw, 1, 0, 12346, 12346, torch.float64)[0, [0, 1, 12345]]
        torch.testing.assert_close(normals, box_muller(words, torch.float64, odd), rtol=0, atol=0)
    # the two draws of a pair are r cos and r sin of one angle
    squared_radius = sum(counter_normal(3, draw, 1, 0, 2, 2, torch.float64)[0, 1] ** 2 for draw in (4, 5))
    assert squared_radius.item() == pytest.approx(-2.0 * math.log(((expected[1] >> 32) + 0.5) * 2.0**-32), rel=1e-12)


def test_unfusable_analyses_are_refused_with_the_reason():
    forecast, y, obs = problem("arctan", torch.arange(DIM))
    with pytest.raises(ValueError, match="float32"):
        check_fusable(forecast.double(), obs)
    ensf = EnSF(ensemble_size=MEMBERS, steps=STEPS)
    with pytest.raises(ValueError, match="even"):
        fused_reverse_sde(ensf, forecast, y, obs, seed=1, first_draw=3)
