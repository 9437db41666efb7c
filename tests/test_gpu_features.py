"""The model features on a CUDA GPU (skipped without one): the fused gate preprocessing, the
decode kernel over the ring cache, the GatedFWA layer (compiled training, cached generation)
and NSA's gated sliding branch, against the same oracles as their CPU tests."""

import pytest
import torch
from conftest import make_inputs, rel_err
from test_decode import _case
from test_gate_preprocess import _inputs, _oracle
from test_nsa import _plain_sliding_window

import gfwagen
from gfwagen.decode import decode_attention
from gfwagen.gate_preprocess import gate_preprocess
from gfwagen.nn import GatedFWA, GatedFWACache
from gfwagen.nsa import gated_sliding_attn

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("B,T,H", [(2, 5000, 16), (1, 300, 3)])
def test_gpu_gate_preprocess(B, T, H):
    h, beta = (t.cuda().requires_grad_() for t in _inputs(B, T, H))
    g, local, base = gate_preprocess(h, beta, return_prefix_sums=True, backend="triton")
    h64, b64 = (t.detach().double().requires_grad_() for t in (h, beta))
    rg, rl, rb = _oracle(h64, b64)
    assert rel_err(g, rg) < 1e-6 and rel_err(local, rl) < 1e-5 and rel_err(base, rb) < 1e-6
    dg, dl = torch.randn_like(g), torch.randn_like(local)
    got = torch.autograd.grad((g, local), (h, beta), (dg, dl))
    exp = torch.autograd.grad((rg, rl), (h64, b64), (dg.double(), dl.double()))
    for a, e in zip(got, exp):
        assert rel_err(a, e) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_matches_reference(dtype):
    W = 256
    args, ref = _case([5, W, 3 * W + 7, 100], 2, 8, 2, 64, W, W, True, dtype)
    args = tuple(a.cuda() if a is not None else None for a in args)
    o = decode_attention(*args, window=W, backend="triton")
    assert rel_err(o, ref.cuda()) < 1e-2


def test_gpu_layer_trains_compiled_and_generates_with_cache():
    torch.manual_seed(0)
    # bf16: the dtype models train in (and Triton's fp32 kernels take a minute to compile)
    layer = GatedFWA(256, 4, num_kv_heads=2, window=64, qk_norm=True).cuda().bfloat16()
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    target = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    step = torch.compile(lambda x: torch.nn.functional.mse_loss(layer(x), target),
                         fullgraph=True)
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = step(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    layer.eval()
    with torch.no_grad():
        full = layer(x)
        cache, outs, s = GatedFWACache(), [], 0
        for n in [100] + [1] * 90 + [7] * 10 + [40]:  # prefill, decode steps (the ring wraps)
            y, cache = layer(x[:, s:s + n], cache)
            outs.append(y)
            s += n
    # the decode kernel and the prefill kernel round differently in bf16
    assert rel_err(torch.cat(outs, 1), full) < 2e-2


def test_gpu_nsa_sliding_branch():
    q, k, v, g = make_inputs(2, 1000, 16, 4, 64, 64, torch.bfloat16, True, device="cuda")
    assert torch.equal(gated_sliding_attn(q, k, v, g, 256),
                       gfwagen.attention(q, k, v, g, window=256))
    plain = gated_sliding_attn(q, k, v, None, 256)
    assert rel_err(plain, _plain_sliding_window(q.cpu(), k.cpu(), v.cpu(), 256)) < 1e-2
