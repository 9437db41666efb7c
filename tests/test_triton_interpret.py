"""The Triton templates under TRITON_INTERPRET=1 (no GPU), tiny shapes, against float64."""

import os

import pytest
import torch
from conftest import make_inputs, rel_err

import gfwagen
from gfwagen.backends import triton_backend
from gfwagen.reference import naive_attention, reference_forward
from gfwagen.spec import KernelConfig

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton interpreter (CPU only)")

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}

CASES = [
    # id, B, T, Hq, Hkv, D, Dv, window, gated, dtype
    ("ragged-T", 2, 37, 2, 2, 16, 16, 8, True, torch.float32),
    ("W=1", 1, 21, 2, 2, 16, 16, 1, True, torch.float32),
    ("W>=T", 1, 30, 2, 2, 16, 16, 64, True, torch.float32),
    ("full-causal", 1, 33, 2, 2, 16, 16, None, True, torch.float32),
    ("gqa", 1, 40, 4, 2, 16, 16, 12, True, torch.float32),
    ("mqa", 1, 35, 4, 1, 16, 16, 20, True, torch.float32),
    ("no-gate", 2, 29, 2, 1, 16, 16, 9, False, torch.float32),
    ("dv!=d", 1, 26, 2, 2, 16, 32, 7, True, torch.float32),
    ("fp16", 1, 45, 2, 2, 16, 16, 13, True, torch.float16),
    ("fp16-gqa-nogate", 1, 34, 4, 2, 32, 32, None, False, torch.float16),
    # Head dims that are not powers of two run padded to the next one (masked columns).
    ("d=96", 1, 30, 2, 2, 96, 96, 9, True, torch.float32),
    ("d=192,dv=96,gqa", 1, 29, 2, 1, 192, 96, 11, True, torch.float32),
]


def _expected(q, k, v, g, window, do):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    gl = g.detach().double().requires_grad_() if g is not None else None
    o = naive_attention(*leaves, gl, window)
    grads = torch.autograd.grad(o, leaves + ([gl] if gl is not None else []), do.double())
    return o, grads


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("scale", [0.0, -0.4, 0.7, 1e-116, -1e-116, 1e-40])
def test_forward_takes_a_scale_of_either_sign(scale, gated):
    """The forward keeps its running maximum in the raw products' units only for a positive
    scale (RAW_MAX in the template): at scale 0 that once made every row NaN (the fuzz test
    found it), and a negative scale would turn the maximum into a minimum. A positive scale
    that fp32 holds as zero did the same on the H200 (session 51); conftest makes the
    interpreter take float arguments as fp32, as the compiled kernel does, so this fails
    here without triton_backend.kernel_scale."""
    q, k, v, g = make_inputs(1, 40, 2, 2, 16, 16, torch.float32, gated)
    q, k = q * 3, k * 3  # scores far from 0, so a max taken the wrong way overflows exp2
    o, lse = triton_backend.forward(q, k, v, g, 7, scale, KernelConfig(16, 16, 4, 1))
    assert rel_err(o, naive_attention(q.double(), k.double(), v.double(),
                                      g.double() if gated else None, 7, scale)) < 1e-5
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_forward_backward_match_float64(case):
    _, B, T, Hq, Hkv, D, Dv, W, gated, dtype = case
    q, k, v, g = make_inputs(B, T, Hq, Hkv, D, Dv, dtype, gated)
    leaves = [t.requires_grad_() for t in (q, k, v)] + ([g.requires_grad_()] if gated else [])
    o = gfwagen.attention(q, k, v, g, window=W, backend="triton")
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)
    o_ref, grads_ref = _expected(q, k, v, g, W, do)
    tol = TOL[dtype]
    assert o.dtype == dtype and o.shape == (B, T, Hq, Dv)
    assert rel_err(o, o_ref) < tol
    for name, a, e in zip(["dq", "dk", "dv", "dlog_gate"], grads, grads_ref):
        assert rel_err(a, e) < tol, name


@pytest.mark.parametrize("bm,bn,prefetch,tma,T", [
    (32, 16, False, False, 70), (16, 32, False, False, 70), (16, 32, True, False, 70),
    (32, 16, True, False, 70), (32, 16, False, True, 70), (16, 32, True, True, 70),
    (32, 16, False, True, 72), (16, 32, True, True, 72), (16, 64, False, False, 70)])
def test_unequal_tiles_gate_prefetch_and_tma(bm, bn, prefetch, tma, T):
    """tma: K/V (forward, dq) and Q/dO (dk/dv) through tensor descriptors, whose zero fill
    past T replaces the masked loads; with T % 4 == 0 the gate, lse and delta vectors too
    (common.vector_descriptor)."""
    q, k, v, g = make_inputs(1, T, 2, 1, 16, 16, torch.float32, True)
    cfg = KernelConfig(block_m=bm, block_n=bn, num_warps=4, num_stages=1,
                       extra=(("prefetch_gate", prefetch), ("tma", tma)))
    o, lse = triton_backend.forward(q, k, v, g, 24, 0.25, cfg)
    o_ref = naive_attention(q.double(), k.double(), v.double(), g.double(), 24, 0.25)
    assert rel_err(o, o_ref) < 1e-5
    do = torch.randn_like(o)
    got = triton_backend.backward(do, q, k, v, o, lse, g, 24, 0.25, cfg, cfg)
    leaves = [t.double().requires_grad_() for t in (q, k, v, g)]
    exp = torch.autograd.grad(naive_attention(*leaves, 24, 0.25), leaves, do.double())
    for name, a, e in zip(["dq", "dk", "dv", "dlog_gate"], got, exp):
        assert rel_err(a, e) < 1e-5, name


def test_register_cap_is_left_to_cuda_launches():
    """A tuned forward config with maxnreg runs under the interpreter (which takes no such
    launch option) and computes what the same config without it does."""
    q, k, v, g = make_inputs(1, 70, 2, 1, 16, 16, torch.float32, True)
    cfg = KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
    capped = KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1,
                          extra=(("maxnreg", 128),))
    o, lse = triton_backend.forward(q, k, v, g, 24, 0.25, cfg)
    o2, lse2 = triton_backend.forward(q, k, v, g, 24, 0.25, capped)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)


KEY_BIAS_CASES = [
    # id, T, Hq, Hkv, window, block, gate scale, dtype
    ("ragged-T", 70, 2, 2, 24, 16, 1.0, torch.float32),
    ("W=1", 40, 2, 2, 1, 16, 1.0, torch.float32),
    ("W>=T", 33, 2, 1, 100, 16, 1.0, torch.float16),
    ("causal", 45, 2, 2, None, 16, 1.0, torch.float32),
    ("gqa-32", 64, 4, 2, 40, 32, 1.0, torch.float16),
    ("strong-gates", 70, 4, 2, 16, 16, 30.0, torch.float32),
    ("weak-gates", 50, 2, 2, 20, 16, 1e-3, torch.float32),
    # several interior tiles: each issues the next one's bias step
    ("interior", 150, 2, 2, 96, 16, 1.0, torch.float32),
]


@pytest.mark.parametrize("case", KEY_BIAS_CASES, ids=[c[0] for c in KEY_BIAS_CASES])
def test_forward_reading_key_biases_matches_float64(case):
    """The forward's KEY_BIAS path (the bias_mma knob): the gate as per-tile key biases added
    by the score product, the running max moved by one shift per tile, c_i from the row's own
    key. The backend takes it for bf16 only, which the interpreter lacks: the template is
    called directly, on fp32 and fp16 pieces."""
    from gfwagen.gate import key_bias
    from gfwagen.template_loader import load_template

    _, T, Hq, Hkv, W, blk, mult, dtype = case
    q, k, v, g = make_inputs(2, T, Hq, Hkv, 16, 16, dtype, True)
    g = g * mult
    o, lse = torch.empty_like(q), torch.empty(2, Hq, T)
    window = triton_backend.kernel_window(W, T)
    load_template("triton", "fwd").launch_forward(
        q, k, v, None, o, lse, window, 0.25, Hq // Hkv, blk, blk, 4, 1, "ieee",
        key_bias=key_bias(g, blk, 0.25, dtype))
    o_ref, lse_ref = reference_forward(q.double(), k.double(), v.double(), g.double(), W, 0.25)
    assert rel_err(o, o_ref) < TOL[dtype]
    # c_i comes back from its key's pieces: fp16's lose more of a strong tile's sum
    assert rel_err(lse, lse_ref) < (1e-5 if dtype == torch.float32 else 1e-4)


def test_key_biases_only_where_the_template_takes_them():
    """reads_key_bias: the knob, a gate, bf16, a positive scale, square tiles (after the fit
    to short sequences), no packed sequences; anything else runs the gate tables."""
    q = torch.zeros(1, 300, 2, 16, dtype=torch.bfloat16)
    g = torch.zeros(1, 300, 2)
    on = KernelConfig(64, 64, 4, 2, extra=(("bias_mma", True),))
    reads = triton_backend.reads_key_bias
    assert reads(q, g, 0.25, on)
    assert not reads(q, None, 0.25, on) and not reads(q, g, -0.25, on)
    assert not reads(q.float(), g, 0.25, on) and not reads(q.half(), g, 0.25, on)
    assert not reads(q, g, 0.25, KernelConfig(64, 64, 4, 2))
    assert not reads(q, g, 0.25, on, segs=(torch.zeros(300), torch.zeros(300)))
    wide = KernelConfig(128, 64, 4, 2, extra=(("bias_mma", True),))
    assert not reads(q, g, 0.25, wide) and reads(q[:, :40], g[:, :40], 0.25, wide)


def test_bias_mma_knob_off_the_key_bias_path_computes_as_without():
    """A tuned config with bias_mma that the forward cannot take that way (fp32 here) runs
    the gate tables and gives the same outputs as the config without the knob."""
    q, k, v, g = make_inputs(1, 70, 2, 1, 16, 16, torch.float32, True)
    plain = KernelConfig(32, 32, 4, 1)
    knob = KernelConfig(32, 32, 4, 1, extra=(("bias_mma", True),))
    o, lse = triton_backend.forward(q, k, v, g, 24, 0.25, plain)
    o2, lse2 = triton_backend.forward(q, k, v, g, 24, 0.25, knob)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)


ONE_BOUND_CASES = [(bm, bn, extra_w, False) for bm, bn in [(16, 16), (32, 16), (16, 32)]
                   for extra_w in (-1, 0, 7, 40)] + [(32, 16, 0, True), (16, 32, 40, True)]


@pytest.mark.parametrize("bm,bn,extra_w,full_masks", ONE_BOUND_CASES)
def test_masked_tiles_with_one_bound_each(bm, bn, extra_w, full_masks):
    """From W = BLOCK_M + BLOCK_N on, each masked tile tests one bound (common.split_bounds):
    just below, at and above that window, with T ragged and several edge tiles per row; and
    the tuner's full_masks knob, which tests both there."""
    from gfwagen.template_loader import load_template

    W = bm + bn + extra_w
    assert load_template("triton", "common").split_bounds(W, bm, bn, False) == (extra_w >= 0)
    q, k, v, g = make_inputs(1, 131, 2, 1, 16, 16, torch.float32, True)
    cfg = KernelConfig(block_m=bm, block_n=bn, num_warps=4, num_stages=1,
                       extra=(("full_masks", full_masks),))
    o, lse = triton_backend.forward(q, k, v, g, W, 0.25, cfg)
    do = torch.randn_like(o)
    got = triton_backend.backward(do, q, k, v, o, lse, g, W, 0.25, cfg, cfg)
    leaves = [t.double().requires_grad_() for t in (q, k, v, g)]
    o_ref = naive_attention(*leaves, W, 0.25)
    exp = torch.autograd.grad(o_ref, leaves, do.double())
    assert rel_err(o, o_ref) < 1e-5
    for name, a, e in zip(["dq", "dk", "dv", "dlog_gate"], got, exp):
        assert rel_err(a, e) < 1e-5, name


def test_transposed_views_need_no_copy_and_match():
    # [B, H, T, D] storage viewed as [B, T, H, D]: strides pass straight to the kernel.
    q, k, v, g = make_inputs(1, 24, 2, 2, 16, 16, torch.float32, True)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    o = gfwagen.attention(qt, kt, vt, g, window=5, backend="triton")
    o_ref = naive_attention(q.double(), k.double(), v.double(), g.double(), 5)
    assert rel_err(o, o_ref) < 1e-5


@pytest.mark.parametrize("cu", [None, [0, 17, 17, 40]])
def test_eager_backward_reuses_the_forwards_gate_tables(monkeypatch, cu):
    """The eager path hands its forward's gate tables to its backward (ops.EagerAttention,
    dispatch.Kept): one table build per forward+backward where the op builds two, and the
    same outputs and gradients bit for bit; a second backward (retain_graph) reuses them too."""
    calls = []
    build = triton_backend.gate_tables

    def counted(log_gate):
        calls.append(log_gate is not None)
        return build(log_gate)

    monkeypatch.setattr(triton_backend, "gate_tables", counted)
    B = 1 if cu else 2
    q, k, v, g = make_inputs(B, 40, 4, 2, 16, 16, torch.float32, True)
    cu_t = torch.tensor(cu, dtype=torch.int32) if cu else None

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
        o = fn(*leaves)
        do = torch.randn_like(o, generator=torch.Generator().manual_seed(1))
        first = torch.autograd.grad(o, leaves, do, retain_graph=True)
        again = torch.autograd.grad(o, leaves, do)
        return o, first, again

    calls.clear()
    eager = run(lambda q, k, v, g: gfwagen.attention(q, k, v, g, window=9, backend="triton",
                                                     cu_seqlens=cu_t))
    assert type(eager[0].grad_fn).__name__ == "EagerAttentionBackward"
    assert calls == [True]
    calls.clear()
    op = run(lambda q, k, v, g: torch.ops.gfwa.attention(q, k, v, g, 9, None, "triton", cu_t))
    assert calls == [True, True, True]  # forward, then each backward
    assert torch.equal(eager[0], op[0])
    for a, b in zip(eager[1] + eager[2], op[1] + op[2], strict=True):
        assert torch.equal(a, b)
    ref = naive_attention(*(t.double() for t in (q, k, v, g)), 9) if cu is None else None
    if ref is not None:
        assert rel_err(eager[0], ref) < 1e-5


STORED_CASES = [
    # id, B, T, Hq, Hkv, D, Dv, window, gated, dtype, (kv bm, bn), (q bm, bn), tma
    ("ragged-T", 2, 37, 2, 2, 16, 16, 8, True, torch.float32, (16, 16), (16, 16), False),
    ("W=1", 1, 21, 2, 2, 16, 16, 1, True, torch.float32, (16, 16), (16, 16), False),
    ("unequal-tiles", 1, 70, 2, 1, 16, 16, 24, True, torch.float32, (32, 16), (16, 32), False),
    ("tiles-swapped", 1, 70, 2, 1, 16, 16, 24, True, torch.float32, (16, 32), (32, 16), True),
    ("many-slots", 1, 131, 2, 2, 16, 16, 83, True, torch.float32, (16, 16), (32, 16), True),
    # 32-query tiles: the lse, delta and gate vectors through descriptors too (16-row tiles
    # take them as loads: common.VECTOR_TMA_MIN_BLOCK)
    ("vector-tma", 1, 72, 2, 1, 16, 16, 24, True, torch.float32, (32, 16), (16, 32), True),
    ("gqa", 1, 40, 4, 2, 16, 16, 12, True, torch.float32, (16, 16), (16, 16), False),
    ("no-gate", 2, 29, 2, 1, 16, 16, 9, False, torch.float32, (16, 16), (16, 16), False),
    ("dv!=d", 1, 26, 2, 2, 16, 32, 7, True, torch.float32, (16, 16), (16, 16), False),
    ("fp16", 1, 45, 2, 2, 16, 16, 13, True, torch.float16, (16, 16), (32, 16), False),
    ("d=96", 1, 30, 2, 2, 96, 96, 9, True, torch.float32, (16, 16), (16, 16), False),
]


@pytest.mark.parametrize("case", STORED_CASES, ids=[c[0] for c in STORED_CASES])
def test_stored_ds_backward_matches_float64(case):
    """The stored-dS backward (dk/dv keeps dS in blocks, dq reads them) against float64, the
    blocks filled with NaN first: a block dq reads that dk/dv did not write poisons the
    result. The dq pass runs on dk/dv's tiles whatever its config says (its q tiles)."""
    _, B, T, Hq, Hkv, D, Dv, W, gated, dtype, kv_tiles, q_tiles, tma = case
    q, k, v, g = make_inputs(B, T, Hq, Hkv, D, Dv, dtype, gated)
    cfg_fwd = KernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    o, lse = triton_backend.forward(q, k, v, g, W, 0.3, cfg_fwd)
    do = torch.randn_like(o)
    extra = (("tma", tma),)
    cfg_kv = KernelConfig(block_m=kv_tiles[0], block_n=kv_tiles[1], num_warps=4, num_stages=1,
                          extra=extra)
    cfg_q = KernelConfig(block_m=q_tiles[0], block_n=q_tiles[1], num_warps=4, num_stages=1,
                         extra=extra)
    assert triton_backend.stored_ds_usable(q, W, None, cfg_kv)
    st = triton_backend.prepare_backward(do, q, k, v, o, lse, g, W, 0.3)
    triton_backend.attach_stored_ds(st, cfg_kv)
    st.stored.blocks.fill_(float("nan"))
    triton_backend.backward_kv(st, cfg_kv)
    triton_backend.backward_q_stored(st, cfg_q)
    got = [st.dq, st.dk, st.dv]
    if gated:
        got.append(triton_backend.gate_sums.gate_grad(st.row_sums, st.col_sums, None))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    gl = [g.double().requires_grad_()] if gated else []
    exp = torch.autograd.grad(naive_attention(*leaves, *(gl or [None]), W, 0.3),
                              leaves + gl, do.double())
    for name, a, e in zip(["dq", "dk", "dv", "dlog_gate"], got, exp):
        assert rel_err(a, e) < TOL[dtype], name
    # the whole backward in that mode gives the same, and the same as recomputing dq
    whole = triton_backend.backward(do, q, k, v, o, lse, g, W, 0.3, cfg_kv, cfg_q, stored=True)
    recompute = triton_backend.backward(do, q, k, v, o, lse, g, W, 0.3, cfg_kv, cfg_q)
    for a, b, c in zip(got, whole, recompute):
        assert torch.equal(a, b)
        assert rel_err(a, c) < TOL[dtype]


def test_stored_ds_only_where_it_fits(monkeypatch):
    """No band for full causal attention (W >= T), packed sequences, or past the limit."""
    q, k, v, g = make_inputs(1, 64, 2, 2, 16, 16, torch.float32, True)
    cfg = KernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    assert triton_backend.stored_ds_usable(q, 16, None, cfg)
    assert not triton_backend.stored_ds_usable(q, 64, None, cfg)
    assert not triton_backend.stored_ds_usable(q, None, None, cfg)
    assert not triton_backend.stored_ds_usable(q, 16, (object(), object()), cfg)
    monkeypatch.setenv("GFWAGEN_STORED_DS_MAX_MB", "0.001")
    assert not triton_backend.stored_ds_usable(q, 16, None, cfg)
    monkeypatch.setenv("GFWAGEN_STORED_DS_MAX_MB", "1")
    assert triton_backend.stored_ds_usable(q, 16, None, cfg)
    monkeypatch.setenv("GFWAGEN_STORED_DS_MAX_MB", "lots")
    with pytest.raises(ValueError, match="GFWAGEN_STORED_DS_MAX_MB"):
        triton_backend.stored_ds_usable(q, 16, None, cfg)


def test_stored_ds_out_of_memory_falls_back_to_recomputing(monkeypatch):
    """Where the dS buffer does not fit next to the caller's tensors, the op's backward warns
    once, recomputes (same gradients as asking for that directly), and does not try a
    buffer as large again on that device; a smaller one still may."""
    q, k, v, g = make_inputs(1, 64, 2, 2, 16, 16, torch.float32, True)
    cfg = KernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    o, lse = triton_backend.forward(q, k, v, g, 16, 0.25, cfg)
    do = torch.randn_like(o)
    tried = []
    real = triton_backend.attach_stored_ds

    def no_room(st, cfg_kv):
        tried.append(st.q.shape)
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(triton_backend, "_stored_ds_oom", {})
    monkeypatch.setattr(triton_backend, "attach_stored_ds", no_room)
    with pytest.warns(RuntimeWarning, match="did not fit"):
        got = triton_backend.backward_preferring_stored(do, q, k, v, o, lse, g, 16, 0.25, cfg,
                                                        cfg, cfg)
    want = triton_backend.backward(do, q, k, v, o, lse, g, 16, 0.25, cfg, cfg)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert len(tried) == 1 and not triton_backend.stored_ds_usable(q, 16, None, cfg)
    triton_backend.backward_preferring_stored(do, q, k, v, o, lse, g, 16, 0.25, cfg, cfg, cfg)
    assert len(tried) == 1  # not tried again at that size
    monkeypatch.setattr(triton_backend, "attach_stored_ds", real)
    assert triton_backend.stored_ds_usable(q[:, :32], 16, None, cfg)  # a smaller buffer: allowed


def test_offsets_past_2_31_elements_of_a_batch_entry():
    """A batch entry whose rows pass 2^31 elements (a long sequence of many heads: T = 2^20
    at 32 heads of 128): q, k, v and dO as views of one storage with a 2^25-element row
    stride, so rows 64 on lie past 2^31 (about 10 GB reserved, a few pages touched). The
    kernels' int32 row offsets wrapped there (a segfault under the interpreter, a wild read on
    a GPU); common.wide_offsets makes them int64, forward and backward."""
    from gfwagen.template_loader import load_template

    T, D, W, stride = 80, 16, 24, 2**25
    try:
        store = torch.empty(T * stride, dtype=torch.float32)
    except RuntimeError as e:  # an address space too small to reserve it
        pytest.skip(f"could not reserve {T * stride * 4 / 2**30:.0f} GiB: {e}")
    q, k, v, do = (store.as_strided((1, T, 1, D), (T * stride, stride, D, 1), i * D)
                   for i in range(4))
    for x in (q, k, v, do):
        x.copy_(torch.randn(1, T, 1, D))
    assert load_template("triton", "common").wide_offsets(q)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, 1) + 3)
    cfg = KernelConfig(16, 16, 4, 1)
    o, lse = triton_backend.forward(q, k, v, g, W, 0.25, cfg)
    got = triton_backend.backward(do, q, k, v, o, lse, g, W, 0.25, cfg, cfg)
    leaves = [t.double().contiguous().requires_grad_() for t in (q, k, v, g)]
    o_ref = naive_attention(*leaves, W, 0.25)
    assert rel_err(o, o_ref) < 1e-5
    exp = torch.autograd.grad(o_ref, leaves, do.double())
    for name, a, e in zip(["dq", "dk", "dv", "dlog_gate"], got, exp):
        assert rel_err(a, e) < 1e-5, name


@pytest.mark.parametrize("gated", [True, False])
def test_batches_past_the_grid_run_in_slices(monkeypatch, gated):
    """More batch entries than a launch's grid takes (65535: the kernels put batches on z)
    run in slices (gfwagen.dispatch), forward and backward, as one call would."""
    q, k, v, g = make_inputs(5, 20, 2, 1, 16, 16, torch.float32, gated)
    do = torch.randn_like(q)

    def run():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)] + (
            [g.detach().requires_grad_()] if gated else [])
        o = gfwagen.attention(*leaves[:3], leaves[3] if gated else None, window=7,
                              backend="triton")
        return [o, *torch.autograd.grad(o, leaves, do)]

    whole = run()
    batches = []

    def counting(f):
        def counted(*args, **kw):
            batches.append(args[0].shape[0])  # q, or dO
            return f(*args, **kw)
        return counted

    for name in ("forward", "backward_preferring_stored"):
        monkeypatch.setattr(triton_backend, name, counting(getattr(triton_backend, name)))
    monkeypatch.setattr(triton_backend, "GRID_BATCH_MAX", 2)
    sliced = run()
    assert batches == [2, 2, 1, 2, 2, 1]
    for name, a, b in zip(["o", "dq", "dk", "dv", "dlog_gate"], sliced, whole):
        assert torch.equal(a, b), name
