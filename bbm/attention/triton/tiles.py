"""Triton helpers shared by the forward and backward kernels.

Modes of a visited tile (a constexpr of every loop):
  FULL   every pair allowed: no mask work at all;
  EDGE   a full tile that is the last key tile and runs past Nk: only the bound check;
  RANGES a partial tile of a structured mask: the element mask is computed in registers from the
         per-query intervals [lo0, lo0 + len0) and [lo1, lo1 + len1);
  BITS   a partial tile of an arbitrary mask: the element mask is unpacked from its bit-packed tile.
"""
import triton
import triton.language as tl

FULL, EDGE, RANGES, BITS = (tl.constexpr(i) for i in range(4))  # constexpr: jit code reads them


@triton.jit
def in_ranges(key, lo0, len0, lo1, len1):
    """key in [lo0, lo0 + len0) or [lo1, lo1 + len1), as one unsigned compare per interval (operands
    already broadcast to the tile's shape)."""
    in0 = (key - lo0).to(tl.uint32, bitcast=True) < len0.to(tl.uint32, bitcast=True)
    in1 = (key - lo1).to(tl.uint32, bitcast=True) < len1.to(tl.uint32, bitcast=True)
    return in0 | in1


@triton.jit
def tile_bits(words, rows, col0, COLS: tl.constexpr, WORDS: tl.constexpr):
    """(len(rows), COLS) bool block of a bit-packed tile (WORDS int32 words a row): tile rows ``rows``,
    columns col0 .. col0 + COLS - 1 (col0 a multiple of COLS). Loads the rows' words as one small
    block and unpacks them in registers."""
    if COLS >= 32:
        w = tl.load(words + rows[:, None] * WORDS + (col0 // 32 + tl.arange(0, COLS // 32))[None, :])
        bits = (w[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1  # column 32 * word + bit
        bits = tl.reshape(bits, (w.shape[0], COLS))
    else:
        w = tl.load(words + rows * WORDS + col0 // 32)
        bits = (w[:, None] >> (col0 % 32 + tl.arange(0, COLS))[None, :]) & 1
    return bits != 0


@triton.jit
def tile_allowed(keys, rows, col0, n_k, lo0, len0, lo1, len1, bits, entry, MODE: tl.constexpr,
                 KEYS_FIRST: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr, COLS: tl.constexpr):
    """Bool block of the allowed pairs of a visited non-full tile, (queries, keys), or (keys, queries)
    when KEYS_FIRST. ``keys``: the block's key indices; ``rows``: its query rows inside the metadata tile,
    whose intervals are lo0, len0, lo1, len1 (RANGES); ``col0``: its first key column inside the tile;
    ``entry``: where the tile's index into ``bits`` is stored (BITS)."""
    if MODE == EDGE:
        if KEYS_FIRST:
            ok = keys[:, None] < n_k
        else:
            ok = keys[None, :] < n_k
    elif MODE == RANGES:
        if KEYS_FIRST:
            ok = in_ranges(keys[:, None], lo0[None, :], len0[None, :], lo1[None, :], len1[None, :])
        else:
            ok = in_ranges(keys[None, :], lo0[:, None], len0[:, None], lo1[:, None], len1[:, None])
    else:
        words = bits + tl.load(entry).to(tl.int64) * (TILE_M * (TILE_N // 32))
        ok = tile_bits(words, rows, col0, COLS, TILE_N // 32)
        if KEYS_FIRST:
            ok = tl.trans(ok)
    return ok


@triton.jit
def load_rows(ptr, rows, offs_d, stride_n, n, D, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """(len(rows), HEAD_DIM) tile of rows ``rows`` of a (N, D) matrix with row stride ``stride_n``;
    rows past ``n`` and columns past ``D`` read as 0. UPCAST: fp32 copies (the interpreter's dot is only
    right in fp32)."""
    ptrs = ptr + rows[:, None] * stride_n + offs_d[None, :]
    if EVEN_N and EVEN_D:
        x = tl.load(ptrs)
    elif EVEN_N:
        x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs, mask=rows[:, None] < n, other=0.0)
    else:
        x = tl.load(ptrs, mask=(rows[:, None] < n) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def store_rows(ptr, x, rows, offs_d, stride_n, n, D, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr):
    ptrs = ptr + rows[:, None] * stride_n + offs_d[None, :]
    x = x.to(ptr.dtype.element_ty)
    if EVEN_N and EVEN_D:
        tl.store(ptrs, x)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n) & (offs_d[None, :] < D))


@triton.jit
def load_vec(ptr, rows, n, other, EVEN_N: tl.constexpr):
    if EVEN_N:
        return tl.load(ptr + rows)
    return tl.load(ptr + rows, mask=rows < n, other=other)


@triton.jit
def load_intervals(ranges, rows, n_q, EVEN_M: tl.constexpr):
    """lo0, len0, lo1, len1 of query rows ``rows`` from ranges (4, Nq) of one mask sample; rows past
    Nq get empty intervals."""
    lo0 = load_vec(ranges, rows, n_q, 0, EVEN_M)
    hi0 = load_vec(ranges + n_q, rows, n_q, 0, EVEN_M)
    lo1 = load_vec(ranges + 2 * n_q, rows, n_q, 0, EVEN_M)
    hi1 = load_vec(ranges + 3 * n_q, rows, n_q, 0, EVEN_M)
    return lo0, hi0 - lo0, lo1, hi1 - lo1


@triton.jit
def row_intervals(ranges, rows, n_q, KIND: tl.constexpr, EVEN_M: tl.constexpr):
    """The rows' intervals when the mask is structured; placeholders the BITS path never reads otherwise."""
    if KIND == RANGES:
        lo0, len0, lo1, len1 = load_intervals(ranges, rows, n_q, EVEN_M)
    else:
        lo0 = rows
        len0 = rows
        lo1 = rows
        len1 = rows
    return lo0, len0, lo1, len1


@triton.jit
def work_item(pid, order, n_items, SUB: tl.constexpr, num_tiles, HM, REPLICAS_H):
    """Program id -> (mask sample, mask head, tile, sub-block, replica b offset, replica h offset).

    Programs run replica-major (one (batch, head) after another, so the K/V being read stay in L2) and,
    within a replica, over the tiles heaviest first (``order`` lists (sample, head, tile) by
    decreasing work), so that light tiles fill the tail."""
    r = pid // (n_items * SUB)
    rest = pid % (n_items * SUB)
    item = tl.load(order + rest // SUB)
    sub = rest % SUB
    tile = item % num_tiles
    bh = item // num_tiles
    return bh // HM, bh % HM, tile, sub, r // REPLICAS_H, r % REPLICAS_H
