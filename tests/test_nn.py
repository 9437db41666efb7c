"""gfwagen.nn: the GatedFWA layer, its ring-buffer KV cache, torch.compile, and a shortened run
of examples/train_tiny_lm.py (training on the CPU, cached generation == no-cache generation)."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

import gfwagen
from gfwagen.nn import GatedFWA, GatedFWACache, apply_rope, rope_cos_sin
from gfwagen.reference import naive_attention

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: intra-op threads only add overhead, and on a busy 2-core machine they
    # make these tests several times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _load_example():
    spec = importlib.util.spec_from_file_location("train_tiny_lm",
                                                  ROOT / "examples" / "train_tiny_lm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    # backend="reference": the chunked torch kernels, the fastest to start at these sizes
    args = dict(hidden_size=64, num_heads=4, num_kv_heads=2, window=5, qk_norm=True,
                backend="reference")
    args.update(kw)
    layer = GatedFWA(**args)
    with torch.no_grad():  # make the gate data-dependent and strong enough to matter
        if layer.gate_proj is not None:
            layer.gate_proj.weight.normal_(0, 0.3)
            layer.gate_proj.bias.fill_(1.0)
            layer.beta_proj.weight.normal_(0, 0.3)
    return layer


@pytest.mark.parametrize("kw,kv_out", [
    (dict(), 32),                                    # GQA: 2 kv heads of 16
    (dict(num_kv_heads=1), 16),                      # MQA
    (dict(num_kv_heads=None), 64),                   # MHA
    (dict(gate=False, rope=False, qk_norm=False), 32),
    (dict(head_dim=32, window=None), 64),            # head_dim != hidden / heads
])
def test_shapes_and_gqa(kw, kv_out):
    layer = _layer(**kw)
    assert layer.k_proj.out_features == kv_out and layer.v_proj.out_features == kv_out
    x = torch.randn(2, 19, 64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name


def test_layer_is_gfwa_attention_of_its_projections():
    """The layer = o_proj(GatedFWA(rope(norm(q)), rope(norm(k)), v, paper's gate)), checked
    against the O(T^2) formula in float64 with a hand-written gate."""
    layer = _layer().double()
    x = torch.randn(2, 13, 64, dtype=torch.float64)
    B, T, _ = x.shape
    q = layer.q_norm(layer.q_proj(x).view(B, T, 4, 16))
    k = layer.k_norm(layer.k_proj(x).view(B, T, 2, 16))
    v = layer.v_proj(x).view(B, T, 2, 16)
    cos, sin = rope_cos_sin(torch.arange(T), layer.inv_freq)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    beta = 1 + F.elu(layer.beta_proj(x))
    g = F.logsigmoid(beta * layer.gate_proj(x)) / (beta + 1e-3)
    ref = layer.o_proj(naive_attention(q, k, v, g, 5).reshape(B, T, -1))
    with torch.no_grad():
        layer32 = _layer()
    assert rel_err(layer32(x.float()), ref) < 1e-5


def test_rope_is_relative():
    """<rope(q, i), rope(k, j)> depends on i - j only."""
    inv = 10000.0 ** (-torch.arange(0, 16, 2) / 16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def dot(i, j):
        ci, si = rope_cos_sin(torch.tensor([i]), inv)
        cj, sj = rope_cos_sin(torch.tensor([j]), inv)
        return (apply_rope(q, ci, si) * apply_rope(k, cj, sj)).sum().item()

    assert dot(7, 3) == pytest.approx(dot(104, 100), rel=1e-4, abs=1e-5)
    assert dot(7, 3) != pytest.approx(dot(7, 5), rel=1e-3)


def test_initial_gate_is_near_one_and_beta_is_one():
    layer = GatedFWA(64, 4, window=8)
    x = torch.randn(2, 10, 64)
    g = layer.log_gate(x)
    assert g.shape == (2, 10, 4) and g.dtype == torch.float32
    assert (g < 0).all() and (g > -0.05).all()  # sigmoid(4) = 0.982
    assert torch.equal(1 + F.elu(layer.beta_proj(x)), torch.ones(2, 10, 4))
    assert GatedFWA(64, 4, gate_bias_init=0.0).gate_proj.bias.abs().max() == 0  # FoX init


@pytest.mark.parametrize("kw,chunks", [
    (dict(), [7] + [1] * 16),                        # prefill, then decode; the ring wraps
    (dict(), [3, 4, 1, 1, 6, 1, 1]),                 # multi-token steps on a filled cache
    (dict(num_kv_heads=1, window=1), [4] + [1] * 5),
    (dict(window=64), [9] + [1] * 8),                # window longer than everything
    (dict(gate=False, num_kv_heads=4), [6] + [1] * 10),
    (dict(rope=False, qk_norm=False), [1] * 12),     # decode from the first token
])
def test_cache_matches_full_forward(kw, chunks):
    layer = _layer(**kw).eval()
    T = sum(chunks)
    x = torch.randn(2, T, 64)
    with torch.no_grad():
        full = layer(x)
        cache = GatedFWACache()
        outs, s = [], 0
        for n in chunks:
            y, cache = layer(x[:, s:s + n], cache)
            outs.append(y)
            s += n
    got = torch.cat(outs, dim=1)
    assert (got - full).abs().max().item() < 1e-5
    assert cache.seq_len(0) == T
    W = layer.window
    assert cache.layers[0].k.shape[1] == W  # the ring holds `window` positions, no more


def test_cache_matches_full_forward_with_gates_past_the_clamp():
    """log_gate below -128 (h very negative) is clamped by gfwagen.attention; decode too."""
    layer = _layer(window=6).eval()
    with torch.no_grad():
        layer.gate_proj.bias.fill_(-150.0)
        layer.gate_proj.bias[0] = 2.0
        x = torch.randn(1, 12, 64)
        assert layer.log_gate(x).min() < -140
        full = layer(x)
        cache = GatedFWACache()
        y0, _ = layer(x[:, :4], cache)
        ys = [layer(x[:, t:t + 1], cache)[0] for t in range(4, 12)]
    assert (torch.cat([y0] + ys, 1) - full).abs().max().item() < 1e-5


def test_cache_memory_does_not_grow_and_full_causal_needs_max_length():
    layer = _layer(window=4).eval()
    cache = GatedFWACache()
    with torch.no_grad():
        layer(torch.randn(1, 3, 64), cache)
        sizes = set()
        for _ in range(20):
            layer(torch.randn(1, 1, 64), cache)
            sizes.add(cache.nbytes())
    assert len(sizes) == 1
    full = _layer(window=None).eval()
    with pytest.raises(ValueError, match="max_length"):
        full(torch.randn(1, 3, 64), GatedFWACache())
    x = torch.randn(1, 10, 64)
    cache = GatedFWACache(max_length=10)
    with torch.no_grad():
        y0, _ = full(x[:, :6], cache)
        y1 = [full(x[:, t:t + 1], cache)[0] for t in range(6, 10)]
        assert (torch.cat([y0] + y1, 1) - full(x)).abs().max().item() < 1e-5
        with pytest.raises(ValueError, match="cannot hold"):
            full(x[:, :1], cache)


def test_compile_fullgraph_forward_backward():
    layer = _layer()
    x = torch.randn(2, 24, 64, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    gx, *gp = torch.autograd.grad(y.square().sum(), [x] + list(layer.parameters()))
    y_ref = layer(x)
    ex, *ep = torch.autograd.grad(y_ref.square().sum(), [x] + list(layer.parameters()))
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(gx, ex) < 1e-4
    for a, e in zip(gp, ep):
        assert rel_err(a, e) < 1e-4


def test_tiny_lm_trains_and_cached_generation_matches():
    ex = _load_example()
    torch.manual_seed(0)
    model = ex.TinyLM(window=8, backend="reference")
    losses = ex.train(model, steps=30, batch=16, seq_len=32, log=None)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    model.eval()
    prompt = ex.make_batch(3, 6, 32, 4, torch.Generator().manual_seed(5))
    ref = ex.generate_no_cache(model, prompt, 20)
    got, cache = ex.generate_cached(model, prompt, 20, return_cache=True)
    assert torch.equal(got, ref)
    assert cache.seq_len() == 6 + 20 - 1 and cache.layers[0].k.shape[1] == 8  # ring wrapped
    assert gfwagen.attention is not None
