"""benchmarks/bench.py's bookkeeping, without a GPU: how --devices shares out the shapes,
merges the per-GPU runs into one report, and fails when a GPU's process does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402


def test_split_shapes_balances_flops_and_keeps_every_shape_once():
    shares = bench.split_shapes(bench.SHAPES, 2)
    assert sorted(n for sh in shares for n in sh) == sorted(bench.SHAPES)
    loads = [sum(bench.flops(bench.SHAPES[n], "fwdbwd") for n in sh) for sh in shares]
    # S4 alone outweighs the rest, so it gets a process of its own
    assert ["S4"] in shares and max(loads) == bench.flops(bench.SHAPES["S4"], "fwdbwd")
    assert bench.split_shapes(bench.TINY, 4) == [["tiny"]]


def _run(shape, gpu, tf, unavailable=None):
    meta = {"date": f"2026-11-29T0{len(shape)}:00:00", "gpu": gpu, "command": "child",
            "versions": {"torch": "x"}, "dtype": "bf16", "unavailable": unavailable or {},
            "shapes": {shape: bench.SHAPES[shape]._asdict()}}
    res = [{"shape": shape, "contender": c, "mode": "fwdbwd", "ms": 1.0, "tflops": t}
           for c, t in tf.items()]
    return {"meta": meta, "results": res, "checks": [{"shape": shape, "contender": "gfwagen"}]}


def test_merge_runs_reports_one_run(tmp_path, capsys):
    runs = [_run("S4", "NVIDIA H200", {"gfwagen": 300.0, "fla": 150.0}),
            _run("S1", "NVIDIA H200", {"gfwagen": 220.0, "fla": 100.0},
                 {"flex": "ImportError: no"})]
    merged = bench.merge_runs(runs, "bench.py --devices 0,1")
    assert merged["meta"]["gpu"] == "NVIDIA H200"
    assert merged["meta"]["unavailable"] == {"flex": "ImportError: no"}
    assert set(merged["meta"]["shapes"]) == {"S1", "S4"}
    assert len(merged["results"]) == 4 and len(merged["checks"]) == 2
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    bench.report(merged["results"], merged["checks"], ["S1", "S4"], ["gfwagen", "fla"],
                 merged["meta"], str(js), str(md))
    out = capsys.readouterr().out
    assert "2.20x" in out and "2.00x" in out  # each shape's ratio from its own process
    assert json.loads(js.read_text())["meta"]["command"] == "bench.py --devices 0,1"
    assert "`bench.py --devices 0,1`" in md.read_text()


@pytest.mark.parametrize("devices", ["0,0", "a", ","])
def test_devices_rejects_bad_lists(devices):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--tiny",
                           "--devices", devices], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--devices" in proc.stderr


def test_devices_fails_when_a_gpu_process_fails(tmp_path):
    """Without a GPU each process exits at once; the parent says so and exits 1."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--tiny",
                           "--contenders", "gfwagen", "--devices", "0,1",
                           "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "needs a CUDA GPU" in proc.stdout and "failed on GPU 0" in proc.stderr
    assert not (tmp_path / "r.json").exists()
