"""Exact PyTorch attention that walks the same tile metadata as the Triton kernels.

Online softmax over each query tile's compacted key-tile list: empty tiles are never visited, full tiles
get no element mask, partial tiles get the mask decided from the metadata alone (ranges or bits).
Autograd differentiates it. It is the CPU path and the yardstick for the kernels.
"""
import torch

from bbm.masks import Mask


def _tile_attention(q_tile, k, v, keys, n_full, mask: Mask, meta, b, h, m, scale):
    """softmax(q_tile k^T) v over the listed key tiles, online. q_tile (..., rows, D) in fp32+."""
    rows = q_tile.shape[-2]
    bn = meta.tile_n
    out = torch.zeros(*q_tile.shape[:-1], v.shape[-1], dtype=q_tile.dtype, device=q_tile.device)
    row_max = torch.full((*q_tile.shape[:-1], 1), float("-inf"), dtype=q_tile.dtype, device=q_tile.device)
    row_sum = torch.zeros_like(row_max)
    has_key = torch.zeros(rows, 1, dtype=torch.bool, device=q_tile.device)  # rows that met an allowed key
    for i, n in enumerate(keys):
        cols = slice(n * bn, min((n + 1) * bn, mask.n_k))
        s = (q_tile @ k[..., cols, :].transpose(-1, -2)) * scale  # scores of this tile
        if i >= n_full:  # partial tile: element mask from the metadata
            allowed = mask.partial_tile(meta, b, h, m, n)[:rows, : s.shape[-1]]
            s = s.masked_fill(~allowed, float("-inf"))
            has_key = has_key | allowed.any(-1, keepdim=True)
        else:
            has_key = torch.ones_like(has_key)
        new_max = torch.maximum(row_max, s.detach().amax(-1, keepdim=True))  # any shift is exact
        safe_max = torch.where(new_max == float("-inf"), torch.zeros_like(new_max), new_max)  # rows seen nothing yet
        p = torch.exp(s - safe_max)
        correction = torch.exp(row_max - safe_max)
        row_sum = row_sum * correction + p.sum(-1, keepdim=True)
        out = out * correction + p @ v[..., cols, :]
        row_max = new_max
    # rows with no allowed key: zero output, zero gradient; NaN and Inf in the inputs propagate as in SDPA
    return torch.where(has_key, out / torch.where(has_key, row_sum, torch.ones_like(row_sum)), 0.0)


def reference_attention(q, k, v, mask: Mask, scale: float, tile_m: int = 64, tile_n: int = 64):
    """q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) already validated; mask in the tensors' token order."""
    b, hq, n_q, _ = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    compute = torch.promote_types(q.dtype, torch.float32)
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    meta = mask.tile_meta(tile_m, tile_n)
    q_count_full, q_count, q_idx = (t.tolist() for t in (meta.q_count_full, meta.q_count, meta.q_idx))
    per_batch = []
    for mb in range(mask.batch):  # one group per (batch, head) that the mask tells apart
        bsl = slice(None) if mask.batch == 1 else slice(mb, mb + 1)
        per_head = []
        for mh in range(mask.heads):
            if mask.heads == 1:  # every head: group query heads by their shared kv head (no repeat)
                qs = qc[bsl].unflatten(1, (hkv, group))
                ks, vs = kc[bsl].unsqueeze(2), vc[bsl].unsqueeze(2)
            else:
                qs = qc[bsl, mh:mh + 1].unsqueeze(2)
                ks, vs = (t[bsl, mh // group:mh // group + 1].unsqueeze(2) for t in (kc, vc))
            tiles = []
            for m in range(meta.num_m):
                rows = slice(m * tile_m, min((m + 1) * tile_m, n_q))
                count = q_count[mb][mh][m]
                tiles.append(_tile_attention(qs[..., rows, :], ks, vs, q_idx[mb][mh][m][:count],
                                             q_count_full[mb][mh][m], mask, meta, mb, mh, m, scale))
            per_head.append(torch.cat(tiles, dim=-2).flatten(1, 2))
        per_batch.append(torch.cat(per_head, dim=1))
    out = torch.cat(per_batch, dim=0)
    if not out.requires_grad and any(t.requires_grad for t in (q, k, v)):
        out = _NoKeys.apply(out, q, k, v)  # every tile empty: still differentiable, with zero gradients
    return out


class _NoKeys(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, q, k, v):
        ctx.shapes = [(t.shape, t.dtype) for t in (q, k, v)]
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        return (None, *(grad.new_zeros(shape, dtype=dtype) for shape, dtype in ctx.shapes))
