"""The rows of the tuning database as plain records, and their validation.

A record is what one export line holds (and what `merge` reads from another file): a
device {"kind": "device", "key", "fingerprint"}, a toolchain {"kind": "toolchain", "key",
"toolchain"} or a trial {"kind": "trial", "id", "device_key", "toolchain_key", "problem",
"spec", "config", "median_ms", "spread", "status", "reason", "host", "created_at"}.
Every record that enters a database passes through `check_*` here, whichever door it came
in by, and every derived column (keys, bucket, model, arch) is recomputed, never trusted.
No SQL lives here.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
from typing import Any

from gfwagen.db.fingerprint import (
    FINGERPRINT_FIELDS,
    TOOLCHAIN_FIELDS,
    arch,
    device_key,
    gpu_model_name,
    toolchain_key,
)
from gfwagen.db.schema import DatabaseError
from gfwagen.spec import KernelConfig, KernelSpec, Problem, stable_hash, window_class

STATUSES = ("ok", "failed", "wrong", "timeout")
_SCALARS = (str, int, float, bool, type(None))


def dumps(obj: Any) -> str:
    """The one JSON spelling for stored JSON columns: sorted keys, no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def seqlen_bucket(seqlen: int) -> int:
    """Nearest power of two in log space: 2900 -> 4096, 2890 -> 2048."""
    if seqlen < 1:
        raise ValueError(f"seqlen must be >= 1, got {seqlen}")
    return 1 << int(math.floor(math.log2(seqlen) + 0.5))


def spec_class(spec: KernelSpec) -> KernelSpec:
    """The spec with its window replaced by the window class, so one tuned entry serves all
    windows of a class. window 0 (full causal) stays 0."""
    return spec.replace(window=0 if spec.window == 0 else window_class(spec.window))


def problem_key(problem: Problem) -> str:
    return stable_hash(problem.as_dict())


def trial_id(dev_key: str, tc_key: str, spec: KernelSpec, problem: Problem,
             config: KernelConfig, host: str, created_at: str) -> str:
    return stable_hash({"device": dev_key, "toolchain": tc_key, "spec": spec.key(),
                        "problem": problem_key(problem), "config": config.key(),
                        "host": host, "created_at": created_at}, n=20)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


# ---- validation helpers --------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _fail(what: str, msg: str):
    raise DatabaseError(f"{what}: {msg}")


def _require_dict(v, what: str, fields: tuple[str, ...] | None = None) -> dict:
    if not isinstance(v, dict):
        _fail(what, f"expected an object, got {type(v).__name__}")
    if fields is not None:
        unknown = set(v) - set(fields)
        if unknown:
            _fail(what, f"unknown fields {sorted(unknown)}")
    return v


def _check_typed_fields(d: dict, cls, what: str) -> None:
    """Check each field of dataclass `cls` present in `d` has its annotated scalar type."""
    types = {"int": _is_int, "bool": lambda v: isinstance(v, bool),
             "str": lambda v: isinstance(v, str)}
    for f in dataclasses.fields(cls):
        if f.name in d and f.type in types and not types[f.type](d[f.name]):
            _fail(what, f"field {f.name!r} must be {f.type}, got {d[f.name]!r}")


# ---- devices and toolchains ----------------------------------------------------------------

def check_fingerprint(fp, what: str = "device") -> dict:
    fp = _require_dict(fp, what, FINGERPRINT_FIELDS)
    out = {f: fp.get(f) for f in FINGERPRINT_FIELDS}
    if out["kind"] not in ("cuda", "cpu"):
        _fail(what, f"kind must be 'cuda' or 'cpu', got {out['kind']!r}")
    if not isinstance(out["name"], str) or not out["name"]:
        _fail(what, "name must be a non-empty string")
    for f in ("compute_capability", "driver_version", "cuda_version", "processor"):
        if out[f] is not None and not isinstance(out[f], str):
            _fail(what, f"{f} must be a string or null, got {out[f]!r}")
    cc = out["compute_capability"]
    if cc is not None and not (cc.count(".") == 1 and all(p.isdigit() for p in cc.split("."))):
        _fail(what, f"compute_capability must look like '9.0', got {cc!r}")
    if out["kind"] == "cuda" and cc is None:
        _fail(what, "a cuda device needs a compute_capability")
    for f in ("sm_count", "memory_bytes"):
        if out[f] is not None and not (_is_int(out[f]) and out[f] >= 0):
            _fail(what, f"{f} must be a non-negative integer or null, got {out[f]!r}")
    return out


def check_toolchain(tc, what: str = "toolchain") -> dict:
    tc = _require_dict(tc, what, TOOLCHAIN_FIELDS)
    out = {f: tc.get(f) for f in TOOLCHAIN_FIELDS}
    for f, v in out.items():
        if v is not None and not isinstance(v, str):
            _fail(what, f"{f} must be a version string or null, got {v!r}")
    return out


def device_row(fp: dict) -> dict:
    fp = check_fingerprint(fp)
    return {"key": device_key(fp), "kind": fp["kind"], "name": fp["name"],
            "model": gpu_model_name(fp), "arch": arch(fp),
            "compute_capability": fp["compute_capability"], "sm_count": fp["sm_count"],
            "memory_bytes": fp["memory_bytes"], "driver_version": fp["driver_version"],
            "cuda_version": fp["cuda_version"], "fingerprint_json": dumps(fp)}


def toolchain_row(tc: dict) -> dict:
    tc = check_toolchain(tc)
    return {"key": toolchain_key(tc), "torch": tc["torch"], "triton": tc["triton"],
            "tvm": tc["tvm"], "toolchain_json": dumps(tc)}


def device_record_row(rec: dict, what: str = "device") -> dict:
    """Validate a device record; return its database row."""
    _require_dict(rec, what, ("kind", "key", "fingerprint"))
    try:
        row = device_row(rec.get("fingerprint"))
    except DatabaseError as e:
        raise DatabaseError(f"{what}: {e}") from None
    if rec.get("key") != row["key"]:
        _fail(what, f"key {rec.get('key')!r} does not match its fingerprint ({row['key']})")
    return row


def toolchain_record_row(rec: dict, what: str = "toolchain") -> dict:
    _require_dict(rec, what, ("kind", "key", "toolchain"))
    try:
        row = toolchain_row(rec.get("toolchain"))
    except DatabaseError as e:
        raise DatabaseError(f"{what}: {e}") from None
    if rec.get("key") != row["key"]:
        _fail(what, f"key {rec.get('key')!r} does not match its versions ({row['key']})")
    return row


def device_record(row: dict) -> dict:
    return {"kind": "device", "key": row["key"], "fingerprint": json.loads(row["fingerprint_json"])}


def toolchain_record(row: dict) -> dict:
    return {"kind": "toolchain", "key": row["key"], "toolchain": json.loads(row["toolchain_json"])}


# ---- trials --------------------------------------------------------------------------------

TRIAL_FIELDS = ("kind", "id", "device_key", "toolchain_key", "problem", "spec", "config",
                "median_ms", "spread", "status", "reason", "host", "created_at")


def _check_problem(d, what: str) -> Problem:
    _require_dict(d, what + ".problem", tuple(f.name for f in dataclasses.fields(Problem)))
    _check_typed_fields(d, Problem, what + ".problem")
    try:
        p = Problem(**d)
    except TypeError as e:
        raise DatabaseError(f"{what}.problem: {e}") from None
    for f in ("batch", "seqlen", "heads", "kv_heads", "head_dim", "value_dim"):
        if getattr(p, f) < 1:
            _fail(what + ".problem", f"{f} must be >= 1, got {getattr(p, f)}")
    if p.window < 0 or p.heads % p.kv_heads:
        _fail(what + ".problem", "window must be >= 0 and heads a multiple of kv_heads")
    return p


def _check_spec(d, what: str) -> KernelSpec:
    _require_dict(d, what + ".spec", tuple(f.name for f in dataclasses.fields(KernelSpec)))
    _check_typed_fields(d, KernelSpec, what + ".spec")
    try:
        return KernelSpec(**d)
    except (TypeError, ValueError) as e:
        raise DatabaseError(f"{what}.spec: {e}") from None


def check_config(d, what: str = "config") -> KernelConfig:
    _require_dict(d, what)
    _check_typed_fields(d, KernelConfig, what)
    extra = d.get("extra", {})
    if not isinstance(extra, dict) or not all(
            isinstance(k, str) and isinstance(v, _SCALARS) for k, v in extra.items()):
        _fail(what, "extra must map names to JSON scalars")
    try:
        return KernelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise DatabaseError(f"{what}: {e}") from None


def trial_row(*, device_key: str, toolchain_key: str, problem: Problem, spec: KernelSpec,
              config: KernelConfig, median_ms, spread, status: str, reason: str, host: str,
              created_at: str, what: str = "trial") -> dict:
    """Check one measurement and build its database row (with its id)."""
    if spec != problem.spec(spec.backend, spec.pass_):
        _fail(what, f"spec {spec} does not describe problem {problem}")
    if status not in STATUSES:
        _fail(what, f"status must be one of {STATUSES}, got {status!r}")
    if median_ms is not None and not (_is_num(median_ms) and median_ms > 0):
        _fail(what, f"median_ms must be a positive finite number or null, got {median_ms!r}")
    if status == "ok" and median_ms is None:
        _fail(what, "an 'ok' trial needs a median_ms")
    if spread is not None and not (_is_num(spread) and spread >= 0):
        _fail(what, f"spread must be a non-negative finite number or null, got {spread!r}")
    if not isinstance(reason, str):
        _fail(what, "reason must be a string")
    if not isinstance(host, str) or not host:
        _fail(what, "host must be a non-empty string")
    try:
        _dt.datetime.fromisoformat(created_at)
    except (TypeError, ValueError):
        _fail(what, f"created_at must be an ISO 8601 timestamp, got {created_at!r}")
    for name, k in (("device_key", device_key), ("toolchain_key", toolchain_key)):
        if not isinstance(k, str) or not k:
            _fail(what, f"{name} must be a non-empty string")
    cls = spec_class(spec)
    return {
        "id": trial_id(device_key, toolchain_key, spec, problem, config, host, created_at),
        "device_key": device_key, "toolchain_key": toolchain_key,
        "problem_key": problem_key(problem), "problem_json": dumps(problem.as_dict()),
        "seqlen": problem.seqlen, "seqlen_bucket": seqlen_bucket(problem.seqlen),
        "spec_key": spec.key(), "spec_json": dumps(spec.as_dict()), "spec_class_key": cls.key(),
        "backend": spec.backend, "pass": spec.pass_,
        "config_key": config.key(), "config_json": dumps(config.as_dict()),
        "median_ms": None if median_ms is None else float(median_ms),
        "spread": None if spread is None else float(spread),
        "status": status, "reason": reason, "host": host, "created_at": created_at,
    }


def trial_record_row(rec: dict, what: str = "trial") -> dict:
    """Validate a trial record (an export line); return its database row."""
    _require_dict(rec, what, TRIAL_FIELDS)
    missing = set(TRIAL_FIELDS) - set(rec)
    if missing:
        _fail(what, f"missing fields {sorted(missing)}")
    row = trial_row(
        device_key=rec["device_key"], toolchain_key=rec["toolchain_key"],
        problem=_check_problem(rec["problem"], what), spec=_check_spec(rec["spec"], what),
        config=check_config(rec["config"], what + ".config"), median_ms=rec["median_ms"],
        spread=rec["spread"], status=rec["status"], reason=rec["reason"], host=rec["host"],
        created_at=rec["created_at"], what=what)
    if rec["id"] != row["id"]:
        _fail(what, f"id {rec['id']!r} does not match its contents ({row['id']})")
    return row


def trial_record(row: dict) -> dict:
    return {"kind": "trial", "id": row["id"], "device_key": row["device_key"],
            "toolchain_key": row["toolchain_key"], "problem": json.loads(row["problem_json"]),
            "spec": json.loads(row["spec_json"]), "config": json.loads(row["config_json"]),
            "median_ms": row["median_ms"], "spread": row["spread"], "status": row["status"],
            "reason": row["reason"], "host": row["host"], "created_at": row["created_at"]}


def work_units(problem: dict) -> float:
    """Rough attention work of a problem, to compare configs timed on nearby shapes of one
    seqlen bucket: batch * heads * seqlen * keys attended per query."""
    t, w = problem["seqlen"], problem["window"]
    keys = min(w, t) if w > 0 else (t + 1) / 2
    return float(problem["batch"] * problem["heads"] * t * keys)
