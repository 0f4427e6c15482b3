"""The SQG Vision Transformer (ClimaX-derived), top to bottom: patches, embedding, block, head, model, FLOPs.

One SQG frame ``[B, V, H, W]`` (V = 2 boundary levels) is cut into p x p patches; each variable
has its own patch embedding; a learned query attends over the V variable tokens at each patch
position (variable aggregation); a fixed 2-D sin-cos position embedding and a linear lead-time
embedding are added; L pre-norm transformer blocks follow; a final norm and a two-layer head map
each token back to its V x p x p patch values. The loss is the MSE in normalized space.

The model is a plain chain of layers (:func:`layer_specs`), each a module whose forward takes and
returns one value, so that a pipeline can cut it between any two of them:

    ViTEmbedding   (frames [B, V, H, W], lead_time [B]) -> tokens
    Block  x L     tokens -> tokens
    ViTHead        tokens -> frames [B, V, H, W]

``tokens`` is ``[B, T, D]`` replicated on every tensor-parallel (TP) rank, or this rank's share
``[B, T/tp, D]`` under sequence parallelism. Tensor parallelism enters only through the parallel
layers in attention, MLP and head; the embedding is small and runs replicated on every TP rank.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from megavit.model.attention import ParallelAttention
from megavit.model.config import ViTConfig
from megavit.model.mlp import ParallelMLP
from megavit.parallel import (
    ColumnParallelLinear,
    ParallelDims,
    ParallelDropout,
    RowParallelLinear,
    group_size,
    mark_sequence_parallel,
    scatter_to_sequence_parallel_region,
)
from megavit.parallel.layers import INIT_STD
from megavit.parallel.mappings import ProcessGroup

logger = logging.getLogger(__name__)


def patchify(frames: Tensor, patch_size: int) -> Tensor:
    """``[B, V, H, W] -> [B, V, T, p*p]``, patches in row-major order."""
    batch, variables, height, width = frames.shape
    p = patch_size
    patches = frames.reshape(batch, variables, height // p, p, width // p, p).permute(0, 1, 2, 4, 3, 5)
    return patches.reshape(batch, variables, (height // p) * (width // p), p * p)


def unpatchify(patches: Tensor, variables: int, image_size: tuple[int, int], patch_size: int) -> Tensor:
    """``[B, T, V*p*p]`` (features ordered variable, patch row, patch column) -> ``[B, V, H, W]``."""
    (height, width), p = image_size, patch_size
    frames = patches.reshape(patches.shape[0], height // p, width // p, variables, p, p).permute(0, 3, 1, 4, 2, 5)
    return frames.reshape(patches.shape[0], variables, height, width)


def sincos_position_embedding(grid: tuple[int, int], dim: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding ``[h*w, dim]`` (MAE, ClimaX): half the features encode the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")

    def encode(position: Tensor) -> Tensor:
        angles = position.reshape(-1, 1).double() * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """A replicated linear layer with the ViT init (truncated normal weight, zero bias)."""
    layer = nn.Linear(in_features, out_features)
    nn.init.trunc_normal_(layer.weight, std=INIT_STD)
    nn.init.zeros_(layer.bias)
    return layer


class VariableAggregation(nn.Module):
    """Cross-attention of one learned query over the V variable tokens at each patch position (ClimaX).

    With one query and V = 2 keys per position, the scores are per-head dot products and a
    softmax over V, written out directly: fused attention kernels gain nothing on such short
    sequences, and SDPA's cuDNN kernel failed on an H100 (torch 2.11) with B*T = 65536 positions.

    tokens ``[B, V, T, D]`` -> ``[B, T, D]``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Parameter(nn.init.trunc_normal_(torch.empty(dim), std=INIT_STD))
        self.kv = _linear(dim, 2 * dim)
        self.proj = _linear(dim, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        head_dim = tokens.shape[-1] // self.num_heads
        k, v = self.kv(tokens).unflatten(-1, (2, self.num_heads, head_dim)).unbind(-3)  # [B, V, T, heads, head_dim]
        q = self.query.to(k.dtype).view(self.num_heads, head_dim)
        weights = ((k * q).sum(-1) * head_dim**-0.5).softmax(dim=1)  # [B, V, T, heads], over the variables
        return self.proj((weights.unsqueeze(-1) * v).sum(1).flatten(-2))


class ViTEmbedding(nn.Module):
    """First stage: per-variable patch embedding, variable aggregation, position and lead-time embedding.

    ``(frames [B, V, H, W], lead_time [B])`` -> tokens ``[B, T, D]``, or this TP rank's
    ``[B, T/tp, D]`` under sequence parallelism. Runs replicated on every TP rank.
    """

    def __init__(self, config: ViTConfig, *, group: ProcessGroup | None = None,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        dim, p = config.embed_dim, config.patch_size
        self.patch_size, self.group, self.sequence_parallel = p, group, sequence_parallel
        self.patch_embeds = nn.ModuleList(_linear(p * p, dim) for _ in range(config.in_vars))
        self.var_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(config.in_vars, 1, dim), std=INIT_STD))
        self.aggregate = VariableAggregation(dim, config.num_heads)
        self.register_buffer("pos_embed", sincos_position_embedding(config.grid, dim), persistent=False)
        self.lead_time_embed = _linear(1, dim)

    def forward(self, inputs: tuple[Tensor, Tensor]) -> Tensor:
        frames, lead_time = inputs
        patches = patchify(frames, self.patch_size)  # [B, V, T, p*p]
        tokens = torch.stack([embed(patches[:, v]) for v, embed in enumerate(self.patch_embeds)], dim=1)
        x = self.aggregate(tokens + self.var_embed)  # [B, T, D]
        x = x + self.pos_embed.to(x.dtype) + self.lead_time_embed(lead_time.reshape(-1, 1).to(frames.dtype))[:, None]
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, self.group)
        return x


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)).

    tokens ``[B, T, D]`` (``[B, T/tp, D]`` under sequence parallelism, where the LayerNorms and
    residuals work on this rank's tokens) -> same shape. With ``checkpoint`` the block keeps only
    its input and recomputes its activations in backward.
    """

    def __init__(self, config: ViTConfig, *, group: ProcessGroup | None = None, sequence_parallel: bool = False,
                 checkpoint: bool = False) -> None:
        super().__init__()
        dim = config.embed_dim
        self.checkpoint = checkpoint
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ParallelAttention(dim, config.num_heads, group=group, sequence_parallel=sequence_parallel,
                                      backend=config.attention_backend, dropout=config.attention_dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ParallelMLP(dim, config.mlp_hidden, group=group, sequence_parallel=sequence_parallel,
                               dropout=config.dropout)
        # the residual branches are replicated across TP, or split by tokens under SP
        self.drop = ParallelDropout(config.dropout, group=group, split=sequence_parallel)
        if sequence_parallel:
            mark_sequence_parallel(self.norm1)
            mark_sequence_parallel(self.norm2)

    def forward(self, x: Tensor) -> Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class ViTHead(nn.Module):
    """Last stage: final LayerNorm, two-layer head per token (D -> D -> V*p*p), unpatchify.

    tokens ``[B, T, D]`` (``[B, T/tp, D]`` under sequence parallelism) -> frames ``[B, V, H, W]``,
    complete on every TP rank: the hidden layer is column-parallel (gathering the tokens under
    SP) and the output layer row-parallel with an all-reduce, so prediction and loss are
    replicated across the TP group.
    """

    def __init__(self, config: ViTConfig, *, group: ProcessGroup | None = None,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        dim, p = config.embed_dim, config.patch_size
        self.variables, self.image_size, self.patch_size = config.in_vars, config.image_size, p
        self.norm = nn.LayerNorm(dim)
        if sequence_parallel:
            mark_sequence_parallel(self.norm)
        self.fc1 = ColumnParallelLinear(dim, dim, group=group, sequence_parallel=sequence_parallel)
        self.fc2 = RowParallelLinear(dim, config.in_vars * p * p, group=group)

    def forward(self, x: Tensor) -> Tensor:
        patches = self.fc2(F.gelu(self.fc1(self.norm(x))))  # [B, T, V*p*p]
        return unpatchify(patches, self.variables, self.image_size, self.patch_size)


def layer_specs(config: ViTConfig, *, group: ProcessGroup | None = None,
                sequence_parallel: bool = False) -> list[partial[nn.Module]]:
    """The model as a chain of unbuilt layers: embedding, ``num_layers`` blocks, head.

    The one place the network is assembled: :class:`ViT` builds every layer, a pipeline stage
    only its own (:func:`megavit.model.pipeline.build_pipeline`). Activation checkpointing
    applies to blocks 0, k, 2k, ... for ``checkpoint_every = k``.
    """
    every = config.checkpoint_every
    parallel = dict(group=group, sequence_parallel=sequence_parallel)
    return [partial(ViTEmbedding, config, **parallel),
            *(partial(Block, config, **parallel, checkpoint=every > 0 and i % every == 0)
              for i in range(config.num_layers)),
            partial(ViTHead, config, **parallel)]


class ViT(nn.Module):
    """The SQG surrogate: frame at time t and lead time -> predicted frame at t + lead time.

    Layer i of :func:`layer_specs` is built right after ``torch.manual_seed(seed + i)``, as
    DeepSpeed's pipeline does with ``seed_layers``, so every (tp, pp) layout and this
    single-module form start from the same weights. Parameter names are ``layers.<i>.*``.

    Args:
        config: the architecture.
        group: the tensor-parallel group (``None``: one device, no tensor parallelism).
        sequence_parallel: shard the tokens across ``group`` between attention and MLP.
        seed: base seed of the layers' initial weights (reseeds torch's global generator).
    """

    def __init__(self, config: ViTConfig, *, group: ProcessGroup | None = None,
                 sequence_parallel: bool = False, seed: int = 0) -> None:
        super().__init__()
        tp = group_size(group)
        config.check_layout(ParallelDims(tp=tp, world_size=tp, sequence_parallel=sequence_parallel))
        self.config = config
        layers = []
        for index, spec in enumerate(layer_specs(config, group=group, sequence_parallel=sequence_parallel)):
            torch.manual_seed(seed + index)
            layers.append(spec())
        self.layers = nn.ModuleList(layers)
        logger.info("ViT D=%d L=%d heads=%d tokens=%d: %.2fM parameters on this rank (tp=%d)", config.embed_dim,
                    config.num_layers, config.num_heads, config.num_tokens, count_parameters(self) / 1e6, tp)

    @property
    def embedding(self) -> ViTEmbedding:
        return self.layers[0]

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers[1:-1]

    @property
    def head(self) -> ViTHead:
        return self.layers[-1]

    def forward(self, frames: Tensor, lead_time: Tensor) -> Tensor:
        """``frames [B, V, H, W]``, ``lead_time [B]`` -> predicted frames ``[B, V, H, W]``."""
        x = (frames, lead_time)
        for layer in self.layers:
            x = layer(x)
        return x


def mse_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """The training loss: mean squared error in normalized space, computed in fp32."""
    return F.mse_loss(prediction.float(), target.float())


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements held by this rank (all of them without tensor parallelism)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(config: ViTConfig, *, training: bool = True) -> int:
    """Matmul FLOPs for one sample: the forward pass, or a training step (3x forward).

    Every matrix product costs 2 FLOPs per multiply-add: 2 x (weights) x (tokens they act on)
    for the linear layers, plus 4 T^2 D per block for attention scores and weighted values; the
    backward pass costs twice the forward. This is the accounting of Megatron-LM (Narayanan et
    al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters using
    Megatron-LM", Sec. 5.1) and PaLM (Chowdhery et al. 2022, Appendix B: 6N + 12 L H Q T per
    token). Elementwise ops, norms and softmax are left out, and recomputation under activation
    checkpointing is not counted: these are model FLOPs, as MFU is defined.
    """
    tokens, dim, variables = config.num_tokens, config.embed_dim, config.in_vars
    patch_values = config.patch_size**2
    embedding = (2 * variables * tokens * patch_values * dim  # per-variable patch embeddings
                 + 2 * variables * tokens * dim * 2 * dim  # keys and values of the variable tokens
                 + 2 * tokens * dim * dim  # aggregation output projection (its V-key scores are elementwise)
                 + 2 * dim)  # lead-time embedding
    head = 2 * tokens * (dim * dim + dim * variables * patch_values)
    forward = embedding + config.num_layers * block_flops(config) + head
    return 3 * forward if training else forward


def block_flops(config: ViTConfig) -> int:
    """Forward matmul FLOPs of one transformer block for one sample (see :func:`flops_per_sample`).

    QKV and output projections 2 T (3 + 1) D^2, MLP 2 T (2 D F), attention 4 T^2 D.
    """
    tokens, dim = config.num_tokens, config.embed_dim
    return 2 * tokens * (4 * dim * dim + 2 * dim * config.mlp_hidden) + 4 * tokens * tokens * dim
