"""GatedFWA forward on NVIDIA tensor cores, as a TensorIR PrimFunc factory (TVM 0.27).

Imports nothing from gfwagen (loaded by path through gfwagen.template_loader).

`make_forward_tc(head_dim, value_dim, window, dtype, gated, group, config)` closes over the
specialization (fp16/bf16, head dims multiples of 16) and the config (block_m = 16 rows per
warp x warps, block_n keys per loaded tile, num_stages 1 or 2, extra sub_n: keys per softmax
step, block_n by default; a tile of block_n keys is then block_n / sub_n steps between two
barriers, while the score fragments stay sub_n wide) and returns a PrimFunc with the same
signature as fwd.make_forward:

    gfwa_fwd(q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv], c [*,*,*] float64 ([B,Hq,T] prefix
             sums; a dummy when ungated), o [B,T,Hq,Dv], lse [B,Hq,T] float32, scale)

FlashAttention-2 structure at warp level, written out instead of scheduled: TVM's tensorize
intrinsics cover a GEMM, not the softmax that has to sit between the two products with its
operands still in registers. Each warp owns 16 query rows and runs mma.sync m16n8k16
(fp32 accumulate) for S = Q K^T and O += P V. The S accumulator fragment of two adjacent
8-key blocks is exactly the A fragment of a 16-key step of P V, so P never leaves
registers. K and V tiles go global -> shared by cp.async (16 B per copy; two stages overlap
the next tile's copy with this tile's math) and shared -> registers by ldmatrix (V with
.trans, which turns its row-major tile into the B fragment). Shared rows are padded by 8
elements, so the 8 row addresses of one ldmatrix fall in 8 distinct bank groups.

Fragment coordinates (PTX ISA, mma.m16n8k16): lane = 4 g + t; accumulator element
r * 2 + e of an 8-column block holds (row g + 8 r, column 2 t + e); A register u (two
elements e) holds (row g + 8 (u % 2), k 2 t + 8 (u // 2) + e).

The gate: per query tile a float64 reference cref = c[b, h, i0] is subtracted from every
prefix sum before narrowing to fp32 (as in fwd.py), so the logits carry the error of a sum
over at most W + block_m positions. Logits are in log2 units: s = (q.k) scale log2(e) +
(c_i - c_j) log2(e). Tiles entirely inside every row's window skip the mask.
"""

from __future__ import annotations

from tvm.script import tirx as T

_DT = {"fp16": "float16", "bf16": "bfloat16"}
_PTX = {"fp16": "fp16", "bf16": "bf16"}
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MASK = -1.0e30  # finite "minus infinity" for masked logits (log2 domain)
MASK_T = -5.0e29  # anything below this is a masked logit
PAD = 8  # elements of padding per shared row (16 bytes)


def supports(head_dim, value_dim, dtype, config) -> str | None:
    """None when this template can run the specialization, else why not."""
    if dtype not in _DT:
        return f"dtype {dtype!r} (tensor cores: fp16, bf16)"
    if head_dim % 16 or value_dim % 16:
        return f"head dims {head_dim}/{value_dim} (multiples of 16)"
    bm, bn, ns = int(config.block_m), int(config.block_n), int(config.num_stages)
    if bm % 16 or not 16 <= bm <= 256:
        return f"block_m {bm} (16 rows per warp, 1 to 16 warps)"
    if bn % 16 or not 16 <= bn <= 256:
        return f"block_n {bn} (a multiple of 16, <= 256)"
    if ns not in (1, 2):
        return f"num_stages {ns} (1 or 2)"
    sn = int(config.get("sub_n", bn))
    if sn % 16 or bn % sn:
        return f"sub_n {sn} (a multiple of 16 dividing block_n {bn})"
    threads = 2 * bm  # 32 per warp, 16 rows per warp
    for dim in (head_dim, value_dim):
        if (bn * dim // 8) % threads:
            return f"block_n {bn} x dim {dim} / 8 copies not a multiple of {threads} threads"
    return None


def smem_bytes(head_dim, value_dim, config) -> int:
    bn, ns = int(config.block_n), int(config.num_stages)
    return ns * (bn * (head_dim + PAD) * 2 + bn * (value_dim + PAD) * 2 + bn * 4)


def make_forward_tc(head_dim, value_dim, window, dtype, gated, group, config):
    D, DV, G = int(head_dim), int(value_dim), int(group)
    W = int(window or 0)  # 0: full causal
    why = supports(D, DV, dtype, config)
    if why is not None:
        raise NotImplementedError(f"tvm tensor-core forward: unsupported {why}")
    dt, ptx = _DT[dtype], _PTX[dtype]
    gated = bool(gated)
    BM, BN, NS = int(config.block_m), int(config.block_n), int(config.num_stages)
    NW = BM // 16
    NT = 32 * NW
    KS = D + PAD  # shared row strides (elements)
    VS = DV + PAD
    NKC = BN * D // 8 // NT  # 16-byte copies per thread per K tile
    NVC = BN * DV // 8 // NT
    SN = int(config.get("sub_n", BN))  # keys per softmax step (a loaded tile holds BN // SN)
    NB = SN // 8  # 8-key accumulator blocks
    NDB = DV // 8  # 8-column output blocks

    # Macros expand inside gfwa_fwd; they see this factory's constants and take gfwa_fwd's
    # buffers and variables as arguments. A Python-valued argument (masked) selects code at
    # parse time.
    @T.macro
    def copy_rows(dst, src, kt, st, dim, stride, copies, b, hk, L, tx):
        # the tile's block_n rows of src [B, T, Hkv, dim] into dst (padded rows), 16 bytes
        # per cp.async; rows past the end are clamped to the last row: finite values that
        # the mask (j <= i) then excludes
        for rr in T.unroll(copies):
            ci = rr * NT + tx
            jr = ci // (dim // 8)
            T.ptx["cp.async.cg.shared.global"](
                T.address_of(dst[(st * BN + jr) * stride + ci % (dim // 8) * 8]),
                T.address_of(src[b, T.min(kt * BN + jr, L - 1), hk, ci % (dim // 8) * 8]),
                16,
            )

    @T.macro
    def load_tile(kt, st, k_s, v_s, ck_s, k, v, c, b, h, hk, i0, L, tx):
        copy_rows(k_s, k, kt, st, D, KS, NKC, b, hk, L, tx)
        copy_rows(v_s, v, kt, st, DV, VS, NVC, b, hk, L, tx)
        if gated:
            # block_n may exceed the thread count (16 rows = 32 threads, 64 keys)
            for rr in T.unroll((BN + NT - 1) // NT):
                if rr * NT + tx < BN:
                    ck_s[st * BN + rr * NT + tx] = T.Cast(
                        "float32", c[b, h, T.min(kt * BN + rr * NT + tx, L - 1)] - c[b, h, i0]
                    ) * T.float32(LOG2E)

    @T.macro
    def fragment_mma(trans, smem, smem_off, frag, a, a_off, c, c_block):
        # One ldmatrix.x4 loads the B fragments of two 8-column blocks (.trans: from a
        # row-major [k, n] tile); each feeds one m16n8k16 step into its accumulator block.
        T.ptx_legacy.ldmatrix(
            trans, 4, ".b16", frag.data, 0, smem.access_ptr("r"), smem_off, dtype=dt
        )
        for half in T.unroll(2):
            T.ptx_legacy.mma(
                "m16n8k16",
                "row",
                "col",
                ptx,
                ptx,
                "fp32",
                a.data,
                a_off,
                frag.data,
                half * 4,
                c.data,
                (c_block + half) * 4,
                False,
                dtype="float32",
            )

    @T.macro
    def scores(kb, k_s, kf, q_r, s_r, lane):
        # S = Q K^T: per 16-key pair one ldmatrix.x4 gives the B fragments of
        # two 8-key blocks for one 16-wide k step
        for x in T.unroll(NB * 4):
            s_r[x] = T.float32(0)
        for ks in T.unroll(D // 16):
            for nb in T.unroll(SN // 16):
                fragment_mma(
                    False,
                    k_s,
                    (kb + nb * 16 + lane // 16 * 8 + lane % 8) * KS + ks * 16 + lane // 8 % 2 * 8,
                    kf,
                    q_r,
                    ks * 8,
                    s_r,
                    nb * 2,
                )

    @T.macro
    def softmax_step(kb, dj, masked, s_r, ck_s, cq_r, m_r, l_r, acc, t4, sl2):
        for r in T.unroll(2):
            for nb in T.unroll(NB):
                for e in T.unroll(2):
                    x = nb * 4 + r * 2 + e
                    if gated:
                        s_r[x] = s_r[x] * sl2 + (cq_r[r] - ck_s[kb + nb * 8 + t4 * 2 + e])
                    else:
                        s_r[x] = s_r[x] * sl2
                    if masked:
                        # key minus query position, in int32 (dj: the tile's j0 - row0)
                        rel = dj + (nb * 8 - r * 8) + t4 * 2 + e
                        if W > 0:
                            s_r[x] = T.if_then_else(rel <= 0 and rel > -W, s_r[x], T.float32(MASK))
                        else:
                            s_r[x] = T.if_then_else(rel <= 0, s_r[x], T.float32(MASK))
            mx: T.float32 = m_r[r]
            for nb in T.unroll(NB):
                for e in T.unroll(2):
                    mx = T.max(mx, s_r[nb * 4 + r * 2 + e])
            mx = T.max(mx, T.cuda.__shfl_xor_sync(T.uint32(0xFFFFFFFF), mx, 1, 32))
            mx = T.max(mx, T.cuda.__shfl_xor_sync(T.uint32(0xFFFFFFFF), mx, 2, 32))
            alpha: T.float32 = T.exp2(m_r[r] - mx)
            m_r[r] = mx
            psum: T.float32 = T.float32(0)
            for nb in T.unroll(NB):
                for e in T.unroll(2):
                    x = nb * 4 + r * 2 + e
                    if masked:
                        s_r[x] = T.if_then_else(
                            s_r[x] > T.float32(MASK_T),
                            T.exp2(s_r[x] - mx),
                            T.float32(0),
                        )
                    else:
                        s_r[x] = T.exp2(s_r[x] - mx)
                    psum = psum + s_r[x]
            l_r[r] = l_r[r] * alpha + psum
            for db in T.unroll(NDB):
                for e in T.unroll(2):
                    acc[db * 4 + r * 2 + e] = acc[db * 4 + r * 2 + e] * alpha

    @T.macro
    def accumulate(kb, s_r, p_r, v_s, vf, acc, lane):
        # P (the S fragments, narrowed) as the A operand of O += P V
        for kk in T.unroll(SN // 16):
            for u in T.unroll(4):
                for e in T.unroll(2):
                    p_r[kk * 8 + u * 2 + e] = T.Cast(dt, s_r[(kk * 2 + u // 2) * 4 + u % 2 * 2 + e])
        for kk in T.unroll(SN // 16):
            for db in T.unroll(DV // 16):
                fragment_mma(
                    True,
                    v_s,
                    (kb + kk * 16 + lane // 8 % 2 * 8 + lane % 8) * VS + db * 16 + lane // 16 * 8,
                    vf,
                    p_r,
                    kk * 8,
                    acc,
                    db * 2,
                )

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
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                # flat buffers: a 2-D one would be compacted to the columns it touches,
                # which drops the bank-conflict padding
                k_s = T.alloc_buffer((NS * BN * KS,), dt, scope="shared.dyn")
                v_s = T.alloc_buffer((NS * BN * VS,), dt, scope="shared.dyn")
                ck_s = T.alloc_buffer((NS * BN,), "float32", scope="shared.dyn")
                q_r = T.alloc_buffer((D // 2,), dt, scope="local")
                s_r = T.alloc_buffer((NB * 4,), "float32", scope="local")
                p_r = T.alloc_buffer((SN // 2,), dt, scope="local")
                kf = T.alloc_buffer((8,), dt, scope="local")
                vf = T.alloc_buffer((8,), dt, scope="local")
                acc = T.alloc_buffer((NDB * 4,), "float32", scope="local")
                m_r = T.alloc_buffer((2,), "float32", scope="local")
                l_r = T.alloc_buffer((2,), "float32", scope="local")
                cq_r = T.alloc_buffer((2,), "float32", scope="local")
                nq = (L + BM - 1) // BM
                b = tile // (HQ * nq)
                h = tile // nq % HQ
                i0 = tile % nq * BM
                hk = h // G
                lane = tx % 32
                g = lane // 4
                t4 = lane % 4
                row0 = i0 + tx // 32 * 16 + g  # this thread's rows: row0, row0 + 8
                sl2 = scale * T.float32(LOG2E)
                # ---- Q fragments straight from global (read once per block)
                for ks in T.unroll(D // 16):
                    for u in T.unroll(4):
                        for e in T.unroll(2):
                            q_r[ks * 8 + u * 2 + e] = q[
                                b,
                                T.min(row0 + u % 2 * 8, L - 1),
                                h,
                                ks * 16 + u // 2 * 8 + t4 * 2 + e,
                            ]
                for r in T.unroll(2):
                    m_r[r] = T.float32(MASK)
                    l_r[r] = T.float32(0)
                    if gated:
                        cq_r[r] = T.Cast(
                            "float32", c[b, h, T.min(row0 + r * 8, L - 1)] - c[b, h, i0]
                        ) * T.float32(LOG2E)
                    else:
                        cq_r[r] = T.float32(0)
                for x in T.unroll(NDB * 4):
                    acc[x] = T.float32(0)
                kt_hi = (T.min(L, i0 + BM) + BN - 1) // BN
                kt_lo = T.int64(0)
                if W > 0:
                    kt_lo = T.max(i0 - (W - 1), T.int64(0)) // BN
                n_tiles = kt_hi - kt_lo

                if NS == 2:
                    if n_tiles > 0:
                        load_tile(kt_lo, 0, k_s, v_s, ck_s, k, v, c, b, h, hk, i0, L, tx)
                    T.ptx["cp.async.commit_group"]()
                for it in T.serial(T.Cast("int32", n_tiles)):
                    kt = kt_lo + T.Cast("int64", it)
                    st = it % NS
                    if NS == 2:
                        if T.Cast("int64", it) + 1 < n_tiles:
                            load_tile(kt + 1, 1 - st, k_s, v_s, ck_s, k, v, c, b, h, hk, i0, L, tx)
                        T.ptx["cp.async.commit_group"]()
                        T.ptx["cp.async.wait_group"](1)
                    else:
                        load_tile(kt, 0, k_s, v_s, ck_s, k, v, c, b, h, hk, i0, L, tx)
                        T.ptx["cp.async.commit_group"]()
                        T.ptx["cp.async.wait_group"](0)
                    T.tvm_storage_sync("shared")
                    for sub in T.unroll(BN // SN):
                        j0 = kt * BN + sub * SN
                        dj = T.Cast("int32", j0 - row0)
                        kb = st * BN + sub * SN  # the step's first key row in shared memory
                        scores(kb, k_s, kf, q_r, s_r, lane)
                        # interior: every key of the step is <= the block's first row and
                        # inside the last row's window
                        inside = j0 + SN - 1 <= i0
                        if W > 0:
                            inside = inside and j0 > i0 + BM - 1 - W
                        if inside:
                            softmax_step(kb, dj, False, s_r, ck_s, cq_r, m_r, l_r, acc, t4, sl2)
                        else:
                            softmax_step(kb, dj, True, s_r, ck_s, cq_r, m_r, l_r, acc, t4, sl2)
                        accumulate(kb, s_r, p_r, v_s, vf, acc, lane)
                    T.tvm_storage_sync("shared")
                # ---- epilogue: the row sums were per thread, add the quad's four
                for r in T.unroll(2):
                    lt: T.float32 = l_r[r]
                    lt = lt + T.cuda.__shfl_xor_sync(T.uint32(0xFFFFFFFF), lt, 1, 32)
                    lt = lt + T.cuda.__shfl_xor_sync(T.uint32(0xFFFFFFFF), lt, 2, 32)
                    inv: T.float32 = T.float32(1) / lt
                    ii = row0 + r * 8
                    if ii < L:
                        for db in T.unroll(NDB):
                            for e in T.unroll(2):
                                o[b, ii, h, db * 8 + t4 * 2 + e] = T.Cast(
                                    dt, acc[db * 4 + r * 2 + e] * inv
                                )
                        if t4 == 0:
                            lse[b, h, ii] = (m_r[r] + T.log2(lt)) * T.float32(LN2)

    return gfwa_fwd
