"""Tile metadata of a structured (ranges) mask in three Triton launches, for the GPU.

The same classification as ``bbm.masks.tiles.ranges_meta`` (vectorised PyTorch, many small ops):
``classify_kernel`` classifies one row of tiles per program from the row intervals' bounds and
compacts it (full first, then partial, then -1); ``compact_kernel`` compacts one column per program
into the transposed lists; ``order_kernel`` ranks the query and the key tiles heaviest first (what
``heaviest_first``'s two stable sorts give). Called by ``ranges_meta`` on CUDA tensors.
"""
import torch
import triton
import triton.language as tl

from bbm._triton import launch_kernel


@triton.jit
def _place(cls_ptr, stride, length, idx_ptr, first, value, CHUNK: tl.constexpr):
    """Write the positions of the entries equal to ``value`` to idx_ptr[first:], in order; -> their count."""
    offs = tl.arange(0, CHUNK)
    count = first
    for start in range(0, length, CHUNK):
        pos = start + offs
        hit = tl.load(cls_ptr + pos * stride, mask=pos < length, other=0) == value
        tl.store(idx_ptr + count + tl.cumsum(hit.to(tl.int32), 0) - 1, pos, mask=hit)
        count += tl.sum(hit.to(tl.int32), 0)
    return count


@triton.jit
def _compact(cls_ptr, stride, length, idx_ptr, count_full_ptr, count_ptr, CHUNK: tl.constexpr):
    """Write the positions of FULL (2) entries of a line, then of PARTIAL (1) ones, then -1 padding."""
    n_full = _place(cls_ptr, stride, length, idx_ptr, 0, 2, CHUNK)
    count = _place(cls_ptr, stride, length, idx_ptr, n_full, 1, CHUNK)
    offs = tl.arange(0, CHUNK)
    for start in range(0, length, CHUNK):
        pos = start + offs
        tl.store(idx_ptr + pos, tl.full([CHUNK], -1, tl.int32), mask=(pos >= count) & (pos < length))
    tl.store(count_full_ptr, n_full)
    tl.store(count_ptr, count)


@triton.jit
def _bounds(ranges, rows, valid, n_q, j: tl.constexpr):
    """Tile bounds of interval j over the rows: min lo / max hi of the used ones (meets a key tile?),
    max lo / min hi over all rows, an unused one counting as hi = -1 (covers a key tile?)."""
    lo = tl.load(ranges + (2 * j) * n_q + rows, mask=valid, other=0)
    hi = tl.load(ranges + (2 * j + 1) * n_q + rows, mask=valid, other=0)
    used = (lo < hi) & valid
    lo_min = tl.min(tl.where(used, lo, 2147483647), 0)
    hi_max = tl.max(tl.where(used, hi, -1), 0)
    lo_max = tl.max(tl.where(valid, lo, -2147483647), 0)
    hi_min = tl.min(tl.where(valid, tl.where(used, hi, -1), 2147483647), 0)
    return lo_min, hi_max, lo_max, hi_min


@launch_kernel
def classify_kernel(RANGES, CLASSES, Q_COUNT_FULL, Q_COUNT, Q_IDX, n_q, n_k, num_m, num_n,
                    TILE_M: tl.constexpr, TILE_N: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    line = tl.program_id(0)  # (mask sample, query tile)
    bm = line // num_m
    m = line % num_m
    offs = tl.arange(0, ROWS)
    rows = m * TILE_M + offs
    valid = (offs < TILE_M) & (rows < n_q)
    ranges = RANGES + bm.to(tl.int64) * 4 * n_q
    lo_min0, hi_max0, lo_max0, hi_min0 = _bounds(ranges, rows, valid, n_q, 0)
    lo_min1, hi_max1, lo_max1, hi_min1 = _bounds(ranges, rows, valid, n_q, 1)
    cls_row = CLASSES + line.to(tl.int64) * num_n
    cols = tl.arange(0, CHUNK)
    for start in range(0, num_n, CHUNK):  # classify: full if one interval covers the tile for every row
        n = start + cols
        lo = n * TILE_N
        hi = tl.minimum(lo + TILE_N, n_k)
        meets = ((lo_min0 < hi) & (hi_max0 > lo)) | ((lo_min1 < hi) & (hi_max1 > lo))
        covers = ((lo_max0 <= lo) & (hi_min0 >= hi)) | ((lo_max1 <= lo) & (hi_min1 >= hi))
        c = tl.where(covers, 2, tl.where(meets, 1, 0)).to(tl.int8)
        tl.store(cls_row + n, c, mask=n < num_n)
    tl.debug_barrier()  # the compaction below reads back what every thread of the program wrote
    _compact(cls_row, 1, num_n, Q_IDX + line.to(tl.int64) * num_n, Q_COUNT_FULL + line, Q_COUNT + line, CHUNK)


@launch_kernel
def compact_kernel(CLASSES, K_COUNT_FULL, K_COUNT, K_IDX, num_m, num_n, CHUNK: tl.constexpr):
    line = tl.program_id(0)  # (mask sample, key tile)
    bm = line // num_n
    n = line % num_n
    _compact(CLASSES + bm.to(tl.int64) * num_m * num_n + n, num_n, num_m, K_IDX + line.to(tl.int64) * num_m,
             K_COUNT_FULL + line, K_COUNT + line, CHUNK)


@triton.jit
def _order(COUNT, ORDER, length, chunk, CHUNK: tl.constexpr):
    """ORDER[rank of i] = i for CHUNK entries i of COUNT (counts >= 0), the rank being the number of entries
    heavier than i or as heavy and before it."""
    offs = tl.arange(0, CHUNK)
    i = chunk * CHUNK + offs
    mine = tl.load(COUNT + i, mask=i < length, other=0)
    rank = tl.zeros([CHUNK], dtype=tl.int32)
    for start in range(0, length, CHUNK):
        j = start + offs
        other = tl.load(COUNT + j, mask=j < length, other=-1)  # past the end: lighter than any count
        before = (other[None, :] > mine[:, None]) | ((other[None, :] == mine[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum(before.to(tl.int32), 1)
    tl.store(ORDER + rank, i, mask=i < length)


@launch_kernel
def order_kernel(Q_COUNT, Q_ORDER, lines_q, K_COUNT, K_ORDER, lines_k, q_programs, CHUNK: tl.constexpr):
    """Heaviest first: the first q_programs programs rank the query tiles, the others the key tiles."""
    pid = tl.program_id(0)
    if pid < q_programs:
        _order(Q_COUNT, Q_ORDER, lines_q, pid, CHUNK)
    else:
        _order(K_COUNT, K_ORDER, lines_k, pid - q_programs, CHUNK)


def ranges_lists(ranges: torch.Tensor, n_k: int, tile_m: int, tile_n: int):
    """-> classes int8 (Bm, 1, num_m, num_n), then (count_full, count, idx) per query tile and per key
    tile, int32, laid out as documented in bbm.masks.tiles, then the heaviest-first orders of the query
    and of the key tiles."""
    bm_, _, n_q = ranges.shape
    num_m, num_n = -(-n_q // tile_m), -(-n_k // tile_n)
    lines_q, lines_k = bm_ * num_m, bm_ * num_n
    flat = torch.empty(3 * lines_q + 3 * lines_k + 2 * lines_q * num_n, dtype=torch.int32, device=ranges.device)
    sizes = [lines_q, lines_q, lines_q * num_n, lines_k, lines_k, lines_k * num_m, lines_q, lines_k]
    qf, qc, qi, kf, kc, ki, q_order, k_order = flat.split(sizes)
    classes = torch.empty(bm_, 1, num_m, num_n, dtype=torch.int8, device=ranges.device)
    chunk = min(1024, triton.next_power_of_2(max(num_m, num_n)))
    classify_kernel[(lines_q,)](ranges, classes, qf, qc, qi, n_q, n_k, num_m, num_n, TILE_M=tile_m,
                                TILE_N=tile_n, ROWS=triton.next_power_of_2(tile_m), CHUNK=chunk)
    compact_kernel[(lines_k,)](classes, kf, kc, ki, num_m, num_n, CHUNK=chunk)
    rank = 64  # entries ranked per program
    q_programs = -(-lines_q // rank)
    order_kernel[(q_programs + -(-lines_k // rank),)](qc, q_order, lines_q, kc, k_order, lines_k, q_programs,
                                                     CHUNK=rank)
    return (classes, qf.view(bm_, 1, num_m), qc.view(bm_, 1, num_m), qi.view(bm_, 1, num_m, num_n),
            kf.view(bm_, 1, num_n), kc.view(bm_, 1, num_n), ki.view(bm_, 1, num_n, num_m), q_order, k_order)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@launch_kernel
def document_ranges_kernel(DOC, RANGES, n, window, CHUNK: tl.constexpr):
    """Causal document ranges of one sample per program: lo = max(doc start, q - window + 1), hi = q + 1."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNK)
    carry = 0  # start of the document running into this chunk
    for first in range(0, n, CHUNK):
        q = first + offs
        inside = q < n
        doc = tl.load(DOC + b * n + q, mask=inside, other=0)
        prev = tl.load(DOC + b * n + q - 1, mask=inside & (q > 0), other=0)
        is_start = (q == 0) | (doc != prev)
        start = tl.maximum(tl.associative_scan(tl.where(is_start, q, 0), 0, _max), carry)  # running max
        carry = tl.max(tl.where(inside, start, 0), 0)
        out = RANGES + b * 4 * n + q
        tl.store(out, tl.maximum(start, q - window + 1), mask=inside)
        tl.store(out + n, q + 1, mask=inside)
        tl.store(out + 2 * n, tl.zeros_like(q), mask=inside)
        tl.store(out + 3 * n, tl.zeros_like(q), mask=inside)


def document_ranges(doc_ids: torch.Tensor, window) -> torch.Tensor:
    """int32 (B, 4, N) ranges of the causal (optionally windowed) document mask, in one launch."""
    b, n = doc_ids.shape
    ranges = torch.empty(b, 4, n, dtype=torch.int32, device=doc_ids.device)
    document_ranges_kernel[(b,)](doc_ids.contiguous(), ranges, n, n if window is None else window,
                                 CHUNK=min(4096, triton.next_power_of_2(n)))
    return ranges
