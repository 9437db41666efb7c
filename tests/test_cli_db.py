"""`gfwagen db ...` and `gfwagen doctor` through click's CliRunner: data on stdout, logs on
stderr, exit codes 0 / 1 (runtime) / 2 (usage) / 3 (no GPU)."""

from __future__ import annotations

import dataclasses
import json
import sqlite3

import pytest
import torch
from click.testing import CliRunner

from cli import main
from gfwagen.db import TuningDB, reset_snapshot
from gfwagen.heuristics import default_config
from gfwagen.spec import KernelConfig, Problem

H200 = {"kind": "cuda", "name": "NVIDIA H200", "compute_capability": "9.0", "sm_count": 132,
        "memory_bytes": 150_000_000_000, "driver_version": "12.8", "cuda_version": "12.8",
        "processor": None}
H100 = {**H200, "name": "NVIDIA H100 80GB HBM3"}
TC = {"torch": "2.13.0", "triton": "3.6.0", "tvm": None}
PROB = Problem(2, 4096, 16, 4, 128, 128, 1000, "bf16", True)
WHICH = ["db", "which", "--head-dim", "128", "--seqlen", "4096", "--heads", "16", "--kv-heads",
         "4", "--window", "1000"]


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    db = tmp_path / "cache" / "tuning.sqlite"
    monkeypatch.setenv("GFWAGEN_DB", str(db))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "shipped").mkdir()
    monkeypatch.setenv("GFWAGEN_TUNING_DB_DIR", str(tmp_path / "shipped"))
    reset_snapshot()
    yield db
    reset_snapshot()


@pytest.fixture
def runner():
    return CliRunner()


def fill(path, host="host-a", device=H200, n=3):
    with TuningDB(path) as db:
        for i in range(n):
            db.record_trial(PROB, "triton", "fwd", KernelConfig(block_m=32 << i),
                            median_ms=1.0 + i, spread=0.02, device=device,
                            toolchain_versions=TC, host=host,
                            created_at=f"2025-02-01T00:00:0{i}+00:00")
        db.record_trial(PROB, "triton", "fwd", KernelConfig(block_m=16), median_ms=0.1,
                        status="failed", reason="compile error", device=device,
                        toolchain_versions=TC, host=host, created_at="2025-02-01T00:01:00+00:00")


def dump(path):
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


@pytest.mark.parametrize("args", [[], ["db"], ["db", "show"], ["db", "export"], ["db", "import"],
                                  ["db", "merge"], ["db", "which"], ["doctor"]])
def test_help_everywhere(runner, args):
    for flag in ("--help", "-h"):
        r = runner.invoke(main, [*args, flag])
        assert r.exit_code == 0, r.output
        assert "Usage:" in r.stdout


def test_show_empty_does_not_create(runner, env):
    r = runner.invoke(main, ["db", "show"])
    assert r.exit_code == 0, r.output
    assert "trials: 0" in r.stdout and "no tuning database" in r.stderr
    assert not env.exists()


def test_show_table_and_json(runner, env):
    fill(env)
    before = dump(env)
    r = runner.invoke(main, ["db", "show"])
    assert r.exit_code == 0, r.output
    assert "trials: 4" in r.stdout and "best: 1" in r.stdout
    assert "h200" in r.stdout and "bm32 bn64 w4 s2" in r.stdout and "1024" in r.stdout
    r = runner.invoke(main, ["db", "show", "--db", str(env), "--format", "json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["counts"] == {"devices": 1, "toolchains": 1, "trials": 4, "best": 1}
    (best,) = data["best"]
    assert best["config"]["block_m"] == 32 and best["model"] == "h200"
    assert dump(env) == before  # show only reads


def test_export_import_roundtrip(runner, env, tmp_path):
    fill(env)
    out = tmp_path / "out.jsonl"
    r = runner.invoke(main, ["db", "export", str(out)])
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and "4 trials" in r.stderr
    r = runner.invoke(main, ["db", "export", "-"])
    assert r.exit_code == 0 and r.stdout.encode() == out.read_bytes()

    other = tmp_path / "other.sqlite"
    r = runner.invoke(main, ["db", "import", str(out), "--db", str(other)])
    assert r.exit_code == 0, r.output
    assert "4 new trials" in r.stderr
    after_first = dump(other)
    r = runner.invoke(main, ["db", "import", str(out), "--db", str(other)])
    assert r.exit_code == 0 and "0 new trials (4 already present)" in r.stderr
    assert dump(other) == after_first
    again = tmp_path / "again.jsonl"
    assert runner.invoke(main, ["db", "export", str(again), "--db", str(other)]).exit_code == 0
    assert again.read_bytes() == out.read_bytes()


def test_export_best_only_keeps_what_the_lookup_reads(runner, env, tmp_path):
    fill(env)
    out = tmp_path / "best.jsonl"
    r = runner.invoke(main, ["db", "export", str(out), "--best-only"])
    assert r.exit_code == 0 and "1 trials" in r.stderr
    other = tmp_path / "other.sqlite"
    assert runner.invoke(main, ["db", "import", str(out), "--db", str(other)]).exit_code == 0
    with TuningDB(env, readonly=True) as a, TuningDB(other, readonly=True) as b:
        keep = ("config", "median_ms", "seqlen_bucket", "spec")
        assert [{k: e[k] for k in keep} for e in a.best_entries()] == \
            [{k: e[k] for k in keep} for e in b.best_entries()]


def test_export_newest_drops_what_a_retune_superseded(runner, env, tmp_path):
    """--newest: a problem re-tuned under a newer toolchain ships only that toolchain's best;
    a problem only the old toolchain measured keeps its entry."""
    fill(env)  # PROB under TC, best block_m 32 at 1.0 ms
    other_prob = Problem(2, 4096, 16, 4, 128, 128, 256, "bf16", True)
    new_tc = {**TC, "timer": "sustained-1"}
    with TuningDB(env) as db:
        db.record_trial(other_prob, "triton", "fwd", KernelConfig(block_m=64), median_ms=2.0,
                        device=H200, toolchain_versions=TC, created_at="2025-02-01T00:00:05+00:00")
        # slower than the old best: a newer measurement wins by date, not by median
        db.record_trial(PROB, "triton", "fwd", KernelConfig(block_m=128), median_ms=1.5,
                        device=H200, toolchain_versions=new_tc,
                        created_at="2025-03-01T00:00:00+00:00")
    out, both = tmp_path / "newest.jsonl", tmp_path / "both.jsonl"
    r = runner.invoke(main, ["db", "export", str(out), "--newest"])
    assert r.exit_code == 0, r.output
    assert runner.invoke(main, ["db", "export", str(both), "--best-only"]).exit_code == 0
    trials = [json.loads(x) for x in out.read_text().splitlines()]
    trials = [t for t in trials if t["kind"] == "trial"]
    got = sorted((t["problem"]["window"], t["config"]["block_m"]) for t in trials)
    assert got == [(256, 64), (1000, 128)]
    assert sum(json.loads(x)["kind"] == "trial" for x in both.read_text().splitlines()) == 3
    other = tmp_path / "other.sqlite"
    r = runner.invoke(main, ["db", "import", str(out), "--db", str(other)])
    assert r.exit_code == 0 and "2 new trials" in r.stderr


def test_best_exports_carry_only_the_toolchains_their_trials_use(runner, env, tmp_path):
    """--best-only and --newest write the devices and toolchains their trials reference: a
    toolchain whose every problem a later one re-tuned leaves the shipped file; the full
    export keeps it, and each file imports."""
    fill(env)  # PROB under TC
    new_tc = {**TC, "timer": "sustained-1"}
    with TuningDB(env) as db:
        db.record_trial(PROB, "triton", "fwd", KernelConfig(block_m=128), median_ms=1.5,
                        device=H200, toolchain_versions=new_tc,
                        created_at="2025-03-01T00:00:00+00:00")
    counts = {}
    for flag in ("--newest", "--best-only", None):
        out = tmp_path / f"{flag}.jsonl"
        args = ["db", "export", str(out)] + ([flag] if flag else [])
        assert runner.invoke(main, args).exit_code == 0
        recs = [json.loads(x) for x in out.read_text().splitlines()]
        counts[flag] = sum(r["kind"] == "toolchain" for r in recs)
        used = {r["toolchain_key"] for r in recs if r["kind"] == "trial"}
        assert used <= {r["key"] for r in recs if r["kind"] == "toolchain"}
        assert runner.invoke(main, ["db", "import", str(out), "--db",
                                    str(tmp_path / f"{flag}.sqlite")]).exit_code == 0
    assert counts == {"--newest": 1, "--best-only": 2, None: 2}


def test_retune_after_a_template_edit_replaces_the_old_medians(runner, env, tmp_path):
    """The same config measured before and after a template edit: the two are different
    toolchains (the templates' hash), so the re-tune's median is the one --newest ships, not
    the median of both (the database pooled them until session 19)."""
    old_tc = {**TC, "timer": "sustained-1", "templates": "0" * 16}
    new_tc = {**old_tc, "templates": "1" * 16}
    cfg = KernelConfig(block_m=128)
    with TuningDB(env) as db:
        db.record_trial(PROB, "tvm", "fwd", cfg, median_ms=0.76, spread=0.01, device=H200,
                        toolchain_versions=old_tc, created_at="2025-02-01T00:00:00+00:00")
        db.record_trial(PROB, "tvm", "fwd", cfg, median_ms=0.67, spread=0.01, device=H200,
                        toolchain_versions=new_tc, created_at="2025-03-01T00:00:00+00:00")
    out = tmp_path / "newest.jsonl"
    assert runner.invoke(main, ["db", "export", str(out), "--newest"]).exit_code == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    (trial,) = [t for t in rows if t["kind"] == "trial"]
    tcs = {r["key"]: r["toolchain"] for r in rows if r["kind"] == "toolchain"}
    assert trial["median_ms"] == 0.67 and tcs[trial["toolchain_key"]]["templates"] == "1" * 16


def test_shipped_h200_database_is_used_and_runnable():
    """tuning_db/h200.jsonl: every entry is a config its template accepts, and an H200 at S1
    and at full causal attention gets the tuned configs from it (no user database), with
    backend="auto" on TVM's forward where that was measured faster."""
    from pathlib import Path

    from gfwagen.db.lookup import Snapshot
    from gfwagen.generator import check_config
    from gfwagen.spec import KernelSpec

    path = Path(__file__).resolve().parents[1] / "tuning_db" / "h200.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    (device,) = [x for x in lines if x["kind"] == "device"]
    trials = [x for x in lines if x["kind"] == "trial"]
    # best-only (one measurement per problem and pass of a backend), so it stays small
    # however often the GPU is re-tuned: 176 of them were 122 kB
    assert len(trials) >= 15 and path.stat().st_size < 160_000
    measured = [json.dumps([t["spec"], t["problem"]], sort_keys=True) for t in trials]
    assert len(set(measured)) == len(measured)
    for t in trials:
        spec = KernelSpec(**t["spec"])
        check_config(spec, KernelConfig.from_dict(t["config"]))
    snap = Snapshot.load(False, shipped=[path])
    fp = device["fingerprint"]
    for pass_ in ("fwd", "bwd_kv", "bwd_q"):
        spec = KernelSpec("triton", pass_, 128, 128, 512, "bf16", True, 1)
        cfg, why = snap.lookup(spec, 4096, fp)
        assert cfg is not None and cfg != default_config(spec) and "h200" in why
        for d in (64, 128, 256):  # full causal attention (window 0), tuned at T = 8192
            spec = KernelSpec("triton", pass_, d, d, 0, "bf16", True, 1)
            for seqlen in (8192, 20000):
                cfg, why = snap.lookup(spec, seqlen, fp)
                assert cfg is not None and "h200" in why, (spec, seqlen, why)
    # TVM's pingpong forward: full causal and long windows at head dim 128, gated or not
    from gfwagen.dispatch import faster_backend

    for window, gated in ((0, True), (0, False), (8192, True), (2048, False)):
        spec = KernelSpec("triton", "fwd", 128, 128, window, "bf16", gated, 1)
        assert faster_backend(snap, spec, 8192, fp).backend == "tvm", (window, gated)


def test_export_without_database_fails(runner, env, tmp_path):
    r = runner.invoke(main, ["db", "export", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 1 and "no tuning database" in r.stderr
    assert not env.exists()


def test_import_bad_file_exit_1_unchanged(runner, env, tmp_path):
    fill(env)
    before = dump(env)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "gfwagen-tuning-db", "kind": "header", "schema_version": 1}\n'
                   '{"kind": "trial", "id": "x"\n')
    r = runner.invoke(main, ["db", "import", str(bad)])
    assert r.exit_code == 1
    assert "not valid JSON" in r.stderr and r.stdout == ""
    assert dump(env) == before
    r = runner.invoke(main, ["db", "import", str(tmp_path / "missing.jsonl")])
    assert r.exit_code == 2  # click's own check: a usage error


def test_merge(runner, env, tmp_path):
    fill(env, host="host-a")
    other = tmp_path / "b.sqlite"
    fill(other, host="host-b", device=H100)
    r = runner.invoke(main, ["db", "merge", str(other)])
    assert r.exit_code == 0, r.output
    assert "4 new trials" in r.stderr
    with TuningDB(env) as db:
        assert db.counts() == {"devices": 2, "toolchains": 1, "trials": 8, "best": 2}
        assert {r["host"] for r in db.db.query("SELECT host FROM trials")} == {"host-a", "host-b"}
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"junk" * 1000)
    before = dump(env)
    r = runner.invoke(main, ["db", "merge", str(junk)])
    assert r.exit_code == 1 and "not a readable SQLite" in r.stderr
    assert dump(env) == before


def test_which_heuristic_fallback(runner, env):
    r = runner.invoke(main, WHICH + ["--format", "json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    spec = PROB.spec("triton", "fwd")
    assert data["tuned"] is False and data["reason"].startswith("no tuned entry")
    assert data["config"] == default_config(spec).as_dict()
    assert not env.exists()  # which never writes


def test_which_tuned_and_fallback_levels(runner, env, tmp_path):
    fill(env)
    fp = tmp_path / "fp.json"
    fp.write_text(json.dumps(H200))
    r = runner.invoke(main, WHICH + ["--fingerprint", str(fp)])
    assert r.exit_code == 0, r.output
    assert "config: bm32 bn64 w4 s2" in r.stdout
    assert "tuned on this device (h200, T-bucket 4096, other toolchain)" in r.stdout
    fp.write_text(json.dumps(H100))
    r = runner.invoke(main, WHICH + ["--fingerprint", str(fp), "--format", "json"])
    data = json.loads(r.stdout)
    assert data["tuned"] and data["reason"].startswith("same architecture sm_90")
    assert data["device"] == {"name": "NVIDIA H100 80GB HBM3", "model": "h100", "arch": "sm_90"}
    r = runner.invoke(main, WHICH + ["--fingerprint", str(fp), "--pass", "bwd_q"])
    assert "no tuned entry" in r.stdout


def test_which_auto_names_the_faster_backend(runner, env, tmp_path):
    """--backend auto: what the op's backend="auto" takes on that GPU, per direction, with
    both backends' tuned times."""
    with TuningDB(env) as db:
        for i, (backend, pass_, ms, bm) in enumerate([
                ("triton", "fwd", 1.0, 64), ("tvm", "fwd", 0.7, 32),
                ("triton", "bwd_kv", 1.0, 64), ("triton", "bwd_q", 0.5, 64),
                ("tvm", "bwd_kv", 2.0, 16)]):
            db.record_trial(PROB, backend, pass_, KernelConfig(block_m=bm), median_ms=ms,
                            spread=0.01, device=H200, toolchain_versions=TC, host="h",
                            created_at=f"2025-02-01T00:00:0{i}+00:00")
    fp = tmp_path / "fp.json"
    fp.write_text(json.dumps(H200))
    r = runner.invoke(main, WHICH + ["--fingerprint", str(fp), "--backend", "auto"])
    assert r.exit_code == 0, r.output
    assert "backend: tvm (tuned forward: triton 1.000 ms, tvm 0.700 ms)" in r.stdout
    r = runner.invoke(main, WHICH + ["--fingerprint", str(fp), "--backend", "auto", "--pass",
                                     "bwd_q", "--format", "json"])
    data = json.loads(r.stdout)
    assert data["spec"]["backend"] == "triton" and data["config"]["block_m"] == 64
    assert data["auto_ms"] == {"triton": 1.5, "tvm": 2.0} and not data["auto_compared_gated"]
    with TuningDB(env) as db:  # TVM times the ungated problem; Triton has only the gated one
        db.record_trial(dataclasses.replace(PROB, gated=False), "tvm", "fwd",
                        KernelConfig(block_m=32), median_ms=0.5, spread=0.01, device=H200,
                        toolchain_versions=TC, host="h", created_at="2025-02-01T00:00:09+00:00")
    r = runner.invoke(main, WHICH + ["--fingerprint", str(fp), "--backend", "auto",
                                     "--no-gated"])
    assert ("backend: tvm (tuned gated forward, as only one backend has ungated times: "
            "triton 1.000 ms, tvm 0.700 ms)") in r.stdout


@pytest.mark.parametrize("extra", [["--kv-heads", "5"], ["--dtype", "int8"],
                                   ["--head-dim", "0"], ["--backend", "cuda"]])
def test_which_usage_errors(runner, extra):
    r = runner.invoke(main, WHICH + extra)
    assert r.exit_code == 2, r.output


def test_which_bad_fingerprint(runner, tmp_path):
    fp = tmp_path / "fp.json"
    fp.write_text(json.dumps({"kind": "tpu"}))
    r = runner.invoke(main, WHICH + ["--fingerprint", str(fp)])
    assert r.exit_code == 2 and "--fingerprint" in r.stderr


def test_doctor(runner, env):
    fill(env)
    r = runner.invoke(main, ["doctor", "--format", "json"])
    data = json.loads(r.stdout)
    expected = 0 if torch.cuda.is_available() else 3
    assert r.exit_code == expected, r.output
    assert data["database"]["counts"]["trials"] == 4 and data["database"]["path"] == str(env)
    assert set(data["versions"]) >= {"torch", "triton", "tvm", "optuna", "sqlite-utils"}
    assert data["backends"]["reference"]["available"] is True
    r = runner.invoke(main, ["doctor"])
    assert r.exit_code == expected
    assert "sqlite-utils" in r.stdout and "trials: 4" in r.stdout
    if expected == 3:
        assert "no CUDA GPU" in r.stderr


def test_doctor_corrupt_db_exit_1(runner, env):
    env.parent.mkdir(parents=True)
    env.write_bytes(b"garbage" * 500)
    r = runner.invoke(main, ["doctor"])
    assert r.exit_code == 1 and "error:" in r.stdout
    assert env.read_bytes() == b"garbage" * 500
