#!/usr/bin/env python3
"""Where the host time of one gated forward+backward goes, at a benchmark shape: the call as
is, then with Triton's C launcher stubbed out (the launches still bound and keyed), then with
`JITFunction.run` stubbed out (no Triton at all); and the time spent inside gfwagen's main
functions and each Triton launch, from timers around them (no cProfile, whose per-call cost
inflates a Python-heavy path several-fold).

    PYTHONPATH=$PWD python benchmarks/host_split.py --shape S5

The differences between the three levels are the launches' cost: what fewer launches or a
leaner launcher could win. Host time is the CPU's time to issue calls back to back with the
GPU left behind; "with GPU" adds the wait for the GPU at the end of each round.
"""

from __future__ import annotations

import argparse
import contextlib
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


def compiled_kernels():
    """Every compiled Triton kernel this process has launched."""
    import gc

    from triton.runtime.jit import JITFunction

    return [k for obj in gc.get_objects() if isinstance(obj, JITFunction)
            for caches in obj.device_caches.values() for k in caches[0].values()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="S5", choices=sorted(SHAPES))
    p.add_argument("--calls", type=int, default=60)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    from triton.runtime.jit import JITFunction

    s = SHAPES[a.shape]
    q, k, v, g, do = make_inputs(s, torch.bfloat16)

    def fwdbwd():
        o = gfwagen.attention(q, k, v, g, window=s.W)
        torch.autograd.grad(o, (q, k, v, g), do)

    def show(label):
        h, t = rounds(fwdbwd, a.calls, a.rounds)
        print(f"{label:44s} host {h:.3f} ms per f+b, with GPU {t:.3f}", flush=True)

    show("as is")
    acc = {}
    with timers(acc):
        rounds(fwdbwd, a.calls, 1)
    n = a.calls + 3
    print("inclusive host time per f+b, timers on:")
    for name, (sec, calls) in sorted(acc.items(), key=lambda kv: -kv[1][0]):
        print(f"  {name:42s} {sec / n * 1e3:7.3f} ms  x{calls / n:.0f}")
    kernels = [kern for kern in compiled_kernels() if getattr(kern, "_run", None) is not None]
    saved = [kern._run for kern in kernels]
    for kern in kernels:  # the launcher only: binding, keys and the cache lookup still run
        kern._run = lambda *args, **kw: None
    try:
        show("Triton's C launcher stubbed")
    finally:
        for kern, r in zip(kernels, saved, strict=True):
            kern._run = r
    with patched(JITFunction, "run", lambda self, *args, **kw: None):
        show("JITFunction.run stubbed (no Triton)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
