"""The GPU metadata kernels against the PyTorch build, the heaviest-first order, torch.compile without
graph breaks, activation checkpointing."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import bbm
from bbm.masks.tiles_gpu import ranges_lists
from bbm.masks.tiles import ranges_meta
from bbm.testing import random_doc_ids

NAMES = ("classes", "q_count_full", "q_count", "q_idx", "k_count_full", "k_count", "k_idx", "q_order", "k_order")


@pytest.mark.parametrize("bm,bn", [(16, 16), (32, 64), (64, 32)])
def test_triton_metadata_equals_pytorch(bm, bn):
    g = torch.Generator().manual_seed(bm * bn)
    masks = [bbm.Mask.from_documents(random_doc_ids(2, 203, 9, generator=g)),
             bbm.Mask.from_documents(random_doc_ids(1, 150, 4, generator=g), window=13),
             bbm.Mask.causal(100, 170), bbm.Mask.global_tokens(140, 5, 12), bbm.Mask.prefix_lm(150, 45),
             bbm.Mask.from_documents(random_doc_ids(2, 1100, 30, generator=g))]  # > 64 tiles to rank: several programs
    for mask in masks:
        want = ranges_meta(mask.ranges, mask.n_k, bm, bn)
        got = ranges_lists(mask.ranges, mask.n_k, bm, bn)
        assert len(got) == len(NAMES)
        for name, value in zip(NAMES, got):
            assert torch.equal(getattr(want, name).to(value.dtype), value), name


def test_heaviest_first_order():
    mask = bbm.Mask.from_documents(random_doc_ids(2, 300, 6, generator=torch.Generator().manual_seed(2)))
    meta = mask.tile_meta(32, 32)
    for order, counts in ((meta.q_order, meta.q_count.flatten()), (meta.k_order, meta.k_count.sum(1).flatten())):
        assert torch.equal(order.sort().values, torch.arange(counts.numel(), dtype=torch.int32))
        assert (counts[order.long()].diff() <= 0).all()


def _grads(f, q, k, v):
    out = f(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))


def test_compile_without_graph_break_and_checkpointing():
    mask = bbm.Mask.from_documents(random_doc_ids(1, 40, 3, generator=torch.Generator().manual_seed(0)))
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return bbm.attention(q, k, v, mask, backend="triton")

    want = _grads(f, q, k, v)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)  # fails on any graph break
    for got in (_grads(compiled, q, k, v), _grads(lambda *a: checkpoint(f, *a, use_reentrant=False), q, k, v)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
