#!/usr/bin/env python3
"""Whether tvm_backend._cuda_call's two contexts (torch.cuda.device and
tvm_ffi.use_torch_stream, entered on every TVM launch, replayed plans included) cost host time,
and whether a launch without them still lands on torch's current stream.

- host time per TVM forward at a shape whose kernels take microseconds, the launcher as on main
  against a bare call, alternating rounds in one process;
- a bare call's stream: a CUDA graph captured on a side stream (a launch elsewhere fails the
  capture), and a side stream whose input is written behind a long matmul chain (a launch on
  another stream reads it unwritten).

    PYTHONPATH=$PWD python benchmarks/tvm_launch_contexts.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from passes import host_ms  # noqa: E402

import gfwagen  # noqa: E402
from gfwagen.backends import tvm_backend  # noqa: E402


def bare(device, fn, *args):
    fn(*args)


def main() -> None:
    dev = torch.device("cuda:0")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 256, 2, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(1, 256, 2, device=dev) + 3)
    cases = {"gated": lambda q=q: gfwagen.attention(q, k, v, g, window=64, backend="tvm"),
             "ungated": lambda q=q: gfwagen.attention(q, k, v, None, window=64, backend="tvm")}
    launchers = {"main": tvm_backend._cuda_call, "bare": bare}
    cases["gated"]()  # builds, and imports tvm_ffi, which may give torch the exchange API
    print("torch", torch.__version__, "| DLPack exchange API on torch.Tensor:",
          hasattr(torch.Tensor, "__dlpack_c_exchange_api__"))
    try:
        for name, fn in cases.items():
            res = {n: [] for n in launchers}
            for _ in range(15):
                for n, f in launchers.items():
                    tvm_backend._cuda_call = f
                    res[n].append(1e3 * host_ms(fn, 500))
            print(f"tvm {name} forward, host us a call: "
                  + ", ".join(f"{n} {statistics.median(r):.1f}" for n, r in res.items()))

        tvm_backend._cuda_call = bare
        ref = cases["gated"]().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            cases["gated"]()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = cases["gated"]()
        graph.replay()
        torch.cuda.synchronize()
        print("bare, captured on a side stream: replay max diff",
              (out.float() - ref.float()).abs().max().item())
        big = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        q2 = torch.empty_like(q)
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            x = big
            for _ in range(20):
                x = x @ big * 1e-3
            q2.copy_(q + 0 * x[0, 0])
            o2 = cases["gated"](q2)
        torch.cuda.synchronize()
        print("bare, behind a side stream's matmuls: max diff",
              (o2.float() - ref.float()).abs().max().item())
    finally:
        tvm_backend._cuda_call = launchers["main"]


if __name__ == "__main__":
    main()
