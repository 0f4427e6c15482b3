"""Settings shared by the Kalman-type ensemble filters: ensemble size and covariance inflation.

The relaxations are also a function (:func:`relax`), which EnSF uses.

* ``inflation`` (rho): prior multiplicative covariance inflation, P^b <- rho P^b, applied
  as perturbations x sqrt(rho) before the observation operator (Anderson & Anderson 1999).
* ``rtps`` (alpha): relaxation to prior spread, per variable sigma^a <- sigma^a + alpha
  (sigma^b - sigma^a) (Whitaker & Hamill 2012).
* ``rtpp`` (alpha): relaxation to prior perturbations, X^a' <- (1 - alpha) X^a' + alpha X^b'
  (Zhang et al. 2004).

Both relaxations compare against the forecast before multiplicative inflation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class EnsembleKalmanMixin:
    """Keyword-only ensemble size and inflation settings, applied to ``[N, d]`` ensembles."""

    ensemble_size: int = 20
    inflation: float = 1.0  # rho >= 1; 1 disables
    rtps: float = 0.0  # in [0, 1]; 0 disables
    rtpp: float = 0.0  # in [0, 1]; 0 disables

    def __post_init__(self) -> None:
        if self.ensemble_size < 2:
            raise ValueError(f"filter.ensemble_size must be >= 2, got {self.ensemble_size}")
        if not (self.inflation >= 1.0 and math.isfinite(self.inflation)):
            raise ValueError(f"filter.inflation must be a finite number >= 1, got {self.inflation}")
        for name in ("rtps", "rtpp"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"filter.{name} must be in [0, 1], got {value}")
        if self.rtps > 0 and self.rtpp > 0:
            raise ValueError("filter.rtps and filter.rtpp are alternatives: set at most one of them > 0")

    def inflate_prior(self, ensemble: torch.Tensor) -> torch.Tensor:
        """Scale the perturbations about the ensemble mean by sqrt(inflation)."""
        if self.inflation == 1.0:
            return ensemble
        mean = ensemble.mean(0)
        return mean + math.sqrt(self.inflation) * (ensemble - mean)

    def relax(self, forecast: torch.Tensor, analysis: torch.Tensor) -> torch.Tensor:
        """Apply RTPS or RTPP to the analysis perturbations; the analysis mean is unchanged."""
        return relax(forecast, analysis, rtps=self.rtps, rtpp=self.rtpp)


def relax(forecast: torch.Tensor, analysis: torch.Tensor, *, rtps: float = 0.0, rtpp: float = 0.0) -> torch.Tensor:
    """RTPS or RTPP (at most one nonzero) of ``[N, d]`` analysis perturbations towards the
    forecast's; the analysis mean is unchanged."""
    if rtps == 0.0 and rtpp == 0.0:
        return analysis
    mean_a = analysis.mean(0)
    pert_a = analysis - mean_a
    pert_b = forecast - forecast.mean(0)
    if rtpp > 0:
        return mean_a + (1.0 - rtpp) * pert_a + rtpp * pert_b
    spread_a = pert_a.std(0)
    spread_b = pert_b.std(0)
    factor = 1.0 + rtps * (spread_b - spread_a) / spread_a.clamp_min(torch.finfo(spread_a.dtype).tiny)
    return mean_a + pert_a * factor
