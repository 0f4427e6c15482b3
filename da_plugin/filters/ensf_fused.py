"""The EnSF reverse SDE as one Triton kernel: each state element is read once and written once.

With the one-to-one prior score, member i's variable k evolves through all K Euler-Maruyama
steps using only its own forecast value and the observation of variable k, so a GPU thread
can keep z in registers for the whole analysis and draw every normal in place from the
counter-based generator of :mod:`da_plugin.counter_rng` (the numbers the torch path with
``counter_normal`` noise uses). Memory traffic is then the floor, 4 bytes x (2 N d + 2 d), and
the time is set by the random numbers and the arithmetic, which is kept to about 20 operations
per step: the arctan score needs no branches and one reciprocal and one reciprocal square root
(:func:`_arctan_score`), and the kernel carries z scaled so that each step adds its normal draw
unscaled, with the precision in the coefficients when every variable is observed
(:func:`scaled_coefficients`). ``bench/ensf_fused_bench.py`` times it against its
floors on a GPU; ``bench/ensf_fused_sass.py`` counts its instructions on any machine. The mixture
score needs an N x N reduction over the whole state between steps, so it runs the same kernel
one step at a time.

Only componentwise observation operators (identity, arctan of observed variables) fuse; they
are given to the kernel as a dense observation and precision (1/sigma^2, or 0 where
unobserved) per variable, or, when every variable is observed, as the observation alone.
Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``), which the
tests use.

The wrapper :func:`fused_reverse_sde` takes plain values: the step schedule
(:mod:`da_plugin.filters.ensf_schedule`), the draws, and a centring callback for the mixture
score. :meth:`da_plugin.filters.ensf.EnSF.analysis` is the one place that chooses between it
and the torch path.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from da_plugin.counter_rng import CounterDraws, pair_key
from da_plugin.filters.ensf_schedule import Step
from da_plugin.obs import ObservationOperator

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch path is used
    triton = None

BLOCK = 1024  # state elements per program
NUM_WARPS = 4


def triton_usable(device: torch.device) -> bool:
    """Whether the fused kernel runs natively on ``device`` (what ``backend: auto`` asks)."""
    return triton is not None and device.type == "cuda"


def check_fusable(forecast: torch.Tensor, obs: ObservationOperator) -> None:
    """Raise a ValueError saying why the fused kernel cannot run this analysis, if it cannot."""
    if triton is None:
        raise ValueError("filter.backend=triton needs the triton package (installed with CUDA builds of torch)")
    if not (triton_usable(forecast.device) or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"filter.backend=triton needs a CUDA device, found {forecast.device} "
                         "(set TRITON_INTERPRET=1 to run the kernel in Triton's CPU interpreter)")
    if forecast.dtype != torch.float32:
        raise ValueError(f"filter.backend=triton computes in float32, found a {forecast.dtype} state; "
                         "use filter.backend=torch for float64 reference runs")
    if obs.operator not in ("identity", "arctan"):
        raise ValueError(f"filter.backend=triton fuses componentwise operators only, found {obs.operator!r}")


def dense_observations(obs: ObservationOperator, y: torch.Tensor, dim: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Observation value and precision (1/sigma^2; 0 where unobserved) per state variable, ``[dim]`` each."""
    values = torch.zeros(dim, dtype=torch.float32, device=device)
    precision = torch.zeros(dim, dtype=torch.float32, device=device)
    index = obs.indices.to(device)
    values[index] = y.to(device=device, dtype=torch.float32)
    precision[index] = 1.0 / obs.sigma**2
    return values, precision


def fused_reverse_sde(forecast: torch.Tensor, y: torch.Tensor, obs: ObservationOperator, schedule: list[Step],
                      draws: CounterDraws, *, semi_implicit: bool = False,
                      center: Callable[[torch.Tensor, Step], torch.Tensor] | None = None) -> torch.Tensor:
    """EnSF analysis ``[N, n]`` of ``forecast`` ``[N, n]`` through the steps of ``schedule`` with the fused kernel.

    The normals are ``draws`` (draw k: 0 the start at t = 1, k >= 1 step k): entry (i, j) uses the
    counter ``(draws.row_offset + i) * dim + draws.col_offset + j``, so a slab of a ``dim``-variable
    state (or a block of members) draws what a single process draws for it. ``semi_implicit``:
    the semi-implicit likelihood step (see :func:`scaled_coefficients`). ``center(z, step)``
    gives the prior centre of a step from the current z (the mixture mean), and the kernel
    then runs one step per launch; None: each member's own forecast (the one-to-one prior
    score), all K steps in one launch.
    """
    check_fusable(forecast, obs)
    obs.check(y)
    members, width = forecast.shape
    forecast = forecast.contiguous()
    # every variable observed: the one precision 1/sigma^2 goes into the table, the kernel reads y
    all_observed = obs.observes_all
    if all_observed:
        values = precision = y.to(device=forecast.device, dtype=torch.float32).contiguous()  # precision: unread
    else:
        values, precision = dense_observations(obs, y, width, forecast.device)
    coefficients = scaled_coefficients(schedule, obs.operator == "arctan", obs.sigma**-2 if all_observed else 1.0,
                                       obs.sigma**-2 if semi_implicit else 0.0)
    # two float32 per 64-bit word: the kernel loads a step's coefficients in four loads at most
    coefficients = coefficients.view(torch.int64).to(forecast.device)
    steps = len(schedule)
    keys = torch.tensor([pair_key(draws.seed, draws.first_draw // 2 + pair) for pair in range(steps // 2 + 1)],
                        dtype=torch.int64, device=forecast.device)
    z = torch.empty_like(forecast)
    largest = torch.zeros(1, dtype=torch.float32, device=forecast.device)  # the kernel's max |forecast|

    def launch(center: torch.Tensor, step: int, whole_run: bool, steps: int) -> None:
        _reverse_sde_kernel[(triton.cdiv(width, BLOCK), members)](
            z, center, values, precision, keys, coefficients, largest, width, draws.dim or width, draws.col_offset,
            draws.row_offset, step, ARCTAN=obs.operator == "arctan", ALL_OBSERVED=all_observed,
            SEMI_IMPLICIT=semi_implicit, WHOLE_RUN=whole_run, STEPS=steps, FAST=not _INTERPRETED, BLOCK=BLOCK,
            num_warps=NUM_WARPS, enable_fp_fusion=True)

    if center is None:
        launch(forecast, 0, True, steps)
    else:
        launch(forecast, 0, True, 0)  # z at t = 1 only
        for k, step in enumerate(schedule):
            launch(center(z, step), k, False, 1)
    if obs.operator == "arctan" and not float(largest) <= ARCTAN_RANGE:  # NaN fails too
        raise ValueError(f"the forecast holds |x| up to {float(largest):.3g}, beyond the fused arctan score's "
                         f"range ({ARCTAN_RANGE:.0e}): has the model diverged? filter.backend=torch takes any value")
    return z


ARCTAN_RANGE = 1e18  # |forecast| the fused arctan score handles (see _arctan_score)


def scaled_coefficients(schedule: list[Step], arctan: bool, precision: float = 1.0,
                        curvature: float = 0.0) -> torch.Tensor:
    """The kernel's per-step table ``[K + 1, 8]``: s_k, 1/s_k, 1/s_k^2, keep', center', likelihood',
    curvature' and 0 (four 64-bit words per step).

    The kernel carries w = z / s_k, not z. With s_0 = 1 and s_{k+1} = noise_k (never 0), step k
    maps w to keep' w + center' c + likelihood' L' + xi: the normal draw enters with coefficient
    1, which saves a multiply per step. L' is the arctan score times s_k^2 (what
    :func:`_arctan_score` returns) or the identity score, divided by ``precision``: when every
    variable is observed with the one precision 1/sigma^2, the table carries it and the kernel
    computes y - h(z), another multiply saved per step. Row K holds s_K, which turns the last w
    back into z.

    ``curvature`` is 1/sigma^2 for the semi-implicit likelihood step (0: explicit), which divides
    the likelihood increment by 1 + likelihood_k h'(z)^2 / sigma^2 (unobserved variables have no
    increment to divide). For the identity, h' = 1 and the divisor folds into likelihood'. For
    the arctan, h'^2 = r^4 / s_k^4 in the kernel's terms, so curvature' is likelihood_k / (sigma^2
    s_k^4).
    """
    scale = [1.0] + [step.noise for step in schedule]
    rows = []
    for k, step in enumerate(schedule):
        now, after = scale[k], scale[k + 1]
        stiffness = step.likelihood * curvature
        likelihood = precision * step.likelihood / after / (now * now if arctan else 1.0 + stiffness)
        rows.append([now, 1.0 / now, 1.0 / (now * now), step.keep * now / after, step.center / after, likelihood,
                     stiffness / now**4 if arctan else 0.0, 0.0])
    rows.append([scale[-1], 1.0 / scale[-1], 1.0 / scale[-1] ** 2, 0.0, 0.0, 0.0, 0.0, 0.0])
    return torch.tensor(rows, dtype=torch.float64).to(torch.float32)


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter lacks the fast-math intrinsics

if triton is not None:
    from triton.language.extra import libdevice

    @triton.jit
    def _polar(counter, key_ptr, FAST: tl.constexpr):
        """The Box-Muller pair (r cos, r sin) of counter ^ key, as counter_rng.counter_normal_pair draws it."""
        bits = counter ^ tl.load(key_ptr).to(tl.uint64, bitcast=True)
        bits = bits + 0x9E3779B97F4A7C15  # SplitMix64
        bits = (bits ^ (bits >> 30)) * 0xBF58476D1CE4E5B9
        bits = (bits ^ (bits >> 27)) * 0x94D049BB133111EB
        bits = bits ^ (bits >> 31)
        u_radius = ((bits >> 32).to(tl.uint32).to(tl.float32) + 0.5) * 2.3283064365386963e-10  # 2^-32
        angle = (((bits & 0xFFFFFFFF).to(tl.uint32).to(tl.float32) + 0.5) * 2.3283064365386963e-10 - 0.5) \
            * 6.283185307179586
        if FAST:  # the SFU's approximate log, cos and sin: angle lies in (-pi, pi), where they are accurate
            radius = tl.sqrt(-2.0 * libdevice.fast_logf(u_radius))
            return radius * libdevice.fast_cosf(angle), radius * libdevice.fast_sinf(angle)
        radius = tl.sqrt(-2.0 * tl.log(u_radius))
        return radius * tl.cos(angle), radius * tl.sin(angle)

    @triton.jit
    def _reciprocal(x, FAST: tl.constexpr):
        """1 / x; FAST: the SFU's approximate reciprocal (1 ulp) alone, instead of the IEEE division."""
        if FAST:
            return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        return 1.0 / x

    @triton.jit
    def _arctan_score(w, inv_scale, inv_scale2, y_precision, precision, curvature, ALL_OBSERVED: tl.constexpr,
                      SEMI_IMPLICIT: tl.constexpr, FAST: tl.constexpr):
        """s^2 precision (y - atan z) / (1 + z^2) at z = s w, in 16 operations (ALL_OBSERVED: 15,
        s^2 (y - atan z) / (1 + z^2), y_precision holding y). SEMI_IMPLICIT: divided by
        1 + curvature r^4, with one more operation and one more SFU reciprocal.

        With q = (1 + z^2) / s^2 and r = 1 / sqrt(q), s^2 / (1 + z^2) is r^2, and the half-angle
        identity atan z = 2 atan t, t = z / (1 + sqrt(1 + z^2)) = w / (q r + 1/s), brings every z
        to |t| <= 1 without branches. One SFU reciprocal square root and one reciprocal serve both
        factors. There an odd polynomial of degree 13 gives 2 atan t. It is minimax in atan's
        relative error weighted by 1 / sqrt(1 + z^2), because the step feels atan's error divided
        by 1 + z^2: in float32, atan is within 3.2e-7 relative for |z| <= 1, 4.9e-7 for |z| <= 3
        and 1.4e-6 for |z| <= 10, and the score's error stays below 1.1e-7 s^2 precision for all z
        (a polynomial of degree 15 would gain a factor 1.4 there, for one more instruction per
        step). q rounds down to the largest float instead of overflowing, so the score stays finite
        and negligible up to |w| of about 1e21 (s is at least 0.01 for K up to 1e4); the caller
        refuses forecasts beyond ARCTAN_RANGE.
        """
        if FAST:
            q = libdevice.fma_rz(w, w, inv_scale2)
        else:
            q = tl.minimum(tl.fma(w, w, inv_scale2), 3.4028234663852886e38)
        r = tl.rsqrt(q)
        t = w * _reciprocal(tl.fma(q, r, inv_scale), FAST)
        t2 = t * t
        # -2 atan(t) / t, so that y - atan z is one fma (a negation would cost an instruction)
        minus_poly = tl.fma(t2, -0.021432602778077126, 0.08884936571121216)
        minus_poly = tl.fma(t2, minus_poly, -0.18202099204063416)
        minus_poly = tl.fma(t2, minus_poly, 0.2759968042373657)
        minus_poly = tl.fma(t2, minus_poly, -0.3988470733165741)
        minus_poly = tl.fma(t2, minus_poly, 0.6666154861450195)
        minus_poly = tl.fma(t2, minus_poly, -1.999999761581421)
        factor = r * r  # s^2 / (1 + z^2)
        if SEMI_IMPLICIT:  # r^2 / (1 + curvature r^4) = 1 / (q + curvature r^2)
            factor = _reciprocal(tl.fma(curvature, factor, q), FAST)
        if ALL_OBSERVED:
            return tl.fma(t, minus_poly, y_precision) * factor
        return tl.fma(precision, t * minus_poly, y_precision) * factor

    @triton.jit
    def _pair(ptr):
        """The two float32 packed in the 64-bit word at ptr (one load instead of two)."""
        bits = tl.load(ptr).to(tl.uint64, bitcast=True)
        return ((bits & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True),
                (bits >> 32).to(tl.uint32).to(tl.float32, bitcast=True))

    @triton.jit
    def _step_coefficients(coef_ptr, k):
        """Row k of the table (see scaled_coefficients): four 64-bit words; what a caller leaves
        unused is not loaded."""
        row = coef_ptr + 4 * k
        scale, inv_scale = _pair(row)
        inv_scale2, keep = _pair(row + 1)
        center_coef, likelihood = _pair(row + 2)
        curvature = _pair(row + 3)[0]
        return scale, inv_scale, inv_scale2, keep, center_coef, likelihood, curvature

    @triton.jit
    def _sde_step(w, center, y_precision, precision, coef_ptr, k, xi, ARCTAN: tl.constexpr,
                  ALL_OBSERVED: tl.constexpr, SEMI_IMPLICIT: tl.constexpr, FAST: tl.constexpr):
        """Step k on w = z / s_k (see scaled_coefficients): keep' w + center' c + likelihood' L' + xi.
        ALL_OBSERVED: y_precision holds y and the table the precision."""
        scale, inv_scale, inv_scale2, keep, center_coef, likelihood, curvature = _step_coefficients(coef_ptr, k)
        if ARCTAN:
            score = _arctan_score(w, inv_scale, inv_scale2, y_precision, precision, curvature, ALL_OBSERVED,
                                  SEMI_IMPLICIT, FAST)
        elif ALL_OBSERVED:
            score = tl.fma(w, -scale, y_precision)  # -scale: once per thread, -w: once per element
        else:
            score = tl.fma(-precision, w * scale, y_precision)
        return tl.fma(likelihood, score, tl.fma(keep, w, center_coef * center)) + xi

    @triton.jit
    def _reverse_sde_kernel(z_ptr, center_ptr, y_ptr, precision_ptr, keys_ptr, coef_ptr, largest_ptr,
                            width, dim, col_offset, row_offset, step,
                            ARCTAN: tl.constexpr, ALL_OBSERVED: tl.constexpr, SEMI_IMPLICIT: tl.constexpr,
                            WHOLE_RUN: tl.constexpr, STEPS: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr):
        """One member (row) and BLOCK columns. WHOLE_RUN: draw z at t = 1, then steps [0, STEPS)
        with w = z / s_k in registers; else the single step ``step`` on the stored z. ARCTAN and
        WHOLE_RUN: also raise ``largest`` to the largest |centre| seen. ALL_OBSERVED: the table
        holds the precision, which the kernel then neither loads nor applies. SEMI_IMPLICIT: the
        semi-implicit likelihood step (EnSF.likelihood_step)."""
        row = tl.program_id(1).to(tl.int64)
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        offsets = row * width + cols
        center = tl.load(center_ptr + offsets, mask=inside, other=0.0)
        y_precision = tl.load(y_ptr + cols, mask=inside, other=0.0)
        precision = 1.0  # ALL_OBSERVED: the table holds it
        if not ALL_OBSERVED:
            precision = tl.load(precision_ptr + cols, mask=inside, other=0.0)
            y_precision *= precision
        counter = ((row + row_offset) * dim + col_offset + cols).to(tl.uint64, bitcast=True)
        if WHOLE_RUN:
            if ARCTAN:
                tl.atomic_max(largest_ptr, tl.max(tl.abs(center), axis=0))
            # step k uses draw k + 1; each pair's two draws go to steps of one loop pass, so the
            # products r cos and r sin fuse into the updates
            z, first = _polar(counter, keys_ptr, FAST)
            w = z * _step_coefficients(coef_ptr, 0)[1]
            if STEPS >= 1:
                w = _sde_step(w, center, y_precision, precision, coef_ptr, 0, first, ARCTAN,
                              ALL_OBSERVED, SEMI_IMPLICIT, FAST)
            for j in range((STEPS - 1) // 2):  # steps 2j + 1 and 2j + 2 take pair j + 1
                even, odd = _polar(counter, keys_ptr + j + 1, FAST)
                w = _sde_step(w, center, y_precision, precision, coef_ptr, 2 * j + 1, even, ARCTAN,
                              ALL_OBSERVED, SEMI_IMPLICIT, FAST)
                w = _sde_step(w, center, y_precision, precision, coef_ptr, 2 * j + 2, odd, ARCTAN,
                              ALL_OBSERVED, SEMI_IMPLICIT, FAST)
            if STEPS >= 2 and STEPS % 2 == 0:  # the last step, K - 1, takes the cosine of pair K / 2
                even, odd = _polar(counter, keys_ptr + STEPS // 2, FAST)
                w = _sde_step(w, center, y_precision, precision, coef_ptr, STEPS - 1, even, ARCTAN,
                              ALL_OBSERVED, SEMI_IMPLICIT, FAST)
            z = w * _step_coefficients(coef_ptr, STEPS)[0]
        else:
            w = tl.load(z_ptr + offsets, mask=inside, other=0.0) * _step_coefficients(coef_ptr, step)[1]
            even, odd = _polar(counter, keys_ptr + (step + 1) // 2, FAST)
            w = _sde_step(w, center, y_precision, precision, coef_ptr, step, tl.where(step % 2 == 0, odd, even),
                          ARCTAN, ALL_OBSERVED, SEMI_IMPLICIT, FAST)
            z = w * _step_coefficients(coef_ptr, step + 1)[0]
        tl.store(z_ptr + offsets, z, mask=inside)
