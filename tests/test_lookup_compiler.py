"""A tuned entry made with another minor version of the backend's compiler is skipped, with a
warning, and the caller falls back; a patch release of the same compiler is still used."""

import pytest

from gfwagen.db import TuningDB
from gfwagen.db.lookup import Snapshot
from gfwagen.spec import KernelConfig, Problem

H200 = {"kind": "cuda", "name": "NVIDIA H200", "compute_capability": "9.0", "sm_count": 132,
        "memory_bytes": 150_000_000_000, "driver_version": "13.0", "cuda_version": "13.0",
        "processor": None}
PROB = Problem(2, 4096, 16, 16, 128, 128, 512, "bf16", True)
RUNNING = {"torch": "2.11.0", "triton": "3.6.0", "tvm": "0.27.0"}


def _snapshot(tmp_path, tuned_with: dict) -> Snapshot:
    path = tmp_path / "t.sqlite"
    with TuningDB(path) as db:
        db.record_trial(PROB, "triton", "fwd", KernelConfig(block_m=64, block_n=32),
                        median_ms=1.0, device=H200, toolchain_versions=tuned_with,
                        created_at="2026-01-01T00:00:00.000000+00:00")
    snap = Snapshot.load(path, shipped=False)
    snap.versions = dict(RUNNING)  # as if running under these versions
    return snap


def test_other_minor_compiler_version_is_skipped_with_a_warning(tmp_path):
    snap = _snapshot(tmp_path, {**RUNNING, "triton": "3.5.1"})
    with pytest.warns(RuntimeWarning, match="triton 3.5 are skipped under triton 3.6"):
        cfg, reason = snap.lookup(PROB.spec("triton", "fwd"), 4096, H200)
    assert cfg is None and "heuristic default" in reason


def test_same_minor_compiler_version_is_used(tmp_path):
    snap = _snapshot(tmp_path, {**RUNNING, "triton": "3.6.2", "torch": "2.13.0"})
    cfg, reason = snap.lookup(PROB.spec("triton", "fwd"), 4096, H200)
    assert cfg == KernelConfig(block_m=64, block_n=32)
    assert "tuned on this device" in reason and "other toolchain" in reason
