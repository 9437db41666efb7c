"""Packed variable-length batches (cu_seqlens) on every backend against an independent
oracle: the float64 naive formula run on each sequence alone and concatenated, so the window
and the gate restart at each boundary by construction rather than by the code under test."""

import pytest
import torch
from conftest import make_inputs, rel_err

from gfwagen import attention, naive_attention
from gfwagen.dispatch import tvm_available

BACKENDS = ["triton", "reference"] + (["tvm"] if tvm_available() else [])


def per_sequence_oracle(q, k, v, g, window, lens, scale=None):
    """o (float64, differentiable in the returned leaves), sequence by sequence."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None
              for t in (q, k, v, g)]
    outs, s = [], 0
    for n in lens:
        sl = [t[:, s:s + n] if t is not None else None for t in leaves]
        if n:
            outs.append(naive_attention(*sl, window=window, scale=scale))
        s += n
    return torch.cat(outs, 1), leaves


def run_case(backend, lens, Hq, Hkv, D, window, gated, dtype=torch.float32):
    T = sum(lens)
    q, k, v, g = make_inputs(1, T, Hq, Hkv, D, D, dtype, gated)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    xs = [t.clone().requires_grad_() if t is not None else None for t in (q, k, v, g)]
    o = attention(*xs, window=window, backend=backend, cu_seqlens=cu)
    ref, leaves = per_sequence_oracle(q, k, v, g, window, lens)
    do = torch.randn_like(ref)
    o.backward(do.to(o.dtype))
    ref.backward(do)
    errs = {"o": rel_err(o, ref)}
    for name, x, leaf in zip(("dq", "dk", "dv", "dg"), xs, leaves):
        if x is not None:
            errs[name] = rel_err(x.grad, leaf.grad)
    return errs


CASES = [
    # lens, Hq, Hkv, D, window: boundaries inside tiles, a one-token and an empty sequence,
    # W = 1, W larger than every sequence, full causal, GQA
    ([37, 1, 50, 0, 22], 2, 2, 16, 8),
    ([37, 1, 50, 0, 22], 2, 1, 16, 200),
    ([16, 16, 33], 4, 2, 32, None),
    ([5, 60, 3], 2, 2, 16, 1),
    ([70], 2, 2, 16, 24),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lens,Hq,Hkv,D,window", CASES)
@pytest.mark.parametrize("gated", [True, False])
def test_varlen_matches_per_sequence(backend, lens, Hq, Hkv, D, window, gated):
    errs = run_case(backend, lens, Hq, Hkv, D, window, gated)
    assert max(errs.values()) < 2e-5, errs


def test_varlen_gate_gradient_restarts():
    """The gate at a sequence's first position enters no pair of its own sequence: its
    gradient is exactly zero, not the rounding residue of the sequences after it."""
    lens = [20, 30, 14]
    q, k, v, g = make_inputs(1, sum(lens), 2, 2, 16, 16, torch.float32, True)
    g.requires_grad_()
    cu = torch.tensor([0, 20, 50, 64], dtype=torch.int32)
    attention(q, k, v, g, window=16, backend="triton", cu_seqlens=cu).sum().backward()
    assert torch.all(g.grad[0, [0, 20, 50]] == 0)


def test_varlen_fp16_triton():
    errs = run_case("triton", [19, 40, 5], 2, 2, 32, 12, True, torch.float16)
    assert max(errs.values()) < 5e-3, errs


@pytest.mark.parametrize("cu,match", [
    (torch.tensor([0, 5, 3, 10]), "never decrease"),
    (torch.tensor([1, 10]), "start at 0"),
    (torch.tensor([0, 9]), "end at T"),
])
def test_cu_seqlens_values_rejected(cu, match):
    q, k, v, g = make_inputs(1, 10, 2, 2, 16, 16, torch.float32, True)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, g, window=4, cu_seqlens=cu)


@pytest.mark.parametrize("cu,exc,match", [
    (torch.tensor([0.0, 10.0]), TypeError, "int32 or int64"),
    (torch.tensor([[0, 10]]), ValueError, "1-D"),
    (torch.tensor([0]), ValueError, "at least 2"),
    ([0, 10], TypeError, "torch.Tensor"),
])
def test_cu_seqlens_rejected(cu, exc, match):
    q, k, v, g = make_inputs(1, 10, 2, 2, 16, 16, torch.float32, True)
    with pytest.raises(exc, match=match):
        attention(q, k, v, g, window=4, cu_seqlens=cu)


def test_cu_seqlens_needs_batch_one():
    q, k, v, g = make_inputs(2, 10, 2, 2, 16, 16, torch.float32, True)
    with pytest.raises(ValueError, match="batch must be 1"):
        attention(q, k, v, g, window=4, cu_seqlens=torch.tensor([0, 10]))


def test_malformed_cu_seqlens_stays_in_bounds():
    """Unchecked values (as on CUDA by default) are clamped per position: each row keeps its
    own key and nothing reads outside [0, T)."""
    from gfwagen.varlen import segment_bounds

    start, end = segment_bounds(torch.tensor([3, -5, 40, 2]), 10)
    t = torch.arange(10)
    assert torch.all((start >= 0) & (start <= t) & (end > t) & (end <= 10))


def test_varlen_compiles_fullgraph():
    q, k, v, g = make_inputs(1, 40, 2, 2, 16, 16, torch.float32, True)
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    f = torch.compile(lambda *a: torch.ops.gfwa.attention(*a, 8, None, "reference", cu),
                      fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(q, k, v, g), attention(q, k, v, g, window=8,
                                                        backend="reference", cu_seqlens=cu))


def test_layer_packed_equals_separate():
    """GatedFWA on a packed batch equals the layer on each sequence alone (RoPE positions,
    window and gate all restart)."""
    from gfwagen.nn import GatedFWA

    torch.manual_seed(0)
    layer = GatedFWA(64, 4, num_kv_heads=2, window=8, backend="reference")
    lens = [11, 1, 20]
    xs = [torch.randn(1, n, 64) for n in lens]
    cu = torch.tensor([0, 11, 12, 32])
    packed = layer(torch.cat(xs, 1), cu_seqlens=cu)
    separate = torch.cat([layer(x) for x in xs], 1)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tma,prefetch", [(True, False), (True, True), (False, True)])
def test_varlen_with_template_knobs(tma, prefetch):
    """Packed sequences through configs a tuned database may hold (tensor-descriptor loads,
    gate prefetch, unequal tiles), against the per-sequence oracle."""
    from gfwagen.backends import triton_backend as tb
    from gfwagen.spec import KernelConfig
    from gfwagen.varlen import segment_bounds

    lens = [37, 1, 50, 0, 22]
    T = sum(lens)
    q, k, v, g = make_inputs(1, T, 4, 2, 16, 16, torch.float32, True)
    cu = torch.tensor([0, 37, 38, 88, 88, 110], dtype=torch.int32)
    segs = segment_bounds(cu, T)
    extra = (("prefetch_gate", prefetch), ("tma", tma))
    cfg_a = KernelConfig(32, 16, 4, 1, extra=extra)
    cfg_b = KernelConfig(16, 32, 4, 1, extra=extra)
    o, lse = tb.forward(q, k, v, g, 9, 0.25, cfg_a, segs)
    do = torch.randn_like(o)
    got = tb.backward(do, q, k, v, o, lse, g, 9, 0.25, cfg_b, cfg_a, segs)
    ref, leaves = per_sequence_oracle(q, k, v, g, 9, lens, scale=0.25)
    assert rel_err(o, ref) < 1e-5
    exp = torch.autograd.grad(ref, leaves, do.double())
    for name, a, e in zip(("dq", "dk", "dv", "dg"), got, exp):
        assert rel_err(a, e) < 1e-5, name
