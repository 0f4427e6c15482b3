"""The DeepSpeed files of a checkpoint tag, for any (tp, pp, dp, ZeRO stage, sequence-parallel) layout.

What the trainer's two engines write into ``checkpoints/<tag>/`` (``layout.json`` says which):

* pipeline engine: ``layer_<i>-model_<r>-model_states.pt``, layer i's weights on TP rank r (the
  pipeline stage is implied by i: DeepSpeed names files by global layer index), and per
  model-parallel rank m = stage * tp + r an ``mp_rank_<m>_model_states.pt`` without weights;
* plain engine: ``mp_rank_<r>_model_states.pt``, the whole model of TP rank r under ``module``.

The ``mp_rank`` files also hold the step, the LR schedule, the DeepSpeed config and the
parameter order of their rank (``param_shapes``). The optimizer state is either in them
(``optimizer``, without ZeRO) or in ``[bf16_]zero_pp_rank_<d>_mp_rank_<m>_optim_states.pt``,
one per DP rank d (:mod:`megavit.checkpoint.zero`).

Data-parallel replicas hold the same weights and only DP rank 0 writes them, so dp and the ZeRO
stage do not change the model files. Sequence parallelism changes no parameter shape. Tensors
are merged over TP with the rules of :mod:`megavit.checkpoint.sharding`.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from megavit.checkpoint.sharding import layer_of, merge, parameter_shapes, partition_dims
from megavit.checkpoint.zero import join_flat
from megavit.model.config import ViTConfig

MOMENTS = ("exp_avg", "exp_avg_sq")
PER_RANK_ZERO_ENTRIES = ("base_optimizer_state", "single_partition_of_fp32_groups", "group_paddings",
                         "param_alignment_paddings", "partition_count", "param_slice_mappings")
OptimizerKind = Literal["zero", "bf16_zero", "torch"]


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


def optimizer_file(tag_dir: Path, kind: OptimizerKind, dp_rank: int, mp_rank: int) -> Path:
    prefix = "bf16_" if kind == "bf16_zero" else ""
    return tag_dir / f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


def model_parallel_size(layout: dict[str, Any]) -> int:
    """How many ``mp_rank`` files a tag has: one per (stage, TP rank), or per TP rank on the plain engine."""
    return layout["tp"] * (layout["pp"] if layout["engine"] == "pipeline" else 1)


def stage_boundaries(config: ViTConfig, tp: int, pp: int, method: str = "parameters") -> list[int]:
    """First layer of each of the ``pp`` pipeline stages, then the layer count, as DeepSpeed's
    ``PipelineModule`` assigns them (``parameters``: balanced by one TP shard's parameter count)."""
    from deepspeed.runtime import utils as ds_utils

    layers = config.num_layers + 2
    if method == "uniform":
        return [int(b) for b in ds_utils.partition_uniform(num_items=layers, num_parts=pp)]
    dims = partition_dims(config)
    counts = [0] * layers
    for name, shape in parameter_shapes(config).items():
        counts[layer_of(name)] += shape.numel() // (tp if dims[name] is not None else 1)
    return [int(b) for b in ds_utils.partition_balanced(weights=counts, num_parts=pp)]


def rank_parameters(states: dict[str, Any], layout: dict[str, Any], config: ViTConfig, mp_rank: int) -> list[str]:
    """The parameter names (``layers.<i>.*``) of model-parallel rank ``mp_rank`` in its module order.

    ZeRO checkpoints list them (``param_shapes``); otherwise the stage's layers are those in
    ``layout.json``'s ``stages`` or, for checkpoints written before it was recorded, DeepSpeed's
    default partition.
    """
    if states.get("param_shapes"):
        return [vit_name(name, layout["engine"]) for name in states["param_shapes"][0]]
    names = list(partition_dims(config))
    if layout["engine"] != "pipeline":
        return names
    stages = layout.get("stages") or stage_boundaries(config, layout["tp"], layout["pp"])
    return stage_parameters(names, stages, mp_rank // layout["tp"])


def stage_parameters(names: list[str], stages: list[int], stage: int) -> list[str]:
    """The names among ``names`` (``layers.<i>.*``) whose layer the pipeline stage ``stage`` holds."""
    return [name for name in names if stages[stage] <= layer_of(name) < stages[stage + 1]]


def deepspeed_name(name: str, engine: str) -> str:
    """DeepSpeed's name of ViT parameter ``layers.<i>.*``: the PipelineModule drops ``layers.``."""
    return name.removeprefix("layers.") if engine == "pipeline" else name


def vit_name(name: str, engine: str) -> str:
    return f"layers.{name}" if engine == "pipeline" else name


@dataclass
class OptimizerState:
    """Adam's state for every parameter as full (unsharded) tensors, and what all ranks share."""

    kind: OptimizerKind
    """``zero``: ZeRO-1/2 files; ``bf16_zero``: DeepSpeed's BF16 optimizer files; ``torch``: in mp_rank files."""
    tensors: dict[str, dict[str, Tensor]]
    """Parameter name -> ``fp32`` master weights, ``exp_avg``, ``exp_avg_sq``."""
    step: Tensor
    param_group: dict[str, Any]
    """Hyper-parameters of the one parameter group (lr, betas, weight decay, initial_lr, ...)."""
    template: dict[str, Any] | None
    """ZeRO kinds: the first optimizer file, for its rank-independent entries."""


@dataclass
class TrainingState:
    """A checkpoint tag's content as full tensors: weights, optionally the optimizer, and the rest."""

    tag: str
    layout: dict[str, Any]
    weights: dict[str, Tensor]
    """Parameter name (``layers.<i>.*``) -> full tensor, in the dtype training stored it."""
    model_states: dict[str, Any]
    """The first mp_rank file without weights or optimizer: step, LR schedule, DeepSpeed config, ..."""
    optimizer: OptimizerState | None


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


def optimizer_kind(tag_dir: Path, model_states: dict[str, Any]) -> OptimizerKind | None:
    """Where this tag keeps its optimizer state (``None``: nowhere)."""
    for kind in ("zero", "bf16_zero"):
        if optimizer_file(tag_dir, kind, 0, 0).is_file():
            return kind
    return "torch" if model_states.get("optimizer") else None


def read_optimizer(tag_dir: Path, layout: dict[str, Any], config: ViTConfig, weights: dict[str, Tensor],
                   kind: OptimizerKind) -> OptimizerState:
    """Every parameter's optimizer state, merged over DP slices and TP ranks."""
    tp, dp = layout["tp"], layout["dp"]
    dims, shapes = partition_dims(config), parameter_shapes(config)

    def local_shape(name: str) -> torch.Size:
        shape = list(shapes[name])
        if dims[name] is not None:
            shape[dims[name]] //= tp
        return torch.Size(shape)

    shards: dict[str, dict[str, list[Tensor | None]]] = {}
    template = step = group = None
    for mp_rank in range(model_parallel_size(layout)):
        states_file = model_states_file(tag_dir, mp_rank)
        states = load_file(states_file)
        if len(states.get("param_shapes") or [None]) != 1:
            raise CheckpointError(f"{states_file}: expected one optimizer parameter group, found "
                                  f"{len(states['param_shapes'])}")
        names = rank_parameters(states, layout, config, mp_rank)
        if kind == "torch":
            saved = states["optimizer"]
            if len(saved["state"]) != len(names) or len(saved["param_groups"]) != 1:
                raise CheckpointError(f"{states_file}: the optimizer holds {len(saved['state'])} parameters in "
                                      f"{len(saved['param_groups'])} groups, this rank has {len(names)} in one")
            per_param = [saved["state"][index] for index in range(len(names))]
            moments = {key: [entry[key] for entry in per_param] for key in MOMENTS}
            rank_step, rank_group = per_param[0]["step"], saved["param_groups"][0]
        else:
            files = [optimizer_file(tag_dir, kind, d, mp_rank) for d in range(dp)]
            contents = [load_file(path) for path in files]
            saved = [content["optimizer_state_dict"] for content in contents]
            if len(saved[0]["single_partition_of_fp32_groups"]) != 1:
                raise CheckpointError(f"{files[0]}: expected one optimizer parameter group")
            slices = {"fp32": [s["single_partition_of_fp32_groups"][0] for s in saved]}
            slices.update({key: [s["base_optimizer_state"]["state"][0][key] for s in saved] for key in MOMENTS})
            try:
                moments = {key: join_flat(value, [local_shape(n) for n in names]) for key, value in slices.items()}
            except ValueError as err:
                raise CheckpointError(f"{files[0]} and its DP siblings: {err}") from None
            rank_step, rank_group = saved[0]["base_optimizer_state"]["state"][0]["step"], \
                saved[0]["base_optimizer_state"]["param_groups"][0]
            if template is None:
                template = dict(contents[0], optimizer_state_dict={k: None if k in PER_RANK_ZERO_ENTRIES else v
                                                                   for k, v in saved[0].items()})
                if any(any(paddings) for paddings in saved[0].get("param_alignment_paddings", [])):
                    raise CheckpointError(f"{files[0]}: ZeRO parameter_alignment padding is not supported")
        step = rank_step if step is None else step
        group = rank_group if group is None else group
        tp_rank = mp_rank % tp
        for index, name in enumerate(names):
            entry = shards.setdefault(name, {key: [None] * tp for key in moments})
            for key, values in moments.items():
                entry[key][tp_rank] = values[index]
    missing = sorted(set(dims) - set(shards))
    if missing:
        raise CheckpointError(f"{tag_dir}: the optimizer state lacks {missing[:3]} ({len(missing)} parameters)")
    tensors = {name: {key: merge(parts, dims[name], f"{name} ({key})") for key, parts in shards[name].items()}
               for name in dims}
    if kind == "torch":  # without ZeRO the fp32 weights are the master weights
        for name, entry in tensors.items():
            entry["fp32"] = weights[name].float()
    return OptimizerState(kind=kind, tensors=tensors, step=step,
                          param_group={k: v for k, v in group.items() if k != "params"}, template=template)


def fresh_model_states(step: int) -> dict[str, Any]:
    """The rank-independent entries of an ``mp_rank`` file for weights without a training history
    (what DeepSpeed reads when it loads the module only)."""
    from deepspeed import __version__

    return dict(buffer_names=[], lr_scheduler=None, data_sampler=None, random_ltd=None, sparse_tensor_module_names=[],
                skipped_steps=0, global_steps=step, global_samples=0, ds_version=__version__, step=step)
