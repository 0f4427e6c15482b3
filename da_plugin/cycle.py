"""The cycling driver: truth -> observations -> forecast -> analysis -> metrics -> output.

``da-cycle CONFIG [key=value ...]`` runs a twin experiment: a nature run (spun up by the
``truth.model``, by default the forecast model itself, or read from an SQG run file) is
observed with noise, an ensemble starting from truth + N(0, init_spread^2) is forecast by the
``model`` (Lorenz-96, SQG or the ViT surrogate) and corrected by the filter every analysis
interval, and a free ensemble from the same start runs beside it without assimilation. Shocks
optionally perturb the observed truth or the nature run. Outputs land in ``output_dir``:
``config.yaml`` (resolved), ``summary.json``, ``analysis.nc`` and ``rmse.png``; time means skip
the first ``burn_in`` cycles. With ``restart_every`` a restart file is kept there while the run
goes, from which ``resume=true`` continues.

``seconds_per_cycle`` counts the cycles only: one-time setup (the nature run's spin-up, the
filter's :meth:`prepare`, such as the LETKF's neighbour lists) happens before the clock starts.
A filter whose mean analysis RMSE ends above the free run's (or is not finite) has diverged:
the summary says ``diverged: true`` (null when there is no free run to compare with) and
``da-cycle`` prints a warning line saying so. The exit status stays 0, since the outputs are
complete and valid (a filter worse than no assimilation is a result); 1: error, 2: bad command
line or config.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import netCDF4
import numpy as np
import torch
from tqdm import tqdm

from da_plugin.filters import FILTERS
from da_plugin.filters.ensf import EnSF
from da_plugin.io import AnalysisWriter, read_restart, write_json, write_restart, write_yaml
from da_plugin.models import MODELS
from da_plugin.models.sqg import SQG
from da_plugin.models.sqg_truth import model_from_attributes
from da_plugin.obs import ObsConfig, ObservationOperator
from da_plugin.plotting import plot_error_series
from megavit.atomic import check_output_dir, staged_output, stops_cleanly
from megavit.config import DTYPES, bounded, check_bounds, config_errors, load_config, registry_field, to_dict
from megavit.data.sqg_netcdf import DAY, open_run, read_pv
from megavit.inference import check_device


@dataclass
class TruthConfig:
    """Where the nature run comes from: a model integrated from ``spinup_steps``, or an SQG run file."""

    source: Literal["model", "file"] = "model"
    # source=model: the nature run's model section (any ``model.name``); absent: the forecast model
    # itself (a perfect-model twin). Resolved at load, so config.yaml always names it.
    model: Any = field(default=None, metadata={"registry": MODELS, "default": "sqg"})
    path: str | None = None  # source=file: an SQG netCDF run (tools/sqg_generate.py), theta in K
    start_day: float = 0.0  # source=file: the day of the initial state (the first analysis is one interval later)

    def __post_init__(self) -> None:
        if self.source == "file" and self.path is None:
            raise ValueError("truth.source=file needs truth.path (an SQG netCDF run, tools/sqg_generate.py)")
        if self.source == "model" and self.path is not None:
            raise ValueError("truth.path is read only with truth.source=file")


@dataclass
class ShockConfig:
    """Sudden perturbations of the truth (the SC24 coupled experiment's shocks), on by ``mode``.

    Each cycle is shocked with probability ``fraction`` (drawn once from the seed; the first cycle
    never is, as published); a shock adds white noise of one of ``amplitudes_pv`` (std in PV units,
    m/s, converted to K by the truth model's f theta0 / g), picked with probabilities ``weights``.
    ``observed``: the observations and the scores see truth + noise for that cycle only, while the
    nature run continues unperturbed (as published); ``nature``: the nature run itself jumps.
    """

    mode: Literal["none", "observed", "nature"] = "none"
    fraction: float = 0.5
    amplitudes_pv: list[float] = field(default_factory=lambda: [1500.0, 1200.0, 900.0, 600.0])
    weights: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4])  # the SC24 code's bins

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"shocks.fraction must be in (0, 1], got {self.fraction}")
        if not self.amplitudes_pv or any(not a > 0 for a in self.amplitudes_pv):
            raise ValueError(f"shocks.amplitudes_pv must be a non-empty list of numbers > 0, got {self.amplitudes_pv}")
        if len(self.weights) != len(self.amplitudes_pv) or any(w < 0 for w in self.weights) \
                or not math.isclose(sum(self.weights), 1.0, rel_tol=1e-6):
            raise ValueError(f"shocks.weights must be {len(self.amplitudes_pv)} numbers >= 0 (one per amplitude) "
                             f"summing to 1, got {self.weights}")


OUTPUTS = ("summary.json", "analysis.nc", "config.yaml", "rmse.png", "restart.pt")
"""What a run leaves in output_dir; any of them marks the directory as holding a run."""


@dataclass
class CycleConfig:
    """A twin experiment: model, observations, filter and the cycling schedule."""

    seed: int = 0  # seeds truth, observations, initial ensemble and filter (separate streams)
    cycles: int = bounded(600, ge=1)  # analysis cycles
    burn_in: int = 100  # leading cycles left out of the time means
    output_dir: str = "runs/da"
    overwrite: bool = False  # replace an earlier run's outputs in output_dir (else refused before any work)
    # truth model steps taking the truth onto the attractor (truth.source=model)
    spinup_steps: int = bounded(2000, ge=0)
    init_spread: float = bounded(1.0, ge=0)  # initial ensemble = truth + N(0, init_spread^2)
    free_run: bool = True  # also run the ensemble without assimilation (rmse_free)
    save_fields: bool = True  # store truth/mean/spread/observations every cycle in analysis.nc
    # analyses only in the first k cycles (1: a free run after one); None: all
    assimilate_cycles: int | None = bounded(None, ge=0)
    restart_every: int = bounded(0, ge=0)  # write output_dir/restart.pt every k cycles (0: never)
    resume: bool = False  # continue from output_dir/restart.pt
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"
    threads: int = bounded(0, ge=0)  # torch CPU threads while cycling; 0: chosen for the problem size (cpu_threads)
    progress: bool = True  # tqdm bar on stderr
    model: Any = registry_field(MODELS, "lorenz96")
    truth: TruthConfig = field(default_factory=TruthConfig)
    obs: ObsConfig = field(default_factory=ObsConfig)
    shocks: ShockConfig = field(default_factory=ShockConfig)
    filter: Any = registry_field(FILTERS, "ensf")

    def __post_init__(self) -> None:
        check_bounds(self)
        if not 0 <= self.burn_in < self.cycles:
            raise ValueError(f"burn_in must be in [0, cycles={self.cycles}), got {self.burn_in}")
        if self.truth.source == "model":
            if self.truth.model is None:
                self.truth.model = self.model
            if not hasattr(self.truth.model, "initial_state"):
                raise ValueError(f"truth.model: {type(self.truth.model).__name__} cannot start a nature run; "
                                 "set truth.model.name (e.g. sqg) or truth.source=file")
        else:
            run_file = RunFile.open(self.truth.path)
            run_file.check_cycles(self.truth.start_day, self.interval, self.cycles)
            self.truth.model = run_file.model
        if tuple(self.truth.model.state_shape) != tuple(self.model.state_shape):
            raise ValueError(f"truth.model's states {list(self.truth.model.state_shape)} differ from the forecast "
                             f"model's {list(self.model.state_shape)}")
        # a run file's frames are the nature run: only a model steps through the interval
        self.nature_steps = steps_per_interval(self.truth.model, self.interval, "truth.model") \
            if self.truth.source == "model" else 0
        self.forecast_steps = steps_per_interval(self.model, self.interval, "model")
        if self.shocks.mode != "none":
            if not hasattr(self.truth.model, "scale"):
                raise ValueError("shocks are in PV units and need an SQG truth (f theta0 / g converts them to K); "
                                 f"truth model is {type(self.truth.model).__name__}")
            if self.shocks.mode == "nature" and self.truth.source == "file":
                raise ValueError("shocks.mode=nature perturbs the nature run, which a run file cannot follow; "
                                 "use truth.source=model or shocks.mode=observed")

    @property
    def interval(self) -> float:
        """Model time between analyses: ``obs.interval``, else ``obs.every`` forecast model steps."""
        return self.obs.interval if self.obs.interval is not None else self.obs.every * self.model.dt


def steps_per_interval(model: Any, interval: float, key: str) -> int:
    """Whole model steps in ``interval``; a ValueError naming ``key`` when it is not a multiple of ``model.dt``."""
    steps = round(interval / model.dt)
    if steps < 1 or not math.isclose(steps * model.dt, interval, rel_tol=1e-9):
        lead = f" (the ViT's trained lead time: {model.lead_hours:g} h)" if hasattr(model, "lead_hours") else ""
        raise ValueError(f"{key}: the analysis interval {interval:g} is not a whole number of its time steps "
                         f"dt={model.dt:g}{lead}; set obs.interval or obs.every accordingly")
    return steps


@dataclass(frozen=True)
class RunFile:
    """An SQG netCDF run (:mod:`megavit.data.sqg_netcdf`) as a nature run: one frame per analysis."""

    path: str
    times: np.ndarray  # [frames] seconds
    model: SQG  # the parameters the run was made with

    @classmethod
    def open(cls, path: str) -> RunFile:
        run = open_run(path)
        return cls(path, run.times, model_from_attributes(run.attributes, Path(path)))

    def frame_index(self, start_day: float, interval: float, cycle: int) -> int:
        """Frame of the state after ``cycle`` analyses (0: the initial state) from ``start_day``."""
        return int(np.searchsorted(self.times, start_day * DAY + cycle * interval - 0.01 * interval))

    def check_cycles(self, start_day: float, interval: float, cycles: int) -> None:
        """Raise unless every analysis time from ``start_day`` on is a frame of the file."""
        for cycle in (0, cycles):
            index = self.frame_index(start_day, interval, cycle)
            wanted = start_day * DAY + cycle * interval
            if index >= len(self.times) or abs(self.times[index] - wanted) > 0.01 * interval:
                raise ValueError(f"truth.path {self.path}: no frame at day {wanted / DAY:g} "
                                 f"(frames from day {self.times[0] / DAY:g} to {self.times[-1] / DAY:g}, "
                                 f"needed: truth.start_day={start_day:g} + {cycles} cycles of {interval:g} s)")
        spacing = float(np.median(np.diff(self.times))) if len(self.times) > 1 else interval
        if not math.isclose(round(interval / spacing) * spacing, interval, rel_tol=1e-3):
            raise ValueError(f"truth.path {self.path}: frames every {spacing:g} s do not divide the analysis "
                             f"interval {interval:g} s")

    def frame(self, index: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Frame ``index``, ``[2, N, N]`` in K."""
        with netCDF4.Dataset(self.path) as ds:
            values = read_pv(ds["pv"], index, index + 1, self.path)[0]
        return torch.from_numpy(np.asarray(values, dtype=np.float64)).to(dtype=dtype, device=device)


def make_generator(seed: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    """An independent, reproducible random stream for one component of the experiment."""
    key = [seed] + [ord(c) for c in stream]
    state = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    return torch.Generator(device=device).manual_seed(state)


def ensemble_stats(ensembles: Sequence[torch.Tensor], truth: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per ensemble (each ``[N, *grid]``, all of one size): the RMSE of its mean against truth and its
    spread (sqrt of the mean ensemble variance), in float64, in one batched computation and one
    read-out (a cycle's few small tensor operations, not a few per ensemble)."""
    batch = torch.stack(list(ensembles)).double().flatten(2)  # [E, N, d]
    rmse = (batch.mean(1) - truth.reshape(-1)).square().mean(-1)
    values = torch.cat([rmse, batch.var(1).mean(-1)]).sqrt().tolist()
    return values[:len(ensembles)], values[len(ensembles):]


def shock_schedule(config: ShockConfig, cycles: int, pv_to_state: float, generator: torch.Generator) -> np.ndarray:
    """Per cycle, the standard deviation of its shock in state units (0: none), ``[cycles]``.

    As the SC24 code: one uniform u per cycle; u > 1 - fraction is a shock, and the amplitude is the
    k-th where u falls in the k-th of the consecutive bins of widths fraction x weights, counted down from 1.
    """
    if config.mode == "none":
        return np.zeros(cycles)
    u = torch.rand(cycles, generator=generator, dtype=torch.float64).numpy()
    edges = 1.0 - config.fraction * np.cumsum(config.weights)  # lower edge of each amplitude's bin
    index = (u[:, None] <= edges[None, :-1]).sum(1)
    amplitudes = np.where(u > edges[-1], np.asarray(config.amplitudes_pv)[index] * pv_to_state, 0.0)
    amplitudes[0] = 0.0  # the first analysis is never shocked
    return amplitudes


Nature = Callable[[torch.Tensor, int], torch.Tensor]
"""Advances the nature run over one analysis interval: (state before, cycle) -> state at that cycle's analysis."""


def model_error_note(config: CycleConfig) -> str | None:
    """A line naming the parameters in which the nature run's model and the forecast model of the
    same kind differ (a model-error experiment, on purpose or not: an SQG run file made with
    sqgturb's Jacobian against the default forecast model), else None."""
    truth, forecast = config.truth.model, config.model
    if type(truth) is not type(forecast) or not dataclasses.is_dataclass(truth):
        return None
    differ = [f"{f.name}={getattr(truth, f.name)!r} vs {getattr(forecast, f.name)!r}"
              for f in dataclasses.fields(truth) if getattr(truth, f.name) != getattr(forecast, f.name)]
    if not differ:
        return None
    return (f"the nature run's {type(truth).__name__} and the forecast model differ ({', '.join(differ)}; truth "
            f"first): a model-error experiment")


def start_nature(config: CycleConfig, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, Nature]:
    """The nature run's initial state and how it advances, from its model or its run file."""
    if config.truth.source == "file":
        run, start_day = RunFile.open(config.truth.path), config.truth.start_day

        def from_file(state: torch.Tensor, cycle: int) -> torch.Tensor:
            return run.frame(run.frame_index(start_day, config.interval, cycle + 1), dtype, device)

        return run.frame(run.frame_index(start_day, config.interval, 0), dtype, device), from_file
    model = config.truth.model
    truth = model.initial_state(make_generator(config.seed, "truth"), dtype=dtype, device=device)
    return model.step(truth, config.spinup_steps), lambda state, cycle: model.step(state, config.nature_steps)


STREAMS = ("obs-noise", "filter", "shocks")  # random streams drawn while cycling (saved in restart files)


@dataclass
class Twin:
    """The experiment between cycles: truth, assimilating and free ensembles, and their random streams.

    Each component draws from its own stream (:func:`make_generator`), so the steps may run in
    any order without changing a number. ``truth`` is the nature run; a cycle's observations and
    scores see :meth:`shocked` truth, which differs from it only on shocked cycles.
    """

    truth: torch.Tensor  # [*grid]
    ensemble: torch.Tensor  # [N, *grid], corrected by the filter every cycle
    free: torch.Tensor | None  # [N, *grid], the same start without assimilation (free_run)
    obs: ObservationOperator
    streams: dict[str, torch.Generator]  # STREAMS
    nature: Nature
    shocks: np.ndarray  # [cycles] shock standard deviation per cycle in state units (0: none)
    # the nature run is the forecast model stepping the same steps, which advances it in the
    # ensembles' batch (a model whose ``batch_invariant`` says that changes no number): one call, not two
    joint_nature: bool = False

    @classmethod
    def start(cls, config: CycleConfig) -> Twin:
        """Spin the truth up onto the attractor, fix the observed variables and draw the initial ensemble."""
        device, dtype = torch.device(config.device), DTYPES[config.dtype]
        truth, nature = start_nature(config, dtype, device)
        obs = ObservationOperator.from_config(config.obs, tuple(truth.shape),
                                              make_generator(config.seed, "obs-layout"))
        init_noise = torch.randn((config.filter.ensemble_size, *truth.shape),
                                 generator=make_generator(config.seed, "init"), dtype=torch.float64)
        ensemble = truth + config.init_spread * init_noise.to(dtype=dtype, device=device)
        shocks = shock_schedule(config.shocks, config.cycles, getattr(config.truth.model, "scale", 1.0),
                                make_generator(config.seed, "shock-cycles"))
        joint_nature = (config.truth.source == "model" and config.truth.model is config.model
                        and config.nature_steps == config.forecast_steps
                        and getattr(config.model, "batch_invariant", False))
        return cls(truth, ensemble, ensemble.clone() if config.free_run else None, obs,
                   {name: make_generator(config.seed, name, device) for name in STREAMS}, nature, shocks,
                   joint_nature)

    def forecast(self, model: Any, steps: int, cycle: int) -> None:
        """Advance the truth to ``cycle``'s analysis time and both ensembles by ``steps`` model steps
        (with ``joint_nature``, all three in one batch)."""
        if self.joint_nature:
            batch = [self.ensemble, self.truth.unsqueeze(0), *([] if self.free is None else [self.free])]
            self.ensemble, truth, *free = model.step(torch.cat(batch), steps).split([len(b) for b in batch])
            self.truth, self.free = truth[0], (free[0] if free else None)
            return
        self.truth = self.nature(self.truth, cycle)
        self.ensemble = model.step(self.ensemble, steps)
        if self.free is not None:
            self.free = model.step(self.free, steps)

    def shocked(self, cycle: int, mode: str) -> torch.Tensor:
        """The truth that ``cycle``'s observations sample and its scores compare with; in mode
        ``nature`` a shock also moves the nature run itself."""
        amplitude = float(self.shocks[cycle])
        if amplitude == 0.0:
            return self.truth
        generator = self.streams["shocks"]
        noise = torch.randn(self.truth.shape, generator=generator, dtype=torch.float64, device=generator.device)
        shocked = self.truth + amplitude * noise.to(self.truth)
        if mode == "nature":
            self.truth = shocked
        return shocked

    def observe(self, truth: torch.Tensor, cycle: int) -> torch.Tensor:
        """Noisy observations ``[m]`` of ``truth``."""
        y = self.obs.sample(truth.reshape(-1), self.streams["obs-noise"])
        self.obs.check(y, where=f"observations at cycle {cycle}")
        return y

    def analyse(self, da_filter: Any, y: torch.Tensor, cycle: int) -> None:
        """Replace the forecast ensemble by the filter's analysis of ``y``."""
        members = self.ensemble.shape[0]
        analysis = da_filter.analysis(self.ensemble.reshape(members, -1), y, self.obs, self.streams["filter"])
        if not torch.isfinite(analysis).all():
            raise FloatingPointError(f"the analysis diverged (NaN/inf) at cycle {cycle}")
        self.ensemble = analysis.reshape(self.ensemble.shape)

    def scores(self, forecast: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
        """rmse_f/spread_f of ``forecast``, rmse_a/spread_a of the (analysis) ensemble and, with a free
        run, rmse_free, all against ``truth``."""
        ensembles = [forecast, self.ensemble, *([] if self.free is None else [self.free])]
        rmse, spread = ensemble_stats(ensembles, truth)
        scores = dict(rmse_f=rmse[0], spread_f=spread[0], rmse_a=rmse[1], spread_a=spread[1])
        if self.free is not None:
            scores["rmse_free"] = rmse[2]
        return scores

    def state(self) -> dict[str, Any]:
        """What a restart file keeps of the twin (the rest follows from the config)."""
        return dict(truth=self.truth.cpu(), ensemble=self.ensemble.cpu(),
                    free=None if self.free is None else self.free.cpu(),
                    streams={name: generator.get_state() for name, generator in self.streams.items()})

    def restore(self, state: dict[str, Any]) -> None:
        """Put back a :meth:`state` (onto this twin's device)."""
        device = self.truth.device
        self.truth, self.ensemble = state["truth"].to(device), state["ensemble"].to(device)
        self.free = None if state["free"] is None else state["free"].to(device)
        for name, generator in self.streams.items():
            generator.set_state(state["streams"][name])


@dataclass
class Progress:
    """What the cycles so far produced: score series, the analysis.nc records (kept for restart
    files), the next cycle and the seconds spent."""

    history: dict[str, list[float]]
    records: list[dict[str, Any]]
    cycle: int = 0
    seconds: float = 0.0


RESUME_FREE_KEYS = ("resume", "progress", "restart_every")  # may differ between a run and its resumption
SMALL_PROBLEM = 2**12  # ensemble values (members x state variables) below which one thread is used


def cpu_threads(config: CycleConfig) -> int:
    """torch CPU threads for the cycles: ``config.threads``, else one for tiny problems (a cycle of
    tiny ops that a second thread cannot split, where it only adds synchronization and, on a busy
    machine, waits: torch's default made 40-variable cycles 8-31x slower on a busy 2-core machine),
    else torch's default (one per core; on the quiet 2-core machine two threads took 400- and
    4000-variable LETKF cycles from 2.1 to 1.5 ms and from 15.2 to 13.2 ms)."""
    if config.threads:
        return config.threads
    size = config.filter.ensemble_size * math.prod(config.model.state_shape)
    return 1 if size < SMALL_PROBLEM else min(torch.get_num_threads(), len(os.sched_getaffinity(0)))


def run(config: CycleConfig) -> dict[str, Any]:
    """Run the experiment, write the outputs atomically, and return the summary.

    Cycles with :func:`cpu_threads` torch threads (restored afterwards).
    ``python -m da_plugin.scale`` cycles the same steps on a state split over ranks; its
    ``run`` says why it keeps a loop of its own.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(config))
    try:
        return _run(config)
    finally:
        torch.set_num_threads(threads)


def _run(config: CycleConfig) -> dict[str, Any]:
    twin = Twin.start(config)
    progress = Progress({name: [] for name in AnalysisWriter.SCALARS}, [])
    if config.resume:
        progress = resume(config, twin)
    if isinstance(config.filter, EnSF) and (note := config.filter.steep_step_note(twin.obs.sigma)):
        print(f"da-cycle: note: {note}", file=sys.stderr)
    if note := model_error_note(config):
        print(f"da-cycle: note: {note}", file=sys.stderr)
    with staged_output(config.output_dir) as staging:
        write_yaml(staging / "config.yaml", to_dict(config))
        cycle_all(config, twin, progress, staging / "analysis.nc")
        summary = _summarize(config, progress, twin.truth.numel(), twin.obs.size)
        write_json(staging / "summary.json", summary)
        _plot(staging / "rmse.png", config, progress.history, twin.truth.numel())
    return summary


def restart_path(config: CycleConfig) -> Path:
    return Path(config.output_dir) / "restart.pt"


def resume(config: CycleConfig, twin: Twin) -> Progress:
    """Load the restart file into ``twin`` and return the progress it recorded; the run's settings must match."""
    saved = read_restart(restart_path(config))
    now = {k: v for k, v in to_dict(config).items() if k not in RESUME_FREE_KEYS}
    then = {k: v for k, v in saved["config"].items() if k not in RESUME_FREE_KEYS}
    changed = [f"{key}: {then.get(key)!r} -> {now.get(key)!r}" for key in sorted(now.keys() | then.keys())
               if now.get(key) != then.get(key)]
    if changed:
        raise ValueError(f"{restart_path(config)} was written by a run with other settings; "
                         f"resume with the same config ({'; '.join(changed)})")
    twin.restore(saved["twin"])
    return Progress(saved["history"], saved["records"], saved["cycle"], saved["seconds"])


def cycle_all(config: CycleConfig, twin: Twin, progress: Progress, path: Path) -> None:
    """Cycles ``progress.cycle`` to the end (forecast, shock, observe, analyse, score), recorded in the
    netCDF file at ``path`` (earlier cycles replayed from ``progress``) and in ``progress``."""
    grid = tuple(twin.truth.shape)
    gridded = len(grid) > 1  # SQG frames: theta in K, times in seconds
    writer = AnalysisWriter(
        path, twin.truth.numel(), twin.obs.indices.numpy(), config.save_fields,
        attributes={"model": type(config.model).__name__, "truth_model": type(config.truth.model).__name__,
                    "filter": type(config.filter).__name__, "ensemble_size": config.filter.ensemble_size,
                    "seed": config.seed, "shocks": config.shocks.mode},
        field_shape=grid, units="K" if gridded else "1", time_units="seconds" if gridded else "model time units",
    )
    keep_records = config.restart_every > 0 or config.resume
    # no autograd bookkeeping in the cycles (a few microseconds per tensor operation, which small
    # states have a few hundred of per cycle): every tensor made below is an inference tensor
    with torch.inference_mode(), writer:
        if hasattr(config.filter, "prepare"):
            config.filter.prepare(twin.obs, twin.ensemble.device, twin.ensemble.dtype)
        for record in progress.records:
            writer.write(**record)
        start = time.perf_counter() - progress.seconds
        for cycle in tqdm(range(progress.cycle, config.cycles), desc="da-cycle", unit="cycle",
                          disable=not config.progress, file=sys.stderr, initial=progress.cycle, total=config.cycles):
            twin.forecast(config.model, config.forecast_steps, cycle)
            truth = twin.shocked(cycle, config.shocks.mode)
            forecast = twin.ensemble
            y = twin.observe(truth, cycle)
            if config.assimilate_cycles is None or cycle < config.assimilate_cycles:
                twin.analyse(config.filter, y, cycle)
            scores = twin.scores(forecast, truth)
            for name, value in scores.items():
                progress.history[name].append(value)
            record = dict(cycle=cycle, time=(cycle + 1) * config.interval, scalars=scores,
                          shock=float(twin.shocks[cycle]), fields=_fields(truth, twin.ensemble, y)
                          if config.save_fields else None)
            writer.write(**record)
            if keep_records:
                progress.records.append(record)
            progress.cycle, progress.seconds = cycle + 1, time.perf_counter() - start
            if config.restart_every and progress.cycle % config.restart_every == 0 and progress.cycle < config.cycles:
                write_restart(restart_path(config), dict(config=to_dict(config), twin=twin.state(),
                                                         **dataclasses.asdict(progress)))


def _fields(truth: torch.Tensor, ensemble: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """One cycle's fields for analysis.nc, flattened (the file's ``field_shape`` attribute has the grid)."""
    return {"truth": truth.reshape(-1).cpu().numpy(), "analysis_mean": ensemble.mean(0).reshape(-1).cpu().numpy(),
            "analysis_spread": ensemble.std(0).reshape(-1).cpu().numpy(), "observation": y.cpu().numpy()}


def _plot(path: Path, config: CycleConfig, history: dict[str, list[float]], dim: int) -> None:
    """The scores' time series (rmse.png)."""
    times = config.interval * np.arange(1, config.cycles + 1)
    plot_error_series(path, times, {k: np.asarray(v) for k, v in history.items() if v},
                      title=f"{type(config.filter).__name__} on {type(config.model).__name__} "
                            f"(d={dim}, N={config.filter.ensemble_size})",
                      burn_in_time=config.burn_in * config.interval if config.burn_in else None)


def _summarize(config: CycleConfig, progress: Progress, dim: int, obs_size: int) -> dict[str, Any]:
    after = slice(config.burn_in, None)
    summary: dict[str, Any] = {
        name: float(np.mean(values[after])) for name, values in progress.history.items() if values
    }
    summary.update(
        cycles=config.cycles,
        burn_in=config.burn_in,
        seconds_per_cycle=progress.seconds / config.cycles,
        state_dim=dim,
        observations_per_cycle=obs_size,
        ensemble_size=config.filter.ensemble_size,
        model=type(config.model).__name__,
        filter=type(config.filter).__name__,
    )
    if "rmse_free" in summary and summary["rmse_a"] > 0:
        summary["free_over_analysis"] = summary["rmse_free"] / summary["rmse_a"]
    summary["diverged"] = diverged(summary)
    return summary


def diverged(summary: dict[str, Any]) -> bool | None:
    """Whether the mean analysis RMSE is above the free run's, or not finite; None (unknown) when
    it is finite and there is no free run to compare with."""
    if not math.isfinite(summary["rmse_a"]):
        return True
    if "rmse_free" not in summary:
        return None
    return summary["rmse_a"] > summary["rmse_free"]


def format_summary(summary: dict[str, Any]) -> str:
    """A two-column table of the summary for the terminal."""
    width = max(len(k) for k in summary)
    rows = []
    for key, value in summary.items():
        text = f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)
        rows.append(f"{key:<{width}}  {text}")
    return "\n".join(rows)


@stops_cleanly("da-cycle")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="da-cycle",
        description="Cycle an ensemble filter on a twin experiment and write summary.json, "
        "analysis.nc (CF netCDF), config.yaml and rmse.png into output_dir.",
        epilog="example: da-cycle configs/da/l96_ensf.yaml filter.ensemble_size=40 output_dir=runs/n40. "
        "Exit status: 0 success (also when the filter diverged: summary.json says so), 1 error, "
        "2 bad command line or config.",
    )
    parser.add_argument("config", help="YAML experiment config (see configs/da/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides applied after the file, e.g. obs.sigma=0.1")
    args = parser.parse_args(argv)
    with config_errors("da-cycle"):
        config = load_config(CycleConfig, args.config, args.overrides)
    try:
        check_device(config.device, "device")
        if not config.resume:
            check_output_dir(config.output_dir, OUTPUTS, config.overwrite)
        summary = run(config)
    except (ValueError, OSError, FloatingPointError) as err:
        print(f"da-cycle: error: {err}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(f"outputs in {Path(config.output_dir).resolve()}")
    if summary["diverged"]:
        print(f"da-cycle: warning: the filter diverged: its mean analysis RMSE {summary['rmse_a']:.4g} exceeds "
              f"the free run's {summary.get('rmse_free', float('nan')):.4g}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
