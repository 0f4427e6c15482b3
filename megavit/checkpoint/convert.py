"""Convert a megavit/DeepSpeed checkpoint of any layout into one portable file (``convert-checkpoint``).

    python tools/convert_checkpoint.py --input runs/vit_tiny/checkpoints --output runs/vit_tiny/consolidated
    python tools/convert_checkpoint.py --input runs/vit_tiny/checkpoints/step0000150 --output vit150

``--input`` is a checkpoint directory (its ``latest`` tag is used) or one tag in it; ``layout.json``
says how the shards are laid out (tp, pp, dp, ZeRO stage, engine). The output is the
consolidated directory of :mod:`megavit.checkpoint.consolidated` (safetensors weights and a JSON
with the model config, step, data normalization and source layout), read by
:func:`megavit.inference.load_surrogate`. On the pipeline engine the weights are read one layer
at a time; the output is held in memory until written (4 bytes per parameter in fp32: 10 GB for
the 2.5B model).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm import tqdm

from megavit.checkpoint.consolidated import is_consolidated, load_metadata, load_weights, save_consolidated
from megavit.checkpoint.deepspeed_files import CheckpointError, read_layers
from megavit.checkpoint.layout import LATEST, read_layout, resolve_tag
from megavit.checkpoint.sharding import partition_dims
from megavit.config import ConfigError, build
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


def model_config(layout: dict[str, Any], where: Path) -> ViTConfig:
    try:
        return build(ViTConfig, layout["model"], "model")
    except (KeyError, ConfigError) as err:
        raise CheckpointError(f"{where / 'layout.json'}: no valid model config ({err})") from None


def read_weights(path: str | Path, progress: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Full fp32 weights and metadata from a consolidated directory or a checkpoint of any layout."""
    path = Path(path)
    if is_consolidated(path):
        return load_weights(path), load_metadata(path)
    tag_dir, layout = locate(path)
    config = model_config(layout, tag_dir)
    dims = partition_dims(config)
    weights: dict[str, Tensor] = {}
    layers = read_layers(tag_dir, layout, dims)
    for _, layer in tqdm(layers, total=config.num_layers + 2, desc="layers", unit="layer", disable=not progress,
                         file=sys.stderr):
        weights.update(layer)
    metadata = dict(model=layout["model"], step=layout.get("step"), data=layout.get("data"),
                    source=dict(path=str(tag_dir.resolve()),
                                **{key: layout[key] for key in ("tp", "pp", "dp", "sequence_parallel", "engine")}))
    return weights, metadata


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="convert-checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, metavar="CKPT_DIR[/TAG]",
                        help="checkpoint directory (its latest tag) or one tag directory")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to create (must not exist)")
    parser.add_argument("--format", choices=["consolidated"], default="consolidated",
                        help="consolidated: one safetensors file plus megavit.json (default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        output = Path(args.output)
        if output.exists():
            raise CheckpointError(f"output directory {output} already exists; choose a new one or remove it")
        weights, metadata = read_weights(args.input, progress=not args.no_progress)
        save_consolidated(output, weights, metadata)
    except (CheckpointError, OSError) as err:
        print(f"convert-checkpoint: error: {err}", file=sys.stderr)
        return 1
    count = sum(t.numel() for t in weights.values())
    print(f"wrote {output} ({count / 1e6:.2f}M parameters, step {metadata.get('step')})")
    return 0
