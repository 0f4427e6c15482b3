"""EnSF cycling on a domain-decomposed Lorenz-96 state, from one process to many GPUs or nodes.

    torchrun --nproc_per_node 4 -m da_plugin.scale configs/da/l96_ensf_scale.yaml model.dim=10000000
    mpiexec -n 4 python -m da_plugin.scale configs/da/l96_ensf_scale.yaml
    srun python -m da_plugin.scale configs/da/l96_ensf_scale.yaml          (MASTER_ADDR exported)

Each rank holds a contiguous slab of the state for all N members (da_plugin.scale.slabs):
the forecast exchanges halos each RK4 stage, the analysis is local to the slab and only the
mixture score's N x N products and the metrics are all-reduced. The truth and observations
are either computed alongside (by the same ranks, from counter-based random numbers, so any
rank count gives the same numbers) or read slab by slab from the shards written by
``tools/ensf_problem_gen.py`` (``problem_dir``). Rank 0 writes summary.json and config.yaml.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from da_plugin.io import write_json, write_yaml
from da_plugin.models.lorenz96 import Lorenz96
from da_plugin.obs import ObservationOperator
from da_plugin.scale.config import ScaleConfig
from da_plugin.scale.launch import Launch, detect_launch, init_distributed, local_device
from da_plugin.scale.problem import read_problem
from da_plugin.scale.slabs import Slab, rk4_step, slab_analysis
from da_plugin.scale.twin import initial_ensemble, twin_truth
from megavit.atomic import check_output_dir, staged_output, stops_cleanly
from megavit.config import DTYPES, config_errors, load_config, to_dict

PROG = "da_plugin.scale"
OUTPUTS = ("summary.json", "config.yaml")


def run(config: ScaleConfig, launch: Launch) -> dict:
    """Cycle the decomposed twin experiment on this rank; returns the (global) summary.

    The steps are da-cycle's (da_plugin.cycle): forecast, observe, analyse, score. The loop is
    its own because each step is done differently at this size: the forecast runs on slabs with
    halo exchanges, a few members at a time; truth and observations come together from the
    twin (or a problem directory) as counter-based draws keyed by global index, and so does the
    analysis noise, where da-cycle's torch generators would make the numbers depend on the rank
    count; the scores are all-reduced sums; and no fields are stored (no netCDF, no free run)
    while each phase is timed.
    """
    device = local_device(config.device, launch)
    dtype = DTYPES[config.dtype]
    init_distributed(launch, "nccl" if device.type == "cuda" else "gloo", config.timeout_s)
    slab = Slab(config.model.dim, launch.rank, launch.world)
    obs, _ = ObservationOperator.slab_from_config(config.obs, slab.dim, slab.start, slab.stop)
    problem = (read_problem(config, slab, device, dtype) if config.problem_dir
               else twin_truth(config, slab, obs, device, dtype))
    truth, _ = next(problem)
    forecast = initial_ensemble(config, truth, slab)
    if launch.rank == 0 and (note := config.filter.steep_step_note(config.obs.sigma)):
        print(f"{PROG}: note: {note}", file=sys.stderr)
    history: dict[str, list[float]] = {"rmse_f": [], "rmse_a": [], "spread_a": [], "seconds_forecast": [],
                                       "seconds_analysis": []}
    bar = tqdm(range(config.cycles), desc=f"EnSF d={slab.dim:,} on {launch.world} ranks", unit="cycle",
               disable=not config.progress or launch.rank != 0, file=sys.stderr)
    for cycle in bar:
        started = _now(device)
        forecast = forecast_slab(forecast, config.model, config.obs.every, config.forecast_chunk)
        forecast_done = _now(device)
        truth, y = next(problem)
        analysis = slab_analysis(config.filter, forecast, y, obs, slab, config.seed, cycle)
        analysis_done = _now(device)
        rmse_f, _ = global_errors(forecast, truth, slab)
        rmse_a, spread_a = global_errors(analysis, truth, slab)
        if not math.isfinite(rmse_a):
            raise FloatingPointError(f"the analysis diverged (NaN/inf) at cycle {cycle}")
        for key, value in zip(history, (rmse_f, rmse_a, spread_a, forecast_done - started,
                                        analysis_done - forecast_done), strict=True):
            history[key].append(value)
        bar.set_postfix(rmse_a=f"{rmse_a:.3f}")
        forecast = analysis
    return _summary(config, launch, device, history, config.filter.analysis_backend(forecast, obs))


def forecast_slab(ensemble: torch.Tensor, model: Lorenz96, steps: int, chunk: int) -> torch.Tensor:
    """Advance this rank's slab of the ensemble ``[N, n]`` by ``steps`` model steps, in place,
    ``chunk`` members at a time (the RK4 temporaries of a 1e8-variable state add up)."""
    for first in range(0, ensemble.shape[0], chunk):
        members = ensemble[first:first + chunk]
        for _ in range(steps):
            members = rk4_step(members, model.forcing, model.dt)
        ensemble[first:first + chunk] = members
    return ensemble


def global_errors(ensemble: torch.Tensor, truth: torch.Tensor, slab: Slab) -> tuple[float, float]:
    """RMSE of the ensemble mean and the mean ensemble spread over the whole state (all-reduced sums)."""
    sums = torch.stack([(ensemble.mean(0) - truth).double().pow(2).sum(),
                        ensemble.double().var(0).sum()])
    if dist.is_initialized():
        dist.all_reduce(sums)
    return math.sqrt(sums[0].item() / slab.dim), math.sqrt(sums[1].item() / slab.dim)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _summary(config: ScaleConfig, launch: Launch, device: torch.device, history: dict[str, list[float]],
             backend: str) -> dict:
    """Means over cycles (after the first, which also compiles kernels) and the slowest rank's times."""
    timings = torch.tensor([statistics.median(history["seconds_analysis"][1:] or history["seconds_analysis"]),
                            statistics.median(history["seconds_forecast"][1:] or history["seconds_forecast"]),
                            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0],
                           dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(timings, op=dist.ReduceOp.MAX)
    return dict(dim=config.model.dim, ranks=launch.world, launcher=launch.launcher, device=device.type,
                members=config.filter.ensemble_size, steps=config.filter.steps, cycles=config.cycles,
                analysis_kernel=backend,
                rmse_a=statistics.fmean(history["rmse_a"]), rmse_f=statistics.fmean(history["rmse_f"]),
                spread_a=statistics.fmean(history["spread_a"]), seconds_per_analysis=timings[0].item(),
                seconds_per_forecast=timings[1].item(), peak_gpu_gib_max_rank=timings[2].item(), history=history)


@stops_cleanly(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config (see configs/da/l96_ensf_scale.yaml); "
                                                  "defaults are used without one")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.dim=1e7")
    args = parser.parse_args(argv)
    with config_errors(PROG):
        config = load_config(ScaleConfig, args.config, args.overrides)
    launch = detect_launch()
    try:
        check_output_dir(config.output_dir, OUTPUTS, config.overwrite)
        summary = run(config, launch)
    except (ValueError, OSError, FloatingPointError) as err:
        print(f"{PROG}: rank {launch.rank}: error: {err}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError as err:
        print(f"{PROG}: rank {launch.rank}: out of memory ({str(err).splitlines()[0]}); lower "
              f"forecast_chunk or spread model.dim over more ranks", file=sys.stderr)
        return 1
    except (RuntimeError, dist.DistError) as err:  # gloo/NCCL: a peer died or hung past timeout_s, or no rendezvous
        print(f"{PROG}: rank {launch.rank}: lost contact with the other ranks "
              f"(timeout_s={config.timeout_s:g}): {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    if launch.rank == 0:
        with staged_output(config.output_dir) as staging:
            write_json(staging / OUTPUTS[0], summary)
            write_yaml(staging / OUTPUTS[1], to_dict(config))
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
