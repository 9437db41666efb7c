#!/usr/bin/env python3
"""Host time per gated forward on the CPU through the TVM kernels (llvm), with the host CPU's
name asked of LLVM on every call (as before session 52) against once a process
(tvm_backend._host_cpu), alternating rounds in one process; then that query alone.

    PYTHONPATH=$PWD python benchmarks/tvm_cpu_host.py
"""

from __future__ import annotations

import statistics
import time

import torch
import tvm

import gfwagen
from gfwagen.backends import tvm_backend


def per_call_us(fn, calls) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    torch.manual_seed(0)
    cached = tvm_backend._host_cpu
    asked = {"before": tvm.target.codegen.llvm_get_system_cpu, "after": cached}
    try:
        for B, T, H, D, W in ((1, 32, 2, 16, 8), (1, 256, 4, 64, 64)):
            q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
            g = torch.nn.functional.logsigmoid(torch.randn(B, T, H) + 3)

            def fwd(q=q, k=k, v=v, g=g, W=W):
                return gfwagen.attention(q, k, v, g, window=W, backend="tvm")

            for _ in range(5):
                fwd()
            res = {n: [] for n in asked}
            for _ in range(11):
                for n, f in asked.items():
                    tvm_backend._host_cpu = f
                    res[n].append(per_call_us(fwd, 200))
            b, a = (statistics.median(res[n]) for n in asked)
            print(f"B{B} T{T} H{H} D{D} W{W} gated fwd, us a call: before {b:.1f}, "
                  f"after {a:.1f} ({a - b:+.1f})")
    finally:
        tvm_backend._host_cpu = cached
    print(f"llvm_get_system_cpu alone: "
          f"{per_call_us(tvm.target.codegen.llvm_get_system_cpu, 1000):.1f} us")


if __name__ == "__main__":
    main()
