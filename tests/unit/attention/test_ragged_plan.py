"""The plans of cuDNN's ragged path (bbm.attention.ragged) on the CPU: the runs, offsets and lengths of each call,
for causal, windowed, bidirectional and prefix-LM document masks; the graph shapes built up front; the SDPA
warm-up under activation checkpointing. The path itself runs in tests/gpu/test_ragged.py."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import bbm
from bbm.attention import ragged, sdpa
from bbm.testing import random_doc_ids
from helpers.attention import qkv


def test_plan_lists_every_document():
    doc = torch.tensor([[0] * 5 + [1] + [2] * 10, [7] * 16])
    (call,) = ragged.plan(bbm.Mask.from_documents(doc), batch=2)
    assert call.count == 4 and call.longest_q == call.longest_kv == 64 and (call.batch, call.tokens) == (2, 16)
    assert call.band == (True, False, None)
    assert call.q_first.tolist() == call.kv_first.tolist() == [16, 6, 0, 5, 32]  # longest first, then the end
    assert call.len_q.flatten().tolist() == call.len_kv.flatten().tolist() == [16, 10, 5, 1]
    # token index x elements per token
    assert call.offsets(32, keys=False).flatten().tolist() == [512, 192, 0, 160, 1024]
    assert call.len_q.dtype == torch.int32 and call.offsets(16, keys=True).dtype == torch.int32


def test_plan_of_a_shared_mask_repeats_its_documents():
    doc = torch.tensor([[0] * 70 + [1] * 30])
    (call,) = ragged.plan(bbm.Mask.from_documents(doc), batch=3)
    assert call.count == 8 and call.longest_q == 128
    assert call.q_first.tolist() == [0, 100, 200, 70, 170, 270, 300, 300, 300]  # two empty runs at the end
    assert call.len_q.flatten().tolist() == [70] * 3 + [30] * 3 + [0, 0]


def test_plan_orders_documents_longest_first_and_keeps_ties_in_token_order():
    lengths = torch.randint(1, 40, (30,), generator=torch.Generator().manual_seed(11))
    doc = torch.repeat_interleave(torch.arange(30), lengths).view(1, -1)
    (call,) = ragged.plan(bbm.Mask.from_documents(doc), batch=1)
    starts = torch.cumsum(lengths, 0) - lengths
    expect = sorted(range(30), key=lambda i: (-int(lengths[i]), i))
    assert call.len_q.flatten()[:30].tolist() == [int(lengths[i]) for i in expect]
    assert call.q_first[:30].tolist() == [int(starts[i]) for i in expect]
    assert call.q_first[30:].tolist() == [int(lengths.sum())] * 3  # two empty runs, then the end


def test_plan_of_a_window_and_of_bidirectional_documents():
    doc = torch.tensor([[0] * 6 + [1] * 10])
    (windowed,) = ragged.plan(bbm.Mask.from_documents(doc, window=4), batch=1)
    (both_ways,) = ragged.plan(bbm.Mask.from_documents(doc, causal=False), batch=1)
    assert windowed.band == (True, False, 4) and both_ways.band == (False, False, None)
    assert windowed.q_first.tolist() == both_ways.q_first.tolist() == [6, 0, 16]


def test_plan_of_a_prefix_is_two_calls_over_disjoint_queries():
    """Prefix-LM: the prefixes' queries over the prefixes (no band), the other queries over their whole document,
    bottom-right causal; documents without a prefix (or all prefix) drop out of one of the calls."""
    doc = torch.tensor([[0] * 6 + [1] * 10 + [2] * 4])
    prefix = torch.zeros(1, 20, dtype=torch.bool)
    prefix[0, :2] = True  # document 0: 2 of 6
    prefix[0, 16:20] = True  # document 2: all 4
    prefix_call, rest = ragged.plan(bbm.Mask.from_documents(doc, prefix=prefix), batch=1)
    assert prefix_call.band == (False, False, None) and rest.band == (True, True, None)
    assert prefix_call.q_first.tolist()[:2] == prefix_call.kv_first.tolist()[:2] == [16, 0]
    assert prefix_call.len_q.flatten().tolist() == prefix_call.len_kv.flatten().tolist() == [4, 2]
    assert rest.q_first.tolist() == [6, 2, 20] and rest.kv_first.tolist() == [6, 0, 20]
    assert rest.len_q.flatten().tolist() == [10, 4] and rest.len_kv.flatten().tolist() == [10, 6]
    rows = torch.zeros(20, dtype=torch.int32)
    for call in (prefix_call, rest):
        for first, length in zip(call.q_first.tolist(), call.len_q.flatten().tolist()):
            rows[first:first + length] += 1
    assert (rows == 1).all()  # every query in exactly one call


def test_one_document_per_sample_is_exactly_causal():
    one = bbm.Mask.from_documents(torch.tensor([[3] * 16, [5] * 16]))
    two = bbm.Mask.from_documents(torch.tensor([[3] * 16, [5] * 15 + [6]]))
    shared = bbm.Mask.from_documents(torch.tensor([[4] * 16]))
    bidirectional = bbm.Mask.from_documents(torch.tensor([[4] * 16]), causal=False)
    windowed = bbm.Mask.from_documents(torch.tensor([[4] * 16]), window=4)
    for mask, causal in ((one, True), (two, False), (shared, True), (bidirectional, False), (windowed, False)):
        assert mask.exactly_causal == causal


def test_a_mask_keeps_the_host_ids_it_was_built_from():
    doc = random_doc_ids(2, 300, 7, generator=torch.Generator().manual_seed(5))
    mask = bbm.Mask.from_documents(doc, device="cpu")
    assert torch.equal(mask.host_documents(), doc) and torch.equal(mask.documents, doc)
    assert torch.equal(bbm.Mask.from_documents(doc, window=8).host_documents(), doc)
    with pytest.raises(ValueError, match="^mask: expected a mask built by Mask.from_documents"):
        bbm.Mask.causal(300).host_documents()


def test_plan_needs_a_document_mask_it_can_describe():
    doc = torch.tensor([[0] * 8 + [1] * 8])
    prefix = torch.zeros(1, 16, dtype=torch.bool)
    for mask in (bbm.Mask.from_documents(doc, window=4, causal=False), bbm.Mask.from_documents(doc, window=4, prefix=prefix),
                 bbm.Mask.causal(16), bbm.Mask.global_tokens(16, 2, 4)):
        assert ragged.plan(mask, batch=1) is None


def test_size_classes_and_layouts():
    assert [ragged.size_class(x) for x in (1, 64, 65, 1000, 1024, 1025)] == [64, 64, 128, 1024, 1024, 2048]
    q, k, _ = qkv(2, 4, 2, 10, d=8, token_major=True)
    assert ragged.token_major(q) and ragged.token_major(k)
    assert not ragged.token_major(torch.randn(2, 4, 10, 8))  # (B, H, N, D) memory: each head's tokens together
    assert not ragged.available(q)  # on the CPU


def test_ragged_backend_refuses_what_cudnn_does_not_take():
    doc = torch.tensor([[0] * 8 + [1] * 8])
    q, k, v = qkv(1, 2, 2, 16, d=8, token_major=True)
    with pytest.raises(ValueError, match="^backend: expected 'ragged' where cuDNN's ragged attention runs"):
        bbm.attention(q, k, v, bbm.Mask.from_documents(doc), backend="ragged")


def test_causal_warm_up_inside_an_activation_checkpoint(monkeypatch):
    """The ragged path's first call for a layout runs SDPA forward and backward once (``sdpa.warm_causal``); inside
    a checkpointed layer that first call is the forward, and the recompute, which runs no warm-up, must find the
    tensors the forward saved."""
    monkeypatch.setattr(sdpa, "_warm_layouts", set())
    mask = bbm.Mask.from_documents(random_doc_ids(1, 48, 3, generator=torch.Generator().manual_seed(1)))

    def layer(q, k, v):
        sdpa.warm_causal(q, k, v, 0.25)
        return bbm.attention(q, k, v, mask, scale=0.25)

    q, k, v = qkv(1, 4, 2, 48, d=16, token_major=True)
    g = torch.randn(1, 4, 48, 16)
    out = checkpoint(layer, q, k, v, use_reentrant=False)
    got = torch.autograd.grad(out, (q, k, v), g)
    assert len(sdpa._warm_layouts) == 1  # it did run, in the checkpointed forward
    want = torch.autograd.grad(layer(q, k, v), (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_warm_up_shapes_cover_every_micro_batch_of_common_documents():
    """Every plan of 2 x 3001 tokens whose documents average >= SHORTEST tokens has its graph built up front."""
    shapes = set(ragged.shapes(2 * 3001, 3001))
    gen = torch.Generator().manual_seed(0)
    for docs in (1, 2, 5, 40, 46):  # 46 per sample: 65 tokens on average
        doc = random_doc_ids(2, 3001, docs, generator=gen)
        (call,) = ragged.plan(bbm.Mask.from_documents(doc), batch=2)
        assert (call.count, call.longest_q) in shapes and call.longest_q == call.longest_kv
    assert all(c * l >= 2 * 3001 and l <= 4096 for c, l in shapes)
