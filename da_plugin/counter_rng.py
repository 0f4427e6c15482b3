"""Counter-based standard normals that do not depend on how the state is split.

Entry (row, variable k) of draw ``stream`` is a pure function of (seed, stream, row, k). Draws
come in pairs (2p, 2p + 1): one SplitMix64 hash (Steele, Lea & Flood 2014) of the counter
``row * dim + k`` xor the pair's key gives 64 random bits, whose halves are two 32-bit uniforms
for a Box-Muller pair, r cos(theta) for the even draw and r sin(theta) for the odd one. A rank
holding any slab, or a GPU kernel generating the numbers in registers
(:mod:`da_plugin.filters.ensf_fused`), draws exactly the numbers a single process draws.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def splitmix64(value: int) -> int:
    """The SplitMix64 finaliser on a Python int (unsigned 64-bit result)."""
    z = (value + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def pair_key(seed: int, pair: int) -> int:
    """The 64-bit key of draws (2 pair, 2 pair + 1) under ``seed``, as a signed int64 (torch's integer type)."""
    return _signed(splitmix64((seed * 1_000_003 + pair) & _MASK64))


def _logical_shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64_tensor(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 on int64 tensors (wrapping arithmetic, logical shifts)."""
    z = z + _signed(_GOLDEN)
    z = (z ^ _logical_shift(z, 30)) * _signed(_MIX1)
    z = (z ^ _logical_shift(z, 27)) * _signed(_MIX2)
    return z ^ _logical_shift(z, 31)


def box_muller(bits: torch.Tensor, dtype: torch.dtype, odd: bool) -> torch.Tensor:
    """The even (cosine) or odd (sine) normal of the pair from 64-bit words: radius from the
    high half, angle in (-pi, pi) from the low half."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    high = _logical_shift(bits, 32).to(compute)
    low = (bits & 0xFFFFFFFF).to(compute)
    u_radius = (high + 0.5) * 2.0**-32  # in (0, 1]: the log never sees 0
    angle = ((low + 0.5) * 2.0**-32 - 0.5) * (2.0 * torch.pi)
    return (torch.sqrt(-2.0 * torch.log(u_radius)) * (torch.sin(angle) if odd else torch.cos(angle))).to(dtype)


def counter_normal(seed: int, stream: int, rows: int, start: int, stop: int, dim: int,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   row_offset: int = 0) -> torch.Tensor:
    """Standard normals ``[rows, stop - start]`` for rows ``row_offset + [0, rows)`` and global
    variables [start, stop) of a ``dim``-variable state; each entry depends only on
    (seed, stream, row, variable), never on the slab or the rank."""
    index = torch.arange(start, stop, dtype=torch.int64, device=device)
    key = pair_key(seed, stream // 2)
    out = torch.empty(rows, stop - start, dtype=dtype, device=device)
    for row in range(rows):  # a row at a time: the int64 temporaries stay at a few copies of one row
        counter = (row_offset + row) * dim + index
        out[row] = box_muller(_splitmix64_tensor(counter ^ key), dtype, odd=stream % 2 == 1)
    return out
