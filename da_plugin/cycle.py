"""The cycling driver: truth -> observations -> forecast -> analysis -> metrics -> output.

``da-cycle CONFIG [key=value ...]`` runs a twin experiment: a truth trajectory is spun up
and observed with noise, an ensemble starting from truth + N(0, init_spread^2) is forecast
by the model and corrected by the filter every ``obs.every`` model steps, and a free
ensemble from the same start runs beside it without assimilation. Outputs land in
``output_dir``: ``config.yaml`` (resolved), ``summary.json``, ``analysis.nc`` and
``rmse.png``; time means skip the first ``burn_in`` cycles.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from da_plugin.filters import FILTERS
from da_plugin.filters.ensf import EnSF
from da_plugin.io import AnalysisWriter, write_json, write_yaml
from da_plugin.models import MODELS
from da_plugin.obs import ObsConfig, ObservationOperator
from da_plugin.plotting import plot_error_series
from megavit.atomic import staged_output
from megavit.config import DTYPES, config_errors, load_config, registry_field, to_dict


@dataclass
class CycleConfig:
    """A twin experiment: model, observations, filter and the cycling schedule."""

    seed: int = 0  # seeds truth, observations, initial ensemble and filter (separate streams)
    cycles: int = 600  # analysis cycles
    burn_in: int = 100  # leading cycles left out of the time means
    output_dir: str = "runs/da"
    spinup_steps: int = 2000  # model steps taking the truth onto the attractor
    init_spread: float = 1.0  # initial ensemble = truth + N(0, init_spread^2)
    free_run: bool = True  # also run the ensemble without assimilation (rmse_free)
    save_fields: bool = True  # store truth/mean/spread/observations every cycle in analysis.nc
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"
    progress: bool = True  # tqdm bar on stderr
    model: Any = registry_field(MODELS, "lorenz96")
    obs: ObsConfig = field(default_factory=ObsConfig)
    filter: Any = registry_field(FILTERS, "ensf")

    def __post_init__(self) -> None:
        if self.cycles < 1:
            raise ValueError(f"cycles must be >= 1, got {self.cycles}")
        if not 0 <= self.burn_in < self.cycles:
            raise ValueError(f"burn_in must be in [0, cycles={self.cycles}), got {self.burn_in}")
        if self.spinup_steps < 0:
            raise ValueError(f"spinup_steps must be >= 0, got {self.spinup_steps}")
        if not self.init_spread >= 0:
            raise ValueError(f"init_spread must be >= 0, got {self.init_spread}")


def make_generator(seed: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    """An independent, reproducible random stream for one component of the experiment."""
    key = [seed] + [ord(c) for c in stream]
    state = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    return torch.Generator(device=device).manual_seed(state)


def ensemble_stats(ensemble: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(RMSE of the ensemble mean against truth, spread = sqrt of mean ensemble variance)."""
    mean = ensemble.mean(0)
    rmse = (mean - truth).double().square().mean().sqrt().item()
    spread = ensemble.double().var(0).mean().sqrt().item()
    return rmse, spread


@dataclass
class Twin:
    """The experiment between cycles: truth, assimilating and free ensembles, and their random streams.

    Each component draws from its own stream (:func:`make_generator`), so the steps may run in
    any order without changing a number.
    """

    truth: torch.Tensor  # [*grid]
    ensemble: torch.Tensor  # [N, *grid], corrected by the filter every cycle
    free: torch.Tensor | None  # [N, *grid], the same start without assimilation (free_run)
    obs: ObservationOperator
    obs_noise: torch.Generator
    filter_noise: torch.Generator

    @classmethod
    def start(cls, config: CycleConfig) -> Twin:
        """Spin the truth up onto the attractor, fix the observed variables and draw the initial ensemble."""
        device, dtype, model = torch.device(config.device), DTYPES[config.dtype], config.model
        truth = model.initial_state(make_generator(config.seed, "truth"), dtype=dtype, device=device)
        truth = model.step(truth, config.spinup_steps)
        obs = ObservationOperator.from_config(config.obs, tuple(truth.shape),
                                              make_generator(config.seed, "obs-layout"))
        init_noise = torch.randn((config.filter.ensemble_size, *truth.shape),
                                 generator=make_generator(config.seed, "init"), dtype=torch.float64)
        ensemble = truth + config.init_spread * init_noise.to(dtype=dtype, device=device)
        return cls(truth, ensemble, ensemble.clone() if config.free_run else None, obs,
                   make_generator(config.seed, "obs-noise", device), make_generator(config.seed, "filter", device))

    def forecast(self, model: Any, steps: int) -> None:
        """Advance the truth and both ensembles by ``steps`` model steps, to the next analysis time."""
        self.truth = model.step(self.truth, steps)
        self.ensemble = model.step(self.ensemble, steps)
        if self.free is not None:
            self.free = model.step(self.free, steps)

    def observe(self, cycle: int) -> torch.Tensor:
        """Noisy observations ``[m]`` of the truth."""
        y = self.obs.sample(self.truth.reshape(-1), self.obs_noise)
        self.obs.check(y, where=f"observations at cycle {cycle}")
        return y

    def analyse(self, da_filter: Any, y: torch.Tensor, cycle: int) -> None:
        """Replace the forecast ensemble by the filter's analysis of ``y``."""
        members = self.ensemble.shape[0]
        analysis = da_filter.analysis(self.ensemble.reshape(members, -1), y, self.obs, self.filter_noise)
        if not torch.isfinite(analysis).all():
            raise FloatingPointError(f"the analysis diverged (NaN/inf) at cycle {cycle}")
        self.ensemble = analysis.reshape(self.ensemble.shape)

    def scores(self, stage: str) -> dict[str, float]:
        """rmse_<stage> and spread_<stage> of the ensemble (stage f: forecast, a: analysis); with
        the analysis, rmse_free of the free ensemble."""
        scores = dict(zip((f"rmse_{stage}", f"spread_{stage}"), ensemble_stats(self.ensemble, self.truth),
                          strict=True))
        if stage == "a" and self.free is not None:
            scores["rmse_free"] = ensemble_stats(self.free, self.truth)[0]
        return scores


def run(config: CycleConfig) -> dict[str, Any]:
    """Run the experiment, write the outputs atomically, and return the summary.

    ``python -m da_plugin.scale`` cycles the same steps on a state split over ranks; its
    ``run`` says why it keeps a loop of its own.
    """
    twin = Twin.start(config)
    if isinstance(config.filter, EnSF) and (note := config.filter.steep_step_note(twin.obs.sigma)):
        print(f"da-cycle: note: {note}", file=sys.stderr)
    with staged_output(config.output_dir) as staging:
        write_yaml(staging / "config.yaml", to_dict(config))
        history, seconds = cycle_all(config, twin, staging / "analysis.nc")
        summary = _summarize(config, history, seconds, twin.truth.numel(), twin.obs.size)
        write_json(staging / "summary.json", summary)
        _plot(staging / "rmse.png", config, history, twin.truth.numel())
    return summary


def cycle_all(config: CycleConfig, twin: Twin, path: Path) -> tuple[dict[str, list[float]], float]:
    """Every cycle (forecast, observe, analyse, score), recorded in the netCDF file at ``path``;
    returns the scores' time series and the seconds taken."""
    step_time = config.obs.every * config.model.dt
    history: dict[str, list[float]] = {name: [] for name in AnalysisWriter.SCALARS}
    writer = AnalysisWriter(
        path, twin.truth.numel(), twin.obs.indices.numpy(), config.save_fields,
        attributes={"model": type(config.model).__name__, "filter": type(config.filter).__name__,
                    "ensemble_size": config.filter.ensemble_size, "seed": config.seed},
    )
    try:
        start = time.perf_counter()
        for cycle in tqdm(range(config.cycles), desc="da-cycle", unit="cycle", disable=not config.progress,
                          file=sys.stderr):
            twin.forecast(config.model, config.obs.every)
            scores = twin.scores("f")
            y = twin.observe(cycle)
            twin.analyse(config.filter, y, cycle)
            scores.update(twin.scores("a"))
            for name, value in scores.items():
                history[name].append(value)
            writer.write(cycle, (cycle + 1) * step_time, scores, twin.truth.reshape(-1).cpu().numpy(),
                         twin.ensemble.mean(0).reshape(-1).cpu().numpy(),
                         twin.ensemble.std(0).reshape(-1).cpu().numpy(), y.cpu().numpy())
        return history, time.perf_counter() - start
    finally:
        writer.close()


def _plot(path: Path, config: CycleConfig, history: dict[str, list[float]], dim: int) -> None:
    """The scores' time series (rmse.png)."""
    step_time = config.obs.every * config.model.dt
    times = step_time * np.arange(1, config.cycles + 1)
    plot_error_series(path, times, {k: np.asarray(v) for k, v in history.items() if v},
                      title=f"{type(config.filter).__name__} on {type(config.model).__name__} "
                            f"(d={dim}, N={config.filter.ensemble_size})",
                      burn_in_time=config.burn_in * step_time if config.burn_in else None)


def _summarize(config: CycleConfig, history: dict[str, list[float]], seconds: float, dim: int,
               obs_size: int) -> dict[str, Any]:
    after = slice(config.burn_in, None)
    summary: dict[str, Any] = {
        name: float(np.mean(values[after])) for name, values in history.items() if values
    }
    summary.update(
        cycles=config.cycles,
        burn_in=config.burn_in,
        seconds_per_cycle=seconds / config.cycles,
        state_dim=dim,
        observations_per_cycle=obs_size,
        ensemble_size=config.filter.ensemble_size,
        model=type(config.model).__name__,
        filter=type(config.filter).__name__,
    )
    if "rmse_free" in summary and summary["rmse_a"] > 0:
        summary["free_over_analysis"] = summary["rmse_free"] / summary["rmse_a"]
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A two-column table of the summary for the terminal."""
    width = max(len(k) for k in summary)
    rows = []
    for key, value in summary.items():
        text = f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)
        rows.append(f"{key:<{width}}  {text}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="da-cycle",
        description="Cycle an ensemble filter on a twin experiment and write summary.json, "
        "analysis.nc (CF netCDF), config.yaml and rmse.png into output_dir.",
        epilog="example: da-cycle configs/da/l96_ensf.yaml filter.ensemble_size=40 output_dir=runs/n40",
    )
    parser.add_argument("config", help="YAML experiment config (see configs/da/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides applied after the file, e.g. obs.sigma=0.1")
    args = parser.parse_args(argv)
    with config_errors("da-cycle"):
        config = load_config(CycleConfig, args.config, args.overrides)
    try:
        summary = run(config)
    except (ValueError, OSError, FloatingPointError) as err:
        print(f"da-cycle: error: {err}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(f"outputs in {Path(config.output_dir).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
