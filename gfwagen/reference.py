"""PyTorch implementations of the GatedFWA contract (docs: GATEDFWA.md).

`naive_attention` is the O(T^2) formula written as plainly as possible: fed float64 it is the
tests' oracle, and autograd through it gives the oracle gradients.

`reference_forward` / `reference_backward` are chunked over queries so that memory is
O(T * (W + chunk)), never O(T^2): they are the op's CPU kernels, and they spell out the
backward of GATEDFWA.md section 2 explicitly (the same split the GPU kernels use), so that a
test of them is also a test of the formulas the kernels implement.

Layout: q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv], log_gate [B,T,Hq] or None.
lse is [B,Hq,T] float32 (float64 for float64 inputs), natural log.
"""

from __future__ import annotations

import math

import torch

from gfwagen.gate import gate_grad_from_sums


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _resolve(q: torch.Tensor, window: int | None, scale: float | None) -> tuple[int, float]:
    T, D = q.shape[1], q.shape[3]
    w = T if window is None else min(int(window), T)
    return w, (1.0 / math.sqrt(D) if scale is None else float(scale))


def naive_attention(q, k, v, log_gate=None, window=None, scale=None, cu_seqlens=None):
    """O(T^2) GatedFWA, differentiable by autograd. Returns o in q's dtype. cu_seqlens
    (B = 1): packed sequences, no pair across a boundary."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    w, scale = _resolve(q, window, scale)
    cd = _compute_dtype(q.dtype)
    G = Hq // Hkv
    qh = q.to(cd).transpose(1, 2)  # B,Hq,T,D
    kh = k.to(cd).transpose(1, 2).repeat_interleave(G, dim=1)
    vh = v.to(cd).transpose(1, 2).repeat_interleave(G, dim=1)
    s = scale * qh @ kh.transpose(-1, -2)
    if log_gate is not None:
        c = torch.cumsum(log_gate.to(cd).transpose(1, 2), dim=-1)  # B,Hq,T
        s = s + (c[..., :, None] - c[..., None, :])
    i = torch.arange(T, device=q.device)
    valid = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - w)
    if cu_seqlens is not None:
        seq = torch.searchsorted(cu_seqlens.to(q.device, torch.int64), i, right=True)
        valid = valid & (seq[None, :] == seq[:, None])
    s = s.masked_fill(~valid, float("-inf"))
    o = torch.softmax(s, dim=-1) @ vh
    return o.transpose(1, 2).to(q.dtype)


class _Chunk:
    """Views of one query chunk [s, e) and the keys it can see [ks, e), heads grouped as
    [B, Hkv, G, ...] so GQA never materializes repeated K/V."""

    def __init__(self, qg, kh, vh, gg, s, e, w, scale, seg_start=None):
        self.s, self.e, self.ks = s, e, max(0, s - w + 1)
        ks = self.ks
        self.q = qg[:, :, :, s:e]  # B,Hkv,G,C,D
        self.k = kh[:, :, ks:e]  # B,Hkv,L,D
        self.v = vh[:, :, ks:e]
        logits = scale * torch.einsum("bhgcd,bhld->bhgcl", self.q, self.k)
        if gg is not None:
            # Prefix sums local to the chunk's key range: c_i - c_j is then a sum of at most
            # W + chunk terms, never the difference of two large prefix sums (GATEDFWA.md s3).
            # In float64 whatever the compute dtype: strong gates (-20 per step, or the -128
            # floor of gate.sanitize_log_gate) make these sums large, and a float32 sum of
            # magnitude M carries an absolute error ~M * 6e-8 into every logit.
            local = torch.cumsum(gg[..., ks:e].double(), dim=-1)
            logits = logits + (local[..., s - ks:, None] - local[..., None, :]).to(logits.dtype)
        i = torch.arange(s, e, device=qg.device)[:, None]
        j = torch.arange(ks, e, device=qg.device)[None, :]
        self.valid = (j <= i) & (j > i - w)
        if seg_start is not None:  # packed sequences: no key before the row's start
            self.valid = self.valid & (j >= seg_start[s:e, None])
        self.logits = logits.masked_fill(~self.valid, float("-inf"))


def _grouped(q, k, v, log_gate):
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    cd = _compute_dtype(q.dtype)
    qg = q.to(cd).view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4)
    kh = k.to(cd).permute(0, 2, 1, 3)
    vh = v.to(cd).permute(0, 2, 1, 3)
    gg = None
    if log_gate is not None:
        gg = log_gate.to(cd).view(B, T, Hkv, G).permute(0, 2, 3, 1)
    return qg, kh, vh, gg


def _chunks(T: int, chunk: int):
    for s in range(0, T, chunk):
        yield s, min(T, s + chunk)


def _segments(cu_seqlens, T):
    if cu_seqlens is None:
        return None, None
    from gfwagen.varlen import segment_bounds

    return segment_bounds(cu_seqlens, T)


def reference_forward(q, k, v, log_gate=None, window=None, scale=None, chunk: int = 128,
                      cu_seqlens=None):
    """Chunked forward. Returns (o [B,T,Hq,Dv] in q's dtype, lse [B,Hq,T])."""
    B, T, Hq, _ = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    G = Hq // Hkv
    w, scale = _resolve(q, window, scale)
    qg, kh, vh, gg = _grouped(q, k, v, log_gate)
    seg_start, _ = _segments(cu_seqlens, T)
    o = torch.empty(B, Hkv, G, T, Dv, dtype=qg.dtype, device=q.device)
    lse = torch.empty(B, Hkv, G, T, dtype=qg.dtype, device=q.device)
    for s, e in _chunks(T, chunk):
        c = _Chunk(qg, kh, vh, gg, s, e, w, scale, seg_start)
        m = torch.logsumexp(c.logits, dim=-1)
        lse[..., s:e] = m
        o[..., s:e, :] = torch.einsum("bhgcl,bhld->bhgcd", torch.exp(c.logits - m[..., None]), c.v)
    o = o.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, Dv).to(q.dtype)
    return o, lse.reshape(B, Hq, T)


def reference_backward(do, q, k, v, o, lse, log_gate=None, window=None, scale=None,
                       chunk: int = 128, cu_seqlens=None):
    """Chunked backward of GATEDFWA.md section 2. Returns (dq, dk, dv, dlog_gate or None)."""
    B, T, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    G = Hq // Hkv
    w, scale = _resolve(q, window, scale)
    qg, kh, vh, gg = _grouped(q, k, v, log_gate)
    seg_start, seg_end = _segments(cu_seqlens, T)
    cd = qg.dtype
    dog = do.to(cd).view(B, T, Hkv, G, Dv).permute(0, 2, 3, 1, 4)
    og = o.to(cd).view(B, T, Hkv, G, Dv).permute(0, 2, 3, 1, 4)
    delta = (dog * og).sum(-1)  # B,Hkv,G,T
    lseg = lse.to(cd).view(B, Hkv, G, T)
    dq = torch.empty_like(qg)
    dk = torch.zeros_like(kh)
    dv = torch.zeros_like(vh)
    drow = torch.empty(B, Hkv, G, T, dtype=cd, device=q.device)
    dcol = torch.zeros(B, Hkv, G, T, dtype=cd, device=q.device)
    for s, e in _chunks(T, chunk):
        c = _Chunk(qg, kh, vh, gg, s, e, w, scale, seg_start)
        p = torch.exp(c.logits - lseg[..., s:e, None])
        dob = dog[:, :, :, s:e]
        dp = torch.einsum("bhgcd,bhld->bhgcl", dob, c.v)
        ds = p * (dp - delta[..., s:e, None])
        dq[:, :, :, s:e] = scale * torch.einsum("bhgcl,bhld->bhgcd", ds, c.k)
        dk[:, :, c.ks:e] += scale * torch.einsum("bhgcl,bhgcd->bhld", ds, c.q)
        dv[:, :, c.ks:e] += torch.einsum("bhgcl,bhgcd->bhld", p, dob)
        drow[..., s:e] = ds.sum(-1)
        dcol[..., c.ks:e] += ds.sum(-2)
    dq = dq.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D).to(q.dtype)
    dk = dk.permute(0, 2, 1, 3).to(k.dtype)
    dv = dv.permute(0, 2, 1, 3).to(v.dtype)
    dg = None
    if log_gate is not None:
        dg = gate_grad_from_sums(drow.reshape(B, Hq, T), dcol.reshape(B, Hq, T),
                                 seg_end).to(log_gate.dtype)
    return dq, dk, dv, dg
