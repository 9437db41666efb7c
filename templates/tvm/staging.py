"""Cooperative staging into shared memory for the CUDA-core TVM templates (fwd.py, bwd.py):
the index arithmetic their six tile loads share, as a TVMScript macro.

Imports nothing from gfwagen (loaded through gfwagen.template_loader with its importers).
"""

from __future__ import annotations

from tvm.script import tirx as T


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
