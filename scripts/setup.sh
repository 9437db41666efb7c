#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment in .venv with gfwagen (editable)
# and its dev tools. Sourced by run.sh and test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GFWAGEN_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
if ! python -c "import gfwagen, pytest, xdist, optuna, sqlite_utils, triton" >/dev/null 2>&1; then
  python -m pip install -q --upgrade pip
  # torch first, pinned: the CPU build of 2.13.0 lies on local disk, and asking for it
  # explicitly keeps pip from pulling a multi-GB CUDA build for the package's torch range.
  # On a machine that already has a torch (a GPU host), keep it.
  python -c "import torch" >/dev/null 2>&1 || python -m pip install -q torch==2.13.0
  python -m pip install -q -e "$root[dev]"
fi
