"""bbm.attention on CPU (the reference tile loop) against a float64 dense softmax: outputs and gradients."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bbm
from bbm.testing import dense_attention, grads_against_reference, random_doc_ids
from helpers.attention import qkv


def check(q, k, v, mask, tol=2e-5, **kw):
    out = bbm.attention(q, k, v, mask, **kw)
    allowed = None if mask is None else mask.to_dense()
    ref = dense_attention(q, k, v, allowed, kw.get("scale"))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() < tol
    for got, want in grads_against_reference(q, k, v, out, ref):
        assert torch.isfinite(got).all()
        assert (got.double() - want.double()).abs().max() < 10 * tol
    return out


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("d", [16, 64, 128])
def test_documents_gqa_head_dims(group, d):
    torch.manual_seed(group * 1000 + d)
    n = 97  # not a multiple of any tile
    doc = random_doc_ids(2, n, 5)  # samples with different documents
    check(*qkv(2, 8, 8 // group, n, n, d), bbm.Mask.from_documents(doc))


def test_one_token_documents_and_single_document():
    torch.manual_seed(1)
    n = 70
    one_token = torch.arange(n).unsqueeze(0).repeat(2, 1)
    one_token[1, 30:] = 30  # second sample: 30 one-token docs, then one long doc
    check(*qkv(2, 2, 2, n, n, 32), bbm.Mask.from_documents(one_token))
    check(*qkv(1, 2, 1, n, n, 32), bbm.Mask.from_documents(torch.zeros(1, n, dtype=torch.long)))


def test_full_and_causal_nq_ne_nk():
    torch.manual_seed(2)
    check(*qkv(2, 4, 2, 45, 110, 32), None)
    check(*qkv(2, 4, 2, 45, 110, 32), bbm.Mask.causal(45, 110))
    check(*qkv(1, 2, 2, 80, 80, 16), bbm.Mask.causal(80), scale=0.3)


def test_fully_masked_rows_give_zero_output_and_gradient():
    torch.manual_seed(3)
    allowed = torch.rand(2, 2, 50, 60) < 0.2
    allowed[:, :, 10:25] = False  # rows with no allowed key
    q, k, v = qkv(2, 2, 1, 50, 60, 32)
    out = check(q, k, v, bbm.Mask.from_dense(allowed))
    assert (out[:, :, 10:25] == 0).all()
    (gq,) = torch.autograd.grad(bbm.attention(q, k, v, bbm.Mask.from_dense(allowed)).sum(), (q,))
    assert (gq[:, :, 10:25] == 0).all() and (gq[:, :, :10] != 0).any()


@pytest.mark.parametrize("make", [
    lambda: bbm.Mask.sliding_window(90, 10),
    lambda: bbm.Mask.prefix_lm(90, 33),
    lambda: bbm.Mask.global_tokens(90, 4, 8),
    lambda: bbm.Mask.from_dense(torch.rand(1, 4, 90, 90) < 0.1),  # per-head arbitrary mask
], ids=["window", "prefix_lm", "global", "per_head_dense"])
def test_other_masks(make):
    torch.manual_seed(4)
    check(*qkv(2, 4, 2, 90, 90, 32), make())


def test_tree_mask_nq_ne_nk():
    torch.manual_seed(5)
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 2, -1, 7, 8, 8, 3])
    mask = bbm.Mask.tree(parents, 100)
    check(*qkv(1, 4, 1, 12, 112, 64), mask)


def test_low_precision_inputs():
    torch.manual_seed(6)
    doc = random_doc_ids(1, 70, 4)
    q, k, v = qkv(1, 2, 2, 70, 70, 32, dtype=torch.bfloat16)
    out = bbm.attention(q, k, v, bbm.Mask.from_documents(doc))
    ref = dense_attention(q, k, v, bbm.Mask.from_documents(doc).to_dense())
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() < 2e-2


@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6), causal=st.booleans(),
       window=st.one_of(st.none(), st.integers(1, 30)), group=st.sampled_from([1, 2]))
@settings(max_examples=25, deadline=None)
def test_documents_property(lengths, causal, window, group):
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    n = doc.shape[1]
    check(*qkv(1, 2, 2 // group, n, n, 16), bbm.Mask.from_documents(doc, causal=causal, window=window))


@given(n_q=st.integers(1, 70), n_k=st.integers(1, 70), density=st.floats(0.0, 1.0), heads=st.sampled_from([1, 2]))
@settings(max_examples=12, deadline=None)
def test_random_dense_property(n_q, n_k, density, heads):
    allowed = torch.rand(2, heads, n_q, n_k) < density
    check(*qkv(2, 2, 1, n_q, n_k, 16), bbm.Mask.from_dense(allowed))


@pytest.mark.parametrize("make", [
    lambda: None,
    lambda: bbm.Mask.causal(60),
    lambda: bbm.Mask.from_documents(random_doc_ids(2, 60, 5)),
    lambda: bbm.Mask.from_dense(torch.rand(2, 4, 60, 60) < 0.05),  # sparse: RCM-reordered, empty rows
], ids=["full", "causal", "documents", "sparse_dense"])
def test_forced_sdpa_path_equals_reference(make):
    """backend="sdpa" (what dispatch uses for full / causal masks) gives the reference path's numbers."""
    torch.manual_seed(7)
    mask = make()
    q, k, v = qkv(2, 4, 2, 60, 60, 32)
    a = bbm.attention(q, k, v, mask, backend="sdpa")
    b = bbm.attention(q, k, v, mask, backend="reference")
    assert (a - b).abs().max() < 1e-5
    g = torch.randn_like(a)
    for x, y in zip(torch.autograd.grad(a, (q, k, v), g), torch.autograd.grad(b, (q, k, v), g)):
        assert torch.isfinite(x).all() and (x - y).abs().max() < 1e-4


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nan_in_an_input_propagates_as_in_sdpa(backend):
    """A NaN in q reaches its row's output and the gradients, as in SDPA; rows that never meet it stay finite."""
    q, k, v = qkv(1, 2, 2, 40, 40, 16)
    q.data[0, 0, 3, 0] = float("nan")
    out = bbm.attention(q, k, v, bbm.Mask.causal(40), backend=backend)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(out.isnan(), want.isnan()) and out[0, 0, 3].isnan().all()
    assert torch.isfinite(out[0, 1]).all() and torch.isfinite(out[0, 0, :3]).all()
    out.sum().backward()
    assert q.grad[0, 0, 3].isnan().all() and k.grad[0, 0].isnan().any()


def test_inf_scores_propagate_and_empty_rows_stay_zero():
    q, k, v = qkv(1, 1, 1, 8, 8, 4)
    allowed = torch.ones(8, 8, dtype=torch.bool).tril()
    allowed[5] = False  # a row with no allowed key
    k.data[0, 0, 2, 0] = float("inf")
    out = bbm.attention(q, k, v, bbm.Mask.from_dense(allowed))
    assert (out[0, 0, 5] == 0).all() and out[0, 0, 2:5].isnan().any() and torch.isfinite(out[0, 0, :2]).all()
