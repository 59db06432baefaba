"""Tile metadata against the dense mask: classification, compacted lists, transposes, bit packing."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bbm
from bbm.masks import EMPTY, FULL, PARTIAL
from bbm.masks.tiles import pack_bits, unpack_bits
from bbm.testing import random_doc_ids


def exact_classes(dense, bm, bn):
    """Loop-level tile classification of a bool (B, H, Nq, Nk) mask (padding ignored)."""
    b, h, n_q, n_k = dense.shape
    mt, nt = -(-n_q // bm), -(-n_k // bn)
    out = torch.empty(b, h, mt, nt, dtype=torch.int8)
    for m in range(mt):
        for n in range(nt):
            t = dense[..., m * bm:(m + 1) * bm, n * bn:(n + 1) * bn].flatten(-2)
            out[..., m, n] = torch.where(t.all(-1), FULL, torch.where(t.any(-1), PARTIAL, EMPTY))
    return out


def check_meta(mask, bm, bn, exact_structured=True):
    meta = mask.tile_meta(bm, bn)
    dense = mask.dense if mask.dense is not None else mask.to_dense()
    want = exact_classes(dense, bm, bn)
    got = meta.classes
    # never skip a tile with an allowed pair, never call a tile full that is not
    assert not ((want != EMPTY) & (got == EMPTY)).any()
    assert not ((want != FULL) & (got == FULL)).any()
    if exact_structured or mask.dense is not None:
        assert torch.equal(got, want)
    # compacted lists: full tiles first, then partial, in order, -1 after; transposes agree
    for count_full, count, idx, cls in ((meta.q_count_full, meta.q_count, meta.q_idx, got),
                                        (meta.k_count_full, meta.k_count, meta.k_idx, got.transpose(-1, -2))):
        for bh in torch.cartesian_prod(torch.arange(cls.shape[0]), torch.arange(cls.shape[1])).tolist():
            for r in range(cls.shape[2]):
                row = cls[bh[0], bh[1], r]
                full = (row == FULL).nonzero().flatten().tolist()
                part = (row == PARTIAL).nonzero().flatten().tolist()
                assert count_full[bh[0], bh[1], r] == len(full)
                assert count[bh[0], bh[1], r] == len(full) + len(part)
                assert idx[bh[0], bh[1], r].tolist() == full + part + [-1] * (row.numel() - len(full) - len(part))
    # every partial tile's element mask, decided from the metadata alone, equals the dense tile
    for b, h, m, n in (got == PARTIAL).nonzero().tolist():
        tile = mask.partial_tile(meta, b, h, m, n)
        want_tile = dense[b, h, m * bm:(m + 1) * bm, n * bn:(n + 1) * bn]
        assert torch.equal(tile[: want_tile.shape[0], : want_tile.shape[1]], want_tile)
    return meta


@pytest.mark.parametrize("bm,bn", [(16, 16), (32, 64), (64, 32)])
@pytest.mark.parametrize("window", [None, 7])
def test_document_metadata(bm, bn, window):
    g = torch.Generator().manual_seed(bm + bn)
    doc = random_doc_ids(3, 203, 7, generator=g)
    check_meta(bbm.Mask.from_documents(doc, window=window), bm, bn)


@given(lengths=st.lists(st.integers(1, 70), min_size=1, max_size=10), bm=st.sampled_from([16, 32]),
       bn=st.sampled_from([32, 64]), causal=st.booleans())
@settings(max_examples=30, deadline=None)
def test_document_metadata_property(lengths, bm, bn, causal):
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    check_meta(bbm.Mask.from_documents(doc, causal=causal), bm, bn)


@pytest.mark.parametrize("make", [
    lambda: bbm.Mask.causal(100, 170),
    lambda: bbm.Mask.causal(130, window=20),
    lambda: bbm.Mask.prefix_lm(150, 45),
    lambda: bbm.Mask.global_tokens(140, 5, 12),
    lambda: bbm.Mask.sliding_window(150, 9, causal=False),
], ids=["causal_nq_ne_nk", "window", "prefix_lm", "global", "bidirectional_window"])
def test_structured_metadata(make):
    check_meta(make(), 32, 32, exact_structured=False)


@pytest.mark.parametrize("shape", [(1, 1, 70, 90), (2, 3, 64, 64), (2, 1, 33, 100)])
def test_dense_metadata(shape):
    allowed = torch.rand(shape) < 0.05
    allowed[..., :20, :40] = True  # some full tiles
    allowed[..., -5:, :] = False  # fully masked rows
    meta = check_meta(bbm.Mask.from_dense(allowed), 16, 32)
    assert meta.tile_bits.shape[0] == int((meta.classes == PARTIAL).sum())  # partial tiles only


def test_tree_metadata():
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, -1, 7, 8])
    check_meta(bbm.Mask.tree(parents, 100), 16, 32)


def test_bit_packing_round_trip():
    tiles = torch.rand(5, 16, 96) < 0.5
    assert torch.equal(unpack_bits(pack_bits(tiles)), tiles)


def test_block_summary_counts():
    mask = bbm.Mask.causal(256)
    s = mask.tile_summary(64, 64)
    assert (s["empty"], s["partial"], s["full"], s["tiles"]) == (6, 4, 6, 16)


def test_heaviest_first_order():
    mask = bbm.Mask.from_documents(random_doc_ids(2, 300, 6, generator=torch.Generator().manual_seed(2)))
    meta = mask.tile_meta(32, 32)
    for order, counts in ((meta.q_order, meta.q_count.flatten()), (meta.k_order, meta.k_count.sum(1).flatten())):
        assert torch.equal(order.sort().values, torch.arange(counts.numel(), dtype=torch.int32))
        assert (counts[order.long()].diff() <= 0).all()
