"""Realistic sizes on a CUDA GPU against float64 (skipped without one). Each case prints its
errors on a `GPUERR` line so that a run's log carries the numbers."""


import pytest
import torch
from conftest import log_gpu_errors, make_inputs, rel_err

import gfwagen
from gfwagen.reference import reference_backward, reference_forward

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

CASES = [
    # id, B, T, Hq, Hkv, D, Dv, window, gated
    ("gqa-W256-ragged", 2, 2085, 16, 4, 128, 128, 256, True),
    ("W1", 1, 1500, 8, 8, 128, 128, 1, True),
    ("W>=T", 1, 1100, 8, 2, 128, 128, 4096, True),
    ("causal", 1, 1300, 8, 8, 64, 64, None, True),
    ("no-gate-W512", 2, 2100, 8, 8, 128, 128, 512, False),
    ("D64-W333", 2, 1777, 8, 8, 64, 64, 333, True),
    # the shipped database's gated classes that run TVM's forward since session 40: head
    # dim 64 at W 256 (its persistent pingpong tile), head dim 128 at W 2048 (its pingpong
    # tile without bias_mma)
    ("D64-W256", 2, 1500, 8, 8, 64, 64, 256, True),
    ("D128-W2048", 1, 2500, 8, 8, 128, 128, 2048, True),
    ("mqa-W128", 1, 2000, 8, 1, 128, 128, 128, True),
    ("D256-W200", 1, 1000, 4, 4, 256, 256, 200, True),
    # windows below the tile size: the diagonal tile loop runs zero times
    ("W17", 1, 1000, 4, 4, 128, 128, 17, True),
    ("W63-gqa", 1, 1000, 8, 2, 64, 64, 63, True),
    ("D96-W300", 1, 1200, 4, 2, 96, 96, 300, True),
    ("D192-Dv96-W100", 1, 900, 4, 4, 192, 96, 100, True),
    # batch * heads past 65535, CUDA's cap on a grid's y extent (the kernels' grids were
    # (tiles, B * H) until session 27)
    ("BH65600", 8200, 24, 8, 8, 16, 16, 8, True),
    # batches past 65535, the grid's z extent: gfwagen.dispatch runs them in slices
    ("B65600", 65600, 16, 1, 1, 16, 16, 8, True),
]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_matches_float64(case, dtype_name):
    check_case_against_float64(case, dtype_name, "auto")


def check_case_against_float64(case, dtype_name, backend, scale=None, label=None):
    """One CASES entry through gfwagen.attention(backend=..., scale=...), forward and
    backward, against the float64 reference; the errors are logged on a GPUERR line (under
    `label` where given)."""
    name, B, T, Hq, Hkv, D, Dv, W, gated = case
    dtype = DTYPES[dtype_name]
    q, k, v, g = make_inputs(B, T, Hq, Hkv, D, Dv, dtype, gated, device="cuda")
    leaves = [t.requires_grad_() for t in (q, k, v)] + ([g.requires_grad_()] if gated else [])
    torch.cuda.synchronize()
    o = gfwagen.attention(q, k, v, g, window=W, scale=scale, backend=backend)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)
    d = [t.detach().double() for t in (q, k, v)]
    g64 = g.detach().double() if gated else None
    o64, lse64 = reference_forward(*d, g64, W, scale)
    ref = reference_backward(do.double(), *d, o64, lse64, g64, W, scale)
    errs = {"o": rel_err(o, o64)}
    for nm, a, e in zip(["dq", "dk", "dv", "dg"], grads, ref):
        errs[nm] = rel_err(a, e)
    if label is None:
        label = (f"{name} {dtype_name}" if backend == "auto" else
                 f"{backend} {name} {dtype_name}")
    log_gpu_errors(label, errs)
    for nm, err in errs.items():
        assert err < TOL[dtype], (nm, err)


@pytest.mark.parametrize("backend", ["auto", "triton", "tvm"])
@pytest.mark.parametrize("scale", [1e-116, -1e-116, 1e-40, 2.0 ** -100])
@pytest.mark.parametrize("case", [
    ("T1-D16-causal", 1, 1, 1, 1, 16, 16, None, False),
    ("T1-D16-causal-gated", 1, 1, 1, 1, 16, 16, None, True),
    ("D64-W100", 1, 300, 4, 2, 64, 64, 100, True),
    ("D128-causal", 1, 260, 2, 2, 128, 128, None, False),
], ids=lambda c: c[0])
def test_gpu_tiny_scales_match_float64(case, scale, backend):
    """Scales that float32 holds as zero or a subnormal (the fuzz test's T = 1, D = 16,
    scale 1e-116 case gave NaN from the Triton forward, whose running max is -inf * 0 there):
    the forwards run them at SMALLEST_KERNEL_SCALE, which moves no logit at float32's
    resolution, so the output is the window's plain (gated) average; forward and backward
    against float64 at the true scale."""
    from gfwagen.dispatch import tvm_available

    if backend == "tvm" and not tvm_available():
        pytest.skip("TVM with its CUDA runtime is not installed")
    check_case_against_float64(case, "bf16", backend, scale,
                               f"tiny-scale {backend} {case[0]} scale={scale:.3g}")


@pytest.mark.parametrize("case", [
    # the passes whose tiles come from the gated class: the CPU test
    # test_db.py::test_shipped_h200_database_runs_these_ungated_classes_on_gated_tiles keeps
    # this premise true of the shipped database (the head-dim-64 and -128 classes' backwards,
    # and the head-dim-128 long windows, are tuned ungated too)
    (("no-gate-D64-W256", 2, 1500, 8, 8, 64, 64, 256, False), ("fwd",)),
    (("no-gate-D256-W512", 1, 1200, 4, 4, 256, 256, 512, False), ("fwd", "bwd_kv", "bwd_q")),
    (("no-gate-D256-W2048", 1, 2100, 2, 2, 256, 256, 2048, False), ("fwd", "bwd_kv", "bwd_q")),
], ids=lambda c: c[0][0])
def test_gpu_ungated_op_on_its_gated_class_tiles(case):
    """An ungated problem whose class the shipped database tunes only gated runs that class's
    tiles (gfwagen.db.lookup's gated kin, their gate-only knobs ignored): forward and backward
    through the op against float64."""
    from gfwagen import dispatch
    from gfwagen.db.fingerprint import device_fingerprint
    from gfwagen.db.lookup import get_snapshot

    case, passes = case
    _, B, T, Hq, _, D, _, W, _ = case
    q = torch.empty(B, T, Hq, D, device="cuda", dtype=torch.bfloat16)
    for pass_ in passes:
        spec = dispatch._spec("triton", pass_, q, q, W, False, 1)
        _, why = get_snapshot().lookup(spec, T, device_fingerprint(q.device))
        assert why.endswith("; tuned gated, run ungated"), (pass_, why)
    check_case_against_float64(case, "bf16", "triton")


def test_gpu_compile_fullgraph_dynamic():
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, g: gfwagen.attention(q, k, v, g, window=128).float().sum(),
                      fullgraph=True, dynamic=True)
    for T in (1000, 1500):
        q, k, v, g = make_inputs(1, T, 8, 2, 64, 64, torch.bfloat16, True, device="cuda")
        leaves = [t.requires_grad_() for t in (q, k, v, g)]
        grads = torch.autograd.grad(f(*leaves), leaves)
        assert all(torch.isfinite(x).all() for x in grads)


def test_gpu_deterministic_backward():
    q, k, v, g = make_inputs(2, 1500, 8, 2, 128, 128, torch.bfloat16, True, device="cuda")
    leaves = [t.requires_grad_() for t in (q, k, v, g)]
    o = gfwagen.attention(q, k, v, g, window=256)
    do = torch.randn_like(o)
    a = torch.autograd.grad(o, leaves, do, retain_graph=True)
    b = torch.autograd.grad(o, leaves, do)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


VARLEN_CASES = [
    # id, lens, Hq, Hkv, D, window, gated: boundaries inside tiles, one-token and empty
    # sequences, a window wider than most sequences, GQA
    ("varlen-W256-gqa", [1000, 1, 517, 0, 2048, 300], 8, 2, 128, 256, True),
    ("varlen-W4096", [3000, 77, 1500], 4, 4, 64, 4096, True),
    ("varlen-W33-nogate", [129, 64, 700], 4, 4, 128, 33, False),
]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_gpu_varlen_matches_per_sequence(case, dtype_name):
    """Packed sequences against the float64 reference run on each sequence alone."""
    name, lens, Hq, Hkv, D, W, gated = case
    dtype = DTYPES[dtype_name]
    T = sum(lens)
    q, k, v, g = make_inputs(1, T, Hq, Hkv, D, D, dtype, gated, device="cuda")
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,
                      device="cuda")
    leaves = [t.requires_grad_() for t in (q, k, v)] + ([g.requires_grad_()] if gated else [])
    o = gfwagen.attention(q, k, v, g, window=W, cu_seqlens=cu)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)
    refs = {n: [] for n in ("o", "dq", "dk", "dv", "dg")}
    s = 0
    for n in lens:
        if n:
            d = [t.detach()[:, s:s + n].double() for t in (q, k, v)]
            g64 = g.detach()[:, s:s + n].double() if gated else None
            o64, lse64 = reference_forward(*d, g64, W)
            r = reference_backward(do[:, s:s + n].double(), *d, o64, lse64, g64, W)
            for key, val in zip(refs, (o64,) + tuple(r)):
                if val is not None:
                    refs[key].append(val)
        s += n
    errs = {"o": rel_err(o, torch.cat(refs["o"], 1))}
    for nm, a in zip(["dq", "dk", "dv", "dg"], grads):
        errs[nm] = rel_err(a, torch.cat(refs[nm], 1))
    log_gpu_errors(f"{name} {dtype_name}", errs)
    for nm, err in errs.items():
        assert err < TOL[dtype], (nm, err)


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("gqa-W256-ragged", "D96-W300",
                                                              "D64-W333", "W17")],
                         ids=lambda c: c[0])
def test_gpu_knobs_tma_prefetch(case, tma):
    """The config knobs the tuner searches (tensor-descriptor loads, gate prefetch) on odd
    shapes, bf16, every pass."""
    from gfwagen.backends import triton_backend as tb
    from gfwagen.spec import KernelConfig

    name, B, T, Hq, Hkv, D, Dv, W, gated = case
    q, k, v, g = make_inputs(B, T, Hq, Hkv, D, Dv, torch.bfloat16, gated, device="cuda")
    cfg = KernelConfig(128, 64, 8, 3, extra=(("prefetch_gate", True), ("tma", tma)))
    cfg_kv = KernelConfig(64, 128, 8, 2, extra=(("prefetch_gate", True), ("tma", tma)))
    o, lse = tb.forward(q, k, v, g, W, D ** -0.5, cfg)
    do = torch.randn_like(o)
    got = tb.backward(do, q, k, v, o, lse, g, W, D ** -0.5, cfg_kv, cfg)
    d = [t.double() for t in (q, k, v)]
    g64 = g.double() if gated else None
    o64, lse64 = reference_forward(*d, g64, W, D ** -0.5)
    ref = reference_backward(do.double(), *d, o64, lse64, g64, W, D ** -0.5)
    errs = {"o": rel_err(o, o64)}
    for nm, a, e in zip(["dq", "dk", "dv", "dg"], got, ref):
        if e is not None:
            errs[nm] = rel_err(a, e)
    log_gpu_errors(f"knobs-tma={tma} {name} bf16", errs)
    for nm, err in errs.items():
        assert err < 1e-2, (nm, err)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("gqa-W256-ragged", "D64-W333",
                                                              "W17", "causal")],
                         ids=lambda c: c[0])
def test_gpu_forward_maxnreg(case):
    """The forward with its registers capped (the tuner's maxnreg knob) against float64,
    bf16: the cap reaches the launch (a second compile) and changes nothing computed."""
    from gfwagen.backends import triton_backend as tb
    from gfwagen.spec import KernelConfig

    name, B, T, Hq, Hkv, D, Dv, W, gated = case
    q, k, v, g = make_inputs(B, T, Hq, Hkv, D, Dv, torch.bfloat16, gated, device="cuda")
    cfg = KernelConfig(64, 64, 4, 2, extra=(("maxnreg", 128), ("tma", True)))
    o, lse = tb.forward(q, k, v, g, W, D ** -0.5, cfg)
    d = [t.double() for t in (q, k, v)]
    o64, lse64 = reference_forward(*d, g.double() if gated else None, W, D ** -0.5)
    errs = {"o": rel_err(o, o64), "lse": rel_err(lse, lse64)}
    log_gpu_errors(f"maxnreg=128 {name} bf16", errs)
    assert errs["o"] < 1e-2 and errs["lse"] < 5e-3, errs


@pytest.mark.parametrize("mult", [1.0, 30.0, 1e-3])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in (
    "gqa-W256-ragged", "W1", "W>=T", "causal", "D64-W333", "W63-gqa", "W17")],
    ids=lambda c: c[0])
@pytest.mark.parametrize("tile", [(64, 64, 4, 2, (("maxnreg", 128),)), (128, 128, 8, 2, ())],
                         ids=["64x64", "128x128"])
def test_gpu_forward_key_bias(case, mult, tile):
    """The bias_mma knob: the gate as key biases inside the score product (bf16, square
    tiles: S5's and the full-causal head-dim-128 class's), gates x1, x30 and x1e-3, against
    float64; the backward, which reads the gate tables, from its lse."""
    from gfwagen.backends import triton_backend as tb
    from gfwagen.spec import KernelConfig

    name, B, T, Hq, Hkv, D, Dv, W, gated = case
    q, k, v, g = make_inputs(B, T, Hq, Hkv, D, Dv, torch.bfloat16, gated, device="cuda")
    g = g * mult
    bm, bn, warps, stages, extra = tile
    cfg = KernelConfig(bm, bn, warps, stages, extra=(("bias_mma", True), *extra))
    assert tb.reads_key_bias(q, g, D ** -0.5, cfg)
    o, lse = tb.forward(q, k, v, g, W, D ** -0.5, cfg)
    do = torch.randn_like(o)
    got = tb.backward(do, q, k, v, o, lse, g, W, D ** -0.5, KernelConfig(64, 64, 4, 2),
                      KernelConfig(64, 64, 4, 2))
    d = [t.double() for t in (q, k, v)]
    o64, lse64 = reference_forward(*d, g.double(), W, D ** -0.5)
    ref = reference_backward(do.double(), *d, o64, lse64, g.double(), W, D ** -0.5)
    errs = {"o": rel_err(o, o64), "lse": rel_err(lse, lse64)}
    for nm, a, e in zip(["dq", "dk", "dv", "dg"], got, ref):
        errs[nm] = rel_err(a, e)
    log_gpu_errors(f"bias_mma {bm}x{bn} x{mult} {name} bf16", errs)
    assert errs.pop("lse") < 5e-3 and all(err < 1e-2 for err in errs.values()), errs


def test_gpu_op_with_a_bias_mma_forward(monkeypatch):
    """Through gfwagen.attention (autograd) with the forward's config carrying bias_mma, as a
    tuned database gives it: the forward makes the key biases (one launch, no gate tables),
    the backward its own tables; both against float64. The fused key biases match the torch
    ones there."""
    from gfwagen import dispatch
    from gfwagen.gate import key_bias, sanitize_log_gate
    from gfwagen.gate_sums import key_bias_fused
    from gfwagen.spec import KernelConfig

    cfg = KernelConfig(64, 64, 4, 2, extra=(("bias_mma", True),))
    real = dispatch.select_config
    monkeypatch.setattr(dispatch, "select_config", lambda spec, T, dev: (
        cfg if spec.pass_ == "fwd" else real(spec, T, dev)))
    q, k, v, g = make_inputs(2, 1500, 8, 2, 64, 64, torch.bfloat16, True, device="cuda")
    g[0, 100:110, 3] = -float("inf")  # clamped on load, as the gate tables clamp it
    pieces, shifts = key_bias_fused(g, 64, 0.125, torch.bfloat16, bound=128.0)
    ref_p, ref_s = key_bias(sanitize_log_gate(g), 64, 0.125, torch.bfloat16)
    bias, ref_b = pieces.float().sum(-1), ref_p.float().sum(-1)
    assert ((bias - ref_b).abs() <= 1e-5 * ref_b.abs().amax(-1, keepdim=True) + 1e-6).all()
    torch.testing.assert_close(shifts, ref_s, rtol=1e-5, atol=1e-4)
    leaves = [t.requires_grad_() for t in (q, k, v, g)]
    o = gfwagen.attention(q, k, v, g, window=300, backend="triton")
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)
    d = [t.detach().double() for t in (q, k, v)]
    g64 = sanitize_log_gate(g.detach()).double()
    o64, lse64 = reference_forward(*d, g64, 300)
    ref = reference_backward(do.double(), *d, o64, lse64, g64, 300)
    errs = {"o": rel_err(o, o64)}
    for nm, a, e in zip(["dq", "dk", "dv", "dg"], grads, ref):
        errs[nm] = rel_err(a, e)
    log_gpu_errors("op bias_mma D64-W300 bf16", errs)
    assert all(err < 1e-2 for err in errs.values()), errs


STORED_CASES = [c for c in CASES if c[7] is not None and c[7] < c[2]]


@pytest.mark.parametrize("dtype_name", ["bf16", "fp16"])
@pytest.mark.parametrize("case", STORED_CASES, ids=[c[0] for c in STORED_CASES])
def test_gpu_stored_ds_backward_matches_float64(case, dtype_name, monkeypatch):
    """The stored-dS backward (dk/dv keeps dS, dq reads it back) forced for every windowed
    case, whatever the database says, against float64 at the same tolerances."""
    from gfwagen import dispatch
    from gfwagen.heuristics import default_config
    from gfwagen.spec import KernelConfig

    def forced(spec, bucket, device):
        cfg = default_config(spec.replace(pass_="bwd_ds"))
        return KernelConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages,
                            extra=cfg.extra + (("tma", True),))

    monkeypatch.setattr(dispatch, "_stored_choice", forced)
    check_case_against_float64(case, dtype_name, "triton")


WIDE_W = 100


def _wide_slices_reference(q, k, v, g, do, slices, W):
    """The float64 reference on each slice [a, b) of rows, with the W - 1 rows before it as
    keys: exact for rows a..b-1, and, with dO zero outside the slices (which lie more than W
    apart, so that no query of one sees a key of another), for the gradients of rows
    a-W+1..b-1 (dlog_gate's elsewhere sum to zero)."""
    out = []
    for a, b in slices:
        s0 = a - (W - 1)
        d = [t[:, s0:b].double() for t in (q, k, v)]
        g64 = g[:, s0:b].double()
        o64, lse64 = reference_forward(*d, g64, W)
        out.append((s0, a, b, o64[:, W - 1:], reference_backward(
            do[:, s0:b].double(), *d, o64, lse64, g64, W)))
    return out


def _wide_errors(o, grads, refs, W):
    errs = {}
    for s0, a, b, o64, (dq, dk, dv, dg) in refs:
        pairs = {"o": (o[:, a:b], o64), "dq": (grads[0][:, a:b], dq[:, W - 1:]),
                 "dk": (grads[1][:, s0:b], dk), "dv": (grads[2][:, s0:b], dv),
                 "dg": (grads[3][:, s0:b], dg)}
        for nm, (x, e) in pairs.items():
            errs[nm] = max(errs.get(nm, 0.0), rel_err(x, e))
    return errs


@pytest.mark.xdist_group("big_memory")  # tens of GiB: scripts/gpu_check.sh
@pytest.mark.timeout(900)
def test_gpu_batch_entry_past_2_31_elements():
    """A batch entry of more than 2^31 elements (T = 2^18 + 1024 at 64 heads of 128: rows
    past 262144 lie beyond it), contiguous, bf16: the Triton kernels' row offsets are int64
    there (common.wide_offsets); the op on each backend, and the Triton forward's 64x64
    cp.async, tensor-descriptor and key-bias tiles directly; forward and backward, against
    float64 on a slice across the 2^31 boundary and one at the end (session 28: the first GPU
    run of those kernels)."""
    from gfwagen.backends import triton_backend as tb
    from gfwagen.dispatch import tvm_available
    from gfwagen.spec import KernelConfig
    from gfwagen.template_loader import load_template

    B, T, H, D, W = 1, 2**18 + 1024, 64, 128, WIDE_W
    need = 10 * B * T * H * D * 2
    if torch.cuda.mem_get_info()[0] < need + 2**33:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(28)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
               for _ in range(3))
    g = torch.nn.functional.logsigmoid(
        torch.randn(B, T, H, device="cuda", generator=gen) + 3.0)
    assert load_template("triton", "common").wide_offsets(q) and q.numel() >= 2**31
    edge = 2**31 // (H * D)
    slices = [(edge - 150, edge + 150), (T - 300, T)]
    # neither slice's queries see the other's keys (a first draft's did: 12 rows apart)
    assert slices[1][0] - (W - 1) > slices[0][1]
    do = torch.zeros_like(q)
    for a, b in slices:
        do[:, a:b] = torch.randn(B, b - a, H, D, device="cuda", generator=gen)
    refs = _wide_slices_reference(q, k, v, g, do, slices, W)
    scale = D ** -0.5
    runs = {"op triton": "triton", "op auto": "auto",
            "cp.async": KernelConfig(64, 64, 4, 2),
            "tma": KernelConfig(128, 64, 8, 3, extra=(("tma", True),)),
            "key-bias": KernelConfig(64, 64, 4, 2, extra=(("bias_mma", True),))}
    if tvm_available():  # TVM's kernels index in int64 (their shapes are T.int64 vars)
        runs["op tvm"] = "tvm"
    for label, cfg in runs.items():
        if isinstance(cfg, str):
            leaves = [t.requires_grad_() for t in (q, k, v, g)]
            o = gfwagen.attention(q, k, v, g, window=W, backend=cfg)
            grads = torch.autograd.grad(o, leaves, do)
            for t in leaves:
                t.requires_grad_(False)
        else:
            if label == "key-bias":
                assert tb.reads_key_bias(q, g, scale, cfg)
            o, lse = tb.forward(q, k, v, g, W, scale, cfg)
            grads = tb.backward(do, q, k, v, o, lse, g, W, scale, KernelConfig(64, 64, 4, 2),
                                KernelConfig(64, 64, 4, 2))
        assert torch.isfinite(o).all()
        errs = _wide_errors(o, grads, refs, W)
        log_gpu_errors(f"wide-2^31 {label} bf16", errs)
        del o, grads
        assert all(err < 1e-2 for err in errs.values()), (label, errs)


_SIXTEEN_ROW_TILES = """
import torch
from conftest import make_inputs, rel_err
from gfwagen.backends import triton_backend as tb
from gfwagen.reference import reference_backward, reference_forward
from gfwagen.spec import KernelConfig
kv, q, stored = (KernelConfig(*t, extra=(("tma", True), ("q_tma", True)))
                 for t in ((16, 64, 4, 3), (64, 16, 4, 3), (16, 64, 4, 3)))
plain = KernelConfig(64, 64, 4, 2)
x = make_inputs(2, 4096, 4, 4, 64, 64, torch.bfloat16, True, device="cuda", seed=5)
do = torch.randn_like(x[0])
o, lse = tb.forward(*x, 512, 0.125, plain)
d = [t.double() for t in (do, *x)]
ro, rl = reference_forward(*d[1:], 512, 0.125)
ref = reference_backward(d[0], *d[1:4], ro, rl, d[4], 512, 0.125)
for name, run in (("kv", (kv, plain)), ("q", (plain, q)),
                  ("stored", (*tb.stored_configs(stored), None, None, True))):
    got = tb.backward(do, *x[:3], o, lse, x[3], 512, 0.125, *run)
    torch.cuda.synchronize()
    errs = [rel_err(a, r) for a, r in zip(got, ref)]
    print(name, errs)
    assert max(errs) < 1e-2, name
"""


def test_gpu_sixteen_row_tiles_with_tma():
    """16-row tiles with tma in dk/dv, dq and the stored backward (the tuner's space holds
    them): their float32 vectors in 64-byte descriptor boxes faulted with a CUDA misaligned
    address (session 29). A fault poisons the process's CUDA context, so this runs in its
    own."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _SIXTEEN_ROW_TILES], cwd=here,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": path})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
