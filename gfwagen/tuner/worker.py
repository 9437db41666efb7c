"""Runs candidates in a separate process: build inputs for the Problem, run the candidate
pass, check it against the reference (fwd: o; bwd_kv: dk, dv; bwd_q: dq; bwd_ds, the whole
stored-dS backward: dq, dk, dv and the gate's gradient) BEFORE timing it,
then time it. The tuner talks to it with one JSON line per request and per answer.

The worker process is kept between candidates (torch's import, the CUDA context, the inputs
and the reference outputs are paid for once per problem) and replaced whenever a candidate
takes it down: a compile error or a wrong result is an answer (status failed / wrong); a
crash (the process exits: segfault, os._exit, an abort) is reported as failed with the exit
status and the tail of its stderr; no answer within the timeout kills the process group
(status timeout). After a CUDA error the context is unusable, so the worker answers and
exits, and the next candidate gets a fresh one.

Modes: "cuda" (Triton on the GPU, CUDA-event timing), "cpu" (TVM llvm, perf_counter) and
"fake" (the candidate is the chunked PyTorch reference with the config's tiles as its chunk
sizes, on a shrunken problem on the CPU, timed by the FakeTimer: the whole pipeline without
a GPU and without Triton's interpreter).

A warm request ({"warm": true}) only runs the candidate once on the same inputs and
answers: no check, no timing. The tuner's pool of warm workers uses it to compile a batch of
candidates in parallel; Triton's on-disk cache then holds the binaries, so the timing worker
only loads them. It builds the same inputs as a timed request because Triton specializes a
kernel on its arguments (integers equal to 1 or divisible by 16, pointer alignment): other
shapes could compile a different binary and miss the cache. A backward candidate's o and
lse are zeros of the reference's shapes there (_Session.stand_in_forward), not the float64
reference, which only the timing worker computes.

Test hook: GFWAGEN_TUNER_INJECT='[{"match": {"block_m": 32}, "fault": "crash"}]' makes the
worker fail on matching configs: "compile" (raises before running), "crash" (os._exit(7)),
"hang" (sleeps forever), "wrong" (perturbs the result). A rule with "on": "warm" (or
"time") applies only to warm (or timed) requests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gfwagen.spec import KernelConfig, Problem

MODES = ("cuda", "cpu", "fake")
TOLERANCE = {"bf16": 2e-2, "fp16": 4e-3, "fp32": 2e-4}  # ||a - e|| / ||e||
FAKE_MAX_T = 64
INJECT_ENV = "GFWAGEN_TUNER_INJECT"


@dataclasses.dataclass
class Result:
    status: str  # ok | failed | wrong | timeout
    median_ms: float | None = None
    spread: float | None = None
    reason: str = ""
    repeats: int = 0


# ---- inside the worker process ---------------------------------------------------------------

class _Session:
    """Per-process state: inputs and reference outputs per (problem, pass)."""

    def __init__(self, mode: str):
        import torch

        self.torch = torch
        self.mode = mode
        if mode == "fake":
            torch.set_num_threads(1)  # tiny tensors: threads only add contention
        self.device = "cuda" if mode == "cuda" else "cpu"
        self.inputs: dict = {}
        self.expected: dict = {}
        from gfwagen.tuner import timing

        self.timer = {"cuda": timing.CudaEventTimer, "cpu": timing.CpuTimer,
                      "fake": timing.FakeTimer}[mode]()

    def problem_for_check(self, p: Problem) -> Problem:
        if self.mode != "fake":
            return p
        return dataclasses.replace(p, batch=1, seqlen=min(p.seqlen, FAKE_MAX_T), heads=p.group,
                                   kv_heads=1)

    def get_inputs(self, p: Problem):
        key = json.dumps(p.as_dict(), sort_keys=True)
        if key not in self.inputs:
            self.inputs.clear()
            self.expected.clear()
            torch = self.torch
            if self.device == "cuda":
                # the last problem's blocks back to the driver: the other workers on this GPU
                # (a pool of warm workers) allocate theirs meanwhile
                torch.cuda.empty_cache()
            from gfwagen.spec import DTYPES

            g = torch.Generator(device="cpu").manual_seed(1234)
            dt = DTYPES[p.dtype]

            def rnd(*shape):
                return torch.randn(*shape, generator=g).to(device=self.device, dtype=dt)

            q = rnd(p.batch, p.seqlen, p.heads, p.head_dim)
            k = rnd(p.batch, p.seqlen, p.kv_heads, p.head_dim)
            v = rnd(p.batch, p.seqlen, p.kv_heads, p.value_dim)
            do = rnd(p.batch, p.seqlen, p.heads, p.value_dim)
            lg = None
            if p.gated:
                lg = torch.nn.functional.logsigmoid(
                    torch.randn(p.batch, p.seqlen, p.heads, generator=g) + 3.0).to(self.device)
            self.inputs[key] = dict(q=q, k=k, v=v, do=do, log_gate=lg,
                                    window=p.window or None, scale=p.head_dim ** -0.5)
        return self.inputs[key]

    def get_forward(self, p: Problem, x: dict) -> dict:
        """The reference's o and lse: what the backward candidates take as inputs (a warm
        request needs only these, not the reference gradients)."""
        key = json.dumps(p.as_dict(), sort_keys=True)
        if key not in self.expected:
            from gfwagen.reference import reference_forward

            o, lse = reference_forward(x["q"], x["k"], x["v"], x["log_gate"], x["window"],
                                       x["scale"])
            # contiguous, as the op's forward hands its o to the backward (the reference's
            # is [B, T, H, Dv] over [B, H, T, Dv] storage, which the stored-dS pass reads)
            self.expected[key] = dict(o=o.contiguous(), lse=lse.float())
        return self.expected[key]

    def stand_in_forward(self, p: Problem) -> dict:
        """o and lse of the reference's shapes, dtypes and strides, all zeros, for a warm
        request: it only compiles and runs the candidate once, and Triton specializes on those,
        not on values. With the float64 reference on every warm worker of the pool, a tune of
        the full-causal classes (T = 8192) ran the H200 out of memory: each worker held
        17.7 GiB (session 32)."""
        torch = self.torch
        from gfwagen.spec import DTYPES

        o = torch.zeros(p.batch, p.seqlen, p.heads, p.value_dim, dtype=DTYPES[p.dtype],
                        device=self.device)
        lse = torch.zeros(p.batch, p.heads, p.seqlen, dtype=torch.float32, device=self.device)
        return dict(o=o, lse=lse)

    def get_expected(self, p: Problem, x: dict) -> dict:
        ref = self.get_forward(p, x)
        if "dq" not in ref:
            from gfwagen.reference import reference_backward

            dq, dk, dv, dg = reference_backward(x["do"], x["q"], x["k"], x["v"], ref["o"],
                                                ref["lse"], x["log_gate"], x["window"],
                                                x["scale"])
            ref.update(dq=dq, dk=dk, dv=dv, dg=dg)
        return ref

    def candidate(self, p: Problem, backend: str, pass_: str, cfg: KernelConfig, x, ref):
        """(fn, outputs): fn runs the pass once; outputs() names the tensors to check."""
        a = (x["q"], x["k"], x["v"])
        g, w, s = x["log_gate"], x["window"], x["scale"]
        if self.mode == "fake":
            from gfwagen.reference import reference_backward, reference_forward

            box = {}
            if pass_ == "fwd":
                def fn():
                    box["o"] = reference_forward(*a, g, w, s, chunk=cfg.block_m)[0]
            else:
                chunk = cfg.block_n if pass_ in ("bwd_kv", "bwd_ds") else cfg.block_m

                def fn():
                    dq, dk, dv, dg = reference_backward(x["do"], *a, ref["o"], ref["lse"], g,
                                                        w, s, chunk=chunk)
                    box.update(dq=dq, dk=dk, dv=dv)
                    if pass_ == "bwd_ds" and dg is not None:
                        box["dg"] = dg
            return fn, lambda: box
        if backend == "tvm":
            from gfwagen.backends.tvm_backend import tvm_backward, tvm_forward

            box = {}
            if pass_ == "fwd":
                def fn():
                    box["o"] = tvm_forward(*a, g, w, s, config=cfg)[0]
            else:  # one config for both backward kernels: the whole backward is timed
                def fn():
                    dq, dk, dv, _ = tvm_backward(x["do"], *a, ref["o"], ref["lse"], g, w, s,
                                                 config=cfg)
                    box.update(dq=dq, dk=dk, dv=dv)
            return fn, lambda: box
        from gfwagen.backends import triton_backend as tb

        if pass_ == "fwd":
            box = {}

            def fn():
                box["o"] = tb.forward(*a, g, w, s, cfg)[0]
            return fn, lambda: box
        if pass_ == "bwd_ds":  # delta, dk/dv storing dS, dq from it: as the op runs it
            box = {}
            kv, q = tb.stored_configs(cfg)

            def fn():
                grads = tb.backward(x["do"], *a, ref["o"], ref["lse"], g, w, s, kv, q,
                                    stored=True)
                # the gate's gradient too: its row sums come from this pass's own product
                box.update((k, t) for k, t in zip(("dq", "dk", "dv", "dg"), grads)
                           if t is not None)
            return fn, lambda: box
        st = tb.prepare_backward(x["do"], *a, ref["o"], ref["lse"], g, w, s)
        if pass_ == "bwd_kv":
            return (lambda: tb.backward_kv(st, cfg)), lambda: {"dk": st.dk, "dv": st.dv}
        return (lambda: tb.backward_q(st, cfg)), lambda: {"dq": st.dq}

    def run(self, req: dict) -> dict:
        problem = Problem(**req["problem"])
        backend, pass_ = req["backend"], req["pass"]
        cfg = KernelConfig.from_dict(req["config"])
        warm = bool(req.get("warm"))
        fault = _injected(cfg, "warm" if warm else "time")
        p = self.problem_for_check(problem)
        x = self.get_inputs(p)
        ref = self.stand_in_forward(p) if warm else self.get_expected(p, x)
        if fault == "compile":
            raise RuntimeError("injected compile error")
        if fault == "crash":
            os._exit(7)
        if fault == "hang":
            while True:
                time.sleep(60)
        fn, outputs = self.candidate(p, backend, pass_, cfg, x, ref)
        fn()
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        if warm:
            return {"status": "ok"}
        got = outputs()
        if fault == "wrong":
            got = {k: v + 1.0 for k, v in got.items()}
        for name, t in got.items():
            err = _rel_err(t, ref[name])
            if not err <= TOLERANCE[p.dtype]:
                return {"status": "wrong", "reason": f"{name}: relative error {err:.3g} > "
                                                     f"{TOLERANCE[p.dtype]:g} vs the reference"}
        spec = p.spec(backend if backend != "reference" else "triton", pass_)
        t = self.timer.measure(fn, spec, cfg)
        return {"status": "ok", "median_ms": t.median_ms, "spread": t.spread,
                "repeats": t.repeats}


def _rel_err(a, e) -> float:
    # On the tensors' device: on the host, the float64 copies and norms of one S1 output
    # (67M values) take 1.1 s (2 cores), about what timing the candidate takes; the S1
    # forward sweep spent 1.4 s a config per GPU.
    a, e = a.detach(), e.detach().to(a.device)
    if a.shape != e.shape:
        return float("inf")
    if not bool(a.isfinite().all()):
        return float("nan")
    a, e = a.double(), e.double()
    n = e.norm().item()
    return (a - e).abs().max().item() if n == 0 else ((a - e).norm() / n).item()


def _injected(cfg: KernelConfig, kind: str) -> str | None:
    """The fault the test hook asks for on `cfg` in a `kind` ("warm" or "time") request."""
    spec = os.environ.get(INJECT_ENV)
    if not spec:
        return None
    d = cfg.as_dict()
    for rule in json.loads(spec):
        if rule.get("on", kind) == kind and all(d.get(k) == v
                                                for k, v in rule["match"].items()):
            return rule["fault"]
    return None


def _is_fatal(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}"
    return "CUDA error" in text or "AcceleratorError" in text or "illegal" in text.lower()


def serve(mode: str) -> int:
    """The worker's main loop: requests on stdin, answers on the original stdout; anything
    the libraries print goes to stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    session = _Session(mode)
    out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        fatal = False
        try:
            ans = session.run(req)
        except Exception as e:  # a candidate's failure is an answer, not the worker's
            first = (str(e).strip().splitlines() or [""])[0][:300]
            ans = {"status": "failed", "reason": f"{type(e).__name__}: {first}"}
            fatal = session.device == "cuda" and _is_fatal(e)
        ans["id"], ans["fatal"] = req.get("id"), fatal
        out.write(json.dumps(ans) + "\n")
        if fatal:
            return 0
    return 0


# ---- in the tuner's process ----------------------------------------------------------------

class CandidateWorker:
    """A worker subprocess, (re)started on demand. `device`: a CUDA index for the worker's
    CUDA_VISIBLE_DEVICES, or None to inherit."""

    def __init__(self, mode: str, timeout: float = 120.0, device: int | None = None,
                 startup_timeout: float = 120.0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode, self.timeout, self.device = mode, timeout, device
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self._buf = b""
        self._n = 0
        self._log = None

    # lifetime
    def start(self) -> None:
        env = dict(os.environ)
        if self.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.device)
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gfwagen.tuner.worker", self.mode], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, env=env, start_new_session=True,
            cwd=str(Path(__file__).resolve().parents[2]))
        self._buf = b""
        line = self._readline(time.monotonic() + self.startup_timeout)
        if not line or not json.loads(line).get("ready"):
            if line is None:
                self._kill()
                why = f"no answer within {self.startup_timeout:g} s"
            else:
                why = self._exit_reason() if not line else line
            self.close()
            raise RuntimeError(f"tuner worker did not start: {why}")

    def release(self) -> None:
        """Close the worker's input, which it takes as the signal to exit; close() waits."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.release()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._kill()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def kill(self) -> None:
        """SIGKILL the worker from another thread: the thread waiting on it sees EOF."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _kill(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def _readline(self, deadline: float) -> str | None:
        """One line from the worker; "" on EOF (it exited), None when the deadline passes."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return ""
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def _stderr_tail(self, n: int = 3) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        lines = [ln.strip() for ln in self._log.read().decode(errors="replace").splitlines()
                 if ln.strip()]
        return " | ".join(lines[-n:])[-400:]

    def _exit_reason(self) -> str:
        rc = self.proc.wait()
        if rc < 0:
            try:
                what = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                what = f"killed by signal {-rc}"
        else:
            what = f"exited with status {rc}"
        tail = self._stderr_tail()
        return f"worker {what}" + (f"; stderr: {tail}" if tail else "")

    def ensure_started(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.close()
            self.start()

    def run(self, problem: Problem, backend: str, pass_: str, config: KernelConfig,
            warm: bool = False) -> Result:
        """Check and time `config`; warm=True: only run it once (compile), see the module
        docstring. Either way a crash, hang or CUDA error costs only this worker process."""
        self.ensure_started()
        self._n += 1
        req = {"id": self._n, "problem": problem.as_dict(), "backend": backend, "pass": pass_,
               "config": config.as_dict()}
        if warm:
            req["warm"] = True
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            reason = self._exit_reason()
            self.close()
            return Result("failed", reason=reason)
        line = self._readline(time.monotonic() + self.timeout)
        if line is None:
            self._kill()
            self.close()
            return Result("timeout", reason=f"no result within {self.timeout:g} s; "
                                             "worker killed")
        if not line:  # EOF: the candidate took the worker down
            reason = self._exit_reason()
            self.close()
            return Result("failed", reason=reason)
        ans = json.loads(line)
        if ans.get("fatal"):  # the worker exits after a CUDA error: let it go now
            self.close()
        return Result(ans["status"], ans.get("median_ms"), ans.get("spread"),
                      ans.get("reason", ""), ans.get("repeats", 0))


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
