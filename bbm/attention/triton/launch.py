"""Launchers: tensors and a Config in, kernel launches out (no autograd, no tuning)."""
import torch
import triton

from bbm.attention.triton.backward import bwd_kernel, delta_kernel
from bbm.attention.triton.forward import fwd_kernel
from bbm.attention.triton.tiles import BITS, RANGES
from bbm.attention.triton.tuning import interpreting

LOG2E = 1.4426950408889634


class Lists:
    """The tile metadata tensors a launch needs (see bbm.masks.tiles for their layout)."""

    def __init__(self, q_count_full, q_count, q_idx, q_order, k_count_full, k_count, k_idx, k_order,
                 ranges, tile_bits, bits_index):
        self.q_count_full, self.q_count, self.q_idx, self.q_order = q_count_full, q_count, q_idx, q_order
        self.k_count_full, self.k_count, self.k_idx, self.k_order = k_count_full, k_count, k_idx, k_order
        self.ranges, self.tile_bits, self.bits_index = ranges, tile_bits, bits_index
        self.kind = (RANGES if ranges is not None else BITS).value
        self.batch, self.heads, self.num_m, self.num_n = q_idx.shape
        self.q_items, self.k_items = self.batch * self.heads * self.num_m, self.batch * self.num_n
        dummy = q_count  # a valid pointer for the representation the kernels will not read
        self.ranges_arg = ranges if ranges is not None else dummy
        self.bits_arg = tile_bits if tile_bits is not None and tile_bits.numel() else dummy
        self.bits_index_arg = bits_index if bits_index is not None else dummy


def _static(q, k, cfg_m, cfg_n, d_pad):
    """Constexpr flags shared by every launch."""
    n_q, n_k, d = q.shape[2], k.shape[2], q.shape[3]
    return dict(EVEN_M=n_q % cfg_m == 0, EVEN_N=n_k % cfg_n == 0, EVEN_D=d == d_pad,
                UPCAST=interpreting() and q.dtype != torch.float32,
                PREC="ieee" if q.dtype == torch.float32 else "tf32", HEAD_DIM=d_pad)


def head_pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def forward(q, k, v, lists: Lists, scale: float, cfg):
    """-> out like q, lse float32 (B, Hq, Nq) in base 2 (+inf for rows with no allowed key)."""
    b, hq, n_q, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, n_q, dtype=torch.float32, device=q.device)
    n_items = lists.q_items
    replicas = (b // lists.batch) * (hq // lists.heads)
    grid = (replicas * n_items * (cfg.tile_m // cfg.block_m),)
    fwd_kernel[grid](
        q, k, v, out, lse, lists.q_count_full, lists.q_count, lists.q_idx, lists.q_order,
        lists.ranges_arg, lists.bits_arg, lists.bits_index_arg,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        n_q, k.shape[2], d, lists.heads, lists.num_m, lists.num_n, n_items, hq, hq // k.shape[1],
        scale * LOG2E, KIND=lists.kind, TILE_M=cfg.tile_m, TILE_N=cfg.tile_n, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
        **_static(q, k, cfg.tile_m, cfg.tile_n, head_pad(d)))
    return out, lse


def backward(do, q, k, v, out, lse, lists: Lists, scale: float, cfg):
    """-> dq, dk, dv with the strides of q, k, v (deterministic: no atomics)."""
    b, hq, n_q, d = q.shape
    hkv = k.shape[1]
    delta = torch.empty_like(lse)
    d_pad = head_pad(d)
    delta_kernel[(triton.cdiv(n_q, 64), b * hq)](out, do, delta, *out.stride()[:3], *do.stride()[:3], hq, n_q, d,
                                                 BLOCK=64, HEAD_DIM=d_pad)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    n_q_items, n_k_items = lists.q_items, lists.k_items
    n_dkdv = (b // lists.batch) * hkv * n_k_items * (cfg.tile_n // cfg.big)
    n_dq = (b // lists.batch) * (hq // lists.heads) * n_q_items * (cfg.tile_m // cfg.big)
    bwd_kernel[(n_dkdv + n_dq,)](
        q, k, v, do, lse, delta, dq, dk, dv, lists.q_count_full, lists.q_count, lists.q_idx, lists.q_order,
        lists.k_count_full, lists.k_count, lists.k_idx, lists.k_order, lists.ranges_arg, lists.bits_arg,
        lists.bits_index_arg, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        n_q, k.shape[2], d, lists.heads, lists.num_m, lists.num_n, n_q_items, n_k_items, n_dkdv, hq, hq // hkv,
        scale * LOG2E, scale, KIND=lists.kind, TILE_M=cfg.tile_m, TILE_N=cfg.tile_n, BIG=cfg.big, SMALL=cfg.small,
        num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages, **_static(q, k, cfg.tile_m, cfg.tile_n, d_pad))
    return dq, dk, dv

