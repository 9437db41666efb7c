"""The paper's gate with fused preprocessing: torch.ops.gfwa.gate_preprocess on both backends
(the Triton template under TRITON_INTERPRET=1 when there is no GPU) against float64 autograd of
the formula and of the chunked prefix sums."""

import os

import pytest
import torch
from conftest import rel_err
from torch.library import opcheck

from gfwagen.gate import _LOG2E, GATE_CHUNK
from gfwagen.gate_preprocess import gate_log_reference, gate_preprocess

interp_or_gpu = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton needs a GPU or the interpreter")
BACKENDS = [pytest.param("torch"), pytest.param("triton", marks=interp_or_gpu)]


def _inputs(B, T, H, dtype=torch.float32, seed=0, h_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, H, generator=g) * h_scale + 2.0).to(dtype)
    beta = (1.0 + torch.nn.functional.elu(torch.randn(B, T, H, generator=g))).to(dtype)
    return h, beta


def _oracle(h64, beta64):
    """float64, differentiable: log_gate, and the chunked prefix sums in log2 units."""
    g = gate_log_reference(h64, beta64)
    c = torch.cumsum(g.transpose(1, 2), dim=-1) * _LOG2E  # B,H,T
    T = c.shape[-1]
    starts = torch.arange(0, T, GATE_CHUNK)
    base = torch.cat([c.new_zeros(c.shape[:-1] + (1,)), c[..., starts[1:] - 1]], dim=-1)
    local = c - base.repeat_interleave(GATE_CHUNK, dim=-1)[..., :T]
    return g, local, base


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,H", [(2, 37, 3), (1, 600, 5), (1, 256, 20)])
def test_forward_and_backward_match_float64(backend, B, T, H):
    h, beta = _inputs(B, T, H)
    h.requires_grad_()
    beta.requires_grad_()
    g, local, base = gate_preprocess(h, beta, return_prefix_sums=True, backend=backend)
    assert g.dtype == torch.float32 and g.shape == (B, T, H)
    assert local.dtype == torch.float32 and local.shape == (B, H, T)
    nchunk = -(-T // GATE_CHUNK)
    assert base.dtype == torch.float64 and base.shape == (B, H, nchunk)

    h64, b64 = (t.detach().double().requires_grad_() for t in (h, beta))
    rg, rl, rb = _oracle(h64, b64)
    assert rel_err(g, rg) < 1e-6
    assert rel_err(local, rl) < 1e-5
    assert rel_err(base, rb) < 1e-6

    # Gradients through all three outputs at once, then through log_gate alone.
    dg, dl, db = torch.randn_like(g), torch.randn_like(local), torch.randn_like(base)
    got = torch.autograd.grad((g, local, base), (h, beta), (dg, dl, db), retain_graph=True)
    exp = torch.autograd.grad((rg, rl, rb), (h64, b64), (dg.double(), dl.double(), db),
                              retain_graph=True)
    for name, a, e in zip(("dh", "dbeta"), got, exp):
        assert rel_err(a, e) < 1e-5, name
    got = torch.autograd.grad(g, (h, beta), dg)
    exp = torch.autograd.grad(rg, (h64, b64), dg.double())
    for name, a, e in zip(("dh", "dbeta"), got, exp):
        assert rel_err(a, e) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_style_directional_derivatives(backend):
    """<dh, v> and <dbeta, u> from the op against central differences of the float64 formula
    (torch.autograd.gradcheck itself needs float64 arithmetic inside; the op's is float32)."""
    h, beta = _inputs(2, 45, 4, seed=3)
    h.requires_grad_()
    beta.requires_grad_()
    w = torch.randn(2, 45, 4, dtype=torch.float64)
    dh, dbeta = torch.autograd.grad(gate_preprocess(h, beta, backend=backend), (h, beta),
                                    w.float())
    f = lambda hh, bb: (gate_log_reference(hh, bb) * w).sum().item()
    h64, b64 = h.detach().double(), beta.detach().double()
    eps = 1e-6
    for grad, perturb in ((dh, lambda d: (h64 + d, b64)), (dbeta, lambda d: (h64, b64 + d))):
        for seed in range(3):
            d = torch.randn(h64.shape, generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64)
            fd = (f(*perturb(eps * d)) - f(*perturb(-eps * d))) / (2 * eps)
            an = (grad.double() * d).sum().item()
            assert abs(an - fd) <= 1e-5 * max(1.0, abs(fd)), (an, fd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_accurate_and_finite(backend):
    """Gates within 1e-9 of 1 keep their relative accuracy (no log(1 + tiny) = 0), gates near 0
    stay finite, and beta near 0 is fine thanks to eps."""
    h = torch.tensor([[[25.0, -40.0, 0.0, 12.0, -3.0, 80.0]]])
    beta = torch.tensor([[[1.0, 1.0, 1e-6, 2.0, 0.3, 0.5]]])
    h.requires_grad_()
    beta.requires_grad_()
    g = gate_preprocess(h, beta, backend=backend)
    h64, b64 = (t.detach().double().requires_grad_() for t in (h, beta))
    r = gate_log_reference(h64, b64)
    assert ((g.double() - r).abs() / r.abs()).max().item() < 1e-5
    got = torch.autograd.grad(g.sum(), (h, beta))
    exp = torch.autograd.grad(r.sum(), (h64, b64))
    for a, e in zip(got, exp):
        assert torch.isfinite(a).all()
        assert ((a.double() - e).abs() <= 1e-5 * e.abs() + 1e-12).all(), (a, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_inputs_give_float32_gate_and_input_dtype_grads(backend):
    h, beta = _inputs(1, 40, 4, dtype=torch.bfloat16)
    h.requires_grad_()
    beta.requires_grad_()
    g = gate_preprocess(h, beta, backend=backend)
    assert g.dtype == torch.float32
    rg = gate_log_reference(h.detach().double(), beta.detach().double())
    assert rel_err(g, rg) < 1e-6
    dh, dbeta = torch.autograd.grad(g.sum(), (h, beta))
    assert dh.dtype == torch.bfloat16 and dbeta.dtype == torch.bfloat16


def test_triton_and_torch_backends_agree_on_cpu():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter")
    h, beta = _inputs(2, 300, 6, seed=7)
    a = gate_preprocess(h, beta, return_prefix_sums=True, backend="torch")
    b = gate_preprocess(h, beta, return_prefix_sums=True, backend="triton")
    for x, y in zip(a, b):
        assert rel_err(x, y) < 1e-5


def test_prefix_sums_feed_the_attention_identically():
    """c from the fused pass equals what the attention kernels compute from log_gate."""
    from gfwagen.gate import chunked_prefix_sums

    h, beta = _inputs(1, 513, 2)
    g, local, base = gate_preprocess(h, beta, return_prefix_sums=True)
    l2, b2 = chunked_prefix_sums(g)
    assert rel_err(local, l2) < 1e-5
    assert rel_err(base, b2) < 1e-9


def test_opcheck_and_compile():
    h, beta = _inputs(1, 20, 3)
    h.requires_grad_()
    beta.requires_grad_()
    for with_prefix in (False, True):
        opcheck(torch.ops.gfwa.gate_preprocess.default, (h, beta, 1e-3, with_prefix, "torch"))
    torch._dynamo.reset()
    f = torch.compile(lambda a, b: gate_preprocess(a, b).exp().sum(), fullgraph=True,
                      backend="aot_eager")
    got = torch.autograd.grad(f(h, beta), (h, beta))
    exp = torch.autograd.grad(gate_preprocess(h, beta).exp().sum(), (h, beta))
    for a, e in zip(got, exp):
        assert rel_err(a, e) < 1e-6


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(h=torch.randn(2, 3)), ValueError, "h must be 3-D"),
    (dict(beta=torch.rand(1, 4, 3)), ValueError, "same shape"),
    (dict(h=torch.ones(1, 4, 2, dtype=torch.long)), TypeError, "floating-point"),
    (dict(eps=0.0), ValueError, "eps must be > 0"),
    (dict(backend="tvm"), ValueError, "backend must be one of"),
])
def test_input_errors(kwargs, exc, words):
    args = dict(h=torch.randn(1, 4, 2), beta=torch.rand(1, 4, 2) + 0.5)
    args.update(kwargs)
    h, beta = args.pop("h"), args.pop("beta")
    with pytest.raises(exc, match=words):
        gate_preprocess(h, beta, **args)
