"""Cooperative staging into shared memory for the CUDA-core TVM templates (fwd.py, bwd.py):
the index arithmetic their six tile loads and three gate-sum loads share, as TVMScript macros.

Imports nothing from gfwagen (loaded through gfwagen.template_loader with its importers).
"""

from __future__ import annotations

from tvm.script import tirx as T

LOG2E = 1.4426950408889634


@T.macro
def stage_rows(dst, transpose, src, b, hh, row0, rows, width, rounds, threads, x, L):
    # rows row0.. of src [B, T, H, width] (head hh) as float32 into dst [rows, width], or
    # [width, rows] when transpose; `threads` threads (this one x) copy in `rounds` rounds;
    # rows past the end are clamped to the last row (finite values the masks then exclude)
    for r in range(rounds):
        if r * threads + x < rows * width:
            if transpose:
                dst[(r * threads + x) % width, (r * threads + x) // width] = T.Cast(
                    "float32",
                    src[
                        b,
                        T.min(row0 + (r * threads + x) // width, L - 1),
                        hh,
                        (r * threads + x) % width,
                    ],
                )
            else:
                dst[(r * threads + x) // width, (r * threads + x) % width] = T.Cast(
                    "float32",
                    src[
                        b,
                        T.min(row0 + (r * threads + x) // width, L - 1),
                        hh,
                        (r * threads + x) % width,
                    ],
                )


@T.macro
def stage_gate(dst, gated, c, b, h, t0, n, rounds, threads, x, cref, L):
    # the prefix sums c[b, h, t0..t0+n) relative to cref (float64, then narrowed) in log2
    # units into dst [n]; zeros when not gated (c is then a dummy, never read)
    for r in range(rounds):
        if r * threads + x < n:
            if gated:
                dst[r * threads + x] = T.Cast(
                    "float32", c[b, h, T.min(t0 + r * threads + x, L - 1)] - cref
                ) * T.float32(LOG2E)
            else:
                dst[r * threads + x] = T.float32(0)
