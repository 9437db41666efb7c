"""torch.ops.gfwa: correctness of the CPU path, opcheck, torch.compile and input validation."""

import pytest
import torch
from conftest import make_inputs, rel_err
from torch.library import opcheck

import gfwagen
from gfwagen.reference import naive_attention


@pytest.mark.parametrize("W,gated,Hkv",
                         [(7, True, 2), (None, True, 1), (1, False, 4), (50, True, 4)])
def test_cpu_op_matches_float64_with_gradients(W, gated, Hkv):
    q, k, v, g = make_inputs(2, 31, 4, Hkv, 16, 32, torch.float32, gated)
    leaves = [q, k, v] + ([g] if gated else [])
    for t in leaves:
        t.requires_grad_()
    o = gfwagen.attention(q, k, v, g, window=W)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rg = ref_leaves[3] if gated else None
    ref = naive_attention(*ref_leaves[:3], rg, W)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.double())
    assert rel_err(o, ref) < 1e-5
    for name, a, e in zip(["dq", "dk", "dv", "dg"], grads, ref_grads):
        assert rel_err(a, e) < 1e-5, name


@pytest.mark.parametrize("D,Dv", [(96, 96), (192, 96)])
def test_cpu_op_head_dims_not_powers_of_two(D, Dv):
    q, k, v, g = make_inputs(1, 20, 2, 1, D, Dv, torch.float32, True)
    leaves = [t.requires_grad_() for t in (q, k, v, g)]
    o = gfwagen.attention(q, k, v, g, window=6)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = naive_attention(*ref_leaves, 6)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.double())
    assert o.shape == (1, 20, 2, Dv) and rel_err(o, ref) < 1e-5
    for name, a, e in zip(["dq", "dk", "dv", "dg"], grads, ref_grads):
        assert rel_err(a, e) < 1e-5, name


def test_explicit_scale_is_used():
    q, k, v, g = make_inputs(1, 12, 2, 2, 16, 16, torch.float32, True)
    o = gfwagen.attention(q, k, v, g, window=4, scale=0.7)
    ref = naive_attention(q.double(), k.double(), v.double(), g.double(), 4, 0.7)
    assert rel_err(o, ref) < 1e-5
    assert rel_err(gfwagen.attention(q, k, v, g, window=4), ref) > 1e-3


@pytest.mark.parametrize("scale,runs_at", [
    (1e-116, 2.0 ** -100), (-1e-116, -(2.0 ** -100)), (1e-40, 2.0 ** -100),
    (2.0 ** -100, 2.0 ** -100), (0.0, 0.0), (0.125, 0.125), (-3.0, -3.0)])
def test_triton_forward_runs_tiny_scales_at_the_smallest_kernel_scale(monkeypatch, scale,
                                                                      runs_at):
    """The Triton forward hands its kernel a scale that float32 holds as a normal number or
    zero: 1e-116 reached the H200's kernel as 0.0 and every output was NaN (the fuzz test's T =
    1, D = 16 case; its RAW_MAX running max is -inf * 0 there). This checks what the launch is
    given; test_triton_interpret.py runs the kernel on such scales (conftest gives the
    interpreter fp32 float arguments, as on the GPU) and test_gpu_tiny_scales_match_float64
    runs the kernels on the GPU."""
    import numpy as np

    from gfwagen.backends import triton_backend
    from gfwagen.spec import KernelConfig

    seen = []

    class Template:
        @staticmethod
        def prepare_forward(*args, **kw):
            seen.append(args[7])
            return lambda: None

    monkeypatch.setattr(triton_backend, "load_template", lambda *a: Template)
    q, k, v, _ = make_inputs(1, 5, 1, 1, 16, 16, torch.float32, False)
    triton_backend.forward(q, k, v, None, 3, scale, KernelConfig(16, 16, 4, 1))
    assert seen == [runs_at]
    assert runs_at == 0 or abs(np.float32(runs_at)) >= np.finfo(np.float32).tiny


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("W", [5, None])
def test_opcheck_forward_and_backward(gated, W):
    q, k, v, g = make_inputs(1, 19, 4, 2, 16, 16, torch.float32, gated)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    if gated:
        g.requires_grad_()
    opcheck(torch.ops.gfwa.attention_fwd.default, (q, k, v, g, W, None, "auto"))
    o, lse = torch.ops.gfwa.attention_fwd(q, k, v, g, W, None, "auto")
    do = torch.randn_like(o)
    opcheck(torch.ops.gfwa.attention_bwd.default,
            (do, q.detach(), k.detach(), v.detach(), o.detach(), lse,
             g.detach() if gated else None, W, 0.25, "auto"))


def test_public_op_opcheck():
    q, k, v, g = make_inputs(1, 10, 2, 1, 16, 16, torch.float32, True)
    opcheck(torch.ops.gfwa.attention.default, (q, k, v, g, 3, None, "auto"),
            test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_dynamic_forward_backward():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")

    def layer(q, k, v, g):
        return (gfwagen.attention(q * 1.0, k, v, g, window=6) * 2.0).sum()

    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    for T in (17, 29):
        q, k, v, g = make_inputs(1, T, 4, 2, 16, 16, torch.float32, True)
        leaves = [t.requires_grad_() for t in (q, k, v, g)]
        grads = torch.autograd.grad(compiled(*leaves), leaves)
        ref = [t.detach().clone().requires_grad_() for t in leaves]
        exp = torch.autograd.grad(layer(*ref), ref)
        for a, e in zip(grads, exp):
            assert rel_err(a, e) < 1e-5
    # fullgraph: no graph break; dynamic: one trace serves both lengths.
    assert counter.frame_count == 1
    targets = [str(n.target) for n in counter.graphs[0].graph.nodes if n.op == "call_function"]
    assert any("gfwa.attention" in t for t in targets), targets


def _good():
    return make_inputs(1, 8, 4, 2, 16, 16, torch.float32, True)


@pytest.mark.parametrize("mutate,exc,words", [
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must be 4-D"),
    (lambda a: a.update(k=a["k"][:, :5]), ValueError, "sequence lengths differ"),
    (lambda a: a.update(v=torch.randn(2, 8, 2, 16)), ValueError, "batch sizes differ"),
    (lambda a: a.update(q=torch.randn(1, 8, 3, 16)), ValueError, "multiple of k's heads"),
    (lambda a: a.update(v=torch.randn(1, 8, 1, 16)), ValueError, "same number of heads"),
    (lambda a: a.update(k=torch.randn(1, 8, 2, 32)), ValueError, "k's head dim"),
    (lambda a: a.update(q=torch.randn(1, 8, 4, 24), k=torch.randn(1, 8, 2, 24)), ValueError,
     "head dim must be one of"),
    (lambda a: a.update(v=torch.randn(1, 8, 2, 48)), ValueError, "v's head dim"),
    (lambda a: a.update(q=torch.randn(1, 8, 4, 80), k=torch.randn(1, 8, 2, 80)), ValueError,
     "q's head dim must be one of"),
    (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), TypeError,
     "q must be bfloat16"),
    (lambda a: a.update(k=a["k"].half()), TypeError, "k must have q's dtype"),
    (lambda a: a.update(q=a["q"].numpy()), TypeError, "q must be a torch.Tensor"),
    (lambda a: a.update(window=0), ValueError, "window must be >= 1"),
    (lambda a: a.update(window=2.5), TypeError, "window must be an int"),
    (lambda a: a.update(window=True), TypeError, "window must be an int"),
    (lambda a: a.update(log_gate=torch.zeros(1, 8, 2)), ValueError, "log_gate must have shape"),
    (lambda a: a.update(log_gate=torch.zeros(1, 8, 4, dtype=torch.float16)), TypeError,
     "log_gate must be float32"),
    (lambda a: a.update(log_gate=[0.0]), TypeError, "log_gate must be a torch.Tensor"),
    (lambda a: a.update(scale=float("nan")), ValueError, "scale must be finite"),
    (lambda a: a.update(scale="0.1"), TypeError, "scale must be a float"),
    (lambda a: a.update(backend="cuda"), ValueError, "backend must be one of"),
    (lambda a: a.update(k=a["k"].to("meta")), ValueError, "k is on meta"),
])
def test_validation_errors_name_the_argument(mutate, exc, words):
    q, k, v, g = _good()
    args = dict(q=q, k=k, v=v, log_gate=g, window=4, scale=None, backend="auto")
    mutate(args)
    with pytest.raises(exc, match=words):
        gfwagen.attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("log_gate"),
                          **args)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, g = _good()
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        gfwagen.attention(q, k, v, g, window=4, backend="triton")


def test_empty_sequence_returns_empty():
    q, k, v, g = make_inputs(2, 0, 2, 2, 16, 16, torch.float32, True)
    o = gfwagen.attention(q, k, v, g, window=4)
    assert o.shape == (2, 0, 2, 16)


@pytest.mark.parametrize("gated,cu", [(True, None), (False, None), (True, [0, 9, 9, 30])])
def test_eager_path_equals_the_op(gated, cu):
    """gfwagen.attention's eager path (ops.EagerAttention) against torch.ops.gfwa.attention:
    the same output and gradients, bit for bit, packed sequences included."""
    B = 1 if cu else 2
    q, k, v, g = make_inputs(B, 30, 4, 2, 16, 16, torch.float32, gated)
    cu_t = torch.tensor(cu) if cu else None

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, g) if t is not None]
        o = fn(*leaves[:3], leaves[3] if gated else None)
        return (o, *torch.autograd.grad(o, leaves, torch.ones_like(o)))

    eager = run(lambda q, k, v, g: gfwagen.attention(q, k, v, g, window=6, cu_seqlens=cu_t))
    op = run(lambda q, k, v, g: torch.ops.gfwa.attention(q, k, v, g, 6, None, "auto", cu_t))
    assert type(eager[0].grad_fn).__name__ == "EagerAttentionBackward"
    for a, b in zip(eager, op, strict=True):
        assert torch.equal(a, b)


def test_modes_and_transforms_take_the_op():
    """Under a dispatch mode (fake tensors, flop counters, tracing) the call must reach
    gfwa::attention_fwd, which the mode sees; the eager shortcut would hide it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v, g = make_inputs(1, 10, 2, 2, 16, 16, torch.float32, True)
    with Record() as mode:
        gfwagen.attention(q, k, v, g, window=3)
    assert any("gfwa.attention_fwd" in name for name in mode.ops), mode.ops[:5]
    with Record():
        assert not gfwagen.ops.eager_ok(q)
    assert gfwagen.ops.eager_ok(q, None)
    assert not torch.func.vmap(lambda x: torch.tensor(gfwagen.ops.eager_ok(x)))(q)


def test_double_backward_is_refused_as_by_the_op():
    """Neither path differentiates its backward: a second derivative is an error on both, not
    a gradient treated as a constant."""
    q, k, v, g = (t.requires_grad_() for t in make_inputs(1, 8, 1, 1, 16, 16,
                                                          torch.float32, True))
    for fn in (lambda: gfwagen.attention(q, k, v, g, window=3),
               lambda: torch.ops.gfwa.attention(q, k, v, g, 3)):
        (dq,) = torch.autograd.grad(fn().sum(), q, create_graph=True)
        with pytest.raises(RuntimeError, match="no autograd formula|not differentiable"):
            torch.autograd.grad(dq.sum(), q)
