"""GatedFWA CPU (llvm) kernels as TensorIR PrimFunc factories (TVM 0.27, `tvm.script.tirx`).

Imports nothing from gfwagen; fwd.py / bwd.py call these for target="cpu" (their target="gpu"
variants are separate). Same signatures and semantics as the GPU variants (see fwd.py, bwd.py).

Structure (FlashAttention-2 on a CPU): one T.parallel work item per (batch, query head, query
tile of block_m rows) for the forward and dq, per (batch, kv head, key tile of block_n keys)
for dk/dv. Every product of two tiles goes through one register-blocked micro-kernel (`_mm`):

    C[M, N] (+)= sum_k A(m, k) * Bk[k, n]        A(m, k) = A[m, k] or A[k, m] (a_t)

an (rm x vn) block of C lives in an accumulator small enough for registers (rm rows unrolled,
vn columns one vectorized loop, i.e. vn/16 AVX-512 registers per row), the reduction runs
outermost, each step broadcasts one A element per row and loads one vn-wide row of Bk. The
operand layouts are chosen so that every Bk is row-major along the vectorized dim:

    fwd   S^T[BN, BM]  = K[BN, D] . Q^T[D, BM]          Q^T staged once per work item
          O[BM, DV]   += P (read from S^T) . V[BN, DV]
    dq    S^T, dP^T[BN, BM] = V[BN, DV] . dO^T[DV, BM]; dq[BM, D] += dS (from dS^T) . K[BN, D]
    dk/dv S[BM, BN] = Q[BM, D] . K^T[D, BN], dP = dO . V^T (K^T, V^T staged once);
          dv[BN, DV] += P^T . dO[BM, DV], dk[BN, D] += dS^T . Q[BM, D]

so the row statistics of the softmax (max, sum, row sums of dS) are vector operations over
the query rows in fwd/dq, and the column sums of dS are vector operations over keys in dk/dv.
exp2 is a vectorizable polynomial (Cephes exp2f, relative error ~2e-7) instead of a libm call.

Knobs (KernelConfig): block_m, block_n; extra "rm" (accumulator rows, default 4) and "vn"
(accumulator columns, default 64); both are clipped to divide the tile they block.
"""

from __future__ import annotations

from tvm.script import tirx as T

_DT = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MASK = -1.0e30  # finite "minus infinity" for masked logits (log2 domain)
MASK_T = -5.0e29  # anything below this is a masked logit
# Cephes exp2f on [-0.5, 0.5]: 2^f = 1 + f * P(f)
_EXP2_P = (
    1.535336188319500e-4,
    1.339887440266574e-3,
    9.618437357674640e-3,
    5.550332471162809e-2,
    2.402264791363012e-1,
    6.931472028550421e-1,
)


def exp2p(x):
    """2^x for x <= ~0 as a vectorizable expression; x <= -127 gives exactly 0."""
    xx = T.max(x, T.float32(-127.0))
    nf = T.floor(xx + T.float32(0.5))
    f = xx - nf
    p = T.float32(_EXP2_P[0])
    for c in _EXP2_P[1:]:
        p = p * f + T.float32(c)
    p = p * f + T.float32(1.0)
    bits = T.shift_left(T.Cast("int32", nf) + 127, 23)
    return p * T.reinterpret("float32", bits)


def _in_window(di, jj, W):
    """Key j0 + jj is in the window of query i0 + r, with di = i0 + r - j0 (int32)."""
    if W > 0:
        return T.And(jj <= di, di - jj < W)
    return jj <= di


def _interior(dd, BM, BN, W):
    """No (row, key) pair of the tiles at i0, j0 (dd = i0 - j0) is masked."""
    if W > 0:
        return T.And(BN - 1 <= dd, dd + (BM - 1) < W)
    return BN - 1 <= dd


def _fit(want: int, n: int) -> int:
    """Largest power-of-two divisor of n that is <= want (>= 1)."""
    x = 1
    while x * 2 <= want and n % (x * 2) == 0:
        x *= 2
    return x


def knobs(config, default_rm=4, default_vn=64):
    rm = int(config.get("rm", default_rm)) if hasattr(config, "get") else default_rm
    vn = int(config.get("vn", default_vn)) if hasattr(config, "get") else default_vn
    if rm < 1 or vn < 1:
        raise ValueError(f"rm and vn must be >= 1, got {rm}, {vn}")
    return rm, vn


@T.macro
def _mm(C, A, Bk, M, N, K, rm, vn, init, a_t):
    """C[M, N] (+)= sum_k A(m, k) Bk[k, n]; (rm x vn) register accumulators."""
    for m0 in range(M // rm):
        for n0 in range(N // vn):
            acc = T.alloc_buffer((rm, vn), "float32", scope="local")
            for m1 in T.unroll(rm):
                for n1 in T.vectorized(vn):
                    if init:
                        acc[m1, n1] = T.float32(0)
                    else:
                        acc[m1, n1] = C[m0 * rm + m1, n0 * vn + n1]
            for kk in range(K):
                for m1 in T.unroll(rm):
                    for n1 in T.vectorized(vn):
                        if a_t:
                            acc[m1, n1] = acc[m1, n1] + A[kk, m0 * rm + m1] * Bk[kk, n0 * vn + n1]
                        else:
                            acc[m1, n1] = acc[m1, n1] + A[m0 * rm + m1, kk] * Bk[kk, n0 * vn + n1]
            for m1 in T.unroll(rm):
                for n1 in T.vectorized(vn):
                    C[m0 * rm + m1, n0 * vn + n1] = acc[m1, n1]


def _check(dtype):
    if dtype not in _DT:
        raise NotImplementedError(f"tvm cpu: dtype {dtype!r} not supported")


def make_forward_cpu(head_dim, value_dim, window, dtype, gated, group, config):
    D, DV, G = int(head_dim), int(value_dim), int(group)
    W = int(window or 0)  # 0: full causal
    BM, BN = int(config.block_m), int(config.block_n)
    _check(dtype)
    dt = _DT[dtype]
    gated = bool(gated)
    RM, VN = knobs(config)
    rm_s, vn_s = _fit(RM, BN), _fit(VN, BM)  # S^T [BN, BM]
    rm_o, vn_o = _fit(RM, BM), _fit(VN, DV)  # O [BM, DV]

    @T.prim_func
    def gfwa_fwd(
        q_h: T.handle,
        k_h: T.handle,
        v_h: T.handle,
        c_h: T.handle,
        o_h: T.handle,
        lse_h: T.handle,
        scale: T.float32,
    ):
        T.func_attr({"global_symbol": "gfwa_fwd", "tirx.noalias": True})
        B = T.int64()
        L = T.int64()
        HQ = T.int64()
        HKV = T.int64()
        CB = T.int64()
        CH = T.int64()
        CT = T.int64()
        q = T.match_buffer(q_h, (B, L, HQ, D), dt)
        k = T.match_buffer(k_h, (B, L, HKV, D), dt)
        v = T.match_buffer(v_h, (B, L, HKV, DV), dt)
        c = T.match_buffer(c_h, (CB, CH, CT), "float64")
        o = T.match_buffer(o_h, (B, L, HQ, DV), dt)
        lse = T.match_buffer(lse_h, (B, HQ, L), "float32")
        for tile in T.parallel(B * HQ * ((L + BM - 1) // BM)):
            qt_s = T.alloc_buffer((D, BM), "float32")
            k_s = T.alloc_buffer((BN, D), "float32")
            v_s = T.alloc_buffer((BN, DV), "float32")
            ck_s = T.alloc_buffer((BN,), "float32")
            s_s = T.alloc_buffer((BN, BM), "float32")
            acc_s = T.alloc_buffer((BM, DV), "float32")
            cq_s = T.alloc_buffer((BM,), "float32")
            m_s = T.alloc_buffer((BM,), "float32")
            mx_s = T.alloc_buffer((BM,), "float32")
            al_s = T.alloc_buffer((BM,), "float32")
            l_s = T.alloc_buffer((BM,), "float32")
            nq = (L + BM - 1) // BM
            b = tile // (HQ * nq)
            h = tile // nq % HQ
            i0 = tile % nq * BM
            hk = h // G
            if gated:
                cref = c[b, h, i0]
            for x in range(BM):
                ic = T.min(i0 + x, L - 1)
                for d in range(D):
                    qt_s[d, x] = T.Cast("float32", q[b, ic, h, d]) * (scale * T.float32(LOG2E))
                if gated:
                    cq_s[x] = T.Cast("float32", c[b, h, ic] - cref) * T.float32(LOG2E)
                else:
                    cq_s[x] = T.float32(0)
                m_s[x] = T.float32(MASK_T)
                l_s[x] = T.float32(0)
                for e in T.vectorized(DV):
                    acc_s[x, e] = T.float32(0)
            kt_hi = (T.min(L, i0 + BM) + BN - 1) // BN
            kt_lo = T.int64(0)
            if W > 0:
                kt_lo = T.max(i0 - (W - 1), T.int64(0)) // BN
            for kt in T.serial(kt_lo, kt_hi):
                j0 = kt * BN
                for jj in range(BN):
                    jc = T.min(j0 + jj, L - 1)
                    for d in T.vectorized(D):
                        k_s[jj, d] = T.Cast("float32", k[b, jc, hk, d])
                    for e in T.vectorized(DV):
                        v_s[jj, e] = T.Cast("float32", v[b, jc, hk, e])
                    if gated:
                        ck_s[jj] = T.Cast("float32", c[b, h, jc] - cref) * T.float32(LOG2E)
                    else:
                        ck_s[jj] = T.float32(0)
                _mm(s_s, k_s, qt_s, BN, BM, D, rm_s, vn_s, True, False)
                for r in T.vectorized(BM):
                    mx_s[r] = m_s[r]
                dd: T.int32 = T.Cast("int32", i0 - j0)
                if _interior(dd, BM, BN, W):  # no key of the tile is masked for any row
                    for jj in range(BN):
                        for r in T.vectorized(BM):
                            s_s[jj, r] = s_s[jj, r] + (cq_s[r] - ck_s[jj])
                            mx_s[r] = T.max(mx_s[r], s_s[jj, r])
                else:
                    for jj in range(BN):
                        for r in T.vectorized(BM):
                            s_s[jj, r] = T.Select(
                                _in_window(dd + r, jj, W),
                                s_s[jj, r] + (cq_s[r] - ck_s[jj]),
                                T.float32(MASK),
                            )
                            mx_s[r] = T.max(mx_s[r], s_s[jj, r])
                # m >= MASK_T, so a masked logit (MASK) gives exp2p(<= MASK - MASK_T) = 0
                for r in T.vectorized(BM):
                    al_s[r] = exp2p(m_s[r] - mx_s[r])
                    m_s[r] = mx_s[r]
                    l_s[r] = l_s[r] * al_s[r]
                for jj in range(BN):
                    for r in T.vectorized(BM):
                        s_s[jj, r] = exp2p(s_s[jj, r] - m_s[r])
                        l_s[r] = l_s[r] + s_s[jj, r]
                for x in range(BM):
                    for e in T.vectorized(DV):
                        acc_s[x, e] = acc_s[x, e] * al_s[x]
                _mm(acc_s, s_s, v_s, BM, DV, BN, rm_o, vn_o, False, True)
            for x in range(BM):
                if i0 + x < L:
                    inv: T.float32 = T.float32(1) / l_s[x]
                    for e in T.vectorized(DV):
                        o[b, i0 + x, h, e] = T.Cast(dt, acc_s[x, e] * inv)
                    lse[b, h, i0 + x] = (m_s[x] + T.log2(l_s[x])) * T.float32(LN2)

    return gfwa_fwd


def make_backward_q_cpu(head_dim, value_dim, window, dtype, gated, group, config):
    D, DV, G = int(head_dim), int(value_dim), int(group)
    W = int(window or 0)
    BM, BN = int(config.block_m), int(config.block_n)
    _check(dtype)
    dt = _DT[dtype]
    gated = bool(gated)
    RM, VN = knobs(config)
    rm_s, vn_s = _fit(RM, BN), _fit(VN, BM)  # S^T, dP^T [BN, BM]
    rm_q, vn_q = _fit(RM, BM), _fit(VN, D)  # dq [BM, D]

    @T.prim_func
    def gfwa_bwd_q(
        q_h: T.handle,
        k_h: T.handle,
        v_h: T.handle,
        c_h: T.handle,
        do_h: T.handle,
        lse_h: T.handle,
        delta_h: T.handle,
        dq_h: T.handle,
        drow_h: T.handle,
        scale: T.float32,
    ):
        T.func_attr({"global_symbol": "gfwa_bwd_q", "tirx.noalias": True})
        B = T.int64()
        L = T.int64()
        HQ = T.int64()
        HKV = T.int64()
        CB = T.int64()
        CH = T.int64()
        CT = T.int64()
        q = T.match_buffer(q_h, (B, L, HQ, D), dt)
        k = T.match_buffer(k_h, (B, L, HKV, D), dt)
        v = T.match_buffer(v_h, (B, L, HKV, DV), dt)
        c = T.match_buffer(c_h, (CB, CH, CT), "float64")
        do = T.match_buffer(do_h, (B, L, HQ, DV), dt)
        lse = T.match_buffer(lse_h, (B, HQ, L), "float32")
        delta = T.match_buffer(delta_h, (B, HQ, L), "float32")
        dq = T.match_buffer(dq_h, (B, L, HQ, D), dt)
        drow = T.match_buffer(drow_h, (B, HQ, L), "float32")
        for tile in T.parallel(B * HQ * ((L + BM - 1) // BM)):
            qt_s = T.alloc_buffer((D, BM), "float32")
            dot_s = T.alloc_buffer((DV, BM), "float32")
            k_s = T.alloc_buffer((BN, D), "float32")
            v_s = T.alloc_buffer((BN, DV), "float32")
            ck_s = T.alloc_buffer((BN,), "float32")
            s_s = T.alloc_buffer((BN, BM), "float32")
            dp_s = T.alloc_buffer((BN, BM), "float32")
            dq_s = T.alloc_buffer((BM, D), "float32")
            cq_s = T.alloc_buffer((BM,), "float32")
            lse_s = T.alloc_buffer((BM,), "float32")
            dl_s = T.alloc_buffer((BM,), "float32")
            row_s = T.alloc_buffer((BM,), "float32")
            nq = (L + BM - 1) // BM
            b = tile // (HQ * nq)
            h = tile // nq % HQ
            i0 = tile % nq * BM
            hk = h // G
            if gated:
                cref = c[b, h, i0]
            for x in range(BM):
                ic = T.min(i0 + x, L - 1)
                for d in range(D):
                    qt_s[d, x] = T.Cast("float32", q[b, ic, h, d]) * (scale * T.float32(LOG2E))
                for e in range(DV):
                    dot_s[e, x] = T.Cast("float32", do[b, ic, h, e])
                for d in T.vectorized(D):
                    dq_s[x, d] = T.float32(0)
                if gated:
                    cq_s[x] = T.Cast("float32", c[b, h, ic] - cref) * T.float32(LOG2E)
                else:
                    cq_s[x] = T.float32(0)
                lse_s[x] = lse[b, h, ic] * T.float32(LOG2E)
                dl_s[x] = delta[b, h, ic]
                row_s[x] = T.float32(0)
            kt_hi = (T.min(L, i0 + BM) + BN - 1) // BN
            kt_lo = T.int64(0)
            if W > 0:
                kt_lo = T.max(i0 - (W - 1), T.int64(0)) // BN
            for kt in T.serial(kt_lo, kt_hi):
                j0 = kt * BN
                for jj in range(BN):
                    jc = T.min(j0 + jj, L - 1)
                    for d in T.vectorized(D):
                        k_s[jj, d] = T.Cast("float32", k[b, jc, hk, d])
                    for e in T.vectorized(DV):
                        v_s[jj, e] = T.Cast("float32", v[b, jc, hk, e])
                    if gated:
                        ck_s[jj] = T.Cast("float32", c[b, h, jc] - cref) * T.float32(LOG2E)
                    else:
                        ck_s[jj] = T.float32(0)
                _mm(s_s, k_s, qt_s, BN, BM, D, rm_s, vn_s, True, False)
                _mm(dp_s, v_s, dot_s, BN, BM, DV, rm_s, vn_s, True, False)
                dd: T.int32 = T.Cast("int32", i0 - j0)
                if _interior(dd, BM, BN, W):
                    for jj in range(BN):
                        for r in T.vectorized(BM):
                            s_s[jj, r] = exp2p(s_s[jj, r] + (cq_s[r] - ck_s[jj]) - lse_s[r])
                            dp_s[jj, r] = s_s[jj, r] * (dp_s[jj, r] - dl_s[r])
                            row_s[r] = row_s[r] + dp_s[jj, r]
                else:
                    for jj in range(BN):
                        for r in T.vectorized(BM):
                            s_s[jj, r] = exp2p(
                                T.Select(
                                    _in_window(dd + r, jj, W),
                                    s_s[jj, r] + (cq_s[r] - ck_s[jj]) - lse_s[r],
                                    T.float32(MASK),
                                )
                            )
                            dp_s[jj, r] = s_s[jj, r] * (dp_s[jj, r] - dl_s[r])
                            row_s[r] = row_s[r] + dp_s[jj, r]
                _mm(dq_s, dp_s, k_s, BM, D, BN, rm_q, vn_q, False, True)
            for x in range(BM):
                if i0 + x < L:
                    for d in T.vectorized(D):
                        dq[b, i0 + x, h, d] = T.Cast(dt, dq_s[x, d] * scale)
                    drow[b, h, i0 + x] = row_s[x]

    return gfwa_bwd_q


def make_backward_kv_cpu(head_dim, value_dim, window, dtype, gated, group, config):
    D, DV, G = int(head_dim), int(value_dim), int(group)
    W = int(window or 0)
    BM, BN = int(config.block_m), int(config.block_n)
    _check(dtype)
    dt = _DT[dtype]
    gated = bool(gated)
    RM, VN = knobs(config)
    rm_s, vn_s = _fit(RM, BM), _fit(VN, BN)  # S, dP [BM, BN]
    rm_k, vn_k = _fit(RM, BN), _fit(VN, D)  # dk [BN, D]
    vn_v = _fit(VN, DV)  # dv [BN, DV]

    @T.prim_func
    def gfwa_bwd_kv(
        q_h: T.handle,
        k_h: T.handle,
        v_h: T.handle,
        c_h: T.handle,
        do_h: T.handle,
        lse_h: T.handle,
        delta_h: T.handle,
        dk_h: T.handle,
        dv_h: T.handle,
        dcol_h: T.handle,
        scale: T.float32,
    ):
        T.func_attr({"global_symbol": "gfwa_bwd_kv", "tirx.noalias": True})
        B = T.int64()
        L = T.int64()
        HQ = T.int64()
        HKV = T.int64()
        CB = T.int64()
        CH = T.int64()
        CT = T.int64()
        q = T.match_buffer(q_h, (B, L, HQ, D), dt)
        k = T.match_buffer(k_h, (B, L, HKV, D), dt)
        v = T.match_buffer(v_h, (B, L, HKV, DV), dt)
        c = T.match_buffer(c_h, (CB, CH, CT), "float64")
        do = T.match_buffer(do_h, (B, L, HQ, DV), dt)
        lse = T.match_buffer(lse_h, (B, HQ, L), "float32")
        delta = T.match_buffer(delta_h, (B, HQ, L), "float32")
        dk = T.match_buffer(dk_h, (B, L, HKV, D), dt)
        dv = T.match_buffer(dv_h, (B, L, HKV, DV), dt)
        dcol = T.match_buffer(dcol_h, (B, HQ, L), "float32")
        for tile in T.parallel(B * HKV * ((L + BN - 1) // BN)):
            kt_s = T.alloc_buffer((D, BN), "float32")
            vt_s = T.alloc_buffer((DV, BN), "float32")
            ck_s = T.alloc_buffer((BN,), "float32")
            col_s = T.alloc_buffer((BN,), "float32")
            dk_s = T.alloc_buffer((BN, D), "float32")
            dv_s = T.alloc_buffer((BN, DV), "float32")
            q_s = T.alloc_buffer((BM, D), "float32")
            do_s = T.alloc_buffer((BM, DV), "float32")
            s_s = T.alloc_buffer((BM, BN), "float32")
            dp_s = T.alloc_buffer((BM, BN), "float32")
            cq_s = T.alloc_buffer((BM,), "float32")
            lse_s = T.alloc_buffer((BM,), "float32")
            dl_s = T.alloc_buffer((BM,), "float32")
            nk = (L + BN - 1) // BN
            b = tile // (HKV * nk)
            hk = tile // nk % HKV
            j0 = tile % nk * BN
            for x in range(BN):
                jc = T.min(j0 + x, L - 1)
                for d in range(D):
                    kt_s[d, x] = T.Cast("float32", k[b, jc, hk, d]) * (scale * T.float32(LOG2E))
                for e in range(DV):
                    vt_s[e, x] = T.Cast("float32", v[b, jc, hk, e])
                for d in T.vectorized(D):
                    dk_s[x, d] = T.float32(0)
                for e in T.vectorized(DV):
                    dv_s[x, e] = T.float32(0)
            qt_hi = (L + BM - 1) // BM
            if W > 0:
                qt_hi = (T.min(L, j0 + BN + W - 1) + BM - 1) // BM
            for g in range(G):
                h = hk * G + g
                if gated:
                    cref = c[b, h, j0]
                for x in range(BN):
                    if gated:
                        ck_s[x] = T.Cast(
                            "float32", c[b, h, T.min(j0 + x, L - 1)] - cref
                        ) * T.float32(LOG2E)
                    else:
                        ck_s[x] = T.float32(0)
                    col_s[x] = T.float32(0)
                for qt in T.serial(j0 // BM, qt_hi):
                    i0 = qt * BM
                    for ii in range(BM):
                        ic = T.min(i0 + ii, L - 1)
                        for d in T.vectorized(D):
                            q_s[ii, d] = T.Cast("float32", q[b, ic, h, d])
                        for e in T.vectorized(DV):
                            do_s[ii, e] = T.Cast("float32", do[b, ic, h, e])
                        if gated:
                            cq_s[ii] = T.Cast("float32", c[b, h, ic] - cref) * T.float32(LOG2E)
                        else:
                            cq_s[ii] = T.float32(0)
                        lse_s[ii] = lse[b, h, ic] * T.float32(LOG2E)
                        dl_s[ii] = delta[b, h, ic]
                    _mm(s_s, q_s, kt_s, BM, BN, D, rm_s, vn_s, True, False)
                    _mm(dp_s, do_s, vt_s, BM, BN, DV, rm_s, vn_s, True, False)
                    dd: T.int32 = T.Cast("int32", i0 - j0)
                    nv: T.int32 = T.Cast("int32", T.min(L - i0, T.int64(BM)))  # valid rows
                    if _interior(dd, BM, BN, W) and nv == BM:
                        for ii in range(BM):
                            for jj in T.vectorized(BN):
                                s_s[ii, jj] = exp2p(
                                    s_s[ii, jj] + (cq_s[ii] - ck_s[jj]) - lse_s[ii]
                                )
                                dp_s[ii, jj] = s_s[ii, jj] * (dp_s[ii, jj] - dl_s[ii])
                                col_s[jj] = col_s[jj] + dp_s[ii, jj]
                    else:
                        for ii in range(BM):
                            for jj in T.vectorized(BN):
                                s_s[ii, jj] = exp2p(
                                    T.Select(
                                        _in_window(dd + ii, jj, W) and (ii < nv),
                                        s_s[ii, jj] + (cq_s[ii] - ck_s[jj]) - lse_s[ii],
                                        T.float32(MASK),
                                    )
                                )
                                dp_s[ii, jj] = s_s[ii, jj] * (dp_s[ii, jj] - dl_s[ii])
                                col_s[jj] = col_s[jj] + dp_s[ii, jj]
                    _mm(dv_s, s_s, do_s, BN, DV, BM, rm_k, vn_v, False, True)
                    _mm(dk_s, dp_s, q_s, BN, D, BM, rm_k, vn_k, False, True)
                for x in range(BN):
                    if j0 + x < L:
                        dcol[b, h, j0 + x] = col_s[x]
            for x in range(BN):
                if j0 + x < L:
                    for d in T.vectorized(D):
                        dk[b, j0 + x, hk, d] = T.Cast(dt, dk_s[x, d] * scale)
                    for e in T.vectorized(DV):
                        dv[b, j0 + x, hk, e] = T.Cast(dt, dv_s[x, e])

    return gfwa_bwd_kv
