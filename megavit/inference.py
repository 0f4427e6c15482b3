"""Forecasting with a trained ViT in one process: load any checkpoint, step physical frames forward.

    surrogate = load_surrogate("runs/vit_tiny/consolidated")            # or a checkpoint dir / tag
    next_frames = surrogate.step(frames)                                 # [..., V, H, W] in K
    trajectory = surrogate.rollout(frames, steps=4)                      # [steps, ..., V, H, W]

The model maps a normalized frame to the normalized frame one trained lead time later; the
:class:`Surrogate` applies the training data's per-level normalization on the way in and undoes
it on the way out, and batches over any leading (for example ensemble) dimensions.

The same forecast from the command line, one SQG run frame in, an SQG run file out
(``megavit-forecast --help``; docs/megavit.md):

    python -m megavit.inference --checkpoint runs/vit_tiny/consolidated --initial data/sqg64_tiny_run.nc \
        --day 82.5 --steps 4 --output runs/forecast.nc
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from megavit.atomic import atomic_path, stops_cleanly
from megavit.checkpoint.convert import read_weights
from megavit.checkpoint.deepspeed_files import CheckpointError
from megavit.config import build, number
from megavit.data.sqg_netcdf import DAY, InputError, RunWriter, create_run, open_run, read_pv
from megavit.model.config import ViTConfig
from megavit.model.vit import ViT


@dataclass
class Surrogate:
    """A single-process ViT with the normalization and lead time it was trained with."""

    model: ViT
    mean: Tensor
    """Per-variable mean ``[V]`` subtracted before the model (zeros for synthetic training data)."""
    std: Tensor
    """Per-variable std ``[V]`` divided by before the model (ones for synthetic training data)."""
    lead_hours: float
    """Model time one step advances."""

    @property
    def config(self) -> ViTConfig:
        return self.model.config

    @torch.no_grad()
    def step(self, frames: Tensor) -> Tensor:
        """Frames ``[..., V, H, W]`` in physical units -> the frames one lead time later (same shape, dtype)."""
        shape = tuple(frames.shape)
        expected = (self.config.in_vars, *self.config.image_size)
        if shape[-3:] != expected:
            raise ValueError(f"frames have trailing shape {list(shape[-3:])}, the model expects {list(expected)}")
        parameter = next(self.model.parameters())
        scale = (slice(None), None, None)
        x = frames.reshape(-1, *expected).to(parameter.device, torch.float32)
        x = ((x - self.mean[scale]) / self.std[scale]).to(parameter.dtype)
        lead = torch.full((x.shape[0],), self.lead_hours, device=x.device, dtype=parameter.dtype)
        y = self.model(x, lead).float() * self.std[scale] + self.mean[scale]
        return y.reshape(shape).to(frames.device, frames.dtype)

    def rollout(self, frames: Tensor, steps: int) -> Tensor:
        """Autoregressive forecast: ``[steps, ..., V, H, W]``, entry k at (k + 1) lead times."""
        out = []
        for _ in range(steps):
            frames = self.step(frames)
            out.append(frames)
        return torch.stack(out)


def load_surrogate(path: str | Path, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> Surrogate:
    """A :class:`Surrogate` from a consolidated directory or a checkpoint of any (tp, pp, dp) layout."""
    weights, metadata = read_weights(path)
    config = build(ViTConfig, metadata["model"], "model")
    with torch.random.fork_rng(devices=[]):  # the initial weights are replaced by the file's
        model = ViT(config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit the model config stored with them: "
                              f"{' '.join(str(err).split())}") from None
    model = model.to(device=device, dtype=dtype).eval()
    data = metadata.get("data") or {}
    norm = data.get("normalization")
    variables = config.in_vars
    mean = torch.tensor(norm["mean"] if norm else [0.0] * variables, dtype=torch.float32, device=device)
    std = torch.tensor(norm["std"] if norm else [1.0] * variables, dtype=torch.float32, device=device)
    return Surrogate(model=model, mean=mean, std=std, lead_hours=float(data.get("lead_hours", 12.0)))


# ---------------------------------------------------------------------------------------------
# The forecast command: megavit-forecast / python -m megavit.inference

PROG = "megavit-forecast"
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FORECAST_TITLE = "SQG forecast by the megavit ViT surrogate (megavit.inference)"
RUN_OWN_ATTRIBUTES = ("title", "history", "comment")  # written afresh by create_run, not copied
DAY_MATCH_SECONDS = 60.0  # --day D picks the frame within a minute of day D
EXAMPLES = """\
examples:
  megavit-forecast --checkpoint runs/vit_tiny/consolidated --initial data/sqg64_tiny_run.nc \\
      --day 82.5 --steps 4 --output runs/forecast_day82.5.nc
  python -m megavit.inference --checkpoint runs/vit_tiny/checkpoints --initial data/sqg64_tiny_run.nc \\
      --time-index -1 --steps 20 --output runs/forecast_last.nc --device cuda --dtype bfloat16 --overwrite

The output is an SQG run file (megavit.data.sqg_netcdf): frame 0 is the initial frame, frame k the
forecast k lead times (the checkpoint's training lead, e.g. 12 h) later; t continues the initial
file's model time. Exit status: 0 done, 2 bad input (nothing written), 1 the forecast failed."""


@dataclass
class ForecastRequest:
    """A checked forecast job: the surrogate, the initial frame and where the frames go."""

    surrogate: Surrogate
    initial: Tensor  # [V, H, W] in K, float32
    initial_seconds: float  # model time of the initial frame
    length: float  # domain side (m), from the x coordinate
    height: float  # lid height (m), from the z coordinate
    attributes: dict[str, Any]  # global attributes for the output file


def parse_forecast_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Roll a trained ViT surrogate out from one frame of an SQG run file and write the "
                    "forecast as an SQG run file.")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="consolidated directory (convert-checkpoint) or DeepSpeed checkpoint dir or tag")
    parser.add_argument("--initial", required=True, metavar="RUN.nc", help="SQG netCDF run holding the initial frame")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--time-index", type=int, default=None, metavar="I",
                      help="index of the initial frame in RUN.nc; negative counts from the end (default 0)")
    when.add_argument("--day", type=number(float), default=None, metavar="D",
                      help="model day of the initial frame (must be a frame of RUN.nc)")
    parser.add_argument("--steps", type=int, required=True, metavar="K", help="lead times to forecast (>= 1)")
    parser.add_argument("--output", required=True, metavar="OUT.nc", help="forecast file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.nc if it exists")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(COMPUTE_DTYPES),
                        help="model precision (default float32; the file stores float32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def initial_index(times: np.ndarray, time_index: int | None, day: float | None, path: str) -> int:
    """The frame of a run chosen by ``--time-index`` (Python-style, negative from the end) or ``--day``."""
    frames = len(times)
    if day is not None:
        matches = np.flatnonzero(np.abs(times - day * DAY) <= DAY_MATCH_SECONDS)
        if not matches.size:
            raise InputError(f"{path}: no frame at day {day:g} (frames from day {times[0] / DAY:g} to "
                             f"{times[-1] / DAY:g}, {frames} in all)")
        return int(matches[0])
    index = 0 if time_index is None else time_index
    if not -frames <= index < frames:
        raise InputError(f"{path}: --time-index {index} is out of range: the file has {frames} frames "
                         f"(0 to {frames - 1}, or -{frames} to -1)")
    return index % frames


def prepare_forecast(args: argparse.Namespace) -> ForecastRequest:
    """Check every input before any work: steps, output path, device, checkpoint, initial frame and its grid."""
    if args.steps < 1:
        raise InputError(f"--steps must be >= 1, got {args.steps}")
    if os.path.exists(args.output) and not args.overwrite:
        raise InputError(f"{args.output} already exists; pass --overwrite to replace it")
    check_device(args.device)
    if not os.path.isfile(args.initial):
        raise InputError(f"{args.initial}: no such file")
    run = open_run(args.initial)
    index = initial_index(run.times, args.time_index, args.day, args.initial)
    surrogate = load_surrogate(args.checkpoint, device=args.device, dtype=COMPUTE_DTYPES[args.dtype])
    expected = (surrogate.config.in_vars, *surrogate.config.image_size)
    if run.grid != expected:
        raise InputError(f"{args.initial}: frames are {'x'.join(map(str, run.grid))} (levels, y, x) but the model "
                         f"in {args.checkpoint} takes {'x'.join(map(str, expected))}")
    with netCDF4.Dataset(args.initial) as dataset:
        frame = read_pv(dataset.variables["pv"], index, index + 1, args.initial)[0]
        length, height = domain_size(dataset, args.initial)
    attributes = {key: value for key, value in run.attributes.items() if key not in RUN_OWN_ATTRIBUTES}
    attributes.update(output_interval=surrogate.lead_hours * 3600.0, forecast_checkpoint=str(args.checkpoint),
                      forecast_initial_file=str(args.initial), forecast_initial_index=index,
                      forecast_dtype=args.dtype)
    return ForecastRequest(surrogate=surrogate, initial=torch.from_numpy(frame.astype(np.float32)),
                           initial_seconds=float(run.times[index]), length=length, height=height,
                           attributes=attributes)


def check_device(device: str, option: str = "--device") -> None:
    """Raise InputError for a device string torch does not know or a CUDA device on a machine without one;
    the message names ``option`` (a command-line option, or a config key such as ``device``)."""
    given = f"{option} {device}" if option.startswith("-") else f"{option}={device}"
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise InputError(f"{given}: {err}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{given}: CUDA is not available on this machine")


def domain_size(dataset: netCDF4.Dataset, path: str) -> tuple[float, float]:
    """(side of the square domain, lid height) in m, from the x and z coordinates of a run file."""
    if "x" not in dataset.variables or "z" not in dataset.variables:
        raise InputError(f"{path}: no x or z coordinate variable (needed for the forecast file's grid)")
    x = np.asarray(dataset.variables["x"][:], dtype=np.float64)
    z = np.asarray(dataset.variables["z"][:], dtype=np.float64)
    return float((x[1] - x[0]) * len(x)), float(z[-1])


def write_forecast(request: ForecastRequest, steps: int, output: str, progress: bool) -> None:
    """Frames 0..steps (the initial frame, then each lead time) into ``output``, published when complete."""
    lead_seconds = request.surrogate.lead_hours * 3600.0
    grid = request.initial.shape[-1]
    with atomic_path(output) as tmp:
        create_run(tmp, n=grid, length=request.length, height=request.height, title=FORECAST_TITLE,
                   creator=PROG, attributes=request.attributes)
        with RunWriter(tmp) as writer:
            frames = request.initial
            writer.write(0, frames.numpy(), request.initial_seconds)
            for k in tqdm(range(1, steps + 1), desc="forecast", unit="step", file=sys.stderr, disable=not progress):
                frames = request.surrogate.step(frames)
                if not torch.isfinite(frames).all():
                    raise FloatingPointError(f"the forecast became non-finite at step {k} "
                                             f"({k * request.surrogate.lead_hours:g} h)")
                writer.write(k, frames.numpy(), request.initial_seconds + k * lead_seconds)


@stops_cleanly(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """The megavit-forecast command: exit status 0, 2 for bad input (nothing written), 1 if the forecast failed."""
    args = parse_forecast_args(argv)
    try:
        request = prepare_forecast(args)
    except (ValueError, OSError) as err:  # InputError, CheckpointError, a bad model config
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    try:
        write_forecast(request, args.steps, args.output, progress=not args.no_progress)
    except (FloatingPointError, OSError) as err:
        print(f"{PROG}: error: {_one_line(err)}; {args.output} was not written", file=sys.stderr)
        return 1
    hours = args.steps * request.surrogate.lead_hours
    print(f"wrote {args.output}: {args.steps + 1} frames, {hours:g} h ahead of day {request.initial_seconds / DAY:g}")
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
