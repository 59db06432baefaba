"""Shared checks for the kernel tests: run bbm's Triton path and a float64 dense reference on fresh
random data, compare outputs and gradients."""
import torch

from bbm.attention.triton import Config, flash_attention
from bbm.testing import dense_attention

# metadata tiles 32 x 32 with 16-wide blocks inside: several sub-blocks per tile on tiny shapes
SUB_TILED = Config(32, 32, 16, 16, 4, 1, 16, 16, 4, 1)
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def qkv(b, hq, hkv, n_q, n_k, d, dtype, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    make = lambda h, n: torch.randn(b, h, n, d, generator=g, device=device).to(dtype).requires_grad_()
    return make(hq, n_q), make(hkv, n_k), make(hkv, n_k)


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-12)).item()


def check_against_dense(q, k, v, mask, scale=0.3, config=None, run=None):
    """Outputs and dq, dk, dv of `run` (default: the Triton kernels) vs float64; returns them."""
    run = run or (lambda q, k, v: flash_attention(q, k, v, mask, scale, config))
    out = run(q, k, v)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dense_attention(*leaves, mask.to_dense(), scale)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
    want = torch.autograd.grad(ref, leaves, g)
    tol = TOL[q.dtype]
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < tol, ("out", rel_err(out, ref))
    for name, got, w in zip(("dq", "dk", "dv"), grads, want):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, w) < tol * 2, (name, rel_err(got, w))
    return out, grads
