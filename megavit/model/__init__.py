"""The SQG Vision Transformer and its tensor-parallel attention and MLP."""

from megavit.model.attention import ATTENTION_BACKENDS, ParallelAttention, attend
from megavit.model.config import ViTConfig, load_vit_config
from megavit.model.mlp import ParallelMLP
from megavit.model.vit import (
    Block,
    ViT,
    ViTEmbedding,
    ViTHead,
    block_flops,
    count_parameters,
    flops_per_sample,
    layer_specs,
    mse_loss,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "Block",
    "ParallelAttention",
    "ParallelMLP",
    "ViT",
    "ViTConfig",
    "ViTEmbedding",
    "ViTHead",
    "attend",
    "block_flops",
    "count_parameters",
    "flops_per_sample",
    "layer_specs",
    "load_vit_config",
    "mse_loss",
]
