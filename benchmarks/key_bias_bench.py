"""The key-bias pieces' launch (templates/triton/key_bias.py) across its block of heads and warps,
at S5's gate (B 8, T 4096, H 16, 64-key tiles), on a CUDA GPU.

    PYTHONPATH=$PWD python benchmarks/key_bias_bench.py [--launches 20]

Each variant is captured as a CUDA graph of --launches launches back to back and replayed
(triton.testing.do_bench median): per launch that is its GPU time in a stream, the gap to the
next kernel included, which is what the op's gated forward pays before its own kernel. Every
variant's biases (its pieces summed) and shifts must match the default launch's to 1e-5 of
the largest bias; other blocks of heads sum in another order, so not bit for bit.
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench import cuda_graph_ms

from gfwagen.gate import GATE_BOUND
from gfwagen.gate_sums import key_bias_buffers
from gfwagen.template_loader import load_template


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8,4096,16", help="B,T,H of the gate")
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--launches", type=int, default=20)
    args = p.parse_args(argv)
    B, T, H = (int(x) for x in args.shape.split(","))
    gen = torch.Generator(device="cuda").manual_seed(0)
    lg = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda", generator=gen) + 3)
    kb = load_template("triton", "key_bias")
    scale = 0.125

    def make(bh=None, warps=4):
        pieces, shifts = key_bias_buffers(lg, args.block_n, torch.bfloat16)
        return (pieces, shifts), lambda: kb.launch_key_bias(
            lg, pieces, shifts, args.block_n, scale, GATE_BOUND, num_warps=warps, block_h=bh)

    (ref_p, ref_s), fill = make()
    fill()
    print(f"gate {B}x{T}x{H}, {args.block_n}-key tiles; us per launch "
          f"(graph of {args.launches})")
    print(f"default: {1e3 * cuda_graph_ms(fill, launches=args.launches):.2f}")
    print("| heads per program | " + " | ".join(f"{w} warps" for w in (1, 2, 4, 8)) + " |")
    print("|---|---|---|---|---|")
    ref_bias = ref_p.float().sum(-1)
    tol = 1e-5 * ref_bias.abs().max().item()
    bad = 0
    for bh in (1, 2, 4, 8, 16):
        cells = []
        for warps in (1, 2, 4, 8):
            (pc, sh), fn = make(bh, warps)
            fn()
            # another block of heads sums a tile in another order: equal to rounding
            err = max((pc.float().sum(-1) - ref_bias).abs().max().item(),
                      (sh - ref_s).abs().max().item())
            bad += err > tol
            us = 1e3 * cuda_graph_ms(fn, launches=args.launches)
            cells.append(f"{us:.2f}" + ("" if err <= tol else f" (off by {err:.1e})"))
        print(f"| {bh} | " + " | ".join(cells) + " |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
