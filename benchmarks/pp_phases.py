#!/usr/bin/env python3
"""Where a block of TVM's pingpong forward spends its time: a copy of the templates whose
fwd_wgmma.py reads %globaltimer at each phase (the producer's start and end; each consumer's
start, Q arrived, first K/V tile arrived, loop done, epilogue done) into an extra int64
argument, one row per block with its SM, and the cycles each consumer waits in its loop for
key tiles to arrive; a summary per shape: block duration against the wall time per block
slot, each phase's median (p10-p90), the gap between consecutive blocks on an SM, and the
share of the loop spent waiting for tiles.

    PYTHONPATH=$PWD python benchmarks/pp_phases.py --shapes S1,S2,S4 [--persistent] \
        [--templates OTHER]

The probes are text edits of the template: an anchor that no longer matches stops the script
by name. globaltimer ticks in steps of about 0.26 us on the H200; the probes' own cost is a
few instructions per phase.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

_TIMER = ('"__forceinline__ __device__ unsigned long long gfwa_gt() { unsigned long long t; '
          'asm volatile(\\"mov.u64 %0, %globaltimer;\\" : \\"=l\\"(t)); return t; }"')
_SMID = ('"__forceinline__ __device__ unsigned int gfwa_sm() { unsigned int r; '
         'asm volatile(\\"mov.u32 %0, %smid;\\" : \\"=r\\"(r)); return r; }"')
GT = 'T.cuda.func_call("gfwa_gt", source_code=_GT, return_type="uint64")'
CLK = "T.cuda.clock64()"
# columns of the probe rows: 0 SM; 1-5 consumer 0's five stamps, 6-10 consumer 1's; 11, 12
# the producer's start and end; 13, 14 the cycles consumers 0 and 1 waited in the loop for
# key tiles to arrive; 15 consumer 0's loop in cycles
CONSUMER = ("start", "q", "k0", "loop", "end")


def _edits() -> list:
    """The probes: each edit one (anchor, replacement), or alternatives, one per templates
    version (probed_templates). The first alternative fits the template since the persistent
    schedule (session 34: the producer's and consumers' work per query tile in the macros
    produce_item and consume_item, a probe row per query tile `item`), the second the
    versions before it (one block's work inline, a row per block `tile`); the producer's
    stamps have one more, for sessions 34-45's call of produce (with the gate registers)."""
    pad = " " * 24
    row = ('pr[item, 1 + cw * 5 + j] = T.Cast("int64", tim[j])',
           'pr[item, 13 + cw] = T.Cast("int64", tim[6])',
           'pr[item, 15] = T.Cast("int64", tim[7])')
    sm = 'T.Cast("int64", T.cuda.func_call("gfwa_sm", source_code=_SM, return_type="uint32"))'
    # the producer's call, since session 46 without the gate registers (the gate warps' now)
    produce = "        produce(n_tiles, kt_lo, smem, c, b, h, h // G, L, i0, lane, rscale, g0)\n"
    produce_45 = ("        produce(n_tiles, kt_lo, smem, c, gv, b, h, h // G, L, i0, lane, rscale, "
                  "g0)\n")
    bulk_q = f"{pad}    if tx == 0:\n{pad}        bulk_q(smem, i0, h, b)\n"

    def producer_stamps(call):
        # the producer's stamps around its call `call` of produce (produce_item's)
        head = "        b, h, i0, kt_lo, n_tiles = query_tile(item, HQ, L)\n"
        qo = "        qo = qs * QBYTES\n"
        return [(f"{head}        if lane == 0:\n",
                 f"{head}        tim[0] = {GT}\n        if lane == 0:\n"),
                (call,
                 f"{call}        tim[1] = {GT}\n        if lane == 0:\n"
                 '            pr[item, 11] = T.Cast("int64", tim[0])\n'
                 '            pr[item, 12] = T.Cast("int64", tim[1])\n'
                 f"            pr[item, 0] = {sm}\n"),
                (qo, f"{qo}        tim[0] = {GT}\n        tim[6] = T.uint64(0)\n")]

    return [
        [[(imp, f"{imp}_GT = {_TIMER}\n_SM = {_SMID}\n")] for imp in (  # since session 36
            "from .fwd_cuda import _DT, LN2, LOG2E, MASK\n",
            "from .fwd_cuda import _DT, LN2, LOG2E, MASK, MASK_T\n")],
        ("        scale: T.float32,\n    ):",
         "        scale: T.float32,\n        pr_h: T.handle,\n    ):"),
        ('        lse = T.match_buffer(lse_h, (B, HQ, L), "float32")\n',
         '        lse = T.match_buffer(lse_h, (B, HQ, L), "float32")\n        NBLK = T.int64()\n'
         '        pr = T.match_buffer(pr_h, (NBLK, 16), "int64")\n'),
        ('                cq_r = T.alloc_buffer((2,), "float32", scope="local")\n',
         '                cq_r = T.alloc_buffer((2,), "float32", scope="local")\n'
         '                tim = T.alloc_buffer((8,), "uint64", scope="local")\n'),
        [  # the probe registers and rows into the per-query-tile macros (hygienic: arguments)
            [("HQ, L, lane, rscale):\n", "HQ, L, lane, rscale, tim, pr):\n"),
             ("HQ, L, lane, rscale)\n", "HQ, L, lane, rscale, tim, pr)\n", 2),
             ("cq_r, al_r, HQ, L):\n", "cq_r, al_r, HQ, L, tim, pr):\n"),
             ("cq_r, al_r, HQ, L)\n", "cq_r, al_r, HQ, L, tim, pr)\n", 2)],
            []],
        # the producer's warp: a stamp before its first copy and one after its loop
        [
            producer_stamps(produce),
            producer_stamps(produce_45),
            [(bulk_q, f"{pad}    tim[0] = {GT}\n{bulk_q}"),
             (f'{pad[4:]}else:\n{pad}T.ptx["setmaxnreg.inc.sync.aligned.u32"](CONSUMER_REGS)\n',
              f"{pad}    tim[1] = {GT}\n{pad}    if tx == 0:\n"
              f'{pad}        pr[tile, 11] = T.Cast("int64", tim[0])\n'
              f'{pad}        pr[tile, 12] = T.Cast("int64", tim[1])\n'
              f"{pad}        pr[tile, 0] = {sm}\n"
              f'{pad[4:]}else:\n{pad}T.ptx["setmaxnreg.inc.sync.aligned.u32"](CONSUMER_REGS)\n'
              f"{pad}tim[0] = {GT}\n{pad}tim[6] = T.uint64(0)\n")]],
        # Q in, then the first key tile
        [
            [("        T.cuda.mbarrier_wait(mbar(smem, qs * Q1_FULL), T.truncmod(w // 2, 2))\n"
              "        wait_tile(g0c, smem)\n",
              "        T.cuda.mbarrier_wait(mbar(smem, qs * Q1_FULL), T.truncmod(w // 2, 2))\n"
              f"        tim[1] = {GT}\n        wait_tile(g0c, smem)\n        tim[2] = {GT}\n"
              f"        tim[7] = {CLK}\n")],
            [(f"{pad}T.cuda.mbarrier_wait(mbar(smem, 0), 0)\n{pad}wait_tile(0, smem)\n",
              f"{pad}T.cuda.mbarrier_wait(mbar(smem, 0), 0)\n{pad}tim[1] = {GT}\n"
              f"{pad}wait_tile(0, smem)\n{pad}tim[2] = {GT}\n{pad}tim[7] = {CLK}\n")]],
        # the cycles spent waiting for each next key tile (_tile_wait_edits)
        _tile_wait_edits(pad),
        # the epilogue: from the last P V's wait to past the output's store
        [
            [("        finish_rows(row0, i0, cw,",
              f"        tim[3] = {GT}\n        tim[7] = {CLK} - tim[7]\n"
              "        finish_rows(row0, i0, cw,"),
             ('        if PERS:\n            cnt[0] = g0 + T.Cast("int32", n_tiles_b)\n\n'
              "    @T.prim_func",
              f"        tim[4] = {GT}\n        if tx % 128 == 0:\n"
              f"            for j in T.unroll(5):\n                {row[0]}\n"
              f"            {row[1]}\n            if cw == 0:\n                {row[2]}\n"
              '        if PERS:\n            cnt[0] = g0 + T.Cast("int32", n_tiles_b)\n\n'
              "    @T.prim_func")],
            [(f'{pad}T.ptx["wgmma.wait_group.sync.aligned"](0)\n{pad}finish_rows(',
              f'{pad}T.ptx["wgmma.wait_group.sync.aligned"](0)\n{pad}tim[3] = {GT}\n'
              f"{pad}tim[7] = {CLK} - tim[7]\n{pad}finish_rows("),
             (f"{pad}        bulk_store_rows(smem, i0, cw, h, b)\n",
              f"{pad}        bulk_store_rows(smem, i0, cw, h, b)\n"
              f"{pad}tim[4] = {GT}\n{pad}if tx % 128 == 0:\n{pad}    for j in T.unroll(5):\n"
              f"{pad}        {row[0].replace('item', 'tile')}\n"
              f"{pad}    {row[1].replace('item', 'tile')}\n"
              f"{pad}    if cw == 0:\n{pad}        {row[2].replace('item', 'tile')}\n")]],
    ]


def _tile_wait(line: str, indent: str) -> str:
    return (f"{indent}tim[5] = {CLK}\n{line}"
            f"{indent}tim[6] = tim[6] + ({CLK} - tim[5])\n")


def _tile_wait_edits(pad: str) -> list[list[tuple]]:
    """The waits for the next key tile, in any version of the consumers' loop: since
    session 24 the gated one waits in next_biases, which pack_next calls (both given the probe
    registers as an argument; the wait for tile 1, before the loop, counts too), the ungated
    one at the top of a step; before, both at the top."""
    top = f"{pad}        wait_tile(it + 1, smem)\n"
    inner = "        wait_tile(n + 1, smem)\n"
    old_note = "if not gated:  # gated: next_biases waited for it\n"
    note = "if not gated or TABLE:  # else next_biases waited for it\n"  # session 37 on

    def waits(loop_pad: str, line: str, gate_note: str = old_note,
              nb: str = "n, smem, s_r, m_r, t4") -> list[tuple]:
        # the loop's own wait (ungated) and next_biases' (gated; its parameters nb), which
        # pack_next's definition and its two calls pass the probe registers to
        return [(loop_pad + gate_note + line, loop_pad + gate_note
                 + _tile_wait(line, loop_pad + "    ")),
                (inner, _tile_wait(inner, "        ")),
                (f"def next_biases({nb}):", f"def next_biases({nb}, tim):"),
                (f"next_biases({nb})\n", f"next_biases({nb}, tim)\n"),
                ("al_r, m_r, t4):\n", "al_r, m_r, t4, tim):\n"),
                ("al_r, m_r, t4)\n", "al_r, m_r, t4, tim)\n", 2)]

    # since session 42 the step is the macro key_step, which the probe registers join
    step = [("m_r, l_r, al_r):\n", "m_r, l_r, al_r, tim):\n"),
            ("m_r, l_r, al_r)\n", "m_r, l_r, al_r, tim)\n", 4)]
    return [
        # since session 43 next_biases takes the tile's gate total, loaded on its arrival
        waits(" " * 8, "            wait_tile(g + 1, smem)\n", note,
              "n, dl, smem, s_r, m_r, t4") + step,
        waits(" " * 8, "            wait_tile(g + 1, smem)\n", note) + step,
        # since session 34, in consume_item
        waits(" " * 12, "                wait_tile(g + 1, smem)\n", note),
        waits(" " * 12, "                wait_tile(g + 1, smem)\n"),
        waits(pad + "    ", top),
        [(f"\n{pad}    wait_tile(it + 1, smem)\n",  # a line of its own in the loop
          "\n" + _tile_wait(f"{pad}    wait_tile(it + 1, smem)\n", pad + "    "))],
    ]


def probed_templates(dest: Path, source: Path | None = None) -> Path:
    """A copy of templates/ (or of `source`, another version of it) in dest with the probes in
    tvm/fwd_wgmma.py."""
    shutil.copytree(source or ROOT / "templates", dest / "templates")
    path = dest / "templates" / "tvm" / "fwd_wgmma.py"
    src = path.read_text()
    for i, edit in enumerate(_edits()):
        # an edit: one (anchor, replacement), or alternatives (one per templates version),
        # each a list of them that must all match, the first that does taken
        options = edit if isinstance(edit, list) else [[edit]]
        # (an anchor may name how often it occurs: a third item, else once)
        pairs = next((o for o in options
                      if all(src.count(p[0]) == (p[2] if len(p) > 2 else 1) for p in o)), None)
        if pairs is None:
            old = options[0][0][0]
            raise SystemExit(f"pp_phases: probe anchor {i} matches {src.count(old)} times in "
                             f"fwd_wgmma.py: {old.strip()[:70]!r}")
        for old, new, *_ in pairs:
            src = src.replace(old, new)
    path.write_text(src)
    return dest / "templates"


def summarize(name, gated, probe, ms, n_blocks):
    import torch

    def pct(x, p):
        return torch.quantile(x.double(), p).item() / 1e3

    def span(x):
        return f"{pct(x, .5):.2f} ({pct(x, .1):.2f}-{pct(x, .9):.2f})"

    P = probe.cpu().double()
    P[:, 1:13] -= P[:, [1, 6, 11]].min()
    start = torch.minimum(torch.minimum(P[:, 1], P[:, 6]), P[:, 11])
    end = torch.maximum(P[:, 5], P[:, 10])
    print(f"## {name} {'gated' if gated else 'plain'}: kernel {ms:.4f} ms, probed span "
          f"{(end.max() - start.min()).item() / 1e6:.4f} ms; block us {span(end - start)}; wall "
          f"per block slot {ms * 1e3 * 132 / n_blocks:.2f} us", flush=True)
    for cw, base in (("consumer 0", 1), ("consumer 1", 6)):
        t = {k: P[:, base + i] for i, k in enumerate(CONSUMER)}
        print(f"    {cw}: Q {span(t['q'] - t['start'])}  first tile {span(t['k0'] - t['start'])}"
              f"  loop {span(t['loop'] - t['k0'])}  epilogue {span(t['end'] - t['loop'])}")
    print(f"    producer: busy {span(P[:, 12] - P[:, 11])}, then the block runs "
          f"{span(end - P[:, 12])}")
    loop_us = (P[:, 4] - P[:, 3]) / 1e3
    clock = P[:, 15] / loop_us.clamp_min(1e-3)
    # cycles against globaltimer: a loop that got shorter in time but not in cycles ran at a
    # higher clock (the H200 throttles under its power limit)
    print(f"    consumer 0's loop: {torch.quantile(P[:, 15], .5).item():.0f} cycles (median), "
          f"{torch.quantile(clock, .5).item():.0f} MHz")
    waits = [P[:, 13 + cw] / P[:, 15].clamp_min(1) for cw in (0, 1)]
    print("    share of consumer 0's loop cycles spent waiting for key tiles, consumer 0 / 1: "
          + " / ".join(f"{100 * torch.quantile(w, .5).item():.1f}%" for w in waits))
    sm, gaps = P[:, 0].long(), []
    for s in sm.unique():
        idx = (sm == s).nonzero().flatten()
        order = start[idx].argsort()
        st, en = start[idx][order], end[idx][order]
        gaps.append(st[1:] - en[:-1])
    print(f"    {len(sm) / len(sm.unique()):.1f} blocks per SM on {len(sm.unique())} SMs; gap to "
          f"the next block {span(torch.cat(gaps))}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="S1,S2,S4")
    p.add_argument("--block-n", type=int, default=128)
    p.add_argument("--persistent", action="store_true",
                   help="the persistent schedule: a row per query tile, the 'blocks' below")
    p.add_argument("--templates", type=Path, default=None,
                   help="another version of templates/ to probe (an A/B of a template change)")
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="gfwa-probe-"))
    os.environ["GFWAGEN_TEMPLATES"] = str(probed_templates(tmp, a.templates))
    import torch
    import triton.testing
    from bench import SHAPES, make_inputs

    from gfwagen.backends import tvm_backend as tb
    from gfwagen.spec import KernelConfig

    cfg = KernelConfig(128, a.block_n, 8, 3,
                       extra=(("pingpong", True), ("tma", True), ("wgmma", True))
                       + ((("persistent", True),) if a.persistent else ()))
    cfg = tb.resolve_persistent(cfg, "cuda")
    for name in a.shapes.split(","):
        s = SHAPES[name]
        q, k, v, g, _ = (t.detach() for t in make_inputs(s, torch.bfloat16))
        for gated in (True, False):
            gate = g if gated else None
            spec = tb._spec("fwd", q, k, v, gate, s.W)
            fn = tb._kernel(spec, cfg, tb._target(q, "cuda"))
            c, o, lse = tb.kernel_buffers(q, v, gate, spec, cfg, s.D ** -0.5)
            n_blocks = s.B * s.H * -(-s.T // 128)
            probe = torch.zeros(n_blocks, 16, dtype=torch.int64, device=q.device)

            run = functools.partial(tb._launch, q, fn,
                                    *tb.forward_launch_args(q, k, v, c, o, lse, s.D ** -0.5),
                                    probe)
            run()
            ms = triton.testing.do_bench(run, warmup=10, rep=60, return_mode="median")
            probe.zero_()
            run()
            torch.cuda.synchronize()
            summarize(name, gated, probe, ms, n_blocks)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
