"""The flex backend under Ulysses sequence parallelism on one GPU, forward and backward: sp ranks are threads of
this process joined by torch's threaded process group (real ``torch.distributed`` all-to-alls, in autograd too),
all on the one GPU, so no second GPU is needed. Checked against FlexAttention on the whole sequence and a float64
dense reference, at the attention and at the decoder level (loss and every parameter gradient, sp=2 vs sp=1).

Compiled FlexAttention is built for each shape in the main thread first (the ranks' shapes: N tokens, H / sp
heads), so the rank threads only run compiled code. Run on a GPU machine with
``TRITON_INTERPRET=0 python3 -m pytest tests/gpu/test_sequence_parallel_flex.py``."""
import copy
import os

import pytest
import torch
import torch.distributed as dist

from bbm.distributed import ParallelGroups, UlyssesAttention, sequence_parallel_loss, shard_batch
from bbm.model import Decoder, ModelConfig, attend, build_mask
from bbm.testing import dense_attention, document_positions, random_doc_ids
from helpers.ranks import run_threads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU and TRITON_INTERPRET=0 (compiled FlexAttention)")
pytest.importorskip("torch.testing._internal.distributed.multi_threaded_pg")
DEVICE = "cuda"


def warm_flex(b, h, hkv, n, d, dtype, mask):
    """Compiles FlexAttention's forward and backward for the ranks' shapes, in this (the main) thread."""
    q, k, v = (torch.randn(b, x, n, d, device=DEVICE, dtype=dtype, requires_grad=True) for x in (h, hkv, hkv))
    attend(q, k, v, mask).sum().backward()


@pytest.mark.parametrize("sp,hq,hkv,dtype", [(2, 4, 2, torch.float32), (4, 8, 2, torch.float32),
                                             (2, 8, 4, torch.bfloat16)])
def test_ulysses_flex_forward_backward(sp, hq, hkv, dtype):
    gen = torch.Generator().manual_seed(sp + hq)
    b, n, d = 2, 512, 64
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(DEVICE, dtype) for h in (hq, hkv, hkv))
    grad_out = torch.randn(b, hq, n, d, generator=gen).to(DEVICE, dtype)
    doc_ids = random_doc_ids(b, n, 6, generator=gen)
    flex = build_mask(doc_ids.to(DEVICE), "flex").layer(0)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    want = attend(*full, flex)
    want_grads = torch.autograd.grad(want, full, grad_out)
    dense = dense_attention(q, k, v, build_mask(doc_ids, "bbm").layer(0).mask.to_dense().to(DEVICE)).to(dtype)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(want, dense, **tol)
    warm_flex(b, hq // sp, max(1, hkv // sp), n, d, dtype, flex)  # kv heads: split, or one replicated head each

    def rank_checks(rank, world):
        shard = slice(rank * n // world, (rank + 1) * n // world)
        local = [t[:, :, shard].clone().requires_grad_() for t in (q, k, v)]
        got = UlyssesAttention(dist.group.WORLD, attend)(*local, flex)
        grads = torch.autograd.grad(got, local, grad_out[:, :, shard])
        torch.testing.assert_close(got, want[:, :, shard], **tol)
        for name, g, w in zip("qkv", grads, want_grads):
            torch.testing.assert_close(g, w[:, :, shard], **tol, msg=lambda m: f"rank {rank} d{name}: {m}")

    run_threads(rank_checks, sp)


def test_flex_decoder_loss_and_gradients_sp2_equal_sp1():
    # fused=False: no compiled regions around the attention, so only FlexAttention is compiled (warmed up here)
    cfg = ModelConfig(vocab_size=97, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
                      attention="flex", fused=False)
    torch.manual_seed(0)
    model = Decoder(cfg).to(DEVICE)
    gen = torch.Generator().manual_seed(2)
    b, n = 2, 256
    doc_ids = random_doc_ids(b, n, 5, generator=gen)
    tokens = torch.randint(0, 97, (b, n), generator=gen)
    same_doc = torch.cat([doc_ids[:, 1:] == doc_ids[:, :-1], torch.zeros(b, 1, dtype=torch.bool)], dim=1)
    batch = {k: t.to(DEVICE) for k, t in {
        "tokens": tokens, "position_ids": document_positions(doc_ids), "doc_ids": doc_ids,
        "labels": torch.where(same_doc, tokens.roll(-1, dims=1), -100)}.items()}
    mask = build_mask(batch["doc_ids"], "flex")
    want = model(batch["tokens"], batch["position_ids"], mask, batch["labels"])
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    warm_flex(b, cfg.n_heads // 2, cfg.kv_heads // 2, n, cfg.head_dim, torch.float32, mask)
    results = {}

    def rank_step(rank, world):
        groups = ParallelGroups(sp_size=world)
        sp_model = copy.deepcopy(model)
        sp_model.attention_fn = UlyssesAttention(groups.sp_group, attend)
        shard = shard_batch(batch, groups.sp_rank, groups.sp_size)
        loss = sp_model(shard["tokens"], shard["position_ids"], mask, shard["labels"])
        loss = sequence_parallel_loss(loss, shard["labels"], groups.sp_group)
        results[rank] = (loss.detach(), torch.autograd.grad(loss, list(sp_model.parameters())))

    run_threads(rank_step, 2)
    torch.testing.assert_close(results[0][0] + results[1][0], want.detach(), rtol=1e-5, atol=1e-5)
    for (name, _), g0, g1, w in zip(model.named_parameters(), results[0][1], results[1][1], want_grads):
        torch.testing.assert_close(g0 + g1, w, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
