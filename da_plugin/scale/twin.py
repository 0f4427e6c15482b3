"""The decomposed twin experiment's truth, observations and initial ensemble, slab by slab.

Every random number comes from the counter-based generator, keyed by global variable index (the
truth, the ensemble) or by global observation index (the observation errors), so any rank count
gives the numbers of a single process. The streams lie far above the analyses' draws
(cycle x noise_draws + k).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from da_plugin.counter_rng import counter_normal
from da_plugin.obs import ObservationOperator, strided_positions
from da_plugin.scale.config import ScaleConfig
from da_plugin.scale.slabs import Slab, rk4_step

TRUTH_DRAW, ENSEMBLE_DRAW, OBS_DRAW = 1 << 40, (1 << 40) + 2, 1 << 41


def twin_truth(config: ScaleConfig, slab: Slab, obs: ObservationOperator, device: torch.device, dtype: torch.dtype,
               group: dist.ProcessGroup | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Truth slab at t0, then (truth, y) at each analysis time, computed by all ranks together."""
    dim, model = config.model.dim, config.model
    truth = model.forcing + counter_normal(config.seed, TRUTH_DRAW, 1, slab.start, slab.stop, dim, dtype, device)[0]
    for _ in range(config.spinup_steps):
        truth = rk4_step(truth, model.forcing, model.dt, group)
    yield truth, torch.empty(0)
    observed = strided_positions(slab.start, slab.stop, config.obs.stride)
    observations = len(strided_positions(0, dim, config.obs.stride))
    for cycle in range(config.cycles):
        for _ in range(config.obs.every):
            truth = rk4_step(truth, model.forcing, model.dt, group)
        # the noise of observation j is keyed by its position j in the global observation vector
        noise = counter_normal(config.seed, OBS_DRAW + 2 * cycle, 1, observed.start, observed.stop, observations,
                               dtype, device)[0]
        yield truth, obs(truth) + config.obs.sigma * noise


def initial_ensemble(config: ScaleConfig, truth: torch.Tensor, slab: Slab) -> torch.Tensor:
    """This slab of the first forecast ``[N, slab.size]``: truth + N(0, init_spread^2)."""
    return truth + config.init_spread * counter_normal(config.seed, ENSEMBLE_DRAW, config.filter.ensemble_size,
                                                       slab.start, slab.stop, slab.dim, truth.dtype, truth.device)
