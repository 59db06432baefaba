"""Ulysses attention with sp=2 (2 gloo processes) equals bbm.attention on the whole sequence, and a
float64 dense reference: outputs and q/k/v gradients, document / dense / no masks, MHA and GQA."""
import pytest
import torch
import torch.distributed as dist

import bbm
from bbm.distributed import UlyssesAttention, kv_replication
from bbm.testing import dense_attention, random_doc_ids
from helpers.ranks import run

# (batch, q heads, kv heads, tokens, head dim, mask kind); sp=2: kv heads 4 and 2 split, kv head 1 is replicated
CASES = [(2, 4, 4, 64, 8, "documents"), (1, 4, 2, 48, 16, "documents"), (2, 6, 1, 32, 8, "documents"),
         (1, 2, 2, 32, 8, "dense"), (1, 4, 2, 32, 8, None)]


def make_mask(kind, b, n, gen):
    if kind == "documents":
        return bbm.Mask.from_documents(random_doc_ids(b, n, 5, generator=gen))
    if kind == "dense":  # an arbitrary mask (bit-packed tiles), shared by the batch
        return bbm.Mask.from_dense(torch.rand(1, 1, n, n, generator=gen) < 0.3)
    return None


def _attention_matches(rank, world):
    attention = UlyssesAttention(dist.group.WORLD)
    for i, (b, hq, hkv, n, d, kind) in enumerate(CASES):
        gen = torch.Generator().manual_seed(100 + i)  # the same full inputs on every rank
        q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
        mask = make_mask(kind, b, n, gen)
        grad_out = torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64)
        # unsharded: bbm.attention on the whole sequence, and the dense float64 reference
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        want = bbm.attention(*full, mask)
        want_grads = torch.autograd.grad(want, full, grad_out)
        dense = dense_attention(q, k, v, None if mask is None else mask.to_dense())
        # sharded: this rank's n/world consecutive tokens of q, k, v; the mask of the whole sequence
        shard = slice(rank * n // world, (rank + 1) * n // world)
        local = [t[:, :, shard].clone().requires_grad_() for t in (q, k, v)]
        got = attention(*local, mask)
        got_grads = torch.autograd.grad(got, local, grad_out[:, :, shard])
        torch.testing.assert_close(got, want[:, :, shard], rtol=1e-10, atol=1e-10, msg=f"case {i} output")
        torch.testing.assert_close(got, dense[:, :, shard], rtol=1e-10, atol=1e-10, msg=f"case {i} vs dense")
        for name, g, w in zip("qkv", got_grads, want_grads):
            torch.testing.assert_close(g, w[:, :, shard], rtol=1e-10, atol=1e-10, msg=f"case {i} d{name}")


def _bad_inputs_fail_on_every_rank(rank, world):
    attention = UlyssesAttention(dist.group.WORLD)
    q = torch.randn(1, 4, 8, 8)
    cases = [((torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8), None), "n_heads"),
             ((q, q, q, bbm.Mask.causal(8)), "Nq=8"),  # a mask of the shard, not of the whole sequence
             ((q, q, q, bbm.Mask.from_dense(torch.ones(1, 4, 16, 16, dtype=torch.bool))), "4 heads")]
    for args, word in cases:
        with pytest.raises(ValueError, match=word):
            attention(*args)


def test_ulysses_attention_equals_unsharded():
    run(_attention_matches, 2)


def test_ulysses_attention_bad_input():
    run(_bad_inputs_fail_on_every_rank, 2)


@pytest.mark.parametrize("hq,hkv,sp,repeat", [(8, 8, 2, 1), (8, 2, 2, 1), (8, 2, 4, 2), (8, 1, 8, 8), (6, 3, 3, 1)])
def test_kv_replication(hq, hkv, sp, repeat):
    assert kv_replication(hq, hkv, sp) == repeat


@pytest.mark.parametrize("hq,hkv,sp,words", [
    (6, 6, 4, ["n_heads", "sequence parallel size 4", "got 6"]),
    (12, 6, 4, ["n_kv_heads", "multiple or a divisor of the sequence parallel size 4", "got 6"]),
    (12, 3, 2, ["n_kv_heads", "sequence parallel size 2", "got 3"]),
    (8, 3, 2, ["n_kv_heads", "divisor of n_heads=8", "got 3"])])
def test_heads_that_do_not_split_are_named(hq, hkv, sp, words):
    with pytest.raises(ValueError) as info:
        kv_replication(hq, hkv, sp)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
