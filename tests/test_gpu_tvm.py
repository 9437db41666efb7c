"""The TVM backend on a CUDA GPU (skipped without one, or without TVM's CUDA runtime):
forward (tensor cores for fp16/bf16) and backward against float64, every shape class."""

import dataclasses

import pytest
import torch
from conftest import log_gpu_errors, make_inputs, rel_err
from test_gpu import CASES, DTYPES, check_case_against_float64
from test_gpu_features import check_step_in_cuda_graph

from gfwagen.generator import wgmma_num_warps
from gfwagen.reference import reference_forward

tvm_backend = pytest.importorskip("gfwagen.backends.tvm_backend")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not tvm_backend.HAVE_TVM, reason="apache-tvm not installed"),
]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_tvm_matches_float64(case, dtype_name):
    check_case_against_float64(case, dtype_name, "tvm")


def _tc_config(bm, bn, ns, sn, wm=1, qs=False):
    from gfwagen.spec import KernelConfig

    extra = (("sub_n", sn),) if sn != bn else ()
    extra += (("warp_m", wm),) if wm != 1 else ()
    extra += (("q_smem", True),) if qs else ()
    return KernelConfig(block_m=bm, block_n=bn, num_warps=bm // (16 * wm), num_stages=ns,
                        extra=extra)


# (block_m, block_n, num_stages, sub_n[, warp_m, q_smem])
TC_CONFIGS = [(16, 16, 1, 16), (32, 32, 2, 32), (64, 128, 2, 128), (128, 64, 1, 64),
              (128, 128, 2, 128), (64, 64, 2, 32), (64, 128, 1, 32),
              # more keys per tile than threads (the gate staging loops)
              (16, 64, 1, 64), (32, 128, 2, 32),
              # two 16-row blocks per warp, Q in shared memory or held (the latter spills at
              # D = 128: checked for correctness, not speed); 8 warps; one warp of 64 keys
              (128, 64, 1, 32, 2, True), (128, 64, 2, 32, 2, True), (128, 32, 1, 32, 2, True),
              (128, 64, 2, 16, 2, False), (256, 64, 1, 32, 2, True), (32, 64, 2, 64, 2, True),
              # 64-key softmax steps at two row blocks per warp (one rescale per tile)
              (128, 64, 2, 64, 2, True),
              # one block per warp, Q in shared memory
              (64, 32, 1, 32, 1, True), (64, 64, 2, 32, 1, True)]


@pytest.mark.parametrize("cfg", TC_CONFIGS, ids=["x".join(map(str, c)) for c in TC_CONFIGS])
def test_gpu_tvm_tensor_core_configs(cfg):
    """Every tile shape the tuner may pick gives the same answer (T and W off the tiles; W
    below block_m at 256 rows)."""
    config = _tc_config(*cfg)
    q, k, v, g = make_inputs(2, 777, 8, 2, 128, 128, torch.bfloat16, True, device="cuda")
    o, lse = tvm_backend.tvm_forward(q, k, v, g, 200, None, config)
    d = [t.double() for t in (q, k, v)]
    o64, lse64 = reference_forward(*d, g.double(), 200)
    errs = {"o": rel_err(o, o64), "lse": rel_err(lse, lse64)}
    log_gpu_errors(f"tvm-tc {cfg}", errs)
    assert errs["o"] < 1e-2 and errs["lse"] < 1e-4, errs


# (B, T, Hq, Hkv, D, Dv, window, gated, dtype) x warp_m = 2 configs: the row blocks' masks,
# gate biases and outputs where the window is one key, shorter than a row block, causal,
# and T off every tile
WARP_M_SHAPES = [(1, 300, 4, 4, 64, 64, 1, True, torch.bfloat16),
                 (2, 333, 4, 2, 64, 64, 9, True, torch.float16),
                 (1, 517, 4, 1, 128, 128, None, True, torch.bfloat16),
                 (2, 200, 2, 2, 64, 32, 50, False, torch.float16)]


@pytest.mark.parametrize("cfg", [(128, 64, 1, 32, 2, True), (64, 32, 2, 32, 2, False)],
                         ids=["128x64x1x32x2xq", "64x32x2x32x2"])
@pytest.mark.parametrize("shape", WARP_M_SHAPES, ids=["W1", "W9-gqa", "causal-mqa", "dv32-nogate"])
def test_gpu_tvm_warp_m_edges(shape, cfg):
    _check_forward(shape, _tc_config(*cfg), f"tvm-tc warp_m {cfg}")


def _check_forward(shape, config, label, scale=None, gate_scale=1.0):
    """The TVM forward at `config` on a WARP_M_SHAPES-style shape against float64 (o and
    lse), its errors logged on a GPUERR line. scale None: 1/sqrt(D); gate_scale multiplies
    the log gates (conftest.make_inputs)."""
    B, T, Hq, Hkv, D, Dv, W, gated, dtype = shape
    q, k, v, g = make_inputs(B, T, Hq, Hkv, D, Dv, dtype, gated, device="cuda",
                             gate_scale=gate_scale)
    _check_against_float64(q, k, v, g, W, scale, config, f"{label} {shape[:8]}",
                           None if g is None else g.double())


def _check_against_float64(q, k, v, g, W, scale, config, label, g64):
    """tvm_forward at `config` against the float64 reference given the gate g64, errors
    logged on a GPUERR line."""
    o, lse = tvm_backend.tvm_forward(q, k, v, g, W, scale, config)
    d = [t.double() for t in (q, k, v)]
    o64, lse64 = reference_forward(*d, g64, W, scale)
    errs = {"o": rel_err(o, o64), "lse": rel_err(lse, lse64)}
    log_gpu_errors(label, errs)
    assert not o.isnan().any() and errs["o"] < 1e-2 and errs["lse"] < 1e-4, errs


# the warpgroup-MMA forward (templates/tvm/fwd_wgmma.py, sm_90 only): (block_m, block_n,
# num_stages) x shapes off every tile: a window below a warpgroup's rows with GQA, a one-key
# window, fp16, causal MQA, Dv != D ungated, a window longer than T
WGMMA_TILES = [(64, 64, 3), (128, 64, 3), (64, 128, 3), (128, 128, 3)]
WGMMA_TILES += [(*t, "tma") for t in WGMMA_TILES]  # the bulk tensor copies
WGMMA_TILES += [(128, 64, 3, "tma", "pingpong"), (128, 128, 3, "tma", "pingpong")]
# persistent: 3 blocks, each looping over many query tiles (its stages' and Q buffers'
# barrier phases wrap many times), with 3 and 4 stages
WGMMA_TILES += [(128, 128, 3, "tma", "pingpong", "persistent"),
                (128, 64, 4, "tma", "pingpong", "persistent")]
# the biases as the score product's first k step (bias_mma), pingpong and persistent
WGMMA_TILES += [(128, 128, 3, "tma", "pingpong", "bias_mma"),
                (128, 128, 3, "tma", "pingpong", "persistent", "bias_mma")]
# three consumer warpgroups (head dims <= 64): 192 rows over 128-key tiles, whose rows span
# two key tiles
WGMMA_TILES += [(192, 128, 3, "tma", "pingpong"), (192, 128, 3, "tma", "pingpong", "persistent"),
                (192, 128, 3, "tma", "pingpong", "persistent", "bias_mma")]
# staggered: each consumer visits only its own rows' key tiles and passes its turn on the rest
WGMMA_TILES += [(192, 128, 3, "tma", "pingpong", "stagger"),
                (192, 128, 4, "tma", "pingpong", "persistent", "stagger"),
                (192, 128, 3, "tma", "pingpong", "persistent", "bias_mma", "stagger")]
PERSISTENT_BLOCKS = 3
WGMMA_SHAPES = [(2, 777, 8, 2, 128, 128, 200, True, torch.bfloat16), *WARP_M_SHAPES[:3],
                (2, 200, 2, 2, 128, 64, 50, False, torch.float16),
                (1, 250, 2, 2, 64, 128, 3000, True, torch.bfloat16)]


@pytest.mark.skipif(not torch.cuda.is_available() or
                    torch.cuda.get_device_capability() != (9, 0), reason="wgmma: sm_90 only")
@pytest.mark.parametrize("cfg", WGMMA_TILES, ids=["x".join(map(str, c)) for c in WGMMA_TILES])
@pytest.mark.parametrize("shape", WGMMA_SHAPES,
                         ids=["W200-gqa", "W1", "W9-gqa-fp16", "causal-mqa", "dv64-nogate",
                              "W-over-T"])
def test_gpu_tvm_wgmma_matches_float64(shape, cfg):
    from gfwagen.spec import KernelConfig, KernelSpec

    extra = tuple((k, True) for k in ("pingpong", "tma") if k in cfg) + (("wgmma", True),)
    if "persistent" in cfg:
        extra += (("persistent", PERSISTENT_BLOCKS),)
    if "bias_mma" in cfg:
        extra += (("bias_mma", True),)
    if "stagger" in cfg:
        extra += (("stagger", True),)
    config = KernelConfig(cfg[0], cfg[1], wgmma_num_warps(cfg[0]), cfg[2], extra=extra)
    D, Dv, dtype = shape[4], shape[5], tvm_backend.CPU_DTYPES[shape[8]]
    why = tvm_backend.tensor_core_template(config).supports(D, Dv, dtype, config)
    if why is not None:
        pytest.skip(f"tile {cfg} at D={D}, Dv={Dv}: {why}")
    spec = KernelSpec("tvm", "fwd", D, Dv, shape[6] or 0, dtype, shape[7], shape[2] // shape[3])
    if tvm_backend.cuda_smem_bytes(spec, config) > tvm_backend.CUDA_DYNAMIC_SMEM_LIMIT:
        pytest.skip(f"tile {cfg} at D={D}, Dv={Dv}: over the shared memory")
    _check_forward(shape, config, f"tvm-wgmma {cfg}")


@pytest.mark.skipif(not torch.cuda.is_available() or
                    torch.cuda.get_device_capability() != (9, 0), reason="wgmma: sm_90 only")
@pytest.mark.parametrize("gate_scale", [1e-3, 30.0])
@pytest.mark.parametrize("tma", [False, True, "fuse_gate", "bias_mma", "fuse_gate+bias_mma"],
                         ids=["cp.async", "pingpong", "pingpong-fused", "pingpong-bias-mma",
                              "pingpong-fused-bias-mma"])
def test_gpu_tvm_wgmma_gate_extremes(gate_scale, tma):
    """The gated score product starts from each key's bias (c_ref - c_j) / scale: with gates
    near 1 (biases near 0) and with strong ones (a window's bias in the thousands, which the
    fp32 accumulator then carries next to Q K^T) it still matches float64. The pingpong
    kernel's biases start again at each key tile (its per-tile records, or with fuse_gate its
    own sums)."""
    _check_forward((1, 1000, 4, 2, 128, 128, 300, True, torch.bfloat16),
                   _wgmma_128(bool(tma), tma if isinstance(tma, str) else None),
                   f"tvm-wgmma gate x{gate_scale} tma={tma}", gate_scale=gate_scale)


@pytest.mark.skipif(not torch.cuda.is_available() or
                    torch.cuda.get_device_capability() != (9, 0), reason="wgmma: sm_90 only")
@pytest.mark.parametrize("scale", [0.0, 1e-35, -0.2])
@pytest.mark.parametrize("tma", [False, True, "fuse_gate", "persistent", "bias_mma",
                                 "persistent+fuse_gate+bias_mma"],
                         ids=["cp.async", "pingpong", "pingpong-fused", "persistent",
                              "bias-mma", "persistent-fused-bias-mma"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "nogate"])
def test_gpu_tvm_wgmma_zero_and_negative_scale(scale, tma, gated):
    """Scale 0 (the gate alone weighs the keys), a tiny one and a negative one: the bias that
    the gated score product starts from is (c_ref - c_j) / scale, so scales below
    WGMMA_ZERO_SCALE run at it (the pingpong kernel's tile records are made at it too); the
    softmax takes its max on the raw products, so a negative scale runs on -Q, and its
    masked scores are -inf, which a zero scale would turn into NaN (wgmma_scale)."""
    if "fuse_gate" in str(tma) and not gated:
        pytest.skip("fuse_gate: gated only")
    D = 64 if "persistent" in str(tma) else 128  # its second Q buffer fits 3 stages at 64
    _check_forward((1, 700, 4, 2, D, D, 200, gated, torch.bfloat16),
                   _wgmma_128(bool(tma), tma if isinstance(tma, str) else None),
                   f"tvm-wgmma scale={scale} tma={tma} gated={gated}", scale=scale)


@pytest.mark.skipif(not torch.cuda.is_available() or
                    torch.cuda.get_device_capability() != (9, 0), reason="wgmma: sm_90 only")
@pytest.mark.parametrize("case", ["long-window", "forget", "bf16-view", "tail"])
@pytest.mark.parametrize("knob", [None, "fuse_gate", "persistent", "bias_mma", "three",
                                  "three-bias-mma", "three-stagger", "three-bias-mma-stagger",
                                  "fuse_gate+bias_mma",
                                  "persistent+fuse_gate+bias_mma",
                                  "persistent+fuse_gate+bias_mma+gate_tma"],
                         ids=["tiles", "fuse_gate", "persistent", "bias-mma", "three",
                              "three-bias-mma", "three-stagger", "three-bias-mma-stagger",
                              "fused-bias-mma", "persistent-fused-bias-mma",
                              "persistent-fused-tma"])
def test_gpu_tvm_pingpong_tile_relative_gate(case, knob):
    """The 128x128 pingpong forward, whose biases start again at each key tile (it copies
    each tile's record; fuse_gate: it sums the raw gates itself) and which moves its
    running max by each key tile's gate total: across up to eight key tiles, with gates past
    the clamp (-inf: forget; the reference gets them clamped), from a bf16 strided view of
    the gate, and with T off the tile (the last tile's keys past T), against float64.
    "three": three consumers' 192 rows, persistent, which read their rows' c_i from the
    records of the last two key tiles; "stagger": each of them over its own rows' key tiles
    only, passing its turn on the block's others. "fuse_gate+bias_mma": the producer's gate warp
    writes each tile's bias table (bf16 pieces) itself, plain and persistent; with gate_tma
    from gates a bulk tensor copy brings."""
    from gfwagen.gate import sanitize_log_gate
    from gfwagen.spec import KernelConfig

    cfg = _wgmma_128(True, knob)
    if knob and knob.startswith("three"):
        extra = dict(_wgmma_128(True, "persistent").extra)
        if knob.startswith("three-bias-mma"):
            extra["bias_mma"] = True
        if knob.endswith("stagger"):
            extra["stagger"] = True
        cfg = KernelConfig(192, 128, 16, 3, extra=tuple(extra.items()))
    T, W = {"long-window": (1000, 900), "forget": (1000, 900), "bf16-view": (700, 600),
            "tail": (333, 250)}[case]
    # the second Q buffer fits 3 stages at 64; three consumers hold S, P and O there only
    D = 64 if knob and ("persistent" in knob or knob.startswith("three")) else 128
    q, k, v, g = make_inputs(2, T, 4, 2, D, D, torch.bfloat16, True, device="cuda")
    spec = tvm_backend._spec("fwd", q, k, v, g, W)
    fused = "fuse_gate" in str(knob)
    assert tvm_backend.gate_input(spec, cfg) == ("raw" if fused else "tiles")
    assert tvm_backend.tensor_core_template(cfg).key_table(cfg) == ("bias" in str(knob))
    if case == "forget":
        g[:, ::37] = float("-inf")
        g[:, 5::91] = -500.0
    if case == "bf16-view":
        g = g.transpose(1, 2).contiguous().to(torch.bfloat16).transpose(1, 2)
        assert not g.is_contiguous()
    _check_against_float64(q, k, v, g, W, None, cfg, f"tvm-wgmma {knob} {case}",
                           sanitize_log_gate(g.double()))


def _three(knob, stagger):
    """The three-consumer tile (192 x 128) with _wgmma_128's knobs: "plain" (3 stages),
    "persistent" (4 stages), "plain-bias_mma" or "persistent-bias_mma" (3 stages), staggered
    or not."""
    knobs = [k for k in ("persistent", "bias_mma") if k in knob] + ["stagger"] * stagger
    return dataclasses.replace(_wgmma_128(True, "+".join(knobs)), block_m=192, num_warps=16,
                               num_stages=4 if knob == "persistent" else 3)


@pytest.mark.skipif(not torch.cuda.is_available() or
                    torch.cuda.get_device_capability() != (9, 0), reason="wgmma: sm_90 only")
@pytest.mark.parametrize("W", [1, 100, 200, 512, 900, None], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("knob", ["plain", "persistent", "plain-bias_mma", "persistent-bias_mma"])
def test_gpu_tvm_stagger(W, knob):
    """Three consumers, each over its own 64 rows' key tiles only (config extra stagger),
    passing its turn on the block's others: at windows from one key to past T and causal,
    with T off the 192-row blocks. Ungated it must equal the unstaggered kernel bitwise (the
    tiles it skips are wholly masked there, and change no row's max, sum or output); gated,
    against float64 (its running max then ends on the consumer's own last key tile)."""
    from gfwagen.gate import sanitize_log_gate

    q, k, v, g = make_inputs(2, 1000, 4, 2, 64, 64, torch.bfloat16, True, device="cuda")
    o_s, lse_s = tvm_backend.tvm_forward(q, k, v, None, W, None, _three(knob, True))
    o_u, lse_u = tvm_backend.tvm_forward(q, k, v, None, W, None, _three(knob, False))
    assert torch.equal(o_s, o_u) and torch.equal(lse_s, lse_u)
    _check_against_float64(q, k, v, g, W, None, _three(knob, True), f"tvm-wgmma stagger {knob}",
                           sanitize_log_gate(g.double()))


@pytest.mark.skipif(not torch.cuda.is_available() or
                    torch.cuda.get_device_capability() != (9, 0), reason="wgmma: sm_90 only")
def test_gpu_tvm_gate_tma_falls_back_off_four_heads():
    """gate_tma's copies take 4 heads' gates a key (16 bytes): with 6 query heads the op runs
    the kernel without it (tvm_forward), and still matches float64."""
    from gfwagen.gate import sanitize_log_gate

    cfg = _wgmma_128(True, "persistent+fuse_gate+bias_mma+gate_tma")
    q, k, v, g = make_inputs(2, 700, 6, 3, 64, 64, torch.bfloat16, True, device="cuda")
    _check_against_float64(q, k, v, g, 500, None, cfg, "tvm-wgmma gate_tma 6 heads",
                           sanitize_log_gate(g.double()))


def _wgmma_128(pingpong, gate_knobs=None):
    """The 128x128 warpgroup-MMA tile: FA3's pingpong schedule with bulk copies (and the
    knobs gate_knobs names, "+"-joined: "fuse_gate", "bias_mma", "persistent" on
    PERSISTENT_BLOCKS blocks), or the single-warpgroup schedule on cp.async."""
    from gfwagen.spec import KernelConfig

    extra = ((("pingpong", True), ("tma", True)) if pingpong else ()) + (("wgmma", True),)
    for knob in gate_knobs.split("+") if gate_knobs else ():
        extra += ((knob, PERSISTENT_BLOCKS if knob == "persistent" else True),)
    return KernelConfig(128, 128, 8, 3, extra=extra)


def test_gpu_tvm_runs_on_the_current_stream():
    """A kernel launched under another stream is ordered after that stream's earlier work."""
    q, k, v, g = make_inputs(1, 1024, 4, 4, 64, 64, torch.float16, True, device="cuda")
    o_ref, _ = tvm_backend.tvm_forward(q, k, v, g, 128)  # compiled before the timed part
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # the inputs are written after a long GPU sleep
        q2 = q * 1.0
        o, _ = tvm_backend.tvm_forward(q2, k, v, g, 128)
    s.synchronize()
    assert torch.equal(o, o_ref)


PLAN_CASES = [(128, True, None), (64, True, None), (128, False, None),
              # the bias tables: the records' launch takes their int16 view as well
              (128, True, "bias_mma"), (64, True, "persistent-bias_mma"),
              # the raw gates, which the kernel's gate warp sums into its bias tables
              (64, True, "persistent-fuse_gate-bias_mma")]


@pytest.mark.parametrize("D,gated,knob", PLAN_CASES)
def test_gpu_tvm_forward_launch_plans_replay_bitwise(D, gated, knob, monkeypatch):
    """The op's TVM forward recorded once, then replayed (launch_plans): on fresh inputs,
    on another stream after its earlier work, bitwise the general path's. knob: the
    pingpong tile with it, instead of the database's config."""
    import gfwagen
    from gfwagen import dispatch, launch_plans
    from gfwagen.spec import KernelConfig

    if knob is not None:
        extra = dict(_wgmma_128(True, "persistent" if "persistent" in knob else None).extra)
        extra["bias_mma"] = True
        if "fuse_gate" in knob:
            extra["fuse_gate"] = True
        cfg = KernelConfig(128, 128, 8, 3, extra=tuple(extra.items()))
        real = dispatch.select_config
        monkeypatch.setattr(dispatch, "select_config", lambda spec, T, dev: (
            cfg if spec.backend == "tvm" and spec.pass_ == "fwd" else real(spec, T, dev)))
    monkeypatch.setenv(launch_plans.PLANS_ENV, "auto")
    launch_plans.clear()
    try:
        for i in range(3):
            q, k, v, g = make_inputs(2, 1000, 4, 2, D, D, torch.bfloat16, gated, device="cuda")
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                torch.cuda._sleep(20_000_000)  # q2 is written after a long GPU sleep
                q2 = q * 1.0
                o = gfwagen.attention(q2, k, v, g, window=300, backend="tvm")
            side.synchronize()
            with monkeypatch.context() as m:
                m.setenv(launch_plans.PLANS_ENV, "0")
                want = gfwagen.attention(q, k, v, g, window=300, backend="tvm")
            assert torch.equal(o, want), i
        kinds = {type(p).__name__ for key, p in launch_plans._plans.items()
                 if key[0].__name__ == "_planned_forward"}
        assert kinds == {"_Plan"}
    finally:
        launch_plans.clear()


def test_gpu_tvm_misaligned_views():
    """Contiguous views 2 bytes off a 16-byte boundary (cp.async needs the boundary)."""
    B, T, H, D = 1, 300, 2, 64
    n = B * T * H * D
    store = torch.randn(3 * n + 3, device="cuda", dtype=torch.bfloat16)
    q, k, v = (store[1 + i * n:1 + (i + 1) * n].view(B, T, H, D) for i in range(3))
    assert q.data_ptr() % 16 == 2
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda") + 3)
    o, _ = tvm_backend.tvm_forward(q, k, v, g, 77)
    o_ref, _ = tvm_backend.tvm_forward(q.clone(), k.clone(), v.clone(), g, 77)
    assert torch.equal(o, o_ref)


@pytest.mark.parametrize("D", [64, 128])
def test_gpu_tvm_forward_backward_in_cuda_graph(D):
    """TVM's kernels launch on torch's current stream, so they capture with the rest."""
    check_step_in_cuda_graph(2048, 4, 4, D, 512, False, "tvm")
