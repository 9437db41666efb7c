"""GatedFWA forward, Triton template: output and log-sum-exp (GATEDFWA.md sections 1 and 3).

One program per (query tile, batch*head). The key tiles a query tile can see split in three:
the window's trailing edge (masked), the interior (every pair valid: no mask, no boundary
checks) and the diagonal (masked). Tiles wholly outside the window are never loaded.

Specialized at compile time (tl.constexpr) over head dims, window (0 = full causal), gate
on/off, GQA group and dot precision; the dtype specializes through the pointers' types.
A head dim that is not a power of two (96, 192) runs at the next power of two (HEAD_D_PAD,
HEAD_DV_PAD: tl.arange's widths) with the extra columns masked on load (read as 0, so they add
nothing to any dot) and on store; for a power of two those branches compile away.
This file imports nothing from gfwagen: the generator loads it by path.
"""

import triton
import triton.language as tl

from .common import (
    KEY_BIAS_WIDTH,
    LN2,
    LOG2E,
    cdiv,
    gate_tile_load,
    key_tile_phases,
    launcher,
    next_pow2,
    row_tile_descriptor,
    split_bounds,
    varlen_key_phases,
    wide_offsets,
    wide_strides,
)


@triton.jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
    cb_q,
    m0,
    offs_m,
    seg_lo,
    k_base,
    v_base,
    cl_base,
    cb_base,
    kb_base,
    e_ones,
    stride_kt,
    stride_vt,
    start,
    end,
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
    PHASE: tl.constexpr,
    SPLIT_BOUNDS: tl.constexpr,
    GATE_CHUNK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PREFETCH_GATE: tl.constexpr,
    USE_TMA: tl.constexpr,
    RAW_MAX: tl.constexpr,
    KEY_BIAS: tl.constexpr,
):
    MASKED: tl.constexpr = PHASE != 1
    offs_d = tl.arange(0, HEAD_D_PAD)
    offs_dv = tl.arange(0, HEAD_DV_PAD)
    if GATED:
        if PREFETCH_GATE:
            nxt_local, nxt_base = gate_tile_load(cl_base, cb_base, start, T, BLOCK_N, GATE_CHUNK)
    if KEY_BIAS:  # each tile's shift, loaded a tile ahead (the table has a spare entry)
        nxt_shift = tl.load(cb_base + start // BLOCK_N)
    for n0 in tl.range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            in_t = offs_n < T
        if USE_TMA:
            # k_base, v_base are tensor descriptors: rows past T and padded columns come
            # back as zeros, as the masked pointer loads below give them.
            k = k_base.load([n0, 0])
            v = v_base.load([n0, 0])
        elif MASKED:
            # Written out rather than through common.load_rows: that helper made ptxas spill
            # 40 B/thread at 128x64 w8 (offline sm_90 compile); these loads spill none.
            k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
            v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_dv[None, :]
            if HEAD_D_PAD != HEAD_D:
                k = tl.load(k_ptrs, mask=in_t[:, None] & (offs_d < HEAD_D)[None, :], other=0.0)
            else:
                k = tl.load(k_ptrs, mask=in_t[:, None], other=0.0)
            if HEAD_DV_PAD != HEAD_DV:
                v = tl.load(v_ptrs, mask=in_t[:, None] & (offs_dv < HEAD_DV)[None, :], other=0.0)
            else:
                v = tl.load(v_ptrs, mask=in_t[:, None], other=0.0)
        else:
            k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
            v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_dv[None, :]
            if HEAD_D_PAD != HEAD_D:
                k = tl.load(k_ptrs, mask=(offs_d < HEAD_D)[None, :], other=0.0)
            else:
                k = tl.load(k_ptrs)
            if HEAD_DV_PAD != HEAD_DV:
                v = tl.load(v_ptrs, mask=(offs_dv < HEAD_DV)[None, :], other=0.0)
            else:
                v = tl.load(v_ptrs)
        if KEY_BIAS:
            # The keys' biases, relative to their tile's start, in the products' units and
            # in three pieces of q's dtype (key_bias.py), enter through the product itself:
            # a 16-wide k step of ones against them (a key's row of KEY_BIAS_WIDTH = 8, then
            # the next key's, which meets zeros), issued first so that Q K^T accumulates onto
            # it. Per score the loop is the ungated RAW_MAX one: in S5's issue-bound loop an
            # add per score and the gate's loads cost 17% (benchmarks/RESULTS.md).
            kb = tl.load(kb_base + offs_n[:, None] * KEY_BIAS_WIDTH
                         + tl.arange(0, 16)[None, :])
            s = tl.dot(e_ones, tl.trans(kb), input_precision=DOT_PREC)
            s = tl.dot(q, tl.trans(k), acc=s, input_precision=DOT_PREC)
            shift = nxt_shift
            nxt_shift = tl.load(cb_base + n0 // BLOCK_N + 1)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if not RAW_MAX:
            s = s * qk_scale
        if GATED:
            # The only float64 operation: one scalar per tile (gfwagen.gate).
            if PREFETCH_GATE:
                # Loaded one tile ahead, so the latency hides behind this tile's dots.
                cj = nxt_local + (nxt_base - cb_q).to(tl.float32)
                nxt_local, nxt_base = gate_tile_load(
                    cl_base, cb_base, n0 + BLOCK_N, T, BLOCK_N, GATE_CHUNK
                )
            else:
                off = (tl.load(cb_base + n0 // GATE_CHUNK) - cb_q).to(tl.float32)
                if MASKED:
                    cj = tl.load(cl_base + offs_n, mask=in_t, other=0.0) + off
                else:
                    cj = tl.load(cl_base + offs_n) + off
            # The query's own c_i is a per-row constant, which softmax ignores: it enters
            # only the log-sum-exp (epilogue). What is left folds into the scale's multiply.
            s -= cj[None, :]
        if MASKED:
            if SPLIT_BOUNDS:
                # (common.split_bounds) rows past T are never stored, so only one bound
                if RAW_MAX:
                    # In the tile's own coordinates, one scalar bound per tile. Written with
                    # offs_m and offs_n, ptxas compared them in 64 bits, and in S5's key-bias
                    # loop, under its register cap, rematerialized their high words: edge and
                    # diagonal loops 514 and 469 instructions plain, 579 and 508 key-bias;
                    # this way 401 and 390, 431 and 428 (offline sm_90 SASS). Measured 2.7%
                    # and 2.9% faster at S5; the gate tables' forward ran 1.1% slower with it
                    # at S1 (benchmarks/RESULTS.md, session 26), so it keeps the first form.
                    cols = tl.arange(0, BLOCK_N)[None, :]
                    rows = tl.arange(0, BLOCK_M)[:, None]
                    if PHASE == 0:
                        valid = cols > rows + (m0 - n0 - WINDOW)
                    else:
                        valid = cols <= rows + (m0 - n0)
                elif PHASE == 0:
                    valid = offs_n[None, :] > offs_m[:, None] - WINDOW
                else:
                    valid = offs_n[None, :] <= offs_m[:, None]
            else:
                valid = (offs_n[None, :] <= offs_m[:, None]) & in_t[None, :]
                if WINDOW > 0:
                    valid = valid & (offs_n[None, :] > offs_m[:, None] - WINDOW)
                if VARLEN:  # keys of an earlier packed sequence
                    valid = valid & (offs_n[None, :] >= seg_lo[:, None])
            s = tl.where(valid, s, float("-inf"))
        if KEY_BIAS:
            # the running max into this tile's frame, whose biases start at its first key
            m_i = m_i + shift
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = m_new
        if MASKED:
            # A row with no valid key yet keeps m = -inf; shift by 0 so exp2 sees -inf, not
            # NaN. The running max itself stays -inf, so the next tile rescales by 0.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        if RAW_MAX:
            p = tl.math.exp2(s * qk_scale - (m_shift * qk_scale)[:, None])
            alpha = tl.math.exp2((m_i - m_shift) * qk_scale)
        else:
            p = tl.math.exp2(s - m_shift[:, None])
            alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def gfwa_fwd_kernel(
    Q,
    K,
    V,
    CL,
    CB,
    KB,
    O,
    LSE,
    SEG_START,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_ot,
    stride_oh,
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
    RAW_MAX: tl.constexpr,
    KEY_BIAS: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    pid_bh = b * H + h
    stride_qt, stride_qh = wide_strides(stride_qt, stride_qh, WIDE_OFFSETS)
    stride_kt, stride_kh = wide_strides(stride_kt, stride_kh, WIDE_OFFSETS)
    stride_vt, stride_vh = wide_strides(stride_vt, stride_vh, WIDE_OFFSETS)
    stride_ot, stride_oh = wide_strides(stride_ot, stride_oh, WIDE_OFFSETS)
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D_PAD)
    offs_dv = tl.arange(0, HEAD_DV_PAD)
    row_ok = offs_m < T

    q_ptrs = (
        Q
        + b.to(tl.int64) * stride_qb
        + h * stride_qh
        + offs_m[:, None] * stride_qt
        + offs_d[None, :]
    )
    if HEAD_D_PAD != HEAD_D:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < HEAD_D)[None, :], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    if USE_TMA:
        # Hopper's tensor memory accelerator: one bulk copy per tile, no address math.
        k_base = row_tile_descriptor(k_base, T, stride_kt, BLOCK_N, HEAD_D, HEAD_D_PAD)
        v_base = row_tile_descriptor(v_base, T, stride_vt, BLOCK_N, HEAD_DV, HEAD_DV_PAD)
    # RAW_MAX (no gate tables, a positive scale): the running maximum m_i is kept in the
    # products' units, taken before scaling, so the scale costs no multiply per score of its
    # own; it rides in the exponent's FFMA (S4's plain forward -3.5%). A zero or negative
    # scale would turn that maximum into NaN or a minimum. With the gate tables, the scale's
    # multiply already carries c_j's subtract, so there is nothing to save, and c_j brought
    # to the products' units costs float32 exponents 3-4 roundings at its magnitude instead
    # of one (a strong gate's chunk-relative c_j runs to hundreds: relative error 1.8e-4 in
    # the interpreter, 1e-5 the bound). KEY_BIAS's biases restart at every key tile, so
    # their magnitude is one tile's gate sum, and it runs RAW_MAX.
    qk_scale = sm_scale * LOG2E

    cl_base = CL + pid_bh.to(tl.int64) * T
    cb_base = CB + pid_bh.to(tl.int64) * n_chunks
    cb_q = 0.0
    ci = tl.zeros([BLOCK_M], dtype=tl.float32)
    kb_base = KB  # KB and e_ones stand unused unless KEY_BIAS
    e_ones = q
    if KEY_BIAS:
        # KB: the pieces [B*H, tiles * BLOCK_N, 8]; CB: the shifts [B*H, n_chunks = tiles + 1]
        kb_base = KB + pid_bh.to(tl.int64) * (n_chunks - 1) * (BLOCK_N * KEY_BIAS_WIDTH)
        e_ones = tl.broadcast_to(
            tl.where(tl.arange(0, 16)[None, :] < 3, 1.0, 0.0).to(q.dtype), [BLOCK_M, 16])
        # c_i in the last tile's frame (BLOCK_M == BLOCK_N: the query tile's own key tile):
        # minus its own key's bias, in log2 units. Read here, a query tile ahead of its use
        # in the log-sum-exp: ptxas spills it (16 bytes of stack at S5's tile, outside the
        # loops), yet read after the loops the forward ran 2% slower (session 27, paired).
        own = kb_base + offs_m * KEY_BIAS_WIDTH
        ci = (tl.load(own, mask=row_ok, other=0.0).to(tl.float32)
              + tl.load(own + 1, mask=row_ok, other=0.0).to(tl.float32)
              + tl.load(own + 2, mask=row_ok, other=0.0).to(tl.float32)) * -qk_scale
    if GATED:
        # Gate values relative to this query tile's chunk base (log2 units).
        cb_q = tl.load(cb_base + m0 // GATE_CHUNK)
        ci = tl.load(cl_base + offs_m, mask=row_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DV_PAD], dtype=tl.float32)
    lo, int_lo, int_hi, hi = key_tile_phases(m0, T, BLOCK_M, BLOCK_N, WINDOW)
    seg_lo = offs_m
    if VARLEN:
        # Packed sequences: each row sees keys from its own sequence's start on.
        seg_lo = tl.load(SEG_START + offs_m, mask=row_ok, other=0)
        lo, int_lo, int_hi, hi = varlen_key_phases(
            lo, int_lo, int_hi, hi, SEG_START, m0, T, BLOCK_M, BLOCK_N
        )
    # Edge tiles (masked), interior tiles (no masks), diagonal tiles (masked): one
    # compile-time loop, unrolled into three specialized tile loops.
    bounds = (lo, int_lo, int_hi, hi)
    for phase in tl.static_range(3):
        acc, l_i, m_i = _fwd_tiles(
            acc,
            l_i,
            m_i,
            q,
            cb_q,
            m0,
            offs_m,
            seg_lo,
            k_base,
            v_base,
            cl_base,
            cb_base,
            kb_base,
            e_ones,
            stride_kt,
            stride_vt,
            bounds[phase],
            bounds[phase + 1],
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
            phase,
            SPLIT_BOUNDS,
            GATE_CHUNK,
            DOT_PREC,
            PREFETCH_GATE,
            USE_TMA,
            RAW_MAX,
            KEY_BIAS,
        )

    # Every stored row saw at least its own key, so l_i > 0 there.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    # One reciprocal a row, then a multiply per output: a division per output compiled to
    # three instructions (its range check, select and multiply), about 64 of S5's 3570
    # instructions a warp spends per query tile (Nsight Compute, session 27).
    o = acc * (1.0 / l_safe)[:, None]
    o_ptrs = (
        O
        + b.to(tl.int64) * stride_ob
        + h * stride_oh
        + offs_m[:, None] * stride_ot
        + offs_dv[None, :]
    )
    if HEAD_DV_PAD != HEAD_DV:
        tl.store(
            o_ptrs,
            o.to(O.dtype.element_ty),
            mask=row_ok[:, None] & (offs_dv < HEAD_DV)[None, :],
        )
    else:
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    if RAW_MAX:
        m_i = m_i * qk_scale
    lse = (m_i + tl.math.log2(l_safe) + ci) * LN2
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)


def launch_forward(*args, **kw):
    """Launches the forward now: prepare_forward's arguments."""
    prepare_forward(*args, **kw)()


def prepare_forward(
    q,
    k,
    v,
    gate,
    o,
    lse,
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
    maxnreg=None,
    key_bias=None,
):
    """q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv] (last dim contiguous); gate None or
    (local [B,Hq,T] float32, base [B,Hq,chunks] float64, chunk) in log2 units; writes
    o [B,T,Hq,Dv] and lse [B,Hq,T] float32 (natural log). seg_start: None, or for packed
    sequences (B = 1) int32 [T], the start of each position's sequence. full_masks: every
    bound on every masked tile even where common.split_bounds allows one (a tuner knob).
    maxnreg: None, or registers per thread the compiler may use (a tuner knob: at S5's
    64x64 tile the gate's 17 registers cost a block per SM, benchmarks/RESULTS.md); CUDA
    only, the interpreter takes no such option. key_bias: None, or the gate as key_bias.py
    makes it, (pieces, shifts), in place of `gate` (then None): square tiles, no packed
    sequences, a positive scale; the pieces' storage holds its zero pad after them (the last
    key's 16-wide read runs 8 past). Returns the launch, bound (common.launcher's bind), to
    make once the inputs are written: right after the launch that writes the key biases."""
    B, T, H, D = q.shape
    Dv = v.shape[3]
    if key_bias is not None:
        assert gate is None and seg_start is None and block_m == block_n and scale > 0, \
            "key_bias: instead of gate, square tiles, no packed sequences, a positive scale"
        kb, cb = key_bias
        cl, chunk = cb, block_n
    else:
        kb = lse
        cl, cb, chunk = gate if gate is not None else (lse, lse, 256)
    assert chunk % block_m == 0 and chunk % block_n == 0, "tiles must not straddle gate chunks"
    # query tiles fastest, then heads, then batches: CUDA caps the y and z extents at 65535,
    # so this bounds H and B, where one (tiles, B * H) grid bounded B * H
    grid = (cdiv(T, block_m), H, B)
    return launcher(gfwa_fwd_kernel).bind(
        grid,
        q,
        k,
        v,
        cl,
        cb,
        kb,
        o,
        lse,
        seg_start if seg_start is not None else lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        o.stride(0),
        o.stride(1),
        o.stride(2),
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
        RAW_MAX=scale > 0 and gate is None,
        KEY_BIAS=key_bias is not None,
        WIDE_OFFSETS=wide_offsets(q, k, v, o),
        num_warps=num_warps,
        num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )
