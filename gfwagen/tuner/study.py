"""The Optuna study: one per (problem, backend, pass), so the forward and each backward pass
are tuned separately (they are separate kernels with separate configs).

- TPESampler(multivariate=True) with trial constraints (Trial.set_constraint, which
  Optuna 5 reads in place of the deprecated constraints_func): a trial's constraints are the
  resource model's [shared memory, registers] excess (space.violations) and +1 when the
  candidate failed, was wrong or timed out, so the sampler learns to avoid all three.
- Batched ask/tell: `compile_jobs` trials are asked at once (constant_liar=True, so the
  sampler treats the batch's running trials as bad and spreads the batch out), their new
  feasible configs are compiled in parallel by the warm pool (pool.py), then checked and
  timed one at a time by the single timing worker, and told. compile_jobs=1: one at a time,
  no pool.
- Sweep (TuneJob.sweep): every feasible config of the space (space.enumerate_configs) is
  enqueued into its own study, named with a "-sweep" suffix so it never mixes with the TPE
  study; tuner/compare.py sets the two side by side.
- Trial 0 is the heuristic default (study.enqueue_trial), so every study measures what the
  op would run untuned, and "speed-up over the default" is read off the same study.
- A TPE study's trials (search.py): the best configs of the nearest problems the database
  already holds (warm start) and an initial design of one config per tile, both enqueued
  after the default, then TPE, then each driver's last quarter on the untried pipelines of the
  best tiles. n_trials counts measurements (configs compiled, checked and timed): a repeat
  answered from the study and a config the resource model prunes cost no GPU time and do
  not count, up to ASK_LIMIT asks per measurement.
- Every trial that measures something is recorded in the TuningDB with its status (configs
  the resource model prunes are recorded as 'failed' with the estimate as reason, without
  compiling); a config the study already measured is answered from the study, not rerun.
- Duel (TuneJob.duel = N): after the search, the two fastest configs are timed N more times
  each, alternately, outside the study, and up to 2N more while their medians lie within
  their timings' spread (duel_settled); the TuningDB pools each config's timings by median,
  so a close call rests on more than one timing each.
- Storage: a JournalStorage file per study under cache_root()/studies by default (this
  is also what lets --resume continue a study and --devices run one driver process per GPU
  on ONE study); `storage` = an RDB URL (postgresql://...) joins a study shared by many
  hosts, each recording its own trials in its own TuningDB. A journal study is reset only
  when no other driver on this host is running it (lease.py); otherwise a fresh run joins it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

from gfwagen.spec import KernelConfig, Problem
from gfwagen.tuner import search, space
from gfwagen.tuner.lease import journal_lease
from gfwagen.tuner.pool import Workers

PENALTY_MS = 1e9  # objective value of a trial without a measurement (constraints mark it)
ASK_LIMIT = 10  # asks per measurement before a study whose space is used up stops
# The device a fake-timer run is recorded under: never a real machine's key.
FAKE_DEVICE = {"kind": "cpu", "name": "fake-timer", "compute_capability": None, "sm_count": None,
               "memory_bytes": None, "driver_version": None, "cuda_version": None,
               "processor": None}


@dataclasses.dataclass
class TuneJob:
    problem: Problem
    backend: str
    pass_: str
    n_trials: int
    mode: str = "cuda"  # cuda | cpu | fake (see worker.MODES) | replay (replay.py)
    timeout: float = 120.0  # per candidate, compile included
    db_path: str | None = None
    storage: str | None = None  # RDB URL or journal file path; None: the default journal
    study_name: str | None = None
    device: int | None = None  # CUDA index this driver's worker uses
    resume: bool = False
    seed: int | None = None
    enqueue: tuple[dict, ...] = ()  # configs (as dicts) tried right after the default
    label: str = ""
    compile_jobs: int = 1  # warm workers compiling a batch in parallel; also the batch size
    sweep: bool = False  # every feasible config once, in the "<name>-sweep" study
    knobs: tuple | None = None  # Triton switches searched (space.KNOBS); None: the default
    refine: bool = False  # enqueue the database's own best and its knob flips first
    duel: int = 0  # then re-time the two fastest configs this many times each, alternately

    @property
    def batch(self) -> int:
        return max(self.compile_jobs, 1)

    def spec(self):
        return self.problem.spec(self.backend, self.pass_)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["problem"] = self.problem.as_dict()
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> TuneJob:
        d = json.loads(text)
        d["problem"] = Problem(**d["problem"])
        d["enqueue"] = tuple(d.get("enqueue") or ())
        d["knobs"] = None if d.get("knobs") is None else tuple(d["knobs"])
        return cls(**d)


@dataclasses.dataclass
class StudyResult:
    study_name: str
    problem: Problem
    backend: str
    pass_: str
    trials: int  # measurements (is_measurement), what --trials counts
    statuses: dict  # of the trials that were not repeats: measurements and pruned configs
    best_config: KernelConfig | None
    best_ms: float | None
    default_ms: float | None
    recorded: int | None = None  # rows this run (its drivers) wrote to the TuningDB
    asked: int | None = None  # every trial, repeats and pruned proposals included
    duel: dict | None = None  # config text -> its times, the search's first (--duel)

    def as_dict(self) -> dict:
        return {"study": self.study_name, "problem": self.problem.as_dict(),
                "backend": self.backend, "pass": self.pass_, "trials": self.trials,
                "asked": self.asked, "statuses": self.statuses, "recorded": self.recorded,
                "best_config": self.best_config.as_dict() if self.best_config else None,
                "best_ms": self.best_ms, "default_ms": self.default_ms, "duel": self.duel,
                "speedup": (self.default_ms / self.best_ms)
                if self.best_ms and self.default_ms else None}


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def default_study_name(job: TuneJob) -> str:
    p = job.problem
    return (f"gfwa-{_device_label(job)}-{job.backend}-{job.pass_}-{p.dtype}-b{p.batch}"
            f"-t{p.seqlen}-h{p.heads}x{p.kv_heads}-d{p.head_dim}x{p.value_dim}-w{p.window}"
            f"-{'gated' if p.gated else 'plain'}" + ("-sweep" if job.sweep else ""))


def sweep_job(job: TuneJob) -> TuneJob:
    """The job that runs every feasible config of job's space once (trials = their count,
    the default included even when the resource model prunes it)."""
    spec = job.spec()
    configs = space.enumerate_configs(spec, gpu=gpu_space(job), knobs=job.knobs)
    n = len(configs) + (space.default(spec, job.knobs, gpu_space(job)) not in configs)
    return dataclasses.replace(job, sweep=True, n_trials=n, enqueue=())


def gpu_space(job: TuneJob) -> bool:
    """Whether the job searches the GPU's space (resource model, GPU-only knobs)."""
    return job.mode in ("cuda", "replay")


def _device_fp(job: TuneJob) -> dict:
    if job.mode == "fake":
        return dict(FAKE_DEVICE)
    if job.mode == "replay":
        return {**FAKE_DEVICE, "name": "replay"}
    from gfwagen.db import device_fingerprint

    return device_fingerprint("cpu" if job.mode == "cpu" else job.device)


def _device_label(job: TuneJob) -> str:
    if job.mode in ("fake", "replay"):
        return job.mode
    from gfwagen.db import gpu_model_name

    return gpu_model_name(_device_fp(job))


def studies_dir() -> Path:
    from gfwagen.generator import cache_root

    return cache_root() / "studies"


def _is_rdb(job: TuneJob) -> bool:
    return bool(job.storage and "://" in job.storage)


def journal_path(job: TuneJob) -> Path:
    return Path(job.storage) if job.storage else studies_dir() / f"{job.study_name}.journal"


def storage_for(job: TuneJob):
    optuna = _optuna()
    if _is_rdb(job):
        return optuna.storages.RDBStorage(_rdb_url(job.storage))
    from optuna.storages.journal import JournalFileBackend

    path = journal_path(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _rdb_url(url: str) -> str:
    """SQLAlchemy 2.1 maps postgresql:// to psycopg (3); fall back to psycopg2 when only
    that driver is installed."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _set_constraints(trial, values: list[float]) -> None:
    """Optuna 5's trial constraints (what TPESampler's constraint handling reads; they
    replace the deprecated constraints_func): each <= 0 when satisfied."""
    trial.set_user_attr("constraints", list(values))
    for name, v in zip(space.CONSTRAINT_NAMES, values, strict=True):
        trial.set_constraint(name, float(v))


def _sampler(job: TuneJob):
    optuna = _optuna()
    if job.sweep:  # every trial is enqueued: TPE would only spend time fitting
        return optuna.samplers.RandomSampler(seed=job.seed)
    return optuna.samplers.TPESampler(
        multivariate=True, seed=job.seed, constant_liar=True,
        n_startup_trials=min(10, max(2, job.n_trials // 3)))


def prepare(job: TuneJob, fresh: bool | None = None):
    """Create (fresh) or load the study and enqueue the default config (then job.enqueue, or
    for a sweep every other feasible config) when it has no trials yet. fresh=None: fresh
    unless resuming or on a shared RDB. Use open_study() to run it: it holds the journal's
    lease."""
    optuna = _optuna()
    job.study_name = job.study_name or default_study_name(job)
    if fresh is None:
        fresh = not job.resume and not _is_rdb(job)
    if fresh and not _is_rdb(job):
        with contextlib.suppress(FileNotFoundError):
            journal_path(job).unlink()
    storage = storage_for(job)
    study = optuna.create_study(study_name=job.study_name, storage=storage,
                                direction="minimize", sampler=_sampler(job),
                                load_if_exists=True)
    if not study.get_trials(deepcopy=False):
        spec = job.spec()
        gpu = gpu_space(job)
        default = space.default(spec, job.knobs, gpu)
        # what the report (compare.py) needs to pair a TPE study with its sweep
        study.set_user_attr("job", {"problem": job.problem.as_dict(), "backend": job.backend,
                                    "pass": job.pass_, "sweep": job.sweep})
        study.enqueue_trial(space.config_params(spec, default, job.knobs, gpu),
                            user_attrs={"default": True})
        extra = [KernelConfig.from_dict(c) for c in job.enqueue]
        if job.refine and not job.sweep:
            extra += [c for c in _best_and_knob_flips(job, spec) if c != default and c not in extra]
        if job.sweep:
            extra = [c for c in space.enumerate_configs(spec, gpu=gpu,
                                                        knobs=job.knobs) if c != default]
        for c in extra:
            study.enqueue_trial(space.config_params(spec, c, job.knobs, gpu))
        if not job.sweep:
            warm = [c for c in _warm_start(job, spec) if c != default and c not in extra]
            n = search.design_budget(job.n_trials) - len(extra) - len(warm)
            for c in warm:
                study.enqueue_trial(space.config_params(spec, c, job.knobs, gpu),
                                    user_attrs={"warm_start": True}, skip_if_exists=True)
            for c in search.design(spec, default, n, job.knobs, gpu):
                study.enqueue_trial(space.config_params(spec, c, job.knobs, gpu),
                                    skip_if_exists=True)
    return study


def _best_entries(job: TuneJob) -> tuple[list[dict], str]:
    """The job database's best entries and this job's GPU model, what search matches on."""
    from gfwagen.db import TuningDB, gpu_model_name

    with TuningDB(job.db_path) as db:  # created now if new: the driver writes to it next
        entries = db.best_entries()
    return entries, gpu_model_name(_device_fp(job))


def _best_and_knob_flips(job: TuneJob, spec) -> list[KernelConfig]:
    """search.knob_flips of the job database's best for this problem (none if it has none)."""
    entries, model = _best_entries(job)
    best = search.own_best(entries, spec, job.problem.seqlen, model)
    if best is None:
        return []
    gpu = gpu_space(job)
    return search.knob_flips(best, spec, space.knobs_for(spec, job.knobs, gpu), gpu)


def _warm_start(job: TuneJob, spec) -> list[KernelConfig]:
    """search.warm_start from the job's database, the feasible configs only."""
    entries, model = _best_entries(job)
    gpu = gpu_space(job)
    return [c for c in search.warm_start(entries, spec, job.problem.seqlen, model)
            if space.feasible(spec, c, gpu=gpu)[0]]


@contextlib.contextmanager
def open_study(job: TuneJob, fresh: bool | None = None):
    """prepare() the study, and hold its journal's lease (lease.py) until the block ends:
    a fresh start joins the study instead when another driver on this host is running it."""
    job.study_name = job.study_name or default_study_name(job)
    if _is_rdb(job):
        yield prepare(job, fresh)
        return
    want = not job.resume if fresh is None else fresh

    def _prepare(ok: bool):
        if want and not ok:
            sys.stderr.write(f"[{job.label or job.study_name}] another tuner on this host is "
                             f"running study {job.study_name}: joining it\n")
        return prepare(job, ok)

    with journal_lease(journal_path(job), want, _prepare) as study:
        yield study


class _Progress:
    def __init__(self, label: str, total: int):
        self.label, self.total, self.n = label, total, 0
        self.tty = sys.stderr.isatty()

    def update(self, study, status: str, cfg: KernelConfig, ms: float | None,
               measured: bool = True) -> None:
        # the count is of measurements (what --trials asks for): a repeat shows, not counts
        self.n += int(measured)
        width = 20
        done = int(width * min(self.n, self.total) / max(self.total, 1))
        # the study is told of this trial only after this line is shown
        best = best_trial(study)
        if ms is not None and measured and status == "ok" and (best is None or ms < best.value):
            btxt = f"best {ms:.4g} ms {config_text(cfg)}"
        else:
            btxt = (f"best {best.value:.4g} ms {config_text(_trial_config(best))}"
                    if best else "best -")
        last = f"{status}" + (f" {ms:.4g} ms" if ms is not None else "")
        line = (f"[{self.label}] [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} "
                f"{btxt} | last {config_text(cfg)}: {last}")
        sys.stderr.write(("\r\x1b[2K" if self.tty else "") + line + ("" if self.tty else "\n"))
        sys.stderr.flush()

    def note(self, msg: str) -> None:
        sys.stderr.write(("\r\x1b[2K" if self.tty else "") + f"[{self.label}] {msg}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty and self.n:
            sys.stderr.write("\n")


def config_text(cfg: KernelConfig | None) -> str:
    if cfg is None:
        return "-"
    s = f"bm{cfg.block_m} bn{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
    return " ".join([s] + [f"{k}={v}" for k, v in cfg.extra])


def _trial_config(ft) -> KernelConfig:
    return KernelConfig.from_dict(ft.user_attrs["config"])


def is_measurement(trial) -> bool:
    """Whether the trial compiled and ran its candidate (what --trials counts): not a
    repeat answered from the study, not a config the resource model pruned."""
    a = trial.user_attrs
    return "status" in a and "duplicate_of" not in a and not a.get("pruned")


def best_trial(study):
    """The fastest trial whose candidate ran and was right (never a failed one)."""
    ok = [t for t in study.get_trials(deepcopy=False)
          if t.user_attrs.get("status") == "ok" and t.value is not None]
    return min(ok, key=lambda t: (t.value, t.number), default=None)


def run(job: TuneJob, fresh: bool | None = None, workers: Workers | None = None) -> StudyResult:
    """Drive one study in this process for job.n_trials trials (fewer when resuming a study
    that already has some). fresh: see prepare(). workers: worker processes to reuse across
    studies (the CLI keeps one set per run); by default they are started here from job.mode,
    job.device and job.compile_jobs, and closed at the end."""
    from gfwagen.db import TuningDB

    own = workers is None
    workers = workers or Workers(job.mode, job.timeout, job.device, job.compile_jobs)
    try:
        with open_study(job, fresh) as study:
            n = job.n_trials
            if job.resume and not _is_rdb(job):
                n = max(0, n - sum(is_measurement(t) for t in study.get_trials(deepcopy=False)))
            tdb = TuningDB(job.db_path) if job.db_path is not None else TuningDB()
            driver = _Driver(job, study, tdb, workers)
            try:
                driver.run(n)
                times = driver.duel(job.duel) if job.duel else None
            finally:
                driver.progress.close()
                tdb.close()
            res = summarize(study, job, recorded=driver.recorded)
            return with_duel(res, times) if times else res
    finally:
        if own:
            workers.close()


class _Driver:
    """The batched ask/tell loop of one driver process on one study."""

    def __init__(self, job: TuneJob, study, tdb, workers: Workers):
        self.job, self.study, self.tdb, self.workers = job, study, tdb, workers
        self.spec = job.spec()
        self.gpu = gpu_space(job)
        self.names = space.params(job.backend, job.pass_,
                                  space.knobs_for(self.spec, job.knobs, self.gpu))
        self.fp = _device_fp(job)
        self.who = f"{socket.gethostname()}:{os.getpid()}"
        self.progress = _Progress(job.label or f"{job.backend} {job.pass_}", 0)
        self.recorded = 0  # rows this driver wrote to the TuningDB

    def run(self, n: int) -> None:
        """Until n measurements (or ASK_LIMIT * n asks, when the space runs out)."""
        optuna = _optuna()
        self.progress.total = n
        done = asked = 0
        refine_from = n if self.job.sweep else n - search.refine_budget(n)
        while done < n and asked < ASK_LIMIT * max(n, 1):
            want = min(self.job.batch, n - done)
            if done >= refine_from:
                self._enqueue_refinements(want)
            batch, told = [], 0
            try:
                # ask one at a time and suggest at once, so the next ask already sees this
                # trial's params as a running trial (constant liar)
                for _ in range(want):
                    batch.append(self._ask())
                warm_failed = self._warm(batch)
                for trial, cfg in batch:
                    value = self._evaluate(trial, cfg, warm_failed.get(cfg))
                    self.study.tell(trial, value)
                    told += 1
                    done += is_measurement(trial)
            except BaseException:
                for trial, _ in batch[told:]:  # never leave a trial RUNNING in the study
                    with contextlib.suppress(Exception):
                        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            asked += len(batch)

    def duel(self, rounds: int) -> dict | None:
        """Re-time the study's two fastest configs `rounds` times each, alternately, each
        timing recorded in the TuningDB, whose best pools a config's trials by median
        (store.py). One timing each can misorder configs a few percent apart where the
        clock drifts between trials: S4's TVM forward measured 1.687 ms without bias_mma
        and then 1.767 ms with it, where call by call interleaved it is 1.75% faster
        (RESULTS.md, session 38). Returns {config: [ms, first the search's]} or None."""
        leaders = duel_leaders(self.study)
        if leaders is None:
            self.progress.note("duel: fewer than two configs measured ok; nothing to re-time")
            return None
        times = {c: [ms] for c, ms in leaders}
        job = self.job
        pair = [c for c, _ in leaders]
        for r in range(rounds * DUEL_EXTENSION):
            if r >= rounds and duel_settled(times):
                break
            if r == rounds:
                self.progress.note(f"duel: the medians within the timings' spread after {r} "
                                   f"rounds; up to {r * (DUEL_EXTENSION - 1)} more")
            for cfg in duel_round(pair, r):
                res = self.workers.timing.run(job.problem, job.backend, job.pass_, cfg)
                ms = self._record(cfg, res.status, res.reason, res)
                self.progress.note(f"duel: {config_text(cfg)}: {res.status}"
                                   + (f" {ms:.4g} ms" if ms is not None else f" ({res.reason})"))
                if ms is not None:
                    times[cfg].append(ms)
        return times

    def _record(self, cfg: KernelConfig, status: str, reason: str, res) -> float | None:
        """One measurement (res: the timing worker's result; None for a pruned config) into
        the TuningDB; its median ms where it ran ok."""
        job = self.job
        ms = res.median_ms if status == "ok" else None
        self.tdb.record_trial(job.problem, job.backend, job.pass_, cfg, median_ms=ms,
                              spread=res.spread if ms is not None else None, status=status,
                              reason=reason, device=self.fp)
        self.recorded += 1
        return ms

    def _enqueue_refinements(self, k: int) -> None:
        """Queue up to k untried pipelines of the best tiles measured so far (search.py);
        what another driver already queued or runs is left to it."""
        trials = self.study.get_trials(deepcopy=False)
        queued = (t.system_attrs.get("fixed_params", t.params) for t in trials)
        taken = {space.config_from_params(self.spec, p, self.gpu) for p in queued
                 if set(p) == set(self.names)}
        ok = {_trial_config(t): t.value for t in trials
              if t.user_attrs.get("status") == "ok" and t.value is not None}
        for c in search.refinements(self.spec, ok, taken, self.job.knobs, self.gpu)[:k]:
            self.study.enqueue_trial(space.config_params(self.spec, c, self.job.knobs,
                                                         self.gpu), skip_if_exists=True)

    def _ask(self):
        trial = self.study.ask()
        cfg = space.config_from_params(
            self.spec, {k: trial.suggest_categorical(k, list(v)) for k, v in self.names.items()},
            self.gpu)
        trial.set_user_attr("config", cfg.as_dict())
        trial.set_user_attr("driver", self.who)
        return trial, cfg

    def _measured(self, trial):
        """The finished trial that already measured trial's params, if any."""
        optuna = _optuna()
        for t in self.study.get_trials(deepcopy=False,
                                       states=(optuna.trial.TrialState.COMPLETE,)):
            if t.params == trial.params and "status" in t.user_attrs:
                return t
        return None

    def _warm(self, batch) -> dict:
        """Compile the batch's new, feasible configs on the pool; {config: reason} of those
        whose warm-up failed (the timing worker still tries them)."""
        todo = []
        for trial, cfg in batch:
            if cfg not in todo and self._measured(trial) is None and \
                    self._runnable(trial, cfg)[0]:
                todo.append(cfg)
        results = self.workers.warm(self.job.problem, self.job.backend, self.job.pass_, todo)
        failed = {c: r.reason for c, r in zip(todo, results) if r.status != "ok"}
        for c, why in failed.items():
            self.progress.note(f"warming {config_text(c)} failed ({why}); the timing worker "
                               "tries it anyway")
        return failed

    def _runnable(self, trial, cfg: KernelConfig) -> tuple[bool, str]:
        """space.feasible, except that the default is run even when only the resource model
        (an estimate) prunes it: the op runs it untuned, so its time is the baseline every
        speed-up is read against (at D = 256 the estimate prunes the dk/dv default)."""
        ok, why = space.feasible(self.spec, cfg, gpu=self.gpu)
        if not ok and trial.user_attrs.get("default") and why.startswith("pruned"):
            return True, ""
        return ok, why

    def _evaluate(self, trial, cfg: KernelConfig, warm_failed: str | None) -> float:
        """What the single-trial objective did: answer a repeat from the study, record a
        pruned config without compiling, else check and time it on the timing worker."""
        job = self.job
        viol = space.violations(self.spec, cfg) if self.gpu else [0.0, 0.0]
        t = self._measured(trial)
        if t is not None:
            for k in ("status", "reason"):
                trial.set_user_attr(k, t.user_attrs[k])
            _set_constraints(trial, t.user_attrs["constraints"])
            trial.set_user_attr("duplicate_of", t.number)
            self.progress.update(self.study, t.user_attrs["status"] + " (again)", cfg,
                                 t.value if t.user_attrs["status"] == "ok" else None,
                                 measured=False)
            return t.value
        ok, why = self._runnable(trial, cfg)
        if not ok:
            res_status, res = "failed", None
            reason = why
            trial.set_user_attr("pruned", True)
        else:
            if warm_failed is not None:
                trial.set_user_attr("warm_failed", warm_failed)
            res = self.workers.timing.run(job.problem, job.backend, job.pass_, cfg)
            res_status, reason = res.status, res.reason
        trial.set_user_attr("status", res_status)
        trial.set_user_attr("reason", reason)
        _set_constraints(trial, viol + [-1.0 if res_status == "ok" else 1.0])
        ms = self._record(cfg, res_status, reason, res)
        self.progress.update(self.study, res_status + (" (pruned)" if not ok else ""), cfg, ms,
                             measured=ok)
        return ms if ms is not None else PENALTY_MS


def duel_leaders(study) -> list[tuple[KernelConfig, float]] | None:
    """The two fastest distinct configs the study measured ok, with their times."""
    best: dict[KernelConfig, float] = {}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("status") == "ok" and t.value is not None \
                and "duplicate_of" not in t.user_attrs:
            cfg = _trial_config(t)
            best[cfg] = min(t.value, best.get(cfg, math.inf))
    ranked = sorted(best.items(), key=lambda cv: (cv[1], config_text(cv[0])))
    return ranked[:2] if len(ranked) >= 2 else None


# a duel whose medians are no further apart than its timings spread goes on, up to this many
# times its rounds (duel_settled)
DUEL_EXTENSION = 3


def duel_settled(times: dict) -> bool:
    """Whether a duel's two medians differ by more than either config's interquartile range.
    Closer than that, one more timing can swap them: in session 44 S2's bias_mma timed 0.500,
    0.548, 0.541 and 0.543 ms, the plain kernel 0.523-0.558, and bias_mma lost by median
    where 30 interleaved calls (session 43) had it 4.6% faster."""
    (ta, tb) = times.values()
    if min(len(ta), len(tb)) < 2:
        return True  # a config that failed its re-timings: nothing more to learn
    iqr = max(q[2] - q[0] for q in (statistics.quantiles(t, n=4) for t in (ta, tb)))
    return abs(statistics.median(ta) - statistics.median(tb)) > iqr


def duel_round(pair: list[KernelConfig], r: int) -> tuple[KernelConfig, KernelConfig]:
    """Round r's order: B A, then A B, B A, ...: each round swaps who goes first, so a clock
    that drifts one way over the duel favours neither."""
    a, b = pair
    return (b, a) if r % 2 == 0 else (a, b)


def with_duel(res: StudyResult, times: dict) -> StudyResult:
    """res with its best replaced by the duel's: the config of the lower median over this
    run's timings of it, the search's included. The TuningDB applies the same rule, over
    every trial of the config in its group (earlier runs' too), so the two can differ."""
    med = {c: statistics.median(ts) for c, ts in times.items()}
    win = min(med, key=lambda c: (med[c], config_text(c)))
    return dataclasses.replace(res, best_config=win, best_ms=med[win],
                               duel={config_text(c): ts for c, ts in times.items()})


def summarize(study, job: TuneJob, recorded: int | None = None) -> StudyResult:
    trials = [t for t in study.get_trials(deepcopy=False) if "status" in t.user_attrs]
    best = best_trial(study)
    default = next((t for t in trials if t.user_attrs.get("default")), None)
    default_ms = default.value if default is not None and \
        default.user_attrs.get("status") == "ok" else None
    firsts = [t for t in trials if "duplicate_of" not in t.user_attrs]
    return StudyResult(study.study_name, job.problem, job.backend, job.pass_,
                       sum(map(is_measurement, trials)),
                       dict(Counter(t.user_attrs["status"] for t in firsts)),
                       _trial_config(best) if best else None, best.value if best else None,
                       default_ms, recorded, asked=len(trials))


def load_result(job: TuneJob) -> StudyResult:
    optuna = _optuna()
    job.study_name = job.study_name or default_study_name(job)
    study = optuna.load_study(study_name=job.study_name, storage=storage_for(job))
    return summarize(study, job)


def run_on_devices(job: TuneJob, devices: list[int]) -> StudyResult:
    """One driver process per device on ONE study in a JournalStorage file: the study is
    prepared here (default enqueued once), then each driver runs its share of the trials
    with its own timing worker and warm pool on its own device."""
    job.study_name = job.study_name or default_study_name(job)
    job = dataclasses.replace(job, storage=job.storage if _is_rdb(job) else
                              str(journal_path(job)))
    with open_study(job) as study:  # the lease covers the drivers' whole run
        share = math.ceil(job.n_trials / len(devices))
        procs = []
        for i, dev in enumerate(devices):
            n = min(share, job.n_trials - i * share)
            if n <= 0:
                break
            sub = dataclasses.replace(job, device=dev, n_trials=n, resume=False, duel=0,
                                      seed=None if job.seed is None else job.seed + i,
                                      label=f"{job.label or job.pass_} gpu{dev}")
            procs.append(subprocess.Popen([sys.executable, "-m", "gfwagen.tuner.study"],
                                          stdin=subprocess.PIPE, text=True,
                                          cwd=str(Path(__file__).resolve().parents[2])))
            procs[-1].stdin.write(sub.to_json())
            procs[-1].stdin.close()
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"tuner driver processes exited with {codes}")
        ours = {f"{socket.gethostname()}:{p.pid}" for p in procs}
        recorded = sum(1 for t in study.get_trials(deepcopy=False)
                       if t.user_attrs.get("driver") in ours and "status" in t.user_attrs
                       and "duplicate_of" not in t.user_attrs)
        return summarize(study, job, recorded=recorded)


def _driver_main() -> int:
    """`python -m gfwagen.tuner.study` < job.json: one driver of a shared, prepared study;
    it loads the study (never resets it) and runs exactly its job.n_trials."""
    run(TuneJob.from_json(sys.stdin.read()), fresh=False)
    return 0


if __name__ == "__main__":
    sys.exit(_driver_main())
