"""The EnSF reverse SDE as one Triton kernel: each state element is read once and written once.

With the one-to-one prior score, member i's variable k evolves through all K Euler-Maruyama
steps using only its own forecast value and the observation of variable k, so a GPU thread
can keep z in registers for the whole analysis and draw every normal in place from the
counter-based generator of :mod:`da_plugin.counter_rng` (the numbers the torch path with
``counter_normal`` noise uses). Memory traffic is then the floor, 4 bytes x (2 N d + 2 d), and
the time is set by the random numbers and the arithmetic. The mixture score needs an N x N
reduction over the whole state between steps, so it runs the same kernel one step at a time.

Only componentwise observation operators (identity, arctan of observed variables) fuse; they
are given to the kernel as a dense observation and precision (1/sigma^2, or 0 where
unobserved) per variable. Without a GPU the kernel runs in Triton's interpreter
(``TRITON_INTERPRET=1``), which the tests use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

import torch

from da_plugin.counter_rng import pair_key
from da_plugin.obs import ObservationOperator

if TYPE_CHECKING:
    from da_plugin.filters.ensf import EnSF

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


def fused_reverse_sde(ensf: EnSF, forecast: torch.Tensor, y: torch.Tensor, obs: ObservationOperator,
                      seed: int, first_draw: int = 0, *, row_offset: int = 0, col_offset: int = 0,
                      dim: int | None = None,
                      sum_over_state: Callable[[torch.Tensor], torch.Tensor] = lambda partial: partial
                      ) -> torch.Tensor:
    """EnSF analysis ``[N, n]`` of ``forecast`` ``[N, n]`` with the fused kernel.

    Draw k (0: the start at t = 1, k >= 1: step k) is ``counter_normal(seed, first_draw + k)``
    (``first_draw`` even, so draws pair up as the generator pairs them); entry (i, j) uses the
    counter ``(row_offset + i) * dim + col_offset + j``, so a slab of a ``dim``-variable state (or
    a block of members) draws what a single process draws for it.
    """
    check_fusable(forecast, obs)
    obs.check(y)
    if first_draw % 2:
        raise ValueError(f"first_draw must be even (draws come in Box-Muller pairs), got {first_draw}")
    members, width = forecast.shape
    forecast = forecast.contiguous()
    values, precision = dense_observations(obs, y, width, forecast.device)
    schedule = ensf.schedule()
    coefficients = torch.tensor([[s.keep, s.center, s.likelihood, s.noise] for s in schedule],
                                dtype=torch.float32, device=forecast.device)
    keys = torch.tensor([pair_key(seed, first_draw // 2 + pair) for pair in range(ensf.steps // 2 + 1)],
                        dtype=torch.int64, device=forecast.device)
    z = torch.empty_like(forecast)

    def launch(center: torch.Tensor, step: int, whole_run: bool, steps: int) -> None:
        _reverse_sde_kernel[(triton.cdiv(width, BLOCK), members)](
            z, center, values, precision, keys, coefficients, width, dim or width, col_offset, row_offset, step,
            ARCTAN=obs.operator == "arctan", WHOLE_RUN=whole_run, STEPS=steps, FAST=not _INTERPRETED,
            BLOCK=BLOCK, num_warps=NUM_WARPS)

    if ensf.prior_score == "one_to_one":
        launch(forecast, 0, True, ensf.steps)
        return z
    launch(forecast, 0, True, 0)  # z at t = 1 only
    for k, step in enumerate(schedule):
        launch(ensf._mixture_mean(z, forecast, step.alpha, step.sigma2, sum_over_state), k, False, 1)
    return z


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter lacks the fast-math intrinsics

if triton is not None:
    from triton.language.extra import libdevice

    @triton.jit
    def _polar(counter, key_ptr, FAST: tl.constexpr):
        """The Box-Muller pair (r cos, r sin) of counter ^ key, as counter_rng.box_muller computes it."""
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
    def _divide(numerator, denominator, FAST: tl.constexpr):
        """numerator / denominator; FAST: the SFU reciprocal (2 ulp) instead of the IEEE division."""
        if FAST:
            return libdevice.fast_dividef(numerator, denominator)
        return numerator / denominator

    @triton.jit
    def _atan(x, FAST: tl.constexpr):
        """float32 arctangent: reduction to |r| <= tan(pi/8) (one division) and the Cephes atanf polynomial."""
        ax = tl.abs(x)
        big = ax > 2.414213562373095  # tan(3 pi / 8): atan(ax) = pi/2 + atan(-1/ax)
        mid = ax > 0.41421356237309503  # tan(pi / 8): atan(ax) = pi/4 + atan((ax-1)/(ax+1))
        r = _divide(tl.where(big, -1.0, tl.where(mid, ax - 1.0, ax)),
                    tl.where(big, ax, tl.where(mid, ax + 1.0, 1.0)), FAST)
        base = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))
        r2 = r * r
        poly = (((8.05374449538e-2 * r2 - 1.38776856032e-1) * r2 + 1.99777106478e-1) * r2
                - 3.33329491539e-1) * r2 * r + r
        return tl.where(x < 0, -(base + poly), base + poly)

    @triton.jit
    def _sde_step(z, center, y, precision, coef_ptr, k, xi, ARCTAN: tl.constexpr, FAST: tl.constexpr):
        """Step k of the schedule: keep z + center c + likelihood L(z) + noise xi."""
        if ARCTAN:
            score = precision * _divide(y - _atan(z, FAST), 1.0 + z * z, FAST)
        else:
            score = precision * (y - z)
        return (tl.load(coef_ptr + 4 * k) * z + tl.load(coef_ptr + 4 * k + 1) * center
                + tl.load(coef_ptr + 4 * k + 2) * score + tl.load(coef_ptr + 4 * k + 3) * xi)

    @triton.jit
    def _reverse_sde_kernel(z_ptr, center_ptr, y_ptr, precision_ptr, keys_ptr, coef_ptr,
                            width, dim, col_offset, row_offset, step,
                            ARCTAN: tl.constexpr, WHOLE_RUN: tl.constexpr, STEPS: tl.constexpr,
                            FAST: tl.constexpr, BLOCK: tl.constexpr):
        """One member (row) and BLOCK columns. WHOLE_RUN: draw z at t = 1, then steps [0, STEPS)
        with z in registers; else the single step ``step`` on the stored z."""
        row = tl.program_id(1).to(tl.int64)
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        offsets = row * width + cols
        center = tl.load(center_ptr + offsets, mask=inside, other=0.0)
        y = tl.load(y_ptr + cols, mask=inside, other=0.0)
        precision = tl.load(precision_ptr + cols, mask=inside, other=0.0)
        counter = ((row + row_offset) * dim + col_offset + cols).to(tl.uint64, bitcast=True)
        if WHOLE_RUN:
            # step k uses draw k + 1: steps 2j and 2j + 1 take the sine of pair j and the cosine of pair j + 1
            z, spare = _polar(counter, keys_ptr, FAST)
            for j in range(STEPS // 2):
                z = _sde_step(z, center, y, precision, coef_ptr, 2 * j, spare, ARCTAN, FAST)
                even, spare = _polar(counter, keys_ptr + j + 1, FAST)
                z = _sde_step(z, center, y, precision, coef_ptr, 2 * j + 1, even, ARCTAN, FAST)
            if STEPS % 2 == 1:
                z = _sde_step(z, center, y, precision, coef_ptr, STEPS - 1, spare, ARCTAN, FAST)
        else:
            z = tl.load(z_ptr + offsets, mask=inside, other=0.0)
            even, odd = _polar(counter, keys_ptr + (step + 1) // 2, FAST)
            z = _sde_step(z, center, y, precision, coef_ptr, step, tl.where(step % 2 == 0, odd, even), ARCTAN, FAST)
        tl.store(z_ptr + offsets, z, mask=inside)
