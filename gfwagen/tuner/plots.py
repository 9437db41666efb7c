"""Plots of a study: optimization history and parameter importances, as PNG files
(optuna.visualization.matplotlib, headless). Also rebuilds studies from a TuningDB's
trials, so `gfwagen db plot` works on any database, whichever machine tuned it.

Too few trials is not an error: the history needs one measured trial, the importances
two with differing parameters; what cannot be drawn is skipped and said so.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections import defaultdict
from pathlib import Path


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:120]


def save_study_plots(study, out_dir, name: str | None = None) -> tuple[list[Path], list[str]]:
    """Write <name>-history.png and <name>-importance.png; returns (written, skipped notes)."""
    import optuna
    from optuna.visualization import matplotlib as ovm

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    plt = _mpl()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = _slug(name or study.study_name)
    done = [t for t in study.get_trials(deepcopy=False, states=(
        optuna.trial.TrialState.COMPLETE,)) if t.user_attrs.get("status", "ok") == "ok"]
    written, skipped = [], []
    if not done:
        return [], [f"{stem}: no measured trial, nothing to plot"]
    # plot from a copy holding only the measured trials: penalties would flatten the axes
    view = optuna.create_study(direction="minimize")
    view.add_trials(done)
    for kind, fn, need in (("history", ovm.plot_optimization_history, 1),
                           ("importance", ovm.plot_param_importances, 2)):
        varied = any(len({repr(t.params.get(k)) for t in done}) > 1 for t in done
                     for k in t.params)
        if len(done) < need or (kind == "importance" and not varied):
            skipped.append(f"{stem}: {kind} needs at least {need} measured trials with "
                           "differing configs")
            continue
        try:
            ax = fn(view)
            ax.set_title(f"{stem} ({kind})", fontsize=8)
            path = out / f"{stem}-{kind}.png"
            ax.figure.savefig(path, dpi=100, bbox_inches="tight")
            written.append(path)
        except (ValueError, RuntimeError) as e:
            skipped.append(f"{stem}: {kind}: {e}")
        finally:
            plt.close("all")
    return written, skipped


def studies_from_db(db_path) -> dict[str, object]:
    """One in-memory Optuna study per (device, backend, pass, problem) of the database's
    trials, in the order they were recorded (failed trials carry no value)."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    from gfwagen.db import TuningDB, gpu_model_name

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    buf = io.StringIO()
    with TuningDB(db_path, readonly=True) as tdb:  # the export format: no SQL outside db/
        tdb.export_jsonl(stream=buf)
    recs = [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]
    models = {r["key"]: gpu_model_name(r["fingerprint"]) for r in recs if r["kind"] == "device"}
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in sorted((r for r in recs if r["kind"] == "trial"),
                    key=lambda r: (r["created_at"], r["id"])):
        p, s = r["problem"], r["spec"]
        name = (f"{models.get(r['device_key'], 'unknown')}-{s['backend']}-{s['pass_']}"
                f"-{p['dtype']}-b{p['batch']}-t{p['seqlen']}-h{p['heads']}x{p['kv_heads']}"
                f"-d{p['head_dim']}-w{p['window']}-{r['device_key'][:6]}")
        groups[name].append(r)
    out = {}
    for name, trials in groups.items():
        study = optuna.create_study(study_name=name, direction="minimize")
        keys = sorted({k for t in trials for k in _params(t)})
        choices = {k: sorted({_params(t).get(k) for t in trials}, key=repr) for k in keys}
        for t in trials:
            ok = t["status"] == "ok"
            study.add_trial(optuna.trial.create_trial(
                params=_params(t), value=t["median_ms"] if ok else None,
                state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
                distributions={k: CategoricalDistribution(choices[k]) for k in _params(t)},
                user_attrs={"status": t["status"]}))
        out[name] = study
    return out


def _params(rec) -> dict:
    c = rec["config"]
    d = {k: c[k] for k in ("block_m", "block_n", "num_warps", "num_stages")}
    d.update({f"x_{k}": v for k, v in (c.get("extra") or {}).items()})
    return d


def plot_db(db_path, out_dir) -> tuple[list[Path], list[str]]:
    written, skipped = [], []
    for name, study in studies_from_db(db_path).items():
        w, s = save_study_plots(study, out_dir, name)
        written += w
        skipped += s
    return written, skipped
