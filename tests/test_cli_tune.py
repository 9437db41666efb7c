"""`gfwagen tune`, `gfwagen generate` and `gfwagen db plot` through click's CliRunner."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner

import cli
from cli import PRESETS, main
from gfwagen.db import TuningDB
from gfwagen.spec import Problem
from gfwagen.tuner import space
from gfwagen.tuner.study import TuneJob, default_study_name, is_measurement, storage_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("GFWAGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GFWAGEN_DB", str(tmp_path / "db" / "tuning.sqlite"))
    monkeypatch.delenv("GFWAGEN_TUNER_INJECT", raising=False)
    monkeypatch.delenv("GFWAGEN_FAKE_TIMER", raising=False)
    return tmp_path


def test_tune_fake_timer_end_to_end(env):
    r = CliRunner().invoke(main, ["tune", "--preset", "quick", "--fake-timer", "--trials", "3",
                                  "--passes", "fwd", "--seed", "0", "--format", "json"])
    assert r.exit_code == 0, r.output + r.stderr
    out = json.loads(r.stdout)
    (s,) = out["studies"]
    assert s["pass"] == "fwd" and s["trials"] == 3 and s["best_ms"] > 0
    db = env / "db" / "tuning.sqlite"
    with TuningDB(db, readonly=True) as tdb:
        assert 1 <= tdb.counts()["trials"] <= 3 and tdb.counts()["best"] == 1
    pngs = sorted(p.name for p in (env / "db" / "plots").glob("*.png"))
    assert any(p.endswith("-history.png") for p in pngs)
    assert "[Q1 fwd]" in r.stderr  # progress on stderr
    # the table format, and db plot from the database
    r = CliRunner().invoke(main, ["db", "plot", "--out", str(env / "p2")])
    assert r.exit_code == 0, r.output
    assert all(line.endswith(".png") for line in r.stdout.split())
    assert (env / "p2").is_dir() and list((env / "p2").glob("*-history.png"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_tune_wrong_gpu_exits_3():
    r = CliRunner().invoke(main, ["tune", "--gpu", "h200", "--preset", "quick"])
    assert r.exit_code == 3 and "no CUDA GPU" in r.stderr
    r = CliRunner().invoke(main, ["tune", "--gpu", "h200", "--fake-timer"])
    assert r.exit_code == 3


def test_tune_usage_errors():
    r = CliRunner().invoke(main, ["tune", "--fake-timer", "--passes", "nope"])
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["tune", "--fake-timer", "--devices", "a,b"])
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["tune", "--gpu", "cpu", "--fake-timer", "--passes", "bwd_q"])
    assert r.exit_code == 2 and "tvm" in r.stderr
    r = CliRunner().invoke(main, ["tune", "--fake-timer", "--sweep", "--duel", "2"])
    assert r.exit_code == 2 and "--duel" in r.stderr


def test_tune_duel_reports_the_re_timings(env):
    r = CliRunner().invoke(main, ["tune", "--preset", "quick", "--fake-timer", "--trials", "3",
                                  "--passes", "fwd", "--seed", "0", "--duel", "1", "--no-plots",
                                  "--format", "json"])
    assert r.exit_code == 0, r.output + r.stderr
    (s,) = json.loads(r.stdout)["studies"]
    assert len(s["duel"]) == 2 and all(len(ts) == 2 for ts in s["duel"].values())
    assert "duel:" in r.stderr
    with TuningDB(env / "db" / "tuning.sqlite", readonly=True) as tdb:
        assert tdb.counts()["trials"] >= 4  # the search's measurements and two re-timings


def test_db_plot_without_db(env):
    r = CliRunner().invoke(main, ["db", "plot", "--db", str(env / "missing.sqlite")])
    assert r.exit_code == 1


def test_generate_prints_source(env):
    args = ["generate", "--pass", "bwd_kv", "--head-dim", "64", "--window", "256",
            "--block-m", "32", "--block-n", "64"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "#   BLOCK_M = 32" in r.stdout and "def launch_dkdv" in r.stdout
    assert "wrote " in r.stderr and str(env / "cache") in r.stderr
    r2 = CliRunner().invoke(main, args + ["--format", "json"])
    assert r2.exit_code == 0 and "cached " in r2.stderr
    assert json.loads(r2.stdout)["manifest"]["constexprs"]["HEAD_D"] == 64
    r3 = CliRunner().invoke(main, ["generate", "--block-m", "512"])
    assert r3.exit_code == 2


def test_presets_classes_and_ship():
    classes = PRESETS["classes"]
    assert len(classes) == 21 and len({c[0] for c in classes}) == 21
    assert {(c[5], c[6]) for c in classes} == {(d, w) for d in (64, 128, 256)
                                               for w in (0, 256, 512, 1024, 2048, 4096, 8192)}
    for _, b, t, h, hkv, _d, w in classes:
        assert t == (8192 if w == 0 else max(4096, 2 * w)) and b * t == 32768
        assert h == hkv == 16
    assert PRESETS["ship"] == PRESETS["standard"] + classes


def test_default_compile_jobs(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert cli._default_compile_jobs("cuda", None) == 16
    assert cli._default_compile_jobs("cuda", [0, 1]) == 16
    assert cli._default_compile_jobs("cuda", [0, 1, 2, 3]) == 8
    assert cli._default_compile_jobs("fake", None) == cli._default_compile_jobs("cpu", None) == 1


def test_tune_only_selects_preset_shapes(env):
    base = ["tune", "--preset", "ship", "--fake-timer", "--passes", "fwd", "--no-plots",
            "--format", "json", "--trials", "1", "--knobs", "none"]
    r = CliRunner().invoke(main, base + ["--only", "S2,C-d64-w256"])
    assert r.exit_code == 0, r.output
    assert [s["shape"] for s in json.loads(r.stdout)["studies"]] == ["S2", "C-d64-w256"]
    r = CliRunner().invoke(main, base + ["--only", "S9"])
    assert r.exit_code == 2 and "S9" in r.output


def test_tune_knobs_option(env):
    """--knobs widens the space (the sweep doubles per switch); an unknown one is exit 2."""
    base = ["tune", "--preset", "quick", "--fake-timer", "--passes", "fwd", "--no-plots",
            "--format", "json", "--trials", "2"]
    r = CliRunner().invoke(main, base + ["--knobs", "warp_spec"])
    assert r.exit_code == 2 and "warp_spec" in r.output
    r = CliRunner().invoke(main, base + ["--knobs", "tma,prefetch_gate", "--seed", "1"])
    assert r.exit_code == 0, r.output


def test_tune_refine_says_when_its_seeds_leave_no_search(env):
    base = ["tune", "--preset", "quick", "--fake-timer", "--passes", "fwd", "--no-plots",
            "--refine", "--knobs", "tma,prefetch_gate"]
    r = CliRunner().invoke(main, base + ["--trials", "4"])
    assert r.exit_code == 0, r.output
    assert "--trials 4 is spent on what --refine and --try enqueue first" in r.stderr
    assert "up to 4)" in r.stderr
    r = CliRunner().invoke(main, base + ["--trials", "5"])
    assert r.exit_code == 0 and "is spent on" not in r.stderr


def test_tune_sweep_and_compile_jobs(env, monkeypatch):
    monkeypatch.setattr(space, "TILES", (64, 128))  # 2 x 2 x 1 x 2 = 8 configs
    monkeypatch.setattr(space, "WARPS", (8,))
    monkeypatch.setattr(space, "STAGES", (2, 3))
    args = ["tune", "--preset", "quick", "--fake-timer", "--passes", "fwd,bwd_q", "--seed", "0",
            "--compile-jobs", "2", "--no-plots", "--format", "json", "--knobs", "none"]
    r = CliRunner().invoke(main, args + ["--sweep", "--trials", "1"])
    assert r.exit_code == 0, r.output + r.stderr
    studies = json.loads(r.stdout)["studies"]
    assert [s["pass"] for s in studies] == ["fwd", "bwd_q"]
    for s in studies:
        assert s["study"].endswith("-sweep") and s["trials"] == 8 == s["recorded"]
        assert s["best_config"]["block_m"] == 128 and s["statuses"] == {"ok": 8}
    assert "[Q1 fwd sweep]" in r.stderr
    r = CliRunner().invoke(main, args + ["--trials", "3"])  # the TPE studies, beside them
    assert r.exit_code == 0, r.output + r.stderr
    assert all(not s["study"].endswith("-sweep") and s["trials"] == 3
               for s in json.loads(r.stdout)["studies"])
    with TuningDB(env / "db" / "tuning.sqlite", readonly=True) as tdb:
        assert tdb.counts()["trials"] == 16 + sum(s["recorded"]
                                                  for s in json.loads(r.stdout)["studies"])


def test_two_tune_processes_share_one_database(env):
    """Two `gfwagen tune` processes at once on one --db (and one studies folder), different
    seeds, no --resume: every trial each measured is in the database, and the study they
    both ran is whole (the second one joins it rather than resetting it under the first)."""
    db = env / "shared.sqlite"
    n = 10
    procs = [subprocess.Popen(
        [sys.executable, "-m", "cli", "tune", "--fake-timer", "--gpu", "auto", "--preset",
         "quick", "--passes", "fwd", "--trials", str(n), "--seed", str(seed), "--db", str(db),
         "--no-plots", "--format", "json"], cwd=ROOT, env=dict(os.environ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    outs = {}
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "locked" not in err.lower(), err
        (s,) = json.loads(out)["studies"]
        outs[p.pid] = s
    with TuningDB(db, readonly=True) as tdb:
        rows = tdb.counts()["trials"]
    assert all(s["recorded"] >= 1 for s in outs.values())
    assert rows == sum(s["recorded"] for s in outs.values())  # nothing lost
    # per process, from the study: its trials and the rows it wrote
    job = TuneJob(Problem(2, 1024, 4, 4, 64, 64, 256, "bf16", True), "triton", "fwd", 0,
                  mode="fake")
    job.study_name = default_study_name(job)
    study = optuna.load_study(study_name=job.study_name, storage=storage_for(job))
    done = [t for t in study.get_trials() if t.state.is_finished()]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in done)
    drivers = {t.user_attrs["driver"] for t in done}
    # n measurements each (2n when they overlapped, nearly always)
    assert sum(map(is_measurement, done)) == n * len(drivers)
    for pid, s in outs.items():
        mine = [t for t in done if t.user_attrs["driver"].endswith(f":{pid}")]
        if mine:
            assert sum(map(is_measurement, mine)) == n
            assert s["recorded"] == sum("duplicate_of" not in t.user_attrs for t in mine)


def _trial_configs(env) -> list[dict]:
    """The configs of every trial the env's tuning database recorded."""
    out = io.StringIO()
    with TuningDB(env / "db" / "tuning.sqlite", readonly=True) as db:
        db.export_jsonl(stream=out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    return [r["config"] for r in rows if r["kind"] == "trial"]


def test_tune_try_measures_the_given_config(env):
    """--try: the config is measured right after the default (and recorded); one that does not
    fit is logged and skipped; malformed JSON is a usage error naming the option."""
    tried = {"block_m": 32, "block_n": 16, "num_warps": 4, "num_stages": 1, "extra": {}}
    base = ["tune", "--preset", "quick", "--fake-timer", "--passes", "fwd", "--no-plots",
            "--format", "json", "--trials", "2", "--knobs", "none", "--seed", "0"]
    r = CliRunner().invoke(main, base + ["--try", json.dumps(tried)])
    assert r.exit_code == 0, r.output + r.stderr
    assert tried in _trial_configs(env)
    huge = dict(tried, block_m=4096)
    r = CliRunner().invoke(main, base + ["--try", json.dumps(huge)])
    assert r.exit_code == 0 and "--try" in r.stderr and "skipped" in r.stderr
    for bad in ("{block_m: 1}", "[1, 2]", '{"block_m": 32, "tile": 9}'):
        r = CliRunner().invoke(main, base + ["--try", bad])
        assert r.exit_code == 2 and "--try" in r.output, (bad, r.output)
    # a switch that means nothing at its tiles (Triton's bias_mma off square ones): the
    # config runs without it, and the log says so
    idle = dict(tried, extra={"bias_mma": True})
    r = CliRunner().invoke(main, [x if x != "none" else "bias_mma" for x in base]
                           + ["--try", json.dumps(idle)])
    assert r.exit_code == 0, r.output + r.stderr
    assert "runs as" in r.stderr and "'bias_mma': True" in r.stderr, r.stderr
    # an extra no space of the backend sets (a template option outside the search): not
    # timed without it, but skipped, by name
    outside = dict(tried, extra={"gate_tma": True})
    r = CliRunner().invoke(main, base + ["--try", json.dumps(outside)])
    assert r.exit_code == 0, r.output + r.stderr
    assert "skipped" in r.stderr and "gate_tma is not a knob" in r.stderr, r.stderr
    assert "runs as" not in r.stderr, r.stderr
    # a budget that ends at the default would measure the --try config never
    short = [x if x != "2" else "1" for x in base]
    r = CliRunner().invoke(main, short + ["--try", json.dumps(tried)])
    assert r.exit_code == 2 and "--trials" in r.output and "--try" in r.output, r.output


def test_tune_try_fills_what_another_pass_leaves_out(env):
    """A --try written for the forward, tried on the stored backward, takes that pass's own
    defaults for the dq kernel's warps, stages and tensor descriptors (it used to stop the
    run inside optuna); a value outside the pass's space is logged and skipped."""
    fwd_cfg = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2,
               "extra": {"tma": True}}
    base = ["tune", "--preset", "quick", "--fake-timer", "--passes", "bwd_ds", "--no-plots",
            "--format", "json", "--trials", "2", "--seed", "0"]
    r = CliRunner().invoke(main, base + ["--try", json.dumps(fwd_cfg)])
    assert r.exit_code == 0, r.output + r.stderr
    tried = [c for c in _trial_configs(env) if c.get("block_m") == 64 and c["extra"].get("tma")
             and c["num_stages"] == 2]
    assert tried and all(c["extra"]["q_warps"] in (4, 8) for c in tried), tried
    small = dict(fwd_cfg, block_m=16)
    r = CliRunner().invoke(main, base + ["--try", json.dumps(small)])
    assert r.exit_code == 0, r.output + r.stderr
    assert "skipped" in r.stderr and "block_m=16" in r.stderr, r.stderr


def test_cli_lists_every_pass():
    """cli.py writes the passes out (no torch import at start); they must stay gfwagen's."""
    import cli
    from gfwagen.spec import PASSES

    assert cli.PASSES == PASSES


def test_tune_stored_backward_only_with_a_window(env):
    """bwd_ds is studied for a window shorter than the sequence, and skipped, saying so,
    where the window covers it (the stored backward does not run there)."""
    r = CliRunner().invoke(main, ["tune", "--preset", "quick", "--fake-timer", "--trials", "2",
                                  "--passes", "bwd_ds", "--no-plots", "--format", "json"])
    assert r.exit_code == 0, r.output + r.stderr
    assert [s["pass"] for s in json.loads(r.stdout)["studies"]] == ["bwd_ds"]
    r = CliRunner().invoke(main, ["tune", "--preset", "quick", "--fake-timer", "--trials", "2",
                                  "--passes", "fwd,bwd_ds", "--window", "4096", "--no-plots",
                                  "--format", "json"])
    assert r.exit_code == 0, r.output + r.stderr
    assert [s["pass"] for s in json.loads(r.stdout)["studies"]] == ["fwd"]
    assert "no bwd_ds study" in r.stderr
