"""Replaying the tuner against recorded measurements, without a GPU.

A replay runs the tuner's own driver and search (study.run, search.py) on the GPU's search
space, with a timing worker that answers each candidate from a table of trials recorded in a
TuningDB (an exhaustive sweep's, ideally) instead of compiling and running it. That is how a
change to the search is judged on many seeds in seconds: benchmarks/tuner_replay.py.
"""

from __future__ import annotations

import json

from gfwagen.spec import KernelConfig, Problem
from gfwagen.tuner.worker import Result

MISSING = "not in the recorded table"


def load_table(db_path: str, problem: Problem, backend: str, pass_: str) -> dict:
    """{config: Result} from the database's trials of (problem, backend, pass): the first
    measurement of each config (a sweep's, when the sweep ran first)."""
    from gfwagen.db import TuningDB

    table: dict[KernelConfig, Result] = {}
    with TuningDB(db_path, readonly=True) as db:
        rows = db.db.query(
            "SELECT config_json, median_ms, spread, status, reason, problem_json FROM trials "
            "WHERE backend = ? AND pass = ? ORDER BY created_at", [backend, pass_])
        for r in rows:
            if Problem(**json.loads(r["problem_json"])) != problem:
                continue
            cfg = KernelConfig.from_dict(json.loads(r["config_json"]))
            if cfg in table or r["reason"].startswith("pruned"):
                continue
            table[cfg] = Result(r["status"], r["median_ms"], r["spread"], r["reason"], 1)
    return table


class TableTiming:
    """The timing worker's interface (run), answered from the table."""

    def __init__(self, table: dict):
        self.table = table
        self.asked: list[KernelConfig] = []

    def run(self, problem, backend, pass_, config: KernelConfig, warm: bool = False) -> Result:
        self.asked.append(config)
        return self.table.get(config, Result("failed", reason=MISSING))

    def ensure_started(self) -> None:
        pass

    def close(self) -> None:
        pass


class ReplayWorkers:
    """pool.Workers' interface for study.run(job, workers=...): nothing to compile."""

    def __init__(self, table: dict):
        self.timing = TableTiming(table)

    def warm(self, problem, backend, pass_, configs) -> list[Result]:
        return [Result("ok", reason="replay") for _ in configs]

    def close(self) -> None:
        pass
