"""Multi-head self-attention with the fused QKV projection split per head across the TP group."""

from __future__ import annotations

import difflib
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megavit.parallel import ColumnParallelLinear, RowParallelLinear, divide, group_size, tensor_parallel_rng
from megavit.parallel.mappings import ProcessGroup

try:
    from flash_attn import flash_attn_func
except ImportError:  # optional accelerator (the [gpu] extra); sdpa is the default
    flash_attn_func = None

ATTENTION_BACKENDS = ("sdpa", "flash", "math")


def check_attention_backend(backend: str) -> None:
    """Raise ValueError for an unknown backend name, listing the valid ones and the closest."""
    if backend not in ATTENTION_BACKENDS:
        close = difflib.get_close_matches(backend, ATTENTION_BACKENDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"attention_backend={backend!r} is not one of {list(ATTENTION_BACKENDS)}{hint}")


def attend(q: Tensor, k: Tensor, v: Tensor, *, backend: str, dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(d)) v: q ``[B, Tq, h, d]``, k and v ``[B, Tk, h, d]`` -> ``[B, Tq, h, d]``."""
    if backend == "flash":
        return flash_attn_func(q, k, v, dropout_p=dropout_p)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, h, T, d], the layout SDPA expects
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    else:  # "math": the plain formula; also what FlopCounterMode can count on CPU
        probs = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        out = F.dropout(probs, dropout_p) @ v
    return out.transpose(1, 2)


class ParallelAttention(nn.Module):
    """Self-attention with the heads split across the TP group (Megatron-LM's ParallelAttention).

    The fused QKV projection is column-parallel with its output features ordered
    (head, q/k/v, head_dim), so each rank's contiguous slice holds q, k and v of its
    ``num_heads / tp`` heads; each rank attends over its own heads; the output projection is
    row-parallel and sums the heads' contributions.

    x: ``[B, T, D]`` (``[B, T/tp, D]`` under sequence parallelism) -> same shape.
    """

    def __init__(self, dim: int, num_heads: int, *, group: ProcessGroup | None = None,
                 sequence_parallel: bool = False, backend: str = "sdpa", dropout: float = 0.0) -> None:
        super().__init__()
        check_attention_backend(backend)
        if backend == "flash" and flash_attn_func is None:
            raise ImportError("attention_backend 'flash' needs the flash_attn package (pip install flash-attn, "
                              "the [gpu] extra), which is not importable here; use 'sdpa'")
        self.local_heads = divide(num_heads, group_size(group), "num_heads")
        self.head_dim = dim // num_heads
        self.group, self.backend, self.dropout = group, backend, dropout
        self.qkv = ColumnParallelLinear(dim, 3 * dim, group=group, sequence_parallel=sequence_parallel)
        self.proj = RowParallelLinear(dim, dim, group=group, sequence_parallel=sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x)  # [B, T, heads/tp * 3 * head_dim]
        batch, tokens = qkv.shape[:2]
        q, k, v = qkv.view(batch, tokens, self.local_heads, 3, self.head_dim).unbind(3)
        dropout_p = self.dropout if self.training else 0.0
        # the heads are split across ranks, so their dropout draws from the per-rank stream
        with tensor_parallel_rng(self.group, x.device) if dropout_p else nullcontext():
            out = attend(q, k, v, backend=self.backend, dropout_p=dropout_p)
        return self.proj(out.reshape(batch, tokens, -1))
