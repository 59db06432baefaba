"""Reverse Cuthill-McKee: fewer tiles touched, and attention results unchanged (outputs and gradients)."""
import torch

import bbm
from bbm.testing import dense_attention, grads_against_reference, scattered_banded
from helpers.attention import qkv


def test_rcm_gathers_tiles_and_round_trips():
    allowed = scattered_banded(1024, 6, 0)
    plain = bbm.Mask.from_dense(allowed, reorder=None)
    reordered = bbm.Mask.from_dense(allowed, reorder="rcm")
    assert sorted(reordered.perm.tolist()) == list(range(1024))
    assert torch.equal(reordered.to_dense(), allowed)  # user-order view is unchanged
    assert reordered.tiles_touched(64, 64) * 4 < plain.tiles_touched(64, 64)
    assert bbm.Mask.from_dense(allowed, reorder="auto").perm is not None


def test_attention_with_reordering_matches_reference():
    torch.manual_seed(0)
    allowed = scattered_banded(150, 4, 1)
    mask = bbm.Mask.from_dense(allowed, reorder="rcm")
    q, k, v = qkv(2, 2, 1, 150, 150, 32)
    out = bbm.attention(q, k, v, mask)
    ref = dense_attention(q, k, v, allowed)
    assert (out.double() - ref).abs().max() < 2e-5
    for got, want in grads_against_reference(q, k, v, out, ref):
        assert (got.double() - want).abs().max() < 2e-4


def test_auto_keeps_order_when_reordering_does_not_help():
    allowed = torch.ones(1, 1, 64, 64, dtype=torch.bool).tril()
    assert bbm.Mask.from_dense(allowed, reorder="auto").perm is None
