#!/usr/bin/env bash
# The main job (README): set-up if needed, then tune the default problem set on this
# machine into the local SQLite tuning database (GFWAGEN_DB, else the user cache directory).
# With a GPU it tunes the Triton kernels for it; without one, the TVM kernels for the CPU.
# Extra arguments go to `gfwagen tune` (e.g. --preset standard --trials 60).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/setup.sh"
gfwagen tune --gpu auto --preset quick --trials "${GFWAGEN_TRIALS:-8}" "$@"
gfwagen db show
