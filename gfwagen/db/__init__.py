"""The tuning database: the only part of gfwagen that writes SQL.

- schema.py: file location, open/create, tables, versions and migrations
- fingerprint.py: device fingerprint and toolchain versions, their keys, model and arch names
- records.py: validation of rows, whatever door they come in by (no SQL)
- store.py: TuningDB, the writable database (record, best, export, import, merge)
- sharing.py: the JSONL export format and reading another database for merge
- lookup.py: the read-only runtime Snapshot with fallbacks (what the op imports)
"""

from gfwagen.db.fingerprint import (
    arch,
    device_fingerprint,
    device_key,
    gpu_model_name,
    toolchain,
    toolchain_key,
)
from gfwagen.db.lookup import BestEntry, Snapshot, get_snapshot, reset_snapshot, shipped_dir
from gfwagen.db.records import STATUSES, seqlen_bucket, spec_class
from gfwagen.db.schema import (
    SCHEMA_VERSION,
    DatabaseError,
    default_db_path,
    migrate,
    open_database,
)
from gfwagen.db.store import TuningDB

__all__ = [
    "SCHEMA_VERSION", "STATUSES", "BestEntry", "DatabaseError", "Snapshot", "TuningDB", "arch",
    "default_db_path", "device_fingerprint", "device_key", "get_snapshot", "gpu_model_name",
    "migrate", "open_database", "reset_snapshot", "seqlen_bucket", "shipped_dir", "spec_class",
    "toolchain", "toolchain_key",
]
