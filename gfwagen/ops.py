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

from gfwagen import dispatch, launch_plans
from gfwagen.validate import check_cu_seqlens_values, check_finite, check_inputs


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _fwd_impl(q, k, v, log_gate, window, scale, backend, cu_seqlens, keep=None):
    check_finite(q, k, v, log_gate)  # a no-op unless GFWAGEN_CHECK_FINITE=1
    check_cu_seqlens_values(cu_seqlens, q.shape[1])  # CPU tensors, or when asked (a sync)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if log_gate is not None:
        # Clamped by dispatch (every backend, forward and backward, sees the same clamped
        # gate: docs/NUMERICS.md).
        log_gate = log_gate.contiguous()
    if cu_seqlens is None:
        o, lse, gate = launch_plans.run(_planned_forward, (q, k, v, log_gate),
                                        (window, _scale(q, scale), backend, keep is not None))
        if keep is not None:
            keep.gate = gate
    else:
        o, lse = dispatch.run_forward(q, k, v, log_gate, window, _scale(q, scale), backend,
                                      cu_seqlens, keep)
    # The fake promises contiguous outputs; compiled graphs check strides against it.
    return o.contiguous(), lse.contiguous()


def _planned_forward(q, k, v, log_gate, window, scale, backend, keep):
    """The forward of one unpacked call as launch_plans records it: keep, whether to return
    the gate tables for the backward (Kept.gate)."""
    kept = dispatch.Kept() if keep else None
    o, lse = dispatch.run_forward(q, k, v, log_gate, window, scale, backend, None, kept)
    return o, lse, kept.gate if kept is not None else None


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


def _bwd_impl(do, q, k, v, o, lse, log_gate, window, scale, backend, cu_seqlens, kept=None):
    do, q, k, v, o = (_last_dim_contiguous(t) for t in (do, q, k, v, o))
    if log_gate is not None:
        log_gate = log_gate.contiguous()
    if cu_seqlens is not None:
        return dispatch.run_backward(do, q, k, v, o, lse.contiguous(), log_gate, window,
                                     _scale(q, scale), backend, cu_seqlens, kept)
    local, base, chunk = (kept.gate if kept is not None and kept.gate is not None
                          else (None, None, None))
    return launch_plans.run(_planned_backward,
                            (do, q, k, v, o, lse.contiguous(), log_gate, local, base),
                            (window, _scale(q, scale), backend, chunk))


def _planned_backward(do, q, k, v, o, lse, log_gate, local, base, window, scale, backend,
                      chunk):
    """The backward of one unpacked call as launch_plans records it: local, base and chunk,
    the forward's gate tables when it kept them (else None)."""
    kept = dispatch.Kept((local, base, chunk)) if local is not None else None
    return dispatch.run_backward(do, q, k, v, o, lse, log_gate, window, scale, backend, None,
                                 kept)


@torch.library.custom_op("gfwa::attention_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                  log_gate: Tensor | None, window: int | None, scale: float | None,
                  backend: str,
                  cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dg = _bwd_impl(do, q, k, v, o, lse, log_gate, window, scale, backend,
                               cu_seqlens)
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


class _NoSecondDerivative(torch.autograd.Function):
    """The identity on a gradient, tied to an input that requires grad; differentiating it
    raises."""

    @staticmethod
    def forward(ctx, grad, anchor):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("gfwagen.attention's backward is not differentiable (no second "
                           "derivative)")


class EagerAttention(torch.autograd.Function):
    """The same forward and backward as torch.ops.gfwa.attention, for eager calls: without the
    custom op's dispatch, autograd wrapper and compiler guard around each direction. On the
    H200's host that is 0.23 ms of host time less per forward+backward, and S5's forward,
    host-bound through the op, went from 0.70 to 0.36 ms (benchmarks/RESULTS.md, session 6).
    gfwagen.attention takes it outside torch.compile, tensor subclasses, modes and functorch
    transforms; everything else goes through the op."""

    @staticmethod
    def forward(ctx, q, k, v, log_gate, window, scale, backend, cu_seqlens):
        check_inputs(q, k, v, log_gate, window, scale, backend, cu_seqlens)
        # the gate tables go from this forward to its backward (two launches less); a gate
        # changed in place in between fails save_for_backward's version check first
        ctx.kept = dispatch.Kept()
        o, lse = _fwd_impl(q, k, v, log_gate, window, scale, backend, cu_seqlens, ctx.kept)
        ctx.save_for_backward(q, k, v, o, lse, log_gate, cu_seqlens)
        ctx.window, ctx.scale, ctx.backend = window, scale, backend
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, log_gate, cu_seqlens = ctx.saved_tensors
        with torch.no_grad():
            grads = _bwd_impl(do, q, k, v, o, lse, log_gate, ctx.window, ctx.scale,
                              ctx.backend, cu_seqlens, ctx.kept)  # dg None when ungated
        anchor = next((t for t in (q, k, v, log_gate) if t is not None and t.requires_grad),
                      None)
        if torch.is_grad_enabled() and anchor is not None:
            # create_graph=True: differentiating these gradients must fail, as through the
            # op, not treat them as constants (a gradient penalty would silently lose terms)
            grads = [None if g is None else _NoSecondDerivative.apply(g, anchor)
                     for g in grads]
        return *grads, None, None, None, None


def eager_ok(*tensors) -> bool:
    """Whether EagerAttention may stand in for the op: plain tensors, no torch.compile
    tracing, no torch-function or dispatch modes (fake tensors, flop counters) and no
    functorch transforms, all of which need the op's registrations."""
    return (not torch.compiler.is_compiling()
            and all(type(t) is Tensor for t in tensors if t is not None)
            and torch._C._len_torch_function_stack() == 0
            and torch._C._len_torch_dispatch_stack() == 0
            and torch._C._functorch.maybe_current_level() is None)

