"""How a candidate is timed.

CudaEventTimer: warm-up (at least `warmup` calls and `warmup_ms` of work, which also takes
compilation out of the measurement), then `repeats` timed calls, each preceded by writing a
256 MiB buffer so that every repeat starts with a cold L2 (an H200 has 60 MiB of L2; the
kernels' inputs would otherwise stay resident between repeats and flatter the small shapes).
Each call is bracketed by its own pair of CUDA events, after a GPU sleep (torch.cuda._sleep)
long enough that the CPU has queued the call before the GPU reaches the start event: the
interval is then GPU time even when the host is busy (the tuner's compile workers, another
GPU's driver). Without it, measured on the H200 with 16 compile processes per GPU running,
the same S1 forward config timed 0.69 ms in one study and 0.86 ms in another, and tuned
backward configs looked 16% faster than they were (benchmarks/RESULTS.md). The result is the
median and the spread IQR / median of the repeats.

CpuTimer: the same on the CPU with perf_counter (the TVM llvm backend).

FakeTimer: a deterministic synthetic time computed from the config (no clock), for testing
the tuner end to end on a machine without a GPU. It still calls the candidate once, so
faults in the candidate surface as they would under a real timer.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable

from gfwagen.spec import KernelConfig, KernelSpec, stable_hash

FLUSH_BYTES = 256 * 1024 * 1024
# ~1 ms at the H200's 1.98 GHz: more than one launch of a pass takes the CPU under load
SLEEP_CYCLES = 2_000_000


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    spread: float  # interquartile range / median
    repeats: int


def summarize(times_ms: list[float]) -> Timing:
    med = statistics.median(times_ms)
    if len(times_ms) >= 4:
        q = statistics.quantiles(times_ms, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = max(times_ms) - min(times_ms)
    return Timing(med, iqr / med if med > 0 else 0.0, len(times_ms))


class CudaEventTimer:
    name = "cuda-events"

    def __init__(self, repeats: int = 30, warmup: int = 5, warmup_ms: float = 50.0,
                 flush_bytes: int = FLUSH_BYTES, sleep_cycles: int = SLEEP_CYCLES):
        self.repeats, self.warmup, self.warmup_ms = repeats, warmup, warmup_ms
        self.flush_bytes, self.sleep_cycles = flush_bytes, sleep_cycles
        self._flush = None

    def measure(self, fn: Callable[[], object], spec: KernelSpec | None = None,
                config: KernelConfig | None = None) -> Timing:
        import torch

        if self._flush is None:
            self._flush = torch.empty(self.flush_bytes, dtype=torch.int8, device="cuda")
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        # warm-up: a fixed count, then until warmup_ms of work has run
        start.record()
        for _ in range(self.warmup):
            fn()
        end.record()
        torch.cuda.synchronize()
        per_call = max(start.elapsed_time(end) / self.warmup, 1e-3)
        for _ in range(min(1000, int(self.warmup_ms / per_call))):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        for s, e in zip(starts, ends):
            torch.cuda._sleep(self.sleep_cycles)
            self._flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


class CpuTimer:
    name = "cpu-perf-counter"

    def __init__(self, repeats: int = 7, warmup: int = 2):
        self.repeats, self.warmup = repeats, warmup

    def measure(self, fn, spec=None, config=None) -> Timing:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return summarize(times)


class FakeTimer:
    """time = base * penalties that grow with the distance (in log2 steps) of each knob from
    a fixed optimum, times a small deterministic jitter from the config's key. The optimum is
    bm128 bn64 w8 s3 for every pass (TVM: bm32 bn32), so tests know what should win."""

    name = "fake"
    OPTIMUM = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}
    TVM_OPTIMUM = {"block_m": 32, "block_n": 32}

    def __init__(self, base_ms: float = 1.0):
        self.base_ms = base_ms

    def synthetic_ms(self, spec: KernelSpec, config: KernelConfig) -> float:
        opt = self.TVM_OPTIMUM if spec.backend == "tvm" else self.OPTIMUM
        t = self.base_ms * (1.3 if spec.pass_ != "fwd" else 1.0)
        for name, best in opt.items():
            v = getattr(config, name)
            dist = abs(math.log2(v) - math.log2(best)) if name != "num_stages" else \
                abs(v - best) / 2
            t *= 1.0 + 0.25 * dist
        # each template switch that is on costs 5% here, more than the jitter, so the
        # landscape keeps one optimum (OPTIMUM with every switch off)
        t *= 1.0 + 0.05 * sum(1 for _, v in config.extra if v is True)
        jitter = int(stable_hash(config.as_dict(), n=4), 16) / 0xFFFF  # [0, 1]
        return t * (1.0 + 0.01 * jitter)

    def measure(self, fn, spec: KernelSpec, config: KernelConfig) -> Timing:
        fn()
        return Timing(self.synthetic_ms(spec, config), 0.01, 1)
