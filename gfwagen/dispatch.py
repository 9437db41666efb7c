"""Chooses the backend and the config for one call and runs it. This is where the op meets the
tuning database, through a read-only snapshot loaded once; nothing here tunes or writes."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import NamedTuple

import torch

from gfwagen import gate_sums, launch_plans, reference
from gfwagen.gate import sanitize_log_gate
from gfwagen.heuristics import default_config, interpreting
from gfwagen.spec import KernelConfig, KernelSpec, dtype_name, effective_window, window_class


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that runs a call. "auto": Triton on CUDA (run_forward and run_backward then
    ask the tuning database whether TVM measured faster: cuda_auto_backend); on the CPU, see
    cpu_auto_backend (dtype is q's dtype; without it "auto" on the CPU means the reference)."""
    if requested == "reference":
        return "reference"
    if device.type == "cuda":
        return "triton" if requested == "auto" else requested
    if device.type != "cpu":
        raise ValueError(f"q is on {device}; gfwagen runs on CUDA and CPU tensors")
    if requested == "triton":
        if not interpreting():
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 "
                             "to run the Triton interpreter on the CPU)")
        return "triton"
    if requested == "tvm":
        return "tvm"
    return cpu_auto_backend(dtype)


# dtypes the TVM llvm kernels take (fp32 accumulation whatever the input dtype)
_TVM_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def tvm_available() -> bool:
    """Whether apache-tvm imports (checked once, on the first CPU call: importing gfwagen
    never imports tvm)."""
    try:
        from gfwagen.backends import tvm_backend
    except Exception:
        return False
    return tvm_backend.HAVE_TVM


def cpu_auto_backend(dtype: torch.dtype | None) -> str:
    """backend="auto" on CPU tensors: the TVM llvm kernels when TVM imports and supports the
    dtype, else the chunked torch reference. The TVM kernels measured 4.9x faster forward and
    2.7x faster forward+backward than the reference at B=1, H=8, T=4096, W=512, D=64 fp32
    (1 thread, CPU time; benchmarks/cpu_bench.py, benchmarks/RESULTS.md)."""
    if dtype in _TVM_CPU_DTYPES and tvm_available():
        return "tvm"
    return "reference"


BACKENDS = ("triton", "tvm")  # the ones backend="auto" chooses between on CUDA
# what each backend times for a direction: TVM tunes its whole backward as "bwd_kv"
_TIMED_PASSES = {("triton", "fwd"): ("fwd",), ("triton", "bwd"): ("bwd_kv", "bwd_q"),
                 ("tvm", "fwd"): ("fwd",), ("tvm", "bwd"): ("bwd_kv",)}


class BackendChoice(NamedTuple):
    backend: str
    times: dict[str, float | None]  # each backend's tuned time, ms, as compared
    gated: bool  # the times are the gated problem's (see faster_backend)


def faster_backend(snapshot, spec: KernelSpec, seqlen: int, fingerprint: dict) -> BackendChoice:
    """Which backend the tuning database `snapshot` measured faster for the direction of
    `spec` (its pass "fwd", or a backward pass: the whole backward) on the device `fingerprint`
    describes, and the times compared (None: some pass of it never tuned there, at the same
    lookup fallbacks as the configs). "tvm" only when both have times and TVM's is lower.
    Where one backend measured an ungated problem and the other only its gated class (the
    lookup's stand-in for Triton), the gate's cost would decide rather than the kernels: both
    are then compared gated."""
    times = {b: _backend_time(snapshot, spec, b, seqlen, fingerprint) for b in BACKENDS}
    gated = all(t is not None for t, _ in times.values()) and len(
        {stand_in for _, stand_in in times.values()}) > 1
    if gated:
        times = {b: _backend_time(snapshot, spec.replace(gated=True), b, seqlen, fingerprint)
                 for b in BACKENDS}
    tvm, tri = times["tvm"][0], times["triton"][0]
    return BackendChoice("tvm" if tvm is not None and tri is not None and tvm < tri
                         else "triton", {b: t for b, (t, _) in times.items()}, gated)


def _backend_time(snapshot, spec: KernelSpec, backend: str, seqlen: int,
                  fingerprint: dict) -> tuple[float | None, bool]:
    """One backend's tuned time for the direction of `spec` (None if some pass has no entry),
    and whether any pass's entry is the gated class standing in for an ungated problem."""
    from gfwagen.db.lookup import gated_stand_in

    direction = "fwd" if spec.pass_ == "fwd" else "bwd"
    total, stand_in = 0.0, False
    for pass_ in _TIMED_PASSES[(backend, direction)]:
        s = spec.replace(backend=backend, pass_=pass_)
        entry, _ = snapshot.lookup_entry(s, seqlen, fingerprint)
        if entry is None:
            return None, False
        total += entry.median_ms
        stand_in |= gated_stand_in(s, entry)
    return total, stand_in


@functools.lru_cache(maxsize=4096)
def _auto_choice(spec: KernelSpec, bucket: int, device: str) -> str:
    from gfwagen.db.fingerprint import device_fingerprint
    from gfwagen.db.lookup import get_snapshot

    return faster_backend(get_snapshot(), spec, bucket,
                          device_fingerprint(torch.device(device))).backend


@functools.cache
def _tvm_cuda_ready() -> bool:
    try:
        from gfwagen.backends import tvm_backend
    except Exception:
        return False
    return tvm_backend.HAVE_TVM and tvm_backend.cuda_runtime_available()


def cuda_auto_backend(direction: str, q, v, window, gated: bool, group: int,
                      varlen: bool = False) -> str:
    """backend="auto" on CUDA for one direction ("fwd" or "bwd"): "tvm" where faster_backend
    says so for this problem on this GPU (and TVM with its CUDA runtime imports), else
    "triton". The two directions choose separately: both backends keep the same lse
    contract, so either backward takes either forward's. Packed sequences (varlen) stay on
    Triton, which takes them in one launch: TVM runs them one sequence at a time, after
    reading cu_seqlens on the host (a synchronization)."""
    if varlen:
        return "triton"
    spec = _spec("triton", "fwd" if direction == "fwd" else "bwd_kv", q, v, window, gated,
                 group)
    if _auto_choice(spec, *_memo_keys(q.shape[1], q.device)) != "tvm":
        return "triton"
    return "tvm" if _tvm_cuda_ready() else "triton"


@functools.lru_cache(maxsize=4096)
def _stored_choice(spec: KernelSpec, bucket: int, device: str) -> KernelConfig | None:
    """The "bwd_ds" config where the database measured the stored-dS backward faster than
    its "bwd_kv" + "bwd_q" for this problem on this GPU (all three tuned, at the same
    sequence-length bucket and toolchain: times of different problem sizes, or measured by
    different timers, do not compare), else None."""
    from gfwagen.db.fingerprint import device_fingerprint
    from gfwagen.db.lookup import get_snapshot

    snap, fp = get_snapshot(), device_fingerprint(torch.device(device))
    stored, _ = snap.lookup_entry(spec.replace(pass_="bwd_ds"), bucket, fp)
    if stored is None:
        return None
    total = 0.0
    for pass_ in ("bwd_kv", "bwd_q"):
        entry, _ = snap.lookup_entry(spec.replace(pass_=pass_), bucket, fp)
        if (entry is None or entry.seqlen_bucket != stored.seqlen_bucket
                or entry.toolchain_key != stored.toolchain_key):
            return None
        total += entry.median_ms
    return stored.config if stored.median_ms < total else None


def _spec(backend, pass_, q, v, window, gated, group) -> KernelSpec:
    return KernelSpec(backend, pass_, q.shape[3], v.shape[3],
                      window_class(effective_window(window, q.shape[1]) or None),
                      dtype_name(q.dtype), gated, group)


def _fallback_config(spec: KernelSpec, seqlen_bucket: int, device_type: str) -> KernelConfig:
    if spec.backend == "tvm":
        from gfwagen.backends import tvm_backend

        if device_type == "cpu":
            return tvm_backend.DEFAULT_CPU_CONFIG
        return tvm_backend.default_cuda_config(spec)
    return default_config(spec, seqlen_bucket)


@functools.lru_cache(maxsize=4096)
def _lookup(spec: KernelSpec, seqlen_bucket: int, device: str) -> KernelConfig:
    """Database snapshot first (loaded once, never written), then the built-in default."""
    from gfwagen.db.fingerprint import device_fingerprint
    from gfwagen.db.lookup import get_snapshot

    dev = torch.device(device)
    cfg, _reason = get_snapshot().lookup(spec, seqlen_bucket, device_fingerprint(dev))
    return cfg if cfg is not None else _fallback_config(spec, seqlen_bucket, dev.type)


def forget_lookups() -> None:
    """Drop the memoized configs and choices: gfwagen.db.lookup.reset_snapshot calls it, as
    they came from the snapshot it drops."""
    for memo in (_lookup, _stored_choice, _auto_choice):
        memo.cache_clear()


def select_config(spec: KernelSpec, seqlen: int, device: torch.device) -> KernelConfig:
    """Tuned config for (device, spec, nearest seqlen bucket), else the built-in default.
    Memoized, so after the first call per problem it is a dict lookup (safe in CUDA graphs).
    CPU tensors consult the database only for the TVM kernels (what `gfwagen tune --gpu cpu`
    tunes); the reference and the Triton interpreter have nothing to tune."""
    if not _consults_database(spec, device):
        return default_config(spec, seqlen)
    bucket, dev = _memo_keys(seqlen, device)
    cfg = _lookup(spec, bucket, dev)
    if _unbuildable and (spec, cfg, dev) in _unbuildable:
        return _fallback_config(spec, bucket, device.type)
    return cfg


def _consults_database(spec: KernelSpec, device: torch.device) -> bool:
    return not interpreting() and (device.type != "cpu" or spec.backend == "tvm")


# (spec, config, device) of tuned configs whose Triton kernel did not build here
# (triton_backend.KernelBuildError): select_config passes over them to the default, and a
# "bwd_ds" one to the recomputing backward.
_unbuildable: set[tuple[KernelSpec, KernelConfig, str]] = set()


def _passed_over(spec: KernelSpec, err, seqlen: int, device: torch.device) -> None:
    """Note that err.config did not build for spec, and warn once; re-raise err where there
    is nothing to fall back to (the default itself failed)."""
    bucket, dev = _memo_keys(seqlen, device)
    default = None if spec.pass_ == "bwd_ds" else _fallback_config(spec, bucket, device.type)
    if err.config == default or (spec, err.config, dev) in _unbuildable:
        raise err
    _unbuildable.add((spec, err.config, dev))
    launch_plans.clear()
    fallback = "the recomputing backward" if default is None else f"the default {default}"
    warnings.warn(f"gfwagen: {err}. Running {fallback} for this problem on {dev} from now "
                  "on; the tuning database keeps its entry (re-tune it with gfwagen tune)",
                  RuntimeWarning, stacklevel=3)


def _memo_keys(seqlen: int, device: torch.device) -> tuple[int, str]:
    """The memoized lookups' keys: the sequence length rounded up to a power of two (the
    database buckets within it) and the device as "cpu" or "cuda:<index>"."""
    bucket = 1 << max(0, (int(seqlen) - 1).bit_length())
    if device.type == "cpu":
        return bucket, "cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return bucket, f"cuda:{index}"


def _segments(cu_seqlens, T):
    if cu_seqlens is None:
        return None
    from gfwagen.varlen import segment_bounds

    return segment_bounds(cu_seqlens, T)


def _per_sequence(cu_seqlens, fn, *tensors):
    """fn's results on each non-empty packed sequence, in order: each (tensor, dim) of
    `tensors` is sliced along its T dim `dim` (views, no copies; None stays None). For the
    TVM CPU kernels, which take one sequence per batch row: the host loop costs little next
    to CPU compute. The caller concatenates."""
    from gfwagen.varlen import lengths

    outs, start = [], 0
    for n in lengths(cu_seqlens):
        if n:
            outs.append(fn(*(t if t is None else t.narrow(dim, start, n)
                             for t, dim in tensors)))
        start += n
    return outs


def _sanitized(log_gate, backend: str):
    """The gate policy's clamp (gfwagen.gate.sanitize_log_gate), except where the fused gate
    sums (CUDA, both backends) apply it as they load the gate (a launch less per call)."""
    if log_gate is None or (backend in ("triton", "tvm") and gate_sums.use_fused(log_gate)):
        return log_gate
    return sanitize_log_gate(log_gate)


@dataclasses.dataclass
class Kept:
    """What a forward computed that its backward may take instead of computing it again: the
    Triton gate tables (two launches). The caller owns it (ops.EagerAttention keeps one per
    call in its autograd context); the backward recomputes when the forward ran elsewhere."""

    gate: tuple | None = None


def run_forward(q, k, v, log_gate, window, scale, backend, cu_seqlens=None,
                keep: Kept | None = None):
    auto = backend == "auto"
    backend = resolve_backend(backend, q.device, q.dtype)
    if backend == "reference":
        launch_plans.decline("the reference")
        log_gate = _sanitized(log_gate, backend)
        o, lse = reference.reference_forward(q, k, v, log_gate, window, scale,
                                             cu_seqlens=cu_seqlens)
        return o, lse.float()
    group = q.shape[2] // k.shape[2]
    if auto and q.is_cuda:
        backend = cuda_auto_backend("fwd", q, v, window, log_gate is not None, group,
                                    cu_seqlens is not None)
    log_gate = _sanitized(log_gate, backend)
    spec = _spec(backend, "fwd", q, v, window, log_gate is not None, group)
    if backend == "tvm":
        # (a launch plan records its launches: tvm_backend._launch)
        from gfwagen.backends.tvm_backend import tvm_forward

        cfg = select_config(spec, q.shape[1], q.device)

        def fwd(q, k, v, g):
            return tvm_forward(q, k, v, g, window, scale, cfg, target=_tvm_target(q))

        if cu_seqlens is None:
            return fwd(q, k, v, log_gate)
        outs = _per_sequence(cu_seqlens, fwd, (q, 1), (k, 1), (v, 1), (log_gate, 1))
        return (torch.cat([o for o, _ in outs], 1) if outs else q.new_empty(*q.shape[:3],
                                                                            v.shape[3]),
                torch.cat([lse for _, lse in outs], 2) if outs else
                q.new_empty(1, q.shape[2], 0, dtype=torch.float32))
    from gfwagen.backends import triton_backend

    if q.shape[0] > triton_backend.GRID_BATCH_MAX:  # (B = 1 when packed)
        parts = [run_forward(*_batch_rows(i, n, q, k, v, log_gate), window, scale, backend)
                 for i, n in _batch_chunks(q.shape[0], triton_backend.GRID_BATCH_MAX)]
        return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])
    segs = _segments(cu_seqlens, q.shape[1])
    gate = None
    while True:  # at most twice: the tuned config, then the default
        cfg = select_config(spec, q.shape[1], q.device)
        # (an empty problem launches nothing, the tables included; a forward that reads the
        # gate as key biases needs none, and its backward makes them)
        if gate is None and q.numel() and not triton_backend.reads_key_bias(
                q, log_gate, scale, cfg, segs):
            gate = triton_backend.gate_tables(log_gate)
        if keep is not None:
            keep.gate = gate
        try:
            return triton_backend.forward(q, k, v, log_gate, window, scale, cfg, segs, gate)
        except triton_backend.KernelBuildError as e:
            _passed_over(spec, e, q.shape[1], q.device)


def run_backward(do, q, k, v, o, lse, log_gate, window, scale, backend, cu_seqlens=None,
                 kept: Kept | None = None):
    auto = backend == "auto"
    backend = resolve_backend(backend, q.device, q.dtype)
    if backend == "reference":
        launch_plans.decline("the reference")
        log_gate = _sanitized(log_gate, backend)
        return reference.reference_backward(do, q, k, v, o, lse, log_gate, window, scale,
                                            cu_seqlens=cu_seqlens)
    group = q.shape[2] // k.shape[2]
    gated = log_gate is not None
    if auto and q.is_cuda:
        backend = cuda_auto_backend("bwd", q, v, window, gated, group, cu_seqlens is not None)
    log_gate = _sanitized(log_gate, backend)
    specs = {p: _spec(backend, p, q, v, window, gated, group)
             for p in ("bwd_kv", "bwd_q", "bwd_ds")}
    if backend == "tvm":
        launch_plans.decline("TVM")
        from gfwagen.backends.tvm_backend import tvm_backward

        cfg_kv, cfg_q = (select_config(specs[p], q.shape[1], q.device)
                         for p in ("bwd_kv", "bwd_q"))

        def bwd(do, q, k, v, o, lse, g):
            return tvm_backward(do, q, k, v, o, lse, g, window, scale, cfg_kv,
                                target=_tvm_target(q), config_q=cfg_q)

        if cu_seqlens is None:
            return bwd(do, q, k, v, o, lse, log_gate)
        outs = _per_sequence(cu_seqlens, bwd, (do, 1), (q, 1), (k, 1), (v, 1), (o, 1),
                             (lse, 2), (log_gate, 1))
        grads = []
        for i, like in enumerate((q, k, v, log_gate)):
            if like is None:
                grads.append(None)
            else:
                parts = [g[i] for g in outs]
                grads.append(torch.cat(parts, 1) if parts else torch.zeros_like(like))
        return tuple(grads)
    from gfwagen.backends import triton_backend

    if q.shape[0] > triton_backend.GRID_BATCH_MAX:  # (B = 1 when packed)
        parts = [run_backward(*_batch_rows(i, n, do, q, k, v, o, lse, log_gate), window,
                              scale, backend)
                 for i, n in _batch_chunks(q.shape[0], triton_backend.GRID_BATCH_MAX)]
        return tuple(None if parts[0][j] is None else torch.cat([p[j] for p in parts])
                     for j in range(4))
    segs = _segments(cu_seqlens, q.shape[1])
    while True:  # each pass's tuned config at most once, then its default
        stored = None
        if q.is_cuda and not interpreting():
            bucket, dev = _memo_keys(q.shape[1], q.device)
            stored = _stored_choice(specs["bwd_kv"], bucket, dev)
            if stored is not None and (specs["bwd_ds"], stored, dev) in _unbuildable:
                stored = None
        try:
            return triton_backend.backward_preferring_stored(
                do, q, k, v, o, lse, log_gate, window, scale,
                select_config(specs["bwd_kv"], q.shape[1], q.device),
                select_config(specs["bwd_q"], q.shape[1], q.device), stored, segs,
                kept.gate if kept is not None else None)
        except triton_backend.KernelBuildError as e:
            _passed_over(specs[e.pass_], e, q.shape[1], q.device)


def _batch_chunks(B: int, most: int):
    """(start, size) of consecutive batch slices of at most `most` entries."""
    return [(i, min(most, B - i)) for i in range(0, B, most)]


def _batch_rows(start: int, n: int, *tensors):
    """Each tensor's batch entries [start, start + n) (a view; None stays None)."""
    return [None if t is None else t.narrow(0, start, n) for t in tensors]


def _tvm_target(t: torch.Tensor) -> str:
    return "cuda" if t.is_cuda else "llvm"
