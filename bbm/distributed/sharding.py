"""Splitting a packed micro-batch along the sequence, and the loss normalisation that makes it exact.

Every rank of a sequence-parallel group reads the same packed sample (the loader is sharded by DP rank,
``PackedLoader(..., rank=groups.dp_rank, world_size=groups.dp_size)``) and keeps its slice:

* ``tokens``, ``labels``, ``position_ids``: rank ``r`` keeps positions ``r*n ... (r+1)*n - 1``, ``n = N/sp``.
  Labels are already next-token aligned per position (-100 at document ends and on padding), so no label
  crosses a shard boundary; position ids restart per document, so RoPE on a shard equals RoPE on the slice
  of the whole sequence.
* ``doc_ids`` stay whole: after the all-to-all each rank attends over all N tokens, and the mask built from
  the whole ``doc_ids`` is exactly the unsharded one. Keeping them costs 4 bytes per token of the whole
  sequence and no communication (all-gathering shards would cost a collective for the same tensor).
"""
import torch
import torch.distributed as dist

from bbm._checks import check_positive_int, check_tensor, fail
from bbm.data import IGNORE_INDEX

SHARDED_KEYS = ("tokens", "labels", "position_ids")
WHOLE_KEYS = ("doc_ids",)


def shard_batch(batch: dict, sp_rank: int, sp_size: int) -> dict:
    """The ``sp_rank``-th of ``sp_size`` sequence shards of a loader batch (dict of ``(B, N)`` tensors)."""
    check_positive_int("sp_size", sp_size)
    if isinstance(sp_rank, bool) or not isinstance(sp_rank, int) or not 0 <= sp_rank < sp_size:
        fail("sp_rank", f"an int in [0, {sp_size})", repr(sp_rank))
    if not isinstance(batch, dict):
        fail("batch", "a dict of (B, N) tensors", type(batch).__name__, TypeError)
    unknown = sorted(set(batch) - set(SHARDED_KEYS) - set(WHOLE_KEYS))
    if unknown:
        fail("batch", f"only the keys {SHARDED_KEYS + WHOLE_KEYS}", f"also {unknown}")
    shape = None
    for key, t in batch.items():
        check_tensor(f"batch[{key!r}]", t, ndim=2)
        shape = shape or t.shape
        if t.shape != shape:
            fail(f"batch[{key!r}]", f"shape {tuple(shape)} like the other entries", f"shape {tuple(t.shape)}")
    n_all = shape[1]
    if n_all % sp_size:
        fail("seq_len", f"a multiple of the sequence parallel size {sp_size}", n_all)
    n = n_all // sp_size
    return {key: t if key in WHOLE_KEYS else t[:, sp_rank * n:(sp_rank + 1) * n].contiguous()
            for key, t in batch.items()}


def sequence_parallel_loss(shard_loss, shard_labels, group):
    """Rescale this rank's mean loss over its shard's real tokens into its share of the whole sequence's mean.

    ``shard_loss`` = (loss sum over the shard) / max(1, real tokens of the shard), as ``Decoder.forward``
    returns it; the result is (loss sum over the shard) / max(1, real tokens of the whole sequence), so the
    SP group's results sum to the unsharded mean loss and their gradients, summed over the SP group (what
    DeepSpeed does with ``ParallelGroups``), to the unsharded gradient. One scalar all-reduce, no gradient
    through it. The whole-sequence loss for logging is the detached result all-reduced over ``group``."""
    if group is None or dist.get_world_size(group) == 1:
        return shard_loss
    local = (shard_labels != IGNORE_INDEX).sum().to(torch.float64)
    total = local.clone()
    dist.all_reduce(total, group=group)
    return shard_loss * (local.clamp(min=1) / total.clamp(min=1)).to(shard_loss.dtype)
