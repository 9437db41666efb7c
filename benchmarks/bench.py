#!/usr/bin/env python3
"""Forward and forward+backward timing of gfwagen against flash-linear-attention and
FlexAttention, gated and ungated, on the same inputs (GATEDFWA.md section 6).

    python benchmarks/bench.py                        # all shapes, contenders, modes
    python benchmarks/bench.py --tiny --check         # smoke run
    python benchmarks/bench.py --shapes S1,S3 --contenders gfwagen,fla --json out.json

TFLOP/s count in-window pairs only (GATEDFWA.md section 1): fwd = 4*B*H*D*pairs(T, W),
bwd = 2.5 x fwd. "bwd" is reported as (fwd+bwd) - fwd. The forward is timed with autograd
recording (inputs require grad), i.e. the training forward whose cost the subtraction assumes.
Flex timings include the [B,T,H,D] <-> [B,H,T,D] transposes and the gate prefix sums.
Each shape is timed in --rounds rounds, the contenders' order reversed each round, and each
contender keeps its best round (round_orders says why). --gate-pairs N then times gfwagen's
gated and ungated forwards call by call, alternating (paired_ms), for the gate's cost: eager
calls, then each forward replayed from a CUDA graph (the kernels' cost without the host's).
Mode "graph" times each contender's forward+backward once more, replayed from a CUDA graph:
where the eager call is bound by its host (S5 on a slow host, RESULTS.md session 28), the two
differ, and "graph" is what the kernels take.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import traceback
from collections import namedtuple
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

Shape = namedtuple("Shape", "B T H D W")
SHAPES = {
    "S1": Shape(8, 4096, 16, 128, 512),
    "S2": Shape(8, 4096, 16, 128, 1024),
    "S3": Shape(2, 16384, 16, 128, 1024),
    "S4": Shape(2, 16384, 16, 128, 4096),
    "S5": Shape(8, 4096, 16, 64, 512),
    # full causal attention (W = T), the Forgetting Transformer's: not part of the recorded
    # S1-S5 run; fla runs its causal kernel there (window_size=None)
    "F1": Shape(4, 8192, 16, 128, 8192),
    "F2": Shape(4, 8192, 16, 64, 8192),
}
RECORDED = ["S1", "S2", "S3", "S4", "S5"]  # the op issue's shapes, the recorded run's
TINY = {"tiny": Shape(1, 256, 2, 64, 64)}
CONTENDERS = ["gfwagen", "gfwagen-nogate", "fla", "fla-nogate", "flex", "flex-nogate"]
MODES = ["fwd", "fwdbwd", "graph"]
# "graph": forward+backward replayed from a CUDA graph, the GPU's time without the host's
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5, "graph": 3.5}
DEVICE = "cuda"


# ---------------------------------------------------------------------------- pure helpers
def class_shape(name: str) -> Shape:
    """A tuning class d<head dim>w<window> at the shipped database's shape for it, as
    `gfwagen tune --preset classes` makes it: T = max(4096, 2W), 32768 tokens, 16 heads."""
    m = re.fullmatch(r"d(\d+)w(\d+)", name)
    if not m:
        raise SystemExit(f"expected a class name such as d64w256, got {name!r}")
    d, w = int(m.group(1)), int(m.group(2))
    t = max(4096, 2 * w)
    return Shape(32768 // t, t, 16, d, w)


def pairs(T: int, W: int) -> int:
    """(query, key) pairs inside the causal window: W per row once the window is full."""
    return T * W - W * (W - 1) // 2 if W < T else T * (T + 1) // 2


def flops(s: Shape, mode: str) -> float:
    return FLOP_FACTOR[mode] * 4 * s.B * s.H * s.D * pairs(s.T, s.W)


def tflops(s: Shape, mode: str, ms: float) -> float:
    return flops(s, mode) / (ms * 1e-3) / 1e12


def format_table(headers, rows, markdown=False) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        lines.insert(1, "|" + "|".join("---" for _ in headers) + "|")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))
                     for r in cells)


def _cell(x) -> str:
    if isinstance(x, float):  # keep tiny smoke-run figures readable too
        return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"
    return "-" if x is None else str(x)


def summary_rows(results, shapes, contenders):
    """Wide table: per shape, each contender's fwd and fwd+bwd TFLOP/s, then gfwagen's f+b
    speed-up over fla and flex (a ratio of TFLOP/s, i.e. the inverse ratio of times)."""
    tf = {(r["shape"], r["contender"], r["mode"]): r.get("tflops") for r in results}
    headers = ["shape"] + [f"{c} {m}" for c in contenders for m in ("fwd", "f+b")]
    headers += ["gfw/fla f+b", "gfw/flex f+b"]
    rows = []
    for name in shapes:
        row = [name] + [tf.get((name, c, m)) for c in contenders for m in ("fwd", "fwdbwd")]
        g = tf.get((name, "gfwagen", "fwdbwd"))
        for peer in ("fla", "flex"):
            p = tf.get((name, peer, "fwdbwd"))
            row.append(f"{g / p:.2f}x" if g and p else None)
        rows.append(row)
    return headers, rows


def graph_rows(results, shapes):
    """Per shape, forward+backward replayed from a CUDA graph ("graph" mode): gfwagen's eager
    and replayed ms (their difference is host time the GPU waited for), each contender's
    TFLOP/s replayed, and gfwagen's replayed speed-up over fla and flex."""
    ms = {(r["shape"], r["contender"], r["mode"]): r.get("ms") for r in results}
    peers = ("fla", "flex")
    headers = ["shape", "gfwagen f+b ms", "graph ms", "eager / graph", "gfwagen graph",
               *(f"{p} graph" for p in peers), *(f"gfw/{p} graph" for p in peers)]
    rows = []
    for name in shapes:
        g = ms.get((name, "gfwagen", "graph"))
        if g is None:
            continue
        eager = ms.get((name, "gfwagen", "fwdbwd"))
        tf = {r["contender"]: r["tflops"] for r in results
              if r["shape"] == name and r["mode"] == "graph"}
        rows.append([name, eager, g, f"{eager / g:.2f}" if eager else None, tf.get("gfwagen"),
                     *(tf.get(p) for p in peers),
                     *(f"{tf['gfwagen'] / tf[p]:.2f}x" if tf.get(p) else None for p in peers)])
    return headers, rows


def gate_cost_rows(results, shapes):
    """Per shape, what issue 5's target 2 asks of gfwagen's forward, as percentages of extra
    time: the gated forward over the ungated one, from each one's best round and round by
    round (each gated run against the ungated run next to it), and over FlexAttention's plain
    window. The rounds show how far one figure can move: in session 21's recorded run S2's
    best-round cost was 10.6%, its two rounds 3.0% and 13.6% (RESULTS.md)."""
    res = {(r["shape"], r["contender"]): r for r in results if r.get("mode") == "fwd"}
    paired = {m: {r["shape"]: r for r in results if r.get("mode") == m}
              for m in ("fwd-paired", "fwd-paired-graph")}
    headers = ["shape", "gated / ungated fwd", "per round", "median of rounds",
               "gated / flex-nogate fwd", "paired calls: median (quartiles)",
               "paired graph replays: median (quartiles)"]
    rows = []

    def pct(a, b):
        return f"{100 * (a / b - 1):+.1f}%"

    for name in shapes:
        g, u, f = (res.get((name, c)) for c in ("gfwagen", "gfwagen-nogate", "flex-nogate"))
        if not (g and u):
            continue
        rounds = [a / b for a, b in zip(g.get("rounds_ms") or [], u.get("rounds_ms") or [])]
        by_pair = []
        for calls in paired.values():
            if name not in calls:
                by_pair.append(None)
                continue
            q1, q2, q3 = statistics.quantiles(calls[name]["ratios"], n=4)
            by_pair.append(f"{pct(q2, 1.0)} ({pct(q1, 1.0)}, {pct(q3, 1.0)})")
        rows.append([name, pct(g["ms"], u["ms"]),
                     " ".join(pct(x, 1.0) for x in rounds) or None,
                     pct(statistics.median(rounds), 1.0) if rounds else None,
                     pct(g["ms"], f["ms"]) if f else None, *by_pair])
    return headers, rows


# ------------------------------------------------------------------------------ contenders
# A loader imports a library and returns make(shape) -> f(q, k, v, log_gate) -> o, all in the
# [B,T,H,D] layout. Import failures make a contender "unavailable" instead of ending the run.
def load_gfwagen(gated):
    import gfwagen

    attention = gfwagen.attention  # AttributeError while the op does not exist yet

    return lambda s: lambda q, k, v, g: attention(q, k, v, g if gated else None, window=s.W,
                                                  scale=None)


def load_fla(gated):
    # fla 0.6 takes per-token log gates g [B,T,HQ] (fp32; it does the prefix sum itself, in
    # log2 units, and returns dg in fp32), q/k/v [B,T,H,D], window_size=W meaning keys
    # [i-W+1, i]. W is a tl.constexpr there: one Triton compile per window size.
    from fla.ops.attn.parallel import parallel_attn
    from fla.ops.forgetting_attn import parallel_forgetting_attn

    def window(s):  # a window covering the sequence: fla's causal kernel, not a windowed one
        return None if s.W >= s.T else s.W

    if gated:
        return lambda s: lambda q, k, v, g: parallel_forgetting_attn(q, k, v, g, scale=None,
                                                                     window_size=window(s))
    return lambda s: lambda q, k, v, g: parallel_attn(q, k, v, None, scale=None,
                                                      window_size=window(s))


_flex = {}  # "op": flex_attention, "fn": its compiled wrapper


def _flex_attention(q, k, v, block_mask, c_q=None, c_k=None):
    # Each captured tensor is indexed exactly once: flex only differentiates a captured
    # buffer under that condition, so the prefix sums come in as two distinct tensors.
    def gate_bias(score, b, h, q_idx, kv_idx):
        return score + (c_q[b, h, q_idx] - c_k[b, h, kv_idx])

    o = _flex["op"](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                    score_mod=None if c_q is None else gate_bias, block_mask=block_mask)
    return o.transpose(1, 2)


def load_flex(gated, compile_mode=None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # One compiled graph per shape: past the recompile limit dynamo silently falls back to
    # eager flex, which materializes T x T scores. Raise it, and make a hit an error.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit", "fail_on_recompile_limit_hit"):
        if hasattr(cfg, name):  # the names changed across torch versions
            setattr(cfg, name, True if name.startswith("fail") else 4096)
    _flex["op"] = flex_attention
    if "fn" not in _flex:  # dynamic=False: a kernel specialized to each shape
        _flex["fn"] = torch.compile(_flex_attention, dynamic=False, mode=compile_mode)
    fn = _flex["fn"]

    def make(s):
        W = s.W

        def sliding_window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < W)
        # _compile=True avoids materializing a T x T mask while building the block mask.
        bm = create_block_mask(sliding_window, None, None, s.T, s.T, device=DEVICE,
                               _compile=True)
        if not gated:
            return lambda q, k, v, g: fn(q, k, v, bm)

        def run(q, k, v, g):
            # [B,H,T] fp32 prefix sums, inside the timing so that dg flows through them. The
            # clone keeps c_q and c_k distinct even where .contiguous() is a no-op (H = 1):
            # dynamo would merge aliased inputs into one buffer indexed twice.
            c_q = g.cumsum(1).transpose(1, 2).contiguous()
            return fn(q, k, v, bm, c_q, c_q.clone())
        return run
    return make


LOADERS = {
    "gfwagen": (load_gfwagen, True), "gfwagen-nogate": (load_gfwagen, False),
    "fla": (load_fla, True), "fla-nogate": (load_fla, False),
    "flex": (load_flex, True), "flex-nogate": (load_flex, False),
}


# ---------------------------------------------------------------------------- measurement
def make_inputs(s: Shape, dtype, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    rnd = lambda *shape, dt=dtype: torch.randn(*shape, generator=gen, device=DEVICE, dtype=dt)
    q, k, v = (rnd(s.B, s.T, s.H, s.D) for _ in range(3))
    # A forget gate mostly near 1, as trained FoX gates are: log_gate ~ -0.08 on average, in
    # (-1, 0) for over 99% of entries, so the bias decays across the window without vanishing.
    g = F.logsigmoid(rnd(s.B, s.T, s.H, dt=torch.float32) + 3.0)
    dout = rnd(s.B, s.T, s.H, s.D)
    for t in (q, k, v, g):
        t.requires_grad_(True)
    return q, k, v, g, dout


def check(f, gated, s, q, k, v, g, dout):
    """Max relative error (max|x - ref| / max|ref|) of o and of every gradient against the
    chunked fp32 reference of the contract, on these inputs."""
    from gfwagen.reference import reference_backward, reference_forward

    gate = g if gated else None
    inputs = (q, k, v, g) if gated else (q, k, v)
    o = f(q, k, v, g)
    grads = torch.autograd.grad(o, inputs, dout)
    with torch.no_grad():
        o_ref, lse = reference_forward(q, k, v, gate, window=s.W)
        refs = reference_backward(dout, q, k, v, o_ref, lse, gate, window=s.W)
    names, refs = ("o", "dq", "dk", "dv", "dg")[: len(grads) + 1], (o_ref, *refs)
    return {n: ((x.float() - r.float()).abs().max() / r.float().abs().max()).item()
            for n, x, r in zip(names, (o, *grads), refs[: len(names)], strict=True)}


def capture_graph(fn, launches=1) -> torch.cuda.CUDAGraph:
    """fn captured `launches` times back to back in a CUDA graph. fn runs once on a side
    stream before the capture, so that no lazy initialization or first allocation happens
    inside it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    return graph


def cuda_graph_ms(fn, rep=200, launches=1, warmup=25) -> float:
    """Median ms of fn replayed as a CUDA graph: GPU time without the host's launch costs.
    launches > 1 captures fn that many times back to back and returns the time per call: a
    short kernel's GPU time in a stream, its gap to the next kernel included, without the
    graph's own launch."""
    graph = capture_graph(fn, launches)
    return triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep,
                                   return_mode="median") / launches


def grad_step(f, q, k, v, g, dout, gated):
    """One forward+backward: autograd.grad on explicit inputs, so nothing accumulates between
    calls, and a gated contender that does not differentiate the gate fails here instead of
    looking fast."""
    inputs = (q, k, v, g) if gated else (q, k, v)
    return lambda: torch.autograd.grad(f(q, k, v, g), inputs, dout)


def fresh_leaves(q, k, v, g):
    """Copies of the inputs that no autograd graph has seen, for a capture. A leaf's gradient
    node remembers the stream it was made on; where the eager modes' node outlives them
    (kept by a reference cycle not yet collected), the captured backward syncs with the
    legacy stream and the capture fails ("operation would make the legacy stream depend on a
    capturing blocking stream": S2 in session 38, S1 in session 29)."""
    gc.collect()
    return tuple(t.detach().requires_grad_(t.requires_grad) for t in (q, k, v, g))


def fresh_leaves_step(f, q, k, v, g, dout, gated):
    """grad_step on fresh_leaves."""
    return grad_step(f, *fresh_leaves(q, k, v, g), dout, gated)


def time_modes(out, f, gated, modes, q, k, v, g, dout, warmup, rep):
    """Median ms per mode into out, filled as it goes so a later mode's OOM keeps the rest.
    A contender that cannot be captured in a CUDA graph gets the error's text for "graph"."""

    def fwd():
        return f(q, k, v, g)

    fwdbwd = grad_step(f, q, k, v, g, dout, gated)
    for mode in modes:
        fn = fwd if mode == "fwd" else fwdbwd
        for _ in range(2):  # compile / autotune outside the timed region
            fn()
        torch.cuda.synchronize()
        if mode == "graph":
            try:
                out[mode] = cuda_graph_ms(fresh_leaves_step(f, q, k, v, g, dout, gated),
                                          rep=rep, warmup=warmup)
            except Exception as e:  # e.g. a host sync inside the capture
                out[mode] = _error("capture", e)
                free_memory()
            continue
        out[mode] = triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def paired_ms(fa, fb, pairs_: int, flush_mb: int = 256) -> tuple[list, list]:
    """fa and fb called alternately, pairs_ times each (a b, then b a, and so on), each call
    timed as interleaved_ms times one. Each pair runs within a millisecond, on the same
    clocks: the rounds of do_bench, seconds apart, moved an unchanged kernel by up to 18% on
    the H200 (RESULTS.md, session 24), more than the gate's cost they were to measure.
    Returns both lists of ms."""
    for _ in range(3):
        fa(), fb()
    a, b = interleaved_ms([fa, fb], pairs_, flush_mb)
    return a, b


def interleaved_ms(fns: list, calls: int, flush_mb: int = 256) -> list[list[float]]:
    """Each of fns called `calls` times, in rounds whose order rotates (a b c, b c a, ...),
    each call timed as do_bench times one: the L2 flushed by zeroing flush_mb MB, then CUDA
    events around the call. Returns each fn's list of ms."""
    flush = torch.empty(flush_mb * 2**20 // 4, dtype=torch.int32, device=DEVICE)
    events = [[] for _ in fns]
    for i in range(calls):
        for j in range(len(fns)):
            n = (i + j) % len(fns)
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[n]()
            end.record()
            events[n].append((start, end))
    torch.cuda.synchronize()
    return [[a.elapsed_time(b) for a, b in ev] for ev in events]


def ratio_quartiles(a: list, b: list) -> tuple[float, float, float]:
    """The per-call ratios a / b of two timings taken call by call together (paired_ms,
    interleaved_ms): their first quartile, median and third quartile."""
    r = [x / y for x, y in zip(a, b, strict=True)]
    q1, _, q3 = statistics.quantiles(r, n=4)
    return q1, statistics.median(r), q3


def round_orders(contenders, rounds: int) -> list[list]:
    """The contenders' (or configs') order in each timing round: as given, then reversed, and
    so on. A kernel timed right after another runs slower on a GPU at its power cap (S4's
    forward: 4.4% for the ungated op timed second, RESULTS.md session 15), so each gets each
    end of the order."""
    return [list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for r in range(rounds)]


def _error(contender: str, e: Exception) -> str:
    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    print(f"  [error] {contender}: {msg}")
    traceback.print_exc(limit=3)
    return msg


def versions():
    v = {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0]}
    for dist in ("flash-linear-attention", "fla-core"):
        try:
            v[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:  # fla routes parallel_attn to TileLang on Hopper when tilelang + nvcc are present
        from fla.backends import _load_operation_registry

        active = _load_operation_registry("attn").get_active()
        v["fla_attn_backend"] = active.backend_type if active else "triton"
    except Exception as e:  # informational only: never fail the run over it
        v["fla_attn_backend"] = f"unknown ({type(e).__name__})"
    return v


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(RECORDED), help=f"subset of {','.join(SHAPES)}"
                   f" (default: the issue's {','.join(RECORDED)})")
    p.add_argument("--tiny", action="store_true", help="only B=1 T=256 H=2 D=64 W=64")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--check", action="store_true", help="compare o and grads to the reference")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--rounds", type=int, default=2,
                   help="timing rounds per shape, the contenders' order reversed each round; "
                   "each keeps its best (round_orders)")
    p.add_argument("--gate-pairs", type=int, default=0,
                   help="then time gfwagen's gated and ungated forwards this many times each, "
                        "call by call, alternating (paired_ms): the gate's cost per pair")
    p.add_argument("--flex-compile-mode", default=None,
                   help="torch.compile mode for flex, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--json", help="write all results to this path")
    p.add_argument("--markdown", help="append a results section to this file")
    p.add_argument("--devices", help="GPU indices, e.g. 0,1: the shapes shared out among one "
                   "process per GPU running at once (split_shapes), their results reported as "
                   "one run; each process compiles FlexAttention for itself")
    args = p.parse_args(argv)

    for opt, allowed in (("shapes", SHAPES), ("contenders", CONTENDERS), ("modes", MODES)):
        bad = set(getattr(args, opt).split(",")) - set(allowed)
        if bad and not (opt == "shapes" and args.tiny):
            p.error(f"--{opt}: unknown {','.join(sorted(bad))}; choose from {','.join(allowed)}")
    if args.rounds < 1:
        p.error(f"--rounds: expected 1 or more, got {args.rounds}")
    if args.gate_pairs < 0 or args.gate_pairs == 1:
        p.error(f"--gate-pairs: expected 0 (off) or 2 or more, got {args.gate_pairs}")
    shapes = TINY if args.tiny else {n: SHAPES[n] for n in args.shapes.split(",")}
    contenders, modes = args.contenders.split(","), args.modes.split(",")
    if args.devices:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        if not devices or not all(d.isdigit() for d in devices) or len(set(devices)) < len(devices):
            p.error(f"--devices: expected distinct GPU indices such as 0,1; got {args.devices!r}")
        return run_on_devices(args, shapes, contenders, devices)

    if not torch.cuda.is_available():
        sys.exit("bench.py: needs a CUDA GPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    makers, unavailable = {}, {}
    for c in contenders:
        loader, gated = LOADERS[c]
        try:
            extra = {"compile_mode": args.flex_compile_mode} if loader is load_flex else {}
            makers[c] = (loader(gated, **extra), gated)
        except Exception as e:  # any import problem means "not available"
            unavailable[c] = f"{type(e).__name__}: {e}"
            print(f"[unavailable] {c}: {unavailable[c]}")

    results, checks = [], []
    for name, s in shapes.items():
        print(f"\n== {name} {s._asdict()} {args.dtype} pairs={pairs(s.T, s.W)}", flush=True)
        q, k, v, g, dout = make_inputs(s, dtype)
        fns, failed = {}, {}
        for c, (make, gated) in makers.items():
            try:
                fns[c] = make(s)
                if args.check:
                    err = check(fns[c], gated, s, q, k, v, g, dout)
                    checks.append({"shape": name, "contender": c, **err})
                    print(f"  [check] {c:15s} " + " ".join(f"{n}={e:.2e}" for n, e in err.items()),
                          flush=True)
            except Exception as e:  # e.g. OOM: report it and go on with the next one
                failed[c] = _error(c, e)
                fns.pop(c, None)
        rounds = {c: {} for c in fns}
        uncaptured = {}  # contender -> why its forward+backward did not capture
        for rnd, order in enumerate(round_orders(list(fns), args.rounds)):
            for c in order:
                if c in failed:
                    continue
                ms = {}
                try:
                    time_modes(ms, fns[c], makers[c][1], modes, q, k, v, g, dout, args.warmup,
                               args.rep)
                except Exception as e:
                    failed[c] = _error(c, e)
                if isinstance(ms.get("graph"), str):
                    uncaptured[c] = ms.pop("graph")
                for mode, t in ms.items():
                    rounds[c].setdefault(mode, []).append(t)
                # as it comes: a run cut short by a time limit still leaves what it measured
                print(f"  [round {rnd + 1}] {c:15s} "
                      + "  ".join(f"{m} {t:.3f} ms" for m, t in ms.items()), flush=True)
        for c in makers:
            if c in failed:
                results.append({"shape": name, "contender": c, "mode": "error",
                                "error": failed[c]})
            ms = {mode: min(ts) for mode, ts in rounds.get(c, {}).items()}
            if "fwd" in ms and "fwdbwd" in ms:
                ms["bwd"] = ms["fwdbwd"] - ms["fwd"]
            for mode, t in ms.items():
                results.append({"shape": name, **s._asdict(), "dtype": args.dtype, "contender": c,
                                "mode": mode, "ms": t, "tflops": tflops(s, mode, t),
                                "rounds_ms": rounds[c].get(mode)})
            if c in uncaptured:
                results.append({"shape": name, "contender": c, "mode": "graph-error",
                                "error": uncaptured[c]})
            line = "  ".join(f"{m} {ms[m]:8.3f} ms {tflops(s, m, ms[m]):6.1f} TF/s"
                             for m in ("fwd", "bwd", "fwdbwd", "graph") if m in ms)
            if ms:
                print(f"  {c:15s} {line}", flush=True)
        if args.gate_pairs and "fwd" in modes and {"gfwagen", "gfwagen-nogate"} <= set(fns) \
                and not {"gfwagen", "gfwagen-nogate"} & set(failed):
            results.extend(gate_pairs(fns, q, k, v, g, name, args.gate_pairs))
        fns = None
        free_memory()
        del q, k, v, g, dout
        free_memory()

    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(), "command": shlex.join(sys.argv),
            "versions": versions(), "dtype": args.dtype, "unavailable": unavailable,
            "shapes": {n: s._asdict() for n, s in shapes.items()}}
    report(results, checks, list(shapes), list(makers), meta, args.json, args.markdown)


def gate_pairs(fns, q, k, v, g, name, n) -> list[dict]:
    """gfwagen's gated forward against its ungated one, n paired calls (paired_ms): eager,
    then each forward replayed from a CUDA graph. Eager pairs include the host's time to
    issue each call wherever it exceeds the L2 flush before it (S5's gated forward took 0.31
    ms of host time on session 44's host before TVM's launches were planned, more than its
    kernels' 0.25 ms), so the graph pairs are the kernels' own cost of the gate, its records'
    launch included."""
    def eager():
        return [lambda c=c: fns[c](q, k, v, g) for c in ("gfwagen", "gfwagen-nogate")]

    def replays():
        graphs = []
        for c in ("gfwagen", "gfwagen-nogate"):
            leaves = fresh_leaves(q, k, v, g)  # recording autograd, as the timed forward does
            graphs.append(capture_graph(lambda c=c, x=leaves: fns[c](*x)).replay)
        return graphs

    out = []
    for mode, make in (("fwd-paired", eager), ("fwd-paired-graph", replays)):
        try:
            fa, fb = make()
        except Exception as e:  # a host sync inside the capture
            print(f"  [gate pairs] {mode}: {_error('capture', e)}", flush=True)
            free_memory()
            continue
        gated, plain = paired_ms(fa, fb, n)
        ratios = [a / b for a, b in zip(gated, plain, strict=True)]
        print(f"  [gate pairs, {mode}] {n} each: gated {statistics.median(gated):.4f} ms, "
              f"ungated {statistics.median(plain):.4f} ms (medians), gated / ungated per "
              f"pair: median {statistics.median(ratios):.4f}", flush=True)
        out.append({"shape": name, "contender": "gfwagen", "mode": mode, "ratios": ratios,
                    "gated_ms": gated, "ungated_ms": plain})
    return out


def split_shapes(shapes: dict, n: int) -> list[list[str]]:
    """The shapes shared out among n processes: each, largest first, to the least loaded
    (forward+backward FLOPs as the load); empty shares dropped."""
    loads, shares = [0.0] * n, [[] for _ in range(n)]
    for name in sorted(shapes, key=lambda k: -flops(shapes[k], "fwdbwd")):
        i = loads.index(min(loads))
        shares[i].append(name)
        loads[i] += flops(shapes[name], "fwdbwd")
    return [sh for sh in shares if sh]


def merge_runs(runs: list[dict], command: str) -> dict:
    """One run's JSON ({"meta", "results", "checks"}) from several processes' runs."""
    metas = [r["meta"] for r in runs]
    meta = {"date": min(m["date"] for m in metas),
            "gpu": " + ".join(sorted({m["gpu"] for m in metas})), "command": command,
            "versions": metas[0]["versions"], "dtype": metas[0]["dtype"],
            "unavailable": {c: msg for m in metas for c, msg in m["unavailable"].items()},
            "shapes": {n: sh for m in metas for n, sh in m["shapes"].items()}}
    return {"meta": meta, "results": [x for r in runs for x in r["results"]],
            "checks": [x for r in runs for x in r["checks"]]}


def run_on_devices(args, shapes, contenders, devices) -> int:
    """This command once per GPU (CUDA_VISIBLE_DEVICES), each on its share of the shapes, all
    at once; their output in turn, then one report. 1 if any process failed."""
    common = ["--contenders", args.contenders, "--modes", args.modes, "--dtype", args.dtype,
              "--warmup", str(args.warmup), "--rep", str(args.rep),
              "--rounds", str(args.rounds), "--gate-pairs", str(args.gate_pairs)]
    common += ["--check"] if args.check else []
    common += ["--tiny"] if args.tiny else []
    if args.flex_compile_mode:
        common += ["--flex-compile-mode", args.flex_compile_mode]
    shares = split_shapes(shapes, len(devices))
    runs, failed = [], []
    with tempfile.TemporaryDirectory(prefix="gfwagen-bench-") as tmp:
        procs = []
        for dev, share in zip(devices, shares, strict=False):
            out, log = Path(tmp, f"cuda{dev}.json"), Path(tmp, f"cuda{dev}.log")
            cmd = [sys.executable, str(Path(__file__).resolve()), *common,
                   "--shapes", ",".join(share), "--json", str(out)]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": dev}
            print(f"[cuda:{dev}] {','.join(share)}", flush=True)
            with open(log, "w") as fh:
                procs.append((dev, out, log, subprocess.Popen(cmd, env=env, stdout=fh,
                                                              stderr=subprocess.STDOUT)))
        try:
            for dev, out, log, proc in procs:
                rc = proc.wait()
                print(f"\n---- cuda:{dev} (exit {rc})\n" + log.read_text(), flush=True)
                if rc != 0 or not out.exists():
                    failed.append(dev)
                if out.exists():
                    runs.append(json.loads(out.read_text()))
        finally:  # interrupted: no process left running on a GPU
            for *_, proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    if runs:
        run = merge_runs(runs, shlex.join(sys.argv))
        available = [c for c in contenders if c not in run["meta"]["unavailable"]]
        report(run["results"], run["checks"], list(shapes), available, run["meta"], args.json,
               args.markdown)
    if failed:
        print(f"bench.py: failed on GPU {', '.join(failed)} (output above)", file=sys.stderr)
        return 1
    return 0


def report(results, checks, shape_names, contenders, meta, json_path=None, md_path=None):
    """The summary table on stdout; all results as JSON and a markdown section, if asked."""
    headers, rows = summary_rows(results, shape_names, contenders)
    print("\nTFLOP/s (in-window pairs; f+b = forward+backward)\n" + format_table(headers, rows))
    cost_headers, cost_rows = gate_cost_rows(results, shape_names)
    if cost_rows:
        print("\nThe gate's cost in gfwagen's forward\n" + format_table(cost_headers, cost_rows))
    graph_headers, graph_rows_ = graph_rows(results, shape_names)
    if graph_rows_:
        print("\nForward+backward replayed from a CUDA graph (no host time)\n"
              + format_table(graph_headers, graph_rows_))
    if json_path:
        Path(json_path).write_text(json.dumps(
            {"meta": meta, "results": results, "checks": checks}, indent=1))
    if md_path:
        detail = [[r["shape"], r["contender"], r["mode"], f"{r['ms']:.3f}", r["tflops"]]
                  for r in results if "ms" in r]
        errors = [f"- {r['shape']} {r['contender']} ({r['mode']}): {r['error']}"
                  for r in results if "error" in r]
        vers = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        section = [f"## {meta['date']} on {meta['gpu']}", "", f"{vers}; {meta['dtype']}", "",
                   f"`{meta['command']}`", "", format_table(headers, rows, markdown=True), "",
                   *([format_table(cost_headers, cost_rows, markdown=True), ""] if cost_rows
                     else []),
                   *([format_table(graph_headers, graph_rows_, markdown=True), ""]
                     if graph_rows_ else []),
                   format_table(["shape", "contender", "mode", "ms", "TFLOP/s"], detail,
                                markdown=True)]
        section += [""] + errors if errors else []
        section += [f"- unavailable: {c}: {m}" for c, m in meta["unavailable"].items()]
        with open(md_path, "a") as fh:
            fh.write("\n".join(section) + "\n\n")


if __name__ == "__main__":
    sys.exit(main())
