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

A config may add "gated": false (the same problem without the gate) and "label". Two words
stand for configs: `default` (gfwagen/heuristics.py's) and `tuned` (what the op would run on
this GPU, from the database, kin classes included; its reason is printed). With --pass fwd
every config's output is checked against the reference before it is timed. --kv-heads makes
the shape a GQA one; --dtype fp32 times the ieee-dot kernels:

    PYTHONPATH=$PWD python benchmarks/head_to_head.py --shape S1 --kv-heads 4 --pass bwd_kv \
        --config default --config tuned
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SHAPES, TINY, flops, round_orders  # noqa: E402
from knobs import PASS_FLOPS, pass_fn  # noqa: E402

from gfwagen.generator import check_config  # noqa: E402
from gfwagen.spec import KernelConfig, KernelSpec  # noqa: E402
from gfwagen.tuner.study import config_text  # noqa: E402

PASSES = ("fwd", "bwd_kv", "bwd_q")
PICKS = ("default", "tuned")  # --config words, resolved by resolve_picks


def parse_configs(texts: list[str], shape, pass_: str, dtype: str, group: int = 1) -> list[dict]:
    """--config JSON texts (or a word of PICKS) as [{label, gated, config, pick}]; a bad one
    raises ValueError naming it and what was expected. A pick's config and label are None
    until resolve_picks."""
    out = []
    for i, text in enumerate(texts, 1):
        if text.strip() in PICKS:
            out.append({"label": None, "gated": True, "config": None, "pick": text.strip()})
            continue
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
                                    group), cfg)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"--config #{i} ({text!r}): {e}") from None
        out.append({"label": label or config_text(cfg) + ("" if gated else " (no gate)"),
                    "gated": gated, "config": cfg, "pick": None})
    _check_labels(out)
    return out


def _check_labels(configs: list[dict]) -> None:
    labels = [c["label"] if c["pick"] is None else c["pick"] for c in configs]
    if len(set(labels)) != len(labels):
        raise ValueError("--config: two configs share a label; give one a 'label'")


def resolve_picks(configs: list[dict], spec, seqlen: int, lookup) -> list[str]:
    """Fill in the configs and labels of the PICKS words for spec (gated); lookup(spec, seqlen)
    gives the database's (config or None, reason). Returns a line per pick saying where its
    config came from."""
    from gfwagen.heuristics import default_config

    notes = []
    for c in configs:
        if c["pick"] is None:
            continue
        cfg, why = (default_config(spec), "gfwagen/heuristics.py") if c["pick"] == "default" \
            else lookup(spec, seqlen)
        if cfg is None:
            cfg, why = default_config(spec), f"{why} (so the default)"
        c["config"], c["label"] = cfg, f"{c['pick']}: {config_text(cfg)}"
        notes.append(f"{c['pick']}: {config_text(cfg)}, {why}")
    return notes


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

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    q, k, v, g, do = (t.detach() for t in make_inputs(shape, dtype))
    hkv = args.kv_heads or shape.H
    k, v = k[:, :, :hkv].contiguous(), v[:, :, :hkv].contiguous()
    spec = KernelSpec("triton", args.pass_, shape.D, shape.D, shape.W, args.dtype, True,
                      shape.H // hkv)
    for note in resolve_picks(configs, spec, shape.T, _database_lookup):
        print(note)
    scale = shape.D ** -0.5
    outs = {}
    for gated in {c["gated"] for c in configs}:
        gate = g if gated else None
        base = default_config(spec.replace(pass_="fwd", gated=gated))
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
    for order in round_orders(range(len(configs)), args.rounds):
        for i in order:
            label = configs[i]["label"]
            fn = fns[label]
            times[label].append((
                triton.testing.do_bench(fn, warmup=10, rep=args.rep, return_mode="median"),
                timer.measure(fn).median_ms))
    return summarize(times)


def _database_lookup(spec, seqlen):
    import torch

    from gfwagen.db.fingerprint import device_fingerprint
    from gfwagen.db.lookup import get_snapshot

    return get_snapshot().lookup(spec, seqlen, device_fingerprint(torch.device("cuda")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="S1", help=f"one of {', '.join([*SHAPES, *TINY])}")
    p.add_argument("--pass", dest="pass_", choices=PASSES, default="fwd")
    p.add_argument("--config", action="append", default=[], metavar="JSON",
                   help="a config as `gfwagen tune --try` takes it, or a word: default, "
                        "tuned; two or more")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--kv-heads", type=int, help="key/value heads (GQA); default: the shape's")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    shape = {**SHAPES, **TINY}.get(args.shape)
    if shape is None:
        p.error(f"--shape: expected one of {', '.join([*SHAPES, *TINY])}, got {args.shape!r}")
    if len(args.config) < 2 or args.rounds < 1:
        p.error("--config: two or more configs to compare, and --rounds >= 1")
    if args.kv_heads is not None and (args.kv_heads < 1 or shape.H % args.kv_heads):
        p.error(f"--kv-heads: expected a divisor of the shape's {shape.H} heads, "
                f"got {args.kv_heads}")
    try:
        configs = parse_configs(args.config, shape, args.pass_, args.dtype,
                                shape.H // (args.kv_heads or shape.H))
    except ValueError as e:
        p.error(str(e))
    rows = run(args, shape, configs)
    tf = flops(shape, "fwd") * PASS_FLOPS[args.pass_]
    gqa = f" {shape.H // args.kv_heads}:1 GQA" if args.kv_heads else ""
    print(f"{args.shape}{gqa} {args.pass_} {args.dtype}, {args.rounds} rounds, medians over "
          "rounds")
    for r in rows:
        print(f"  {r['label']:48s} do_bench {r['do_bench_ms']:.4f} ms "
              f"[{r['min_ms']:.4f}-{r['max_ms']:.4f}] ({tf / r['do_bench_ms'] / 1e9:.1f} "
              f"TFLOP/s), timer {r['timer_ms']:.4f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "pass": args.pass_,
                                               "dtype": args.dtype, "kv_heads": args.kv_heads,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
