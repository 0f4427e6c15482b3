"""The fused Triton EnSF kernel against the torch reverse SDE with the same counter-based noise.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
these tests exercise the kernel's own code; on a GPU they run it compiled.
"""

import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from da_plugin.counter_rng import CounterDraws, counter_normal, counter_normal_pair, pair_key, splitmix64  # noqa: E402
from da_plugin.filters import ensf_fused  # noqa: E402
from da_plugin.filters.ensf import EnSF  # noqa: E402
from da_plugin.filters.ensf_fused import check_fusable, scaled_coefficients  # noqa: E402
from da_plugin.obs import ObservationOperator  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parent.parent
DIM, MEMBERS, STEPS = 300, 5, 12


def problem(operator: str, indices: torch.Tensor, sigma: float = 0.5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    truth = 3.0 * torch.randn(DIM, generator=gen)
    forecast = truth + torch.randn(MEMBERS, DIM, generator=gen)
    obs = ObservationOperator(operator, sigma, indices, DIM)
    return forecast.to(DEVICE), obs.sample(truth, gen).to(DEVICE), obs


def fused(ensf: EnSF, forecast, y, obs, **draws) -> torch.Tensor:
    """The fused kernel's analysis, through the one place that dispatches to it (EnSF.analysis)."""
    return replace(ensf, backend="triton").analysis(forecast, y, obs, CounterDraws(**draws))


@pytest.mark.parametrize("likelihood_step", ["explicit", "semi_implicit"])
@pytest.mark.parametrize("prior_score", ["one_to_one", "mixture"])
@pytest.mark.parametrize("operator", ["arctan", "identity"])
@pytest.mark.parametrize("indices", [torch.arange(DIM), torch.arange(1, DIM, 3)], ids=["all", "every-third"])
def test_fused_kernel_matches_the_torch_reverse_sde(prior_score, operator, indices, likelihood_step):
    # with every variable observed ("all"), the kernel takes the precision from its coefficient table
    forecast, y, obs = problem(operator, indices, sigma=0.5 if likelihood_step == "explicit" else 0.1)
    ensf = EnSF(ensemble_size=MEMBERS, steps=STEPS, prior_score=prior_score, backend="torch",
                likelihood_step=likelihood_step)
    reference = ensf.reverse_sde(forecast, y, obs,
                                 noise=lambda k: counter_normal(11, k, MEMBERS, 0, DIM, DIM, device=DEVICE))
    analysis = fused(ensf, forecast, y, obs, seed=11)
    assert torch.isfinite(analysis).all()
    # float32 with different log/cos/atan implementations: agreement to a few ulps of |z| ~ 10
    torch.testing.assert_close(analysis, reference, rtol=0, atol=2e-5)
    assert (analysis - forecast).abs().mean() > 0.1  # the analysis moved the members


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_short_runs_take_the_draws_the_torch_path_takes(steps):
    # the kernel's first step, its paired loop and its last unpaired step each come into play
    forecast, y, obs = problem("arctan", torch.arange(DIM))
    ensf = EnSF(ensemble_size=MEMBERS, steps=steps, backend="torch")
    reference = ensf.reverse_sde(forecast, y, obs,
                                 noise=lambda k: counter_normal(4, k, MEMBERS, 0, DIM, DIM, device=DEVICE))
    torch.testing.assert_close(fused(ensf, forecast, y, obs, seed=4), reference, rtol=0, atol=2e-5)


@pytest.mark.parametrize("curvature", [0.0, 4.0], ids=["explicit", "semi-implicit"])
@pytest.mark.parametrize("arctan", [True, False], ids=["arctan", "identity"])
def test_the_scaled_table_reproduces_the_schedule(arctan, curvature):
    # w = z / s_k through the table's rows gives the plain recurrence
    # z' = keep z + center c + L(z) / (1 + likelihood curvature h'(z)^2) + noise xi
    schedule = EnSF(steps=7).schedule()
    table = scaled_coefficients(schedule, arctan, curvature=curvature).double()
    gen = torch.Generator().manual_seed(0)
    z, center, draws = torch.randn(50, generator=gen), torch.randn(50, generator=gen), torch.randn(7, 50, generator=gen)
    score = torch.sin  # any score: the table scales the arctan score by s_k^2

    def slope2(x):  # h'(x)^2
        return 1.0 / (1.0 + x * x) ** 2 if arctan else torch.ones_like(x)

    plain, w = z.clone(), z * table[0, 1]
    for k, step in enumerate(schedule):
        increment = step.likelihood * score(plain) / (1.0 + step.likelihood * curvature * slope2(plain))
        plain = step.keep * plain + step.center * center + increment + step.noise * draws[k]
        scale, _, _, keep, centre, likelihood, kernel_curvature, _ = table[k].tolist()
        if arctan:  # the kernel's score is s^2 L(z), divided by 1 + curvature' r^4 with r^2 = s^2 / (1 + z^2)
            r2 = scale**2 / (1.0 + (scale * w) ** 2)
            increment = likelihood * scale**2 * score(scale * w) / (1.0 + kernel_curvature * r2**2)
        else:
            increment = likelihood * score(scale * w)
        w = keep * w + centre * center + increment + draws[k]
    torch.testing.assert_close(w * table[7, 0], plain, rtol=1e-6, atol=1e-6)


@triton.jit
def _arctan_score_kernel(out_ptr, w_ptr, scale, y_precision, precision, n, ALL_OBSERVED: tl.constexpr,
                         FAST: tl.constexpr):
    i = tl.arange(0, 1024)
    w = tl.load(w_ptr + i, mask=i < n, other=0.0)
    out = ensf_fused._arctan_score(w, 1.0 / scale, 1.0 / (scale * scale), y_precision, precision, 0.0, ALL_OBSERVED,
                                   False, FAST)
    tl.store(out_ptr + i, out, mask=i < n)


@pytest.mark.parametrize("all_observed", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.1, 0.03])
@pytest.mark.parametrize("y", [2.0, 0.0])
def test_arctan_score_is_accurate_from_tiny_to_huge_states(scale, y, all_observed):
    magnitudes = torch.logspace(-30, 20, 300, dtype=torch.float64)
    z = torch.cat([magnitudes, -magnitudes, torch.linspace(-10, 10, 301, dtype=torch.float64)])
    z = z.float().double()  # values a float32 state holds
    precision = 400.0
    w = (z / scale).float().to(DEVICE)
    out = torch.empty_like(w)
    # every variable observed: the kernel takes y and leaves the precision to the coefficient table
    _arctan_score_kernel[(1,)](out, w, scale, y if all_observed else y * precision, precision, len(w),
                               ALL_OBSERVED=all_observed, FAST=not ensf_fused._INTERPRETED)
    out = out.double().cpu() * (precision if all_observed else 1.0)
    exact = scale**2 * precision * (y - torch.atan(z)) / (1.0 + z * z)
    error = (out - exact).abs()
    # where the score is large, to a few float32 ulps, relative: y = 0 tests atan itself, down to tiny z
    central = z.abs() <= 3
    relative = error[central] / exact[central].abs()
    worst = z[central][relative.argmax()]
    assert relative.max() < 2e-6, f"worst relative error {relative.max():.2e} at z = {worst:.3g}"
    # everywhere, what a step feels: the error against the score's scale s^2 precision (1 + |y|)
    accepted = z.abs() <= ensf_fused.ARCTAN_RANGE
    scaled = error[accepted] / (scale**2 * precision * (1.0 + abs(y)))
    assert scaled.max() < 3e-7, f"worst error {scaled.max():.2e} of the scale at z = {z[scaled.argmax()]:.3g}"
    # beyond 1e17, (1 + z^2) / s^2 may saturate; the score stays negligible, as it should be
    huge = (z.abs() > 1e17) & accepted
    assert error[huge].max() < 1e-12 * scale**2 * precision


def test_a_diverged_forecast_is_refused_by_the_arctan_kernel_only():
    forecast, y, obs = problem("arctan", torch.arange(DIM))
    forecast[1, 7] = 3e20
    ensf = EnSF(ensemble_size=MEMBERS, steps=STEPS)
    with pytest.raises(ValueError, match=r"3e\+20.*diverged"):
        fused(ensf, forecast, y, obs, seed=1)
    identity = ObservationOperator("identity", 0.5, torch.arange(DIM), DIM)
    assert torch.isfinite(fused(ensf, forecast, y, identity, seed=1)).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_slab_and_a_block_of_members_draw_the_numbers_of_the_whole_state(backend):
    forecast, y, obs = problem("arctan", torch.arange(DIM))
    ensf = EnSF(ensemble_size=MEMBERS, steps=STEPS, backend=backend)
    analysis = lambda *args, **draws: ensf.analysis(*args, CounterDraws(**draws))  # noqa: E731
    whole = analysis(forecast, y, obs, seed=5, first_draw=8)
    start, stop, rows = 101, 250, slice(2, 4)
    slab_obs, positions = obs.restrict(start, stop)
    part = analysis(forecast[rows, start:stop], y[positions.to(y.device)], slab_obs, seed=5, first_draw=8,
                    row_offset=2, col_offset=start, dim=DIM)
    torch.testing.assert_close(part, whole[rows, start:stop], rtol=0, atol=1e-6)


def test_counter_normals_are_standard_normal_and_keyed_by_stream():
    z = counter_normal(0, 0, 4, 0, 250_000, 250_000, torch.float64)
    assert abs(z.mean().item()) < 0.005 and abs(z.var().item() - 1.0) < 0.01
    assert abs((z**4).mean().item() - 3.0) < 0.05  # Gaussian kurtosis
    assert abs(torch.corrcoef(torch.stack([z[0], z[1]]))[0, 1].item()) < 0.01
    assert not torch.equal(counter_normal(0, 1, 1, 0, 100, 100), counter_normal(0, 2, 1, 0, 100, 100))


def test_hash_and_box_muller_against_python_integers():
    # SplitMix64 and Box-Muller in exact Python integers and floats, entry by entry, on a slab of
    # rows near counter 2^40 that spans two of the generator's blocks (2^18 entries on CPUs)
    key = pair_key(3, 2) % 2**64  # draws 4 and 5
    first_row, start, dim = 2_748_779, 5, 400_000
    even, odd = counter_normal_pair(3, 2, 2, start, start + 300_000, dim, torch.float64, row_offset=first_row)
    for row, column in [(0, 0), (0, 1), (1, 2**18 - 1), (1, 2**18), (0, 299_999)]:
        bits = splitmix64(((first_row + row) * dim + start + column) ^ key)
        radius = math.sqrt(-2.0 * math.log(((bits >> 32) + 0.5) * 2.0**-32))
        angle = (((bits & 0xFFFFFFFF) + 0.5) * 2.0**-32 - 0.5) * 2.0 * math.pi
        assert even[row, column].item() == pytest.approx(radius * math.cos(angle), rel=1e-13, abs=1e-13)
        assert odd[row, column].item() == pytest.approx(radius * math.sin(angle), rel=1e-13, abs=1e-13)
    # drawing one at a time gives the pair's numbers, bit for bit
    pair = counter_normal_pair(3, 2, 2, 5, 300_005, dim)
    for draw in (4, 5):
        torch.testing.assert_close(counter_normal(3, draw, 2, 5, 300_005, dim), pair[draw % 2], rtol=0, atol=0)


def test_unfusable_analyses_are_refused_with_the_reason():
    forecast, y, obs = problem("arctan", torch.arange(DIM))
    with pytest.raises(ValueError, match="float32"):
        check_fusable(forecast.double(), obs)
    with pytest.raises(ValueError, match="even"):
        CounterDraws(seed=1, first_draw=3)


def test_the_instruction_counter_compiles_both_kernels_for_the_h100():
    # bench/ensf_fused_sass.py compiles for sm_90 on any machine; it must keep up with the kernel's signature
    pytest.importorskip("triton.backends.nvidia")
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "ensf_fused_sass.py"), "--steps", "10"],
                            capture_output=True, text=True, env=environment, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    fused, floor = map(float, re.search(r"per state element: fused (\d+), floor (\d+)", result.stdout).groups())
    assert fused > floor > 0  # the fused kernel draws the floor's normals and does the steps besides
