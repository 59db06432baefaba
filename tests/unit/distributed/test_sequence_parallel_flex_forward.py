"""The flex backend under Ulysses sequence parallelism, forward only (FlexAttention has no CPU backward; the GPU
test tests/gpu/test_sequence_parallel_flex.py covers the backward): sp ranks are threads of this process joined
by torch's threaded process group, so the all-to-alls are real ``torch.distributed`` calls. Ulysses with the flex
mask of the whole sequence gives each rank its shard of flex attention on the whole sequence (and of bbm's), and
a flex decoder's loss summed over the ranks is the unsharded loss."""

import pytest
import torch
import torch.distributed as dist

from bbm.distributed import ParallelGroups, UlyssesAttention, sequence_parallel_loss, shard_batch
from bbm.model import Decoder, ModelConfig, attend, build_mask
from bbm.testing import document_positions, random_doc_ids
from helpers.ranks import run_threads

@pytest.mark.parametrize("sp,hq,hkv", [(2, 4, 2), (4, 4, 2), (2, 6, 1)])  # kv heads split, or replicated
def test_ulysses_flex_forward_equals_whole_sequence(sp, hq, hkv):
    gen = torch.Generator().manual_seed(sp * 10 + hkv)
    b, n, d = 2, 64, 16
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for h in (hq, hkv, hkv))
    doc_ids = random_doc_ids(b, n, 5, generator=gen)
    flex = build_mask(doc_ids, "flex").layer(0)  # the whole sequence's mask, as every rank builds it
    want = attend(q, k, v, flex)
    torch.testing.assert_close(want, attend(q, k, v, build_mask(doc_ids, "bbm").layer(0)), rtol=1e-5, atol=1e-5)

    def rank_checks(rank, world):
        shard = slice(rank * n // world, (rank + 1) * n // world)
        got = UlyssesAttention(dist.group.WORLD, attend)(q[:, :, shard], k[:, :, shard], v[:, :, shard], flex)
        torch.testing.assert_close(got, want[:, :, shard], rtol=1e-6, atol=1e-6)

    run_threads(rank_checks, sp)


def test_flex_decoder_loss_under_sequence_parallelism():
    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, attention="flex")
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    b, n = 2, 32
    doc_ids = random_doc_ids(b, n, 4, generator=gen)
    tokens = torch.randint(0, 61, (b, n), generator=gen)
    same_doc = torch.cat([doc_ids[:, 1:] == doc_ids[:, :-1], torch.zeros(b, 1, dtype=torch.bool)], dim=1)
    batch = {"tokens": tokens, "position_ids": document_positions(doc_ids), "doc_ids": doc_ids,
             "labels": torch.where(same_doc, tokens.roll(-1, dims=1), -100)}
    mask = build_mask(doc_ids, "flex")
    with torch.no_grad():
        want = model(batch["tokens"], batch["position_ids"], mask, batch["labels"])
    losses = {}

    def rank_loss(rank, world):
        groups = ParallelGroups(sp_size=world)
        sp_model = Decoder(cfg).eval()
        sp_model.load_state_dict(model.state_dict())
        sp_model.attention_fn = UlyssesAttention(groups.sp_group, attend)
        shard = shard_batch(batch, groups.sp_rank, groups.sp_size)
        with torch.no_grad():
            loss = sp_model(shard["tokens"], shard["position_ids"], mask, shard["labels"])
            losses[rank] = sequence_parallel_loss(loss, shard["labels"], groups.sp_group)

    run_threads(rank_loss, 2)
    torch.testing.assert_close(losses[0] + losses[1], want, rtol=1e-5, atol=1e-6)
