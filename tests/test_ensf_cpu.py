"""The compiled CPU EnSF backend (da_plugin.filters.ensf_cpu) against the torch reverse SDE with
the same counter-based noise.

Most tests run the block function eagerly (``compiled=False``): the same code torch.compile turns
into C++, without the compile. The slow tests compile it, and run the fallback without a working
C++ compiler in a subprocess.
"""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from da_plugin.counter_rng import CounterDraws, counter_normal, counter_normal_pair, pair_key
from da_plugin.filters.ensf import EnSF
from da_plugin.filters.ensf_cpu import MIN_ENTRIES, blocked_reverse_sde, normal_pair, polynomial_atan, pseudo_steps
from da_plugin.obs import ObservationOperator

ROOT = Path(__file__).resolve().parent.parent
DIM, MEMBERS, STEPS = 300, 5, 12
SMALL_BLOCKS = MEMBERS * 48  # 48 columns a block: 7 blocks, the last one padded


def problem(operator: str, indices: torch.Tensor, sigma: float = 0.5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    truth = 3.0 * torch.randn(DIM, generator=gen)
    forecast = truth + torch.randn(MEMBERS, DIM, generator=gen)
    obs = ObservationOperator(operator, sigma, indices, DIM)
    return forecast, obs.sample(truth, gen), obs


def torch_reference(ensf: EnSF, forecast, y, obs, seed: int) -> torch.Tensor:
    """The torch path with counter_normal's draws, the numbers CounterDraws(seed) names."""
    return replace(ensf, backend="torch").reverse_sde(
        forecast, y, obs, noise=lambda k: counter_normal(seed, k, MEMBERS, 0, DIM, DIM))


def blocked(ensf: EnSF, forecast, y, obs, compiled: bool = False, **draws) -> torch.Tensor:
    return blocked_reverse_sde(forecast, y, obs, ensf.schedule(), CounterDraws(**draws),
                               semi_implicit=ensf.likelihood_step == "semi_implicit",
                               block_elements=ensf.block_elements, compiled=compiled)


def test_the_polynomial_arctan_is_within_float32_rounding_for_every_state():
    z = torch.cat([torch.linspace(-12.0, 12.0, 200_001), torch.logspace(-30, 30, 601), -torch.logspace(-30, 30, 601)])
    assert (polynomial_atan(z).double() - z.double().atan()).abs().max() < 5e-7
    tiny = torch.logspace(-30, -3, 100)
    torch.testing.assert_close(polynomial_atan(tiny), tiny, rtol=1e-6, atol=0)  # relative accuracy near 0


def test_the_polynomial_normals_are_the_counter_generators_numbers():
    rows, start, stop, dim = 7, 13, 100_013, 200_000
    counters = (2 + torch.arange(rows)).unsqueeze(1) * dim + torch.arange(start, stop)
    for pair in (0, 9):
        first, second = normal_pair(counters, pair_key(21, pair))
        cosine, sine = counter_normal_pair(21, pair, rows, start, stop, dim, row_offset=2)
        torch.testing.assert_close(first, cosine, rtol=0, atol=3e-6)  # |r| up to 6: a few ulps of r
        torch.testing.assert_close(second, sine, rtol=0, atol=3e-6)


@pytest.mark.parametrize("likelihood_step", ["explicit", "semi_implicit"])
@pytest.mark.parametrize("operator", ["arctan", "identity"])
@pytest.mark.parametrize("indices", [torch.arange(DIM), torch.arange(1, DIM, 3)], ids=["all", "every-third"])
def test_blocks_through_all_steps_match_the_torch_reverse_sde(operator, indices, likelihood_step):
    forecast, y, obs = problem(operator, indices, sigma=0.5 if likelihood_step == "explicit" else 0.1)
    ensf = EnSF(ensemble_size=MEMBERS, steps=STEPS, likelihood_step=likelihood_step, block_elements=SMALL_BLOCKS)
    analysis = blocked(ensf, forecast, y, obs, seed=11)
    # float32, the likelihood score's operations in another order: agreement to a few ulps of |z| ~ 10
    torch.testing.assert_close(analysis, torch_reference(ensf, forecast, y, obs, 11), rtol=0, atol=2e-5)
    assert (analysis - forecast).abs().mean() > 0.1  # the analysis moved the members


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_short_runs_take_the_draws_the_torch_path_takes(steps):
    # an even K leaves the last pair's second draw unused: its pseudo-step must change nothing
    forecast, y, obs = problem("arctan", torch.arange(DIM))
    ensf = EnSF(ensemble_size=MEMBERS, steps=steps, block_elements=SMALL_BLOCKS)
    assert len(pseudo_steps(ensf.schedule())) == steps // 2 + 1
    torch.testing.assert_close(blocked(ensf, forecast, y, obs, seed=4), torch_reference(ensf, forecast, y, obs, 4),
                               rtol=0, atol=2e-5)


def test_the_analysis_does_not_depend_on_the_blocks():
    forecast, y, obs = problem("arctan", torch.arange(1, DIM, 2))
    ensf = EnSF(ensemble_size=MEMBERS, steps=STEPS)
    whole = blocked(ensf, forecast, y, obs, seed=2)  # one block of all 300 columns
    for block_elements in (MEMBERS * 16, MEMBERS * 112):
        torch.testing.assert_close(blocked(replace(ensf, block_elements=block_elements), forecast, y, obs, seed=2),
                                   whole, rtol=0, atol=1e-6)


def test_a_slab_and_a_block_of_members_draw_the_numbers_of_the_whole_state():
    forecast, y, obs = problem("arctan", torch.arange(DIM))
    ensf = EnSF(ensemble_size=MEMBERS, steps=STEPS, block_elements=SMALL_BLOCKS)
    whole = blocked(ensf, forecast, y, obs, seed=5, first_draw=8)
    start, stop, rows = 101, 250, slice(2, 4)
    slab_obs, positions = obs.restrict(start, stop)
    part = blocked(ensf, forecast[rows, start:stop], y[positions], slab_obs, seed=5, first_draw=8, row_offset=2,
                   col_offset=start, dim=DIM)
    torch.testing.assert_close(part, whole[rows, start:stop], rtol=0, atol=1e-6)


def test_auto_compiles_large_one_to_one_float32_analyses_only():
    members, dim = 16, MIN_ENTRIES // 16
    forecast = torch.zeros(members, dim)
    obs = ObservationOperator("arctan", 0.5, torch.arange(dim), dim)
    auto = EnSF(ensemble_size=members)
    assert auto.analysis_backend(forecast, obs) == "compiled"
    assert auto.analysis_backend(forecast[:, :-1], obs) == "torch"  # below MIN_ENTRIES
    assert auto.analysis_backend(forecast.double(), obs) == "torch"
    assert replace(auto, prior_score="mixture").analysis_backend(forecast, obs) == "torch"
    assert replace(auto, standardize=True).analysis_backend(forecast, obs) == "torch"
    assert replace(auto, backend="torch").analysis_backend(forecast, obs) == "torch"
    assert replace(auto, backend="compiled").analysis_backend(forecast[:, :5], obs) == "compiled"


def test_what_the_compiled_backend_cannot_run_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="one_to_one"):
        EnSF(backend="compiled", prior_score="mixture")
    with pytest.raises(ValueError, match="standardize"):
        EnSF(backend="compiled", standardize=True)
    forecast, y, obs = problem("arctan", torch.arange(DIM))
    ensf = EnSF(ensemble_size=MEMBERS, steps=STEPS, backend="compiled")
    with pytest.raises(ValueError, match="float32"):
        ensf.analysis(forecast.double(), y, obs, CounterDraws(seed=1))


@pytest.mark.slow  # a cold compile takes 10 to 40 s on 2 cores (then torch's on-disk cache serves it)
def test_the_compiled_kernel_matches_the_torch_reverse_sde():
    forecast, y, obs = problem("arctan", torch.arange(1, DIM, 3))
    ensf = EnSF(ensemble_size=MEMBERS, steps=STEPS, backend="compiled", block_elements=SMALL_BLOCKS)
    analysis = ensf.analysis(forecast, y, obs, CounterDraws(seed=7))
    torch.testing.assert_close(analysis, torch_reference(ensf, forecast, y, obs, 7), rtol=0, atol=2e-5)


FALLBACK = """
import warnings, torch
from da_plugin.counter_rng import CounterDraws
from da_plugin.filters.ensf import EnSF
from da_plugin.obs import ObservationOperator
members, dim = 16, {entries} // 16
forecast = torch.randn(members, dim, generator=torch.Generator().manual_seed(0))
obs = ObservationOperator("arctan", 0.5, torch.arange(dim), dim)
y = torch.zeros(dim)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    auto = EnSF(ensemble_size=members, steps=2).analysis(forecast, y, obs, CounterDraws(seed=3))
plain = EnSF(ensemble_size=members, steps=2, backend="torch").analysis(forecast, y, obs, CounterDraws(seed=3))
print("warned:", any("torch.compile failed" in str(w.message) for w in caught))
print("same:", torch.equal(auto, plain))
try:  # the failure is remembered: the next analysis asking for the compiled backend is refused at once
    EnSF(ensemble_size=members, steps=2, backend="compiled").analysis(forecast, y, obs, CounterDraws(seed=3))
except ValueError as error:
    print("refused:", "C++ compiler" in str(error))
"""


@pytest.mark.slow  # a subprocess importing torch and failing a compile: about 10 s
def test_without_a_cpp_compiler_auto_falls_back_to_the_torch_path(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", FALLBACK.format(entries=MIN_ENTRIES)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["warned:", "True", "same:", "True", "refused:", "True"], result.stdout
