"""GatedFWA as the sliding-window branch of Native Sparse Attention (NSA).

flash-linear-attention's NSA (fla.ops.nsa.parallel.parallel_nsa, and the naive_nsa reference)
computes its third branch with FlashAttention:

    o_swa = flash_attn_func(q, k, v, causal=True, window_size=(window_size - 1, 0))
    o = torch.addcmul(o, o_swa, g_swa.unsqueeze(-1))

q [B, T, HQ, D], k/v [B, T, H, D] (GQA: HQ % H == 0), window_size W keys with the query's own
included. `gated_sliding_attn(q, k, v, log_gate, W)` takes the same tensors in the same
layout and computes the same thing when log_gate is None; with a log_gate [B, T, HQ] (float32)
it is GatedFWA's gated window (GATEDFWA.md section 1). To swap it in:

    from gfwagen.nsa import gated_sliding_attn
    ...
    if window_size > 0:
        # was: o_swa = flash_attn_func(q, k, v, causal=True, window_size=(window_size-1, 0))
        o_swa = gated_sliding_attn(q, k, v, log_gate, window_size, scale=scale)
        o = torch.addcmul(o, o_swa, g_swa.unsqueeze(-1))

with the gate computed by the NSA layer from its hidden states, one value per query head
(the paper's gate, GATEDFWA.md section 4):

    h = self.gate_proj(hidden_states)                         # [B, T, HQ], bias ~ +4
    beta = 1 + F.elu(self.beta_proj(hidden_states))           # [B, T, HQ], W_beta = 0 at init
    log_gate = gfwagen.gate_preprocess(h, beta)               # [B, T, HQ] float32

(gfwagen.nn.GatedFWA shows the initialization.) Alternatively, `flash_attn_func` below has
flash_attn's signature and accepts `log_gate=` as a keyword, so `from gfwagen.nsa import
flash_attn_func` in NSA's module replaces the branch without touching the call.

Notes: flash_attn_func uses scale 1/sqrt(D) unless softmax_scale is given; NSA's sliding branch
passes none, so leave scale=None to match it (NSA's own `scale` applies to its other two
branches). Variable-length batches (cu_seqlens, flash_attn_varlen_func) are not supported yet:
GatedFWA has no varlen kernel; run each sequence separately or pad. Head dims 16..256 (powers
of two), dtypes bf16/fp16/fp32, differentiable in q, k, v and log_gate, torch.compile-safe.
"""

from __future__ import annotations

from torch import Tensor

import gfwagen

__all__ = ["gated_sliding_attn", "flash_attn_func"]


def gated_sliding_attn(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor | None = None,
                       window: int | None = None, *, scale: float | None = None,
                       backend: str = "auto") -> Tensor:
    """NSA's sliding-window branch, gated: q [B, T, HQ, D], k/v [B, T, H, D], log_gate
    [B, T, HQ] float32 or None, window W (keys i-W+1..i; None: all) -> [B, T, HQ, Dv].
    With log_gate=None it equals flash_attn_func(q, k, v, causal=True,
    window_size=(W - 1, 0))."""
    return gfwagen.attention(q, k, v, log_gate, window=window, scale=scale, backend=backend)


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), *, log_gate: Tensor | None = None,
                    backend: str = "auto") -> Tensor:
    """flash_attn.flash_attn_func's causal, left-window subset, plus log_gate. window_size =
    (left, 0): left = W - 1 keys before the query (left < 0: unbounded)."""
    if not causal:
        raise NotImplementedError("GatedFWA is causal: call with causal=True")
    if dropout_p:
        raise NotImplementedError("attention dropout is not supported (dropout_p must be 0)")
    left, right = window_size
    if right not in (0, -1):
        raise NotImplementedError(f"causal attention has no right window, got {window_size}")
    window = None if left < 0 else int(left) + 1
    return gated_sliding_attn(q, k, v, log_gate, window, scale=softmax_scale, backend=backend)
