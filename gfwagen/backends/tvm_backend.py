"""Runs the TVM TensorIR templates (templates/tvm/{fwd,bwd}.py) on torch tensors.

CPU (target "llvm"): the templates are built with `tvm.compile(prim_func, target={"kind":
"llvm", "mcpu": <host cpu>})`, cached in-process per (KernelSpec, KernelConfig, target), and
called with torch tensors, which tvm_ffi takes zero-copy (DLPack underneath).
TVM's own thread pool parallelizes the outer loop (batch x heads x tiles); set TVM_NUM_THREADS
to bound it.

CUDA (target {"kind": "cuda", "arch": "sm_XY"}, picked from the tensors' device): the
forward in fp16/bf16 with head dims that are multiples of 16 is templates/tvm/fwd_cuda.py
(tensor cores: mma.sync, ldmatrix, cp.async); fp32 and the backward run the GPU variants of
fwd.py/bwd.py (one thread per tile row, CUDA cores). Kernels take the torch tensors through
DLPack and launch on torch's current stream (tvm_ffi.use_torch_stream). A TVM build without
a CUDA runtime (the PyPI wheel) still compiles: build_cuda() gives the CUDA C, and
build_cuda_cubin() runs nvcc on it; no GPU is needed for either.

Semantics and shapes are those of gfwagen.reference.reference_forward / reference_backward.
delta = rowsum(o * dO) is computed in torch (fp32) before the backward kernels; dlog_gate comes
from the kernels' row/column sums of dS through gfwagen.gate_sums.gate_grad (the fused Triton
kernel on CUDA, gfwagen.gate's torch version elsewhere); on CUDA the gate's prefix sums are
fused Triton kernels too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import threading
from typing import Any

import torch

from gfwagen import gate_sums, launch_plans
from gfwagen.gate import GATE_BOUND, prefix_sums, sanitize_log_gate, tile_records, tile_tables
from gfwagen.spec import SMALLEST_KERNEL_SCALE, KernelConfig, KernelSpec, stable_hash
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
# GPU tiles of the CUDA-core kernels: block_m (block_n for bwd_kv) threads per block, one row
# each.
DEFAULT_CUDA_CONFIG = KernelConfig(block_m=64, block_n=32, num_warps=2, num_stages=1)
# The tensor-core forward's default where WIDE_CUDA_TC_CONFIG (below) does not apply (head dims
# under 128, or too many registers): 4 warps of 16 rows, 64-key tiles in two softmax steps of
# 32, one stage (fastest of the 8 one-block-per-warp tiles at S1-S4 on the H200: at 168
# registers three blocks share an SM; 64-key steps need 181 and fit two). Its extras:
# sub_n (keys per softmax step), warp_m (16-row blocks per warp, 1 or 2) and q_smem (Q
# staged in shared memory); the warps are block_m / (16 warp_m), whatever num_warps says
# (the tuner leaves num_warps at its default), so block_m must be a multiple of 16 warp_m.
DEFAULT_CUDA_TC_CONFIG = KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=1,
                                      extra=(("sub_n", 32),))
# Two 16-row blocks per warp with Q re-read from shared memory: on the H200 at D = 128 the
# fastest of the tiles timed at S1-S4, 5-12% under DEFAULT_CUDA_TC_CONFIG; at D = 64 (S5) it
# was 15% slower (benchmarks/RESULTS.md, session 4); from D = 160 (Dv = D) its register
# estimate passes 255 and it would spill.
WIDE_CUDA_TC_CONFIG = KernelConfig(block_m=128, block_n=64, num_warps=4, num_stages=2,
                                   extra=(("q_smem", True), ("sub_n", 32), ("warp_m", 2)))
WIDE_MIN_HEAD_DIM = 128
# On sm_90 the warpgroup-MMA template (templates/tvm/fwd_wgmma.py): one warpgroup of 64 rows,
# 64-key tiles, its pipelined three-stage schedule; the fastest of its tiles at S1, S2 and S5
# on the H200 and within 9% of the fastest at S4, 1.2-1.3x faster than WIDE_CUDA_TC_CONFIG
# at S1-S4 (benchmarks/RESULTS.md, session 8).
# Its K, V and Q tiles come by Hopper's bulk tensor copies (extra `tma`): 8% faster at S1-S3
# and S5 and 4% at S4 at this tile, 15% at S4's 128x128 (session 17).
WGMMA_CUDA_TC_CONFIG = KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3,
                                    extra=(("tma", True), ("wgmma", True)))
# The default only up to head dims of 128, the ones run on the H200 with this schedule; at 256
# it spills 44 bytes (offline ptxas) and the tuner, which checks every candidate against the
# reference, may still pick it.
WGMMA_DEFAULT_MAX_DIM = 128
CUDA_DYNAMIC_SMEM_LIMIT = 227 * 1024  # per block on sm_90 (H100/H200)
CUDA_STATIC_SMEM_LIMIT = 48 * 1024
# fwd_wgmma.py adds the gate's key biases in the score product's units, (c_ref - c_j) / scale,
# which scale 0 (the gate alone decides) cannot express, and a smaller scale would overflow:
# below 2^-100 it runs at 2^-100 (same sign). Q K^T then moves a logit by |q.k| 2^-100,
# nothing at fp32's resolution, and a bias of the block's worst decay (128 rows at GATE_BOUND)
# stays finite (2^114 < 2^128); one further back, past 2^128, is -inf, as exp of it is 0.
# Ungated too: its masked scores are -inf, which a zero scale would make NaN (wgmma_scale).
WGMMA_ZERO_SCALE = SMALLEST_KERNEL_SCALE

_FUNC_NAMES = {"fwd": "gfwa_fwd", "bwd_kv": "gfwa_bwd_kv", "bwd_q": "gfwa_bwd_q"}
_CACHE: dict[tuple[str, str, str], Any] = {}
_FUNCTIONS: dict[tuple, Any] = {}  # _kernel's memo
_LOCK = threading.Lock()


def cuda_runtime_available() -> bool:
    """Whether this TVM build can launch CUDA kernels (not just compile them)."""
    return HAVE_TVM and bool(tvm.runtime.enabled("cuda"))


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
        target["mcpu"] = _host_cpu()
    return target


@functools.cache
def _host_cpu() -> str:
    # asked on every call, LLVM's host-CPU query cost a small CPU forward 72-92 us, 16-41% of
    # its time (RESULTS.md, session 52); the host does not change within a process
    return tvm.target.codegen.llvm_get_system_cpu()


def _fit(cfg: KernelConfig, T: int) -> KernelConfig:
    """Shrink tiles for short sequences (power of two >= 8)."""
    cap = max(8, 1 << max(0, (T - 1).bit_length()))
    bm, bn = min(cfg.block_m, cap), min(cfg.block_n, cap)
    if (bm, bn) == (cfg.block_m, cfg.block_n):
        return cfg
    return KernelConfig(bm, bn, cfg.num_warps, cfg.num_stages, cfg.extra)


def tensor_core_template(config: KernelConfig | None):
    """The tensor-core forward template a config names: templates/tvm/fwd_wgmma.py (Hopper's
    warpgroup MMA) when its extra `wgmma` is set, else templates/tvm/fwd_cuda.py (mma.sync).
    Both offer supports, smem_bytes, registers, gate_input and the factory
    make_forward_tc."""
    return load_template("tvm", "fwd_wgmma" if config is not None and config.get("wgmma")
                         else "fwd_cuda")


def tensor_core_forward(spec: KernelSpec, config: KernelConfig | None = None) -> bool:
    """Whether the GPU forward of `spec` runs on tensor cores (fwd_cuda.py or fwd_wgmma.py)."""
    if spec.pass_ != "fwd":
        return False
    config = config or DEFAULT_CUDA_TC_CONFIG
    return tensor_core_template(config).supports(spec.head_dim, spec.value_dim, spec.dtype,
                                                 config) is None


def gate_input(spec: KernelSpec, config: KernelConfig | None, template=None) -> str | None:
    """What the CUDA forward of (spec, config) reads for the gate (forward_buffers makes it):
    None ungated; "sums", the float64 prefix sums; "raw", the log gates themselves (config
    extra fuse_gate); "tiles", per key tile records (square-tile pingpong). See
    templates/tvm/fwd_wgmma.py's gate_input. template: another version of the tensor-core
    template to ask (benchmarks/tvm_ab.py)."""
    if not spec.gated:
        return None
    if config is None or not tensor_core_forward(spec, config):
        return "sums"
    template = template or tensor_core_template(config)
    if hasattr(template, "gate_input"):
        return template.gate_input(config)
    # a templates version from before gate_input (session 23's: fuse_gate or the sums)
    return "raw" if getattr(template, "fuses_gate_sums", lambda _cfg: False)(config) else "sums"


def key_table(spec: KernelSpec, config: KernelConfig, template=None, form=None) -> bool:
    """Whether the "tiles" gate input of (spec, config) is in the bias-table form
    (gfwagen.gate.tile_tables; config extra bias_mma, templates/tvm/fwd_wgmma.py's
    key_table). template: as gate_input's; form: gate_input's answer where the caller has
    it (tvm_forward, every call: about 4 us of host time)."""
    if (gate_input(spec, config, template) if form is None else form) != "tiles":
        return False
    template = template or tensor_core_template(config)
    return bool(getattr(template, "key_table", lambda _cfg: False)(config))


def cuda_arch(config: KernelConfig, arch: str) -> str:
    """The arch to build `config` for on a device of `arch`: wgmma needs the sm_90a feature set
    (sm_90 otherwise builds for the family-portable subset, which has no wgmma)."""
    if not config.get("wgmma"):
        return arch
    if arch not in ("sm_90", "sm_90a"):
        raise NotImplementedError(f"tvm cuda: config.extra wgmma needs an sm_90 GPU, not {arch}")
    return "sm_90a"


def device_arch() -> str | None:
    """'sm_XY' of the current CUDA device, None without one."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def wgmma_available(spec: KernelSpec, arch: str | None = None) -> bool:
    """Whether the warpgroup-MMA forward can run `spec` on `arch` (default: this machine's
    GPU): sm_90, fp16/bf16, head dims multiples of 64."""
    arch = arch or device_arch()
    return arch in ("sm_90", "sm_90a") and tensor_core_forward(spec, WGMMA_CUDA_TC_CONFIG)


def default_cuda_config(spec: KernelSpec, arch: str | None = None) -> KernelConfig:
    """The tensor-core forward's default (WGMMA_CUDA_TC_CONFIG on sm_90, else
    WIDE_CUDA_TC_CONFIG where it fits), or the CUDA-core tiles with the tile that sets the
    shared memory (block_n for fwd/bwd_q, block_m for bwd_kv) halved until the fp32 staging
    fits the 48 KiB of static shared memory (head dims above 64 need it). arch: the GPU's
    ('sm_90'), by default this machine's."""
    if wgmma_available(spec, arch) and \
            max(spec.head_dim, spec.value_dim) <= WGMMA_DEFAULT_MAX_DIM:
        return WGMMA_CUDA_TC_CONFIG
    if tensor_core_forward(spec):
        tc, wide = load_template("tvm", "fwd_cuda"), WIDE_CUDA_TC_CONFIG
        if spec.head_dim >= WIDE_MIN_HEAD_DIM and \
                tc.supports(spec.head_dim, spec.value_dim, spec.dtype, wide) is None and \
                tc.registers(spec.head_dim, spec.value_dim, wide) <= 255 and \
                cuda_smem_bytes(spec, wide) <= CUDA_DYNAMIC_SMEM_LIMIT:
            return wide
        return DEFAULT_CUDA_TC_CONFIG
    cfg = DEFAULT_CUDA_CONFIG
    field = "block_m" if spec.pass_ == "bwd_kv" else "block_n"
    while cuda_smem_bytes(spec, cfg) > CUDA_STATIC_SMEM_LIMIT and getattr(cfg, field) > 8:
        cfg = dataclasses.replace(cfg, **{field: getattr(cfg, field) // 2})
    return cfg


def make_primfunc(spec: KernelSpec, config: KernelConfig, target: str = "cpu"):
    """The template's PrimFunc for one spec (target 'cpu' or 'gpu' picks the schedule)."""
    args = (spec.head_dim, spec.value_dim, spec.window, spec.dtype, spec.gated, spec.group,
            config)
    if target == "gpu" and tensor_core_forward(spec, config):
        return tensor_core_template(config).make_forward_tc(*args)
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
        _FUNCTIONS.clear()


def _kernel(spec: KernelSpec, config: KernelConfig, target: dict):
    """The compiled kernel's function, memoized per (spec, config, target) on top of the
    module cache: the module lookup (two stable hashes and the build checks) and TVM's
    function lookup cost about 0.2 ms of host time per launch, which the 0.4 ms kernel at
    S5 did not hide."""
    key = (spec, config, json.dumps(target, sort_keys=True, default=str))
    fn = _FUNCTIONS.get(key)
    if fn is None:
        if target["kind"] == "cuda":
            mod = build_cuda(spec, config, target["arch"])
        else:
            mod = _compile(spec, config, target, "cpu")
        fn = _FUNCTIONS[key] = mod[_FUNC_NAMES[spec.pass_]]
    return fn


def _target(q: torch.Tensor, target) -> dict:
    """The build target for tensors like q: CUDA tensors build for their device's arch
    (whatever `target` says), CPU tensors for `target` (llvm)."""
    if q.is_cuda:
        if not cuda_runtime_available():
            raise NotImplementedError(
                "tvm backend on CUDA tensors needs a TVM build with its CUDA runtime (the PyPI "
                "wheel compiles CUDA but cannot launch it); use backend='triton' on the GPU")
        major, minor = torch.cuda.get_device_capability(q.device)
        return {"kind": "cuda", "arch": f"sm_{major}{minor}"}
    return _cpu_target(target)


def _launch(q: torch.Tensor, fn, *args) -> None:
    """Run a compiled kernel; on CUDA, on torch's current stream of q's device. A launch plan
    being recorded takes it as a step (launch_plans.foreign_launch): its tensors must be torch
    tensors for a replay to pass the replay's own."""
    call = functools.partial(_cuda_call, q.device, fn) if q.is_cuda else fn
    launch_plans.foreign_launch(call, *args)


def _cuda_call(device: torch.device, fn, *args) -> None:
    import tvm_ffi

    with torch.cuda.device(device), tvm_ffi.use_torch_stream():
        fn(*args)


def _cuda_config(spec: KernelSpec, config: KernelConfig | None,
                 arch: str | None = None) -> KernelConfig:
    """The config for the GPU template: the default for `arch` when None, else `config`
    itself (extras the template does not read, such as the CPU kernels' rm/vn, are ignored).
    A config the template cannot run is an error, not a silent substitute: the tuner times
    what it asks."""
    if config is None:
        return default_cuda_config(spec, arch)
    if spec.pass_ == "fwd" and tensor_core_forward(spec):
        why = tensor_core_template(config).supports(spec.head_dim, spec.value_dim,
                                                    spec.dtype, config)
        if why is not None:
            raise NotImplementedError(f"tvm cuda forward: unsupported {why}")
        return config
    smem = cuda_smem_bytes(spec, config)
    if smem > CUDA_STATIC_SMEM_LIMIT:
        raise NotImplementedError(
            f"tvm cuda {spec.pass_}: block_m={config.block_m}, block_n={config.block_n} need "
            f"{smem} B of static shared memory (> {CUDA_STATIC_SMEM_LIMIT})")
    return config


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
        raise NotImplementedError(f"tvm backend: dtype {q.dtype} not supported "
                                  f"(supported: {sorted(CPU_DTYPES.values())})")
    if q.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"tvm backend runs CPU and CUDA tensors, got {q.device}")
    for name, t in (("k", k), ("v", v), ("log_gate", log_gate)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if log_gate is not None and tuple(log_gate.shape) != (B, T, Hq):
        raise ValueError(f"log_gate must be [B, T, Hq] = {(B, T, Hq)}, got {tuple(log_gate.shape)}")


def _spec(pass_, q, k, v, log_gate, window) -> KernelSpec:
    T = q.shape[1]
    return KernelSpec("tvm", pass_, q.shape[3], v.shape[3], kernel_window(window, T),
                      CPU_DTYPES[q.dtype], log_gate is not None, q.shape[2] // k.shape[2])


def _gate_sums(log_gate, device):
    """[B, Hq, T] float64 prefix sums (a dummy when ungated). On CUDA the fused Triton kernels
    make them and apply the gate clamp as they load (gfwagen.dispatch leaves it to them)."""
    if log_gate is None:
        # never read (every template's loads of c are behind `if gated`): unfilled, so that a
        # launch plan can repeat the call (a fill is not replayed)
        return torch.empty(1, 1, 1, dtype=torch.float64, device=device)
    if gate_sums.use_fused(log_gate):
        return gate_sums.prefix_sums_fused(log_gate, bound=GATE_BOUND)
    return prefix_sums(log_gate)


def forward_buffers(q, v, log_gate, form: str | None = "sums", scale: float = 1.0,
                    block_n: int = 128, table: bool = False):
    """What a forward kernel reads besides q, k and v, and what it writes: the gate in the
    form gate_input names ("sums": _gate_sums; "raw": the log gates as float32 [B,T,Hq]
    contiguous; "tiles": gate_sums.tile_records_fused for the kernel's block_n and scale,
    clamped as the sums are, as bias tables where `table` (key_table)); an empty o [B,T,Hq,Dv]
    in q's dtype and an empty lse [B,Hq,T] float32."""
    B, T, Hq, _ = q.shape
    o = torch.empty(B, T, Hq, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    if log_gate is not None and form == "raw":
        # 16-byte aligned: gate_tma's tensor map needs it (a contiguous view may start anywhere)
        return _aligned16(log_gate.to(torch.float32).contiguous()), o, lse
    if log_gate is not None and form == "tiles":
        return _tile_records(log_gate, block_n, scale, table), o, lse
    return _gate_sums(log_gate, q.device), o, lse


def kernel_buffers(q, v, log_gate, spec: KernelSpec, config: KernelConfig, scale: float,
                   template=None):
    """forward_buffers for the CUDA kernel of (spec, config): the gate in the form it reads
    (gate_input, key_table; template: as theirs). For the benchmarks that launch a kernel of
    their own build."""
    form = gate_input(spec, config, template)
    return forward_buffers(q, v, log_gate, form, scale, config.block_n,
                           key_table(spec, config, template, form))


def _tile_records(log_gate, block_n, scale, table=False):
    """The "tiles" gate input: the fused Triton launch where gate_sums.use_fused says so (as
    _gate_sums), else gfwagen.gate's torch version of the clamped gates."""
    if gate_sums.use_fused(log_gate):
        return gate_sums.tile_records_fused(log_gate, block_n, scale, bound=GATE_BOUND,
                                            table=table)
    make = tile_tables if table else tile_records
    return make(sanitize_log_gate(log_gate), block_n, scale).to(log_gate.device)


def forward_launch_args(q, k, v, c, o, lse, scale) -> list:
    """A forward kernel's arguments in its parameter order (the benchmarks that launch a
    kernel of their own build use this too)."""
    # torch tensors, which tvm_ffi takes as they are: a launch plan replays with its own
    return [q, k, v, c, o, lse, scale]


# A persistent config built with no device at hand (offline) gets one block per SM of an
# H100 or H200
OFFLINE_SM_COUNT = 132


def resolve_persistent(config: KernelConfig, device=None) -> KernelConfig:
    """Config extra `persistent: true` (the tuner's and the database's form, the same on any
    GPU) as the block count the template takes: one block per SM of `device` (None:
    OFFLINE_SM_COUNT). Other configs unchanged."""
    if config.get("persistent") is not True:
        return config
    return _with_blocks(config, OFFLINE_SM_COUNT if device is None else
                        torch.cuda.get_device_properties(device).multi_processor_count)


@functools.lru_cache(maxsize=256)
def _with_extra(config: KernelConfig, name: str, value) -> KernelConfig:
    # memoized: the op resolves its config on every call (host time)
    return dataclasses.replace(config, extra=tuple({**dict(config.extra),
                                                    name: value}.items()))


def _with_blocks(config: KernelConfig, n: int) -> KernelConfig:
    return _with_extra(config, "persistent", n)


def wgmma_scale(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """(q, scale) as fwd_wgmma.py runs them: the scale at least WGMMA_ZERO_SCALE in size, and
    positive, Q negated where it was not (exact: scale * q.k = (-scale) * (-q).k). Its
    softmax takes each tile's max on the raw products, which a negative scale would turn
    into a minimum; that costs a copy of Q, for negative scales only."""
    if abs(scale) < WGMMA_ZERO_SCALE:
        scale = math.copysign(WGMMA_ZERO_SCALE, scale)
    if scale < 0:
        return -q, -scale
    return q, scale


def tvm_forward(q, k, v, log_gate=None, window=None, scale=None, config=None, target="llvm"):
    """GatedFWA forward through TVM, on the CPU (llvm) or on the CUDA device of q.
    Returns (o [B,T,Hq,Dv] q.dtype, lse [B,Hq,T] fp32)."""
    _require_tvm()
    _check_inputs(q, k, v, log_gate)
    B, T, Hq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    tgt = _target(q, target)
    spec = _spec("fwd", q, k, v, log_gate, window)
    cfg = resolve_persistent(_cuda_config(spec, config, tgt.get("arch")), q.device) \
        if q.is_cuda else _fit(config or DEFAULT_CPU_CONFIG, T)
    if q.is_cuda and cfg.get("gate_tma") and Hq % tensor_core_template(cfg).GATE_BOX_HEADS:
        cfg = _with_extra(cfg, "gate_tma", False)  # its copies' rows: 16 bytes of heads
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    tensor_cores = q.is_cuda and tensor_core_forward(spec, cfg)
    if tensor_cores and cfg.get("wgmma"):
        q, scale = wgmma_scale(q, scale)
    form = gate_input(spec, cfg) if q.is_cuda else "sums"
    c, o, lse = forward_buffers(q, v, log_gate, form, scale, cfg.block_n,
                                q.is_cuda and key_table(spec, cfg, form=form))
    if B * T * Hq == 0:
        return o, lse
    if tensor_cores:
        check_wgmma_offsets(cfg, Hq, k.shape[2], D, v.shape[3])
        q, k, v = (_aligned16(t) for t in (q, k, v))
    fn = _kernel(spec, cfg, tgt)
    _launch(q, fn, *forward_launch_args(q, k, v, c, o, lse, scale))
    return o, lse


def check_wgmma_offsets(config: KernelConfig, hq: int, hkv: int, d: int, dv: int) -> None:
    """The wgmma template's copies address a tile's rows (up to 256) in int32 steps of heads x
    head dim: refuse the problems where that overflows, by name."""
    if config.get("wgmma") and 256 * max(hq * d, hkv * max(d, dv)) >= 2**31:
        raise NotImplementedError(
            f"tvm wgmma forward: heads x head dim ({hq} x {d}, {hkv} x {dv}) too large for "
            "its int32 tile offsets; use a config without wgmma")


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it at a 16-byte aligned address: the tensor-core forward copies 16-byte
    rows with cp.async, which faults on a misaligned address (a contiguous view can start at
    any element)."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def tvm_backward(do, q, k, v, o, lse, log_gate=None, window=None, scale=None, config=None,
                 target="llvm", config_q=None):
    """GatedFWA backward through TVM, on the CPU (llvm) or on the CUDA device of q.
    Returns (dq, dk, dv, dlog_gate or None). `config` tiles the dk/dv kernel, `config_q`
    (default: `config`) the dq kernel."""
    _require_tvm()
    _check_inputs(q, k, v, log_gate)
    B, T, Hq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    tgt = _target(q, target)
    spec_kv = _spec("bwd_kv", q, k, v, log_gate, window)
    spec_q = _spec("bwd_q", q, k, v, log_gate, window)
    if q.is_cuda:
        cfg = _fit(_cuda_config(spec_kv, config), T)
        cfg_q = _fit(_cuda_config(spec_q, config_q or config), T)
    else:
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
    fkv = _kernel(spec_kv, cfg, tgt)
    fq = _kernel(spec_q, cfg_q, tgt)
    a = (q, k, v, c, do, lse, delta)  # torch tensors, which tvm_ffi takes as they are
    _launch(q, fkv, *a, dk, dv, dcol, scale)
    _launch(q, fq, *a, dq, drow, scale)
    dg = None
    if log_gate is not None:
        dg = gate_sums.gate_grad(drow, dcol).to(log_gate.dtype)
    return dq, dk, dv, dg


def cuda_smem_bytes(spec: KernelSpec, config: KernelConfig) -> int:
    """Shared memory of the GPU variant: dynamic for the tensor-core forward, else static
    (fp32 staging)."""
    D, Dv, BM, BN = spec.head_dim, spec.value_dim, config.block_m, config.block_n
    if tensor_core_forward(spec, config):
        return tensor_core_template(config).smem_bytes(D, Dv, config)
    if spec.pass_ == "fwd":
        n = D * BN + BN * Dv + BN
    elif spec.pass_ == "bwd_kv":
        n = D * BM + Dv * BM + 3 * BM
    else:
        n = D * BN + Dv * BN + BN
    return 4 * n


def build_cuda(spec: KernelSpec, config: KernelConfig | None = None, arch: str = "sm_90"):
    """Compile the GPU variant of the template for `spec` to a CUDA module.

    Returns the tvm runtime Executable: runnable where TVM has its CUDA runtime; else
    cuda_source() gives its CUDA C and build_cuda_cubin() compiles that with nvcc. Needs no
    GPU. Cached like the CPU builds."""
    _require_tvm()
    config = resolve_persistent(config or default_cuda_config(spec, arch))
    if spec.dtype not in CUDA_DTYPES:
        raise NotImplementedError(f"tvm cuda: dtype {spec.dtype!r} not supported")
    if tensor_core_forward(spec, config):
        smem = cuda_smem_bytes(spec, config)
        if smem > CUDA_DYNAMIC_SMEM_LIMIT:
            raise NotImplementedError(
                f"tvm cuda: forward tiles need {smem} B of shared memory "
                f"(> {CUDA_DYNAMIC_SMEM_LIMIT}); lower block_n or num_stages")
        return _compile(spec, config, {"kind": "cuda", "arch": cuda_arch(config, arch)}, "gpu")
    if spec.pass_ == "fwd" and spec.dtype != "fp32":
        tc = tensor_core_template(config)
        why = tc.supports(spec.head_dim, spec.value_dim, spec.dtype, config)
        if config.get("wgmma") or tensor_core_forward(spec):
            raise NotImplementedError(f"tvm cuda: tensor-core forward config: unsupported {why}")
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
    no GPU). nvcc runs with TVM's default flags, --use_fast_math included. That flushes
    denormals and approximates division, square roots and exp2, but keeps infinities: the
    wgmma forward masks with -inf, which its FFMA keeps and ex2.approx takes to 0; the other
    templates use finite mask sentinels and explicit selects."""
    from tvm.support import nvcc

    src = cuda_source(build_cuda(spec, config, arch))
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        return bytes(nvcc.compile_cuda(src, target_format="cubin", arch=arch, compiler="nvcc"))
