"""Decoder building blocks: RMSNorm, rotary embeddings on per-document positions, SwiGLU, and ``compiled``.

Their element-wise math is written once as plain functions. ``compiled(fn)`` runs ``fn`` through
``torch.compile`` when its tensors are on CUDA: the decoder compiles each block's work before and after its
attention call, the final norm and the loss, so a chain of memory-bound element-wise kernels becomes a few
fused ones. CPU tensors, and code that is itself being compiled, call the plain functions.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def compiled(fn):
    """``fn`` compiled for CUDA inputs (one graph per shape, shared by every caller), plain otherwise; the
    device is that of its first tensor argument. One wrapper per function."""
    graph = torch.compile(fn, dynamic=False)

    @functools.wraps(fn)
    def call(*args):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        if first.is_cuda and not torch.compiler.is_compiling():
            return graph(*args)
        return fn(*args)

    return call


def maybe_compiled(fn, fused: bool):
    return compiled(fn) if fused else fn


def rms_norm(x, weight, eps: float):
    # normalise in fp32, scale, return in the input dtype
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + D/2) of ``x (B, N, H, D)`` by the position angles ``(B, N, 1, D)`` (rotate-half
    convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).to(x.dtype)


def silu_gate(gate, up):
    return F.silu(gate) * up


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fused: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.norm = maybe_compiled(rms_norm, fused)

    def forward(self, x):
        return self.norm(x, self.weight, self.eps)


def rope_tables(position_ids, head_dim: int, theta: float, dtype=torch.float32):
    """cos, sin ``(B, N, 1, head_dim)`` in ``dtype`` for integer positions ``(B, N)`` (restarting per document)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=position_ids.device, dtype=dtype) / head_dim)
    angles = position_ids.to(dtype).unsqueeze(-1) * inv_freq  # (B, N, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)
    return angles.cos(), angles.sin()


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # one matmul for the gate and the up projection
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(silu_gate(*self.gate_up(x).chunk(2, dim=-1)))
