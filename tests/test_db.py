"""The tuning database: schema and migrations, recording and `best`, export/import/merge,
the runtime lookup's fallbacks, and refusal of bad files without changing the database."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
import types

import pytest
import torch

from gfwagen.db import (
    DatabaseError,
    Snapshot,
    TuningDB,
    arch,
    default_db_path,
    device_fingerprint,
    device_key,
    get_snapshot,
    gpu_model_name,
    migrate,
    reset_snapshot,
    seqlen_bucket,
    toolchain,
    toolchain_key,
)
from gfwagen.db import schema as S
from gfwagen.db.records import trial_id
from gfwagen.db.schema import connect
from gfwagen.spec import KernelConfig, KernelSpec, Problem, stable_hash

H200 = {"kind": "cuda", "name": "NVIDIA H200", "compute_capability": "9.0", "sm_count": 132,
        "memory_bytes": 150_000_000_000, "driver_version": "12.8", "cuda_version": "12.8",
        "processor": None}
H200_NEW_DRIVER = {**H200, "driver_version": "13.0"}
H100 = {**H200, "name": "NVIDIA H100 80GB HBM3", "memory_bytes": 85_000_000_000,
        "sm_count": 132}
A100 = {**H200, "name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "sm_count": 108}
TC = {"torch": "2.13.0", "triton": "3.6.0", "tvm": "0.27.0"}
TC_OLD = {"torch": "2.12.0", "triton": "3.5.0", "tvm": None}

PROB = Problem(batch=2, seqlen=4096, heads=16, kv_heads=4, head_dim=128, value_dim=128,
               window=1000, dtype="bf16", gated=True)
SPEC = PROB.spec("triton", "fwd")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Never touch the real cache dir or the repo's shipped files."""
    monkeypatch.setenv("GFWAGEN_DB", str(tmp_path / "default" / "tuning.sqlite"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    empty = tmp_path / "shipped-empty"
    empty.mkdir()
    monkeypatch.setenv("GFWAGEN_TUNING_DB_DIR", str(empty))
    reset_snapshot()
    yield
    reset_snapshot()


def rec(db, problem=PROB, backend="triton", pass_="fwd", *, ms=1.0, status="ok", device=H200,
        tc=TC, host="host-a", t=0, **cfg):
    return db.record_trial(problem, backend, pass_, KernelConfig(**cfg), median_ms=ms,
                           spread=0.01 if ms else None, status=status,
                           reason="" if status == "ok" else "boom", device=device,
                           toolchain_versions=tc, host=host,
                           created_at=f"2025-01-01T00:00:{t:02d}.000000+00:00")


def populate(db, host="host-a", device=H200, t0=0):
    """A small but varied set: two configs, repeats, failures, two toolchains, two passes."""
    rec(db, ms=1.00, block_m=64, host=host, device=device, t=t0 + 0)
    rec(db, ms=1.10, block_m=64, host=host, device=device, t=t0 + 1)
    rec(db, ms=0.90, block_m=128, host=host, device=device, t=t0 + 2)
    rec(db, ms=0.95, block_m=128, host=host, device=device, t=t0 + 3,
        extra=(("maxnreg", 128), ("swizzle", True)))
    rec(db, ms=0.10, block_m=32, status="failed", host=host, device=device, t=t0 + 4)
    rec(db, ms=None, block_m=16, status="timeout", host=host, device=device, t=t0 + 5)
    rec(db, ms=0.05, block_m=16, block_n=16, status="wrong", host=host, device=device, t=t0 + 6)
    rec(db, pass_="bwd_kv", ms=3.0, block_n=128, host=host, device=device, t=t0 + 7)
    rec(db, ms=1.5, block_m=64, tc=TC_OLD, host=host, device=device, t=t0 + 8)


def dump(path) -> list[str]:
    """Everything in a database file, for 'unchanged' checks."""
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def export_text(db, tmp_path, name="x.jsonl") -> bytes:
    p = tmp_path / name
    db.export_jsonl(p)
    return p.read_bytes()


# ---- fingerprint ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,model", [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA H100 PCIe", "h100"), ("Tesla V100-SXM2-16GB", "v100"), ("NVIDIA H200 NVL", "h200"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"), ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "a100"),
    ("NVIDIA L40S", "l40s"),
])
def test_gpu_model_name(name, model):
    assert gpu_model_name({"kind": "cuda", "name": name, "compute_capability": "9.0"}) == model


def test_arch_and_keys():
    assert arch(H200) == "sm_90"
    assert arch(A100) == "sm_80"
    assert arch({**H200, "compute_capability": "10.0"}) == "sm_100"
    assert device_key(H200) == device_key(dict(reversed(list(H200.items()))))
    assert device_key(H200) != device_key(H200_NEW_DRIVER)
    assert toolchain_key(TC) != toolchain_key(TC_OLD)
    # a toolchain recorded before the timer was part of it keeps its key; the timer tells
    # times measured differently apart
    assert toolchain_key(TC) == stable_hash({f: TC.get(f) for f in ("torch", "triton", "tvm")})
    assert toolchain_key({**TC, "timer": "sustained-1"}) != toolchain_key(TC)
    assert toolchain_key({**TC, "timer": "sustained-1"}) != toolchain_key({**TC, "timer": "x"})
    # likewise the templates' hash (session 19): an edited template is another toolchain
    timed = {**TC, "timer": "sustained-1"}
    assert toolchain_key({**timed, "templates": None}) == toolchain_key(timed)
    assert toolchain_key({**timed, "templates": "a"}) != toolchain_key(timed)
    assert toolchain_key({**timed, "templates": "a"}) != toolchain_key({**timed, "templates": "b"})


def test_local_fingerprint_and_toolchain():
    fp = device_fingerprint()
    assert set(fp) == set(H200)
    assert device_key(fp) == device_key(device_fingerprint())
    tc = toolchain()
    assert set(tc) == {"torch", "triton", "tvm", "timer", "templates"}
    assert tc["torch"] and tc["timer"] and len(tc["templates"]) == 16
    import torch

    if not torch.cuda.is_available():
        assert fp["name"] == "cpu" and fp["kind"] == "cpu" and gpu_model_name(fp) == "cpu"
        assert fp["sm_count"] >= 1 and arch(fp).startswith("cpu_")


def test_toolchain_reads_tvm_without_distribution_metadata(tmp_path, monkeypatch):
    """A TVM unpacked without distribution metadata (the GPU host's trimmed tarball) still
    gets its version into the toolchain, from its package's _version.py, read as text: the
    package itself is not imported. None where neither says."""
    import importlib.metadata
    import sys

    from gfwagen.db import fingerprint

    pkg = tmp_path / "tvm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (pkg / "_version.py").write_text("__version__ = version = '0.27.0.post1'\n")

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", no_dist)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tvm", raising=False)
    assert fingerprint.toolchain()["tvm"] == "0.27.0.post1"
    assert "tvm" not in sys.modules
    (pkg / "_version.py").write_text("VERSION = 3\n")
    assert fingerprint.toolchain()["tvm"] is None


def test_seqlen_bucket():
    assert [seqlen_bucket(t) for t in (1, 2, 3, 1000, 2890, 2900, 4096, 6000)] == \
        [1, 2, 4, 1024, 2048, 4096, 4096, 8192]


# ---- schema --------------------------------------------------------------------------------

def test_default_path(tmp_path, monkeypatch):
    assert default_db_path() == tmp_path / "default" / "tuning.sqlite"
    monkeypatch.delenv("GFWAGEN_DB")
    assert default_db_path() == tmp_path / "xdg" / "gfwagen" / "tuning.sqlite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_db_path() == tmp_path / "home" / ".cache" / "gfwagen" / "tuning.sqlite"


def test_create_schema_wal(tmp_path):
    path = tmp_path / "sub" / "t.sqlite"
    with TuningDB(path) as db:
        assert db.db.journal_mode == "wal"
        assert set(S.TABLES) <= set(db.db.table_names())
        assert db.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() \
            == (str(S.SCHEMA_VERSION),)
        assert db.counts() == {"devices": 0, "toolchains": 0, "trials": 0, "best": 0}
    with TuningDB() as db:  # GFWAGEN_DB
        assert db.path == tmp_path / "default" / "tuning.sqlite"
    assert (tmp_path / "default" / "tuning.sqlite").is_file()


def test_migrate_is_idempotent(tmp_path):
    path = tmp_path / "t.sqlite"
    with TuningDB(path) as db:
        populate(db)
    before = dump(path)
    raw = connect(path)
    assert S.schema_version(raw) == 1
    assert migrate(raw) == 0
    assert migrate(raw) == 0
    raw.close()
    with TuningDB(path):
        pass
    assert dump(path) == before


def test_migration_chain_runs_each_step_once(tmp_path, monkeypatch):
    """The structure a v2 will use: MIGRATIONS[1] upgrades v1 files, once."""
    path = tmp_path / "t.sqlite"
    with TuningDB(path) as db:
        populate(db)
    calls = []

    def v1_to_v2(db):
        calls.append(1)
        db["trials"].add_column("note", str)

    monkeypatch.setattr(S, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(S.MIGRATIONS, 1, v1_to_v2)
    raw = connect(path)
    assert migrate(raw) == 1 and migrate(raw) == 0
    assert S.schema_version(raw) == 2 and "note" in raw["trials"].columns_dict
    assert raw["trials"].count == 9
    raw.close()
    assert calls == [1]
    fresh = connect(tmp_path / "fresh.sqlite")
    assert migrate(fresh) == 2 and S.schema_version(fresh) == 2  # 0 -> 1 -> 2
    fresh.close()


def test_refuses_newer_foreign_and_corrupt_files(tmp_path):
    newer = tmp_path / "newer.sqlite"
    with TuningDB(newer) as db:
        db.db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        db.db.conn.commit()
    with pytest.raises(DatabaseError, match="newer"):
        TuningDB(newer)

    foreign = tmp_path / "foreign.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    before = dump(foreign)
    with pytest.raises(DatabaseError, match="foreign.sqlite: not a gfwagen"):
        TuningDB(foreign)
    assert dump(foreign) == before

    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(DatabaseError, match="not a readable SQLite"):
        TuningDB(junk)
    assert junk.read_bytes() == b"this is not a database at all" * 100


# ---- recording and best --------------------------------------------------------------------

def test_record_and_best(tmp_path):
    with TuningDB(tmp_path / "t.sqlite") as db:
        populate(db)
        assert db.counts() == {"devices": 1, "toolchains": 2, "trials": 9, "best": 3}
        best = {(b["toolchain_key"], b["pass"]): b for b in db.best_entries()}
        fwd = best[(toolchain_key(TC), "fwd")]
        # block_m=128 pools (0.90, 0.95 with extra knobs is a different config) -> 0.90 wins;
        # the failed (0.10) and wrong (0.05) rows are faster but never best.
        assert fwd["config"]["block_m"] == 128 and fwd["median_ms"] == 0.90
        assert fwd["model"] == "h200" and fwd["arch"] == "sm_90"
        assert fwd["spec"]["window"] == 1024  # the window class, not the exact window
        assert fwd["seqlen_bucket"] == 4096
        assert best[(toolchain_key(TC_OLD), "fwd")]["median_ms"] == 1.5
        assert best[(toolchain_key(TC), "bwd_kv")]["config"]["block_n"] == 128
        incremental = db.best_entries()
        assert db.recompute_best() == 3
        assert db.best_entries() == incremental


def test_repeated_measurements_are_pooled(tmp_path):
    with TuningDB(tmp_path / "t.sqlite") as db:
        rec(db, ms=0.80, block_m=64, t=0)   # one lucky run ...
        rec(db, ms=1.20, block_m=64, t=1)
        rec(db, ms=1.30, block_m=64, t=2)   # ... median 1.20
        rec(db, ms=0.95, block_m=128, t=3)
        rec(db, ms=0.97, block_m=128, t=4)
        (b,) = db.best_entries()
        assert b["config"]["block_m"] == 128 and b["n_trials"] == 2


def test_only_failed_trials_give_no_best(tmp_path):
    with TuningDB(tmp_path / "t.sqlite") as db:
        for i, st in enumerate(("failed", "wrong", "timeout")):
            rec(db, ms=0.5 if st != "timeout" else None, status=st, block_m=16 << i, t=i)
        assert db.counts()["best"] == 0 and db.counts()["trials"] == 3
        assert db.recompute_best() == 0


@pytest.mark.parametrize("kw,match", [
    ({"status": "bogus"}, "status"), ({"ms": None}, "median_ms"), ({"ms": -1.0}, "median_ms"),
    ({"ms": float("nan")}, "median_ms"), ({"host": 123}, "host"),
])
def test_record_validation(tmp_path, kw, match):
    with TuningDB(tmp_path / "t.sqlite") as db:
        with pytest.raises(DatabaseError, match=match):
            rec(db, **kw)
        assert db.counts()["trials"] == 0
    with TuningDB(tmp_path / "t.sqlite") as db, pytest.raises(DatabaseError, match="cuda"):
        rec(db, device={**H200, "compute_capability": None})


# ---- export / import -----------------------------------------------------------------------

def test_export_format(tmp_path):
    with TuningDB(tmp_path / "a.sqlite") as db:
        populate(db)
        text = export_text(db, tmp_path).decode()
    lines = [json.loads(x) for x in text.splitlines()]
    assert lines[0] == {"kind": "header", "format": "gfwagen-tuning-db", "schema_version": 1}
    assert lines[-1] == {"kind": "footer", "devices": 1, "toolchains": 2, "trials": 9}
    kinds = [x["kind"] for x in lines[1:-1]]
    assert kinds == sorted(kinds, key=["device", "toolchain", "trial"].index)
    trials = [x for x in lines if x["kind"] == "trial"]
    assert [(t["created_at"], t["id"]) for t in trials] == \
        sorted((t["created_at"], t["id"]) for t in trials)
    for line in text.splitlines():  # sorted keys on every line
        assert line == json.dumps(json.loads(line), sort_keys=True)


def test_round_trip_is_byte_identical(tmp_path):
    with TuningDB(tmp_path / "a.sqlite") as a:
        populate(a)
        first = export_text(a, tmp_path, "a.jsonl")
        best_a = a.best_entries()
    with TuningDB(tmp_path / "b.sqlite") as b:
        res = b.import_jsonl(tmp_path / "a.jsonl")
        assert res["trials"] == {"new": 9, "existing": 0}
        assert export_text(b, tmp_path, "b.jsonl") == first
        assert b.best_entries() == best_a


def test_import_twice_is_idempotent(tmp_path):
    with TuningDB(tmp_path / "a.sqlite") as a:
        populate(a)
        export_text(a, tmp_path, "a.jsonl")
    with TuningDB(tmp_path / "b.sqlite") as b:
        rec(b, ms=2.0, host="host-b", t=30)
        b.import_jsonl(tmp_path / "a.jsonl")
    once = dump(tmp_path / "b.sqlite")
    with TuningDB(tmp_path / "b.sqlite") as b:
        res = b.import_jsonl(tmp_path / "a.jsonl")
        assert res == {t: {"new": 0, "existing": n}
                       for t, n in (("devices", 1), ("toolchains", 2), ("trials", 9))}
    assert dump(tmp_path / "b.sqlite") == once


def test_merge_keeps_every_measurement(tmp_path):
    with TuningDB(tmp_path / "a.sqlite") as a:
        populate(a, host="host-a")
    with TuningDB(tmp_path / "b.sqlite") as b:
        populate(b, host="host-b", device=H200_NEW_DRIVER, t0=20)
        rec(b, ms=0.5, block_m=256, host="host-b", device=H100, t=40)
        b_ids = {r["id"] for r in b.db.query("SELECT id FROM trials")}
    b_before = dump(tmp_path / "b.sqlite")
    with TuningDB(tmp_path / "a.sqlite") as a:
        a_ids = {r["id"] for r in a.db.query("SELECT id FROM trials")}
        res = a.merge(tmp_path / "b.sqlite")
        assert res["trials"] == {"new": 10, "existing": 0}
        rows = list(a.db.query("SELECT id, host, device_key FROM trials"))
        assert {r["id"] for r in rows} == a_ids | b_ids and len(rows) == 19
        assert {(r["host"], r["device_key"]) for r in rows} == {
            ("host-a", device_key(H200)), ("host-b", device_key(H200_NEW_DRIVER)),
            ("host-b", device_key(H100))}
        assert a.counts()["devices"] == 3
        models = sorted(b["model"] for b in a.best_entries())
        assert models.count("h100") == 1 and models.count("h200") == 6
        merged = dump(tmp_path / "a.sqlite")
        assert a.merge(tmp_path / "b.sqlite")["trials"] == {"new": 0, "existing": 10}
    assert dump(tmp_path / "a.sqlite") == merged
    assert dump(tmp_path / "b.sqlite") == b_before  # the other file is only read


def test_conflicting_measurement_is_refused(tmp_path):
    with TuningDB(tmp_path / "a.sqlite") as a:
        rec(a, ms=1.0)
        export_text(a, tmp_path, "a.jsonl")
    with TuningDB(tmp_path / "b.sqlite") as b:
        rec(b, ms=1.0)
        rec(b, ms=2.0, t=5)
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    t = json.loads(lines[3])
    t["median_ms"] = 9.0  # same id (same device, spec, config, host, time), other result
    lines[3] = json.dumps(t, sort_keys=True)
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    before = dump(tmp_path / "b.sqlite")
    with TuningDB(tmp_path / "b.sqlite") as b, pytest.raises(DatabaseError, match="median_ms"):
        b.import_jsonl(tmp_path / "c.jsonl")
    assert dump(tmp_path / "b.sqlite") == before


# ---- bad files leave the database unchanged --------------------------------------------------

def _good_export(tmp_path) -> list[str]:
    with TuningDB(tmp_path / "src.sqlite") as db:
        populate(db)
        export_text(db, tmp_path, "good.jsonl")
    return (tmp_path / "good.jsonl").read_text().splitlines()


def _edit_trial(lines, i, **changes):
    t = json.loads(lines[i])
    for k, v in changes.items():
        if k == "fix_id":
            continue
        if "." in k:
            a, b = k.split(".")
            t[a][b] = v
        else:
            t[k] = v
    if changes.pop("fix_id", False):  # a well-formed row, so later checks are reached
        t["id"] = trial_id(t["device_key"], t["toolchain_key"], KernelSpec(**t["spec"]),
                           Problem(**t["problem"]), KernelConfig.from_dict(t["config"]),
                           t["host"], t["created_at"])
    return lines[:i] + [json.dumps(t, sort_keys=True)] + lines[i + 1:]


BAD_JSONL = {
    "truncated mid-line": lambda L: "\n".join(L)[:-40],
    "truncated at a line": lambda L: "\n".join(L[:-3]) + "\n",
    "no footer": lambda L: "\n".join(L[:-1]) + "\n",
    "foreign json lines": lambda L: '{"name": "x"}\n{"name": "y"}\n',
    "foreign header": lambda L: '{"kind": "header", "format": "other"}\n' + "\n".join(L[1:]),
    "newer schema": lambda L: L[0].replace('"schema_version": 1', '"schema_version": 7') + "\n"
    + "\n".join(L[1:]),
    "empty": lambda L: "",
    "bad block_m": lambda L: "\n".join(_edit_trial(L, -2, **{"config.block_m": 3})) + "\n",
    "bad dtype": lambda L: "\n".join(_edit_trial(L, -2, **{"spec.dtype": "int4"})) + "\n",
    "bad backend": lambda L: "\n".join(_edit_trial(L, -2, **{"spec.backend": "cuda"})) + "\n",
    "bad status": lambda L: "\n".join(_edit_trial(L, -2, status="great")) + "\n",
    "str head_dim": lambda L: "\n".join(_edit_trial(L, -2, **{"problem.head_dim": "128"})) + "\n",
    "negative ms": lambda L: "\n".join(_edit_trial(L, -2, median_ms=-1)) + "\n",
    "tampered id": lambda L: "\n".join(_edit_trial(L, -2, host="elsewhere")) + "\n",
    "unknown device": lambda L: "\n".join(_edit_trial(L, -2, device_key="0" * 16,
                                                                fix_id=True)) + "\n",
    "spec/problem mismatch": lambda L: "\n".join(_edit_trial(L, -2, **{"spec.head_dim": 64}))
    + "\n",
}


BAD_JSONL_MATCH = {"truncated mid-line": "not valid JSON", "truncated at a line": "truncated",
                   "no footer": "truncated", "foreign header": "not a gfwagen",
                   "newer schema": "not supported", "bad block_m": "power of two",
                   "tampered id": "does not match", "unknown device": "unknown devices",
                   "spec/problem mismatch": "does not describe"}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_jsonl_leaves_db_unchanged(tmp_path, case):
    lines = _good_export(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(BAD_JSONL[case](lines))
    path = tmp_path / "target.sqlite"
    with TuningDB(path) as db:
        rec(db, ms=5.0, host="target", t=50)
    before = dump(path)
    with TuningDB(path) as db, pytest.raises(DatabaseError, match=BAD_JSONL_MATCH.get(case)):
        db.import_jsonl(bad)
    assert dump(path) == before


def test_binary_jsonl_is_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(bytes(range(256)) * 4)
    with TuningDB(tmp_path / "t.sqlite") as db, pytest.raises(DatabaseError, match="text"):
        db.import_jsonl(bad)


def _sqlite_cases(tmp_path):
    with TuningDB(tmp_path / "src.sqlite") as db:
        for i in range(300):  # enough rows for many pages
            rec(db, ms=1.0 + i / 1000, block_m=64, host=f"h{i}", t=i % 60)
    data = (tmp_path / "src.sqlite").read_bytes()
    assert len(data) > 8 * 4096
    (tmp_path / "truncated.sqlite").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.sqlite").write_bytes(b"\x00garbage" * 2000)
    conn = sqlite3.connect(tmp_path / "foreign.sqlite")
    conn.execute("CREATE TABLE trials (id TEXT)")
    conn.commit()
    conn.close()
    conn = sqlite3.connect(tmp_path / "badrow.sqlite")
    conn.close()
    shutil.copy(tmp_path / "src.sqlite", tmp_path / "badrow.sqlite")
    conn = sqlite3.connect(tmp_path / "badrow.sqlite")
    conn.execute("UPDATE trials SET config_json = '{\"block_m\": 3}' WHERE rowid = 250")
    conn.commit()
    conn.close()
    (tmp_path / "empty.sqlite").write_bytes(b"")
    return ["truncated", "junk", "foreign", "badrow", "empty", "missing"]


def test_bad_sqlite_merge_leaves_db_unchanged(tmp_path):
    cases = _sqlite_cases(tmp_path)
    path = tmp_path / "target.sqlite"
    with TuningDB(path) as db:
        populate(db)
    before = dump(path)
    for case in cases:
        with TuningDB(path) as db, pytest.raises(DatabaseError):
            db.merge(tmp_path / f"{case}.sqlite")
        assert dump(path) == before, case


# ---- runtime lookup ------------------------------------------------------------------------

def _lookup_db(tmp_path):
    path = tmp_path / "lookup.sqlite"
    with TuningDB(path) as db:
        rec(db, ms=1.0, block_m=128, device=H200, t=0)                      # T 4096
        rec(db, problem=Problem(2, 1024, 16, 4, 128, 128, 1000, "bf16"), ms=0.3, block_m=32,
            device=H200, t=1)                                               # T 1024
        rec(db, problem=Problem(2, 8192, 16, 4, 128, 128, 1000, "bf16"), ms=2.0, block_m=256,
            device=H200, t=2)                                               # T 8192
    return path


def test_lookup_fallback_levels(tmp_path):
    path = _lookup_db(tmp_path)
    snap = Snapshot.load(path, shipped=False)
    cfg, why = snap.lookup(SPEC, 4096, H200)
    assert cfg.block_m == 128 and why.startswith("tuned on this device (h200, T-bucket 4096")
    cfg, why = snap.lookup(SPEC, 4096, H200_NEW_DRIVER)
    assert cfg.block_m == 128 and why.startswith("same GPU model h200")
    cfg, why = snap.lookup(SPEC, 4096, H100)
    assert cfg.block_m == 128 and why.startswith("same architecture sm_90")
    cfg, why = snap.lookup(SPEC, 4096, A100)
    assert cfg is None and why.startswith("no tuned entry")
    cfg, why = snap.lookup(SPEC.replace(dtype="fp32"), 4096, H200)
    assert cfg is None and why.startswith("no tuned entry")


def test_lookup_takes_kin_classes_other_gqa_groups_then_the_other_half_dtype(tmp_path):
    """Entries tuned at GQA group 4 in bf16 (SPEC): another group takes them, nearest group
    first; fp16 takes bf16's; an exact class wins over kin; fp32 and TVM take no kin."""
    path = _lookup_db(tmp_path)
    with TuningDB(path) as db:  # group 1 (16 kv heads), and fp16 at group 4
        rec(db, problem=dataclasses.replace(PROB, kv_heads=16), ms=1.0, block_m=16, t=5)
        rec(db, problem=dataclasses.replace(PROB, dtype="fp16"), ms=1.0, block_m=64, t=6)
    snap = Snapshot.load(path, shipped=False)
    cfg, why = snap.lookup(SPEC.replace(group=8), 4096, H200)
    assert cfg.block_m == 128 and why.endswith("; tuned for GQA group 4, run at 8")
    cfg, why = snap.lookup(SPEC.replace(group=2), 4096, H200)  # 1 and 4 equally near: 1
    assert cfg.block_m == 16 and "GQA group 1, run at 2" in why
    cfg, why = snap.lookup(SPEC.replace(group=1), 4096, H200)
    assert cfg.block_m == 16 and "GQA" not in why
    cfg, why = snap.lookup(SPEC.replace(dtype="fp16"), 4096, H200)  # its own entry
    assert cfg.block_m == 64 and "tuned in" not in why
    cfg, why = snap.lookup(SPEC.replace(dtype="fp16", group=8), 4096, H200)  # its dtype first
    assert cfg.block_m == 64 and why.endswith("; tuned for GQA group 4, run at 8")
    only_bf16 = Snapshot.load(_lookup_db(tmp_path / "b"), shipped=False)
    cfg, why = only_bf16.lookup(SPEC.replace(dtype="fp16", group=16), 4096, H100)
    assert cfg.block_m == 128 and why.startswith("same architecture sm_90")
    assert why.endswith("; tuned in bf16 for GQA group 4, run in fp16")
    assert only_bf16.lookup(SPEC.replace(dtype="fp32"), 4096, H200)[0] is None
    assert only_bf16.lookup(SPEC.replace(backend="tvm", group=8), 4096, H200)[0] is None


def test_lookup_takes_the_gated_class_for_an_ungated_problem_last(tmp_path):
    """An ungated Triton problem with no entry of its own, at any group or dtype, takes its
    gated class's (SPEC is gated), saying so; its own entry, or one of its kin, wins over the
    gated class; TVM takes none."""
    path = _lookup_db(tmp_path)
    plain = SPEC.replace(gated=False)
    snap = Snapshot.load(path, shipped=False)
    cfg, why = snap.lookup(plain, 4096, H200)
    assert cfg.block_m == 128 and why.endswith("; tuned gated, run ungated")
    cfg, why = snap.lookup(plain.replace(group=8, dtype="fp16"), 4096, H100)
    assert cfg.block_m == 128 and why.startswith("same architecture sm_90")
    assert why.endswith("; tuned in bf16 for GQA group 4, run in fp16; tuned gated, run ungated")
    assert snap.lookup(plain.replace(backend="tvm"), 4096, H200)[0] is None
    with TuningDB(path) as db:  # an ungated entry at group 1: the group-8 problem's kin
        rec(db, problem=dataclasses.replace(PROB, kv_heads=16, gated=False), ms=9.0,
            block_m=16, t=7)
    snap = Snapshot.load(path, shipped=False)
    cfg, why = snap.lookup(plain.replace(group=8), 4096, H200)
    assert cfg.block_m == 16 and why.endswith("; tuned for GQA group 1, run at 8")
    cfg, why = snap.lookup(plain.replace(group=1), 4096, H200)
    assert cfg.block_m == 16 and "gated" not in why


def test_auto_backend_compares_an_ungated_problem_like_for_like(tmp_path):
    """backend="auto" for an ungated problem where TVM measured it and Triton only its gated
    class (the lookup's stand-in): the gate would decide, not the kernels, so both are
    compared gated; once Triton measured the ungated problem too, those times decide."""
    from gfwagen.db.lookup import gated_stand_in
    from gfwagen.dispatch import faster_backend

    path = _lookup_db(tmp_path)  # Triton, gated: 1.0 ms at T 4096
    plain = dataclasses.replace(PROB, gated=False)
    with TuningDB(path) as db:
        rec(db, problem=plain, backend="tvm", ms=0.9, block_m=64, t=10)
        rec(db, backend="tvm", ms=1.1, block_m=64, t=11)
    snap = Snapshot.load(path, shipped=False)
    spec = SPEC.replace(gated=False)
    entry, _ = snap.lookup_entry(spec, 4096, H200)
    assert gated_stand_in(spec, entry) and not gated_stand_in(SPEC, entry)
    assert faster_backend(snap, spec, 4096, H200) == ("triton", {"triton": 1.0, "tvm": 1.1},
                                                      True)
    assert faster_backend(snap, SPEC, 4096, H200) == ("triton", {"triton": 1.0, "tvm": 1.1},
                                                      False)
    with TuningDB(path) as db:
        rec(db, problem=plain, ms=0.95, block_m=32, t=12)
    snap = Snapshot.load(path, shipped=False)
    entry, _ = snap.lookup_entry(spec, 4096, H200)
    assert not gated_stand_in(spec, entry)
    assert faster_backend(snap, spec, 4096, H200) == ("tvm", {"triton": 0.95, "tvm": 0.9},
                                                      False)


def test_lookup_seqlen_and_window_class(tmp_path):
    snap = Snapshot.load(_lookup_db(tmp_path), shipped=False)
    assert snap.lookup(SPEC, 1500, H200)[0].block_m == 32      # log2 1500 nearer 1024
    assert snap.lookup(SPEC, 3000, H200)[0].block_m == 128
    assert snap.lookup(SPEC, 100_000, H200)[0].block_m == 256
    assert snap.lookup(SPEC, 1, H200)[0].block_m == 32
    assert snap.lookup(SPEC.replace(window=1024), 4096, H200)[0].block_m == 128  # same class
    assert snap.lookup(SPEC.replace(window=600), 4096, H200)[0].block_m == 128
    assert snap.lookup(SPEC.replace(window=2000), 4096, H200)[0] is None
    assert snap.lookup(SPEC.replace(window=0), 4096, H200)[0] is None


def test_lookup_prefers_this_toolchain_then_speed(tmp_path):
    path = tmp_path / "t.sqlite"
    with TuningDB(path) as db:
        rec(db, ms=1.0, block_m=128, tc=toolchain(), t=0)
        rec(db, ms=0.5, block_m=64, tc=TC_OLD, t=1)
        rec(db, ms=0.4, block_m=256, device=H200_NEW_DRIVER, t=2)
    snap = Snapshot.load(path, shipped=False)
    cfg, why = snap.lookup(SPEC, 4096, H200)
    assert cfg.block_m == 128 and "other toolchain" not in why
    cfg, why = snap.lookup(SPEC, 4096, H100)  # arch level: both h200 devices; fastest wins
    assert cfg.block_m in (128, 256)


def test_snapshot_from_shipped_jsonl_never_writes(tmp_path, monkeypatch):
    with TuningDB(tmp_path / "src.sqlite") as db:
        rec(db, ms=1.0, block_m=128, t=0)
    shipped = tmp_path / "tuning_db"
    shipped.mkdir()
    with TuningDB(tmp_path / "src.sqlite") as db:
        db.export_jsonl(shipped / "h200.jsonl")
    (shipped / "broken.jsonl").write_text("not json\n")
    monkeypatch.setenv("GFWAGEN_TUNING_DB_DIR", str(shipped))
    user = tmp_path / "default" / "tuning.sqlite"
    reset_snapshot()
    with pytest.warns(RuntimeWarning, match="broken.jsonl"):
        snap = get_snapshot()
    assert get_snapshot() is snap
    assert not user.exists()  # the lookup never creates the user's database
    before = sorted(p.name for p in shipped.iterdir())
    cfg, why = snap.lookup(SPEC, 4096, H200)
    assert cfg.block_m == 128 and "shipped" in why
    assert sorted(p.name for p in shipped.iterdir()) == before
    assert isinstance(snap.entries, tuple) and len(snap) == 1
    with pytest.raises(AttributeError):
        snap.entries[0].config = KernelConfig()  # frozen

    # The user's database joins in and wins ties; loading it leaves the file as it was.
    with TuningDB(user) as db:
        rec(db, ms=1.0, block_m=64, tc=TC, t=3)
    before_user = dump(user)
    reset_snapshot()
    with pytest.warns(RuntimeWarning):
        snap2 = get_snapshot()
    assert snap2 is not snap and len(snap2) == 2
    assert dump(user) == before_user


def test_reset_snapshot_drops_the_ops_memoized_configs(tmp_path, monkeypatch):
    """After reset_snapshot (as after `gfwagen db import` in a running process) the op's
    memoized lookups (gfwagen.dispatch) see the new database, not the old snapshot's picks."""
    import torch

    from gfwagen import dispatch
    from gfwagen.db.fingerprint import device_fingerprint, toolchain

    user = tmp_path / "user.sqlite"
    monkeypatch.setenv("GFWAGEN_DB", str(user))
    (tmp_path / "shipped").mkdir()
    monkeypatch.setenv("GFWAGEN_TUNING_DB_DIR", str(tmp_path / "shipped"))
    cpu = device_fingerprint(torch.device("cpu"))
    spec = PROB.spec("tvm", "fwd")
    with TuningDB(user) as db:
        rec(db, backend="tvm", device=cpu, tc=toolchain(), ms=2.0, block_m=32, t=0)
    reset_snapshot()
    assert dispatch._lookup(spec, 4096, "cpu").block_m == 32
    with TuningDB(user) as db:
        rec(db, backend="tvm", device=cpu, tc=toolchain(), ms=1.0, block_m=64, t=1)
    assert dispatch._lookup(spec, 4096, "cpu").block_m == 32  # the snapshot stands
    reset_snapshot()
    assert dispatch._lookup(spec, 4096, "cpu").block_m == 64
    reset_snapshot()


def test_snapshot_skips_unreadable_user_db(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"garbage" * 1000)
    with pytest.warns(RuntimeWarning, match="ignoring tuning database"):
        snap = Snapshot.load(bad, shipped=False)
    assert len(snap) == 0 and snap.lookup(SPEC, 4096, H200)[0] is None
    assert bad.read_bytes() == b"garbage" * 1000


# ---- backend="auto" on CUDA: the faster backend per direction, from the database ----------

def _auto_setup(tmp_path, monkeypatch, times, tvm_ready=True):
    """A database holding `times` {(backend, pass): ms} for PROB on the H200, and the dispatch
    looking at it as if it ran there."""
    from gfwagen import dispatch
    from gfwagen.db import lookup

    path = tmp_path / "auto.sqlite"
    with TuningDB(path) as db:
        for i, ((backend, pass_), ms) in enumerate(sorted(times.items())):
            rec(db, backend=backend, pass_=pass_, ms=ms, tc=toolchain(), t=i)
    snap = Snapshot.load(path, shipped=False)
    monkeypatch.setattr(lookup, "get_snapshot", lambda: snap)
    monkeypatch.setattr("gfwagen.db.fingerprint.device_fingerprint", lambda dev: H200)
    monkeypatch.setattr(dispatch, "_tvm_cuda_ready", lambda: tvm_ready)
    dispatch._auto_choice.cache_clear()
    q = types.SimpleNamespace(shape=(PROB.batch, PROB.seqlen, PROB.heads, PROB.head_dim),
                              dtype=torch.bfloat16, device=torch.device("cuda:0"))
    group = PROB.heads // PROB.kv_heads
    return lambda direction, varlen=False: dispatch.cuda_auto_backend(
        direction, q, q, PROB.window, True, group, varlen)


@pytest.mark.parametrize("times, fwd, bwd", [
    # TVM faster forward, Triton faster backward (its two passes summed: 0.6 + 0.5 < 1.2)
    ({("triton", "fwd"): 1.0, ("tvm", "fwd"): 0.8, ("triton", "bwd_kv"): 0.6,
      ("triton", "bwd_q"): 0.5, ("tvm", "bwd_kv"): 1.2}, "tvm", "triton"),
    # TVM's backward beats the sum, not each Triton pass alone
    ({("triton", "fwd"): 1.0, ("tvm", "fwd"): 1.5, ("triton", "bwd_kv"): 0.6,
      ("triton", "bwd_q"): 0.5, ("tvm", "bwd_kv"): 1.0}, "triton", "tvm"),
    # Triton never tuned: nothing to compare against, Triton runs
    ({("tvm", "fwd"): 0.1, ("tvm", "bwd_kv"): 0.1}, "triton", "triton"),
    # a Triton backward pass missing: no sum to compare
    ({("triton", "bwd_kv"): 5.0, ("tvm", "bwd_kv"): 1.0}, "triton", "triton"),
    # no TVM entry at all
    ({("triton", "fwd"): 1.0}, "triton", "triton"),
])
def test_auto_backend_on_cuda_picks_the_faster_tuned(tmp_path, monkeypatch, times, fwd, bwd):
    pick = _auto_setup(tmp_path, monkeypatch, times)
    assert (pick("fwd"), pick("bwd")) == (fwd, bwd)


@pytest.mark.parametrize("times, stored", [
    # the stored-dS backward beats the recomputing passes' sum, not each pass alone
    ({("triton", "bwd_kv"): 1.2, ("triton", "bwd_q"): 0.9, ("triton", "bwd_ds"): 1.9}, True),
    ({("triton", "bwd_kv"): 1.2, ("triton", "bwd_q"): 0.9, ("triton", "bwd_ds"): 2.2}, False),
    # no bwd_ds tuned, or a recomputing pass missing: nothing to compare, recompute
    ({("triton", "bwd_kv"): 1.2, ("triton", "bwd_q"): 0.9}, False),
    ({("triton", "bwd_kv"): 1.2, ("triton", "bwd_ds"): 0.1}, False),
])
def test_stored_backward_only_where_the_database_measured_it_faster(tmp_path, monkeypatch,
                                                                     times, stored):
    from gfwagen import dispatch

    _auto_setup(tmp_path, monkeypatch, times)
    dispatch._stored_choice.cache_clear()
    got = dispatch._stored_choice(PROB.spec("triton", "bwd_kv"), PROB.seqlen, "cuda:0")
    dispatch._stored_choice.cache_clear()
    assert (got is not None) == stored


def test_stored_backward_compares_times_of_one_sequence_length(tmp_path, monkeypatch):
    """bwd_ds tuned only at another sequence length than bwd_kv and bwd_q: its time is of
    another problem size, so nothing is compared and the backward recomputes."""
    from gfwagen import dispatch
    from gfwagen.db import lookup

    long = dataclasses.replace(PROB, seqlen=4 * PROB.seqlen)
    path = tmp_path / "buckets.sqlite"
    with TuningDB(path) as db:
        rec(db, pass_="bwd_kv", ms=1.2, tc=toolchain(), t=0)
        rec(db, pass_="bwd_q", ms=0.9, tc=toolchain(), t=1)
        rec(db, long, pass_="bwd_ds", ms=0.5, tc=toolchain(), t=2)
    snap = Snapshot.load(path, shipped=False)
    monkeypatch.setattr(lookup, "get_snapshot", lambda: snap)
    monkeypatch.setattr("gfwagen.db.fingerprint.device_fingerprint", lambda dev: H200)
    dispatch._stored_choice.cache_clear()
    for seqlen in (PROB.seqlen, long.seqlen):
        assert dispatch._stored_choice(PROB.spec("triton", "bwd_kv"), seqlen, "cuda:0") is None
    dispatch._stored_choice.cache_clear()


def test_stored_backward_compares_times_of_one_timer(tmp_path, monkeypatch):
    """bwd_ds timed by this toolchain's timer, bwd_kv and bwd_q by an earlier one (shipped
    entries from before the timer was part of the toolchain): times measured differently
    are not compared, and the backward recomputes; all three from one timer: compared."""
    from gfwagen import dispatch
    from gfwagen.db import lookup

    old = {k: v for k, v in toolchain().items() if k != "timer"}
    for name, tcs, stored in (("mixed", (old, old, toolchain()), False),
                              ("one", (toolchain(),) * 3, True)):
        path = tmp_path / f"{name}.sqlite"
        with TuningDB(path) as db:
            for t, (pass_, ms) in enumerate((("bwd_kv", 1.2), ("bwd_q", 0.9), ("bwd_ds", 0.5))):
                rec(db, pass_=pass_, ms=ms, tc=tcs[t], t=t)
        snap = Snapshot.load(path, shipped=False)
        monkeypatch.setattr(lookup, "get_snapshot", lambda snap=snap: snap)
        monkeypatch.setattr("gfwagen.db.fingerprint.device_fingerprint", lambda dev: H200)
        dispatch._stored_choice.cache_clear()
        got = dispatch._stored_choice(PROB.spec("triton", "bwd_kv"), PROB.seqlen, "cuda:0")
        dispatch._stored_choice.cache_clear()
        assert (got is not None) == stored, name


def test_auto_backend_keeps_packed_sequences_on_triton(tmp_path, monkeypatch):
    """Where TVM measured faster, packed sequences still run on Triton: one launch for all,
    no host read of cu_seqlens (TVM would run them one at a time after reading it)."""
    pick = _auto_setup(tmp_path, monkeypatch, {("triton", "fwd"): 1.0, ("tvm", "fwd"): 0.5})
    assert pick("fwd") == "tvm" and pick("fwd", varlen=True) == "triton"


def test_auto_backend_keeps_triton_without_tvm_cuda(tmp_path, monkeypatch):
    pick = _auto_setup(tmp_path, monkeypatch, {("triton", "fwd"): 1.0, ("tvm", "fwd"): 0.5},
                       tvm_ready=False)
    assert pick("fwd") == "triton"


# Ungated problems of classes the shipped H200 database tunes only gated, and the passes that
# borrow the gated class's tiles: test_gpu.py runs these through the op against float64. A
# re-tune that adds ungated entries for a class changes its reason and fails here, on the CPU,
# instead of leaving the GPU test's premise silently stale (session 38 found two such).
GATED_KIN_CASES = [
    # (B, T, H, D, W, the passes looked up from the gated class)
    (2, 1500, 8, 64, 256, ("fwd",)),
    (1, 1200, 4, 256, 512, ("fwd", "bwd_kv", "bwd_q")),
    (1, 2100, 2, 256, 2048, ("fwd", "bwd_kv", "bwd_q")),
]


@pytest.mark.parametrize("case", GATED_KIN_CASES, ids=lambda c: f"D{c[3]}-W{c[4]}")
def test_shipped_h200_database_runs_these_ungated_classes_on_gated_tiles(case, monkeypatch,
                                                                          tmp_path):
    from pathlib import Path

    from gfwagen import dispatch

    shipped = Path(__file__).resolve().parents[1] / "tuning_db"  # the repo's, not conftest's
    monkeypatch.setenv("GFWAGEN_TUNING_DB_DIR", str(shipped))
    monkeypatch.setenv("GFWAGEN_DB", str(tmp_path / "none.sqlite"))
    reset_snapshot()
    rows = [json.loads(line) for line in (shipped / "h200.jsonl").read_text().splitlines()]
    (fp,) = [r["fingerprint"] for r in rows if r.get("kind") == "device"]
    B, T, H, D, W, passes = case
    q = torch.empty(B, T, H, D, dtype=torch.bfloat16)
    try:
        for pass_ in passes:
            spec = dispatch._spec("triton", pass_, q, q, W, False, 1)
            _, why = get_snapshot().lookup(spec, T, fp)
            assert "shipped" in why and why.endswith("; tuned gated, run ungated"), (pass_, why)
    finally:
        reset_snapshot()
