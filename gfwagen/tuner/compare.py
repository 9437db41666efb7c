"""TPE against the exhaustive sweep: for each (problem, backend, pass) that has both a TPE
study and its "-sweep" study, how close TPE's best comes to the sweep's best, and with how
many trials.

Read from the Optuna studies (the journal files under the tuner's studies folder, or an RDB
URL), not from the TuningDB: the database's trials carry no study, so a TPE trial and the
sweep's measurement of the same config cannot be told apart there, while each study knows
its trials, their order, the default (trial 0) and the repeats.

TPE's best is compared on the sweep's measurement of the same config, so both sides of the
gap come from one measurement pass and timing noise between two runs cannot decide it; TPE's
own measurement is shown beside it. The verdict: within 3% of the sweep's best using at
most a quarter of the sweep's trials. Trials are measurements (study.is_measurement): the
TPE study's repeats and pruned proposals cost no GPU time and are shown apart, as "asked".
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

GAP_LIMIT = 3.0  # percent
TRIAL_FRACTION = 0.25


@dataclasses.dataclass
class Row:
    name: str  # the TPE study's name
    problem: dict
    backend: str
    pass_: str
    sweep_trials: int
    sweep_best: dict | None
    sweep_ms: float | None
    tpe_trials: int
    tpe_best: dict | None
    tpe_ms_in_sweep: float | None  # the sweep's measurement of TPE's best config
    tpe_ms_own: float | None
    default_ms: float | None  # the sweep's measurement of the default (trial 0)
    tpe_asked: int | None = None  # every trial of the TPE study, repeats and pruned included

    @property
    def gap(self) -> float | None:
        """Percent by which TPE's best is slower than the sweep's best (sweep measurements)."""
        if self.tpe_ms_in_sweep is None or not self.sweep_ms:
            return None
        return 100.0 * (self.tpe_ms_in_sweep / self.sweep_ms - 1.0)

    @property
    def within(self) -> bool:
        g = self.gap
        return g is not None and g <= GAP_LIMIT and \
            self.tpe_trials <= TRIAL_FRACTION * self.sweep_trials

    @property
    def speedup(self) -> float | None:
        return self.default_ms / self.sweep_ms if self.default_ms and self.sweep_ms else None


def load_studies(folder: str | Path | None = None, storage: str | None = None) -> dict:
    """name -> study: every study of an RDB URL, else of every *.journal file in `folder`
    (default: the tuner's, study.studies_dir())."""
    from gfwagen.tuner.study import _optuna, _rdb_url, studies_dir

    optuna = _optuna()
    if storage:
        storages = [optuna.storages.RDBStorage(_rdb_url(storage))]
    else:
        from optuna.storages.journal import JournalFileBackend

        folder = Path(folder) if folder else studies_dir()
        storages = [optuna.storages.JournalStorage(JournalFileBackend(str(p)))
                    for p in sorted(folder.glob("*.journal"))]
    out = {}
    for st in storages:
        for name in optuna.study.get_all_study_names(st):
            out[name] = optuna.load_study(study_name=name, storage=st)
    return out


def _done(study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if "status" in t.user_attrs]


def _measured(study) -> int:
    from gfwagen.tuner.study import is_measurement

    return sum(map(is_measurement, study.get_trials(deepcopy=False)))


def compare(studies: dict) -> list[Row]:
    """One Row per TPE study whose "<name>-sweep" study is there too, sorted by name."""
    from gfwagen.tuner.study import best_trial

    rows = []
    for name in sorted(studies):
        sweep = studies.get(f"{name}-sweep")
        if name.endswith("-sweep") or sweep is None:
            continue
        tpe = studies[name]
        job = tpe.user_attrs.get("job") or sweep.user_attrs.get("job") or {}
        s_best, t_best = best_trial(sweep), best_trial(tpe)
        s_trials = _done(sweep)
        in_sweep = None
        if t_best is not None:
            cfg = t_best.user_attrs["config"]
            in_sweep = next((t.value for t in s_trials if t.user_attrs.get("config") == cfg
                             and t.user_attrs.get("status") == "ok"), None)
        default = next((t for t in s_trials if t.user_attrs.get("default")), None)
        rows.append(Row(
            name=name, problem=job.get("problem", {}), backend=job.get("backend", "?"),
            pass_=job.get("pass", "?"), sweep_trials=_measured(sweep),
            sweep_best=s_best.user_attrs["config"] if s_best else None,
            sweep_ms=s_best.value if s_best else None, tpe_trials=_measured(tpe),
            tpe_asked=len(_done(tpe)),
            tpe_best=t_best.user_attrs["config"] if t_best else None, tpe_ms_in_sweep=in_sweep,
            tpe_ms_own=t_best.value if t_best else None,
            default_ms=default.value if default is not None
            and default.user_attrs.get("status") == "ok" else None))
    return rows


def _cfg(c: dict | None) -> str:
    if not c:
        return "-"
    s = f"bm{c['block_m']} bn{c['block_n']} w{c['num_warps']} s{c['num_stages']}"
    return " ".join([s] + [f"{k}={v}" for k, v in sorted((c.get("extra") or {}).items())])


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _problem(p: dict) -> str:
    if not p:
        return "?"
    return (f"B{p['batch']} T{p['seqlen']} H{p['heads']}/{p['kv_heads']} "
            f"D{p['head_dim']}/{p['value_dim']} W{p['window']} {p['dtype']}"
            + ("" if p.get("gated", True) else " plain"))


def markdown(rows: list[Row]) -> str:
    head = ["problem", "pass", "sweep trials", "sweep best", "sweep ms", "TPE trials",
            "TPE asked", "TPE best", "TPE best ms (sweep)", "TPE best ms (own)", "gap %",
            f"<= {GAP_LIMIT:g}% with <= 1/4 trials", "default ms", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        g = r.gap
        cells = [_problem(r.problem), r.pass_, str(r.sweep_trials), _cfg(r.sweep_best),
                 _ms(r.sweep_ms), str(r.tpe_trials),
                 "-" if r.tpe_asked is None else str(r.tpe_asked), _cfg(r.tpe_best),
                 _ms(r.tpe_ms_in_sweep), _ms(r.tpe_ms_own), "-" if g is None else f"{g:.1f}",
                 "yes" if r.within else "no", _ms(r.default_ms),
                 "-" if r.speedup is None else f"{r.speedup:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    n_ok = sum(r.within for r in rows)
    lines.append("")
    lines.append(f"{n_ok} of {len(rows)} studies: TPE within {GAP_LIMIT:g}% of the sweep's best "
                 f"using at most a quarter of its trials.")
    return "\n".join(lines) + "\n"
