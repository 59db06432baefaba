"""cuDNN's ragged path (bbm.attention.ragged) on the GPU against a float64 dense reference, outputs and gradients, by
FlashAttention's rule: causal, windowed, bidirectional and prefix-LM document masks; GQA and MQA; odd lengths,
one-token documents; inputs in (B, N, H, D) or (copied) in (B, H, N, D) memory; no device sync for masks from host
ids; the deterministic backward; activation checkpointing."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import bbm
from bbm.attention import fa4, ragged, sdpa
from bbm.masks.documents import document_starts
from bbm.testing import random_doc_ids
from helpers.attention import check_flash_rule, qkv

CUDA = "cuda"
pytestmark = pytest.mark.skipif(ragged.frontend() is None, reason=ragged.unavailable_reason() or "cudnn-frontend")


def documents(b, n, count, seed):
    """(B, N) ids on the GPU: random documents with three one-token documents and a long one in each row."""
    doc = random_doc_ids(b, n, count, generator=torch.Generator().manual_seed(seed), device=CUDA)
    doc[:, 100:103] = torch.tensor([-1, -2, -3], device=CUDA)
    doc[:, 500:2100] = -4
    return document_starts(doc).cumsum(1)  # one id per run


def random_prefix(doc, seed):
    """A bidirectional prefix at the start of each document, of random length from none to all of it."""
    g = torch.Generator().manual_seed(seed)
    starts = document_starts(doc).cpu()
    first = torch.where(starts, torch.arange(doc.shape[1]), 0).cummax(1).values
    ends = torch.cat([starts[:, 1:], torch.ones(doc.shape[0], 1, dtype=torch.bool)], 1)
    last = torch.where(ends, torch.arange(doc.shape[1]), doc.shape[1]).flip(1).cummin(1).values.flip(1)
    share = torch.rand(doc.shape, generator=g).gather(1, first)  # one draw per document
    share = torch.where(torch.rand(doc.shape, generator=g).gather(1, first) < 0.2, 1.0, share)  # some all prefix
    return ((torch.arange(doc.shape[1]) - first) < (share * (last - first + 1)).floor()).to(CUDA)


def run_ragged(mask, scale):
    return lambda q, k, v: bbm.attention(q, k, v, mask, scale=scale, backend="ragged")


def auto_path(q, mask):
    """What auto runs a document mask on: FlashAttention-4's kernels where installed on a Hopper GPU, else cuDNN."""
    return "fa4" if fa4.supports(q, mask) else "ragged"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,kv_heads,shared,token_major", [(128, 4, False, True), (64, 2, True, True),
                                                           (128, 1, False, True), (128, 4, True, False)])
def test_causal_documents_gpu(dtype, d, kv_heads, shared, token_major):
    mask = bbm.Mask.from_documents(documents(1 if shared else 2, 3001, 40, d + kv_heads))
    q, k, v = qkv(2, 8, kv_heads, 3001, d=d, dtype=dtype, device=CUDA, token_major=token_major)
    assert ragged.available(q) and bbm.choose_backend(q, mask) == auto_path(q, mask)
    check_flash_rule(run_ragged(mask, d ** -0.5), q, k, v, mask, d ** -0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window,d,kv_heads", [(1, 128, 4), (64, 128, 2), (700, 64, 8), (5000, 128, 1)])
def test_windowed_documents_gpu(dtype, window, d, kv_heads):
    """A window of one token (each query sees itself), shorter and longer than most documents, longer than all."""
    mask = bbm.Mask.from_documents(documents(2, 3001, 25, window), window=window)
    q, k, v = qkv(2, 8, kv_heads, 3001, d=d, dtype=dtype, device=CUDA, token_major=True, seed=window)
    assert bbm.choose_backend(q, mask) == auto_path(q, mask)
    check_flash_rule(run_ragged(mask, d ** -0.5), q, k, v, mask, d ** -0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sliding_window_on_one_sequence_gpu(dtype):
    for mask in (bbm.Mask.sliding_window(4099, 1024, device=CUDA), bbm.Mask.causal(4099, window=333, device=CUDA)):
        q, k, v = qkv(1, 16, 4, 4099, d=128, dtype=dtype, device=CUDA, token_major=True)
        assert bbm.choose_backend(q, mask) == auto_path(q, mask)
        check_flash_rule(run_ragged(mask, 0.1), q, k, v, mask, 0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bidirectional_documents_gpu(dtype):
    mask = bbm.Mask.from_documents(documents(2, 2049, 20, 7), causal=False)
    q, k, v = qkv(2, 8, 2, 2049, d=128, dtype=dtype, device=CUDA, token_major=True)
    check_flash_rule(run_ragged(mask, 0.1), q, k, v, mask, 0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,kv_heads,shared", [(128, 4, False), (64, 1, True), (128, 8, False)])
def test_prefix_lm_documents_gpu(dtype, d, kv_heads, shared):
    """Per-document bidirectional prefixes of every length, none and whole documents included: two calls."""
    doc = documents(1 if shared else 2, 3001, 30, d + kv_heads)
    mask = bbm.Mask.from_documents(doc, prefix=random_prefix(doc, d))
    q, k, v = qkv(2, 8, kv_heads, 3001, d=d, dtype=dtype, device=CUDA, token_major=True, seed=kv_heads)
    assert len(ragged.plan(mask, 2)) == 2 and bbm.choose_backend(q, mask) == auto_path(q, mask)
    check_flash_rule(run_ragged(mask, d ** -0.5), q, k, v, mask, d ** -0.5)
    one = bbm.Mask.prefix_lm(3001, 1234, device=CUDA)
    check_flash_rule(run_ragged(one, 0.1), q[:1], k[:1], v[:1], one, 0.1)


def test_one_document_per_sample_runs_as_plain_causal_attention_gpu():
    mask = bbm.Mask.from_documents(torch.tensor([[3] * 1000, [5] * 1000], device=CUDA))
    q, k, v = qkv(2, 8, 4, 1000, d=128, dtype=torch.bfloat16, device=CUDA, token_major=True)
    assert bbm.choose_backend(q, mask) == "sdpa" and mask.exactly_causal
    check_flash_rule(lambda q, k, v: bbm.attention(q, k, v, mask, scale=0.1), q, k, v, mask, 0.1)


@pytest.mark.filterwarnings("ignore:Synchronization debug mode")
def test_masks_from_host_ids_plan_and_attend_without_a_device_sync_gpu():
    """A training micro-batch's mask from the host's ids: the same ranges and plan as from device ids, and its mask,
    plan and attention (forward and backward, after the first call's graph builds) never wait for the GPU."""
    doc = random_doc_ids(2, 3001, 30, generator=torch.Generator().manual_seed(11))
    q, k, v = qkv(2, 8, 4, 3001, d=128, dtype=torch.bfloat16, device=CUDA, token_major=True)
    g = torch.randn_like(q)
    bbm.attention(q, k, v, bbm.Mask.from_documents(doc, device=CUDA), backend="ragged").backward(g)  # builds graphs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = bbm.Mask.from_documents(doc, check=False, device=CUDA)
        (call,) = ragged.plan(mask, batch=2)
        out = bbm.attention(q, k, v, mask, backend="ragged")
        out.backward(g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_device = bbm.Mask.from_documents(doc.to(CUDA))
    (want,) = ragged.plan(on_device, batch=2)
    assert mask.device.type == CUDA and torch.equal(mask.ranges, on_device.ranges)
    assert (call.count, call.longest_q) == (want.count, want.longest_q)
    assert torch.equal(call.q_first, want.q_first) and torch.equal(call.len_q, want.len_q)
    check_flash_rule(lambda q, k, v: bbm.attention(q, k, v, mask, backend="ragged"), q, k, v, mask, 128 ** -0.5)


@pytest.mark.parametrize("prefixed", [False, True])
def test_ragged_deterministic_backward_gpu(prefixed):
    doc = random_doc_ids(1, 2000, 9, generator=torch.Generator().manual_seed(3), device=CUDA)
    mask = bbm.Mask.from_documents(doc, prefix=random_prefix(doc, 3) if prefixed else None)
    q, k, v = qkv(1, 8, 2, 2000, d=128, dtype=torch.bfloat16, device=CUDA, token_major=True)
    g = torch.randn(1, 8, 2000, 128, device=CUDA, dtype=torch.bfloat16)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = [torch.autograd.grad(bbm.attention(q, k, v, mask, backend="ragged"), (q, k, v), g) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_ragged_under_activation_checkpointing_gpu(monkeypatch):
    """The first call of a layout (with its SDPA warm-up) is a checkpointed forward; the recompute runs it again
    on the autograd engine's thread, with the graphs built on the main one: the gradients are those of the plain
    run."""
    monkeypatch.setattr(sdpa, "_warm_layouts", set())
    doc = random_doc_ids(1, 2500, 7, generator=torch.Generator().manual_seed(5), device=CUDA)
    mask = bbm.Mask.from_documents(doc)
    q, k, v = qkv(1, 8, 4, 2500, d=64, dtype=torch.bfloat16, device=CUDA, token_major=True)
    run = lambda q, k, v: bbm.attention(q, k, v, mask, backend="ragged")
    g = torch.randn(1, 8, 2500, 64, device=CUDA, dtype=torch.bfloat16)
    out = checkpoint(run, q, k, v, use_reentrant=False)
    got = torch.autograd.grad(out, (q, k, v), g)
    plain = run(q, k, v)
    want = torch.autograd.grad(plain, (q, k, v), g)
    assert torch.equal(out, plain)
    for a, b in zip(got, want):  # the backward may accumulate in another order
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
