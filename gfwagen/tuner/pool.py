"""The worker processes of one tuner driver: the timing worker, and a pool of warm workers
that compile a batch of candidates in parallel.

One Triton compile takes seconds of CPU while the GPU would sit idle, so the study asks a
batch of trials at once and the pool warms (compiles) the batch's new configs on
`compile_jobs` processes at the same time; the single timing worker then checks and times
them one at a time, loading the binaries from Triton's on-disk cache. The two phases never
overlap, so no warm-up launch runs on the GPU while a candidate is being timed.

A warm worker that crashes, hangs or hits a CUDA error is replaced on its next request
(CandidateWorker does that), and its candidate is still tried by the timing worker, which
records whatever happens as the trial's result: warming is only ever a head start.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

from gfwagen.spec import KernelConfig, Problem
from gfwagen.tuner.worker import CandidateWorker, Result


class Workers:
    """The timing worker plus `compile_jobs` warm workers (none when compile_jobs <= 1).
    Reusable across studies: a worker keeps its process, CUDA context and inputs until the
    problem changes."""

    def __init__(self, mode: str, timeout: float = 120.0, device: int | None = None,
                 compile_jobs: int = 1):
        self.timing = CandidateWorker(mode, timeout=timeout, device=device)
        self.pool = [CandidateWorker(mode, timeout=timeout, device=device)
                     for _ in range(compile_jobs if compile_jobs > 1 else 0)]

    def warm(self, problem: Problem, backend: str, pass_: str,
             configs: list[KernelConfig]) -> list[Result]:
        """Run each config once on the pool (all in parallel when the pool is as large as
        the list); one Result per config, in order. Without a pool: nothing to do. The timing
        worker is started meanwhile, so its start-up overlaps the compiles."""
        if not self.pool or not configs:
            return [Result("ok", reason="not warmed") for _ in configs]
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for i, cfg in enumerate(configs):
            todo.put((i, cfg))
        out: list[Result | None] = [None] * len(configs)

        def drain(w: CandidateWorker) -> None:
            # one thread per worker process: the threads only wait on pipes (no GIL held)
            while True:
                try:
                    i, cfg = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    out[i] = w.run(problem, backend, pass_, cfg, warm=True)
                except Exception as e:  # the worker did not start: leave the rest of this
                    out[i] = Result("failed", reason=f"{type(e).__name__}: {e}")  # batch to
                    return  # the others (a start can take startup_timeout, per config)

        busy = self.pool[:len(configs)]
        starter = threading.Thread(target=self._start_timing, daemon=True)
        starter.start()
        ex = ThreadPoolExecutor(len(busy))
        try:
            list(ex.map(drain, busy))
        except BaseException:  # Ctrl-C: do not wait out the compiles in flight
            while not todo.empty():
                todo.get_nowait()
            for w in busy:
                w.kill()
            raise
        finally:
            ex.shutdown(wait=True)
        starter.join()
        return [r if r is not None else Result("failed", reason="not run") for r in out]

    def _start_timing(self) -> None:
        try:
            self.timing.ensure_started()
        except Exception:  # noqa: BLE001 - the timing worker's run() retries and reports it
            pass

    def close(self) -> None:
        workers = [self.timing, *self.pool]
        # Every worker told first, then each waited for: they exit (CUDA contexts torn down)
        # side by side rather than one after another.
        for w in workers:
            w.release()
        for w in workers:
            w.close()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
