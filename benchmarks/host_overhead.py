#!/usr/bin/env python3
"""Host time per call at a shape whose kernels take microseconds, so the CPU sets the pace:
the custom op (torch.ops.gfwa.attention, what torch.compile sees) against gfwagen.attention's
eager path (ops.EagerAttention), alternating in one process so that drift in the host's speed
hits both alike. Inputs require grad in both modes, as in training.

    PYTHONPATH=$PWD python benchmarks/host_overhead.py --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from passes import host_ms  # noqa: E402

import gfwagen  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=200)
    a = p.parse_args(argv)
    dev = "cuda"
    q, k, v = (torch.randn(1, 256, 2, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(1, 256, 2, device=dev) + 3).requires_grad_()

    do = torch.ones(1, 256, 2, 64, device=dev, dtype=torch.bfloat16)
    paths = {"op": lambda: torch.ops.gfwa.attention(q, k, v, g, 64),
             "eager": lambda: gfwagen.attention(q, k, v, g, window=64)}
    modes = {"fwd": lambda f: f(),
             "f+b": lambda f: torch.autograd.grad(f(), (q, k, v, g), do)}
    res = {(m, p): [] for m in modes for p in paths}
    for _ in range(a.rounds):
        for path, f in paths.items():
            for m, run in modes.items():
                res[(m, path)].append(1e3 * host_ms(lambda run=run, f=f: run(f), a.calls))
    for m in modes:
        op, eager = (statistics.median(res[(m, p)]) for p in paths)
        print(f"{m}: op {op:7.1f} us/call, eager {eager:7.1f} us/call "
              f"({100 * (eager / op - 1):+.1f}%); rounds {[round(x) for x in res[(m, 'op')]]} "
              f"/ {[round(x) for x in res[(m, 'eager')]]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
