"""Structured masks on FlashAttention-4's Hopper kernels (``flash_attn.cute``; the optional ``bbm[hopper]`` extra).

Document masks are what FA4 states itself, over the documents as variable-length sequences (``cu_seqlens`` from the
mask's spans), or over one sequence per sample where each sample is one document (a plain sliding window):

* causal or bidirectional documents, with or without a window: FA4's causal and local-window kernels;
* causal documents with a bidirectional prefix of P tokens (prefix-LM): two calls on disjoint query rows, each
  prefix's queries over its keys (``seqused`` = P from each document's start) and the other queries over their
  whole document, causally with the diagonal aligned bottom-right (query P + i sees keys up to P + i; the queries
  start P tokens into each document). Neither call writes the other's rows: the outputs are merged row by row, and
  each call's gradients are taken only from the rows it owns.

Every other structured mask runs on FA4's block-sparse kernels driven by bbm's own metadata:

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
from typing import Optional

import torch

from bbm._tensors import to_device
from bbm.masks import FULL, PARTIAL, Mask

TILE = 128  # FA4's sm90 tile for head dims 64 and 128, forward and backward
_plans = weakref.WeakKeyDictionary()  # mask -> {batch: Documents, Prefixes or TileLists}


@functools.cache
def _import():
    """FA4's entry points and bbm's mask function, or None where FA4 cannot be imported."""
    try:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        from bbm.attention.fa4_mask import ranges_mask
    except Exception:  # noqa: BLE001 - a missing or broken optional dependency only turns this path off
        return None
    return _FA4(flash_attn_func, flash_attn_varlen_func, BlockSparseTensorsTorch, ranges_mask)


@dataclass(frozen=True)
class _FA4:
    func: object
    varlen_func: object
    block_sparse: object
    ranges_mask: object


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


def states_itself(mask: Mask) -> bool:
    """Whether FA4's own causal / local-window kernels state ``mask``: documents (a prefix only on causal ones)."""
    return mask.documents is not None and (mask.prefix is None or mask.documents_causal)


@dataclass(frozen=True)
class Documents:
    """The documents of a mask as FA4's variable-length sequences (None: one per sample, no varlen needed)."""
    cu_seqlens: Optional[torch.Tensor]  # int32 (documents + 1,) offsets into the flattened (B * N) tokens
    longest: int
    window_size: tuple  # FA4's (left, right), None for unbounded
    causal: bool


@dataclass(frozen=True)
class Prefixes:
    """Prefix-LM documents as two of FA4's variable-length calls (see the module's docstring)."""
    starts: torch.Tensor  # int32 (documents + 1,): each document's first token in the flattened (B * N), then B * N
    prefix: torch.Tensor  # int32 (documents,): prefix lengths
    rest_starts: torch.Tensor  # int32 (documents + 1,): each document's first token past its prefix, then B * N
    rest: torch.Tensor  # int32 (documents,): tokens past the prefix
    longest: tuple  # the longest document, prefix, rest
    window_size: tuple  # the rest's window, FA4's (left, 0)
    prefix_rows: torch.Tensor  # bool (B * N, 1, 1): the queries of a prefix
    rest_rows: Optional[torch.Tensor]  # bool (B * N, 1, 1): the tokens of documents not all prefix; None: every one


@dataclass(frozen=True)
class TileLists:
    """bbm's tile lists as FA4's block-sparse tensors, and the intervals its mask function reads."""
    forward: object  # BlockSparseTensorsTorch: per query tile, partial and full key tiles
    backward: object  # the same per key tile
    intervals: tuple  # lo0, hi0, lo1, hi1: int32 (B, Nq padded to whole tiles)


def _listed_first(selected: torch.Tensor):
    """(count, index): per row of the last dim, how many are selected, and their columns first (ascending)."""
    count = selected.sum(-1, dtype=torch.int32)
    index = torch.sort((~selected).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return count.contiguous(), index.contiguous()


def plan(mask: Mask, batch: int):
    """What this path runs ``mask`` with for inputs of ``batch`` samples (``Documents``, ``Prefixes`` or
    ``TileLists``); kept per mask."""
    plans = _plans.setdefault(mask, {})
    if batch not in plans:
        plans[batch] = _documents(mask, batch) if states_itself(mask) else _block_sparse(mask, batch)
    return plans[batch]


def _spans(mask: Mask, batch: int):
    """(first, length, prefix length) of every document of ``batch`` samples, int64 on the host (read once per mask;
    no device sync for a mask built from host ids); first indexes the flattened (B * N) tokens. What the plans send
    to the GPU goes through pinned memory without waiting for it."""
    first, length = mask.document_spans()
    prefix = mask.prefix_lengths()
    if mask.batch == 1 and batch > 1:  # one mask for every sample: its documents repeat in each row
        first = (first[None] + mask.n_q * torch.arange(batch)[:, None]).flatten()
        length, prefix = length.repeat(batch), prefix.repeat(batch)
    return first, length, prefix


def _offsets(first: torch.Tensor, total: int, device) -> torch.Tensor:
    return to_device(torch.cat([first, torch.tensor([total])]).to(torch.int32), device)


def _documents(mask: Mask, batch: int):
    left = None if mask.window is None else mask.window - 1  # FA4's window counts keys besides the query's own
    window = (left, 0) if mask.documents_causal else (left, left)
    if mask.prefix is not None:
        return _prefixes(mask, batch, window)
    causal = mask.documents_causal and mask.window is None
    if mask.one_document_per_sample:  # a plain causal mask or sliding window
        return Documents(None, mask.n_q, window, causal)
    first, length, _ = _spans(mask, batch)
    return Documents(_offsets(first, batch * mask.n_q, mask.device), int(length.max()), window, causal)


def _prefixes(mask: Mask, batch: int, window: tuple) -> Prefixes:
    first, length, prefix = _spans(mask, batch)
    total, dev = batch * mask.n_q, mask.device
    rows = torch.zeros(total + 1, dtype=torch.int32)  # +1 at each prefix's start, -1 past its end
    rows.index_add_(0, first, torch.ones_like(first, dtype=torch.int32))
    rows.index_add_(0, first + prefix, -torch.ones_like(first, dtype=torch.int32))
    prefix_rows = rows[:-1].cumsum(0).bool().view(total, 1, 1)
    rest_rows = None
    if bool((prefix == length).any()):  # the rest's call may leave the key gradients of such documents unwritten
        rest_rows = to_device(torch.repeat_interleave(prefix < length, length).view(total, 1, 1), dev)
    return Prefixes(_offsets(first, total, dev), to_device(prefix.to(torch.int32), dev),
                    _offsets(first + prefix, total, dev), to_device((length - prefix).to(torch.int32), dev),
                    (int(length.max()), int(prefix.max()), int((length - prefix).max())), window,
                    to_device(prefix_rows, dev), rest_rows)


class _Merge(torch.autograd.Function):
    """The rows of ``a`` where ``rows``, else of ``b`` (two calls that each write only their own rows); each call
    gets the whole output gradient (a call reads only its own rows of it)."""

    @staticmethod
    def forward(ctx, a, b, rows):
        return torch.where(rows, a, b)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, None


class _Share(torch.autograd.Function):
    """``t`` for two calls that each leave some rows of its gradient unwritten: the first call's are those of
    ``first_rows``; the second's all others (``second_rows`` None) or (``both``) those of ``second_rows``, which
    overlap the first's."""

    @staticmethod
    def forward(ctx, t, first_rows, second_rows, both: bool):
        ctx.save_for_backward(first_rows, second_rows)
        ctx.both = both
        return t.view_as(t), t.view_as(t)

    @staticmethod
    def backward(ctx, first, second):
        first_rows, second_rows = ctx.saved_tensors
        if not ctx.both:
            return torch.where(first_rows, first, second), None, None, None
        if second_rows is not None:
            second = torch.where(second_rows, second, 0)
        return torch.where(first_rows, first + second, second), None, None, None


def _prefix_attention(fa, q, k, v, p: Prefixes, scale: float, deterministic: bool):
    """The two calls of prefix-LM documents on flattened (B * N, H, D) q, k, v (one where every document is all
    prefix, or none has one)."""
    longest, longest_prefix, longest_rest = p.longest
    prefix = lambda q, k, v: fa.varlen_func(  # noqa: E731
        q, k, v, cu_seqlens_q=p.starts, cu_seqlens_k=p.starts, seqused_q=p.prefix, seqused_k=p.prefix,
        max_seqlen_q=longest_prefix, max_seqlen_k=longest_prefix, softmax_scale=scale, deterministic=deterministic)[0]
    rest = lambda q, k, v: fa.varlen_func(  # noqa: E731
        q, k, v, cu_seqlens_q=p.rest_starts, cu_seqlens_k=p.starts, seqused_q=p.rest, max_seqlen_q=longest_rest,
        max_seqlen_k=longest, softmax_scale=scale, causal=p.window_size[0] is None, window_size=p.window_size,
        deterministic=deterministic)[0]
    if longest_rest == 0:
        return prefix(q, k, v)
    if longest_prefix == 0:
        return rest(q, k, v)
    q_prefix, q_rest = _Share.apply(q, p.prefix_rows, None, False)  # each query row belongs to one call
    k_prefix, k_rest = _Share.apply(k, p.prefix_rows, p.rest_rows, True)  # the rest's call: every key of its document
    v_prefix, v_rest = _Share.apply(v, p.prefix_rows, p.rest_rows, True)
    return _Merge.apply(prefix(q_prefix, k_prefix, v_prefix), rest(q_rest, k_rest, v_rest), p.prefix_rows)


def _block_sparse(mask: Mask, batch: int) -> TileLists:
    """The block-sparse lists and intervals of ``mask`` for inputs of ``batch`` samples."""
    block_sparse = _import().block_sparse
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
    return TileLists(*lists, tuple(ranges[:, j].contiguous() for j in range(4)))


def fa4_attention(q, k, v, mask: Mask, scale: float) -> torch.Tensor:
    """Attention of validated q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) under a structured ``mask``; the output lies in
    (B, N, H, D) memory."""
    fa = _import()
    p = plan(mask, q.shape[0])
    b, n = q.shape[0], q.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, N, H, D): free for a model's projections
    q, k, v = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v))
    deterministic = torch.are_deterministic_algorithms_enabled()
    flat = lambda t: t.reshape(b * n, *t.shape[2:])  # noqa: E731 - (B * N, H, D): a view
    if isinstance(p, TileLists):
        out, _ = fa.func(q, k, v, softmax_scale=scale, mask_mod=fa.ranges_mask, aux_tensors=list(p.intervals),
                         block_sparse_tensors=p.forward, block_sparse_tensors_bwd=p.backward,
                         deterministic=deterministic)
    elif isinstance(p, Prefixes):
        out = _prefix_attention(fa, flat(q), flat(k), flat(v), p, scale, deterministic).view(b, n, *q.shape[2:])
    elif p.cu_seqlens is None:
        out, _ = fa.func(q, k, v, softmax_scale=scale, causal=p.causal, window_size=p.window_size,
                         deterministic=deterministic)
    else:
        out, _ = fa.varlen_func(flat(q), flat(k), flat(v), cu_seqlens_q=p.cu_seqlens, cu_seqlens_k=p.cu_seqlens,
                                max_seqlen_q=p.longest, max_seqlen_k=p.longest, softmax_scale=scale,
                                causal=p.causal, window_size=p.window_size, deterministic=deterministic)
        out = out.view(b, n, *out.shape[1:])
    return out.transpose(1, 2)
