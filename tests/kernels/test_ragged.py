"""Document masks as one cuDNN call over ragged sequences (bbm.attention.ragged): the plan's offsets and lengths (CPU), and the
attention against a float64 dense reference, outputs and gradients (GPU with cudnn-frontend installed)."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import bbm
from bbm.attention import ragged, sdpa
from bbm.masks.documents import document_starts
from bbm.testing import random_doc_ids
from gpu import needs_gpu
from kernel_checks import check_against_dense

CUDA = "cuda"
needs_cudnn_frontend = pytest.mark.skipif(ragged.frontend() is None, reason="cudnn-frontend is not installed")


def packed_qkv(b, hq, hkv, n, d, dtype, device="cpu", packed=True):
    """q, k, v (B, H, N, D) in (B, N, H, D) memory, as a model's projections give them (or, with packed=False, in
    (B, H, N, D) memory)."""
    if packed:
        make = lambda h: torch.randn(b, n, h, d, device=device).to(dtype).transpose(1, 2).requires_grad_()
    else:
        make = lambda h: torch.randn(b, h, n, d, device=device).to(dtype).requires_grad_()
    return make(hq), make(hkv), make(hkv)


def test_plan_lists_every_document():
    doc = torch.tensor([[0] * 5 + [1] + [2] * 10, [7] * 16])
    docs = ragged.plan(bbm.Mask.from_documents(doc), batch=2)
    assert docs.count == 4 and docs.longest == 64 and (docs.batch, docs.tokens) == (2, 16)
    assert docs.first.tolist() == [16, 6, 0, 5, 32]  # longest first, then the end
    assert docs.lengths.flatten().tolist() == [16, 10, 5, 1]
    assert docs.offsets(32).flatten().tolist() == [512, 192, 0, 160, 1024]  # token index x elements per token
    assert docs.lengths.dtype == torch.int32 and docs.offsets(16).dtype == torch.int32


def test_plan_of_a_shared_mask_repeats_its_documents():
    doc = torch.tensor([[0] * 70 + [1] * 30])
    docs = ragged.plan(bbm.Mask.from_documents(doc), batch=3)
    assert docs.count == 8 and docs.longest == 128
    assert docs.first.tolist() == [0, 100, 200, 70, 170, 270, 300, 300, 300]  # two empty documents at the end
    assert docs.lengths.flatten().tolist() == [70] * 3 + [30] * 3 + [0, 0]


def test_plan_orders_documents_longest_first_and_keeps_ties_in_token_order():
    lengths = torch.randint(1, 40, (30,), generator=torch.Generator().manual_seed(11))
    doc = torch.repeat_interleave(torch.arange(30), lengths).view(1, -1)
    docs = ragged.plan(bbm.Mask.from_documents(doc), batch=1)
    starts = torch.cumsum(lengths, 0) - lengths
    expect = sorted(range(30), key=lambda i: (-int(lengths[i]), i))
    assert docs.lengths.flatten()[:30].tolist() == [int(lengths[i]) for i in expect]
    assert docs.first[:30].tolist() == [int(starts[i]) for i in expect]
    assert docs.first[30:].tolist() == [int(lengths.sum())] * 3  # two empty documents, then the end


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


def test_plan_needs_a_causal_document_mask():
    doc = torch.tensor([[0] * 8 + [1] * 8])
    for mask in (bbm.Mask.from_documents(doc, window=4), bbm.Mask.from_documents(doc, causal=False),
                 bbm.Mask.causal(16), bbm.Mask.prefix_lm(16, 4)):
        assert ragged.plan(mask, batch=1) is None


def test_size_classes_and_layouts():
    assert [ragged.size_class(x) for x in (1, 64, 65, 1000, 1024, 1025)] == [64, 64, 128, 1024, 1024, 2048]
    q, k, _ = packed_qkv(2, 4, 2, 10, 8, torch.float32)
    assert ragged.token_major(q) and ragged.token_major(k)
    assert not ragged.token_major(torch.randn(2, 4, 10, 8))  # (B, H, N, D) memory: each head's tokens together
    assert not ragged.available(q)  # on the CPU


def test_ragged_backend_refuses_what_cudnn_does_not_take():
    doc = torch.tensor([[0] * 8 + [1] * 8])
    q, k, v = packed_qkv(1, 2, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="^backend: expected 'ragged' where cuDNN's ragged attention runs"):
        bbm.attention(q, k, v, bbm.Mask.from_documents(doc), backend="ragged")


@needs_gpu
@needs_cudnn_frontend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,kv_heads,shared,packed", [(128, 4, False, True), (64, 2, True, True),
                                                      (128, 1, False, True), (128, 4, True, False)])
def test_ragged_documents_gpu(dtype, d, kv_heads, shared, packed):
    """Per-sample or shared masks, GQA and MQA, lengths that are no multiple of anything, one-token documents, inputs
    in (B, N, H, D) memory or (copied) in (B, H, N, D) memory."""
    gen = torch.Generator().manual_seed(d + kv_heads)
    doc = random_doc_ids(1 if shared else 2, 3001, 40, generator=gen, device=CUDA)
    doc[:, 100:103] = torch.tensor([-1, -2, -3], device=CUDA)  # one-token documents
    doc[:, 500:2100] = -4  # a long one
    mask = bbm.Mask.from_documents(document_starts(doc).cumsum(1))  # one id per run
    q, k, v = packed_qkv(2, 8, kv_heads, 3001, d, dtype, CUDA, packed)
    assert ragged.available(q) and bbm.choose_backend(q, mask) == "ragged"
    check_against_dense(q, k, v, mask, scale=d ** -0.5,
                        run=lambda q, k, v: bbm.attention(q, k, v, mask, scale=d ** -0.5, backend="ragged"))


@needs_gpu
@needs_cudnn_frontend
def test_one_document_per_sample_runs_as_plain_causal_attention_gpu():
    mask = bbm.Mask.from_documents(torch.tensor([[3] * 1000, [5] * 1000], device=CUDA))
    q, k, v = packed_qkv(2, 8, 4, 1000, 128, torch.bfloat16, CUDA)
    assert bbm.choose_backend(q, mask) == "sdpa" and mask.exactly_causal
    check_against_dense(q, k, v, mask, scale=0.1, run=lambda q, k, v: bbm.attention(q, k, v, mask, scale=0.1))


@needs_gpu
@needs_cudnn_frontend
@pytest.mark.filterwarnings("ignore:Synchronization debug mode")
def test_masks_from_host_ids_plan_and_attend_without_a_device_sync_gpu():
    """A training micro-batch's mask from the host's ids: the same ranges and plan as from device ids, and its mask,
    plan and attention (forward and backward, after the first call's graph builds) never wait for the GPU."""
    doc = random_doc_ids(2, 3001, 30, generator=torch.Generator().manual_seed(11))
    q, k, v = packed_qkv(2, 8, 4, 3001, 128, torch.bfloat16, CUDA)
    g = torch.randn_like(q)
    bbm.attention(q, k, v, bbm.Mask.from_documents(doc, device=CUDA)).backward(g)  # builds the graphs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = bbm.Mask.from_documents(doc, check=False, device=CUDA)
        plan = ragged.plan(mask, batch=2)
        out = bbm.attention(q, k, v, mask)
        out.backward(g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_device = bbm.Mask.from_documents(doc.to(CUDA))
    want = ragged.plan(on_device, batch=2)
    assert mask.device.type == CUDA and torch.equal(mask.ranges, on_device.ranges)
    assert (plan.count, plan.longest) == (want.count, want.longest)
    assert torch.equal(plan.first, want.first) and torch.equal(plan.lengths, want.lengths)
    check_against_dense(q, k, v, mask, scale=128 ** -0.5, run=lambda q, k, v: bbm.attention(q, k, v, mask))


@needs_gpu
@needs_cudnn_frontend
def test_ragged_deterministic_backward_gpu():
    doc = random_doc_ids(1, 2000, 9, generator=torch.Generator().manual_seed(3), device=CUDA)
    mask = bbm.Mask.from_documents(doc)
    q, k, v = packed_qkv(1, 8, 2, 2000, 128, torch.bfloat16, CUDA)
    g = torch.randn(1, 8, 2000, 128, device=CUDA, dtype=torch.bfloat16)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = [torch.autograd.grad(bbm.attention(q, k, v, mask, backend="ragged"), (q, k, v), g) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_gpu
@needs_cudnn_frontend
def test_ragged_under_activation_checkpointing_gpu(monkeypatch):
    """The first call of a layout (with its SDPA warm-up) is a checkpointed forward; the recompute runs it again
    on the autograd engine's thread, with the graphs built on the main one: the gradients are those of the plain
    run."""
    monkeypatch.setattr(importlib.import_module("bbm.attention"), "_warm_layouts", set())
    doc = random_doc_ids(1, 2500, 7, generator=torch.Generator().manual_seed(5), device=CUDA)
    mask = bbm.Mask.from_documents(doc)
    q, k, v = packed_qkv(1, 8, 4, 2500, 64, torch.bfloat16, CUDA)
    run = lambda q, k, v: bbm.attention(q, k, v, mask, backend="ragged")
    g = torch.randn(1, 8, 2500, 64, device=CUDA, dtype=torch.bfloat16)
    out = checkpoint(run, q, k, v, use_reentrant=False)
    got = torch.autograd.grad(out, (q, k, v), g)
    plain = run(q, k, v)
    want = torch.autograd.grad(plain, (q, k, v), g)
    assert torch.equal(out, plain)
    for a, b in zip(got, want):  # the backward may accumulate in another order
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2


def test_causal_warm_up_inside_an_activation_checkpoint(monkeypatch):
    """The ragged path's first call for a layout runs SDPA forward and backward once (``sdpa.warm_causal``); inside
    a checkpointed layer that first call is the forward, and the recompute, which runs no warm-up, must find the
    tensors the forward saved."""
    monkeypatch.setattr(sdpa, "_warm_layouts", set())
    mask = bbm.Mask.from_documents(random_doc_ids(1, 48, 3, generator=torch.Generator().manual_seed(1)))

    def layer(q, k, v):
        sdpa.warm_causal(q, k, v, 0.25)
        return bbm.attention(q, k, v, mask, scale=0.25)

    q, k, v = packed_qkv(1, 4, 2, 48, 16, torch.float32)
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
        plan = ragged.plan(bbm.Mask.from_documents(doc), batch=2)
        assert (plan.count, plan.longest) in shapes
    assert all(c * l >= 2 * 3001 and l <= 4096 for c, l in shapes)
