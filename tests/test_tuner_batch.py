"""The batched tuner on the CPU (fake timer): the warm pool (compile_jobs=2) and warm workers
that crash or hang, repeats and pruned configs inside a batch, the exhaustive sweep (alone
and over two driver processes), the journal lease, and the TPE-vs-sweep report."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from gfwagen.db import TuningDB
from gfwagen.spec import KernelConfig, Problem
from gfwagen.tuner import compare, space
from gfwagen.tuner.pool import Workers
from gfwagen.tuner.study import (
    TuneJob,
    is_measurement,
    open_study,
    run,
    run_on_devices,
    storage_for,
    studies_dir,
    sweep_job,
)
from gfwagen.tuner.timing import FakeTimer
from gfwagen.tuner.worker import INJECT_ENV

PROB = Problem(2, 512, 4, 2, 64, 64, 128, "bf16", True)
FAST = FakeTimer.OPTIMUM
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("GFWAGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GFWAGEN_DB", str(tmp_path / "default.sqlite"))
    monkeypatch.delenv(INJECT_ENV, raising=False)


@pytest.fixture
def small_space(monkeypatch):
    """12 configs (block_m, block_n in 64/128, 8 warps, 2-4 stages), FakeTimer's optimum
    among them: a sweep in seconds. Only this process enumerates the space, never a worker."""
    monkeypatch.setattr(space, "TILES", (64, 128))
    monkeypatch.setattr(space, "STAGES", (2, 3, 4))
    monkeypatch.setattr(space, "WARPS", (8,))
    monkeypatch.setattr(space, "DEFAULT_KNOBS", ())


def db_rows(path) -> list[dict]:
    with TuningDB(path, readonly=True) as db:
        return [dict(r) for r in db.db.query("SELECT * FROM trials ORDER BY created_at")]


def finished(job) -> list:
    study = optuna.load_study(study_name=job.study_name, storage=storage_for(job))
    return [t for t in study.get_trials() if t.state.is_finished()]


def cfg_of(t) -> dict:
    return KernelConfig.from_dict(t.user_attrs["config"]).as_dict()


def test_warm_pool_survives_crashing_and_hanging_warm_workers(tmp_path, monkeypatch):
    warm_crash = {**FAST, "num_stages": 2}  # the warm worker dies; the candidate is fine
    warm_hang = {**FAST, "num_warps": 4}  # the warm worker hangs until the timeout
    both_crash = {**FAST, "block_m": 64}  # warm and timing worker die: recorded as failed
    # exact matches (no switch on): the closing refinement tries the same tiles with tma
    rules = [{"match": {**warm_crash, "extra": {}}, "fault": "crash", "on": "warm"},
             {"match": {**warm_hang, "extra": {}}, "fault": "hang", "on": "warm"},
             {"match": {**both_crash, "extra": {}}, "fault": "crash"}]
    monkeypatch.setenv(INJECT_ENV, json.dumps(rules))
    db = tmp_path / "t.sqlite"
    job = TuneJob(PROB, "triton", "fwd", 6, mode="fake", timeout=4.0, db_path=str(db), seed=0,
                  compile_jobs=2, enqueue=(warm_crash, warm_hang, both_crash))
    res = run(job)  # batches: [default, warm_crash], [warm_hang, both_crash], [TPE, TPE]
    done = finished(job)
    assert len(done) == 6 == res.trials
    # first measurements only (TPE may ask for one of these configs again later)
    by = {json.dumps(cfg_of(t), sort_keys=True): t for t in done
          if "duplicate_of" not in t.user_attrs}

    def trial(c):
        return by[json.dumps(KernelConfig(**c).as_dict(), sort_keys=True)]

    assert trial(warm_crash).user_attrs["status"] == "ok"
    assert "status 7" in trial(warm_crash).user_attrs["warm_failed"]
    assert trial(warm_hang).user_attrs["status"] == "ok"
    assert "no result within" in trial(warm_hang).user_attrs["warm_failed"]
    assert trial(both_crash).user_attrs["status"] == "failed"
    assert "status 7" in trial(both_crash).user_attrs["reason"]
    # the last batch was warmed by the replaced workers without trouble
    assert all("warm_failed" not in t.user_attrs for t in done[4:])
    assert len(db_rows(db)) == res.recorded == sum("duplicate_of" not in t.user_attrs
                                                   for t in done)
    assert res.best_config.as_dict() != KernelConfig(**both_crash).as_dict()


def test_batch_warms_only_new_feasible_configs(tmp_path, monkeypatch):
    pruned = {**FAST, "block_n": 32}
    real_feasible = space.feasible

    def feasible(spec, cfg, gpu=True):  # the fake mode skips the resource model: prune one
        if cfg == KernelConfig(**pruned):
            return False, "pruned before compiling: test"
        return real_feasible(spec, cfg, gpu=gpu)

    monkeypatch.setattr(space, "feasible", feasible)
    warmed = []
    real_warm = Workers.warm

    def spy(self, problem, backend, pass_, configs):
        warmed.append(list(configs))
        return real_warm(self, problem, backend, pass_, configs)

    monkeypatch.setattr(Workers, "warm", spy)
    db = tmp_path / "t.sqlite"
    default = space.default(PROB.spec("triton", "bwd_kv")).as_dict()
    # batches of 3: [default, FAST, FAST], [pruned, default, new], then until 6 measured
    job = TuneJob(PROB, "triton", "bwd_kv", 6, mode="fake", db_path=str(db), seed=1,
                  compile_jobs=3, enqueue=(FAST, FAST, pruned, default))
    res = run(job)
    done = finished(job)
    # batch 1: the repeat of FAST is not compiled twice; batch 2: neither the pruned config
    # nor the measured default, only the one new config
    assert len(warmed[0]) == 2 and len(warmed[1]) == 1
    assert all(KernelConfig(**pruned) not in w for w in warmed)
    assert done[2].user_attrs["duplicate_of"] == 1  # a repeat inside one batch
    assert done[4].user_attrs["duplicate_of"] == 0  # the default again, from the study
    assert done[3].user_attrs["status"] == "failed" and "test" in done[3].user_attrs["reason"]
    assert done[3].user_attrs["pruned"] and not is_measurement(done[3])
    # six measurements (repeats and the pruned config do not count), none compiled twice
    assert sum(map(is_measurement, done)) == 6
    flat = [c for w in warmed for c in w]
    assert len(flat) == len(set(flat))
    assert len(db_rows(db)) == res.recorded == sum("duplicate_of" not in t.user_attrs
                                                   for t in done) == 7
    assert res.trials == 6 and res.asked == len(done) and done[0].user_attrs.get("default")


def test_sweep_runs_every_config_once_in_its_own_study(tmp_path, small_space):
    db = tmp_path / "t.sqlite"
    tpe = TuneJob(PROB, "triton", "fwd", 3, mode="fake", db_path=str(db), seed=0)
    run(tpe)
    sw = sweep_job(TuneJob(PROB, "triton", "fwd", 1, mode="fake", db_path=str(db), seed=0,
                           compile_jobs=2))
    configs = space.enumerate_configs(sw.spec(), gpu=False)
    assert sw.n_trials == len(configs) == 12
    res = run(sw)
    assert res.study_name == tpe.study_name + "-sweep"
    done = finished(sw)
    assert sorted(json.dumps(cfg_of(t), sort_keys=True) for t in done) == \
        sorted(json.dumps(c.as_dict(), sort_keys=True) for c in configs)
    assert done[0].user_attrs.get("default") and res.default_ms is not None
    assert res.best_config == KernelConfig(**FAST)
    assert len(finished(tpe)) == 3  # the TPE study is untouched
    assert len(db_rows(db)) == 3 + 12 - sum("duplicate_of" in t.user_attrs
                                            for t in finished(tpe))
    with TuningDB(db, readonly=True) as tdb:
        (best,) = tdb.best_entries()
    assert best["config"] == KernelConfig(**FAST).as_dict()

    rows = compare.compare(compare.load_studies(studies_dir()))
    (r,) = rows
    assert (r.pass_, r.sweep_trials, r.tpe_trials) == ("fwd", 12, 3)
    assert r.sweep_best == KernelConfig(**FAST).as_dict() and r.sweep_ms == res.best_ms
    assert r.tpe_ms_in_sweep == pytest.approx(r.tpe_ms_own)  # the fake timer: no noise
    assert r.gap >= 0 and r.within == (r.gap <= 3.0)  # 3 trials <= 12 / 4
    assert r.default_ms == res.default_ms and r.speedup == pytest.approx(
        res.default_ms / res.best_ms)
    out = subprocess.run([sys.executable, "benchmarks/tuner_vs_sweep.py", "--studies",
                          str(studies_dir())], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("| problem | pass | sweep trials | sweep best | sweep ms |")
    assert lines[2].startswith("| B2 T512 H4/2 D64/64 W128 bf16 | fwd | 12 | bm128 bn64 w8 s3")
    assert "of 1 studies" in lines[-1]


def test_compare_verdict():
    r = compare.Row("n", {}, "triton", "fwd", 100, {}, 1.0, 25, {}, 1.029, 1.01, 2.0)
    assert r.within and r.gap == pytest.approx(2.9) and r.speedup == 2.0
    assert not compare.Row("n", {}, "triton", "fwd", 100, {}, 1.0, 26, {}, 1.0, 1.0, None).within
    r = compare.Row("n", {}, "triton", "fwd", 100, {}, 1.0, 10, {}, 1.04, 1.0, None)
    assert not r.within and r.speedup is None
    none = compare.Row("n", {}, "triton", "fwd", 100, {}, 1.0, 10, {}, None, 1.0, None)
    assert none.gap is None and not none.within
    assert "| - | no |" in compare.markdown([none])


def test_sweep_over_two_drivers_measures_each_config_once(tmp_path, small_space):
    db = tmp_path / "t.sqlite"
    sw = sweep_job(TuneJob(PROB, "triton", "bwd_q", 1, mode="fake", db_path=str(db), seed=0,
                           storage=str(tmp_path / "sweep.journal"), compile_jobs=2))
    res = run_on_devices(sw, [0, 1])
    done = finished(sw)
    assert len(done) == res.trials == sw.n_trials == 12
    assert len({json.dumps(cfg_of(t), sort_keys=True) for t in done}) == 12
    assert not any("duplicate_of" in t.user_attrs for t in done)
    assert len({t.user_attrs["driver"] for t in done}) == 2
    assert len(db_rows(db)) == res.recorded == 12


def test_fresh_run_joins_a_study_another_driver_is_running(tmp_path):
    job = TuneJob(PROB, "triton", "fwd", 3, mode="fake", db_path=str(tmp_path / "t.sqlite"),
                  seed=0)
    run(job)
    assert len(finished(job)) == 3
    other = TuneJob(PROB, "triton", "fwd", 0, mode="fake", resume=True)
    with open_study(other):  # another driver holds the study: a fresh run must not reset it
        run(TuneJob(PROB, "triton", "fwd", 2, mode="fake", db_path=str(tmp_path / "t.sqlite"),
                    seed=1))
    assert sum(map(is_measurement, finished(job))) == 5
    run(TuneJob(PROB, "triton", "fwd", 2, mode="fake", db_path=str(tmp_path / "t.sqlite")))
    assert sum(map(is_measurement, finished(job))) == 2  # nobody running it: fresh is fresh


def test_default_is_measured_even_when_the_resource_model_prunes_it(tmp_path, monkeypatch):
    """The op runs the default untuned, so the study times it even when the estimate says it
    does not fit (the dk/dv default at D = 256); any other config the estimate prunes is
    recorded without compiling."""
    spec = PROB.spec("triton", "bwd_kv")
    default = space.default(spec)
    other = KernelConfig(**{**FAST, "block_n": 32})
    real_feasible = space.feasible

    def feasible(spec, cfg, gpu=True):
        if cfg in (default, other):
            return False, "pruned before compiling: estimated registers/thread ~328 (test)"
        return real_feasible(spec, cfg, gpu=gpu)

    monkeypatch.setattr(space, "feasible", feasible)
    job = TuneJob(PROB, "triton", "bwd_kv", 3, mode="fake", db_path=str(tmp_path / "t.sqlite"),
                  seed=0, enqueue=(other.as_dict(),))
    res = run(job)
    done = finished(job)
    assert done[0].user_attrs["default"] and done[0].user_attrs["status"] == "ok"
    assert is_measurement(done[0]) and res.default_ms == done[0].value
    assert done[1].user_attrs["pruned"] and done[1].user_attrs["status"] == "failed"


def test_a_study_starts_from_the_nearest_tuned_problems(tmp_path):
    """Tuning W=256 after W=128 (same database) tries W=128's best right after the default;
    the W=128 study itself, run first, had nothing to start from."""
    db = str(tmp_path / "t.sqlite")
    first = run(TuneJob(PROB, "triton", "fwd", 4, mode="fake", db_path=db, seed=0))
    near = dataclasses.replace(PROB, window=256)
    job = TuneJob(near, "triton", "fwd", 4, mode="fake", db_path=db, seed=0)
    run(job)
    done = finished(job)
    warm = [t for t in done if t.user_attrs.get("warm_start")]
    assert [cfg_of(t) for t in warm] == [first.best_config.as_dict()]
    assert warm[0].number == 1  # right after the default
    again = TuneJob(PROB, "triton", "fwd", 2, mode="fake", db_path=db, seed=1)
    run(again)  # fresh: W=256's best is now the nearest other problem, its own is not used
    warm = [t for t in finished(again) if t.user_attrs.get("warm_start")]
    assert len(warm) <= 1 and all(cfg_of(t) == run_best(db, near) for t in warm)


def test_an_ungated_study_starts_from_its_gated_class(tmp_path):
    """Tuning the ungated problem after its gated class (same database) tries the gated best
    right after the default: the op runs those tiles for it until then (db.lookup)."""
    db = str(tmp_path / "t.sqlite")
    gated = run(TuneJob(PROB, "triton", "fwd", 4, mode="fake", db_path=db, seed=0))
    plain = dataclasses.replace(PROB, gated=False)
    job = TuneJob(plain, "triton", "fwd", 4, mode="fake", db_path=db, seed=0)
    run(job)
    warm = [t for t in finished(job) if t.user_attrs.get("warm_start")]
    assert warm and warm[0].number == 1
    assert cfg_of(warm[0]) == gated.best_config.as_dict()


def test_each_progress_line_counts_the_trial_it_reports(tmp_path, capsys):
    """A line's best includes the trial the line reports (the study hears of it only later):
    every line's best is the least time shown up to it, and the last names the study's."""
    import re

    job = TuneJob(PROB, "triton", "fwd", 6, mode="fake", db_path=str(tmp_path / "t.sqlite"),
                  seed=0)
    res = run(job)
    line = re.compile(r"\] \d+/6 best (\S+) ms .*\| last .*: ok (\S+) ms$")
    seen = [m.groups() for m in map(line.search, capsys.readouterr().err.splitlines()) if m]
    assert len(seen) == 6
    for n, (best, _) in enumerate(seen):
        assert float(best) == min(float(ms) for _, ms in seen[:n + 1])
    assert float(seen[-1][0]) == float(f"{res.best_ms:.4g}")


def run_best(db, problem) -> dict:
    with TuningDB(db, readonly=True) as tdb:
        rows = [e for e in tdb.best_entries() if e["pass"] == "fwd"
                and e["spec"]["window"] == problem.window]
    (e,) = rows
    return KernelConfig.from_dict(e["config"]).as_dict()


def test_replay_runs_the_tuner_on_a_recorded_table(tmp_path, small_space):
    """mode='replay' drives the real search on the GPU space, answered from a table: every
    config is timed at most once, n measurements are made, and the last quarter refines the
    best tiles (same tile as a measured config, another pipeline)."""
    from gfwagen.tuner import search
    from gfwagen.tuner.replay import ReplayWorkers
    from gfwagen.tuner.timing import FakeTimer
    from gfwagen.tuner.worker import Result

    spec = PROB.spec("triton", "fwd")
    configs = space.enumerate_configs(spec, gpu=True)
    table = {c: Result("ok", FakeTimer().synthetic_ms(spec, c), 0.0) for c in configs}
    workers = ReplayWorkers(table)
    job = TuneJob(PROB, "triton", "fwd", 8, mode="replay", db_path=str(tmp_path / "r.sqlite"),
                  seed=0, compile_jobs=2)
    res = run(job, workers=workers)
    asked = workers.timing.asked
    assert len(asked) == len(set(asked)) == 8
    assert res.best_ms == min(table[c].median_ms for c in asked)
    tiles = {search.tile_of(c) for c in asked[:-2]}
    assert all(search.tile_of(c) in tiles for c in asked[-2:])  # the refinement's two


def test_workers_close_lets_every_worker_exit_on_its_own():
    workers = Workers("fake", compile_jobs=3)
    procs = []
    for w in [workers.timing, *workers.pool]:
        w.start()
        procs.append(w.proc)
    workers.close()
    # exit status 0: each saw its input close and left, none was killed after the wait
    assert [p.returncode for p in procs] == [0] * 4
    assert all(w.proc is None for w in [workers.timing, *workers.pool])


def test_a_warm_request_runs_the_candidate_on_stand_ins_not_the_reference(monkeypatch):
    """Warming (compile_jobs workers at once) never computes the float64 reference: a
    backward candidate gets zero o and lse of the reference's shapes, dtypes and strides
    (what Triton specializes on), the reference's o contiguous as the op's forward gives it;
    a timed request still checks against the reference."""
    from gfwagen import reference
    from gfwagen.tuner import worker

    calls = []
    real = reference.reference_forward
    monkeypatch.setattr(reference, "reference_forward",
                        lambda *a, **kw: calls.append(kw.get("chunk")) or real(*a, **kw))
    session = worker._Session("fake")
    p = session.problem_for_check(PROB)
    req = dict(problem=PROB.as_dict(), backend="triton",
               config=KernelConfig(64, 64, 4, 2).as_dict())
    for pass_ in ("fwd", "bwd_kv", "bwd_q", "bwd_ds"):
        assert session.run({**req, "pass": pass_, "warm": True}) == {"status": "ok"}
    assert calls == [64] and not session.expected  # fwd's candidate (chunk 64) only
    assert session.run({**req, "pass": "bwd_kv"})["status"] == "ok" and session.expected
    stand_in, ref = session.stand_in_forward(p), next(iter(session.expected.values()))
    for name in ("o", "lse"):
        got, want = stand_in[name], ref[name]
        assert (got.shape, got.dtype, got.stride()) == (want.shape, want.dtype, want.stride())
        assert not got.any()
