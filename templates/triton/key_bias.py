"""The gate as the forward's score product reads it (fwd.py, KEY_BIAS), Triton template.

Per key tile of BLOCK_N positions, from the [B, T, H] log gates:

    bias[t]   = -(sum of the tile's gates up to t) / scale      (float32, the products' units)
    pieces[t] = hi, mid, lo in the inputs' dtype, hi + mid + lo = bias[t] to within 2^-24 of
                it (bf16: three pieces of 8 bits; fp32: hi = bias, mid = lo = 0), then 5 zeros
    shift[kt] = -bias[last key of tile kt - 1], shift[0] = 0

The forward reads a tile's keys as [BLOCK_N, 16] rows 8 apart, each key's 8 then the next
key's (the last key's next 8: a zero pad after the table), and multiplies them by a 16-wide
k step of ones in the first three columns, which adds each key's bias to its column of Q K^T
in the float32 accumulator: per score its softmax is the ungated one. The biases restart at
every tile, so they stay within one tile's gate sum; the forward moves its running max by
shift[kt] when it reaches tile kt. Padded to whole tiles: one unmasked 16-byte copy per thread
and tile (rows of 4 under a column mask cost S5's forward 4 points more, benchmarks/RESULTS.md,
session 25; rows of 16 would write twice the bytes, 16.8 MB at S5, for the same read).
This file imports nothing from gfwagen.
"""

import triton
import triton.language as tl

from .common import KEY_BIAS_WIDTH as WIDTH
from .common import cdiv, heads_per_program, launcher
from .gate_sums import key_tile_gates


@triton.jit
def key_bias_kernel(g_ptr, stride_b, stride_t, stride_h, T, H, kb_ptr, sh_ptr, NKT, neg_rscale,
                    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BOUND: tl.constexpr):
    """Key tile kt's pieces for a block of heads, and the next tile's shift: each program sums
    one tile, so no sum crosses programs. Positions past T count as gate 0; the attention
    masks their keys."""
    x, pid_b, kt, offs_h, h_in = key_tile_gates(g_ptr, stride_b, stride_t, stride_h, T, H,
                                                BLOCK_N, BLOCK_H, BOUND)
    offs_n = tl.arange(0, BLOCK_N)
    bias = tl.cumsum(x, axis=0) * neg_rscale  # [BLOCK_N, BLOCK_H]
    dt = kb_ptr.dtype.element_ty
    hi = bias.to(dt)
    rest = bias - hi.to(tl.float32)
    mid = rest.to(dt)
    lo = (rest - mid.to(tl.float32)).to(dt)
    col = tl.arange(0, WIDTH)[None, None, :]
    pieces = tl.where(col == 0, hi[:, :, None], tl.where(
        col == 1, mid[:, :, None], tl.where(col == 2, lo[:, :, None], 0.0))).to(dt)
    rows = (pid_b * H + offs_h.to(tl.int64)) * NKT * BLOCK_N + kt * BLOCK_N  # [BLOCK_H]
    ptrs = kb_ptr + (rows[None, :, None] + offs_n[:, None, None]) * WIDTH + col
    tl.store(ptrs, pieces, mask=h_in[None, :, None])
    # the pad after the last key (its row's second half), by the table's last program
    end = kb_ptr + tl.num_programs(1).to(tl.int64) * H * NKT * BLOCK_N * WIDTH
    last_program = (pid_b == tl.num_programs(1) - 1) & (kt == NKT - 1) & (
        tl.program_id(2) == tl.num_programs(2) - 1)
    tl.store(end + tl.arange(0, WIDTH), tl.zeros([WIDTH], dtype=dt), mask=last_program)
    last = tl.sum(tl.where(offs_n[:, None] == BLOCK_N - 1, bias, 0.0), axis=0)
    sh = sh_ptr + (pid_b * H + offs_h.to(tl.int64)) * (NKT + 1) + kt
    tl.store(sh + 1, -last, mask=h_in)
    tl.store(sh, tl.zeros([BLOCK_H], dtype=tl.float32), mask=h_in & (kt == 0))


def launch_key_bias(log_gate, pieces, shifts, block_n, scale, bound=0.0, num_warps=4,
                    block_h=None):
    """log_gate [B, T, H] (any strides), clamped to [-bound, bound] on load when bound > 0 ->
    pieces [B*H, ceil(T / block_n) * block_n, WIDTH] (its dtype: the inputs'; contiguous, with
    WIDTH more elements of its storage after it, the pad) and shifts [B*H, ceil(T / block_n)
    + 1] float32, contiguous. block_h: heads per program (default: up to 16, at most 1024
    keys a program; benchmarks/key_bias_bench.py times the others)."""
    B, T, H = log_gate.shape
    nkt = cdiv(T, block_n)
    bh = block_h or min(heads_per_program(H), max(1, 1024 // block_n))
    launcher(key_bias_kernel)[(nkt, B, cdiv(H, bh))](
        log_gate, *log_gate.stride(), T, H, pieces, shifts, nkt, -1.0 / scale,
        BLOCK_N=block_n, BLOCK_H=bh, BOUND=float(bound), num_warps=num_warps)
