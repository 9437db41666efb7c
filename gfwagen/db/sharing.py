"""Moving tuning data between machines: the JSON-lines export format and reading another
tuning database for `merge`. Only reads files and turns them into validated rows; writing
into a database is store.py's job.

Export format, one JSON object per line, keys sorted, lines in a stable order so that a
re-export of the same data is byte-identical and `git diff` shows only new measurements:

    {"format": "gfwagen-tuning-db", "kind": "header", "schema_version": 1}
    {"fingerprint": {...}, "key": "...", "kind": "device"}          sorted by key
    {"key": "...", "kind": "toolchain", "toolchain": {...}}         sorted by key
    {"config": {...}, "created_at": "...", "id": "...", "kind": "trial", ...}
                                                                    sorted by (created_at, id)
    {"devices": 1, "kind": "footer", "toolchains": 1, "trials": 42}

The footer's counts catch a file cut at a line boundary.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from gfwagen.db import records as R
from gfwagen.db.schema import (
    EXPORT_FORMAT,
    SCHEMA_VERSION,
    DatabaseError,
    connect,
    migrate,
    schema_version,
)


@dataclass
class Rows:
    """Validated database rows, ready to be written, in dependency order."""

    devices: list[dict] = field(default_factory=list)
    toolchains: list[dict] = field(default_factory=list)
    trials: list[dict] = field(default_factory=list)


def header() -> dict:
    return {"kind": "header", "format": EXPORT_FORMAT, "schema_version": SCHEMA_VERSION}


def _line(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=True) + "\n"


def dump_jsonl(devices: Iterable[dict], toolchains: Iterable[dict], trials: Iterable[dict],
               stream: IO[str]) -> dict:
    """Write records (already in export order) to a text stream; returns the counts."""
    counts = {"devices": 0, "toolchains": 0, "trials": 0}
    stream.write(_line(header()))
    for name, recs in (("devices", devices), ("toolchains", toolchains), ("trials", trials)):
        for rec in recs:
            stream.write(_line(rec))
            counts[name] += 1
    stream.write(_line({"kind": "footer", **counts}))
    return counts


def write_jsonl_atomic(path: str | os.PathLike, devices, toolchains, trials) -> dict:
    """dump_jsonl into a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            counts = dump_jsonl(devices, toolchains, trials, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return counts


def upgrade_record(rec: dict, from_version: int) -> dict:
    """Lift a record written by an older schema to the current one. There is only v1 so far;
    a v2 adds `if from_version < 2: rec = ...` here."""
    return rec


def _parse_lines(text: str, where: str) -> Iterator[tuple[int, dict]]:
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatabaseError(f"{where}:{n}: not valid JSON ({e.msg}); "
                                "is the file truncated or not a gfwagen export?") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
            raise DatabaseError(f"{where}:{n}: expected an object with a 'kind'")
        yield n, obj


def records_to_rows(recs: Iterable[tuple[str, dict]]) -> Rows:
    """Validate (location, record) pairs into rows; duplicates within the input collapse, and
    a trial must name a device and toolchain (checked against the database by the store)."""
    rows = Rows()
    seen: dict[str, dict[str, dict]] = {"device": {}, "toolchain": {}, "trial": {}}
    makers = {"device": R.device_record_row, "toolchain": R.toolchain_record_row,
              "trial": R.trial_record_row}
    keycol = {"device": "key", "toolchain": "key", "trial": "id"}
    out = {"device": rows.devices, "toolchain": rows.toolchains, "trial": rows.trials}
    for where, rec in recs:
        kind = rec.get("kind")
        if kind not in makers:
            raise DatabaseError(f"{where}: unknown record kind {kind!r}")
        row = makers[kind](rec, what=f"{where} ({kind})")
        k = row[keycol[kind]]
        if k in seen[kind]:
            if seen[kind][k] != row:
                raise DatabaseError(f"{where}: {kind} {k} appears twice with different contents")
            continue
        seen[kind][k] = row
        out[kind].append(row)
    return rows


def read_jsonl(path: str | os.PathLike) -> Rows:
    """Parse and validate a whole export file; raises DatabaseError naming the bad line."""
    where = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DatabaseError(f"{where}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DatabaseError(f"{where}: not a text file; expected a gfwagen JSONL export") from None
    lines = list(_parse_lines(text, where))
    if not lines:
        raise DatabaseError(f"{where}: empty file; expected a gfwagen JSONL export")
    n, head = lines[0]
    if head.get("kind") != "header" or head.get("format") != EXPORT_FORMAT:
        raise DatabaseError(f"{where}:{n}: not a gfwagen tuning export (no header line)")
    version = head.get("schema_version")
    if not R._is_int(version) or not 1 <= version <= SCHEMA_VERSION:
        raise DatabaseError(f"{where}: export schema_version {version!r} is not supported "
                            f"(this gfwagen reads 1..{SCHEMA_VERSION})")
    n, foot = lines[-1]
    if foot.get("kind") != "footer" or len(lines) < 2:
        raise DatabaseError(f"{where}: no footer line; the file is truncated")
    body = lines[1:-1]
    counts = {"devices": 0, "toolchains": 0, "trials": 0}
    for _, rec in body:
        k = rec.get("kind", "") + "s"
        if k in counts:
            counts[k] += 1
    if {k: foot.get(k) for k in counts} != counts:
        raise DatabaseError(f"{where}: footer counts {foot} do not match the file's lines "
                            f"{counts}; the file is truncated or was edited by hand")
    return records_to_rows((f"{where}:{ln}", upgrade_record(rec, version)) for ln, rec in body)


def read_sqlite(path: str | os.PathLike) -> Rows:
    """Read and validate every device, toolchain and trial of another tuning database, without
    changing it (an older schema is migrated in a temporary copy)."""
    where = str(path)
    db = connect(path, readonly=True)
    tmpdir = None
    try:
        try:
            version = schema_version(db)
        except DatabaseError as e:
            raise DatabaseError(f"{where}: {e}") from None
        if version == 0:
            raise DatabaseError(f"{where}: empty database, not a gfwagen tuning database")
        if version < SCHEMA_VERSION:
            tmpdir = tempfile.mkdtemp(prefix="gfwagen-merge-")
            copy = sqlite3.connect(os.path.join(tmpdir, "copy.sqlite"))
            db.conn.backup(copy)
            db.close()
            db = connect(os.path.join(tmpdir, "copy.sqlite"))
            copy.close()
            migrate(db)
        recs: list[tuple[str, dict]] = []
        for table, conv in (("devices", R.device_record), ("toolchains", R.toolchain_record),
                            ("trials", R.trial_record)):
            for row in db.query(f"SELECT * FROM [{table}]"):
                try:
                    recs.append((f"{where} {table}", conv(row)))
                except (KeyError, TypeError, ValueError) as e:
                    raise DatabaseError(f"{where}: bad {table} row ({e})") from None
    except sqlite3.DatabaseError as e:
        raise DatabaseError(f"{where}: unreadable database ({e})") from None
    finally:
        db.close()
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return records_to_rows(recs)
