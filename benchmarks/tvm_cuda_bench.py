"""TVM's CUDA forward (templates/tvm/fwd_cuda.py, tensor cores) against the Triton backend at
S1-S5, bf16, gated, in one process: each TVM tile config, the best of them, and Triton as the
op runs it (the shipped tuned config). Also the TVM backward (CUDA cores) at the smallest
shape, for the record. Forward only is the issue's bar (within 1.5x of Triton).

    python benchmarks/tvm_cuda_bench.py [--shapes S1,S5] [--configs new|old|all|best] [--plain]
                                        [--json out.json]

Configs (--configs): "new" (default) is the default tile, S5's best of the earlier runs, and
the tiles with two 16-row blocks per warp (warp_m = 2) or Q staged in shared memory
(q_smem); "old" the eight tiles of the earlier runs (benchmarks/RESULTS.md); "all" both;
"best" the fastest of session 5 for the shape's head dim only (quick A/B of two template
versions: run twice with GFWAGEN_TEMPLATES); "sub64" adds, at D = 128, the wide tile with
64-key softmax steps (one rescale and one Q read per tile); "wgmma" adds the warpgroup-MMA
template's tiles (templates/tvm/fwd_wgmma.py, sm_90); "wgmma_best" only its tuned ones;
"wgmma_tma" those against the same tiles with bulk tensor copies (tma) and with the
warp-specialized schedule (pingpong).
--plain also times that kernel with the gate off, the gate's cost in the TVM forward. A
config the tuner's resource model prunes for a shape (the register estimate: warp_m = 2
with Q held at D = 128) is listed as skipped, not built.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SHAPES, make_inputs, tflops  # noqa: E402

import gfwagen  # noqa: E402
from gfwagen.backends import tvm_backend  # noqa: E402
from gfwagen.spec import KernelConfig  # noqa: E402
from gfwagen.tuner import space  # noqa: E402

# (block_m, block_n, num_stages, sub_n[, warp_m, q_smem])
OLD_CONFIGS = [(64, 32, 1, 32), (64, 32, 2, 32), (64, 64, 2, 64), (64, 64, 1, 32),
               (64, 64, 2, 32), (64, 128, 1, 32), (128, 64, 2, 32), (128, 64, 2, 64)]
NEW_CONFIGS = [(64, 64, 1, 32), (64, 64, 2, 64),
               (128, 64, 1, 32, 2, True), (128, 64, 2, 32, 2, True), (128, 32, 1, 32, 2, True),
               (128, 64, 2, 32, 2, False), (64, 32, 1, 32, 1, True),
               (128, 64, 2, 64, 2, True), (128, 32, 2, 32, 2, True)]
CONFIG_SETS = {"new": NEW_CONFIGS, "old": OLD_CONFIGS,
               "all": NEW_CONFIGS + [c for c in OLD_CONFIGS if c not in NEW_CONFIGS]}
# session 5's fastest per head dim (benchmarks/RESULTS.md)
BEST_CONFIGS = {128: [(128, 64, 2, 32, 2, True)], 64: [(64, 64, 2, 64)]}
SUB64_CONFIGS = {128: BEST_CONFIGS[128] + [(128, 64, 2, 64, 2, True)], 64: BEST_CONFIGS[64]}
# Hopper's warpgroup MMA (templates/tvm/fwd_wgmma.py): ("wg", block_m, block_n, num_stages)
WGMMA_TILES = [("wg", 64, 64, 3), ("wg", 64, 128, 3), ("wg", 128, 64, 3), ("wg", 128, 128, 3)]
WGMMA_CONFIGS = {d: BEST_CONFIGS[d] + WGMMA_TILES for d in BEST_CONFIGS}
# session 8's tuned wgmma tiles (the shipped database's TVM forward at S1-S5)
WGMMA_BEST = {128: [("wg", 64, 64, 3), ("wg", 128, 128, 3)], 64: [("wg", 64, 64, 3)]}
# session 17: the same tiles fed by bulk tensor copies (tma), and FlashAttention-3's
# warp-specialized schedule (pingpong: a producer warpgroup, two consumers taking turns)
WGMMA_TMA_TILES = [("wg", 64, 64, 3, "tma"), ("wg", 128, 128, 3, "tma"),
                   ("wg", 128, 64, 3, "tma", "pingpong"), ("wg", 128, 128, 3, "tma", "pingpong")]
WGMMA_TMA = {d: list(dict.fromkeys(WGMMA_BEST[d] + WGMMA_TILES[-1:] + WGMMA_TMA_TILES))
             for d in WGMMA_BEST}
PER_HEAD_DIM = {"best": BEST_CONFIGS, "sub64": SUB64_CONFIGS, "wgmma": WGMMA_CONFIGS,
                "wgmma_best": WGMMA_BEST, "wgmma_tma": WGMMA_TMA}
CONFIGS = NEW_CONFIGS
PLAIN = False


def _wg_switches(*fields) -> list[str]:
    """A wgmma tuple's switches: the names after ("wg", block_m, block_n, num_stages), which
    land in the positions the mma.sync tuples use for sub_n, warp_m and q_smem."""
    return [f for f in fields if isinstance(f, str)]


def config(bm, bn, ns, sn=None, wm=1, qs=False, *flags) -> KernelConfig:
    if bm == "wg":  # ("wg", block_m, block_n, num_stages, *switches): fwd_wgmma.py
        switches = _wg_switches(wm, qs, *flags)
        return KernelConfig(block_m=bn, block_n=ns, num_warps=bn // 16, num_stages=sn,
                            extra=tuple(sorted((f, True) for f in (*switches, "wgmma"))))
    extra = (("sub_n", sn),) if sn != bn else ()
    extra += (("warp_m", wm),) if wm != 1 else ()
    extra += (("q_smem", True),) if qs else ()
    return KernelConfig(block_m=bm, block_n=bn, num_warps=bm // (16 * wm), num_stages=ns,
                        extra=extra)


def config_name(bm, bn, ns, sn=None, wm=1, qs=False, *flags) -> str:
    """64x64s1/32 as before; two row blocks per warp add w2, Q in shared memory q; wgmma
    tiles are wg128x64s3, with their switches wg128x128s3+tma+pingpong."""
    if bm == "wg":
        switches = _wg_switches(wm, qs, *flags)
        return f"wg{bn}x{ns}s{sn}" + "".join(f"+{f}" for f in switches)
    return f"{bm}x{bn}s{ns}/{sn}" + (f"w{wm}" if wm != 1 else "") + ("q" if qs else "")


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def measure(s):
    """(Triton ms, {config: result}) for one shape."""
    q, k, v, g, _ = make_inputs(s, torch.bfloat16)
    q, k, v, g = (t.detach() for t in (q, k, v, g))
    res, configs = {}, {}
    spec = tvm_backend._spec("fwd", q, k, v, g, s.W)
    with torch.no_grad():
        # backend named: "auto" runs TVM where the database says it is faster (S5)
        o_tri = gfwagen.attention(q, k, v, g, window=s.W, backend="triton")
        t_tri = bench(lambda: gfwagen.attention(q, k, v, g, window=s.W, backend="triton"))
        for c in (CONFIGS[s.D] if isinstance(CONFIGS, dict) else CONFIGS):
            cfg, key = config(*c), config_name(*c)
            fits, why = space.feasible(spec, cfg)
            if not fits:
                res[key] = {"skipped": why}
                print(s, key, res[key], flush=True)
                continue
            configs[key] = cfg
            try:
                o_tvm, _ = tvm_backend.tvm_forward(q, k, v, g, s.W, None, cfg)
                ms = bench(lambda cfg=cfg: tvm_backend.tvm_forward(q, k, v, g, s.W, None, cfg))
                res[key] = {"ms": ms, "rel_vs_triton": rel(o_tvm, o_tri)}
            except Exception as e:  # a config that does not build is reported, not fatal
                res[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(s, key, res[key], flush=True)
        # the best config's kernel alone: its time less the gate prefix sums (torch, float64)
        ok = {c: r for c, r in res.items() if "ms" in r}
        best = min(ok, key=lambda c: ok[c]["ms"])
        fn = tvm_backend._kernel(spec, configs[best], tvm_backend._target(q, None))
        args = tvm_backend.forward_launch_args(
            q, k, v, *tvm_backend.kernel_buffers(q, v, g, spec, configs[best], s.D ** -0.5),
            s.D ** -0.5)
        res["kernel_only"] = {"config": best, "ms": bench(
            lambda: tvm_backend._launch(q, fn, *args))}
        res["gate_sums_torch"] = {"ms": bench(lambda: tvm_backend._gate_sums(g, q.device))}
        if PLAIN:
            spec0 = tvm_backend._spec("fwd", q, k, v, None, s.W)
            fn0 = tvm_backend._kernel(spec0, configs[best], tvm_backend._target(q, None))
            args0 = tvm_backend.forward_launch_args(
                q, k, v, *tvm_backend.forward_buffers(q, v, None), 1.0 / s.D ** 0.5)
            res["kernel_only_plain"] = {"config": best, "ms": bench(
                lambda: tvm_backend._launch(q, fn0, *args0))}
            print(s, res["kernel_only_plain"], flush=True)
        print(s, res["kernel_only"], res["gate_sums_torch"], flush=True)
    return t_tri, res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--configs", default="new", choices=sorted(CONFIG_SETS) + sorted(PER_HEAD_DIM))
    ap.add_argument("--plain", action="store_true", help="also the best kernel ungated")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    global CONFIGS, PLAIN
    CONFIGS = PER_HEAD_DIM.get(args.configs) or CONFIG_SETS[args.configs]
    PLAIN = args.plain
    rows, out = [], {"device": torch.cuda.get_device_name(), "shapes": {}}
    for name in args.shapes.split(","):
        s = SHAPES[name]
        t_tri, res = measure(s)
        ok = {c: r for c, r in res.items() if "ms" in r and "x" in c}
        best = min(ok, key=lambda c: ok[c]["ms"])
        t_tvm = ok[best]["ms"]
        out["shapes"][name] = {"triton_ms": t_tri, "tvm": res, "best": best}
        rows.append((name, t_tri, tflops(s, "fwd", t_tri), t_tvm, tflops(s, "fwd", t_tvm), best,
                     t_tvm / t_tri, ok[best]["rel_vs_triton"], res["kernel_only"]["ms"]))
    print("\n| shape | Triton fwd ms | TFLOP/s | TVM fwd ms | TFLOP/s | TVM config | TVM/Triton "
          "| rel. diff | TVM kernel alone ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.0f} | {r[3]:.3f} | {r[4]:.0f} | {r[5]} | "
              f"{r[6]:.2f}x | {r[7]:.1e} | {r[8]:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
