#!/usr/bin/env python3
"""Forward variants of one shape, each a backend and a config forced on the op (or the tuned
pick), gated or not, timed by bench.interleaved_ms: every round calls each variant once, in an
order that rotates (the L2 flushed before each call, CUDA events around it), so all see the
same clocks. Each variant's output is checked against
the tuned op's first. --graph times each variant again as a CUDA graph replay, also
interleaved: the kernels without the host. A variant with a forced config runs without
launch plans (a plan is keyed by the call, not the config), so its eager time carries the
general path's host time where that exceeds the flush's: compare such variants by --graph.

    python benchmarks/fwd_variants.py --shape S5 --variant tuned --variant tuned:plain \\
        --variant '{"label": "pp128", "backend": "tvm", "block_m": 128, "block_n": 128,
                    "num_warps": 8, "num_stages": 3,
                    "extra": {"pingpong": true, "tma": true, "wgmma": true}}'

A variant is `tuned` or `tuned:plain` (the op as shipped, gated or not), or a JSON object: a
KernelConfig's fields plus "backend" (default "triton"), "gated" (default true), "label" and
"env" (environment settings for its calls, e.g. {"GFWAGEN_GATE_SUMS": "torch"}).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # noqa: E402
    SHAPES,
    Shape,
    capture_graph,
    class_shape,
    flops,
    interleaved_ms,
    make_inputs,
    ratio_quartiles,
)

import gfwagen  # noqa: E402
from gfwagen import dispatch, launch_plans  # noqa: E402
from gfwagen.spec import KernelConfig  # noqa: E402

_real_select = dispatch.select_config


def parse_variant(text: str) -> dict:
    if text in ("tuned", "tuned:plain"):
        return {"label": text, "backend": "auto", "gated": text == "tuned", "config": None,
                "env": {}}
    d = json.loads(text)
    meta = {k: d.pop(k) for k in ("label", "backend", "gated", "env") if k in d}
    cfg = KernelConfig.from_dict(d)
    return {"label": meta.get("label", str(cfg)), "backend": meta.get("backend", "triton"),
            "gated": meta.get("gated", True), "config": cfg, "env": meta.get("env", {})}


def run(variant: dict, s: Shape, q, k, v, g):
    """One forward of the variant: its environment set and its config forced on the forward
    for the call, both restored after it."""
    cfg = variant["config"]
    env = dict(variant["env"])
    if cfg is not None:
        # a launch plan is keyed by the call, not by the config dispatch picks: one recorded
        # under another variant's config would replay it
        env.setdefault(launch_plans.PLANS_ENV, "0")
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    dispatch.select_config = _real_select if cfg is None else (
        lambda spec, T, dev: cfg if spec.pass_ == "fwd" else _real_select(spec, T, dev))
    try:
        return gfwagen.attention(q, k, v, g if variant["gated"] else None, window=s.W,
                                 backend=variant["backend"])
    finally:
        dispatch.select_config = _real_select
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def report(variants, ms, s, base: int | None):
    for i, vr in enumerate(variants):
        med = statistics.median(ms[i])
        tf = flops(s, "fwd") / med / 1e9
        line = f"  {vr['label']:28s} median {med:.4f} ms ({tf:6.1f} TFLOP/s)"
        if base is not None:
            q1, ratio, q3 = ratio_quartiles(ms[i], ms[base])
            line += (f"  / {variants[base]['label']}: median {ratio:.4f} "
                     f"(quartiles {q1:.4f}, {q3:.4f})")
        print(line, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="S5", help="a bench.py shape, or a class such as d64w256 "
                   "(bench.class_shape)")
    p.add_argument("--variant", action="append", required=True, type=parse_variant)
    p.add_argument("--base", default="tuned:plain",
                   help="the label the others are divided by, call by call")
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--graph", action="store_true")
    args = p.parse_args()
    s = SHAPES[args.shape] if args.shape in SHAPES else class_shape(args.shape)
    variants = args.variant
    q, k, v, g, _ = (t.detach() for t in make_inputs(s, torch.bfloat16))
    print(f"== {args.shape} {s._asdict()} bf16", flush=True)
    ref = {gated: run(parse_variant("tuned" if gated else "tuned:plain"), s, q, k, v, g).float()
           for gated in (True, False)}
    fns, kept = [], []
    for vr in variants:
        fn = functools.partial(run, vr, s, q, k, v, g)
        try:
            out = fn().float()
        except Exception as e:  # a config that does not build here: reported, not timed
            print(f"  {vr['label']:28s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        err = ((out - ref[vr["gated"]]).abs().max() / ref[vr["gated"]].abs().max()).item()
        print(f"  {vr['label']:28s} against the tuned op: max rel diff {err:.2e}", flush=True)
        fns.append(fn)
        kept.append(vr)
    labels = [vr["label"] for vr in kept]
    base = labels.index(args.base) if args.base in labels else None
    for fn in fns:
        fn()
    report(kept, interleaved_ms(fns, args.calls), s, base)
    if args.graph:
        replays = []
        for fn in fns:
            launch_plans.clear()
            replays.append(capture_graph(fn).replay)
        print("  CUDA graph replays:", flush=True)
        report(kept, interleaved_ms(replays, args.calls), s, base)


if __name__ == "__main__":
    main()
