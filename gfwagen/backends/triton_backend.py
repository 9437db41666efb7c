"""Runs the Triton templates on torch tensors: allocates outputs, picks the launch shape from
a KernelConfig, and turns the kernels' row/column sums into the gate gradient.

Inputs arrive validated (gfwagen.validate) with a contiguous last dimension; any other
strides are passed through, so transposed [B, H, T, D] views cost no copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import torch

from gfwagen import gate_sums, launch_plans
from gfwagen.gate import GATE_BOUND, GATE_CHUNK, chunked_prefix_sums, key_bias
from gfwagen.spec import SMALLEST_KERNEL_SCALE, KernelConfig, effective_window
from gfwagen.template_loader import load_template

# The most batch entries one launch takes: the kernels' grids put them on z (and some on y),
# whose extent CUDA caps at 65535; gfwagen.dispatch runs larger batches in slices of it.
GRID_BATCH_MAX = 65535


def kernel_window(window: int | None, T: int) -> int:
    """The compile-time window (spec.effective_window)."""
    return effective_window(window, T)


def _dot_precision(dtype: torch.dtype) -> str:
    # Triton's default for a float32 dot is tf32 (about 3e-4 relative error); fp32 callers
    # expect fp32 accuracy.
    return "ieee" if dtype == torch.float32 else "tf32"


def _fit(cfg: KernelConfig, T: int) -> tuple[int, int]:
    """Shrink tiles for short sequences (never below 16, the smallest dot Triton allows)."""
    cap = max(16, 1 << max(0, (T - 1).bit_length()))
    return min(cfg.block_m, cap), min(cfg.block_n, cap)


def gate_tables(log_gate):
    """The kernels' gate tables (chunk-local float32 prefix sums, float64 chunk bases, the
    chunk), or None without a gate. Both directions take them; a caller that keeps the
    forward's for the backward saves the backward two launches."""
    if log_gate is None:
        return None
    # One spare base so a kernel's prefetch past the last chunk reads valid memory. The fused
    # sums clamp the gate as they load it (gfwagen.dispatch leaves the clamp to them).
    if gate_sums.use_fused(log_gate):
        local, base = gate_sums.chunked_prefix_sums_fused(log_gate, GATE_CHUNK, spare=1,
                                                          bound=GATE_BOUND)
        return local, base, GATE_CHUNK
    local, base = chunked_prefix_sums(log_gate, GATE_CHUNK)
    return local, torch.nn.functional.pad(base, (0, 1)).contiguous(), GATE_CHUNK


# The key-bias pieces' dtype: fp16 cannot hold a tile's bias (64 gates at the bound over a
# scale of 1/8) nor split it in three pieces; fp32's dots would round them to tf32.
KEY_BIAS_DTYPE = torch.bfloat16


def reads_key_bias(q, log_gate, scale, cfg: KernelConfig, segs=None) -> bool:
    """Whether the forward reads the gate as key-bias pieces (fwd.py's KEY_BIAS) rather than
    as the gate tables: gated, a positive scale, no packed sequences, and takes_key_bias at
    the tiles the sequence fits."""
    if log_gate is None or segs is not None or scale <= 0:
        return False
    return takes_key_bias(q.dtype, cfg, *_fit(cfg, q.shape[1]))


def takes_key_bias(dtype: torch.dtype, cfg: KernelConfig, block_m: int, block_n: int) -> bool:
    """The config side of reads_key_bias (offline builds ask it too): the bias_mma knob,
    KEY_BIAS_DTYPE inputs, square tiles."""
    return (bool(cfg.get("bias_mma", False)) and dtype == KEY_BIAS_DTYPE
            and square_tiles(block_m, block_n))


def square_tiles(block_m: int, block_n: int) -> bool:
    """The key-bias forward's tiles: each query tile's last key tile is its own, whose
    pieces give its rows' c_i in that tile's frame."""
    return block_m == block_n


def key_bias_input(log_gate, block_n: int, scale: float, dtype: torch.dtype):
    """The key-bias pieces and shifts (gfwagen.gate.key_bias), and the launch that writes them
    (None when they are written already). On CUDA that is one launch, which clamps the gate
    as it loads it (as gate_tables does); forward makes it right before its own."""
    if gate_sums.use_fused(log_gate):
        kb = gate_sums.key_bias_buffers(log_gate, block_n, dtype)
        return kb, functools.partial(gate_sums.fill_key_bias, log_gate, *kb, block_n, scale,
                                     GATE_BOUND)
    return key_bias(log_gate, block_n, scale, dtype), None


def _tma_usable(*ts: torch.Tensor) -> bool:
    """Whether Hopper tensor descriptors can address these tensors: the copy engine needs
    16-byte aligned slab bases (data pointer, batch and head strides) and row strides."""
    return all(t.data_ptr() % 16 == 0 and all((st * t.element_size()) % 16 == 0
                                              for st in t.stride()[:3]) for t in ts)


def _ensure_tma_allocator() -> None:
    """Device-side descriptors need a small global scratch per launch, which Triton gets from
    the allocator of the calling thread (a ContextVar: autograd's backward thread starts
    without one). A caller's own allocator is kept."""
    import triton
    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(
            lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _maxnreg(cfg: KernelConfig, t: torch.Tensor) -> int | None:
    """The config's register cap for a CUDA launch; None on the CPU (the interpreter)."""
    n = cfg.get("maxnreg", False)
    return int(n) if n and t.is_cuda else None


def _device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class KernelBuildError(RuntimeError):
    """A config's kernel did not build: ptxas crashed or refused it, the compiler rejected it,
    or it needs more shared memory than the device has. Names the pass and the config, so
    that gfwagen.dispatch can fall back to the default (a tuned config is only known to build
    for the variant it was tuned on: session 15 found a W >= T problem, which runs the causal
    variant, whose dq kernel crashed ptxas on a window class's tuned tiles)."""

    def __init__(self, pass_: str, config: KernelConfig, cause: BaseException):
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        super().__init__(f"the Triton {pass_} kernel did not build on {config}: {first}")
        self.pass_, self.config, self.cause = pass_, config, cause


def _build_errors() -> tuple[type[BaseException], ...]:
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    return CompilationError, OutOfResources, PTXASError


@contextlib.contextmanager
def _launching(t: torch.Tensor, pass_: str, cfg: KernelConfig):
    """The launch's device, and its build failures as KernelBuildError."""
    with _device(t):
        try:
            yield
        except _build_errors() as e:
            raise KernelBuildError(pass_, cfg, e) from e


def kernel_scale(scale: float) -> float:
    """The scale as the forward kernels run it: a nonzero one smaller than
    SMALLEST_KERNEL_SCALE at that size, same sign. fwd.py's RAW_MAX keeps the running max
    unscaled and multiplies it by the float32 scale, so a positive scale that float32 flushes
    to zero made -inf * 0 = NaN (fuzzed on the H200: T = 1, scale 1e-116, every output NaN),
    and the key-bias pieces divide by it. Zero stays zero (RAW_MAX and the pieces are off for
    it)."""
    if scale != 0 and abs(scale) < SMALLEST_KERNEL_SCALE:
        return math.copysign(SMALLEST_KERNEL_SCALE, scale)
    return scale


def forward(q, k, v, log_gate, window, scale, cfg: KernelConfig, segs=None, gate=None):
    """segs: None, or (start, end) int32 [T] of packed sequences (gfwagen.varlen). gate:
    gate_tables(log_gate) when the caller has them (a forward that reads_key_bias ignores
    them)."""
    scale = kernel_scale(scale)
    B, T, H, _ = q.shape
    o = torch.empty(B, T, H, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    bm, bn = _fit(cfg, T)
    kb = fill = None
    if reads_key_bias(q, log_gate, scale, cfg, segs):
        (kb, fill), gate = key_bias_input(log_gate, bn, scale, q.dtype), None
    elif gate is None:
        gate = gate_tables(log_gate)
    tma = _use_tma(cfg, k, v)
    with _launching(q, "fwd", cfg):
        launch = load_template("triton", "fwd").prepare_forward(
            q, k, v, gate, o, lse, kernel_window(window, T), scale, H // k.shape[2], bm, bn,
            cfg.num_warps, cfg.num_stages, _dot_precision(q.dtype),
            bool(cfg.get("prefetch_gate", False)), segs[0] if segs is not None else None, tma,
            bool(cfg.get("full_masks", False)), _maxnreg(cfg, q), key_bias=kb)
        if fill is not None:
            fill()  # the forward's launch is bound: nothing on the host between the kernels
        launch()
    return o, lse


@dataclasses.dataclass
class BackwardState:
    """What both backward passes share: inputs, the gate tables, delta and the outputs.
    The tuner times bwd_kv and bwd_q separately on one prepared state."""

    do: torch.Tensor
    o: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lse: torch.Tensor
    window: int | None
    scale: float
    gate: tuple | None
    delta: torch.Tensor
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    row_sums: torch.Tensor | None
    col_sums: torch.Tensor | None
    segs: tuple | None = None  # packed sequences' (start, end) per position
    stored: object = None  # bwd.StoredDS: dS as dk/dv stored it, for backward_q_stored


def prepare_backward(do, q, k, v, o, lse, log_gate, window, scale, segs=None,
                     gate=None, delta=True) -> BackwardState:
    """gate: the forward's gate_tables(log_gate), if kept; else computed here. delta: launch
    the kernel that computes delta, so that backward_kv can run first or alone (the tuner
    times each pass by itself); backward_q computes and stores it anyway."""
    B, T, H, _ = q.shape
    gated = log_gate is not None
    sums = torch.empty(2, B, H, T, dtype=torch.float32, device=q.device) if gated else None
    st = BackwardState(
        do=do, o=o, q=q, k=k, v=v, lse=lse, window=window, scale=scale,
        gate=gate if gate is not None else gate_tables(log_gate),
        delta=torch.empty(B, H, T, dtype=torch.float32, device=q.device),
        dq=torch.empty(q.shape, dtype=q.dtype, device=q.device),
        dk=torch.empty(k.shape, dtype=k.dtype, device=k.device),
        dv=torch.empty(v.shape, dtype=v.dtype, device=v.device),
        row_sums=sums[0] if gated else None, col_sums=sums[1] if gated else None, segs=segs)
    if delta and q.numel():
        with _device(q):
            load_template("triton", "bwd").launch_delta(o, do, st.delta)
    return st


def _bwd_launch_args(st: BackwardState, cfg: KernelConfig):
    T, H = st.q.shape[1], st.q.shape[2]
    bm, bn = _fit(cfg, T)
    return (kernel_window(st.window, T), st.scale, H // st.k.shape[2], bm, bn, cfg.num_warps,
            cfg.num_stages, _dot_precision(st.q.dtype), bool(cfg.get("prefetch_gate", False)))


def _use_tma(cfg: KernelConfig, *ts: torch.Tensor) -> bool:
    tma = bool(cfg.get("tma", False)) and _tma_usable(*ts)
    if tma and ts[0].is_cuda:
        _ensure_tma_allocator()
    return tma


def backward_kv(st: BackwardState, cfg: KernelConfig) -> None:
    """dk, dv and the gate's column sums, into st; and dS into st.stored when it is set."""
    if st.q.numel():
        with _launching(st.q, "bwd_kv", cfg):
            load_template("triton", "bwd").launch_dkdv(
                st.q, st.k, st.v, st.do, st.gate, st.lse, st.delta, st.dk, st.dv, st.col_sums,
                *_bwd_launch_args(st, cfg), st.segs[1] if st.segs is not None else None,
                _use_tma(cfg, st.q, st.do), st.stored)


# 16-query blocks stopped the stored backward with a CUDA "misaligned address" on the H200
# (session 12, 16x64 w8 s3 with tma, while the tuner warmed it up). Session 29 found why: a
# 16-row tile's float32 vectors through descriptors (64-byte boxes; common.VECTOR_TMA_MIN_BLOCK
# now keeps them to loads) and ran 16x64 tma blocks correctly. They stay out of the stored
# backward and the tuner's space for it, whose studies keep their parameters that way.
STORED_MIN_BLOCK_M = 32


def stored_ds_usable(q, window, segs, cfg_kv: KernelConfig) -> bool:
    """Whether the stored-dS backward can run this problem: a window shorter than the
    sequence (the blocks hold about T x W values per head), no packed sequences, and the
    blocks within stored_ds_limit()."""
    T = q.shape[1]
    w = kernel_window(window, T)
    if w == 0 or segs is not None or not q.numel():
        return False
    if q.is_cuda and _fit(cfg_kv, T)[0] < STORED_MIN_BLOCK_M:
        return False
    need = _stored_ds_bytes(q, w, cfg_kv)
    return need <= stored_ds_limit(q.device) and need < _stored_ds_oom.get(str(q.device), need + 1)


def _stored_ds_bytes(q, w, cfg_kv: KernelConfig) -> int:
    T = q.shape[1]
    return load_template("triton", "bwd").stored_ds_bytes(q.shape[0], q.shape[2], T, w,
                                                          *_fit(cfg_kv, T), q.element_size())


# device -> the smallest dS buffer that ran out of memory there (backward_preferring_stored)
_stored_ds_oom: dict[str, int] = {}


def stored_ds_limit(device: torch.device) -> int:
    """Bytes the stored-dS backward may hold for its dS blocks: $GFWAGEN_STORED_DS_MAX_MB,
    else a sixteenth of the device's memory (8.8 GB on an H200, 5 GB on an 80 GB GPU; 1 GiB
    on the CPU, where only the interpreter runs it)."""
    import os

    env = os.environ.get("GFWAGEN_STORED_DS_MAX_MB")
    if env is not None:
        try:
            return max(0, int(float(env) * 2**20))
        except ValueError:
            raise ValueError(f"GFWAGEN_STORED_DS_MAX_MB must be a number of megabytes (0: "
                             f"always recompute dS), got {env!r}") from None
    if device.type != "cuda":
        return 1 << 30
    return torch.cuda.get_device_properties(device).total_memory // 16


def stored_configs(cfg: KernelConfig) -> tuple[KernelConfig, KernelConfig]:
    """A "bwd_ds" config as (dk/dv's, dq's) for backward(stored=True): both kernels run on
    its tiles; dk/dv on its warps, stages and tma; dq on extras q_warps, q_stages, q_tma."""
    kv = dataclasses.replace(cfg, extra=tuple((k, v) for k, v in cfg.extra
                                              if not k.startswith("q_")))
    q = KernelConfig(block_m=cfg.block_m, block_n=cfg.block_n,
                     num_warps=int(cfg.get("q_warps", 4)), num_stages=int(cfg.get("q_stages", 3)),
                     extra=(("tma", bool(cfg.get("q_tma", True))),))
    return kv, q


def attach_stored_ds(st: BackwardState, cfg_kv: KernelConfig) -> None:
    """Give st the blocks for dk/dv (on cfg_kv's tiles) to store dS into."""
    B, T, H, _ = st.q.shape
    st.stored = load_template("triton", "bwd").new_stored_ds(
        B, H, T, kernel_window(st.window, T), *_fit(cfg_kv, T), st.q.dtype, st.q.device)


def backward_q_stored(st: BackwardState, cfg: KernelConfig) -> None:
    """dq and the gate's row sums, into st, from the dS that backward_kv stored; on its
    tiles (cfg's block sizes are not used)."""
    if st.q.numel():
        T, H = st.q.shape[1], st.q.shape[2]
        with _launching(st.q, "bwd_q", cfg):
            load_template("triton", "bwd").launch_dq_ds(
                st.k, st.stored, st.dq, st.row_sums, kernel_window(st.window, T), st.scale,
                H // st.k.shape[2], cfg.num_warps, cfg.num_stages,
                _dot_precision(st.q.dtype), _use_tma(cfg, st.k))


def backward_q(st: BackwardState, cfg: KernelConfig) -> None:
    """dq, the gate's row sums and delta, into st."""
    if st.q.numel():
        with _launching(st.q, "bwd_q", cfg):
            load_template("triton", "bwd").launch_dq(
                st.q, st.k, st.v, st.do, st.o, st.gate, st.lse, st.delta, st.dq, st.row_sums,
                *_bwd_launch_args(st, cfg), st.segs[0] if st.segs is not None else None,
                _use_tma(cfg, st.k, st.v), bool(cfg.get("full_masks", False)))


def backward_preferring_stored(do, q, k, v, o, lse, log_gate, window, scale,
                               cfg_kv: KernelConfig, cfg_q: KernelConfig,
                               stored_cfg: KernelConfig | None, segs=None, gate=None):
    """The op's backward: the stored-dS one on stored_cfg (a "bwd_ds" config) where it is
    given and stored_ds_usable, else the recomputing one on cfg_kv, cfg_q. Where the dS
    buffer runs out of memory (the caller's own tensors fill the GPU), it warns once, runs the
    recomputing backward, and from then on keeps buffers as large off that device."""
    if stored_cfg is not None and stored_ds_usable(q, window, segs, stored_cfg):
        try:
            return backward(do, q, k, v, o, lse, log_gate, window, scale,
                            *stored_configs(stored_cfg), segs, gate, stored=True)
        except KernelBuildError as e:  # either half: it is the "bwd_ds" config that failed
            raise KernelBuildError("bwd_ds", stored_cfg, e.cause) from e.cause
        except torch.OutOfMemoryError:
            need = _stored_ds_bytes(q, kernel_window(window, q.shape[1]), stored_cfg)
            dev = str(q.device)
            _stored_ds_oom[dev] = min(need, _stored_ds_oom.get(dev, need))
            launch_plans.clear()  # plans with buffers this large take the stored backward
            import warnings

            warnings.warn(f"gfwagen: the stored-dS backward's {need / 2**20:.0f} MiB did not fit "
                          f"on {dev}; recomputing dS instead for buffers this large (set "
                          "GFWAGEN_STORED_DS_MAX_MB to choose the limit)", RuntimeWarning,
                          stacklevel=2)
    return backward(do, q, k, v, o, lse, log_gate, window, scale, cfg_kv, cfg_q, segs, gate)


def backward(do, q, k, v, o, lse, log_gate, window, scale, cfg_kv: KernelConfig,
             cfg_q: KernelConfig, segs=None, gate=None, stored: bool = False):
    """stored: the stored-dS backward (dk/dv keeps dS, dq reads it: one product per tile
    instead of three and the softmax), cfg_kv and cfg_q then the two halves of a "bwd_ds"
    config (stored_configs); the caller checks stored_ds_usable."""
    if stored:
        st = prepare_backward(do, q, k, v, o, lse, log_gate, window, scale, segs, gate)
        attach_stored_ds(st, cfg_kv)
        backward_kv(st, cfg_kv)
        backward_q_stored(st, cfg_q)
        st.stored = None  # the blocks' memory goes back before the gate's sums are reduced
    else:
        # dq first: it computes the delta that dk/dv reads (a launch less than a delta kernel)
        st = prepare_backward(do, q, k, v, o, lse, log_gate, window, scale, segs, gate,
                              delta=False)
        backward_q(st, cfg_q)
        backward_kv(st, cfg_kv)
    if log_gate is None:
        dg = None
    elif q.numel() == 0:
        dg = torch.zeros_like(log_gate)
    else:
        dg = gate_sums.gate_grad(st.row_sums, st.col_sums, segs[1] if segs is not None else None)
    return st.dq, st.dk, st.dv, dg
