#!/usr/bin/env python3
"""S5's forward under Nsight Compute, and where its executed instructions go.

    ncu -k regex:gfwa_fwd --launch-skip 2 --launch-count 1 --section SourceCounters -o kb \\
        python benchmarks/ncu_fwd.py launch kb          # kb: key biases (bias_mma); or plain
    ncu -i kb.ncu-rep --page source --csv --print-source sass > kb.csv
    python benchmarks/ncu_fwd.py segments plain.csv kb.csv

`tvm-launch U|G|P` does the same for TVM's persistent 128x128 pingpong forward at S5's shipped
tile (as gate_parts.py builds it): U ungated, G with `bias_mma`, P with the biases as S's
start. Session 47 profiled those with SpeedOfLight, WarpStateStats and the pipes' active
cycles (`--metrics "regex:sm__pipe_.*cycles_active.avg.pct_of_peak_sustained_active"`).

`probe-launch NAME` launches one of gate_parts.py's probe variants the same way ("G", "G no
shift", "U + k step", ...: its templates copy with the probe switches); session 50 compared
"G" and "G no shift" so.

`segments` splits each kernel's SASS into runs of instructions executed equally often (the
prologue, each tile loop, the code between them) and prints each run's instructions per warp
and query tile: its executions over the first instruction's, which runs once per warp and
query tile. Session 27 found 61% of the gate's excess at S5 outside the interior loop that
way (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def launch(which: str) -> None:
    """Three forwards at S5's shipped tile (64x64 w4 s2 maxnreg 128): gated through the key
    biases, or ungated."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import SHAPES, make_inputs

    from gfwagen.backends import triton_backend as tb
    from gfwagen.spec import KernelConfig

    s = SHAPES["S5"]
    q, k, v, g, _ = (t.detach() for t in make_inputs(s, torch.bfloat16))
    cfg = KernelConfig(64, 64, 4, 2, extra=(("bias_mma", True), ("maxnreg", 128)))
    for _ in range(3):
        tb.forward(q, k, v, g if which == "kb" else None, s.W, s.D ** -0.5, cfg)
    torch.cuda.synchronize()


def launch_tvm(which: str) -> None:
    """Three forwards of TVM's kernel at S5's gated tile from the shipped database, the gate's
    buffer made once before them (gate_parts.kernel_call): U ungated, G bias_mma, P plain
    (gated, the biases as S's start). gate_parts' variants of those names; its templates with
    every probe off build the same SASS as the real ones (hashed, session 50)."""
    launch_probe({"U": "U", "G": "G", "P": "G plain"}[which])


def launch_probe(name: str) -> None:
    """Three forwards of gate_parts' variant `name` at S5's shipped gated tile, from the
    probed templates (which must be in place before gfwagen loads a template)."""
    import os
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gate_parts

    os.environ["GFWAGEN_TEMPLATES"] = str(gate_parts.probed_templates(
        Path(tempfile.mkdtemp(prefix="ncu_probe_"))))
    import torch
    from bench import SHAPES, make_inputs
    from tvm_knob_ab import tvm_config

    from gfwagen.backends import tvm_backend as tb

    s = SHAPES["S5"]
    q, k, v, g, _ = (t.detach() for t in make_inputs(s, torch.bfloat16))
    base = tvm_config(tb._spec("fwd", q, k, v, g, s.W), s.T, q.device)
    gated, cfg = gate_parts.variants(base)[name]
    f = gate_parts.kernel_call(q, k, v, g if gated else None, s.W, cfg)
    for _ in range(3):
        f()
    torch.cuda.synchronize()


def runs(path: Path) -> list[tuple[int, float, int]]:
    """(offset of the run's first instruction, executions of each, instructions in the run)
    from an `ncu --page source --csv --print-source sass` export."""
    rows = list(csv.reader(path.open()))
    head = rows[1]
    data = [dict(zip(head, r)) for r in rows[2:] if len(r) >= len(head) and r[0].startswith("0x")]
    if not data:
        raise SystemExit(f"{path}: no SASS rows (expected ncu's source page as CSV)")
    base = int(data[0]["Address"], 16)
    out: list[list] = []
    for d in data:
        n = float(d["Instructions Executed"] or 0)
        if out and out[-1][1] == n:
            out[-1][2] += 1
        else:
            out.append([int(d["Address"], 16) - base, n, 1])
    return [tuple(r) for r in out]


def segments(paths: list[Path]) -> None:
    for path in paths:
        rs = runs(path)
        per = rs[0][1]  # the first instruction: once per warp and query tile
        total = sum(n * c for _, n, c in rs)
        print(f"{path}: {total / 1e6:.1f} M warp instructions, "
              f"{total / per:.0f} per warp and query tile")
        for off, n, c in rs:
            if n * c > 0.002 * total:
                print(f"  {off:#7x}  {c:4d} instructions x {n / per:5.2f} = {n * c / per:6.0f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("launch").add_argument("which", choices=("plain", "kb"))
    sub.add_parser("tvm-launch").add_argument("which", choices=("U", "G", "P"))
    sub.add_parser("probe-launch").add_argument("name", help="a gate_parts.py variant")
    sub.add_parser("segments").add_argument("csv", nargs="+", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "launch":
        launch(a.which)
    elif a.cmd == "tvm-launch":
        launch_tvm(a.which)
    elif a.cmd == "probe-launch":
        launch_probe(a.name)
    else:
        segments(a.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
