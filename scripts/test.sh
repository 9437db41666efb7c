#!/usr/bin/env bash
# The test command (README): set-up if needed, lint, then every test. Without a GPU the GPU
# tests skip, the Triton templates run in Triton's interpreter and TVM builds for llvm.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
ruff check .
exec python -m pytest -q -p no:cacheprovider "$@"
