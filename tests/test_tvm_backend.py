"""TVM TensorIR backend: CPU (llvm) forward/backward against the float64 reference, and the
CUDA variant's compilation without a GPU."""

from __future__ import annotations

import re
import shutil
import zlib

import pytest
import torch

pytest.importorskip("tvm")

from gfwagen.backends.tvm_backend import (  # noqa: E402
    build_cuda,
    build_cuda_cubin,
    cuda_source,
    tvm_backward,
    tvm_forward,
)
from gfwagen.reference import reference_backward, reference_forward  # noqa: E402
from gfwagen.spec import KernelConfig, KernelSpec  # noqa: E402

CFG = KernelConfig(block_m=16, block_n=16)


def _err(a, b, floor=0.0):
    """||a - b|| / max(||b||, floor), in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / max(b.norm().item(), floor)).item()


def _inputs(B, T, Hq, Hkv, D, Dv, gated, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, T, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, T, Hkv, Dv, generator=g).to(dtype)
    do = torch.randn(B, T, Hq, Dv, generator=g).to(dtype)
    lg = None
    if gated:
        lg = torch.nn.functional.logsigmoid(2 * torch.randn(B, T, Hq, generator=g) + 1)
    return q, k, v, do, lg


# (B, T, Hq, Hkv, D, Dv, window, gated)
SHAPES = {
    "T_not_tile_multiple": (2, 45, 2, 2, 16, 16, 20, True),
    "W1": (1, 37, 2, 2, 16, 16, 1, True),
    "W_ge_T": (1, 33, 2, 2, 16, 16, 64, True),
    "W_none": (1, 40, 2, 1, 16, 16, None, True),
    "gqa": (1, 50, 4, 2, 32, 32, 17, True),
    "mqa": (1, 50, 4, 1, 16, 16, 24, True),
    "no_gate": (2, 41, 2, 2, 16, 16, 13, False),
    "dv_ne_d": (1, 39, 2, 1, 32, 16, 11, True),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_fp32_matches_reference(name):
    B, T, Hq, Hkv, D, Dv, W, gated = SHAPES[name]
    seed = zlib.crc32(name.encode())
    q, k, v, do, lg = _inputs(B, T, Hq, Hkv, D, Dv, gated, torch.float32, seed=seed)
    o, lse = tvm_forward(q, k, v, lg, W, None, config=CFG)
    assert o.shape == (B, T, Hq, Dv) and o.dtype == torch.float32
    assert lse.shape == (B, Hq, T) and lse.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()

    up = [None if x is None else x.double() for x in (q, k, v, do, lg)]
    ro, rlse = reference_forward(up[0], up[1], up[2], up[4], W, None)
    assert _err(o, ro) <= 1e-5
    assert _err(lse, rlse) <= 1e-5

    grads = tvm_backward(do, q, k, v, o, lse, lg, W, None, config=CFG)
    # the reference backward at the same (o, lse) the kernels saw, upcast
    ref = reference_backward(up[3], up[0], up[1], up[2], o.double(), lse.double(), up[4], W, None)
    names = ("dq", "dk", "dv", "dlog_gate")
    for what, a, b, x in zip(names, grads, ref, (q, k, v, lg), strict=True):
        if b is None:
            assert a is None, what
            continue
        assert a.shape == x.shape and a.dtype == x.dtype, what
        assert torch.isfinite(a).all(), what
        # W = 1: dS is exactly 0 (P = 1, dP = delta), so dq, dk and dlog_gate are pure rounding
        # noise around 0; judge them against an absolute floor of the inputs' scale.
        floor = 1.0 * a.numel() ** 0.5 if W == 1 else 0.0
        assert _err(a, b, floor) <= 1e-5, (what, _err(a, b, floor))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_half_dtypes(dtype, tol):
    B, T, Hq, Hkv, D, Dv, W = 1, 37, 4, 2, 16, 16, 9
    q, k, v, do, lg = _inputs(B, T, Hq, Hkv, D, Dv, True, dtype, seed=7)
    o, lse = tvm_forward(q, k, v, lg, W, None, config=CFG)
    assert o.dtype == dtype and lse.dtype == torch.float32
    up = [x.double() for x in (q, k, v, do, lg)]
    ro, rlse = reference_forward(up[0], up[1], up[2], up[4], W, None)
    assert _err(o, ro) <= tol and _err(lse, rlse) <= 1e-5
    grads = tvm_backward(do, q, k, v, o, lse, lg, W, None, config=CFG)
    ref = reference_backward(up[3], up[0], up[1], up[2], o.double(), lse.double(), up[4], W, None)
    for a, b in zip(grads, ref, strict=True):
        assert _err(a, b) <= tol


@pytest.mark.parametrize("gate_mult,tol", [(1.0, 1e-5), (5.0, 5e-5)])
def test_uneven_tiles_and_default_config(gate_mult, tol):
    # block_m != block_n, default config, explicit scale. gate_mult=5 makes |c_i - cref| reach
    # ~300 inside a 32-row tile: the fp32 rounding of the tile-relative prefix sums (the error
    # GATEDFWA.md section 3 allows: a sum over W + tile positions) then shows at ~2e-5 in
    # dlog_gate, hence the looser bound there.
    B, T, Hq, Hkv, D, Dv, W = 1, 150, 2, 1, 16, 16, 40
    q, k, v, do, lg = _inputs(B, T, Hq, Hkv, D, Dv, True, torch.float32, seed=3)
    lg = lg * gate_mult
    up = [x.double() for x in (q, k, v, do, lg)]
    for cfg in (None, KernelConfig(block_m=8, block_n=32), KernelConfig(block_m=32, block_n=8)):
        o, lse = tvm_forward(q, k, v, lg, W, 0.3, config=cfg)
        ro, rlse = reference_forward(up[0], up[1], up[2], up[4], W, 0.3)
        assert _err(o, ro) <= tol and _err(lse, rlse) <= 1e-5
        grads = tvm_backward(do, q, k, v, o, lse, lg, W, 0.3, config=cfg)
        ref = reference_backward(up[3], up[0], up[1], up[2], o.double(), lse.double(), up[4], W,
                                 0.3)
        for a, b in zip(grads, ref, strict=True):
            assert _err(a, b) <= tol


def test_large_prefix_sums_stay_accurate():
    # |c| ~ 1e4 at the end of the sequence: c_i - c_j formed in fp32 from absolute sums would
    # lose ~1e-3 absolute; per-tile float64 references keep the fp32 error level.
    B, T, Hq, Hkv, D, Dv, W = 1, 96, 1, 1, 16, 16, 12
    q, k, v, do, _ = _inputs(B, T, Hq, Hkv, D, Dv, False, torch.float32, seed=5)
    lg = torch.full((B, T, Hq), -100.0) + 0.5 * torch.rand(B, T, Hq)
    o, lse = tvm_forward(q, k, v, lg, W, None, config=CFG)
    ro, rlse = reference_forward(q.double(), k.double(), v.double(), lg.double(), W, None)
    assert _err(o, ro) <= 1e-5 and _err(lse, rlse) <= 1e-5


def test_unsupported_raises():
    q = torch.randn(1, 8, 1, 16, dtype=torch.float64)
    with pytest.raises(NotImplementedError):
        tvm_forward(q, q, q, None, 4, None)
    qf = q.float()
    with pytest.raises(NotImplementedError):
        tvm_forward(qf, qf, qf, None, 4, None, target={"kind": "cuda", "arch": "sm_90"})
    with pytest.raises(NotImplementedError):  # 128 + 128 dims x 64 rows of fp32 > 48 KiB
        build_cuda(KernelSpec("tvm", "bwd_kv", 128, 128, 256, "bf16", True, 1),
                   KernelConfig(block_m=64, block_n=64))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("pass_", ["fwd", "bwd_kv", "bwd_q"])
def test_cuda_codegen(arch, pass_):
    spec = KernelSpec("tvm", pass_, 64, 64, 256, "bf16", True, 2)
    src = cuda_source(build_cuda(spec, KernelConfig(block_m=64, block_n=32), arch=arch))
    assert "__global__" in src and "threadIdx.x" in src and "__shared__" in src
    assert "__syncthreads()" in src


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_cuda_codegen_dtypes(dtype):
    spec = KernelSpec("tvm", "fwd", 32, 32, 0, dtype, False, 1)
    assert "__global__" in cuda_source(build_cuda(spec, arch="sm_90"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_cubin_with_nvcc():
    spec = KernelSpec("tvm", "fwd", 64, 64, 256, "bf16", True, 2)
    cubin = build_cuda_cubin(spec, KernelConfig(block_m=64, block_n=32), arch="sm_90")
    assert cubin[:4] == b"\x7fELF"


@pytest.mark.parametrize("cfg,shape", [
    # micro-kernel knobs: rm x vn accumulators clipped to the tiles; D = 48 (vn -> 16)
    (KernelConfig(16, 32, extra=(("rm", 8), ("vn", 16))), (1, 70, 4, 2, 48, 32, 23, True)),
    # full causal with interior (unmasked) tiles; rm=1, vn=8
    (KernelConfig(8, 16, extra=(("rm", 1), ("vn", 8))), (1, 61, 2, 2, 16, 16, None, False)),
    # tiles wider than the head dims; interior tiles inside the window
    (KernelConfig(32, 16, extra=(("rm", 2), ("vn", 64))), (2, 100, 2, 1, 16, 16, 60, True)),
])
def test_cpu_microkernel_knobs(cfg, shape):
    B, T, Hq, Hkv, D, Dv, W, gated = shape
    q, k, v, do, lg = _inputs(B, T, Hq, Hkv, D, Dv, gated, torch.float32, seed=11)
    up = [None if x is None else x.double() for x in (q, k, v, do, lg)]
    o, lse = tvm_forward(q, k, v, lg, W, None, config=cfg)
    ro, rlse = reference_forward(up[0], up[1], up[2], up[4], W, None)
    assert _err(o, ro) <= 1e-5 and _err(lse, rlse) <= 1e-5
    grads = tvm_backward(do, q, k, v, o, lse, lg, W, None, config=cfg,
                         config_q=KernelConfig(16, 8, extra=(("rm", 4), ("vn", 16))))
    ref = reference_backward(up[3], up[0], up[1], up[2], o.double(), lse.double(), up[4], W, None)
    for what, a, b in zip(("dq", "dk", "dv", "dg"), grads, ref, strict=True):
        if b is None:
            assert a is None
            continue
        assert _err(a, b) <= 1e-5, (what, _err(a, b))


def test_cpu_exp2_polynomial():
    # the vectorized exp2 of the CPU kernels: ~fp32-exact on the softmax range, exactly 0 far
    # below it (masked logits), no inf/nan
    import numpy as np
    import tvm
    from tvm.script import tirx as T

    from gfwagen.template_loader import load_template

    exp2p = load_template("tvm", "cpu").exp2p
    n = 4096

    @T.prim_func
    def f(x_h: T.handle, y_h: T.handle):
        x = T.match_buffer(x_h, (n,), "float32")
        y = T.match_buffer(y_h, (n,), "float32")
        for i in T.vectorized(n):
            y[i] = exp2p(x[i])

    xs = np.concatenate([np.linspace(-130, 0.5, n - 2), [-1e30, -5e29]]).astype("float32")
    ys = np.zeros(n, "float32")
    fn = tvm.compile(f, target="llvm")["f"]
    xt, yt = tvm.runtime.tensor(xs), tvm.runtime.tensor(ys)
    fn(xt, yt)
    got = yt.numpy().astype(np.float64)
    want = np.exp2(xs.astype(np.float64))
    ok = xs > -126
    assert np.all(np.abs(got[ok] - want[ok]) <= 4e-7 * want[ok])
    assert np.all(got[xs <= -127] == 0) and np.all(np.isfinite(got))


def test_auto_backend_on_cpu_is_tvm():
    import subprocess
    import sys

    from gfwagen import dispatch

    cpu = torch.device("cpu")
    assert dispatch.resolve_backend("auto", cpu, torch.float32) == "tvm"
    assert dispatch.resolve_backend("auto", cpu, torch.bfloat16) == "tvm"
    assert dispatch.resolve_backend("auto", cpu, torch.float64) == "reference"
    assert dispatch.resolve_backend("reference", cpu, torch.float32) == "reference"
    # importing gfwagen (and calling nothing) must not import tvm
    code = "import sys, gfwagen; assert 'tvm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the tensor-core forward (templates/tvm/fwd_cuda.py): compiled here, run on the H200
# (tests/test_gpu_tvm.py)

@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype,gated,window", [("bf16", True, 256), ("fp16", False, 0)])
def test_tensor_core_forward_codegen(arch, dtype, gated, window):
    from gfwagen.backends.tvm_backend import DEFAULT_CUDA_TC_CONFIG, tensor_core_forward

    spec = KernelSpec("tvm", "fwd", 128, 128, window, dtype, gated, 2)
    assert tensor_core_forward(spec)
    # sm_90's default is the warpgroup-MMA template (below); this is the mma.sync one
    src = cuda_source(build_cuda(spec, DEFAULT_CUDA_TC_CONFIG, arch=arch))
    mma = "mma.sync.aligned.m16n8k16.row.col.f32." + ("bf16.bf16" if dtype == "bf16" else
                                                       "f16.f16")
    assert mma in src and "ldmatrix.sync.aligned.m8n8.x4.trans" in src
    assert "cp_async" in src and "extern __shared__" in src  # dynamic shared memory
    # two 32-key softmax steps per 64-key tile: two row-max shuffles per row and step
    assert DEFAULT_CUDA_TC_CONFIG.get("sub_n") == 32
    assert src.count("__shfl_xor_sync") >= 2 * 2 * 2


def test_tensor_core_forward_takes_only_what_it_can_run():
    from gfwagen.backends.tvm_backend import _cuda_config, tensor_core_forward
    from gfwagen.tuner import space

    spec = KernelSpec("tvm", "fwd", 128, 128, 256, "bf16", True, 1)
    for bad in (KernelConfig(8, 64, 1, 1), KernelConfig(64, 512, 4, 1), KernelConfig(64, 64, 4, 3),
                KernelConfig(64, 64, 4, 1, extra=(("sub_n", 48),))):
        assert not tensor_core_forward(spec, bad)
        with pytest.raises(NotImplementedError, match="unsupported"):
            _cuda_config(spec, bad)  # a tuner's candidate is never swapped for the default
        assert not space.feasible(spec, bad)[0]
    # fp32 and head dims off the 16 grid take the CUDA-core forward instead
    assert not tensor_core_forward(spec.replace(dtype="fp32"))
    assert not tensor_core_forward(spec.replace(head_dim=72, value_dim=72))
    # dynamic shared memory: 64 x 128 keys, two stages = 70 KB is fine, not over 227 KiB
    ok = KernelConfig(64, 128, 4, 2)
    assert space.feasible(spec, ok)[0]
    huge = KernelConfig(64, 256, 4, 2)
    assert space.feasible(spec.replace(head_dim=256, value_dim=256), huge)[0] is False


@pytest.mark.parametrize("dtype,D,gated,window,qs", [("bf16", 128, True, 256, True),
                                                     ("fp16", 64, False, 0, False),
                                                     ("bf16", 64, True, 100, True)])
def test_tensor_core_forward_two_row_blocks_per_warp(dtype, D, gated, window, qs):
    """warp_m = 2: every K/V fragment ldmatrix reads feeds one mma per row block (four per
    ldmatrix.x4, against two at warp_m = 1); q_smem adds one Q ldmatrix per row block and k
    step and stages Q in shared memory."""
    from gfwagen.backends.tvm_backend import cuda_smem_bytes

    spec = KernelSpec("tvm", "fwd", D, D, window, dtype, gated, 2)
    bm, bn, sn = 128, 64, 32
    extra = (("sub_n", sn), ("warp_m", 2)) + ((("q_smem", True),) if qs else ())
    cfg = KernelConfig(bm, bn, 4, 1, extra=extra)
    src = cuda_source(build_cuda(spec, cfg))
    assert "__launch_bounds__(128)" in src  # 4 warps of 32 rows
    steps = bn // sn
    kv_ldm = steps * (D // 16 * sn // 16 + sn // 16 * D // 16)
    q_ldm = steps * D // 16 * 2 if qs else 0
    assert src.count("mma.sync.aligned.m16n8k16") == 2 * 2 * kv_ldm
    assert src.count("ldmatrix.sync.aligned") == kv_ldm + q_ldm
    q_bytes = bm * (D + 8) * 2 if qs else 0
    assert cuda_smem_bytes(spec, cfg) == q_bytes + bn * (2 * (D + 8) * 2 + 4)


def test_tensor_core_forward_knob_defaults_are_the_old_kernel():
    """warp_m = 1 and q_smem = False written out give the kernel that leaving them out gives
    (the configs measured before these knobs existed)."""
    spec = KernelSpec("tvm", "fwd", 64, 64, 256, "bf16", True, 2)
    plain = KernelConfig(64, 64, 4, 1, extra=(("sub_n", 32),))
    spelled = KernelConfig(64, 64, 4, 1, extra=(("sub_n", 32), ("warp_m", 1), ("q_smem", False)))
    assert cuda_source(build_cuda(spec, plain)) == cuda_source(build_cuda(spec, spelled))


def test_tensor_core_forward_warp_m_limits():
    from gfwagen.backends.tvm_backend import _cuda_config, tensor_core_forward
    from gfwagen.tuner import space

    spec = KernelSpec("tvm", "fwd", 128, 128, 256, "bf16", True, 1)
    for bad in (KernelConfig(16, 64, 1, 1, extra=(("warp_m", 2),)),  # fewer rows than a warp's
                KernelConfig(64, 64, 4, 1, extra=(("warp_m", 3),)),
                KernelConfig(64, 64, 4, 1, extra=(("q_smem", 1),))):
        assert not tensor_core_forward(spec, bad)
        with pytest.raises(NotImplementedError, match="unsupported"):
            _cuda_config(spec, bad)
    # threads: 2 per row at warp_m = 1, 1 per row at 2 (256 rows = 8 warps)
    one = space.resources(spec, KernelConfig(128, 64, 8, 1))
    two = space.resources(spec, KernelConfig(256, 64, 8, 1, extra=(("warp_m", 2),
                                                                   ("q_smem", True))))
    assert one["threads"] == two["threads"] == 256
    # at D = 128 two row blocks fit the registers only with Q in shared memory
    held = KernelConfig(128, 64, 4, 1, extra=(("sub_n", 32), ("warp_m", 2)))
    staged = KernelConfig(128, 64, 4, 1, extra=(("sub_n", 32), ("warp_m", 2), ("q_smem", True)))
    ok, why = space.feasible(spec, held)
    assert not ok and "registers" in why
    assert space.feasible(spec, staged)[0]
    assert space.feasible(spec.replace(head_dim=64, value_dim=64), held)[0]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("extra", [(("warp_m", 2), ("q_smem", True)), (("q_smem", True),)])
def test_tensor_core_forward_knobs_compile_with_nvcc(extra):
    spec = KernelSpec("tvm", "fwd", 128, 128, 256, "fp16", True, 2)
    bm = 64 * dict(extra).get("warp_m", 1)
    cubin = build_cuda_cubin(spec, KernelConfig(bm, 64, 4, 2, extra=(("sub_n", 32),) + extra))
    assert cubin[:4] == b"\x7fELF"


def test_cuda_core_defaults_fit_static_shared_memory():
    from gfwagen.backends.tvm_backend import (
        CUDA_STATIC_SMEM_LIMIT,
        cuda_smem_bytes,
        default_cuda_config,
    )

    for pass_ in ("fwd", "bwd_kv", "bwd_q"):
        for D, Dv in ((64, 64), (128, 128), (192, 96), (256, 256)):
            spec = KernelSpec("tvm", pass_, D, Dv, 200, "fp32", True, 1)
            assert cuda_smem_bytes(spec, default_cuda_config(spec)) <= CUDA_STATIC_SMEM_LIMIT


def test_tvm_on_cuda_tensors_needs_a_cuda_runtime(monkeypatch):
    from gfwagen.backends import tvm_backend

    monkeypatch.setattr(tvm_backend, "cuda_runtime_available", lambda: False)
    q = torch.empty(1, 8, 1, 16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pytest.raises(NotImplementedError, match="CUDA runtime"):
        tvm_backend._target(q, "llvm")


def test_tensor_core_forward_realigns_misaligned_views():
    from gfwagen.backends.tvm_backend import _aligned16

    base = torch.zeros(1 + 2 * 64, dtype=torch.bfloat16)
    view = base[1:].view(1, 2, 1, 64)  # contiguous, 2 bytes past an aligned address
    assert view.is_contiguous() and view.data_ptr() % 16 == 2
    fixed = _aligned16(view)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, view)
    ok = torch.zeros(1, 2, 1, 64, dtype=torch.bfloat16)
    assert _aligned16(ok) is ok


def test_tensor_core_default_by_head_dim():
    """The wide tile (two 16-row blocks per warp, Q in shared memory) is the default from
    D = 128 while its register estimate fits; D = 64 and the wide heads keep 64x64, and the
    template runs both (benchmarks/RESULTS.md, session 4)."""
    pytest.importorskip("tvm")
    from gfwagen.backends import tvm_backend as tb
    from gfwagen.template_loader import load_template

    tc = load_template("tvm", "fwd_cuda")
    for D, Dv, dtype, want in ((128, 128, "bf16", tb.WIDE_CUDA_TC_CONFIG),
                               (128, 64, "fp16", tb.WIDE_CUDA_TC_CONFIG),
                               (64, 64, "bf16", tb.DEFAULT_CUDA_TC_CONFIG),
                               (192, 192, "bf16", tb.DEFAULT_CUDA_TC_CONFIG),
                               (256, 256, "fp16", tb.DEFAULT_CUDA_TC_CONFIG)):
        spec = KernelSpec("tvm", "fwd", D, Dv, 512, dtype, True, 1)
        got = tb.default_cuda_config(spec)
        assert got == want, (D, Dv, dtype)
        assert tc.supports(D, Dv, dtype, got) is None
        assert tc.registers(D, Dv, got) <= 255 or got is tb.DEFAULT_CUDA_TC_CONFIG


def test_launches_reuse_the_compiled_function(monkeypatch):
    """Each launch after the first takes the memoized function: no module lookup (its hashes
    and checks cost about 0.2 ms of host time per launch); clear_cache forgets it too."""
    from gfwagen.backends import tvm_backend as tb

    q, k, v, _, lg = _inputs(1, 20, 2, 1, 16, 16, True, torch.float32, seed=5)
    o1, _ = tvm_forward(q, k, v, lg, 8, config=CFG)
    lookups = []
    real = tb._compile
    monkeypatch.setattr(tb, "_compile", lambda *a: lookups.append(a) or real(*a))
    o2, _ = tvm_forward(q, k, v, lg, 8, config=CFG)
    assert not lookups and torch.equal(o1, o2)
    tb.clear_cache()
    o3, _ = tvm_forward(q, k, v, lg, 8, config=CFG)
    assert len(lookups) == 1 and torch.allclose(o1, o3)


# ---- the warpgroup-MMA forward (templates/tvm/fwd_wgmma.py, sm_90a): compiled here, run on
# the H200 (tests/test_gpu_tvm.py)

def _wgmma(bm=128, bn=64, ns=3, *switches):
    """A wgmma tile with the template's boolean extras `switches` (e.g. "tma") on."""
    return KernelConfig(bm, bn, bm // 16, ns,
                        extra=tuple(sorted((k, True) for k in ("wgmma", *switches))))


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("dtype,D,Dv,gated,window,bm,bn,ns", [
    ("bf16", 128, 128, True, 256, 128, 64, 3), ("fp16", 64, 64, False, 0, 64, 128, 3),
    ("bf16", 128, 64, True, 100, 64, 128, 3)])
def test_wgmma_forward_codegen(dtype, D, Dv, gated, window, bm, bn, ns, tma):
    """D / 16 score MMAs (both operands from shared memory) and block_n / 16 output MMAs (P
    from registers, V transposed) per key tile, in the pipelined loop and in its prologue
    (scores) and epilogue (P V); built for sm_90a; shared memory as the template counts it.
    With tma, the tiles come by bulk tensor copies, one per 64-column block of Q (once) and
    of K and V (the first two tiles, then one tile a loop step), behind mbarriers."""
    from gfwagen.backends.tvm_backend import cuda_smem_bytes, tensor_core_forward

    spec = KernelSpec("tvm", "fwd", D, Dv, window, dtype, gated, 2)
    cfg = _wgmma(bm, bn, ns, *(("tma",) if tma else ()))
    assert tensor_core_forward(spec, cfg)
    src = cuda_source(build_cuda(spec, cfg, arch="sm_90"))
    t = "bf16.bf16" if dtype == "bf16" else "f16.f16"
    calls = [ln for ln in src.splitlines() if "_mma_async_sync_aligned_" in ln and
             "__device__" not in ln]
    assert sum(f"m64n{bn}k16" in ln for ln in calls) == 2 * D // 16
    assert sum(f"m64n{Dv}k16" in ln for ln in calls) == 2 * bn // 16
    assert f"wgmma.mma_async.sync.aligned.m64n{bn}k16.f32.{t}" in src
    assert f"__launch_bounds__({2 * bm})" in src
    tiles = 2 * bm * D + ns * (2 * bn * (D + Dv) + 4 * bn)
    if tma:
        bulk = [ln for ln in src.splitlines() if "cp_async_bulk_tensor_g2s" in ln and
                "__device__" not in ln]
        assert len(bulk) == D // 64 + 3 * (D + Dv) // 64 and "cp.async.cg" not in src
        assert "tensormap" in src.lower() and "__grid_constant__ CUtensorMap" in src
        # one barrier a tile, one before the loop and one for the mbarriers' init
        assert src.count("__syncthreads()") == 3 and "mbarrier.try_wait.parity" in src
        assert cuda_smem_bytes(spec, cfg) == tiles + 8 * (ns + 1)
    else:
        # one barrier a tile, one before the loop
        assert "fence.proxy.async.shared::cta" in src and src.count("__syncthreads()") == 2
        assert cuda_smem_bytes(spec, cfg) == tiles


def test_wgmma_scale_is_positive_and_exact():
    """fwd_wgmma's softmax takes its max on the raw products, so the scale it runs must be
    positive: a negative one runs on -Q (exact in any float format), a zero or tiny one (either
    sign) at WGMMA_ZERO_SCALE, and a positive one as given, on Q itself (no copy)."""
    from gfwagen.backends.tvm_backend import WGMMA_ZERO_SCALE, wgmma_scale

    q = torch.randn(2, 5, 3, 8, dtype=torch.bfloat16)
    q2, s = wgmma_scale(q, 0.125)
    assert q2 is q and s == 0.125
    q2, s = wgmma_scale(q, -0.3)
    assert s == 0.3 and torch.equal(q2, -q) and (q2.float() * s == q.float() * -0.3).all()
    for zero in (0.0, 1e-35):
        q2, s = wgmma_scale(q, zero)
        assert q2 is q and s == WGMMA_ZERO_SCALE
    for neg_zero in (-0.0, -1e-35):
        q2, s = wgmma_scale(q, neg_zero)
        assert s == WGMMA_ZERO_SCALE and torch.equal(q2, -q)


@pytest.mark.parametrize("window", [0, 300])
def test_wgmma_softmax_masks_with_minus_infinity(window):
    """The masked tiles' scores become -inf and go through the same exp2 as the interior's:
    no per-score compare against fwd_cuda.MASK_T, the finite mask's threshold (session 36)."""
    spec = KernelSpec("tvm", "fwd", 64, 64, window, "bf16", True, 1)
    src = cuda_source(build_cuda(spec, _wgmma(128, 128, 3, "pingpong", "tma"), arch="sm_90"))
    assert "-CUDART_INF_F" in src
    assert "e+29" not in src  # MASK_T, -5e29; MASK (-1e30) is the running max's start


def loop_steps(gated, cfg) -> int:
    """Copies of the pingpong consumers' loop step in the source: the interior key tiles'
    loop and the masked ones' before and after it, or (gated without bias_mma, or config
    extra split_loop false) one loop."""
    split = cfg.get("split_loop", True) and (not gated or cfg.get("bias_mma", False))
    return 3 if split else 1


@pytest.mark.parametrize("split", [True, False])
def test_wgmma_pingpong_interior_loop(split):
    """The ungated pingpong kernel runs its interior key tiles in a loop whose step has no
    masked softmax (the window's edge tiles and the diagonal keep theirs): three copies of
    the step, one of them without the mask's -inf select; split_loop false, the one loop."""
    spec = KernelSpec("tvm", "fwd", 128, 128, 512, "bf16", False, 1)
    cfg = _wgmma(128, 128, 3, "pingpong", "tma")
    if not split:
        cfg = KernelConfig(128, 128, 8, 3, extra=(*cfg.extra, ("split_loop", False)))
    src = cuda_source(build_cuda(spec, cfg, arch="sm_90"))
    kernel = src[src.index('extern "C" __global__'):]
    loops = kernel.split("for (int it")[1:]
    assert len(loops) == loop_steps(False, cfg)
    # a masked step's softmax selects -inf; the interior loop's does not
    assert ["-CUDART_INF_F" in body for body in loops] == ([True, False, True] if split
                                                           else [True])


@pytest.mark.parametrize("gated,bn", [(True, 128), (False, 64)])
def test_wgmma_pingpong_codegen(gated, bn):
    """The warp-specialized schedule: 384 threads, the producer warpgroup's registers handed
    to the consumers (setmaxnreg), the consumers' turns at the tensor cores on named
    barriers 1 and 2, each stage freed through its own mbarrier; the same products as the
    one-warpgroup-per-64-rows loop."""
    from gfwagen.backends.tvm_backend import cuda_smem_bytes, tensor_core_forward

    spec = KernelSpec("tvm", "fwd", 128, 128, 512, "bf16", gated, 1)
    cfg = _wgmma(128, bn, 3, "pingpong", "tma")
    assert tensor_core_forward(spec, cfg)
    src = cuda_source(build_cuda(spec, cfg, arch="sm_90"))
    assert "__launch_bounds__(384)" in src
    assert "setmaxnreg.dec.sync.aligned.u32 40" in src.replace("\"", "")
    assert "setmaxnreg.inc.sync.aligned.u32 232" in src.replace("\"", "")
    calls = [ln.strip() for ln in src.splitlines() if "__device__" not in ln]
    kernel = src[src.index('extern "C" __global__'):]
    syncs = [ln for ln in calls if ln.startswith("tvm_builtin_ptx_bar_sync_count")]
    arrives = [ln for ln in calls if ln.startswith("tvm_builtin_ptx_bar_arrive")]
    # one query tile a block: no handoff to a next one
    assert len([ln for ln in arrives if "arrive((uint)1," in ln]) == 1
    # a turn before the first scores, one a loop step, one before the last P V; consumer 1
    # lets consumer 0 go first, consumer 0 hands back the last turn. Then each consumer's own
    # barrier (3 or 4, its 128 threads) between staging its output and the bulk store
    steps = loop_steps(gated, cfg)
    assert len(syncs) == 3 + steps and len(arrives) == 3 + steps
    assert "(uint)128" in syncs[-1] and "+ 3" in syncs[-1]
    # two consumers' turns as 2 - cw, with no modulo: the three-consumer ring's form of it
    # changed this kernel's loop (session 39)
    assert not any("%" in ln for ln in arrives)
    # the output: staged in shared memory, fenced for the copy engine, one bulk tensor store
    # per 64-column block, read back before the block exits; no per-element stores
    assert len([ln for ln in calls if "bulk_tensor_4d_global_shared__cta" in ln]) == 2
    assert "fence.proxy.async.shared::cta;" in src and "cp.async.bulk.wait_group.read 0;" in src
    assert not re.search(r"\bo_ptr\[", kernel)
    mma = [ln for ln in calls if "_mma_async_sync_aligned_" in ln]
    # scores (m64n{bn}, D / 16 k steps) before and in the loop, P V (m64n128, bn / 16) in
    # it and after
    assert len(mma) == (1 + steps) * (128 // 16 + bn // 16)
    assert all(f"m64n{bn}k16" in ln or "m64n128k16" in ln for ln in mma)
    assert "cp.async.cg" not in src and src.count("__syncthreads()") == 1
    # gate off, the prefix sums are a one-element dummy [1, 1, 1]: the kernel must not index
    # it by (batch, head, row), which read past it before
    assert bool(re.search(r"\bc_ptr\[", kernel)) is gated
    # square tiles: each stage's bias slot holds the key tile's record (its total and
    # padding: 16 bytes more)
    tiles = 2 * 128 * 128 + 3 * (2 * bn * 256 + 4 * bn + 16 * (bn == 128))
    assert cuda_smem_bytes(spec, cfg) == tiles + 8 * 4 + 8 * 3


@pytest.mark.parametrize("gated,extra", [(True, ("bias_mma",)), (False, ())])
def test_wgmma_three_consumers_codegen(gated, extra):
    """block_m 192 (head dims <= 64): three consumer warpgroups and the producer, 512
    threads at 32 and 160 registers; the turns go round consumers 0, 1, 2 on named barriers
    1-3, the output stores' own barriers are 4-6, and each stage is freed by all 384
    consumer threads. Gated, it reads the key tiles' records (bias_mma too), and each row's
    c_i comes from the records of the block's last two key tiles in global memory."""
    from gfwagen.backends.tvm_backend import (
        gate_input,
        tensor_core_forward,
        tensor_core_template,
    )

    spec = KernelSpec("tvm", "fwd", 64, 64, 2048, "bf16", gated, 1)
    cfg = KernelConfig(192, 128, 16, 3, extra=tuple(sorted(
        (k, True) for k in ("wgmma", "tma", "pingpong", *extra))))
    assert tensor_core_forward(spec, cfg)
    assert gate_input(spec, cfg) == ("tiles" if gated else None)
    src = cuda_source(build_cuda(spec, cfg, arch="sm_90")).replace("\"", "")
    assert "__launch_bounds__(512)" in src
    assert "setmaxnreg.dec.sync.aligned.u32 32" in src
    assert "setmaxnreg.inc.sync.aligned.u32 160" in src
    calls = [ln.strip() for ln in src.splitlines() if "__device__" not in ln]
    syncs = [ln for ln in calls if ln.startswith("tvm_builtin_ptx_bar_sync_count")]
    arrives = [ln for ln in calls if ln.startswith("tvm_builtin_ptx_bar_arrive")]
    # the next consumer's turn, round the three (after the first scores and in each loop
    # step); the last turn to the next consumer
    assert sum("% 3) + 1)" in ln for ln in arrives) == 1 + loop_steps(gated, cfg)
    assert sum("+ 2)), (uint)256" in ln for ln in arrives) == 1
    assert "(uint)128" in syncs[-1] and "+ 4)" in syncs[-1]
    inits = [ln for ln in calls if ln.startswith("tvm_builtin_ptx_mbarrier_init")]
    assert sum(ln.endswith("(uint)384);") for ln in inits) == 3  # the stages' free barriers
    # the rows' c_i read before the loop (row_sums_ahead), pinned there
    assert len([ln for ln in calls if ln.startswith("gfwa_pin(")]) == 2 * gated
    for d, why in ((128, "head dims <= 64"), (64, None)):
        got = tensor_core_template(cfg).supports(d, d, "bf16", cfg)
        assert (got is None) if why is None else why in got
    no_pp = KernelConfig(192, 128, 16, 3, extra=(("tma", True), ("wgmma", True)))
    assert "block_m 192" in tensor_core_template(no_pp).supports(64, 64, "bf16", no_pp)


@pytest.mark.parametrize("gated", [True, False])
def test_wgmma_stagger_codegen(gated):
    """stagger (block_m 192 only): each consumer's tile range from the consumer index through
    a lane-0 shuffle (uniform, so the loops' bounds stay in uniform registers), and two loops
    of passed turns, each a turn's sync and hand-on and the skipped stage's release; the
    round of turns otherwise as unstaggered. Refused on two consumers."""
    from gfwagen.backends.tvm_backend import tensor_core_template

    spec = KernelSpec("tvm", "fwd", 64, 64, 512, "bf16", gated, 1)
    extra = ("wgmma", "tma", "pingpong", "bias_mma") if gated else ("wgmma", "tma", "pingpong")

    def source(stagger):
        cfg = KernelConfig(192, 128, 16, 3, extra=tuple(sorted(
            (k, True) for k in (*extra, *(("stagger",) if stagger else ())))))
        src = cuda_source(build_cuda(spec, cfg, arch="sm_90")).replace("\"", "")
        return cfg, [ln.strip() for ln in src.splitlines() if "__device__" not in ln]

    cfg, calls = source(True)
    _, plain = source(False)
    count = [lambda c: sum("__shfl_sync(" in ln and ", 0, 32)" in ln for ln in c),
             lambda c: sum(ln.startswith("tvm_builtin_ptx_bar_sync_count") for ln in c),
             lambda c: sum(ln.startswith("tvm_builtin_ptx_bar_arrive") for ln in c),
             lambda c: sum(ln.startswith("tvm_builtin_ptx_mbarrier_arrive") for ln in c)]
    assert [f(calls) - f(plain) for f in count] == [1, 2, 2, 2]
    two = KernelConfig(128, 128, 8, 3, extra=(*cfg.extra,))
    assert "stagger" in tensor_core_template(two).supports(64, 64, "bf16", two)


def test_three_consumers_join_the_tuners_space_at_head_dim_64(monkeypatch):
    """block_m 192 is a tile height only the wgmma pingpong forward takes: in the space where
    wgmma is, counting 16 warps, with bias_mma kept (its 128-key tiles read the records) and
    stagger searched there (and dropped at 128 rows);
    refused by check_config for the other kernels and by the template above head dim 64."""
    from gfwagen.backends import tvm_backend
    from gfwagen.generator import check_config
    from gfwagen.tuner import space

    monkeypatch.setattr(tvm_backend, "device_arch", lambda: "sm_90")
    spec = KernelSpec("tvm", "fwd", 64, 64, 4096, "bf16", True, 1)
    p = space.params("tvm", "fwd", space.knobs_for(spec, gpu=True))
    assert 192 in p["block_m"] and 192 not in p["block_n"]
    vals = {"block_m": 192, "block_n": 128, "num_stages": 3, "x_wgmma": True, "x_tma": True,
            "x_pingpong": True, "x_persistent": True, "x_bias_mma": True}
    cfg = space.config_from_params(spec, vals, gpu=True)
    assert (cfg.block_m, cfg.num_warps) == (192, 16) and cfg.get("bias_mma") is True
    assert space.feasible(spec, cfg) == (True, "")
    assert space.resources(spec, cfg)["threads"] == 512
    assert space.config_from_params(spec, space.config_params(spec, cfg, gpu=True),
                                    gpu=True) == cfg
    # other key tiles than 128 do not read the records: bias_mma means nothing there
    assert space.config_from_params(spec, {**vals, "block_n": 64}, gpu=True).get(
        "bias_mma") is None
    # stagger: searched, kept on 192 rows and dropped on 128 (two consumers do not stagger)
    assert p["x_stagger"] == (False, True)
    staggered = space.config_from_params(spec, {**vals, "x_stagger": True}, gpu=True)
    assert staggered.get("stagger") is True and space.feasible(spec, staggered) == (True, "")
    assert space.config_from_params(spec, {**vals, "x_stagger": True, "block_m": 128},
                                    gpu=True) == space.config_from_params(
        spec, {**vals, "block_m": 128}, gpu=True)
    assert cfg.get("stagger") is None  # off, left out: the config reads as before the knob
    ok, why = space.feasible(spec, space.config_from_params(
        spec, {**vals, "x_pingpong": False}, gpu=True))
    assert not ok and "192" in why
    ok, why = space.feasible(spec.replace(head_dim=128, value_dim=128), cfg)
    assert not ok and "head dims <= 64" in why
    assert any(c.block_m == 192 for c in space.enumerate_configs(spec, gpu=True))
    for other in (spec.replace(pass_="bwd_kv"), spec.replace(backend="triton")):
        with pytest.raises(ValueError, match="192"):
            check_config(other, cfg)
    for bad in (96, 24):
        with pytest.raises(ValueError, match="power of two"):
            KernelConfig(bad, 128)


@pytest.mark.parametrize("gated", [True, False])
def test_wgmma_persistent_codegen(gated):
    """extra persistent: true (the database's form) runs one block per SM, resolved to the
    device's count (offline: 132); each block loops over query tiles, the consumers two
    rounds a step, so their products appear twice; Q has two buffers, whose "full" and
    "empty" barriers (three more) let the next query tile's rows load while this one's output
    is stored from the other. Consumer 1 hands consumer 0 its first turn once, at the
    block's first query tile; after that, right after its own last P V of each query tile
    (before its epilogue), where the block has another."""
    from gfwagen.backends.tvm_backend import (
        OFFLINE_SM_COUNT,
        cuda_smem_bytes,
        resolve_persistent,
        tensor_core_forward,
        tensor_core_template,
    )

    spec = KernelSpec("tvm", "fwd", 64, 64, 512, "bf16", gated, 1)
    pp = _wgmma(128, 128, 3, "pingpong", "tma")
    cfg = KernelConfig(128, 128, 8, 3, extra=(*pp.extra, ("persistent", True)))
    assert tensor_core_forward(spec, cfg)
    assert resolve_persistent(cfg).get("persistent") == OFFLINE_SM_COUNT
    assert resolve_persistent(pp) is pp
    src = cuda_source(build_cuda(spec, cfg, arch="sm_90"))
    kernel = src[src.index('extern "C" __global__'):]
    mma = [ln for ln in kernel.splitlines() if "_mma_async_sync_aligned_" in ln]
    # the pingpong kernel's products (its codegen test)
    one = (1 + loop_steps(gated, cfg)) * (64 // 16 + 128 // 16)
    assert len(mma) == 2 * one
    lines = kernel.splitlines()
    to_first = [i for i, ln in enumerate(lines) if "bar_arrive_arrive((uint)1," in ln]
    assert len(to_first) == 3 and "w2 == 0" in lines[to_first[0] - 1]
    for copy, i in enumerate(to_first[1:]):
        # in the round's last turn, after its P V's issue and before the output's staging
        last_pv = max(j for j, ln in enumerate(lines[:i]) if "_mma_async_sync_aligned_" in ln)
        assert "bar_sync_count_sync" not in "".join(lines[last_pv:i]), copy
        assert any("bar_sync_count_sync(((uint)(cw_ptr[0] + 3))" in ln for ln in lines[i:])
    assert cuda_smem_bytes(spec, cfg) == cuda_smem_bytes(spec, pp) + 2 * 128 * 64 + 24
    with pytest.raises(ValueError, match="block count"):
        tensor_core_template(cfg).make_forward_tc(64, 64, 512, "bf16", gated, 1, cfg)


def test_wgmma_persistent_limits():
    """persistent is refused by name without the pingpong schedule, where the output cannot
    be staged in the Q rows (Dv > D) and with a block count below 1; with fuse_gate (the
    producer's gate warp loops over the block's query tiles too) it runs."""
    from gfwagen.backends.tvm_backend import tensor_core_template

    def why(cfg, D=64, Dv=64):
        return tensor_core_template(cfg).supports(D, Dv, "bf16", cfg)

    def with_(cfg, n):
        return KernelConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages,
                            extra=(*cfg.extra, ("persistent", n)))

    pp = _wgmma(128, 128, 3, "pingpong", "tma")
    assert why(with_(pp, True)) is None and why(with_(pp, 7)) is None
    fused = _wgmma(128, 128, 3, "pingpong", "tma", "fuse_gate")
    assert why(with_(fused, True)) is None
    for bad, dims in ((with_(_wgmma(128, 128, 3, "tma"), True), (64, 64)),
                      (with_(pp, True), (64, 128)), (with_(pp, 0), (64, 64))):
        assert "persistent" in why(bad, *dims)


@pytest.mark.parametrize("gated,fuse", [(True, True), (False, True), (True, False)])
def test_wgmma_pingpong_takes_the_gate_per_key_tile(gated, fuse):
    """The gated 128x128 pingpong forward takes the gate per key tile: the records of
    gate_sums.tile_records_fused, one bulk copy each (float32, the stage barriers count lane
    0's copies alone), or with config extra fuse_gate the raw log gates [B, T, Hq] float32,
    which its producer warp scans (warp shuffles; the barriers count 33 arrivals: its 32
    lanes and lane 0's copies). Each stage's bias slot holds the tile's total too (16 bytes
    more a stage). Ungated, the kernel is the one without the extra. The scan clamps the
    gates as gfwagen.gate does."""
    from gfwagen.backends.tvm_backend import cuda_smem_bytes, gate_input, tensor_core_template
    from gfwagen.gate import GATE_BOUND

    spec = KernelSpec("tvm", "fwd", 128, 128, 512, "bf16", gated, 1)
    cfg = _wgmma(128, 128, 3, "pingpong", "tma", *(("fuse_gate",) if fuse else ()))
    fused = gated and fuse
    assert gate_input(spec, cfg) == (None if not gated else "raw" if fuse else "tiles")
    assert tensor_core_template(cfg).GATE_BOUND == GATE_BOUND
    sums = _wgmma(128, 64, 3, "pingpong", "tma")  # the float64 sums (no square tiles)
    assert gate_input(spec, sums) == ("sums" if gated else None)
    assert cuda_smem_bytes(spec, cfg) == 2 * 128 * 128 + 3 * (2 * 128 * 256 + 4 * 132) + 56
    src = cuda_source(build_cuda(spec, cfg, arch="sm_90"))
    kernel = src[src.index('extern "C" __global__'):]
    assert ("__shfl_up_sync" in kernel) is fused
    assert ("(uint)33)" in kernel) is fused
    assert ("(uint)32)" in kernel) is False
    assert ("float* __restrict__ c_ptr" in kernel) is gated
    # the records' bulk copy (not a tensor-map one), 132 floats a key tile
    assert ("ptx_cp_async_bulk_g2s_cluster" in kernel) is (gated and not fuse)
    assert ("(uint)528" in kernel) is (gated and not fuse)


def test_wgmma_bias_mma_reads_the_biases_as_one_more_k_step():
    """Config extra bias_mma (bf16, the tile records): each key tile's record is its bias
    table (gfwagen.gate.tile_tables, whose size the template shares) and the total; the score
    product starts with a wgmma whose A comes from registers and whose B, the table, is
    MN-major without swizzle; no consumer loads or copies biases, so the loop's SASS is
    within a few instructions of the ungated one. It fits 227 KiB at head dim 128 with three
    128-key stages. fp16 and the other gate inputs are refused by name; ungated the kernel is
    the one without it."""
    from gfwagen.backends.tvm_backend import (
        CUDA_DYNAMIC_SMEM_LIMIT,
        cuda_smem_bytes,
        key_table,
        tensor_core_template,
    )
    from gfwagen.gate import key_table_bytes

    cfg = KernelConfig(128, 128, 8, 3, extra=(("bias_mma", True), ("pingpong", True),
                                              ("tma", True), ("wgmma", True)))
    tpl = tensor_core_template(cfg)
    assert tpl.key_table_bytes(128) == key_table_bytes(128) == 896
    spec = KernelSpec("tvm", "fwd", 128, 128, 512, "bf16", True, 1)
    assert key_table(spec, cfg) and not key_table(spec.replace(gated=False), cfg)
    assert cuda_smem_bytes(spec, cfg) == 2 * 128 * 128 + 3 * (2 * 128 * 256 + 896 + 16) + 56
    assert cuda_smem_bytes(spec, cfg) <= CUDA_DYNAMIC_SMEM_LIMIT
    src = cuda_source(build_cuda(spec, cfg, arch="sm_90"))
    kernel = src[src.index('extern "C" __global__'):]
    assert "(uint)912" in kernel  # the record's bulk copy: 896 + 16 bytes
    assert "1065369472" in src or "0x3f803f80" in src.lower()  # A's ones (bf16 pairs)
    for bad, dtype in ((cfg, "fp16"),
                       (_wgmma(128, 64, 3, "pingpong", "tma", "bias_mma"), "bf16")):
        assert "bias_mma" in tpl.supports(128, 128, dtype, bad)


@pytest.mark.parametrize("persistent", [False, True])
def test_wgmma_fuse_gate_writes_the_bias_tables_in_a_warp_of_its_own(persistent):
    """fuse_gate with bias_mma (plain and persistent): the kernel reads the raw gates, and
    the producer warpgroup's idle warps (one a stage) scan them (warp shuffles) into each
    stage's bias table as bf16 pairs, fenced for the score product's wgmma (the async proxy)
    before a tile's 32 lanes arrive on its stage's barrier (33 with the copying lane's); no
    record copy. The copying warp no longer scans: one warp shuffle loop in the whole
    kernel."""
    from gfwagen.backends.tvm_backend import (
        cuda_smem_bytes,
        gate_input,
        key_table,
        tensor_core_template,
    )

    def tile(*switches):
        cfg = _wgmma(128, 128, 3, "pingpong", "tma", "bias_mma", *switches)
        if not persistent:
            return cfg
        return KernelConfig(128, 128, 8, 3, extra=tuple(sorted({**dict(cfg.extra),
                                                                "persistent": 132}.items())))

    cfg, tiles = tile("fuse_gate"), tile()
    D = 64 if persistent else 128
    spec = KernelSpec("tvm", "fwd", D, D, 512, "bf16", True, 1)
    tpl_key_table = tensor_core_template(cfg).key_table(cfg)
    assert gate_input(spec, cfg) == "raw" and tpl_key_table and not key_table(spec, cfg)
    assert cuda_smem_bytes(spec, cfg) == cuda_smem_bytes(spec, tiles)  # the same slots
    src = cuda_source(build_cuda(spec, cfg, arch="sm_90"))
    kernel = src[src.index('extern "C" __global__'):]
    assert "float* __restrict__ c_ptr" in kernel and "(uint)33)" in kernel
    assert "ptx_cp_async_bulk_g2s_cluster" not in kernel and "(uint)912" not in kernel
    src_tiles = cuda_source(build_cuda(spec, tiles, arch="sm_90"))
    fences = [x[x.index('extern "C" __global__'):].count("fence_proxy_proxy_async") for x in
              (src, src_tiles)]
    assert fences[0] == fences[1] + 1  # the gate warp's, beside the output stores'
    assert kernel.count("__shfl_up_sync") == 5  # one scan, unrolled over 5 steps


def test_wgmma_gate_warps_one_or_one_a_stage():
    """Config extra gate_warps (fuse_gate's A/B switch): 1, or one warp a stage where there
    are three; elsewhere, and without fuse_gate, refused by name."""
    from gfwagen.backends.tvm_backend import tensor_core_template

    fused = _wgmma(128, 128, 3, "pingpong", "tma", "fuse_gate")

    def why(cfg, n):
        cfg = KernelConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages,
                           extra=(*cfg.extra, ("gate_warps", n)))
        return tensor_core_template(cfg).supports(128, 128, "bf16", cfg)

    assert why(fused, 1) is None and why(fused, 3) is None
    four = _wgmma(128, 128, 4, "pingpong", "tma", "fuse_gate")
    for cfg, n in ((fused, 2), (fused, 0), (four, 4), (_wgmma(128, 128, 3, "pingpong", "tma"), 1)):
        assert "gate_warps" in why(cfg, n)
    assert why(four, 1) is None


def _fused_persistent(**knobs):
    extra = {"pingpong": True, "tma": True, "wgmma": True, "bias_mma": True,
             "fuse_gate": True, "persistent": 132, **knobs}
    return KernelConfig(128, 128, 8, 3, extra=tuple(sorted(extra.items())))


def test_wgmma_gate_tma():
    """fuse_gate's option gate_tma: the raw gates by a bulk tensor copy of a 4-head box, two
    staging slots of 2 KB and their barriers (the kernel takes a rank-3 tensor map of the
    gates). It needs fuse_gate and bias_mma and one gate warp; refused otherwise, by name."""
    from gfwagen.backends.tvm_backend import cuda_smem_bytes, tensor_core_template

    spec = KernelSpec("tvm", "fwd", 64, 64, 512, "bf16", True, 1)
    plain, tma = _fused_persistent(), _fused_persistent(gate_tma=True)
    tpl = tensor_core_template(plain)
    assert cuda_smem_bytes(spec, tma) == cuda_smem_bytes(spec, plain) + 2 * 2048 + 16

    def kernel(cfg):
        src = cuda_source(build_cuda(spec, cfg, arch="sm_90"))
        return src[src.index('extern "C" __global__'):]

    k_plain, k_tma = kernel(plain), kernel(tma)
    three_d = "bulk_tensor_3d_shared__cluster_global"
    assert three_d in k_tma and three_d not in k_plain and "g_tmap" in k_tma
    no_fuse = dict(tma.extra)
    del no_fuse["fuse_gate"]
    bad = KernelConfig(128, 128, 8, 3, extra=tuple(sorted(no_fuse.items())))
    assert "gate_tma" in tpl.supports(64, 64, "bf16", bad)
    assert "gate_warps" in tpl.supports(64, 64, "bf16",
                                        _fused_persistent(gate_tma=True, gate_warps=3))


def test_forward_buffers_tile_records_without_the_fused_kernels(monkeypatch):
    """forward_buffers' "tiles" input where the fused launch does not run (a CPU tensor, or
    GFWAGEN_GATE_SUMS=torch): gfwagen.gate's torch records of the clamped gates."""
    from gfwagen.backends.tvm_backend import forward_buffers
    from gfwagen.gate import GATE_BOUND, tile_records, tile_tables

    g = -torch.rand(2, 300, 3)
    g[0, 5, 1] = -float("inf")
    q = torch.zeros(2, 300, 3, 64, dtype=torch.bfloat16)
    for env in ("fused", "torch"):
        monkeypatch.setenv("GFWAGEN_GATE_SUMS", env)
        rec, o, lse = forward_buffers(q, q, g, "tiles", 0.125, 128)
        assert torch.equal(rec, tile_records(g.clamp(-GATE_BOUND, GATE_BOUND), 128, 0.125))
        assert rec.shape == (2, 3, 3 * 132) and o.shape == q.shape and lse.shape == (2, 3, 300)
        rec = forward_buffers(q, q, g, "tiles", 0.125, 128, table=True)[0]
        assert torch.equal(rec, tile_tables(g.clamp(-GATE_BOUND, GATE_BOUND), 128, 0.125))


def test_kernel_buffers_give_each_kernel_its_gate_form(monkeypatch):
    """kernel_buffers (the benchmarks' own launches): the gate in the form the config's kernel
    reads, asked of the template: the bias tables with bias_mma, the plain records on square
    pingpong tiles, the raw gates with fuse_gate, the float64 sums elsewhere, and for an
    ungated spec the one-element placeholder."""
    from gfwagen.backends.tvm_backend import kernel_buffers
    from gfwagen.gate import GATE_BOUND, tile_records, tile_tables

    monkeypatch.setenv("GFWAGEN_GATE_SUMS", "torch")
    g = -torch.rand(1, 200, 2)
    q = torch.zeros(1, 200, 2, 128, dtype=torch.bfloat16)
    spec = KernelSpec("tvm", "fwd", 128, 128, 64, "bf16", True, 1)
    clamped = g.clamp(-GATE_BOUND, GATE_BOUND)
    cases = {("pingpong", "tma", "bias_mma"): tile_tables(clamped, 128, 0.5),
             ("pingpong", "tma"): tile_records(clamped, 128, 0.5)}
    for switches, want in cases.items():
        c, o, lse = kernel_buffers(q, q, g, spec, _wgmma(128, 128, 3, *switches), 0.5)
        assert torch.equal(c, want) and o.shape == q.shape and lse.shape == (1, 2, 200)
    raw = kernel_buffers(q, q, g, spec, _wgmma(128, 128, 3, "pingpong", "tma", "fuse_gate"),
                         0.5)[0]
    assert torch.equal(raw, g) and raw.is_contiguous()
    sums = kernel_buffers(q, q, g, spec, _wgmma(128, 64, 3, "pingpong", "tma"), 0.5)[0]
    assert sums.dtype == torch.float64 and sums.shape == (1, 2, 200)
    assert kernel_buffers(q, q, None, spec.replace(gated=False),
                          _wgmma(128, 128, 3, "pingpong", "tma"), 0.5)[0].numel() == 1


@pytest.mark.parametrize("tile", [(128, 64, "pingpong", "tma"), (128, 128, "tma")])
def test_wgmma_fuse_gate_needs_square_pingpong(tile):
    """fuse_gate elsewhere is refused by name (the tuner's space leaves it out there)."""
    from gfwagen.backends.tvm_backend import tensor_core_forward, tensor_core_template

    spec = KernelSpec("tvm", "fwd", 128, 128, 512, "bf16", True, 1)
    cfg = _wgmma(tile[0], tile[1], 3, *tile[2:], "fuse_gate")
    why = tensor_core_template(cfg).supports(128, 128, "bf16", cfg)
    assert why is not None and "fuse_gate" in why and not tensor_core_forward(spec, cfg)


def test_wgmma_pingpong_stores_directly_when_dv_exceeds_d():
    """A consumer stages its output in its own Q rows, which hold 64 x D values: with Dv > D
    it keeps the per-element stores."""
    spec = KernelSpec("tvm", "fwd", 64, 128, 512, "bf16", True, 1)
    src = cuda_source(build_cuda(spec, _wgmma(128, 64, 3, "pingpong", "tma"), arch="sm_90"))
    kernel = src[src.index('extern "C" __global__'):]
    assert re.search(r"\bo_ptr\[", kernel) and "bulk_tensor_4d_global" not in kernel


def test_wgmma_pingpong_needs_two_consumers_and_tma():
    from gfwagen.backends.tvm_backend import tensor_core_template

    for cfg in (_wgmma(64, 64, 3, "pingpong", "tma"), _wgmma(128, 64, 3, "pingpong")):
        why = tensor_core_template(cfg).supports(128, 128, "bf16", cfg)
        assert why is not None and "pingpong" in why


def test_wgmma_is_the_default_on_sm90_only():
    """The untuned GPU forward: wgmma on sm_90, mma.sync elsewhere (sm_80) and for head dims
    off the 64-column atoms; on this machine (no GPU) the arch must be named."""
    from gfwagen.backends import tvm_backend as tb

    WGMMA_CUDA_TC_CONFIG, default_cuda_config = tb.WGMMA_CUDA_TC_CONFIG, tb.default_cuda_config

    spec = KernelSpec("tvm", "fwd", 128, 128, 256, "bf16", True, 1)
    assert default_cuda_config(spec, "sm_90") == WGMMA_CUDA_TC_CONFIG
    assert not default_cuda_config(spec, "sm_80").get("wgmma")
    assert not default_cuda_config(spec.replace(head_dim=96, value_dim=96), "sm_90").get("wgmma")
    assert not default_cuda_config(spec.replace(head_dim=256, value_dim=256),
                                   "sm_90").get("wgmma")
    assert tb.wgmma_available(spec.replace(head_dim=256, value_dim=256), "sm_90")  # tunable
    assert not default_cuda_config(spec.replace(pass_="bwd_kv"), "sm_90").get("wgmma")
    src = cuda_source(build_cuda(spec, arch="sm_90"))
    assert "wgmma.mma_async" in src and "mma.sync" not in src
    if tb.device_arch() is None:
        assert not default_cuda_config(spec).get("wgmma")


def test_wgmma_joins_the_tuners_space_on_sm90(monkeypatch):
    """x_wgmma is searched where the GPU is an sm_90; a wgmma trial drops the mma.sync knobs
    and counts a warpgroup per 64 rows; wgmma off reads as the config without the knob."""
    from gfwagen.backends import tvm_backend
    from gfwagen.tuner import space

    spec = KernelSpec("tvm", "fwd", 128, 128, 256, "bf16", True, 1)
    monkeypatch.setattr(tvm_backend, "device_arch", lambda: "sm_80")
    assert "x_wgmma" not in space.params("tvm", "fwd", space.knobs_for(spec, gpu=True))
    monkeypatch.setattr(tvm_backend, "device_arch", lambda: "sm_90")
    p = space.params("tvm", "fwd", space.knobs_for(spec, gpu=True))
    assert p["x_wgmma"] == p["x_tma"] == p["x_pingpong"] == (False, True)
    vals = {"block_m": 128, "block_n": 128, "num_stages": 3, "x_sub_n": 32, "x_warp_m": 2,
            "x_q_smem": True, "x_wgmma": True, "x_tma": False}
    cfg = space.config_from_params(spec, vals, gpu=True)
    assert cfg == KernelConfig(128, 128, 8, 3, extra=(("wgmma", True),))
    assert space.feasible(spec, cfg)[0]
    # tma off reads as the config without it, though the default has it on
    assert space.config_params(spec, cfg, gpu=True)["x_tma"] is False
    with_tma = space.config_from_params(spec, {**vals, "x_tma": True}, gpu=True)
    assert with_tma == KernelConfig(128, 128, 8, 3, extra=(("tma", True), ("wgmma", True)))
    assert space.config_params(spec, with_tma, gpu=True)["x_tma"] is True
    off = space.config_from_params(spec, {**vals, "num_stages": 2, "x_wgmma": False,
                                          "x_tma": True}, gpu=True)
    # mma.sync has no bulk copies: its config drops tma
    assert off.get("wgmma") is None and off.get("warp_m") == 2 and off.get("tma") is None
    pp = space.config_from_params(spec, {**vals, "x_tma": True, "x_pingpong": True}, gpu=True)
    assert pp.get("pingpong") is True and space.resources(spec, pp)["threads"] == 384
    assert space.feasible(spec, pp)[0]
    # pingpong without its bulk copies is not a config the template runs
    assert not space.feasible(spec, space.config_from_params(
        spec, {**vals, "x_pingpong": True}, gpu=True))[0]
    assert space.default(spec, gpu=True) == tvm_backend.WGMMA_CUDA_TC_CONFIG
    configs = space.enumerate_configs(spec, gpu=True)
    wg = [c for c in configs if c.get("wgmma")]
    assert {(c.block_m, c.num_stages) for c in wg} == {(64, 3), (128, 3)}
    assert all(tvm_backend.tensor_core_forward(spec, c) for c in configs)
    assert len(configs) > len(wg) > 0
    # what the study enqueues (the default, --try, --refine) lies in the space's choices
    for c in (cfg, tvm_backend.WGMMA_CUDA_TC_CONFIG):
        enq = space.config_params(spec, c, gpu=True)
        assert enq["x_wgmma"] is True and all(v in p[n] for n, v in enq.items())
        assert space.config_from_params(spec, enq, gpu=True) == c


def test_fuse_gate_joins_the_tuners_space_for_gated_problems(monkeypatch):
    """x_fuse_gate is searched for gated problems where wgmma is; it stays in a config only
    with the pingpong schedule and square tiles (elsewhere it would mean nothing), and off it
    reads as the config without it."""
    from gfwagen.backends import tvm_backend
    from gfwagen.tuner import space

    monkeypatch.setattr(tvm_backend, "device_arch", lambda: "sm_90")
    spec = KernelSpec("tvm", "fwd", 128, 128, 512, "bf16", True, 1)
    p = space.params("tvm", "fwd", space.knobs_for(spec, gpu=True))
    assert p["x_fuse_gate"] == (False, True)
    assert "x_fuse_gate" not in space.params(
        "tvm", "fwd", space.knobs_for(spec.replace(gated=False), gpu=True))
    vals = {"block_m": 128, "block_n": 128, "num_stages": 3, "x_wgmma": True, "x_tma": True,
            "x_pingpong": True, "x_fuse_gate": True}
    cfg = space.config_from_params(spec, vals, gpu=True)
    assert cfg.get("fuse_gate") is True and tvm_backend.gate_input(spec, cfg) == "raw"
    assert space.feasible(spec, cfg)[0]
    assert space.config_params(spec, cfg, gpu=True)["x_fuse_gate"] is True
    off = space.config_from_params(spec, {**vals, "x_fuse_gate": False}, gpu=True)
    assert off.get("fuse_gate") is None
    for other in ({"block_n": 64}, {"x_pingpong": False}):
        assert space.config_from_params(spec, {**vals, **other}, gpu=True).get(
            "fuse_gate") is None


def test_bias_mma_joins_the_tuners_space_for_gated_bf16_problems(monkeypatch):
    """x_bias_mma is searched for gated bf16 problems where wgmma is (not fp16, whose pieces
    would overflow, nor ungated ones); a config keeps it only with the tile records or
    fuse_gate (pingpong, square tiles), and off it reads as the config without it."""
    from gfwagen.backends import tvm_backend
    from gfwagen.tuner import space

    monkeypatch.setattr(tvm_backend, "device_arch", lambda: "sm_90")
    spec = KernelSpec("tvm", "fwd", 128, 128, 4096, "bf16", True, 1)
    assert space.params("tvm", "fwd", space.knobs_for(spec, gpu=True))["x_bias_mma"] == \
        (False, True)
    for other in (spec.replace(gated=False), spec.replace(dtype="fp16")):
        assert "x_bias_mma" not in space.params("tvm", "fwd",
                                                space.knobs_for(other, gpu=True))
    vals = {"block_m": 128, "block_n": 128, "num_stages": 3, "x_wgmma": True, "x_tma": True,
            "x_pingpong": True, "x_bias_mma": True}
    cfg = space.config_from_params(spec, vals, gpu=True)
    assert cfg.get("bias_mma") is True and tvm_backend.key_table(spec, cfg)
    assert space.feasible(spec, cfg)[0]
    assert space.config_params(spec, cfg, gpu=True)["x_bias_mma"] is True
    for other in ({"block_n": 64}, {"x_pingpong": False}, {"x_bias_mma": False}):
        assert space.config_from_params(spec, {**vals, **other}, gpu=True).get(
            "bias_mma") is None
    # with fuse_gate the kernel's own gate warp writes the tables
    fused = space.config_from_params(spec, {**vals, "x_fuse_gate": True}, gpu=True)
    assert fused.get("bias_mma") is True and fused.get("fuse_gate") is True


def test_persistent_joins_the_tuners_space_with_pingpong(monkeypatch):
    """x_persistent is searched where wgmma is; a config keeps it (as true, the form the
    database shares across GPUs) only with the pingpong schedule, and off it reads as the
    config without it."""
    from gfwagen.backends import tvm_backend
    from gfwagen.tuner import space

    monkeypatch.setattr(tvm_backend, "device_arch", lambda: "sm_90")
    spec = KernelSpec("tvm", "fwd", 64, 64, 512, "bf16", False, 1)
    p = space.params("tvm", "fwd", space.knobs_for(spec, gpu=True))
    assert p["x_persistent"] == (False, True)
    vals = {"block_m": 128, "block_n": 128, "num_stages": 3, "x_wgmma": True, "x_tma": True,
            "x_pingpong": True, "x_persistent": True}
    cfg = space.config_from_params(spec, vals, gpu=True)
    assert cfg.get("persistent") is True and space.feasible(spec, cfg)[0]
    assert space.config_params(spec, cfg, gpu=True)["x_persistent"] is True
    assert space.config_from_params(spec, {**vals, "x_persistent": False},
                                    gpu=True).get("persistent") is None
    assert space.config_from_params(spec, {**vals, "x_pingpong": False},
                                    gpu=True).get("persistent") is None


def test_wgmma_forward_limits():
    """wgmma needs an sm_90 GPU and head dims on the 64-column swizzle atoms; a config it
    cannot run is refused by name, never swapped for another template."""
    from gfwagen.backends.tvm_backend import _cuda_config, cuda_arch, tensor_core_forward
    from gfwagen.tuner import space

    spec = KernelSpec("tvm", "fwd", 128, 128, 256, "bf16", True, 1)
    assert cuda_arch(_wgmma(), "sm_90") == "sm_90a"
    assert cuda_arch(KernelConfig(), "sm_80") == "sm_80"
    with pytest.raises(NotImplementedError, match="sm_90"):
        build_cuda(spec, _wgmma(), arch="sm_80")
    for bad in (_wgmma(bm=32), _wgmma(bm=256), _wgmma(bn=8), _wgmma(bn=512), _wgmma(ns=2)):
        assert not tensor_core_forward(spec, bad)
        with pytest.raises(NotImplementedError, match="unsupported"):
            _cuda_config(spec, bad)
        assert not space.feasible(spec, bad)[0]
    d96 = spec.replace(head_dim=96, value_dim=96)  # mma.sync takes it, wgmma does not
    assert tensor_core_forward(d96) and not tensor_core_forward(d96, _wgmma())
    with pytest.raises(NotImplementedError, match="multiples of 64"):
        build_cuda(d96, _wgmma())
    # two warpgroups of 128 threads; 128 x 256 keys at three stages passes 227 KiB
    assert space.resources(spec, _wgmma(128, 64))["threads"] == 256
    assert space.feasible(spec, _wgmma(128, 128))[0]
    assert not space.feasible(spec, _wgmma(128, 256))[0]


def test_wgmma_refuses_int32_offset_overflow():
    from gfwagen.backends.tvm_backend import check_wgmma_offsets

    check_wgmma_offsets(_wgmma(), 64, 8, 128, 128)
    check_wgmma_offsets(KernelConfig(), 1 << 20, 1 << 20, 256, 256)  # mma.sync: int64
    with pytest.raises(NotImplementedError, match="heads x head dim"):
        check_wgmma_offsets(_wgmma(), 1 << 15, 8, 256, 256)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_wgmma_forward_cubin_with_nvcc():
    """ptxas accepts the warpgroup MMAs (sm_90a)."""
    spec = KernelSpec("tvm", "fwd", 128, 128, 256, "bf16", True, 1)
    cubin = build_cuda_cubin(spec, _wgmma(64, 64), arch="sm_90a")
    assert cubin[:4] == b"\x7fELF"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("D,Dv,bn", [(128, 128, 128), (64, 64, 256)])
def test_wgmma_register_estimate_against_ptxas(tmp_path, D, Dv, bn):
    """The tuner's register estimate passes the widest tile ptxas keeps in registers (128
    keys at D = 128) and prunes one that spills kilobytes (256 keys)."""
    import re
    import subprocess

    from gfwagen.template_loader import load_template

    spec = KernelSpec("tvm", "fwd", D, Dv, 256, "bf16", True, 1)
    cfg = _wgmma(64, bn)
    src = tmp_path / "k.cu"
    src.write_text(cuda_source(build_cuda(spec, cfg, arch="sm_90a")))
    out = subprocess.run(["nvcc", "-arch=sm_90a", "-cubin", "-O3", "--use_fast_math",
                          "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), str(src)],
                         capture_output=True, text=True, check=True).stderr
    spill = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    fits = load_template("tvm", "fwd_wgmma").registers(D, Dv, cfg) <= 255
    assert (fits, spill == 0) in ((True, True), (False, False)), (fits, spill)


def _benchmark_module(name):
    """A script of benchmarks/, imported."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module(name)


def _run_with_templates(templates, code: str):
    """`code` run by a Python process of its own whose gfwagen reads `templates`
    (GFWAGEN_TEMPLATES is read once per process); fails the test if it fails."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "GFWAGEN_TEMPLATES": str(templates), "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_gate_parts_probes_still_fit_the_template(tmp_path):
    """benchmarks/gate_parts.py edits fwd_wgmma.py by text: its anchors still match once each,
    and the probed kernels build with every switch on: the ungated one's extra k step (one
    more score product per copy of the step) and the gated one's table step as a regular k
    step (no product reads the bias table) without the max's shift and the record's copy, or
    without the table step at all."""
    gate_parts = _benchmark_module("gate_parts")
    code = ("from gfwagen.spec import KernelSpec, KernelConfig\n"
            "from gfwagen.backends import tvm_backend as tb\n"
            "base = (('pingpong', True), ('tma', True), ('wgmma', True))\n"
            "for gated, extra in ((False, ()), (False, (('probe_kstep', 1),)),\n"
            "                     (True, (('bias_mma', True),)),\n"
            "                     (True, (('bias_mma', True), ('probe_table_as_k', True),\n"
            "                             ('probe_no_shift', True), ('probe_no_record', True))),\n"
            "                     (True, (('bias_mma', True), ('probe_no_table_step', True)))):\n"
            "    spec = KernelSpec('tvm', 'fwd', 128, 128, 512, 'bf16', gated, 1)\n"
            "    cfg = KernelConfig(128, 128, 8, 3, extra=base + extra)\n"
            "    src = tb.cuda_source(tb.build_cuda(spec, cfg, 'sm_90a'))\n"
            "    k = src[src.index('extern \"C\" __global__'):]\n"
            "    print(k.count('_mma_async_sync_aligned_m64n128k16'), k.count('_rs_'),\n"
            "          k.count('bulk_shared__cluster'), k.count('(m_r_ptr[0] + dl'))\n")
    out = _run_with_templates(gate_parts.probed_templates(tmp_path), code)
    # per kernel: score and P V products, those with A from registers (P V's, the table
    # step's), record copies, the running max's shifts
    plain, kstep, gated, probed, no_step = ([int(x) for x in ln.split()]
                                            for ln in out.stdout.strip().splitlines())
    steps = kstep[0] - plain[0]  # the score product's copies: one more k step each
    assert steps >= 2 and kstep[1:] == plain[1:] == [plain[1], 0, 0]
    assert gated[:2] == [kstep[0], plain[1] + steps] and gated[2] == 1 and gated[3] >= 1
    assert probed == [kstep[0], plain[1], 0, 0]
    assert no_step == [plain[0], plain[1], 1, gated[3]]  # the table step alone gone


def test_gate_parts_fused_gate_probes(tmp_path):
    """gate_parts.py's probes of the gate warps (fuse_gate with bias_mma) build and take out
    what they name: the proxy fence (one fewer), the raw gates' loads (none of c left), or
    all but the wait and the arrival (no scan either)."""
    gate_parts = _benchmark_module("gate_parts")
    code = ("from gfwagen.spec import KernelSpec, KernelConfig\n"
            "from gfwagen.backends import tvm_backend as tb\n"
            "import re\n"
            "base = (('bias_mma', True), ('fuse_gate', True), ('pingpong', True), ('tma', True),\n"
            "        ('wgmma', True))\n"
            "spec = KernelSpec('tvm', 'fwd', 128, 128, 512, 'bf16', True, 1)\n"
            "for probe in ((), (('probe_no_fence', True),), (('probe_no_gate_load', True),),\n"
            "              (('probe_gate_idle', True),)):\n"
            "    cfg = KernelConfig(128, 128, 8, 3, extra=base + probe)\n"
            "    src = tb.cuda_source(tb.build_cuda(spec, cfg, 'sm_90a'))\n"
            "    k = src[src.index('extern \"C\" __global__'):]\n"
            "    print(k.count('fence_proxy_proxy_async'), len(re.findall(r'\\bc_ptr\\[', k)),\n"
            "          k.count('__shfl_up_sync'))\n")
    out = _run_with_templates(gate_parts.probed_templates(tmp_path), code)
    fused, no_fence, no_load, idle = ([int(x) for x in ln.split()]
                                      for ln in out.stdout.strip().splitlines())
    assert fused[1] >= 1 and fused[2] == 5
    assert no_fence == [fused[0] - 1, fused[1], 5]
    assert no_load == [fused[0], 0, 5]
    assert idle == [fused[0], fused[1], 0]


def test_pp_phases_probes_still_fit_the_template(tmp_path):
    """benchmarks/pp_phases.py edits fwd_wgmma.py by text: its anchors still match, and the
    probed pingpong kernel builds with its timer reads, the SM id and the loop's wait counter
    (a process of its own: GFWAGEN_TEMPLATES is read once per process)."""
    pp_phases = _benchmark_module("pp_phases")
    code = ("from gfwagen.spec import KernelSpec, KernelConfig\n"
            "from gfwagen.backends import tvm_backend as tb\n"
            "spec = KernelSpec('tvm', 'fwd', 128, 128, 512, 'bf16', True, 1)\n"
            "cfg = KernelConfig(128, 128, 8, 3, extra=(('pingpong', True), ('tma', True), "
            "('wgmma', True)))\n"
            "src = tb.cuda_source(tb.build_cuda(spec, cfg, 'sm_90a'))\n"
            "print(src.count('gfwa_gt()'), src.count('%smid'), src.count('clock64()'))\n")
    out = _run_with_templates(pp_phases.probed_templates(tmp_path), code)
    # the timer's definition and seven reads (producer 2, consumer 5); the SM id's
    # definition; the cycle counter's helper (its name and body) and six reads (the waits for
    # key tiles, in next_biases, which the gated kernel inlines twice; the loop's length)
    assert out.stdout.split() == ["8", "1", "8"]


def test_cpu_target_asks_llvm_for_the_host_cpu_once(monkeypatch):
    import tvm

    from gfwagen.backends import tvm_backend

    asked = []
    monkeypatch.setattr(tvm.target.codegen, "llvm_get_system_cpu",
                        lambda: asked.append(1) or "x86-64-v3")
    tvm_backend._host_cpu.cache_clear()
    try:
        assert [tvm_backend._cpu_target("llvm")["mcpu"] for _ in range(3)] == ["x86-64-v3"] * 3
        assert tvm_backend._cpu_target({"kind": "llvm", "mcpu": "znver4"})["mcpu"] == "znver4"
        assert len(asked) == 1
    finally:
        tvm_backend._host_cpu.cache_clear()
