#!/usr/bin/env python3
"""Does Triton's warp specialization (`tl.range(..., warp_specialize=True)`) give a correct,
faster gated window forward on Hopper? A probe, not a template: the window forward reduced to
one loop (every tile masked, the gate through a 1-D tensor descriptor: the two forms Triton
3.6's pass accepts, RESULTS.md session 16), built with and without the pass, each output
compared with a float64 reference on the last rows and timed at S4.

    python benchmarks/ws_probe.py --offline     # which variants the pass specializes (no GPU)
    python benchmarks/ws_probe.py               # on the GPU: error and time per variant

Rerun it after a Triton upgrade: the templates should take the knob once the specialized
kernels match the reference.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def probe_fwd(Q, K, V, C, O, T, H, W, qk_scale, BM: tl.constexpr, BN: tl.constexpr,
              D: tl.constexpr, WS: tl.constexpr, GATED: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    row = H * D
    base = (bh // H).to(tl.int64) * T * row + (bh % H) * D
    qd = tl.make_tensor_descriptor(Q + base, shape=[T, D], strides=[row, 1], block_shape=[BM, D])
    kd = tl.make_tensor_descriptor(K + base, shape=[T, D], strides=[row, 1], block_shape=[BN, D])
    vd = tl.make_tensor_descriptor(V + base, shape=[T, D], strides=[row, 1], block_shape=[BN, D])
    # A pointer load of the gate in the loop trips the pass (WSLowerToken.cpp:73).
    cd = tl.make_tensor_descriptor(C + bh.to(tl.int64) * T, shape=[T], strides=[1],
                                   block_shape=[BN])
    m0 = pid * BM
    offs_m = m0 + tl.arange(0, BM)
    q = qd.load([m0, 0])
    m = tl.full([BM], float("-inf"), tl.float32)
    l_sum = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    # One loop: a second loop in the kernel (the templates' edge and diagonal phases) makes
    # the pass fail (Dominance.cpp:256).
    for n0 in tl.range(tl.maximum(m0 - W, 0) // BN * BN, m0 + BM, BN, warp_specialize=WS):
        s = tl.dot(q, tl.trans(kd.load([n0, 0])))
        if GATED:  # gate sums in log2 units, brought to the products' units
            s -= (cd.load([n0]) / qk_scale)[None, :]
        offs_n = n0 + tl.arange(0, BN)
        ok = (offs_n[None, :] > offs_m[:, None] - W) & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - (shift * qk_scale)[:, None])
        alpha = tl.math.exp2((m - shift) * qk_scale)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), vd.load([n0, 0]))
        m = m_new
    od = tl.make_tensor_descriptor(O + base, shape=[T, D], strides=[row, 1], block_shape=[BM, D])
    od.store([m0, 0], (acc / l_sum[:, None]).to(tl.bfloat16))


VARIANTS = [  # block_m, block_n, num_warps, num_stages, warp_specialize
    (128, 128, 8, 3, False), (128, 128, 4, 2, True), (128, 64, 8, 3, False),
    (128, 64, 4, 3, True), (64, 64, 4, 3, False),
]
CONSTEXPRS = ("BM", "BN", "D", "WS", "GATED")


def offline() -> None:
    from triton.backends.compiler import GPUTarget

    names = ["Q", "K", "V", "C", "O", "T", "H", "W", "qk_scale", *CONSTEXPRS]
    types = ["*bf16"] * 3 + ["*fp32", "*bf16", "i32", "i32", "i32", "fp32"]
    types += ["constexpr"] * len(CONSTEXPRS)
    for gated in (False, True):
        for bm, bn, nw, ns, ws in VARIANTS:
            values = dict(zip(CONSTEXPRS, (bm, bn, 128, ws, gated), strict=True))
            src = triton.compiler.ASTSource(
                fn=probe_fwd, signature=dict(zip(names, types, strict=True)),
                constexprs={(names.index(k),): v for k, v in values.items()})
            label = f"gated={gated} {bm}x{bn} w{nw} s{ns} ws={ws}"
            try:
                out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                     options=dict(num_warps=nw, num_stages=ns))
            except Exception as e:  # the pass's assertion arrives as a RuntimeError
                print(f"{label}: does not build ({type(e).__name__})", flush=True)
                continue
            print(f"{label}: {out.metadata.num_warps} warps, specialized "
                  f"{'setmaxnreg' in out.asm['ptx']}", flush=True)


def reference_rows(q, k, v, c, W, start, stop):
    """float64 outputs of batch 0's rows [start, stop), every head."""
    lo, H = max(start - W + 1, 0), q.shape[2]
    qs, ks, vs = (x[0, a:stop].double().transpose(0, 1)
                  for x, a in ((q, start), (k, lo), (v, lo)))
    s = qs @ ks.transpose(1, 2) * q.shape[-1] ** -0.5
    s = s + (c[:H, start:stop].double() / LOG2E)[:, :, None]
    s = s - (c[:H, lo:stop].double() / LOG2E)[:, None, :]
    i = torch.arange(start, stop, device=q.device)[:, None]
    j = torch.arange(lo, stop, device=q.device)[None, :]
    s = s.masked_fill(~((j <= i) & (j > i - W)), float("-inf"))
    return (torch.softmax(s, -1) @ vs).transpose(0, 1)


def gpu() -> None:
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                 device="cuda"))
    B, T, H, D, W = 2, 16384, 16, 128, 4096  # S4
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    # gate prefix sums in log2 units, as the op's tables hold them
    c = (torch.log(torch.sigmoid(torch.randn(B * H, T, device="cuda") + 4)) * LOG2E).cumsum(1)
    start = T - 256
    refs = {g: reference_rows(q, k, v, c if g else torch.zeros_like(c), W, start, T)
            for g in (False, True)}
    for gated in (False, True):
        for bm, bn, nw, ns, ws in VARIANTS:
            o = torch.zeros_like(q)

            def run(bm=bm, bn=bn, nw=nw, ns=ns, ws=ws, o=o, gated=gated):
                probe_fwd[(T // bm, B * H)](q, k, v, c, o, T, H, W, D ** -0.5 * LOG2E, BM=bm,
                                            BN=bn, D=D, WS=ws, GATED=gated, num_warps=nw,
                                            num_stages=ns)
            label = f"gated={gated} {bm}x{bn} w{nw} s{ns} ws={ws}"
            try:
                run()
                ms = min(triton.testing.do_bench(run, warmup=25, rep=100) for _ in range(2))
            except Exception as e:
                print(f"{label}: failed ({type(e).__name__}: {str(e)[:120]})", flush=True)
                continue
            ref = refs[gated]
            err = ((o[0, start:].double() - ref).norm() / ref.norm()).item()
            print(f"{label}: {ms:.3f} ms, error against float64 {err:.1e}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--offline", action="store_true", help="compile for sm_90 only, no GPU")
    args = p.parse_args(argv)
    if args.offline:
        offline()
    elif not torch.cuda.is_available():
        sys.exit("ws_probe.py: needs a CUDA GPU (or --offline)")
    else:
        gpu()
    return 0


if __name__ == "__main__":
    sys.exit(main())
