"""GatedFWA decode over a ring-buffer KV cache: a few new tokens per sequence, batched, each
sequence at its own length. Memory is the ring (R slots); it does not grow with generation.

    from gfwagen.decode import decode_attention
    o = decode_attention(q, k_new, v_new, k_ring, v_ring, seqlens,
                         c_ring=c_ring, c_new=c_new, window=W)

Shapes (S new tokens, 1 <= S; the rank-3 forms [B, H, D] mean S = 1):
    q        [B, S, Hq, D]      new queries (positions seqlens[b] .. seqlens[b] + S - 1)
    k_new    [B, S, Hkv, D]     the new tokens' keys / values (NOT yet in the ring)
    v_new    [B, S, Hkv, Dv]
    k_ring   [B, R, Hkv, D]     the ring: position p sits at slot p % R (any strides with a
    v_ring   [B, R, Hkv, Dv]    contiguous last dim: [B, Hkv, R, D].transpose(1, 2) works too)
    seqlens  int [B]            L_b: positions seen before the new tokens (min(L_b, R) filled)
    c_ring   [B, R, Hq] float   gate prefix sums at the ring's positions and at the new ones:
    c_new    [B, S, Hq] float   float32 relative to any per-(b, h) reference (normally the
                                prefix at position L_b - 1: then both are sums over <= R + S
                                gates, and c_new - c_ring is formed without cancellation), or
                                float64 (absolute is fine: the difference is taken in float64,
                                then rounded to float32); None, None: no gate
    window   int W or None      query at position i sees keys i-W+1 .. i. Needs R >= W - 1;
                                None (full causal) needs R >= L_b + S - 1 (not checked: no sync)
Returns o [B, S, Hq, Dv] (or [B, Hq, Dv] for rank-3 q) in q's dtype.

Backends: "triton" (CUDA, or Triton's interpreter on the CPU under TRITON_INTERPRET=1),
"torch" (plain torch ops, any device) and "auto" (Triton on CUDA, torch otherwise). The Triton
path is split-K over the ring (templates/triton/decode.py); it allocates only a workspace whose
size depends on shapes and n_splits, and never reads seqlens on the host: it can be captured
in a CUDA graph (give `workspace=` from decode_workspace to avoid even that allocation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["decode_attention", "decode_attention_torch", "decode_workspace", "default_n_splits"]

MAX_TRITON_S = 16  # new tokens per sequence the Triton kernel takes (more: the torch path)
MAX_TRITON_ROWS = 128  # S * G query rows per program


def _template():
    from gfwagen.template_loader import load_template

    return load_template("triton", "decode")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H200; only shapes the split count under the interpreter


def default_n_splits(B: int, Hkv: int, R: int, device: torch.device, block_n: int = 64) -> int:
    """Splits of the ring so that B * Hkv * n_splits fills the GPU (>= ~4 programs per SM),
    each split at least 4 tiles long. Depends on shapes only (CUDA-graph safe)."""
    want = math.ceil(4 * _num_sms(device) / max(1, B * Hkv))
    most = max(1, math.ceil(R / (4 * block_n)))
    return max(1, min(want, most, 64))


def decode_workspace(B: int, S: int, Hq: int, Hkv: int, Dv: int, n_splits: int,
                     device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(m, l, acc) float32 partials of the split kernel, reusable across calls of one shape."""
    block_m, _, dv_pad = _template().workspace_dims(S, Hq // Hkv, Dv)
    f32 = torch.float32
    return (torch.empty(B * Hkv, n_splits, block_m, dtype=f32, device=device),
            torch.empty(B * Hkv, n_splits, block_m, dtype=f32, device=device),
            torch.empty(B * Hkv, n_splits, block_m, dv_pad, dtype=f32, device=device))


def _check(q, k_new, v_new, k_ring, v_ring, seqlens, c_ring, c_new, window):
    B, S, Hq, D = q.shape
    _, R, Hkv, Dk = k_ring.shape
    if Dk != D or k_new.shape != (B, S, Hkv, D) or k_ring.shape[0] != B:
        raise ValueError(f"shapes: q {tuple(q.shape)}, k_new {tuple(k_new.shape)}, "
                         f"k_ring {tuple(k_ring.shape)}")
    Dv = v_ring.shape[3]
    if v_ring.shape != (B, R, Hkv, Dv) or v_new.shape != (B, S, Hkv, Dv):
        raise ValueError(f"shapes: v_new {tuple(v_new.shape)}, v_ring {tuple(v_ring.shape)}")
    if Hq % Hkv:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    if seqlens.shape != (B,):
        raise ValueError(f"seqlens must be [B] = [{B}], got {tuple(seqlens.shape)}")
    if (c_ring is None) != (c_new is None):
        raise ValueError("give both c_ring and c_new, or neither")
    if c_ring is not None and (c_ring.shape != (B, R, Hq) or c_new.shape != (B, S, Hq)):
        raise ValueError(f"gate state: c_ring {tuple(c_ring.shape)} (want {(B, R, Hq)}), "
                         f"c_new {tuple(c_new.shape)} (want {(B, S, Hq)})")
    if window is not None and (window < 1 or R < window - 1):
        raise ValueError(f"a ring of {R} slots cannot serve window {window} (needs >= W - 1)")


def _window_eff(window: int | None, R: int, S: int) -> int:
    # rows see ring distances d <= WIN - 2 - s; None: every filled slot
    return R + S + 1 if window is None else int(window)


def decode_attention_torch(q, k_new, v_new, k_ring, v_ring, seqlens, c_ring=None, c_new=None,
                           window=None, scale=None) -> Tensor:
    """The decode in plain torch (rank-4 inputs): O(S (R + S)) work per (sequence, head),
    fp32 math (the gate bias c_new - c is formed in c's own dtype, then rounded to fp32)."""
    B, S, Hq, D = q.shape
    R, Hkv = k_ring.shape[1], k_ring.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    win = _window_eff(window, R, S)
    L = seqlens.to(device=q.device, dtype=torch.long)
    slots = torch.arange(R, device=q.device)
    newest = (L - 1) % R  # floor mod; unused where L == 0 (nothing filled)
    dist = (newest[:, None] - slots[None, :]) % R  # B, R
    filled = slots[None, :] < L[:, None]
    s_idx = torch.arange(S, device=q.device)
    ring_ok = filled[:, None, :] & (dist[:, None, :] <= (win - 2 - s_idx)[None, :, None])
    new_ok = (s_idx[None, :] <= s_idx[:, None]) & (s_idx[None, :] > s_idx[:, None] - win)
    new_ok = new_ok.expand(B, S, S)
    valid = torch.cat([ring_ok, new_ok], dim=-1)[:, None, None]  # B, 1, 1, S, R+S
    keys = torch.cat([k_ring, k_new.to(k_ring.dtype)], dim=1).float()  # B, R+S, Hkv, D
    vals = torch.cat([v_ring, v_new.to(v_ring.dtype)], dim=1).float()
    qg = q.float().view(B, S, Hkv, G, D)
    s = torch.einsum("bthgd,bshd->bhgts", qg, keys) * scale
    if c_ring is not None:
        c_k = torch.cat([c_ring, c_new.to(c_ring.dtype)], dim=1)  # B, R+S, Hq
        bias = (c_new.to(c_k.dtype)[:, :, None, :] - c_k[:, None, :, :]).float()
        bias = bias.permute(0, 3, 1, 2).reshape(B, Hkv, G, S, -1)
        s = s + bias.masked_fill(~valid, 0.0)
    s = s.masked_fill(~valid, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bhgts,bshd->bthgd", p, vals)
    return o.reshape(B, S, Hq, -1).to(q.dtype)


def _use_triton(backend: str, q: Tensor, S: int, G: int) -> bool:
    if backend == "torch":
        return False
    fits = S <= MAX_TRITON_S and S * G <= MAX_TRITON_ROWS
    if backend == "triton":
        if not fits:
            raise ValueError(f"the Triton decode takes S <= {MAX_TRITON_S} and S * G <= "
                             f"{MAX_TRITON_ROWS} (got S={S}, G={G})")
        return True
    if backend == "auto":
        return q.is_cuda and fits
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def decode_attention(q: Tensor, k_new: Tensor, v_new: Tensor, k_ring: Tensor, v_ring: Tensor,
                     seqlens: Tensor, c_ring: Tensor | None = None, c_new: Tensor | None = None,
                     window: int | None = None, scale: float | None = None,
                     backend: str = "auto", n_splits: int | None = None, block_n: int = 64,
                     num_warps: int = 4, num_stages: int = 2, out: Tensor | None = None,
                     workspace: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """GatedFWA attention of S new tokens per sequence over a ring cache (module docstring)."""
    squeeze = q.dim() == 3
    if squeeze:
        q, k_new, v_new = q[:, None], k_new[:, None], v_new[:, None]
        c_new = None if c_new is None else c_new[:, None]
    _check(q, k_new, v_new, k_ring, v_ring, seqlens, c_ring, c_new, window)
    B, S, Hq, D = q.shape
    R, Hkv, Dv = k_ring.shape[1], k_ring.shape[2], v_ring.shape[3]
    out_dtype = q.dtype
    if not _use_triton(backend, q, S, Hq // Hkv):
        o = decode_attention_torch(q, k_new, v_new, k_ring, v_ring, seqlens, c_ring, c_new,
                                   window, scale)
        if out is not None:
            out.copy_(o[:, 0] if squeeze else o)
            return out
        return o[:, 0] if squeeze else o

    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    def last_contig(t):
        return t if t.stride(-1) == 1 else t.contiguous()

    q, k_new, v_new = last_contig(q), last_contig(k_new), last_contig(v_new)
    k_ring, v_ring = last_contig(k_ring), last_contig(v_ring)
    dt = k_ring.dtype
    if dt == torch.bfloat16 and not q.is_cuda:
        # Triton 3.6's interpreter computes tl.dot on bfloat16 operands wrongly (off by
        # orders of magnitude); on the CPU run the kernel on float32 copies instead
        dt = torch.float32
        k_ring, v_ring = k_ring.to(dt), v_ring.to(dt)
    q, k_new, v_new = q.to(dt), k_new.to(dt), v_new.to(dt)
    if c_ring is not None:
        if c_ring.dtype != torch.float64:
            c_ring = c_ring.float()
        c_new = c_new.to(c_ring.dtype)
    seqlens = seqlens.to(torch.int32)
    if n_splits is None:
        n_splits = default_n_splits(B, Hkv, R, q.device, block_n)
    if workspace is None:
        workspace = decode_workspace(B, S, Hq, Hkv, Dv, n_splits, q.device)
    o4 = None
    if out is not None:
        o4 = out[:, None] if squeeze else out
        if o4.stride(-1) != 1:
            o4 = None
    o = o4 if o4 is not None else torch.empty(B, S, Hq, Dv, dtype=out_dtype, device=q.device)
    _template().launch_decode(q, k_new, v_new, k_ring, v_ring, seqlens, c_ring, c_new, o,
                              *workspace, scale, _window_eff(window, R, S), n_splits,
                              block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    if out is not None and o4 is None:
        out.copy_(o[:, 0] if squeeze else o)
        return out
    return o[:, 0] if squeeze else o
