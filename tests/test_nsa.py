"""gfwagen.nsa: the drop-in for NSA's sliding-window branch."""

import math

import pytest
import torch
from conftest import make_inputs, rel_err

import gfwagen
from gfwagen.nsa import flash_attn_func, gated_sliding_attn


def _plain_sliding_window(q, k, v, window, scale=None):
    """Naive masked softmax, float64: what flash_attn_func(q, k, v, causal=True,
    window_size=(window - 1, 0)) computes (GQA by repeating k and v)."""
    B, T, HQ, D = q.shape
    G = HQ // k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qh = q.double().transpose(1, 2)
    kh = k.double().repeat_interleave(G, dim=2).transpose(1, 2)
    vh = v.double().repeat_interleave(G, dim=2).transpose(1, 2)
    s = scale * qh @ kh.transpose(-1, -2)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    keep = (j <= i) & (j > i - window)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    return (p @ vh).transpose(1, 2)


@pytest.mark.parametrize("HQ,H,W", [(4, 1, 6), (4, 2, 1), (2, 2, 40)])
def test_ungated_equals_plain_sliding_window(HQ, H, W):
    q, k, v, _ = make_inputs(2, 33, HQ, H, 16, 32, torch.float32, False, seed=1)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    o = gated_sliding_attn(q, k, v, None, W)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = _plain_sliding_window(*ref_leaves, W)
    assert o.shape == (2, 33, HQ, 32)
    assert rel_err(o, ref) < 1e-5
    do = torch.randn_like(o)
    for a, e in zip(torch.autograd.grad(o, leaves, do),
                    torch.autograd.grad(ref, ref_leaves, do.double())):
        assert rel_err(a, e) < 1e-5
    # the flash_attn-signature shim, as NSA calls it
    o2 = flash_attn_func(q, k, v, causal=True, window_size=(W - 1, 0))
    assert torch.equal(o2, o)


def test_gated_equals_gfwagen_attention_and_gate_matters():
    q, k, v, g = make_inputs(1, 40, 4, 2, 16, 16, torch.float32, True, seed=2)
    g = g * 5.0  # strong forgetting, so that the gate visibly changes the output
    o = gated_sliding_attn(q, k, v, g, 12)
    assert torch.equal(o, gfwagen.attention(q, k, v, g, window=12))
    assert torch.equal(flash_attn_func(q, k, v, causal=True, window_size=(11, 0), log_gate=g), o)
    assert rel_err(o, _plain_sliding_window(q, k, v, 12)) > 1e-2


def test_shim_window_and_scale_conventions():
    q, k, v, _ = make_inputs(1, 20, 2, 2, 16, 16, torch.float32, False, seed=3)
    full = flash_attn_func(q, k, v, causal=True)  # window_size=(-1, -1): unbounded
    assert rel_err(full, _plain_sliding_window(q, k, v, 20)) < 1e-5
    o = flash_attn_func(q, k, v, softmax_scale=0.3, causal=True, window_size=(4, 0))
    assert rel_err(o, _plain_sliding_window(q, k, v, 5, scale=0.3)) < 1e-5
    with pytest.raises(NotImplementedError, match="causal"):
        flash_attn_func(q, k, v)
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attn_func(q, k, v, dropout_p=0.1, causal=True)
    with pytest.raises(NotImplementedError, match="right window"):
        flash_attn_func(q, k, v, causal=True, window_size=(4, 3))
