"""The paper's gate with fused one-pass preprocessing (GATEDFWA.md section 4).

    log_gate = gfwagen.gate_preprocess(h, beta)                       # [B, T, H] float32
    log_gate, local, base = gfwagen.gate_preprocess(h, beta, return_prefix_sums=True)

From the gate logit h [B, T, H] and the sharpness beta [B, T, H] (> 0; the paper's
beta = 1 + elu(x W_beta)):

    log_gate = logsigmoid(beta * h) / (beta + eps),    eps = 1e-3

With return_prefix_sums the same pass also yields the gate's inclusive prefix sums in the
chunked form of gfwagen.gate.chunked_prefix_sums: c_t * log2(e) = base[t // GATE_CHUNK] +
local[t], local [B, H, T] float32, base [B, H, ceil(T / GATE_CHUNK)] float64. All three outputs
are differentiable; gradients flow to h and beta (the backward is one pass as well).

The op is torch.ops.gfwa.gate_preprocess (torch.library custom op: torch.compile sees one
opaque node). On CUDA it runs the Triton template templates/triton/gate.py (one kernel
forward, one backward); on the CPU plain torch ops ("torch"); backend="triton" forces the
template (under TRITON_INTERPRET=1 on the CPU, which is how the tests check it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gfwagen.gate import _LOG2E, GATE_CHUNK, chunked_prefix_sums
from gfwagen.heuristics import interpreting

GATE_EPS = 1e-3
GATE_BACKENDS = ("auto", "triton", "torch")

__all__ = ["GATE_EPS", "gate_preprocess", "gate_log_reference"]


def gate_log_reference(h: Tensor, beta: Tensor, eps: float = GATE_EPS) -> Tensor:
    """The formula as plainly as possible (autograd differentiates it; float64 in, float64
    out; otherwise float32 out)."""
    cd = torch.float64 if h.dtype == torch.float64 else torch.float32
    b = beta.to(cd)
    return F.logsigmoid(b * h.to(cd)) / (b + eps)


def _check(h, beta, eps, backend):
    for name, t in (("h", h), ("beta", beta)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [B, T, H], got shape {list(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if h.shape != beta.shape:
        raise ValueError(f"h and beta must have the same shape, got {list(h.shape)} and "
                         f"{list(beta.shape)}")
    if h.device != beta.device:
        raise ValueError(f"beta is on {beta.device} but h is on {h.device}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if backend not in GATE_BACKENDS:
        raise ValueError(f"backend must be one of {GATE_BACKENDS}, got {backend!r}")
    if backend == "triton" and not h.is_cuda and not interpreting():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run "
                         "the Triton interpreter on the CPU)")


def _use_triton(t: Tensor, backend: str) -> bool:
    return backend == "triton" or (backend == "auto" and t.is_cuda)


def _device(t: Tensor):
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _nchunk(T):
    return (T + GATE_CHUNK - 1) // GATE_CHUNK


# ---------------------------------------------------------------------------------------------
# torch (CPU) implementations


def _torch_fwd(h, beta, eps, with_prefix):
    g = gate_log_reference(h.float(), beta.float(), eps)
    if not with_prefix:
        return g, None, None
    local, base = chunked_prefix_sums(g, GATE_CHUNK)
    return g, local, base


def _torch_bwd(dg, dlocal, dbase, h, beta, eps):
    dg = dg.float()
    B, T, H = h.shape
    if dlocal is not None:
        # local[t] = log2(e) * sum of the gates of t's chunk up to t
        pad = _nchunk(T) * GATE_CHUNK - T
        dl = F.pad(dlocal.float(), (0, pad)).view(B, H, -1, GATE_CHUNK)
        suffix = dl.flip(-1).cumsum(-1).flip(-1).reshape(B, H, -1)[..., :T]
        dg = dg + _LOG2E * suffix.transpose(1, 2)
    if dbase is not None:
        # base[k] = log2(e) * sum of the gates of the chunks before k
        db = dbase.double()
        after = db.flip(-1).cumsum(-1).flip(-1) - db  # sum over chunks k' > k
        per_t = after.repeat_interleave(GATE_CHUNK, dim=-1)[..., :T]
        dg = dg + (_LOG2E * per_t).transpose(1, 2).float()
    x, b = h.float(), beta.float()
    z = b * x
    e = torch.exp(-z.abs())
    sig_neg = torch.sigmoid(-z)
    inv = 1.0 / (b + eps)
    # d/dbeta = sigmoid(-z) h / (beta + eps) - logsigmoid(z) / (beta + eps)^2
    #         = (r + sigmoid(-z) h eps) / (beta + eps)^2 with r = sigmoid(-z) z - logsigmoid(z)
    #         = |z| e / (1 + e) + log1p(e) >= 0 (e = exp(-|z|)): no cancellation for z << 0
    r = z.abs() * (e / (1.0 + e)) + torch.log1p(e)
    dh = dg * sig_neg * b * inv
    dbeta = dg * ((r + sig_neg * x * eps) * inv * inv)
    return dh.to(h.dtype), dbeta.to(beta.dtype)


# ---------------------------------------------------------------------------------------------
# Triton


def _template():
    from gfwagen.template_loader import load_template

    return load_template("triton", "gate")


def _triton_fwd(h, beta, eps, with_prefix):
    B, T, H = h.shape
    g = torch.empty(B, T, H, dtype=torch.float32, device=h.device)
    local = torch.empty(B, H, T, dtype=torch.float32, device=h.device) if with_prefix else g
    base = (torch.empty(B, H, _nchunk(T), dtype=torch.float64, device=h.device)
            if with_prefix else g)
    if g.numel():
        with _device(h):
            _template().launch_gate_fwd(h, beta, g, local, base, eps, GATE_CHUNK, with_prefix)
    return (g, local, base) if with_prefix else (g, None, None)


def _triton_bwd(dg, dlocal, dbase, h, beta, eps):
    with_prefix = dlocal is not None or dbase is not None
    B, T, H = h.shape
    dh, dbeta = torch.empty_like(h), torch.empty_like(beta)
    if with_prefix:
        if dlocal is None:
            dlocal = torch.zeros(B, H, T, dtype=torch.float32, device=h.device)
        if dbase is None:
            dbase = torch.zeros(B, H, _nchunk(T), dtype=torch.float64, device=h.device)
        dlocal, dbase = dlocal.float().contiguous(), dbase.double().contiguous()
    else:
        dlocal = dbase = dg
    if h.numel():
        with _device(h):
            _template().launch_gate_bwd(h, beta, dg, dlocal, dbase, dh, dbeta, eps, GATE_CHUNK,
                                        with_prefix)
    return dh, dbeta


# ---------------------------------------------------------------------------------------------
# torch.ops.gfwa.gate_preprocess


@torch.library.custom_op("gfwa::gate_preprocess", mutates_args=(), device_types=("cpu", "cuda"))
def gate_preprocess_op(h: Tensor, beta: Tensor, eps: float, with_prefix: bool,
                       backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (log_gate [B,T,H] f32, local [B,H,T] f32, base [B,H,nchunk] f64); local and base
    are empty (shape [0]) unless with_prefix."""
    h, beta = h.contiguous(), beta.contiguous()
    fwd = _triton_fwd if _use_triton(h, backend) else _torch_fwd
    g, local, base = fwd(h, beta, eps, with_prefix)
    if local is None:
        local = h.new_empty(0, dtype=torch.float32)
        base = h.new_empty(0, dtype=torch.float64)
    return g, local.contiguous(), base.contiguous()


@gate_preprocess_op.register_fake
def _(h, beta, eps, with_prefix, backend):
    B, T, H = h.shape
    g = h.new_empty(B, T, H, dtype=torch.float32)
    if with_prefix:
        return (g, h.new_empty(B, H, T, dtype=torch.float32),
                h.new_empty(B, H, _nchunk(T), dtype=torch.float64))
    return g, h.new_empty(0, dtype=torch.float32), h.new_empty(0, dtype=torch.float64)


@torch.library.custom_op("gfwa::gate_preprocess_bwd", mutates_args=(),
                         device_types=("cpu", "cuda"))
def gate_preprocess_bwd(dlog_gate: Tensor, dlocal: Tensor | None, dbase: Tensor | None,
                        h: Tensor, beta: Tensor, eps: float,
                        backend: str) -> tuple[Tensor, Tensor]:
    h, beta = h.contiguous(), beta.contiguous()
    dg = dlog_gate.float().contiguous()
    bwd = _triton_bwd if _use_triton(h, backend) else _torch_bwd
    dh, dbeta = bwd(dg, dlocal, dbase, h, beta, eps)
    return dh.contiguous(), dbeta.contiguous()


@gate_preprocess_bwd.register_fake
def _(dlog_gate, dlocal, dbase, h, beta, eps, backend):
    return h.new_empty(h.shape), beta.new_empty(beta.shape)


def _setup_context(ctx, inputs, output):
    h, beta, eps, with_prefix, backend = inputs
    ctx.save_for_backward(h, beta)
    ctx.eps, ctx.with_prefix, ctx.backend = eps, with_prefix, backend


def _backward(ctx, dg, dlocal, dbase):
    h, beta = ctx.saved_tensors
    if dg is None:
        dg = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    if not ctx.with_prefix:
        dlocal = dbase = None
    dh, dbeta = torch.ops.gfwa.gate_preprocess_bwd(dg, dlocal, dbase, h, beta, ctx.eps,
                                                   ctx.backend)
    return dh, dbeta, None, None, None


gate_preprocess_op.register_autograd(_backward, setup_context=_setup_context)


def gate_preprocess(h: Tensor, beta: Tensor, *, eps: float = GATE_EPS,
                    return_prefix_sums: bool = False, backend: str = "auto"):
    """log_gate = logsigmoid(beta * h) / (beta + eps) as [B, T, H] float32 (the attention's
    log_gate); with return_prefix_sums also (local, base), the chunked prefix sums (module
    docstring). backend: "auto" (Triton on CUDA, torch on the CPU), "triton" or "torch"."""
    _check(h, beta, eps, backend)
    g, local, base = torch.ops.gfwa.gate_preprocess(h, beta, float(eps),
                                                    bool(return_prefix_sums), backend)
    return (g, local, base) if return_prefix_sums else g
