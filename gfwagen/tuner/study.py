"""The Optuna study: one per (problem, backend, pass), so the forward and each backward pass
are tuned separately (they are separate kernels with separate configs).

- TPESampler(multivariate=True) with trial constraints (Trial.set_constraint, which
  Optuna 5 reads in place of the deprecated constraints_func): a trial's constraints are the
  resource model's [shared memory, registers] excess (space.violations) and +1 when the
  candidate failed, was wrong or timed out, so the sampler learns to avoid all three.
- Trial 0 is the heuristic default (study.enqueue_trial), so every study measures what the
  op would run untuned, and "speed-up over the default" is read off the same study.
- Every trial that measures something is recorded in the TuningDB with its status (configs
  the resource model prunes are recorded as 'failed' with the estimate as reason, without
  compiling); a config the study already measured is answered from the study, not rerun.
- Storage: a JournalStorage file per study under cache_root()/studies by default (this
  is also what lets --resume continue a study and --devices run one driver process per GPU
  on ONE study); `storage` = an RDB URL (postgresql://...) joins a study shared by many
  hosts, each recording its own trials in its own TuningDB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

from gfwagen.spec import KernelConfig, Problem
from gfwagen.tuner import space
from gfwagen.tuner.worker import CandidateWorker

PENALTY_MS = 1e9  # objective value of a trial without a measurement (constraints mark it)
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
    mode: str = "cuda"  # cuda | cpu | fake (see worker.MODES)
    timeout: float = 120.0  # per candidate, compile included
    db_path: str | None = None
    storage: str | None = None  # RDB URL or journal file path; None: the default journal
    study_name: str | None = None
    device: int | None = None  # CUDA index this driver's worker uses
    resume: bool = False
    seed: int | None = None
    enqueue: tuple[dict, ...] = ()  # configs (as dicts) tried right after the default
    label: str = ""

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
        return cls(**d)


@dataclasses.dataclass
class StudyResult:
    study_name: str
    problem: Problem
    backend: str
    pass_: str
    trials: int
    statuses: dict
    best_config: KernelConfig | None
    best_ms: float | None
    default_ms: float | None

    def as_dict(self) -> dict:
        return {"study": self.study_name, "problem": self.problem.as_dict(),
                "backend": self.backend, "pass": self.pass_, "trials": self.trials,
                "statuses": self.statuses,
                "best_config": self.best_config.as_dict() if self.best_config else None,
                "best_ms": self.best_ms, "default_ms": self.default_ms,
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
            f"-{'gated' if p.gated else 'plain'}")


def _device_fp(job: TuneJob) -> dict:
    if job.mode == "fake":
        return dict(FAKE_DEVICE)
    from gfwagen.db import device_fingerprint

    return device_fingerprint("cpu" if job.mode == "cpu" else job.device)


def _device_label(job: TuneJob) -> str:
    if job.mode == "fake":
        return "fake"
    from gfwagen.db import gpu_model_name

    return gpu_model_name(_device_fp(job))


def studies_dir() -> Path:
    from gfwagen.generator import cache_root

    return cache_root() / "studies"


def storage_for(job: TuneJob):
    optuna = _optuna()
    if job.storage and "://" in job.storage:
        return optuna.storages.RDBStorage(_rdb_url(job.storage))
    from optuna.storages.journal import JournalFileBackend

    path = Path(job.storage) if job.storage else studies_dir() / f"{job.study_name}.journal"
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
    return optuna.samplers.TPESampler(
        multivariate=True, seed=job.seed,
        n_startup_trials=min(10, max(2, job.n_trials // 3)))


def prepare(job: TuneJob, fresh: bool | None = None):
    """Create (fresh) or load the study and enqueue the default config (then job.enqueue)
    when it has no trials yet. fresh=None: fresh unless resuming or on a shared RDB."""
    optuna = _optuna()
    job.study_name = job.study_name or default_study_name(job)
    if fresh is None:
        fresh = not job.resume and not (job.storage and "://" in job.storage)
    if fresh and not (job.storage and "://" in job.storage):
        path = Path(job.storage) if job.storage else studies_dir() / f"{job.study_name}.journal"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    storage = storage_for(job)
    study = optuna.create_study(study_name=job.study_name, storage=storage,
                                direction="minimize", sampler=_sampler(job),
                                load_if_exists=True)
    if not study.get_trials(deepcopy=False):
        spec = job.spec()
        study.enqueue_trial(space.config_params(spec, space.default(spec)),
                            user_attrs={"default": True})
        for c in job.enqueue:
            study.enqueue_trial(space.config_params(spec, KernelConfig.from_dict(c)))
    return study


class _Progress:
    def __init__(self, label: str, total: int):
        self.label, self.total, self.n = label, total, 0
        self.tty = sys.stderr.isatty()

    def update(self, study, status: str, cfg: KernelConfig, ms: float | None) -> None:
        self.n += 1
        width = 20
        done = int(width * min(self.n, self.total) / max(self.total, 1))
        best = best_trial(study)
        btxt = (f"best {best.value:.4g} ms {config_text(_trial_config(best))}"
                if best else "best -")
        last = f"{status}" + (f" {ms:.4g} ms" if ms is not None else "")
        line = (f"[{self.label}] [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} "
                f"{btxt} | last {config_text(cfg)}: {last}")
        sys.stderr.write(("\r\x1b[2K" if self.tty else "") + line + ("" if self.tty else "\n"))
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


def best_trial(study):
    """The fastest trial whose candidate ran and was right (never a failed one)."""
    ok = [t for t in study.get_trials(deepcopy=False)
          if t.user_attrs.get("status") == "ok" and t.value is not None]
    return min(ok, key=lambda t: (t.value, t.number), default=None)


def run(job: TuneJob, fresh: bool | None = None) -> StudyResult:
    """Drive one study in this process for job.n_trials trials (fewer when resuming a study
    that already has some). fresh: see prepare()."""
    from gfwagen.db import TuningDB

    optuna = _optuna()
    study = prepare(job, fresh)
    spec = job.spec()
    names = space.params(job.backend, job.pass_)
    fp = _device_fp(job)
    gpu = job.mode == "cuda"
    n = job.n_trials
    if job.resume and not (job.storage and "://" in job.storage):
        n = max(0, n - sum(t.state.is_finished() for t in study.get_trials(deepcopy=False)))
    progress = _Progress(job.label or f"{job.backend} {job.pass_}", n)
    tdb = TuningDB(job.db_path) if job.db_path is not None else TuningDB()

    def objective(trial):
        cfg = space.config_from_params(
            spec, {k: trial.suggest_categorical(k, list(v)) for k, v in names.items()})
        trial.set_user_attr("config", cfg.as_dict())
        viol = space.violations(spec, cfg) if gpu else [0.0, 0.0]
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.params == trial.params and "status" in t.user_attrs:
                for k in ("status", "reason"):
                    trial.set_user_attr(k, t.user_attrs[k])
                _set_constraints(trial, t.user_attrs["constraints"])
                trial.set_user_attr("duplicate_of", t.number)
                progress.update(study, t.user_attrs["status"] + " (again)", cfg,
                                t.value if t.user_attrs["status"] == "ok" else None)
                return t.value
        ok, why = space.feasible(spec, cfg, gpu=gpu)
        if not ok:
            res_status, res = "failed", None
            reason = why
        else:
            res = worker.run(job.problem, job.backend, job.pass_, cfg)
            res_status, reason = res.status, res.reason
        trial.set_user_attr("status", res_status)
        trial.set_user_attr("reason", reason)
        _set_constraints(trial, viol + [-1.0 if res_status == "ok" else 1.0])
        ms = res.median_ms if res_status == "ok" else None
        tdb.record_trial(job.problem, job.backend, job.pass_, cfg, median_ms=ms,
                         spread=res.spread if ms is not None else None, status=res_status,
                         reason=reason, device=fp)
        progress.update(study, res_status, cfg, ms)
        return ms if ms is not None else PENALTY_MS

    worker = CandidateWorker(job.mode, timeout=job.timeout, device=job.device)
    try:
        study.optimize(objective, n_trials=n, gc_after_trial=False)
    finally:
        progress.close()
        worker.close()
        tdb.close()
    return summarize(study, job)


def summarize(study, job: TuneJob) -> StudyResult:
    trials = [t for t in study.get_trials(deepcopy=False) if "status" in t.user_attrs]
    best = best_trial(study)
    default = next((t for t in trials if t.user_attrs.get("default")), None)
    default_ms = default.value if default is not None and \
        default.user_attrs.get("status") == "ok" else None
    return StudyResult(study.study_name, job.problem, job.backend, job.pass_, len(trials),
                       dict(Counter(t.user_attrs["status"] for t in trials)),
                       _trial_config(best) if best else None, best.value if best else None,
                       default_ms)


def load_result(job: TuneJob) -> StudyResult:
    optuna = _optuna()
    job.study_name = job.study_name or default_study_name(job)
    study = optuna.load_study(study_name=job.study_name, storage=storage_for(job))
    return summarize(study, job)


def run_on_devices(job: TuneJob, devices: list[int]) -> StudyResult:
    """One driver process per device on ONE study in a JournalStorage file: the study is
    prepared here (default enqueued once), then each driver runs its share of the trials."""
    if job.storage and "://" in job.storage:
        shared = job.storage
    else:
        job.study_name = job.study_name or default_study_name(job)
        shared = job.storage or str(studies_dir() / f"{job.study_name}.journal")
    job = dataclasses.replace(job, storage=shared)
    prepare(job)
    share = math.ceil(job.n_trials / len(devices))
    procs = []
    for i, dev in enumerate(devices):
        n = min(share, job.n_trials - i * share)
        if n <= 0:
            break
        sub = dataclasses.replace(job, device=dev, n_trials=n, resume=False,
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
    return load_result(job)


def _driver_main() -> int:
    """`python -m gfwagen.tuner.study` < job.json: one driver of a shared, prepared study;
    it loads the study (never resets it) and runs exactly its job.n_trials."""
    run(TuneJob.from_json(sys.stdin.read()), fresh=False)
    return 0


if __name__ == "__main__":
    sys.exit(_driver_main())
