"""Input checks that run before any kernel launches. Each error names the argument and what
was expected: a wrong call must never reach a kernel, where it would crash or read out of
bounds. The checks also run on fake tensors under torch.compile (they become guards)."""

from __future__ import annotations

import math

import torch

from gfwagen.spec import DTYPES

# Head dims every backend compiles (tl.arange needs powers of two).
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
BACKEND_CHOICES = ("auto", "triton", "tvm", "reference")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_inputs(q, k, v, log_gate, window, scale, backend="auto") -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
