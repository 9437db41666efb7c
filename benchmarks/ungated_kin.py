#!/usr/bin/env python3
"""The ungated op where the database has only the gated class tuned: the heuristic default
against the gated class's tuned configs (a kin class, as gfwagen.db.lookup takes them), forward and
forward+backward, each captured in a CUDA graph and the replays interleaved (the L2 flushed
before each), so both see the same clocks and no host time.

    python benchmarks/ungated_kin.py --classes d64w256,d128w2048,d256w1024 --calls 30

A class is d<head dim>w<window>, at the shipped database's shape for it (32768 tokens: B=8,
T=4096 up to W=2048; then B=4, T=8192; B=2, T=16384 from W=8192), 16 heads, bf16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import capture_graph, class_shape, flops, interleaved_ms, make_inputs  # noqa: E402

import gfwagen  # noqa: E402
from gfwagen import dispatch  # noqa: E402
from gfwagen.db import lookup  # noqa: E402

_real_kin = lookup._kin_specs


def use(gated_kin: bool) -> None:
    """The lookup as it is (the gated kin last), or without the gated kin; with the snapshot
    the op's memoized configs and choices go (reset_snapshot)."""
    lookup._kin_specs = _real_kin if gated_kin else (
        lambda spec: [(k, n) for k, n in _real_kin(spec) if k.gated == spec.gated])
    lookup.reset_snapshot()


def picks(q, v, window) -> str:
    out = []
    for pass_ in ("fwd", "bwd_kv", "bwd_q"):
        spec = dispatch._spec("triton", pass_, q, v, window, False, 1)
        cfg = dispatch.select_config(spec, q.shape[1], q.device)
        out.append(f"{pass_} {cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
                   + "".join(f" {knob}" if val is True else f" {knob}={val}"
                             for knob, val in cfg.extra))
    spec = dispatch._spec("triton", "bwd_ds", q, v, window, False, 1)
    stored = dispatch._stored_choice(spec, *dispatch._memo_keys(q.shape[1], q.device))
    out.append("stored-dS backward" if stored is not None else "recomputing backward")
    return "; ".join(out)


def measure(name: str, calls: int) -> None:
    s = class_shape(name)
    q, k, v, _g, do = make_inputs(s, torch.bfloat16)

    def fwd():
        return gfwagen.attention(q, k, v, None, window=s.W, backend="triton")

    def fwdbwd():
        return torch.autograd.grad(fwd(), (q, k, v), do)

    graphs, outs = {}, {}
    for label, gated_kin in (("heuristic", False), ("gated kin", True)):
        use(gated_kin)
        print(f"== {name} {s._asdict()} {label}: {picks(q, v, s.W)}", flush=True)
        outs[label] = fwd().detach().float()
        graphs[(label, "fwd")] = capture_graph(fwd).replay
        graphs[(label, "f+b")] = capture_graph(fwdbwd).replay
    diff = ((outs["gated kin"] - outs["heuristic"]).abs().max()
            / outs["heuristic"].abs().max()).item()
    keys = list(graphs)
    ms = dict(zip(keys, interleaved_ms([graphs[x] for x in keys], calls), strict=True))
    for mode, factor in (("fwd", "fwd"), ("f+b", "fwdbwd")):
        h, kin = ms[("heuristic", mode)], ms[("gated kin", mode)]
        ratio = statistics.median([a / b for a, b in zip(kin, h, strict=True)])
        mh, mk = statistics.median(h), statistics.median(kin)
        print(f"  {mode:4s} heuristic {mh:.4f} ms ({flops(s, factor) / mh / 1e9:6.1f} "
              f"TFLOP/s), gated kin {mk:.4f} ms ({flops(s, factor) / mk / 1e9:6.1f}), "
              f"kin / heuristic per call: median {ratio:.4f}", flush=True)
    print(f"  outputs: max rel diff {diff:.1e}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", default="d64w256,d64w1024,d128w2048,d256w1024")
    p.add_argument("--calls", type=int, default=30)
    args = p.parse_args()
    for name in args.classes.split(","):
        measure(name, args.calls)
        torch.cuda.empty_cache()
    lookup._kin_specs = _real_kin
    lookup.reset_snapshot()  # with it the op's memoized configs and choices


if __name__ == "__main__":
    main()
