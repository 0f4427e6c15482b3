"""The mixture prior score's centre: the forecast members weighted by how close each is to z.

The diffused forecast ensemble {alpha x_j + sigma eps} has the exact score
-(z - alpha m(z)) / sigma^2 with m(z) = sum_j w_j(z) x_j and
w = softmax_j(-|z - alpha x_j|^2 / (2 sigma^2)). The weights need the N x N squared distances,
built here from chunked matrix products (memory O(N d + N^2), never an N x N x d tensor).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def whole_state(partial: torch.Tensor) -> torch.Tensor:
    """The ``sum_over_state`` of a process that holds the whole state: its partial sum is the sum."""
    return partial


def mixture_mean(z: torch.Tensor, forecast: torch.Tensor, alpha: float, sigma2: float, chunk_size: int,
                 sum_over_state: Callable[[torch.Tensor], torch.Tensor] = whole_state) -> torch.Tensor:
    """m(z) = softmax-weighted forecast members, ``[N, d]``, for ``z`` and ``forecast`` ``[N, d]``.

    The products are accumulated in float64 over chunks of ``chunk_size`` state variables;
    ``sum_over_state`` completes them (a domain-decomposed caller all-reduces them over ranks).
    """
    reference = forecast.mean(0)
    cross = torch.zeros(z.shape[0], forecast.shape[0], dtype=torch.float64, device=z.device)
    norms = torch.zeros(forecast.shape[0], dtype=torch.float64, device=z.device)
    for start in range(0, z.shape[1], chunk_size):
        stop = start + chunk_size
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
