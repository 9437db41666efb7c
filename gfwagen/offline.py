"""Compiles the Triton templates for a GPU architecture on a machine without a GPU.

Triton's compiler and the ptxas it ships need no device, so the whole pipeline (TTIR, TTGIR,
PTX, cubin) runs anywhere: CI uses it to prove every template compiles for Hopper and uses its
matrix instructions (wgmma), and it reports what a config costs in shared memory, registers
and spills before any GPU time is spent on it.

Must run in a process where TRITON_INTERPRET is not set (the interpreter replaces the kernels
at import); `compile_pass` refuses otherwise.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
from pathlib import Path

from gfwagen.gate import GATE_CHUNK
from gfwagen.spec import DTYPES, KernelConfig, KernelSpec

_KERNELS = {  # pass -> (template, kernel name)
    "fwd": ("fwd", "gfwa_fwd_kernel"),
    "bwd_kv": ("bwd", "gfwa_bwd_dkdv_kernel"),
    "bwd_q": ("bwd", "gfwa_bwd_dq_kernel"),
    "bwd_ds": ("bwd", "gfwa_bwd_dkdv_kernel"),  # its dk/dv kernel, storing dS
}
_TRITON_DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
# Pointer parameters whose element type does not follow q's dtype.
_INT_PARAMS = {"T", "H", "HKV", "n_chunks", "n_slots"}
# KB, the forward's key-bias pieces, follows q's dtype.
_FIXED_POINTERS = {"CL": "*fp32", "CB": "*fp64", "LSE": "*fp32", "DELTA": "*fp32",
                   "DCOL": "*fp32", "DROW": "*fp32", "SEG_START": "*i32", "SEG_END": "*i32"}


@dataclasses.dataclass(frozen=True)
class OfflineBuild:
    arch: str
    ptx: str
    cubin: bytes
    shared_bytes: int
    registers: int | None
    stack_bytes: int | None  # per-thread stack frame: register spills live here

    @property
    def uses_wgmma(self) -> bool:
        return "wgmma.mma_async" in self.ptx

    def performance_warnings(self) -> list[str]:
        """ptxas's "Potential Performance Loss" notes on this build's PTX. The one that
        matters on Hopper is C7515: every wgmma of the kernel serialized (each waits for the
        one before), which cost the dk/dv kernel 22-27% until it ran its tiles in one loop."""
        return [ln for ln in _ptxas_log(self.ptx, self.arch) if "Performance Loss" in ln]


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _key_bias(spec: KernelSpec, cfg: KernelConfig, varlen: bool) -> bool:
    """Whether the forward reads the gate as key biases, as triton_backend.reads_key_bias
    decides it for a launch with a positive scale."""
    from gfwagen.backends.triton_backend import takes_key_bias

    return (spec.pass_ == "fwd" and spec.gated and not varlen
            and takes_key_bias(DTYPES[spec.dtype], cfg, cfg.block_m, cfg.block_n))


def _constexprs(spec: KernelSpec, cfg: KernelConfig, varlen: bool = False) -> dict:
    # HEAD_D_PAD/HEAD_DV_PAD: as the launchers pass them (triton.next_power_of_2).
    key_bias = _key_bias(spec, cfg, varlen)
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_D=spec.head_dim,
                HEAD_DV=spec.value_dim, HEAD_D_PAD=_next_pow2(spec.head_dim),
                HEAD_DV_PAD=_next_pow2(spec.value_dim), WINDOW=spec.window,
                GATED=spec.gated and not key_bias, KEY_BIAS=key_bias,
                GROUP=spec.group,
                GATE_CHUNK=GATE_CHUNK, DOT_PREC="ieee" if spec.dtype == "fp32" else "tf32",
                PREFETCH_GATE=bool(cfg.get("prefetch_gate", False)), VARLEN=varlen,
                USE_TMA=bool(cfg.get("tma", False)),
                SPLIT_BOUNDS=_split_bounds(spec, cfg, varlen),
                # the per-position vectors through descriptors, as the launchers pass it for
                # T % 4 == 0 (the divisibility hints below assume T % 16 == 0)
                VEC_TMA=_vector_tma(spec, cfg),
                STORE_DS=spec.pass_ == "bwd_ds",
                # the forward, as launched with a positive scale
                RAW_MAX=not spec.gated or key_bias,
                WIDE_OFFSETS=False)


def _vector_tma(spec: KernelSpec, cfg: KernelConfig) -> bool:
    """As the launchers pass VEC_TMA: the dk/dv kernel's vectors come in query tiles, the dq
    kernel's in key tiles (common.vectors_tma_usable; no minimum in older templates)."""
    from gfwagen.template_loader import load_template

    if not cfg.get("tma", False) or not (spec.gated or spec.pass_ in ("bwd_kv", "bwd_ds")):
        return False
    least = getattr(load_template("triton", "common"), "VECTOR_TMA_MIN_BLOCK", 0)
    return (cfg.block_m if spec.pass_ in ("bwd_kv", "bwd_ds") else cfg.block_n) >= least


def _split_bounds(spec: KernelSpec, cfg: KernelConfig, varlen: bool) -> bool:
    """As the launchers pass it (common.split_bounds; False for older templates, which lack
    it and the knob)."""
    from gfwagen.template_loader import load_template

    split = getattr(load_template("triton", "common"), "split_bounds", None)
    return bool(split and not cfg.get("full_masks", False)
                and split(spec.window, cfg.block_m, cfg.block_n, varlen))


def _signature(params: list[str], spec: KernelSpec, constexprs: dict) -> dict:
    sig = {}
    for p in params:
        if p in constexprs:
            sig[p] = "constexpr"
        elif p == "CB" and constexprs.get("KEY_BIAS"):  # the key-bias shifts
            sig[p] = "*fp32"
        elif p in _FIXED_POINTERS:
            sig[p] = _FIXED_POINTERS[p]
        elif p == "sm_scale":
            sig[p] = "fp32"
        elif p in _INT_PARAMS or p.startswith("stride_"):
            sig[p] = "i32"
        else:  # the tensors that follow q's dtype
            sig[p] = _TRITON_DTYPES[spec.dtype]
    return sig


# What Triton's launcher specializes at run time as divisible by 16 (tt.divisibility) for the
# calls that matter: torch's allocations (16-byte aligned), contiguous [B, T, H, D] strides with
# D a multiple of 16, and T, H multiples of 16. Without these hints the compiler can prove no
# alignment, and loads come out as 2-byte scalars with no async copies: nothing like the
# kernel that runs.
_DIVISIBLE_INTS = {"T", "H", "HKV"}


def _attrs(params: list[str], signature: dict) -> dict:
    return {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
            if signature[p].startswith("*") or p.startswith("stride_") or p in _DIVISIBLE_INTS}


def _triton_tool(name: str) -> Path:
    """A CUDA binary Triton ships (ptxas, cuobjdump): the ones its own compiles use."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _scratch(suffix: str) -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"gfwagen-{os.getpid()}{suffix}"


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    """Registers and stack bytes per thread, from the cuobjdump Triton ships (None if absent)."""
    tool = _triton_tool("cuobjdump")
    if not tool.exists():
        return None, None
    path = _scratch(".cubin")
    path.write_bytes(cubin)
    try:
        out = subprocess.run([str(tool), "--dump-resource-usage", str(path)],
                             capture_output=True, text=True, timeout=60).stdout
    finally:
        path.unlink(missing_ok=True)
    reg, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (int(reg.group(1)) if reg else None, int(stack.group(1)) if stack else None)


def _ptxas_log(ptx: str, arch: str) -> list[str]:
    """ptxas -v's notes for `ptx`, from the ptxas Triton ships (compiled again: Triton
    keeps no log of its own run)."""
    # wgmma needs the architecture-specific target (sm_90a), as Triton compiles it
    target = arch + "a" if arch == "sm_90" else arch
    src, out = _scratch(".ptx"), _scratch(".o")
    src.write_text(ptx)
    try:
        proc = subprocess.run([str(_triton_tool("ptxas")), f"-arch={target}", "-v", str(src),
                               "-o", str(out)], capture_output=True, text=True, timeout=300)
    finally:
        src.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    return proc.stderr.splitlines()


def compile_pass(spec: KernelSpec, cfg: KernelConfig, arch: str = "sm_90",
                 varlen: bool = False) -> OfflineBuild:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("offline compilation needs TRITON_INTERPRET unset")
    if spec.backend != "triton":
        raise ValueError(f"offline compilation is for the Triton backend, got {spec.backend}")
    import triton
    from triton.backends.compiler import GPUTarget

    from gfwagen.template_loader import load_template

    template, name = _KERNELS[spec.pass_]
    kernel = getattr(load_template("triton", template), name)
    params = list(inspect.signature(kernel.fn).parameters)
    # Only the knobs this template declares (older templates, as kept for comparisons,
    # lack newer ones).
    constexprs = {k: v for k, v in _constexprs(spec, cfg, varlen).items() if k in params}
    signature = _signature(params, spec, constexprs)
    src = triton.compiler.ASTSource(
        fn=kernel, signature=signature,
        constexprs={(params.index(k),): v for k, v in constexprs.items()},
        attrs=_attrs(params, signature))
    cc = int(arch.removeprefix("sm_"))
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.get("maxnreg", False):  # the forward's launch passes it the same way
        options["maxnreg"] = int(cfg.get("maxnreg"))
    out = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    regs, spills = _resources(out.asm["cubin"])
    return OfflineBuild(arch, out.asm["ptx"], out.asm["cubin"], out.metadata.shared, regs,
                        spills)
