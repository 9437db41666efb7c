"""`gfwagen tune`, `gfwagen generate` and `gfwagen db plot` through click's CliRunner."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cli import main
from gfwagen.db import TuningDB


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
