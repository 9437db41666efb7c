"""The paper's gate with fused one-pass preprocessing, Triton template (GATEDFWA.md section 4).

Forward, from the gate logit h [B, T, H] and the sharpness beta [B, T, H] (> 0):

    log_gate_t = logsigmoid(beta_t * h_t) / (beta_t + eps)

and, in the same pass, the gate's prefix sums in the chunked form the attention templates read
(gfwagen.gate.chunked_prefix_sums): c_t * log2(e) = base[t // CHUNK] + local[t], local float32
[B, H, T], base float64 [B, H, ceil(T / CHUNK)]. Backward: dh and dbeta from dlog_gate, plus the
gradient that reaches the gate through local and base when the caller used them.

One program per (batch, block of BLOCK_H heads); it walks T one chunk at a time (a [CHUNK,
BLOCK_H] tile, read along the contiguous head dimension), carrying the running base in float64
(forward) or the suffix sum of dbase (backward, walking the chunks in reverse). Math in float32,
the per-chunk total and the carried base in float64. This file imports nothing from gfwagen.
"""

import triton
import triton.language as tl

from .common import cdiv, heads_per_program

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _log1p_small(x):
    # log(1 + x) for 0 < x <= 1 without losing x when it is below float32's epsilon (the gate
    # is then ~1 and log_gate ~ -x, which must keep its relative accuracy): Goldberg's trick.
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _gate_terms(x, b, eps):
    """For z = beta * h and e = exp(-|z|): (logsigmoid(z), sigmoid(-z), r, 1 / (beta + eps))
    with r = sigmoid(-z) z - logsigmoid(z) = |z| e / (1 + e) + log1p(e) >= 0, a sum of two
    non-negative terms (the difference form cancels badly for z << 0)."""
    z = b * x
    e = tl.exp(-tl.abs(z))  # in (0, 1]
    l1p = _log1p_small(e)
    ls = tl.minimum(z, 0.0) - l1p
    sig_neg = tl.where(z >= 0, e, 1.0) / (1.0 + e)  # sigmoid(-z)
    r = tl.abs(z) * (e / (1.0 + e)) + l1p
    inv = 1.0 / (b + eps)
    return ls, sig_neg, r, inv


@triton.jit
def gate_fwd_kernel(
    h_ptr,
    beta_ptr,
    g_ptr,
    local_ptr,
    base_ptr,
    T,
    H,
    NCHUNK,
    eps,
    BLOCK_H: tl.constexpr,
    CHUNK: tl.constexpr,
    WITH_PREFIX: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_in = offs_h < H
    bth = pid_b * T * H  # [B, T, H] tensors
    bht = (pid_b * H + offs_h).to(tl.int64) * T  # [B, H, T] local
    running = tl.zeros([BLOCK_H], dtype=tl.float64)
    for kc in tl.range(0, NCHUNK):
        offs_t = kc * CHUNK + tl.arange(0, CHUNK)
        m = (offs_t < T)[:, None] & h_in[None, :]
        idx = bth + offs_t[:, None] * H + offs_h[None, :]
        x = tl.load(h_ptr + idx, mask=m, other=0.0).to(tl.float32)
        b = tl.load(beta_ptr + idx, mask=m, other=1.0).to(tl.float32)
        ls, _, _, inv = _gate_terms(x, b, eps)
        g = tl.where(m, ls * inv, 0.0)
        tl.store(g_ptr + idx, g, mask=m)
        if WITH_PREFIX:
            loc = tl.cumsum(g * LOG2E, axis=0)
            tl.store(local_ptr + bht[None, :] + offs_t[:, None], loc, mask=m)
            tl.store(base_ptr + (pid_b * H + offs_h) * NCHUNK + kc, running, mask=h_in)
            running += tl.sum(g.to(tl.float64), axis=0) * LOG2E


@triton.jit
def gate_bwd_kernel(
    h_ptr,
    beta_ptr,
    dg_ptr,
    dlocal_ptr,
    dbase_ptr,
    dh_ptr,
    dbeta_ptr,
    T,
    H,
    NCHUNK,
    eps,
    BLOCK_H: tl.constexpr,
    CHUNK: tl.constexpr,
    WITH_PREFIX: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_in = offs_h < H
    bth = pid_b * T * H
    bht = (pid_b * H + offs_h).to(tl.int64) * T
    # sum of dbase over the chunks after the current one: base[k] sums the gates of chunks < k
    carry = tl.zeros([BLOCK_H], dtype=tl.float64)
    for kr in tl.range(0, NCHUNK):
        kc = NCHUNK - 1 - kr
        offs_t = kc * CHUNK + tl.arange(0, CHUNK)
        m = (offs_t < T)[:, None] & h_in[None, :]
        idx = bth + offs_t[:, None] * H + offs_h[None, :]
        dg = tl.load(dg_ptr + idx, mask=m, other=0.0).to(tl.float32)
        if WITH_PREFIX:
            dl = tl.load(dlocal_ptr + bht[None, :] + offs_t[:, None], mask=m, other=0.0)
            # local[t] sums the gates of its chunk up to t: dg_s += sum_{t >= s in chunk} dl_t
            suffix = tl.cumsum(dl.to(tl.float32), axis=0, reverse=True)
            dg += (suffix + carry.to(tl.float32)[None, :]) * LOG2E
            carry += tl.load(
                dbase_ptr + (pid_b * H + offs_h) * NCHUNK + kc, mask=h_in, other=0.0
            ).to(tl.float64)
        x = tl.load(h_ptr + idx, mask=m, other=0.0).to(tl.float32)
        b = tl.load(beta_ptr + idx, mask=m, other=1.0).to(tl.float32)
        _, sig_neg, r, inv = _gate_terms(x, b, eps)
        # d/dh = sigmoid(-z) beta / (beta + eps);  d/dbeta = sigmoid(-z) h / (beta + eps)
        #   - logsigmoid(z) / (beta + eps)^2 = (r + sigmoid(-z) h eps) / (beta + eps)^2
        dh = dg * sig_neg * b * inv
        db = dg * ((r + sig_neg * x * eps) * inv * inv)
        tl.store(dh_ptr + idx, dh.to(dh_ptr.dtype.element_ty), mask=m)
        tl.store(dbeta_ptr + idx, db.to(dbeta_ptr.dtype.element_ty), mask=m)


def launch_gate_fwd(h, beta, g, local, base, eps, chunk, with_prefix, num_warps=4):
    """h, beta [B, T, H] contiguous (any float dtype); g [B, T, H] float32; local [B, H, T]
    float32 and base [B, H, ceil(T / chunk)] float64 when with_prefix (else any tensor)."""
    B, T, H = h.shape
    bh = heads_per_program(H)
    nchunk = cdiv(T, chunk)
    grid = (B, cdiv(H, bh))
    gate_fwd_kernel[grid](
        h,
        beta,
        g,
        local,
        base,
        T,
        H,
        nchunk,
        float(eps),
        BLOCK_H=bh,
        CHUNK=chunk,
        WITH_PREFIX=with_prefix,
        num_warps=num_warps,
    )


def launch_gate_bwd(h, beta, dg, dlocal, dbase, dh, dbeta, eps, chunk, with_prefix, num_warps=4):
    """dg [B, T, H] float32; dlocal [B, H, T] float32 and dbase [B, H, ceil(T / chunk)] float64
    when with_prefix; dh, dbeta [B, T, H] in the dtypes of h and beta."""
    B, T, H = h.shape
    bh = heads_per_program(H)
    nchunk = cdiv(T, chunk)
    grid = (B, cdiv(H, bh))
    gate_bwd_kernel[grid](
        h,
        beta,
        dg,
        dlocal,
        dbase,
        dh,
        dbeta,
        T,
        H,
        nchunk,
        float(eps),
        BLOCK_H=bh,
        CHUNK=chunk,
        WITH_PREFIX=with_prefix,
        num_warps=num_warps,
    )
