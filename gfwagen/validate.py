"""Input checks that run before any kernel launches. Each error names the argument and what
was expected: a wrong call must never reach a kernel, where it would crash or read out of
bounds. The checks also run on fake tensors under torch.compile (they become guards)."""

from __future__ import annotations

import math
import os

import torch

from gfwagen.spec import DTYPES

# Head dims every backend compiles. The Triton kernels pad a head dim that is not a power of
# two (96, 192) to the next one (tl.arange needs powers of two), masking the extra columns.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 96, 128, 192, 256)
BACKEND_CHOICES = ("auto", "triton", "tvm", "reference")
# The op's int arguments travel as int64 through the dispatcher; scale reaches kernels as fp32.
_INT64_MAX = 2**63 - 1
_FP32_MAX = torch.finfo(torch.float32).max
# Opt-in value checks (docs/NUMERICS.md): each one reads every element and, on CUDA, waits
# for the device, so they are off unless this is "1".
CHECK_FINITE_ENV = "GFWAGEN_CHECK_FINITE"


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_inputs(q, k, v, log_gate, window, scale, backend="auto", cu_seqlens=None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _check_dense(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {_shape(t)}")
    if q.dtype not in DTYPES.values():
        raise TypeError(f"q must be bfloat16, float16 or float32, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    B, T, Hq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if k.shape[1] != T or v.shape[1] != T:
        raise ValueError(f"sequence lengths differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    Hkv = k.shape[2]
    if v.shape[2] != Hkv:
        raise ValueError(f"k and v must have the same number of heads, got k {_shape(k)}, "
                         f"v {_shape(v)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of k's heads ({Hkv}) for GQA")
    if k.shape[3] != D:
        raise ValueError(f"k's head dim must equal q's ({D}), got k {_shape(k)}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q's head dim must be one of {SUPPORTED_HEAD_DIMS}, got {D}")
    if v.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"v's head dim must be one of {SUPPORTED_HEAD_DIMS}, got {v.shape[3]}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if log_gate is not None:
        if not isinstance(log_gate, torch.Tensor):
            raise TypeError(f"log_gate must be a torch.Tensor or None, got "
                            f"{type(log_gate).__name__}")
        _check_dense("log_gate", log_gate)
        if log_gate.dtype != torch.float32:
            raise TypeError(f"log_gate must be float32, got {log_gate.dtype}")
        if log_gate.dim() != 3 or tuple(log_gate.shape) != (B, T, Hq):
            raise ValueError(f"log_gate must have shape [B, T, Hq] = [{B}, {T}, {Hq}], got "
                             f"{_shape(log_gate)}")
        if log_gate.device != q.device:
            raise ValueError(f"log_gate is on {log_gate.device} but q is on {q.device}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, (int, torch.SymInt)):
            raise TypeError(f"window must be an int or None, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window must be >= 1 (None for full causal), got {window}")
        if window > _INT64_MAX:
            raise ValueError(f"window must be < 2**63 (None for full causal), got {window}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        try:
            fscale = float(scale)
        except OverflowError:  # an int beyond float range
            fscale = math.inf
        if not math.isfinite(fscale) or abs(fscale) > _FP32_MAX:
            raise ValueError(f"scale must be finite (in float32 range), got {scale}")
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, q)


def _check_cu_seqlens(cu, q) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor or None, got {type(cu).__name__}")
    _check_dense("cu_seqlens", cu)
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be 1-D [num_sequences + 1] (at least 2 entries: "
                         f"[0, ..., T]), got shape {_shape(cu)}")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the sequences are packed along T, so q's batch must "
                         f"be 1, got q {_shape(q)}")
    if cu.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu.device} but q is on {q.device}")


def check_cu_seqlens_values(cu, T: int, *, force: bool = False) -> None:
    """ValueError unless cu_seqlens starts at 0, never decreases and ends at T. Always on CPU
    tensors; on CUDA only with GFWAGEN_CHECK_FINITE=1 (or force): reading the values waits
    for the device. Unchecked values cannot make a kernel read out of bounds (the per-position
    bounds are clamped: gfwagen.varlen), but they would pack the wrong sequences."""
    if cu is None or not (force or cu.device.type == "cpu" or finite_checks_enabled()):
        return
    vals = cu.tolist()
    if vals[0] != 0 or vals[-1] != T or any(b < a for a, b in zip(vals[:-1], vals[1:])):
        shown = vals if len(vals) <= 8 else vals[:4] + ["..."] + vals[-3:]
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at T = {T}; "
                         f"got {shown}")


def _check_dense(name: str, t: torch.Tensor) -> None:
    # Sparse, nested and other non-strided layouts have no kernel; refuse them here rather
    # than let the dispatcher answer with NotImplementedError or an internal RuntimeError.
    if t.layout != torch.strided or t.is_nested:
        kind = "nested" if t.is_nested else str(t.layout)
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {kind} tensor")


def finite_checks_enabled() -> bool:
    return os.environ.get(CHECK_FINITE_ENV, "") == "1"


def check_finite(q, k, v, log_gate, *, force: bool = False) -> None:
    """With GFWAGEN_CHECK_FINITE=1 (or force=True): ValueError if q, k or v holds NaN or
    +-inf, or log_gate holds NaN. log_gate's infinities are allowed: the op clamps them
    (gate.sanitize_log_gate; -inf means "forget"). Off by default: it reads every element
    and, on CUDA, synchronizes with the device. Runs on real tensors only (inside the op's
    kernel call, so compiled graphs check too)."""
    if not (force or finite_checks_enabled()):
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains non-finite values "
                             f"({int(torch.isnan(t).sum())} NaN, {int(torch.isinf(t).sum())} "
                             f"inf; checked because {CHECK_FINITE_ENV}=1)")
    if log_gate is not None and log_gate.numel() and bool(torch.isnan(log_gate).any()):
        raise ValueError(f"log_gate contains NaN ({int(torch.isnan(log_gate).sum())} values; "
                         f"checked because {CHECK_FINITE_ENV}=1)")
