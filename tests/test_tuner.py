"""The tuner end to end on the CPU: fake timer, candidate worker subprocesses, injected
faults (compile error, crash, hang, wrong result), the TuningDB and a shared journal study."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import torch

from gfwagen.db import TuningDB
from gfwagen.heuristics import default_config
from gfwagen.spec import KernelConfig, Problem
from gfwagen.tuner import space
from gfwagen.tuner.study import (
    DUEL_EXTENSION,
    StudyResult,
    TuneJob,
    duel_round,
    duel_settled,
    is_measurement,
    run,
    run_on_devices,
    storage_for,
    with_duel,
)
from gfwagen.tuner.timing import FakeTimer, summarize
from gfwagen.tuner.worker import INJECT_ENV, CandidateWorker

PROB = Problem(2, 512, 4, 2, 64, 64, 128, "bf16", True)
FAST = FakeTimer.OPTIMUM  # the fake timer's fastest config


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("GFWAGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GFWAGEN_DB", str(tmp_path / "default.sqlite"))
    monkeypatch.delenv(INJECT_ENV, raising=False)


def trials(db_path):
    with TuningDB(db_path, readonly=True) as db:
        return [dict(r) for r in db.db.query("SELECT * FROM trials ORDER BY created_at")]


def test_space_and_resources():
    for p in ("fwd", "bwd_kv", "bwd_q"):
        spec = PROB.spec("triton", p)
        names = space.params("triton", p)
        assert names["block_m"] == (16, 32, 64, 128, 256) and names["num_stages"] == (1, 2, 3,
                                                                                         4, 5)
        d = space.default(spec)
        assert space.feasible(spec, d)[0]
        assert space.config_from_params(spec, space.config_params(spec, d)) == d
        big = KernelConfig(256, 256, 4, 5)
        ok, why = space.feasible(spec.replace(head_dim=256, value_dim=256), big)
        assert not ok and "pruned" in why and max(space.violations(spec, big)) > 0
        base = space.enumerate_configs(spec, knobs=())
        n = len(base)
        assert 0 < n < 250
        # each switch doubles the space; "off" is the config without the switch. bias_mma
        # (the forward) adds the square tiles only: elsewhere it is the same config, once
        square = sum(c.block_m == c.block_n for c in base) if p == "fwd" else 0
        assert len(space.enumerate_configs(spec)) == 2 * (n + square)
        # all knobs: tma and prefetch_gate everywhere (the problem is gated), full_masks
        # where the masks can split (the forward and dq)
        switches = tuple(k for k in space.KNOBS if k not in space.KNOB_CHOICES
                         and k != "bias_mma")
        every = 2 ** len(space.knobs_for(spec, switches))
        assert every == (8 if p != "bwd_kv" else 4)
        assert len(space.enumerate_configs(spec, knobs=switches)) == every * n
        assert space.default(spec) == space.default(spec, ()) == default_config(spec)
    with pytest.raises(ValueError, match="unknown knob"):
        space.knobs_for(PROB.spec("triton", "fwd"), ("warp_spec",))
    with pytest.raises(ValueError, match="bwd_q"):
        space.params("tvm", "bwd_q")


def test_fp32_space_keeps_tiles_its_ieee_dots_fit():
    """fp32's dots hold both operands in registers: tiles over 8 scores per thread (which
    spilled in the offline sweep) are pruned, the defaults and smaller tiles are not, and the
    same tiles in bf16 are untouched."""
    for p in ("fwd", "bwd_kv", "bwd_q"):
        for d in (64, 128, 256):
            spec = PROB.spec("triton", p).replace(head_dim=d, value_dim=d, dtype="fp32")
            assert space.feasible(spec, space.default(spec))[0]
            assert space.default(spec) == default_config(spec)
            ok, why = space.feasible(spec, KernelConfig(64, 32, 4, 2))
            assert not ok and "registers" in why, (p, d, why)
            assert not space.feasible(spec, KernelConfig(64, 64, 8, 2))[0]
            # 1024 scores on 4 warps: fit up to head dim 128, spilled at 256
            assert space.feasible(spec, KernelConfig(32, 32, 4, 2))[0] == (d <= 128)
            assert space.feasible(spec.replace(dtype="bf16"), KernelConfig(64, 32, 4, 2))[0]


def test_the_ptxas_trap_is_pruned_and_nothing_shipped_is_one():
    """space.ptxas_trap: the gated dk/dv kernel (and the stored-dS one) at 64x32 at head dims
    192-256, or 128x32 at 128, with tma and four warps; not without tma, at eight warps,
    ungated, at other tiles, or in other passes. No default and no shipped entry is one."""
    import json

    from gfwagen.db.lookup import shipped_files
    from gfwagen.spec import KernelSpec

    trap = KernelConfig(64, 32, 4, 2, extra=(("tma", True),))
    for p in ("bwd_kv", "bwd_ds"):
        for d in (192, 256):
            spec = KernelSpec("triton", p, d, d, 8192, "bf16", True, 1)
            ok, why = space.feasible(spec, trap)
            assert not ok and "32 registers" in why
            assert space.feasible(spec, KernelConfig(64, 32, 4, 2))[0]
            assert space.feasible(spec, KernelConfig(64, 32, 8, 2, extra=trap.extra))[0]
            assert space.feasible(spec.replace(gated=False), trap)[0]
        spec = KernelSpec("triton", p, 128, 128, 1024, "fp16", True, 4)
        assert space.ptxas_trap(spec, KernelConfig(128, 32, 4, 3, extra=trap.extra))
        assert not space.ptxas_trap(spec, KernelConfig(64, 32, 4, 3, extra=trap.extra))
    assert not space.ptxas_trap(KernelSpec("triton", "bwd_q", 256, 256, 8192, "bf16", True,
                                           1), trap)
    for d in (64, 128, 192, 256):
        for p in ("bwd_kv", "bwd_ds"):
            spec = KernelSpec("triton", p, d, d, 1024, "bf16", True, 1)
            assert not space.ptxas_trap(spec, default_config(spec))
    for path in shipped_files():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("kind") == "trial":
                spec, cfg = KernelSpec(**r["spec"]), KernelConfig.from_dict(r["config"])
                assert not space.ptxas_trap(spec, cfg), r


def test_tvm_space_on_a_gpu(monkeypatch):
    """On a GPU the TVM forward's space is the tensor-core template's: its default first,
    stages and softmax steps searched, every enumerated config one the template runs; the
    CPU space and the CUDA-core passes keep block_m x block_n. (An sm_80: sm_90 adds the
    warpgroup-MMA template, tests/test_tvm_backend.py.)"""
    pytest.importorskip("tvm")
    from gfwagen.backends import tvm_backend

    monkeypatch.setattr(tvm_backend, "device_arch", lambda: "sm_80")

    spec = PROB.spec("tvm", "fwd")  # bf16, D = 64
    names = space.params("tvm", "fwd", space.knobs_for(spec, None, gpu=True))
    assert names["num_stages"] == (1, 2, 3) and names["x_sub_n"] == (16, 32, 64)
    assert names["x_warp_m"] == (1, 2) and names["x_q_smem"] == (False, True)
    d = space.default(spec, gpu=True)
    assert d == tvm_backend.DEFAULT_CUDA_TC_CONFIG
    assert space.config_from_params(spec, space.config_params(spec, d, gpu=True), gpu=True) == d
    configs = space.enumerate_configs(spec, gpu=True)
    assert d in configs and all(tvm_backend.tensor_core_forward(spec, c) for c in configs)
    assert {c.num_stages for c in configs} == {1, 2}
    # the knobs at their defaults are left out (the config keys of earlier studies hold)
    for c in configs:
        assert space.config_from_params(spec, space.config_params(spec, c, gpu=True),
                                        gpu=True) == c
        assert c.get("warp_m") in (None, 2) and c.get("q_smem") in (None, True)
    assert any(c.get("warp_m") == 2 and not c.get("q_smem") for c in configs)  # D = 64
    # at D = 128 two row blocks per warp come only with Q in shared memory (registers)
    two = [c for c in space.enumerate_configs(spec.replace(head_dim=128, value_dim=128), gpu=True)
           if c.get("warp_m") == 2]
    assert two and all(c.get("q_smem") for c in two)
    assert "num_stages" not in space.params("tvm", "fwd", space.knobs_for(spec))  # the CPU
    assert space.default(spec) == tvm_backend.DEFAULT_CPU_CONFIG
    kv = spec.replace(pass_="bwd_kv")
    assert space.default(kv, gpu=True) == tvm_backend.default_cuda_config(kv)
    assert set(space.params("tvm", "bwd_kv", space.knobs_for(kv, None, gpu=True))) == {
        "block_m", "block_n"}


def test_fake_timer_and_summary():
    spec = PROB.spec("triton", "fwd")
    t = FakeTimer()
    a = t.synthetic_ms(spec, KernelConfig(**FAST))
    assert a == t.synthetic_ms(spec, KernelConfig(**FAST))
    assert all(a < t.synthetic_ms(spec, c) for c in space.enumerate_configs(spec)
               if c != KernelConfig(**FAST))
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s.median_ms == 3.0 and s.repeats == 5 and s.spread > 0


def test_study_records_faults_and_never_picks_them(tmp_path, monkeypatch):
    wrong = dict(FAST)
    crash = {**FAST, "num_stages": 2}
    hang = {**FAST, "num_warps": 4}
    comp = {**FAST, "block_m": 64}
    rules = [{"match": wrong, "fault": "wrong"}, {"match": crash, "fault": "crash"},
             {"match": hang, "fault": "hang"}, {"match": comp, "fault": "compile"}]
    monkeypatch.setenv(INJECT_ENV, json.dumps(rules))
    db = tmp_path / "t.sqlite"
    job = TuneJob(PROB, "triton", "fwd", 6, mode="fake", timeout=6.0, db_path=str(db), seed=0,
                  enqueue=(wrong, crash, hang, comp))
    res = run(job)
    rows = trials(db)
    study = optuna.load_study(study_name=res.study_name, storage=storage_for(job))
    again = [t for t in study.get_trials() if "duplicate_of" in t.user_attrs]
    assert res.trials == 6 and len(rows) == 6 - len(again), rows  # repeats not re-measured
    default = space.default(PROB.spec("triton", "fwd"))
    assert json.loads(rows[0]["config_json"]) == default.as_dict()  # trial 0: the default
    status = {json.dumps(json.loads(r["config_json"]), sort_keys=True): r for r in rows}

    def row(c):
        return status[json.dumps(KernelConfig(**c).as_dict(), sort_keys=True)]

    assert row(wrong)["status"] == "wrong" and "relative error" in row(wrong)["reason"]
    assert row(crash)["status"] == "failed" and "status 7" in row(crash)["reason"]
    assert row(hang)["status"] == "timeout" and "killed" in row(hang)["reason"]
    assert row(comp)["status"] == "failed" and "injected compile" in row(comp)["reason"]
    assert res.statuses.get("ok", 0) >= 1 and res.best_config is not None, res.statuses
    assert res.best_config.as_dict() not in [KernelConfig(**c).as_dict()
                                             for c in (wrong, crash, hang, comp)]
    with TuningDB(db, readonly=True) as tdb:
        best = tdb.best_entries()
    assert len(best) == 1 and best[0]["config"] == res.best_config.as_dict()
    assert res.default_ms is not None and res.best_ms <= res.default_ms


def test_two_processes_share_a_journal_study(tmp_path):
    db = tmp_path / "t.sqlite"
    job = TuneJob(PROB, "triton", "bwd_q", 5, mode="fake", db_path=str(db), seed=3,
                  storage=str(tmp_path / "study.journal"))
    res = run_on_devices(job, [0, 1])  # shares of 3 and 2 trials
    study = optuna.load_study(study_name=res.study_name, storage=storage_for(job))
    done = [t for t in study.get_trials() if t.state.is_finished()]
    # --trials counts measurements; a proposal one process makes of a config the other just
    # measured is answered from the study (a finished trial, not a measurement), and whether
    # that happens depends on the two processes' timing
    measured = [t for t in done if is_measurement(t)]
    assert len(measured) == 5 == res.trials
    assert len(trials(db)) == len(measured)
    assert done[0].user_attrs.get("default")


def test_search_design_and_refinements():
    """The initial design: one feasible config per tile, the default's pipeline, nearest
    tiles first; the refinement: the untried pipelines of the best measured tile first."""
    from gfwagen.tuner import search

    spec = PROB.spec("triton", "bwd_kv")
    d = space.default(spec)
    tiles = search.design(spec, d, 100)
    assert len({search.tile_of(c) for c in tiles}) == len(tiles) > 10
    assert search.tile_of(d) not in {search.tile_of(c) for c in tiles}
    assert all((c.num_stages, c.extra) == (d.num_stages, d.extra) for c in tiles)
    assert all(space.feasible(spec, c)[0] for c in tiles)
    dist = [sum(abs(math.log2(a) - math.log2(b)) for a, b in
                zip(search.tile_of(c), search.tile_of(d), strict=True)) for c in tiles]
    assert dist == sorted(dist) and search.design(spec, d, 3) == tiles[:3]
    fast, slow = tiles[0], tiles[1]
    ref = search.refinements(spec, {fast: 1.0, slow: 2.0}, {d, fast, slow})
    assert ref and search.tile_of(ref[0]) == search.tile_of(fast)
    assert fast not in ref and {search.tile_of(c) for c in ref} == {search.tile_of(fast),
                                                                    search.tile_of(slow)}


def test_refine_tries_the_databases_best_and_its_knob_flips_first(tmp_path):
    """--refine: after the default, the database's own best for the problem, then it with
    each searched knob flipped (prefetch_gate newly searched here), then the usual search."""
    db = tmp_path / "r.sqlite"
    first = run(TuneJob(PROB, "triton", "fwd", 4, mode="fake", timeout=30.0, db_path=str(db),
                        seed=0))
    best = first.best_config
    job = TuneJob(PROB, "triton", "fwd", 5, mode="fake", timeout=30.0, db_path=str(db),
                  seed=1, refine=True, knobs=("tma", "prefetch_gate"), study_name="refined")
    run(job)
    study = optuna.load_study(study_name="refined", storage=storage_for(job))
    spec = PROB.spec("triton", "fwd")
    tried = [space.config_from_params(spec, t.params) for t in study.get_trials()]

    def flip(c, k):
        return KernelConfig(c.block_m, c.block_n, c.num_warps, c.num_stages,
                            tuple((n, v) for n, v in c.extra if n != k) + ((k, not c.get(k)),))

    want = [c for c in (best, flip(best, "tma"), flip(best, "prefetch_gate"))
            if c != tried[0] and space.feasible(spec, c)[0]]
    assert want and [c.as_dict() for c in tried[1:1 + len(want)]] == [c.as_dict() for c in want]
    # TVM's tensor-core parameters are not switches: nothing to flip there
    from gfwagen.tuner import search

    tvm_spec = PROB.spec("tvm", "fwd")
    cfg = KernelConfig(64, 64, 4, 1)
    assert search.knob_flips(cfg, tvm_spec, (space.TENSOR_CORE,), True) == [cfg]


def test_bias_mma_knob_for_the_gated_bf16_forward_with_square_tiles():
    """bias_mma: searched by default for the gated bf16 forward only; left out of a config
    whose tiles are not square (the forward reads the gate tables there: the same config);
    its pieces' pipelined tiles count in the shared-memory estimate; a backward refuses it."""
    from gfwagen.generator import check_config

    fwd = PROB.spec("triton", "fwd")
    assert "bias_mma" in space.knobs_for(fwd)
    assert all("bias_mma" not in space.knobs_for(PROB.spec("triton", p), ("bias_mma",))
               for p in ("bwd_kv", "bwd_q", "bwd_ds"))
    for other in (Problem(2, 512, 4, 2, 64, 64, 128, "bf16", False),
                  Problem(2, 512, 4, 2, 64, 64, 128, "fp16", True)):
        assert space.knobs_for(other.spec("triton", "fwd"), ("bias_mma",)) == ()
    vals = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2, "x_bias_mma": True}
    square = space.config_from_params(fwd, vals)
    assert square.get("bias_mma") is True
    assert space.config_params(fwd, square)["x_bias_mma"] is True
    assert space.config_from_params(fwd, {**vals, "block_m": 128}).get("bias_mma") is None
    plain = space.config_from_params(fwd, {**vals, "x_bias_mma": False})
    assert space.resources(fwd, square)["smem"] == space.resources(fwd, plain)["smem"] + 2 * 64 * 32
    with pytest.raises(ValueError, match="forward knob"):
        check_config(PROB.spec("triton", "bwd_kv"), KernelConfig(64, 64, 4, 2,
                                                                 extra=(("bias_mma", True),)))
    # --refine flips it on a square best only (elsewhere the flip is the same kernel)
    from gfwagen.tuner import search

    wide = KernelConfig(128, 64, 4, 2, extra=(("tma", True),))
    assert [c.get("bias_mma") for c in search.knob_flips(wide, fwd, ("tma", "bias_mma"),
                                                           True)] == [None, None]
    assert search.knob_flips(plain, fwd, ("bias_mma",), True)[1] == square


def test_maxnreg_knob_caps_the_forward_only():
    """maxnreg: three choices for the forward (off first), none for the backward; a capped
    config whose estimated registers pass the cap is pruned naming it; off is left out of
    the config; the generator refuses a cap it cannot pass to the compiler."""
    from gfwagen.backends import triton_backend as tb
    from gfwagen.generator import check_config

    fwd = PROB.spec("triton", "fwd")
    assert space.knobs_for(fwd, ("maxnreg",)) == ("maxnreg",)
    assert all(space.knobs_for(PROB.spec("triton", p), ("maxnreg",)) == ()
               for p in ("bwd_kv", "bwd_q", "bwd_ds"))
    names = space.params("triton", "fwd", ("maxnreg",))
    assert names["x_maxnreg"] == (False, 128, 168)
    cfg = space.config_from_params(fwd, {"block_m": 64, "block_n": 64, "num_warps": 4,
                                         "num_stages": 2, "x_maxnreg": False})
    assert cfg.get("maxnreg") is None
    capped = space.config_from_params(fwd, {"block_m": 64, "block_n": 64, "num_warps": 4,
                                            "num_stages": 2, "x_maxnreg": 128})
    assert capped.get("maxnreg") == 128
    assert space.config_params(fwd, capped, ("maxnreg",))["x_maxnreg"] == 128
    big = KernelConfig(128, 128, 4, 2, extra=(("maxnreg", 128),))
    ok, why = space.feasible(fwd, big)
    assert not ok and "registers" in why and space.feasible(fwd, KernelConfig(128, 128, 4, 2))[0]
    every = space.enumerate_configs(fwd, knobs=("maxnreg",))
    off = [c for c in every if c.get("maxnreg") is None]
    assert len(off) < len(every) < 3 * len(off)
    assert all(space.resources(fwd, c)["registers"] <= c.get("maxnreg")
               for c in every if c.get("maxnreg"))
    for bad in (100, 0, 300, "128", True):
        with pytest.raises(ValueError, match="maxnreg"):
            check_config(fwd, KernelConfig(64, 64, 4, 2, extra=(("maxnreg", bad),)))
    with pytest.raises(ValueError, match="forward knob"):
        check_config(PROB.spec("triton", "bwd_q"), KernelConfig(64, 64, 4, 2,
                                                                extra=(("maxnreg", 128),)))
    assert tb._maxnreg(capped, torch.zeros(1)) is None  # the interpreter takes no such option


def test_duel_re_times_the_two_fastest_alternately_and_the_database_pools_them(tmp_path):
    db = tmp_path / "d.sqlite"
    job = TuneJob(PROB, "triton", "fwd", 4, mode="fake", timeout=30.0, db_path=str(db), seed=0,
                  duel=2)
    res = run(job)
    rows = trials(db)
    spec = PROB.spec("triton", "fwd")
    timer = FakeTimer()
    searched = {KernelConfig.from_dict(json.loads(r["config_json"])) for r in rows[:-4]}
    a, b = sorted(searched, key=lambda c: timer.synthetic_ms(spec, c))[:2]
    duel = [KernelConfig.from_dict(json.loads(r["config_json"])) for r in rows[-4:]]
    assert duel == [b, a, a, b], duel  # each round swaps who goes first
    assert all(r["status"] == "ok" for r in rows[-4:])
    assert res.best_config == a and len(res.duel) == 2
    assert all(len(ts) == 3 for ts in res.duel.values())  # the search's timing and two more
    with TuningDB(db, readonly=True) as tdb:
        best = tdb.best_entries()
    assert [e["config"] for e in best] == [a.as_dict()]


def test_a_duel_within_its_timings_spread_goes_on(tmp_path, monkeypatch):
    """Session 44's S2: medians 1.6% apart, timings spread 5-7%: undecided. S3's: settled."""
    s2 = {"bias_mma": [0.500, 0.548, 0.541, 0.543], "plain": [0.523, 0.530, 0.523, 0.558]}
    s3 = {"bias_mma": [0.5395, 0.5384, 0.5571, 0.5726], "plain": [0.5721, 0.5942, 0.5964, 0.5644]}
    assert not duel_settled(s2) and duel_settled(s3)
    assert duel_settled({"a": [1.0], "b": [1.0, 1.0, 1.0]})  # a failed its re-timings
    # timings that swing +-20% around each config's own time: the duel takes all its extra
    # rounds, alternating as before (the worker process times; its results swing here)
    real, calls = CandidateWorker.run, {}

    def swinging(self, problem, backend, pass_, config, warm=False):
        res = real(self, problem, backend, pass_, config, warm)
        calls[config] = calls.get(config, 0) + 1
        if res.median_ms is not None:
            res.median_ms *= 1.2 if calls[config] % 2 else 0.8
        return res

    monkeypatch.setattr(CandidateWorker, "run", swinging)
    db = tmp_path / "d.sqlite"
    res = run(TuneJob(PROB, "triton", "fwd", 4, mode="fake", timeout=30.0, db_path=str(db),
                      seed=0, duel=2))
    assert all(len(ts) == 1 + 2 * DUEL_EXTENSION for ts in res.duel.values()), res.duel
    rows = trials(db)[-4 * DUEL_EXTENSION:]
    order = [KernelConfig.from_dict(json.loads(r["config_json"])) for r in rows]
    b, a = order[:2]
    assert order == [b, a, a, b] * DUEL_EXTENSION


def test_duel_winner_is_the_lower_median_and_can_overturn_the_search(tmp_path):
    a, b = KernelConfig(128, 128, 8, 3), KernelConfig(128, 128, 8, 3, extra=(("tma", True),))
    assert [c for r in range(3) for c in duel_round([a, b], r)] == [b, a, a, b, b, a]
    res = StudyResult("s", PROB, "triton", "fwd", 2, {"ok": 2}, a, 1.0, 2.0)
    # the search timed a faster once; re-timed alternately, b is the faster
    out = with_duel(res, {a: [1.0, 1.1, 1.1], b: [1.05, 1.0, 1.0]})
    assert out.best_config == b and out.best_ms == 1.0 and out.default_ms == 2.0
    db = tmp_path / "p.sqlite"
    with TuningDB(db) as tdb:
        for cfg, ms in ((a, 1.0), (b, 1.05), (b, 1.0), (a, 1.1), (a, 1.1), (b, 1.0)):
            tdb.record_trial(PROB, "triton", "fwd", cfg, median_ms=ms)
        assert [e["config"] for e in tdb.best_entries()] == [b.as_dict()]
