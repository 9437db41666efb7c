"""benchmarks/bench.py's bookkeeping, without a GPU: how --devices shares out the shapes,
merges the per-GPU runs into one report, and fails when a GPU's process does."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402


def test_split_shapes_balances_flops_and_keeps_every_shape_once():
    recorded = {n: bench.SHAPES[n] for n in bench.RECORDED}
    shares = bench.split_shapes(recorded, 2)
    assert sorted(n for sh in shares for n in sh) == sorted(recorded)
    loads = [sum(bench.flops(bench.SHAPES[n], "fwdbwd") for n in sh) for sh in shares]
    # S4 alone outweighs the rest, so it gets a process of its own
    assert ["S4"] in shares and max(loads) == bench.flops(bench.SHAPES["S4"], "fwdbwd")
    assert bench.split_shapes(bench.TINY, 4) == [["tiny"]]


def test_full_causal_shapes_count_every_causal_pair():
    """F1 and F2 (W = T) count T (T + 1) / 2 pairs a head, as a window of T does, and stay
    out of the default run, which is the op issue's S1-S5."""
    for name in ("F1", "F2"):
        s = bench.SHAPES[name]
        assert s.W == s.T and bench.pairs(s.T, s.W) == s.T * (s.T + 1) // 2
    assert bench.RECORDED == ["S1", "S2", "S3", "S4", "S5"]


def _run(shape, gpu, tf, unavailable=None):
    meta = {"date": f"2026-11-29T0{len(shape)}:00:00", "gpu": gpu, "command": "child",
            "versions": {"torch": "x"}, "dtype": "bf16", "unavailable": unavailable or {},
            "shapes": {shape: bench.SHAPES[shape]._asdict()}}
    res = [{"shape": shape, "contender": c, "mode": "fwdbwd", "ms": 1.0, "tflops": t}
           for c, t in tf.items()]
    return {"meta": meta, "results": res, "checks": [{"shape": shape, "contender": "gfwagen"}]}


def test_merge_runs_reports_one_run(tmp_path, capsys):
    runs = [_run("S4", "NVIDIA H200", {"gfwagen": 300.0, "fla": 150.0}),
            _run("S1", "NVIDIA H200", {"gfwagen": 220.0, "fla": 100.0},
                 {"flex": "ImportError: no"})]
    merged = bench.merge_runs(runs, "bench.py --devices 0,1")
    assert merged["meta"]["gpu"] == "NVIDIA H200"
    assert merged["meta"]["unavailable"] == {"flex": "ImportError: no"}
    assert set(merged["meta"]["shapes"]) == {"S1", "S4"}
    assert len(merged["results"]) == 4 and len(merged["checks"]) == 2
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    bench.report(merged["results"], merged["checks"], ["S1", "S4"], ["gfwagen", "fla"],
                 merged["meta"], str(js), str(md))
    out = capsys.readouterr().out
    assert "2.20x" in out and "2.00x" in out  # each shape's ratio from its own process
    assert json.loads(js.read_text())["meta"]["command"] == "bench.py --devices 0,1"
    assert "`bench.py --devices 0,1`" in md.read_text()


def test_rounds_give_every_contender_both_ends_of_the_order():
    orders = bench.round_orders(["a", "b", "c"], 3)
    assert orders == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
    assert bench.round_orders(range(2), 2) == [[0, 1], [1, 0]]  # head_to_head's config indices
    assert bench.round_orders(["a", "b"], 1) == [["a", "b"]]


def test_rounds_below_one_exit_2():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--tiny",
                           "--rounds", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--rounds" in proc.stderr


@pytest.mark.parametrize("devices", ["0,0", "a", ","])
def test_devices_rejects_bad_lists(devices):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--tiny",
                           "--devices", devices], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--devices" in proc.stderr


def test_devices_fails_when_a_gpu_process_fails(tmp_path):
    """Without a GPU each process exits at once; the parent says so and exits 1."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--tiny",
                           "--contenders", "gfwagen", "--devices", "0,1",
                           "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "needs a CUDA GPU" in proc.stdout and "failed on GPU 0" in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_gate_cost_pairs_the_rounds_and_reports_target_2(tmp_path, capsys):
    """Session 21's recorded S2 forward: one fast ungated round made the best-round cost 10.6%;
    the rounds, each gated run against the ungated run next to it, gave 3.0% and 13.6%.
    Shapes without both gfwagen runs get no row; Flex's plain window is optional."""
    def fwd(c, rounds):
        return {"shape": "S2", "contender": c, "mode": "fwd", "ms": min(rounds),
                "rounds_ms": rounds, "tflops": 1.0}

    results = [fwd("gfwagen", [0.5873, 0.6031]), fwd("gfwagen-nogate", [0.5704, 0.5311]),
               fwd("flex-nogate", [0.7969, 0.8014]),
               {"shape": "S5", "contender": "gfwagen", "mode": "fwd", "ms": 0.3, "tflops": 1.0}]
    headers, rows = bench.gate_cost_rows(results, ["S2", "S5"])
    assert rows == [["S2", "+10.6%", "+3.0% +13.6%", "+8.3%", "-26.3%", None, None]]
    # --gate-pairs: the pairs' ratios, median and quartiles, eager and replayed apart
    paired = {"shape": "S2", "contender": "gfwagen", "mode": "fwd-paired",
              "ratios": [1.01, 1.03, 1.02, 1.07, 0.99]}
    replayed = {**paired, "mode": "fwd-paired-graph", "ratios": [1.02, 1.03, 1.04, 1.01, 1.03]}
    assert bench.gate_cost_rows(results + [paired], ["S2"])[1][0][-2:] == \
        ["+2.0% (+0.0%, +5.0%)", None]
    assert bench.gate_cost_rows(results + [paired, replayed], ["S2"])[1][0][-2:] == \
        ["+2.0% (+0.0%, +5.0%)", "+3.0% (+1.5%, +3.5%)"]
    headers, rows = bench.gate_cost_rows(results[:2], ["S2"])
    assert rows[0][-2:] == [None, None]
    meta = {"date": "d", "gpu": "g", "command": "c", "versions": {}, "dtype": "bf16",
            "unavailable": {}}
    md = tmp_path / "r.md"
    bench.report(results[:3], [], ["S2"], ["gfwagen", "gfwagen-nogate", "flex-nogate"], meta,
                 md_path=str(md))
    assert "| S2 | +10.6% | +3.0% +13.6% | +8.3% | -26.3% | - | - |" in md.read_text()
    assert "The gate's cost" in capsys.readouterr().out


def test_graph_rows_separate_host_time_and_name_what_did_not_capture(tmp_path, capsys):
    """Session 28's slow host at S5: eager f+b 1.558 ms against about 1.19 ms of kernels."""
    S5 = bench.SHAPES["S5"]

    def res(c, mode, ms):
        return {"shape": "S5", "contender": c, "mode": mode, "ms": ms,
                "tflops": bench.tflops(S5, mode, ms)}

    results = [res("gfwagen", "fwdbwd", 1.558), res("gfwagen", "graph", 1.19),
               res("fla", "graph", 3.1),
               {"shape": "S5", "contender": "flex", "mode": "graph-error",
                "error": "RuntimeError: capture"}]
    headers, rows = bench.graph_rows(results, ["S1", "S5"])
    assert len(rows) == 1 and rows[0][:4] == ["S5", 1.558, 1.19, "1.31"]
    assert rows[0][4] == pytest.approx(bench.tflops(S5, "fwdbwd", 1.19))
    assert rows[0][-2:] == ["2.61x", None]
    meta = {"date": "d", "gpu": "g", "command": "c", "versions": {}, "dtype": "bf16",
            "unavailable": {}}
    md = tmp_path / "r.md"
    bench.report(results, [], ["S5"], ["gfwagen", "fla", "flex"], meta, md_path=str(md))
    text = md.read_text()
    assert "| S5 | 1.56 | 1.19 | 1.31 |" in text
    assert "- S5 flex (graph-error): RuntimeError: capture" in text
    assert "replayed from a CUDA graph" in capsys.readouterr().out


def test_head_to_head_reads_configs_and_names_what_is_wrong():
    import head_to_head as h2h

    s1 = bench.SHAPES["S1"]
    a = '{"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 3, "extra": {"tma": true}}'
    b = ('{"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2, "gated": false, '
         '"extra": {"maxnreg": 128}}')
    got = h2h.parse_configs([a, b], s1, "fwd", "bf16")
    assert [c["label"] for c in got] == ["bm64 bn32 w4 s3 tma=True",
                                         "bm64 bn64 w4 s2 maxnreg=128 (no gate)"]
    assert [c["gated"] for c in got] == [True, False]
    bad = {"{": "not JSON", "[1]": "expected a JSON object",
           '{"block_m": 24, "block_n": 32}': "block_m must be a positive power of two",
           '{"block_m": 64, "block_n": 32, "gated": 1}': "'gated' must be true or false"}
    for text, why in bad.items():
        with pytest.raises(ValueError, match="--config #2") as e:
            h2h.parse_configs([a, text], s1, "fwd", "bf16")
        assert why in str(e.value), (text, str(e.value))
    with pytest.raises(ValueError, match="maxnreg is a forward knob"):
        h2h.parse_configs([b], s1, "bwd_q", "bf16")
    with pytest.raises(ValueError, match="share a label"):
        h2h.parse_configs([a, a], s1, "fwd", "bf16")


def test_head_to_head_words_stand_for_the_default_and_the_tuned_config():
    import head_to_head as h2h

    from gfwagen.heuristics import default_config
    from gfwagen.spec import KernelConfig, KernelSpec

    s1 = bench.SHAPES["S1"]
    got = h2h.parse_configs(["default", "tuned"], s1, "bwd_kv", "fp16", group=4)
    assert [c["pick"] for c in got] == ["default", "tuned"]
    spec = KernelSpec("triton", "bwd_kv", 128, 128, 512, "fp16", True, 4)
    kin = KernelConfig(64, 64, 4, 2)
    notes = h2h.resolve_picks(got, spec, 4096, lambda sp, T: (kin, "tuned in bf16"))
    assert got[0]["config"] == default_config(spec) and got[1]["config"] == kin
    assert got[1]["label"] == "tuned: bm64 bn64 w4 s2" and "tuned in bf16" in notes[1]
    got = h2h.parse_configs(["tuned", "default"], s1, "bwd_kv", "fp16")
    h2h.resolve_picks(got, spec, 4096, lambda sp, T: (None, "no tuned entry"))
    assert got[0]["config"] == got[1]["config"] == default_config(spec)
    with pytest.raises(ValueError, match="share a label"):
        h2h.parse_configs(["tuned", "tuned"], s1, "fwd", "bf16")


def test_head_to_head_medians_rank():
    import head_to_head as h2h

    rows = h2h.summarize({"a": [(1.0, 1.1), (3.0, 1.0), (1.05, 1.2)],
                          "b": [(1.1, 0.9), (1.1, 1.0), (1.1, 1.1)]})
    # a's one slow round moves its range, not its median: a still ranks first
    assert [r["label"] for r in rows] == ["a", "b"]
    assert rows[0]["do_bench_ms"] == 1.05 and (rows[0]["min_ms"], rows[0]["max_ms"]) == (1.0, 3.0)
    assert rows[1]["timer_ms"] == 1.0 and rows[1]["rounds"] == 3


@pytest.mark.parametrize("argv,why", [
    (["--shape", "S9", "--config", "{}", "--config", "{}"], "--shape"),
    (["--config", "{}"], "two or more"),
    (["--config", "{", "--config", "{}"], "--config #1 is not JSON"),
    (["--kv-heads", "3", "--config", "default", "--config", "tuned"], "--kv-heads")])
def test_head_to_head_bad_arguments_exit_2(argv, why):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "head_to_head.py"), *argv],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and why in proc.stderr, proc.stderr


def test_tile_order_model_counts_window_tiles_and_longest_first_never_loses():
    import tile_order_model as m

    # 8 query tiles of 2 rows, W=4: each row reaches back 3 keys, so 1-3 key tiles, plus one
    assert m.tile_costs(16, 4, 2, 2) == [2, 3, 4, 4, 4, 4, 4, 4]
    assert m.makespan([3, 3, 2, 2, 2], 2) == 7 and m.makespan([3, 3, 2, 2, 2], 5) == 3
    for name, (bm, bn, per_sm) in m.TILES.items():
        runs = m.orders(bench.SHAPES[name], bm, bn)
        slots = m.SMS * per_sm
        assert m.makespan(runs["longest first"], slots) <= m.makespan(runs["launch"], slots)


def test_tvm_ab_builds_the_other_templates_version(tmp_path):
    """tvm_ab.py imports a second copy of the TVM templates as a package of its own and
    builds its forward: a change to the copy shows in what it builds, not in the current."""
    pytest.importorskip("tvm")
    import shutil

    import tvm_ab

    from gfwagen.backends import tvm_backend as tb

    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    path = tmp_path / "templates" / "tvm" / "fwd_wgmma.py"
    path.write_text(path.read_text().replace("ATOM = 64", "ATOM = 64\nAB_MARK = 1"))
    old = tvm_ab.load_old(tmp_path / "templates", "fwd_wgmma", "tvm")
    new = tb.load_template("tvm", "fwd_wgmma")
    assert old is not new and old.AB_MARK == 1 and not hasattr(new, "AB_MARK")
    built = [mod.make_forward_tc(64, 64, 512, "bf16", True, 1, tvm_ab.PINGPONG).script()
             for mod in (old, new)]
    assert built[0] == built[1] and "wgmma" in built[0]
    with pytest.raises(SystemExit, match="no tvm/fwd_wgmma.py"):
        tvm_ab.load_old(tmp_path, "fwd_wgmma", "tvm")


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--shapes", "S1,S9"]])
def test_fuse_gate_ab_bad_arguments_exit_2(argv):
    """fuse_gate_ab.py names a bad argument before it touches a GPU."""
    import fuse_gate_ab

    with pytest.raises(SystemExit) as e:
        fuse_gate_ab.main(argv)
    assert e.value.code == 2


def test_fuse_gate_ab_switches_only_the_extra():
    import fuse_gate_ab

    on = fuse_gate_ab.with_fuse(fuse_gate_ab.PINGPONG, True)
    assert on.get("fuse_gate") is True and fuse_gate_ab.square_pingpong(on)
    assert fuse_gate_ab.with_fuse(on, False) == fuse_gate_ab.PINGPONG


def test_ncu_fwd_segments_counts_per_warp_and_query_tile(tmp_path, capsys):
    """ncu_fwd.py segments: runs of equally executed SASS, per execution of the first one."""
    import ncu_fwd

    head = ["Address", "Source", "Instructions Executed"]
    rows = [("0x100", "LDC R1", 4), ("0x110", "S2R R0", 4), ("0x120", "HGMMA", 28),
            ("0x130", "BRA 0x120", 28), ("0x140", "EXIT", 4)]
    f = tmp_path / "k.csv"
    with f.open("w", newline="") as out:
        w = csv.writer(out)
        w.writerow(["Kernel Name", "gfwa_fwd_kernel"])
        w.writerow(head)
        w.writerows(rows)
    assert ncu_fwd.runs(f) == [(0, 4.0, 2), (0x20, 28.0, 2), (0x40, 4.0, 1)]
    ncu_fwd.segments([f])
    out = capsys.readouterr().out
    assert "17 per warp and query tile" in out and "2 instructions x  7.00 =     14" in out
    (tmp_path / "empty.csv").write_text('"Kernel Name","x"\n"Address","Source"\n')
    with pytest.raises(SystemExit, match="no SASS rows"):
        ncu_fwd.runs(tmp_path / "empty.csv")


def test_wgmma_wait_probe_drops_only_a_wait_between_chained_products():
    """benchmarks/wgmma_wait_ab.py: a full wait between two wgmmas of one shape on the same
    accumulator goes; one before a read of the accumulator, before a wgmma on other registers
    or across a branch stays."""
    import wgmma_wait_ab as w

    mma = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1,%r2}, %rd1, %rd2;"
    other = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r7,%r8}, %rd1, %rd2;"
    wait = "wgmma.wait_group.sync.aligned 0;"

    def ptx(*between, after=mma):
        return "\n".join([mma, "wgmma.commit_group.sync.aligned;", wait, *between,
                          "wgmma.fence.sync.aligned;", after])

    assert w.drop_chained_waits(ptx("mov.b32 %r5, 0;")) == (
        ptx("mov.b32 %r5, 0;").replace(wait + "\n", ""), 1)
    for kept in (ptx("add.f32 %r9, %r2, %r3;"), ptx(after=other), ptx("@%p1 bra $L__BB0_2;")):
        assert w.drop_chained_waits(kept) == (kept, 0)


def test_class_shape_is_the_tuning_presets_shape():
    """bench.class_shape (the benchmark scripts' d<D>w<W> names) gives each windowed class the
    shape `tune --preset classes` tuned it at, and refuses other names."""
    from cli import PRESETS

    for _name, b, t, h, _hkv, d, w in PRESETS["classes"]:
        if w:
            assert bench.class_shape(f"d{d}w{w}") == bench.Shape(b, t, h, d, w)
    with pytest.raises(SystemExit, match="d64w256"):
        bench.class_shape("S5")


def test_tvm_sass_finds_the_key_tile_loops_and_their_softmax_branches():
    """benchmarks/tvm_sass.py on a made-up listing: an outer loop around the key-tile loop
    (which it must not pick), the key-tile loop whose first forward branch jumps past one
    softmax branch (3 instructions with its closing BRA) and whose BRA jumps past the other
    (2), and the opcode counts with predicates dropped."""
    import tvm_sass

    code = ["MOV R1, R2", "HGMMA.64x128x16.F32.BF16 R88, gdesc[UR4], RZ", "@!P1 BRA 0x60",
            "ISETP.GE.U32.AND P0, PT, R1, 0x200, PT", "@P0 MUFU.EX2 R3, R4", "BRA 0x80",
            "FFMA.FTZ R3, R4, R5, -R6", "MUFU.EX2 R3, R3", "FADD.FTZ R7, R7, R3",
            "@!P0 BRA 0x10", "EXIT", "@!P2 BRA 0x0"]
    ins = [(16 * i, t) for i, t in enumerate(code)]
    (body,) = tvm_sass.key_tile_loops(ins)
    assert [a for a, _ in body] == list(range(0x10, 0xa0, 0x10))
    # a second key-tile loop after the first (split_loop's interior tiles): both, in order
    two = tvm_sass.key_tile_loops(ins[:-2] + [(0xa0, "HGMMA.64x128x16.F32.BF16 R8, gdesc[UR4]"),
                                              (0xb0, "MUFU.EX2 R3, R3"), (0xc0, "@P3 BRA 0xa0")])
    assert [len(b) for b in two] == [9, 3]
    assert tvm_sass.branches(body) == {"masked": 3, "unmasked": 2, "common": 4}
    ops = tvm_sass.opcodes(body)
    assert ops["MUFU.EX2"] == 2 and ops["BRA"] == 3 and ops["HGMMA.64x128x16.F32.BF16"] == 1


def test_tvm_knob_ab_merges_the_extras_and_checks_its_arguments():
    """benchmarks/tvm_knob_ab.py: the extras join the config's (a given one replaced, the
    result sorted, as KernelConfig keys it); per-round ratios give their median and
    quartiles; too few calls and bad JSON exit 2 before any GPU work."""
    import tvm_knob_ab

    from gfwagen.spec import KernelConfig

    cfg = KernelConfig(128, 128, 8, 3, extra=(("wgmma", True), ("pingpong", True)))
    on = tvm_knob_ab.with_extra(cfg, {"tma": True, "pingpong": False})
    assert on.extra == (("pingpong", False), ("tma", True), ("wgmma", True))
    assert (on.block_m, on.block_n, on.num_stages) == (128, 128, 3)
    assert tvm_knob_ab.with_extra(cfg, {}).extra == (("pingpong", True), ("wgmma", True))
    assert tvm_knob_ab.ratios([1, 4, 9, 16], [1, 2, 3, 4]) == "2.5000 (IQR 1.2500-3.7500)"
    for argv in (["--extra", "{}", "--calls", "3"], ["--extra", "{not json"]):
        with pytest.raises(SystemExit) as e:
            tvm_knob_ab.main(argv)
        assert e.value.code == 2


def test_graph_step_differentiates_fresh_copies_of_the_inputs():
    """The graph mode's step runs on leaves no earlier autograd graph has seen (a stale
    gradient node on the default stream breaks the capture), with the same values."""
    import torch

    q, k, v, g = (torch.randn(2, 3, requires_grad=True) for _ in range(4))
    dout = torch.ones(2, 3)

    def f(q, k, v, g):
        return q * k + v * g

    for gated, n in ((True, 4), (False, 3)):
        grads = bench.fresh_leaves_step(f, q, k, v, g, dout, gated)()
        assert len(grads) == n
        torch.testing.assert_close(grads[0], k.detach())  # d(q k)/dq, from the copies' values
        assert all(t.grad is None for t in (q, k, v, g))


def test_ratio_quartiles_of_calls_taken_together():
    a, b = [1.0, 2.0, 3.0, 4.0, 6.0], [1.0, 1.0, 1.0, 1.0, 1.0]
    assert bench.ratio_quartiles(a, b) == (1.5, 3.0, 5.0)  # quantiles' exclusive method
    with pytest.raises(ValueError):
        bench.ratio_quartiles(a, b[:4])  # calls are paired: the lists must match
    import tvm_knob_ab

    assert tvm_knob_ab.ratios(a, b) == "3.0000 (IQR 1.5000-5.0000)"
