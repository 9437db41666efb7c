"""How a candidate is timed.

CudaEventTimer: warm-up (at least `warmup` calls and `warmup_ms` of work, which also takes
compilation out of the measurement), then `repeats` timed calls back to back, each preceded by
writing a 256 MiB buffer so that every repeat starts with a cold L2 (an H200 has 60 MiB of L2;
the kernels' inputs would otherwise stay resident between repeats and flatter the small
shapes), and each bracketed by its own pair of CUDA events. One GPU sleep (torch.cuda._sleep)
comes first, long enough for the CPU to queue everything behind it (measured: the host's time
per call in the warm-up, with a margin), so the intervals are GPU time even when the host is
busy (the tuner's compile workers, another GPU's driver): without a lead, with 16 compile
processes per GPU running on the H200, the same S1 forward config timed 0.69 ms in one study
and 0.86 ms in another (benchmarks/RESULTS.md). After the sleep, untimed calls (`lead_ms` of
work) bring the GPU back to the clocks of sustained work before the timed ones: a sleep before
every timed call, as this timer did until session 13, measured bursts, which at S4 ranked the
gated 64x64 forward 6% ahead of the 128x128 one (2.17 against 2.31 ms) where back-to-back
calls and triton's do_bench put it 2-3% behind (2.34-2.37 against 2.30-2.31). The result is the
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
# GPU cycles per ms at the H200's 1.98 GHz boost (a slower clock only lengthens the sleep)
CYCLES_PER_MS = 2_000_000
# The lead sleep: the host's measured time to queue the calls behind it, times this margin,
# plus SLEEP_EXTRA_MS, at most SLEEP_MAX_MS; host time per call includes the flush and events.
SLEEP_MARGIN, SLEEP_EXTRA_MS, SLEEP_MAX_MS = 2.0, 1.0, 500.0
HOST_SAMPLE_CALLS = 16
# Untimed calls between the sleep and the timed ones, at most LEAD_MAX_CALLS so that the calls
# queued behind the sleep stay well inside CUDA's launch queue (about a thousand launches).
LEAD_MS, LEAD_MAX_CALLS = 50.0, 100
# A GPU left idle (compiling, the reference, a new study) also ran its first timed calls fast
# after the 50 ms warm-up (S4's 64x64 forward 2.16 ms, then 2.32 and 2.36 once the GPU had
# been busy about half a second, do_bench 2.30-2.37): after COLD_AFTER_S without a
# measurement, the warm-up runs COLD_WARMUP_MS instead (not yet timed on the GPU itself).
COLD_AFTER_S, COLD_WARMUP_MS = 1.0, 500.0


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
                 flush_bytes: int = FLUSH_BYTES, sleep_cycles: int | None = None,
                 lead_ms: float = LEAD_MS):
        """sleep_cycles: the lead sleep, fixed (None: from the host's measured pace)."""
        self.repeats, self.warmup, self.warmup_ms = repeats, warmup, warmup_ms
        self.flush_bytes, self.sleep_cycles, self.lead_ms = flush_bytes, sleep_cycles, lead_ms
        self._flush = None
        self._last_end = None  # perf_counter() at the end of the last measurement

    def measure(self, fn: Callable[[], object], spec: KernelSpec | None = None,
                config: KernelConfig | None = None) -> Timing:
        import torch

        if self._flush is None:
            self._flush = torch.empty(self.flush_bytes, dtype=torch.int8, device="cuda")
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        # warm-up: a fixed count (GPU time per call), then until warmup_ms of work has run,
        # queued as the timed calls are (host time per call)
        start.record()
        for _ in range(self.warmup):
            fn()
        end.record()
        torch.cuda.synchronize()
        per_call = max(start.elapsed_time(end) / self.warmup, 1e-3)
        cold = self._last_end is None or time.perf_counter() - self._last_end > COLD_AFTER_S
        n = max(1, min(2000, int((COLD_WARMUP_MS if cold else self.warmup_ms) / per_call)))
        # the host's pace from the first calls only: later ones may wait on a full launch queue
        sample, t0 = min(n, HOST_SAMPLE_CALLS), time.perf_counter()
        for i in range(n):
            if i == sample:
                host_ms = (time.perf_counter() - t0) * 1e3 / sample
            self._flush.zero_()
            start.record()
            fn()
            end.record()
        if n == sample:
            host_ms = (time.perf_counter() - t0) * 1e3 / sample
        torch.cuda.synchronize()
        lead = max(0, min(LEAD_MAX_CALLS, math.ceil(self.lead_ms / per_call)))
        sleep = self.sleep_cycles
        if sleep is None:
            ms = min(SLEEP_MAX_MS, SLEEP_MARGIN * host_ms * (lead + self.repeats)
                     + SLEEP_EXTRA_MS)
            sleep = int(ms * CYCLES_PER_MS)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        torch.cuda._sleep(sleep)
        for _ in range(lead):
            fn()
        for s, e in zip(starts, ends):
            self._flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        self._last_end = time.perf_counter()
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
