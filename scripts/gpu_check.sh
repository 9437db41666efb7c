#!/usr/bin/env bash
# The GPU-side checks, in one command on the GPU host (see benchmarks/RESULTS.md): every GPU
# test against float64 (logged to $OUT/gpu_errors.log), then the decode bandwidth benchmark.
# Usage there:  OUT=/some/dir bash scripts/gpu_check.sh [pytest -n workers]
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
[ -f .gpu/setup.sh ] && source .gpu/setup.sh
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-/tmp/gfwagen-gpu}"
mkdir -p "$out"
export GFWAGEN_GPU_LOG="$out/gpu_errors.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
# loadgroup: the tests marked xdist_group("big_memory") (tens of GiB each) run one at a time
# on one worker; side by side under -n 14 two of them ran the H200 out of memory (session 51).
# The whole run took 522 s at -n 14 on an H200; GPU_CHECK_TIMEOUT bounds it.
timeout "${GPU_CHECK_TIMEOUT:-900}" python3 -m pytest -q -p no:cacheprovider -n "${1:-12}" --dist loadgroup -m gpu \
  tests/test_gpu.py tests/test_fuzz_inputs.py tests/test_gpu_features.py tests/test_gpu_tvm.py \
  > "$out/pytest_gpu.log" 2>&1
echo "pytest exit $?" >> "$out/pytest_gpu.log"
tail -5 "$out/pytest_gpu.log"
timeout 120 python3 benchmarks/decode_bench.py --quick --graph > "$out/decode_bench.log" 2>&1
echo "decode_bench exit $?" >> "$out/decode_bench.log"
tail -15 "$out/decode_bench.log"
