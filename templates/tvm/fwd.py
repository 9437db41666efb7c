"""GatedFWA forward as a TensorIR PrimFunc factory (TVM 0.27, TVMScript `tvm.script.tirx`).

Imports nothing from gfwagen (loaded by path through gfwagen.template_loader).

`make_forward(head_dim, value_dim, window, dtype, gated, group, config, target="cpu")` closes
over the specialization and returns a PrimFunc

    gfwa_fwd(q [B,T,Hq,D] dt, k [B,T,Hkv,D] dt, v [B,T,Hkv,Dv] dt,
             c [*,*,*] float64 (prefix sums [B,Hq,T]; a dummy when ungated),
             o [B,T,Hq,Dv] dt, lse [B,Hq,T] float32, scale: float32)

B, T, Hq, Hkv are symbolic. FlashAttention-2 structure: one work item per (batch, query head,
query tile of block_m rows); it visits only the key tiles of block_n keys that intersect the
tile's window [i0 - W + 1, i0 + block_m - 1], keeps the online softmax (running max m, running
sum l, fp32 accumulator) per row in the log2 domain, and writes o and the natural-log lse.

The gate: per tile a float64 reference cref = c[b, h, i0] is subtracted from every prefix sum it
reads before narrowing to fp32, so c_i - c_j carries the error of a sum over at most
W + block_m positions (GATEDFWA.md section 3).

Masked entries get a finite sentinel logit (-1e30) and an explicit select to p = 0, so no
-inf - -inf can occur, whatever fast-math flags the code generator uses.

target="cpu": returns cpu.make_forward_cpu (register-blocked micro-kernels, see cpu.py).
target="gpu": this function's body, on CUDA cores (fp16/bf16 with head dims that are multiples
of 16 use the tensor-core forward in fwd_cuda.py instead): the outer loop is blockIdx.x, one
thread per query row (block_m threads), the K/V tiles and the tile's gate sums are staged
cooperatively in shared memory between barriers; per-row state lives in registers/local memory.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .cpu import make_forward_cpu
from .staging import LOG2E, stage_gate, stage_rows

_DT = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
LN2 = 0.6931471805599453
MASK = -1.0e30  # finite "minus infinity" for masked logits (log2 domain)
MASK_T = -5.0e29  # anything below this is a masked logit


def make_forward(head_dim, value_dim, window, dtype, gated, group, config, target="cpu"):
    D, DV, G = int(head_dim), int(value_dim), int(group)
    W = int(window or 0)  # 0: full causal
    BM, BN = int(config.block_m), int(config.block_n)
    if dtype not in _DT:
        raise NotImplementedError(f"tvm forward: dtype {dtype!r} not supported")
    if target not in ("cpu", "gpu"):
        raise ValueError(f"target must be 'cpu' or 'gpu', got {target!r}")
    if target == "cpu":  # register-blocked CPU kernel (cpu.py)
        return make_forward_cpu(D, DV, W, dtype, gated, G, config)
    dt = _DT[dtype]
    gated = bool(gated)

    # cooperative staging: ceil(n / BM) rounds of the block's BM threads
    NK = (BN * D + BM - 1) // BM
    NV = (BN * DV + BM - 1) // BM
    NC = (BN + BM - 1) // BM

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
        for tile in T.thread_binding(B * HQ * ((L + BM - 1) // BM), thread="blockIdx.x"):
            kt_s = T.alloc_buffer((D, BN), "float32", scope="shared")
            v_s = T.alloc_buffer((BN, DV), "float32", scope="shared")
            ck_s = T.alloc_buffer((BN,), "float32", scope="shared")
            # one query row per thread: its private state is a single row
            q_r = T.alloc_buffer((1, D), "float32", scope="local")
            cq_r = T.alloc_buffer((1,), "float32", scope="local")
            m_r = T.alloc_buffer((1,), "float32", scope="local")
            l_r = T.alloc_buffer((1,), "float32", scope="local")
            acc_r = T.alloc_buffer((1, DV), "float32", scope="local")
            s_r = T.alloc_buffer((BN,), "float32", scope="local")
            nq = (L + BM - 1) // BM
            b = tile // (HQ * nq)
            h = tile // nq % HQ
            i0 = tile % nq * BM
            hk = h // G
            # the gate's float64 reference (bound when ungated too: stage_gate takes it)
            cref = c[b, h, i0] if gated else T.float64(0)
            # ---- per-row init: q pre-scaled into the log2 domain, gate sums, softmax state
            for x in T.thread_binding(BM, thread="threadIdx.x"):
                ic = T.min(i0 + x, L - 1)
                for d in range(D):
                    q_r[0, d] = T.Cast("float32", q[b, ic, h, d]) * (scale * T.float32(LOG2E))
                if gated:
                    cq_r[0] = T.Cast("float32", c[b, h, ic] - cref) * T.float32(LOG2E)
                else:
                    cq_r[0] = T.float32(0)
                m_r[0] = T.float32(MASK)
                l_r[0] = T.float32(0)
                for e in range(DV):
                    acc_r[0, e] = T.float32(0)
            # ---- key tiles intersecting the window of rows [i0, i0 + BM)
            kt_hi = (T.min(L, i0 + BM) + BN - 1) // BN
            kt_lo = T.int64(0)
            if W > 0:
                kt_lo = T.max(i0 - (W - 1), T.int64(0)) // BN
            for kt in T.serial(kt_lo, kt_hi):
                j0 = kt * BN
                T.tvm_storage_sync("shared")
                for x in T.thread_binding(BM, thread="threadIdx.x"):
                    stage_rows(kt_s, True, k, b, hk, j0, BN, D, NK, BM, x, L)
                    stage_rows(v_s, False, v, b, hk, j0, BN, DV, NV, BM, x, L)
                    stage_gate(ck_s, gated, c, b, h, j0, BN, NC, BM, x, cref, L)
                T.tvm_storage_sync("shared")
                for x in T.thread_binding(BM, thread="threadIdx.x"):
                    i = i0 + x
                    for jj in range(BN):
                        s_r[jj] = T.float32(0)
                    for d in range(D):
                        for jj in range(BN):
                            s_r[jj] = s_r[jj] + q_r[0, d] * kt_s[d, jj]
                    for jj in range(BN):
                        if W > 0:
                            s_r[jj] = T.if_then_else(
                                (j0 + jj <= i) and (j0 + jj > i - W) and (i < L),
                                s_r[jj] + (cq_r[0] - ck_s[jj]),
                                T.float32(MASK),
                            )
                        else:
                            s_r[jj] = T.if_then_else(
                                (j0 + jj <= i) and (i < L),
                                s_r[jj] + (cq_r[0] - ck_s[jj]),
                                T.float32(MASK),
                            )
                    mx: T.float32 = m_r[0]
                    for jj in range(BN):
                        mx = T.max(mx, s_r[jj])
                    alpha: T.float32 = T.exp2(m_r[0] - mx)
                    for jj in range(BN):
                        s_r[jj] = T.if_then_else(
                            s_r[jj] > T.float32(MASK_T), T.exp2(s_r[jj] - mx), T.float32(0)
                        )
                    psum: T.float32 = T.float32(0)
                    for jj in range(BN):
                        psum = psum + s_r[jj]
                    l_r[0] = l_r[0] * alpha + psum
                    m_r[0] = mx
                    for e in range(DV):
                        acc_r[0, e] = acc_r[0, e] * alpha
                    for jj in range(BN):
                        for e in range(DV):
                            acc_r[0, e] = acc_r[0, e] + s_r[jj] * v_s[jj, e]
            # ---- epilogue
            for x in T.thread_binding(BM, thread="threadIdx.x"):
                if i0 + x < L:
                    inv: T.float32 = T.float32(1) / l_r[0]
                    for e in range(DV):
                        o[b, i0 + x, h, e] = T.Cast(dt, acc_r[0, e] * inv)
                    lse[b, h, i0 + x] = (m_r[0] + T.log2(l_r[0])) * T.float32(LN2)

    return gfwa_fwd
