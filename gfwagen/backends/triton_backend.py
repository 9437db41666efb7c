"""Runs the Triton templates on torch tensors: allocates outputs, picks the launch shape from
a KernelConfig, and turns the kernels' row/column sums into the gate gradient.

Inputs arrive validated (gfwagen.validate) with a contiguous last dimension; any other
strides are passed through, so transposed [B, H, T, D] views cost no copy.
"""

from __future__ import annotations

import contextlib

import torch

from gfwagen.gate import GATE_CHUNK, chunked_prefix_sums, gate_grad_from_sums
from gfwagen.spec import KernelConfig
from gfwagen.template_loader import load_template


def kernel_window(window: int | None, T: int) -> int:
    """The compile-time window: 0 (full causal) when the window covers the whole sequence,
    which computes the same thing with fewer masks."""
    return 0 if window is None or window >= T else int(window)


def _dot_precision(dtype: torch.dtype) -> str:
    # Triton's default for a float32 dot is tf32 (about 3e-4 relative error); fp32 callers
    # expect fp32 accuracy.
    return "ieee" if dtype == torch.float32 else "tf32"


def _fit(cfg: KernelConfig, T: int) -> tuple[int, int]:
    """Shrink tiles for short sequences (never below 16, the smallest dot Triton allows)."""
    cap = max(16, 1 << max(0, (T - 1).bit_length()))
    return min(cfg.block_m, cap), min(cfg.block_n, cap)


def _gate(log_gate):
    if log_gate is None:
        return None
    local, base = chunked_prefix_sums(log_gate, GATE_CHUNK)
    return local, base, GATE_CHUNK


def _device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward(q, k, v, log_gate, window, scale, cfg: KernelConfig):
    B, T, H, _ = q.shape
    o = torch.empty(B, T, H, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    gate = _gate(log_gate)
    bm, bn = _fit(cfg, T)
    with _device(q):
        load_template("triton", "fwd").launch_forward(
            q, k, v, gate, o, lse, kernel_window(window, T), scale, H // k.shape[2], bm, bn,
            cfg.num_warps, cfg.num_stages, _dot_precision(q.dtype))
    return o, lse


def backward(do, q, k, v, o, lse, log_gate, window, scale, cfg_kv: KernelConfig,
             cfg_q: KernelConfig):
    B, T, H, _ = q.shape
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if q.numel() == 0:
        dg = torch.zeros_like(log_gate) if log_gate is not None else None
        return dq, dk, dv, dg
    tmpl = load_template("triton", "bwd")
    gated = log_gate is not None
    gate = _gate(log_gate)
    sums = torch.empty(2, B, H, T, dtype=torch.float32, device=q.device) if gated else None
    delta = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    w = kernel_window(window, T)
    group = H // k.shape[2]
    prec = _dot_precision(q.dtype)
    with _device(q):
        tmpl.launch_delta(o, do, delta)
        bm, bn = _fit(cfg_kv, T)
        tmpl.launch_dkdv(q, k, v, do, gate, lse, delta, dk, dv, sums[1] if gated else None, w,
                         scale, group, bm, bn, cfg_kv.num_warps, cfg_kv.num_stages, prec)
        bm, bn = _fit(cfg_q, T)
        tmpl.launch_dq(q, k, v, do, gate, lse, delta, dq, sums[0] if gated else None, w, scale,
                       group, bm, bn, cfg_q.num_warps, cfg_q.num_stages, prec)
    dg = gate_grad_from_sums(sums[0], sums[1]) if gated else None
    return dq, dk, dv, dg
