"""Forecast skill of a trained ViT surrogate against persistence and the SQG model (``evaluate-surrogate``).

    evaluate-surrogate --checkpoint runs/vit_tiny/consolidated --shards data/sqg64_tiny \\
        --starts 20 --steps 4 --output-dir runs/vit_tiny/eval
    evaluate-surrogate --checkpoint runs/vit_tiny/checkpoints --run data/sqg64_tiny_run.nc --steps 8 ...

From M start frames of a held-out sequence (a split of a training shard directory, by default the
test split, or an SQG netCDF run file), three forecasts run K surrogate lead times (12 h each for a
model trained with lead 4 frames of 3 h):

* the ViT surrogate (:func:`megavit.inference.load_surrogate`, autoregressive);
* persistence: the start frame itself, the no-skill reference;
* the SQG model (:class:`da_plugin.models.sqg.SQG`) with the parameters the run recorded, started
  from the same frame. A stored frame is the model's whole state (theta in K on both lids), so
  this forecast repeats the truth run up to float rounding and the order of FFT round trips:
  it is the perfect-model reference, a few orders of magnitude below the other two.

The starts are spread evenly over the frames that have a verifying frame K lead times later, the
grid shifted by a seeded random offset. RMSE (K) at each lead pools the starts, both levels and
all grid points: sqrt(mean((forecast - truth)^2)). The table goes to stdout as markdown;
``--output-dir`` receives ``surrogate_eval.json`` (the numbers and the settings),
``surrogate_eval.md`` (the table) and ``surrogate_eval.png`` (RMSE against lead time, log
scale), published together when complete.
Exit status: 0, 2 for bad input, 1 if a forecast failed. Guide: docs/surrogate_eval.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from da_plugin.io import write_json
from da_plugin.models.sqg import SQG
from da_plugin.models.sqg_truth import model_from_attributes
from megavit.atomic import staged_output, stops_cleanly
from megavit.config import DTYPES, number
from megavit.data.shards import META_FILE, SPLITS, SQGShards
from megavit.data.sqg_netcdf import FrameReader, InputError, Timeline, open_run
from megavit.inference import COMPUTE_DTYPES, Surrogate, check_device, load_surrogate

PROG = "evaluate-surrogate"
FORECASTS = {"vit": "ViT surrogate", "persistence": "persistence", "sqg": "SQG model"}
JSON_FILE, PLOT_FILE, TABLE_FILE = "surrogate_eval.json", "surrogate_eval.png", "surrogate_eval.md"
STEP_RTOL = 1e-6  # lead times must be whole numbers of frame intervals and model steps to this precision


@dataclass
class FrameSource:
    """A held-out sequence of consecutive, uniformly spaced frames, read on demand."""

    name: str
    count: int
    step_seconds: float
    attributes: dict[str, Any]  # the truth run's global attributes (its SQG parameters)
    read: Callable[[np.ndarray], np.ndarray]  # frame indices [n] -> float32 frames [n, 2, ny, nx] in K


def shard_source(root: str | Path, split: str) -> FrameSource:
    """The frames of one split of a training shard directory, its shards joined in time order."""
    dataset = SQGShards(root, split)  # checks meta.json, the statistics and every shard's shape
    meta = json.loads((Path(root) / META_FILE).read_text())
    offsets = np.cumsum([0] + [len(shard) for shard in dataset.shards])
    listed = [entry["first_frame"] for entry in meta["splits"][split]["shards"]]
    if listed != offsets[:-1].tolist():
        raise InputError(f"{root}/{META_FILE}: the {split} shards are not consecutive (first frames {listed})")

    def read(indices: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(offsets, indices, side="right") - 1
        return np.stack([dataset.shards[s][i - offsets[s]] for s, i in zip(shard, indices)]).astype(np.float32)

    return FrameSource(name=f"{root} ({split} split)", count=int(offsets[-1]), step_seconds=float(meta["dt_seconds"]),
                       attributes=meta["attributes"], read=read)


def run_source(path: str) -> FrameSource:
    """The frames of an SQG netCDF run file."""
    run = open_run(path)
    timeline = Timeline.from_runs([run])

    def read(indices: np.ndarray) -> np.ndarray:
        with FrameReader(timeline) as reader:
            return np.concatenate([reader.read(i, i + 1) for i in indices])

    return FrameSource(name=path, count=len(run.times), step_seconds=timeline.step, attributes=run.attributes,
                       read=read)


def whole_multiple(numerator: float, denominator: float, what: str) -> int:
    """numerator / denominator as an int >= 1, or an InputError saying ``what`` does not divide."""
    ratio = numerator / denominator
    if round(ratio) < 1 or abs(ratio - round(ratio)) > STEP_RTOL * ratio:
        raise InputError(f"{what}: {numerator:g} s is not a whole multiple of {denominator:g} s")
    return round(ratio)


def choose_starts(available: int, count: int, seed: int) -> np.ndarray:
    """``count`` start frames in [0, available): evenly spaced, the grid shifted by a seeded offset."""
    if not 1 <= count <= available:
        raise InputError(f"--starts {count}: between 1 and {available} start frames have a verifying frame "
                         "at the last lead time")
    stride = available / count
    offset = np.random.default_rng(seed).uniform(0.0, stride)
    return np.floor(offset + stride * np.arange(count)).astype(np.int64)


def sqg_rollout(model: SQG, initial: Tensor, steps: int, model_steps: int) -> Tensor:
    """The SQG forecast ``[M, steps, 2, N, N]`` from ``initial`` ``[M, 2, N, N]``, ``model_steps`` per lead."""
    states, state = [], initial
    for _ in range(steps):
        state = model.step(state, model_steps)
        states.append(state)
    return torch.stack(states, dim=1)


def rmse_per_lead(forecast: Tensor, truth: Tensor) -> list[float]:
    """RMSE (K) of ``[M, K, 2, ny, nx]`` forecasts per lead, pooled over starts, levels and grid points."""
    error = forecast.double().cpu() - truth.double()
    return error.square().mean(dim=(0, 2, 3, 4)).sqrt().tolist()


@dataclass
class Evaluation:
    """What to compare: the frames, the surrogate, the SQG model and the schedule."""

    source: FrameSource
    surrogate: Surrogate
    sqg: SQG
    sqg_dtype: str
    starts: np.ndarray
    steps: int
    frames_per_lead: int
    model_steps_per_lead: int

    @property
    def lead_hours(self) -> list[float]:
        return [k * self.surrogate.lead_hours for k in range(1, self.steps + 1)]

    def rmse(self) -> dict[str, list[float]]:
        """RMSE (K) per lead time of each forecast in FORECASTS."""
        indices = self.starts[:, None] + self.frames_per_lead * np.arange(self.steps + 1)  # [M, K + 1]
        frames = torch.from_numpy(self.source.read(indices.ravel())).reshape(*indices.shape, *self.sqg.state_shape)
        initial, truth = frames[:, 0], frames[:, 1:]
        device = next(self.surrogate.model.parameters()).device  # the SQG model runs beside the ViT
        vit = self.surrogate.rollout(initial, self.steps).transpose(0, 1)
        sqg_initial = initial.to(device, DTYPES[self.sqg_dtype])
        sqg = sqg_rollout(self.sqg, sqg_initial, self.steps, self.model_steps_per_lead)
        forecasts = {"vit": vit, "persistence": initial[:, None].expand_as(truth), "sqg": sqg}
        for name, forecast in forecasts.items():
            if not torch.isfinite(forecast).all():
                raise FloatingPointError(f"the {FORECASTS[name]} forecast became non-finite")
        return {name: rmse_per_lead(forecast, truth) for name, forecast in forecasts.items()}


def prepare(args: argparse.Namespace) -> Evaluation:
    """Read and check every input: the frames, the checkpoint, the SQG parameters and the schedule."""
    if args.steps < 1:
        raise InputError(f"--steps must be >= 1, got {args.steps}")
    check_device(args.device)
    source = shard_source(args.shards, args.split) if args.shards else run_source(args.run)
    surrogate = load_surrogate(args.checkpoint, device=args.device, dtype=COMPUTE_DTYPES[args.dtype])
    sqg = model_from_attributes(source.attributes, Path(source.name))
    grid = (surrogate.config.in_vars, *surrogate.config.image_size)
    if grid != sqg.state_shape:
        raise InputError(f"{source.name}: frames are {'x'.join(map(str, sqg.state_shape))} (levels, y, x) but the "
                         f"model in {args.checkpoint} takes {'x'.join(map(str, grid))}")
    lead_seconds = surrogate.lead_hours * 3600.0
    frames_per_lead = whole_multiple(lead_seconds, source.step_seconds, f"the surrogate's lead time vs the frames "
                                     f"of {source.name}")
    model_steps = whole_multiple(lead_seconds, sqg.dt, "the surrogate's lead time vs the SQG time step")
    available = source.count - args.steps * frames_per_lead
    if available < 1:
        raise InputError(f"{source.name}: {source.count} frames of {source.step_seconds / 3600:g} h cannot verify "
                         f"{args.steps} leads of {surrogate.lead_hours:g} h")
    sqg_dtype = args.sqg_dtype or (source.attributes.get("dtype") if source.attributes.get("dtype") in DTYPES
                                   else "float64")
    return Evaluation(source=source, surrogate=surrogate, sqg=sqg, sqg_dtype=sqg_dtype,
                      starts=choose_starts(available, args.starts, args.seed), steps=args.steps,
                      frames_per_lead=frames_per_lead, model_steps_per_lead=model_steps)


def markdown_table(lead_hours: Sequence[float], rmse: dict[str, list[float]]) -> str:
    """RMSE (K) per forecast (rows) and lead time (columns) as a markdown table."""
    lines = ["| RMSE (K) | " + " | ".join(f"{hours:g} h" for hours in lead_hours) + " |",
             "| --- |" + " --- |" * len(lead_hours)]
    lines += [f"| {FORECASTS[name]} | " + " | ".join(f"{value:.3g}" for value in values) + " |"
              for name, values in rmse.items()]
    return "\n".join(lines)


def plot_skill(path: Path, lead_hours: Sequence[float], rmse: dict[str, list[float]], title: str) -> None:
    """RMSE against lead time, one line per forecast, log scale (the SQG model sits orders of magnitude lower)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for name, values in rmse.items():
        ax.plot(lead_hours, values, marker="o", lw=1.2, label=FORECASTS[name])
    ax.set_yscale("log")
    ax.set_xticks(lead_hours)
    ax.set_xlabel("lead time (h)")
    ax.set_ylabel("RMSE (K)")
    ax.set_title(title, fontsize="medium")
    ax.legend(loc="best", fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(evaluation: Evaluation, args: argparse.Namespace, rmse: dict[str, list[float]]) -> dict[str, Any]:
    """The numbers and everything needed to reproduce them, for surrogate_eval.json."""
    return {
        "source": evaluation.source.name,
        "checkpoint": str(args.checkpoint),
        "lead_hours": evaluation.lead_hours,
        "rmse_K": rmse,
        "rmse_definition": "sqrt(mean((forecast - truth)^2)) over starts, both levels and all grid points",
        "starts": evaluation.starts.tolist(),
        "seed": args.seed,
        "frame_hours": evaluation.source.step_seconds / 3600.0,
        "vit": {"dtype": args.dtype, "lead_hours": evaluation.surrogate.lead_hours},
        "sqg": {"dtype": evaluation.sqg_dtype, "model_steps_per_lead": evaluation.model_steps_per_lead,
                **dataclasses.asdict(evaluation.sqg)},
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="consolidated directory (convert-checkpoint) or DeepSpeed checkpoint dir or tag")
    frames = parser.add_mutually_exclusive_group(required=True)
    frames.add_argument("--shards", metavar="DIR", help="training shard directory (tools/nc2npy_mpi.py output)")
    frames.add_argument("--run", metavar="RUN.nc", help="SQG netCDF run file instead of shards")
    parser.add_argument("--split", default="test", choices=SPLITS, help="--shards: split to evaluate on (default test)")
    parser.add_argument("--starts", type=number(int, ge=1), default=10, metavar="M", help="start frames (default 10)")
    parser.add_argument("--steps", type=int, default=4, metavar="K", help="surrogate lead times (default 4)")
    parser.add_argument("--seed", type=number(int, ge=0), default=0,
                        help="seed of the start frames' offset (default 0)")
    parser.add_argument("--output-dir", type=Path, metavar="DIR",
                        help=f"write {JSON_FILE}, {TABLE_FILE} and {PLOT_FILE} here (replacing earlier ones)")
    parser.add_argument("--device", default="cpu", help="torch device for both models (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(COMPUTE_DTYPES), help="ViT precision")
    parser.add_argument("--sqg-dtype", choices=sorted(DTYPES),
                        help="SQG precision (default: the truth run's dtype attribute, else float64)")
    return parser.parse_args(argv)


@stops_cleanly(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """The evaluate-surrogate command: exit status 0, 2 for bad input, 1 if a forecast failed."""
    args = parse_args(argv)
    try:
        evaluation = prepare(args)
    except (ValueError, OSError) as err:  # InputError, CheckpointError, a bad shard directory
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    try:
        rmse = evaluation.rmse()
        if args.output_dir is not None:
            with staged_output(args.output_dir) as staging:
                write_json(staging / JSON_FILE, summary(evaluation, args, rmse))
                (staging / TABLE_FILE).write_text(markdown_table(evaluation.lead_hours, rmse) + "\n")
                plot_skill(staging / PLOT_FILE, evaluation.lead_hours, rmse,
                           f"{len(evaluation.starts)} starts from {evaluation.source.name}")
    except (FloatingPointError, OSError) as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(f"{len(evaluation.starts)} starts from {evaluation.source.name}, frames {evaluation.starts.tolist()}")
    print(markdown_table(evaluation.lead_hours, rmse))
    return 0


if __name__ == "__main__":
    sys.exit(main())
