#!/usr/bin/env python3
"""Pins down the fp32 small-window failure seen on the H200 (RESULTS.md: fp32 at W=1 gave
dq, dk of ~8e8 while bf16/fp16 and fp32 at W >= 128 were right).

For each dtype x window x backward config it runs the Triton backward on one input set and
prints the error of dq, dk, dv against the float64 reference. The variants separate the
hypotheses: software pipelining (num_stages 1 vs 2), the last tile loop running zero times
(windows below the tile, where the diagonal phase is empty), and the tile shape.

    PYTHONPATH=$PWD python benchmarks/diag_small_window.py
"""

import itertools

import torch

from gfwagen.backends import triton_backend
from gfwagen.heuristics import default_config
from gfwagen.reference import reference_backward, reference_forward
from gfwagen.spec import KernelConfig, KernelSpec


def err(a, e):
    a, e = a.double(), e.double()
    scale = e.norm().item()
    return ((a - e).norm() / scale).item() if scale else a.abs().max().item()


def main():
    torch.manual_seed(0)
    B, T, H, D = 1, 1000, 4, 128
    variants = {
        "default": None,
        "stages1": dict(num_stages=1),
        "bm64bn64": dict(block_m=64, block_n=64),
        "bm32bn32": dict(block_m=32, block_n=32, num_warps=4),
    }
    print(f"{'dtype':6} {'W':>4} {'variant':10} {'dq':>9} {'dk':>9} {'dv':>9} {'dg':>9}")
    for dtype, W in itertools.product((torch.float32, torch.bfloat16), (1, 2, 17, 63, 64, 65, 128)):
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dtype) for _ in range(3))
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda") + 3)
        o, lse = triton_backend.forward(q, k, v, g, W, D ** -0.5,
                                        default_config(KernelSpec("triton", "fwd", D, D, W,
                                                                  "fp32", True, 1)))
        do = torch.randn_like(o)
        d64 = [t.double() for t in (q, k, v)]
        ro, rl = reference_forward(*d64, g.double(), W)
        ref = reference_backward(do.double(), *d64, ro, rl, g.double(), W)
        for name, change in variants.items():
            base_kv = default_config(KernelSpec("triton", "bwd_kv", D, D, W, "fp32", True, 1))
            base_q = default_config(KernelSpec("triton", "bwd_q", D, D, W, "fp32", True, 1))
            if change:
                base_kv = KernelConfig(**{**base_kv.as_dict(), **change})
                base_q = KernelConfig(**{**base_q.as_dict(), **change})
            try:
                got = triton_backend.backward(do, q, k, v, o, lse, g, W, D ** -0.5, base_kv,
                                              base_q)
                errs = [err(a, e) for a, e in zip(got, ref)]
                print(f"{str(dtype)[6:]:6} {W:>4} {name:10} " +
                      " ".join(f"{x:9.2e}" for x in errs), flush=True)
            except Exception as e:  # a config that does not compile is a finding too
                print(f"{str(dtype)[6:]:6} {W:>4} {name:10} error {type(e).__name__}: {e}"[:160])


if __name__ == "__main__":
    main()
