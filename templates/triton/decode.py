"""GatedFWA decode, Triton template: S (1..16) new query tokens per sequence over a ring-buffer
KV cache, split-K over the ring (flash-decoding), GQA-grouped (GATEDFWA.md sections 1 and 3).

Cache convention (the one gfwagen.nn.GatedFWACache keeps): the ring of R slots holds the
positions seen so far at slot = position % R; `seqlens[b]` = L is how many positions sequence
b has seen before the new tokens (so min(L, R) slots are filled and the newest sits at slot
(L - 1) % R). The S new tokens (positions L .. L+S-1) come separately (k_new, v_new) and are
not in the ring: query s sees the ring positions p > L + s - WINDOW and the new tokens 0..s.
Gate: c_ring[b, slot, h] and c_new[b, s, h] are the gate's prefix sums, either float32
relative to any per-(b, h) reference (normally the prefix at position L - 1), so the bias
c_new[s] - c_ring[j] never subtracts two large numbers, or float64 (absolute is then fine:
the difference is formed in float64 and rounded to float32 once).

Kernel 1 (_decode_split): grid (B * Hkv, n_splits). A program takes one kv head and one slice
of the ring and ALL the query rows of that kv head's group (S * G rows: K/V tiles are read
once per group), runs a log2-domain online softmax with fp32 accumulation, and stores its
partial (m, l, acc) for the valid rows. The last split also takes the S new tokens. An empty
split (slice past the filled part) stores m = -inf, l = 0, acc = 0 (no NaN: the exponent
base of a row that saw nothing is 0).
Kernel 2 (_decode_combine): grid (B * Hkv, S * G): merges the splits of one row.

Workspace and grid depend only on shapes and n_splits (never on seqlens): CUDA-graph safe.
This file imports nothing from gfwagen.
"""

import triton
import triton.language as tl

from .common import next_pow2, wide_offsets, wide_strides

LOG2E_D = tl.constexpr(1.4426950408889634)


@triton.jit
def _online_update(m_i, l_i, acc, s, v, DOT_PREC: tl.constexpr):
    """One tile of the log2-domain online softmax. s: [M, N] (masked entries -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _decode_split(
    Q, KN, VN, K, V, CR, CQ, SEQLENS,
    PM, PL, PACC,
    scale, S, R, HKV, WIN,
    stride_qb, stride_qs, stride_qh,
    stride_knb, stride_kns, stride_knh,
    stride_vnb, stride_vns, stride_vnh,
    stride_kb, stride_kr, stride_kh,
    stride_vb, stride_vr, stride_vh,
    stride_crb, stride_crr, stride_crh,
    stride_cqb, stride_cqs, stride_cqh,
    G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_D: tl.constexpr,
    HEAD_DV: tl.constexpr,
    D_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
    GATED: tl.constexpr,
    DOT_PREC: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr = False,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    b64 = b.to(tl.int64)
    stride_kr, stride_kh = wide_strides(stride_kr, stride_kh, WIDE_OFFSETS)
    stride_vr, stride_vh = wide_strides(stride_vr, stride_vh, WIDE_OFFSETS)

    offs_r = tl.arange(0, BLOCK_M)
    s_r = offs_r // G
    head_r = hk * G + offs_r % G
    row_ok = offs_r < S * G
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    d_ok = offs_d < HEAD_D
    dv_ok = offs_dv < HEAD_DV

    q_ptrs = (Q + b64 * stride_qb + s_r[:, None] * stride_qs + head_r[:, None] * stride_qh
              + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qk_scale = scale * LOG2E_D
    # gate prefix sums in their own dtype (float32 relative, or float64): the difference is
    # formed in that dtype, then rounded to float32
    cq = tl.load(CQ + b64 * stride_cqb + s_r * stride_cqs + head_r * stride_cqh,
                 mask=row_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)

    L = tl.load(SEQLENS + b)
    n_filled = tl.minimum(L, R)
    newest = (tl.maximum(L, 1) - 1) % R
    # ring entry at distance d back from the newest (d = 0: position L-1) is seen by row r
    # iff d <= WIN - 2 - s_r (WIN - 1 keys of the past for the first new token)
    max_dist = WIN - 2 - s_r
    span = tl.cdiv(tl.cdiv(R, n_splits), BLOCK_N) * BLOCK_N
    lo = split * span
    hi = tl.minimum(lo + span, n_filled)

    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_rng = offs_n < hi
        k = tl.load(k_base + offs_n[:, None] * stride_kr + offs_d[None, :],
                    mask=in_rng[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vr + offs_dv[None, :],
                    mask=in_rng[:, None] & dv_ok[None, :], other=0.0)
        dist = (newest - offs_n + R) % R
        valid = (in_rng[None, :] & (dist[None, :] <= max_dist[:, None])) & row_ok[:, None]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if GATED:
            ck = tl.load(CR + b64 * stride_crb + offs_n[None, :] * stride_crr
                         + head_r[:, None] * stride_crh, mask=valid, other=0.0)
            s = s + (cq[:, None] - ck).to(tl.float32) * LOG2E_D
        s = tl.where(valid, s, float("-inf"))
        m_i, l_i, acc = _online_update(m_i, l_i, acc, s, v, DOT_PREC)

    if split == n_splits - 1:
        offs_t = tl.arange(0, BLOCK_S)
        t_ok = offs_t < S
        kn = tl.load(KN + b64 * stride_knb + hk * stride_knh + offs_t[:, None] * stride_kns
                     + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        vn = tl.load(VN + b64 * stride_vnb + hk * stride_vnh + offs_t[:, None] * stride_vns
                     + offs_dv[None, :], mask=t_ok[:, None] & dv_ok[None, :], other=0.0)
        valid = ((offs_t[None, :] <= s_r[:, None]) & (offs_t[None, :] > s_r[:, None] - WIN)
                 & row_ok[:, None])
        s = tl.dot(q, tl.trans(kn.to(q.dtype)), input_precision=DOT_PREC) * qk_scale
        if GATED:
            ckn = tl.load(CQ + b64 * stride_cqb + offs_t[None, :] * stride_cqs
                          + head_r[:, None] * stride_cqh, mask=valid, other=0.0)
            s = s + (cq[:, None] - ckn).to(tl.float32) * LOG2E_D
        s = tl.where(valid, s, float("-inf"))
        m_i, l_i, acc = _online_update(m_i, l_i, acc, s, vn.to(q.dtype), DOT_PREC)

    part = pid_bh * n_splits + split
    tl.store(PM + part * BLOCK_M + offs_r, m_i, mask=row_ok)
    tl.store(PL + part * BLOCK_M + offs_r, l_i, mask=row_ok)
    tl.store(PACC + (part * BLOCK_M + offs_r[:, None]) * DV_PAD + offs_dv[None, :], acc,
             mask=row_ok[:, None])


@triton.jit
def _decode_combine(
    PM, PL, PACC, O,
    n_splits, HKV,
    stride_ob, stride_os, stride_oh,
    G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLIT_PAD: tl.constexpr,
    HEAD_DV: tl.constexpr,
    DV_PAD: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    r = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_sp = tl.arange(0, SPLIT_PAD)
    sp_ok = offs_sp < n_splits
    offs_dv = tl.arange(0, DV_PAD)
    part = pid_bh * n_splits + offs_sp
    m = tl.load(PM + part * BLOCK_M + r, mask=sp_ok, other=float("-inf"))
    l = tl.load(PL + part * BLOCK_M + r, mask=sp_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_safe)
    l_tot = tl.sum(w * l, 0)
    acc = tl.load(PACC + (part[:, None] * BLOCK_M + r) * DV_PAD + offs_dv[None, :],
                  mask=sp_ok[:, None], other=0.0)
    o = tl.sum(w[:, None] * acc, 0) / tl.where(l_tot > 0.0, l_tot, 1.0)
    s = r // G
    h = hk * G + r % G
    o_ptrs = O + b.to(tl.int64) * stride_ob + s * stride_os + h * stride_oh + offs_dv
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=offs_dv < HEAD_DV)


def launch_decode(q, k_new, v_new, k_ring, v_ring, seqlens, c_ring, c_new, out, pm, pl, pacc,
                  scale, window_eff, n_splits, block_n=64, num_warps=4, num_stages=2):
    """q, out [B, S, Hq, D]; k_new/v_new [B, S, Hkv, D]; k_ring/v_ring [B, R, Hkv, D] (any
    strides with a contiguous last dim); seqlens int32 [B]; c_ring [B, R, Hq] and c_new
    [B, S, Hq] (both float32 or both float64) or None; pm/pl [B*Hkv, n_splits, BLOCK_M] and pacc
    [B*Hkv, n_splits, BLOCK_M, DV_PAD] float32 workspaces (see workspace_shapes)."""
    B, S, Hq, D = q.shape
    R, Hkv, Dv = k_ring.shape[1], k_ring.shape[2], v_ring.shape[3]
    G = Hq // Hkv
    block_m, _, dv_pad = workspace_dims(S, G, Dv)
    gated = c_ring is not None
    cr = c_ring if gated else seqlens
    cqt = c_new if gated else seqlens
    cr_strides = c_ring.stride() if gated else (0, 0, 0)
    cq_strides = c_new.stride() if gated else (0, 0, 0)
    dot_prec = "ieee" if q.dtype == _fp32() else "tf32"
    _decode_split[(B * Hkv, n_splits)](
        q, k_new, v_new, k_ring, v_ring, cr, cqt, seqlens,
        pm, pl, pacc,
        float(scale), S, R, Hkv, int(window_eff),
        q.stride(0), q.stride(1), q.stride(2),
        k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        k_ring.stride(0), k_ring.stride(1), k_ring.stride(2),
        v_ring.stride(0), v_ring.stride(1), v_ring.stride(2),
        cr_strides[0], cr_strides[1], cr_strides[2],
        cq_strides[0], cq_strides[1], cq_strides[2],
        G=G, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_S=max(16, next_pow2(S)),
        HEAD_D=D, HEAD_DV=Dv, D_PAD=max(16, next_pow2(D)), DV_PAD=dv_pad,
        GATED=gated, DOT_PREC=dot_prec, WIDE_OFFSETS=wide_offsets(k_ring, v_ring),
        num_warps=num_warps, num_stages=num_stages,
    )
    _decode_combine[(B * Hkv, S * G)](
        pm, pl, pacc, out, n_splits, Hkv,
        out.stride(0), out.stride(1), out.stride(2),
        G=G, BLOCK_M=block_m, SPLIT_PAD=max(2, next_pow2(n_splits)),
        HEAD_DV=Dv, DV_PAD=dv_pad, num_warps=4 if dv_pad >= 128 else 1,
    )
    return out


def workspace_dims(S, G, Dv):
    """(BLOCK_M, rows, DV_PAD): the query rows of one kv-head group padded for tl.dot."""
    rows = S * G
    return max(16, next_pow2(rows)), rows, max(16, next_pow2(Dv))


def _fp32():
    import torch

    return torch.float32
