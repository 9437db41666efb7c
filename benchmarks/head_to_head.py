#!/usr/bin/env python3
"""Kernel configs of one pass head to head at one shape: interleaved rounds in one process,
the order reversed every other round, each config's median over the rounds by do_bench and by
the tuner's sustained timer, with do_bench's range. One tuner measurement cannot separate
configs a few percent apart (RESULTS, sessions 13-14); the database decisions there were made
this way.

    PYTHONPATH=$PWD python benchmarks/head_to_head.py --shape S1 --pass fwd --rounds 5 \\
        --config '{"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 3,
                   "extra": {"tma": true, "prefetch_gate": true}}' \\
        --config '{"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2,
                   "extra": {"tma": true, "prefetch_gate": true, "maxnreg": 128}}'

A config may add "gated": false (the same problem without the gate) and "label". With
--pass fwd every config's output is checked against the reference before it is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SHAPES, TINY, flops  # noqa: E402
from knobs import PASS_FLOPS, pass_fn  # noqa: E402

from gfwagen.generator import check_config  # noqa: E402
from gfwagen.spec import KernelConfig, KernelSpec  # noqa: E402
from gfwagen.tuner.study import config_text  # noqa: E402

PASSES = ("fwd", "bwd_kv", "bwd_q")


def parse_configs(texts: list[str], shape, pass_: str, dtype: str) -> list[dict]:
    """--config JSON texts as [{label, gated, config}]; a bad one raises ValueError naming
    it and what was expected."""
    out = []
    for i, text in enumerate(texts, 1):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config #{i} is not JSON ({e.msg}): {text!r}") from None
        if not isinstance(d, dict):
            raise ValueError(f"--config #{i}: expected a JSON object, got {text!r}")
        gated, label = d.pop("gated", True), d.pop("label", None)
        if not isinstance(gated, bool):
            raise ValueError(f"--config #{i}: 'gated' must be true or false, got {gated!r}")
        try:
            cfg = KernelConfig.from_dict(d)
            check_config(KernelSpec("triton", pass_, shape.D, shape.D, shape.W, dtype, gated,
                                    1), cfg)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"--config #{i} ({text!r}): {e}") from None
        out.append({"label": label or config_text(cfg) + ("" if gated else " (no gate)"),
                    "gated": gated, "config": cfg})
    if len({c["label"] for c in out}) != len(out):
        raise ValueError("--config: two configs share a label; give one a 'label'")
    return out


def round_orders(n: int, rounds: int) -> list[list[int]]:
    """Config indices per round, reversed every other round: each config is timed both early
    and late in a round, so a GPU warming or cooling over the round favours none."""
    return [list(range(n)) if r % 2 == 0 else list(range(n))[::-1] for r in range(rounds)]


def summarize(times: dict[str, list[tuple[float, float]]]) -> list[dict]:
    """{label: [(do_bench ms, timer ms) per round]} -> rows, fastest do_bench median first."""
    rows = []
    for label, r in times.items():
        a, b = [x for x, _ in r], [y for _, y in r]
        rows.append({"label": label, "do_bench_ms": statistics.median(a), "min_ms": min(a),
                     "max_ms": max(a), "timer_ms": statistics.median(b), "rounds": len(r)})
    return sorted(rows, key=lambda x: x["do_bench_ms"])


def run(args, shape, configs):
    import torch
    import triton.testing
    from bench import make_inputs

    from gfwagen.backends import triton_backend as tb
    from gfwagen.heuristics import default_config
    from gfwagen.reference import reference_forward
    from gfwagen.tuner.timing import CudaEventTimer

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    q, k, v, g, do = (t.detach() for t in make_inputs(shape, dtype))
    scale = shape.D ** -0.5
    outs = {}
    for gated in {c["gated"] for c in configs}:
        gate = g if gated else None
        base = default_config(KernelSpec("triton", "fwd", shape.D, shape.D, shape.W,
                                         args.dtype, gated, 1))
        outs[gated] = tb.forward(q, k, v, gate, shape.W, scale, base)
        ref, _ = reference_forward(q[:1], k[:1], v[:1], gate[:1] if gated else None, shape.W)
        outs[gated] += (ref,)
    fns = {}
    for c in configs:
        o, lse, ref = outs[c["gated"]]
        if args.pass_ == "fwd":  # a config that breaks the output must not count
            got, _ = tb.forward(q, k, v, g if c["gated"] else None, shape.W, scale,
                                c["config"])
            err = (got[:1].float() - ref.float()).abs().max().item()
            if not err < 5e-2:
                raise SystemExit(f"{c['label']}: output off by {err:.3g} against the reference")
        fns[c["label"]] = pass_fn(args.pass_, (q, k, v, g, do, shape.W, o, lse), c["config"],
                                  c["gated"])
    timer = CudaEventTimer()
    times: dict[str, list] = {c["label"]: [] for c in configs}
    for order in round_orders(len(configs), args.rounds):
        for i in order:
            label = configs[i]["label"]
            fn = fns[label]
            times[label].append((
                triton.testing.do_bench(fn, warmup=10, rep=args.rep, return_mode="median"),
                timer.measure(fn).median_ms))
    return summarize(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="S1", help=f"one of {', '.join([*SHAPES, *TINY])}")
    p.add_argument("--pass", dest="pass_", choices=PASSES, default="fwd")
    p.add_argument("--config", action="append", default=[], metavar="JSON",
                   help="a config as `gfwagen tune --try` takes it; two or more")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    shape = {**SHAPES, **TINY}.get(args.shape)
    if shape is None:
        p.error(f"--shape: expected one of {', '.join([*SHAPES, *TINY])}, got {args.shape!r}")
    if len(args.config) < 2 or args.rounds < 1:
        p.error("--config: two or more configs to compare, and --rounds >= 1")
    try:
        configs = parse_configs(args.config, shape, args.pass_, args.dtype)
    except ValueError as e:
        p.error(str(e))
    rows = run(args, shape, configs)
    tf = flops(shape, "fwd") * PASS_FLOPS[args.pass_]
    print(f"{args.shape} {args.pass_} {args.dtype}, {args.rounds} rounds, medians over rounds")
    for r in rows:
        print(f"  {r['label']:48s} do_bench {r['do_bench_ms']:.4f} ms "
              f"[{r['min_ms']:.4f}-{r['max_ms']:.4f}] ({tf / r['do_bench_ms'] / 1e9:.1f} "
              f"TFLOP/s), timer {r['timer_ms']:.4f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "pass": args.pass_,
                                               "dtype": args.dtype, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
