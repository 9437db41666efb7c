"""Read-only runtime lookup: which tuned config to use for (spec, seqlen, device).

A Snapshot is loaded once, from the user's tuning database (its `best` table, opened
read-only) and the JSONL files shipped in `tuning_db/`, then never changes; it never tunes
and never writes a file. Fallbacks, first match wins:

  1. this exact device (fingerprint key),
  2. the same GPU model on another host or driver,
  3. the same architecture (sm_XX),
  4. nothing: the caller uses its heuristic default.

Within a level the seqlen bucket nearest in log space wins, then an entry from this
toolchain, then the user's database over the shipped files, then the lowest median. A
Triton problem class with no entry at any level takes a kin class's (_kin_specs): another
GQA group, then the other 16-bit dtype, then (ungated problems) the gated class; its reason
says so. Entries
tuned with another minor version of the backend's compiler (Triton, or TVM) are skipped with a
warning: tiles that fit and won under one compiler may not under the next.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sqlite3
import threading
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType

from gfwagen.db import records as R
from gfwagen.db.fingerprint import arch, device_key, gpu_model_name, toolchain, toolchain_key
from gfwagen.db.schema import (
    SCHEMA_VERSION,
    DatabaseError,
    connect,
    default_db_path,
    schema_version,
)
from gfwagen.spec import KernelConfig, KernelSpec

SOURCE_USER, SOURCE_SHIPPED = 0, 1


@dataclasses.dataclass(frozen=True)
class BestEntry:
    device_key: str
    model: str
    arch: str
    toolchain_key: str
    spec_class_key: str
    seqlen_bucket: int
    config: KernelConfig
    median_ms: float
    n_trials: int
    trial_id: str
    source: int  # SOURCE_USER or SOURCE_SHIPPED
    triton: str | None = None  # the compiler versions the entry was tuned with
    tvm: str | None = None


@functools.cache
def shipped_dir() -> Path | None:
    """The `tuning_db/` folder: $GFWAGEN_TUNING_DB_DIR, inside the installed package, or at the
    repository root beside the package (as templates_dir() finds `templates/`)."""
    env = os.environ.get("GFWAGEN_TUNING_DB_DIR")
    pkg = Path(__file__).resolve().parent.parent
    for c in ([Path(env)] if env else []) + [pkg / "tuning_db", pkg.parent / "tuning_db"]:
        if c.is_dir():
            return c
    return None


def shipped_files() -> list[Path]:
    d = shipped_dir()
    return sorted(d.glob("*.jsonl")) if d else []


def _entry(row: dict, source: int) -> BestEntry:
    return BestEntry(row["device_key"], row["model"], row["arch"], row["toolchain_key"],
                     row["spec_class_key"], int(row["seqlen_bucket"]),
                     R.check_config(json.loads(row["config_json"])),
                     float(row["median_ms"]), int(row["n_trials"]), row["trial_id"], source,
                     row.get("triton"), row.get("tvm"))


_BEST_SQL = ("SELECT b.*, d.model, d.arch, t.triton, t.tvm FROM best b "
             "JOIN devices d ON d.key = b.device_key "
             "LEFT JOIN toolchains t ON t.key = b.toolchain_key "
             "ORDER BY b.device_key, b.toolchain_key, b.spec_class_key, b.seqlen_bucket")


def _minor(version: str | None) -> str | None:
    return ".".join(version.split("+")[0].split(".")[:2]) if version else None


def _read_user_db(path: Path) -> list[BestEntry]:
    db = connect(path, readonly=True)
    try:
        v = schema_version(db)
        if v == 0:
            return []
        if v != SCHEMA_VERSION:
            raise DatabaseError(f"{path}: schema v{v}; open it once with `gfwagen db show` to "
                                "migrate it")
        return [_entry(r, SOURCE_USER) for r in db.query(_BEST_SQL)]
    except sqlite3.DatabaseError as e:
        raise DatabaseError(f"{path}: unreadable database ({e})") from None
    finally:
        db.close()


def _read_shipped(paths: Iterable[Path]) -> list[BestEntry]:
    from gfwagen.db.store import TuningDB  # an in-memory database: nothing touches disk

    out = []
    with TuningDB(":memory:") as mem:
        for p in paths:
            try:
                mem.import_jsonl(p)
            except DatabaseError as e:
                warnings.warn(f"gfwagen: skipping shipped tuning file: {e}", RuntimeWarning,
                              stacklevel=3)
        out = [_entry(r, SOURCE_SHIPPED) for r in mem.db.query(_BEST_SQL)]
    return out


class Snapshot:
    """An immutable set of tuned entries with the fallback lookup."""

    def __init__(self, entries: Iterable[BestEntry] = (), sources: Iterable[str] = (),
                 toolchain_key: str | None = None, versions: dict | None = None):
        by_spec: dict[str, list[BestEntry]] = defaultdict(list)
        for e in entries:
            by_spec[e.spec_class_key].append(e)
        self._by_spec = MappingProxyType({k: tuple(v) for k, v in by_spec.items()})
        self.sources = tuple(sources)
        self.toolchain_key = toolchain_key
        # Running compiler versions; an entry tuned with another minor version of the
        # backend's compiler is skipped (with one warning): its tiles may no longer compile,
        # fit or win there. None: accept every entry.
        self.versions = dict(versions or {})
        self._warned: set = set()
        self._memo: dict = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, db_path: str | os.PathLike | None | bool = None,
             shipped: bool | Iterable[str | os.PathLike] = True) -> Snapshot:
        """db_path: a tuning database (None: the default path; False: none). shipped: True for
        tuning_db/*.jsonl, False for none, or explicit JSONL paths. A missing database is
        fine; an unreadable one is skipped with a warning, never repaired or written."""
        entries: list[BestEntry] = []
        sources: list[str] = []
        if db_path is not False:
            p = Path(db_path) if db_path not in (None, True) else default_db_path()
            if p.is_file():
                try:
                    entries += _read_user_db(p)
                    sources.append(str(p))
                except DatabaseError as e:
                    warnings.warn(f"gfwagen: ignoring tuning database: {e}", RuntimeWarning,
                                  stacklevel=2)
        files = shipped_files() if shipped is True else [] if shipped is False else [
            Path(p) for p in shipped]
        if files:
            entries += _read_shipped(files)
            sources += [str(f) for f in files]
        tc = toolchain()
        return cls(entries, sources, toolchain_key(tc), tc)

    @property
    def entries(self) -> tuple[BestEntry, ...]:
        return tuple(e for v in self._by_spec.values() for e in v)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_spec.values())

    def lookup(self, spec: KernelSpec, seqlen: int,
               fingerprint: dict) -> tuple[KernelConfig | None, str]:
        """The tuned config for `spec` at `seqlen` on the device `fingerprint` describes, and a
        sentence saying why; (None, "no tuned entry ...") when the caller should use its
        heuristic default."""
        entry, reason = self.lookup_entry(spec, seqlen, fingerprint)
        return (entry.config if entry is not None else None), reason

    def lookup_entry(self, spec: KernelSpec, seqlen: int,
                     fingerprint: dict) -> tuple[BestEntry | None, str]:
        """As lookup, with the whole entry (its measured median included)."""
        dkey = device_key(fingerprint)
        memo_key = (spec, seqlen, dkey)
        hit = self._memo.get(memo_key)
        if hit is None:
            hit = self._lookup(spec, seqlen, fingerprint, dkey)
            with self._lock:
                if len(self._memo) > 65536:  # many distinct seqlens: stay bounded
                    self._memo.clear()
                self._memo[memo_key] = hit
        return hit

    def _compatible(self, e: BestEntry, backend: str) -> bool:
        compiler = "tvm" if backend == "tvm" else "triton"
        running, tuned = _minor(self.versions.get(compiler)), _minor(getattr(e, compiler))
        if running is None or tuned is None or running == tuned:
            return True
        if (compiler, tuned) not in self._warned:
            self._warned.add((compiler, tuned))
            warnings.warn(f"gfwagen: tuned configs made with {compiler} {tuned} are skipped "
                          f"under {compiler} {running}; re-tune with `gfwagen tune`",
                          RuntimeWarning, stacklevel=5)
        return False

    def _lookup(self, spec, seqlen, fp, dkey):
        for kin, note in _kin_specs(spec):
            e, reason = self._lookup_class(kin, seqlen, fp, dkey)
            if e is not None:
                return e, reason + note
        return None, f"no tuned entry for {gpu_model_name(fp)} ({arch(fp)}); heuristic default"

    def _lookup_class(self, spec, seqlen, fp, dkey):
        candidates = [e for e in self._by_spec.get(R.spec_class(spec).key(), ())
                      if self._compatible(e, spec.backend)]
        model, sm = gpu_model_name(fp), arch(fp)
        levels = (
            (lambda e: e.device_key == dkey, "tuned on this device ({model}, {where})"),
            (lambda e: e.model == model, "same GPU model {model} on another host or driver "
                                         "({where})"),
            (lambda e: e.arch == sm, "same architecture {arch} (tuned on {model}, {where})"),
        )
        target = math.log2(max(seqlen, 1))
        for match, reason in levels:
            pool = [e for e in candidates if match(e)]
            if not pool:
                continue
            bucket = min({e.seqlen_bucket for e in pool},
                         key=lambda b: (abs(math.log2(b) - target), -b))
            e = min((e for e in pool if e.seqlen_bucket == bucket),
                    key=lambda e: (e.toolchain_key != self.toolchain_key, e.source,
                                   e.median_ms, e.trial_id))
            where = f"T-bucket {bucket}"
            if e.toolchain_key != self.toolchain_key:
                where += ", other toolchain"
            if e.source == SOURCE_SHIPPED:
                where += ", shipped"
            return e, reason.format(model=e.model, arch=sm, where=where)
        return None, ""


_HALF = {"bf16": "fp16", "fp16": "bf16"}
_GROUPS = (1, 2, 4, 8, 16, 32, 64)


def _kin_specs(spec: KernelSpec) -> list[tuple[KernelSpec, str]]:
    """The spec, then (Triton only) the classes whose tuned tiles it can take: other GQA
    groups, nearest first (the kernels' tiles and resources do not depend on the group, only
    which K/V head a program reads), then the other 16-bit dtype (bf16 and fp16 compile to
    the same tiles, registers and shared memory), then for an ungated spec all of those
    gated. Each with the note its reason gets."""
    out = [(spec, "")]
    if spec.backend != "triton":
        return out
    groups = sorted((g for g in _GROUPS if g != spec.group),
                    key=lambda g: (abs(math.log2(g / spec.group)), g))
    out += [(spec.replace(group=g), f"; tuned for GQA group {g}, run at {spec.group}")
            for g in groups]
    other = _HALF.get(spec.dtype)
    if other is not None:
        out += [(spec.replace(dtype=other, group=g), f"; tuned in {other}" + (
                 f" for GQA group {g}" if g != spec.group else "") + f", run in {spec.dtype}")
                for g in (spec.group, *groups)]
    if not spec.gated:
        # The gate only adds to a kernel's registers, loads and work, so the gated class's
        # tiles fit the ungated problem, and its gate-only knobs are ignored there. Against the
        # heuristic defaults (and the recomputing backward) the ungated forward+backward ran
        # 2-30% faster at 8 of 9 shipped classes and tied at the ninth; the forward alone
        # 0-24% faster at head dims 64 and 128, 1.6-2.5% slower at 256 (H200,
        # benchmarks/RESULTS.md, session 31).
        out += [(kin.replace(gated=True), note + "; tuned gated, run ungated")
                for kin, note in list(out)]
    return out


def gated_stand_in(spec: KernelSpec, entry: BestEntry) -> bool:
    """Whether `entry`, which a lookup for `spec` returned, is a gated class standing in for
    the ungated problem `spec` (_kin_specs): its time includes a gate that the call has not."""
    if spec.gated:
        return False
    return entry.spec_class_key not in {R.spec_class(k).key() for k, _ in _kin_specs(spec)
                                        if not k.gated}


_snapshot: Snapshot | None = None
_snapshot_lock = threading.Lock()


def get_snapshot() -> Snapshot:
    """The process-wide snapshot, loaded on first use from the default database and the
    shipped files."""
    global _snapshot
    if _snapshot is None:
        with _snapshot_lock:
            if _snapshot is None:
                _snapshot = Snapshot.load()
    return _snapshot


def reset_snapshot() -> None:
    """Forget the cached snapshot (tests, or after `gfwagen db import`)."""
    global _snapshot
    with _snapshot_lock:
        _snapshot = None
    shipped_dir.cache_clear()
    from gfwagen import dispatch, launch_plans

    dispatch.forget_lookups()  # memoized from the old snapshot
    launch_plans.clear()  # their configs came from the old snapshot
