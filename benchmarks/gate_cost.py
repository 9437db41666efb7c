#!/usr/bin/env python3
"""The gate's cost in the Triton forward at the config the op picks (the tuning database's):
gated, gated with the gate-sum prefetch knob flipped, and the same kernel with the gate off.
With --passes bwd_kv,bwd_q the same for the backward's two kernels (gated, tma flipped, the
gate off at the gated config).
With --once it only runs the gated and the plain forward once each, after a warm-up, for a
profiler (Nsight Compute) to capture:

    PYTHONPATH=$PWD python benchmarks/gate_cost.py --shapes S4,S1
    ncu --clock-control none -k regex:gfwa_fwd -s 2 -c 2 --section SpeedOfLight \\
        python benchmarks/gate_cost.py --shapes S4 --once
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SHAPES, flops, make_inputs  # noqa: E402
from knobs import PASS_FLOPS, bench, pass_fn  # noqa: E402

from gfwagen import dispatch  # noqa: E402
from gfwagen.backends import triton_backend as tb  # noqa: E402
from gfwagen.spec import KernelSpec  # noqa: E402
from gfwagen.tuner.search import flipped  # noqa: E402


def variants(s, q):
    cfg = {g: dispatch.select_config(KernelSpec("triton", "fwd", s.D, s.D, s.W, "bf16", g, 1),
                                     s.T, q.device) for g in (True, False)}
    flip = flipped(cfg[True], "prefetch_gate")
    return {"gated": (True, cfg[True]),
            f"gated prefetch_gate={flip.get('prefetch_gate')}": (True, flip),
            "plain (gated config)": (False, cfg[True]),
            "plain (its own config)": (False, cfg[False])}


def backward_variants(s, q, pass_):
    cfg = dispatch.select_config(KernelSpec("triton", pass_, s.D, s.D, s.W, "bf16", True, 1),
                                 s.T, q.device)
    flip = flipped(cfg, "tma")
    return {"gated": (True, cfg),
            f"gated tma={flip.get('tma')}": (True, flip),
            "plain (gated config)": (False, cfg)}


def time_backward(name, s, q, k, v, g, do, passes, rep) -> None:
    with torch.no_grad():
        cfg = dispatch.select_config(KernelSpec("triton", "fwd", s.D, s.D, s.W, "bf16", True, 1),
                                     s.T, q.device)
        o, lse = tb.forward(q, k, v, g, s.W, s.D ** -0.5, cfg)
    x = (q, k, v, g, do, s.W, o, lse)
    for pass_ in passes:
        base = None
        for label, (gated, cfg) in backward_variants(s, q, pass_).items():
            ms = bench(pass_fn(pass_, x, cfg, gated), rep)
            base = base or ms
            tf = PASS_FLOPS[pass_] * flops(s, "fwd") / ms / 1e9
            print(f"{name} {pass_} {label:22s} {ms:7.3f} ms {tf:6.1f} TFLOP/s "
                  f"{100 * (ms / base - 1):+6.1f}%  {cfg.as_dict()}", flush=True)


def time_forward(q, k, v, gate, s, cfg, rep) -> float:
    return bench(lambda: tb.forward(q, k, v, gate, s.W, s.D ** -0.5, cfg), rep)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="S1,S4,S5")
    p.add_argument("--once", action="store_true", help="one gated and one plain call")
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--passes", default="fwd", help="fwd, bwd_kv, bwd_q (comma-separated)")
    a = p.parse_args(argv)
    passes = a.passes.split(",")
    for name in a.shapes.split(","):
        s = SHAPES[name]
        q, k, v, g, do = (t.detach() for t in make_inputs(s, torch.bfloat16))
        if set(passes) - {"fwd"}:
            time_backward(name, s, q, k, v, g, do, [p_ for p_ in passes if p_ != "fwd"], a.rep)
        if "fwd" not in passes:
            continue
        vs = variants(s, q)
        if a.once:  # warm-up (compiles), then the two calls to capture: gated, plain
            for _ in range(2):
                for label in ("gated", "plain (gated config)"):
                    gated, cfg = vs[label]
                    tb.forward(q, k, v, g if gated else None, s.W, s.D ** -0.5, cfg)
            torch.cuda.synchronize()
            continue
        base = None
        for label, (gated, cfg) in vs.items():
            ms = time_forward(q, k, v, g if gated else None, s, cfg, a.rep)
            base = base or ms
            print(f"{name} {label:28s} {ms:7.3f} ms {flops(s, 'fwd') / ms / 1e9:6.1f} TFLOP/s "
                  f"{100 * (ms / base - 1):+6.1f}%  {cfg.as_dict()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
