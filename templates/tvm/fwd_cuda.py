"""GatedFWA forward on NVIDIA tensor cores, as a TensorIR PrimFunc factory (TVM 0.27).

Imports nothing from gfwagen (loaded by path through gfwagen.template_loader).

`make_forward_tc(head_dim, value_dim, window, dtype, gated, group, config)` closes over the
specialization (fp16/bf16, head dims multiples of 16) and the config (block_m = 16 x warp_m
rows per warp x warps, block_n keys per loaded tile, num_stages 1 or 2; extras: sub_n, keys
per softmax step, block_n by default: a tile of block_n keys is then block_n / sub_n steps
between two barriers, while the score fragments stay sub_n wide; warp_m, 16-row blocks per
warp, 1 by default; q_smem, Q staged in shared memory, False by default) and returns a
PrimFunc with the same signature as fwd.make_forward:

    gfwa_fwd(q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv], c [*,*,*] float64 ([B,Hq,T] prefix
             sums; a dummy when ungated), o [B,T,Hq,Dv], lse [B,Hq,T] float32, scale)

FlashAttention-2 structure at warp level, written out instead of scheduled: TVM's tensorize
intrinsics cover a GEMM, not the softmax that has to sit between the two products with its
operands still in registers. Each warp owns 16 x warp_m query rows (contiguous; row block
mb at 16 mb) and runs mma.sync m16n8k16 (fp32 accumulate) for S = Q K^T and O += P V.
With warp_m = 2 every K or V fragment that ldmatrix reads from shared memory feeds two mmas,
one per row block: at one block per warp the kernel is bound by shared-memory reads (one
ldmatrix.x4 per two mmas). The price is a second 16 x Dv fp32 accumulator; q_smem pays
for it by re-reading Q's A fragments from shared memory per k step (ldmatrix) instead of
holding them all (D / 4 registers per block, 32 at D = 128). The S accumulator fragment
of two adjacent 8-key blocks is exactly the A fragment of a 16-key step of P V, so P never
leaves registers. K and V tiles go global -> shared by cp.async (16 B per copy; two stages overlap
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


def gate_input(config) -> str:
    """What the gated kernel reads for the gate: the float64 prefix sums of a launch of their
    own, "sums" (fwd_wgmma.py's pingpong kernel can take others)."""
    return "sums"


def supports(head_dim, value_dim, dtype, config) -> str | None:
    """None when this template can run the specialization, else why not."""
    if dtype not in _DT:
        return f"dtype {dtype!r} (tensor cores: fp16, bf16)"
    if head_dim % 16 or value_dim % 16:
        return f"head dims {head_dim}/{value_dim} (multiples of 16)"
    bm, bn, ns = int(config.block_m), int(config.block_n), int(config.num_stages)
    wm, qsm = config.get("warp_m", 1), config.get("q_smem", False)
    if type(wm) is not int or wm not in (1, 2):
        return f"warp_m {wm!r} (1 or 2 row blocks of 16 per warp)"
    if type(qsm) is not bool:
        return f"q_smem {qsm!r} (True or False)"
    rows = 16 * wm  # per warp
    if bm % rows or not rows <= bm <= 256:
        return f"block_m {bm} ({rows} rows per warp at warp_m {wm}, 1 to {256 // rows} warps)"
    if bn % 16 or not 16 <= bn <= 256:
        return f"block_n {bn} (a multiple of 16, <= 256)"
    if ns not in (1, 2):
        return f"num_stages {ns} (1 or 2)"
    sn = int(config.get("sub_n", bn))
    if sn % 16 or bn % sn:
        return f"sub_n {sn} (a multiple of 16 dividing block_n {bn})"
    threads = 2 * bm // wm  # 32 per warp
    for dim in (head_dim, value_dim):
        if (bn * dim // 8) % threads:
            return f"block_n {bn} x dim {dim} / 8 copies not a multiple of {threads} threads"
    return None


def smem_bytes(head_dim, value_dim, config) -> int:
    bn, ns = int(config.block_n), int(config.num_stages)
    q = int(config.block_m) * (head_dim + PAD) * 2 if config.get("q_smem", False) else 0
    return q + ns * (bn * (head_dim + PAD) * 2 + bn * (value_dim + PAD) * 2 + bn * 4)


def registers(head_dim, value_dim, config) -> int:
    """Estimated registers per thread: the fragments each thread holds (fp32 accumulators and
    scores, Q's A fragments and the B fragments; P's bf16/fp16 pairs are converted from the
    scores, which die there, so they are not counted on top) plus 40 for addresses, indices
    and row statistics. Offline ptxas (sm_90, two stages, warp_m 2, block_m 64-256, block_n
    32-128, sub_n 16-64, D 64/128, Q held or staged: 96 tiles) puts 5 tiles that spill more
    than 50 bytes under 255 (four at block_n 128 and D = 128) and none that spill less over
    it. Counting P on top (before session 7) pruned the wide tile with 64-key steps at D = 128,
    which spills as little as the 32-key one (32 bytes, outside the key loop)."""
    bn, wm = int(config.block_n), int(config.get("warp_m", 1))
    sn = int(config.get("sub_n", bn))
    q = 4 if config.get("q_smem", False) else head_dim // 4  # the A fragments held
    return wm * (value_dim // 2 + sn // 2 + q) + 8 + 40


def make_forward_tc(head_dim, value_dim, window, dtype, gated, group, config):
    D, DV, G = int(head_dim), int(value_dim), int(group)
    W = int(window or 0)  # 0: full causal
    why = supports(D, DV, dtype, config)
    if why is not None:
        raise NotImplementedError(f"tvm tensor-core forward: unsupported {why}")
    dt, ptx = _DT[dtype], _PTX[dtype]
    gated = bool(gated)
    BM, BN, NS = int(config.block_m), int(config.block_n), int(config.num_stages)
    WM = int(config.get("warp_m", 1))  # 16-row blocks per warp
    QSM = bool(config.get("q_smem", False))
    NW = BM // (16 * WM)
    NT = 32 * NW
    KS = D + PAD  # shared row strides (elements)
    VS = DV + PAD
    QST = D + PAD
    NKC = BN * D // 8 // NT  # 16-byte copies per thread per K tile
    NVC = BN * DV // 8 // NT
    NQC = BM * D // 8 // NT  # D * WM / 16: always whole
    NGC = (BN + NT - 1) // NT  # gate sums per thread per key tile
    SN = int(config.get("sub_n", BN))  # keys per softmax step (a loaded tile holds BN // SN)
    NB = SN // 8  # 8-key accumulator blocks
    NDB = DV // 8  # 8-column output blocks
    # per-row-block strides of the register buffers (row block mb of a warp at mb * stride)
    QA = D // 2  # q_r: the A fragments of every k step
    QK, QB = (0, 8) if QSM else (8, QA)  # qa elements per k step, per row block
    SA = NB * 4  # s_r
    PA = SN // 2  # p_r
    OA = NDB * 4  # acc

    # Macros expand inside gfwa_fwd; they see this factory's constants and take gfwa_fwd's
    # buffers and variables as arguments. A Python-valued argument (masked) selects code at
    # parse time.
    @T.macro
    def copy_rows(dst, d0, stride, src, s0, hh, dim, copies, b, L, tx):
        # rows s0... of src [B, T, H, dim] (head hh) into dst's padded rows d0..., 16 bytes
        # per cp.async; rows past the end are clamped to the last row: finite values that
        # the mask (j <= i) then excludes, or (Q) rows whose output is never written
        for rr in T.unroll(copies):
            ci = rr * NT + tx
            jr = ci // (dim // 8)
            T.ptx["cp.async.cg.shared.global"](
                T.address_of(dst[(d0 + jr) * stride + ci % (dim // 8) * 8]),
                T.address_of(src[b, T.min(s0 + jr, L - 1), hh, ci % (dim // 8) * 8]),
                16,
            )

    @T.macro
    def load_tile(kt, st, k_s, v_s, k, v, b, hk, L, tx):
        copy_rows(k_s, st * BN, KS, k, kt * BN, hk, D, NKC, b, L, tx)
        copy_rows(v_s, st * BN, VS, v, kt * BN, hk, DV, NVC, b, L, tx)

    # The key tiles' prefix sums are plain loads (float64, narrowed on the way to shared
    # memory), not cp.async. Loaded and stored in one go, each tile's load stalled the block
    # at the barrier that follows; gate_fetch issues it a tile of math ahead into registers
    # (block_n may exceed the thread count: 16 rows = 32 threads, 64 keys) and gate_store
    # narrows it once that math is done.
    @T.macro
    def gate_fetch(kt, cg_r, c, b, h, L, tx):
        for rr in T.unroll(NGC):
            cg_r[rr] = c[b, h, T.min(kt * BN + rr * NT + tx, L - 1)]

    @T.macro
    def gate_store(st, cg_r, ck_s, cref, tx):
        for rr in T.unroll(NGC):
            if rr * NT + tx < BN:
                ck_s[st * BN + rr * NT + tx] = T.Cast("float32", cg_r[rr] - cref) * T.float32(
                    LOG2E
                )

    @T.macro
    def fragment_mma(trans, smem, smem_off, frag, a, a_off, a_stride, c, c_block, c_stride):
        # One ldmatrix.x4 loads the B fragments of two 8-column blocks (.trans: from a
        # row-major [k, n] tile); each feeds one m16n8k16 step per row block of the warp
        # (warp_m of them: the shared-memory read is shared by their mmas), whose A
        # fragments lie a_stride and accumulators c_stride elements apart.
        T.ptx_legacy.ldmatrix(
            trans, 4, ".b16", frag.data, 0, smem.access_ptr("r"), smem_off, dtype=dt
        )
        for half in T.unroll(2):
            for mb in T.unroll(WM):
                T.ptx_legacy.mma(
                    "m16n8k16",
                    "row",
                    "col",
                    ptx,
                    ptx,
                    "fp32",
                    a.data,
                    a_off + mb * a_stride,
                    frag.data,
                    half * 4,
                    c.data,
                    (c_block + half) * 4 + mb * c_stride,
                    False,
                    dtype="float32",
                )

    @T.macro
    def scores(kb, k_s, kf, qa, q_s, wr, s_r, lane):
        # S = Q K^T: per 16-key pair one ldmatrix.x4 gives the B fragments of
        # two 8-key blocks for one 16-wide k step. qa: the A fragments, held (q_r, every k
        # step) or, with Q in shared memory (q_s; wr: the warp's first row there), loaded
        # per k step for the warp's row blocks
        for x in T.unroll(WM * SA):
            s_r[x] = T.float32(0)
        for ks in T.unroll(D // 16):
            if QSM:
                # matrices (rows 0-7, 8-15) x (k 0-7, 8-15) of the 16 x 16 block land in
                # the A operand's register order
                for mb in T.unroll(WM):
                    T.ptx_legacy.ldmatrix(
                        False,
                        4,
                        ".b16",
                        qa.data,
                        mb * 8,
                        q_s.access_ptr("r"),
                        (wr + mb * 16 + lane % 16) * QST + ks * 16 + lane // 16 * 8,
                        dtype=dt,
                    )
            for nb in T.unroll(SN // 16):
                fragment_mma(
                    False,
                    k_s,
                    (kb + nb * 16 + lane // 16 * 8 + lane % 8) * KS + ks * 16 + lane // 8 % 2 * 8,
                    kf,
                    qa,
                    ks * QK,
                    QB,
                    s_r,
                    nb * 2,
                    SA,
                )

    @T.macro
    def softmax_step(kb, dj, masked, s_r, ck_s, m_r, l_r, acc, t4, sl2):
        # row block mb's rows are 16 mb below the warp's first (dj: the step's first key
        # minus that row)
        for mb in T.unroll(WM):
            for r in T.unroll(2):
                for nb in T.unroll(NB):
                    for e in T.unroll(2):
                        x = mb * SA + nb * 4 + r * 2 + e
                        if gated:
                            # c_i is constant along a row, which softmax ignores: it joins
                            # only the lse (epilogue), and each logit costs one fma
                            s_r[x] = s_r[x] * sl2 - ck_s[kb + nb * 8 + t4 * 2 + e]
                        else:
                            s_r[x] = s_r[x] * sl2
                        if masked:
                            # key minus query position, in int32
                            rel = dj + (nb * 8 - r * 8 - mb * 16) + t4 * 2 + e
                            if W > 0:
                                s_r[x] = T.if_then_else(
                                    rel <= 0 and rel > -W, s_r[x], T.float32(MASK)
                                )
                            else:
                                s_r[x] = T.if_then_else(rel <= 0, s_r[x], T.float32(MASK))
                mx: T.float32 = m_r[mb * 2 + r]
                for nb in T.unroll(NB):
                    for e in T.unroll(2):
                        mx = T.max(mx, s_r[mb * SA + nb * 4 + r * 2 + e])
                mx = T.max(mx, T.cuda.__shfl_xor_sync(T.uint32(0xFFFFFFFF), mx, 1, 32))
                mx = T.max(mx, T.cuda.__shfl_xor_sync(T.uint32(0xFFFFFFFF), mx, 2, 32))
                alpha: T.float32 = T.exp2(m_r[mb * 2 + r] - mx)
                m_r[mb * 2 + r] = mx
                psum: T.float32 = T.float32(0)
                for nb in T.unroll(NB):
                    for e in T.unroll(2):
                        x = mb * SA + nb * 4 + r * 2 + e
                        if masked:
                            s_r[x] = T.if_then_else(
                                s_r[x] > T.float32(MASK_T),
                                T.exp2(s_r[x] - mx),
                                T.float32(0),
                            )
                        else:
                            s_r[x] = T.exp2(s_r[x] - mx)
                        psum = psum + s_r[x]
                l_r[mb * 2 + r] = l_r[mb * 2 + r] * alpha + psum
                for db in T.unroll(NDB):
                    for e in T.unroll(2):
                        acc[mb * OA + db * 4 + r * 2 + e] = (
                            acc[mb * OA + db * 4 + r * 2 + e] * alpha
                        )

    @T.macro
    def accumulate(kb, s_r, p_r, v_s, vf, acc, lane):
        # P (the S fragments, narrowed) as the A operand of O += P V
        for mb in T.unroll(WM):
            for kk in T.unroll(SN // 16):
                for u in T.unroll(4):
                    for e in T.unroll(2):
                        p_r[mb * PA + kk * 8 + u * 2 + e] = T.Cast(
                            dt, s_r[mb * SA + (kk * 2 + u // 2) * 4 + u % 2 * 2 + e]
                        )
        for kk in T.unroll(SN // 16):
            for db in T.unroll(DV // 16):
                fragment_mma(
                    True,
                    v_s,
                    (kb + kk * 16 + lane // 8 % 2 * 8 + lane % 8) * VS + db * 16 + lane // 16 * 8,
                    vf,
                    p_r,
                    kk * 8,
                    PA,
                    acc,
                    db * 2,
                    OA,
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
                if gated:
                    cg_r = T.alloc_buffer((NGC,), "float64", scope="local")
                if QSM:
                    q_s = T.alloc_buffer((BM * QST,), dt, scope="shared.dyn")
                    qf = T.alloc_buffer((WM * 8,), dt, scope="local")
                else:
                    q_r = T.alloc_buffer((WM * QA,), dt, scope="local")
                s_r = T.alloc_buffer((WM * SA,), "float32", scope="local")
                p_r = T.alloc_buffer((WM * PA,), dt, scope="local")
                kf = T.alloc_buffer((8,), dt, scope="local")
                vf = T.alloc_buffer((8,), dt, scope="local")
                acc = T.alloc_buffer((WM * OA,), "float32", scope="local")
                m_r = T.alloc_buffer((WM * 2,), "float32", scope="local")
                l_r = T.alloc_buffer((WM * 2,), "float32", scope="local")
                cq_r = T.alloc_buffer((WM * 2,), "float32", scope="local")
                nq = (L + BM - 1) // BM
                b = tile // (HQ * nq)
                h = tile // nq % HQ
                i0 = tile % nq * BM
                hk = h // G
                lane = tx % 32
                g = lane // 4
                t4 = lane % 4
                # this thread's rows: row0 + 16 mb + {0, 8} for row block mb
                row0 = i0 + tx // 32 * (16 * WM) + g
                sl2 = scale * T.float32(LOG2E)
                if QSM:
                    # the block's Q rows, staged once (their own commit group, the oldest:
                    # the first tile's wait covers it)
                    copy_rows(q_s, 0, QST, q, i0, h, D, NQC, b, L, tx)
                    T.ptx["cp.async.commit_group"]()
                else:
                    # ---- Q fragments straight from global (read once per block)
                    for mb in T.unroll(WM):
                        for ks in T.unroll(D // 16):
                            for u in T.unroll(4):
                                for e in T.unroll(2):
                                    q_r[mb * QA + ks * 8 + u * 2 + e] = q[
                                        b,
                                        T.min(row0 + mb * 16 + u % 2 * 8, L - 1),
                                        h,
                                        ks * 16 + u // 2 * 8 + t4 * 2 + e,
                                    ]
                for mb in T.unroll(WM):
                    for r in T.unroll(2):
                        m_r[mb * 2 + r] = T.float32(MASK)
                        l_r[mb * 2 + r] = T.float32(0)
                        if gated:
                            cq_r[mb * 2 + r] = T.Cast(
                                "float32",
                                c[b, h, T.min(row0 + mb * 16 + r * 8, L - 1)] - c[b, h, i0],
                            ) * T.float32(LOG2E)
                        else:
                            cq_r[mb * 2 + r] = T.float32(0)
                for x in T.unroll(WM * OA):
                    acc[x] = T.float32(0)
                kt_hi = (T.min(L, i0 + BM) + BN - 1) // BN
                kt_lo = T.int64(0)
                if W > 0:
                    kt_lo = T.max(i0 - (W - 1), T.int64(0)) // BN
                n_tiles = kt_hi - kt_lo

                if gated:
                    cref: T.float64 = c[b, h, i0]
                    if n_tiles > 0:
                        gate_fetch(kt_lo, cg_r, c, b, h, L, tx)
                if NS == 2:
                    if n_tiles > 0:
                        load_tile(kt_lo, 0, k_s, v_s, k, v, b, hk, L, tx)
                        if gated:
                            gate_store(0, cg_r, ck_s, cref, tx)
                            if n_tiles > 1:
                                gate_fetch(kt_lo + 1, cg_r, c, b, h, L, tx)
                    T.ptx["cp.async.commit_group"]()
                for it in T.serial(T.Cast("int32", n_tiles)):
                    kt = kt_lo + T.Cast("int64", it)
                    st = it % NS
                    # the tile loaded now: the next one into the other stage (two stages),
                    # this one (one stage); its gate sums were fetched during the last tile
                    ahead = T.Cast("int64", it) + (NS - 1)
                    if NS == 2:
                        if ahead < n_tiles:
                            load_tile(kt + 1, 1 - st, k_s, v_s, k, v, b, hk, L, tx)
                    else:
                        load_tile(kt, 0, k_s, v_s, k, v, b, hk, L, tx)
                    if gated:
                        # stored here, between the barriers that end the last tile's math
                        # and start this one's: no read of ck_s in between, and a store
                        # after this tile's math would make TVM add a barrier before it
                        if ahead < n_tiles:
                            gate_store((it + NS - 1) % NS, cg_r, ck_s, cref, tx)
                        if ahead + 1 < n_tiles:
                            gate_fetch(kt + NS, cg_r, c, b, h, L, tx)
                    T.ptx["cp.async.commit_group"]()
                    T.ptx["cp.async.wait_group"](NS - 1)
                    T.tvm_storage_sync("shared")
                    for sub in T.unroll(BN // SN):
                        j0 = kt * BN + sub * SN
                        dj = T.Cast("int32", j0 - row0)
                        kb = st * BN + sub * SN  # the step's first key row in shared memory
                        if QSM:
                            scores(kb, k_s, kf, qf, q_s, tx // 32 * (16 * WM), s_r, lane)
                        else:
                            scores(kb, k_s, kf, q_r, q_r, 0, s_r, lane)
                        # interior: every key of the step is <= the block's first row and
                        # inside the last row's window
                        inside = j0 + SN - 1 <= i0
                        if W > 0:
                            inside = inside and j0 > i0 + BM - 1 - W
                        if inside:
                            softmax_step(kb, dj, False, s_r, ck_s, m_r, l_r, acc, t4, sl2)
                        else:
                            softmax_step(kb, dj, True, s_r, ck_s, m_r, l_r, acc, t4, sl2)
                        accumulate(kb, s_r, p_r, v_s, vf, acc, lane)
                    T.tvm_storage_sync("shared")
                # ---- epilogue: the row sums were per thread, add the quad's four
                for mb in T.unroll(WM):
                    for r in T.unroll(2):
                        lt: T.float32 = l_r[mb * 2 + r]
                        lt = lt + T.cuda.__shfl_xor_sync(T.uint32(0xFFFFFFFF), lt, 1, 32)
                        lt = lt + T.cuda.__shfl_xor_sync(T.uint32(0xFFFFFFFF), lt, 2, 32)
                        inv: T.float32 = T.float32(1) / lt
                        ii = row0 + mb * 16 + r * 8
                        if ii < L:
                            for db in T.unroll(NDB):
                                for e in T.unroll(2):
                                    o[b, ii, h, db * 8 + t4 * 2 + e] = T.Cast(
                                        dt, acc[mb * OA + db * 4 + r * 2 + e] * inv
                                    )
                            if t4 == 0:
                                lse[b, h, ii] = (
                                    m_r[mb * 2 + r] + T.log2(lt) + cq_r[mb * 2 + r]
                                ) * T.float32(LN2)

    return gfwa_fwd
