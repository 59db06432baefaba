"""The block-sparse lists and intervals bbm hands FlashAttention-4 (bbm.attention.fa4), built on the CPU with a
stand-in for FA4's list type (FA4 itself runs in tests/gpu/test_fa4.py)."""
import types

import pytest
import torch

import bbm
from bbm.attention import fa4
from bbm.masks import FULL, PARTIAL
from bbm.testing import random_doc_ids


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(fa4, "_import", lambda: (None, types.SimpleNamespace, None))


def listed(count, index):
    return [set(index[r, :count[r]].tolist()) for r in range(count.shape[0])]


@pytest.mark.parametrize("n", [512, 777])
def test_lists_are_the_tile_classes_and_edge_tiles_are_partial(stand_in, n):
    mask = bbm.Mask.from_documents(random_doc_ids(1, n, 6, generator=torch.Generator().manual_seed(n)), window=300)
    plan = fa4.plan(mask, batch=3)
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
