"""Decode kernel bandwidth: gfwagen.decode.decode_attention (Triton, split-K over the ring) as a
fraction of HBM bandwidth.

    PYTHONPATH=$PWD python benchmarks/decode_bench.py              # B=64 Hq=32 Hkv=8 W=4096 D=128
    PYTHONPATH=$PWD python benchmarks/decode_bench.py --quick --graph

One new token per sequence (S=1 by default) over a full, wrapped ring of W slots, gated. Bytes
moved: the K and V rings read once (2*B*W*Hkv*D*elt), plus q, k_new, v_new, out and the gate
state (c_ring [B, W, Hq] and c_new, float32); the split partials are not counted (they are
overhead). Time: triton.testing.do_bench median of the whole op (split kernel + combine), with
workspace and output preallocated; --graph also times a CUDA-graph replay of one call.
Reports GB/s and the % of --peak-tbs (4.3 TB/s: the copy bandwidth measured on this
workplace's H200). Sweeps n_splits x block_n x num_warps x num_stages.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--window", type=int, default=4096, help="W; the ring has W slots")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--s", type=int, default=1, help="new tokens per sequence")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--no-gate", action="store_true", help="plain sliding window (no c state)")
    p.add_argument("--gate-f64", action="store_true",
                   help="float64 absolute gate state [B, W, Hq] (as GatedFWACache keeps it) "
                        "instead of float32 relative")
    p.add_argument("--layout", choices=["bwhd", "bhwd"], default="bhwd",
                   help="ring storage: [B, W, Hkv, D] (as GatedFWACache) or kv-head-major "
                        "[B, Hkv, W, D] (each head's W x D slab contiguous; the float32 gate "
                        "state then [B, Hq, W])")
    p.add_argument("--splits", default="0,1,2,4,8,16,32",
                   help="n_splits to sweep (0: the default heuristic)")
    p.add_argument("--block-n", default="32,64,128")
    p.add_argument("--num-warps", default="4,8")
    p.add_argument("--num-stages", default="2,3")
    p.add_argument("--quick", action="store_true",
                   help="only the default config and n_splits sweep at block_n=64, 4 warps")
    p.add_argument("--graph", action="store_true", help="also time a CUDA-graph replay")
    p.add_argument("--peak-tbs", type=float, default=4.3, help="HBM copy bandwidth, TB/s")
    p.add_argument("--no-check", action="store_true", help="skip the check against torch")
    return p.parse_args(argv)


def make_inputs(a, device):
    dt = DTYPES[a.dtype]
    B, S, Hq, Hkv, D, W = a.B, a.s, a.hq, a.hkv, a.d, a.window
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, dtype=dt):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    q, k_new, v_new = rnd(B, S, Hq, D), rnd(B, S, Hkv, D), rnd(B, S, Hkv, D)
    if a.layout == "bhwd":
        k_ring = rnd(B, Hkv, W, D).transpose(1, 2)
        v_ring = rnd(B, Hkv, W, D).transpose(1, 2)
    else:
        k_ring, v_ring = rnd(B, W, Hkv, D), rnd(B, W, Hkv, D)
    # a full, wrapped ring at different lengths per sequence
    seqlens = (10 * W + torch.arange(B, device=device) * 37).to(torch.int32)
    c_ring = c_new = None
    if not a.no_gate:
        lg = torch.nn.functional.logsigmoid(rnd(B, W + S, Hq, dtype=torch.float32) + 4.0)
        c = torch.cumsum(lg, 1)
        if a.gate_f64:
            c = c.double() - 1e5  # a long past
            c_ring, c_new = c[:, :W].contiguous(), c[:, W:].contiguous()
        else:
            c_ring, c_new = c[:, :W] - c[:, W - 1:W], (c[:, W:] - c[:, W - 1:W]).contiguous()
            if a.layout == "bhwd":
                c_ring = c_ring.transpose(1, 2).contiguous().transpose(1, 2)
            else:
                c_ring = c_ring.contiguous()
    return q, k_new, v_new, k_ring, v_ring, seqlens, c_ring, c_new


def bytes_moved(a) -> int:
    elt = DTYPES[a.dtype].itemsize
    B, S, Hq, Hkv, D, W = a.B, a.s, a.hq, a.hkv, a.d, a.window
    n = 2 * B * W * Hkv * D * elt  # K and V rings
    n += B * S * (2 * Hq + 2 * Hkv) * D * elt  # q, out, k_new, v_new
    if not a.no_gate:
        n += (B * W * Hq + B * S * Hq) * (8 if a.gate_f64 else 4)  # c_ring, c_new
    return n + B * 4  # seqlens


def main(argv=None) -> int:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_bench needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton.testing

    from gfwagen.decode import (
        decode_attention,
        decode_attention_torch,
        decode_workspace,
        default_n_splits,
    )

    dev = torch.device("cuda")
    inputs = make_inputs(a, dev)
    q, k_new, v_new, k_ring, v_ring, seqlens, c_ring, c_new = inputs
    B, S, Hq, D = q.shape
    Hkv, W = a.hkv, a.window
    nbytes = bytes_moved(a)
    print(f"{torch.cuda.get_device_name()}: B={B} S={S} Hq={Hq} Hkv={Hkv} W={W} D={D} "
          f"{a.dtype} gate={'off' if a.no_gate else ('f64' if a.gate_f64 else 'f32')} "
          f"layout={a.layout}; {nbytes / 1e9:.3f} GB per call; "
          f"default n_splits={default_n_splits(B, Hkv, W, dev)}")

    if not a.no_check:
        nb = min(B, 4)
        sl = [t[:nb] if t is not None else None for t in inputs]
        ref = decode_attention_torch(*sl, window=W)
        got = decode_attention(*sl, window=W, backend="triton")
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"check vs torch ({nb} sequences): rel err {err:.2e}")
        if err > 2e-2:
            print("CHECK FAILED", file=sys.stderr)
            return 2

    out = torch.empty_like(q)
    if a.quick:
        configs = [(s, 64, 4, 2) for s in _ints(a.splits)]
    else:
        configs = list(itertools.product(_ints(a.splits), _ints(a.block_n),
                                         _ints(a.num_warps), _ints(a.num_stages)))
    print(f"{'n_splits':>8} {'block_n':>7} {'warps':>5} {'stages':>6} {'us':>9} {'GB/s':>8} "
          f"{'%peak':>6}" + (f" {'graph us':>9} {'%peak':>6}" if a.graph else ""))
    best = None
    for ns, bn, nw, st in configs:
        n = ns or default_n_splits(B, Hkv, W, dev, bn)
        if n > math.ceil(W / bn):
            continue
        ws = decode_workspace(B, S, Hq, Hkv, D, n, dev)

        def fn(n=n, bn=bn, nw=nw, st=st, ws=ws):
            return decode_attention(q, k_new, v_new, k_ring, v_ring, seqlens, c_ring, c_new,
                                    window=W, backend="triton", n_splits=n, block_n=bn,
                                    num_warps=nw, num_stages=st, out=out, workspace=ws)

        try:
            fn()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        except Exception as e:  # e.g. out of shared memory for a large tile
            print(f"{n:>8} {bn:>7} {nw:>5} {st:>6}  failed: {type(e).__name__}: {e}"[:200])
            continue
        gbs = nbytes / (ms * 1e-3) / 1e9
        pct = 100 * gbs / (a.peak_tbs * 1e3)
        line = f"{n:>8} {bn:>7} {nw:>5} {st:>6} {ms * 1e3:>9.1f} {gbs:>8.0f} {pct:>6.1f}"
        if a.graph:
            from bench import cuda_graph_ms

            gms = cuda_graph_ms(fn)
            gpct = 100 * nbytes / (gms * 1e-3) / 1e9 / (a.peak_tbs * 1e3)
            line += f" {gms * 1e3:>9.1f} {gpct:>6.1f}"
            pct = max(pct, gpct)
        print(line, flush=True)
        if best is None or pct > best[0]:
            best = (pct, n, bn, nw, st)
    if best is not None:
        pct, n, bn, nw, st = best
        print(f"best: {pct:.1f}% of {a.peak_tbs} TB/s at n_splits={n} block_n={bn} "
              f"num_warps={nw} num_stages={st} (target >= 70%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
