"""What bbm hands FlashAttention-4 (bbm.attention.fa4), built on the CPU: the variable-length documents and windows
of document masks, read back with FA4's own window rule, and the block-sparse lists and intervals of the others (with
a stand-in for FA4's list type). FA4 itself runs in tests/gpu/test_fa4.py."""
import types

import pytest
import torch

import bbm
from bbm.attention import fa4
from bbm.masks import FULL, PARTIAL
from bbm.masks.documents import document_prefix
from bbm.testing import dense_attention, random_doc_ids
from helpers.attention import qkv


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(fa4, "_import", lambda: types.SimpleNamespace(block_sparse=types.SimpleNamespace))


def listed(count, index):
    return [set(index[r, :count[r]].tolist()) for r in range(count.shape[0])]


@pytest.mark.parametrize("n", [512, 777])
def test_lists_are_the_tile_classes_and_edge_tiles_are_partial(stand_in, n):
    mask = bbm.Mask.global_tokens(n, 30, 300)
    plan = fa4.plan(mask, batch=3)
    assert isinstance(plan, fa4.TileLists)
    classes = mask.tile_meta(128, 128).classes[0, 0]
    for lists, cls in ((plan.forward, classes), (plan.backward, classes.T)):
        assert lists.block_size == (128, 128)
        full = listed(lists.full_block_cnt[0, 0], lists.full_block_idx[0, 0])
        partial = listed(lists.mask_block_cnt[0, 0], lists.mask_block_idx[0, 0])
        for r in range(cls.shape[0]):
            want_full = set((cls[r] == FULL).nonzero().flatten().tolist())
            want_partial = set((cls[r] == PARTIAL).nonzero().flatten().tolist())
            if n % 128:  # the tiles that run past N are never full
                edge = cls.shape[1] - 1
                moved = {edge} & want_full if r != cls.shape[0] - 1 else want_full
                want_full, want_partial = want_full - moved, want_partial | moved
            assert full[r] == want_full and partial[r] == want_partial
    rows = -(-n // 128) * 128
    for j, interval in enumerate(plan.intervals):
        assert interval.shape == (3, rows) and interval.is_contiguous()
        assert torch.equal(interval[:, :n], mask.ranges[:, j].expand(3, n)) and (interval[:, n:] == 0).all()


def test_fa4_refuses_what_it_cannot_run():
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="^backend: expected 'fa4' where FlashAttention-4"):
        bbm.attention(q, q, q, bbm.Mask.causal(8), backend="fa4")


def fa4_allowed(documents, batch, n):
    """bool (batch, n, n) of what FA4 attends for a ``Documents`` plan, by FA4's rule: within each sequence, key j
    for query i iff i - left <= j <= i + right, a side of None unbounded, causal meaning right = 0."""
    left, right = documents.window_size
    right = 0 if documents.causal else right
    cu = documents.cu_seqlens.tolist() if documents.cu_seqlens is not None else [b * n for b in range(batch + 1)]
    allowed = torch.zeros(batch * n, batch * n, dtype=torch.bool)
    for start, end in zip(cu[:-1], cu[1:]):
        i = torch.arange(end - start)[:, None]
        j = torch.arange(end - start)[None]
        after_left = j >= i - left if left is not None else torch.ones_like(i == j)
        before_right = j <= i + right if right is not None else torch.ones_like(i == j)
        allowed[start:end, start:end] = after_left & before_right
    return torch.stack([allowed[b * n:(b + 1) * n, b * n:(b + 1) * n] for b in range(batch)])


@pytest.mark.parametrize("causal,window", [(True, None), (True, 1), (True, 5), (True, 40), (False, None), (False, 3)])
@pytest.mark.parametrize("mask_batch", [1, 2])
def test_documents_run_as_fa4_states_them(causal, window, mask_batch):
    n, batch = 61, 2
    doc = random_doc_ids(mask_batch, n, 5, generator=torch.Generator().manual_seed(n + mask_batch))
    doc[:, 7] = doc[:, 6] + 1  # a one-token document
    doc[:, 8:] += 1
    mask = bbm.Mask.from_documents(doc, causal=causal, window=window)
    plan = fa4.plan(mask, batch)
    assert isinstance(plan, fa4.Documents) and plan.cu_seqlens.dtype == torch.int32
    assert plan.longest == int(mask.document_spans()[1].max())
    assert torch.equal(fa4_allowed(plan, batch, n), mask.to_dense()[:, 0].expand(batch, n, n))


@pytest.mark.parametrize("window", [None, 7])
def test_one_document_per_sample_needs_no_varlen(window):
    mask = bbm.Mask.causal(50, window=window) if window else bbm.Mask.from_documents(torch.zeros(3, 50, dtype=torch.int32))
    plan = fa4.plan(mask, 3)
    assert plan.cu_seqlens is None and mask.one_document_per_sample
    assert torch.equal(fa4_allowed(plan, 3, 50), mask.to_dense()[:, 0].expand(3, 50, 50))


def test_auto_takes_fa4_for_structured_masks(monkeypatch):
    """auto's choice on a Hopper GPU with FA4 installed (stood in for: CUDA tensors and FA4 available)."""
    monkeypatch.setattr(fa4, "available", lambda q: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    q = torch.randn(1, 2, 64, 64)
    doc = random_doc_ids(1, 64, 4, generator=torch.Generator().manual_seed(0))
    for mask in (bbm.Mask.causal(64, window=16), bbm.Mask.from_documents(doc, prefix=document_prefix(doc, 0.5)),
                 bbm.Mask.from_documents(doc, window=16), bbm.Mask.from_documents(doc, causal=False),
                 bbm.Mask.global_tokens(64, 4, 8)):
        assert bbm.choose_backend(q, mask) == "fa4"
    assert bbm.choose_backend(q, bbm.Mask.causal(64)) == "sdpa"
    assert bbm.choose_backend(q, bbm.Mask.from_dense(torch.rand(1, 1, 64, 64) > 0.5, reorder=None)) == "triton"


class _Unwritten(torch.autograd.Function):
    """``t`` whose gradient is NaN outside ``rows``: what FA4 leaves in gradient rows a call does not own."""

    @staticmethod
    def forward(ctx, t, rows):
        ctx.save_for_backward(rows)
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return torch.where(rows[:, None, None], grad, float("nan")), None


def fake_varlen_func(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                     seqused_q=None, seqused_k=None, causal=False, window_size=(None, None), deterministic=False):
    """FA4's variable-length call by its documented rule, in PyTorch: sequence s has the queries from cu_seqlens_q[s]
    (seqused_q[s] of them, else up to the next offset), likewise keys; key j for query i iff i + (Sk - Sq) - left
    <= j <= i + (Sk - Sq) + right. Output rows and gradient rows of no sequence are NaN, as unwritten memory."""
    left, right = window_size
    right = 0 if causal else right
    owned_q = torch.zeros(q.shape[0], dtype=torch.bool)
    owned_k = torch.zeros(k.shape[0], dtype=torch.bool)
    out = torch.full_like(q, float("nan"))
    for s in range(cu_seqlens_q.numel() - 1):
        q0, k0 = int(cu_seqlens_q[s]), int(cu_seqlens_k[s])
        sq = int(seqused_q[s]) if seqused_q is not None else int(cu_seqlens_q[s + 1]) - q0
        sk = int(seqused_k[s]) if seqused_k is not None else int(cu_seqlens_k[s + 1]) - k0
        assert sq <= max_seqlen_q and sk <= max_seqlen_k
        if sq == 0:
            continue
        owned_q[q0:q0 + sq] = True
        owned_k[k0:k0 + sk] = True
        i = torch.arange(sq)[:, None] + (sk - sq)
        j = torch.arange(sk)[None]
        allowed = torch.ones(sq, sk, dtype=torch.bool)
        if left is not None:
            allowed &= j >= i - left
        if right is not None:
            allowed &= j <= i + right
        out = out.index_copy(0, torch.arange(q0, q0 + sq), dense_attention(
            q[None, q0:q0 + sq].transpose(1, 2), k[None, k0:k0 + sk].transpose(1, 2), v[None, k0:k0 + sk].transpose(1, 2),
            allowed[None, None], softmax_scale)[0].transpose(0, 1))
    return out, (owned_q, owned_k)


def fake_fa4(monkeypatch):
    def varlen(q, k, v, **kw):
        # the gradients FA4 leaves unwritten: rows of no sequence (found by a first pass without them)
        _, (owned_q, owned_k) = fake_varlen_func(q.detach()[:, :1, :1], k.detach()[:, :1, :1], v.detach()[:, :1, :1],
                                                 **kw)
        q, k, v = _Unwritten.apply(q, owned_q), _Unwritten.apply(k, owned_k), _Unwritten.apply(v, owned_k)
        return fake_varlen_func(q, k, v, **kw)[0], None
    monkeypatch.setattr(fa4, "_import", lambda: types.SimpleNamespace(varlen_func=varlen))


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("fraction", [0.0, 0.4, 1.0])
def test_prefix_lm_as_two_calls_matches_float64(monkeypatch, window, fraction):
    """The two calls' rows merged and their gradients taken from the rows each owns (what is unwritten is NaN here):
    equal to the dense reference; documents of one token, all prefix and none included."""
    fake_fa4(monkeypatch)
    n, batch = 53, 2
    doc = random_doc_ids(batch, n, 5, generator=torch.Generator().manual_seed(int(10 * fraction) + (window or 0)))
    doc[:, 9] = doc[:, 8] + 1  # a one-token document
    doc[:, 10:] += 1
    prefix = document_prefix(doc, fraction)
    if fraction == 0.4:
        prefix[0, :20] = doc[0, :20] == doc[0, 0]  # one document all prefix
    mask = bbm.Mask.from_documents(doc, window=window, prefix=prefix)
    assert isinstance(fa4.plan(mask, batch), fa4.Prefixes)
    q, k, v = qkv(batch, 4, 2, n, d=8, dtype=torch.float64, seed=3, token_major=True)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    want = dense_attention(*leaves, mask.to_dense(), 0.3)
    g = torch.randn_like(want)
    got = fa4.fa4_attention(q, k, v, mask, 0.3)
    assert torch.allclose(got, want, atol=1e-10)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, leaves, g)):
        assert torch.allclose(a, b, atol=1e-10)
