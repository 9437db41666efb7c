#!/usr/bin/env python3
"""TVM's pingpong forward with the gate's prefix sums made inside it (config extra
`fuse_gate`) against the same config without (the key tiles' records of a launch of their
own, since session 24): the records' launch and the kernel, as the op runs them, and each
kernel alone, with the ungated kernel beside them; outputs compared. One process, rounds
interleaved (the order reversed every other round), the minimum of each kept.

    PYTHONPATH=$PWD python benchmarks/fuse_gate_ab.py --shapes S1,S2,S3,S4

The config is the tuning database's TVM forward for the shape where it is a square pingpong
tile, else pingpong 128x128 with bulk copies. Numbers a per cent or two apart here need the
tuner's timer to confirm them: two launches of identical GPU work, one preparing its
arguments on every call, read 2.7-6% apart in session 23 (RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SHAPES, make_inputs  # noqa: E402
from knobs import bench  # noqa: E402
from tvm_ab import PINGPONG  # noqa: E402

from gfwagen import dispatch  # noqa: E402
from gfwagen.backends import tvm_backend as tb  # noqa: E402
from gfwagen.spec import KernelConfig  # noqa: E402


def with_fuse(cfg: KernelConfig, on: bool) -> KernelConfig:
    extra = {k: v for k, v in cfg.extra if k != "fuse_gate"}
    if on:
        extra["fuse_gate"] = True
    return KernelConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages,
                        extra=tuple(extra.items()))


def square_pingpong(cfg: KernelConfig) -> bool:
    return bool(cfg.get("pingpong")) and cfg.block_m == cfg.block_n


def runs_for(s) -> tuple[dict, dict]:
    """name -> callable for one shape, and the outputs to compare."""
    q, k, v, g, _ = (t.detach() for t in make_inputs(s, torch.bfloat16))
    tgt = tb._target(q, "cuda")
    spec, spec0 = (tb._spec("fwd", q, k, v, gate, s.W) for gate in (g, None))
    cfg = dispatch.select_config(spec, s.T, q.device)
    cfg = with_fuse(cfg if square_pingpong(cfg) else PINGPONG, False)
    cfg0 = dispatch.select_config(spec0, s.T, q.device)
    fused_cfg = with_fuse(cfg, True)
    assert tb.gate_input(spec, fused_cfg) == "raw" and tb.gate_input(spec, cfg) == "tiles"
    fn_f, fn_s, fn_0 = (tb._kernel(sp, c, tgt) for sp, c in
                        ((spec, fused_cfg), (spec, cfg), (spec0, cfg0)))
    sc = s.D ** -0.5
    raw, o_f, l_f = tb.forward_buffers(q, v, g, "raw")
    recs, o_s, l_s = tb.forward_buffers(q, v, g, "tiles", sc, cfg.block_n)
    dummy, o_0, l_0 = tb.forward_buffers(q, v, None)
    a_f = tb.forward_launch_args(q, k, v, raw, o_f, l_f, sc)
    a_s = tb.forward_launch_args(q, k, v, recs, o_s, l_s, sc)
    a_0 = tb.forward_launch_args(q, k, v, dummy, o_0, l_0, sc)

    def fused_call():  # what tvm_forward does with fuse_gate
        c = tb.forward_buffers(q, v, g, "raw")[0]
        tb._launch(q, fn_f, *tb.forward_launch_args(q, k, v, c, o_f, l_f, sc))

    def tiles_call():  # and without: the records' launch first
        c = tb.forward_buffers(q, v, g, "tiles", sc, cfg.block_n)[0]
        tb._launch(q, fn_s, *tb.forward_launch_args(q, k, v, c, o_s, l_s, sc))

    runs = {"fused": fused_call, "records+kernel": tiles_call,
            "fused kernel": lambda: tb._launch(q, fn_f, *a_f),
            "kernel": lambda: tb._launch(q, fn_s, *a_s),
            "plain kernel": lambda: tb._launch(q, fn_0, *a_0)}
    return runs, {"o": (o_f, o_s), "lse": (l_f, l_s), "config": fused_cfg}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="S1,S2,S3,S4")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--rep", type=int, default=80, help="do_bench repetition time, ms")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    names = a.shapes.split(",")
    bad = [n for n in names if n not in SHAPES]
    if bad:
        p.error(f"unknown shape(s) {', '.join(bad)} (known: {', '.join(SHAPES)})")
    for name in names:
        runs, out = runs_for(SHAPES[name])
        for f in runs.values():
            f()
        torch.cuda.synchronize()
        diff = {n: (x.float() - y.float()).abs().max().item() for n, (x, y) in
                ((n, out[n]) for n in ("o", "lse"))}
        times = {n: [] for n in runs}
        order = list(runs)
        for r in range(a.rounds):
            for n in (order if r % 2 == 0 else order[::-1]):
                times[n].append(bench(runs[n], a.rep))
        m = {n: min(t) for n, t in times.items()}
        cost = {n: 100 * (m[n] / m["plain kernel"] - 1) for n in m}
        print(f"{name} {out['config']}: " + ", ".join(f"{n} {t:.4f} ms" for n, t in m.items()),
              flush=True)
        print(f"{name} gate cost against the plain kernel: " +
              ", ".join(f"{n} {c:+.1f}%" for n, c in cost.items() if n != "plain kernel") +
              f"; max |fused - records| o {diff['o']:.1e}, lse {diff['lse']:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
