"""The EnSF diffusion and its discretisation: what both analysis backends (torch, Triton) step through.

The forward process x_t = alpha(t) x_0 + sigma(t) eps has alpha(t) = 1 - (1 - eps_alpha) t and
sigma^2(t) = eps_beta + (1 - eps_beta) t; the likelihood score is damped by h(t) = 1 - t
("linear") or not at all ("none"). The reverse SDE

    dz = [f(t) z - g^2(t) s(z, t)] dt + g(t) dW,    f = d log(alpha)/dt,
    g^2 = d sigma^2/dt - 2 f sigma^2,

is integrated from t = 1 towards t = 0 with K Euler-Maruyama steps of dt = (1 - t_stop) / K, each
written out as the coefficients of one update (:class:`Step`). The SC24 SQG code stops half way
(t_stop = 0.5), where the observations still outweigh the forecast's pull.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

Damping = Literal["linear", "none"]


class Step(NamedTuple):
    """One reverse-SDE step: the diffusion's alpha and sigma^2 and the update's coefficients."""

    alpha: float
    sigma2: float
    keep: float  # multiplies z
    center: float  # multiplies the prior centre (the member's forecast, or the mixture mean)
    likelihood: float  # multiplies the likelihood score
    noise: float  # multiplies the standard normal draw


def alpha(t: float, eps_alpha: float) -> float:
    """alpha(t) = 1 - (1 - eps_alpha) t: how much of x_0 survives at time t."""
    return 1.0 - (1.0 - eps_alpha) * t


def sigma2(t: float, eps_beta: float) -> float:
    """sigma^2(t) = eps_beta + (1 - eps_beta) t: the variance of the noise added by time t."""
    return eps_beta + (1.0 - eps_beta) * t


def damping_weight(t: float, damping: Damping) -> float:
    """h(t), the weight of the likelihood score: 1 - t (linear) or 1 (none)."""
    return 1.0 - t if damping == "linear" else 1.0


def reverse_sde_steps(steps: int, eps_alpha: float, eps_beta: float, damping: Damping,
                      stop_time: float = 0.0) -> list[Step]:
    """The K Euler-Maruyama steps from t = 1 down to t = stop_time + dt, as update coefficients.

    Step k maps z to keep z + center c + likelihood L(z) + noise xi, which is
    z - dt [f z - g^2 (-(z - alpha c) / sigma^2 + h L)] + sqrt(dt) g xi written out.
    """
    dt = (1.0 - stop_time) / steps
    schedule = []
    for k in range(steps):
        t = 1.0 - k * dt
        a, s2 = alpha(t, eps_alpha), sigma2(t, eps_beta)
        drift = -(1.0 - eps_alpha) / a  # f(t) = d log alpha / dt
        g2 = (1.0 - eps_beta) - 2.0 * drift * s2
        schedule.append(Step(alpha=a, sigma2=s2, keep=1.0 - dt * drift - dt * g2 / s2,
                             center=dt * g2 * a / s2, likelihood=dt * g2 * damping_weight(t, damping),
                             noise=math.sqrt(dt * g2)))
    return schedule


def steep_step_factors(schedule: list[Step], obs_sigma: float, semi_implicit: bool) -> list[float]:
    """How each step scales a difference in z where the observation operator is steepest
    (slope 1: identity everywhere, arctan at 0): keep_k - g_k with g_k = likelihood_k / sigma^2,
    or keep_k - g_k / (1 + g_k) with the semi-implicit likelihood step."""
    factors = []
    for step in schedule:
        stiffness = step.likelihood / obs_sigma**2
        if semi_implicit:
            stiffness /= 1.0 + stiffness
        factors.append(step.keep - stiffness)
    return factors
