"""Counter-based standard normals that do not depend on how the state is split.

Entry (row, variable k) of draw ``stream`` is a pure function of (seed, stream, row, k): one
SplitMix64 hash (Steele, Lea & Flood 2014) of the counter ``row * dim + k`` xor the draw's key
gives 64 random bits, whose halves are two 32-bit uniforms for one Box-Muller normal. A rank
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


def stream_key(seed: int, stream: int) -> int:
    """The 64-bit key of draw ``stream`` under ``seed``, as a signed int64 (torch's integer type)."""
    return _signed(splitmix64((seed * 1_000_003 + stream) & _MASK64))


def _logical_shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64_tensor(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 on int64 tensors (wrapping arithmetic, logical shifts)."""
    z = z + _signed(_GOLDEN)
    z = (z ^ _logical_shift(z, 30)) * _signed(_MIX1)
    z = (z ^ _logical_shift(z, 27)) * _signed(_MIX2)
    return z ^ _logical_shift(z, 31)


def box_muller(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One standard normal per 64-bit word: radius from the high half, angle from the low half."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    high = _logical_shift(bits, 32).to(compute)
    low = (bits & 0xFFFFFFFF).to(compute)
    u_radius = (high + 0.5) * 2.0**-32  # in (0, 1]: the log never sees 0
    u_angle = (low + 0.5) * 2.0**-32
    return (torch.sqrt(-2.0 * torch.log(u_radius)) * torch.cos(2.0 * torch.pi * u_angle)).to(dtype)


def counter_normal(seed: int, stream: int, rows: int, start: int, stop: int, dim: int,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   row_offset: int = 0) -> torch.Tensor:
    """Standard normals ``[rows, stop - start]`` for rows ``row_offset + [0, rows)`` and global
    variables [start, stop) of a ``dim``-variable state; each entry depends only on
    (seed, stream, row, variable), never on the slab or the rank."""
    index = torch.arange(start, stop, dtype=torch.int64, device=device)
    row = torch.arange(row_offset, row_offset + rows, dtype=torch.int64, device=device).unsqueeze(1)
    counter = row * dim + index
    return box_muller(_splitmix64_tensor(counter ^ stream_key(seed, stream)), dtype)
