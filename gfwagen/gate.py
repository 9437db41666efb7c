"""The gate's prefix sums and the gradient that flows back through them.

Kernels read c = cumsum(log_gate) in float64: over a million tokens |c| reaches 1e5, where
float32 cannot resolve c_i - c_j. Each kernel subtracts a per-tile reference in float64 and
only then narrows to float32, so the logits carry the error of a sum over at most W + tile
positions (GATEDFWA.md section 3).
"""

from __future__ import annotations

import torch

# The one gate policy (docs/NUMERICS.md): every backend sees log_gate clamped to
# [-GATE_BOUND, GATE_BOUND]. A gate at the floor (-inf included) means "forget": the keys
# before it lose at least e^-128 against the query's own key, which is zero in float32 unless
# the logits themselves differ by more than ~110. 128 keeps one floor in a 256-position chunk
# (the kernels' float32 local sums, in log2 units: 128 * log2(e) = 185 < 256) at a spacing of
# 1.5e-5, so the pairs that still see each other keep float32 accuracy. NaN stays NaN.
GATE_BOUND = 128.0


def sanitize_log_gate(log_gate: torch.Tensor | None) -> torch.Tensor | None:
    """log_gate clamped to [-GATE_BOUND, GATE_BOUND]: -inf (or anything below -128) becomes
    -128, "forget everything before this position"; +inf becomes +128. A gate already inside
    the bounds is returned unchanged (same values). NaN is left as is: it is invalid, and
    reaches the outputs as NaN (validate.check_finite rejects it when asked to)."""
    if log_gate is None:
        return None
    return torch.clamp(log_gate, -GATE_BOUND, GATE_BOUND)


def prefix_sums(log_gate: torch.Tensor) -> torch.Tensor:
    """[B, T, H] log gates -> [B, H, T] float64 inclusive prefix sums (contiguous in T)."""
    # Scan along the innermost dimension: torch's scan over an outer dimension runs one
    # thread per (b, h) sequentially over T, which measured 3 ms at B=2, H=16, T=16384 on an
    # H200 (more than the attention itself).
    B, T, H = log_gate.shape
    g = torch.empty(B, H, T, dtype=torch.float64, device=log_gate.device)
    g.copy_(log_gate.transpose(1, 2))  # cast and transpose in one copy
    return g.cumsum_(dim=-1)


def gate_grad_from_sums(row_sums: torch.Tensor, col_sums: torch.Tensor,
                        seg_end: torch.Tensor | None = None) -> torch.Tensor:
    """dc_t = rowsum(dS)_t - colsum(dS)_t ([B, H, T]); dlog_gate_t = sum_{s >= t} dc_s, the
    sum stopping at the end of t's packed sequence when seg_end ([T], gfwagen.varlen) is
    given (B = 1).

    Returns [B, T, H] float32 (float64 when the sums are). The reverse sum runs in float64:
    dc sums to zero over t, so the tail sums are differences of large partial sums."""
    out_dtype = torch.float64 if row_sums.dtype == torch.float64 else torch.float32
    dc = row_sums.to(torch.float64) - col_sums.to(torch.float64)
    rev = torch.flip(torch.cumsum(torch.flip(dc, dims=[-1]), dim=-1), dims=[-1])
    # A sequence's dc sums to zero, so the gate at its first position has no gradient: that
    # value is pure rounding residue, set to the exact zero.
    first = torch.zeros(rev.shape[-1], dtype=torch.bool, device=rev.device)
    first[:1] = True
    if seg_end is not None:
        # The tail past a sequence's end is (up to rounding) zero too; subtracting it makes
        # the restart exact rather than a cancellation.
        end = seg_end.long()
        rev = rev - torch.nn.functional.pad(rev, (0, 1))[..., end]
        first[1:] = end[1:] != end[:-1]
    rev = rev.masked_fill(first, 0.0)
    return rev.transpose(1, 2).to(out_dtype).contiguous()


# Tiles never straddle a chunk (every block size divides it), so a tile's gate values are
# one float32 vector plus one scalar offset formed in float64.
GATE_CHUNK = 256
_LOG2E = 1.4426950408889634


def _key_tiles(log_gate: torch.Tensor, block_n: int) -> torch.Tensor:
    """[B, T, H] log gates -> float64 [B, H, ceil(T / block_n), block_n], positions past T 0:
    the per-key-tile forms' (tile_records, key_bias) tiles."""
    B, T, H = log_gate.shape
    n = -(-T // block_n)
    g = torch.zeros(B, H, n * block_n, dtype=torch.float64, device=log_gate.device)
    g[..., :T] = log_gate.transpose(1, 2)
    return g.view(B, H, n, block_n)


def tile_records(log_gate: torch.Tensor, block_n: int, scale: float) -> torch.Tensor:
    """[B, T, H] log gates -> [B, H, ceil(T / block_n) * (block_n + 4)] float32, one record per
    key tile of block_n positions: each key's -(sum of the tile's gates up to it) / scale, the
    tile's gate total times log2(e), three zeros; positions past T count as gate 0. What TVM's
    pingpong forward reads with square tiles (gfwagen.gate_sums.tile_records_fused makes it
    on CUDA); summed in float64 here."""
    g = _key_tiles(log_gate, block_n)
    B, H, n = g.shape[:3]
    rec = torch.zeros(B, H, n, block_n + 4, dtype=torch.float64, device=log_gate.device)
    rec[..., :block_n] = g.cumsum(-1) / -scale
    rec[..., block_n] = g.sum(-1) * _LOG2E
    return rec.view(B, H, n * (block_n + 4)).to(torch.float32)


def key_table_bytes(block_n: int) -> int:
    """Bytes of a key tile's bias table in tile_tables' records (templates/tvm/fwd_wgmma.py's
    key_table_bytes: a test keeps them equal)."""
    return (block_n // 8) * 48 + 128


def tile_tables(log_gate: torch.Tensor, block_n: int, scale: float) -> torch.Tensor:
    """tile_records in the bias-table form that TVM's forward with config extra bias_mma
    reads: [B, T, H] log gates -> [B, H, ceil(T / block_n) * (key_table_bytes / 4 + 4)]
    float32 storage. Per key tile: a table of bfloat16 pieces of each key's bias -(sum of the
    tile's gates up to it) / scale (hi, mid, lo, each the nearest bfloat16 to what the
    pieces before it leave, their sum the float32 bias to about 2^-24), key j's piece p at
    bfloat16 index (j // 8) * 24 + p * 8 + j % 8, zeros after; then the tile's gate total
    times log2(e) and three zeros. gfwagen.gate_sums.tile_records_fused(table=True) makes
    it on CUDA."""
    g = _key_tiles(log_gate, block_n)
    B, H, n = g.shape[:3]
    halves = key_table_bytes(block_n) // 2
    tab = torch.zeros(B, H, n, halves, dtype=torch.bfloat16, device=log_gate.device)
    rest = (g.cumsum(-1) / -scale).to(torch.float32)
    j = torch.arange(block_n, device=log_gate.device)
    for p in range(3):
        piece = rest.to(torch.bfloat16)
        tab[..., (j // 8) * 24 + p * 8 + j % 8] = piece
        rest = rest - piece.to(torch.float32)
    tail = torch.zeros(B, H, n, 4, dtype=torch.float32, device=log_gate.device)
    tail[..., 0] = (g.sum(-1) * _LOG2E).to(torch.float32)
    rec = torch.cat([tab.view(torch.float32), tail], -1)
    return rec.reshape(B, H, -1)


KEY_BIAS_ROW = 8  # a key's pieces and zeros: templates/triton/key_bias.py's WIDTH


def key_bias_table(rows: int, keys: int, dtype: torch.dtype, device, fill=None) -> torch.Tensor:
    """[rows, keys, KEY_BIAS_ROW] of `dtype` (uninitialized, or filled with `fill`) whose
    storage holds one row more, zeros: the forward's last 16-wide read runs into it."""
    table = torch.empty(rows * keys * KEY_BIAS_ROW + KEY_BIAS_ROW, dtype=dtype, device=device)
    if fill is not None:
        table.fill_(fill)
    return table[:-KEY_BIAS_ROW].view(rows, keys, KEY_BIAS_ROW)


def key_bias(log_gate: torch.Tensor, block_n: int, scale: float, dtype: torch.dtype):
    """[B, T, H] log gates -> (pieces [B*H, ceil(T / block_n) * block_n, 8] of `dtype`, 8 zeros
    of its storage after it, shifts [B*H, ceil(T / block_n) + 1] float32): what the Triton
    forward's key-bias path reads (templates/triton/key_bias.py says how;
    gfwagen.gate_sums.key_bias_fused makes them on CUDA). Each key's bias, -(sum of its
    tile's gates up to it) / scale, summed in float64 and rounded to float32 before it is
    split, as the kernel splits its own float32 sum."""
    B, T, H = log_gate.shape
    n = -(-T // block_n)
    g = _key_tiles(log_gate, block_n).view(B * H, n, block_n)
    bias = (g.cumsum(-1) / -scale).to(torch.float32)
    shifts = torch.zeros(B * H, n + 1, dtype=torch.float32, device=log_gate.device)
    shifts[:, 1:] = -bias[..., -1]
    bias = bias.view(B * H, n * block_n)
    hi = bias.to(dtype)
    rest = bias - hi.to(torch.float32)
    mid = rest.to(dtype)
    lo = (rest - mid.to(torch.float32)).to(dtype)
    pieces = key_bias_table(B * H, n * block_n, dtype, log_gate.device, fill=0)
    pieces[..., 0], pieces[..., 1], pieces[..., 2] = hi, mid, lo
    return pieces, shifts


def chunked_prefix_sums(log_gate: torch.Tensor, chunk: int = GATE_CHUNK):
    """[B, T, H] log gates -> (local [B, H, T] float32, base [B, H, ceil(T/chunk)] float64),
    both in log2 units: c_t * log2(e) = base[t // chunk] + local[t]. Kernels form
    c_i - c_j as (local_i - local_j) + (base_i - base_j), the base difference once per tile
    in float64, so no float32 number ever holds a prefix sum over more than one chunk."""
    c = prefix_sums(log_gate) * _LOG2E  # B, H, T float64
    T = c.shape[-1]
    starts = torch.arange(0, T, chunk, device=c.device)
    base = torch.cat([c.new_zeros(c.shape[:-1] + (1,)), c[..., starts[1:] - 1]], dim=-1)
    local = (c - base.repeat_interleave(chunk, dim=-1)[..., :T]).to(torch.float32)
    return local.contiguous(), base.contiguous()
