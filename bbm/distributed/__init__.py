"""Sequence parallelism (DeepSpeed-Ulysses) with bbm attention, combined with ZeRO data parallelism.

    groups = ParallelGroups(sp_size)                         # after torch / deepspeed distributed init
    engine, *_ = deepspeed.initialize(model=model, ..., mpu=groups)
    model.attention_fn = UlyssesAttention(groups.sp_group, attend)
    batch = shard_batch(batch, groups.sp_rank, groups.sp_size)   # loader sharded by groups.dp_rank
    loss = sequence_parallel_loss(engine(...), batch["labels"], groups.sp_group)
"""
from bbm.distributed.groups import ParallelGroups, check_layout, dp_group_ranks, sp_group_ranks
from bbm.distributed.sharding import sequence_parallel_loss, shard_batch
from bbm.distributed.ulysses import UlyssesAttention, all_to_all, kv_replication

__all__ = ["ParallelGroups", "UlyssesAttention", "all_to_all", "check_layout", "dp_group_ranks", "kv_replication",
           "sequence_parallel_loss", "shard_batch", "sp_group_ranks"]
