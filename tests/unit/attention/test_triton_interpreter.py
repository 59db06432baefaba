"""Triton forward/backward under the interpreter vs a float64 dense reference: fp32 and fp16, awkward
shapes, every mask family, GQA, per-sample and per-head masks."""
import pytest
import torch

import bbm
from bbm.attention.triton import Config
from bbm.testing import random_doc_ids
from helpers.attention import SUB_TILED, check_against_dense, qkv

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_documents_per_sample_gqa(dtype):
    """B=2 with different documents per sample, GQA 4:2, N=75 (not a multiple of any tile)."""
    g = torch.Generator().manual_seed(1)
    mask = bbm.Mask.from_documents(random_doc_ids(2, 75, 5, generator=g))
    check_against_dense(*qkv(2, 4, 2, 75, 75, 32, dtype), mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_documents_sub_tiled(dtype):
    """Blocks smaller than the metadata tiles, N=70 so the last key tile is full and runs past Nk."""
    doc = torch.tensor([[0] * 20 + [1] * 50])
    mask = bbm.Mask.from_documents(doc, causal=False)
    check_against_dense(*qkv(1, 2, 1, 70, 70, 32, dtype), mask, config=SUB_TILED)


def test_shared_mask_over_batch_and_one_token_docs():
    """A mask of batch 1 shared by B=2; many one-token documents; head dim 40 (padded to 64)."""
    doc = torch.tensor([[0, 1, 2, 3, 4] + [5] * 30 + list(range(6, 26)) + [26] * 20])
    mask = bbm.Mask.from_documents(doc)
    check_against_dense(*qkv(2, 2, 2, doc.shape[1], doc.shape[1], 40, torch.float32), mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_nq_ne_nk(dtype):
    """Queries are the last 40 of 90 positions; MQA (one K/V head)."""
    check_against_dense(*qkv(1, 3, 1, 40, 90, 32, dtype), bbm.Mask.causal(40, 90), config=SUB_TILED)


def test_window_and_global_tokens():
    check_against_dense(*qkv(1, 2, 2, 80, 80, 16, torch.float32), bbm.Mask.causal(80, window=9))
    check_against_dense(*qkv(1, 2, 2, 80, 80, 16, torch.float32), bbm.Mask.global_tokens(80, 3, 6))


def test_fully_masked_rows_output_zero_and_no_gradient():
    """Rows with no allowed key (structured and dense) give exactly 0 output and 0 gradient, never NaN."""
    lo = torch.tensor([[0, 0, 5, 0, 0, 9] * 8])
    hi = torch.tensor([[3, 0, 20, 48, 0, 40] * 8])  # every 2nd and 5th row of 6 sees nothing
    dense = torch.rand(1, 2, 48, 48) < 0.3
    dense[:, :, 10:20] = False
    for mask in (bbm.Mask.from_ranges(lo, hi, n_k=48), bbm.Mask.from_dense(dense)):
        q, k, v = qkv(1, 2, 1, 48, 48, 16, torch.float32)
        out, (dq, _, _) = check_against_dense(q, k, v, mask)
        empty = ~mask.to_dense().expand(1, 2, 48, 48).any(-1)
        assert empty.any()
        assert (out[empty] == 0).all() and (dq[empty] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_bits_per_head(dtype):
    """An arbitrary mask that differs per query head (Hm = Hq) and per sample, read from packed bits."""
    allowed = torch.rand(2, 2, 60, 70, generator=torch.Generator().manual_seed(3)) < 0.2
    allowed[..., :32, :32] = True  # some full tiles
    check_against_dense(*qkv(2, 2, 1, 60, 70, 32, dtype), bbm.Mask.from_dense(allowed), config=SUB_TILED)


def test_tree_mask_after_prefix():
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, -1, 7, 8, 8, 10, -1, 12, 13, 14, 15, 15, 1])
    mask = bbm.Mask.tree(parents, 45)  # Nq = 19 nodes, Nk = 45 + 19
    check_against_dense(*qkv(1, 2, 2, 19, 64, 32, torch.float16), mask)


def test_rcm_reordered_mask_through_attention():
    """bbm.attention applies and undoes the permutation around the Triton path."""
    n = 64
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    band = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() < 4
    mask = bbm.Mask.from_dense(band[perm][:, perm][None, None], reorder="rcm")
    assert mask.perm is not None
    check_against_dense(*qkv(1, 2, 1, n, n, 16, torch.float32), mask,
                        run=lambda q, k, v: bbm.attention(q, k, v, mask, scale=0.3, backend="triton"))


def test_paths_agree():
    """backend="triton" and the reference path give the same numbers on CPU."""
    g = torch.Generator().manual_seed(7)
    mask = bbm.Mask.from_documents(random_doc_ids(1, 50, 3, generator=g))
    q, k, v = qkv(1, 2, 1, 50, 50, 16, torch.float32)
    a = bbm.attention(q, k, v, mask, backend="triton")
    b = bbm.attention(q, k, v, mask, backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert bbm.choose_backend(q, mask) == "reference"


def test_bad_config():
    with pytest.raises(ValueError, match="config.block_m"):
        Config(32, 32, 48, 16, 4, 1, 16, 16, 4, 1).check()
