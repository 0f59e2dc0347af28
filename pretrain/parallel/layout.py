"""The rank layout (DP x SP x TP, TP innermost) and its process groups, exposed to DeepSpeed as its `mpu`.

    global rank = dp * (SP * TP) + sp * TP + tp

    example: world 8, TP = 2, SP = 2, DP = 2

              dp = 0                  dp = 1
           sp=0      sp=1          sp=0      sp=1
         [0   1]   [2   3]       [4   5]   [6   7]      <- [ ] is one TP group (adjacent ranks, fast links)
          \\___________/           \\___________/
           one replica:            one replica:
           SP groups {0,2} {1,3}   SP groups {4,6} {5,7}
         DP groups: {0,4} {1,5} {2,6} {3,7};  SP x DP groups (ZeRO shards and reduces here): {0,2,4,6} {1,3,5,7}

All SP and TP ranks of one replica read the same samples (they share the dp index). DeepSpeed gets this object as
`mpu`: model-parallel = TP, data-parallel = pure DP (batch arithmetic), sequence-data-parallel = DP x SP (ZeRO
partitioning and gradient reduction). It deliberately has no `initialize_sequence_parallel` attribute: DeepSpeed
takes its presence to mean TP = 1 and would drop the TP group from the gradient-norm reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class RankCoords:
    dp: int
    sp: int
    tp: int


def coords_of(rank: int, sp: int, tp: int) -> RankCoords:
    return RankCoords(dp=rank // (sp * tp), sp=(rank // tp) % sp, tp=rank % tp)


def rank_of(c: RankCoords, sp: int, tp: int) -> int:
    return c.dp * sp * tp + c.sp * tp + c.tp


class ParallelLayout:
    """Coordinates of this rank and the process groups along each axis (created collectively on all ranks)."""

    def __init__(self, world_size: int, rank: int, tp: int = 1, sp: int = 1, create_groups: bool = True) -> None:
        if world_size % (tp * sp):
            raise ValueError(
                f"world size {world_size} is not divisible by tp * sp = {tp} * {sp}: the layout DP x SP x TP needs "
                f"world = dp * sp * tp"
            )
        self.world_size, self.rank, self.tp, self.sp = world_size, rank, tp, sp
        self.dp = world_size // (tp * sp)
        self.coords = coords_of(rank, sp, tp)
        self.tp_group = self.sp_group = self.dp_group = self.sp_dp_group = None
        if create_groups and world_size > 1:
            self._create_groups()

    def _create_groups(self) -> None:
        # every rank must create every group, in the same order
        tp, sp, dp = self.tp, self.sp, self.dp
        for d in range(dp):
            for s in range(sp):
                ranks = [rank_of(RankCoords(d, s, t), sp, tp) for t in range(tp)]
                g = dist.new_group(ranks)
                if self.rank in ranks:
                    self.tp_group = g
        for d in range(dp):
            for t in range(tp):
                ranks = [rank_of(RankCoords(d, s, t), sp, tp) for s in range(sp)]
                g = dist.new_group(ranks)
                if self.rank in ranks:
                    self.sp_group = g
        for s in range(sp):
            for t in range(tp):
                ranks = [rank_of(RankCoords(d, s, t), sp, tp) for d in range(dp)]
                g = dist.new_group(ranks)
                if self.rank in ranks:
                    self.dp_group = g
        for t in range(tp):
            ranks = [rank_of(RankCoords(d, s, t), sp, tp) for d in range(dp) for s in range(sp)]
            g = dist.new_group(ranks)
            if self.rank in ranks:
                self.sp_dp_group = g

    def describe(self) -> str:
        return f"world {self.world_size} = DP {self.dp} x SP {self.sp} x TP {self.tp}"

    # DeepSpeed mpu interface (deepspeed/utils/groups.py reads these)
    def get_model_parallel_rank(self) -> int:
        return self.coords.tp

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.coords.dp

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_sequence_parallel_rank(self) -> int:
        return self.coords.sp

    def get_sequence_parallel_world_size(self) -> int:
        return self.sp

    def get_sequence_parallel_group(self):
        return self.sp_group

    def get_sequence_data_parallel_rank(self) -> int:
        return self.coords.dp * self.sp + self.coords.sp

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.dp * self.sp

    def get_sequence_data_parallel_group(self):
        return self.sp_dp_group
