"""Structured masks on FlashAttention-4's Hopper kernels (``flash_attn.cute``; the optional ``bbm[hopper]`` extra),
driven by bbm's own metadata.

FA4 takes block-sparse lists: per query tile, the key tiles to visit with no mask work ("full") and those whose
elements a mask function decides ("partial"), and the transposed lists for the backward. bbm's tile metadata is
exactly that at 128 x 128 tiles; the mask function (``bbm.attention.fa4_mask``) reads each query's two key intervals
(the mask's ranges) on partial tiles only. FA4 applies no bound check in a full tile, so where Nq or Nk is no
multiple of 128 the last tiles count as partial, and the intervals of the rows past Nq are empty. Masks that are
not ranges (bit-packed tiles) and reordered masks are not this path's. The kernels compile once per dtype, head dim,
GQA ratio and layout of the inputs (seconds to a minute each), not per mask or length.
"""
import functools
import weakref
from dataclasses import dataclass

import torch

from bbm.masks import FULL, PARTIAL, Mask

TILE = 128  # FA4's sm90 tile for head dims 64 and 128, forward and backward
_plans = weakref.WeakKeyDictionary()  # mask -> {batch: Plan}


@functools.cache
def _import():
    """(flash_attn_func, BlockSparseTensorsTorch, ranges_mask) or None where FA4 cannot be imported."""
    try:
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        from bbm.attention.fa4_mask import ranges_mask
    except Exception:  # noqa: BLE001 - a missing or broken optional dependency only turns this path off
        return None
    return flash_attn_func, BlockSparseTensorsTorch, ranges_mask


def installed() -> bool:
    """Whether flash_attn.cute (FlashAttention-4) and its mask function import."""
    return _import() is not None


def available(q: torch.Tensor) -> bool:
    """Whether FA4's Hopper kernels take queries like ``q``: CUDA, compute capability 9.x, fp16/bf16, head dim 64 or
    128, flash_attn.cute importable."""
    return (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (64, 128) and installed())


def supports(q: torch.Tensor, mask) -> bool:
    """Whether this path runs ``mask`` for queries like ``q``: a structured mask (ranges), not reordered."""
    return mask is not None and mask.ranges is not None and mask.perm is None and available(q)


@dataclass(frozen=True)
class Plan:
    forward: object  # BlockSparseTensorsTorch: per query tile, partial and full key tiles
    backward: object  # the same per key tile
    intervals: tuple  # lo0, hi0, lo1, hi1: int32 (B, Nq padded to whole tiles)


def _listed_first(selected: torch.Tensor):
    """(count, index): per row of the last dim, how many are selected, and their columns first (ascending)."""
    count = selected.sum(-1, dtype=torch.int32)
    index = torch.sort((~selected).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return count.contiguous(), index.contiguous()


def plan(mask: Mask, batch: int) -> Plan:
    """The block-sparse lists and intervals of ``mask`` for inputs of ``batch`` samples; kept per mask."""
    plans = _plans.setdefault(mask, {})
    if batch not in plans:
        block_sparse = _import()[1]
        classes = mask.tile_meta(TILE, TILE).classes.clone()  # (Bm, 1, num_m, num_n)
        if mask.n_k % TILE:  # FA4 checks no bound in a full tile
            classes[..., -1] = torch.where(classes[..., -1] == FULL, PARTIAL, classes[..., -1])
        if mask.n_q % TILE:
            classes[..., -1, :] = torch.where(classes[..., -1, :] == FULL, PARTIAL, classes[..., -1, :])
        lists = []
        for cls in (classes, classes.transpose(-1, -2)):
            partial_count, partial_index = _listed_first(cls == PARTIAL)
            full_count, full_index = _listed_first(cls == FULL)
            lists.append(block_sparse(mask_block_cnt=partial_count, mask_block_idx=partial_index,
                                      full_block_cnt=full_count, full_block_idx=full_index, block_size=(TILE, TILE)))
        rows = -(-mask.n_q // TILE) * TILE
        ranges = torch.nn.functional.pad(mask.ranges, (0, rows - mask.n_q))  # rows past Nq: empty intervals
        ranges = ranges.expand(batch, 4, rows)  # the mask function reads the row of each sample
        plans[batch] = Plan(*lists, tuple(ranges[:, j].contiguous() for j in range(4)))
    return plans[batch]


def fa4_attention(q, k, v, mask: Mask, scale: float) -> torch.Tensor:
    """Attention of validated q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) under a structured ``mask``; the output lies in
    (B, N, H, D) memory."""
    flash_attn_func, _, ranges_mask = _import()
    p = plan(mask, q.shape[0])
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, N, H, D): free for a model's projections
    q, k, v = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v))
    out, _ = flash_attn_func(q, k, v, softmax_scale=scale, mask_mod=ranges_mask, aux_tensors=list(p.intervals),
                             block_sparse_tensors=p.forward, block_sparse_tensors_bwd=p.backward)
    return out.transpose(1, 2)
