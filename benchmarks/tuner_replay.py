#!/usr/bin/env python3
"""The tuner's search replayed on a recorded sweep, many seeds, no GPU (gfwagen/tuner/replay.py).

    python benchmarks/tuner_replay.py --db s1.sqlite --only S1 --seeds 16

For each pass: the tuner's own driver (design, TPE, refinement; one driver, batches of
--batch) runs with a quarter of the sweep's configs as its budget, answered from the
database's first measurement of each config; the table reports how far each seed's best is
from the sweep's best. The database must hold a sweep of the shape (gfwagen tune --sweep).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import PRESETS  # noqa: E402
from gfwagen.spec import Problem  # noqa: E402
from gfwagen.tuner import search, space  # noqa: E402
from gfwagen.tuner.compare import GAP_LIMIT, TRIAL_FRACTION  # noqa: E402
from gfwagen.tuner.replay import ReplayWorkers, load_table  # noqa: E402
from gfwagen.tuner.study import TuneJob, is_measurement, run, storage_for  # noqa: E402


def replay_pass(problem: Problem, pass_: str, db: str, seeds: int, batch: int, knobs) -> dict:
    import optuna

    table = load_table(db, problem, "triton", pass_)
    spec = problem.spec("triton", pass_)
    feasible = space.enumerate_configs(spec, gpu=True, knobs=knobs)
    ok = {c: r.median_ms for c, r in table.items() if r.status == "ok"}
    missing = [c for c in feasible if c not in table]
    if not ok or missing:
        raise SystemExit(f"{db} holds no full sweep of {pass_} ({len(missing)} of "
                         f"{len(feasible)} feasible configs unmeasured)")
    best = min(ok.values())
    n = int(len(feasible) * TRIAL_FRACTION)
    gaps, asked = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            job = TuneJob(problem, "triton", pass_, n, mode="replay", seed=seed,
                          compile_jobs=batch, knobs=knobs, db_path=f"{tmp}/replay.sqlite",
                          storage=f"{tmp}/{pass_}-{seed}.journal", label=f"{pass_} seed {seed}")
            res = run(job, fresh=True, workers=ReplayWorkers(table))
            gaps.append(100.0 * (ok[res.best_config] / best - 1.0))
            study = optuna.load_study(study_name=job.study_name, storage=storage_for(job))
            trials = study.get_trials(deepcopy=False)
            assert sum(map(is_measurement, trials)) == n
            asked.append(len(trials))
    return {"pass": pass_, "sweep": len(feasible), "trials": n, "gaps": gaps, "asked": asked}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True, help="a TuningDB holding the sweep")
    ap.add_argument("--only", default="S1", help="a shape of the ship preset [S1]")
    ap.add_argument("--passes", default="fwd,bwd_kv,bwd_q")
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16, help="trials asked at once [16, the "
                    "tuner's compile jobs on a GPU]")
    ap.add_argument("--knobs", default="tma", help="the sweep's knobs [tma]")
    ap.add_argument("--design-share", type=float, default=search.DESIGN_SHARE,
                    help=f"ablation: search.DESIGN_SHARE [{search.DESIGN_SHARE}]")
    ap.add_argument("--refine-share", type=float, default=search.REFINE_SHARE,
                    help=f"ablation: search.REFINE_SHARE [{search.REFINE_SHARE}]")
    a = ap.parse_args(argv)
    search.DESIGN_SHARE, search.REFINE_SHARE = a.design_share, a.refine_share
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    (name, b, t, h, hkv, d, w), = [s for s in PRESETS["ship"] if s[0] == a.only]
    problem = Problem(b, t, h, hkv, d, d, w, "bf16", True)
    knobs = tuple(k for k in a.knobs.split(",") if k and k != "none")
    print(f"| shape | pass | sweep configs | trials | seeds within {GAP_LIMIT:g}% | median gap % "
          "| worst gap % | mean asked |")
    print("|---|---|---|---|---|---|---|---|")
    for p in a.passes.split(","):
        r = replay_pass(problem, p, a.db, a.seeds, a.batch, knobs)
        g = r["gaps"]
        print(f"| {name} | {p} | {r['sweep']} | {r['trials']} | "
              f"{sum(x <= GAP_LIMIT for x in g)}/{len(g)} | {statistics.median(g):.1f} | "
              f"{max(g):.1f} | {statistics.mean(r['asked']):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
