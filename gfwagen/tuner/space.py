"""The search space per backend and pass, and a resource model that prunes it.

Triton: block_m, block_n in {16, ..., 256} (powers of two dividing the gate chunk),
num_warps in {4, 8}, num_stages in {1, ..., 5}, plus the template switches named in `knobs`
(KNOBS: "tma", Hopper tensor-descriptor loads; "prefetch_gate", the next tile's gate values
loaded one iteration ahead, searched only for gated problems; "full_masks", every bound
tested on every masked tile as before the one-bound masks, for the forward and dq only;
"maxnreg", the forward's registers per thread capped, KNOB_CHOICES; "bias_mma", the gated
bf16 forward's gate read as key biases inside its score product, square tiles only).
TVM: block_m, block_n (one thread per tile row in the GPU's CUDA-core kernels, loop tiles on
the CPU) plus whatever knobs tvm_backend declares in TUNABLE_EXTRAS ({name: choices}); the
tensor-core forward on a GPU (bf16/fp16) adds num_stages (its cp.async stages), sub_n (keys
per softmax step), warp_m (16-row blocks per warp) and q_smem (Q staged in shared memory),
through the pseudo-knob TENSOR_CORE that knobs_for adds for it; on sm_90 its warpgroup-MMA
template adds wgmma, tma, pingpong, persistent and, for gated problems, fuse_gate (the gate's
prefix sums made inside the pingpong kernel) and, bf16 only, bias_mma (the keys' biases as one
more k step of the score product). TVM's backward takes one
config for both kernels, so it is tuned as pass "bwd_kv" only.

The resource model is an estimate, deliberately conservative (it only has to keep the
sampler out of configs that cannot launch or would spill heavily): shared memory of the
pipelined tiles against the 227 KiB a block may use on an H100/H200 (228 KiB per SM), and
fp32 accumulator registers per thread against 255 (the TVM tensor-core forward at warp_m = 2:
its template's estimate of the fragments per thread; TVM: threads per block against 1024
as well). `violations` is what the study sets as
Optuna trial constraints (Trial.set_constraint): each value <= 0 when that resource fits.
"""

from __future__ import annotations

import itertools

from gfwagen.backends.triton_backend import KEY_BIAS_DTYPE, STORED_MIN_BLOCK_M, square_tiles
from gfwagen.generator import WGMMA_THREE_ROWS, check_config, gate_chunk, wgmma_num_warps
from gfwagen.heuristics import default_config, padded_head_dim
from gfwagen.spec import DTYPES, KernelConfig, KernelSpec

TILES = (16, 32, 64, 128, 256)
TVM_TILES = (8, 16, 32, 64, 128)
WARPS = (4, 8)
STAGES = (1, 2, 3, 4, 5)
SMEM_LIMIT = 227 * 1024  # H100/H200: max dynamic shared memory per block (228 KiB per SM)
REG_LIMIT = 255  # registers per thread
REG_OVERHEAD = 40  # addresses, indices, row statistics: not in the tile arithmetic below
FP32_REGS_PER_SCORE = 26  # fp32 (ieee) tiles: 8 scores per thread fit, 16 do not (resources)
TVM_THREADS_LIMIT = 1024
# Boolean template switches (KernelConfig.extra). DEFAULT_KNOBS are searched unless the
# caller names others: tensor descriptors cut the backward's register spills (offline sm_90
# compile, benchmarks/RESULTS.md); prefetch_gate and full_masks are opt-in (full_masks: the
# one-bound masks sped the forward up 2-10% at S1, S2, S3 and S5 but slowed S4's gated
# forward by 4.7% at the same SASS in its unmasked loop, session 10).
KNOBS = ("tma", "prefetch_gate", "full_masks", "maxnreg", "bias_mma")
# Knobs that are not on/off switches: their choices, False (left out) first. maxnreg caps the
# forward's registers per thread: 128 fits four 4-warp blocks (or two 8-warp ones) per SM, 168
# three 4-warp blocks. At S5's 64x64 w4 s2 tile the gate takes 140 registers (ungated 123),
# three blocks per SM instead of four; capped at 128 it compiles to 127 without spills
# (offline sm_90, session 13).
KNOB_CHOICES = {"maxnreg": (False, 128, 168)}
KNOB_PASSES = {"maxnreg": ("fwd",), "bias_mma": ("fwd",)}
# bias_mma: the gated forward reads the gate as key biases inside its score product
# (triton_backend.takes_key_bias: bf16, square tiles); S5's gate cost 16.7% -> 10.0%.
TENSOR_CORE = "tensor_core"  # not a user knob: the TVM tensor-core forward's own parameters
TVM_TC_PARAMS = {"num_stages": (1, 2, 3), "x_sub_n": (16, 32, 64), "x_warp_m": (1, 2),
                 "x_q_smem": (False, True)}
# Extras of the tensor-core forward at the template's own default are left out of a config,
# so that it reads and hashes (compile cache, tuning database) the same as one written
# without them: the default config and the configs measured before these knobs existed.
TVM_TC_DEFAULTS = {"warp_m": 1, "q_smem": False, "wgmma": False, "pingpong": False,
                   "fuse_gate": False, "persistent": False, "bias_mma": False, "stagger": False}
# On sm_90 the warpgroup-MMA template joins the tensor-core forward's space as x_wgmma (the
# pseudo-knob WGMMA, which knobs_for adds there). Its tiles take block_m (64 rows per
# warpgroup), block_n and num_stages (3 here: its pipelined schedule; the pingpong one also
# runs 4, no faster at S5 (RESULTS.md, session 34), so not searched; mma.sync takes 1 or 2);
# the mma.sync knobs mean nothing to it and are dropped.
WGMMA = "wgmma"
MMA_SYNC_ONLY = ("sub_n", "warp_m", "q_smem")
# its bulk tensor copies (mma.sync's tiles come by cp.async), its warp-specialized schedule
# (a producer warpgroup, two consumers taking turns at the tensor cores), with that
# schedule its persistent form (one block per SM looping over query tiles) and, with that
# schedule and square tiles, the gate's prefix sums made by its producer (gated problems:
# the pseudo-knob FUSE_GATE, which knobs_for adds there) or the keys' biases read by the
# score product (gated bf16 problems: TVM_BIAS_MMA; the template's bias_mma, not Triton's
# knob of that name: H200, the gated forward 4.4% faster at F1 and 1.8% at S4, 1.5% and
# 3.5% slower at S1 and S5, RESULTS.md session 37)
# stagger: three consumers (192 rows) each over its own rows' key tiles only; H200, head dim
# 64 (RESULTS.md, session 49): ungated causal, W 4096 and W 8192 and gated W 4096 1.3-2.8%
# faster than unstaggered, gated causal 0.6% slower; S5 and W 2048 still faster on 128 rows
WGMMA_ONLY = ("tma", "pingpong", "fuse_gate", "persistent", "bias_mma", "stagger")
FUSE_GATE = "fuse_gate"
TVM_BIAS_MMA = "tvm_bias_mma"
DEFAULT_KNOBS = ("tma", "bias_mma")
CONSTRAINT_NAMES = ("smem", "registers", "failed")


# The stored-dS backward ("bwd_ds", timed whole) adds its dq kernel's launch to the config:
STORED_DQ_PARAMS = {"x_q_warps": (4, 8), "x_q_stages": (2, 3, 4), "x_q_tma": (False, True)}


def passes(backend: str) -> tuple[str, ...]:
    return ("fwd", "bwd_kv") if backend == "tvm" else ("fwd", "bwd_kv", "bwd_q", "bwd_ds")


def tvm_extras() -> dict:
    try:
        from gfwagen.backends import tvm_backend
    except ImportError:
        return {}
    return dict(getattr(tvm_backend, "TUNABLE_EXTRAS", {}) or {})


def space_extras(backend: str) -> frozenset[str]:
    """Every config extra some pass's space of `backend` sets (params' x_ names with every
    knob on, and the template defaults config_from_params leaves out). An extra outside it,
    in a --try config, would be dropped from what the study times."""
    if backend == "tvm":
        names = {*TVM_TC_DEFAULTS, *(k[2:] for k in TVM_TC_PARAMS if k.startswith("x_")),
                 *WGMMA_ONLY, WGMMA, *tvm_extras()}
    else:
        names = {*KNOBS, *(k[2:] for k in STORED_DQ_PARAMS)}
    return frozenset(names)


def check_knobs(knobs) -> tuple[str, ...]:
    """knobs as a tuple; ValueError naming any that is not in KNOBS."""
    knobs = tuple(knobs)
    bad = [k for k in knobs if k not in KNOBS]
    if bad:
        raise ValueError(f"unknown knob(s) {', '.join(bad)}; known: {', '.join(KNOBS)}")
    return knobs


def knobs_for(spec: KernelSpec, knobs=None, gpu: bool = False) -> tuple[str, ...]:
    """The switches that change something for this spec (the gate prefetch needs a gate;
    the dk/dv kernel's masks are always full).
    knobs None: DEFAULT_KNOBS. TVM: TENSOR_CORE when the spec's GPU forward is the
    tensor-core template (gpu), else none."""
    if spec.backend == "tvm":
        from gfwagen.backends import tvm_backend

        if not (gpu and tvm_backend.tensor_core_forward(spec)):
            return ()
        if not tvm_backend.wgmma_available(spec):
            return (TENSOR_CORE,)
        if not spec.gated:
            return (TENSOR_CORE, WGMMA)
        if DTYPES[spec.dtype] == KEY_BIAS_DTYPE:
            return (TENSOR_CORE, WGMMA, FUSE_GATE, TVM_BIAS_MMA)
        return (TENSOR_CORE, WGMMA, FUSE_GATE)
    if spec.backend != "triton":
        return ()
    knobs = check_knobs(DEFAULT_KNOBS if knobs is None else knobs)
    return tuple(k for k in KNOBS if k in knobs and (k != "prefetch_gate" or spec.gated)
                 and (k != "bias_mma" or (spec.gated and DTYPES[spec.dtype] == KEY_BIAS_DTYPE))
                 and (k != "full_masks" or spec.pass_ not in ("bwd_kv", "bwd_ds"))
                 and spec.pass_ in KNOB_PASSES.get(k, (spec.pass_,)))


def params(backend: str, pass_: str, knobs: tuple = ()) -> dict[str, tuple]:
    """Name -> choices. Extras are prefixed 'x_' (they go into KernelConfig.extra); `knobs`
    (from knobs_for) adds Triton's boolean switches."""
    if pass_ not in passes(backend):
        raise ValueError(f"{backend} has no separately tunable pass {pass_!r} "
                         f"(tunable: {', '.join(passes(backend))})")
    if backend == "tvm":
        p = {"block_m": TVM_TILES, "block_n": TVM_TILES}
        if TENSOR_CORE in knobs:
            p.update(TVM_TC_PARAMS)
            if WGMMA in knobs:
                # and the pingpong schedule's three consumers (head dims <= 64; check_config
                # refuses it elsewhere): on the H200 causal and W 4096-8192 at head dim 64
                # 6-11% faster, S5 10-16% slower (RESULTS.md, session 39)
                p["block_m"] = TVM_TILES + (WGMMA_THREE_ROWS,)
                p["x_wgmma"] = (False, True)
                p["x_tma"] = (False, True)
                p["x_pingpong"] = (False, True)
                p["x_persistent"] = (False, True)
                p["x_stagger"] = (False, True)
            if FUSE_GATE in knobs:
                p["x_fuse_gate"] = (False, True)
            if TVM_BIAS_MMA in knobs:
                p["x_bias_mma"] = (False, True)
        else:
            p.update({f"x_{k}": tuple(v) for k, v in sorted(tvm_extras().items())})
        return p
    chunk = gate_chunk()
    tiles = tuple(t for t in TILES if chunk % t == 0)
    p = {"block_m": tiles, "block_n": tiles, "num_warps": WARPS, "num_stages": STAGES}
    p.update({f"x_{k}": KNOB_CHOICES.get(k, (False, True)) for k in knobs})
    if pass_ == "bwd_ds":
        p.update(STORED_DQ_PARAMS)
        p["block_m"] = tuple(t for t in tiles if t >= STORED_MIN_BLOCK_M)
    return p


def config_from_params(spec: KernelSpec, values: dict, gpu: bool = False) -> KernelConfig:
    base = default_config(spec) if spec.backend == "triton" else _tvm_default(spec, gpu)
    # a switch that is off is left out, so a config reads the same with or without it
    extra = {**dict(base.extra), **{k[2:]: v for k, v in values.items() if k.startswith("x_")}}
    extra = {k: v for k, v in extra.items() if not (k in KNOBS and v is False)}
    num_warps = int(values.get("num_warps", base.num_warps))
    bm, bn = int(values.get("block_m", base.block_m)), int(values.get("block_n", base.block_n))
    if spec.backend == "tvm":
        if extra.get("wgmma") is True:  # a warpgroup (4 warps) per 64 rows
            extra = {k: v for k, v in extra.items() if k not in MMA_SYNC_ONLY}
            num_warps = wgmma_num_warps(bm)
            extra = _gate_switches_read(extra, bm, bn, num_warps,
                                        int(values.get("num_stages", base.num_stages)))
            if not extra.get("pingpong"):
                extra.pop("persistent", None)  # means nothing there: the same config
            if bm != WGMMA_THREE_ROWS:
                extra.pop("stagger", None)  # only three consumers stagger: the same config
        else:
            extra = {k: v for k, v in extra.items() if k not in WGMMA_ONLY}
        extra = {k: v for k, v in extra.items() if not _tvm_tc_default(k, v)}
    elif extra.get("bias_mma") and idle_knob(spec, "bias_mma", bm, bn):
        extra.pop("bias_mma")  # the forward reads the gate tables there: the same config
    return KernelConfig(block_m=bm,
                        block_n=bn,
                        num_warps=num_warps,
                        num_stages=int(values.get("num_stages", base.num_stages)),
                        extra=tuple(sorted(extra.items())))


def _gate_switches_read(extra: dict, bm: int, bn: int, num_warps: int, num_stages: int) -> dict:
    """extra without the wgmma forward's gate switches that its template ignores at these
    tiles (so the config reads as the one without them): fuse_gate where the kernel would
    not read the raw gates, bias_mma where it would not read the tile records as bias tables
    (templates/tvm/fwd_wgmma.py's gate_input and key_table decide both)."""
    from gfwagen.backends.tvm_backend import tensor_core_template

    def config(ex):
        return KernelConfig(bm, bn, num_warps, num_stages, extra=tuple(ex.items()))

    cfg = config(extra)
    tpl = tensor_core_template(cfg)
    if extra.get("fuse_gate") and tpl.gate_input(cfg) != "raw":
        extra = {k: v for k, v in extra.items() if k != "fuse_gate"}
        cfg = config(extra)
    if extra.get("bias_mma") and not tpl.key_table(cfg):
        extra = {k: v for k, v in extra.items() if k != "bias_mma"}
    return extra


def idle_knob(spec: KernelSpec, knob: str, block_m: int, block_n: int) -> bool:
    """Whether a Triton switch changes nothing at these tiles, so that a config with it is
    the config without it: bias_mma off square tiles (triton_backend.square_tiles)."""
    return knob == "bias_mma" and not square_tiles(block_m, block_n)


def _tvm_tc_default(name: str, value) -> bool:
    d = TVM_TC_DEFAULTS.get(name)
    return d is not None and type(value) is type(d) and value == d


def _extra_value(config: KernelConfig, param: str):
    """An x_ parameter's value in `config`; absent: the template default, or False (a
    switch that is off)."""
    return config.get(param[2:], TVM_TC_DEFAULTS.get(param[2:], False))


def config_params(spec: KernelSpec, config: KernelConfig, knobs=None,
                  gpu: bool = False) -> dict:
    """The inverse of config_from_params: what to enqueue for `config`. An extra that
    `config` leaves out and that is not an off switch (the stored backward's dq warps, say,
    in a config written for another pass) takes the pass's default; ValueError naming the
    parameter whose value the pass's space lacks."""
    names = params(spec.backend, spec.pass_, knobs_for(spec, knobs, gpu))
    out, snapped = {}, None
    for n, choices in names.items():
        out[n] = _extra_value(config, n) if n.startswith("x_") else getattr(config, n)
        if spec.backend == "tvm" and n[2:] in (MMA_SYNC_ONLY if config.get("wgmma")
                                               else WGMMA_ONLY):
            out[n] = choices[0]  # any value the study accepts: the other template drops it
        if out[n] in choices:
            continue
        if n.startswith("x_") and config.get(n[2:]) is None:
            snapped = snapped or config_params(spec, default(spec, knobs, gpu), knobs, gpu)
            out[n] = snapped[n]
        else:
            shown = n[2:] if n.startswith("x_") else n
            raise ValueError(f"{shown}={out[n]!r} is outside the {spec.pass_} search space "
                             f"({', '.join(map(repr, choices))})")
    return out


def _tvm_default(spec: KernelSpec, gpu: bool = False) -> KernelConfig:
    from gfwagen.backends import tvm_backend

    return tvm_backend.default_cuda_config(spec) if gpu else tvm_backend.DEFAULT_CPU_CONFIG


def default(spec: KernelSpec, knobs=None, gpu: bool = False) -> KernelConfig:
    """The config the op would use untuned, snapped into the space (trial 0 of a study)."""
    cfg = default_config(spec) if spec.backend == "triton" else _tvm_default(spec, gpu)
    p = params(spec.backend, spec.pass_, knobs_for(spec, knobs, gpu))
    vals = {}
    for n, choices in p.items():
        v = _extra_value(cfg, n) if n.startswith("x_") else getattr(cfg, n)
        vals[n] = v if v in choices else min(choices, key=lambda c: abs(c - v))
    return config_from_params(spec, vals, gpu)


def resources(spec: KernelSpec, config: KernelConfig) -> dict:
    """Estimated shared memory (bytes per block), registers per thread (0: not estimated) and
    threads per block."""
    b = DTYPES[spec.dtype].itemsize
    D, Dv, BM, BN, S = spec.head_dim, spec.value_dim, config.block_m, config.block_n, \
        config.num_stages
    if spec.backend == "tvm":
        from gfwagen.backends.tvm_backend import (
            cuda_smem_bytes,
            tensor_core_forward,
            tensor_core_template,
        )
        from gfwagen.template_loader import load_template

        if tensor_core_forward(spec, config) and config.get("wgmma"):  # 128 per 64 rows
            regs = tensor_core_template(config).registers(D, Dv, config)
            # pingpong: and a producer warpgroup
            threads = 2 * BM + 128 * bool(config.get("pingpong", False))
            return {"smem": cuda_smem_bytes(spec, config), "registers": regs,
                    "threads": threads}
        if tensor_core_forward(spec, config):  # a warp per 16 x warp_m rows
            wm = config.get("warp_m", 1)
            # estimated at two row blocks per warp only: one block's tiles are the op's
            # defaults and were measured without it (at D = 256 the default spills, and
            # stays in the space)
            regs = load_template("tvm", "fwd_cuda").registers(D, Dv, config) if wm > 1 else 0
            return {"smem": cuda_smem_bytes(spec, config), "registers": regs,
                    "threads": 2 * BM // wm}
        threads = BN if spec.pass_ == "bwd_kv" else BM
        return {"smem": cuda_smem_bytes(spec, config), "registers": 0, "threads": threads}
    threads = 32 * config.num_warps
    # The tiles, plus what triton 3.6 adds (offline sm_90 builds at D = 64 and 128: within
    # 16 bytes of 18 configs without tma, at most 1 KiB over with it): 1 KiB in the gated
    # kernels, and in dk/dv the pipelined per-query vectors, lse and delta (and the gate's,
    # growing with the stages). Without them a gated S4 dk/dv at 128x64 s3 was estimated at
    # 229,376 bytes, passed, and needed 233,472 (the limit is 232,448).
    if spec.pass_ == "fwd":  # Q tile resident, K and V tiles pipelined
        smem = BM * D * b + S * BN * (D + Dv) * b + (1024 if spec.gated else 0)
        if spec.gated and config.get("bias_mma", False):  # and the key-bias pieces' tiles
            smem += S * BN * 16 * b
        acc = BM * Dv + BM * BN  # o accumulator + the score tile
    elif spec.pass_ in ("bwd_kv", "bwd_ds"):  # K, V resident, Q and dO tiles pipelined
        smem = BN * (D + Dv) * b + S * BM * (D + Dv) * b + 8 * BM * (S - 1)
        if spec.gated:
            smem += 4 * BM * (S - 1) ** 2 + 8
        if BM > BN and config.num_warps == 8:
            # since its tiles run in one loop, a [BM, BN] bf16 scratch for a layout change
            # (offline builds at D = 64 and 128, 128x64 and 256x64 at eight warps)
            smem += BM * BN * b
        acc = BN * (D + Dv) + 2 * BM * BN  # dk, dv + P^T and dP^T
        if spec.pass_ == "bwd_ds":
            # dS staged for its store; its dq kernel's pipelined dS blocks and K tiles
            smem = max(smem + BM * BN * b,
                       int(config.get("q_stages", 3)) * BN * (BM + D) * b + 1024)
    else:  # bwd_q: Q, dO resident, K and V pipelined
        smem = BM * (D + Dv) * b + S * BN * (D + Dv) * b + (1024 if spec.gated else 0)
        acc = BM * D + 2 * BM * BN  # dq + P and dP
    if config.get("tma", False):  # the descriptors' barriers (1 KiB at S4's forward tile)
        smem += 1024
    regs = acc // threads + REG_OVERHEAD
    if spec.dtype == "fp32":
        # ieee dots run on the FMA units with both operands in registers. An offline sm_90
        # sweep (head dims 64-256, every pass, 12 tiles each) spilled at every tile with more
        # than 8 scores per thread, or 4 at head dim 256: those counts set the limit.
        wide = max(1, padded_head_dim(spec) // 128)
        regs = max(regs, REG_OVERHEAD + FP32_REGS_PER_SCORE * wide * (BM * BN // threads))
    return {"smem": smem, "registers": regs, "threads": threads}


def violations(spec: KernelSpec, config: KernelConfig) -> list[float]:
    """[smem, registers] as fractions over the limit (<= 0: fits); TVM: [smem, the worse of
    threads and registers]."""
    r = resources(spec, config)
    if spec.backend == "tvm":
        from gfwagen.backends import tvm_backend as tb

        # the tensor-core forward's tiles are dynamic shared memory; the others static
        limit = (tb.CUDA_DYNAMIC_SMEM_LIMIT if tb.tensor_core_forward(spec, config)
                 else tb.CUDA_STATIC_SMEM_LIMIT)
        return [r["smem"] / limit - 1.0, max(r["threads"] / TVM_THREADS_LIMIT - 1.0,
                                             r["registers"] / REG_LIMIT - 1.0)]
    return [r["smem"] / SMEM_LIMIT - 1.0, r["registers"] / reg_limit(config) - 1.0]


def reg_limit(config: KernelConfig) -> int:
    """Registers per thread a Triton config may use: its maxnreg cap, else the hardware's."""
    return min(REG_LIMIT, int(config.get("maxnreg", False) or REG_LIMIT))


def ptxas_trap(spec: KernelSpec, config: KernelConfig) -> str:
    """Why ptxas (Triton 3.6's) builds this config, which fits, so badly that it is not worth
    a trial; '' if it does not. Found by measurement, then mapped by an offline sm_90 sweep."""
    if (spec.backend == "triton" and spec.pass_ in ("bwd_kv", "bwd_ds") and spec.gated
            and spec.dtype != "fp32" and config.get("tma", False) and config.num_warps == 4
            and config.block_n == 32 and padded_head_dim(spec) >= 128
            and config.block_m * padded_head_dim(spec) == 16384):
        # 64x32 at head dim 256 ran 667.7 ms against 29.93 without tma (H200, session 15).
        # ptxas gives the gated dk/dv kernel 32 registers and a 4-5 KB stack there: 64x32 at
        # head dims 192 and 256 in every variant swept (windowed, causal, GQA, stored dS),
        # 128x32 at head dim 128 windowed (causal at GQA 4 builds, at 255 and 664 bytes).
        # No other dk/dv tile swept (16-128 rows, 16-128 keys at head dims 128 and 256), no
        # ungated one, no eight-warp one.
        return ("ptxas builds the gated dk/dv kernel at this tile with tma and four warps "
                "at 32 registers and a 5 KB stack (22x slower, session 15)")
    return ""


def feasible(spec: KernelSpec, config: KernelConfig, *, gpu: bool = True) -> tuple[bool, str]:
    """(fits, why not). On the CPU (TVM llvm) only the template's own limits apply."""
    try:
        check_config(spec, config)
    except ValueError as e:
        return False, str(e)
    if not gpu:
        return True, ""
    trap = ptxas_trap(spec, config)
    if trap:
        return False, f"pruned before compiling: {trap}"
    if spec.backend == "tvm":
        from gfwagen.backends import tvm_backend as tb

        if tb.tensor_core_forward(spec) and not tb.tensor_core_forward(spec, config):
            why = tb.tensor_core_template(config).supports(
                spec.head_dim, spec.value_dim, spec.dtype, config)
            return False, f"the tensor-core forward takes no {why}"
    v = violations(spec, config)
    if max(v) <= 0:
        return True, ""
    r = resources(spec, config)
    if spec.backend == "triton":
        items = [("shared memory", r["smem"], SMEM_LIMIT),
                 ("registers/thread", r["registers"], reg_limit(config))]
    else:
        from gfwagen.backends import tvm_backend as tb

        tc = tb.tensor_core_forward(spec, config)
        items = [("dynamic shared memory" if tc else "static shared memory", r["smem"],
                  tb.CUDA_DYNAMIC_SMEM_LIMIT if tc else tb.CUDA_STATIC_SMEM_LIMIT),
                 ("threads/block", r["threads"], TVM_THREADS_LIMIT),
                 ("registers/thread", r["registers"], REG_LIMIT)]
    bad = [f"{n} ~{val} ({100 * val / lim:.0f}% of the limit)"
           for n, val, lim in items if val > lim]
    return False, "pruned before compiling: estimated " + ", ".join(bad)


def enumerate_configs(spec: KernelSpec, *, gpu: bool = True,
                      knobs=None) -> list[KernelConfig]:
    """Every feasible config of the space (the exhaustive sweep's list), each once (a knob
    that means nothing at some tiles gives the same config with it on and off)."""
    p = params(spec.backend, spec.pass_, knobs_for(spec, knobs, gpu))
    out = {}
    for combo in itertools.product(*p.values()):
        cfg = config_from_params(spec, dict(zip(p, combo)), gpu)
        if cfg not in out and feasible(spec, cfg, gpu=gpu)[0]:
            out[cfg] = None
    return list(out)
