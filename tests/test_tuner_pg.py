"""Two tuner processes (two 'hosts') join one Optuna study in PostgreSQL, each recording its
own TuningDB; merging the two databases loses no row. Skipped unless GFWAGEN_TEST_PG_URL
names a PostgreSQL database (.ci/run sets one up)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gfwagen.db import TuningDB
from gfwagen.spec import Problem
from gfwagen.tuner.study import TuneJob, _rdb_url, default_study_name, is_measurement

PG_URL = os.environ.get("GFWAGEN_TEST_PG_URL")
pytestmark = pytest.mark.skipif(not PG_URL, reason="GFWAGEN_TEST_PG_URL is not set")
ROOT = Path(__file__).resolve().parents[1]


def test_two_hosts_share_a_postgres_study(tmp_path):
    optuna = pytest.importorskip("optuna")
    # the CLI's quick preset, fake timer: the study name the two processes will share
    prob = Problem(2, 1024, 4, 4, 64, 64, 256, "bf16", True)
    name = default_study_name(TuneJob(prob, "triton", "fwd", 0, mode="fake"))
    storage = optuna.storages.RDBStorage(_rdb_url(PG_URL))
    if name in [s.study_name for s in optuna.get_all_study_summaries(storage)]:
        optuna.delete_study(study_name=name, storage=storage)  # left by an earlier run
    env = {**os.environ, "GFWAGEN_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("GFWAGEN_TUNER_INJECT", None)
    procs = []
    for host in ("a", "b"):
        cmd = [sys.executable, "-m", "cli", "tune", "--fake-timer", "--preset", "quick",
               "--passes", "fwd", "--trials", "3", "--storage", PG_URL, "--no-plots",
               "--db", str(tmp_path / f"{host}.sqlite"), "--format", "json"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    study = optuna.load_study(study_name=name, storage=storage)
    done = [t for t in study.get_trials() if t.state.is_finished()]
    # 3 + 3 measurements on one study. --trials counts measurements: a proposal of a config
    # the other host just measured is answered from the study (finished, not measured), and
    # whether that happens depends on the two processes' timing (7 finished trials, seen once)
    measured = [t for t in done if is_measurement(t)]
    assert len(measured) == 6 and len(done) >= 6
    counts = {}
    for host in ("a", "b"):
        with TuningDB(tmp_path / f"{host}.sqlite", readonly=True) as db:
            counts[host] = db.counts()["trials"]
    assert counts["a"] >= 1 and counts["b"] >= 1
    assert counts["a"] + counts["b"] == len(measured)
    with TuningDB(tmp_path / "merged.sqlite") as db:
        db.merge(tmp_path / "a.sqlite")
        db.merge(tmp_path / "b.sqlite")
        assert db.counts()["trials"] == counts["a"] + counts["b"]
    optuna.delete_study(study_name=name, storage=storage)
