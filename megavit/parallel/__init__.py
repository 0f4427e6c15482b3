"""Parallel topology and Megatron-style tensor/sequence-parallel building blocks (no ViT knowledge here)."""

from megavit.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    divide,
    mark_sequence_parallel,
    sequence_parallel_grad_hooks,
)
from megavit.parallel.mappings import (
    all_gather_to_tensor_parallel_region,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    group_rank,
    group_size,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from megavit.parallel.mpu import DeepSpeedMPU, deepspeed_topology
from megavit.parallel.random import ParallelDropout, shared_seed, tensor_parallel_rng
from megavit.parallel.topology import ParallelDims, RankCoord, Topology

__all__ = [
    "ColumnParallelLinear",
    "DeepSpeedMPU",
    "ParallelDims",
    "ParallelDropout",
    "RankCoord",
    "RowParallelLinear",
    "Topology",
    "all_gather_to_tensor_parallel_region",
    "copy_to_tensor_parallel_region",
    "deepspeed_topology",
    "divide",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_parallel_region",
    "group_rank",
    "group_size",
    "mark_sequence_parallel",
    "reduce_from_tensor_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_parallel_region",
    "sequence_parallel_grad_hooks",
    "shared_seed",
    "tensor_parallel_rng",
]
