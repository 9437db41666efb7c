#!/usr/bin/env python3
"""Where the gated TVM pingpong forward (`bias_mma`) spends its time beyond the ungated one:
a copy of the templates whose fwd_wgmma.py takes probe switches as config extras (text edits,
as pp_phases.py makes its own), each removing one part of the gate's work, timed in one
process against the ungated kernel, call by call in rotating order with the L2 flushed
(bench.interleaved_ms). Kernels are timed alone (the gate's records made once, outside the
timing) unless named "op". The probes' outputs are wrong by design; only times are reported.

- `probe_kstep`: the ungated kernel with one more regular k step in its score product, the
  tensor work of `bias_mma`'s table step;
- `probe_table_as_k`: that table step read as a regular k step (Q and the key tile from
  shared memory, swizzled) instead of A from registers and the unswizzled bias table;
- `probe_no_table_step`: no table step at all (S starts from the first regular k step);
- `probe_no_shift`: no running-max shift by each tile's gate total (two adds per tile, of a
  value loaded when the tile arrived; until session 43 loaded right there, in shift_rows);
- `probe_dl_late`: the tile's gate total (the shift) loaded after the turn's products are
  issued, not before the turn's barrier (correct; session 49);
- `probe_no_record`: the producer without each tile's record copy (the table is stale);
- `probe_more_int64`: the step's test for a next tile (whether to shift) as before session
  50, an int64 compare in every loop, the interior one too (correct);
- `probe_no_fence`, `probe_no_gate_load`, `probe_gate_idle` (with `fuse_gate`): the gate
  warps without their proxy fence, without their gate loads, or doing nothing but wait for
  each stage and arrive.

"G plain" is the gated kernel without bias_mma (the biases loaded into S), correct. "G fused"
is "G" with `fuse_gate`: the producer's gate warp makes each tile's bias table from the raw
gates, no records' launch (one warp a stage; "G fused 1w" one warp for all; "G fused op" the
backend's call of it); "tma" with the gates by bulk tensor copies (`gate_tma`, head dim 64:
its staging does not fit beside head dim 128's stages).

    PYTHONPATH=$PWD python benchmarks/gate_parts.py --shapes S1,S4 --calls 30

Session 42 found `bias_mma` 3-5 points dearer at S2-S4 than a plain k step and the records'
launch together (benchmarks/RESULTS.md); session 43 split that remainder with this: the max's
shift, whose load then moved to the tile's arrival (`--gate-scales 1,1e-5` showed it was not
an effect of the gate's values).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

_SWITCHES = ('    O_TMA = PP and DV <= D\n',
             '    O_TMA = PP and DV <= D\n'
             '    PROBE_K = int(config.get("probe_kstep", 0))\n'
             '    PROBE_TAK = bool(config.get("probe_table_as_k", False))\n'
             '    PROBE_NOTAB = bool(config.get("probe_no_table_step", False))\n'
             '    PROBE_NOSHIFT = bool(config.get("probe_no_shift", False))\n'
             '    PROBE_NOREC = bool(config.get("probe_no_record", False))\n'
             '    PROBE_NOFENCE = bool(config.get("probe_no_fence", False))\n'
             '    PROBE_IDLE = bool(config.get("probe_gate_idle", False))\n'
             '    PROBE_NOLOAD = bool(config.get("probe_no_gate_load", False))\n'
             '    PROBE_DLLATE = bool(config.get("probe_dl_late", False))\n'
             '    PROBE_MORE64 = bool(config.get("probe_more_int64", False))\n')


def _edits() -> list[tuple[str, str]]:
    """(anchor, replacement) pairs, each anchor matching once."""
    table_step = ("        if TABLE:\n"
                  "            descriptor(bd, smem, C_OFF + st * (CS * 4), 3, 3, 0)\n")
    return [
        _SWITCHES,
        # one more k step: the first one twice
        ("        for ks in T.unroll(D // 16):\n",
         "        for ks0 in T.unroll(D // 16 + PROBE_K):\n"
         "            ks = T.max(ks0 - PROBE_K, 0)\n"),
        ("qd[0], kd[0], ks > 0 or gated,",
         "qd[0], kd[0], ks0 > 0 or (gated and not (TABLE and PROBE_NOTAB)),"),
        # the table step as a regular one: k step 0 of Q and the key tile
        (table_step,
         "        if TABLE and PROBE_TAK:\n"
         "            descriptor(qd, smem, Q_OFF + qo + wg * (64 * 128), 1, 64)\n"
         "            descriptor(kd, smem, K_OFF + st * (2 * BN * D), 1, 64)\n"
         "            T.ptx[mma_s](*[s_r[x] for x in range(BN // 2)], qd[0], kd[0], False,\n"
         "                         1, 1, 0, 0)\n"
         "        elif TABLE and not PROBE_NOTAB:\n"
         "            descriptor(bd, smem, C_OFF + st * (CS * 4), 3, 3, 0)\n"),
        # the step's test for a next tile as before session 50: int64, in every loop
        ("        more = True if interior else it + 2 < T.Cast(\"int32\", n_tiles)\n",
         "        more = (T.Cast(\"int64\", it) + 2 < n_tiles if PROBE_MORE64 else\n"
         "                True if interior else it + 2 < T.Cast(\"int32\", n_tiles))\n"),
        # no shift of the running max (bias_mma's pack_next)
        ("            if more:\n                shift_rows(dl, m_r)\n            rescale_o",
         "            if more and not PROBE_NOSHIFT:\n"
         "                shift_rows(dl, m_r)\n            rescale_o"),
        # the shift's total loaded once the turn's products are issued (key_step)
        ("        dl: T.float32 = tile_total(stage(g + 1), smem) if RELATIVE else T.float32(0)\n"
         "        T.ptx[\"bar.sync\"](T.Cast(\"uint32\", 1 + cw), T.uint32(256))\n",
         "        dl0: T.float32 = (tile_total(stage(g + 1), smem)\n"
         "                          if RELATIVE and not PROBE_DLLATE else T.float32(0))\n"
         "        T.ptx[\"bar.sync\"](T.Cast(\"uint32\", 1 + cw), T.uint32(256))\n"),
        ("        T.ptx[\"bar.arrive\"](next_turn(cw), T.uint32(256))\n"
         "        T.ptx[\"wgmma.wait_group.sync.aligned\"](1)\n",
         "        T.ptx[\"bar.arrive\"](next_turn(cw), T.uint32(256))\n"
         "        dl: T.float32 = (tile_total(stage(g + 1), smem) if RELATIVE and PROBE_DLLATE\n"
         "                         else dl0)\n"
         "        T.ptx[\"wgmma.wait_group.sync.aligned\"](1)\n"),
        # no record copy: the stage's barrier expects the tiles alone
        ("                    bulk_tile(kt, st, smem, b, hk, REC_BYTES)\n"
         "                    bulk_record(kt, st, smem, c, b, h)\n",
         "                    if PROBE_NOREC:\n"
         "                        bulk_tile(kt, st, smem, b, hk, 0)\n"
         "                    else:\n"
         "                        bulk_tile(kt, st, smem, b, hk, REC_BYTES)\n"
         "                        bulk_record(kt, st, smem, c, b, h)\n"),
        # fuse_gate: the gate warps' fence before they arrive left out
        ("                if TABLE:  # the score product's wgmma reads the table through the "
         "async proxy\n",
         "                if TABLE and not PROBE_NOFENCE:\n"),
        # fuse_gate: the gate warps' loads left out (their gates a constant), or all their
        # work but the wait for the stage and the arrival
        ("                        gv[u] = c[b, T.min(t0 + u, T.Cast(\"int32\", L) - 1), h]\n"
         "                scan_tile(gv, gw, lane, rscale)\n",
         "                        if PROBE_NOLOAD:\n"
         "                            gv[u] = T.float32(-0.01)\n"
         "                        else:\n"
         "                            gv[u] = c[b, T.min(t0 + u, T.Cast(\"int32\", L) - 1), h]\n"
         "                if not PROBE_IDLE:\n"
         "                    scan_tile(gv, gw, lane, rscale)\n"),
        ("                store_slot(st, gv, gw, smem, lane)\n",
         "                if not PROBE_IDLE:\n"
         "                    store_slot(st, gv, gw, smem, lane)\n"),
    ]


def probed_templates(dest: Path) -> Path:
    """A copy of templates/ in dest with the probe switches in tvm/fwd_wgmma.py."""
    shutil.copytree(ROOT / "templates", dest / "templates")
    path = dest / "templates" / "tvm" / "fwd_wgmma.py"
    src = path.read_text()
    for old, new in _edits():
        if src.count(old) != 1:
            raise SystemExit(f"gate_parts: anchor matches {src.count(old)} times in "
                             f"fwd_wgmma.py: {old.strip()[:70]!r}")
        src = src.replace(old, new)
    path.write_text(src)
    return dest / "templates"


def variants(base):
    """name -> (gated, config) of the probed kernels, from the gated config `base`; U is
    the ungated kernel at base's tiles (the database's gated and ungated TVM tiles are the
    same at S1-S5)."""
    from tvm_knob_ab import with_extra

    gm = with_extra(base, {"bias_mma": True})
    plain = with_extra(base, {"bias_mma": False})
    return {
        "U": (False, plain),
        "U + k step": (False, with_extra(plain, {"probe_kstep": 1})),
        "G": (True, gm),
        "G fused": (True, with_extra(gm, {"fuse_gate": True})),
        "G fused 1w": (True, with_extra(gm, {"fuse_gate": True, "gate_warps": 1})),
        "G fused tma": (True, with_extra(gm, {"fuse_gate": True, "gate_tma": True})),
        "G fused no fence": (True, with_extra(gm, {"fuse_gate": True, "probe_no_fence": True})),
        "G fused no load": (True, with_extra(gm, {"fuse_gate": True,
                                                  "probe_no_gate_load": True})),
        "G fused idle": (True, with_extra(gm, {"fuse_gate": True, "probe_gate_idle": True})),
        "G plain": (True, plain),
        "G table as k": (True, with_extra(gm, {"probe_table_as_k": True})),
        "G no shift": (True, with_extra(gm, {"probe_no_shift": True})),
        "G more int64": (True, with_extra(gm, {"probe_more_int64": True})),
        "G dl late": (True, with_extra(gm, {"probe_dl_late": True})),
        "G no record": (True, with_extra(gm, {"probe_no_record": True})),
        "G no table step": (True, with_extra(gm, {"probe_no_table_step": True})),
        "G no step, shift, record": (True, with_extra(gm, {"probe_no_table_step": True,
                                                           "probe_no_shift": True,
                                                           "probe_no_record": True})),
        "G none of the three": (True, with_extra(gm, {"probe_table_as_k": True,
                                                       "probe_no_shift": True,
                                                       "probe_no_record": True})),
    }


def kernel_call(q, k, v, g, W, cfg):
    """The forward kernel of cfg as one call, its gate buffer made once, here."""
    from gfwagen.backends import tvm_backend as tb

    spec = tb._spec("fwd", q, k, v, g, W)
    target = tb._target(q, "cuda")
    cfg = tb.resolve_persistent(tb._cuda_config(spec, cfg, target["arch"]), q.device)
    qs, scale = tb.wgmma_scale(q, q.shape[3] ** -0.5)
    c, o, lse = tb.kernel_buffers(qs, v, g, spec, cfg, scale)
    fn = tb._kernel(spec, cfg, target)
    args = tb.forward_launch_args(qs, k, v, c, o, lse, scale)
    return functools.partial(tb._launch, qs, fn, *args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="S1,S2,S4")
    p.add_argument("--calls", type=int, default=30, help="calls of each variant")
    p.add_argument("--gate-scales", default="1",
                   help="comma-separated factors on bench.py's gate (mean log gate -0.08), "
                        "each timed in turn: a small one keeps the probes' outputs near the "
                        "kernel's, so that their values (the GPU's power) do not differ")
    p.add_argument("--only", default=None,
                   help="comma-separated variants to time (U always; 'G op', 'U op' and "
                        "'records' are the TVM backend's calls and the records' launch, "
                        "'G auto' and 'U auto' gfwagen.attention's as the shipped database "
                        "picks them, as bench.py's gate pairs time them)")
    p.add_argument("--graph", action="store_true",
                   help="each variant replayed from a CUDA graph: the GPU's time without the "
                        "host's (at S5 the op's host time exceeds the L2 flush before a call)")
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="gate_parts_"))
    os.environ["GFWAGEN_TEMPLATES"] = str(probed_templates(tmp))  # before gfwagen loads them

    import torch
    from bench import SHAPES, capture_graph, interleaved_ms, make_inputs, ratio_quartiles
    from tvm_knob_ab import tvm_config

    import gfwagen
    from gfwagen.backends import tvm_backend as tb

    keep = set(a.only.split(",")) if a.only else None
    for name in a.shapes.split(","):
        s = SHAPES[name]
        q, k, v, g0, _ = (t.detach() for t in make_inputs(s, torch.bfloat16))
        for gs in map(float, a.gate_scales.split(",")):
            g = g0 * gs
            base = tvm_config(tb._spec("fwd", q, k, v, g, s.W), s.T, q.device)
            probes = variants(base)
            fns = {n: kernel_call(q, k, v, g if gated else None, s.W, cfg)
                   for n, (gated, cfg) in probes.items() if keep is None or n in keep | {"U"}}
            fns["G op"] = functools.partial(tb.tvm_forward, q, k, v, g, s.W, config=probes["G"][1])
            fns["G fused op"] = functools.partial(tb.tvm_forward, q, k, v, g, s.W,
                                                  config=probes["G fused"][1])
            fns["G fused tma op"] = functools.partial(
                tb.tvm_forward, q, k, v, g, s.W, config=probes["G fused tma"][1])
            fns["U op"] = functools.partial(tb.tvm_forward, q, k, v, None, s.W,
                                            config=probes["U"][1])
            fns["records"] = functools.partial(tb._tile_records, g, base.block_n, s.D ** -0.5, True)
            fns["G auto"] = functools.partial(gfwagen.attention, q, k, v, g, window=s.W)
            fns["U auto"] = functools.partial(gfwagen.attention, q, k, v, None, window=s.W)
            fns = {n: f for n, f in fns.items() if keep is None or n in keep | {"U"}}
            for f in fns.values():
                f()
            torch.cuda.synchronize()
            if a.graph:
                fns = {n: capture_graph(f).replay for n, f in fns.items()}
            ms = dict(zip(fns, interleaved_ms(list(fns.values()), a.calls), strict=True))
            how = "CUDA graph replays" if a.graph else "eager calls"
            print(f"{name} {s}, gate x{gs}, {how}, from {base.as_dict()}")
            for n, t in ms.items():
                ratio = "" if n == "U" else f"  / U {ratio_quartiles(t, ms['U'])[1]:.4f}"
                print(f"  {n:22s} {statistics.median(t):.4f} ms{ratio}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
