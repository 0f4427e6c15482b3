"""Ensemble Score Filter (EnSF; Bao, Zhang & Zhang, 2024, doi:10.1016/j.cma.2024.117447).

A training-free diffusion-model filter. The forward process x_t = alpha(t) x_0 + sigma(t) eps
has alpha(t) = 1 - (1 - eps_alpha) t and sigma^2(t) = eps_beta + (1 - eps_beta) t. The analysis
draws each member from N(0, I) at t = 1 and integrates the reverse SDE back to t = 0 with K
Euler-Maruyama steps (:mod:`da_plugin.filters.ensf_schedule`). The score s = prior score +
h(t) x likelihood score, with damping h(t) = 1 - t. With precise observations the explicit
likelihood step is stiff; ``likelihood_step="semi_implicit"`` makes it linearly implicit in the
Gauss-Newton curvature (see :func:`~da_plugin.filters.ensf_schedule.steep_step_factors`). The
prior score comes from the forecast ensemble {x_j}:

* ``one_to_one`` (the SC24 code): member i uses -(z_i - alpha x_i) / sigma^2;
* ``mixture``: the exact score of the diffused ensemble, -(z - alpha m(z)) / sigma^2 with
  m(z) = sum_j w_j(z) x_j and w = softmax_j(-|z - alpha x_j|^2 / (2 sigma^2))
  (:func:`~da_plugin.filters.ensf_mixture.mixture_mean`).

Both are O(N d K); the mixture adds the N x N distance matrix, built from chunked matrix
products (memory O(N d + N^2), never N x N x d).

The diffusion has unit scale, so the state's units matter: ``standardize`` runs it on the state
standardized per variable by the forecast ensemble's mean and spread (the observation operator
seen through the chain rule, :class:`StandardizedObservations`), ``stop_time`` ends the reverse
SDE early, and ``rtps`` relaxes the analysis spread towards the forecast's; ``min_spread`` is a
floor on the spread used to standardize, for forecast models that contract the members (the ViT
surrogate: its 12-h error, not its members' spread, is the forecast's uncertainty). The SC24 SQG code
does all three (standardized, stopped at t = 0.5, spread restored); on SQG with 1 K
observations without them the analysis barely moves from the forecast (docs/results.md).

Three backends run the same steps: the torch path here (:meth:`EnSF.reverse_sde`: any device,
dtype and operator), the fused Triton kernel (:mod:`da_plugin.filters.ensf_fused`: CUDA, float32,
componentwise operators) and its CPU counterpart, blocks of the ensemble taken through all steps
by code torch.compile generates (:mod:`da_plugin.filters.ensf_cpu`: float32, componentwise
operators, one-to-one prior score). :meth:`EnSF.analysis` alone picks between them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from da_plugin.counter_rng import CounterDraws
from da_plugin.filters.ensemble import relax
from da_plugin.filters.ensf_cpu import MIN_ENTRIES, blocked_reverse_sde, check_compilable, compiler_usable
from da_plugin.filters.ensf_fused import check_fusable, fused_reverse_sde, triton_usable
from da_plugin.filters.ensf_mixture import mixture_mean, whole_state
from da_plugin.filters.ensf_schedule import Step, reverse_sde_steps, steep_step_factors
from da_plugin.obs import ObservationOperator
from megavit.config import bounded, check_bounds

SumOverState = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EnSF:
    """EnSF hyper-parameters; :meth:`analysis` maps a forecast ensemble to an analysis."""

    ensemble_size: int = bounded(20, ge=2)
    steps: int = bounded(100, ge=1)  # K, Euler-Maruyama steps of the reverse SDE
    eps_alpha: float = bounded(0.05, gt=0, lt=1)  # alpha(1) = eps_alpha: how much of x_0 survives at t = 1
    eps_beta: float = bounded(0.0, ge=0, lt=1)  # sigma^2(0) = eps_beta; 0 gives sigma^2(t) = t
    damping: Literal["linear", "none"] = "linear"  # h(t) = 1 - t, or h = 1
    prior_score: Literal["one_to_one", "mixture"] = "one_to_one"
    chunk_size: int = bounded(1 << 20, ge=1)  # state variables per chunk of the mixture's distance products
    # CPU: ensemble entries per block (cache-sized) of the torch path's elementwise update, and of the
    # compiled backend, whose blocks take all K steps in turn
    block_elements: int = bounded(1 << 16, ge=1)
    # torch: one kernel per operation and step; triton: the fused kernel (CUDA, float32, componentwise
    # observations); compiled: the CPU kernel torch.compile generates (float32, componentwise
    # observations, one-to-one prior score); auto: triton where it can run, else compiled on CPUs for
    # ensembles of at least ensf_cpu.MIN_ENTRIES entries (where it compiles), else torch
    backend: Literal["auto", "torch", "triton", "compiled"] = "auto"
    # explicit: the paper's Euler-Maruyama step; semi_implicit: the likelihood increment divided by
    # 1 + likelihood_k x the Gauss-Newton curvature h'(z)^2 / sigma^2, stable for any K
    likelihood_step: Literal["explicit", "semi_implicit"] = "explicit"
    # run the reverse SDE on the state standardized per variable by the forecast ensemble's mean and
    # spread (the SC24 SQG code): the diffusion's unit scale then matches the state's; torch backend
    standardize: bool = False
    # standardize: the least spread assumed per variable (state units), a floor for forecast models
    # whose members collapse (model error the ensemble does not carry, as additive inflation would)
    min_spread: float = bounded(0.0, ge=0)
    # the reverse SDE runs from t = 1 down to this time (SC24 SQG: 0.5)
    stop_time: float = bounded(0.0, ge=0, lt=1)
    # relaxation of the analysis spread to the forecast's per variable (SC24 SQG: 1)
    rtps: float = bounded(0.0, ge=0, le=1)

    def __post_init__(self) -> None:
        check_bounds(self, "filter")
        if self.likelihood_step not in ("explicit", "semi_implicit"):
            raise ValueError(f"filter.likelihood_step must be explicit or semi_implicit, got {self.likelihood_step!r}")
        if self.standardize and self.backend in ("triton", "compiled"):
            raise ValueError("filter.standardize runs on the torch backend; use filter.backend=auto or torch")
        if self.prior_score == "mixture" and self.backend == "compiled":
            raise ValueError("filter.backend=compiled fuses the one_to_one prior score only; use filter.backend=auto "
                             "or torch with the mixture")

    def analysis(self, forecast: torch.Tensor, y: torch.Tensor, obs: ObservationOperator,
                 noise: torch.Generator | CounterDraws,
                 sum_over_state: SumOverState = whole_state) -> torch.Tensor:
        """Analysis ensemble ``[N, d]`` from forecast ``[N, d]`` and observations ``y`` ``[m]``: the one
        place that picks the backend (:meth:`analysis_backend`).

        ``noise`` is a generator (da-cycle: torch normals, or on the fused and compiled kernels
        counter-based normals under a seed drawn from it) or :class:`~da_plugin.counter_rng.CounterDraws`, keyed
        by global position, which both backends draw identically. ``sum_over_state`` completes
        sums over state variables (the mixture's N x N products); a domain-decomposed caller
        all-reduces them over ranks.
        """
        if self.standardize:
            floor = max(self.min_spread, torch.finfo(forecast.dtype).tiny)
            mean, spread = forecast.mean(0), forecast.std(0).clamp_min(floor)
            standardized = self._analysis((forecast - mean) / spread, y, StandardizedObservations(obs, mean, spread),
                                          noise, sum_over_state)
            analysis = standardized.mul_(spread).add_(mean)
        else:
            analysis = self._analysis(forecast, y, obs, noise, sum_over_state)
        return relax(forecast, analysis, rtps=self.rtps)

    def _analysis(self, forecast: torch.Tensor, y: torch.Tensor, obs: ObservationOperator,
                  noise: torch.Generator | CounterDraws, sum_over_state: SumOverState) -> torch.Tensor:
        backend = self.analysis_backend(forecast, obs)
        semi_implicit = self.likelihood_step == "semi_implicit"
        if backend != "torch" and isinstance(noise, torch.Generator):
            noise = CounterDraws(seed=int(torch.randint(1 << 62, (1,), generator=noise, device=noise.device)))
        if backend == "triton":
            return fused_reverse_sde(forecast, y, obs, self.schedule(), noise, semi_implicit=semi_implicit,
                                     center=self._mixture_center(forecast, sum_over_state))
        if backend == "compiled":
            try:
                return blocked_reverse_sde(forecast, y, obs, self.schedule(), noise, semi_implicit=semi_implicit,
                                           block_elements=self.block_elements)
            except torch._dynamo.exc.BackendCompilerFailed as error:
                if self.backend == "compiled":
                    raise
                warnings.warn(f"EnSF runs on the torch backend, torch.compile failed: {error}", stacklevel=3)
        if isinstance(noise, torch.Generator):
            generator = noise
            draw = lambda k: _randn_like(forecast, generator)  # noqa: E731
        else:
            draw = noise.normals(*forecast.shape, forecast.dtype, forecast.device)
        return self.reverse_sde(forecast, y, obs, draw, sum_over_state)

    def analysis_backend(self, forecast: torch.Tensor,
                         obs: ObservationOperator) -> Literal["torch", "triton", "compiled"]:
        """The backend that runs this analysis (raises if backend=triton or compiled cannot)."""
        if self.backend == "triton":
            check_fusable(forecast, obs)
        elif self.backend == "compiled":
            check_compilable(forecast, obs)
        elif self.backend == "auto" and not self.standardize and forecast.dtype == torch.float32 \
                and obs.operator in ("identity", "arctan"):
            if triton_usable(forecast.device):
                return "triton"
            if forecast.device.type == "cpu" and self.prior_score == "one_to_one" \
                    and forecast.numel() >= MIN_ENTRIES and compiler_usable():
                return "compiled"
        return "torch" if self.backend == "auto" else self.backend

    def uses_fused_kernel(self, forecast: torch.Tensor, obs: ObservationOperator) -> bool:
        """Whether this analysis runs the fused Triton kernel (raises if backend=triton or compiled cannot)."""
        return self.analysis_backend(forecast, obs) == "triton"

    def reverse_sde(self, forecast: torch.Tensor, y: torch.Tensor, obs: ObservationOperator,
                    noise: Callable[[int], torch.Tensor], sum_over_state: SumOverState = whole_state) -> torch.Tensor:
        """The torch backend, with its randomness and its state-wide sums supplied by the caller.

        ``noise(k)`` gives the standard normals ``[N, d]`` of draw k (0: the start at t = 1,
        k >= 1: step k). ``sum_over_state`` completes a sum over state variables (the
        mixture's N x N products); a domain-decomposed caller all-reduces it over ranks.
        """
        if forecast.ndim != 2:
            raise ValueError(f"EnSF expects a forecast ensemble [N, d], found shape {tuple(forecast.shape)}")
        obs.check(y)
        y = y.to(forecast)
        blocks = self._column_blocks(forecast, y, obs)
        mixture_center = self._mixture_center(forecast, sum_over_state)
        z = noise(0)
        for k, step in enumerate(self.schedule()):
            center = forecast if mixture_center is None else mixture_center(z, step)
            xi = noise(k + 1)
            # block by block so the temporaries stay in cache
            for columns, block_obs, block_y in blocks:
                block = z[:, columns]
                update = block_obs.likelihood_score(block, block_y).mul_(step.likelihood)
                if self.likelihood_step == "semi_implicit":  # linearly implicit in the curvature
                    update.div_(block_obs.likelihood_curvature(block).mul_(step.likelihood).add_(1.0))
                update.add_(center[:, columns], alpha=step.center)
                update.add_(xi[:, columns], alpha=step.noise)
                block.mul_(step.keep).add_(update)
        return z

    @property
    def noise_draws(self) -> int:
        """Normal draws per analysis, K + 1, rounded up to pair with the counter generator's pairs."""
        return 2 * (self.steps // 2 + 1)

    def schedule(self) -> list[Step]:
        """The K Euler-Maruyama steps from t = 1 down to ``stop_time``, as update coefficients."""
        return reverse_sde_steps(self.steps, self.eps_alpha, self.eps_beta, self.damping, self.stop_time)

    def steep_step_note(self, obs_sigma: float) -> str | None:
        """A one-line warning when steps amplify differences (a factor below -1), else None.

        Then the identity operator's analysis diverges, and the arctan operator's stays bounded
        but loses accuracy (docs/results.md: on Lorenz-96 with sigma = 0.05, explicit K = 100
        doubles the analysis error against K = 300; the semi-implicit step recovers most of it).
        """
        factors = steep_step_factors(self.schedule(), obs_sigma, self.likelihood_step == "semi_implicit")
        amplifying = sum(factor < -1.0 for factor in factors)
        if not amplifying:
            return None
        return (f"{amplifying} of the filter.steps={self.steps} reverse-SDE steps amplify differences where the "
                f"observation operator is steepest (factor down to {min(factors):.2f} with obs sigma "
                f"{obs_sigma:g}), which costs EnSF accuracy; filter.likelihood_step=semi_implicit or more steps "
                f"damp them (docs/results.md)")

    def _column_blocks(self, forecast: torch.Tensor, y: torch.Tensor,
                       obs: ObservationOperator) -> list[tuple[slice, ObservationOperator, torch.Tensor]]:
        """Column slices of about ``block_elements`` entries with their share of the observations
        (one block on GPUs, where whole-array kernels are best)."""
        members, dim = forecast.shape
        width = dim if forecast.device.type != "cpu" else max(1, self.block_elements // members)
        if width >= dim:
            return [(slice(None), obs, y)]
        blocks = []
        for start in range(0, dim, width):
            stop = min(start + width, dim)
            block_obs, positions = obs.restrict(start, stop)
            blocks.append((slice(start, stop), block_obs, y[positions.to(y.device)]))
        return blocks

    def _mixture_center(self, forecast: torch.Tensor,
                        sum_over_state: SumOverState) -> Callable[[torch.Tensor, Step], torch.Tensor] | None:
        """The prior centre of a step as a function of z, the mixture mean; None for the one-to-one
        score, whose centre is each member's own forecast at every step."""
        if self.prior_score == "one_to_one":
            return None
        return lambda z, step: mixture_mean(z, forecast, step.alpha, step.sigma2, self.chunk_size, sum_over_state)


class StandardizedObservations:
    """The observation operator as the standardized state u = (x - mean) / spread sees it:
    h(mean + spread u), its score and curvature by the chain rule (one factor of spread each)."""

    def __init__(self, obs: ObservationOperator, mean: torch.Tensor, spread: torch.Tensor) -> None:
        self.obs, self.mean, self.spread = obs, mean, spread

    @property
    def operator(self) -> str:
        return self.obs.operator

    def check(self, y: torch.Tensor, where: str = "observations") -> None:
        self.obs.check(y, where)

    def restrict(self, start: int, stop: int) -> tuple[StandardizedObservations, torch.Tensor]:
        inner, positions = self.obs.restrict(start, stop)
        return StandardizedObservations(inner, self.mean[start:stop], self.spread[start:stop]), positions

    def likelihood_score(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.obs.likelihood_score(self.spread * u + self.mean, y).mul_(self.spread)

    def likelihood_curvature(self, u: torch.Tensor) -> torch.Tensor:
        return self.obs.likelihood_curvature(self.spread * u + self.mean).mul_(self.spread.square())


def _randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
