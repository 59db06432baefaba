"""Backward kernels.

``delta_kernel``: delta = rowsum(dO * O) in fp32.
``bwd_kernel``: one launch with two kinds of program. The first ``n_dkdv`` programs each own a block of
keys of one K/V head and walk the transposed lists (k_idx) over every query head of its GQA group,
accumulating dK and dV in registers; the others each own a block of queries of one head and walk the
forward lists (q_idx), accumulating dQ. No atomics, so the result is deterministic. Both kinds run
heaviest first.
"""
import triton
import triton.language as tl

from bbm._triton import launch_kernel
from bbm.attention.triton.tiles import FULL, load_rows, load_vec, row_intervals, store_rows, tile_allowed, work_item


@launch_kernel
def delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dn,
                 heads, n_q, D, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    o = load_rows(O + b.to(tl.int64) * stride_ob + h * stride_oh, rows, offs_d, stride_on, n_q, D, False, False, True)
    do = load_rows(DO + b.to(tl.int64) * stride_db + h * stride_dh, rows, offs_d, stride_dn, n_q, D, False, False, True)
    tl.store(DELTA + bh.to(tl.int64) * n_q + rows, tl.sum(o * do, 1), mask=rows < n_q)


@triton.jit
def _dkdv_loop(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, ranges, stride_qn, stride_don,
               idx, bits, bits_col, num_n, j_lo, j_hi, keys, key0, offs_m, offs_d, n_q, n_k, D, qk_scale,
               MODE: tl.constexpr, SUB: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr,
               BLOCK_M: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
               PREC: tl.constexpr):
    for j in range(j_lo, j_hi):
        tile = tl.load(idx + j // SUB)  # query tile of the transposed list; SUB blocks of BLOCK_M rows
        local = (j % SUB) * BLOCK_M + offs_m
        rows = tile * TILE_M + local
        q = load_rows(q_ptr, rows, offs_d, stride_qn, n_q, D, EVEN_M, EVEN_D, UPCAST)
        do = load_rows(do_ptr, rows, offs_d, stride_don, n_q, D, EVEN_M, EVEN_D, UPCAST)
        lse = load_vec(lse_ptr, rows, n_q, float("inf"), EVEN_M)
        delta = load_vec(delta_ptr, rows, n_q, 0.0, EVEN_M)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :])  # P^T
        if MODE != FULL:
            lo0, len0, lo1, len1 = row_intervals(ranges, rows, n_q, MODE, EVEN_M)
            p_t = tl.where(tile_allowed(keys, local, key0, n_k, lo0, len0, lo1, len1, bits, bits_col + tile * num_n,
                                        MODE, True, TILE_M, TILE_N, keys.shape[0]), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _dq_loop(dq, q, do, lse, delta, k_ptr, v_ptr, stride_kn, stride_vn, idx, bits, bits_index, j_lo, j_hi,
             sub_rows, offs_n, offs_d, n_k, D, qk_scale, lo0, len0, lo1, len1,
             MODE: tl.constexpr, SUB: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr,
             BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
             PREC: tl.constexpr):
    for j in range(j_lo, j_hi):
        tile = tl.load(idx + j // SUB)  # key tile of the forward list; SUB blocks of BLOCK_N keys
        local = (j % SUB) * BLOCK_N + offs_n
        keys = tile * TILE_N + local
        k = load_rows(k_ptr, keys, offs_d, stride_kn, n_k, D, EVEN_N, EVEN_D, UPCAST)  # keys past Nk read 0
        v = load_rows(v_ptr, keys, offs_d, stride_vn, n_k, D, EVEN_N, EVEN_D, UPCAST)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse[:, None])
        if MODE != FULL:
            p = tl.where(tile_allowed(keys, sub_rows, (j % SUB) * BLOCK_N, n_k, lo0, len0, lo1, len1, bits,
                                      bits_index + tile, MODE, False, TILE_M, TILE_N, BLOCK_N), p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)  # a zero key row adds nothing
    return dq


@triton.jit
def _dkdv_program(pid, Q, K, V, DO, LSE, DELTA, DK, DV, K_COUNT_FULL, K_COUNT, K_IDX, K_ORDER, INTERVALS, TILE_BITS,
                  BITS_INDEX, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                  n_q, n_k, D, HM, NUM_M, NUM_N, n_k_items, heads_q, group, qk_scale, scale,
                  KIND: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr, BIG: tl.constexpr,
                  SMALL: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                  EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    SUB: tl.constexpr = TILE_M // SMALL
    heads_kv = heads_q // group
    bm, _, n, sub, b_off, hk = work_item(pid, K_ORDER, n_k_items, TILE_N // BIG, NUM_N, 1, heads_kv)
    b = bm + b_off
    local_keys = sub * BIG + tl.arange(0, BIG)
    keys = n * TILE_N + local_keys
    offs_m = tl.arange(0, SMALL)
    offs_d = tl.arange(0, HEAD_DIM)
    k = load_rows(K + b.to(tl.int64) * stride_kb + hk * stride_kh, keys, offs_d, stride_kn, n_k, D, EVEN_N, EVEN_D, UPCAST)
    v = load_rows(V + b.to(tl.int64) * stride_vb + hk * stride_vh, keys, offs_d, stride_vn, n_k, D, EVEN_N, EVEN_D, UPCAST)
    dk = tl.zeros([BIG, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BIG, HEAD_DIM], dtype=tl.float32)
    ranges = INTERVALS + bm.to(tl.int64) * 4 * n_q
    for g in range(group):  # every query head that shares this K/V head
        h = hk * group + g
        hm = h % HM  # 0 when the mask is shared by the heads
        line = (bm * HM + hm) * NUM_N + n
        n_full = tl.load(K_COUNT_FULL + line)
        count = tl.load(K_COUNT + line)
        idx = K_IDX + line.to(tl.int64) * NUM_M
        bits_col = BITS_INDEX + (bm * HM + hm).to(tl.int64) * NUM_M * NUM_N + n
        bh = (b * heads_q + h).to(tl.int64)
        q_ptr = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        do_ptr = DO + b.to(tl.int64) * stride_dob + h * stride_doh
        dk, dv = _dkdv_loop(dk, dv, k, v, q_ptr, do_ptr, LSE + bh * n_q, DELTA + bh * n_q, ranges, stride_qn,
                            stride_don, idx, TILE_BITS, bits_col, NUM_N, 0, n_full * SUB, keys, sub * BIG, offs_m,
                            offs_d, n_q, n_k, D, qk_scale, FULL, SUB, TILE_M, TILE_N, SMALL, EVEN_M, EVEN_D, UPCAST, PREC)
        dk, dv = _dkdv_loop(dk, dv, k, v, q_ptr, do_ptr, LSE + bh * n_q, DELTA + bh * n_q, ranges, stride_qn,
                            stride_don, idx, TILE_BITS, bits_col, NUM_N, n_full * SUB, count * SUB, keys, sub * BIG,
                            offs_m, offs_d, n_q, n_k, D, qk_scale, KIND, SUB, TILE_M, TILE_N, SMALL, EVEN_M, EVEN_D,
                            UPCAST, PREC)
    # dK, dV share the layout of K, V
    store_rows(DK + b.to(tl.int64) * stride_kb + hk * stride_kh, dk * scale, keys, offs_d, stride_kn, n_k, D, EVEN_N, EVEN_D)
    store_rows(DV + b.to(tl.int64) * stride_vb + hk * stride_vh, dv, keys, offs_d, stride_vn, n_k, D, EVEN_N, EVEN_D)


@triton.jit
def _dq_program(pid, Q, K, V, DO, LSE, DELTA, DQ, Q_COUNT_FULL, Q_COUNT, Q_IDX, Q_ORDER, INTERVALS, TILE_BITS,
                BITS_INDEX, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                n_q, n_k, D, HM, NUM_M, NUM_N, n_q_items, heads_q, group, qk_scale, scale,
                KIND: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr, BIG: tl.constexpr,
                SMALL: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    SUB: tl.constexpr = TILE_N // SMALL
    bm, hm, m, sub, b_off, h_off = work_item(pid, Q_ORDER, n_q_items, TILE_M // BIG, NUM_M, HM, heads_q // HM)
    b = bm + b_off
    h = hm + h_off
    hk = h // group
    sub_rows = sub * BIG + tl.arange(0, BIG)
    rows = m * TILE_M + sub_rows
    offs_n = tl.arange(0, SMALL)
    offs_d = tl.arange(0, HEAD_DIM)
    bh = (b * heads_q + h).to(tl.int64)
    q = load_rows(Q + b.to(tl.int64) * stride_qb + h * stride_qh, rows, offs_d, stride_qn, n_q, D, EVEN_M, EVEN_D, UPCAST)
    do = load_rows(DO + b.to(tl.int64) * stride_dob + h * stride_doh, rows, offs_d, stride_don, n_q, D, EVEN_M, EVEN_D, UPCAST)
    lse = load_vec(LSE + bh * n_q, rows, n_q, float("inf"), EVEN_M)
    delta = load_vec(DELTA + bh * n_q, rows, n_q, 0.0, EVEN_M)
    lo0, len0, lo1, len1 = row_intervals(INTERVALS + bm.to(tl.int64) * 4 * n_q, rows, n_q, KIND, EVEN_M)
    line = (bm * HM + hm) * NUM_M + m
    n_full = tl.load(Q_COUNT_FULL + line)
    count = tl.load(Q_COUNT + line)
    idx = Q_IDX + line.to(tl.int64) * NUM_N
    bits_index = BITS_INDEX + line.to(tl.int64) * NUM_N
    k_ptr = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_ptr = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    dq = tl.zeros([BIG, HEAD_DIM], dtype=tl.float32)
    dq = _dq_loop(dq, q, do, lse, delta, k_ptr, v_ptr, stride_kn, stride_vn, idx, TILE_BITS, bits_index, 0, n_full * SUB,
                  sub_rows, offs_n, offs_d, n_k, D, qk_scale, lo0, len0, lo1, len1,
                  FULL, SUB, TILE_M, TILE_N, SMALL, EVEN_N, EVEN_D, UPCAST, PREC)
    dq = _dq_loop(dq, q, do, lse, delta, k_ptr, v_ptr, stride_kn, stride_vn, idx, TILE_BITS, bits_index, n_full * SUB,
                  count * SUB, sub_rows, offs_n, offs_d, n_k, D, qk_scale, lo0, len0, lo1, len1,
                  KIND, SUB, TILE_M, TILE_N, SMALL, EVEN_N, EVEN_D, UPCAST, PREC)
    store_rows(DQ + b.to(tl.int64) * stride_qb + h * stride_qh, dq * scale, rows, offs_d, stride_qn, n_q, D, EVEN_M, EVEN_D)


@launch_kernel
def bwd_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, Q_COUNT_FULL, Q_COUNT, Q_IDX, Q_ORDER,
               K_COUNT_FULL, K_COUNT, K_IDX, K_ORDER, INTERVALS, TILE_BITS, BITS_INDEX,
               stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
               stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
               n_q, n_k, D, HM, NUM_M, NUM_N, n_q_items, n_k_items, n_dkdv, heads_q, group, qk_scale, scale,
               KIND: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr, BIG: tl.constexpr,
               SMALL: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
               EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """dQ, dK, dV share the strides of Q, K, V."""
    pid = tl.program_id(0)
    if pid < n_dkdv:
        _dkdv_program(pid, Q, K, V, DO, LSE, DELTA, DK, DV, K_COUNT_FULL, K_COUNT, K_IDX, K_ORDER, INTERVALS, TILE_BITS,
                      BITS_INDEX, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                      n_q, n_k, D, HM, NUM_M, NUM_N, n_k_items, heads_q, group, qk_scale, scale,
                      KIND, TILE_M, TILE_N, BIG, SMALL, HEAD_DIM, EVEN_M, EVEN_N, EVEN_D, UPCAST, PREC)
    else:
        _dq_program(pid - n_dkdv, Q, K, V, DO, LSE, DELTA, DQ, Q_COUNT_FULL, Q_COUNT, Q_IDX, Q_ORDER, INTERVALS, TILE_BITS,
                    BITS_INDEX, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                    n_q, n_k, D, HM, NUM_M, NUM_N, n_q_items, heads_q, group, qk_scale, scale,
                    KIND, TILE_M, TILE_N, BIG, SMALL, HEAD_DIM, EVEN_M, EVEN_N, EVEN_D, UPCAST, PREC)
