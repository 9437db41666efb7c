"""The gate's prefix sums and their gradient in one or two Triton launches each (the template
templates/triton/gate_sums.py), for the Triton backend on CUDA: the same results as
gfwagen.gate.chunked_prefix_sums and gfwagen.gate.gate_grad_from_sums (to float64 rounding:
the float64 sums run in another order), which stay the CPU path, the reference and the fallback.

    local, base = chunked_prefix_sums_fused(log_gate, spare=1)   # base [B, H, nchunk + 1]
    c = prefix_sums_fused(log_gate)                              # [B, H, T] float64 (TVM)
    dlog_gate = gate_grad_from_sums_fused(row_sums, col_sums, seg_end)

The torch versions take ~5-10 small launches each way; at B=8, T=4096, H=16 they were a visible
share of a ~0.5 ms attention call. The launch shapes depend on tensor shapes only (no host
sync: safe under torch.compile and in CUDA graphs). GFWAGEN_GATE_SUMS=torch turns the fused
path off (use_fused is False everywhere).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from gfwagen.gate import GATE_CHUNK, gate_grad_from_sums, key_bias_table, key_table_bytes

GATE_SUMS_ENV = "GFWAGEN_GATE_SUMS"

__all__ = ["chunked_prefix_sums_fused", "fill_key_bias", "gate_grad",
           "gate_grad_from_sums_fused", "key_bias_buffers", "key_bias_fused", "prefix_sums_fused",
           "tile_records_fused", "use_fused"]


def use_fused(t: torch.Tensor) -> bool:
    """Whether the backends take the fused kernels for this tensor: CUDA tensors, unless
    GFWAGEN_GATE_SUMS=torch. CPU tensors (the Triton interpreter included) keep the torch
    functions; the tests call the fused ones directly."""
    return t.is_cuda and os.environ.get(GATE_SUMS_ENV, "fused") != "torch"


def _template():
    from gfwagen.template_loader import load_template

    return load_template("triton", "gate_sums")


def _device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def chunked_prefix_sums_fused(
    log_gate: torch.Tensor, chunk: int = GATE_CHUNK, spare: int = 0, splits: int | None = None,
    bound: float = 0.0,
):
    """As gfwagen.gate.chunked_prefix_sums: [B, T, H] log gates (float32/16, bfloat16, any
    strides) -> (local [B, H, T] float32, base [B, H, ceil(T / chunk) + spare] float64), the
    spare entries 0. splits: how many pieces T is cut into (None: chosen from the shape).
    bound > 0: the sums of log_gate clamped to [-bound, bound] (gate.sanitize_log_gate)."""
    B, T, H = log_gate.shape
    nc = -(-T // chunk)
    local = torch.empty(B, H, T, dtype=torch.float32, device=log_gate.device)
    base = torch.empty(B, H, nc + spare, dtype=torch.float64, device=log_gate.device)
    if T == 0 or B * H == 0:
        return local, base.zero_()
    with _device(log_gate):
        _template().launch_gate_sums_fwd(log_gate, local, base, chunk, splits, bound=bound)
    return local, base


def prefix_sums_fused(log_gate: torch.Tensor, splits: int | None = None,
                      bound: float = 0.0) -> torch.Tensor:
    """As gfwagen.gate.prefix_sums: [B, T, H] log gates (any float dtype, any strides) ->
    [B, H, T] float64 inclusive prefix sums in natural units, summed in float64 throughout;
    bound > 0 clamps as chunked_prefix_sums_fused does. For the TVM templates, which take
    the whole sums: one launch up to 8192 positions, else two or three, where the torch
    version takes a clamp, a transposing copy and a float64 scan (34 us at B=8, T=4096, H=16
    on the H200)."""
    B, T, H = log_gate.shape
    c = torch.empty(B, H, T, dtype=torch.float64, device=log_gate.device)
    if T == 0 or B * H == 0:
        return c
    base = torch.empty(B, H, -(-T // GATE_CHUNK), dtype=torch.float64, device=log_gate.device)
    with _device(log_gate):
        _template().launch_gate_sums_fwd(log_gate, c, base, GATE_CHUNK, splits, bound=bound,
                                         absolute=True)
    return c


def tile_records_fused(log_gate: torch.Tensor, block_n: int, scale: float,
                       bound: float = 0.0, table: bool = False) -> torch.Tensor:
    """The gate as TVM's square-tile pingpong forward reads it: [B, T, H] log gates (any
    float dtype, any strides) -> [B, H, ceil(T / block_n) * (block_n + 4)] float32, one record
    per key tile: each key's -(sum of the tile's gates up to it) / scale, the tile's gate
    total times log2(e), three zeros. One launch, a program per (batch, tile, block of
    heads): no sum crosses a tile, so none runs along the sequence. bound > 0 clamps as
    chunked_prefix_sums_fused does. table: gfwagen.gate.tile_tables' form (the biases as
    bfloat16 pieces, for TVM's forward with bias_mma)."""
    if not math.isfinite(scale) or scale == 0:
        # the biases are divided by it (tvm_backend runs scales near 0 at WGMMA_ZERO_SCALE)
        raise ValueError(f"scale: expected a finite nonzero number, got {scale}")
    B, T, H = log_gate.shape
    n = -(-T // block_n)
    width = key_table_bytes(block_n) // 4 + 4 if table else block_n + 4
    rec = torch.empty(B, H, n * width, dtype=torch.float32, device=log_gate.device)
    if rec.numel() == 0:
        return rec
    with _device(log_gate):
        if table:
            _template().launch_gate_tile_tables(log_gate, rec, rec.view(torch.int16), block_n,
                                                scale, key_table_bytes(block_n), bound=bound)
        else:
            _template().launch_gate_tile_records(log_gate, rec, block_n, scale, bound=bound)
    return rec


def key_bias_fused(log_gate: torch.Tensor, block_n: int, scale: float, dtype: torch.dtype,
                   bound: float = 0.0):
    """As gfwagen.gate.key_bias, in one launch (templates/triton/key_bias.py): [B, T, H] log
    gates (any float dtype, any strides) -> (pieces [B*H, ceil(T / block_n) * block_n, 8] of
    `dtype` and the zero pad after it, shifts [B*H, ceil(T / block_n) + 1] float32). bound > 0
    clamps as chunked_prefix_sums_fused does."""
    pieces, shifts = key_bias_buffers(log_gate, block_n, dtype)
    fill_key_bias(log_gate, pieces, shifts, block_n, scale, bound)
    return pieces, shifts


def key_bias_buffers(log_gate: torch.Tensor, block_n: int, dtype: torch.dtype):
    """key_bias_fused's outputs, unwritten: a caller may bind the launch that reads them
    before fill_key_bias writes them (triton_backend.forward)."""
    B, T, H = log_gate.shape
    n = -(-T // block_n)
    pieces = key_bias_table(B * H, n * block_n, dtype, log_gate.device)  # the launch pads it
    return pieces, torch.empty(B * H, n + 1, dtype=torch.float32, device=log_gate.device)


def fill_key_bias(log_gate: torch.Tensor, pieces: torch.Tensor, shifts: torch.Tensor,
                  block_n: int, scale: float, bound: float = 0.0) -> None:
    """Writes key_bias_buffers' tensors: key_bias_fused's launch."""
    if not math.isfinite(scale) or scale <= 0:
        # the biases are divided by it, and the forward keeps its running max unscaled
        raise ValueError(f"scale: expected a finite positive number, got {scale}")
    if pieces.numel() == 0:
        shifts.zero_()
        return
    from gfwagen.template_loader import load_template

    with _device(log_gate):
        load_template("triton", "key_bias").launch_key_bias(log_gate, pieces, shifts, block_n,
                                                             scale, bound=bound)


def gate_grad(row_sums: torch.Tensor, col_sums: torch.Tensor,
              seg_end: torch.Tensor | None = None) -> torch.Tensor:
    """gate_grad_from_sums_fused where use_fused says so, else gfwagen.gate's torch version."""
    if use_fused(row_sums):
        return gate_grad_from_sums_fused(row_sums, col_sums, seg_end)
    return gate_grad_from_sums(row_sums, col_sums, seg_end)


def gate_grad_from_sums_fused(
    row_sums: torch.Tensor,
    col_sums: torch.Tensor,
    seg_end: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """As gfwagen.gate.gate_grad_from_sums: row and column sums [B, H, T] (float32 or float64,
    any strides), seg_end None or [T] int -> dlog_gate [B, T, H] float32 (float64 when the sums
    are)."""
    B, H, T = row_sums.shape
    dev = row_sums.device
    out_dtype = torch.float64 if row_sums.dtype == torch.float64 else torch.float32
    out = torch.empty(B, T, H, dtype=out_dtype, device=dev)
    if out.numel() == 0:
        return out
    tpl = _template()
    n_split = tpl.bwd_splits(B, H, T, splits, packed=seg_end is not None)
    tot = torch.empty(B * H * n_split, dtype=torch.float64, device=dev) if n_split > 1 else None
    rev = None
    if seg_end is not None:
        seg_end = seg_end.contiguous()
        rev = torch.empty(B, T, H, dtype=torch.float64, device=dev)
    with _device(row_sums):
        tpl.launch_gate_sums_bwd(row_sums, col_sums, out, seg_end, rev, tot, splits)
    return out
