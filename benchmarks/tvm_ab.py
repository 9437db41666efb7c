#!/usr/bin/env python3
"""TVM's Hopper forward (templates/tvm/fwd_wgmma.py) against another version of it, in one
process: the kernel alone (the gate's prefix sums made outside the timing) at each
benchmark shape, gated and plain, timed A, B, B, A (the better of each kept: drift within
the run hits both alike; in A, B, A, B order the unchanged plain kernel read 0.4-2.9% slower
as B), outputs compared.

    git archive main templates | tar -x -C /tmp/old      # the version to compare
    PYTHONPATH=$PWD python benchmarks/tvm_ab.py --old /tmp/old/templates --shapes S1,S3,S2

The config is the tuning database's TVM forward for the shape on this GPU (the op's pick when
TVM wins there), else pingpong 128x128 with bulk copies; --config forces one for all shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SHAPES, make_inputs  # noqa: E402
from knobs import bench  # noqa: E402
from template_ab import ORDER, ab_line, load_old  # noqa: E402

from gfwagen import dispatch  # noqa: E402
from gfwagen.backends import tvm_backend as tb  # noqa: E402
from gfwagen.spec import KernelConfig  # noqa: E402

PINGPONG = KernelConfig(128, 128, 8, 3, extra=(("pingpong", True), ("tma", True),
                                                ("wgmma", True)))


def kernel(template, spec, cfg, target):
    import tvm

    prim = template.make_forward_tc(spec.head_dim, spec.value_dim, spec.window, spec.dtype,
                                    spec.gated, spec.group, cfg)
    return tvm.compile(prim, target=target)["gfwa_fwd"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, required=True,
                   help="the other version's templates folder (holding tvm/)")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--config", type=json.loads, default=None,
                   help='a KernelConfig as JSON, e.g. {"block_m": 128, "block_n": 64, '
                        '"num_warps": 8, "num_stages": 3, "extra": {"pingpong": true, '
                        '"tma": true, "wgmma": true}}')
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    a = p.parse_args(argv)
    versions = {"old": load_old(a.old, "fwd_wgmma", "tvm"),
                "new": tb.load_template("tvm", "fwd_wgmma")}
    for shape in a.shapes.split(","):
        s = SHAPES[shape]
        q, k, v, g, _ = (t.detach() for t in make_inputs(s, torch.bfloat16))
        target = tb._target(q, "cuda")
        for gated in (True, False):
            gate = g if gated else None
            spec = tb._spec("fwd", q, k, v, gate, s.W)
            cfg = (KernelConfig.from_dict(a.config) if a.config else
                   dispatch.select_config(spec, s.T, q.device))
            if not cfg.get("wgmma"):
                cfg = PINGPONG
            ms, outs = {}, {}
            for which in ("old", "new"):
                fn = kernel(versions[which], spec, cfg, target)
                c, o, lse = tb.kernel_buffers(q, v, gate, spec, cfg, s.D ** -0.5,
                                              versions[which])
                args = tb.forward_launch_args(q, k, v, c, o, lse, s.D ** -0.5)
                outs[which] = (fn, args, o, lse)
            for which in ORDER:
                fn, args, *_ = outs[which[:3]]
                ms[which] = bench(lambda fn=fn, args=args, q=q: tb._launch(q, fn, *args), a.rep)
            diff = max(((n.float() - o.float()).abs().max()).item()
                       for n, o in zip(outs["new"][2:], outs["old"][2:], strict=True))
            print(ab_line(f"{shape} {'gated' if gated else 'plain'}", ms,
                          f"max |new - old| {diff:.1e}", cfg, 4), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
