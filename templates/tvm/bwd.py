"""GatedFWA backward as TensorIR PrimFunc factories (TVM 0.27, TVMScript `tvm.script.tirx`).

Imports nothing from gfwagen (loaded by path through gfwagen.template_loader). Deterministic
split of GATEDFWA.md section 2, no atomics:

`make_backward_kv(...)` -> gfwa_bwd_kv(q, k, v, c, do, lse, delta, dk, dv, dcol, scale):
    one work item per (batch, kv head, key tile of block_n keys); it loops over the G query heads
    of the GQA group and, per head, over the query tiles of block_m rows that intersect the
    keys' window [j0, j0 + block_n - 1 + W - 1]; accumulates dk, dv over the whole group (fp32)
    and writes the per-query-head column sums of dS (dcol [B,Hq,T] fp32).
`make_backward_q(...)` -> gfwa_bwd_q(q, k, v, c, do, lse, delta, dq, drow, scale):
    one work item per (batch, query head, query tile), over the key tiles of its window, like the
    forward; writes dq and the row sums of dS (drow [B,Hq,T] fp32).

delta = rowsum(o * dO) [B,Hq,T] fp32 is an input (computed by the caller). lse is natural-log
[B,Hq,T] fp32, converted to the log2 domain inside. The gate's prefix sums c are float64
[B,Hq,T]; each work item subtracts a float64 reference (c at its tile's first position, per
head) before narrowing to fp32. Masked entries get P = 0 by an explicit select.

target="cpu": returns cpu.make_backward_kv_cpu / make_backward_q_cpu (register-blocked
micro-kernels, see cpu.py).
target="gpu": these functions' bodies, CUDA cores: outer loop blockIdx.x, one thread per row (key
row for bwd_kv, query row for bwd_q), tiles staged cooperatively in shared memory between
barriers; per-row state lives in registers/local memory.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .cpu import make_backward_kv_cpu, make_backward_q_cpu
from .staging import LOG2E, stage_gate, stage_rows

_DT = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
LN2 = 0.6931471805599453
MASK = -1.0e30  # finite "minus infinity" for masked logits (log2 domain)
MASK_T = -5.0e29  # anything below this is a masked logit


def _check(dtype, target):
    if dtype not in _DT:
        raise NotImplementedError(f"tvm backward: dtype {dtype!r} not supported")
    if target not in ("cpu", "gpu"):
        raise ValueError(f"target must be 'cpu' or 'gpu', got {target!r}")


def make_backward_kv(head_dim, value_dim, window, dtype, gated, group, config, target="cpu"):
    D, DV, G = int(head_dim), int(value_dim), int(group)
    W = int(window or 0)
    BM, BN = int(config.block_m), int(config.block_n)
    _check(dtype, target)
    if target == "cpu":  # register-blocked CPU kernel (cpu.py)
        return make_backward_kv_cpu(D, DV, W, dtype, gated, G, config)
    dt = _DT[dtype]
    gated = bool(gated)

    # cooperative staging: ceil(n / BN) rounds of the block's BN threads
    NQ_ = (BM * D + BN - 1) // BN
    NO_ = (BM * DV + BN - 1) // BN
    NS_ = (BM + BN - 1) // BN

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
        for tile in T.thread_binding(B * HKV * ((L + BN - 1) // BN), thread="blockIdx.x"):
            q_s = T.alloc_buffer((BM, D), "float32", scope="shared")
            do_s = T.alloc_buffer((BM, DV), "float32", scope="shared")
            cq_s = T.alloc_buffer((BM,), "float32", scope="shared")
            lse_s = T.alloc_buffer((BM,), "float32", scope="shared")
            dl_s = T.alloc_buffer((BM,), "float32", scope="shared")
            # one key row per thread: its private state is a single row
            k_r = T.alloc_buffer((1, D), "float32", scope="local")
            v_r = T.alloc_buffer((1, DV), "float32", scope="local")
            ck_r = T.alloc_buffer((1,), "float32", scope="local")
            dk_r = T.alloc_buffer((1, D), "float32", scope="local")
            dv_r = T.alloc_buffer((1, DV), "float32", scope="local")
            col_r = T.alloc_buffer((1,), "float32", scope="local")
            p_r = T.alloc_buffer((BM,), "float32", scope="local")
            dp_r = T.alloc_buffer((BM,), "float32", scope="local")
            nk = (L + BN - 1) // BN
            b = tile // (HKV * nk)
            hk = tile // nk % HKV
            j0 = tile % nk * BN
            for x in T.thread_binding(BN, thread="threadIdx.x"):
                jc = T.min(j0 + x, L - 1)
                for d in range(D):
                    k_r[0, d] = T.Cast("float32", k[b, jc, hk, d]) * (scale * T.float32(LOG2E))
                    dk_r[0, d] = T.float32(0)
                for e in range(DV):
                    v_r[0, e] = T.Cast("float32", v[b, jc, hk, e])
                    dv_r[0, e] = T.float32(0)
            qt_hi = (L + BM - 1) // BM
            if W > 0:
                qt_hi = (T.min(L, j0 + BN + W - 1) + BM - 1) // BM
            for g in range(G):
                h = hk * G + g
                # the gate's float64 reference (bound when ungated too: stage_gate takes it)
                cref = c[b, h, j0] if gated else T.float64(0)
                for x in T.thread_binding(BN, thread="threadIdx.x"):
                    if gated:
                        ck_r[0] = T.Cast(
                            "float32", c[b, h, T.min(j0 + x, L - 1)] - cref
                        ) * T.float32(LOG2E)
                    else:
                        ck_r[0] = T.float32(0)
                    col_r[0] = T.float32(0)
                for qt in T.serial(j0 // BM, qt_hi):
                    i0 = qt * BM
                    T.tvm_storage_sync("shared")
                    for x in T.thread_binding(BN, thread="threadIdx.x"):
                        stage_rows(q_s, False, q, b, h, i0, BM, D, NQ_, BN, x, L)
                        stage_rows(do_s, False, do, b, h, i0, BM, DV, NO_, BN, x, L)
                        stage_gate(cq_s, gated, c, b, h, i0, BM, NS_, BN, x, cref, L)
                        for r in range(NS_):
                            if r * BN + x < BM:
                                lse_s[r * BN + x] = lse[
                                    b, h, T.min(i0 + r * BN + x, L - 1)
                                ] * T.float32(LOG2E)
                                dl_s[r * BN + x] = delta[b, h, T.min(i0 + r * BN + x, L - 1)]
                    T.tvm_storage_sync("shared")
                    for x in T.thread_binding(BN, thread="threadIdx.x"):
                        j = j0 + x
                        for ii in range(BM):
                            p_r[ii] = T.float32(0)
                            dp_r[ii] = T.float32(0)
                        for d in range(D):
                            for ii in range(BM):
                                p_r[ii] = p_r[ii] + k_r[0, d] * q_s[ii, d]
                        for e in range(DV):
                            for ii in range(BM):
                                dp_r[ii] = dp_r[ii] + v_r[0, e] * do_s[ii, e]
                        for ii in range(BM):
                            if W > 0:
                                p_r[ii] = T.if_then_else(
                                    (j <= i0 + ii) and (i0 + ii < L) and (i0 + ii - j < W),
                                    T.exp2(p_r[ii] + (cq_s[ii] - ck_r[0]) - lse_s[ii]),
                                    T.float32(0),
                                )
                            else:
                                p_r[ii] = T.if_then_else(
                                    (j <= i0 + ii) and (i0 + ii < L),
                                    T.exp2(p_r[ii] + (cq_s[ii] - ck_r[0]) - lse_s[ii]),
                                    T.float32(0),
                                )
                            dp_r[ii] = p_r[ii] * (dp_r[ii] - dl_s[ii])
                        csum: T.float32 = T.float32(0)
                        for ii in range(BM):
                            csum = csum + dp_r[ii]
                            for e in range(DV):
                                dv_r[0, e] = dv_r[0, e] + p_r[ii] * do_s[ii, e]
                            for d in range(D):
                                dk_r[0, d] = dk_r[0, d] + dp_r[ii] * q_s[ii, d]
                        col_r[0] = col_r[0] + csum
                for x in T.thread_binding(BN, thread="threadIdx.x"):
                    if j0 + x < L:
                        dcol[b, h, j0 + x] = col_r[0]
            for x in T.thread_binding(BN, thread="threadIdx.x"):
                if j0 + x < L:
                    for d in range(D):
                        dk[b, j0 + x, hk, d] = T.Cast(dt, dk_r[0, d] * scale)
                    for e in range(DV):
                        dv[b, j0 + x, hk, e] = T.Cast(dt, dv_r[0, e])

    return gfwa_bwd_kv


def make_backward_q(head_dim, value_dim, window, dtype, gated, group, config, target="cpu"):
    D, DV, G = int(head_dim), int(value_dim), int(group)
    W = int(window or 0)
    BM, BN = int(config.block_m), int(config.block_n)
    _check(dtype, target)
    if target == "cpu":  # register-blocked CPU kernel (cpu.py)
        return make_backward_q_cpu(D, DV, W, dtype, gated, G, config)
    dt = _DT[dtype]
    gated = bool(gated)

    # cooperative staging: ceil(n / BM) rounds of the block's BM threads
    NK_ = (BN * D + BM - 1) // BM
    NV_ = (BN * DV + BM - 1) // BM
    NC_ = (BN + BM - 1) // BM

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
        for tile in T.thread_binding(B * HQ * ((L + BM - 1) // BM), thread="blockIdx.x"):
            k_s = T.alloc_buffer((BN, D), "float32", scope="shared")
            vt_s = T.alloc_buffer((DV, BN), "float32", scope="shared")
            ck_s = T.alloc_buffer((BN,), "float32", scope="shared")
            # one query row per thread: its private state is a single row
            q_r = T.alloc_buffer((1, D), "float32", scope="local")
            do_r = T.alloc_buffer((1, DV), "float32", scope="local")
            cq_r = T.alloc_buffer((1,), "float32", scope="local")
            lse_r = T.alloc_buffer((1,), "float32", scope="local")
            dl_r = T.alloc_buffer((1,), "float32", scope="local")
            dq_r = T.alloc_buffer((1, D), "float32", scope="local")
            row_r = T.alloc_buffer((1,), "float32", scope="local")
            p_r = T.alloc_buffer((BN,), "float32", scope="local")
            dp_r = T.alloc_buffer((BN,), "float32", scope="local")
            nq = (L + BM - 1) // BM
            b = tile // (HQ * nq)
            h = tile // nq % HQ
            i0 = tile % nq * BM
            hk = h // G
            cref = c[b, h, i0] if gated else T.float64(0)
            for x in T.thread_binding(BM, thread="threadIdx.x"):
                ic = T.min(i0 + x, L - 1)
                for d in range(D):
                    q_r[0, d] = T.Cast("float32", q[b, ic, h, d]) * (scale * T.float32(LOG2E))
                    dq_r[0, d] = T.float32(0)
                for e in range(DV):
                    do_r[0, e] = T.Cast("float32", do[b, ic, h, e])
                if gated:
                    cq_r[0] = T.Cast("float32", c[b, h, ic] - cref) * T.float32(LOG2E)
                else:
                    cq_r[0] = T.float32(0)
                lse_r[0] = lse[b, h, ic] * T.float32(LOG2E)
                dl_r[0] = delta[b, h, ic]
                row_r[0] = T.float32(0)
            kt_hi = (T.min(L, i0 + BM) + BN - 1) // BN
            kt_lo = T.int64(0)
            if W > 0:
                kt_lo = T.max(i0 - (W - 1), T.int64(0)) // BN
            for kt in T.serial(kt_lo, kt_hi):
                j0 = kt * BN
                T.tvm_storage_sync("shared")
                for x in T.thread_binding(BM, thread="threadIdx.x"):
                    stage_rows(k_s, False, k, b, hk, j0, BN, D, NK_, BM, x, L)
                    stage_rows(vt_s, True, v, b, hk, j0, BN, DV, NV_, BM, x, L)
                    stage_gate(ck_s, gated, c, b, h, j0, BN, NC_, BM, x, cref, L)
                T.tvm_storage_sync("shared")
                for x in T.thread_binding(BM, thread="threadIdx.x"):
                    i = i0 + x
                    for jj in range(BN):
                        p_r[jj] = T.float32(0)
                        dp_r[jj] = T.float32(0)
                    for d in range(D):
                        for jj in range(BN):
                            p_r[jj] = p_r[jj] + q_r[0, d] * k_s[jj, d]
                    for e in range(DV):
                        for jj in range(BN):
                            dp_r[jj] = dp_r[jj] + do_r[0, e] * vt_s[e, jj]
                    for jj in range(BN):
                        if W > 0:
                            p_r[jj] = T.if_then_else(
                                (j0 + jj <= i) and (i < L) and (i - (j0 + jj) < W),
                                T.exp2(p_r[jj] + (cq_r[0] - ck_s[jj]) - lse_r[0]),
                                T.float32(0),
                            )
                        else:
                            p_r[jj] = T.if_then_else(
                                (j0 + jj <= i) and (i < L),
                                T.exp2(p_r[jj] + (cq_r[0] - ck_s[jj]) - lse_r[0]),
                                T.float32(0),
                            )
                        dp_r[jj] = p_r[jj] * (dp_r[jj] - dl_r[0])
                    rsum: T.float32 = T.float32(0)
                    for jj in range(BN):
                        rsum = rsum + dp_r[jj]
                        for d in range(D):
                            dq_r[0, d] = dq_r[0, d] + dp_r[jj] * k_s[jj, d]
                    row_r[0] = row_r[0] + rsum
            for x in T.thread_binding(BM, thread="threadIdx.x"):
                if i0 + x < L:
                    for d in range(D):
                        dq[b, i0 + x, h, d] = T.Cast(dt, dq_r[0, d] * scale)
                    drow[b, h, i0 + x] = row_r[0]

    return gfwa_bwd_q
