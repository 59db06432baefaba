"""The Triton path under torch.compile without graph breaks and under activation checkpointing (CPU, Triton's
interpreter)."""
import torch
from torch.utils.checkpoint import checkpoint

import bbm
from bbm.testing import random_doc_ids


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
