"""Faults against the tuning database (docs/RELIABILITY.md): concurrent writers, writers
killed with SIGKILL mid-transaction, corrupt / truncated / foreign files at every door (open,
read-only open, import_jsonl, merge, the runtime snapshot), hostile or unrunnable rows, and
migration from every earlier schema version."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import sqlite3
import sys
import time
import warnings
from pathlib import Path

import pytest

from gfwagen.db import DatabaseError, Snapshot, TuningDB, device_key, reset_snapshot, sharing
from gfwagen.db import records as R
from gfwagen.db import schema as S
from gfwagen.spec import KernelConfig, Problem

H200 = {"kind": "cuda", "name": "NVIDIA H200", "compute_capability": "9.0", "sm_count": 132,
        "memory_bytes": 150_000_000_000, "driver_version": "12.8", "cuda_version": "12.8",
        "processor": None}
H100 = {**H200, "name": "NVIDIA H100 80GB HBM3", "memory_bytes": 85_000_000_000}
TC = {"torch": "2.13.0", "triton": "3.6.0", "tvm": "0.27.0"}
PROB = Problem(batch=2, seqlen=4096, heads=16, kv_heads=4, head_dim=128, value_dim=128,
               window=1000, dtype="bf16", gated=True)
CTX = mp.get_context("spawn")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and fork-free spawn")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Never touch the real cache dir or the repo's shipped files."""
    monkeypatch.setenv("GFWAGEN_DB", str(tmp_path / "default" / "tuning.sqlite"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "shipped-empty").mkdir()
    monkeypatch.setenv("GFWAGEN_TUNING_DB_DIR", str(tmp_path / "shipped-empty"))
    reset_snapshot()
    yield
    reset_snapshot()


def rec(db, *, ms=1.0, host="host-a", t=0, device=H200, status="ok", reason="", **cfg):
    return db.record_trial(PROB, "triton", "fwd", KernelConfig(**cfg), median_ms=ms,
                           spread=0.01, status=status, reason=reason, device=device,
                           toolchain_versions=TC, host=host,
                           created_at=f"2025-01-01T00:{t // 60:02d}:{t % 60:02d}.000000+00:00")


def dump(path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def ids(path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT id FROM trials")}
    finally:
        conn.close()


def assert_healthy(path) -> None:
    """Opens, passes integrity_check, and `best` is what a rebuild from `trials` gives (every
    write updated both in one transaction)."""
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    with TuningDB(path) as db:
        incremental = db.best_entries()
        db.recompute_best()
        assert db.best_entries() == incremental


def bulk_export(path, host: str, n: int) -> set[str]:
    """An export file of n trials from `host`, written without a database; returns its ids."""
    dev, tc = R.device_row(H200), R.toolchain_row(TC)
    rows = [R.trial_row(device_key=dev["key"], toolchain_key=tc["key"], problem=PROB,
                        spec=PROB.spec("triton", "fwd"), config=KernelConfig(block_m=16 << i % 4),
                        median_ms=1.0 + i / 1000, spread=None, status="ok", reason="",
                        host=host, created_at=f"2025-02-01T00:00:00.{i:06d}+00:00")
            for i in range(n)]
    sharing.write_jsonl_atomic(path, [R.device_record(dev)], [R.toolchain_record(tc)],
                               [R.trial_record(r) for r in rows])
    return {r["id"] for r in rows}


# ---- worker processes (spawned: module-level functions) ------------------------------------

def _record_worker(path, host, n, start, out):
    start.wait(60)
    with TuningDB(path) as db:
        out.put([rec(db, ms=1.0 + i / 100, block_m=16 << (i % 4), host=host, t=i)
                 for i in range(n)])


def _endless_writer(path, bulk_files, out):
    """Records trials one by one, with a bulk import of 300 every few, reporting each trial id
    once record_trial has returned (committed) until it is killed."""
    with TuningDB(path) as db:
        i = 0
        while True:
            out.put(rec(db, ms=1.0 + i / 1000, host="endless", t=i % 3600, block_m=64))
            if i % 7 == 3 and bulk_files:
                db.import_jsonl(bulk_files.pop(0))
            i += 1


def _stall_in_transaction(path, bulk_file, committed, inside):
    """Commits two trials, then imports bulk_file but stalls after its rows are inserted and
    before COMMIT (the parent kills it there)."""
    with TuningDB(path) as db:
        committed.put([rec(db, host="before-kill", t=i) for i in range(2)])

        def stall(self, groups):
            inside.set()
            time.sleep(120)

        TuningDB._recompute = stall
        db.import_jsonl(bulk_file)


def _stall_in_migration(path, inside):
    """Opens `path` with one more schema version whose step stalls after altering a table."""

    def step(db):
        db["trials"].add_column("note", str)
        db.execute("UPDATE trials SET note = 'half-migrated'")
        inside.set()
        time.sleep(120)

    S.SCHEMA_VERSION += 1
    S.MIGRATIONS[S.SCHEMA_VERSION - 1] = step
    TuningDB(path)


def _spawn(target, *args):
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def _kill(p) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert p.exitcode == -signal.SIGKILL


# ---- concurrency ---------------------------------------------------------------------------

def test_two_processes_creating_and_recording_at_once_lose_nothing(tmp_path):
    """Both create the file (migration race), then write 40 trials each, interleaved."""
    path = tmp_path / "shared.sqlite"
    start, out = CTX.Event(), CTX.Queue()
    n = 40
    procs = [_spawn(_record_worker, path, f"worker-{w}", n, start, out) for w in range(2)]
    start.set()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    expected = set(got[0]) | set(got[1])
    assert len(expected) == 2 * n
    assert ids(path) == expected
    assert_healthy(path)


# ---- SIGKILL -------------------------------------------------------------------------------

def test_sigkill_inside_a_transaction_keeps_committed_and_drops_the_rest(tmp_path):
    path = tmp_path / "t.sqlite"
    bulk = tmp_path / "bulk.jsonl"
    bulk_ids = bulk_export(bulk, "bulk", 300)
    committed, inside = CTX.Queue(), CTX.Event()
    p = _spawn(_stall_in_transaction, path, bulk, committed, inside)
    before = set(committed.get(timeout=120))
    assert inside.wait(120), "the writer never reached its transaction"
    _kill(p)
    assert ids(path) == before and not (ids(path) & bulk_ids)
    assert_healthy(path)
    with TuningDB(path) as db:  # the dead writer's lock is gone: the next write goes through
        assert db.import_jsonl(bulk)["trials"] == {"new": 300, "existing": 0}
    assert ids(path) == before | bulk_ids


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_sigkill_at_a_random_moment_loses_no_committed_trial(tmp_path, delay):
    path = tmp_path / "t.sqlite"
    bulks = {}
    for k in range(8):
        f = tmp_path / f"bulk{k}.jsonl"
        bulks[f] = bulk_export(f, f"bulk-{k}", 300)
    out = CTX.Queue()
    p = _spawn(_endless_writer, path, list(bulks), out)
    reported = [out.get(timeout=120) for _ in range(12)]
    time.sleep(delay)
    _kill(p)
    while not out.empty():
        try:
            reported.append(out.get(timeout=1))
        except Exception:  # a message cut by the kill
            break
    assert set(reported) <= ids(path)
    for bulk_ids in bulks.values():  # each import all or nothing
        assert len(ids(path) & bulk_ids) in (0, len(bulk_ids))
    assert_healthy(path)


def test_sigkill_during_a_migration_leaves_the_old_version(tmp_path):
    path = tmp_path / "t.sqlite"
    with TuningDB(path) as db:
        for i in range(5):
            rec(db, host="old", t=i)
    before = dump(path)
    inside = CTX.Event()
    p = _spawn(_stall_in_migration, path, inside)
    assert inside.wait(120)
    _kill(p)
    assert dump(path) == before  # still S.SCHEMA_VERSION, no 'note' column
    assert_healthy(path)


def test_failing_migration_step_rolls_back(tmp_path, monkeypatch):
    path = tmp_path / "t.sqlite"
    with TuningDB(path) as db:
        rec(db)
    before = dump(path)

    def bad_step(db):
        db["trials"].add_column("note", str)
        raise RuntimeError("disk full, say")

    monkeypatch.setattr(S, "SCHEMA_VERSION", S.SCHEMA_VERSION + 1)
    monkeypatch.setitem(S.MIGRATIONS, S.SCHEMA_VERSION - 1, bad_step)
    with pytest.raises(RuntimeError, match="disk full"):
        TuningDB(path)
    assert dump(path) == before


# ---- bad files at every door ---------------------------------------------------------------

def _good_sqlite(path, n=300):
    bulk = Path(path).with_suffix(".bulk.jsonl")
    bulk_export(bulk, "many", n)
    with TuningDB(path) as db:
        db.import_jsonl(bulk)
    bulk.unlink()
    return Path(path).read_bytes()


def _damage(data: bytes, rng: random.Random, first_page: int) -> bytes:
    b = bytearray(data)
    for page in range(first_page, len(b) // 4096, 2):
        b[page * 4096:(page + 1) * 4096] = rng.randbytes(4096)
    return bytes(b)


def make_bad_files(d: Path) -> dict[str, Path]:
    """Every kind of file that is no usable tuning database nor export."""
    rng = random.Random(1234)
    db = _good_sqlite(d / "good.sqlite")
    good = TuningDB(d / "good.sqlite", readonly=True)
    good.export_jsonl(d / "good.jsonl")
    good.close()
    jl = (d / "good.jsonl").read_text()
    conn = sqlite3.connect(d / "foreign.sqlite")
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users VALUES (1, 'x')")
    conn.commit()
    conn.close()
    conn = sqlite3.connect(d / "foreign-meta.sqlite")  # has a 'meta' table, not ours
    conn.execute("CREATE TABLE meta (k TEXT, v TEXT)")
    conn.commit()
    conn.close()
    shutil.copy(d / "good.sqlite", d / "bad-version.sqlite")
    conn = sqlite3.connect(d / "bad-version.sqlite")
    conn.execute("UPDATE meta SET value = 'one' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    files = {
        "random-bytes": rng.randbytes(40_000),
        "random-after-sqlite-magic": b"SQLite format 3\x00" + rng.randbytes(40_000),
        "sqlite-damaged-pages": _damage(db, rng, 3),
        "sqlite-cut-in-header": db[:60],
        "sqlite-cut-in-half": db[: len(db) // 2],
        "sqlite-cut-mid-page": db[: 5 * 4096 + 1234],
        "jsonl-cut-mid-line": jl[: len(jl) // 2].encode(),
        "jsonl-cut-at-line": "".join(jl.splitlines(True)[:-5]).encode(),
        "json-object": json.dumps({"trials": [{"id": 1}], "version": 1}).encode(),
        "json-list": b"[1, 2, 3]\n",
        "json-pretty-export": json.dumps([json.loads(x) for x in jl.splitlines()],
                                         indent=2).encode(),
        "jsonl-other-shape": b'{"name": "a", "score": 1}\n{"name": "b", "score": 2}\n',
        "empty": b"",
        "utf16-export": jl.encode("utf-16"),
    }
    out = {}
    for name, data in files.items():
        (d / name).write_bytes(data)
        out[name] = d / name
    for name in ("foreign.sqlite", "foreign-meta.sqlite", "bad-version.sqlite"):
        out[name] = d / name
    out["export-as-database"] = d / "good.jsonl"  # valid, but at the wrong door
    out["database-as-export"] = d / "good.sqlite"
    return out


BAD_FOR = {  # which doors each file is bad for, where not all
    "export-as-database": ("open", "open-readonly", "merge"),  # a good export
    "database-as-export": ("import",),  # a good database
    "empty": ("open-readonly", "import", "merge"),  # opened for writing, it becomes a new one
}
DOORS = ("open", "open-readonly", "import", "merge")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return make_bad_files(tmp_path_factory.mktemp("bad"))


def _listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_bad_files_at_every_door_raise_database_error_and_change_nothing(tmp_path, bad_files):
    target = tmp_path / "target.sqlite"
    with TuningDB(target) as db:
        for i in range(4):
            rec(db, host="target", t=i, block_m=16 << i)
    target_rows, target_bytes = dump(target), target.read_bytes()
    tried = 0
    for name, src in bad_files.items():
        for door in BAD_FOR.get(name, DOORS):
            work = tmp_path / f"{name}.{door}.d"
            work.mkdir()
            bad = work / src.name
            shutil.copy(src, bad)
            files_before = _listing(work)
            with pytest.raises(DatabaseError) as info:
                if door == "open":
                    TuningDB(bad).close()
                elif door == "open-readonly":
                    TuningDB(bad, readonly=True).close()
                else:
                    with TuningDB(target) as db:
                        (db.import_jsonl if door == "import" else db.merge)(bad)
            assert isinstance(info.value, ValueError)
            assert str(bad) in str(info.value), (name, door, str(info.value))
            after = _listing(work)
            if door in ("open-readonly", "merge"):  # a read-only handle on a WAL-mode file leaves
                for side in ("-wal", "-shm"):  # its (harmless) index files behind
                    after.pop(bad.name + side, None)
            assert after == files_before, (name, door)  # the bad file as it was
            assert dump(target) == target_rows, (name, door)
            assert target.read_bytes() == target_bytes, (name, door)
            tried += 1
    assert tried >= 60


def test_bad_files_never_break_the_runtime_snapshot(tmp_path, bad_files):
    for name, src in bad_files.items():
        bad = tmp_path / f"{name}.copy"
        shutil.copy(src, bad)
        before = bad.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            Snapshot.load(bad, shipped=False)
            Snapshot.load(False, shipped=[bad])
        assert bad.read_bytes() == before, name


def test_damage_quick_check_misses_is_still_a_database_error(tmp_path, monkeypatch):
    """Damage that passes the quick_check at open (simulated by switching it off) surfaces
    as DatabaseError from reads and writes, and a failed write changes nothing."""
    import gfwagen.db.store as store

    monkeypatch.setattr(S, "check_intact", lambda db: None)
    monkeypatch.setattr(store, "check_intact", lambda db: None)
    path = tmp_path / "t.sqlite"
    data = bytearray(_good_sqlite(path))
    rng = random.Random(7)
    for page in range(3, len(data) // 4096):
        data[page * 4096 + 8: (page + 1) * 4096] = rng.randbytes(4096 - 8)
    path.write_bytes(bytes(data))
    with TuningDB(path) as db:
        for action in (lambda: db.export_jsonl(tmp_path / "x.jsonl"),
                       lambda: rec(db, host="after-damage"), db.recompute_best):
            with pytest.raises(DatabaseError, match="corrupt"):
                action()
    assert path.read_bytes() == bytes(data)


def test_database_path_that_cannot_be_a_file(tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    for p in (tmp_path / "adir", tmp_path / "afile" / "below.sqlite"):
        with pytest.raises(DatabaseError, match="cannot open"):
            TuningDB(p)
        with pytest.raises(DatabaseError):
            TuningDB(p, readonly=True)


# ---- hostile and unrunnable rows -----------------------------------------------------------

INJECT = ["x'); DROP TABLE trials; --", "'; DELETE FROM best; SELECT '", "]; DROP TABLE meta; [",
          "\" OR 1=1 --", "Robert'); DROP TABLE devices;--", "\x00nul", "é\u202eunicode",
          "%s %d {0} ?", "a" * 5000]


def test_injection_looking_strings_are_stored_inertly(tmp_path):
    a, b, c = tmp_path / "a.sqlite", tmp_path / "b.sqlite", tmp_path / "c.sqlite"
    weird_dev = {**H200, "name": INJECT[1], "driver_version": INJECT[4]}
    weird_tc = {"torch": INJECT[0], "triton": INJECT[2], "tvm": INJECT[3]}
    with TuningDB(a) as db:
        for i, s in enumerate(INJECT):
            db.record_trial(PROB, "triton", "fwd", KernelConfig(extra=((s, s), ("n", i))),
                            median_ms=1.0 + i, status="failed", reason=s, host=s,
                            device=weird_dev if i % 2 else H200,
                            toolchain_versions=weird_tc if i % 3 else TC,
                            created_at=f"2025-01-01T00:00:{i:02d}+00:00")
        db.export_jsonl(tmp_path / "a.jsonl")
        rows = sorted(tuple(r.values()) for r in db.db.query(
            "SELECT host, reason, config_json FROM trials"))
    with TuningDB(b) as db:
        db.import_jsonl(tmp_path / "a.jsonl")
        db.export_jsonl(tmp_path / "b.jsonl")
    with TuningDB(c) as db:
        db.merge(b)
        assert db.counts()["trials"] == len(INJECT)
        assert set(db.db.table_names()) == set(S.TABLES)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    for p in (a, b, c):
        conn = sqlite3.connect(p)
        got = sorted(conn.execute("SELECT host, reason, config_json FROM trials").fetchall())
        names = {r[0] for r in conn.execute("SELECT name FROM devices")}
        conn.close()
        assert got == rows and set(INJECT) == {r[0] for r in got}
        assert names == {"NVIDIA H200", INJECT[1]}
    snap = Snapshot.load(c, shipped=False)
    assert snap.lookup(PROB.spec("triton", "fwd"), 4096, weird_dev)[0] is None  # no 'ok' rows


def _export_lines(tmp_path) -> list[dict]:
    with TuningDB(tmp_path / "src.sqlite") as db:
        rec(db, host="a", t=0, block_m=64)
        rec(db, host="a", t=1, block_m=128, device=H100)
        db.export_jsonl(tmp_path / "src.jsonl")
    return [json.loads(x) for x in (tmp_path / "src.jsonl").read_text().splitlines()]


def _write(path, lines) -> Path:
    path.write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))
    return path


def _refused(tmp_path, lines, match):
    target = tmp_path / "target.sqlite"
    with TuningDB(target) as db:
        rec(db, host="target", t=30)
    before = dump(target)
    with TuningDB(target) as db, pytest.raises(DatabaseError, match=match):
        db.import_jsonl(_write(tmp_path / "bad.jsonl", lines))
    assert dump(target) == before


def test_device_row_with_another_devices_key_is_refused(tmp_path):
    lines = _export_lines(tmp_path)
    devs = [i for i, x in enumerate(lines) if x["kind"] == "device"]
    assert len(devs) == 2
    # an H100 fingerprint filed under the H200's key
    h100 = next(i for i in devs if lines[i]["fingerprint"]["name"] == H100["name"])
    forged = [dict(x) for x in lines]
    forged[h100] = {**lines[h100], "key": device_key(H200)}
    _refused(tmp_path, forged, "does not match its fingerprint")
    # an H100 trial moved to the H200's key (its id no longer matches)
    forged = [dict(x) for x in lines]
    t = next(i for i, x in enumerate(lines) if x.get("device_key") == device_key(H100))
    forged[t] = {**lines[t], "device_key": device_key(H200)}
    _refused(tmp_path, forged, "does not match its contents")
    # a fingerprint edited in a database given to merge
    shutil.copy(tmp_path / "src.sqlite", tmp_path / "forged.sqlite")
    conn = sqlite3.connect(tmp_path / "forged.sqlite")
    conn.execute("UPDATE devices SET fingerprint_json = ? WHERE key = ?",
                 [R.dumps(H100), device_key(H200)])
    conn.commit()
    conn.close()
    with TuningDB(tmp_path / "m.sqlite") as db, pytest.raises(DatabaseError, match="fingerprint"):
        db.merge(tmp_path / "forged.sqlite")


def test_derived_columns_of_a_merged_database_are_recomputed(tmp_path):
    """A source database whose derived columns lie (backend, bucket, best) merges with the
    truth recomputed from the JSON columns, never the lie."""
    _export_lines(tmp_path)
    conn = sqlite3.connect(tmp_path / "src.sqlite")
    conn.execute("UPDATE trials SET backend = 'tvm', seqlen_bucket = 1, [pass] = 'bwd_q'")
    conn.execute("UPDATE best SET config_json = '{\"block_m\": 3}', median_ms = 1e-9")
    conn.commit()
    conn.close()
    with TuningDB(tmp_path / "m.sqlite") as db:
        db.merge(tmp_path / "src.sqlite")
        rows = list(db.db.query("SELECT backend, seqlen_bucket, [pass] FROM trials"))
        assert {(r["backend"], r["seqlen_bucket"], r["pass"]) for r in rows} == {
            ("triton", 4096, "fwd")}
        assert {b["config"]["block_m"] for b in db.best_entries()} == {64, 128}


UNRUNNABLE = [
    ("config", {"block_m": 48}, "power of two"), ("config", {"block_n": 0}, "power of two"),
    ("config", {"block_m": -64}, "power of two"), ("config", {"block_m": 64.0}, "block_m"),
    ("config", {"block_n": "64"}, "block_n"), ("config", {"block_m": True}, "block_m"),
    ("config", {"num_warps": 3}, "power of two"), ("config", {"num_warps": 0}, "num_warps"),
    ("config", {"num_stages": 0}, "num_stages"), ("config", {"num_stages": 9}, "num_stages"),
    ("config", {"num_stages": 2.0}, "num_stages"), ("config", {"extra": {"k": [1]}}, "extra"),
    ("config", {"extra": [["k", 1]]}, "extra"), ("config", {"blockm": 64}, "unknown"),
    ("spec", {"backend": "cuda"}, "backend"), ("spec", {"backend": "Triton"}, "backend"),
    ("spec", {"pass_": "bwd"}, "pass"), ("spec", {"pass_": "fwd "}, "pass"),
    ("spec", {"dtype": "fp8"}, "dtype"), ("spec", {"dtype": "float32"}, "dtype"),
    ("spec", {"group": 0}, "group"), ("spec", {"window": -1}, "window"),
    ("spec", {"gated": "yes"}, "gated"), ("spec", {"head_dim": "128"}, "head_dim"),
    ("problem", {"seqlen": 0}, "seqlen"), ("problem", {"kv_heads": 3}, "multiple"),
    ("problem", {"dtype": "fp16"}, "does not describe"),
]


@pytest.mark.parametrize("field,change,match", UNRUNNABLE,
                         ids=[f"{f}-{next(iter(c))}={next(iter(c.values()))!r}"
                              for f, c, _ in UNRUNNABLE])
def test_unrunnable_rows_are_refused_at_import_and_merge(tmp_path, field, change, match):
    lines = _export_lines(tmp_path)
    t = next(i for i, x in enumerate(lines) if x["kind"] == "trial")
    bad = [dict(x) for x in lines]
    bad[t] = {**lines[t], field: {**lines[t][field], **change}}
    _refused(tmp_path, bad, match)
    # the same row edited into a database given to merge
    shutil.copy(tmp_path / "src.sqlite", tmp_path / "edited.sqlite")
    conn = sqlite3.connect(tmp_path / "edited.sqlite")
    conn.execute(f"UPDATE trials SET {field}_json = ? WHERE id = ?",
                 [json.dumps(bad[t][field]), lines[t]["id"]])
    conn.commit()
    conn.close()
    target = tmp_path / "target.sqlite"
    before = dump(target)
    with TuningDB(target) as db, pytest.raises(DatabaseError, match=match):
        db.merge(tmp_path / "edited.sqlite")
    assert dump(target) == before


# ---- migration from every earlier version --------------------------------------------------

def _seed_v1(db) -> int:
    """Rows as a v1 database holds them (written with v1's own column names)."""
    dev, tc = R.device_row(H200), R.toolchain_row(TC)
    trial = R.trial_row(device_key=dev["key"], toolchain_key=tc["key"], problem=PROB,
                        spec=PROB.spec("triton", "fwd"), config=KernelConfig(), median_ms=1.0,
                        spread=None, status="ok", reason="", host="v1",
                        created_at="2024-12-31T00:00:00+00:00")
    db["devices"].insert(dev)
    db["toolchains"].insert(tc)
    db["trials"].insert(trial)
    return 1


# SEEDERS[v] fills a version-v database with rows; a new schema version must add one here
# for the version it replaces (version 0 has no tables, hence no rows).
SEEDERS = {1: _seed_v1}


def _database_at(path, version: int) -> int:
    """A database file at schema `version`, built by the real migration steps; returns how
    many trials it holds."""
    db = S.connect(path)
    for v in range(version):
        with S.write_transaction(db):
            S.MIGRATIONS[v](db)
            S._set_version(db, v + 1)
    n = 0
    if version in SEEDERS:
        with S.write_transaction(db):
            n = SEEDERS[version](db)
    db.close()
    return n


def test_migrations_form_a_complete_chain():
    assert sorted(S.MIGRATIONS) == list(range(S.SCHEMA_VERSION))
    assert all(v in SEEDERS for v in range(1, S.SCHEMA_VERSION)), "add a seeder"


@pytest.mark.parametrize("version", sorted(S.MIGRATIONS))
def test_migration_from_every_earlier_version(tmp_path, version):
    old = tmp_path / f"v{version}.sqlite"
    n = _database_at(old, version)
    old_copy = tmp_path / "copy.sqlite"
    shutil.copy(old, old_copy)
    source_before = dump(old_copy)
    # merged as it is: the older file is migrated in a temporary copy, never changed
    if version >= 1:
        with TuningDB(tmp_path / "merged.sqlite") as db:
            assert db.merge(old_copy)["trials"]["new"] == n
        assert dump(old_copy) == source_before
    # opened for writing: migrated in place, rows kept, usable
    with TuningDB(old) as db:
        assert S.schema_version(db.db) == S.SCHEMA_VERSION
        assert db.counts()["trials"] == n
        rec(db, host="after-migration")
        assert db.counts()["trials"] == n + 1
        db.export_jsonl(tmp_path / "x.jsonl")
    assert_healthy(old)
    with TuningDB(tmp_path / "fresh.sqlite") as db:  # and its export reads back
        assert db.import_jsonl(tmp_path / "x.jsonl")["trials"]["new"] == n + 1


# ---- the switch to WAL -------------------------------------------------------------------

class _Busy:
    """A database handle whose WAL switch is refused `n` times with `error`."""

    def __init__(self, n, error="database is locked"):
        self.n, self.error, self.switched = n, error, False

    def execute(self, sql):
        assert sql == "PRAGMA journal_mode"
        return self

    def fetchone(self):
        return ["wal" if self.switched else "delete"]

    def enable_wal(self):
        if self.n:
            self.n -= 1
            raise sqlite3.OperationalError(self.error)
        self.switched = True


def test_wal_switch_retries_while_another_process_holds_the_file():
    db = _Busy(3)
    S.enable_wal(db, timeout=10)
    assert db.switched and db.n == 0


def test_wal_switch_gives_up_at_its_deadline_and_passes_other_errors_on():
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        S.enable_wal(_Busy(10**9), timeout=0.2)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        S.enable_wal(_Busy(1, "disk I/O error"), timeout=10)


def test_wal_switch_leaves_a_wal_database_alone():
    db = _Busy(10**9)
    db.switched = True
    S.enable_wal(db, timeout=0.2)  # no switch asked, so no refusal seen
