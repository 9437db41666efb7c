"""GatedFWA backward, Triton template (GATEDFWA.md section 2), deterministic: no atomics.

Four kernels:
- delta: delta_i = <o_i, dO_i>.
- dkdv: one program per (key tile, batch*kv head). It walks the query heads of its GQA group
  and the query tiles that can see the key tile, accumulating dk, dv in registers (so the group
  reduction is a plain sum in a fixed order) and storing each query head's column sums of dS;
  with STORE_DS it also stores dS itself (StoredDS).
- dq: one program per (query tile, batch*query head), walking key tiles as the forward does;
  it accumulates dq and the row sums of dS (and computes delta for dkdv, which runs after it).
- dq_ds: the same grid, dq and the row sums from the dS that dkdv stored (which then runs
  first, after delta): the stored-dS backward, pass "bwd_ds".
The gate gradient is then rowsum - colsum, reverse prefix-summed (gfwagen.gate).
Each pass masks only its edge tiles (dq: a loop of its own for each edge; dk/dv: a branch in
its one loop, see _dkdv_tiles), and never visits a tile wholly outside the window. Head dims
that are not powers of two run padded to the next one (HEAD_D_PAD, HEAD_DV_PAD), the extra
columns masked on load and store, as in the forward. This file imports nothing from gfwagen.
"""

import dataclasses

import triton
import triton.language as tl

from .common import (
    LOG2E,
    cdiv,
    gate_tile,
    gate_tile_load,
    gate_tile_prefetched,
    key_tile_phases,
    launcher,
    load_rows,
    load_vector,
    next_pow2,
    pair_mask,
    row_tile_descriptor,
    split_bounds,
    varlen_key_phases,
    varlen_query_phases,
    vector_descriptor,
    vectors_tma_usable,
    wide_offsets,
    wide_strides,
)


@triton.jit
def gfwa_bwd_delta_kernel(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_dob,
    stride_dot,
    stride_doh,
    T,
    H,
    BLOCK_M: tl.constexpr,
    HEAD_DV: tl.constexpr,
    HEAD_DV_PAD: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    pid_bh = b * H + h
    stride_ot, stride_oh = wide_strides(stride_ot, stride_oh, WIDE_OFFSETS)
    stride_dot, stride_doh = wide_strides(stride_dot, stride_doh, WIDE_OFFSETS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DV_PAD)
    ok = offs_m < T
    tile_ok = ok[:, None]
    if HEAD_DV_PAD != HEAD_DV:
        tile_ok = tile_ok & (offs_d < HEAD_DV)[None, :]
    o = tl.load(
        O
        + b.to(tl.int64) * stride_ob
        + h * stride_oh
        + offs_m[:, None] * stride_ot
        + offs_d[None, :],
        mask=tile_ok,
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO
        + b.to(tl.int64) * stride_dob
        + h * stride_doh
        + offs_m[:, None] * stride_dot
        + offs_d[None, :],
        mask=tile_ok,
        other=0.0,
    ).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _query_phases(n0, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """Query-tile bounds for key rows [n0, n0+BLOCK_N): [lo, int_lo) diagonal (masked),
    [int_lo, int_hi) interior, [int_hi, hi) the window's far edge (masked)."""
    lo = (n0 // BLOCK_M) * BLOCK_M
    hi = T + n0 * 0
    last_full = T - BLOCK_M
    if WINDOW > 0:
        hi = tl.minimum(T, n0 + BLOCK_N - 1 + WINDOW)
        last_full = tl.minimum(last_full, n0 + WINDOW - BLOCK_M)
    int_lo = tl.minimum(((n0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, hi)
    int_hi = int_lo
    if last_full >= int_lo:
        int_hi = (last_full // BLOCK_M + 1) * BLOCK_M
    return lo, int_lo, int_hi, hi


@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    colsum,
    k,
    v,
    cj,
    cb_k,
    offs_n,
    seg_hi,
    q_base,
    do_base,
    cl_base,
    cl_vec,
    cb_base,
    lse_base,
    delta_base,
    ds_base,
    stride_qt,
    stride_dot,
    start,
    end,
    int_lo,
    int_hi,
    T,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    HEAD_D_PAD: tl.constexpr,
    HEAD_DV_PAD: tl.constexpr,
    WINDOW: tl.constexpr,
    VARLEN: tl.constexpr,
    GATED: tl.constexpr,
    GATE_CHUNK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PREFETCH_GATE: tl.constexpr,
    USE_TMA: tl.constexpr,
    VEC_TMA: tl.constexpr,
    STORE_DS: tl.constexpr,
):
    """Query tiles [start, end) in one loop; those outside [int_lo, int_hi) are edge tiles,
    masked under a per-tile branch. Three loops (edge, interior, edge), as the forward and dq
    have, carry dk and dv from loop to loop, and ptxas then serializes every wgmma of the
    kernel (its warning C7515: non-wgmma instructions define accumulator registers inside a
    pipeline stage); one loop measured 22-27% faster at S2-S5 at the same tiles
    (benchmarks/RESULTS.md, session 9). VEC_TMA: lse_base, delta_base and cl_vec are
    vector_descriptors. STORE_DS: each query tile's dS block also goes to ds_base's blocks
    (StoredDS), rounded as the dk product takes it."""
    PREFETCH: tl.constexpr = PREFETCH_GATE and not VEC_TMA
    if GATED:
        if PREFETCH:
            nxt_local, nxt_base = gate_tile_load(cl_base, cb_base, start, T, BLOCK_M, GATE_CHUNK)
    for m0 in tl.range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if USE_TMA:  # descriptors: rows past T and padded columns arrive as zeros
            q = q_base.load([m0, 0])
            do = do_base.load([m0, 0])
        else:
            q = load_rows(q_base, offs_m, stride_qt, T, HEAD_D, HEAD_D_PAD, True)
            do = load_rows(do_base, offs_m, stride_dot, T, HEAD_DV, HEAD_DV_PAD, True)
        if VEC_TMA:
            lse = lse_base.load([m0])
            delta = delta_base.load([m0])
        else:
            lse = load_vector(lse_base, offs_m, T, True)
            delta = load_vector(delta_base, offs_m, T, True)
        # Everything per query (its lse, its gate sum) is folded into one vector first, so
        # each score costs one multiply-add and one subtract (the key's gate sum).
        row_shift = lse * LOG2E
        if GATED:
            if PREFETCH:
                local, off, nxt_local, nxt_base = gate_tile_prefetched(
                    nxt_local, nxt_base, cl_base, cb_base, m0, cb_k, T, BLOCK_M, GATE_CHUNK
                )
            else:
                local, off = gate_tile(
                    cl_vec, cb_base, m0, cb_k, T, BLOCK_M, GATE_CHUNK, True, VEC_TMA
                )
            row_shift -= local + off
        # Transposed scores [BLOCK_N, BLOCK_M]: keys on rows, so dk and dv need no transpose.
        s = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale - row_shift[None, :]
        if GATED:
            s -= cj[:, None]
        p = tl.math.exp2(s)
        if (m0 < int_lo) | (m0 >= int_hi):
            valid = pair_mask(offs_m[None, :], offs_n[:, None], T, WINDOW)
            if VARLEN:  # queries of a later packed sequence
                valid = valid & (offs_m[None, :] < seg_hi[:, None])
            p = tl.where(valid, p, 0.0)
        dv += tl.dot(p.to(do.dtype), do, input_precision=DOT_PREC)
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds = p * (dp - delta[None, :])
        ds_lp = ds.to(q.dtype)
        if STORE_DS:
            # Every pair of the block, those outside the window as the zeros they are here
            # (keys past T are masked on the last key tile, whose query tiles are all edges).
            # Before the dk product, which then overlaps the store: after it, the store cost
            # dk/dv 19-24% at S1-S4 rather than 10-14% (H200, session 12).
            if USE_TMA:
                ds_base.store([(m0 - start) // BLOCK_M * BLOCK_N, 0], ds_lp)
            else:  # correct, but ptxas then serializes the kernel's wgmma (C7515): +46% at S2
                blk = ds_base + ((m0 - start) // BLOCK_M) * (BLOCK_N * BLOCK_M)
                tl.store(
                    blk + tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :],
                    ds_lp,
                )
            if GATED:
                # dq's row sums come from the stored, rounded values: the column sums must
                # too, or the two no longer cancel delta's rounding error (see _dq_tiles)
                colsum += tl.sum(ds_lp.to(tl.float32), 1)
            dk += tl.dot(ds_lp, q, input_precision=DOT_PREC)
        else:
            dk += tl.dot(ds_lp, q, input_precision=DOT_PREC)
            if GATED:
                colsum += tl.sum(ds, 1)
    return dk, dv, colsum


@triton.jit
def gfwa_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    CL,
    CB,
    LSE,
    DELTA,
    DK,
    DV,
    DCOL,
    SEG_END,
    DS,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dkb,
    stride_dkt,
    stride_dkh,
    stride_dvb,
    stride_dvt,
    stride_dvh,
    T,
    H,
    HKV,
    n_chunks,
    n_slots,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    HEAD_D_PAD: tl.constexpr,
    HEAD_DV_PAD: tl.constexpr,
    WINDOW: tl.constexpr,
    VARLEN: tl.constexpr,
    GATED: tl.constexpr,
    GROUP: tl.constexpr,
    GATE_CHUNK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PREFETCH_GATE: tl.constexpr,
    USE_TMA: tl.constexpr,
    VEC_TMA: tl.constexpr = False,
    STORE_DS: tl.constexpr = False,
    WIDE_OFFSETS: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    stride_qt, stride_qh = wide_strides(stride_qt, stride_qh, WIDE_OFFSETS)
    stride_kt, stride_kh = wide_strides(stride_kt, stride_kh, WIDE_OFFSETS)
    stride_vt, stride_vh = wide_strides(stride_vt, stride_vh, WIDE_OFFSETS)
    stride_dot, stride_doh = wide_strides(stride_dot, stride_doh, WIDE_OFFSETS)
    stride_dkt, stride_dkh = wide_strides(stride_dkt, stride_dkh, WIDE_OFFSETS)
    stride_dvt, stride_dvh = wide_strides(stride_dvt, stride_dvh, WIDE_OFFSETS)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D_PAD)
    offs_dv = tl.arange(0, HEAD_DV_PAD)
    key_ok = offs_n < T
    k_ok = key_ok[:, None]
    if HEAD_D_PAD != HEAD_D:
        k_ok = k_ok & (offs_d < HEAD_D)[None, :]
    v_ok = key_ok[:, None]
    if HEAD_DV_PAD != HEAD_DV:
        v_ok = v_ok & (offs_dv < HEAD_DV)[None, :]
    b64 = b.to(tl.int64)
    k = tl.load(
        K + b64 * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
        mask=k_ok,
        other=0.0,
    )
    v = tl.load(
        V + b64 * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_dv[None, :],
        mask=v_ok,
        other=0.0,
    )
    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, HEAD_D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DV_PAD], dtype=tl.float32)
    lo, int_lo, int_hi, hi = _query_phases(n0, T, BLOCK_M, BLOCK_N, WINDOW)
    seg_hi = offs_n
    if VARLEN:
        # Packed sequences: each key is seen by queries before its sequence's end only.
        seg_hi = tl.load(SEG_END + offs_n, mask=key_ok, other=0)
        lo, int_lo, int_hi, hi = varlen_query_phases(
            lo, int_lo, int_hi, hi, SEG_END, n0, T, BLOCK_M, BLOCK_N
        )
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = (b * H + h).to(tl.int64)
        q_base = Q + b64 * stride_qb + h * stride_qh
        do_base = DO + b64 * stride_dob + h * stride_doh
        if USE_TMA:
            q_base = row_tile_descriptor(q_base, T, stride_qt, BLOCK_M, HEAD_D, HEAD_D_PAD)
            do_base = row_tile_descriptor(do_base, T, stride_dot, BLOCK_M, HEAD_DV, HEAD_DV_PAD)
        cl_base = CL + bh * T
        cb_base = CB + bh * n_chunks
        lse_base = LSE + bh * T
        delta_base = DELTA + bh * T
        cl_vec = cl_base
        if VEC_TMA:
            lse_base = vector_descriptor(lse_base, T, BLOCK_M)
            delta_base = vector_descriptor(delta_base, T, BLOCK_M)
            if GATED:
                cl_vec = vector_descriptor(cl_base, T, BLOCK_M)
        cb_k = 0.0
        cj = tl.zeros([BLOCK_N], dtype=tl.float32)
        if GATED:
            cb_k = tl.load(cb_base + n0 // GATE_CHUNK)
            cj = tl.load(cl_base + offs_n, mask=key_ok, other=0.0)
        colsum = tl.zeros([BLOCK_N], dtype=tl.float32)
        # (StoredDS) this key tile's n_slots blocks
        ds_base = DS + (bh * tl.cdiv(T, BLOCK_N) + pid_n) * n_slots * (BLOCK_N * BLOCK_M)
        if USE_TMA and STORE_DS:  # the key tile's blocks as one [n_slots * BLOCK_N, BLOCK_M]
            ds_base = tl.make_tensor_descriptor(
                ds_base,
                shape=[n_slots * BLOCK_N, BLOCK_M],
                strides=[BLOCK_M, 1],
                block_shape=[BLOCK_N, BLOCK_M],
            )
        dk, dv, colsum = _dkdv_tiles(
            dk,
            dv,
            colsum,
            k,
            v,
            cj,
            cb_k,
            offs_n,
            seg_hi,
            q_base,
            do_base,
            cl_base,
            cl_vec,
            cb_base,
            lse_base,
            delta_base,
            ds_base,
            stride_qt,
            stride_dot,
            lo,
            hi,
            int_lo,
            int_hi,
            T,
            qk_scale,
            BLOCK_M,
            BLOCK_N,
            HEAD_D,
            HEAD_DV,
            HEAD_D_PAD,
            HEAD_DV_PAD,
            WINDOW,
            VARLEN,
            GATED,
            GATE_CHUNK,
            DOT_PREC,
            PREFETCH_GATE,
            USE_TMA,
            VEC_TMA,
            STORE_DS,
        )
        if GATED:
            tl.store(DCOL + bh * T + offs_n, colsum, mask=key_ok)
    tl.store(
        DK + b64 * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
        (dk * sm_scale).to(DK.dtype.element_ty),
        mask=k_ok,
    )
    tl.store(
        DV + b64 * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_dv[None, :],
        dv.to(DV.dtype.element_ty),
        mask=v_ok,
    )


@triton.jit
def _query_program(H, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """What a program of a (query tile, query head, batch) grid works on: its tile index, batch,
    query head, kv head, the batch and batch*head as int64 (for offsets past 2^31) and rows."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    pid_bh = b * H + h
    m0 = pid_m * BLOCK_M
    return (
        pid_m,
        b,
        h,
        h // GROUP,
        b.to(tl.int64),
        pid_bh.to(tl.int64),
        m0,
        m0 + tl.arange(0, BLOCK_M),
    )


@triton.jit
def _dq_tiles(
    dq,
    rowsum,
    q,
    do,
    row_shift,
    delta,
    cb_q,
    offs_m,
    seg_lo,
    k_base,
    v_base,
    cl_base,
    cl_vec,
    cb_base,
    stride_kt,
    stride_vt,
    start,
    end,
    T,
    qk_scale,
    BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    HEAD_D_PAD: tl.constexpr,
    HEAD_DV_PAD: tl.constexpr,
    WINDOW: tl.constexpr,
    VARLEN: tl.constexpr,
    GATED: tl.constexpr,
    PHASE: tl.constexpr,
    SPLIT_BOUNDS: tl.constexpr,
    GATE_CHUNK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PREFETCH_GATE: tl.constexpr,
    USE_TMA: tl.constexpr,
    VEC_TMA: tl.constexpr,
):
    MASKED: tl.constexpr = PHASE != 1
    PREFETCH: tl.constexpr = PREFETCH_GATE and not VEC_TMA
    if GATED:
        if PREFETCH:
            nxt_local, nxt_base = gate_tile_load(cl_base, cb_base, start, T, BLOCK_N, GATE_CHUNK)
    for n0 in tl.range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if USE_TMA:
            k = k_base.load([n0, 0])
            v = v_base.load([n0, 0])
        else:
            k = load_rows(k_base, offs_n, stride_kt, T, HEAD_D, HEAD_D_PAD, MASKED)
            v = load_rows(v_base, offs_n, stride_vt, T, HEAD_DV, HEAD_DV_PAD, MASKED)
        # row_shift = lse - c_i (log2 units), folded once per program by the caller.
        if GATED:
            if PREFETCH:
                local, off, nxt_local, nxt_base = gate_tile_prefetched(
                    nxt_local, nxt_base, cl_base, cb_base, n0, cb_q, T, BLOCK_N, GATE_CHUNK
                )
            else:
                local, off = gate_tile(
                    cl_vec, cb_base, n0, cb_q, T, BLOCK_N, GATE_CHUNK, MASKED, VEC_TMA
                )
            # the key's gate sum is local + off: the tile's offset joins the row shift
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            s = s - (row_shift + off)[:, None] - local[None, :]
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale - row_shift[:, None]
        p = tl.math.exp2(s)
        if MASKED:
            if SPLIT_BOUNDS:  # (common.split_bounds) the edge's bound, or the diagonal's
                valid = pair_mask(offs_m[:, None], offs_n[None, :], T, WINDOW, 1 + PHASE // 2)
            else:
                valid = pair_mask(offs_m[:, None], offs_n[None, :], T, WINDOW)
                if VARLEN:  # keys of an earlier packed sequence
                    valid = valid & (offs_n[None, :] >= seg_lo[:, None])
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        if GATED:
            # Zero in exact arithmetic (sum_j P_ij dP_ij = <dO_i, o_i> = delta_i), but delta
            # comes from the stored, rounded o: each row sum carries the rounding error that
            # delta also brings into the column sums, and the gate gradient's reverse sum of
            # the two cancels it. Dropping them (tried, session 7) took bf16 gate gradients
            # from about 3e-3 to 3e-2 of float64.
            rowsum += tl.sum(ds, 1)
    return dq, rowsum


@triton.jit
def gfwa_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    CL,
    CB,
    LSE,
    DELTA,
    DQ,
    DROW,
    SEG_START,
    O,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    T,
    H,
    n_chunks,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    HEAD_D_PAD: tl.constexpr,
    HEAD_DV_PAD: tl.constexpr,
    WINDOW: tl.constexpr,
    VARLEN: tl.constexpr,
    GATED: tl.constexpr,
    GROUP: tl.constexpr,
    GATE_CHUNK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PREFETCH_GATE: tl.constexpr,
    USE_TMA: tl.constexpr,
    SPLIT_BOUNDS: tl.constexpr,
    VEC_TMA: tl.constexpr = False,
    WIDE_OFFSETS: tl.constexpr = False,
):
    pid_m, b, h, hk, b64, bh, m0, offs_m = _query_program(H, GROUP, BLOCK_M)
    stride_ot, stride_oh = wide_strides(stride_ot, stride_oh, WIDE_OFFSETS)
    stride_qt, stride_qh = wide_strides(stride_qt, stride_qh, WIDE_OFFSETS)
    stride_kt, stride_kh = wide_strides(stride_kt, stride_kh, WIDE_OFFSETS)
    stride_vt, stride_vh = wide_strides(stride_vt, stride_vh, WIDE_OFFSETS)
    stride_dot, stride_doh = wide_strides(stride_dot, stride_doh, WIDE_OFFSETS)
    stride_dqt, stride_dqh = wide_strides(stride_dqt, stride_dqh, WIDE_OFFSETS)
    offs_d = tl.arange(0, HEAD_D_PAD)
    offs_dv = tl.arange(0, HEAD_DV_PAD)
    row_ok = offs_m < T
    q_ok = row_ok[:, None]
    if HEAD_D_PAD != HEAD_D:
        q_ok = q_ok & (offs_d < HEAD_D)[None, :]
    do_ok = row_ok[:, None]
    if HEAD_DV_PAD != HEAD_DV:
        do_ok = do_ok & (offs_dv < HEAD_DV)[None, :]
    q = tl.load(
        Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=q_ok,
        other=0.0,
    )
    do = tl.load(
        DO + b64 * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_dv[None, :],
        mask=do_ok,
        other=0.0,
    )
    lse2 = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=0.0) * LOG2E
    # delta = rowsum(o * do), computed here and stored for the dk/dv kernel, which runs
    # after this one: the tile of do is in registers already, and the separate kernel was
    # a launch and a pass over o and do of its own (35 us at S5).
    o = tl.load(
        O + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_dv[None, :],
        mask=do_ok,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * T + offs_m, delta, mask=row_ok)
    cl_base = CL + bh * T
    cb_base = CB + bh * n_chunks
    cl_vec = cl_base
    if VEC_TMA:
        cl_vec = vector_descriptor(cl_base, T, BLOCK_N)
    cb_q = 0.0
    row_shift = lse2
    if GATED:
        cb_q = tl.load(cb_base + m0 // GATE_CHUNK)
        row_shift = lse2 - tl.load(cl_base + offs_m, mask=row_ok, other=0.0)
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    if USE_TMA:
        k_base = row_tile_descriptor(k_base, T, stride_kt, BLOCK_N, HEAD_D, HEAD_D_PAD)
        v_base = row_tile_descriptor(v_base, T, stride_vt, BLOCK_N, HEAD_DV, HEAD_DV_PAD)
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_D_PAD], dtype=tl.float32)
    rowsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, int_lo, int_hi, hi = key_tile_phases(m0, T, BLOCK_M, BLOCK_N, WINDOW)
    seg_lo = offs_m
    if VARLEN:
        seg_lo = tl.load(SEG_START + offs_m, mask=row_ok, other=0)
        lo, int_lo, int_hi, hi = varlen_key_phases(
            lo, int_lo, int_hi, hi, SEG_START, m0, T, BLOCK_M, BLOCK_N
        )
    bounds = (lo, int_lo, int_hi, hi)
    for phase in tl.static_range(3):  # masked, unmasked interior, masked
        dq, rowsum = _dq_tiles(
            dq,
            rowsum,
            q,
            do,
            row_shift,
            delta,
            cb_q,
            offs_m,
            seg_lo,
            k_base,
            v_base,
            cl_base,
            cl_vec,
            cb_base,
            stride_kt,
            stride_vt,
            bounds[phase],
            bounds[phase + 1],
            T,
            qk_scale,
            BLOCK_N,
            HEAD_D,
            HEAD_DV,
            HEAD_D_PAD,
            HEAD_DV_PAD,
            WINDOW,
            VARLEN,
            GATED,
            phase,
            SPLIT_BOUNDS,
            GATE_CHUNK,
            DOT_PREC,
            PREFETCH_GATE,
            USE_TMA,
            VEC_TMA,
        )
    tl.store(
        DQ + b64 * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=q_ok,
    )
    if GATED:
        tl.store(DROW + bh * T + offs_m, rowsum, mask=row_ok)


@triton.jit
def gfwa_bwd_dq_ds_kernel(
    DS,
    K,
    DQ,
    DROW,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    T,
    H,
    n_slots,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_D_PAD: tl.constexpr,
    WINDOW: tl.constexpr,
    GATED: tl.constexpr,
    GROUP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    USE_TMA: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr = False,
):
    """dq = scale * dS K, and gated the row sums of dS, from the blocks the dk/dv kernel
    stored (STORE_DS, StoredDS) with the same BLOCK_M x BLOCK_N tiles: one product per key
    tile where the recomputing dq kernel does three and the softmax, and no masks (the
    blocks hold zeros outside the window; K rows past T load as zeros). One loop, so ptxas
    keeps the products asynchronous (three loops carrying dq serialized them: C7515)."""
    pid_m, b, h, hk, b64, bh, m0, offs_m = _query_program(H, GROUP, BLOCK_M)
    stride_kt, stride_kh = wide_strides(stride_kt, stride_kh, WIDE_OFFSETS)
    stride_dqt, stride_dqh = wide_strides(stride_dqt, stride_dqh, WIDE_OFFSETS)
    offs_d = tl.arange(0, HEAD_D_PAD)
    row_ok = offs_m < T
    k_base = K + b64 * stride_kb + hk * stride_kh
    if USE_TMA:
        k_base = row_tile_descriptor(k_base, T, stride_kt, BLOCK_N, HEAD_D, HEAD_D_PAD)
    BLOCK: tl.constexpr = BLOCK_N * BLOCK_M
    key_tiles = tl.cdiv(T, BLOCK_N)
    ds_base = DS + bh * key_tiles * n_slots * BLOCK
    if USE_TMA:  # this head's blocks as one [rows, BLOCK_M] matrix
        ds_base = tl.make_tensor_descriptor(
            ds_base,
            shape=[key_tiles * n_slots * BLOCK_N, BLOCK_M],
            strides=[BLOCK_M, 1],
            block_shape=[BLOCK_N, BLOCK_M],
        )
    in_block = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    dq = tl.zeros([BLOCK_M, HEAD_D_PAD], dtype=tl.float32)
    # Row sums as a product with ones: a sum over keys in registers crosses warps (a
    # shared-memory round trip and a barrier per tile); the tensor cores sum in fp32.
    row_sums = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    ones = tl.full([BLOCK_N, 16], 1.0, DQ.dtype.element_ty)
    lo, _, _, hi = key_tile_phases(m0, T, BLOCK_M, BLOCK_N, WINDOW)
    for n0 in tl.range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if USE_TMA:
            k = k_base.load([n0, 0])
        else:
            k = load_rows(k_base, offs_n, stride_kt, T, HEAD_D, HEAD_D_PAD, True)
        kt = n0 // BLOCK_N
        # the key tile's blocks start at its first query tile (dk/dv's _query_phases)
        slot = pid_m - n0 // BLOCK_M
        if USE_TMA:
            ds_t = ds_base.load([(kt * n_slots + slot) * BLOCK_N, 0])  # [keys, queries]
        else:
            # int64: a head's blocks pass 2^31 elements from about T = 2^17 at W = 4096
            ds_t = tl.load(ds_base + (kt * n_slots + slot).to(tl.int64) * BLOCK + in_block)
        dq += tl.dot(tl.trans(ds_t), k, input_precision=DOT_PREC)
        if GATED:
            row_sums = tl.dot(tl.trans(ds_t), ones, row_sums, input_precision=DOT_PREC)
    q_ok = row_ok[:, None]
    if HEAD_D_PAD != HEAD_D:
        q_ok = q_ok & (offs_d < HEAD_D)[None, :]
    tl.store(
        DQ + b64 * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=q_ok,
    )
    if GATED:  # every column holds the same sums
        tl.store(DROW + bh * T + offs_m, tl.max(row_sums, 1), mask=row_ok)


def launch_delta(o, do, delta, block_m=64):
    B, T, H, Dv = o.shape
    launcher(gfwa_bwd_delta_kernel)[(cdiv(T, block_m), H, B)](
        o,
        do,
        delta,
        o.stride(0),
        o.stride(1),
        o.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        T,
        H,
        BLOCK_M=block_m,
        HEAD_DV=Dv,
        HEAD_DV_PAD=next_pow2(Dv),
        WIDE_OFFSETS=wide_offsets(o, do),
    )


def _gate_args(gate, fallback, block_m, block_n):
    cl, cb, chunk = gate if gate is not None else (fallback, fallback, 256)
    assert chunk % block_m == 0 and chunk % block_n == 0, "tiles must not straddle gate chunks"
    return cl, cb, chunk


def launch_dkdv(
    q,
    k,
    v,
    do,
    gate,
    lse,
    delta,
    dk,
    dv,
    dcol,
    window,
    scale,
    group,
    block_m,
    block_n,
    num_warps,
    num_stages,
    dot_prec,
    prefetch_gate=False,
    seg_end=None,
    tma=False,
    stored=None,
):
    """seg_end: None, or for packed sequences (B = 1) int32 [T], the end of each position's
    sequence. stored: None, or a StoredDS on these tiles (new_stored_ds) to write dS into (no
    packed sequences)."""
    B, T, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    cl, cb, chunk = _gate_args(gate, lse, block_m, block_n)
    if stored is not None:
        assert seg_end is None and stored.tiles == (block_m, block_n) and window > 0
    launcher(gfwa_bwd_dkdv_kernel)[(cdiv(T, block_n), Hkv, B)](
        q,
        k,
        v,
        do,
        cl,
        cb,
        lse,
        delta,
        dk,
        dv,
        dcol if dcol is not None else lse,
        seg_end if seg_end is not None else lse,
        stored.blocks if stored is not None else lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        dk.stride(0),
        dk.stride(1),
        dk.stride(2),
        dv.stride(0),
        dv.stride(1),
        dv.stride(2),
        T,
        H,
        Hkv,
        cb.shape[-1],
        stored.n_slots if stored is not None else 0,
        scale,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_D=D,
        HEAD_DV=Dv,
        HEAD_D_PAD=next_pow2(D),
        HEAD_DV_PAD=next_pow2(Dv),
        WINDOW=window,
        VARLEN=seg_end is not None,
        GATED=gate is not None,
        GROUP=group,
        GATE_CHUNK=chunk,
        DOT_PREC=dot_prec,
        PREFETCH_GATE=prefetch_gate,
        USE_TMA=tma,
        VEC_TMA=tma and vectors_tma_usable(T, block_m, cl, lse, delta),
        STORE_DS=stored is not None,
        WIDE_OFFSETS=wide_offsets(q, k, v, do, dk, dv),
        num_warps=num_warps,
        num_stages=num_stages,
    )


@dataclasses.dataclass
class StoredDS:
    """dS as the dk/dv kernel stores it for gfwa_bwd_dq_ds_kernel: per batch*query head and
    key tile (of tiles[1] keys), n_slots blocks [tiles[1] keys, tiles[0] queries] row-major,
    one per query tile the key tile meets, in order from the tile holding its first key.
    Pairs outside the window are stored as 0, so the reader needs no masks."""

    blocks: object  # flat, q's dtype
    n_slots: int
    tiles: tuple  # (block_m, block_n) of both kernels


def stored_ds_slots(window, block_m, block_n):
    """Query tiles a key tile meets: its keys' queries span block_n - 1 + window positions,
    starting anywhere in a query tile."""
    return cdiv(window + block_n + block_m - 2, block_m)


def stored_ds_bytes(B, H, T, window, block_m, block_n, element_size):
    blocks = B * H * cdiv(T, block_n) * stored_ds_slots(window, block_m, block_n)
    return blocks * block_m * block_n * element_size


def new_stored_ds(B, H, T, window, block_m, block_n, dtype, device):
    import torch

    n = stored_ds_bytes(B, H, T, window, block_m, block_n, 1)
    return StoredDS(
        torch.empty(n, dtype=dtype, device=device),
        stored_ds_slots(window, block_m, block_n),
        (block_m, block_n),
    )


def launch_dq_ds(
    k, stored, dq, drow, window, scale, group, num_warps, num_stages, dot_prec, tma=False
):
    """dq (and, gated, drow: [B, H, T] float32 row sums of dS) from the StoredDS that
    launch_dkdv wrote for the same inputs, on its tiles."""
    B, T, H, D = dq.shape
    block_m, block_n = stored.tiles
    launcher(gfwa_bwd_dq_ds_kernel)[(cdiv(T, block_m), H, B)](
        stored.blocks,
        k,
        dq,
        drow if drow is not None else dq,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        dq.stride(0),
        dq.stride(1),
        dq.stride(2),
        T,
        H,
        stored.n_slots,
        scale,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_D=D,
        HEAD_D_PAD=next_pow2(D),
        WINDOW=window,
        GATED=drow is not None,
        GROUP=group,
        DOT_PREC=dot_prec,
        USE_TMA=tma,
        WIDE_OFFSETS=wide_offsets(k, dq),
        num_warps=num_warps,
        num_stages=num_stages,
    )


def launch_dq(
    q,
    k,
    v,
    do,
    o,
    gate,
    lse,
    delta,
    dq,
    drow,
    window,
    scale,
    group,
    block_m,
    block_n,
    num_warps,
    num_stages,
    dot_prec,
    prefetch_gate=False,
    seg_start=None,
    tma=False,
    full_masks=False,
):
    """Also writes delta (rowsum of o * do, [B, H, T] float32), which launch_dkdv reads.
    seg_start: None, or for packed sequences (B = 1) int32 [T], the start of each position's
    sequence. full_masks: as launch_forward's."""
    B, T, H, D = q.shape
    Dv = v.shape[3]
    cl, cb, chunk = _gate_args(gate, lse, block_m, block_n)
    launcher(gfwa_bwd_dq_kernel)[(cdiv(T, block_m), H, B)](
        q,
        k,
        v,
        do,
        cl,
        cb,
        lse,
        delta,
        dq,
        drow if drow is not None else lse,
        seg_start if seg_start is not None else lse,
        o,
        o.stride(0),
        o.stride(1),
        o.stride(2),
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        dq.stride(0),
        dq.stride(1),
        dq.stride(2),
        T,
        H,
        cb.shape[-1],
        scale,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_D=D,
        HEAD_DV=Dv,
        HEAD_D_PAD=next_pow2(D),
        HEAD_DV_PAD=next_pow2(Dv),
        WINDOW=window,
        VARLEN=seg_start is not None,
        GATED=gate is not None,
        GROUP=group,
        GATE_CHUNK=chunk,
        DOT_PREC=dot_prec,
        PREFETCH_GATE=prefetch_gate,
        USE_TMA=tma,
        SPLIT_BOUNDS=not full_masks
        and split_bounds(window, block_m, block_n, seg_start is not None),
        VEC_TMA=tma and gate is not None and vectors_tma_usable(T, block_n, cl),
        WIDE_OFFSETS=wide_offsets(q, k, v, do, o, dq),
        num_warps=num_warps,
        num_stages=num_stages,
    )
