"""EnSF cycling on a domain-decomposed Lorenz-96 state, from one process to many GPUs or nodes.

    torchrun --nproc_per_node 4 -m da_plugin.scale configs/da/l96_ensf_scale.yaml model.dim=10000000
    mpiexec -n 4 python -m da_plugin.scale configs/da/l96_ensf_scale.yaml
    srun python -m da_plugin.scale configs/da/l96_ensf_scale.yaml          (MASTER_ADDR exported)

Each rank holds a contiguous slab of the state for all N members (da_plugin.distributed):
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from da_plugin.counter_rng import counter_normal
from da_plugin.distributed import Launch, Slab, detect_launch, ensf_analysis, init_distributed, rk4_step
from da_plugin.filters.ensf import EnSF
from da_plugin.io import write_json, write_yaml
from da_plugin.models.lorenz96 import Lorenz96
from da_plugin.obs import ObservationOperator, Operator
from megavit.atomic import staged_output
from megavit.config import config_errors, load_config, to_dict

# counter-generator draws of the twin experiment, far from the analyses' draws (cycle * noise_draws + k)
TRUTH_DRAW, ENSEMBLE_DRAW, OBS_DRAW = 1 << 40, (1 << 40) + 2, 1 << 41
PROBLEM_FIELDS = ("dim", "forcing", "dt", "seed", "spinup_steps", "obs_every", "obs_sigma", "obs_operator",
                  "obs_stride", "cycles")


@dataclass
class ScaleObs:
    """Observations of every ``stride``-th variable every ``every`` model steps."""

    operator: Operator = "arctan"
    sigma: float = 0.05
    every: int = 1
    stride: int = 1

    def __post_init__(self) -> None:
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ValueError(f"obs.sigma must be a finite number > 0, got {self.sigma}")
        if self.every < 1 or self.stride < 1:
            raise ValueError(f"obs.every and obs.stride must be >= 1, got {self.every} and {self.stride}")


@dataclass
class ScaleConfig:
    """A decomposed twin experiment: Lorenz-96 truth, arctan/identity observations, EnSF."""

    seed: int = 0
    cycles: int = 10
    spinup_steps: int = 1000  # truth steps from 8 + N(0, 1) onto the attractor
    init_spread: float = 1.0  # initial ensemble = truth + N(0, init_spread^2)
    problem_dir: Optional[str] = None  # read truth/obs shards (tools/ensf_problem_gen.py) instead of computing them
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the rank's local GPU when there is one
    dtype: Literal["float32", "float64"] = "float32"
    timeout_s: float = 300.0  # a rank silent this long (dead, hung) stops the job with an error
    forecast_chunk: int = 4  # members integrated together (bounds the RK4 temporaries at d = 1e8)
    output_dir: str = "runs/ensf_scale"
    progress: bool = True
    model: Lorenz96 = field(default_factory=lambda: Lorenz96(dim=1_000_000, dt=0.005))
    obs: ScaleObs = field(default_factory=ScaleObs)
    filter: EnSF = field(default_factory=EnSF)

    def __post_init__(self) -> None:
        if self.cycles < 1:
            raise ValueError(f"cycles must be >= 1, got {self.cycles}")
        if self.spinup_steps < 0 or self.init_spread < 0 or self.timeout_s <= 0 or self.forecast_chunk < 1:
            raise ValueError("spinup_steps and init_spread must be >= 0, timeout_s > 0 and forecast_chunk >= 1")

    def problem(self) -> dict:
        """The fields a problem directory must agree on."""
        return dict(dim=self.model.dim, forcing=self.model.forcing, dt=self.model.dt, seed=self.seed,
                    spinup_steps=self.spinup_steps, obs_every=self.obs.every, obs_sigma=self.obs.sigma,
                    obs_operator=self.obs.operator, obs_stride=self.obs.stride, cycles=self.cycles)


def observed_range(start: int, stop: int, stride: int) -> tuple[int, int]:
    """Positions [a, b) in the observation vector of the observed variables in [start, stop)."""
    return -(-start // stride), -(-stop // stride)


def slab_operator(config: ScaleConfig, slab: Slab) -> ObservationOperator:
    """The observation operator restricted to this slab (indices local to the slab)."""
    first, last = observed_range(slab.start, slab.stop, config.obs.stride)
    local = torch.arange(first, last, dtype=torch.long) * config.obs.stride - slab.start
    return ObservationOperator(config.obs.operator, config.obs.sigma, local, slab.size)


def twin_truth(config: ScaleConfig, slab: Slab, obs: ObservationOperator, device: torch.device,
               dtype: torch.dtype, group: dist.ProcessGroup | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Truth slab at t0, then (truth, y) at each analysis time, computed by all ranks together."""
    dim, model = config.model.dim, config.model
    truth = model.forcing + counter_normal(config.seed, TRUTH_DRAW, 1, slab.start, slab.stop, dim, dtype, device)[0]
    for _ in range(config.spinup_steps):
        truth = rk4_step(truth, model.forcing, model.dt, group)
    yield truth, torch.empty(0)
    first, last = observed_range(slab.start, slab.stop, config.obs.stride)
    for cycle in range(config.cycles):
        for _ in range(config.obs.every):
            truth = rk4_step(truth, model.forcing, model.dt, group)
        # the noise of observation j is keyed by its position j in the global observation vector
        noise = counter_normal(config.seed, OBS_DRAW + 2 * cycle, 1, first, last, -(-dim // config.obs.stride),
                               dtype, device)[0]
        yield truth, obs(truth) + config.obs.sigma * noise


def read_problem(config: ScaleConfig, slab: Slab, device: torch.device,
                 dtype: torch.dtype) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same sequence as :func:`twin_truth`, read for this slab from a problem directory."""
    root = Path(config.problem_dir)
    meta = load_problem_meta(root, config)
    first, last = observed_range(slab.start, slab.stop, config.obs.stride)
    truth = _read_columns(root, meta, "truth", slab.start, slab.stop, lambda s, e: (s, e))
    obs = _read_columns(root, meta, "obs", first, last, lambda s, e: observed_range(s, e, config.obs.stride))
    to_tensor = lambda rows: torch.from_numpy(np.ascontiguousarray(rows)).to(device=device, dtype=dtype)  # noqa: E731
    yield to_tensor(truth[0]), torch.empty(0)
    for cycle in range(config.cycles):
        yield to_tensor(truth[cycle + 1]), to_tensor(obs[cycle])


def load_problem_meta(root: Path, config: ScaleConfig) -> dict:
    """meta.json of a problem directory, checked field by field against the config."""
    path = root / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"problem_dir {root}: no meta.json (write one with tools/ensf_problem_gen.py)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    expected = config.problem()
    for key in PROBLEM_FIELDS:
        if meta.get(key) != expected[key]:
            raise ValueError(f"{path}: {key} is {meta.get(key)!r} but the run is configured with {expected[key]!r} "
                             f"(pass {key}-matching overrides or regenerate the problem)")
    return meta


def _read_columns(root: Path, meta: dict, kind: str, start: int, stop: int, shard_range) -> np.ndarray:
    """Columns [start, stop) of the ``kind`` arrays, gathered from the shards that overlap them."""
    rows = meta["cycles"] + 1 if kind == "truth" else meta["cycles"]
    pieces = []
    for index, (shard_start, shard_stop) in enumerate(meta["shards"]):
        low, high = shard_range(shard_start, shard_stop)
        if high <= start or low >= stop:
            continue
        path = root / f"{kind}_{index:05d}.npy"
        try:
            array = np.load(path, mmap_mode="r")
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"{path}: cannot read shard ({err})") from None
        if array.shape != (rows, high - low):
            raise ValueError(f"{path}: shape {array.shape}, expected {(rows, high - low)} from meta.json")
        pieces.append(array[:, max(start, low) - low:min(stop, high) - low])
    result = np.concatenate(pieces, axis=1) if pieces else np.empty((rows, 0), np.float32)
    if result.shape[1] != stop - start:
        raise ValueError(f"{root}: the {kind} shards cover {result.shape[1]} of columns [{start}, {stop})")
    return result


def run(config: ScaleConfig, launch: Launch) -> dict:
    """Cycle the decomposed twin experiment on this rank; returns the (global) summary."""
    device = _device(config.device, launch)
    dtype = getattr(torch, config.dtype)
    backend = "nccl" if device.type == "cuda" else "gloo"
    init_distributed(launch, backend, config.timeout_s)
    slab = Slab(config.model.dim, launch.rank, launch.world)
    obs = slab_operator(config, slab)
    members, model = config.filter.ensemble_size, config.model
    problem = (read_problem(config, slab, device, dtype) if config.problem_dir
               else twin_truth(config, slab, obs, device, dtype))
    truth, _ = next(problem)
    forecast = truth + config.init_spread * counter_normal(config.seed, ENSEMBLE_DRAW, members, slab.start, slab.stop,
                                                           slab.dim, dtype, device)
    if launch.rank == 0 and (note := config.filter.steep_step_note(config.obs.sigma)):
        print(f"da_plugin.scale: note: {note}", file=sys.stderr)
    history = {"rmse_f": [], "rmse_a": [], "spread_a": [], "seconds_forecast": [], "seconds_analysis": []}
    bar = tqdm(range(config.cycles), desc=f"EnSF d={slab.dim:,} on {launch.world} ranks", unit="cycle",
               disable=not config.progress or launch.rank != 0, file=sys.stderr)
    for cycle in bar:
        started = _now(device)
        for first in range(0, members, config.forecast_chunk):
            chunk = forecast[first:first + config.forecast_chunk]
            for _ in range(config.obs.every):
                chunk = rk4_step(chunk, model.forcing, model.dt)
            forecast[first:first + config.forecast_chunk] = chunk
        forecast_done = _now(device)
        truth, y = next(problem)
        analysis = ensf_analysis(config.filter, forecast, y, obs, slab, config.seed, cycle)
        analysis_done = _now(device)
        rmse_f, _ = _global_errors(forecast, truth, slab)
        rmse_a, spread_a = _global_errors(analysis, truth, slab)
        if not math.isfinite(rmse_a):
            raise FloatingPointError(f"the analysis diverged (NaN/inf) at cycle {cycle}")
        for key, value in zip(history, (rmse_f, rmse_a, spread_a, forecast_done - started,
                                        analysis_done - forecast_done)):
            history[key].append(value)
        bar.set_postfix(rmse_a=f"{rmse_a:.3f}")
        forecast = analysis
    return _summary(config, launch, device, history, config.filter.uses_fused_kernel(forecast, obs))


def _global_errors(ensemble: torch.Tensor, truth: torch.Tensor, slab: Slab) -> tuple[float, float]:
    """RMSE of the ensemble mean and the mean ensemble spread over the whole state."""
    sums = torch.stack([(ensemble.mean(0) - truth).double().pow(2).sum(),
                        ensemble.double().var(0).sum()])
    if dist.is_initialized():
        dist.all_reduce(sums)
    return math.sqrt(sums[0].item() / slab.dim), math.sqrt(sums[1].item() / slab.dim)


def _device(choice: str, launch: Launch) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible to this rank")
    index = launch.local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _summary(config: ScaleConfig, launch: Launch, device: torch.device, history: dict[str, list[float]],
             fused: bool) -> dict:
    """Means over cycles (after the first, which also compiles kernels) and the slowest rank's times."""
    timings = torch.tensor([statistics.median(history["seconds_analysis"][1:] or history["seconds_analysis"]),
                            statistics.median(history["seconds_forecast"][1:] or history["seconds_forecast"]),
                            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0],
                           dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(timings, op=dist.ReduceOp.MAX)
    return dict(dim=config.model.dim, ranks=launch.world, launcher=launch.launcher, device=device.type,
                members=config.filter.ensemble_size, steps=config.filter.steps, cycles=config.cycles,
                analysis_kernel="triton" if fused else "torch",
                rmse_a=statistics.fmean(history["rmse_a"]), rmse_f=statistics.fmean(history["rmse_f"]),
                spread_a=statistics.fmean(history["spread_a"]), seconds_per_analysis=timings[0].item(),
                seconds_per_forecast=timings[1].item(), peak_gpu_gib_max_rank=timings[2].item(), history=history)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m da_plugin.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config (see configs/da/l96_ensf_scale.yaml); "
                                                  "defaults are used without one")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.dim=1e7")
    args = parser.parse_args(argv)
    with config_errors("da_plugin.scale"):
        config = load_config(ScaleConfig, args.config, args.overrides)
    launch = detect_launch()
    try:
        summary = run(config, launch)
    except (ValueError, OSError, FloatingPointError) as err:
        print(f"da_plugin.scale: rank {launch.rank}: error: {err}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError as err:
        print(f"da_plugin.scale: rank {launch.rank}: out of memory ({str(err).splitlines()[0]}); lower "
              f"forecast_chunk or spread model.dim over more ranks", file=sys.stderr)
        return 1
    except (RuntimeError, dist.DistError) as err:  # gloo/NCCL: a peer died or hung past timeout_s, or no rendezvous
        print(f"da_plugin.scale: rank {launch.rank}: lost contact with the other ranks "
              f"(timeout_s={config.timeout_s:g}): {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    if launch.rank == 0:
        with staged_output(config.output_dir) as staging:
            write_json(staging / "summary.json", summary)
            write_yaml(staging / "config.yaml", to_dict(config))
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
