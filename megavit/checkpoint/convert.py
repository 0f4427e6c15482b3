"""Convert a megavit/DeepSpeed checkpoint of any layout to another layout or one portable file.

    convert-checkpoint --input runs/vit_tiny/checkpoints --output runs/vit_tiny/consolidated
    convert-checkpoint --input runs/big/checkpoints/step0001000 --output runs/big_tp1pp4/checkpoints \\
        --format deepspeed --target-tp 1 --target-pp 4 --with-optimizer
    megavit-train configs/vit/sqg64_108m.yaml parallel.tp=1 parallel.pp=4 \\
        train.output_dir=runs/big_tp1pp4 --resume latest

``--input`` is a checkpoint directory (its ``latest`` tag) or one tag in it; its ``layout.json``
says how the shards are laid out (tp, pp, dp, engine, sequence parallelism, model config).

``--format consolidated`` (default) writes safetensors weights plus ``megavit.json`` (model
config, step, data normalization, source layout), read by :func:`megavit.inference.load_surrogate`.

``--format deepspeed`` writes a checkpoint directory (``<tag>/``, ``latest``) for a run with
``--target-tp``/``--target-pp``/``--target-dp`` (defaults: the source's) to ``--resume``. With
``--with-optimizer`` the fp32 master weights, Adam moments, step and LR schedule come along (the
run must use the source's DeepSpeed config: same ZeRO stage and precision); without it the run
starts from the weights with a fresh optimizer at step 0 (fine-tuning). Pipeline stages get the
layers DeepSpeed assigns with ``--partition-method`` (the trainer's ``parallel.partition_method``).

Memory: weight files are read one layer at a time and the output is held in memory until
written, 4 bytes per parameter in fp32 (10 GB for the 2.5B model); ``--with-optimizer`` adds 12
bytes per parameter (fp32 master and two moments: 40 GB in all for 2.5B).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm import tqdm

from megavit.atomic import stops_cleanly
from megavit.checkpoint.consolidated import is_consolidated, load_metadata, load_weights, save_consolidated
from megavit.checkpoint.deepspeed_files import (
    CheckpointError,
    TrainingState,
    fresh_model_states,
    load_file,
    model_states_file,
    optimizer_kind,
    read_layers,
    read_optimizer,
)
from megavit.checkpoint.deepspeed_writer import TargetLayout, write_deepspeed
from megavit.checkpoint.layout import LATEST, read_layout, resolve_tag
from megavit.checkpoint.sharding import parameter_shapes, partition_dims
from megavit.config import ConfigError, build, number
from megavit.model.config import ViTConfig


def locate(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(tag directory, layout.json)`` for a checkpoint directory (its ``latest``) or a tag directory."""
    path = Path(path)
    if (path / "layout.json").is_file():
        checkpoints, tag = path.parent, path.name
    elif path.is_dir():
        checkpoints, tag = path, LATEST
    else:
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        tag = resolve_tag(checkpoints, tag)
        layout = read_layout(checkpoints, tag)
    except (FileNotFoundError, ValueError) as err:
        raise CheckpointError(str(err)) from None
    return checkpoints / tag, layout


def source_layout(path: Path) -> dict[str, Any]:
    """The source's parallel sizes, engine and model config, without reading its tensors."""
    if is_consolidated(path):
        metadata = load_metadata(path)
        return dict({k: v for k, v in metadata["source"].items() if k != "path"}, model=metadata["model"])
    return locate(path)[1]


def model_config(layout: dict[str, Any], where: Path) -> ViTConfig:
    try:
        return build(ViTConfig, layout["model"], "model")
    except (KeyError, ConfigError) as err:
        raise CheckpointError(f"{where / 'layout.json'}: no valid model config ({err})") from None


def read_state(path: str | Path, *, with_optimizer: bool = False, progress: bool = False) -> TrainingState:
    """A checkpoint tag of any layout, or a consolidated directory, as full tensors (the optimizer
    too, on request: consolidated files hold none)."""
    path = Path(path)
    if is_consolidated(path):
        if with_optimizer:
            raise CheckpointError(f"{path} is a consolidated checkpoint, which holds no optimizer state; "
                                  f"drop --with-optimizer")
        metadata, weights = load_metadata(path), load_weights(path)
        step = metadata.get("step") or 0
        layout = dict(source_layout(path), step=step, data=metadata.get("data"))
        return TrainingState(tag=f"step{step:07d}", layout=layout, weights=weights,
                             model_states=fresh_model_states(step), optimizer=None)
    tag_dir, layout = locate(path)
    config = model_config(layout, tag_dir)
    dims, shapes = partition_dims(config), parameter_shapes(config)
    weights: dict[str, Tensor] = {}
    layers = read_layers(tag_dir, layout, dims)
    for _, layer in tqdm(layers, total=config.num_layers + 2, desc="layers", unit="layer", disable=not progress,
                         file=sys.stderr):
        for name, tensor in layer.items():
            if tensor.shape != shapes[name]:
                raise CheckpointError(f"{tag_dir}: {name} has shape {list(tensor.shape)}, the model config in "
                                      f"layout.json needs {list(shapes[name])}")
        weights.update(layer)
    model_states = load_file(model_states_file(tag_dir, 0))
    optimizer = None
    if with_optimizer:
        kind = optimizer_kind(tag_dir, model_states)
        if kind is None:
            raise CheckpointError(f"{tag_dir} holds no optimizer state (saved without one?); drop --with-optimizer")
        optimizer = read_optimizer(tag_dir, layout, config, weights, kind)
    model_states.update(module=None, optimizer=None)
    return TrainingState(tag=tag_dir.name, layout=layout, weights=weights, model_states=model_states,
                         optimizer=optimizer)


def read_weights(path: str | Path, progress: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Full weights and metadata from a consolidated directory or a checkpoint of any layout."""
    path = Path(path)
    if is_consolidated(path):
        return load_weights(path), load_metadata(path)
    state = read_state(path, progress=progress)
    layout = state.layout
    metadata = dict(model=layout["model"], step=layout.get("step"), data=layout.get("data"),
                    source=dict(path=str(locate(path)[0].resolve()),
                                **{key: layout[key] for key in ("tp", "pp", "dp", "sequence_parallel", "engine")}))
    return state.weights, metadata


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="convert-checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, metavar="CKPT_DIR[/TAG]",
                        help="checkpoint directory (its latest tag) or one tag directory")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to create (must not exist)")
    parser.add_argument("--format", choices=["consolidated", "deepspeed"], default="consolidated",
                        help="consolidated: one safetensors file plus megavit.json (default); "
                             "deepspeed: a checkpoint directory for another (tp, pp, dp) layout")
    target = parser.add_argument_group("deepspeed format")
    target.add_argument("--target-tp", type=number(int, ge=1), metavar="N",
                        help="tensor-parallel size (default: the source's)")
    target.add_argument("--target-pp", type=number(int, ge=1), metavar="M",
                        help="pipeline stages (default: the source's)")
    target.add_argument("--target-dp", type=number(int, ge=1), metavar="D",
                        help="data-parallel size (default: the source's; ZeRO splits the optimizer over it)")
    target.add_argument("--target-engine", choices=["pipeline", "plain"],
                        help="DeepSpeed engine (default: the source's; pipeline when --target-pp > 1)")
    target.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction,
                        help="the target run's parallel.sequence_parallel (default: the source's)")
    target.add_argument("--partition-method", choices=["parameters", "uniform"], default="parameters",
                        help="the target run's parallel.partition_method (default: parameters)")
    target.add_argument("--with-optimizer", action="store_true",
                        help="carry the optimizer state (fp32 master weights, Adam moments, step, LR schedule)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    deepspeed_only = [flag for flag, value in [("--target-tp", args.target_tp), ("--target-pp", args.target_pp),
                                               ("--target-dp", args.target_dp), ("--target-engine", args.target_engine),
                                               ("--sequence-parallel", args.sequence_parallel),
                                               ("--with-optimizer", args.with_optimizer or None)] if value is not None]
    if args.format == "consolidated" and deepspeed_only:
        parser.error(f"{', '.join(deepspeed_only)}: only with --format deepspeed")
    return args


def target_layout(args: argparse.Namespace, source: dict[str, Any]) -> TargetLayout:
    """The target layout from the options, each defaulting to the source's."""
    pp = args.target_pp or source["pp"]
    engine = args.target_engine or ("pipeline" if pp > 1 else source["engine"])
    sequence_parallel = source["sequence_parallel"] if args.sequence_parallel is None else args.sequence_parallel
    return TargetLayout(tp=args.target_tp or source["tp"], pp=pp, dp=args.target_dp or source["dp"], engine=engine,
                        sequence_parallel=sequence_parallel, partition_method=args.partition_method)


@stops_cleanly("convert-checkpoint")
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    try:
        if output.exists():
            raise CheckpointError(f"output directory {output} already exists; choose a new one or remove it")
        if args.format == "consolidated":
            weights, metadata = read_weights(args.input, progress=not args.no_progress)
            save_consolidated(output, weights, metadata)
            step = metadata.get("step")
        else:
            layout = source_layout(Path(args.input))
            target = target_layout(args, layout)
            target.check(model_config(layout, Path(args.input)))  # before reading anything large
            state = read_state(args.input, with_optimizer=args.with_optimizer, progress=not args.no_progress)
            write_deepspeed(output, state, target, with_optimizer=args.with_optimizer,
                            progress=not args.no_progress)
            weights, step = state.weights, state.layout.get("step")
    except (CheckpointError, OSError) as err:
        print(f"convert-checkpoint: error: {err}", file=sys.stderr)
        return 1
    count = sum(t.numel() for t in weights.values())
    print(f"wrote {output} ({count / 1e6:.2f}M parameters, step {step})")
    return 0
