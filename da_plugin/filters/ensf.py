"""Ensemble Score Filter (EnSF; Bao, Zhang & Zhang, 2024, doi:10.1016/j.cma.2024.117447).

A training-free diffusion-model filter. The forward process x_t = alpha(t) x_0 + sigma(t) eps
has alpha(t) = 1 - (1 - eps_alpha) t and sigma^2(t) = eps_beta + (1 - eps_beta) t. The analysis
draws each member from N(0, I) at t = 1 and integrates the reverse SDE

    dz = [f(t) z - g^2(t) s(z, t)] dt + g(t) dW,    f = d log(alpha)/dt,
    g^2 = d sigma^2/dt - 2 f sigma^2,

back to t = 0 with K Euler-Maruyama steps. The score s = prior score + h(t) x likelihood score,
with damping h(t) = 1 - t. With precise observations the explicit likelihood step is stiff;
``likelihood_step="semi_implicit"`` makes it linearly implicit in the Gauss-Newton curvature
(see :meth:`EnSF.steep_step_factors`). The prior score comes from the forecast ensemble {x_j}:

* ``one_to_one`` (the SC24 code): member i uses -(z_i - alpha x_i) / sigma^2;
* ``mixture``: the exact score of the diffused ensemble, -(z - alpha m(z)) / sigma^2 with
  m(z) = sum_j w_j(z) x_j and w = softmax_j(-|z - alpha x_j|^2 / (2 sigma^2)).

Both are O(N d K); the mixture adds the N x N distance matrix, built from chunked matrix
products (memory O(N d + N^2), never N x N x d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch

from da_plugin.filters.ensf_fused import check_fusable, fused_reverse_sde, triton_usable
from da_plugin.obs import ObservationOperator


class Step(NamedTuple):
    """One reverse-SDE step: the diffusion's alpha and sigma^2 and the update's coefficients."""

    alpha: float
    sigma2: float
    keep: float  # multiplies z
    center: float  # multiplies the prior centre (the member's forecast, or the mixture mean)
    likelihood: float  # multiplies the likelihood score
    noise: float  # multiplies the standard normal draw


@dataclass
class EnSF:
    """EnSF hyper-parameters; :meth:`analysis` maps a forecast ensemble to an analysis."""

    ensemble_size: int = 20
    steps: int = 100  # K, Euler-Maruyama steps of the reverse SDE
    eps_alpha: float = 0.05  # alpha(1) = eps_alpha: how much of x_0 survives at t = 1
    eps_beta: float = 0.0  # sigma^2(0) = eps_beta; 0 gives sigma^2(t) = t
    damping: Literal["linear", "none"] = "linear"  # h(t) = 1 - t, or h = 1
    prior_score: Literal["one_to_one", "mixture"] = "one_to_one"
    chunk_size: int = 1 << 20  # state variables per chunk of the mixture's distance products
    block_elements: int = 1 << 16  # CPU: ensemble entries per block of the elementwise update (cache-sized)
    # torch: one kernel per operation and step; triton: the fused kernel (CUDA, float32, componentwise
    # observations); auto: triton where it can run, else torch
    backend: Literal["auto", "torch", "triton"] = "auto"
    # explicit: the paper's Euler-Maruyama step; semi_implicit: the likelihood increment divided by
    # 1 + likelihood_k x the Gauss-Newton curvature h'(z)^2 / sigma^2, stable for any K
    likelihood_step: Literal["explicit", "semi_implicit"] = "explicit"

    def __post_init__(self) -> None:
        if self.ensemble_size < 2:
            raise ValueError(f"filter.ensemble_size must be >= 2, got {self.ensemble_size}")
        if self.steps < 1:
            raise ValueError(f"filter.steps must be >= 1, got {self.steps}")
        if not 0 < self.eps_alpha < 1:
            raise ValueError(f"filter.eps_alpha must be in (0, 1), got {self.eps_alpha}")
        if not 0 <= self.eps_beta < 1:
            raise ValueError(f"filter.eps_beta must be in [0, 1), got {self.eps_beta}")
        if self.chunk_size < 1:
            raise ValueError(f"filter.chunk_size must be >= 1, got {self.chunk_size}")
        if self.block_elements < 1:
            raise ValueError(f"filter.block_elements must be >= 1, got {self.block_elements}")
        if self.likelihood_step not in ("explicit", "semi_implicit"):
            raise ValueError(f"filter.likelihood_step must be explicit or semi_implicit, got {self.likelihood_step!r}")

    def alpha(self, t: float) -> float:
        return 1.0 - (1.0 - self.eps_alpha) * t

    def sigma2(self, t: float) -> float:
        return self.eps_beta + (1.0 - self.eps_beta) * t

    def h(self, t: float) -> float:
        return 1.0 - t if self.damping == "linear" else 1.0

    def analysis(self, forecast: torch.Tensor, y: torch.Tensor, obs: ObservationOperator,
                 generator: torch.Generator) -> torch.Tensor:
        """Analysis ensemble ``[N, d]`` from forecast ``[N, d]`` and observations ``y`` ``[m]``."""
        if self.uses_fused_kernel(forecast, obs):
            seed = int(torch.randint(1 << 62, (1,), generator=generator, device=generator.device))
            return fused_reverse_sde(self, forecast, y, obs, seed)
        return self.reverse_sde(forecast, y, obs, noise=lambda step: _randn_like(forecast, generator))

    def uses_fused_kernel(self, forecast: torch.Tensor, obs: ObservationOperator) -> bool:
        """Whether this analysis runs the fused Triton kernel (raises if backend=triton cannot)."""
        if self.backend == "triton":
            check_fusable(forecast, obs)
            return True
        return (self.backend == "auto" and triton_usable(forecast.device) and forecast.dtype == torch.float32
                and obs.operator in ("identity", "arctan"))

    def reverse_sde(self, forecast: torch.Tensor, y: torch.Tensor, obs: ObservationOperator,
                    noise: Callable[[int], torch.Tensor],
                    sum_over_state: Callable[[torch.Tensor], torch.Tensor] = lambda partial: partial) -> torch.Tensor:
        """The analysis with its randomness and its state-wide sums supplied by the caller.

        ``noise(k)`` gives the standard normals ``[N, d]`` of draw k (0: the start at t = 1,
        k >= 1: step k). ``sum_over_state`` completes a sum over state variables (the
        mixture's N x N products); a domain-decomposed caller all-reduces it over ranks.
        """
        if forecast.ndim != 2:
            raise ValueError(f"EnSF expects a forecast ensemble [N, d], found shape {tuple(forecast.shape)}")
        obs.check(y)
        y = y.to(forecast)
        blocks = self._column_blocks(forecast, y, obs)
        z = noise(0)
        for k, step in enumerate(self.schedule()):
            if self.prior_score == "one_to_one":
                center = forecast
            else:
                center = self._mixture_mean(z, forecast, step.alpha, step.sigma2, sum_over_state)
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
        """The K Euler-Maruyama steps from t = 1 down to t = 1/K, as update coefficients.

        Step k maps z to keep z + center c + likelihood L(z) + noise xi, which is
        z - dt [f z - g^2 (-(z - alpha c) / sigma^2 + h L)] + sqrt(dt) g xi written out.
        """
        dt = 1.0 / self.steps
        steps = []
        for k in range(self.steps):
            t = 1.0 - k * dt
            alpha, sigma2 = self.alpha(t), self.sigma2(t)
            drift = -(1.0 - self.eps_alpha) / alpha  # f(t) = d log alpha / dt
            g2 = (1.0 - self.eps_beta) - 2.0 * drift * sigma2
            steps.append(Step(alpha=alpha, sigma2=sigma2, keep=1.0 - dt * drift - dt * g2 / sigma2,
                              center=dt * g2 * alpha / sigma2, likelihood=dt * g2 * self.h(t),
                              noise=math.sqrt(dt * g2)))
        return steps

    def steep_step_factors(self, obs_sigma: float) -> list[float]:
        """How each step scales a difference in z where the observation operator is steepest
        (slope 1: identity everywhere, arctan at 0): keep_k - g_k with g_k = likelihood_k / sigma^2,
        or keep_k - g_k / (1 + g_k) with the semi-implicit likelihood step."""
        factors = []
        for step in self.schedule():
            stiffness = step.likelihood / obs_sigma**2
            if self.likelihood_step == "semi_implicit":
                stiffness /= 1.0 + stiffness
            factors.append(step.keep - stiffness)
        return factors

    def steep_step_note(self, obs_sigma: float) -> str | None:
        """A one-line warning when steps amplify differences (a factor below -1), else None.

        Then the identity operator's analysis diverges, and the arctan operator's stays bounded
        but loses accuracy (docs/results.md: on Lorenz-96 with sigma = 0.05, explicit K = 100
        doubles the analysis error against K = 300; the semi-implicit step recovers most of it).
        """
        factors = self.steep_step_factors(obs_sigma)
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

    def _mixture_mean(self, z: torch.Tensor, forecast: torch.Tensor, alpha: float, sigma2: float,
                      sum_over_state: Callable[[torch.Tensor], torch.Tensor] = lambda partial: partial) -> torch.Tensor:
        """m(z) = softmax-weighted forecast members, ``[N, d]``, from chunked float64 products."""
        reference = forecast.mean(0)
        cross = torch.zeros(z.shape[0], forecast.shape[0], dtype=torch.float64, device=z.device)
        norms = torch.zeros(forecast.shape[0], dtype=torch.float64, device=z.device)
        for start in range(0, z.shape[1], self.chunk_size):
            stop = start + self.chunk_size
            # centre on alpha * mean to keep |z_i - alpha x_j|^2 free of cancellation
            zc = (z[:, start:stop] - alpha * reference[start:stop]).double()
            xc = alpha * (forecast[:, start:stop] - reference[start:stop]).double()
            cross += zc @ xc.T
            norms += (xc * xc).sum(1)
        cross, norms = sum_over_state(cross), sum_over_state(norms)
        # |z_i - a x_j|^2 = |z_i|^2 - 2 z_i.a x_j + |a x_j|^2; the |z_i|^2 term cancels in the softmax
        logits = cross.mul_(1.0 / sigma2).sub_(norms.mul_(0.5 / sigma2))
        weights = torch.softmax(logits, dim=1)
        return weights.to(forecast.dtype) @ forecast


def _randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
