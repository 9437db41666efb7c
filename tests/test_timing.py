"""CudaEventTimer's schedule on a simulated GPU clock (CPU only): one sleep before everything
timed, untimed lead calls, timed calls back to back, the long warm-up only when cold."""

import pytest
import torch

from gfwagen.tuner import timing


class SimGPU:
    """A stream as a clock: each fn call and flush takes fixed GPU time, a sleep its cycles."""

    def __init__(self, call_ms):
        self.t, self.call_ms, self.log = 0.0, call_ms, []

    def fn(self):
        self.t += self.call_ms
        self.log.append("fn")

    def event(self, enable_timing=True):
        gpu = self

        class Event:
            def record(self):
                self.at = gpu.t

            def elapsed_time(self, other):
                return other.at - self.at

        return Event()

    def sleep(self, cycles):
        self.t += cycles / timing.CYCLES_PER_MS
        self.log.append(("sleep", cycles))


@pytest.fixture
def sim(monkeypatch):
    gpu = SimGPU(call_ms=2.0)
    monkeypatch.setattr(torch.cuda, "Event", gpu.event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "_sleep", gpu.sleep)
    return gpu


def _timer(**kw):
    t = timing.CudaEventTimer(repeats=10, **kw)
    t._flush = torch.empty(16, dtype=torch.int8)  # no CUDA buffer on this machine
    return t


def test_one_sleep_then_lead_then_timed_calls(sim):
    t = _timer()
    res = t.measure(sim.fn)
    assert res.median_ms == pytest.approx(2.0) and res.repeats == 10
    sleeps = [i for i, x in enumerate(sim.log) if x != "fn"]
    assert len(sleeps) == 1, "one sleep, not one per timed call"
    after = sim.log[sleeps[0] + 1:]
    lead = min(timing.LEAD_MAX_CALLS, -(-int(timing.LEAD_MS) // 2))
    assert after == ["fn"] * (lead + 10), "lead calls, then the timed ones, nothing between"
    assert sim.log[sleeps[0]][1] <= timing.SLEEP_MAX_MS * timing.CYCLES_PER_MS


def test_cold_gpu_gets_the_long_warm_up(sim):
    t = _timer()
    t.measure(sim.fn)
    cold = sim.log.index(next(x for x in sim.log if x != "fn"))
    sim.log.clear()
    t.measure(sim.fn)  # right after: warm
    warm = sim.log.index(next(x for x in sim.log if x != "fn"))
    assert cold == t.warmup + min(2000, int(timing.COLD_WARMUP_MS / 2.0))
    assert warm == t.warmup + int(t.warmup_ms / 2.0)


def test_fixed_sleep_and_no_lead(sim):
    t = _timer(sleep_cycles=123, lead_ms=0)
    t.measure(sim.fn)
    i = sim.log.index(("sleep", 123))
    assert sim.log[i + 1:] == ["fn"] * 10


def test_sleep_follows_the_hosts_pace_before_the_queue_fills(sim):
    """The lead sleep comes from the host's time per call over the first calls only: later
    ones may wait on CUDA's full launch queue, which says nothing about the host."""
    import time

    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.001 if len(calls) <= timing.HOST_SAMPLE_CALLS + 5 else 0.02)
        sim.fn()

    t = _timer()
    t._last_end = time.perf_counter()  # warm: the short warm-up
    t.measure(fn)
    cycles = next(x for x in sim.log if x != "fn")[1]
    lead = min(timing.LEAD_MAX_CALLS, -(-int(timing.LEAD_MS) // 2))
    # ~1.1 ms per call (sleep granularity), never the 20 ms the later calls took
    assert cycles / timing.CYCLES_PER_MS < 4 * (lead + 10) + timing.SLEEP_EXTRA_MS
    assert cycles / timing.CYCLES_PER_MS > 2 * 1.0 * (lead + 10)
