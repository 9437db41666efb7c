#!/usr/bin/env python3
"""Tuned configs against the heuristic defaults, in one process, interleaved: per pass (the
kernel alone) and for the whole op (forward, forward+backward), at S1-S5.

Timed as the tuner times (gfwagen.tuner.timing.CudaEventTimer: the calls queued behind one
GPU sleep, so the times are GPU time even on a busy host, and run back to back after untimed
lead calls, so they see the clocks of sustained work; until session 13 each call had its own
sleep, which measured bursts and flattered some tiles by up to 10% at S4).

    PYTHONPATH=$PWD python benchmarks/verify_tuned.py --db h200.sqlite --json verify.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SHAPES, make_inputs  # noqa: E402
from knobs import pass_fn  # noqa: E402

import gfwagen  # noqa: E402
from gfwagen import dispatch, launch_plans  # noqa: E402
from gfwagen.backends import triton_backend as tb  # noqa: E402
from gfwagen.db.fingerprint import device_fingerprint  # noqa: E402
from gfwagen.db.lookup import Snapshot  # noqa: E402
from gfwagen.heuristics import default_config  # noqa: E402
from gfwagen.spec import KernelSpec, window_class  # noqa: E402
from gfwagen.tuner.timing import CudaEventTimer  # noqa: E402

PASSES = ("fwd", "bwd_kv", "bwd_q")


_timers: dict[int, CudaEventTimer] = {}


def gpu_ms(fn, reps: int) -> float:
    # one timer per repeat count: a fresh one takes the long warm-up of a GPU left idle
    return _timers.setdefault(reps, CudaEventTimer(repeats=reps)).measure(fn).median_ms


def use_configs(by_pass: dict) -> None:
    """Make the op run these configs (pass -> KernelConfig) whatever the database says."""
    dispatch.select_config = lambda spec, seqlen, device: by_pass[spec.pass_]
    launch_plans.clear()  # a plan would keep the configs it was recorded with


def op_fn(mode, q, k, v, g, do, window):
    if mode == "fwd":
        return lambda: gfwagen.attention(q, k, v, g, window=window)
    return lambda: torch.autograd.grad(gfwagen.attention(q, k, v, g, window=window),
                                       (q, k, v, g), do)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", required=True)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args(argv)
    snap = Snapshot.load(a.db, shipped=False)
    fp = device_fingerprint(0)
    rows, ops = [], []
    for name in a.shapes.split(","):
        s = SHAPES[name]
        q, k, v, g, do = make_inputs(s, torch.bfloat16)
        qd, kd, vd, gd, dod = (t.detach() for t in (q, k, v, g, do))
        cfgs = {"default": {}, "tuned": {}}
        for pass_ in PASSES:
            spec = KernelSpec("triton", pass_, s.D, s.D, window_class(s.W), "bf16", True, 1)
            cfgs["default"][pass_] = default_config(spec)
            tuned, why = snap.lookup(spec, s.T, fp)
            cfgs["tuned"][pass_] = tuned or default_config(spec)
        o, lse = tb.forward(qd, kd, vd, gd, s.W, s.D ** -0.5, cfgs["default"]["fwd"])
        x = (qd, kd, vd, gd, dod, s.W, o, lse)
        for pass_ in PASSES:
            fns = {lab: pass_fn(pass_, x, cfgs[lab][pass_], True) for lab in cfgs}
            t = {lab: [] for lab in cfgs}
            for _ in range(a.rounds):
                for lab, fn in fns.items():
                    t[lab].append(gpu_ms(fn, 15))
            r = {lab: statistics.median(v) for lab, v in t.items()}
            rows.append(dict(shape=name, pass_=pass_, default_ms=r["default"],
                             tuned_ms=r["tuned"], default=cfgs["default"][pass_].as_dict(),
                             tuned=cfgs["tuned"][pass_].as_dict()))
            print(f"{name} {pass_:6s} default {r['default']:.4f} tuned {r['tuned']:.4f} "
                  f"x{r['default'] / r['tuned']:.3f}  {cfgs['tuned'][pass_].as_dict()}",
                  flush=True)
        # the whole op, with each pass's faster config as measured just now ("verified")
        best = {r["pass_"]: (cfgs["tuned"] if r["tuned_ms"] < r["default_ms"]
                             else cfgs["default"])[r["pass_"]]
                for r in rows if r["shape"] == name}
        choice = {"default": cfgs["default"], "tuned": cfgs["tuned"], "verified": best}
        res = {}
        for mode in ("fwd", "fwdbwd"):
            t = {lab: [] for lab in choice}
            for _ in range(a.rounds):
                for lab, c in choice.items():
                    use_configs(c)
                    t[lab].append(gpu_ms(op_fn(mode, q, k, v, g, do, s.W), 10))
            res[mode] = {lab: statistics.median(v) for lab, v in t.items()}
            print(f"{name} op {mode:6s} " + " ".join(f"{lab} {ms:.4f}" for lab, ms in
                                                      res[mode].items()), flush=True)
        ops.append(dict(shape=name, op=res, verified={k: c.as_dict() for k, c in best.items()}))
    if a.json:
        Path(a.json).write_text(json.dumps({"passes": rows, "ops": ops}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
