"""The model weights in a tag's DeepSpeed files, for any (tp, pp, dp, ZeRO stage, sequence-parallel) layout.

What the trainer's two engines write into ``checkpoints/<tag>/`` (``layout.json`` says which):

* pipeline engine: ``layer_<i>-model_<r>-model_states.pt``, layer i's state on TP rank r (the
  pipeline stage is implied by i: DeepSpeed names files by global layer index);
* plain engine: ``mp_rank_<r>_model_states.pt``, the whole model of TP rank r under ``module``.

Data-parallel replicas hold the same weights and only DP rank 0 writes them, so dp and the ZeRO
stage do not change the model files (ZeRO partitions only the optimizer state). Sequence
parallelism changes no parameter shape. Weights are merged over TP with the rules of
:mod:`megavit.checkpoint.sharding`, one layer at a time on the pipeline engine.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megavit.checkpoint.sharding import layer_of, merge


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or not what its metadata says."""


def load_file(path: Path) -> dict[str, Any]:
    """``torch.load`` of one checkpoint file onto the CPU, with a one-line error naming it."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"checkpoint file {path} cannot be read (truncated or damaged?): "
                              f"{str(err).splitlines()[0]}") from None


def pipeline_layer_file(tag_dir: Path, layer: int, tp_rank: int) -> Path:
    return tag_dir / f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def model_states_file(tag_dir: Path, mp_rank: int) -> Path:
    return tag_dir / f"mp_rank_{mp_rank:02d}_model_states.pt"


def read_layers(tag_dir: Path, layout: dict[str, Any],
                dims: dict[str, int | None]) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Yield ``(i, {name: full tensor})`` for layer i = 0, 1, ... with names ``layers.<i>.*``.

    ``dims`` is :func:`megavit.checkpoint.sharding.partition_dims` of the checkpoint's model.
    """
    tp, layers = layout["tp"], 1 + max(layer_of(name) for name in dims)
    by_layer: dict[int, list[str]] = {}
    for name in dims:
        by_layer.setdefault(layer_of(name), []).append(name)
    if layout["engine"] == "pipeline":
        for layer in range(layers):
            shards = [load_file(pipeline_layer_file(tag_dir, layer, r)) for r in range(tp)]
            where = pipeline_layer_file(tag_dir, layer, 0)
            yield layer, _merged(by_layer[layer], [{f"layers.{layer}.{k}": v for k, v in s.items()} for s in shards],
                                 dims, where)
        return
    shards = [load_file(model_states_file(tag_dir, r))["module"] for r in range(tp)]
    for layer in range(layers):
        yield layer, _merged(by_layer[layer], shards, dims, model_states_file(tag_dir, 0))


def _merged(names: list[str], shards: list[dict[str, Tensor]], dims: dict[str, int | None],
            where: Path) -> dict[str, Tensor]:
    expected = {name.split(".", 2)[2] for name in names}
    found = {name.split(".", 2)[2] for name in shards[0] if name.split(".", 2)[1] == names[0].split(".", 2)[1]}
    if found != expected:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise CheckpointError(f"{where} does not hold the model that layout.json describes: "
                              f"missing {missing or 'nothing'}, unexpected {extra or 'nothing'}")
    merged = {}
    for name in names:
        try:
            merged[name] = merge([shard[name] for shard in shards], dims[name], name)
        except KeyError as err:
            raise CheckpointError(f"{where} (or a TP sibling) lacks {err.args[0]}") from None
        except ValueError as err:
            raise CheckpointError(f"{where}: {err}") from None
    return merged
