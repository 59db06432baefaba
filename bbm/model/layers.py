"""Decoder building blocks: RMSNorm, rotary embeddings on per-document positions, SwiGLU."""
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, scale, return in the input dtype
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rope_tables(position_ids, head_dim: int, theta: float, dtype=torch.float32):
    """cos, sin ``(B, 1, N, head_dim)`` in ``dtype`` for integer positions ``(B, N)`` (restarting per document)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=position_ids.device, dtype=dtype) / head_dim)
    angles = position_ids.to(dtype).unsqueeze(-1) * inv_freq  # (B, N, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + D/2) of ``x (B, H, N, D)`` by the position angles (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))
