"""GatedFWA as a torch.nn layer, with a ring-buffer KV cache for generation.

    from gfwagen.nn import GatedFWA, GatedFWACache

    attn = GatedFWA(hidden_size=512, num_heads=8, num_kv_heads=2, window=256)
    y = attn(x)                                   # [B, T, 512]; training / no cache

    cache = GatedFWACache()                       # one per model (all layers)
    y, cache = attn(prompt_x, cache)              # prefill
    y, cache = attn(next_x, cache)                # decode: [B, 1, 512] per step

The layer: q/k/v/out projections, GQA, optional QK RMSNorm, optional RoPE, the paper's gate
(GATEDFWA.md section 4: h = x W_h, beta = 1 + elu(x W_beta), log_gate = logsigmoid(beta h) /
(beta + eps), computed by gfwagen.gate_preprocess) and gfwagen.attention over the last
`window` keys. torch.compile(fullgraph=True) traces the no-cache forward without breaks.

The cache keeps, per layer, only the last `window` keys and values (a ring indexed by
position % window) plus the gate's state: c (the gate's prefix sum, float64) at the cached
positions and at the last position. Its memory does not grow with the generated length.
Attention over a filled cache goes through gfwagen.decode.decode_attention (the split-K Triton
decode kernel on CUDA, plain torch otherwise; it takes the float64 gate state as is); the
prefill of an empty cache uses gfwagen.attention. All sequences of a batch share positions
here (no left padding / ragged batches), though the decode op takes a length per sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gfwagen
from gfwagen.decode import MAX_TRITON_ROWS, MAX_TRITON_S, decode_attention
from gfwagen.gate import sanitize_log_gate
from gfwagen.gate_preprocess import GATE_EPS, gate_preprocess

__all__ = ["GatedFWA", "GatedFWACache", "RMSNorm", "apply_rope", "rope_cos_sin"]


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """positions [T] -> cos, sin [T, D/2] (float32)."""
    ang = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding, "rotate half" convention (GPT-NeoX / Llama): x [B, T, H, D],
    cos/sin [T, D/2]; pairs (x_i, x_{i + D/2}) rotate by position * theta^(-2i/D)."""
    d2 = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :d2], xf[..., d2:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


class _LayerCache:
    """One layer's ring: slot = position % size. Allocated by the layer's first cached call."""

    def __init__(self, size: int, B: int, Hq: int, Hkv: int, D: int, Dv: int, gated: bool,
                 dtype: torch.dtype, device: torch.device):
        self.size = size
        self.k = torch.zeros(B, size, Hkv, D, dtype=dtype, device=device)
        self.v = torch.zeros(B, size, Hkv, Dv, dtype=dtype, device=device)
        # positions seen per sequence (position p sits at slot p % size); all equal here
        self.seqlens = torch.zeros(B, dtype=torch.int32, device=device)
        self.c = torch.zeros(B, size, Hq, dtype=torch.float64, device=device) if gated else None
        self.c_last = torch.zeros(B, Hq, dtype=torch.float64, device=device) if gated else None
        self.pos = 0  # tokens seen so far

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.k, self.v, self.seqlens, self.c, self.c_last) if t is not None]

    def append(self, k: Tensor, v: Tensor, c_new: Tensor | None) -> None:
        """Writes the last min(T, size) of T new positions into the ring."""
        T = k.shape[1]
        n = min(T, self.size)
        positions = torch.arange(self.pos + T - n, self.pos + T, device=k.device)
        slots = positions % self.size
        self.k.index_copy_(1, slots, k[:, T - n:].detach().to(self.k.dtype))
        self.v.index_copy_(1, slots, v[:, T - n:].detach().to(self.v.dtype))
        if c_new is not None:
            self.c.index_copy_(1, slots, c_new[:, T - n:].detach())
            self.c_last = c_new[:, -1].detach().clone()
        self.seqlens += T
        self.pos += T


class GatedFWACache:
    """KV cache of a model's GatedFWA layers (keyed by each layer's `layer_idx`).

    A windowed layer keeps a ring of its last `window` positions. A layer with window=None
    (full causal attention) needs every position: give `max_length`, the most tokens (prompt
    plus generated) the cache will see; such a layer's ring has that size.
    """

    def __init__(self, max_length: int | None = None):
        self.max_length = max_length
        self.layers: dict[int, _LayerCache] = {}

    def seq_len(self, layer_idx: int = 0) -> int:
        layer = self.layers.get(layer_idx)
        return 0 if layer is None else layer.pos

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values()
                   for t in layer.tensors())

    def _layer(self, idx: int, window: int | None, make) -> _LayerCache:
        if idx not in self.layers:
            size = window if window is not None else self.max_length
            if size is None:
                raise ValueError("a layer with window=None needs GatedFWACache(max_length=...)")
            self.layers[idx] = make(size)
        return self.layers[idx]


class GatedFWA(nn.Module):
    """Gated sliding-window attention layer (GatedFWA), [B, T, hidden] -> [B, T, hidden].

    Args:
        hidden_size, num_heads: model width and query heads.
        num_kv_heads: key/value heads (GQA/MQA); None: num_heads.
        window: attend to the last `window` positions (the query's own included); None: all.
        head_dim: None: hidden_size // num_heads (must be one of 16, 32, 64, 128, 256).
        rope, rope_theta: rotary position embedding on q and k.
        qk_norm: RMSNorm of q and k per head (over head_dim) before RoPE.
        gate: the paper's data-dependent gate; False: plain sliding-window attention.
        bias: biases of the q/k/v/out projections.
        gate_bias_init: initial bias of the gate-logit projection (see _reset_gate).
        layer_idx: this layer's key in a GatedFWACache.
        backend: gfwagen.attention's backend ("auto": Triton on CUDA, reference on the CPU).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 window: int | None = None, head_dim: int | None = None, rope: bool = True,
                 rope_theta: float = 10000.0, qk_norm: bool = False, gate: bool = True,
                 bias: bool = False, gate_bias_init: float = 4.0, gate_eps: float = GATE_EPS,
                 norm_eps: float = 1e-6, layer_idx: int = 0, scale: float | None = None,
                 backend: str = "auto"):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        if rope and head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.window, self.layer_idx = head_dim, window, layer_idx
        self.use_rope, self.use_gate, self.gate_eps = rope, gate, gate_eps
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        self.backend = backend

        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        if gate:
            self.gate_proj = nn.Linear(hidden_size, num_heads, bias=True)  # h = x W_h + b_h
            self.beta_proj = nn.Linear(hidden_size, num_heads, bias=False)  # beta = 1+elu(x W_b)
            self._reset_gate(gate_bias_init)
        else:
            self.gate_proj = self.beta_proj = None
        if rope:
            inv_freq = rope_theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32)
                                      / head_dim)
            self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def _reset_gate(self, gate_bias_init: float) -> None:
        # GATEDFWA.md says nothing of the gate's initialization. The Forgetting Transformer's
        # code (which the paper's gate reduces to at beta = 1) draws the gate projection from
        # N(0, 0.02) with a zero bias, i.e. gates of sigmoid(0) = 0.5 at init: every token
        # starts out forgetting half of the past (a very local attention the model must learn
        # to open). We keep FoX's small weights but start the gates near 1: bias +4 gives
        # sigmoid(4) = 0.982, log_gate = -0.018, an e-folding length of ~55 tokens, so the layer
        # starts as sliding-window attention with a mild recency bias and learns where to
        # forget. gate_bias_init=0 reproduces FoX's initialization.
        # W_beta starts at zero, so beta = 1 + elu(0) = 1 exactly: the initial gate is FoX's
        # logsigmoid(h) / (1 + eps). Its gradient is not zero (d log_gate / d beta != 0), so
        # the sharpness learns from the first step.
        nn.init.normal_(self.gate_proj.weight, std=0.02)
        nn.init.constant_(self.gate_proj.bias, gate_bias_init)
        nn.init.zeros_(self.beta_proj.weight)

    def log_gate(self, x: Tensor) -> Tensor | None:
        """[B, T, hidden] -> [B, T, num_heads] float32 log gates (None without a gate)."""
        if not self.use_gate:
            return None
        h = self.gate_proj(x)
        beta = 1.0 + F.elu(self.beta_proj(x))
        return gate_preprocess(h, beta, eps=self.gate_eps)

    def _qkv(self, x: Tensor, start: int, positions: Tensor | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            if positions is None:
                positions = torch.arange(start, start + T, device=x.device)
            cos, sin = rope_cos_sin(positions, self.inv_freq)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _attend(self, q, k, v, log_gate, cu_seqlens=None):
        return gfwagen.attention(q, k, v, log_gate, window=self.window, scale=self.scale,
                                 backend=self.backend, cu_seqlens=cu_seqlens)

    def forward(self, x: Tensor, cache: GatedFWACache | None = None,
                cu_seqlens: Tensor | None = None):
        """x [B, T, hidden] -> [B, T, hidden] (and the cache, when one is given).
        cu_seqlens: packed sequences along T (B = 1, FlashAttention's convention); positions,
        window and gate restart at each sequence. Not with a cache (decode batches rows)."""
        B, T, _ = x.shape
        if cache is None:
            positions = None
            if cu_seqlens is not None:
                from gfwagen.varlen import segment_bounds

                start, _ = segment_bounds(cu_seqlens.to(x.device), T)
                positions = torch.arange(T, device=x.device) - start
            q, k, v = self._qkv(x, 0, positions)
            o = self._attend(q, k, v, self.log_gate(x), cu_seqlens)
            return self.o_proj(o.reshape(B, T, -1))
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens packs sequences for a cache-free forward; with a "
                             "cache, give one sequence per batch row")

        state = cache._layer(self.layer_idx, self.window, lambda size: _LayerCache(
            size, B, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim,
            self.use_gate, x.dtype, x.device))
        p0 = state.pos
        if self.window is None and p0 + T > state.size:
            raise ValueError(f"cache of max_length {state.size} cannot hold {p0 + T} positions")
        q, k, v = self._qkv(x, p0)
        log_gate = self.log_gate(x)
        c_new = None
        if log_gate is not None:
            # the clamp gfwagen.attention applies to every gate (gate.sanitize_log_gate)
            g = sanitize_log_gate(log_gate).double()
            c_new = state.c_last[:, None, :] + torch.cumsum(g, dim=1)
        if p0 == 0:
            o = self._attend(q, k, v, log_gate)  # prefill of an empty cache: the fused op
        else:
            o = self._attend_cached(state, q, k, v, c_new, p0)
        state.append(k, v, c_new)
        return self.o_proj(o.reshape(B, T, -1)), cache

    def _attend_cached(self, state: _LayerCache, q, k, v, c_new, p0: int) -> Tensor:
        """T new queries at positions p0.. over the ring (earlier positions) and the T new keys
        (gfwagen.decode.decode_attention): O(T (window + T)) work, meant for decode (small T)."""
        # the gate state is float64 (absolute prefix sums): the op takes differences in float64
        c_ring = state.c if c_new is not None else None
        T, G = q.shape[1], self.num_heads // self.num_kv_heads
        backend = {"auto": "auto", "triton": "triton"}.get(self.backend, "torch")
        if backend == "triton" and (T > MAX_TRITON_S or T * G > MAX_TRITON_ROWS):
            backend = "torch"
        return decode_attention(q, k, v, state.k, state.v, state.seqlens, c_ring, c_new,
                                window=self.window, scale=self.scale, backend=backend)
