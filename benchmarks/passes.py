#!/usr/bin/env python3
"""Where the op's time goes, shape by shape: each kernel pass alone at the config the op
picks (the tuning database's, as `torch.ops.gfwa.attention` would), gated and with the gate
off; the op's forward and forward+backward; the host time of one call (what the CPU spends
launching it, which the GPU hides only when its kernels take longer); and, with --profile,
the CUDA kernels of one forward+backward with their times.

    PYTHONPATH=$PWD python benchmarks/passes.py --shapes S1,S5 --profile --json passes.json

Run it twice with GFWAGEN_TEMPLATES pointing at two template folders to compare template
versions on the same configs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SHAPES, flops, make_inputs  # noqa: E402
from knobs import PASS_FLOPS, bench  # noqa: E402

import gfwagen  # noqa: E402,F401  (registers torch.ops.gfwa)
from gfwagen import dispatch  # noqa: E402
from gfwagen.backends import triton_backend as tb  # noqa: E402
from gfwagen.spec import KernelSpec  # noqa: E402


def host_ms(fn, calls=30) -> float:
    """CPU time to issue one call, GPU left to run behind: the floor under the op's time."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / calls


def pass_fns(q, k, v, gate, do, s, cfgs) -> dict:
    """Each kernel pass alone; then the whole backward recomputing dS ("bwd") and storing it
    ("bwd_ds", at the database's or the default bwd_ds config, whichever the op would take
    or not)."""
    scale = s.D ** -0.5
    o, lse = tb.forward(q, k, v, gate, s.W, scale, cfgs["fwd"])
    st = tb.prepare_backward(do, q, k, v, o, lse, gate, s.W, scale)
    whole = (do, q, k, v, o, lse, gate, s.W, scale)
    return {"fwd": lambda: tb.forward(q, k, v, gate, s.W, scale, cfgs["fwd"]),
            "bwd_kv": lambda: tb.backward_kv(st, cfgs["bwd_kv"]),
            "bwd_q": lambda: tb.backward_q(st, cfgs["bwd_q"]),
            "bwd": lambda: tb.backward(*whole, cfgs["bwd_kv"], cfgs["bwd_q"]),
            "bwd_ds": lambda: tb.backward(*whole, *tb.stored_configs(cfgs["bwd_ds"]),
                                          stored=True)}


def kernel_rows(name, s, rep):
    q, k, v, g, do = (t.detach() for t in make_inputs(s, torch.bfloat16))
    rows = []
    for gated in (True, False):
        cfgs = {p: dispatch.select_config(KernelSpec("triton", p, s.D, s.D, s.W, "bf16", gated,
                                                     1), s.T, q.device)
                for p in ("fwd", "bwd_kv", "bwd_q", "bwd_ds")}
        shown = {p: c.as_dict() for p, c in cfgs.items()}
        shown["bwd"] = {"bwd_kv": shown["bwd_kv"], "bwd_q": shown["bwd_q"]}
        for p, fn in pass_fns(q, k, v, g if gated else None, do, s, cfgs).items():
            ms = bench(fn, rep)
            tf = PASS_FLOPS[p] * flops(s, "fwd") / (ms * 1e-3) / 1e12
            rows.append(dict(shape=name, what=p, gated=gated, config=shown[p], ms=ms,
                             tflops=tf))
            print(f"{name} {p:7s} {'gated' if gated else 'plain'} {ms:8.3f} ms {tf:6.1f} "
                  f"TFLOP/s  {shown[p]}", flush=True)
    return rows


def host_profile(fn, calls=20, top=35) -> str:
    """cProfile of `calls` calls of fn (the host side only: nothing waits for the GPU
    inside), the functions sorted by their own time."""
    import cProfile
    import io
    import pstats

    fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def op_rows(name, s, rep, profile):
    q, k, v, g, do = make_inputs(s, torch.bfloat16)
    rows = []

    def fwd():
        return torch.ops.gfwa.attention(q, k, v, g, s.W)

    def fwdbwd():  # as bench.py times it: nothing accumulates between calls
        torch.autograd.grad(fwd(), (q, k, v, g), do)

    for label, fn, mode in (("op fwd", fwd, "fwd"), ("op f+b", fwdbwd, "fwdbwd")):
        ms = bench(fn, rep)
        h = host_ms(fn)
        tf = flops(s, mode) / (ms * 1e-3) / 1e12
        rows.append(dict(shape=name, what=label, gated=True, ms=ms, host_ms=h, tflops=tf))
        print(f"{name} {label:7s} gated {ms:8.3f} ms {tf:6.1f} TFLOP/s  host {h:.3f} ms/call",
              flush=True)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        fwdbwd()
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                fwdbwd()
            torch.cuda.synchronize()
        kernels = sorted(((e.key, e.device_time_total / 3 / 1e3, e.count // 3)
                          for e in p.key_averages() if e.device_time_total > 0),
                         key=lambda r: -r[1])
        rows.append(dict(shape=name, what="profile", kernels=kernels,
                         cpu_table=p.key_averages().table(sort_by="self_cpu_time_total",
                                                          row_limit=25),
                         host_fwd=host_profile(fwd), host_fwdbwd=host_profile(fwdbwd)))
        for key, ms, n in kernels[:25]:
            print(f"   {ms:8.4f} ms  x{n}  {key[:110]}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rep", type=int, default=50, help="do_bench repetition time, ms")
    p.add_argument("--profile", action="store_true", help="list the kernels of one f+b")
    p.add_argument("--json")
    a = p.parse_args(argv)
    rows: list[dict] = []
    for name in a.shapes.split(","):
        rows += kernel_rows(name, SHAPES[name], a.rep)
        rows += op_rows(name, SHAPES[name], a.rep, a.profile)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
