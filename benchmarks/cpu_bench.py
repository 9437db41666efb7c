#!/usr/bin/env python3
"""CPU timing of GatedFWA: the TVM llvm backend (best of a small config sweep), the chunked
torch reference and FlexAttention under torch.compile, forward and forward+backward, fp32,
gated, on the same inputs.

    python benchmarks/cpu_bench.py                     # B=1 H=8 T=4096 W=512 D=64
    python benchmarks/cpu_bench.py --T 1024 --reps 3 --no-flex

Every contender uses all cores (torch.set_num_threads, TVM_NUM_THREADS; --threads to change).
Times are wall-clock (--cpu-time: process CPU time) medians of --reps runs after --warmup runs
(min also shown). TFLOP/s count in-window pairs only (GATEDFWA.md section 1): pairs =
T*W - W*(W-1)/2, fwd = 4*B*H*D*pairs, bwd = 2.5 x fwd, so fwd+bwd = 3.5 x fwd.
Forward+backward of every contender yields dq, dk, dv and dlog_gate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gfwagen.reference import reference_backward, reference_forward  # noqa: E402
from gfwagen.spec import KernelConfig  # noqa: E402

NCORES = os.cpu_count() or 1
CLOCK = time.perf_counter

# (block_m, block_n, rm, vn): the TVM sweep. rm x vn is the register accumulator of the
# micro-kernel (rm rows, vn fp32 columns).
SWEEP = [(32, 64, 4, 64), (64, 32, 4, 64), (64, 64, 4, 64), (32, 32, 4, 32), (64, 64, 8, 32)]


def pairs(T, W):
    return T * W - W * (W - 1) // 2 if W < T else T * (T + 1) // 2


def timeit(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
    return statistics.median(ts), min(ts)


def make_inputs(B, T, H, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, T, H, D, generator=g) for _ in range(4))
    lg = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=g) + 3.0)
    return q, k, v, do, lg


def tvm_runs(q, k, v, do, lg, W, cfg):
    from gfwagen.backends.tvm_backend import tvm_backward, tvm_forward

    def fwd():
        return tvm_forward(q, k, v, lg, W, None, config=cfg)

    def fwd_bwd():
        o, lse = tvm_forward(q, k, v, lg, W, None, config=cfg)
        return tvm_backward(do, q, k, v, o, lse, lg, W, None, config=cfg)
    return fwd, fwd_bwd


def reference_runs(q, k, v, do, lg, W):
    def fwd():
        return reference_forward(q, k, v, lg, W, None)

    def fwd_bwd():
        o, lse = reference_forward(q, k, v, lg, W, None)
        return reference_backward(do, q, k, v, o, lse, lg, W, None)
    return fwd, fwd_bwd


def flex_runs(q, k, v, do, lg, W):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 1024)

    def attn(q, k, v, block_mask, c_q, c_k):
        # c_q, c_k: the same prefix sums as two tensors, each indexed once (GATEDFWA.md 6)
        def gate_bias(score, b, h, q_idx, kv_idx):
            return score + (c_q[b, h, q_idx] - c_k[b, h, kv_idx])

        o = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           score_mod=gate_bias, block_mask=block_mask)
        return o.transpose(1, 2)

    fn = torch.compile(attn, dynamic=False)
    T = q.shape[1]

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < W)

    bm = create_block_mask(sliding_window, None, None, T, T, device="cpu")

    def run(q, k, v, g):
        c_q = g.cumsum(1).transpose(1, 2).contiguous()
        return fn(q, k, v, bm, c_q, c_q.clone())

    def fwd():
        with torch.no_grad():
            return run(q, k, v, lg)

    leaves = [x.detach().requires_grad_(True) for x in (q, k, v, lg)]

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        o = run(*leaves)
        o.backward(do)
        return [x.grad for x in leaves]
    return fwd, fwd_bwd


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--W", type=int, default=512)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sweep-reps", type=int, default=3, help="reps per config in the sweep")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--threads", type=int, default=NCORES, help="torch and TVM threads")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with process CPU time instead of wall time (robust on a loaded "
                        "machine when --threads 1)")
    a = p.parse_args()
    global CLOCK
    if a.cpu_time:
        CLOCK = time.process_time
    os.environ["TVM_NUM_THREADS"] = str(a.threads)  # tvm is imported later, in tvm_runs
    torch.set_num_threads(a.threads)
    B, T, H, D, W = a.B, a.T, a.H, a.D, a.W
    q, k, v, do, lg = make_inputs(B, T, H, D)
    fl = 4 * B * H * D * pairs(T, W)
    print(f"B={B} H={H} T={T} W={W} D={D} fp32 gated; cores={NCORES} torch threads="
          f"{torch.get_num_threads()} TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']} "
          f"clock={'process CPU time' if a.cpu_time else 'wall'}")
    rows = []  # (name, fwd (med, min), fwd+bwd (med, min), note)

    # --- TVM: sweep, then the best config (by median) timed like the others
    try:
        best = {}
        for bm, bn, rm, vn in SWEEP:
            cfg = KernelConfig(bm, bn, 1, 1, (("rm", rm), ("vn", vn)))
            f, fb = tvm_runs(q, k, v, do, lg, W, cfg)
            tf = timeit(f, a.sweep_reps, 1)[0]
            tfb = timeit(fb, a.sweep_reps, 1)[0]
            print(f"  tvm sweep bm={bm} bn={bn} rm={rm} vn={vn}: fwd {tf * 1e3:7.1f} ms  "
                  f"fwd+bwd {tfb * 1e3:7.1f} ms")
            for key, t in (("fwd", tf), ("fb", tfb)):
                if key not in best or t < best[key][0]:
                    best[key] = (t, cfg, (bm, bn, rm, vn))
        f, _ = tvm_runs(q, k, v, do, lg, W, best["fwd"][1])
        _, fb = tvm_runs(q, k, v, do, lg, W, best["fb"][1])
        note = "fwd cfg bm,bn,rm,vn={} ; fwd+bwd cfg={}".format(best["fwd"][2], best["fb"][2])
        rows.append(("tvm (llvm)", timeit(f, a.reps, a.warmup), timeit(fb, a.reps, a.warmup),
                     note))
    except Exception:
        traceback.print_exc()
        rows.append(("tvm (llvm)", None, None, "failed"))

    f, fb = reference_runs(q, k, v, do, lg, W)
    rows.append(("torch reference", timeit(f, a.reps, a.warmup), timeit(fb, a.reps, a.warmup),
                 "gfwagen.reference (chunked)"))

    if not a.no_flex:
        f, fb = flex_runs(q, k, v, do, lg, W)
        try:
            tf = timeit(f, a.reps, a.warmup)
        except Exception as e:
            traceback.print_exc()
            rows.append(("flex (compiled)", None, None, f"fwd failed: {type(e).__name__}"))
        else:
            try:
                tfb = timeit(fb, a.reps, a.warmup)
                note = "torch.compile(flex_attention), block mask"
            except Exception as e:  # torch 2.13: "FlexAttention does not support backward on CPU"
                print(f"flex fwd+bwd: {type(e).__name__}: {e}")
                tfb = None
                note = "forward only: no flex backward on CPU"
            rows.append(("flex (compiled)", tf, tfb, note))

    def cell(t, mult):
        if t is None:
            return f"{'n/a':>22}"
        return f"{t[0] * 1e3:8.1f} ({t[1] * 1e3:6.1f}) {mult * fl / t[0] / 1e12:5.3f}"

    print()
    print(f"{'contender':<18} {'fwd ms med (min) TFLOP/s':>26} "
          f"{'fwd+bwd ms med (min) TFLOP/s':>30}")
    for name, tf, tfb, note in rows:
        print(f"{name:<18} {cell(tf, 1):>26} {cell(tfb, 3.5):>30}   {note}")
    ref = rows[1]
    for name, tf, tfb, _ in rows:
        if name != ref[0] and tf is not None:
            s = f"{name}: fwd {ref[1][0] / tf[0]:.2f}x"
            if tfb is not None:
                s += f", fwd+bwd {ref[2][0] / tfb[0]:.2f}x"
            print(s + " vs the torch reference (median)")


if __name__ == "__main__":
    main()
