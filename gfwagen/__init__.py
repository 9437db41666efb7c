"""gfwagen: GatedFWA (gated sliding-window attention) kernels, generated and autotuned.

    import gfwagen
    o = gfwagen.attention(q, k, v, log_gate, window=512)        # [B, T, Hq, Dv]

The same op is torch.ops.gfwa.attention (torch.compile-safe, differentiable in q, k, v and
log_gate). The paper's gate: gfwagen.gate_preprocess(h, beta) -> log_gate (fused, one pass);
the layer and its ring-buffer KV cache: gfwagen.nn.GatedFWA, gfwagen.nn.GatedFWACache; NSA's
sliding branch: gfwagen.nsa.gated_sliding_attn.
"""

from __future__ import annotations

import torch

from gfwagen import ops as _ops  # noqa: F401  (registers torch.ops.gfwa.*)
from gfwagen.gate_preprocess import gate_preprocess
from gfwagen.reference import naive_attention, reference_backward, reference_forward
from gfwagen.validate import check_inputs

__version__ = "0.1.0"
__all__ = ["attention", "gate_preprocess", "naive_attention", "reference_forward",
           "reference_backward"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              log_gate: torch.Tensor | None = None, *, window: int | None = None,
              scale: float | None = None, backend: str = "auto",
              cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """GatedFWA: causal attention over the last `window` keys (None: all), with the gate bias
    c_i - c_j where c = cumsum(log_gate) along T.

    q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv] (bf16, fp16 or fp32; Hq % Hkv == 0),
    log_gate [B, T, Hq] float32 or None; scale defaults to 1/sqrt(D). backend: "auto"
    (Triton on CUDA; on the CPU the TVM kernels when apache-tvm is installed, else the
    chunked reference), "triton", "tvm" or "reference".

    cu_seqlens: packed variable-length sequences (FlashAttention's convention): B = 1, the
    sequences end to end along T, cu_seqlens = [0, len_0, len_0 + len_1, ..., T] (int32 or
    int64, on q's device). The window and the gate restart at every sequence.
    """
    # Eager calls skip the op's machinery (same kernels, same checks: ops.EagerAttention).
    # Checked here as well as inside the op: the dispatcher's own argument parsing would
    # otherwise answer a non-tensor with a RuntimeError before the op's checks run.
    if _ops.eager_ok(q, k, v, log_gate, cu_seqlens):
        return _ops.EagerAttention.apply(q, k, v, log_gate, window, scale, backend, cu_seqlens)
    check_inputs(q, k, v, log_gate, window, scale, backend, cu_seqlens)
    return torch.ops.gfwa.attention(q, k, v, log_gate, window, scale, backend, cu_seqlens)
