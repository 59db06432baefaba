"""DP x SP layout: group membership on 4 gloo processes, the world-size check, and batch sharding."""
import pytest
import torch
import torch.distributed as dist

from bbm.distributed import ParallelGroups, check_layout, dp_group_ranks, shard_batch, sp_group_ranks
from helpers.model import packed_batch
from helpers.ranks import run


def _groups_are_the_layout(rank, world):
    g = ParallelGroups(sp_size=2)
    members = {}
    for name, group in (("sp", g.sp_group), ("dp", g.dp_group)):
        members[name] = [None] * dist.get_world_size(group)
        dist.all_gather_object(members[name], rank, group=group)
    assert members["sp"] == sp_group_ranks(world, 2)[g.dp_rank] == [2 * g.dp_rank, 2 * g.dp_rank + 1]
    assert members["dp"] == dp_group_ranks(world, 2)[g.sp_rank] == [g.sp_rank, g.sp_rank + 2]
    assert (g.get_sequence_parallel_rank(), g.get_data_parallel_rank()) == (rank % 2, rank // 2)
    assert (g.get_data_parallel_world_size(), g.get_sequence_data_parallel_world_size()) == (2, 4)
    with pytest.raises(ValueError, match="sequence_parallel_size: expected a divisor of the world size 4"):
        ParallelGroups(sp_size=3)


def test_parallel_groups_on_four_ranks():
    run(_groups_are_the_layout, 4)


def test_group_ranks():
    assert sp_group_ranks(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dp_group_ranks(8, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert sp_group_ranks(3, 1) == [[0], [1], [2]] and check_layout(6, 3) == 2


def test_shards_tile_the_sequence_and_keep_doc_ids_whole():
    batch = packed_batch(2, 24, 50, 4, 0)
    shards = [shard_batch(batch, r, 3) for r in range(3)]
    for key in ("tokens", "labels", "position_ids"):
        assert all(s[key].shape == (2, 8) for s in shards)
        assert torch.equal(torch.cat([s[key] for s in shards], dim=1), batch[key])
    assert all(s["doc_ids"] is batch["doc_ids"] for s in shards)


@pytest.mark.parametrize("args,exc,words", [
    ((8, 3), ValueError, ["sequence_parallel_size", "divisor of the world size 8", "got 3"]),
    ((0, 1), ValueError, ["world_size", "positive", "0"])])
def test_bad_layout_is_named(args, exc, words):
    with pytest.raises(exc) as info:
        check_layout(*args)
    for word in words:
        assert word in str(info.value)


def _batch(n=12, **extra):
    b = packed_batch(1, n, 50, 3, 1)
    b.update(extra)
    return b


@pytest.mark.parametrize("args,exc,words", [
    ((_batch(10), 0, 4), ValueError, ["seq_len", "multiple of the sequence parallel size 4", "got 10"]),
    ((_batch(), 2, 2), ValueError, ["sp_rank", "[0, 2)", "2"]),
    ((_batch(), 0, 0), ValueError, ["sp_size", "positive", "0"]),
    ((_batch(mask=torch.zeros(1, 12)), 0, 2), ValueError, ["batch", "only the keys", "'mask'"]),
    ((_batch(labels=torch.zeros(1, 6, dtype=torch.long)), 0, 2), ValueError, ["labels", "(1, 12)", "(1, 6)"]),
    (([1, 2], 0, 2), TypeError, ["batch", "dict", "list"])])
def test_bad_shard_input_is_named(args, exc, words):
    with pytest.raises(exc) as info:
        shard_batch(*args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
