"""torch.ops.gfwa: the GatedFWA operator as PyTorch sees it.

- gfwa::attention_fwd(q, k, v, log_gate, window, scale, backend, cu_seqlens) -> (o, lse)
- gfwa::attention_bwd(do, q, k, v, o, lse, log_gate, window, scale, backend, cu_seqlens)
      -> (dq, dk, dv, dlog_gate)   (dlog_gate is empty when there is no gate)
- gfwa::attention(q, k, v, log_gate, window, scale=None, backend="auto", cu_seqlens=None)
      -> o
      CompositeImplicitAutograd: validates, then calls attention_fwd. It exists so that the
      public op returns one tensor while the lse the backward needs stays a saved output of
      attention_fwd, computed once.

Why torch.library.custom_op and not triton_op: the CUDA kernel is chosen at call time among
backends (Triton, TVM) and tuned configs, and the CPU kernel is not Triton at all; an opaque
custom op gives torch.compile one node with a fake (shape-only) implementation and keeps
Inductor from tracing into one particular backend's kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gfwagen import dispatch
from gfwagen.validate import check_cu_seqlens_values, check_finite, check_inputs


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _fwd_impl(q, k, v, log_gate, window, scale, backend, cu_seqlens):
    check_finite(q, k, v, log_gate)  # a no-op unless GFWAGEN_CHECK_FINITE=1
    check_cu_seqlens_values(cu_seqlens, q.shape[1])  # CPU tensors, or when asked (a sync)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if log_gate is not None:
        # Clamped by dispatch (every backend, forward and backward, sees the same clamped
        # gate: docs/NUMERICS.md).
        log_gate = log_gate.contiguous()
    o, lse = dispatch.run_forward(q, k, v, log_gate, window, _scale(q, scale), backend,
                                  cu_seqlens)
    # The fake promises contiguous outputs; compiled graphs check strides against it.
    return o.contiguous(), lse.contiguous()


@torch.library.custom_op("gfwa::attention_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor | None, window: int | None,
                  scale: float | None, backend: str,
                  cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return _fwd_impl(q, k, v, log_gate, window, scale, backend, cu_seqlens)


@attention_fwd.register_fake
def _(q, k, v, log_gate, window, scale, backend, cu_seqlens=None):
    B, T, H, _ = q.shape
    o = q.new_empty(B, T, H, v.shape[3])
    lse = q.new_empty(B, H, T, dtype=torch.float32)
    return o, lse


@torch.library.custom_op("gfwa::attention_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                  log_gate: Tensor | None, window: int | None, scale: float | None,
                  backend: str,
                  cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    do, q, k, v, o = (_last_dim_contiguous(t) for t in (do, q, k, v, o))
    if log_gate is not None:
        log_gate = log_gate.contiguous()
    dq, dk, dv, dg = dispatch.run_backward(do, q, k, v, o, lse.contiguous(), log_gate, window,
                                           _scale(q, scale), backend, cu_seqlens)
    if dg is None:
        dg = q.new_empty(0, dtype=torch.float32)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dg.contiguous()


@attention_bwd.register_fake
def _(do, q, k, v, o, lse, log_gate, window, scale, backend, cu_seqlens=None):
    dg = q.new_empty(log_gate.shape if log_gate is not None else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dg


def _setup_context(ctx, inputs, output):
    q, k, v, log_gate, window, scale, backend, cu_seqlens = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, log_gate, cu_seqlens)
    ctx.window, ctx.scale, ctx.backend = window, scale, backend
    ctx.mark_non_differentiable(lse)
    # lse's incoming gradient is unused: not materializing it saves a zero-fill per backward
    ctx.set_materialize_grads(False)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, log_gate, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dg = torch.ops.gfwa.attention_bwd(do, q, k, v, o, lse, log_gate, ctx.window,
                                                  ctx.scale, ctx.backend, cu_seqlens)
    return dq, dk, dv, (dg if log_gate is not None else None), None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)

_lib = torch.library.Library("gfwa", "FRAGMENT")
_lib.define("attention(Tensor q, Tensor k, Tensor v, Tensor? log_gate, SymInt? window, "
            "float? scale=None, str backend='auto', Tensor? cu_seqlens=None) -> Tensor")


def _attention_composite(q, k, v, log_gate, window, scale=None, backend="auto",
                         cu_seqlens=None):
    check_inputs(q, k, v, log_gate, window, scale, backend, cu_seqlens)
    return torch.ops.gfwa.attention_fwd(q, k, v, log_gate, window, scale, backend,
                                        cu_seqlens)[0]


_lib.impl("attention", _attention_composite, "CompositeImplicitAutograd")
