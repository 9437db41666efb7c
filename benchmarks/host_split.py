#!/usr/bin/env python3
"""Where the host time of gfwagen's calls goes, at a benchmark shape:

- the gated forward+backward, the gated forward and the ungated forward, with launch plans
  (gfwagen.launch_plans, the default on CUDA) and without (GFWAGEN_LAUNCH_PLANS=0), in
  alternating rounds in one process (a host's speed drifts within a run by more than some of
  these differences);
- the floor: an autograd function that only allocates what the op returns, the part of the
  host time that any implementation of this interface pays;
- without plans, the time inside gfwagen's main functions and each Triton launch, from timers
  around them (no cProfile, whose per-call cost inflates a Python-heavy path several-fold).

    PYTHONPATH=$PWD python benchmarks/host_split.py --shape S5

Host time is the CPU's time to issue calls back to back with the GPU left behind; "with GPU"
adds the wait for the GPU at the end of each round.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SHAPES, make_inputs  # noqa: E402

import gfwagen  # noqa: E402
from gfwagen import dispatch, gate_sums, ops  # noqa: E402
from gfwagen.backends import triton_backend  # noqa: E402

# (module, function): the op's path from the public call down to the launchers
TIMED = [(ops, "_fwd_impl"), (ops, "_bwd_impl"), (dispatch, "run_forward"),
         (dispatch, "run_backward"), (dispatch, "select_config"), (triton_backend, "gate_tables"),
         (triton_backend, "forward"), (triton_backend, "prepare_backward"),
         (triton_backend, "backward_kv"), (triton_backend, "backward_q"),
         (gate_sums, "gate_grad")]


def rounds(fn, calls, n_rounds):
    """(median host ms per call, median ms per call with the GPU) over n_rounds rounds."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    host, total = [], []
    for _ in range(n_rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host.append((time.perf_counter() - t0) / calls * 1e3)
        torch.cuda.synchronize()
        total.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(host), statistics.median(total)


@contextlib.contextmanager
def patched(target, name, value):
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


@contextlib.contextmanager
def timers(acc):
    """Accumulates seconds and calls per name in acc while active: gfwagen's functions in
    TIMED and every Triton launch (as "launch <kernel>")."""
    from triton.runtime.jit import JITFunction

    def wrap(name, f):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                s, n = acc.get(name, (0.0, 0))
                acc[name] = (s + time.perf_counter() - t0, n + 1)
        return timed

    run = JITFunction.run

    def launch(self, *a, **kw):
        return wrap(f"launch {self.fn.__name__}", run)(self, *a, **kw)

    with contextlib.ExitStack() as stack:
        for mod, name in TIMED:
            stack.enter_context(patched(mod, name, wrap(name, getattr(mod, name))))
        stack.enter_context(patched(JITFunction, "run", launch))
        yield


class _AllocationsOnly(torch.autograd.Function):
    """What the op's interface costs with no work behind it: its outputs allocated."""

    @staticmethod
    def forward(ctx, q, k, v, g):
        ctx.save_for_backward(q, k, v, g)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, do):
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="S5", choices=sorted(SHAPES))
    p.add_argument("--calls", type=int, default=60)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)

    s = SHAPES[a.shape]
    q, k, v, g, do = make_inputs(s, torch.bfloat16)
    calls = {
        "gated f+b": lambda: torch.autograd.grad(gfwagen.attention(q, k, v, g, window=s.W),
                                                 (q, k, v, g), do),
        "gated fwd": lambda: gfwagen.attention(q, k, v, g, window=s.W),
        "ungated fwd": lambda: gfwagen.attention(q, k, v, None, window=s.W),
    }
    floor = {"floor f+b": lambda: torch.autograd.grad(_AllocationsOnly.apply(q, k, v, g),
                                                      (q, k, v, g), do)}
    plans = {"plans": "auto", "no plans": "0"}
    times: dict = {}
    for r in range(a.rounds):
        for label, mode in (plans.items() if r % 2 == 0 else reversed(plans.items())):
            os.environ[gfwagen.launch_plans.PLANS_ENV] = mode
            for name, fn in calls.items():
                times.setdefault((name, label), []).append(rounds(fn, a.calls, 1))
        for name, fn in floor.items():
            times.setdefault((name, ""), []).append(rounds(fn, a.calls, 1))
    os.environ.pop(gfwagen.launch_plans.PLANS_ENV)
    print(f"{a.shape}: host ms per call (median of {a.rounds} rounds of {a.calls} calls)")
    for (name, label), ts in times.items():
        h = statistics.median(t[0] for t in ts)
        t = statistics.median(t[1] for t in ts)
        print(f"  {name:12s} {label:9s} host {h:.3f}  with GPU {t:.3f}", flush=True)

    os.environ[gfwagen.launch_plans.PLANS_ENV] = "0"
    acc = {}
    with timers(acc):
        rounds(calls["gated f+b"], a.calls, 1)
    os.environ.pop(gfwagen.launch_plans.PLANS_ENV)
    n = a.calls + 3
    print("no plans, inclusive host time per gated f+b, timers on:")
    for name, (sec, ncalls) in sorted(acc.items(), key=lambda kv: -kv[1][0]):
        print(f"  {name:42s} {sec / n * 1e3:7.3f} ms  x{ncalls / n:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
