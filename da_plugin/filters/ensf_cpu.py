"""The EnSF reverse SDE on a CPU in one pass over the ensemble: block by block, all K steps.

With the one-to-one prior score and a componentwise observation operator, entry (i, k) of the
ensemble evolves through the K Euler-Maruyama steps using only its own forecast value and the
observation of variable k (what the fused GPU kernel exploits, :mod:`da_plugin.filters.ensf_fused`).
So the ensemble is cut into column blocks of about ``block_elements`` entries, which stay in cache
while they run all K steps: the [N, d] arrays are read and written once per analysis instead of
about ten times per step. The normals are drawn inside the block from the counter-based generator
(:func:`normal_pair`), keyed by global position, so the analysis does not depend on the block
size and equals the torch path's with the same :class:`~da_plugin.counter_rng.CounterDraws` up to
rounding.

The transcendental functions are polynomials here (:func:`polynomial_atan`, :func:`normal_pair`), in the
GPU kernel's spirit: vectorized, they cost a fraction of the general library functions
torch.compile would call, and they are within a few float32 ulps of them (1e-6 absolute on the
normals, 4e-7 on the arctan), which is what the torch path and this one differ by anyway.

One call of the block function takes two steps, the two draws of one Box-Muller pair. The run is
written as a sequence of such pairs of "pseudo-steps" (:func:`pseudo_steps`): the start at t = 1
is a step that keeps nothing and adds the first draw, and an odd count is completed by a step that
changes nothing, so every call has one shape and one graph. ``torch.compile`` (inductor) turns
the function into a single vectorized C++ loop; without a working C++ compiler the same function
runs eagerly, and :meth:`~da_plugin.filters.ensf.EnSF.analysis` then prefers the torch path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from da_plugin.counter_rng import CounterDraws, pair_key, polar_uniforms
from da_plugin.filters.ensf_fused import dense_observations
from da_plugin.filters.ensf_schedule import Step
from da_plugin.obs import ObservationOperator

MIN_ENTRIES = 1 << 20  # N d from which backend=auto compiles: below it the compile costs more than it saves
_compiler_failure: list[str] = []  # why torch.compile failed in this process, once it has


def compiler_usable() -> bool:
    """False once compiling the block function has failed in this process (no working C++ compiler)."""
    return not _compiler_failure


def check_compilable(forecast: torch.Tensor, obs: ObservationOperator) -> None:
    """Raise a ValueError saying why the compiled CPU kernel cannot run this analysis, if it cannot."""
    if forecast.device.type != "cpu":
        raise ValueError(f"filter.backend=compiled runs on the CPU, found {forecast.device}")
    if forecast.dtype != torch.float32:
        raise ValueError(f"filter.backend=compiled computes in float32, found a {forecast.dtype} state; "
                         "use filter.backend=torch for float64 reference runs")
    if obs.operator not in ("identity", "arctan"):
        raise ValueError(f"filter.backend=compiled fuses componentwise operators only, found {obs.operator!r}")
    if _compiler_failure:
        raise ValueError(f"filter.backend=compiled needs torch.compile, which failed here: {_compiler_failure[0]}")


# least-squares fits on Chebyshev nodes (near minimax), coefficients of increasing powers of the square:
# atan(t) / t for t in [0, 1], float32 error of 2 t P(t^2) below 4.3e-7 for every z (tests/test_ensf_cpu.py)
_ARCTAN = (0.9999998977538566, -0.33331959724324844, 0.19969235394802035, -0.140165850420984, 0.09906096896092165,
           -0.05936710078951403, 0.024166189522420185, -0.004668773307686948)
# cos(x) and sin(x) / x for x in [-pi, pi]: below 6e-7
_COSINE = (0.9999999993519378, -0.49999999843538584, 0.04166666349660225, -0.0013888863115770387,
           2.4800554705258855e-05, -2.753481015813827e-07, 2.0603618128267236e-09, -9.722586332535623e-12)
_SINE = (0.9999999998153246, -0.16666666655222956, 0.008333333145301193, -0.00019841254611508273,
         2.7556705832721448e-06, -2.5038714487137282e-08, 1.5896626352043703e-10, -6.610435565883504e-13)
# 2 atanh(v) / v for |v| <= 3 - 2 sqrt(2): log(m) = 2 atanh((m - 1) / (m + 1)), below 7e-8 for m in [1/sqrt 2, sqrt 2]
_LOG = (1.9999999986211399, 0.6666681599838439, 0.3997478736695388, 0.29925895557853666)


def _polynomial(coefficients: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    """sum_i coefficients[i] x^i by Horner's rule."""
    result = x * coefficients[-1] + coefficients[-2]
    for coefficient in coefficients[-3::-1]:
        result = result * x + coefficient
    return result


def polynomial_atan(z: torch.Tensor) -> torch.Tensor:
    """atan(z) of a float32 tensor as 2 atan(t), t = z / (1 + sqrt(1 + z^2)) in (-1, 1), by a polynomial;
    |z| is cut at 1e18, where atan is pi/2 in float32 and before z^2 overflows."""
    z = z.clamp(-1e18, 1e18)
    t = z / ((1.0 + z * z).sqrt() + 1.0)
    return 2.0 * t * _polynomial(_ARCTAN, t * t)


def _log(u: torch.Tensor) -> torch.Tensor:
    """log(u) of positive normal float32 numbers: exponent e and mantissa m in [1/sqrt 2, sqrt 2) from the
    bits, e log 2 + 2 atanh((m - 1) / (m + 1)) by a polynomial."""
    bits = u.view(torch.int32)
    mantissa = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)  # in [1, 2)
    high = mantissa > math.sqrt(2.0)
    mantissa = torch.where(high, mantissa * 0.5, mantissa)
    exponent = ((bits >> 23) - 127 + high.to(torch.int32)).to(torch.float32)
    v = (mantissa - 1.0) / (mantissa + 1.0)
    return exponent * math.log(2.0) + v * _polynomial(_LOG, v * v)


def normal_pair(counters: torch.Tensor, key: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 draws (2p, 2p + 1) at int64 ``counters`` under pair p's ``key``: counter_normal_pair's
    numbers (the same hash and uniforms, :func:`~da_plugin.counter_rng.polar_uniforms`) to 1e-6."""
    uniform, angle = polar_uniforms(counters, key)
    radius = (_log(uniform) * -2.0).sqrt()
    square = angle * angle
    return radius * _polynomial(_COSINE, square), radius * angle * _polynomial(_SINE, square)


def pseudo_steps(schedule: list[Step]) -> torch.Tensor:
    """Coefficients (keep, center, likelihood, noise) of the draws' steps, ``[pairs, 2, 4]``: draw 0
    makes z at t = 1 (keep nothing, add the draw), draw k + 1 takes step k, and a last draw with
    no partner changes nothing, so that pair p takes draws 2p and 2p + 1 as CounterDraws numbers them."""
    rows = [(0.0, 0.0, 0.0, 1.0)] + [(step.keep, step.center, step.likelihood, step.noise) for step in schedule]
    if len(rows) % 2:
        rows.append((1.0, 0.0, 0.0, 0.0))
    return torch.tensor(rows, dtype=torch.float32).view(-1, 2, 4)


def two_steps(z: torch.Tensor, center: torch.Tensor, y: torch.Tensor, precision: torch.Tensor,
              row_counters: torch.Tensor, column_counters: torch.Tensor, key: torch.Tensor,
              coefficients: torch.Tensor, arctan: bool, semi_implicit: bool) -> torch.Tensor:
    """z ``[N, w]`` after the two pseudo-steps ``coefficients`` ``[2, 4]`` with the Box-Muller pair
    ``key`` at counters ``row_counters + column_counters`` (``[N, 1]`` + ``[w]``, added in the loop);
    ``y`` and ``precision`` (1/sigma^2, 0 where unobserved) ``[w]``."""
    first, second = normal_pair(row_counters + column_counters, key)
    z = _step(z, center, y, precision, coefficients[0], first, arctan, semi_implicit)
    return _step(z, center, y, precision, coefficients[1], second, arctan, semi_implicit)


def _step(z: torch.Tensor, center: torch.Tensor, y: torch.Tensor, precision: torch.Tensor,
          coefficients: torch.Tensor, draw: torch.Tensor, arctan: bool, semi_implicit: bool) -> torch.Tensor:
    """keep z + center c + likelihood L(z) + noise xi, in the torch path's order of operations."""
    keep, center_weight, likelihood, noise = coefficients.unbind()
    if arctan:
        slope = 1.0 + z * z  # 1 / atan'(z)
        update = (y - polynomial_atan(z)) * precision / slope * likelihood
    else:
        update = (y - z) * precision * likelihood
    if semi_implicit:  # divided by 1 + likelihood x the Gauss-Newton curvature atan'(z)^2 / sigma^2
        curvature = precision / slope.square() if arctan else precision
        update = update / (curvature * likelihood + 1.0)
    return z * keep + (update + center * center_weight + draw * noise)


@functools.cache
def compiled_two_steps() -> Callable[..., torch.Tensor]:
    """:func:`two_steps` through torch.compile, made on first use: importing the compiler takes about
    2.5 s, which every ``da-cycle`` start paid while this was done at import."""
    return torch.compile(two_steps, fullgraph=True, dynamic=False)


def blocked_reverse_sde(forecast: torch.Tensor, y: torch.Tensor, obs: ObservationOperator, schedule: list[Step],
                        draws: CounterDraws, *, semi_implicit: bool = False, block_elements: int = 1 << 16,
                        compiled: bool = True) -> torch.Tensor:
    """EnSF analysis ``[N, n]`` of ``forecast`` ``[N, n]`` through ``schedule``, block by block.

    Draw k of entry (i, j) is CounterDraws' (counter ``(row_offset + i) dim + col_offset + j``).
    Blocks are ``block_elements`` // N columns (a multiple of 16, a vector of floats); the last one
    is padded. ``compiled``: the block function through torch.compile, else eagerly (what a
    compiler would fuse, for tests). A compile failure (torch's BackendCompilerFailed) is
    remembered (:func:`compiler_usable`) and raised.
    """
    check_compilable(forecast, obs)
    obs.check(y)
    members, width = forecast.shape
    columns = min(width, max(16, block_elements // members // 16 * 16))
    blocks = -(-width // columns)
    values, precision = (torch.zeros(blocks * columns) for _ in range(2))  # padded: the last block is whole
    values[:width], precision[:width] = dense_observations(obs, y, width, forecast.device)
    coefficients = list(pseudo_steps(schedule).unbind())
    pairs = len(coefficients)
    keys = [torch.tensor(pair_key(draws.seed, draws.first_draw // 2 + pair)) for pair in range(pairs)]
    row_counters = ((draws.row_offset + torch.arange(members)) * (draws.dim or width) + draws.col_offset).unsqueeze(1)
    column_counters = torch.arange(columns)
    kernel = compiled_two_steps() if compiled else two_steps
    arctan = obs.operator == "arctan"
    center = torch.zeros(members, columns)
    analysis = torch.empty_like(forecast)
    for start in range(0, width, columns):
        size = min(columns, width - start)
        center[:, :size] = forecast[:, start:start + size]
        block = slice(start, start + columns)
        z = torch.zeros(members, columns)
        for pair in range(pairs):
            z = _guarded(kernel, z, center, values[block], precision[block], row_counters + start, column_counters,
                         keys[pair], coefficients[pair], arctan, semi_implicit)
        analysis[:, start:start + size] = z[:, :size]
    return analysis


def _guarded(kernel: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
    """kernel(*args), with the reason of a failed compile remembered."""
    try:
        return kernel(*args)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        _compiler_failure.append(str(error).strip().splitlines()[0])
        raise
