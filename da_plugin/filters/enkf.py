"""Stochastic (perturbed-observation) EnKF (Burgers, van Leeuwen & Evensen 1998).

Each member is updated with its own perturbed observation y + e_j, e_j ~ N(0, R) centred
over the ensemble, through the ensemble Kalman gain K = X Y^T (Y Y^T + R)^-1 with X, Y the
state and obs-space perturbations scaled by 1/sqrt(N - 1). The gain is applied in ensemble
space with the push-through identity, Y^T (Y Y^T + R)^-1 = (I + S^T S)^-1 S^T R^-1/2 with
S = R^-1/2 Y, so only N x N systems are solved, whatever the number of observations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from da_plugin.filters.ensemble import EnsembleKalmanMixin
from da_plugin.obs import ObservationOperator


@dataclass
class EnKF(EnsembleKalmanMixin):
    """Global stochastic EnKF with perturbed observations."""

    def analysis(self, forecast: torch.Tensor, y: torch.Tensor, obs: ObservationOperator,
                 generator: torch.Generator) -> torch.Tensor:
        """Analysis ensemble ``[N, d]`` from forecast ``[N, d]`` and observations ``y`` ``[m]``."""
        obs.check(y)
        members = forecast.shape[0]
        prior = self.inflate_prior(forecast)
        hx = obs(prior)
        scale = 1.0 / math.sqrt(members - 1.0)
        state_pert = (prior - prior.mean(0)) * scale  # [N, d]
        obs_pert = (hx - hx.mean(0)) * (scale / obs.sigma)  # S^T: [N, m]
        noise = torch.randn(hx.shape, generator=generator, dtype=hx.dtype, device=generator.device).to(hx.device)
        noise -= noise.mean(0)
        innovation = (y.to(hx) + obs.sigma * noise - hx) / obs.sigma  # R^-1/2 (y + e_j - h(x_j)): [N, m]
        system = obs_pert @ obs_pert.T
        system.diagonal().add_(1.0)
        coefficients = torch.linalg.solve(system, obs_pert @ innovation.T)  # [N, N], column j: member j
        analysis = prior + coefficients.T @ state_pert
        return self.relax(forecast, analysis)
