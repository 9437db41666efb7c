#!/usr/bin/env python3
"""One pass at a time, one knob at a time: the Triton kernels at S1-S5 with the heuristic
default config and with single changes to it (the gate prefetch, tiles, warps, stages), the
forward without the gate, and a packed (cu_seqlens) batch against the same sequences as a
dense batch. What the tuner's space and the heuristics should hold comes from here.

    PYTHONPATH=$PWD python benchmarks/knobs.py --json knobs.json --markdown knobs.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SHAPES, flops, make_inputs  # noqa: E402

from gfwagen.backends import triton_backend as tb  # noqa: E402
from gfwagen.heuristics import default_config  # noqa: E402
from gfwagen.reference import reference_forward  # noqa: E402
from gfwagen.spec import KernelConfig, KernelSpec  # noqa: E402

# of the forward's matrix FLOPs ("bwd", "bwd_ds": a whole backward, as GATEDFWA.md counts it)
PASS_FLOPS = {"fwd": 1.0, "bwd_kv": 1.5, "bwd_q": 1.0, "bwd": 2.5, "bwd_ds": 2.5}


def variants(pass_: str, base: KernelConfig, gated: bool, tiles: bool) -> dict:
    r = dataclasses.replace
    out = {"default": base}
    if gated:
        out["prefetch_gate"] = r(base, extra=(("prefetch_gate", True),))
    out["tma"] = r(base, extra=(("tma", True),))
    if gated:
        out["tma+prefetch"] = r(base, extra=(("prefetch_gate", True), ("tma", True)))
    if not tiles:
        return out
    for bm, bn in ((64, 64), (128, 64), (64, 128), (128, 128), (32, 128), (128, 32), (64, 32)):
        if (bm, bn) != (base.block_m, base.block_n):
            out[f"{bm}x{bn}"] = r(base, block_m=bm, block_n=bn)
    out[f"w{12 - base.num_warps}"] = r(base, num_warps=12 - base.num_warps)
    for st in (1, 2, 3, 4):
        if st != base.num_stages:
            out[f"s{st}"] = r(base, num_stages=st)
    return out


def bench(fn, rep):
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def pass_fn(pass_, x, cfg, gated, segs=None):
    q, k, v, g, do, W, o, lse = x
    gate = g if gated else None
    if pass_ == "fwd":
        return lambda: tb.forward(q, k, v, gate, W, q.shape[-1] ** -0.5, cfg, segs)
    st = tb.prepare_backward(do, q, k, v, o, lse, gate, W, q.shape[-1] ** -0.5, segs)
    if pass_ == "bwd_kv":
        return lambda: tb.backward_kv(st, cfg)
    return lambda: tb.backward_q(st, cfg)


def run_shape(name, s, rep, rows, tiles):
    q, k, v, g, do = (t.detach() for t in make_inputs(s, torch.bfloat16))
    with torch.no_grad():
        o, lse = tb.forward(q, k, v, g, s.W, s.D ** -0.5,
                            default_config(KernelSpec("triton", "fwd", s.D, s.D, s.W, "bf16",
                                                      True, 1)))
        # the gated kernel's output against the reference: a broken variant must not count
        ref, _ = reference_forward(q[:1], k[:1], v[:1], g[:1], s.W)
        assert (o[:1].float() - ref.float()).abs().max() < 5e-2
    x = (q, k, v, g, do, s.W, o, lse)
    for pass_ in ("fwd", "bwd_kv", "bwd_q"):
        base = default_config(KernelSpec("triton", pass_, s.D, s.D, s.W, "bf16", True, 1))
        for gated in (True, False):
            vs = variants(pass_, base, gated, tiles)
            for label, cfg in vs.items():
                try:
                    ms = bench(pass_fn(pass_, x, cfg, gated), rep)
                except Exception as e:  # out of resources etc.: recorded, not fatal
                    rows.append(dict(shape=name, pass_=pass_, gated=gated, variant=label,
                                     error=f"{type(e).__name__}: {str(e)[:120]}"))
                    continue
                tf = PASS_FLOPS[pass_] * flops(s, "fwd") / (ms * 1e-3) / 1e12
                rows.append(dict(shape=name, pass_=pass_, gated=gated, variant=label,
                                 config=cfg.as_dict(), ms=ms, tflops=tf))
                print(f"{name} {pass_:6s} {'gated' if gated else 'plain'} {label:14s} "
                      f"{ms:8.3f} ms {tf:6.1f} TFLOP/s", flush=True)


def run_varlen(rep, rows):
    """S1's eight 4096-token sequences as one packed row (cu_seqlens) vs the dense batch."""
    s = SHAPES["S1"]
    q, k, v, g, do = (t.detach() for t in make_inputs(s, torch.bfloat16))
    packed = [t.reshape(1, s.B * s.T, *t.shape[2:]) for t in (q, k, v, g, do)]
    cu = torch.arange(0, s.B * s.T + 1, s.T, device="cuda", dtype=torch.int32)
    from gfwagen.varlen import segment_bounds

    segs = segment_bounds(cu, s.B * s.T)
    for label, (qq, kk, vv, gg, dd), sg in (("dense B=8", (q, k, v, g, do), None),
                                          ("packed cu_seqlens", packed, segs)):
        for pass_ in ("fwd", "bwd_kv", "bwd_q"):
            cfg = default_config(KernelSpec("triton", pass_, s.D, s.D, s.W, "bf16", True, 1))
            o, lse = tb.forward(qq, kk, vv, gg, s.W, s.D ** -0.5, cfg, sg)
            ms = bench(pass_fn(pass_, (qq, kk, vv, gg, dd, s.W, o, lse), cfg, True, sg), rep)
            rows.append(dict(shape="S1-varlen", pass_=pass_, gated=True, variant=label, ms=ms))
            print(f"S1 {label:18s} {pass_:6s} {ms:8.3f} ms", flush=True)


def markdown(rows) -> str:
    out = ["| shape | pass | gate | variant | ms | TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['shape']} | {r['pass_']} | {'on' if r['gated'] else 'off'} | "
                   f"{r['variant']} | {r.get('ms', float('nan')):.3f} | "
                   f"{r.get('tflops', float('nan')):.1f} |" if "error" not in r else
                   f"| {r['shape']} | {r['pass_']} | {r['gated']} | {r['variant']} | "
                   f"{r['error']} | |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rep", type=int, default=40, help="do_bench repetition time, ms")
    p.add_argument("--tiles", action="store_true",
                   help="also single changes of tiles, warps and stages (one compile each)")
    p.add_argument("--json")
    p.add_argument("--markdown")
    a = p.parse_args(argv)
    rows: list[dict] = []
    for name in a.shapes.split(","):
        run_shape(name, SHAPES[name], a.rep, rows, a.tiles)
    run_varlen(a.rep, rows)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.markdown:
        Path(a.markdown).write_text(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
