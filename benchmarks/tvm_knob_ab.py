#!/usr/bin/env python3
"""A TVM forward config extra, on against off, and the gate's cost with each, in one process:
per benchmark shape, the tuning database's TVM forward config for the problem on this GPU
(else pingpong 128x128 with bulk copies), run through tvm_backend.tvm_forward (the gate's
record or sums launch included, as the op runs it) gated and ungated, each without and with
the extras, and the op's own ungated forward (`backend="auto"`, which may be Triton's),
call by call in rotating order, the L2 flushed before each (bench.interleaved_ms; --graph:
each variant's CUDA-graph replay, without the host's gaps between launches). Prints
the medians, extras on over off, and gated over ungated per call round; the outputs with
and without the extras are compared.

    PYTHONPATH=$PWD python benchmarks/tvm_knob_ab.py --extra '{"dup_bias": true}' \\
        --shapes S1,S2,S3,S4,S5 --calls 60
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # noqa: E402
    SHAPES,
    capture_graph,
    interleaved_ms,
    make_inputs,
    ratio_quartiles,
)

import gfwagen  # noqa: E402
from gfwagen import dispatch  # noqa: E402
from gfwagen.backends import tvm_backend as tb  # noqa: E402
from gfwagen.generator import wgmma_num_warps  # noqa: E402
from gfwagen.spec import KernelConfig  # noqa: E402

PINGPONG = KernelConfig(128, 128, 8, 3, extra=(("pingpong", True), ("tma", True),
                                                ("wgmma", True)))


def tvm_config(spec, T, device) -> KernelConfig:
    cfg = dispatch.select_config(spec, T, device)
    return cfg if cfg.get("wgmma") else PINGPONG


TILE_FIELDS = ("block_m", "block_n", "num_warps", "num_stages")


def with_extra(cfg: KernelConfig, extra: dict) -> KernelConfig:
    """cfg with `extra` switched on: its tile fields (block_m, ...) replace cfg's, the rest
    join its extras; a new block_m counts its warps (wgmma_num_warps) unless given."""
    tiles = {k: int(v) for k, v in extra.items() if k in TILE_FIELDS}
    if "block_m" in tiles:
        tiles.setdefault("num_warps", wgmma_num_warps(tiles["block_m"]))
    rest = {k: v for k, v in extra.items() if k not in TILE_FIELDS}
    return dataclasses.replace(cfg, **tiles,
                               extra=tuple(sorted({**dict(cfg.extra), **rest}.items())))


def ratios(a, b) -> str:
    q1, med, q3 = ratio_quartiles(a, b)
    return f"{med:.4f} (IQR {q1:.4f}-{q3:.4f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extra", type=json.loads, required=True,
                   help='the config extras to switch on, as JSON, e.g. {"dup_bias": true}; '
                        'tile fields replace the config\'s, e.g. {"block_m": 192}')
    p.add_argument("--shapes", default="S1,S2,S3,S4,S5")
    p.add_argument("--calls", type=int, default=60, help="calls of each variant")
    p.add_argument("--graph", action="store_true",
                   help="time each variant's CUDA-graph replays instead of its calls: the GPU's "
                        "time without the host's gaps between the gate's launch and the kernel")
    a = p.parse_args(argv)
    if a.calls < 4:
        p.error(f"--calls: expected at least 4, got {a.calls}")
    for name in a.shapes.split(","):
        s = SHAPES[name]
        q, k, v, g, _ = (t.detach() for t in make_inputs(s, torch.bfloat16))
        gspec = tb._spec("fwd", q, k, v, g, s.W)
        pspec = tb._spec("fwd", q, k, v, None, s.W)
        off, plain = tvm_config(gspec, s.T, q.device), tvm_config(pspec, s.T, q.device)
        on, plain_on = with_extra(off, a.extra), with_extra(plain, a.extra)
        fns = {
            "gated": functools.partial(tb.tvm_forward, q, k, v, g, s.W, config=off),
            "gated+extra": functools.partial(tb.tvm_forward, q, k, v, g, s.W, config=on),
            "ungated": functools.partial(tb.tvm_forward, q, k, v, None, s.W, config=plain),
            "ungated+extra": functools.partial(tb.tvm_forward, q, k, v, None, s.W,
                                               config=plain_on),
            "op ungated": functools.partial(gfwagen.attention, q, k, v, None, window=s.W),
        }
        outs = {n: f() for n, f in fns.items() if n != "op ungated"}
        diff = {u: max((x.float() - y.float()).abs().max().item()
                       for x, y in zip(outs[u], outs[f"{u}+extra"], strict=True))
                for u in ("gated", "ungated")}
        for f in fns.values():
            f()
        if a.graph:
            fns = {n: capture_graph(f).replay for n, f in fns.items()}
        ms = dict(zip(fns, interleaved_ms(list(fns.values()), a.calls), strict=True))
        print(f"{name}{' (graph replays)' if a.graph else ''} gated {off.as_dict()} + "
              f"{a.extra}; ungated {plain.as_dict()}")
        print("  medians: " + ", ".join(f"{n} {statistics.median(t):.4f}" for n, t in ms.items())
              + " ms; max |o, lse with - without| "
              + ", ".join(f"{u} {d:.1e}" for u, d in diff.items()))
        for u in ("gated", "ungated"):
            print(f"  extra on / off ({u}): {ratios(ms[u + '+extra'], ms[u])}")
        print(f"  gated / ungated, both without: {ratios(ms['gated'], ms['ungated'])}, both "
              f"with: {ratios(ms['gated+extra'], ms['ungated+extra'])}")
        print(f"  gated / op ungated: without {ratios(ms['gated'], ms['op ungated'])}, with "
              f"{ratios(ms['gated+extra'], ms['op ungated'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
