#!/usr/bin/env python3
"""The TVM wgmma forward's consumer loop in SASS, gated against ungated, without a GPU: each
variant built for sm_90a (TVM's codegen, then nvcc: `tvm_backend.build_cuda_cubin`),
disassembled with the cuobjdump Triton ships, and its key-tile loop found (the backward branch
whose body holds the score product's HGMMAs and the softmax's MUFU.EX2s; each such loop,
since `split_loop` the edge tiles' and the interior tiles'). Per variant and loop: the
loop's instructions, its masked and unmasked softmax branches (the loop's first forward branch
skips the masked one, an unconditional one then skips the unmasked), and what the gated loop
issues beyond the ungated one, by opcode. These are the counts RESULTS.md quotes as "offline
SASS" (session 36 on).

    PYTHONPATH=$PWD python benchmarks/tvm_sass.py --head-dim 64 --window 512
    PYTHONPATH=$PWD python benchmarks/tvm_sass.py --head-dim 128 --window 4096 --config \\
        '{"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3,
          "extra": {"pingpong": true, "tma": true, "wgmma": true}}'

GFWAGEN_TEMPLATES=OTHER/templates counts another version of the templates. Needs nvcc on PATH.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PERSISTENT = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3,
              "extra": {"pingpong": True, "tma": True, "wgmma": True, "persistent": True}}
_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"BRA\s+(?:\S+,\s*)?(0x[0-9a-f]+)")


def sass(spec, config) -> list[tuple[int, str]]:
    """(address, instruction) of the kernel built for sm_90a."""
    from gfwagen.backends.tvm_backend import build_cuda_cubin
    from gfwagen.offline import _triton_tool

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(build_cuda_cubin(spec, config, arch="sm_90a"))
        out = subprocess.run([str(_triton_tool("cuobjdump")), "-sass", str(path)],
                             capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2)) for m in map(_LINE.match, out.splitlines()) if m]


def key_tile_loops(ins) -> list:
    """Every loop whose body has both HGMMA and MUFU and is not an outer loop around one
    (under 2000 instructions), in address order: the consumers' key-tile steps. Since session
    42 (`split_loop`) the first is the edge tiles' step with its masked and unmasked softmax
    branches, the second the interior tiles' step."""
    at = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (a, text) in enumerate(ins):
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in at:
            body = ins[at[int(m.group(1), 16)]:i + 1]
            if len(body) < 2000 and any("HGMMA" in t for _, t in body) \
                    and any("MUFU" in t for _, t in body):
                loops.append(body)
    # an outer loop around one of them (a persistent block's loop over its query tiles)
    inner = [b for b in loops if not any(o is not b and b[0][0] <= o[0][0] and o[-1][0] <= b[-1][0]
                                         for o in loops)]
    if not inner:
        raise SystemExit("tvm_sass: no key-tile loop found")
    return inner


def branches(body) -> dict:
    """The softmax's two branches' lengths: the first forward branch that skips over MUFUs
    jumps past one, whose closing unconditional branch jumps past the other. The masked one
    is the longer (its compares and selects); `common` is the rest of the step."""
    at = {a: i for i, (a, _) in enumerate(body)}
    for i, (a, text) in enumerate(body):
        m = _BRANCH.search(text)
        tgt = int(m.group(1), 16) if m else -1
        if tgt > a and tgt in at and any("MUFU" in t for _, t in body[i:at[tgt]]):
            end = at[tgt] - 1  # the first branch's closing BRA
            m2 = _BRANCH.search(body[end][1])
            if m2 and int(m2.group(1), 16) in at:
                first, second = end - i, at[int(m2.group(1), 16)] - end - 1
                return {"masked": max(first, second), "unmasked": min(first, second),
                        "common": len(body) - first - second}
    return {}


def opcodes(body) -> collections.Counter:
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for _, t in body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--config", default=json.dumps(PERSISTENT),
                   help="a KernelConfig as JSON (default: the persistent pingpong tile)")
    args = p.parse_args(argv)
    from gfwagen.backends.tvm_backend import resolve_persistent
    from gfwagen.spec import KernelConfig, KernelSpec

    # persistent: true becomes the offline SM count, as the tuner's configs are written
    cfg = resolve_persistent(KernelConfig.from_dict(json.loads(args.config)))
    loops = {}
    for gated in (False, True):
        spec = KernelSpec("tvm", "fwd", args.head_dim, args.head_dim, args.window, args.dtype,
                          gated, 1)
        loops[gated] = key_tile_loops(sass(spec, cfg))
        for n, body in enumerate(loops[gated]):
            print(f"{'gated' if gated else 'ungated'} loop {n}: {len(body)} instructions"
                  + "".join(f", {k} {v}" for k, v in branches(body).items()))
    if len(loops[True]) != len(loops[False]):
        # (ptxas may lay one kernel's query-tile loop around its key-tile loops' code)
        print("the kernels differ in their loops' count: the first "
              f"{min(map(len, loops.values()))} compared in order")
    for n, (gb, ub) in enumerate(zip(loops[True], loops[False])):
        g, u = opcodes(gb), opcodes(ub)
        print(f"loop {n}, gated minus ungated, by opcode:")
        for op in sorted(set(g) | set(u), key=lambda op: (u[op] - g[op], op)):
            if g[op] != u[op]:
                print(f"  {op:28s} {g[op]:4d} {u[op]:4d} {g[op] - u[op]:+4d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
