"""The tuning database's file: where it lives, how it is opened, its tables and its versions.

Everything that creates or alters a table is here. A database file carries its version in
the `meta` table; `migrate()` walks `MIGRATIONS` from the file's version up to
`SCHEMA_VERSION`, one step per version, each step in its own transaction. Version 0 is "no
gfwagen tables yet", so creating a new database is simply the migration 0 -> 1. To add v2:
write `_v1_to_v2(db)`, add it as `MIGRATIONS[1]`, bump `SCHEMA_VERSION`, and teach
`sharing.upgrade_row()` to lift v1 export lines.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import sqlite_utils

SCHEMA_VERSION = 1
EXPORT_FORMAT = "gfwagen-tuning-db"
TABLES = ("meta", "devices", "toolchains", "trials", "best")


class DatabaseError(ValueError):
    """A tuning database or export file that gfwagen cannot use: corrupt, truncated, foreign,
    newer than this gfwagen, or holding invalid rows. Nothing was changed when it is raised."""


def default_db_path() -> Path:
    """$GFWAGEN_DB, else $XDG_CACHE_HOME/gfwagen/tuning.sqlite, else ~/.cache/gfwagen/..."""
    env = os.environ.get("GFWAGEN_DB")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "gfwagen" / "tuning.sqlite"


# How long a writer waits for another process's lock before giving up.
BUSY_TIMEOUT_S = 30.0


def connect(path: str | os.PathLike, *, readonly: bool = False) -> sqlite_utils.Database:
    """A sqlite-utils handle on `path`, checked to be a SQLite file (not yet that it is ours).
    Read-only handles never create the file."""
    p = Path(path)
    try:
        if readonly:
            if not p.is_file():
                raise DatabaseError(f"{p}: no such database file")
            conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)
        else:
            if str(p) != ":memory:":
                p.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(p), timeout=BUSY_TIMEOUT_S)
    except (OSError, sqlite3.Error) as e:  # a directory, an unwritable or missing parent
        raise DatabaseError(f"{p}: cannot open as a database ({e})") from None
    try:
        # Reading the schema is what makes SQLite look at the file's header.
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as e:
        conn.close()
        raise DatabaseError(f"{p}: not a readable SQLite database ({e})") from e
    return sqlite_utils.Database(conn, execute_plugins=False)


def schema_version(db: sqlite_utils.Database) -> int:
    """0 for an empty file; raises DatabaseError for a SQLite file that is not ours."""
    names = set(db.table_names())
    if not names:
        return 0
    if "meta" not in names:
        raise DatabaseError(
            f"not a gfwagen tuning database (tables {sorted(names)}, no 'meta' table)")
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0])
    except (sqlite3.DatabaseError, TypeError, ValueError) as e:
        raise DatabaseError(f"not a gfwagen tuning database (bad meta table: {e})") from e
    if version > SCHEMA_VERSION:
        raise DatabaseError(
            f"database schema v{version} is newer than this gfwagen (v{SCHEMA_VERSION}); "
            "upgrade gfwagen")
    if version < 1:
        raise DatabaseError(f"not a gfwagen tuning database (schema_version {version})")
    return version


def check_intact(db: sqlite_utils.Database) -> None:
    """DatabaseError unless SQLite's quick_check passes: a file with damaged pages past its
    header opens and answers the first queries, then fails on the page a write touches.
    Reads every page once (about 0.1 s for a 36 MB database)."""
    try:
        rows = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as e:
        raise DatabaseError(f"corrupt database ({e})") from None
    if rows != ["ok"]:
        raise DatabaseError(f"corrupt database (quick_check: {'; '.join(rows[:3])})")


@contextlib.contextmanager
def corruption_as_database_error(where) -> Iterator[None]:
    """sqlite3's 'malformed' / 'not a database' errors (raised by damage that quick_check at
    open did not see, or that came later) as DatabaseError. Busy, locked, I/O and constraint
    errors (OperationalError, IntegrityError, ...) pass through unchanged."""
    try:
        yield
    except sqlite3.DatabaseError as e:
        if type(e) is not sqlite3.DatabaseError:
            raise
        raise DatabaseError(f"{where}: corrupt database ({e})") from None


@contextlib.contextmanager
def write_transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """One all-or-nothing write. BEGIN IMMEDIATE takes the write lock up front, so parallel
    tuner workers queue on the busy timeout instead of failing on a read->write upgrade."""
    if db.conn.in_transaction:
        with db.atomic():  # nested: a savepoint inside the caller's transaction
            yield db
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.rollback()
        raise
    db.execute("COMMIT")


def _set_version(db: sqlite_utils.Database, version: int) -> None:
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
               [str(version)])


def _create_v1(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["devices"].create(
        {"key": str, "kind": str, "name": str, "model": str, "arch": str,
         "compute_capability": str, "sm_count": int, "memory_bytes": int,
         "driver_version": str, "cuda_version": str, "fingerprint_json": str},
        pk="key", not_null=["kind", "name", "model", "arch", "fingerprint_json"])
    db["toolchains"].create(
        {"key": str, "torch": str, "triton": str, "tvm": str, "toolchain_json": str},
        pk="key", not_null=["toolchain_json"])
    db["trials"].create(
        {"id": str, "device_key": str, "toolchain_key": str,
         "problem_key": str, "problem_json": str, "seqlen": int, "seqlen_bucket": int,
         "spec_key": str, "spec_json": str, "spec_class_key": str,
         "backend": str, "pass": str, "config_key": str, "config_json": str,
         "median_ms": float, "spread": float, "status": str, "reason": str,
         "host": str, "created_at": str},
        pk="id",
        not_null=["device_key", "toolchain_key", "problem_key", "problem_json", "seqlen",
                  "seqlen_bucket", "spec_key", "spec_json", "spec_class_key", "backend",
                  "pass", "config_key", "config_json", "status", "reason", "host",
                  "created_at"],
        foreign_keys=[("device_key", "devices", "key"), ("toolchain_key", "toolchains", "key")])
    db["trials"].create_index(
        ["device_key", "toolchain_key", "spec_class_key", "seqlen_bucket"],
        index_name="trials_group")
    db["trials"].create_index(["spec_key"], index_name="trials_spec")
    db["best"].create(
        {"device_key": str, "toolchain_key": str, "spec_class_key": str, "seqlen_bucket": int,
         "spec_class_json": str, "backend": str, "pass": str, "config_key": str,
         "config_json": str, "median_ms": float, "n_trials": int, "trial_id": str},
        pk=("device_key", "toolchain_key", "spec_class_key", "seqlen_bucket"),
        not_null=["spec_class_json", "backend", "pass", "config_key", "config_json",
                  "median_ms", "n_trials", "trial_id"])
    db["best"].create_index(["spec_class_key"], index_name="best_spec")


# MIGRATIONS[v] upgrades a version-v database to v+1.
MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {0: _create_v1}


def migrate(db: sqlite_utils.Database) -> int:
    """Bring `db` up to SCHEMA_VERSION; a database already there is left untouched.
    Returns the number of steps applied."""
    version = schema_version(db)
    steps = 0
    while version < SCHEMA_VERSION:
        step = MIGRATIONS[version]
        with write_transaction(db):
            if schema_version(db) != version:  # another process migrated meanwhile
                version = schema_version(db)
                continue
            step(db)
            _set_version(db, version + 1)
        version += 1
        steps += 1
    return steps


def enable_wal(db: sqlite_utils.Database, timeout: float = BUSY_TIMEOUT_S) -> None:
    """Switch the file to WAL mode unless it is there already, retrying while another process
    holds it. SQLite can answer the switch with "database is locked" at once, without waiting
    on the busy timeout: two processes creating one database together failed this way about
    once in 25 runs (tests/test_db_faults.py, CI)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.enable_wal()
            return
        except sqlite3.OperationalError as e:
            msg = str(e)
            if ("locked" not in msg and "busy" not in msg) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.01, 0.05))  # jittered: two retries do not meet again


def open_database(path: str | os.PathLike | None = None) -> sqlite_utils.Database:
    """Open (creating if needed) a writable tuning database in WAL mode, migrated."""
    path = Path(path) if path is not None else default_db_path()
    db = connect(path)
    try:
        try:
            schema_version(db)  # refuse a foreign, newer or damaged file before changing it
            check_intact(db)
        except DatabaseError as e:
            raise DatabaseError(f"{path}: {e}") from None
        db.execute("PRAGMA foreign_keys = ON")
        enable_wal(db)
        migrate(db)
    except BaseException:
        db.close()
        raise
    return db
