#!/usr/bin/env python3
"""The Triton templates against another version of them, in one process: the forward or a
backward pass at the config the op picks for each benchmark shape, gated and plain, timed
A, B, B, A (the better of each kept, so that drift hits both alike), outputs compared.

    git archive main templates | tar -x -C /tmp/old      # the version to compare
    PYTHONPATH=$PWD python benchmarks/template_ab.py --old /tmp/old/templates --pass fwd \\
        --shapes S4,S5,S3,S1,S2 [--pairs 40]

--pairs N also times them in N alternating pairs of calls (bench.paired_ms: each pair within
a millisecond, on the same clocks), which sees differences of 1%; A B B A's do_bench rounds
are seconds apart. The other version is imported as a package of its own (its helpers with
it); its launchers must take the current backend's arguments.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import statistics
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SHAPES, make_inputs, paired_ms, ratio_quartiles  # noqa: E402
from knobs import bench  # noqa: E402

from gfwagen import dispatch  # noqa: E402
from gfwagen.backends import triton_backend as tb  # noqa: E402
from gfwagen.spec import KernelSpec  # noqa: E402

TEMPLATE = {"fwd": "fwd", "bwd_kv": "bwd", "bwd_q": "bwd"}


def load_old(folder: Path, name: str, backend: str = "triton"):
    """templates/<backend>/<name>.py under `folder`, imported as a package of its own, named
    after the folder (Triton reads the kernels' source from the files, so they stay put)."""
    folder = folder.resolve()
    if not (folder / backend / f"{name}.py").is_file():
        raise SystemExit(f"--old: no {backend}/{name}.py under {folder}")
    root = "gfwagen_templates_ab_" + hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    for pkg, path in ((root, folder), (f"{root}.{backend}", folder / backend)):
        if pkg not in sys.modules:
            mod = types.ModuleType(pkg)
            mod.__path__ = [str(path)]
            sys.modules[pkg] = mod
    mod = importlib.import_module(f"{root}.{backend}.{name}")
    if name == "fwd" and not hasattr(mod, "prepare_forward"):
        # templates before session 26 launch at once; triton_backend binds the launch first
        def prepare_forward(*args, launch=mod.launch_forward, **kw):
            return functools.partial(launch, *args, **kw)

        mod.prepare_forward = prepare_forward
    return mod


ORDER = ("old", "new", "new2", "old2")  # A B B A: drift within the run hits both alike


def ab_line(label: str, ms: dict, diff: str, cfg, digits: int = 3) -> str:
    """One shape's report: both versions' times (ORDER's runs), the change of the better
    of each, what their outputs differ by."""
    before, after = min(ms["old"], ms["old2"]), min(ms["new"], ms["new2"])
    return (f"{label}: old {ms['old']:.{digits}f}/{ms['old2']:.{digits}f} ms, new "
            f"{ms['new']:.{digits}f}/{ms['new2']:.{digits}f} ms "
            f"({100 * (after / before - 1):+.1f}%), {diff}, {cfg.as_dict()}")


def runner(pass_, s, x, gated, cfg):
    """fn() running the pass, and outputs() reading what it wrote."""
    q, k, v, g, do = x
    gate, scale = (g if gated else None), s.D ** -0.5
    if pass_ == "fwd":
        out = {}
        return (lambda: out.update(o=tb.forward(q, k, v, gate, s.W, scale, cfg)[0])), \
            (lambda: [out["o"]])
    o, lse = tb.forward(q, k, v, gate, s.W, scale, cfg)
    st = tb.prepare_backward(do, q, k, v, o, lse, gate, s.W, scale)
    if pass_ == "bwd_kv":
        return (lambda: tb.backward_kv(st, cfg)), (lambda: [st.dk, st.dv])
    return (lambda: tb.backward_q(st, cfg)), (lambda: [st.dq])


def _with_templates(fn, load):
    """fn run with triton_backend loading its templates through `load`."""
    def run():
        saved, tb.load_template = tb.load_template, load
        try:
            fn()
        finally:
            tb.load_template = saved
    return run


def paired_line(new, old, pairs: int) -> str:
    """new against old in alternating pairs: the median ratio of their times and its
    quartiles."""
    a, b = paired_ms(new, old, pairs)
    q1, med, q3 = ratio_quartiles(a, b)
    return (f"paired, {pairs} each: new {statistics.median(a):.4f} ms, old "
            f"{statistics.median(b):.4f} ms, new / old median {med:.4f} "
            f"({q1:.4f}, {q3:.4f})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, required=True,
                   help="the other version's templates folder (holding triton/)")
    p.add_argument("--pass", dest="pass_", default="fwd", choices=sorted(TEMPLATE))
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--pairs", type=int, default=0, help="also N alternating pairs of calls")
    a = p.parse_args(argv)
    name = TEMPLATE[a.pass_]
    old = load_old(a.old, name)
    current = tb.load_template

    def old_one(b, n):
        return old if n == name else current(b, n)

    for shape in a.shapes.split(","):
        s = SHAPES[shape]
        x = [t.detach() for t in make_inputs(s, torch.bfloat16)]
        for gated in (True, False):
            cfg = dispatch.select_config(KernelSpec("triton", a.pass_, s.D, s.D, s.W, "bf16",
                                                    True, 1), s.T, x[0].device)
            ms, outs = {}, {}
            for which in ORDER:
                tb.load_template = current if which.startswith("new") else old_one
                try:
                    fn, outputs = runner(a.pass_, s, x, gated, cfg)
                    ms[which] = bench(fn, a.rep)
                    outs[which[:3]] = [t.float().clone() for t in outputs()]
                finally:
                    tb.load_template = current
            diff = max(((n - o).norm() / o.norm()).item()
                       for n, o in zip(outs["new"], outs["old"], strict=True))
            print(ab_line(f"{shape} {a.pass_} {'gated' if gated else 'plain'}", ms,
                          f"rel diff {diff:.1e}", cfg), flush=True)
            if a.pairs:
                print("  " + paired_line(*(_with_templates(runner(a.pass_, s, x, gated, cfg)[0],
                                                           tmpl) for tmpl in (current, old_one)),
                                         a.pairs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
