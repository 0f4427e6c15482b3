"""The (tp, dp, pp) process grid: sizes checked on construction, then one set of process groups.

:class:`ParallelDims` is pure arithmetic (no ``torch.distributed``), so every size check and the
rank layout are testable on one CPU process. :class:`Topology` adds this rank's coordinates and
the process groups; it is built once by the trainer and passed explicitly to whatever needs a
group (there is no module-level registry of groups).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import torch.distributed as dist

Axis = Literal["tp", "dp", "pp"]
AXES: tuple[Axis, ...] = ("tp", "dp", "pp")  # innermost first


class RankCoord(NamedTuple):
    """Position of one rank in the grid."""

    tp: int
    dp: int
    pp: int


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    """Degrees of tensor (tp), data (dp) and pipeline (pp) parallelism over ``world_size`` ranks.

    Ranks are laid out row-major over (pp, dp, tp), TP innermost so that TP groups are
    neighbouring ranks on one node (NVLink), then DP, with PP outermost (DeepSpeed's
    ``PipeModelDataParallelTopology`` order)::

        rank = tp_rank + tp * (dp_rank + dp * pp_rank)

    8-rank example, tp=2 dp=2 pp=2::

        rank  0 1 2 3 4 5 6 7
        tp    0 1 0 1 0 1 0 1
        dp    0 0 1 1 0 0 1 1
        pp    0 0 0 0 1 1 1 1

        tp groups     [0,1] [2,3] [4,5] [6,7]
        dp groups     [0,2] [1,3] [4,6] [5,7]
        pp groups     [0,4] [1,5] [2,6] [3,7]
        model groups  [0,1,4,5] [2,3,6,7]      (tp x pp: the ranks holding one model replica)

    ``sequence_parallel`` shards the token dimension across the TP group outside attention and
    MLP (Megatron-LM sequence parallelism); it has no effect when tp is 1.
    """

    tp: int = 1
    dp: int = 1
    pp: int = 1
    world_size: int = 1
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for axis in AXES:
            if getattr(self, axis) < 1:
                raise ValueError(f"{axis} must be >= 1, got {axis}={getattr(self, axis)}")
        product = self.tp * self.dp * self.pp
        if product != self.world_size:
            raise ValueError(
                f"tp * dp * pp = {self.tp} * {self.dp} * {self.pp} = {product} "
                f"does not equal world_size = {self.world_size}"
            )

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def sp_enabled(self) -> bool:
        """Sequence parallelism is on: requested and more than one TP rank to shard over."""
        return self.sequence_parallel and self.tp > 1

    def coord(self, rank: int) -> RankCoord:
        """(tp, dp, pp) coordinates of ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} ranks")
        return RankCoord(tp=rank % self.tp, dp=rank // self.tp % self.dp, pp=rank // (self.tp * self.dp))

    def rank(self, coord: RankCoord) -> int:
        """Global rank at ``coord`` (inverse of :meth:`coord`)."""
        return coord.tp + self.tp * (coord.dp + self.dp * coord.pp)

    def group_ranks(self, *axes: Axis) -> list[list[int]]:
        """Rank lists of the groups spanning ``axes`` with the other coordinates fixed, by first rank.

        ``group_ranks("tp")`` are the TP groups; ``group_ranks("tp", "pp")`` the model groups.
        """
        unknown = [a for a in axes if a not in AXES]
        if unknown or not axes:
            raise ValueError(f"axes must be a non-empty subset of {AXES}, got {axes}")
        groups: dict[tuple[int, ...], list[int]] = {}
        for rank in range(self.world_size):
            coord = self.coord(rank)._asdict()
            key = tuple(value for axis, value in coord.items() if axis not in axes)
            groups.setdefault(key, []).append(rank)
        return sorted(groups.values())

    def check_model(self, *, num_heads: int, hidden_size: int, ffn_hidden_size: int, num_layers: int,
                    num_tokens: int) -> None:
        """Raise ValueError naming every size that cannot be split over this grid.

        Heads, hidden and MLP sizes are split over TP; blocks over PP stages (evenly, so that
        stages are balanced); under sequence parallelism the tokens over TP as well.
        """
        problems = [
            f"{name}={value} is not divisible by tp={self.tp}"
            for name, value in [("num_heads", num_heads), ("hidden_size", hidden_size),
                                ("ffn_hidden_size", ffn_hidden_size)]
            if value % self.tp
        ]
        if num_layers % self.pp:
            problems.append(f"num_layers={num_layers} cannot be split evenly into pp={self.pp} pipeline stages")
        if self.sp_enabled and num_tokens % self.tp:
            problems.append(f"num_tokens={num_tokens} is not divisible by tp={self.tp} (sequence parallelism)")
        if problems:
            raise ValueError("model does not fit the parallel layout: " + "; ".join(problems))


class Topology:
    """:class:`ParallelDims` plus this rank's coordinates and its process groups.

    Construction is collective: every rank must build the same ``Topology`` in the same order,
    because ``torch.distributed`` creates each subgroup on all ranks.
    """

    def __init__(self, dims: ParallelDims) -> None:
        if not dist.is_initialized():
            raise RuntimeError("Topology needs torch.distributed to be initialized (init_process_group)")
        if dist.get_world_size() != dims.world_size:
            raise ValueError(f"ParallelDims.world_size={dims.world_size} but torch.distributed has "
                             f"{dist.get_world_size()} ranks")
        self.dims = dims
        self.rank = dist.get_rank()
        self.coord = dims.coord(self.rank)
        self.tp_group = self._subgroup("tp")
        self.dp_group = self._subgroup("dp")
        self.pp_group = self._subgroup("pp")
        self.model_group = self._subgroup("tp", "pp")

    def _subgroup(self, *axes: Axis) -> dist.ProcessGroup:
        group, _ = dist.new_subgroups_by_enumeration(self.dims.group_ranks(*axes))
        return group

    def ranks_of(self, *axes: Axis) -> list[int]:
        """Global ranks of this rank's group spanning ``axes``."""
        return next(g for g in self.dims.group_ranks(*axes) if self.rank in g)
