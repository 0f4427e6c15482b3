"""The portable form of a trained ViT: one safetensors file plus one JSON, loadable without DeepSpeed.

    DIR/
      model.safetensors    full (unsharded) weights, names ``layers.<i>.*`` as in megavit.model.ViT
      megavit.json         format_version, model config, training step, the data normalization the
                           model was trained with (per-level mean/std and lead hours; null for
                           synthetic data), and the layout it was converted from

The directory is written into a staging directory and published whole; an existing ``DIR`` is
refused, never overwritten.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from megavit.atomic import Staging
from megavit.checkpoint.deepspeed_files import CheckpointError
from megavit.config import ConfigError, build
from megavit.model.config import ViTConfig

FORMAT_VERSION = 1
WEIGHTS, METADATA = "model.safetensors", "megavit.json"


def is_consolidated(path: Path) -> bool:
    return (path / METADATA).is_file()


def save_consolidated(out_dir: Path, weights: dict[str, Tensor], metadata: dict[str, Any]) -> None:
    """Write ``weights`` and ``metadata`` (without ``format_version``, which is added) as ``out_dir``."""
    if out_dir.exists():
        raise CheckpointError(f"output directory {out_dir} already exists; choose a new one or remove it")
    staging = Staging.create(out_dir.parent)
    with staging:
        bundle = staging.file(out_dir.name)
        bundle.mkdir()
        save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(bundle / WEIGHTS))
        (bundle / METADATA).write_text(json.dumps(dict(format_version=FORMAT_VERSION, **metadata), indent=1) + "\n")
        staging.publish([out_dir.name])


def load_metadata(path: Path) -> dict[str, Any]:
    """``megavit.json`` of a consolidated directory, its format version and model config checked."""
    try:
        metadata = json.loads((path / METADATA).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / METADATA} cannot be read: {err}") from None
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path / METADATA}: unknown format_version {version!r} "
                              f"(this megavit reads version {FORMAT_VERSION})")
    try:
        build(ViTConfig, metadata["model"], "model")
    except (KeyError, ConfigError) as err:
        raise CheckpointError(f"{path / METADATA}: no valid model config ({err})") from None
    return metadata


def load_weights(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path / WEIGHTS))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path / WEIGHTS} cannot be read (truncated or damaged?): {err}") from None
