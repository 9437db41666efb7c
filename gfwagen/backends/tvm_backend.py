"""Runs the TVM TensorIR templates (templates/tvm/{fwd,bwd}.py) on torch tensors.

CPU (target "llvm"): the templates are built with `tvm.compile(prim_func, target={"kind":
"llvm", "mcpu": <host cpu>})`, cached in-process per (KernelSpec, KernelConfig, target), and
called with torch tensors passed zero-copy through DLPack (`tvm.runtime.from_dlpack`).
TVM's own thread pool parallelizes the outer loop (batch x heads x tiles); set TVM_NUM_THREADS
to bound it.

CUDA: `build_cuda(spec, config, arch)` only compiles the GPU variant of the same templates
(blockIdx/threadIdx binding, shared-memory tiles) to CUDA C; it needs no GPU. This TVM wheel
has no CUDA runtime, so tvm.compile stops at source; build_cuda_cubin() runs nvcc on it.
Running CUDA kernels on torch CUDA tensors is not wired up here.

Semantics and shapes are those of gfwagen.reference.reference_forward / reference_backward.
delta = rowsum(o * dO) is computed in torch (fp32) before the backward kernels; dlog_gate comes
from the kernels' row/column sums of dS through gfwagen.gate.gate_grad_from_sums.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

from gfwagen.gate import gate_grad_from_sums, prefix_sums
from gfwagen.spec import KernelConfig, KernelSpec, stable_hash
from gfwagen.template_loader import load_template

try:  # tvm is optional for the rest of gfwagen
    import tvm
    import tvm.runtime

    HAVE_TVM = True
except Exception:  # pragma: no cover - exercised only without tvm
    tvm = None
    HAVE_TVM = False

CPU_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
CUDA_DTYPES = ("fp32", "fp16", "bf16")
# CPU tiles (templates/tvm/cpu.py): block_m x block_n attention tiles; extra "rm" x "vn" is the
# micro-kernel's register accumulator (rm rows x vn fp32 columns; 4 x 64 = 16 AVX-512
# registers). Best of the sweep in benchmarks/cpu_bench.py on a 2-core AMD EPYC (Zen 4).
DEFAULT_CPU_CONFIG = KernelConfig(block_m=32, block_n=64, num_warps=1, num_stages=1,
                                  extra=(("rm", 4), ("vn", 64)))
# GPU tiles: block_m (block_n for bwd_kv) threads per block, one row each.
DEFAULT_CUDA_CONFIG = KernelConfig(block_m=64, block_n=32, num_warps=2, num_stages=1)
CUDA_STATIC_SMEM_LIMIT = 48 * 1024

_FUNC_NAMES = {"fwd": "gfwa_fwd", "bwd_kv": "gfwa_bwd_kv", "bwd_q": "gfwa_bwd_q"}
_CACHE: dict[tuple[str, str, str], Any] = {}
_LOCK = threading.Lock()


def _require_tvm():
    if not HAVE_TVM:
        raise ImportError("the tvm backend needs apache-tvm (>= 0.27) installed")


def kernel_window(window: int | None, T: int) -> int:
    """Compile-time window: 0 (full causal) when the window covers the whole sequence."""
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    return 0 if window is None or int(window) >= T else int(window)


def _cpu_target(target) -> dict:
    """Normalize "llvm" / {"kind": "llvm", ...} to a dict; default mcpu = the host's cpu."""
    if isinstance(target, str):
        if target.strip() != "llvm":
            raise NotImplementedError(
                f"tvm backend runs only on target 'llvm' (CPU); got {target!r}. TVM 0.27 "
                "takes targets as dicts, e.g. {'kind': 'llvm', 'mcpu': 'znver4'}; use "
                "build_cuda() to compile for CUDA.")
        target = {"kind": "llvm"}
    if isinstance(target, tvm.target.Target):
        target = dict(target.export())
    target = dict(target)
    if target.get("kind") != "llvm":
        raise NotImplementedError(f"tvm backend runs only on llvm targets, got {target}")
    if "mcpu" not in target:
        target["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
    return target


def _fit(cfg: KernelConfig, T: int) -> KernelConfig:
    """Shrink tiles for short sequences (power of two >= 8)."""
    cap = max(8, 1 << max(0, (T - 1).bit_length()))
    bm, bn = min(cfg.block_m, cap), min(cfg.block_n, cap)
    if (bm, bn) == (cfg.block_m, cfg.block_n):
        return cfg
    return KernelConfig(bm, bn, cfg.num_warps, cfg.num_stages, cfg.extra)


def make_primfunc(spec: KernelSpec, config: KernelConfig, target: str = "cpu"):
    """The template's PrimFunc for one spec (target 'cpu' or 'gpu' picks the schedule)."""
    args = (spec.head_dim, spec.value_dim, spec.window, spec.dtype, spec.gated, spec.group,
            config)
    if spec.pass_ == "fwd":
        return load_template("tvm", "fwd").make_forward(*args, target=target)
    bwd = load_template("tvm", "bwd")
    if spec.pass_ == "bwd_kv":
        return bwd.make_backward_kv(*args, target=target)
    return bwd.make_backward_q(*args, target=target)


def _compile(spec: KernelSpec, config: KernelConfig, target: dict, kind: str):
    key = (spec.key(), config.key(), stable_hash(target))
    with _LOCK:
        mod = _CACHE.get(key)
    if mod is None:
        mod = tvm.compile(make_primfunc(spec, config, kind), target=target)
        with _LOCK:
            _CACHE[key] = mod
    return mod


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def _kernel(spec: KernelSpec, config: KernelConfig, target: dict):
    return _compile(spec, config, target, "cpu")[_FUNC_NAMES[spec.pass_]]


def _dl(t: torch.Tensor):
    return tvm.runtime.from_dlpack(t)


def _check_inputs(q, k, v, log_gate):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, T, H, D]")
    B, T, Hq, D = q.shape
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T) or k.shape[2] != v.shape[2]:
        raise ValueError(f"shape mismatch q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if k.shape[3] != D:
        raise ValueError("q and k must share the head dim")
    if Hq % k.shape[2]:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError("q, k, v must share a dtype")
    if q.dtype not in CPU_DTYPES:
        raise NotImplementedError(f"tvm backend: dtype {q.dtype} not supported on llvm "
                                  f"(supported: {sorted(CPU_DTYPES.values())})")
    if q.device.type != "cpu":
        raise NotImplementedError("tvm backend runs CPU tensors only (target llvm); "
                                  "build_cuda() only compiles the CUDA kernels")
    if log_gate is not None and tuple(log_gate.shape) != (B, T, Hq):
        raise ValueError(f"log_gate must be [B, T, Hq] = {(B, T, Hq)}, got {tuple(log_gate.shape)}")


def _spec(pass_, q, k, v, log_gate, window) -> KernelSpec:
    T = q.shape[1]
    return KernelSpec("tvm", pass_, q.shape[3], v.shape[3], kernel_window(window, T),
                      CPU_DTYPES[q.dtype], log_gate is not None, q.shape[2] // k.shape[2])


def _gate_sums(log_gate, device):
    if log_gate is None:
        return torch.zeros(1, 1, 1, dtype=torch.float64, device=device)
    return prefix_sums(log_gate)  # [B, Hq, T] float64


def tvm_forward(q, k, v, log_gate=None, window=None, scale=None, config=None, target="llvm"):
    """GatedFWA forward on CPU through TVM. Returns (o [B,T,Hq,Dv] q.dtype, lse [B,Hq,T] fp32)."""
    _require_tvm()
    _check_inputs(q, k, v, log_gate)
    B, T, Hq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    tgt = _cpu_target(target)
    cfg = _fit(config or DEFAULT_CPU_CONFIG, T)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    c = _gate_sums(log_gate, q.device)
    o = torch.empty(B, T, Hq, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    if B * T * Hq == 0:
        return o, lse
    fn = _kernel(_spec("fwd", q, k, v, log_gate, window), cfg, tgt)
    fn(_dl(q), _dl(k), _dl(v), _dl(c), _dl(o), _dl(lse), scale)
    return o, lse


def tvm_backward(do, q, k, v, o, lse, log_gate=None, window=None, scale=None, config=None,
                 target="llvm", config_q=None):
    """GatedFWA backward on CPU through TVM. Returns (dq, dk, dv, dlog_gate or None).
    `config` tiles the dk/dv kernel, `config_q` (default: `config`) the dq kernel."""
    _require_tvm()
    _check_inputs(q, k, v, log_gate)
    B, T, Hq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    tgt = _cpu_target(target)
    cfg = _fit(config or DEFAULT_CPU_CONFIG, T)
    cfg_q = _fit(config_q or config or DEFAULT_CPU_CONFIG, T)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    do = do.to(q.dtype).contiguous()
    c = _gate_sums(log_gate, q.device)
    lse = lse.to(torch.float32).contiguous()
    delta = (o.to(torch.float32) * do.to(torch.float32)).sum(-1).transpose(1, 2).contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    drow = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    dcol = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    if B * T * Hq == 0:
        dg = None if log_gate is None else torch.zeros_like(log_gate)
        return dq, dk, dv, dg
    fkv = _kernel(_spec("bwd_kv", q, k, v, log_gate, window), cfg, tgt)
    fq = _kernel(_spec("bwd_q", q, k, v, log_gate, window), cfg_q, tgt)
    a = [_dl(x) for x in (q, k, v, c, do, lse, delta)]
    fkv(*a, _dl(dk), _dl(dv), _dl(dcol), scale)
    fq(*a, _dl(dq), _dl(drow), scale)
    dg = None
    if log_gate is not None:
        dg = gate_grad_from_sums(drow, dcol).to(log_gate.dtype)
    return dq, dk, dv, dg


def cuda_smem_bytes(spec: KernelSpec, config: KernelConfig) -> int:
    """Static shared memory of the GPU variant (fp32 staging)."""
    D, Dv, BM, BN = spec.head_dim, spec.value_dim, config.block_m, config.block_n
    if spec.pass_ == "fwd":
        n = D * BN + BN * Dv + BN
    elif spec.pass_ == "bwd_kv":
        n = D * BM + Dv * BM + 3 * BM
    else:
        n = D * BN + Dv * BN + BN
    return 4 * n


def build_cuda(spec: KernelSpec, config: KernelConfig | None = None, arch: str = "sm_90"):
    """Compile (only) the GPU variant of the template for `spec` to a CUDA module.

    Returns the tvm runtime Executable; cuda_source() gives its CUDA C, build_cuda_cubin()
    compiles that with nvcc. Needs no GPU. Cached like the CPU builds."""
    _require_tvm()
    config = config or DEFAULT_CUDA_CONFIG
    if spec.dtype not in CUDA_DTYPES:
        raise NotImplementedError(f"tvm cuda: dtype {spec.dtype!r} not supported")
    threads = config.block_n if spec.pass_ == "bwd_kv" else config.block_m
    if threads > 1024:
        raise NotImplementedError(f"tvm cuda: {threads} threads per block (one per tile row) "
                                  "exceeds 1024; lower block_m/block_n")
    smem = cuda_smem_bytes(spec, config)
    if smem > CUDA_STATIC_SMEM_LIMIT:
        raise NotImplementedError(
            f"tvm cuda: {spec.pass_} tiles need {smem} B of static shared memory "
            f"(> {CUDA_STATIC_SMEM_LIMIT}); dynamic shared memory is not implemented, "
            "lower block_m/block_n")
    target = {"kind": "cuda", "arch": arch}
    return _compile(spec, config, target, "gpu")


def cuda_source(executable) -> str:
    """The CUDA C that build_cuda generated (TVM 0.27 without a CUDA runtime keeps the device
    code as source in a fallback module; no binary is produced at build time)."""
    return executable.mod.imports[0].inspect_source("")


def build_cuda_cubin(spec: KernelSpec, config: KernelConfig | None = None,
                     arch: str = "sm_90") -> bytes:
    """build_cuda, then compile the generated CUDA C to a cubin with nvcc (needs nvcc on PATH,
    no GPU). nvcc runs with TVM's default flags, --use_fast_math included: the templates use
    finite mask sentinels and explicit selects, so no inf arithmetic is relied on."""
    from tvm.support import nvcc

    src = cuda_source(build_cuda(spec, config, arch))
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        return bytes(nvcc.compile_cuda(src, target_format="cubin", arch=arch, compiler="nvcc"))
