"""GatedFWA forward on Hopper's warpgroup MMA (wgmma), as a TensorIR PrimFunc factory (TVM 0.27).

Imports nothing from gfwagen (loaded through gfwagen.template_loader). Needs sm_90a.

`make_forward_tc(head_dim, value_dim, window, dtype, gated, group, config)` closes over the
specialization (fp16/bf16, head dims multiples of 64) and the config (block_m = 64 rows per
warpgroup x warpgroups: 64, 128, or 192 with the pingpong schedule; block_n keys per tile;
num_stages 3: the shared-memory stages of K and V that the pipelined schedule below needs)
and returns a PrimFunc with the signature of fwd_cuda.make_forward_tc:

    gfwa_fwd(q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv], c [*,*,*] float64 ([B,Hq,T] prefix
             sums; a dummy when ungated), o [B,T,Hq,Dv], lse [B,Hq,T] float32, scale)

Why a second tensor-core template: mma.sync (fwd_cuda.py) feeds every operand through the
register file, one ldmatrix per fragment and warp, and on the H200 that kernel is bound by
shared-memory reads at about 65% of Triton's speed. wgmma reads K and V from shared memory
once per warpgroup of 64 rows, and Q from shared memory too, so the registers hold only the
scores, P and the output accumulator.

Per key tile: S = Q K^T is D/16 wgmma m64nBNk16 (both operands in shared memory); the softmax
runs on S in registers; O += P V is BN/16 wgmma m64nDVk16 with P from registers (its A
fragment is the S accumulator narrowed pairwise: the same lanes hold the same rows and
columns) and V from shared memory, read transposed (V is [keys, Dv] row-major, so N = Dv is
its contiguous dimension). The schedule is pipelined: iteration j issues tile j+1's scores
and tile j's P V as two commit groups, runs tile j+1's softmax while P V is in flight, and
rescales O once it is done (P V writes O). cp.async keeps K and V a tile ahead in three
stages (tile j+2 loads into the stage tile j-1 left), so one barrier per tile both
publishes the next tile and frees the stage. The two-stage schedule without the overlap
(session 8) was up to 17% slower at S1-S5 on the H200 (3.7% faster once, at S5, in one run
of two) and is gone.

Shared memory: one flat buffer, every operand in 128-byte-swizzle atoms (8 rows of 64
elements, each 16-byte chunk c of row r stored at chunk c ^ (r % 8)), atoms of 64 columns
stacked [column block][row][64]. Q and K are K-major (D contiguous): a 16-wide k step is a
32-byte step of the descriptor's start address inside an atom; 8-row groups are 1024 bytes
apart (SBO). V is MN-major: 8-key groups 1024 bytes apart (SBO), 64-column blocks block_n x
128 bytes apart (LBO). Each region starts on a 1024-byte boundary, which the swizzle needs.

Accumulator and A fragments (PTX ISA, wgmma .m64nNk16): warp w of a warpgroup owns rows
16 w..16 w + 15; lane = 4 g + t holds d[4 nb + 2 r + e] = (row g + 8 r, column 8 nb + 2 t + e),
and A register u holds (row g + 8 (u % 2), k 2 t + 8 (u // 2) + {0, 1}).

The gate and the masks are those of fwd_cuda.py: a float64 reference c[b, h, i0] per query
tile, logits in log2 units, tiles inside every row's window skip the mask.

Config extras (session 17, H200 numbers in benchmarks/RESULTS.md):
- `tma`: Q, K and V come by bulk tensor copies (cp.async.bulk.tensor through tensor maps the
  host encodes per call, 128-byte swizzle), one thread issuing them against an mbarrier per
  stage, instead of every thread's cp.async and its index math. S4's 128x128 tile: 2.57 ->
  2.18 ms.
- `pingpong` (with tma, block_m 128): FlashAttention-3's warp specialization. A producer
  warpgroup (40 registers; one warp works) fills the stages and writes the gate sums; two
  consumer warpgroups (232 registers) run the pipelined loop on 64 rows each and take turns
  issuing their products on named barriers, so one's softmax overlaps the other's matrix
  work. S4: 1.93 ms gated, 1.86 ungated (the gate's cost 4%).
  Since session 19 each consumer stages its output in shared memory (its own Q rows) and
  stores it with bulk tensor copies where Dv <= D (O_TMA below): a block's epilogue had
  taken 4.4-4.9 us of 17 at S1, and the tuner's medians fell 12-25% at S1-S3, 4-7% at S4.
  Since session 20 the gated score product starts from the keys' biases (bias_scores), so
  the softmax is the ungated one: the consumers' loop spilled 96 bytes per thread gated (16
  ungated) and now spills none; the gated kernel ran 3.3-3.5% faster at S1-S2.
  Since session 21 a consumer's row gate sums are ready before its first wait (_PIN): one
  load had been sunk into the first tile's product issue. At S1 the gated block's first
  tile and epilogue now take as long as the ungated one's (pp_phases.py), and the gated
  kernel's excess per block slot fell from 7.9% to 5.3%.
  Since session 24 the pingpong kernel with square tiles takes the gate per key tile
  (gate_input "tiles"): a launch before it writes each key tile's record, the keys' biases
  relative to the tile's start and the tile's gate total (gfwagen.gate_sums.
  tile_records_fused, 3.5-3.9 us at S1-S4 against the float64 sums' 6.6-9.7), and the
  producer brings a record in with one more bulk copy per tile. Its warp had loaded, summed
  and stored each key's bias itself, 70 of its loop's 144 instructions, on a scheduler it
  shares with two consumer warps. The consumers move their running max by the previous
  tile's total from one tile to the next, and take a row's own c_i for its lse from the last
  tile. H200, paired calls: the kernel 0.7-1.6% faster at S1-S4, 1.3-2.2% with its launch.
  And the consumers load the next tile's biases while O's rescale runs (next_biases), not
  right before their turn at the tensor cores: the gated kernel's excess over the ungated
  one went from 5.0-5.7% to 2.8-4.2% at S1-S4.
- `persistent` (with pingpong, Dv <= D; session 34): one block per SM
  (true; the op resolves it to the device's SM count, tvm_backend.resolve_persistent), each
  looping over query tiles, a sequence's longest first and the blocks in snake order (a
  fixed stride left the blocks unequal work). Q has two buffers: the producer loads the next
  query tile's rows and first key tiles while the consumers finish this one and store its
  output from the other buffer, where a new block would have waited for its launch, Q and
  first tile (about 2.5 us at S1, pp_phases.py). The consumers' loop runs two rounds a step,
  one per buffer, so that each copy reads Q at a constant offset. H200, tuner medians at
  head dim 64, the gated forward against the pingpong tile's (another call; RESULTS.md,
  session 34): S5 -9% (0.2985 -> 0.2719 ms), W 1024 -8%, W 2048 -5%, W 4096 and 8192 -3% to
  -4%, causal -2%; ungated, W 4096 and 8192 within 1.3% of it (slower). The second Q buffer
  does not fit next to three 128-key stages at head dim 128.
  Since session 35 consumer 1 hands consumer 0 its first turn of the next query tile right
  after issuing its own last P V, not after its epilogue: consumer 0's first product and
  softmax there overlap consumer 1's normalizing and storing. S5 4.8% faster (CUDA graphs),
  W 1024 2%, the longer windows within 1.3%.
- The pingpong schedule may run 4 stages (num_stages 4); at S5 no faster than 3.
- block_m 192 (pingpong, head dims <= 64; session 39): three consumer warpgroups take turns
  round a ring of named barriers, FlashAttention-3's split for head dim 64, at 160 registers
  (consumer_regs; S, P and O fit there at head dim 64 and 128-key tiles, offline ptxas: no
  spills ungated or with bias_mma, 140 bytes gated without). At head dim 64 a consumer's
  softmax outlasts the other's products (S5's forward runs at a third of the dense matrix
  rate, S4's at three quarters), so a third consumer's products fill the gap. With 128-key
  tiles it reads the tile records too: a block's rows span its last two key tiles, whose
  stages a next query tile may have taken by the epilogue, so row_sums_ahead reads each
  row's c_i from the records in global memory before the loop. H200 (tuner timings, duels):
  gated with bias_mma, causal T 8192 1.368 -> 1.276 ms, W 8192 2.04 -> 1.86, W 4096 1.07 ->
  1.00; ungated, causal 1.32 -> 1.21, W 8192 1.97 -> 1.77. Slower at short windows, whose
  192 rows waste more of the key tiles at the window's edges: S5 gated +16%, ungated +10%; W
  2048 +25%. A tuner choice of block_m.
- Since session 36 the softmax takes each tile's max on the raw products (stats), which needs
  a positive scale: tvm_backend.wgmma_scale runs a negative one on -Q.
- `fuse_gate` (with pingpong, block_n == block_m; session 23): the kernel takes the raw log
  gates and needs no launch before it. Since session 46 the producer warpgroup's idle warps
  make each key tile's record (with bias_mma: its bias table) from them, one warp per stage
  (config extra `gate_warps`, for A/B runs, sets how many), scanning a tile before its stage
  is free and storing it after (produce_gates); session 23 had the copying warp scan, after
  the wait. H200, CUDA graph replays, with bias_mma: S1 -1.1% against the records' launch
  and the kernel, and the tuner's duel agrees (medians 0.355 against 0.362 ms); S5 +1.6%,
  S2 +1.8%, S4 +8.6%: the gate warps' strided loads (a tile's 128 gates 64 bytes apart)
  are the cost, not their scan or the proxy fence (probes, RESULTS.md session 46). Where
  key tiles are few, the launch saved outweighs them. A tuner knob. Its option `gate_tma`
  (one gate warp): the raw gates by a bulk tensor copy of a [4 heads x block_n keys] box
  into one of two 2 KB staging slots, issued a tile ahead (gate_box_bytes; head count a
  multiple of 4, tvm_backend drops it elsewhere; it does not fit beside three 128-key
  stages at head dim 128), so no L1 traffic. S5, CUDA graph replays: 1.088x the ungated
  kernel against the gate warps' loads' 1.105x and the records' launch and kernel's 1.093x
  (session 47); not shipped. Session 47 also removed `gate_carry` (each tile's biases
  relative to the query tile's first key tile, no running-max shift): 1.2 points faster
  at S5, but its biases grow to the window's gate sum, and three bf16 pieces lost the
  lse's precision with strong gates (2.1e-4 against float64, RESULTS.md session 47).
- `bias_mma` (bf16, with the tile records; session 37): the score product starts with one
  more wgmma k step, A from registers (ones in three k columns) and B the key tile's biases
  as three bf16 pieces (key_table_bytes: 912 bytes a stage with the total, so it fits
  beside three 128-key stages at head dim 128), instead of from accumulators each consumer
  thread filled with 16 loads and 32 copies a tile. Offline SASS at head dim 128: the gated
  loop 1003 -> 956 instructions (ungated 949). H200, the gated forward: F1 -4.4% (the gate
  7.6% -> 2.9% of the ungated one), S4 -1.8%, S2-S3 within 0.3%, S1 +1.5%, S5 (head dim
  64) +3.5%: its extra k step lengthens each consumer's wait for its scores, which pays
  where key tiles are many. A tuner knob.
- `split_loop` (pingpong, on unless a config sets it false; session 42): the key tiles that
  need no mask run in a loop of their own, whose step has no masked branch (key_step). H200:
  ungated 1-6% faster, gated with bias_mma 0.3-3.6%, bit-identical. Not for the gated kernel
  without bias_mma, which ptxas would serialize (C7511); with its biases loaded again at the
  loops' seams it compiles clean but ran 1.3-1.7% slower at S1 and 2-3% at S5 (session 43).
- `stagger` (three consumers, block_m 192; session 49): each consumer visits only the key
  tiles its own 64 rows see, and passes its turn (the barriers and its stage release, no
  product) on the block's others, so that a row computes as many keys as with 128-row
  blocks (640 at W 512 over 128-key tiles, against 768 unstaggered).
- Since session 43 each key tile's gate total (the running max's shift) is read when the tile
  arrives, not after its P V (shift_rows): with bias_mma the gate's cost in the kernel fell
  from 4.9-7.0% to 3.2-3.5% of the ungated one at S1, S2 and S4 (H200).
  Since session 50 the step tests for a next tile (whether to shift) in int32, and not at
  all in the interior loop (key_step): the gated kernel's cost over the ungated one at S5
  6.2% -> 5.0%, S1 3.9% -> 2.8%, S2 and S4 0.4 points less (H200, CUDA graph replays).
"""

from __future__ import annotations

from tvm.script import tirx as T

from .fwd_cuda import _DT, LN2, LOG2E, MASK

_WGMMA = {"fp16": "f32.f16.f16", "bf16": "f32.bf16.bf16"}
_PACK = {"fp16": "cvt.rn.f16x2.f32", "bf16": "cvt.rn.bf16x2.f32"}
ATOM = 64  # elements per swizzled row (128 bytes of fp16/bf16)
# An empty asm statement that takes a value: the compiler must have it computed here. Without
# it, nvcc sank a consumer's second row gate-sum load (read-only, so free to move) past the
# waits for Q and the first key tile, and stalled on it in the middle of issuing that tile's
# score product, holding up both consumers' turns (offline sm_90a SASS, session 21).
_PIN = ('__forceinline__ __device__ void gfwa_pin(float x) { asm volatile("" :: "f"(x)); }')
# gfwagen.gate.GATE_BOUND (this file imports nothing from gfwagen; a test keeps them equal):
# the clamp the fused gate sums apply to the raw gates as they load them
GATE_BOUND = 128.0
NEG_INF = -T.infinity("float32")  # a masked score (stats)
SW128 = 3  # the descriptor encoder's code for the 128-byte swizzle
SW128_MAP = 3  # CUtensorMapSwizzle's code for it (CU_TENSOR_MAP_SWIZZLE_128B)


def supports(head_dim, value_dim, dtype, config) -> str | None:
    """None when this template can run the specialization, else why not."""
    if dtype not in _DT:
        return f"dtype {dtype!r} (wgmma here: fp16, bf16)"
    if head_dim % ATOM or value_dim % ATOM or value_dim > 256:
        return f"head dims {head_dim}/{value_dim} (multiples of 64, value dim <= 256)"
    bm, bn, ns = int(config.block_m), int(config.block_n), int(config.num_stages)
    if bm not in (64, 128, 192):
        return f"block_m {bm} (64 rows per warpgroup, 1 to 3 warpgroups)"
    if bn % 16 or not 16 <= bn <= 256:
        return f"block_n {bn} (a multiple of 16, <= 256)"
    if ns != 3 and not (config.get("pingpong", False) and ns == 4):
        return (f"num_stages {ns} (3: K and V a tile ahead of the pipelined schedule; the "
                "pingpong one's producer may run 4)")
    if config.get("pingpong", False) and (bm == 64 or not config.get("tma", False)):
        return ("pingpong (two or three consumer warpgroups fed by bulk copies: block_m 128 "
                "or 192 and tma)")
    if bm == 192 and not (config.get("pingpong", False) and max(head_dim, value_dim) <= 64):
        # three consumers take 160 registers a thread (consumer_regs), which holds S, P
        # and O only at head dims <= 64
        return "block_m 192 (three pingpong consumer warpgroups: head dims <= 64)"
    if config.get("stagger", False) and bm != 192:
        return "stagger (three consumer warpgroups: block_m 192)"
    persistent = config.get("persistent", False)
    if persistent is not False and (not config.get("pingpong", False) or value_dim > head_dim
                                    or int(persistent) < 1):
        return ("persistent (true or a block count >= 1, with pingpong, its output staged in "
                "its Q rows: value dim <= head dim)")
    if config.get("fuse_gate", False) and not _square_pingpong(config):
        return "fuse_gate (the pingpong schedule with block_n == block_m)"
    gate_warps = config.get("gate_warps", None)
    wants_gate_tma = config.get("gate_tma", False)
    if wants_gate_tma and not (config.get("fuse_gate", False) and config.get("bias_mma", False)):
        return "gate_tma (with fuse_gate and bias_mma)"
    if gate_warps is not None and (not config.get("fuse_gate", False)
                                   or int(gate_warps) not in (1, ns) or int(gate_warps) > 3
                                   or (wants_gate_tma and int(gate_warps) != 1)):
        # produce_gates gives each warp one stage (or one warp all): the producer warpgroup
        # has three besides the copying one
        return (f"gate_warps {gate_warps} (with fuse_gate: 1, or one a stage where there are "
                "3 stages and not gate_tma)")
    if config.get("bias_mma", False) and (dtype != "bf16"
                                          or gate_input(config) not in ("tiles", "raw")):
        return ("bias_mma (bf16, with the tile records or fuse_gate: pingpong, block_n == "
                "block_m)")
    threads = 2 * bm
    # (three consumers: every copy is a bulk one, so no thread count divides them)
    for dim in (head_dim, value_dim) if bm != 192 else ():
        if (bn * dim // 8) % threads or (bm * head_dim // 8) % threads:
            return f"block_n {bn} x dim {dim} / 8 copies not a multiple of {threads} threads"
    return None


def _square_pingpong(config) -> bool:
    # the schedules whose biases are relative to each key tile's start: the producer warp
    # brings a tile's, and a block's rows are its last key tile (row_sums_relative)
    return bool(config.get("pingpong", False)) and int(config.block_m) == int(config.block_n)


def _tile_pingpong(config) -> bool:
    # the schedules that read the key tiles' records: the square ones, and three consumers'
    # 192 rows over 128-key tiles (row_sums_ahead)
    return _square_pingpong(config) or (bool(config.get("pingpong", False))
                                        and int(config.block_m) == 192
                                        and int(config.block_n) == 128)


def gate_input(config) -> str:
    """What the gated kernel of this config reads for the gate (its `c` argument):
    - "tiles", the pingpong schedule with square tiles or three consumers (192 rows) over
      128-key tiles: float32 records [B, Hq,
      ceil(T / block_n) * (block_n + 4)], one per key tile: each key's bias -(sum of the
      tile's gates up to it) / scale, then the tile's gate total times log2(e), then 3 zeros
      (16 bytes a record, one bulk copy). gfwagen.gate_sums.tile_records_fused makes them;
    - "raw", the same with config extra `fuse_gate`: the raw log gates [B, T, Hq], float32
      contiguous, which the producer's gate warps sum a key tile at a time;
    - "sums" elsewhere: the float64 prefix sums [B, Hq, T] of a launch of their own."""
    if config.get("fuse_gate", False) and _square_pingpong(config):
        return "raw"
    return "tiles" if _tile_pingpong(config) else "sums"


def record_floats(block_n, table=False) -> int:
    """Floats per key-tile record of the "tiles" gate input and per shared-memory bias slot
    of the tile-relative schedules: the biases (table: as key_table_bytes' bf16 pieces), the
    total, padding to 16 bytes."""
    return (key_table_bytes(block_n) // 4 if table else int(block_n)) + 4


def key_table_bytes(block_n) -> int:
    """Bytes of a key tile's bias table (config extra `bias_mma`): the score product's extra
    k step reads it as B, MN-major without swizzle. Each 8-key group's core matrix is 8 k rows
    of 16 bytes (8 bf16 keys); rows 0-2 hold the biases' bf16 pieces (hi, mid, lo), rows 3-7
    are never weighed (A is 0 there). So group j starts 48 bytes after group j - 1, its rows
    3-7 overlapping the next groups' pieces, and the k rows 8-15 (also weighed 0) lie 48
    bytes on: the last group's reach, zero-padded."""
    return (int(block_n) // 8) * 48 + 128


def key_table(config) -> bool:
    """Config extra `bias_mma` (bf16, the "tiles" or "raw" gate input): the keys' biases
    enter the score product as one more wgmma k step (A ones in three k columns, from
    registers; B the key tile's bias pieces, key_table_bytes) instead of as its
    accumulator's start values, which each consumer thread had to load and copy
    (bias_scores). With fuse_gate the producer's gate warps write the tables themselves."""
    return bool(config.get("bias_mma", False)) and gate_input(config) in ("tiles", "raw")


def smem_bytes(head_dim, value_dim, config) -> int:
    bm, bn, ns = int(config.block_m), int(config.block_n), int(config.num_stages)
    barriers = 8 * (ns + 1) if config.get("tma", False) else 0
    if config.get("pingpong", False):
        barriers += 8 * ns  # a stage's "free" barrier
    slot = record_floats(bn, key_table(config)) if gate_input(config) != "sums" else bn
    q_buffers = 1
    if config.get("persistent", 0):
        q_buffers, barriers = 2, barriers + 24  # Q buffer 1's full barrier, both empty ones
    staged = 0
    if gate_tma(config):  # two slots of staged gates and their barriers
        staged, barriers = gate_box_bytes(bn) * 2, barriers + 16
    return (q_buffers * 2 * bm * head_dim + ns * (2 * bn * (head_dim + value_dim) + 4 * slot)
            + staged + barriers)


def gate_tma(config) -> bool:
    """Config extra `gate_tma` (with fuse_gate and bias_mma): the gate warp brings each key
    tile's raw gates by a bulk tensor copy of GATE_BOX_HEADS heads (16 bytes a key, the
    copy's least) into shared memory, instead of 128 loads 64 bytes apart through L1 (the
    cost of fuse_gate at long windows, RESULTS.md session 46). Needs the head count a
    multiple of GATE_BOX_HEADS (tvm_backend drops it elsewhere)."""
    return bool(config.get("gate_tma", False)) and gate_input(config) == "raw" and \
        key_table(config)


GATE_BOX_HEADS = 4


def gate_box_bytes(block_n) -> int:
    """One key tile's staged gates (gate_tma): block_n keys x GATE_BOX_HEADS float32."""
    return int(block_n) * GATE_BOX_HEADS * 4


def registers(head_dim, value_dim, config) -> int:
    """Estimated registers per thread (two consumers' setmaxnreg share, 232; three consumers
    get 160, which their head dims <= 64 fit: consumer_regs): S (block_n / 2 fp32) and P
    (block_n / 4 packed pairs),
    O (value_dim / 2 fp32) and 79 for addresses, descriptors and row statistics. Offline
    ptxas (sm_90a, 25 tiles, D and Dv in {64, 128, 256}): 150-255 registers; the tiles this
    counts under 255 compile without spills, the three at 255 (Dv = 256, 64 keys) spill
    16-44 bytes, and the ones over it 3.2 KB (256 keys)."""
    bn = int(config.block_n)
    return 3 * bn // 4 + value_dim // 2 + 79


def consumer_regs(consumers) -> tuple[int, int]:
    """setmaxnreg's (producer, consumer) registers a thread for the pingpong schedule with
    `consumers` warpgroups: the 64K a block has, most of it to the consumers, whose S, P and
    O live in registers (FlashAttention-3 splits them 24/240 and 32/160)."""
    return (40, 232) if consumers == 2 else (32, 160)


def make_forward_tc(head_dim, value_dim, window, dtype, gated, group, config):
    D, DV, G = int(head_dim), int(value_dim), int(group)
    W = int(window or 0)  # 0: full causal
    why = supports(D, DV, dtype, config)
    if why is not None:
        raise NotImplementedError(f"tvm wgmma forward: unsupported {why}")
    dt = _DT[dtype]
    gated = bool(gated)
    BM, BN, NS = int(config.block_m), int(config.block_n), int(config.num_stages)
    TMA = bool(config.get("tma", False))
    PP = bool(config.get("pingpong", False))
    # persistent: the grid is at most NSM blocks, and each loops over query tiles NSM apart
    NSM = config.get("persistent", False)
    if NSM is True:
        raise ValueError("persistent=True: the caller names the block count "
                         "(gfwagen.backends.tvm_backend.resolve_persistent)")
    NSM = int(NSM)
    PERS = NSM > 0
    NT = 2 * BM  # a warpgroup of 128 threads per 64 rows
    NB = BN // 8  # 8-key accumulator blocks of S
    NDB = DV // 8  # 8-column blocks of O
    NGC = (BN + NT - 1) // NT  # gate sums per thread per key tile
    mma_s = f"wgmma.mma_async.sync.aligned.m64n{BN}k16.{_WGMMA[dtype]}"
    mma_o = f"wgmma.mma_async.sync.aligned.m64n{DV}k16.{_WGMMA[dtype]}"
    pack = _PACK[dtype]
    GATE_IN = gate_input(config) if gated else None
    FUSED = GATE_IN == "raw"
    TILES = GATE_IN == "tiles"
    # the biases relative to each key tile's start, the running max moved from tile to tile
    RELATIVE = FUSED or TILES
    C_DT = "float32" if RELATIVE else "float64"
    # a stage's bias slot, in floats; RELATIVE: the tile's gate total at [TOTAL] (log2
    # units). TILES and bias_mma: each record is the keys' bias table, then the total
    TABLE = gated and key_table(config)  # key_table: only with the tile records
    # fuse_gate's option (one gate warp): the raw gates by bulk tensor copies
    GTMA = gated and gate_tma(config)  # (gate_tma implies FUSED and TABLE)
    CS = record_floats(BN, TABLE) if RELATIVE else BN
    REC_BYTES = 4 * record_floats(BN, TABLE)
    TOTAL = key_table_bytes(BN) // 4 if TABLE else BN  # the total's float in a slot
    # pingpong: the arrivals a stage's mbarrier counts: the gate's 32 writers (FUSED: and
    # lane 0's copies), else lane 0's copies alone (produce)
    ARRIVALS = 33 if FUSED else 32 if gated and not TILES else 1
    # byte offsets in the flat shared buffer (4-byte words: it is declared float32 so the
    # gate sums can live in it too; Q, K and V are reached through addresses only)
    Q_OFF = 0
    QBYTES = 2 * BM * D  # one block's Q rows
    # persistent: two Q buffers, so a block's next query tile loads while this one's output
    # (staged in its own Q rows) is stored
    K_OFF = Q_OFF + (2 if PERS else 1) * QBYTES
    V_OFF = K_OFF + NS * 2 * BN * D
    # gate_tma: two slots of a key tile's staged raw gates (128-byte aligned, as a bulk
    # tensor copy's destination needs), then the bias slots
    GS_OFF = V_OFF + NS * 2 * BN * DV
    C_OFF = GS_OFF + (2 * gate_box_bytes(BN) if GTMA else 0)
    # with tma: one mbarrier (8 bytes) for Q and one per stage, after the gate sums
    MB_OFF = C_OFF + NS * CS * 4
    # pingpong: then NS "free" barriers, which the consumers release a stage on
    FREE = 1 + NS
    # persistent: then Q buffer 1's "full" barrier and both buffers' "empty" ones, which the
    # consumers release a buffer on once its output rows are stored
    Q1_FULL = 1 + 2 * NS
    Q_EMPTY = 2 + 2 * NS
    # gate_tma: then the two gate slots' "full" barriers
    GATE_BAR = 1 + 2 * NS + (3 if PERS else 0)
    WORDS = (MB_OFF + (8 * (NS + 1) if TMA else 0) + (8 * NS if PP else 0)
             + (24 if PERS else 0) + (16 if GTMA else 0)) // 4
    TILE_BYTES = 2 * BN * (D + DV)  # what one key tile's bulk copies deliver
    # pingpong: each consumer stages its 64 x DV output tile in its own Q rows (read for the
    # last time by its last score product) and one bulk tensor copy per 64-column atom block
    # stores it. Written straight from the accumulators, 2-byte stores of 8 rows each took
    # 4.4-4.9 us of a block's 17 at S1 (RESULTS.md, session 19). Needs DV <= D to fit.
    O_TMA = PP and DV <= D
    # pingpong: the key tiles that need no mask run in a loop of their own (key_step says
    # why); config extra split_loop false keeps the one loop, for A/B runs
    SPLIT = bool(config.get("split_loop", True)) and (not gated or TABLE)
    # three consumers: each visits only its own rows' key tiles (consumer_tiles)
    STAGGER = BM == 192 and bool(config.get("stagger", False))
    CROWS = 64 if STAGGER else BM  # the rows a consumer's masks and interior tests cover

    @T.macro
    def copy_rows(smem, base, rows_here, flat, start, row_elems, last, dim, tx):
        # rows start, start + row_elems, ... of a flat [B * T * H * dim] view (rows_here of
        # them, `last` the index of the sequence's last) into swizzled atoms at byte `base`
        # (rows_here rows per atom block), 16 bytes per cp.async. Each thread copies one
        # column chunk of rows NT * 8 / dim apart, so the addresses are a few adds apart;
        # written out from [b, row, head, col] the index math was ~25 instructions a copy,
        # as many issue slots per tile as its MMAs. Rows past the end are clamped to the
        # last row: finite values the mask (j <= i) then excludes, or (Q) rows whose output
        # is never written
        for rr in T.unroll(rows_here * dim // 8 // NT):
            ci = rr * NT + tx
            jr = ci // (dim // 8)
            cc = ci % (dim // 8)
            off = base + cc // 8 * (rows_here * 128) + jr * 128 + T.bitwise_xor(cc % 8, jr % 8) * 16
            T.ptx["cp.async.cg.shared.global"](
                T.address_of(smem[off // 4]),
                # int32 within the tile: at most 255 rows of H * dim elements (tvm_forward
                # refuses heads x dims for which that passes 2^31)
                T.address_of(flat[start + T.Cast("int64", T.min(jr, last) * row_elems + cc * 8)]),
                16,
            )

    # Hopper's tensor memory accelerator (config extra `tma`): one thread issues a bulk copy
    # per 64-column atom block and arms the stage's mbarrier with the bytes to expect. The
    # tensor maps' 128-byte swizzle is the atoms' own, so tiles land where copy_rows puts
    # them, and rows past the sequence arrive as zeros (finite, masked like the clamped
    # rows). It takes the copies' index math off every thread: about 170 of a 64x64 tile's
    # ~570 instructions per thread in this issue-bound loop (RESULTS.md, session 8).
    q_map = T.Var("q_tmap", ty=T.handle("tensormap").ty)
    k_map = T.Var("k_tmap", ty=T.handle("tensormap").ty)
    v_map = T.Var("v_tmap", ty=T.handle("tensormap").ty)
    o_map = T.Var("o_tmap", ty=T.handle("tensormap").ty)
    g_map = T.Var("g_tmap", ty=T.handle("tensormap").ty)  # GTMA: the raw gates [B, T, Hq]

    def mbar(smem, i):
        return T.address_of(smem[MB_OFF // 4 + 2 * i])

    def gate_slot(g):
        # GTMA: the byte offset of key tile g's staged gates (two slots, alternating); its
        # barrier is GATE_BAR + g % 2
        return GS_OFF + g % 2 * gate_box_bytes(BN)

    # key tile g of the block (0-based, counted over all its query tiles when persistent) sits
    # in stage g % NS, that stage's (g // NS)-th use. Unsigned: g >= 0, which neither TVM
    # (its floor division adds sign fix-ups) nor nvcc can prove of a running count
    def stage(g):
        return T.Cast("int32", T.truncmod(T.Cast("uint32", g), T.uint32(NS)))

    def parity(g, ahead=0):
        # the parity of the phase of use g // NS - ahead, which a wait for it waits out
        return T.Cast("int32", T.bitwise_and(
            T.truncdiv(T.Cast("uint32", g), T.uint32(NS)) + T.uint32(ahead), T.uint32(1)))

    @T.macro
    def encode_map(tmap, data, dim, heads, L, B, rows):
        # host side: a [B, L, heads, dim] tensor's dims innermost first, the byte strides of
        # the outer three, boxes of one 64-column atom block by `rows` rows
        T.Bind(T.tvm_stack_alloca("tensormap", 1), var=tmap)
        T.tensormap_encode_tiled(
            tmap, data, dim, heads, L, B, T.int64(2 * dim), heads * (2 * dim),
            L * heads * (2 * dim), ATOM, 1, rows, 1, 1, 1, 1, 1, descriptor_dtype=dt, rank=4,
            swizzle=SW128_MAP)

    @T.macro
    def bulk_rows(smem, base, tmap, rows, dim, row0, head, b, bar):
        for cb in T.unroll(dim // ATOM):
            T.ptx[
                "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
            ](
                T.address_of(smem[(base + cb * (rows * 128)) // 4]),
                T.address_of(tmap),
                cb * ATOM,
                T.Cast("int32", head),
                T.Cast("int32", row0),
                T.Cast("int32", b),
                bar,
            )

    @T.macro
    def bulk_tile(kt, st, smem, b, hk, more_bytes):
        # by one thread; stage st's mbarrier completes when both tiles are in, and the
        # more_bytes the caller copies against it too
        T.ptx["mbarrier.arrive.expect_tx.shared::cta.b64"](mbar(smem, 1 + st),
                                                           TILE_BYTES + more_bytes)
        bulk_rows(smem, K_OFF + st * (2 * BN * D), k_map, BN, D, kt * BN, hk, b,
                  mbar(smem, 1 + st))
        bulk_rows(smem, V_OFF + st * (2 * BN * DV), v_map, BN, DV, kt * BN, hk, b,
                  mbar(smem, 1 + st))

    @T.macro
    def bulk_q(smem, i0, h, b, qs):
        # by one thread: the block's Q rows into buffer qs (0 unless persistent), behind its
        # "full" barrier
        T.ptx["mbarrier.arrive.expect_tx.shared::cta.b64"](mbar(smem, qs * Q1_FULL), QBYTES)
        bulk_rows(smem, Q_OFF + qs * QBYTES, q_map, BM, D, i0, h, b, mbar(smem, qs * Q1_FULL))

    @T.macro
    def wait_tile(n, smem):
        T.cuda.mbarrier_wait(mbar(smem, 1 + stage(n)), parity(n))

    @T.macro
    def load_tile(kt, st, smem, kf, vf, b, hk, L, HKV, tx):
        s0 = kt * BN
        last = T.Cast("int32", L - 1 - s0)
        copy_rows(smem, K_OFF + st * (2 * BN * D), BN, kf, ((b * L + s0) * HKV + hk) * D,
                  T.Cast("int32", HKV * D), last, D, tx)
        copy_rows(smem, V_OFF + st * (2 * BN * DV), BN, vf, ((b * L + s0) * HKV + hk) * DV,
                  T.Cast("int32", HKV * DV), last, DV, tx)

    # The key tiles' prefix sums: float64 loads a tile ahead into registers (gate_fetch),
    # narrowed into shared memory once the tile's math is done (gate_store), as in
    # fwd_cuda.py.
    @T.macro
    def gate_fetch(kt, cg_r, c, b, h, L, tx):
        for rr in T.unroll(NGC):
            cg_r[rr] = c[b, h, T.min(kt * BN + rr * NT + tx, L - 1)]

    @T.macro
    def store_bias(smem, st, j, cref, cj, rscale):
        # Key j's bias in slot st, (c_ref - c_j) / scale, the score product's starting value
        # (bias_scores). One writer for the producer warp and the non-pingpong threads. Its
        # st.shared written out: TVM's barrier planner does not see it. It would otherwise
        # want a barrier between the last tile's softmax, which reads another slot, and this
        # store (the pipelined loop stores before its one barrier, into a slot last read two
        # tiles ago)
        T.ptx["st.shared.f32"](T.address_of(smem[C_OFF // 4 + st * CS + j]),
                               T.Cast("float32", cref - cj) * rscale)

    @T.macro
    def gate_store(st, cg_r, smem, cref, rscale, tx):
        for rr in T.unroll(NGC):
            if rr * NT + tx < BN:
                store_bias(smem, st, rr * NT + tx, cref, cg_r[rr], rscale)

    @T.macro
    def descriptor(desc, smem, byte_off, lbo, sbo, swizzle=SW128):
        # start address, LBO and SBO in 16-byte units
        T.cuda.wgmma.encode_matrix_descriptor(
            T.address_of(desc[0]), T.address_of(smem[byte_off // 4]), lbo, sbo, swizzle
        )

    @T.macro
    def issue_scores(st, wg, smem, s_r, qd, kd, qo, t4, bd):
        # S = Q K^T over D / 16 k steps, one commit group; the first overwrites S (scale-d
        # false), or, gated, adds to the key bias that bias_scores put there, or (TABLE)
        # that a first k step put there: A from registers, ones in k columns 0-2 (a thread
        # holds k 2 t4, 2 t4 + 1 and those + 8, bf16 pairs low half first), B the stage's
        # bias table (key_table_bytes; bd a scratch descriptor, read at issue)
        if TABLE:
            descriptor(bd, smem, C_OFF + st * (CS * 4), 3, 3, 0)
            a_lo = T.if_then_else(t4 == 0, T.uint32(0x3F803F80),
                                  T.if_then_else(t4 == 1, T.uint32(0x00003F80), T.uint32(0)))
            T.ptx[mma_s](*[s_r[x] for x in range(BN // 2)], a_lo, a_lo, T.uint32(0),
                         T.uint32(0), bd[0], False, 1, 1, 1)
        for ks in T.unroll(D // 16):
            # K-major: LBO unused (1), SBO the 1024 bytes between 8-row groups
            kin = ks % 4 * 32  # the k step's bytes into its atom
            descriptor(qd, smem, Q_OFF + qo + ks // 4 * (BM * 128) + wg * (64 * 128) + kin, 1,
                       64)
            descriptor(kd, smem, K_OFF + st * (2 * BN * D) + ks // 4 * (BN * 128) + kin, 1, 64)
            T.ptx[mma_s](*[s_r[x] for x in range(BN // 2)], qd[0], kd[0], ks > 0 or gated,
                         1, 1, 0, 0)
        T.ptx["wgmma.commit_group.sync.aligned"]()

    @T.macro
    def issue_pv(st, smem, p_r, acc, vd):
        # O += P V over BN / 16 key steps, one commit group; V read transposed (MN-major)
        for kk in T.unroll(BN // 16):
            # MN-major: LBO the block_n x 128 bytes between 64-column blocks, SBO the 1024
            # between 8-key groups
            descriptor(vd, smem, V_OFF + st * (2 * BN * DV) + kk * (16 * 128), BN * 8, 64)
            T.ptx[mma_o](
                *[acc[x] for x in range(DV // 2)],
                p_r[kk * 4],
                p_r[kk * 4 + 1],
                p_r[kk * 4 + 2],
                p_r[kk * 4 + 3],
                vd[0],
                True,
                1,
                1,
                1,
            )
        T.ptx["wgmma.commit_group.sync.aligned"]()

    @T.macro
    def bias_first_row(st, smem, s_r, t4):
        # a thread's first row of bias_scores, loaded ...
        for nb in T.unroll(NB):
            for e in T.unroll(2):
                s_r[nb * 4 + e] = smem[C_OFF // 4 + st * CS + nb * 8 + t4 * 2 + e]

    @T.macro
    def bias_second_row(s_r):
        # ... and copied into its second
        for nb in T.unroll(NB):
            for e in T.unroll(2):
                s_r[nb * 4 + 2 + e] = s_r[nb * 4 + e]

    @T.macro
    def bias_scores(st, smem, s_r, t4):
        # Gated: S starts as each key's bias (c_ref - c_j) / scale, stored by the tile's
        # writer, and the score product adds Q K^T to it, so the softmax below is the
        # ungated one. Subtracting the bias there instead (an fma per logit reading shared
        # memory) made the loop 7-9% longer than the ungated one at S1-S4 (RESULTS.md,
        # session 20): its 32 values per thread were live next to S, O and the P of the
        # product in flight, and spilled; here they are loaded while S is free, before the
        # turn's barrier. c_i is constant along a row, which softmax ignores: it joins only
        # the lse (epilogue). Both rows of a thread read the same keys: one load per pair,
        # copied to the second row. Two loads, kept apart by asm volatile, ran 2-3% slower
        # at S1-S2; kept apart by a shuffled copy of t4 (no asm), the gate cost 3-5 points
        # more at S1-S5 (session 36): shared-memory reads cost more here than the 32 moves.
        # The pingpong consumers run the two steps apart (pack_next)
        bias_first_row(st, smem, s_r, t4)
        bias_second_row(s_r)

    @T.macro
    def stats(dj, masked, s_r, m_r, l_r, al_r, t4, sl2):
        # S -> P (fp32, in place), the running row max and sum, and each row's rescale
        # factor for O (al_r), which the caller applies once O is not being written.
        # The tile's max is taken on the raw products (the scale is positive: tvm_forward
        # flips Q's sign for a negative one) and scaled once a row, so each score's scale
        # multiply rides in its exponent's FFMA; masked scores are -inf, which that FFMA
        # keeps -inf and exp2 takes to 0, where a finite mask needed a compare, a select and
        # a predicated exp2 per score (the running max stays >= MASK, finite). The max and
        # the sum run in independent chains: each row's max gates its exp2s. Head dim 64,
        # ungated, offline sm_90a SASS: the softmax 335 -> 276 instructions unmasked, 625 ->
        # 416 masked; H200: S5's persistent kernel 5-9% faster, S1's 6-7%, S4's 1-5%
        # (RESULTS.md, session 36)
        for r in T.unroll(2):
            if masked:
                for nb in T.unroll(NB):
                    for e in T.unroll(2):
                        x = nb * 4 + r * 2 + e
                        rel = dj + (nb * 8 - r * 8) + t4 * 2 + e  # key minus query position
                        if W > 0:
                            s_r[x] = T.if_then_else(rel <= 0 and rel > -W, s_r[x], NEG_INF)
                        else:
                            s_r[x] = T.if_then_else(rel <= 0, s_r[x], NEG_INF)
            mx0: T.float32 = s_r[r * 2]
            mx1: T.float32 = s_r[r * 2 + 1]
            mx2: T.float32 = s_r[4 + r * 2]
            mx3: T.float32 = s_r[4 + r * 2 + 1]
            for nh in T.unroll(1, NB // 2):
                mx0 = T.max(mx0, s_r[nh * 8 + r * 2])
                mx1 = T.max(mx1, s_r[nh * 8 + r * 2 + 1])
                mx2 = T.max(mx2, s_r[nh * 8 + 4 + r * 2])
                mx3 = T.max(mx3, s_r[nh * 8 + 4 + r * 2 + 1])
            mx: T.float32 = T.max(T.max(mx0, mx1), T.max(mx2, mx3))
            mx = T.max(mx, T.cuda.__shfl_xor_sync(T.uint32(0xFFFFFFFF), mx, 1, 32))
            mx = T.max(mx, T.cuda.__shfl_xor_sync(T.uint32(0xFFFFFFFF), mx, 2, 32))
            mx = T.max(m_r[r], mx * sl2)
            al_r[r] = T.exp2(m_r[r] - mx)
            m_r[r] = mx
            ps0: T.float32 = T.float32(0)
            ps1: T.float32 = T.float32(0)
            for nb in T.unroll(NB):
                x = nb * 4 + r * 2
                s_r[x] = T.exp2(s_r[x] * sl2 - mx)
                s_r[x + 1] = T.exp2(s_r[x + 1] * sl2 - mx)
                ps0 = ps0 + s_r[x]
                ps1 = ps1 + s_r[x + 1]
            l_r[r] = l_r[r] * al_r[r] + (ps0 + ps1)

    @T.macro
    def softmax(kt, i0, row0, s_r, m_r, l_r, al_r, t4, sl2):
        # interior: every key of the tile is <= the block's first row and inside the last
        # row's window (no mask)
        j0 = kt * BN
        dj = T.Cast("int32", j0 - row0)
        inside = j0 + BN - 1 <= i0
        if W > 0:
            inside = inside and j0 > i0 + CROWS - 1 - W
        if inside:
            stats(dj, False, s_r, m_r, l_r, al_r, t4, sl2)
        else:
            stats(dj, True, s_r, m_r, l_r, al_r, t4, sl2)

    @T.macro
    def rescale_o(acc, al_r):
        for r in T.unroll(2):
            for db in T.unroll(NDB):
                for e in T.unroll(2):
                    acc[db * 4 + r * 2 + e] = acc[db * 4 + r * 2 + e] * al_r[r]

    @T.macro
    def pack_p(s_r, p_r):
        # P as the A fragments of O += P V: register u of key step kk is S's block
        # 2 kk + u // 2, row half u % 2
        for kk in T.unroll(BN // 16):
            for u in T.unroll(4):
                x = (kk * 2 + u // 2) * 4 + u % 2 * 2
                T.ptx[pack](p_r[kk * 4 + u], s_r[x + 1], s_r[x])

    @T.macro
    def rescale_pack(s_r, p_r, acc, al_r):
        rescale_o(acc, al_r)
        pack_p(s_r, p_r)

    @T.macro
    def init_rows(row0, i0, b, h, L, c, m_r, l_r, cq_r, acc, s_r):
        # (TILES with three consumers: row_sums_ahead then sets cq_r)
        for r in T.unroll(2):
            m_r[r] = T.float32(MASK)
            l_r[r] = T.float32(0)
            if gated and not RELATIVE:  # RELATIVE: row_sums_relative, at the end
                cq_r[r] = T.Cast(
                    "float32", c[b, h, T.min(row0 + r * 8, L - 1)] - c[b, h, i0]
                ) * T.float32(LOG2E)
                if PP:
                    T.evaluate(T.cuda.func_call("gfwa_pin", cq_r[r], source_code=_PIN))
            else:
                cq_r[r] = T.float32(0)
        for x in T.unroll(DV // 2):
            acc[x] = T.float32(0)
        for x in T.unroll(BN // 2):
            s_r[x] = T.float32(0)

    def tile_total(st, smem):
        # a stage's gate total (RELATIVE: the running max's move past its tile)
        return smem[C_OFF // 4 + st * CS + TOTAL]

    @T.macro
    def shift_rows(dl, m_r):
        # RELATIVE: the scores so far are relative to the previous key tile's start, the next
        # tile's to its own (scan_tile, or the tile's record): the running max moves by the
        # previous tile's gate total dl, and the row sums and O, relative to it, stay. So the
        # biases stay within a tile's gate sum, however long the window. The caller loads dl
        # when the tile arrives: loaded here, the add waited on the load before the turn's
        # barrier, 2.8-4.5 points of the bias_mma kernel's gate cost at S1, S2 and S4, as
        # many with gates 1e5 times weaker, so not an effect of the values (probe_no_shift,
        # RESULTS.md, session 43)
        for r in T.unroll(2):
            m_r[r] = m_r[r] + dl

    @T.macro
    def next_biases(n, dl, smem, s_r, m_r, t4):
        # pingpong, gated, once tile n's P has left S (pack_p) and before O's rescale, whose
        # multiplies then pass under the loads' latency: tile n + 1's biases into S, and
        # (RELATIVE) the running max moved by tile n's total. At the top of the next step,
        # where the ungated loop waits for its tile, the loads and the copies that wait for
        # them stood between a consumer's softmax and its turn at the tensor cores
        # (RESULTS.md, session 24). Into registers of their own before the pack, they made
        # the consumers spill (168 registers a thread)
        if RELATIVE:
            shift_rows(dl, m_r)
        wait_tile(n + 1, smem)
        bias_first_row(stage(n + 1), smem, s_r, t4)

    @T.macro
    def pack_next(n, more, dl, smem, s_r, p_r, acc, al_r, m_r, t4):
        # pingpong: rescale_pack after tile n's softmax, and gated, if `more` tiles follow,
        # the next one's biases in the middle (next_biases); dl: tile n's gate total
        if TABLE:  # the biases come with the score product: only the running max moves
            pack_p(s_r, p_r)
            if more:
                shift_rows(dl, m_r)
            rescale_o(acc, al_r)
        elif gated:
            pack_p(s_r, p_r)
            if more:
                next_biases(n, dl, smem, s_r, m_r, t4)
            rescale_o(acc, al_r)
            bias_second_row(s_r)
        else:
            rescale_pack(s_r, p_r, acc, al_r)

    @T.macro
    def row_bias(buf, base, j, cq_r, r, sl2):
        # cq_r[r] = minus key j's bias in the key-tile record at buf[base] (shared or global),
        # in log2 units: that row's c_i relative to the tile's start
        if TABLE:  # the bias, hi + mid + lo, from its bf16 pieces
            bias: T.float32 = T.float32(0)
            for pc in T.unroll(3):
                word: T.float32 = buf[base + (j // 8 * 48 + pc * 16) // 4 + j % 8 // 2]
                half = T.bitwise_and(T.shift_right(T.reinterpret("uint32", word),
                                                   T.Cast("uint32", j % 2 * 16)),
                                     T.uint32(0xFFFF))
                piece: T.uint32 = T.shift_left(half, T.uint32(16))
                bias = bias + T.reinterpret("float32", piece)
            cq_r[r] = bias * -sl2
        else:
            cq_r[r] = buf[base + j] * -sl2

    @T.macro
    def row_sums_relative(st, smem, row0, i0, cq_r, sl2):
        # RELATIVE, square tiles: a row's c_i for its log-sum-exp, relative to the last key
        # tile's start as the running max now is: that tile holds the block's rows, and minus
        # the row's own key bias is it
        for r in T.unroll(2):
            j = T.Cast("int32", row0 - i0) + r * 8
            row_bias(smem, C_OFF // 4 + st * CS, j, cq_r, r, sl2)

    @T.macro
    def row_sums_ahead(row0, kt_last, b, h, L, cf, CH, CT, cq_r, sl2):
        # TILES, three consumers (192 rows, 128-key tiles): a block's rows span its last two
        # key tiles, whose stages the next query tile's may have taken by the epilogue. So
        # each row's c_i, relative to the last key tile's start, is read from the records in
        # global memory before the loop: its own tile's bias, less the totals of the tiles
        # from its own to the consumer's last (kt_last)
        for r in T.unroll(2):
            i = T.min(row0 + r * 8, L - 1)
            kr = i // BN
            rec = (b * CH + h) * CT
            row_bias(cf, rec + kr * CS, T.Cast("int32", i - kr * BN), cq_r, r, sl2)
            for t in T.unroll((BM + BN - 1) // BN):
                if kr + t < kt_last:
                    cq_r[r] = cq_r[r] - cf[rec + (kr + t) * CS + TOTAL]
            T.evaluate(T.cuda.func_call("gfwa_pin", cq_r[r], source_code=_PIN))

    @T.macro
    def finish_rows(row0, i0, cw, lane, b, h, L, t4, acc, l_r, m_r, cq_r, p_r, smem, o, lse,
                    staged, qo):
        # the row sums were per thread: add the quad's four. Then O normalized, straight into
        # o, or (staged: O_TMA) packed into consumer cw's Q rows in the tensor map's layout
        # (64-column atom blocks of 128-byte rows, 16-byte chunks swizzled by row % 8: a
        # warp's stores hit 32 distinct banks) for bulk_store_rows
        for r in T.unroll(2):
            lt: T.float32 = l_r[r]
            lt = lt + T.cuda.__shfl_xor_sync(T.uint32(0xFFFFFFFF), lt, 1, 32)
            lt = lt + T.cuda.__shfl_xor_sync(T.uint32(0xFFFFFFFF), lt, 2, 32)
            inv: T.float32 = T.float32(1) / lt
            if staged:
                rr = T.Cast("int32", row0 - i0) - cw * 64 + r * 8  # row in the consumer's 64
                for db in T.unroll(NDB):
                    T.ptx[pack](p_r[0], acc[db * 4 + r * 2 + 1] * inv,
                                acc[db * 4 + r * 2] * inv)
                    T.ptx["st.shared.b32"](
                        T.address_of(smem[(Q_OFF + qo + db // 8 * (BM * 128) + cw * (64 * 128)
                                           + rr * 128 + T.bitwise_xor(db % 8, lane // 4) * 16
                                           + t4 * 4) // 4]),
                        p_r[0],
                    )
            ii = row0 + r * 8
            if ii < L:
                if not staged:
                    for db in T.unroll(NDB):
                        for e in T.unroll(2):
                            o[b, ii, h, db * 8 + t4 * 2 + e] = T.Cast(
                                dt, acc[db * 4 + r * 2 + e] * inv
                            )
                if t4 == 0:
                    lse[b, h, ii] = (m_r[r] + T.log2(lt) + cq_r[r]) * T.float32(LN2)

    @T.macro
    def bulk_store_rows(smem, i0, cw, h, b, qo):
        # by one thread of consumer cw, once all its threads staged their rows (a fence for
        # the copy engine, then the consumer's own named barrier before this). Rows past the
        # sequence are clipped by the copy; the block exits only once its shared memory has
        # been read
        for cb in T.unroll(DV // ATOM):
            T.ptx["cp.async.bulk.tensor.4d.global.shared::cta.bulk_group"](
                T.address_of(o_map),
                cb * ATOM,
                T.Cast("int32", h),
                T.Cast("int32", i0 + cw * 64),
                T.Cast("int32", b),
                T.address_of(smem[(Q_OFF + qo + cb * (BM * 128) + cw * (64 * 128)) // 4]),
            )
        T.ptx["cp.async.bulk.commit_group"]()
        T.ptx["cp.async.bulk.wait_group.read"](0)

    # ---- pingpong: FlashAttention-3's schedule. A producer warpgroup (one working warp,
    # few registers) keeps the stages filled by bulk copies and writes the key tiles' gate
    # sums; two (or three) consumer warpgroups of 64 rows each run the pipelined loop below,
    # and take turns issuing their matrix products (named barriers 1 .. NC, consumer cw
    # waiting on 1 + cw), so that one's softmax runs while the others' products keep the
    # tensor cores busy. A consumer frees a stage
    # once its P V is done (every consumer thread arrives on the stage's free barrier).
    NC = BM // 64  # consumer warpgroups (block_m 192: three, at head dims <= 64)
    NPP = 128 * (1 + NC)
    # 128 x 40 + 256 x 232 and 128 x 32 + 384 x 160 <= 64K registers
    PRODUCER_REGS, CONSUMER_REGS = consumer_regs(NC)
    GPL = (BN + 31) // 32  # gate sums per producer lane per tile
    GW = 3 * (GPL // 2) + 1 if TABLE else 1  # FUSED: a lane's table words, then the total
    # FUSED: the producer's warps that sum the gates, one per stage (produce_gates)
    GATE_WARPS = int(config.get("gate_warps", 1 if GTMA else NS if NS <= 3 else 1))

    @T.macro
    def scan_tile(gv, gw, lane, rscale):
        # FUSED: the key tile's gate prefix sums from its raw gates (lane l holds keys
        # GPL l .. GPL l + GPL - 1), relative to the tile's start: key j's bias is
        # -local_j / scale (into gv), and the tile's total (log2 units, gw[GW - 1]) is what
        # the consumers move their running max by before the next tile (shift_rows). Clamped
        # as gfwagen.gate.sanitize_log_gate clamps, NaN kept. TABLE: the biases as
        # gfwagen.gate.tile_tables' bf16 pieces (gw: word 3 p + u2 holds piece p of keys
        # 2 u2 and 2 u2 + 1, the even one in the low half; each piece the bf16 of what the
        # pieces before it left). Done before the stage is free, so that only the stores
        # stand between the consumers' release of a stage and its bias slot's arrival
        for u in T.unroll(GPL):
            gv[u] = T.if_then_else(gv[u] > T.float32(GATE_BOUND), T.float32(GATE_BOUND),
                                   T.if_then_else(gv[u] < T.float32(-GATE_BOUND),
                                                  T.float32(-GATE_BOUND), gv[u]))
            if u > 0:
                gv[u] = gv[u] + gv[u - 1]
        run: T.float32 = gv[GPL - 1]
        for d in T.unroll(5):
            up = T.cuda.__shfl_up_sync(T.uint32(0xFFFFFFFF), run, 1 << d, 32)
            run = run + T.if_then_else(lane >= (1 << d), up, T.float32(0))
        before: T.float32 = run - gv[GPL - 1]
        for u in T.unroll(GPL):
            gv[u] = (gv[u] + before) * -rscale
        gw[GW - 1] = T.reinterpret("uint32", run * T.float32(LOG2E))
        if TABLE:
            for u2 in T.unroll(GPL // 2):
                for pc in T.unroll(3):
                    T.ptx[pack](gw[pc * (GPL // 2) + u2], gv[u2 * 2 + 1], gv[u2 * 2])
                    if pc < 2:
                        w = gw[pc * (GPL // 2) + u2]
                        gv[u2 * 2] = gv[u2 * 2] - T.reinterpret(
                            "float32", T.shift_left(w, T.uint32(16)))
                        gv[u2 * 2 + 1] = gv[u2 * 2 + 1] - T.reinterpret(
                            "float32", T.bitwise_and(w, T.uint32(0xFFFF0000)))

    @T.macro
    def store_slot(st, gv, gw, smem, lane):
        # FUSED: scan_tile's biases and total into stage st's bias slot. TABLE: in
        # key_table_bytes' layout, piece p of key j at half (j // 8) * 24 + p * 8 + j % 8, a
        # pair of keys (GPL is even: square tiles of 128 or 192) a word; and the table's
        # zero tail (the k rows the step weighs 0, which the last group reaches), a word a
        # lane
        if TABLE:
            for u2 in T.unroll(GPL // 2):
                j = lane * GPL + u2 * 2
                for pc in T.unroll(3):
                    T.ptx["st.shared.b32"](
                        T.address_of(smem[C_OFF // 4 + st * CS + (j // 8 * 48 + pc * 16) // 4
                                          + j % 8 // 2]), gw[pc * (GPL // 2) + u2])
            T.ptx["st.shared.b32"](
                T.address_of(smem[C_OFF // 4 + st * CS + BN // 8 * 12 + lane]), T.uint32(0))
        else:
            for u in T.unroll(GPL):
                T.ptx["st.shared.f32"](
                    T.address_of(smem[C_OFF // 4 + st * CS + lane * GPL + u]), gv[u])
        if lane == 31:
            T.ptx["st.shared.b32"](T.address_of(smem[C_OFF // 4 + st * CS + TOTAL]),
                                   gw[GW - 1])

    @T.macro
    def bulk_record(kt, st, smem, c, b, h):
        # TILES: key tile kt's record (biases and total) into stage st's slot, against the
        # stage's mbarrier (bulk_tile counted its bytes). The per-key loads, sums and stores
        # it replaces in the producer warp cost the gated kernel 0.7-1.6% at S1, S3 and S4
        # (paired calls, RESULTS.md, session 24)
        T.ptx["cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"](
            T.address_of(smem[C_OFF // 4 + st * CS]),
            T.address_of(c[b, h, kt * CS]),
            REC_BYTES,
            mbar(smem, 1 + st),
        )

    @T.macro
    def bulk_gates(kt, g, smem, b, h):
        # GTMA, by the gate warp's lane 0: key tile kt's raw gates, GATE_BOX_HEADS heads from
        # h's group (rows past the sequence arrive as zeros, a masked key's gate), into slot
        # g % 2 against its barrier
        T.ptx["mbarrier.arrive.expect_tx.shared::cta.b64"](mbar(smem, GATE_BAR + g % 2),
                                                           gate_box_bytes(BN))
        T.ptx["cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"](
            T.address_of(smem[gate_slot(g) // 4]),
            T.address_of(g_map),
            T.Cast("int32", h // GATE_BOX_HEADS * GATE_BOX_HEADS),
            T.Cast("int32", kt * BN),
            T.Cast("int32", b),
            mbar(smem, GATE_BAR + g % 2),
        )

    @T.macro
    def produce(n_tiles, kt_lo, smem, c, b, h, hk, L, i0, lane, rscale, g0):
        # g0: the key tiles this block produced for its earlier query tiles (persistent): a
        # stage's barriers count phases over all of them
        if gated and not RELATIVE:  # gate off, c is a one-element dummy: no load
            cref_p: T.float64 = c[b, h, i0]
        for n in T.serial(T.Cast("int32", n_tiles)):
            kt = kt_lo + T.Cast("int64", n)
            g = g0 + n
            st = stage(g)
            if g >= NS:  # both consumers done with the tile NS back
                T.cuda.mbarrier_wait(mbar(smem, FREE + st), parity(g, 1))
            if FUSED:  # the gate warp (produce_gates) writes the bias slot
                if lane == 0:
                    bulk_tile(kt, st, smem, b, hk, 0)
            elif TILES:
                if lane == 0:
                    bulk_tile(kt, st, smem, b, hk, REC_BYTES)
                    bulk_record(kt, st, smem, c, b, h)
            else:
                if gated:
                    for rr in T.unroll(GPL):
                        if rr * 32 + lane < BN:
                            store_bias(smem, st, rr * 32 + lane, cref_p,
                                       c[b, h, T.min(kt * BN + rr * 32 + lane, L - 1)],
                                       rscale)
                if lane == 0:
                    bulk_tile(kt, st, smem, b, hk, 0)
                elif gated:  # the gate sums' writers arrive too (the barrier counts 32)
                    T.ptx["mbarrier.arrive.shared::cta.b64"](mbar(smem, 1 + st))

    def query_tile(item, HQ, L):
        # query tile `item`'s batch, head, first row, and the key tiles [kt_lo, kt_lo +
        # n_tiles) it sees. In 32 bits (B * Hq * ceil(T / BM) < 2^31 for any tensor that
        # fits): a 64-bit division is a call of ~70 instructions, which the persistent
        # schedule pays per query tile
        nq = T.Cast("int32", (L + BM - 1) // BM)
        it32 = T.Cast("int32", item)
        qt = T.truncmod(it32, nq)
        if PERS:  # a sequence's last query tiles first: the longest, where a window is longer
            qt = nq - 1 - qt  # than the tiles before it (longest first leaves a short tail)
        i0 = T.Cast("int64", qt * BM)
        b = T.Cast("int64", T.truncdiv(it32, T.Cast("int32", HQ) * nq))
        h = T.Cast("int64", T.truncmod(T.truncdiv(it32, nq), T.Cast("int32", HQ)))
        kt_hi = (T.min(L, i0 + BM) + BN - 1) // BN
        kt_lo = T.max(i0 - (W - 1), T.int64(0)) // BN if W > 0 else T.int64(0)
        return b, h, i0, kt_lo, kt_hi - kt_lo

    def grid_blocks(B, HQ, L):
        n = n_query_tiles(B, HQ, L)
        return T.min(n, T.int64(NSM)) if PERS else n

    def n_query_tiles(B, HQ, L):
        return B * HQ * ((L + BM - 1) // BM)

    def rounds(B, HQ, L):
        # persistent: each block takes one query tile a round
        return T.Cast("int32", (n_query_tiles(B, HQ, L) + NSM - 1) // NSM)

    def round_item(tile, w):
        # block `tile`'s query tile in round w, the blocks in snake order (0 .. NSM - 1, then
        # back): with NSM = 132 and a power-of-two number of query tiles per sequence, a
        # fixed stride kept each block on one residue of the tiles mod 4, whose windows'
        # lengths differ, and the blocks of the longest ran up to 12% more key tiles (offline
        # count at T = 4096, W = 2048)
        return T.Cast("int64", w) * NSM + T.if_then_else(w % 2 == 0, tile, NSM - 1 - tile)

    @T.macro
    def produce_gates(item, g0, cnt, smem, c, gv, gw, HQ, L, lane, rscale, gwi):
        # FUSED: the producer warpgroup's idle warps (gwi: 0 .. GATE_WARPS - 1; one per stage
        # where the stages are 3 or fewer) sum query tile `item`'s key tiles from
        # the raw gates into their stages' bias slots, beside the first warp's bulk copies;
        # a tile's 32 lanes arrive on its stage's barrier (33 arrivals with the copies').
        # Session 23 had the copying warp scan too: S2-S4 2-6% slower than the records'
        # launch. Each of the warps shares its scheduler with two consumer warps. g0 and cnt
        # as produce_item's
        b, h, i0, kt_lo, n_tiles = query_tile(item, HQ, L)
        if GTMA and lane == 0:
            bulk_gates(kt_lo, g0, smem, b, h)
        for n in T.serial(T.Cast("int32", n_tiles)):
            g = g0 + n
            st = stage(g)
            if GATE_WARPS == 1 or st == gwi:
                if GTMA:
                    # the next tile's gates on their way before this one's are read (its slot
                    # held tile g - 1's, which every lane read in the previous step: the warp
                    # meets first)
                    T.ptx["bar.warp.sync"](T.uint32(0xFFFFFFFF))
                    if lane == 0 and T.Cast("int64", n + 1) < n_tiles:
                        bulk_gates(kt_lo + T.Cast("int64", n + 1), g + 1, smem, b, h)
                    T.cuda.mbarrier_wait(mbar(smem, GATE_BAR + g % 2),
                                         T.bitwise_and(T.shift_right(g, 1), 1))
                    for u in T.unroll(GPL):
                        gv[u] = smem[gate_slot(g) // 4
                                     + (lane * GPL + u) * GATE_BOX_HEADS
                                     + T.Cast("int32", h % GATE_BOX_HEADS)]
                else:
                    t0 = T.Cast("int32", kt_lo + T.Cast("int64", n)) * BN + lane * GPL
                    for u in T.unroll(GPL):
                        gv[u] = c[b, T.min(t0 + u, T.Cast("int32", L) - 1), h]
                scan_tile(gv, gw, lane, rscale)
                if g >= NS:  # both consumers done with the tile NS back
                    T.cuda.mbarrier_wait(mbar(smem, FREE + st), parity(g, 1))
                store_slot(st, gv, gw, smem, lane)
                if TABLE:  # the score product's wgmma reads the table through the async proxy
                    T.ptx["fence.proxy.async.shared::cta"]()
                T.ptx["mbarrier.arrive.shared::cta.b64"](mbar(smem, 1 + st))
        if PERS:
            cnt[0] = g0 + T.Cast("int32", n_tiles)

    @T.macro
    def produce_item(item, w, g0, qs, cnt, smem, c, HQ, L, lane, rscale):
        # the producer warp's work for the block's w-th query tile: its Q rows into buffer qs
        # (persistent: w % 2, once the consumers stored the output they staged there two query
        # tiles ago), then its key tiles. g0: the key tiles the block ran before (cnt[0],
        # which this advances; 0 and 0 when not persistent, literals, so that the stage
        # arithmetic folds as it did before the persistent schedule)
        b, h, i0, kt_lo, n_tiles = query_tile(item, HQ, L)
        if lane == 0:
            if PERS:
                if w >= 2:
                    T.cuda.mbarrier_wait(mbar(smem, Q_EMPTY + qs), T.truncmod(w // 2 + 1, 2))
            bulk_q(smem, i0, h, b, qs)
        produce(n_tiles, kt_lo, smem, c, b, h, h // G, L, i0, lane, rscale, g0)
        if PERS:
            cnt[0] = g0 + T.Cast("int32", n_tiles)

    def next_turn(cw):
        # the named barrier of the consumer after cw; two consumers: 2 - cw, as the two-
        # consumer kernel always wrote it (a modulo there changed its loop's code)
        if NC == 2:
            return T.Cast("uint32", 2 - cw)
        return T.Cast("uint32", 1 + T.truncmod(cw + 1, NC))

    def hands_last_turn(cw):
        # every consumer but the last; two: cw == 0, as the two-consumer kernel wrote it
        return cw == 0 if NC == 2 else cw < NC - 1

    def interior_steps(kt_lo, i0, n_steps):
        # the consumer loop's steps [lo, hi) whose key tile (kt_lo + step + 1) is interior
        # (softmax's test), clamped to [0, n_steps]
        t_lo = T.int64(0)
        if W > 0:
            t_lo = (T.max(i0 + CROWS - W, T.int64(0)) + BN - 1) // BN
        t_hi = (i0 + 1) // BN
        lo = T.Cast("int32", T.min(T.max(t_lo - kt_lo - 1, T.int64(0)), T.Cast("int64", n_steps)))
        hi = T.Cast("int32", T.min(T.max(t_hi - kt_lo - 1, T.Cast("int64", lo)),
                                   T.Cast("int64", n_steps)))
        return lo, hi

    @T.macro
    def key_step(it, interior, kt_lo, g0, n_tiles, cw, i0, row0, t4, sl2, qo, smem, s_r, p_r,
                 acc, qd, kd, vd, m_r, l_r, al_r):
        # one step of a consumer's key-tile loop: tile g + 1's scores and tile g's P V issued,
        # tile g + 1's softmax while P V runs. `interior` (SPLIT): the caller knows the tile
        # needs no mask, so the step has no masked branch. A loop of only such steps is 528
        # instructions at head dim 128 where the branching one is 956 (offline sm_90a, gated
        # with bias_mma). The one loop's schedule depended on the window: at the same tiles
        # (T 8192, W 8064 against causal) it ran the gated kernel 2.1% slower and the
        # ungated one 2.5% faster; split, both within 0.8%. H200, bf16, against the one
        # loop: ungated 1.1-6.3% faster at S1-S5 and F1, gated with bias_mma 0.3-3.6%,
        # outputs bit-identical. The gated kernel without bias_mma keeps the one loop: split,
        # its biases live across the loops' seams made ptxas serialize the wgmmas (C7511),
        # 30-70% slower (RESULTS.md, session 42)
        kt = kt_lo + T.Cast("int64", it)
        g = g0 + it
        if not gated or TABLE:  # else next_biases waited for it
            wait_tile(g + 1, smem)
        # (the gated kernel without bias_mma waited for tile g + 1 in the previous step's
        # next_biases)
        dl: T.float32 = tile_total(stage(g + 1), smem) if RELATIVE else T.float32(0)
        T.ptx["bar.sync"](T.Cast("uint32", 1 + cw), T.uint32(256))
        T.ptx["wgmma.fence.sync.aligned"]()
        issue_scores(stage(g + 1), cw, smem, s_r, qd, kd, qo, t4, vd)
        issue_pv(stage(g), smem, p_r, acc, vd)
        T.ptx["bar.arrive"](next_turn(cw), T.uint32(256))
        T.ptx["wgmma.wait_group.sync.aligned"](1)
        if interior:
            stats(0, False, s_r, m_r, l_r, al_r, t4, sl2)
        else:
            softmax(kt + 1, i0, row0, s_r, m_r, l_r, al_r, t4, sl2)
        T.ptx["wgmma.wait_group.sync.aligned"](0)
        # tile g's K, V and gate sums are read: its stage is free
        T.ptx["mbarrier.arrive.shared::cta.b64"](mbar(smem, FREE + stage(g)))
        # whether a tile follows (the gated kernel's shift): an interior tile is never a
        # consumer's last (that one holds its first row's key, past an interior tile's
        # keys; only a staggered consumer wholly past the sequence may shift once more, in
        # rows it never stores), so the interior loop has no test, the others an int32
        # one. With the int64 test in every loop nvcc recomputed the interior loop's bounds
        # at both its seams: S5's gated kernel ran 3.4% more warp instructions than without
        # the shift, most of them uniform-datapath integer work (Nsight Compute). H200:
        # the gate's cost in the kernel 6.2 -> 5.0% at S5, 3.9 -> 2.8% at S1 (RESULTS.md,
        # session 50)
        more = True if interior else it + 2 < T.Cast("int32", n_tiles)
        pack_next(g + 1, more, dl, smem, s_r, p_r, acc, al_r, m_r, t4)

    def consumer_tiles(i0, kt_lo, n_tiles, cw, L):
        # STAGGER: consumer cw's rows [ic, ic + 64), the key tiles [lo, lo + n) they see
        # (at least one: rows past the sequence run the block's last tile, unstored), and
        # the block's tiles before (pre) and after (post) them, whose turns it passes. Every
        # consumer so takes the block's n_tiles + 1 turns, which the ring of turns needs
        if not STAGGER:
            return i0, kt_lo, n_tiles, T.int64(0), T.int64(0)
        ic = i0 + T.Cast("int64", cw * 64)
        kt_hi = kt_lo + n_tiles
        hi = T.max(T.min((T.min(L, ic + 64) + BN - 1) // BN, kt_hi), kt_lo + 1)
        lo = kt_lo
        if W > 0:
            lo = T.min(T.max(T.max(ic - (W - 1), T.int64(0)) // BN, kt_lo), hi - 1)
        return ic, lo, hi - lo, lo - kt_lo, kt_hi - hi

    @T.macro
    def pass_turns(n, g, cw, smem):
        # STAGGER: n turns on tiles g .. g + n - 1 this consumer does not read: the ring's
        # barriers, and its release of their stages (after its turn, so that the release
        # cannot count towards a stage's previous use: every consumer has freed that one,
        # NS >= 2 tiles back, before taking its turn on this tile)
        for i in T.serial(T.Cast("int32", n)):
            T.ptx["bar.sync"](T.Cast("uint32", 1 + cw), T.uint32(256))
            T.ptx["mbarrier.arrive.shared::cta.b64"](mbar(smem, FREE + stage(g + i)))
            T.ptx["bar.arrive"](next_turn(cw), T.uint32(256))

    @T.macro
    def consume_item(item, w, g0, qs, cnt, more_items, cw, tx, lane, t4, sl2, smem, c, o, lse,
                     cf, CH, CT, s_r, p_r, acc, qd, kd, vd, m_r, l_r, cq_r, al_r, HQ, L):
        # a consumer's part of the block's w-th query tile (its 64 rows); g0, qs and cnt as
        # produce_item's; more_items: the block has a query tile after this one
        b, h, i0, kt_lo_b, n_tiles_b = query_tile(item, HQ, L)
        # STAGGER: this consumer's rows and key tiles (else the block's)
        ic, kt_lo, n_tiles, pre, post = consumer_tiles(i0, kt_lo_b, n_tiles_b, cw, L)
        # the first row of the rows the masks cover (ic is i0 unstaggered, but naming it
        # here, not ic, keeps two unstaggered kernels' SASS as it was: session 49)
        ri = ic if STAGGER else i0
        qo = qs * QBYTES
        row0 = i0 + (tx - 128) // 32 * 16 + lane // 4
        init_rows(row0, i0, b, h, L, c, m_r, l_r, cq_r, acc, s_r)
        if TILES and BM != BN:
            kt_last = (T.min(L, i0 + BM) + BN - 1) // BN - 1  # the block's last key tile
            row_sums_ahead(row0, kt_lo + n_tiles - 1 if STAGGER else kt_last, b, h, L, cf, CH,
                           CT, cq_r, sl2)
        if cw == NC - 1 and w == 0:  # consumer 0 issues first (later: the last one's turn)
            T.ptx["bar.arrive"](T.uint32(1), T.uint32(256))
        if STAGGER:
            pass_turns(pre, g0, cw, smem)
        g0c = g0 + T.Cast("int32", pre) if STAGGER else g0  # this consumer's first tile
        T.cuda.mbarrier_wait(mbar(smem, qs * Q1_FULL), T.truncmod(w // 2, 2))
        wait_tile(g0c, smem)
        dl0: T.float32 = tile_total(stage(g0c), smem) if RELATIVE else T.float32(0)
        if gated and not TABLE:
            bias_scores(stage(g0c), smem, s_r, t4)
        T.ptx["bar.sync"](T.Cast("uint32", 1 + cw), T.uint32(256))
        T.ptx["wgmma.fence.sync.aligned"]()
        issue_scores(stage(g0c), cw, smem, s_r, qd, kd, qo, t4, vd)
        T.ptx["bar.arrive"](next_turn(cw), T.uint32(256))
        T.ptx["wgmma.wait_group.sync.aligned"](0)
        softmax(kt_lo, ri, row0, s_r, m_r, l_r, al_r, t4, sl2)
        pack_next(g0c, n_tiles > 1, dl0, smem, s_r, p_r, acc, al_r, m_r, t4)
        n_steps = T.Cast("int32", n_tiles) - 1
        if SPLIT:
            # the steps whose tile is interior (unmasked) run in a loop of their own, without
            # the masked branch; the window's edge tiles before and the diagonal after run
            # the branching step (key_step says why)
            lo, hi = interior_steps(kt_lo, ri, n_steps)
            for it in T.serial(lo):
                key_step(it, False, kt_lo, g0c, n_tiles, cw, ri, row0, t4, sl2, qo, smem, s_r,
                         p_r, acc, qd, kd, vd, m_r, l_r, al_r)
            for it in T.serial(hi - lo):
                key_step(lo + it, True, kt_lo, g0c, n_tiles, cw, ri, row0, t4, sl2, qo, smem, s_r,
                         p_r, acc, qd, kd, vd, m_r, l_r, al_r)
            for it in T.serial(n_steps - hi):
                key_step(hi + it, False, kt_lo, g0c, n_tiles, cw, ri, row0, t4, sl2, qo, smem, s_r,
                         p_r, acc, qd, kd, vd, m_r, l_r, al_r)
        else:
            for it in T.serial(n_steps):
                key_step(it, False, kt_lo, g0c, n_tiles, cw, ri, row0, t4, sl2, qo, smem, s_r,
                         p_r, acc, qd, kd, vd, m_r, l_r, al_r)
        g_last = g0c + T.Cast("int32", n_tiles) - 1
        T.ptx["bar.sync"](T.Cast("uint32", 1 + cw), T.uint32(256))
        T.ptx["wgmma.fence.sync.aligned"]()
        issue_pv(stage(g_last), smem, p_r, acc, vd)
        if hands_last_turn(cw):  # to the next consumer: 2 + cw
            T.ptx["bar.arrive"](T.uint32(2) if NC == 2 else T.Cast("uint32", 2 + cw),
                                T.uint32(256))
        elif more_items:
            # consumer 1 hands consumer 0 its first turn of the block's next query tile now,
            # not after this epilogue: consumer 0's first product and softmax there then run
            # while this consumer normalizes and stores its output. S5, against handing it on
            # at the next query tile's start: 4.8% faster (RESULTS.md, session 35)
            T.ptx["bar.arrive"](T.uint32(1), T.uint32(256))
        if RELATIVE and BM == BN:
            row_sums_relative(stage(g_last), smem, row0, i0, cq_r, sl2)
        T.ptx["wgmma.wait_group.sync.aligned"](0)
        if PERS:  # the last key tile's stage too: the block's next query tile takes it
            T.ptx["mbarrier.arrive.shared::cta.b64"](mbar(smem, FREE + stage(g_last)))
        if STAGGER:  # (its last turn hands on as any other: only the third consumer has none)
            pass_turns(post, g_last + 1, cw, smem)
        finish_rows(row0, i0, cw, lane, b, h, L, t4, acc, l_r, m_r, cq_r, p_r, smem, o, lse,
                    O_TMA, qo)
        if O_TMA:
            T.ptx["fence.proxy.async.shared::cta"]()
            T.ptx["bar.sync"](T.Cast("uint32", 1 + NC + cw), T.uint32(128))
            if tx % 128 == 0:
                bulk_store_rows(smem, i0, cw, h, b, qo)
                if PERS:  # its output is out of the Q buffer: the next but one may load
                    T.ptx["mbarrier.arrive.shared::cta.b64"](mbar(smem, Q_EMPTY + qs))
        if PERS:
            cnt[0] = g0 + T.Cast("int32", n_tiles_b)

    @T.prim_func
    def gfwa_fwd(
        q_h: T.handle,
        k_h: T.handle,
        v_h: T.handle,
        c_h: T.handle,
        o_h: T.handle,
        lse_h: T.handle,
        scale: T.float32,
    ):
        T.func_attr({"global_symbol": "gfwa_fwd", "tirx.noalias": True})
        B = T.int64()
        L = T.int64()
        HQ = T.int64()
        HKV = T.int64()
        CB = T.int64()
        CH = T.int64()
        CT = T.int64()
        q = T.match_buffer(q_h, (B, L, HQ, D), dt)
        k = T.match_buffer(k_h, (B, L, HKV, D), dt)
        v = T.match_buffer(v_h, (B, L, HKV, DV), dt)
        # what gate_input names: the raw log gates [B, T, Hq] float32 (FUSED), the key tiles'
        # records [B, Hq, n * CS] float32 (TILES), else the prefix sums [B, Hq, T] float64
        # (a one-element dummy when ungated)
        c = T.match_buffer(c_h, (CB, CH, CT), C_DT)
        o = T.match_buffer(o_h, (B, L, HQ, DV), dt)
        lse = T.match_buffer(lse_h, (B, HQ, L), "float32")
        if TMA:
            encode_map(q_map, q.data, D, HQ, L, B, BM)
            encode_map(k_map, k.data, D, HKV, L, B, BN)
            encode_map(v_map, v.data, DV, HKV, L, B, BN)
            if O_TMA:
                encode_map(o_map, o.data, DV, HQ, L, B, 64)
            if GTMA:  # [B, T, Hq] float32, boxes of GATE_BOX_HEADS heads x BN keys, no swizzle
                T.Bind(T.tvm_stack_alloca("tensormap", 1), var=g_map)
                T.tensormap_encode_tiled(
                    g_map, c.data, CT, CH, CB, CT * 4, CH * CT * 4, GATE_BOX_HEADS, BN, 1, 1,
                    1, 1, descriptor_dtype="float32", rank=3)
        # flat views for the copies (copy_rows says why)
        qf = T.decl_buffer((B * L * HQ * D,), dt, data=q.data)
        kf = T.decl_buffer((B * L * HKV * D,), dt, data=k.data)
        vf = T.decl_buffer((B * L * HKV * DV,), dt, data=v.data)
        # row_sums_ahead's records, flat (elsewhere not read)
        cf = T.decl_buffer((CB * CH * CT if TILES and BM != BN else 1,), C_DT, data=c.data)
        for tile in T.thread_binding(grid_blocks(B, HQ, L), thread="blockIdx.x"):
            for tx in T.thread_binding(NPP if PP else NT, thread="threadIdx.x"):
                # one buffer: a second one would be merged at an offset of TVM's choosing,
                # and the swizzle needs every region on a 1024-byte boundary
                smem = T.alloc_buffer((WORDS,), "float32", scope="shared.dyn")
                if gated and not PP:
                    cg_r = T.alloc_buffer((NGC,), "float64", scope="local")
                gv = T.alloc_buffer((GPL,), "float32", scope="local")  # FUSED: a lane's gates
                gw = T.alloc_buffer((GW,), "uint32", scope="local")  # FUSED: scan_tile's words
                s_r = T.alloc_buffer((BN // 2,), "float32", scope="local")
                p_r = T.alloc_buffer((BN // 4,), "uint32", scope="local")
                acc = T.alloc_buffer((DV // 2,), "float32", scope="local")
                qd = T.alloc_buffer((1,), "uint64", scope="local")
                kd = T.alloc_buffer((1,), "uint64", scope="local")
                vd = T.alloc_buffer((1,), "uint64", scope="local")
                m_r = T.alloc_buffer((2,), "float32", scope="local")
                l_r = T.alloc_buffer((2,), "float32", scope="local")
                cq_r = T.alloc_buffer((2,), "float32", scope="local")
                al_r = T.alloc_buffer((2,), "float32", scope="local")
                cnt = T.alloc_buffer((1,), "int32", scope="local")  # persistent: key tiles run
                nq = (L + BM - 1) // BM
                b = tile // (HQ * nq)
                h = tile // nq % HQ
                i0 = tile % nq * BM
                hk = h // G
                lane = tx % 32
                t4 = lane % 4
                # the key tiles [kt_lo, kt_lo + n_tiles) this query tile sees
                kt_hi = (T.min(L, i0 + BM) + BN - 1) // BN
                kt_lo = T.int64(0)
                if W > 0:
                    kt_lo = T.max(i0 - (W - 1), T.int64(0)) // BN
                n_tiles = kt_hi - kt_lo
                if PP:
                    if tx == 0:
                        T.ptx["mbarrier.init.shared::cta.b64"](mbar(smem, 0), 1)
                        for i in T.unroll(NS):
                            T.ptx["mbarrier.init.shared::cta.b64"](
                                mbar(smem, 1 + i), ARRIVALS)
                            T.ptx["mbarrier.init.shared::cta.b64"](mbar(smem, FREE + i),
                                                                   128 * NC)
                        if GTMA:
                            for i in T.unroll(2):
                                T.ptx["mbarrier.init.shared::cta.b64"](
                                    mbar(smem, GATE_BAR + i), 1)
                        if PERS:
                            T.ptx["mbarrier.init.shared::cta.b64"](mbar(smem, Q1_FULL), 1)
                            for i in T.unroll(2):  # each consumer's storing thread
                                T.ptx["mbarrier.init.shared::cta.b64"](
                                    mbar(smem, Q_EMPTY + i), NC)
                        T.ptx["fence.mbarrier_init.release.cluster"]()
                    T.tvm_storage_sync("shared")
                    if tx < 128:
                        T.ptx["setmaxnreg.dec.sync.aligned.u32"](PRODUCER_REGS)
                        rscale: T.float32 = T.float32(1) / scale
                        if tx < 32:
                            if PERS:
                                cnt[0] = 0
                                for w in T.serial(rounds(B, HQ, L)):
                                    if round_item(tile, w) < n_query_tiles(B, HQ, L):
                                        produce_item(round_item(tile, w), w, cnt[0], w % 2, cnt,
                                                     smem, c, HQ, L, lane, rscale)
                            else:
                                produce_item(tile, 0, 0, 0, cnt, smem, c, HQ, L, lane, rscale)
                        elif FUSED and tx < 32 * (1 + GATE_WARPS):
                            gwi = tx // 32 - 1
                            if PERS:
                                cnt[0] = 0
                                for w in T.serial(rounds(B, HQ, L)):
                                    if round_item(tile, w) < n_query_tiles(B, HQ, L):
                                        produce_gates(round_item(tile, w), cnt[0], cnt, smem,
                                                      c, gv, gw, HQ, L, lane, rscale, gwi)
                            else:
                                produce_gates(tile, 0, cnt, smem, c, gv, gw, HQ, L, lane,
                                              rscale, gwi)
                    else:
                        T.ptx["setmaxnreg.inc.sync.aligned.u32"](CONSUMER_REGS)
                        cw = tx // 128 - 1  # consumer warpgroup: rows 64 cw .. 64 cw + 63
                        if STAGGER:
                            # through a lane-0 shuffle, ptxas knows cw is the warp's and keeps
                            # the loops' bounds (consumer_tiles) in uniform registers: from
                            # tx // 128 the code grew by half and spilled
                            cw = T.cuda.__shfl_sync(T.uint32(0xFFFFFFFF), cw, 0, 32)
                        sl2 = scale * T.float32(LOG2E)
                        if PERS:
                            cnt[0] = 0
                            # two rounds a step, one per Q buffer, so that each copy of the
                            # loop reads its buffer at a constant offset: a variable one kept
                            # Q's descriptors out of the uniform registers, 35 more of the
                            # loop's ~1190 instructions (offline SASS, head dim 64)
                            for w2 in T.serial((rounds(B, HQ, L) + 1) // 2):
                                for qs in T.unroll(2):
                                    if round_item(tile, w2 * 2 + qs) < n_query_tiles(B, HQ, L):
                                        consume_item(round_item(tile, w2 * 2 + qs), w2 * 2 + qs,
                                                     cnt[0], qs, cnt,
                                                     round_item(tile, w2 * 2 + qs + 1)
                                                     < n_query_tiles(B, HQ, L),
                                                     cw, tx, lane, t4, sl2,
                                                     smem, c, o, lse, cf, CH, CT, s_r, p_r,
                                                     acc, qd, kd, vd, m_r, l_r, cq_r, al_r, HQ, L)
                        else:
                            consume_item(tile, 0, 0, 0, cnt, False, cw, tx, lane, t4, sl2, smem,
                                         c, o, lse, cf, CH, CT, s_r, p_r, acc, qd, kd, vd, m_r,
                                         l_r, cq_r, al_r, HQ, L)
                else:
                    wg = tx // 128
                    # this thread's rows: row0 and row0 + 8
                    row0 = i0 + tx // 32 * 16 + lane // 4
                    sl2 = scale * T.float32(LOG2E)
                    # the block's Q rows (their own commit group, the oldest: the first tile's
                    # wait covers it)
                    if TMA:
                        if tx == 0:
                            for i in T.unroll(NS + 1):
                                T.ptx["mbarrier.init.shared::cta.b64"](mbar(smem, i), 1)
                            # the initialized barriers, visible to the async proxy (the copies)
                            T.ptx["fence.mbarrier_init.release.cluster"]()
                        T.tvm_storage_sync("shared")
                        if tx == 0:
                            bulk_q(smem, i0, h, b, 0)
                    else:
                        copy_rows(smem, Q_OFF, BM, qf, ((b * L + i0) * HQ + h) * D,
                                  T.Cast("int32", HQ * D), T.Cast("int32", L - 1 - i0), D, tx)
                        T.ptx["cp.async.commit_group"]()
                    init_rows(row0, i0, b, h, L, c, m_r, l_r, cq_r, acc, s_r)

                    if gated:
                        cref: T.float64 = c[b, h, i0]
                        rscale: T.float32 = T.float32(1) / scale
                        if n_tiles > 0:
                            gate_fetch(kt_lo, cg_r, c, b, h, L, tx)
                    # Pipelined: iteration it issues the next tile's scores and this tile's
                    # P V together, computes the next tile's softmax while P V runs, and
                    # rescales O once it is done; K and V stay a tile ahead in three stages,
                    # with one barrier per tile
                    if TMA:
                        if n_tiles > 0:
                            if tx == 0:
                                bulk_tile(kt_lo, 0, smem, b, hk, 0)
                                if n_tiles > 1:
                                    bulk_tile(kt_lo + 1, 1, smem, b, hk, 0)
                            if gated:
                                gate_store(0, cg_r, smem, cref, rscale, tx)
                            wait_tile(0, smem)
                        # Q too: no block leaves with a copy in flight
                        T.cuda.mbarrier_wait(mbar(smem, 0), 0)
                    if n_tiles > 0:
                        if not TMA:
                            load_tile(kt_lo, 0, smem, kf, vf, b, hk, L, HKV, tx)
                            if gated:
                                gate_store(0, cg_r, smem, cref, rscale, tx)
                            T.ptx["cp.async.commit_group"]()
                            T.ptx["cp.async.wait_group"](0)
                            # cp.async writes through the generic proxy, wgmma reads through
                            # the async one
                            T.ptx["fence.proxy.async.shared::cta"]()
                        T.tvm_storage_sync("shared")
                        if n_tiles > 1:
                            if not TMA:
                                load_tile(kt_lo + 1, 1, smem, kf, vf, b, hk, L, HKV, tx)
                            if gated:
                                gate_fetch(kt_lo + 1, cg_r, c, b, h, L, tx)
                        if not TMA:
                            T.ptx["cp.async.commit_group"]()
                        if gated:
                            bias_scores(0, smem, s_r, t4)
                        T.ptx["wgmma.fence.sync.aligned"]()
                        issue_scores(0, wg, smem, s_r, qd, kd, 0, t4, vd)
                        T.ptx["wgmma.wait_group.sync.aligned"](0)
                        softmax(kt_lo, i0, row0, s_r, m_r, l_r, al_r, t4, sl2)
                        rescale_pack(s_r, p_r, acc, al_r)
                        for it in T.serial(T.Cast("int32", n_tiles) - 1):
                            kt = kt_lo + T.Cast("int64", it)
                            st = it % 3
                            if gated:  # the next tile's gate sums, fetched a tile ago
                                gate_store((it + 1) % 3, cg_r, smem, cref, rscale, tx)
                            if TMA:
                                wait_tile(it + 1, smem)
                            else:
                                T.ptx["cp.async.wait_group"](0)
                                T.ptx["fence.proxy.async.shared::cta"]()
                            # the next tile is in; every warpgroup is done with the last
                            # one, whose stage the tile after next now takes
                            T.tvm_storage_sync("shared")
                            if T.Cast("int64", it) + 2 < n_tiles:
                                if TMA:
                                    if tx == 0:
                                        bulk_tile(kt + 2, (it + 2) % 3, smem, b, hk, 0)
                                else:
                                    load_tile(kt + 2, (it + 2) % 3, smem, kf, vf, b, hk, L, HKV,
                                              tx)
                                if gated:
                                    gate_fetch(kt + 2, cg_r, c, b, h, L, tx)
                            if not TMA:
                                T.ptx["cp.async.commit_group"]()
                            if gated:
                                bias_scores((it + 1) % 3, smem, s_r, t4)
                            T.ptx["wgmma.fence.sync.aligned"]()
                            issue_scores((it + 1) % 3, wg, smem, s_r, qd, kd, 0, t4, vd)
                            issue_pv(st, smem, p_r, acc, vd)
                            T.ptx["wgmma.wait_group.sync.aligned"](1)
                            softmax(kt + 1, i0, row0, s_r, m_r, l_r, al_r, t4, sl2)
                            T.ptx["wgmma.wait_group.sync.aligned"](0)
                            rescale_pack(s_r, p_r, acc, al_r)
                        T.ptx["wgmma.fence.sync.aligned"]()
                        issue_pv((n_tiles - 1) % 3, smem, p_r, acc, vd)
                        T.ptx["wgmma.wait_group.sync.aligned"](0)
                    finish_rows(row0, i0, 0, lane, b, h, L, t4, acc, l_r, m_r, cq_r, p_r, smem,
                                o, lse, False, 0)

    return gfwa_fwd
