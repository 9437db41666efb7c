#!/usr/bin/env python3
"""The stored-dS backward against the recomputing one, forward+backward through the op, where
the database's per-pass times are close (dispatch._stored_choice compares them): each variant
captured in a CUDA graph and the replays interleaved (the L2 flushed before each), so both see
the same clocks.

    python benchmarks/stored_ds_ab.py --classes d64w256,d64w2048,d256w512 --calls 30

A class is d<head dim>w<window> at the shipped database's shape for it (bench.class_shape),
gated unless --ungated.
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

_rule = dispatch._stored_choice


def force(stored: bool | None) -> None:
    """Stored dS wherever a bwd_ds config is tuned (True), never (False), or as the database
    decides (None). The memoized choices and the launch plans, which hold the choice a
    signature's first call made, go with the old rule (reset_snapshot)."""
    if stored is None:
        dispatch._stored_choice = _rule
    else:
        def rule(spec, bucket, device):
            if not stored:
                return None
            from gfwagen.db.fingerprint import device_fingerprint

            entry, _ = lookup.get_snapshot().lookup_entry(
                spec.replace(pass_="bwd_ds"), bucket, device_fingerprint(torch.device(device)))
            return None if entry is None else entry.config
        rule.cache_clear = lambda: None
        dispatch._stored_choice = rule
    lookup.reset_snapshot()


def measure(name: str, gated: bool, calls: int) -> None:
    s = class_shape(name)
    q, k, v, g, do = make_inputs(s, torch.bfloat16)
    g = g if gated else None
    inputs = (q, k, v) + ((g,) if gated else ())

    def fwdbwd():
        return torch.autograd.grad(
            gfwagen.attention(q, k, v, g, window=s.W, backend="triton"), inputs, do)

    spec = dispatch._spec("triton", "bwd_kv", q, v, s.W, gated, 1)
    force(None)
    shipped = dispatch._stored_choice(spec, *dispatch._memo_keys(q.shape[1], q.device))
    graphs, grads = {}, {}
    for label, stored in (("stored dS", True), ("recompute", False)):
        force(stored)
        grads[label] = [x.float() for x in fwdbwd()]
        graphs[label] = capture_graph(fwdbwd).replay
    force(None)
    diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
               for a, b in zip(grads["stored dS"], grads["recompute"], strict=True))
    ms = dict(zip(graphs, interleaved_ms(list(graphs.values()), calls), strict=True))
    st, rc = ms["stored dS"], ms["recompute"]
    ratio = statistics.median([a / b for a, b in zip(st, rc, strict=True)])
    print(f"== {name} {'gated' if gated else 'ungated'} {s._asdict()}: the rule picks "
          f"{'stored dS' if shipped is not None else 'recompute'}", flush=True)
    for label, t in ms.items():
        med = statistics.median(t)
        print(f"  f+b {label:9s} {med:.4f} ms ({flops(s, 'fwdbwd') / med / 1e9:6.1f} TFLOP/s)",
              flush=True)
    print(f"  stored / recompute per call: median {ratio:.4f}; grads max rel diff {diff:.1e}",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", default="d64w256,d64w2048,d256w256,d256w512")
    p.add_argument("--ungated", action="store_true")
    p.add_argument("--calls", type=int, default=30)
    args = p.parse_args()
    for name in args.classes.split(","):
        measure(name, not args.ungated, args.calls)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
