"""Tile metadata: classify each (query tile, key tile) as empty / partial / full and compact the lists.

Everything here is vectorised tensor code on the mask's device: no Python loop over tokens or tiles.

Layout of :class:`TileMeta` (``Bm`` is 1 or the batch, ``Hm`` is 1 or the number of query heads):

* ``q_count_full``, ``q_count``: int32 ``(Bm, Hm, num_m)``. Query tile ``m`` visits the key tiles
  ``q_idx[b, h, m, :q_count[b, h, m]]``; the first ``q_count_full`` of them are full (no element mask),
  the rest partial. Entries past ``q_count`` are -1.
* ``k_count_full``, ``k_count``, ``k_idx``: the transpose, per key tile, listing query tiles (backward).
* Partial tiles decide each element either from ``ranges`` (structured masks; int32 ``(Bm, 4, Nq)``
  holding ``lo0, hi0, lo1, hi1``: key ``j`` is allowed for query ``i`` iff ``lo0 <= j < hi0`` or
  ``lo1 <= j < hi1``) or from bit-packed tiles (arbitrary masks): ``tile_bits`` int32
  ``(P, tile_m, tile_n // 32)`` for the ``P`` partial tiles only, and ``bits_index`` int32
  ``(Bm, Hm, num_m, num_n)`` giving each partial tile's row in ``tile_bits`` (-1 elsewhere). Element
  ``(r, c)`` of a tile is bit ``c % 32`` of word ``c // 32`` of row ``r``.

* ``q_order``: int32 ``(Bm * Hm * num_m,)``, the linear indices of ``(b, h, m)`` by decreasing
  ``q_count`` (ties in index order); ``k_order``: int32 ``(Bm * num_n,)``, the linear indices of
  ``(b, n)`` by decreasing ``k_count`` summed over the mask's heads. Kernels start the heaviest tiles
  first so the light ones fill the tail.

On CUDA, structured masks are classified, compacted and ordered by three Triton launches
(``bbm.masks.tiles_gpu``); the result is identical to the PyTorch code below, which runs elsewhere.

"Full" means every in-bounds pair of the tile is allowed; keys past ``Nk`` in the last key tile are never
allowed and kernels bound-check them separately.
"""
from dataclasses import dataclass
from typing import Optional

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class TileMeta:
    tile_m: int
    tile_n: int
    num_m: int
    num_n: int
    classes: torch.Tensor  # int8 (Bm, Hm, num_m, num_n): EMPTY / PARTIAL / FULL
    q_count_full: torch.Tensor
    q_count: torch.Tensor
    q_idx: torch.Tensor
    k_count_full: torch.Tensor
    k_count: torch.Tensor
    k_idx: torch.Tensor
    q_order: torch.Tensor
    k_order: torch.Tensor
    ranges: Optional[torch.Tensor] = None
    tile_bits: Optional[torch.Tensor] = None
    bits_index: Optional[torch.Tensor] = None

    def summary(self) -> dict:
        """Counts of empty / partial / full tiles over every (batch, head) the mask distinguishes."""
        c = self.classes
        return {
            "tile_m": self.tile_m,
            "tile_n": self.tile_n,
            "tiles": c.numel(),
            "empty": int((c == EMPTY).sum()),
            "partial": int((c == PARTIAL).sum()),
            "full": int((c == FULL).sum()),
        }


def compact(classes: torch.Tensor):
    """Per row of the last two dims: full column indices first, then partial, then -1 padding."""
    cols = classes.shape[-1]
    full = classes == FULL
    part = classes == PARTIAL
    n_full = full.sum(-1, dtype=torch.int32)
    n_part = part.sum(-1, dtype=torch.int32)
    pos_full = full.cumsum(-1) - 1
    pos_part = part.cumsum(-1) - 1 + n_full.unsqueeze(-1)
    dump = torch.full_like(pos_full, cols)  # empty tiles are scattered into a column that is cut off
    pos = torch.where(full, pos_full, torch.where(part, pos_part, dump))
    idx = torch.full((*classes.shape[:-1], cols + 1), -1, dtype=torch.int32, device=classes.device)
    src = torch.arange(cols, dtype=torch.int32, device=classes.device).expand_as(pos)
    idx.scatter_(-1, pos, src)
    return n_full, n_full + n_part, idx[..., :cols].contiguous()


def heaviest_first(counts: torch.Tensor) -> torch.Tensor:
    """int32 linear indices of ``counts`` by decreasing value, ties in index order."""
    return torch.sort(counts.flatten(), descending=True, stable=True).indices.to(torch.int32)


def _build(classes: torch.Tensor, tile_m: int, tile_n: int, lists=None, orders=None,
           **extra) -> TileMeta:
    """lists: (q_count_full, q_count, q_idx, k_count_full, k_count, k_idx) when already compacted; orders:
    (q_order, k_order) when already ranked."""
    classes = classes.to(torch.int8)
    if lists is None:
        lists = compact(classes) + compact(classes.transpose(-1, -2))
    qf, qc, qi, kf, kc, ki = lists
    q_order, k_order = orders if orders is not None else (heaviest_first(qc), heaviest_first(kc.sum(1)))
    return TileMeta(tile_m, tile_n, classes.shape[-2], classes.shape[-1], classes,
                     qf, qc, qi, kf, kc, ki, q_order, k_order, **extra)


def _tile_reduce(x: torch.Tensor, n: int, block: int, fill: int, op: str) -> torch.Tensor:
    """Reduce (Bm, n) along tiles of `block` rows, padding the tail with `fill`: -> (Bm, tiles)."""
    tiles = -(-n // block)
    pad = tiles * block - n
    if pad:
        x = torch.cat([x, x.new_full((x.shape[0], pad), fill)], dim=1)
    x = x.view(x.shape[0], tiles, block)
    return x.amin(-1) if op == "min" else x.amax(-1)


def ranges_meta(ranges: torch.Tensor, n_k: int, tile_m: int, tile_n: int) -> TileMeta:
    """Classify tiles of a structured mask from its per-query key intervals, in O(N / block) tensors.

    A tile is non-empty when some interval of its rows meets it (bounds over the rows, so a tile whose
    rows' intervals leave a gap can be visited as partial: never wrong, at worst slower). It is full
    when one interval of every row covers it.
    """
    if ranges.is_cuda:
        from bbm.masks.tiles_gpu import ranges_lists  # imported lazily: CPU users never load Triton
        classes, *lists, q_order, k_order = ranges_lists(ranges, n_k, tile_m, tile_n)
        return _build(classes, tile_m, tile_n, lists, (q_order, k_order), ranges=ranges)
    n_q = ranges.shape[-1]
    big = 2**31 - 1
    num_n = -(-n_k // tile_n)
    start = torch.arange(num_n, device=ranges.device, dtype=torch.int32) * tile_n
    end = torch.clamp(start + tile_n, max=n_k)
    nonempty = None
    full = None
    for j in range(2):  # the two intervals of every row
        lo, hi = ranges[:, 2 * j], ranges[:, 2 * j + 1]
        used = lo < hi
        lo_min = _tile_reduce(torch.where(used, lo, big), n_q, tile_m, big, "min")
        hi_max = _tile_reduce(torch.where(used, hi, -1), n_q, tile_m, -1, "max")
        lo_max = _tile_reduce(lo, n_q, tile_m, -big, "max")  # tail rows do not exist: neutral fill
        hi_min = _tile_reduce(torch.where(used, hi, -1), n_q, tile_m, big, "min")
        meets = (lo_min[..., None] < end) & (hi_max[..., None] > start)
        covers = (lo_max[..., None] <= start) & (hi_min[..., None] >= end)
        nonempty = meets if nonempty is None else nonempty | meets
        full = covers if full is None else full | covers
    classes = torch.where(full, FULL, torch.where(nonempty, PARTIAL, EMPTY)).unsqueeze(1)
    return _build(classes, tile_m, tile_n, ranges=ranges)


def pack_bits(tiles: torch.Tensor) -> torch.Tensor:
    """bool (P, bm, bn) -> int32 (P, bm, bn // 32), element c in bit c % 32 of word c // 32."""
    p, bm, bn = tiles.shape
    weights = torch.ones(32, dtype=torch.int64, device=tiles.device) << torch.arange(32, device=tiles.device)
    words = (tiles.view(p, bm, bn // 32, 32).to(torch.int64) * weights).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_bits(words: torch.Tensor) -> torch.Tensor:
    """int32 (..., w) -> bool (..., 32 * w)."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2).bool()


def dense_meta(allowed: torch.Tensor, tile_m: int, tile_n: int) -> TileMeta:
    """Classify tiles of an arbitrary bool mask (Bm, Hm, Nq, Nk) and bit-pack its partial tiles."""
    if tile_n % 32:
        raise ValueError(f"tile_n: expected a multiple of 32 for a dense mask, got {tile_n}")
    bm_, hm_, n_q, n_k = allowed.shape
    num_m, num_n = -(-n_q // tile_m), -(-n_k // tile_n)
    pad = (0, num_n * tile_n - n_k, 0, num_m * tile_m - n_q)
    padded_false = torch.nn.functional.pad(allowed, pad, value=False)
    tiles = padded_false.view(bm_, hm_, num_m, tile_m, num_n, tile_n).transpose(3, 4)
    nonempty = tiles.any(-1).any(-1)
    padded_true = torch.nn.functional.pad(allowed, pad, value=True)
    full = padded_true.view(bm_, hm_, num_m, tile_m, num_n, tile_n).all(-1).all(-2)
    classes = torch.where(full, FULL, torch.where(nonempty, PARTIAL, EMPTY))
    partial = classes == PARTIAL
    bits_index = torch.where(partial, partial.flatten().cumsum(0).view_as(partial) - 1, -1).to(torch.int32)
    tile_bits = pack_bits(tiles[partial].contiguous())
    return _build(classes, tile_m, tile_n, tile_bits=tile_bits, bits_index=bits_index)
