"""The chunked reference (the CPU kernel) against the plain O(T^2) formula, in float64."""

import pytest
import torch
from conftest import make_inputs, rel_err

from gfwagen.reference import naive_attention, reference_backward, reference_forward

CASES = [
    # B, T, Hq, Hkv, D, Dv, window, gated, chunk
    (2, 37, 4, 2, 8, 8, 5, True, 7),
    (1, 50, 3, 1, 16, 8, None, True, 16),
    (1, 20, 2, 2, 4, 4, 1, False, 8),
    (2, 33, 4, 4, 8, 8, 100, True, 128),
    (1, 64, 2, 2, 8, 8, 64, True, 16),
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,Dv,W,gated,chunk", CASES)
def test_chunked_reference_matches_naive(B, T, Hq, Hkv, D, Dv, W, gated, chunk):
    q, k, v, g = make_inputs(B, T, Hq, Hkv, D, Dv, torch.float64, gated)
    if g is not None:
        g = g.double().requires_grad_()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = naive_attention(q, k, v, g, W)
    do = torch.randn_like(o)
    inputs = [q, k, v] + ([g] if gated else [])
    expected = torch.autograd.grad(o, inputs, do)
    o2, lse = reference_forward(q, k, v, g, W, chunk=chunk)
    assert rel_err(o2, o) < 1e-12
    got = reference_backward(do, q, k, v, o2, lse, g, W, chunk=chunk)
    for name, a, e in zip("q k v g".split(), got, expected):
        assert rel_err(a, e) < 1e-12, name
    if not gated:
        assert got[3] is None


def test_lse_is_log_sum_exp_of_window_logits():
    q, k, v, g = make_inputs(1, 9, 1, 1, 4, 4, torch.float64, True)
    _, lse = reference_forward(q, k, v, g, window=3)
    c = torch.cumsum(g[0, :, 0].double(), 0)
    i = 6
    js = range(i - 2, i + 1)
    s = torch.stack([q[0, i, 0] @ k[0, j, 0] / 2.0 + c[i] - c[j] for j in js])
    assert torch.allclose(lse[0, 0, i], torch.logsumexp(s, 0))


def test_window_one_is_identity_on_v():
    q, k, v, g = make_inputs(2, 11, 2, 2, 8, 8, torch.float64, True)
    o, _ = reference_forward(q, k, v, g, window=1)
    assert torch.allclose(o, v)


def test_gate_bias_is_not_scaled():
    # With q = 0 the logits are the gate bias alone: o_i = sum_j softmax(c_i - c_j) v_j.
    q, k, v, g = make_inputs(1, 6, 1, 1, 4, 4, torch.float64, True)
    q.zero_()
    o, _ = reference_forward(q, k, v, g, window=None, scale=10.0)
    c = torch.cumsum(g[0, :, 0].double(), 0)
    w = torch.softmax(c[5] - c[:6], 0)
    assert torch.allclose(o[0, 5, 0], (w[:, None] * v[0, :6, 0]).sum(0))


def test_long_sequence_gate_keeps_precision():
    # |c| ~ 1e4 after 1e5 tokens: differences of float32 prefix sums would lose ~1e-3.
    T = 100_000
    q, k, v, _ = make_inputs(1, T, 1, 1, 4, 4, torch.float32, False)
    g = torch.full((1, T, 1), -0.1)
    o, _ = reference_forward(q, k, v, g, window=16, chunk=4096)
    sl = slice(T - 40, T)
    o64, _ = reference_forward(q[:, sl].double(), k[:, sl].double(), v[:, sl].double(),
                               g[:, sl].double(), window=16)
    assert rel_err(o[:, -20:], o64[:, -20:]) < 1e-5
