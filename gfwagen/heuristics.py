"""Built-in default configs: what runs when the tuning database has nothing for a problem.

Chosen from the shape of the work, not measured here: the forward wants a tall query tile
(it is reused across the whole window), dk/dv a tall key tile and dq a tall query tile (the
tile that stays in registers). Head dims above 128 (192 included) halve the resident tile to
stay within registers. Under the Triton interpreter everything is small, since it runs on the CPU.
"""

from __future__ import annotations

import os

from gfwagen.spec import KernelConfig, KernelSpec


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def padded_head_dim(spec: KernelSpec) -> int:
    """The Triton kernels' tile width: the head dims' next power of two (96 runs as 128, 192
    as 256)."""
    return 1 << (max(spec.head_dim, spec.value_dim) - 1).bit_length()


def default_config(spec: KernelSpec, seqlen: int | None = None) -> KernelConfig:
    if interpreting() or spec.backend == "reference":
        return KernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    # Sized on the padded width: 96 takes 128's configs, 192 the big ones.
    d = padded_head_dim(spec)
    big = d > 128
    if spec.dtype == "fp32" and spec.pass_ in ("fwd", "bwd_kv", "bwd_q"):
        # fp32 inputs take ieee dots, which run on the FMA units with both operands held in
        # registers: the tensor-core tiles below spill 2-32 KB per thread there and take up
        # to 51 s each to compile. These spill nothing (offline sm_90 sweep, gated windows
        # 1, 256 and 333 with GQA, and the ungated causal kernel, which spills soonest);
        # register allocation is uneven enough there that neighbouring tiles did spill.
        if spec.pass_ == "fwd":
            bm, bn = (32, 16) if big else (16, 64) if d == 128 else (32, 32)
        elif spec.pass_ == "bwd_kv":
            bm, bn = (16, 16) if big else (16, 32)
        else:
            bm, bn = 32, 16
        return KernelConfig(block_m=bm, block_n=bn, num_warps=4, num_stages=2)
    if spec.pass_ == "fwd":
        if big:
            return KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
        return KernelConfig(block_m=128, block_n=64, num_warps=8 if d >= 128 else 4,
                            num_stages=3)
    if spec.pass_ == "bwd_ds":
        # the stored-dS backward (triton_backend.stored_configs); it runs only where the
        # database measured it faster than bwd_kv + bwd_q, so this is the tuner's start (the
        # tuner's switches, tma among them, are off in a default)
        return KernelConfig(block_m=64, block_n=64 if not big else 32, num_warps=4,
                            num_stages=2, extra=(("q_stages", 3), ("q_tma", True),
                                                 ("q_warps", 4)))
    if spec.pass_ == "bwd_kv":
        if big:
            # 32x64 ran 2.2-2.4x slower than this at head dim 256, windows 256-4096 (H200,
            # session 14: the tuner's first trial against its best)
            return KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
        return KernelConfig(block_m=64, block_n=128, num_warps=8, num_stages=2)
    if big:
        return KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    # four warps at head dim 64: eight ran 1.28-1.41x slower (H200, session 14, the same
    # comparison at windows 256-8192)
    return KernelConfig(block_m=128, block_n=64, num_warps=8 if d >= 128 else 4, num_stages=2)
