"""Inputs and checks of the attention tests: fresh random q, k, v; a path against a float64 dense reference,
outputs and gradients, with fixed tolerances (CPU) or FlashAttention's rule (GPU); the tile metadata of the GPU
build against the CPU build."""
import torch

from bbm.masks.tiles import ranges_meta
from bbm.attention.triton import Config, flash_attention
from bbm.testing import dense_attention

# mask tiles 32 x 32 with 16-wide blocks inside: several blocks per tile on tiny shapes
SUB_TILED = Config(32, 32, 16, 16, 4, 1, 16, 16, 4, 1)
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
META_FIELDS = ("classes", "q_count_full", "q_count", "q_idx", "k_count_full", "k_count", "k_idx", "q_order",
               "k_order")


def qkv(b=1, hq=4, hkv=2, n_q=16, n_k=None, d=8, dtype=torch.float32, device="cpu", seed=None, token_major=False,
        requires_grad=True):
    """Random q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D), from ``seed`` or torch's global generator; ``token_major``:
    in (B, N, H, D) memory, as a model's projections give them."""
    g = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    n_k = n_q if n_k is None else n_k

    def make(h, n):
        shape = (b, n, h, d) if token_major else (b, h, n, d)
        t = torch.randn(shape, generator=g, device=device).to(dtype)
        return (t.transpose(1, 2) if token_major else t).requires_grad_(requires_grad)

    return make(hq, n_q), make(hkv, n_k), make(hkv, n_k)


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-12)).item()


def _outputs_and_grads(run, q, k, v, g):
    out = run(q, k, v)
    return [out, *torch.autograd.grad(out, (q, k, v), g.to(out.dtype))]


def check_against_dense(q, k, v, mask, scale=0.3, config=None, run=None):
    """Outputs and dq, dk, dv of ``run`` (default: the Triton kernels) within fixed relative tolerances of float64;
    returns them."""
    run = run or (lambda q, k, v: flash_attention(q, k, v, mask, scale, config))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dense_attention(*leaves, mask.to_dense(), scale)
    g = torch.randn_like(ref)
    got = _outputs_and_grads(run, q, k, v, g)
    want = [ref, *torch.autograd.grad(ref, leaves, g)]
    tol = TOL[q.dtype]
    for name, a, w, t in zip(("out", "dq", "dk", "dv"), got, want, (tol, 2 * tol, 2 * tol, 2 * tol)):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, w) < t, (name, rel_err(a, w))
    return got[0], got[1:]


def low_precision_attention(q, k, v, allowed, scale):
    """The same math as ``dense_attention`` done by PyTorch in the inputs' precision: scores and products in it,
    the softmax in float32 (as FlashAttention's tests do); rows with no allowed key give 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    return p @ v


def check_flash_rule(run, q, k, v, mask, scale):
    """FlashAttention's rule on the GPU: the largest error of ``run`` against float64, for the output and each
    gradient, is at most twice that of the same math done by PyTorch in the inputs' precision, plus a constant of
    the size of one rounding of the reference. Fully masked rows: zero output and gradients. Returns the
    output and the gradients."""
    allowed = mask.to_dense()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dense_attention(*leaves, allowed, scale)
    g = torch.randn_like(ref)
    want = [ref, *torch.autograd.grad(ref, leaves, g)]
    low = [t.detach().requires_grad_() for t in (q, k, v)]
    baseline = _outputs_and_grads(lambda *x: low_precision_attention(*x, allowed, scale), *low, g)
    got = _outputs_and_grads(run, q, k, v, g)
    for name, a, base, w in zip(("out", "dq", "dk", "dv"), got, baseline, want):
        assert torch.isfinite(a).all(), name
        atol = ((w.float() + 0.3 - 0.3) - w.float()).abs().max().item()  # a float32 rounding of the reference
        err, base_err = (a.double() - w).abs().max().item(), (base.double() - w).abs().max().item()
        assert err <= 2 * base_err + atol + 1e-5, (name, err, base_err)
    empty = ~allowed.any(-1)  # (Bm, Hm, Nq)
    if empty.any():
        rows = empty.expand(q.shape[0], q.shape[1], -1)
        assert (got[0][rows] == 0).all() and (got[1][rows] == 0).all()
    return got[0], got[1:]


def assert_tiles_match_cpu(mask, tile_m: int, tile_n: int):
    """The Triton build of ``mask``'s tile lists (on its device, or in the interpreter) equals the PyTorch build."""
    from bbm.masks.tiles_gpu import ranges_lists

    want = ranges_meta(mask.ranges.cpu(), mask.n_k, tile_m, tile_n)
    got = ranges_lists(mask.ranges, mask.n_k, tile_m, tile_n)
    assert len(got) == len(META_FIELDS)
    for name, value in zip(META_FIELDS, got):
        assert torch.equal(getattr(want, name).to(value.dtype), value.cpu()), name
