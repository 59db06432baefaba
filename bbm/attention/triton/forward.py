"""Forward kernel: each query block walks its compacted key-tile list (full tiles first, then partial)
with an online softmax in base 2. Writes the output and the row log-sum-exp (base 2, +inf for rows
with no allowed key) for the backward pass."""
import triton
import triton.language as tl

from bbm._triton import launch_kernel
from bbm.attention.triton.tiles import EDGE, FULL, load_rows, row_intervals, store_rows, tile_allowed, work_item


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_vn, idx, bits, bits_index, j_lo, j_hi,
              sub_rows, offs_n, offs_d, n_k, D, qk_scale, lo0, len0, lo1, len1,
              MODE: tl.constexpr, SUB_N: tl.constexpr, TILE_N: tl.constexpr, TILE_M: tl.constexpr,
              BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
              PREC: tl.constexpr):
    for j in range(j_lo, j_hi):
        tile = tl.load(idx + j // SUB_N)  # key tile of the list; SUB_N blocks of BLOCK_N keys each
        local = (j % SUB_N) * BLOCK_N + offs_n
        keys = tile * TILE_N + local
        k = load_rows(k_ptr, keys, offs_d, stride_kn, n_k, D, EVEN_N, EVEN_D, UPCAST)
        v = load_rows(v_ptr, keys, offs_d, stride_vn, n_k, D, EVEN_N, EVEN_D, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if MODE != FULL:  # element mask: bound check, intervals in registers, or the packed bits
            allowed = tile_allowed(keys, sub_rows, (j % SUB_N) * BLOCK_N, n_k, lo0, len0, lo1, len1, bits,
                                   bits_index + tile, MODE, False, TILE_M, TILE_N, BLOCK_N)
            qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if MODE != FULL:  # a row may have seen no allowed key yet: shift by 0 instead of -inf
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)  # rescale what was accumulated under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@launch_kernel
def fwd_kernel(Q, K, V, O, LSE, Q_COUNT_FULL, Q_COUNT, Q_IDX, Q_ORDER, INTERVALS, TILE_BITS, BITS_INDEX,
               stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
               stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
               n_q, n_k, D, HM, NUM_M, NUM_N, n_items, heads_q, group, qk_scale,
               KIND: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
               UPCAST: tl.constexpr, PREC: tl.constexpr):
    SUB_M: tl.constexpr = TILE_M // BLOCK_M
    SUB_N: tl.constexpr = TILE_N // BLOCK_N
    bm, hm, m, sub, b_off, h_off = work_item(tl.program_id(0), Q_ORDER, n_items, SUB_M, NUM_M, HM, heads_q // HM)
    b = bm + b_off
    h = hm + h_off
    hk = h // group  # GQA: the shared K/V head, never repeated
    sub_rows = sub * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = m * TILE_M + sub_rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = load_rows(Q + b.to(tl.int64) * stride_qb + h * stride_qh, rows, offs_d, stride_qn, n_q, D, EVEN_M, EVEN_D, UPCAST)
    k_ptr = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_ptr = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    line = (bm * HM + hm) * NUM_M + m  # this query tile's entry in the metadata
    n_full = tl.load(Q_COUNT_FULL + line)
    count = tl.load(Q_COUNT + line)
    idx = Q_IDX + line.to(tl.int64) * NUM_N
    bits_index = BITS_INDEX + line.to(tl.int64) * NUM_N
    lo0, len0, lo1, len1 = row_intervals(INTERVALS + bm.to(tl.int64) * 4 * n_q, rows, n_q, KIND, EVEN_M)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    j_full = n_full * SUB_N
    j_plain = j_full
    if not EVEN_N:  # the last key tile runs past Nk: if it is full, visit it with the bound check
        last = tl.load(idx + tl.maximum(n_full - 1, 0))
        j_plain = j_full - SUB_N * ((n_full > 0) & (last == NUM_N - 1)).to(tl.int32)
    # full tiles without mask work, the last key tile with the bound check only, then the partial tiles
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_vn, idx, TILE_BITS, bits_index,
                              0, j_plain, sub_rows, offs_n, offs_d, n_k, D, qk_scale, lo0, len0, lo1, len1,
                              FULL, SUB_N, TILE_N, TILE_M, BLOCK_N, EVEN_N, EVEN_D, UPCAST, PREC)
    if not EVEN_N:
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_vn, idx, TILE_BITS, bits_index,
                                  j_plain, j_full, sub_rows, offs_n, offs_d, n_k, D, qk_scale, lo0, len0, lo1, len1,
                                  EDGE, SUB_N, TILE_N, TILE_M, BLOCK_N, EVEN_N, EVEN_D, UPCAST, PREC)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_vn, idx, TILE_BITS, bits_index,
                              j_full, count * SUB_N, sub_rows, offs_n, offs_d, n_k, D, qk_scale, lo0, len0, lo1, len1,
                              KIND, SUB_N, TILE_N, TILE_M, BLOCK_N, EVEN_N, EVEN_D, UPCAST, PREC)
    # rows with no allowed key: output 0 and lse +inf (so the backward gives them p = 0); a NaN sum (NaN in the
    # inputs) is not 0 and propagates to the output, the lse and the gradients, as in SDPA
    empty = l_i == 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    store_rows(O + b.to(tl.int64) * stride_ob + h * stride_oh, out, rows, offs_d, stride_on, n_q, D, EVEN_M, EVEN_D)
    lse_ptr = LSE + (b * heads_q + h).to(tl.int64) * n_q + rows
    if EVEN_M:
        tl.store(lse_ptr, lse)
    else:
        tl.store(lse_ptr, lse, mask=rows < n_q)
