"""The writable tuning database: record measurements, keep `best` in step with `trials`,
export, import and merge. Every write is one transaction: a failure leaves the file as it was.

`best` holds, per (device, toolchain, spec class, seqlen bucket), the config that won among
the 'ok' trials. A spec class is the spec with its window replaced by its window class (see
records.spec_class). Configs are compared on the median, over their trials, of median_ms
divided by the problem's work (records.work_units), so trials on nearby shapes of one bucket
are comparable; repeated measurements of one config are pooled rather than the luckiest
one winning.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import statistics
from collections import defaultdict
from pathlib import Path

from gfwagen.db import records as R
from gfwagen.db import sharing
from gfwagen.db.fingerprint import device_fingerprint, toolchain
from gfwagen.db.schema import (
    SCHEMA_VERSION,
    DatabaseError,
    check_intact,
    connect,
    corruption_as_database_error,
    default_db_path,
    open_database,
    schema_version,
    write_transaction,
)
from gfwagen.spec import KernelConfig, KernelSpec, Problem


def _sqlite_errors(method):
    """Run a method with sqlite3's corruption errors raised as DatabaseError."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with corruption_as_database_error(self.path):
            return method(self, *args, **kwargs)
    return wrapper


GroupKey = tuple[str, str, str, int]  # device_key, toolchain_key, spec_class_key, seqlen_bucket
_CHUNK = 500
_MEASURED = ("median_ms", "spread", "status", "reason")

# The best entries whose toolchain has the group's (device, spec class, seqlen bucket) latest
# successful measurement.
_NEWEST_BEST_SQL = """
    WITH last AS (
        SELECT device_key, toolchain_key, spec_class_key, seqlen_bucket, MAX(created_at) AS at
        FROM trials WHERE status = 'ok'
        GROUP BY device_key, toolchain_key, spec_class_key, seqlen_bucket)
    SELECT b.trial_id FROM best b
    JOIN last l ON l.device_key = b.device_key AND l.toolchain_key = b.toolchain_key
        AND l.spec_class_key = b.spec_class_key AND l.seqlen_bucket = b.seqlen_bucket
    WHERE l.at = (SELECT MAX(o.at) FROM last o WHERE o.device_key = b.device_key
                  AND o.spec_class_key = b.spec_class_key AND o.seqlen_bucket = b.seqlen_bucket)
"""


class TuningDB:
    """A tuning database file, opened (and created or migrated) for writing.

    >>> with TuningDB(tmp_path / "t.sqlite") as db:
    ...     db.record_trial(problem, "triton", "fwd", KernelConfig(), median_ms=1.2)
    """

    def __init__(self, path: str | os.PathLike | None = None, *, readonly: bool = False):
        """Open `path` (default: default_db_path()), creating and migrating it; with
        readonly=True the file must already exist at the current schema and is never
        changed."""
        self.path = Path(path) if path is not None else default_db_path()
        if not readonly:
            self.db = open_database(self.path)
            return
        self.db = connect(self.path, readonly=True)
        try:
            v = schema_version(self.db)
            check_intact(self.db)
        except DatabaseError as e:
            self.db.close()
            raise DatabaseError(f"{self.path}: {e}") from None
        except BaseException:
            self.db.close()
            raise
        if v != SCHEMA_VERSION:
            self.db.close()
            raise DatabaseError(f"{self.path}: schema v{v}, expected v{SCHEMA_VERSION}; "
                                "open it for writing once to create or migrate it")

    # -- lifetime --
    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> TuningDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing --
    def record_trial(self, problem: Problem, backend: str, pass_: str, config: KernelConfig, *,
                     median_ms: float | None, spread: float | None = None, status: str = "ok",
                     reason: str = "", device: dict | None = None,
                     toolchain_versions: dict | None = None, host: str | None = None,
                     created_at: str | None = None) -> str:
        """Store one measurement and refresh its `best` entry; returns the trial id.
        `device` and `toolchain_versions` default to this machine's fingerprint and versions;
        `created_at` to now (UTC, ISO 8601)."""
        dev = R.device_row(device if device is not None else device_fingerprint())
        tc = R.toolchain_row(toolchain_versions if toolchain_versions is not None
                             else toolchain())
        trial = R.trial_row(
            device_key=dev["key"], toolchain_key=tc["key"], problem=problem,
            spec=problem.spec(backend, pass_), config=config, median_ms=median_ms,
            spread=spread, status=status, reason=reason, host=host or socket.gethostname(),
            created_at=created_at or R.utc_now())
        self._ingest(sharing.Rows([dev], [tc], [trial]))
        return trial["id"]

    @_sqlite_errors
    def recompute_best(self) -> int:
        """Rebuild the whole `best` table from `trials`; returns its row count."""
        with write_transaction(self.db):
            self._recompute(None)
        return self.db["best"].count

    def import_jsonl(self, path: str | os.PathLike) -> dict:
        """Add an export file's rows. Idempotent; all or nothing; returns counts of new and
        already-present rows."""
        return self._ingest(sharing.read_jsonl(path))

    def merge(self, other: str | os.PathLike) -> dict:
        """Add every device, toolchain and trial of another tuning database (which is only
        read), keeping each measurement's provenance; all or nothing."""
        return self._ingest(sharing.read_sqlite(other))

    # -- reading --
    @_sqlite_errors
    def export_jsonl(self, path: str | os.PathLike | None = None, stream=None,
                     best_only: bool = False, newest: bool = False) -> dict:
        """Write the export format (see sharing.py) to `path` atomically, or to `stream`.
        best_only: only the trial behind each best entry (what a shipped file needs: the
        lookup reads nothing else), so the file stays small however long the tuning ran.
        newest (implies best_only): of the best entries one device and problem class hold
        under several toolchains, only the toolchain measured last. A re-tune (a new compiler,
        a new timer) then replaces what it re-measured: on a machine whose toolchain matches
        neither, the lookup would otherwise pick between them by median alone."""
        devices = [R.device_record(r) for r in self.db.query(
            "SELECT * FROM devices ORDER BY key")]
        tcs = [R.toolchain_record(r) for r in self.db.query(
            "SELECT * FROM toolchains ORDER BY key")]
        where = (f" WHERE id IN ({_NEWEST_BEST_SQL})" if newest
                 else " WHERE id IN (SELECT trial_id FROM best)" if best_only else "")
        trials = [R.trial_record(r) for r in self.db.query(
            f"SELECT * FROM trials{where} ORDER BY created_at, id")]
        if where:  # what the written trials need, not every toolchain a re-tune replaced
            used = {(t["device_key"], t["toolchain_key"]) for t in trials}
            devices = [d for d in devices if d["key"] in {u[0] for u in used}]
            tcs = [t for t in tcs if t["key"] in {u[1] for u in used}]
        if stream is not None:
            return sharing.dump_jsonl(devices, tcs, trials, stream)
        if path is None:
            raise TypeError("export_jsonl needs a path or a stream")
        return sharing.write_jsonl_atomic(path, devices, tcs, trials)

    @_sqlite_errors
    def counts(self) -> dict:
        return {t: self.db[t].count for t in ("devices", "toolchains", "trials", "best")}

    @_sqlite_errors
    def best_entries(self) -> list[dict]:
        """`best` joined with its device, sorted; spec and config parsed."""
        out = []
        for r in self.db.query(
                "SELECT b.*, d.name AS device_name, d.model, d.arch FROM best b "
                "JOIN devices d ON d.key = b.device_key "
                "ORDER BY d.model, b.backend, b.pass, b.spec_class_json, b.seqlen_bucket, "
                "b.device_key, b.toolchain_key"):
            r = dict(r)
            r["spec"] = json.loads(r.pop("spec_class_json"))
            r["config"] = json.loads(r.pop("config_json"))
            out.append(r)
        return out

    # -- internals --
    def _existing(self, table: str, keycol: str, keys: list[str]) -> dict[str, dict]:
        found = {}
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i:i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for r in self.db.query(f"SELECT * FROM [{table}] WHERE [{keycol}] IN ({marks})",
                                   chunk):
                found[r[keycol]] = dict(r)
        return found

    @_sqlite_errors
    def _ingest(self, rows: sharing.Rows) -> dict:
        result = {}
        with write_transaction(self.db):
            for table, keycol, new_rows in (("devices", "key", rows.devices),
                                            ("toolchains", "key", rows.toolchains),
                                            ("trials", "id", rows.trials)):
                have = self._existing(table, keycol, [r[keycol] for r in new_rows])
                fresh = []
                for r in new_rows:
                    old = have.get(r[keycol])
                    if old is None:
                        fresh.append(r)
                    elif table == "trials" and any(old[k] != r[k] for k in _MEASURED):
                        # Keys hash the whole fingerprint / versions, so only a trial's
                        # measurement can disagree under the same id.
                        diff = sorted(k for k in _MEASURED if old[k] != r[k])
                        raise DatabaseError(f"{table} row {r[keycol]} already exists with "
                                            f"different {', '.join(diff)}; refusing to overwrite")
                if table == "trials":
                    self._check_references(fresh)
                if fresh:
                    self.db[table].insert_all(fresh)
                result[table] = {"new": len(fresh), "existing": len(new_rows) - len(fresh)}
            groups = {(t["device_key"], t["toolchain_key"], t["spec_class_key"],
                       t["seqlen_bucket"]) for t in rows.trials}
            self._recompute(groups)
        return result

    def _check_references(self, trials: list[dict]) -> None:
        for col, table in (("device_key", "devices"), ("toolchain_key", "toolchains")):
            keys = sorted({t[col] for t in trials})
            missing = set(keys) - set(self._existing(table, "key", keys))
            if missing:
                raise DatabaseError(f"trials name unknown {table} {sorted(missing)}")

    def _recompute(self, groups: set[GroupKey] | None) -> None:
        """Rebuild `best` for `groups` (None: all). Call inside a write transaction."""
        cols = ("device_key", "toolchain_key", "spec_class_key", "seqlen_bucket")
        if groups is None:
            self.db.execute("DELETE FROM best")
            trials = list(self.db.query("SELECT * FROM trials WHERE status = 'ok'"))
        else:
            trials = []
            for g in sorted(groups):
                where = " AND ".join(f"{c} = ?" for c in cols)
                self.db.execute(f"DELETE FROM best WHERE {where}", list(g))
                trials += self.db.query(
                    f"SELECT * FROM trials WHERE status = 'ok' AND {where}", list(g))
        by_group: dict[GroupKey, dict[str, list[tuple[float, dict]]]] = defaultdict(
            lambda: defaultdict(list))
        for t in trials:
            score = t["median_ms"] / R.work_units(json.loads(t["problem_json"]))
            by_group[tuple(t[c] for c in cols)][t["config_key"]].append((score, t))
        best_rows = []
        for g, configs in by_group.items():
            agg = {ck: statistics.median(s for s, _ in v) for ck, v in configs.items()}
            ck = min(agg, key=lambda k: (agg[k], k))
            _, rep = min(configs[ck], key=lambda st: (abs(st[0] - agg[ck]), st[1]["id"]))
            spec = R.spec_class(KernelSpec(**json.loads(rep["spec_json"])))
            best_rows.append({
                **dict(zip(cols, g, strict=True)), "spec_class_json": R.dumps(spec.as_dict()),
                "backend": rep["backend"], "pass": rep["pass"], "config_key": ck,
                "config_json": rep["config_json"], "median_ms": rep["median_ms"],
                "n_trials": len(configs[ck]), "trial_id": rep["id"]})
        if best_rows:
            self.db["best"].insert_all(best_rows)
