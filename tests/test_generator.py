"""The generator: stable kernel keys, the specialized source and the on-disk cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from gfwagen import generator
from gfwagen.spec import KernelConfig, KernelSpec
from gfwagen.template_loader import templates_dir

SPEC = KernelSpec("triton", "fwd", 128, 128, 512, "bf16", True, 1)
CFG = KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GFWAGEN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _snapshot(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.delenv("GFWAGEN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert generator.cache_root() == tmp_path / "xdg" / "gfwagen"


def test_key_stable_and_sensitive():
    k = generator.kernel_key(SPEC, CFG)
    assert k == generator.kernel_key(SPEC, KernelConfig(128, 64, 8, 3))
    others = {generator.kernel_key(SPEC, KernelConfig(64, 64, 8, 3)),
              generator.kernel_key(SPEC, KernelConfig(128, 64, 4, 3)),
              generator.kernel_key(SPEC.replace(window=1024), CFG),
              generator.kernel_key(SPEC.replace(pass_="bwd_kv"), CFG),
              generator.kernel_key(SPEC.replace(gated=False), CFG)}
    assert k not in others and len(others) == 5
    assert generator.template_files(SPEC) == ["fwd", "common"]


def test_key_follows_template_bytes(tmp_path, monkeypatch):
    k = generator.kernel_key(SPEC, CFG)
    copy = tmp_path / "templates"
    shutil.copytree(templates_dir(), copy)
    monkeypatch.setenv("GFWAGEN_TEMPLATES", str(copy))
    templates_dir.cache_clear()
    try:
        assert generator.kernel_key(SPEC, CFG) == k  # same bytes, same key
        with open(copy / "triton" / "common.py", "a") as f:  # a file fwd imports
            f.write("\n# changed\n")
        assert generator.kernel_key(SPEC, CFG) != k
    finally:
        templates_dir.cache_clear()


def test_specialized_source_lists_bindings():
    src = generator.specialized_source(SPEC, CFG)
    for line in ("BLOCK_M = 128", "BLOCK_N = 64", "HEAD_D = 128", "HEAD_DV = 128",
                 "WINDOW = 512", "GATED = True", "GROUP = 1", "GATE_CHUNK = 256",
                 "DOT_PREC = 'tf32'", "num_warps = 8", "num_stages = 3"):
        assert f"#   {line}" in src
    assert "def launch_forward" in src and "def key_tile_phases" in src
    with pytest.raises(ValueError, match="dividing"):
        generator.specialized_source(SPEC, KernelConfig(block_m=512))


def test_generate_idempotent(cache):
    gk = generator.generate(SPEC, CFG)
    assert gk.created and gk.directory == cache / "kernels" / "triton" / gk.key
    man = gk.manifest()
    assert man["key"] == gk.key and man["built"] is None and man["constexprs"]["BLOCK_M"] == 128
    assert set(man["templates"]) == {"triton/fwd.py", "triton/common.py"}
    before = _snapshot(cache)
    again = generator.generate(SPEC, CFG)
    assert not again.created and again.key == gk.key
    assert _snapshot(cache) == before


def test_second_process_reuses_cache(cache):
    gk = generator.generate(SPEC, CFG)
    before = _snapshot(cache)
    code = ("import json; from gfwagen import generator; from gfwagen.spec import *;"
            "g = generator.generate(KernelSpec('triton','fwd',128,128,512,'bf16',True,1),"
            "KernelConfig(128,64,8,3)); print(json.dumps([g.key, g.created]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ))
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [gk.key, False]
    assert _snapshot(cache) == before


def test_tvm_source_and_build(cache):
    pytest.importorskip("tvm")
    spec = KernelSpec("tvm", "fwd", 32, 32, 64, "fp32", True, 1)
    cfg = KernelConfig(16, 16, 1, 1)
    assert "prim_func" in generator.specialized_source(spec, cfg)
    gk = generator.build(spec, cfg)
    built = gk.manifest()["built"]
    assert built["library"] == generator.TVM_LIBRARY
    assert (gk.directory / generator.TVM_LIBRARY).is_file()
    assert generator.load_tvm_library(spec, cfg) is not None
    assert not generator.build(spec, cfg).created  # already built: nothing recompiled


def test_triton_build_needs_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(RuntimeError, match="CUDA"):
        generator.build(SPEC, CFG)
