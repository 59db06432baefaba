"""Process groups for data parallel x sequence parallel (Ulysses) training, and the ``mpu`` DeepSpeed reads.

Layout: ``world_size = dp * sp``. Consecutive ranks form a sequence-parallel (SP) group, so an SP group
stays inside one node when ``sp`` divides the GPUs per node (all-to-all is the hot collective):

    world 8, sp 4:  SP groups [0 1 2 3] [4 5 6 7];  DP groups [0 4] [1 5] [2 6] [3 7]

Every rank of an SP group reads the same packed sample (the loader is sharded by DP rank) and keeps
``1/sp`` of its tokens. DeepSpeed gets the groups through ``deepspeed.initialize(..., mpu=groups)``; it
follows DeepSpeed's own Ulysses convention (``deepspeed.runtime.sequence_parallel.parallel_state_sp``):

* ZeRO shards parameters, gradients and optimizer states over the *sequence-data-parallel* group = all
  ranks, so memory for model states falls with the world size, not just with ``dp``;
* gradients are all-reduced over all ranks and divided by ``world / sp = dp``: summed over the SP
  group (each SP rank holds the gradient of its token shard) and averaged over DP. For that to equal the
  unsharded gradient, each SP rank's loss is its shard's loss sum divided by the token count of the
  *whole* sequence (``bbm.distributed.sequence_parallel_loss``).

The object deliberately has no ``get_data_parallel_group``: DeepSpeed would then partition ZeRO-3
parameters over the DP-only group, which disagrees with the optimizer's all-rank partitioning. The
DP-only group is ``dp_group`` (for the loader and metrics). ``initialize_sequence_parallel`` is the marker
DeepSpeed tests for: with it, DeepSpeed treats the model as replicated (no tensor parallelism).
"""
from typing import List

import torch.distributed as dist

from bbm._checks import check_positive_int, fail


def check_layout(world_size: int, sp_size: int) -> int:
    """``dp`` for ``world_size = dp * sp_size``; a clear error otherwise."""
    check_positive_int("world_size", world_size)
    check_positive_int("sequence_parallel_size", sp_size)
    if world_size % sp_size:
        fail("sequence_parallel_size", f"a divisor of the world size {world_size} (data parallel x sequence "
             f"parallel = world size)", sp_size)
    return world_size // sp_size


def sp_group_ranks(world_size: int, sp_size: int) -> List[List[int]]:
    """The SP groups: runs of ``sp_size`` consecutive ranks."""
    dp = check_layout(world_size, sp_size)
    return [list(range(i * sp_size, (i + 1) * sp_size)) for i in range(dp)]


def dp_group_ranks(world_size: int, sp_size: int) -> List[List[int]]:
    """The DP groups: the ranks with the same SP rank."""
    check_layout(world_size, sp_size)
    return [list(range(j, world_size, sp_size)) for j in range(sp_size)]


class ParallelGroups:
    """SP / DP groups of this process; pass it to ``deepspeed.initialize(..., mpu=...)``.

    Must be built on every rank, in the same order, after ``torch.distributed`` is initialised (it calls
    ``new_group`` for every group, as torch requires). ``sp_size=1`` gives plain data parallelism."""

    def __init__(self, sp_size: int):
        if not dist.is_initialized():
            fail("torch.distributed", "an initialised default process group (init_process_group, or "
                 "deepspeed.init_distributed)", "none")
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.sp_size = sp_size
        self.dp_size = check_layout(self.world_size, sp_size)
        self.sp_rank = self.rank % sp_size
        self.dp_rank = self.rank // sp_size
        self.sp_group = self._own_group(sp_group_ranks(self.world_size, sp_size))
        self.dp_group = self._own_group(dp_group_ranks(self.world_size, sp_size))
        self.world_group = dist.group.WORLD

    def _own_group(self, all_ranks):
        """Create every group (collective: all ranks call new_group for each) and keep the one with this rank."""
        mine = None
        for ranks in all_ranks:
            group = dist.new_group(ranks)
            if self.rank in ranks:
                mine = group
        return mine

    # ---------------------------------------------------------------- what DeepSpeed reads
    def initialize_sequence_parallel(self, *_):
        """Marker attribute DeepSpeed checks with ``hasattr`` (its groups are built in ``__init__``)."""

    def get_sequence_parallel_group(self):
        return self.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.sp_rank

    def get_sequence_data_parallel_group(self):
        return self.world_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.world_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size  # DeepSpeed's batch arithmetic: train_batch = micro * accumulation * dp

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    # Norms: DeepSpeed's non-ZeRO paths count replicated gradients on model-parallel rank 0 and sum over the
    # model-parallel group; aliasing it to the SP group (as DeepSpeed's parallel_state_sp does) is exact,
    # because after the all-rank reduction every SP rank holds the same gradient.
    get_model_parallel_group = get_sequence_parallel_group
    get_model_parallel_world_size = get_sequence_parallel_world_size
    get_model_parallel_rank = get_sequence_parallel_rank

    def __repr__(self):
        return (f"ParallelGroups(world={self.world_size}, dp={self.dp_size}, sp={self.sp_size}, "
                f"rank={self.rank}: dp_rank={self.dp_rank}, sp_rank={self.sp_rank})")
