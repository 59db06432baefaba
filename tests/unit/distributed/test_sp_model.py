"""A tiny decoder with sp=2 (2 gloo processes) gives the loss and parameter gradients of sp=1 on the same
batch: the batch is sharded along the sequence, attention goes through UlyssesAttention with the mask of
the whole sequence, each rank's loss is normalised by the whole sequence's real tokens, and gradients are
summed over the sequence-parallel group (what DeepSpeed does with ParallelGroups)."""
import copy

import torch
import torch.distributed as dist

from bbm.distributed import ParallelGroups, UlyssesAttention, sequence_parallel_loss, shard_batch
from bbm.model import Decoder, ModelConfig, attend, build_mask
from helpers.model import packed_batch
from helpers.ranks import run


def tiny_model(n_kv_heads, checkpoint_layers):
    torch.manual_seed(0)  # the same weights on every rank
    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, multiple_of=16)
    return Decoder(cfg, checkpoint_layers=checkpoint_layers).double()


def _model_matches(rank, world):
    groups = ParallelGroups(sp_size=world)
    for i, (backend, n_kv, ckpt) in enumerate([("bbm", 2, False), ("bbm", 1, True), ("sdpa_masked", 4, False)]):
        batch = packed_batch(2, 32, 61, 4, i)
        mask = build_mask(batch["doc_ids"], backend)  # whole sequence: the same mask with and without SP
        model = tiny_model(n_kv, ckpt)
        # sp=1: the whole sequence in this process
        want = model(batch["tokens"], batch["position_ids"], mask, batch["labels"])
        want_grads = torch.autograd.grad(want, list(model.parameters()))
        # sp=2: this rank's shard, attention through Ulysses, loss over the whole sequence's real tokens
        sp_model = copy.deepcopy(model)
        sp_model.attention_fn = UlyssesAttention(groups.sp_group, attend)
        shard = shard_batch(batch, groups.sp_rank, groups.sp_size)
        loss = sp_model(shard["tokens"], shard["position_ids"], mask, shard["labels"])
        loss = sequence_parallel_loss(loss, shard["labels"], groups.sp_group)
        grads = torch.autograd.grad(loss, list(sp_model.parameters()))
        total = loss.detach().clone()
        dist.all_reduce(total, group=groups.sp_group)
        torch.testing.assert_close(total, want.detach(), rtol=1e-10, atol=0, msg=f"case {i} loss")
        for (name, _), g, w in zip(model.named_parameters(), grads, want_grads):
            dist.all_reduce(g, group=groups.sp_group)  # sum over the SP group
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=f"case {i} grad {name}")


def test_sp2_model_loss_and_gradients_equal_sp1():
    run(_model_matches, 2)
