#!/usr/bin/env python3
"""TPE against the exhaustive sweep, as a markdown table (gfwagen/tuner/compare.py).

    gfwagen tune --preset ship --db h200.sqlite            # the TPE studies
    gfwagen tune --preset ship --db h200.sqlite --sweep    # the "-sweep" studies
    python benchmarks/tuner_vs_sweep.py > tuner_vs_sweep.md

Reads the Optuna studies, not the TuningDB (whose trials do not say which study measured
them): by default the journal files under $GFWAGEN_CACHE_DIR/studies of the host that
tuned (run it there, or copy that folder and pass --studies), or --storage for a study
shared through an RDB URL. One row per (problem, pass) having both studies.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gfwagen.tuner.compare import compare, load_studies, markdown  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=Path, default=None,
                    help="folder of the studies' *.journal files [default: the tuner's, "
                         "$GFWAGEN_CACHE_DIR/studies]")
    ap.add_argument("--storage", default=None, help="an RDB URL holding the studies instead")
    ap.add_argument("--out", type=Path, default=None, help="write here instead of stdout")
    a = ap.parse_args(argv)
    rows = compare(load_studies(a.studies, a.storage))
    if not rows:
        print("no (problem, pass) has both a TPE study and a -sweep study", file=sys.stderr)
        return 1
    text = markdown(rows)
    if a.out:
        a.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
