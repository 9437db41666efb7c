"""The gate's prefix sums and gate gradient: the torch functions (gfwagen.gate) against the fused
Triton kernels (gfwagen.gate_sums), on a CUDA GPU.

    PYTHONPATH=$PWD python benchmarks/gate_sums_bench.py                 # S1/S5-like and 2^20
    PYTHONPATH=$PWD python benchmarks/gate_sums_bench.py --splits 1,4,16,64,256 --graph

Shapes (B, T, H): 8x4096x16 (the attention at S1/S5 takes ~0.5 ms) and 1x2^20x16. For each:
forward (log_gate fp32 -> local, base with the backend's spare entry), backward (row/col sums
float32 -> dlog_gate) and backward with packed sequences (seg_end of 1 + T // 1000 sequences of
random lengths). Time: triton.testing.do_bench median, ms (launch overhead included: the
fused kernels mainly save launches); --graph also times a CUDA-graph replay (GPU time alone).
Every fused result is checked against the torch one first. --splits sweeps the fused kernels'
split count (default: their own choice).
"""

from __future__ import annotations

import argparse
import sys

import torch

from gfwagen.gate import GATE_CHUNK, chunked_prefix_sums, gate_grad_from_sums
from gfwagen.gate_sums import chunked_prefix_sums_fused, gate_grad_from_sums_fused
from gfwagen.varlen import segment_bounds

SHAPES = [(8, 4096, 16), (1, 1 << 20, 16)]


def _torch_fwd(lg):
    local, base = chunked_prefix_sums(lg, GATE_CHUNK)
    return local, torch.nn.functional.pad(base, (0, 1)).contiguous()


def _time(fn, graph, rep):
    import triton

    fn()
    ms = triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")
    if not graph:
        return ms, None
    from bench import cuda_graph_ms

    return ms, cuda_graph_ms(fn, rep)


def _cases(B, T, H, gen):
    lg = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda", generator=gen) + 3)
    sums = torch.randn(2, B, H, T, device="cuda", generator=gen)
    row, col = sums[0], sums[1]
    n = 1 + T // 1000
    cuts = torch.randint(0, T + 1, (n - 1,), device="cuda", generator=gen).sort().values
    cu = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), T)])
    _, seg_end = segment_bounds(cu, T)
    return {
        "fwd": (lambda: _torch_fwd(lg), lambda s: chunked_prefix_sums_fused(lg, spare=1, splits=s)),
        "bwd": (
            lambda: gate_grad_from_sums(row, col),
            lambda s: gate_grad_from_sums_fused(row, col, splits=s),
        ),
        "bwd-varlen": (
            lambda: gate_grad_from_sums(row, col, seg_end),
            lambda s: gate_grad_from_sums_fused(row, col, seg_end, splits=s),
        ),
    }


def _check(ref, got, name):
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = got if isinstance(got, tuple) else (got,)
    for r, g in zip(ref, got):
        r, g = r.double(), g.double()
        err = ((r - g).abs().max() / r.abs().max().clamp_min(1e-30)).item()
        if not err <= 1e-6:
            raise SystemExit(f"{name}: fused differs from torch (max rel {err:.2e})")


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--splits", default="", help="comma-separated split counts (default: auto)")
    p.add_argument("--graph", action="store_true", help="also time CUDA-graph replays")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--shapes", default="", help="BxTxH,... (default: 8x4096x16,1x1048576x16)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    shapes = (
        [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
        if args.shapes
        else SHAPES
    )
    splits = [int(s) for s in args.splits.split(",") if s] or [None]
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}")
    print("| B x T x H | pass | torch ms | splits | fused ms | speedup | torch graph | fused graph")
    print("|---|---|---|---|---|---|---|---")
    for B, T, H in shapes:
        for name, (ref_fn, fused_fn) in _cases(B, T, H, gen).items():
            t_ms, t_g = _time(ref_fn, args.graph, args.rep)
            ref = ref_fn()
            for s in splits:
                _check(ref, fused_fn(s), f"{B}x{T}x{H} {name} splits={s}")
                f_ms, f_g = _time(lambda f=fused_fn, s=s: f(s), args.graph, args.rep)
                g = f"{t_g:.4f} | {f_g:.4f}" if args.graph else "- | -"
                print(
                    f"| {B}x{T}x{H} | {name} | {t_ms:.4f} | {s or 'auto'} | {f_ms:.4f} | "
                    f"{t_ms / f_ms:.2f}x | {g}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
