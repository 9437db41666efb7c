#!/usr/bin/env python3
"""The bias-table records' launch (gfwagen.gate_sums.tile_records_fused with table=True, what
TVM's forward with `bias_mma` reads) by its grid: heads a program and warps, each timed 20
launches back to back in a CUDA graph (a short kernel's cost in a stream) and cold (one replay,
the L2 flushed before it; bench.interleaved_ms). Session 45 (RESULTS.md): the shipped grid
(16 heads, 4 warps) within 0.4 us of the best at S1 and S5.

    PYTHONPATH=$PWD python benchmarks/records_grid.py --shapes S1,S5
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="S1,S5")
    a = p.parse_args(argv)
    import torch
    from bench import SHAPES, capture_graph, cuda_graph_ms, interleaved_ms, make_inputs

    from gfwagen.gate import GATE_BOUND, key_table_bytes
    from gfwagen.template_loader import load_template

    launch = load_template("triton", "gate_sums").launch_gate_tile_tables
    tb = key_table_bytes(128)
    for name in a.shapes.split(","):
        s = SHAPES[name]
        g = make_inputs(s, torch.bfloat16)[3].detach()
        B, T, H = g.shape
        rec = torch.empty(B, H, -(-T // 128) * (tb // 4 + 4), dtype=torch.float32,
                          device=g.device)
        grids = [(bh, nw) for bh, nw in itertools.product((16, 8, 4, 2, 1), (1, 2, 4, 8))
                 if bh * 128 >= 32 * nw]  # every thread holds a gate
        args = (g, rec, rec.view(torch.int16), 128, s.D ** -0.5, tb)
        fns = [functools.partial(launch, *args, bound=GATE_BOUND, num_warps=nw, heads=bh)
               for bh, nw in grids]
        stream = [cuda_graph_ms(f, rep=100, launches=20) for f in fns]
        cold = interleaved_ms([capture_graph(f).replay for f in fns], 20)
        print(f"{name}: records' launch, us: 20 back to back / cold (L2 flushed)")
        for (bh, nw), t, c in zip(grids, stream, cold, strict=True):
            print(f"  {bh:2d} heads {nw} warps  {t * 1e3:6.2f}  {statistics.median(c) * 1e3:6.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
