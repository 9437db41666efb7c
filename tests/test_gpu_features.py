"""The model features on a CUDA GPU (skipped without one): the fused gate preprocessing, the
fused gate prefix sums and gate gradient, the decode kernel over the ring cache, the GatedFWA
layer (compiled training, cached generation) and NSA's gated sliding branch, against the same
oracles as their CPU tests."""

import pytest
import torch
from conftest import make_inputs, rel_err
from test_decode import _case
from test_gate_preprocess import _inputs, _oracle
from test_gate_sums import _check_bwd, _check_fwd, _log_gate, _sums
from test_nsa import _plain_sliding_window

import gfwagen
from gfwagen import gate_sums
from gfwagen.decode import decode_attention
from gfwagen.gate_preprocess import gate_preprocess
from gfwagen.nn import GatedFWA, GatedFWACache
from gfwagen.nsa import gated_sliding_attn
from gfwagen.template_loader import load_template
from gfwagen.varlen import segment_bounds

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


@pytest.mark.parametrize("B,T,H", [(8, 4096, 16), (2, 5000, 3), (1, 1, 1), (1, 1 << 18, 4)])
@pytest.mark.parametrize("splits", [None, 1, 7])
def test_gpu_gate_sums_match_torch(B, T, H, splits):
    """The fused kernels against the torch functions on the GPU (torch's float64 cumsum there
    is a parallel scan: neither side sums in order)."""
    for kind in ("near0", "mixed"):
        _check_fwd(_log_gate(B, T, H, kind, seed=T).cuda(), splits=splits)
    for dtype in (torch.float32, torch.float64):
        row, col = (t.cuda() for t in _sums(B, H, T, dtype, seed=T, layout="stacked"))
        _check_bwd(row, col, splits=splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_gate_sums_half_and_strided(dtype):
    lg = _log_gate(2, 3000, 32, "mixed", seed=1).cuda()
    _check_fwd(lg.to(dtype))
    _check_fwd(lg[:, ::2, 1::3])


@pytest.mark.parametrize("T", [300, 70000])
def test_gpu_gate_grad_varlen(T):
    g = torch.Generator().manual_seed(T)
    cuts = torch.randint(0, T + 1, (max(1, T // 700),), generator=g).sort().values.tolist()
    cu = torch.tensor([0, 0, 1, 1, *cuts, T - 1, T, T], device="cuda")
    _, seg_end = segment_bounds(cu, T)
    for dtype in (torch.float32, torch.float64):
        row, col = (t.cuda() for t in _sums(1, 16, T, dtype, seed=1))
        for splits in (None, 1):
            _check_bwd(row, col, seg_end, splits=splits)


def _capture(step):
    """step's CUDA graph and the outputs its capture returned (step warmed up on a side
    stream first, as CUDA graphs need: no first allocation or compile inside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    return graph, outs


def test_gpu_gate_sums_in_cuda_graph():
    """No host sync: the fused launches capture into a CUDA graph and replay on new inputs."""
    lg = _log_gate(2, 3000, 16, "near0").cuda()
    row, col = (t.cuda() for t in _sums(2, 16, 3000, torch.float32, seed=0))
    _, seg_end = segment_bounds(torch.tensor([0, 5, 5, 2000, 3000], device="cuda"), 3000)

    def step():
        return (*gate_sums.chunked_prefix_sums_fused(lg, spare=1),
                gate_sums.gate_grad_from_sums_fused(row, col),
                gate_sums.gate_grad_from_sums_fused(row, col, seg_end))

    expected_before = [t.clone() for t in step()]
    graph, outs = _capture(step)
    lg.mul_(0.5)
    row.mul_(2.0)
    graph.replay()
    expected = step()
    for a, e, old in zip(outs, expected, expected_before):
        assert torch.equal(a, e) and not torch.equal(a, old)


def test_gpu_attention_fused_gate_sums_match_torch_path(monkeypatch):
    """The whole op, forward and backward (packed sequences too), with the fused gate sums and
    with the torch ones (GFWAGEN_GATE_SUMS=torch)."""
    q, k, v, lg = make_inputs(1, 3000, 8, 2, 64, 64, torch.bfloat16, True, device="cuda", seed=0)
    cu = torch.tensor([0, 1000, 1000, 2999, 3000], device="cuda")

    def run(env):
        monkeypatch.setenv(gate_sums.GATE_SUMS_ENV, env)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, lg)]
        o = gfwagen.attention(*leaves, window=512, cu_seqlens=cu)
        return (o, *torch.autograd.grad(o, leaves, torch.ones_like(o)))

    for a, b in zip(run("fused"), run("torch")):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_matches_reference(dtype):
    W = 256
    args, ref = _case([5, W, 3 * W + 7, 100], 2, 8, 2, 64, W, W, True, dtype)
    args = tuple(a.cuda() if a is not None else None for a in args)
    o = decode_attention(*args, window=W, backend="triton")
    assert rel_err(o, ref.cuda()) < 1e-2


def test_gpu_decode_ring_past_2_31_elements():
    """The ring's slots past 2^31 elements of a batch entry (as views with a 2^25-element
    slot stride, 10 GiB reserved): the 64-bit ring offsets (common.wide_offsets) on the GPU,
    bf16, against float64 (the interpreter's test_decode covers fp32)."""
    R, stride, D = 80, 2**25, 64
    args, ref = _case([100, 37], 1, 4, 2, D, R, None, True, torch.bfloat16, seed=3)
    store = torch.empty(2 * R * stride, dtype=torch.bfloat16, device="cuda")
    rings = [store.as_strided((2, R, 2, D), (R * stride, stride, D, 1), i * 2 * D)
             for i in range(2)]
    assert load_template("triton", "common").wide_offsets(*rings)
    for big, small in zip(rings, args[3:5]):
        big.copy_(small)
    args = tuple(a.cuda() if a is not None else None for a in args)
    args = (*args[:3], *rings, *args[5:])
    o = decode_attention(*args, window=None, backend="triton", n_splits=2)
    assert rel_err(o, ref.cuda()) < 1e-2


@pytest.mark.parametrize("T,H,Hkv,D,W,varlen", [
    (4096, 4, 4, 64, 512, False),  # S5's class: the key-bias forward where the database says
    (3000, 8, 2, 128, 512, False),  # GQA, T not a multiple of the tiles
    (3000, 4, 4, 64, 256, True),  # packed sequences
])
def test_gpu_forward_backward_in_cuda_graph(T, H, Hkv, D, W, varlen):
    check_step_in_cuda_graph(T, H, Hkv, D, W, varlen, "auto")


def check_step_in_cuda_graph(T, H, Hkv, D, W, varlen, backend):
    """The op's whole training step, forward and autograd backward, captured in one CUDA
    graph and replayed on new inputs: the remedy for a host too slow to keep up with short
    calls (RESULTS.md, session 28). Nothing in either direction may sync with the host or
    allocate outside the graph's pool; the replay must give the eager call's bits."""
    leaves = [t.requires_grad_() for t in make_inputs(2, T, H, Hkv, D, D, torch.bfloat16, True,
                                                      device="cuda", seed=T)]
    do = torch.randn(2, T, H, D, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 700, 700, 2 * T - 1, 2 * T], device="cuda") if varlen else None
    if varlen:  # packed: one row of 2T positions
        leaves = [t.detach().reshape(1, 2 * T, *t.shape[2:]).requires_grad_() for t in leaves]
        do = do.reshape(1, 2 * T, H, D)

    def step():
        o = gfwagen.attention(*leaves, window=W, cu_seqlens=cu, backend=backend)
        return (o, *torch.autograd.grad(o, leaves, do))

    graph, outs = _capture(step)
    with torch.no_grad():  # new values in the captured inputs
        for t in (*leaves, do):
            t.copy_(torch.randn_like(t) if t is not leaves[3] else -torch.rand_like(t))
    graph.replay()
    expected = step()
    for name, a, e in zip(("o", "dq", "dk", "dv", "dg"), outs, expected):
        assert torch.equal(a, e), (name, rel_err(a, e))


def test_gpu_compiled_reduce_overhead_trains():
    """torch.compile's CUDA graphs (mode="reduce-overhead") around the op, forward and
    backward, dynamic=False: the gradients of several steps on new inputs as eager's."""
    from torch._dynamo.utils import counters

    def loss_fn(q, k, v, g):
        return gfwagen.attention(q, k, v, g, window=256).float().square().mean()

    compiled = torch.compile(loss_fn, mode="reduce-overhead", fullgraph=True, dynamic=False)
    counters.clear()
    for seed in range(4):
        leaves = [t.requires_grad_() for t in make_inputs(2, 1000, 4, 4, 64, 64,
                                                          torch.bfloat16, True, device="cuda",
                                                          seed=seed)]
        got = torch.autograd.grad(compiled(*leaves), leaves)
        exp = torch.autograd.grad(loss_fn(*leaves), leaves)
        for a, e in zip(got, exp):
            assert rel_err(a, e) < 1e-5
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


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


PLAN_CASES = {
    # name: (B, T, Hq, Hkv, D, W, dtype, gated, forced configs {pass: KernelConfig}, stored)
    "key-bias": (2, 1500, 8, 8, 64, 300, torch.bfloat16, True,
                 {"fwd": (64, 64, 4, 2, (("bias_mma", True), ("maxnreg", 128)))}, False),
    "tables-gqa": (2, 3000, 8, 2, 128, 512, torch.bfloat16, True, {}, False),
    "tma-dq": (2, 2000, 4, 4, 64, 256, torch.float16, True,
               {"bwd_q": (64, 32, 4, 3, (("tma", True),))}, False),
    "stored-tma": (2, 2000, 4, 4, 64, 256, torch.float16, True, {}, True),
    "ungated": (3, 1000, 4, 2, 64, 128, torch.float16, False, {}, False),
}


@pytest.mark.parametrize("name", sorted(PLAN_CASES))
def test_gpu_launch_plans_replay_the_general_path(name, monkeypatch):
    """gfwagen.launch_plans on the GPU: after its first call, a signature's forward and
    backward replay what the general path launched (straight to the compiled kernels), bitwise
    the same outputs as the general path on fresh inputs; tensor descriptors included (their
    scratch allocator set on the autograd thread) and the stored-dS backward."""
    from gfwagen import dispatch, launch_plans
    from gfwagen.spec import KernelConfig

    B, T, Hq, Hkv, D, W, dtype, gated, forced, stored = PLAN_CASES[name]
    forced = {p: KernelConfig(*c[:4], extra=c[4]) for p, c in forced.items()}
    real = dispatch.select_config
    monkeypatch.setattr(dispatch, "select_config", lambda spec, T, dev: (
        forced.get(spec.pass_) or real(spec, T, dev)))
    if stored:
        monkeypatch.setattr(dispatch, "_stored_choice", lambda spec, bucket, dev: KernelConfig(
            64, 64, 4, 2, extra=(("tma", True), ("q_tma", True))))
    launch_plans.clear()

    def step(q, k, v, g, do):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, g) if t is not None]
        o = gfwagen.attention(*leaves[:3], leaves[3] if gated else None, window=W,
                              backend="triton")
        return (o, *torch.autograd.grad(o, leaves, do))

    for seed in range(3):
        q, k, v, g = make_inputs(B, T, Hq, Hkv, D, D, dtype, gated, device="cuda", seed=seed)
        do = torch.randn(B, T, Hq, D, device="cuda", dtype=dtype)
        got = step(q, k, v, g, do)
        with monkeypatch.context() as m:
            m.setenv(launch_plans.PLANS_ENV, "0")
            want = step(q, k, v, g, do)
        for what, a, e in zip(("o", "dq", "dk", "dv", "dg"), got, want):
            assert torch.equal(a, e), (seed, what, rel_err(a, e))
    plans = {key[0].__name__: plan for key, plan in launch_plans._plans.items()}
    assert sorted(plans) == ["_planned_backward", "_planned_forward"], plans
    assert all(isinstance(p, launch_plans._Plan) for p in plans.values()), plans
