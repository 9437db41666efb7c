#!/usr/bin/env bash
# The H200 tuning recorded in benchmarks/RESULTS.md, on a host with two H200s, in phases
# (each fits one call of the workplace's GPU machine):
#   s1-sweep  every feasible config of S1's space, each pass in one study shared by GPUs 0
#             and 1 (--devices 0,1: the two-GPU check)
#   s1-tpe    TPE on S1 with a quarter of each pass's sweep trials, then the report
#             (benchmarks/tuner_vs_sweep.py); PASSES="bwd_kv bwd_q" limits the passes
#   ship      S1-S5 (SHIP0 / SHIP1: the shapes of each GPU) tuned by two single-GPU processes
#             into two databases
#   classes   the 18 head-dim x window classes and the 3 full-causal ones, the same way
#             (session 4 ran the 18 with --trials 8..10, split differently across its calls;
#             session 32 the causal ones with --trials 6 then 10: benchmarks/RESULTS.md)
#   tvm-classes  TVM's forward (its default tile and the pingpong one) at head dims 64 and 128
#             on the classes that S1-S5 do not already cover, gated and ungated where the
#             pingpong tile had a chance (long windows, causal)
#   ungated-classes  Triton's ungated forward where TVM's was tuned ungated (so that
#             backend="auto" compares like with like), and the ungated backward's three passes
#             at head dims 64 and 128; each study tries the gated class's tiles first
#             (session 33 ran both phases after `db import tuning_db/h200.jsonl` into
#             h200.sqlite, on one GPU; each exports h200.jsonl --newest)
#   tvm-persistent  TVM's forward at head dim 64 (S5 and the classes where its pingpong tile
#             had a chance), the default, the pingpong tile and the persistent pingpong tile
#             timed in each study (session 34, after `db import tuning_db/h200.jsonl`)
#   tvm-bias-mma  TVM's gated bf16 forward at head dim 128 (S1-S4 and the classes), the
#             pingpong tile with and without bias_mma timed in each study (session 37
#             measured F1 -4.4%, S4 -1.8%, S1 +1.5%; run in session 38; after `db import`)
#   tvm-bias-mma-duel  S4 and the long-window head-dim-128 classes again, with --duel 3 (after
#             `db import`)
#   tvm-three  TVM's forward at head dim 64 on the causal and long-window classes, the
#             pingpong tiles against three consumers' 192 rows (and, gated, with bias_mma),
#             --duel 2 (session 39; after `db import`)
#   tvm-close-calls  the head-dim-128 W 2048 and W 256 bias_mma choices dueled (--duel 3), and
#             TVM's gated forward at head dim 64, W 256 (session 40; after `db import`)
#   tvm-retime-128  after session 42's interior-tile loop (split_loop: ungated 1-6% faster,
#             bias_mma 0.3-3.6%, the plain gated kernel unchanged) and session 43's running-max
#             shift loaded on the tile's arrival (bias_mma 1.6-3.5 points faster, plain
#             unchanged): TVM's gated head-dim-128 forward, plain against bias_mma, --duel 3,
#             at S1-S4 and the classes where plain was kept (W 256, 2048, 8192), and its
#             ungated forward at S1-S4 re-timed (backend="auto" compares it with Triton's)
#   tvm-retime-64  the same at head dim 64: S5 and the classes where the persistent plain
#             tile was kept (W 256, 1024, 2048) against it with bias_mma, and TVM's ungated
#             S5 (both phases after `db import tuning_db/h200.jsonl`; run in session 44)
#   tvm-s2-duel  S2's gated forward, plain against bias_mma, dueled again: tvm-retime-128
#             kept plain by median on timings within each other's spread (bias_mma 0.500-0.548
#             ms, plain 0.523-0.558; session 44), which a duel now extends (after `db import`)
#   tvm-s1-fused-duel  S1's gated forward with bias_mma, its tables from the records' launch
#             against its own gate warps' (fuse_gate; session 46), dueled (after `db import`)
#   tvm-stagger  the head-dim-64 causal, W 4096 and W 8192 classes' ungated forward, three
#             consumers (192 rows) staggered against unstaggered, plain and persistent,
#             dueled (session 49; after `db import`)
#   tvm-stagger-gated  the same classes' gated forward (192 rows with bias_mma), unstaggered
#             against staggered, dueled, one class at a time (session 49; after `db import`;
#             CLASSES="C-d64-w8192 C-d64-causal" runs those only, as session 50 did)
#   merge     S1's database plus the two, into h200.sqlite, exported best-only as h200.jsonl
# Usage:  OUT=/some/dir bash benchmarks/tune_h200.sh PHASE [extra tune options]
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
[ -f .gpu/setup.sh ] && source .gpu/setup.sh
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-/tmp/gfwagen-tune}"
mkdir -p "$out"
export GFWAGEN_CACHE_DIR="$out/cache"  # the studies' journals, read by the report
phase="$1"
# the long-window and causal classes of head dims 128 and 64 (tvm-classes, ungated-classes)
d128=C-d128-causal,C-d128-w2048,C-d128-w4096,C-d128-w8192
d64=C-d64-causal,C-d64-w2048,C-d64-w4096,C-d64-w8192
shift
tune() { python3 cli.py tune --gpu h200 --preset ship --format json "$@"; }
# TVM's square-tile pingpong forward, and it with bias_mma (the tvm-* phases' --try configs)
pp='{"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3, "extra": {"pingpong": true, "tma": true, "wgmma": true}}'
ppb='{"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3, "extra": {"pingpong": true, "tma": true, "wgmma": true, "bias_mma": true}}'
ppbf='{"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3, "extra": {"pingpong": true, "tma": true, "wgmma": true, "bias_mma": true, "fuse_gate": true}}'
# the persistent pingpong tile (head dim 64: its second Q buffer fits three stages there)
pers='{"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3, "extra": {"pingpong": true, "tma": true, "wgmma": true, "persistent": true}}'
# three consumers' 192 rows (head dims <= 64), plain and persistent
three='{"block_m": 192, "block_n": 128, "num_warps": 16, "num_stages": 3, "extra": {"pingpong": true, "tma": true, "wgmma": true}}'
threep='{"block_m": 192, "block_n": 128, "num_warps": 16, "num_stages": 3, "extra": {"pingpong": true, "tma": true, "wgmma": true, "persistent": true}}'
threeb='{"block_m": 192, "block_n": 128, "num_warps": 16, "num_stages": 3, "extra": {"pingpong": true, "tma": true, "wgmma": true, "bias_mma": true}}'
# a config with the stagger extra on (three consumers, each over its own rows' key tiles)
stag() { python3 -c "import json, sys; c = json.loads(sys.argv[1]); c['extra']['stagger'] = True; print(json.dumps(c))" "$1"; }
# the gated TVM forward, the pingpong tile timed without and with bias_mma
bm() { python3 cli.py tune --gpu h200 --backend tvm --passes fwd --gated --trials 3 \
         --try "$pp" --try "$ppb" --format json --no-plots --db "$out/h200.sqlite" "$@"; }

case "$phase" in
  s1-sweep)
    tune --only S1 --sweep --devices 0,1 --db "$out/s1.sqlite" --no-plots "$@" \
      > "$out/s1_sweep.json" 2> "$out/s1_sweep.log"
    ;;
  s1-tpe)
    for pass in ${PASSES:-fwd bwd_kv bwd_q}; do
      n=$(python3 -c "
from gfwagen.tuner import space; from gfwagen.spec import Problem
p = Problem(8, 4096, 16, 16, 128, 128, 512, 'bf16', True)
print(len(space.enumerate_configs(p.spec('triton', '$pass'))) // 4)")
      tune --only S1 --passes "$pass" --trials "$n" --devices 0,1 --db "$out/s1.sqlite" \
        --plots "$out/plots" "$@" > "$out/s1_tpe_$pass.json" 2> "$out/s1_tpe_$pass.log"
    done
    python3 benchmarks/tuner_vs_sweep.py --out "$out/tuner_vs_sweep.md"
    ;;
  ship)
    # two processes, one GPU and one database each (the merge is the sharing workflow)
    CUDA_VISIBLE_DEVICES=0 tune --only "${SHIP0:-S2,S3}" --db "$out/gpu0.sqlite" \
      --plots "$out/plots" "$@" > "$out/ship0.json" 2> "$out/ship0.log" &
    a=$!
    CUDA_VISIBLE_DEVICES=1 tune --only "${SHIP1:-S4,S5}" --db "$out/gpu1.sqlite" \
      --plots "$out/plots" "$@" > "$out/ship1.json" 2> "$out/ship1.log" &
    b=$!
    wait $a; wait $b
    ;;
  classes)
    # the 21 classes, split between the two GPUs (--trials etc. in "$@")
    c0=C-d64-w256,C-d64-w512,C-d64-w1024,C-d64-w2048,C-d64-w4096,C-d64-w8192,C-d128-w256,C-d128-w512,C-d128-w1024,C-d64-causal,C-d128-causal
    c1=C-d128-w2048,C-d128-w4096,C-d128-w8192,C-d256-w256,C-d256-w512,C-d256-w1024,C-d256-w2048,C-d256-w4096,C-d256-w8192,C-d256-causal
    CUDA_VISIBLE_DEVICES=0 tune --only "$c0" --db "$out/gpu0.sqlite" --no-plots "$@" \
      > "$out/classes0.json" 2> "$out/classes0.log" &
    a=$!
    CUDA_VISIBLE_DEVICES=1 tune --only "$c1" --db "$out/gpu1.sqlite" --no-plots "$@" \
      > "$out/classes1.json" 2> "$out/classes1.log" &
    b=$!
    wait $a; wait $b
    ;;
  tvm-classes)
    tvm() { python3 cli.py tune --gpu h200 --preset classes --backend tvm --passes fwd --trials 2 \
              --try "$pp" --format json --no-plots --db "$out/h200.sqlite" "$@"; }
    tvm --gated --only "$d128,C-d128-w256,$d64,C-d64-w1024" > "$out/tvm_gated.json"
    tvm --no-gated --only "$d128,$d64" > "$out/tvm_ungated.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    ;;
  tvm-persistent)
    pt() { python3 cli.py tune --gpu h200 --backend tvm --passes fwd --trials 3 --try "$pp" \
             --try "$pers" --format json --no-plots --db "$out/h200.sqlite" "$@"; }
    pt --preset standard --gated --only S5 > "$out/pers_s5.json"
    pt --preset standard --no-gated --only S5 > "$out/pers_s5_ungated.json"
    pt --preset classes --gated --only "$d64,C-d64-w1024" > "$out/pers_gated.json"
    pt --preset classes --no-gated --only "$d64" > "$out/pers_ungated.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    ;;
  tvm-bias-mma)
    # exported after each part: a call cut short by its time limit keeps what it tuned
    bm --preset standard --only S1,S2,S3,S4 > "$out/bias_mma_ship.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    bm --preset classes --only "$d128,C-d128-w256,C-d128-w512,C-d128-w1024" \
      > "$out/bias_mma_classes.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    ;;
  tvm-bias-mma-duel)
    # the long-window classes again, each config timed four times, alternately (--duel):
    # the phase above timed each once, in sequence, and kept S4 without bias_mma at
    # 1.687 against 1.767 ms, where interleaved calls measure it 1.75% faster with it
    bm --duel 3 --preset standard --only S4 > "$out/bias_mma_duel_s4.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    bm --duel 3 --preset classes --only C-d128-w8192,C-d128-w4096,C-d128-causal \
      > "$out/bias_mma_duel_classes.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    ;;
  tvm-three)
    # the persistent and plain pingpong tiles against three consumers' 192 rows, plain and
    # persistent (and, gated, with bias_mma); session 39 ran it in three parts (RESULTS.md)
    t3() { python3 cli.py tune --gpu h200 --backend tvm --passes fwd --preset classes --only "$d64" \
             --try "$pers" --try "$three" --try "$threep" --duel 2 --format json --no-plots \
             --db "$out/h200.sqlite" "$@"; }
    t3 --gated --trials 6 --try "$pp" --try "$threeb" > "$out/three_gated.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    t3 --no-gated --trials 4 > "$out/three_ungated.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    ;;
  tvm-stagger)
    python3 cli.py tune --gpu h200 --backend tvm --passes fwd --preset classes --no-gated \
      --only C-d64-causal,C-d64-w4096,C-d64-w8192 --trials 5 --try "$three" \
      --try "$(stag "$three")" --try "$threep" --try "$(stag "$threep")" --duel 3 \
      --compile-jobs 5 --format json --no-plots --db "$out/h200.sqlite" "$@" \
      > "$out/stagger_ungated.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    ;;
  tvm-stagger-gated)
    for cls in ${CLASSES:-C-d64-w4096 C-d64-w8192 C-d64-causal}; do
      python3 cli.py tune --gpu h200 --backend tvm --passes fwd --preset classes --gated \
        --only "$cls" --trials 3 --try "$threeb" --try "$(stag "$threeb")" --duel 3 \
        --compile-jobs 3 --format json --no-plots --db "$out/h200.sqlite" "$@" \
        > "$out/stagger_gated_$cls.json"
      python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    done
    ;;
  tvm-close-calls)
    # session 38's single-timing choices at head dim 128 (bias_mma at W 2048 by 11.8%, plain
    # at W 256 by 3.1%) dueled, and the gated head-dim-64 W 256 class, which had no TVM
    # forward entry (S5's tiles timed there); session 40 (after `db import`)
    bm --duel 3 --preset classes --only C-d128-w2048,C-d128-w256 > "$out/close_d128.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    python3 cli.py tune --gpu h200 --backend tvm --passes fwd --gated --trials 4 --try "$pp" \
      --try "$pers" --duel 2 --preset classes --only C-d64-w256 --format json --no-plots \
      --db "$out/h200.sqlite" > "$out/tvm_d64_w256.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    ;;
  ungated-classes)
    plain() { python3 cli.py tune --gpu h200 --preset classes --no-gated --trials 6 --format json \
                --no-plots --db "$out/h200.sqlite" "$@"; }
    plain --passes fwd --knobs tma,maxnreg --only "$d128,$d64" > "$out/triton_ungated_fwd.json"
    plain --passes bwd_kv,bwd_q,bwd_ds --only "$d64,C-d64-w256,C-d64-w1024" \
      > "$out/triton_ungated_bwd64.json"
    plain --passes bwd_kv,bwd_q,bwd_ds --only "$d128,C-d128-w256" > "$out/triton_ungated_bwd128.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    ;;
  tvm-retime-128)
    # exported after each part: a call cut short by its time limit keeps what it tuned
    bm --duel 3 --preset standard --only S1,S2,S3,S4 > "$out/retime_s1_s4.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    bm --duel 3 --preset classes --only C-d128-w256,C-d128-w2048,C-d128-w8192 \
      > "$out/retime_d128_classes.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    python3 cli.py tune --gpu h200 --backend tvm --passes fwd --no-gated --trials 2 --try "$pp" \
      --preset standard --only S1,S2,S3,S4 --format json --no-plots --db "$out/h200.sqlite" \
      > "$out/retime_ungated.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    ;;
  tvm-retime-64)
    persb='{"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3, "extra": {"pingpong": true, "tma": true, "wgmma": true, "persistent": true, "bias_mma": true}}'
    t64() { python3 cli.py tune --gpu h200 --backend tvm --passes fwd --try "$pers" \
              --format json --no-plots --db "$out/h200.sqlite" "$@"; }
    t64 --gated --trials 3 --try "$persb" --duel 3 --preset standard --only S5 \
      > "$out/retime_s5.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    t64 --gated --trials 3 --try "$persb" --duel 3 --preset classes \
      --only C-d64-w256,C-d64-w1024,C-d64-w2048 > "$out/retime_d64_classes.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    t64 --no-gated --trials 2 --preset standard --only S5 > "$out/retime_s5_ungated.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    ;;
  tvm-s2-duel)
    bm --duel 6 --preset standard --only S2 > "$out/s2_duel.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    ;;
  tvm-s1-fused-duel)
    python3 cli.py tune --gpu h200 --backend tvm --passes fwd --gated --trials 3 --try "$ppb" \
      --try "$ppbf" --duel 6 --preset standard --only S1 --format json --no-plots \
      --db "$out/h200.sqlite" "$@" > "$out/s1_fused_duel.json"
    python3 cli.py db export "$out/h200.jsonl" --newest --db "$out/h200.sqlite"
    ;;
  merge)
    cp "$out/s1.sqlite" "$out/h200.sqlite"
    for f in "$out"/gpu0.sqlite "$out"/gpu1.sqlite; do
      [ -f "$f" ] && python3 cli.py db merge "$f" --db "$out/h200.sqlite"
    done
    python3 cli.py db export "$out/h200.jsonl" --best-only --db "$out/h200.sqlite"
    ;;
  *)
    echo "phase: s1-sweep | s1-tpe | ship | classes | tvm-classes | tvm-persistent | tvm-bias-mma | tvm-bias-mma-duel | tvm-three | tvm-close-calls | tvm-retime-128 | tvm-retime-64 | tvm-s2-duel | tvm-s1-fused-duel | ungated-classes | merge" >&2
    exit 2
    ;;
esac
