"""Counter-based standard normals that do not depend on how the state is split.

Entry (row, variable k) of draw ``stream`` is a pure function of (seed, stream, row, k). Draws
come in pairs (2p, 2p + 1): one SplitMix64 hash (Steele, Lea & Flood 2014) of the counter
``row * dim + k`` xor the pair's key gives 64 random bits, whose halves are two 32-bit uniforms
for a Box-Muller pair, r cos(theta) for the even draw and r sin(theta) for the odd one. A rank
holding any slab, or a GPU kernel generating the numbers in registers
(:mod:`da_plugin.filters.ensf_fused`), draws exactly the numbers a single process draws.
:class:`CounterDraws` names the normals of one EnSF analysis for both of its backends.

A leaf module: the filters (the fused kernel's noise) and the decomposed run
(:mod:`da_plugin.scale`, its twin experiment) both use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

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


def _chunk_size(device: torch.device) -> int:
    """Entries hashed per block: cache-sized on CPUs, where scratch buffers are reused in place
    (whole-row temporaries cost more in page faults than the hash itself), a row on GPUs."""
    return 1 << 18 if device.type == "cpu" else 1 << 26


def _logical_shift(bits: torch.Tensor, shift: int, out: torch.Tensor) -> torch.Tensor:
    """bits >> shift as unsigned 64-bit values, into ``out``."""
    return torch.bitwise_right_shift(bits, shift, out=out).bitwise_and_((1 << (64 - shift)) - 1)


def _polar_blocks(seed: int, pair: int, rows: int, start: int, stop: int, dim: int, dtype: torch.dtype,
                  device: torch.device, row_offset: int) -> Iterator[tuple[int, slice, torch.Tensor, torch.Tensor]]:
    """(row, columns, radius, angle) of pair ``pair``, block by block, computed in float64 for a
    float64 ``dtype`` and in float32 otherwise; the tensors are reused."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    width = stop - start
    chunk = max(1, min(_chunk_size(device), width))
    key = pair_key(seed, pair)
    offsets = torch.arange(chunk, dtype=torch.int64, device=device)
    word, scratch = torch.empty_like(offsets), torch.empty_like(offsets)
    radius, angle = torch.empty(chunk, dtype=compute, device=device), torch.empty(chunk, dtype=compute, device=device)
    for row in range(rows):
        for first in range(0, width, chunk):
            size = min(chunk, width - first)
            bits, spare, r, theta = word[:size], scratch[:size], radius[:size], angle[:size]
            torch.add(offsets[:size], (row_offset + row) * dim + start + first, out=bits)
            bits.bitwise_xor_(key).add_(_signed(_GOLDEN))  # SplitMix64 in wrapping int64 arithmetic
            for shift, multiplier in ((30, _MIX1), (27, _MIX2)):
                bits.bitwise_xor_(_logical_shift(bits, shift, spare)).mul_(_signed(multiplier))
            bits.bitwise_xor_(_logical_shift(bits, 31, spare))
            r.copy_(_logical_shift(bits, 32, spare)).add_(0.5).mul_(2.0**-32)  # in (0, 1]: the log never sees 0
            r.log_().mul_(-2.0).sqrt_()
            theta.copy_(bits.bitwise_and_(0xFFFFFFFF)).add_(0.5).mul_(2.0**-32).sub_(0.5).mul_(2.0 * torch.pi)
            yield row, slice(first, first + size), r, theta


def polar_uniforms(counters: torch.Tensor, key: torch.Tensor | int,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The uniform u in (0, 1] and the angle in (-pi, pi) of Box-Muller pair ``key`` (:func:`pair_key`)
    at int64 ``counters``: draws 2p and 2p + 1 are sqrt(-2 log u) times the angle's cosine and sine.
    What :func:`counter_normal_pair` draws from, written out of place so that a compiler fuses the
    hash and what follows into one loop (:mod:`da_plugin.filters.ensf_cpu`), where
    :func:`_polar_blocks` reuses buffers to run fast eagerly."""
    bits = (counters ^ key) + _signed(_GOLDEN)  # SplitMix64 in wrapping int64 arithmetic
    bits = (bits ^ _shifted(bits, 30)) * _signed(_MIX1)
    bits = (bits ^ _shifted(bits, 27)) * _signed(_MIX2)
    bits = bits ^ _shifted(bits, 31)
    uniform = (_shifted(bits, 32).to(dtype) + 0.5) * 2.0**-32  # in (0, 1]: the log never sees 0
    angle = (((bits & 0xFFFFFFFF).to(dtype) + 0.5) * 2.0**-32 - 0.5) * (2.0 * torch.pi)
    return uniform, angle


def _shifted(bits: torch.Tensor, shift: int) -> torch.Tensor:
    """bits >> shift as unsigned 64-bit values, out of place."""
    return (bits >> shift) & ((1 << (64 - shift)) - 1)


def counter_normal_pair(seed: int, pair: int, rows: int, start: int, stop: int, dim: int,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        row_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws 2 pair and 2 pair + 1, ``[rows, stop - start]`` each (see :func:`counter_normal`),
    from one hash per entry: half the work of drawing them one at a time."""
    device = torch.device(device)
    even = torch.empty(rows, stop - start, dtype=dtype, device=device)
    odd = torch.empty_like(even)
    for row, columns, radius, angle in _polar_blocks(seed, pair, rows, start, stop, dim, dtype, device, row_offset):
        torch.mul(radius, torch.cos(angle), out=even[row, columns])
        torch.mul(radius, angle.sin_(), out=odd[row, columns])
    return even, odd


def counter_normal(seed: int, stream: int, rows: int, start: int, stop: int, dim: int,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   row_offset: int = 0) -> torch.Tensor:
    """Standard normals ``[rows, stop - start]`` of draw ``stream`` for rows ``row_offset + [0, rows)``
    and global variables [start, stop) of a ``dim``-variable state; each entry depends only on
    (seed, stream, row, variable), never on the slab or the rank."""
    device = torch.device(device)
    out = torch.empty(rows, stop - start, dtype=dtype, device=device)
    odd = stream % 2 == 1
    for row, columns, radius, angle in _polar_blocks(seed, stream // 2, rows, start, stop, dim, dtype, device,
                                                     row_offset):
        torch.mul(radius, angle.sin_() if odd else angle.cos_(), out=out[row, columns])
    return out


@dataclass(frozen=True)
class CounterDraws:
    """The normals of one analysis of a ``[rows, width]`` block: draw k of entry (i, j) is
    ``counter_normal(seed, first_draw + k)`` at row ``row_offset + i`` and variable ``col_offset + j``
    of a ``dim``-variable state, so a slab (or a block of members) draws what the whole state draws."""

    seed: int
    first_draw: int = 0  # even: draws 2p and 2p + 1 come from one hash
    row_offset: int = 0
    col_offset: int = 0
    dim: int | None = None  # None: the block is the whole state

    def __post_init__(self) -> None:
        if self.first_draw % 2:
            raise ValueError(f"first_draw must be even (draws come in Box-Muller pairs), got {self.first_draw}")

    def normals(self, rows: int, width: int, dtype: torch.dtype,
                device: torch.device) -> Callable[[int], torch.Tensor]:
        """``noise(k)``, draw k of the block, for a caller that asks for the draws in order; each
        pair is hashed once and only the current one is kept."""
        pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def noise(draw: int) -> torch.Tensor:
            pair, odd = divmod(self.first_draw + draw, 2)
            if pair not in pairs:
                pairs.clear()
                pairs[pair] = counter_normal_pair(self.seed, pair, rows, self.col_offset, self.col_offset + width,
                                                  self.dim or width, dtype, device, self.row_offset)
            return pairs[pair][odd]

        return noise
