"""Decoder building blocks: RMSNorm, rotary embeddings on per-document positions, SwiGLU.

Their element-wise math is written once as plain functions. With ``fused=True`` (the default) a CUDA tensor
runs them through ``torch.compile``, one fused kernel per function and direction instead of a chain of
memory-bound ones (on the 350M preset the chain took about a third of the step); CPU tensors, and code that
is itself being compiled, call them as they are.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def pointwise(fn):
    """``fn`` compiled for CUDA inputs (one graph per shape, shared by every caller), eager otherwise; one
    wrapper per function."""
    compiled = torch.compile(fn, dynamic=False)

    @functools.wraps(fn)
    def call(x, *args):
        if x.is_cuda and not torch.compiler.is_compiling():
            return compiled(x, *args)
        return fn(x, *args)

    return call


def rms_norm(x, weight, eps: float):
    # normalise in fp32, scale, return in the input dtype
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + D/2) of ``x (B, H, N, D)`` by the position angles (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).to(x.dtype)


def silu_gate(gate, up):
    return F.silu(gate) * up


def maybe_fused(fn, fused: bool):
    return pointwise(fn) if fused else fn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fused: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.norm = maybe_fused(rms_norm, fused)

    def forward(self, x):
        return self.norm(x, self.weight, self.eps)


def rope_tables(position_ids, head_dim: int, theta: float, dtype=torch.float32):
    """cos, sin ``(B, 1, N, head_dim)`` in ``dtype`` for integer positions ``(B, N)`` (restarting per document)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=position_ids.device, dtype=dtype) / head_dim)
    angles = position_ids.to(dtype).unsqueeze(-1) * inv_freq  # (B, N, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return angles.cos(), angles.sin()


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, fused: bool = True):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.act = maybe_fused(silu_gate, fused)

    def forward(self, x):
        return self.down(self.act(self.gate(x), self.up(x)))
