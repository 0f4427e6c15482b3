"""The ``mpu`` object DeepSpeed expects, as an adapter over :class:`Topology` (not a second registry).

DeepSpeed 0.19.8 calls these names on ``mpu`` (engine, ZeRO optimizers, gradient clipping,
checkpoint naming, activation checkpointing, PipelineParallelGrid):

* ``get_model_parallel_*``: all model-parallel ranks of one replica (TP x PP, the ranks with
  the same DP coordinate), used for overflow checks and gradient norms, as in DeepSpeed's
  ``PipelineParallelGrid``;
* ``get_tensor_model_parallel_*`` and ``get_slice_parallel_*``: the TP group;
* ``get_data_parallel_*`` (and ``get_data_parallel_group_ranks``): the DP group;
* ``get_pipe_parallel_*`` and ``get_pipeline_model_parallel_*``: the PP group.

``get_sequence_parallel_*`` is deliberately absent: in DeepSpeed those names mean Ulysses
sequence parallelism, a separate axis over which DeepSpeed would reduce gradients; our
(Megatron-style) sequence parallelism lives inside the TP group and needs nothing from DeepSpeed.

For a ``PipelineModule`` DeepSpeed builds its own grid from a ``ProcessTopology``;
:func:`deepspeed_topology` gives it the same rank layout.
"""

from __future__ import annotations

import torch.distributed as dist

from megavit.parallel.topology import ParallelDims, Topology


class DeepSpeedMPU:
    """Answers DeepSpeed's ``mpu`` queries from a :class:`Topology`."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    # model parallel = tp x pp (one replica)
    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.topology.model_group

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.topology.model_group)

    def get_model_parallel_world_size(self) -> int:
        return self.topology.dims.tp * self.topology.dims.pp

    # tensor parallel (DeepSpeed's "slice" parallel)
    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self.topology.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.topology.coord.tp

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.topology.dims.tp

    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size

    # data parallel
    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.topology.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.topology.coord.dp

    def get_data_parallel_world_size(self) -> int:
        return self.topology.dims.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.topology.ranks_of("dp")

    # pipeline parallel
    def get_pipe_parallel_group(self) -> dist.ProcessGroup:
        return self.topology.pp_group

    def get_pipe_parallel_rank(self) -> int:
        return self.topology.coord.pp

    def get_pipe_parallel_world_size(self) -> int:
        return self.topology.dims.pp

    get_pipeline_model_parallel_group = get_pipe_parallel_group
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size


def deepspeed_topology(dims: ParallelDims):
    """DeepSpeed ``PipeModelDataParallelTopology`` with our layout (axes pipe, data, model = pp, dp, tp)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology  # deepspeed is slow to import

    return PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
