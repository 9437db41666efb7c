"""The vocabulary every part of gfwagen shares: what a kernel computes (KernelSpec) and how it
is tiled (KernelConfig). Both are frozen, and their stable keys name compile-cache entries
and tuning-database rows, so a key must never depend on Python's per-process hash seed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch

BACKENDS = ("triton", "tvm", "reference")
# fwd: output and lse; bwd_kv: dk, dv and the gate's column sums; bwd_q: dq and row sums;
# bwd_ds: the whole stored-dS backward (dk/dv keeps dS, dq reads it back; triton only).
PASSES = ("fwd", "bwd_kv", "bwd_q", "bwd_ds")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = (16, 32, 64, 96, 128, 192, 256)
# The smallest scale magnitude a forward kernel runs: the scale reaches the kernels as float32,
# which holds nothing under 2^-149 and may flush anything under 2^-126 to zero, and the
# forwards turn a zero scale into NaN (-inf * 0, or gate biases divided by it). A smaller
# nonzero scale runs at this one, same sign: Q K^T then moves a logit by |q.k| 2^-100, nothing
# at float32's resolution (backends/triton_backend.kernel_scale, tvm_backend.wgmma_scale).
SMALLEST_KERNEL_SCALE = 2.0 ** -100

# Window classes bucket the window so that one tuned entry serves nearby windows; the exact
# window is still a compile-time constant of the kernel (it bounds the loops).
WINDOW_CLASSES = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise TypeError(f"unsupported dtype {dtype}; expected one of {sorted(DTYPES)}")


def window_class(window: int | None) -> int:
    """Smallest class >= window; 0 stands for full causal attention (window None)."""
    if window is None:
        return 0
    for c in WINDOW_CLASSES:
        if window <= c:
            return c
    return 0


def effective_window(window: int | None, seqlen: int) -> int:
    """The window the kernels run: 0 (full causal) when it covers the whole sequence, which
    computes the same thing with fewer masks. Tuning entries are keyed by it, since a window
    of 4096 over 1100 tokens runs the causal kernel, not the 4096 one."""
    return 0 if not window or window >= seqlen else int(window)


def stable_hash(obj: Any, n: int = 16) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """What changes the computation. window=0 means full causal."""

    backend: str
    pass_: str
    head_dim: int
    value_dim: int
    window: int
    dtype: str
    gated: bool
    group: int  # query heads per kv head (1 = MHA)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.pass_ not in PASSES:
            raise ValueError(f"pass must be one of {PASSES}, got {self.pass_!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.window < 0 or self.group < 1:
            raise ValueError(f"window must be >= 0 and group >= 1, got {self.window}, {self.group}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        return stable_hash(self.as_dict())

    def replace(self, **kw) -> KernelSpec:
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """What only changes speed. Backend-specific knobs live in `extra` as sorted pairs so the
    config stays hashable and its key stable."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        for name in ("block_m", "block_n", "num_warps"):
            v = getattr(self, name)
            # block_m may also be a multiple of 64: the TVM wgmma forward's 192 rows (three
            # consumer warpgroups); the backends check their own tiles beyond this
            tile = name == "block_m" and isinstance(v, int) and v > 0 and v % 64 == 0
            if not tile and (not isinstance(v, int) or v < 1 or v & (v - 1)):
                raise ValueError(f"config.{name} must be a positive power of two"
                                 f"{' or multiple of 64' if name == 'block_m' else ''}, "
                                 f"got {v!r}")
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"config.num_stages must be an int in [1, 8], got {self.num_stages!r}")
        object.__setattr__(self, "extra", tuple(sorted(dict(self.extra).items())))

    def get(self, name: str, default: Any = None) -> Any:
        return dict(self.extra).get(name, default)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> KernelConfig:
        d = dict(d)
        extra = d.pop("extra", {}) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return cls(**d, extra=tuple(sorted(extra.items())))

    def key(self) -> str:
        return stable_hash(self.as_dict())


@dataclasses.dataclass(frozen=True)
class Problem:
    """One attention call's shape, as the tuner and the database see it."""

    batch: int
    seqlen: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    window: int  # 0 = full causal
    dtype: str
    gated: bool = True

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def spec(self, backend: str, pass_: str) -> KernelSpec:
        return KernelSpec(backend, pass_, self.head_dim, self.value_dim,
                          effective_window(self.window, self.seqlen), self.dtype, self.gated,
                          self.group)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
