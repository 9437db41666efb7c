#!/usr/bin/env bash
# The test command (README): set-up if needed, lint, then every test. Without a GPU the GPU
# tests skip, the Triton templates run in Triton's interpreter and TVM builds for llvm.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
ruff check .
# One worker per core, at most 4 (each imports torch, Triton and TVM): on CI's 2 cores the
# suite took 20.7 minutes in one process and 11.1 in two (session 35).
exec python -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 "$@"
