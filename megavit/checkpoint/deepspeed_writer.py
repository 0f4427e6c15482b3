"""Write a :class:`TrainingState` as the DeepSpeed checkpoint a run of another (tp, pp, dp) layout resumes.

The files are those the target run's engine would have saved itself (names and contents as in
:mod:`megavit.checkpoint.deepspeed_files`): per-layer weight files on the pipeline engine, one
``mp_rank`` file per model-parallel rank with the step, LR schedule and DeepSpeed config, and,
with the optimizer, its state laid out as the source's kind (ZeRO, BF16 optimizer or plain
torch) for the target's ranks. Pipeline stages get the layers DeepSpeed's ``PipelineModule``
gives them for the target's ``partition_method``. The directory is staged and published whole.
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm import tqdm

from megavit.atomic import Staging
from megavit.checkpoint.deepspeed_files import (
    MOMENTS,
    CheckpointError,
    OptimizerState,
    TrainingState,
    deepspeed_name,
    model_states_file,
    optimizer_file,
    pipeline_layer_file,
    stage_boundaries,
    stage_parameters,
)
from megavit.checkpoint.layout import LATEST
from megavit.checkpoint.sharding import layer_of, partition_dims, split
from megavit.checkpoint.zero import padding, slice_mappings, split_flat
from megavit.config import build
from megavit.model.config import ViTConfig
from megavit.parallel.topology import ParallelDims


@dataclass(frozen=True)
class TargetLayout:
    """The layout of the run that will resume the converted checkpoint."""

    tp: int
    pp: int
    dp: int
    engine: Literal["pipeline", "plain"]
    sequence_parallel: bool
    partition_method: Literal["parameters", "uniform"] = "parameters"

    def check(self, config: ViTConfig) -> None:
        """Raise CheckpointError naming every size of ``config`` this layout cannot split."""
        if min(self.tp, self.pp, self.dp) < 1:
            raise CheckpointError(f"target sizes must be >= 1, got tp={self.tp} pp={self.pp} dp={self.dp}")
        if self.engine == "plain" and self.pp > 1:
            raise CheckpointError(f"the plain engine has no pipeline stages; target pp={self.pp} needs the "
                                  f"pipeline engine")
        dims = ParallelDims(tp=self.tp, dp=self.dp, pp=self.pp, world_size=self.tp * self.dp * self.pp,
                            sequence_parallel=self.sequence_parallel)
        try:
            config.check_layout(dims)
        except ValueError as err:
            raise CheckpointError(str(err)) from None


def write_deepspeed(out_dir: Path, state: TrainingState, target: TargetLayout, *, with_optimizer: bool,
                    progress: bool = False) -> None:
    """Write ``state`` as ``out_dir/<tag>/`` (the source's tag) plus ``out_dir/latest`` for ``target``."""
    if out_dir.exists():
        raise CheckpointError(f"output directory {out_dir} already exists; choose a new one or remove it")
    config = build(ViTConfig, state.layout["model"], "model")
    target.check(config)
    if with_optimizer and state.optimizer is None:
        raise CheckpointError("--with-optimizer: the source checkpoint holds no optimizer state")
    dims = partition_dims(config)
    stages = stage_boundaries(config, target.tp, target.pp if target.engine == "pipeline" else 1,
                              target.partition_method)
    staging = Staging.create(out_dir.parent)
    with staging:
        root = staging.file(out_dir.name)
        tag_dir = root / state.tag
        tag_dir.mkdir(parents=True)
        ranks = [(stage, tp_rank) for stage in range(len(stages) - 1) for tp_rank in range(target.tp)]
        for mp_rank, (stage, tp_rank) in enumerate(tqdm(ranks, desc="ranks", unit="rank", disable=not progress,
                                                        file=sys.stderr)):
            names = stage_parameters(list(dims), stages, stage)
            _write_rank(tag_dir, state, target, mp_rank, tp_rank, names, dims, with_optimizer)
        layout = dict(state.layout, tp=target.tp, pp=target.pp, dp=target.dp, engine=target.engine,
                      sequence_parallel=target.sequence_parallel and target.tp > 1, optimizer_state=with_optimizer,
                      converted_from={key: state.layout[key]
                                      for key in ("tp", "pp", "dp", "engine", "sequence_parallel")})
        if target.engine == "pipeline":
            layout["stages"] = list(stages)
        else:
            layout.pop("stages", None)
        (tag_dir / "layout.json").write_text(json.dumps(layout, indent=1) + "\n")
        (root / LATEST).write_text(state.tag)
        staging.publish([out_dir.name])


def _write_rank(tag_dir: Path, state: TrainingState, target: TargetLayout, mp_rank: int, tp_rank: int,
                names: list[str], dims: dict[str, int | None], with_optimizer: bool) -> None:
    """Every file of model-parallel rank ``mp_rank`` (one pipeline stage's TP shard)."""
    engine = target.engine
    local = {name: split(state.weights[name], dims[name], target.tp, tp_rank, name) for name in names}
    if engine == "pipeline":
        for layer in sorted({layer_of(name) for name in names}):
            prefix = f"layers.{layer}."
            torch.save(OrderedDict((name.removeprefix(prefix), tensor) for name, tensor in local.items()
                                   if name.startswith(prefix)), pipeline_layer_file(tag_dir, layer, tp_rank))
    optimizer = state.optimizer if with_optimizer else None
    shards = {} if optimizer is None else {
        name: {key: split(tensor, dims[name], target.tp, tp_rank, name)
               for key, tensor in optimizer.tensors[name].items()} for name in names}
    model_states = dict(
        state.model_states,
        module=None if engine == "pipeline" else OrderedDict((deepspeed_name(n, engine), t) for n, t in local.items()),
        optimizer=None,
        param_shapes=None if state.model_states.get("param_shapes") is None else  # None without ZeRO
        [OrderedDict((deepspeed_name(n, engine), t.shape) for n, t in local.items())],
        dp_world_size=target.dp, mp_world_size=target.tp * (target.pp if engine == "pipeline" else 1),
        checkpoint_parallel_dimensions=dict(pp_degree=target.pp, tp_degree=target.tp))
    if optimizer is not None and optimizer.kind == "torch":
        model_states["optimizer"] = dict(
            state={index: dict(step=optimizer.step.clone(), **{key: shards[name][key] for key in MOMENTS})
                   for index, name in enumerate(names)},
            param_groups=[dict(optimizer.param_group, params=list(range(len(names))))])
    torch.save(model_states, model_states_file(tag_dir, mp_rank))
    if optimizer is not None and optimizer.kind != "torch":
        _write_zero_files(tag_dir, optimizer, target, mp_rank, names, shards)


def _write_zero_files(tag_dir: Path, optimizer: OptimizerState, target: TargetLayout, mp_rank: int,
                      names: list[str], shards: dict[str, dict[str, Tensor]]) -> None:
    """One optimizer file per DP rank: its slice of the rank's flat fp32 weights and Adam moments."""
    numels = [shards[name]["fp32"].numel() for name in names]
    total = sum(numels)
    slices = {key: split_flat([shards[name][key] for name in names], target.dp) for key in ("fp32", *MOMENTS)}
    template: dict[str, Any] = optimizer.template
    for dp_rank in range(target.dp):
        pad = padding(total, target.dp, dp_rank)
        fp32 = slices["fp32"][dp_rank]
        if optimizer.kind == "zero":  # ZeRO saves the master weights without the alignment padding
            fp32 = fp32[:fp32.numel() - pad].clone()
        saved = dict(template["optimizer_state_dict"],
                     base_optimizer_state=dict(
                         state={0: dict(step=optimizer.step.clone(),
                                        **{key: slices[key][dp_rank] for key in MOMENTS})},
                         param_groups=[dict(optimizer.param_group, params=[0])]),
                     single_partition_of_fp32_groups=[fp32], group_paddings=[pad], partition_count=[target.dp],
                     param_slice_mappings=[slice_mappings([deepspeed_name(n, target.engine) for n in names],
                                                          numels, target.dp, dp_rank)])
        if "param_alignment_paddings" in saved:
            saved["param_alignment_paddings"] = [[0] * len(names)]
        torch.save(dict(template, optimizer_state_dict=saved),
                   optimizer_file(tag_dir, optimizer.kind, dp_rank, mp_rank))
