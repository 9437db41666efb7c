"""gfwagen.launch_plans under the Triton interpreter (GFWAGEN_LAUNCH_PLANS=1), tiny shapes: a
call replayed from its plan gives what the general path gives, bitwise, and what a replay
could not repeat is never planned. The gate sums run as on CUDA (fused launches; on CPU
tensors they are torch operations, which are not planned)."""

import os
import types

import pytest
import torch
from conftest import make_inputs, rel_err

import gfwagen
from gfwagen import dispatch, gate_sums, launch_plans
from gfwagen.db.lookup import reset_snapshot
from gfwagen.reference import naive_attention

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton interpreter (CPU only)")

CASES = [
    # id, B, T, Hq, Hkv, D, Dv, window, gated, dtype
    ("ragged-T", 2, 37, 2, 2, 16, 16, 8, True, torch.float32),
    ("W=1", 1, 21, 2, 2, 16, 16, 1, True, torch.float32),
    ("W>=T,gqa", 1, 30, 4, 2, 16, 16, 64, True, torch.float32),
    ("no-gate,dv!=d", 2, 29, 2, 1, 16, 32, 9, False, torch.float32),
    ("fp16", 1, 45, 2, 2, 16, 16, 13, True, torch.float16),
]


@pytest.fixture
def general_calls(monkeypatch):
    """Plans on, the fused gate sums on, and a count of the calls that took the general
    path, per direction."""
    monkeypatch.setenv(launch_plans.PLANS_ENV, "1")
    monkeypatch.setattr(gate_sums, "use_fused", lambda t: True)
    calls = {"fwd": 0, "bwd": 0}
    run_forward, run_backward = dispatch.run_forward, dispatch.run_backward

    def fwd(*a, **kw):
        calls["fwd"] += 1
        return run_forward(*a, **kw)

    def bwd(*a, **kw):
        calls["bwd"] += 1
        return run_backward(*a, **kw)

    monkeypatch.setattr(dispatch, "run_forward", fwd)
    monkeypatch.setattr(dispatch, "run_backward", bwd)
    launch_plans.clear()
    yield calls
    launch_plans.clear()


def _step(q, k, v, g, window, do, backend="triton"):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    gl = g.detach().requires_grad_() if g is not None else None
    o = gfwagen.attention(*leaves, gl, window=window, backend=backend)
    grads = torch.autograd.grad(o, leaves + ([gl] if gl is not None else []), do)
    return (o.detach(), *grads)


def _general(monkeypatch, calls, *args, **kw):
    """_step on the general path, not counted in calls."""
    before = dict(calls)
    with monkeypatch.context() as m:
        m.setenv(launch_plans.PLANS_ENV, "0")
        out = _step(*args, **kw)
    calls.update(before)
    return out


def _planned_kinds():
    return sorted((key[0].__name__, type(plan).__name__) for key, plan in
                  launch_plans._plans.items())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_replays_match_the_general_path_bitwise(case, general_calls, monkeypatch):
    _, B, T, Hq, Hkv, D, Dv, window, gated, dtype = case
    for i in range(3):  # a recording, then two replays, each on fresh inputs
        q, k, v, g = make_inputs(B, T, Hq, Hkv, D, Dv, dtype, gated)
        do = torch.randn(B, T, Hq, Dv).to(dtype)
        got = _step(q, k, v, g, window, do)
        assert general_calls == {"fwd": 1, "bwd": 1}, i
        want = _general(monkeypatch, general_calls, q, k, v, g, window, do)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), i
    assert _planned_kinds() == [("_planned_backward", "_Plan"), ("_planned_forward", "_Plan")]
    ref = naive_attention(q.double(), k.double(), v.double(),
                          g.double() if gated else None, window)
    assert rel_err(got[0], ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_another_signature_gets_its_own_plan(general_calls, monkeypatch):
    """Shapes, dtypes, the window, the scale, the environment's settings and the inputs'
    16-byte alignment are each part of the key."""
    q, k, v, g = make_inputs(1, 24, 2, 2, 16, 16, torch.float16, True)
    do = torch.randn(1, 24, 2, 16).to(torch.float16)
    _step(q, k, v, g, 8, do)
    _step(q, k, v, g, 9, do)
    assert general_calls["fwd"] == 2
    gfwagen.attention(q, k, v, g, window=8, scale=0.3, backend="triton")
    assert general_calls["fwd"] == 3
    monkeypatch.setenv(gate_sums.GATE_SUMS_ENV, "fused-again")  # not "torch": still fused
    gfwagen.attention(q, k, v, g, window=8, backend="triton")
    assert general_calls["fwd"] == 4
    # an fp16 input whose data starts 2 bytes into its storage: not 16-byte aligned
    buf = torch.empty(q.numel() + 1, dtype=q.dtype)
    q_off = buf[1:].view(q.shape).copy_(q)
    assert q_off.data_ptr() % 16 != 0
    a = gfwagen.attention(q_off, k, v, g, window=8, backend="triton")
    assert general_calls["fwd"] == 5
    assert torch.equal(a, gfwagen.attention(q, k, v, g, window=8, backend="triton"))
    assert general_calls["fwd"] == 5  # the aligned one's plan, from two calls before


def test_the_reference_is_not_planned(general_calls):
    q, k, v, g = make_inputs(1, 20, 2, 2, 16, 16, torch.float32, True)
    do = torch.randn(1, 20, 2, 16)
    first = _step(q, k, v, g, 6, do, backend="reference")
    second = _step(q, k, v, g, 6, do, backend="reference")
    assert general_calls == {"fwd": 2, "bwd": 2}
    assert set(launch_plans._plans.values()) == {"the reference"}
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_tvm_forward_is_planned_its_backward_not(gated, general_calls, monkeypatch):
    """TVM's forward launches through tvm_backend._launch (launch_plans.foreign_launch) and
    the gate sums' Triton launch: planned, each replay on fresh inputs bitwise the general
    path's. Its backward runs torch operations (delta, casts): declined."""
    if not dispatch.tvm_available():
        pytest.skip("apache-tvm is not installed")
    for i in range(3):
        q, k, v, g = make_inputs(1, 21, 4, 2, 16, 16, torch.float32, gated)
        do = torch.randn(1, 21, 4, 16)
        got = _step(q, k, v, g, 6, do, backend="tvm")
        assert general_calls == {"fwd": 1, "bwd": i + 1}, i
        want = _general(monkeypatch, general_calls, q, k, v, g, 6, do, backend="tvm")
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), i
    assert [p for p in launch_plans._plans.values()
            if type(p) is launch_plans.NotPlanned] == ["TVM"]
    assert _planned_kinds() == [("_planned_backward", "NotPlanned"),
                                ("_planned_forward", "_Plan")]
    ref = naive_attention(q.double(), k.double(), v.double(), g.double() if gated else None, 6)
    assert rel_err(got[0], ref) < 1e-5


def test_a_foreign_launch_taking_another_kind_of_tensor_is_not_planned():
    """A foreign launch's argument that is neither a torch tensor nor a plain value (a
    DLPack view of some buffer) would be passed as recorded: the recording's memory."""
    x = torch.empty(4)
    plan = launch_plans._Plan((x,), [], [(None, print, None, (x, 2, 0.5, None), {})], (x,))
    assert plan.steps[0][2:] == ([None, 2, 0.5, None], ((0, 0),))
    with pytest.raises(launch_plans._Unplannable, match="took a memoryview"):
        launch_plans._Plan((x,), [], [(None, print, None, (x, memoryview(b"")), {})], (x,))


def test_torch_operations_on_the_way_leave_a_call_unplanned(general_calls, monkeypatch):
    """On CPU tensors the gate's clamp and sums are torch operations: a replay would not run
    them, so the gated call is not planned; the ungated one is."""
    monkeypatch.setattr(gate_sums, "use_fused", lambda t: False)
    q, k, v, g = make_inputs(1, 20, 2, 2, 16, 16, torch.float32, True)
    for _ in range(2):
        gfwagen.attention(q, k, v, g, window=6, backend="triton")
    assert general_calls["fwd"] == 2
    assert list(launch_plans._plans.values()) == ["it ran aten.clamp.default"]
    for _ in range(2):
        gfwagen.attention(q, k, v, None, window=6, backend="triton")
    assert general_calls["fwd"] == 3


def test_one_tensor_in_two_arguments_is_not_planned(general_calls, monkeypatch):
    q, k, _, g = make_inputs(1, 20, 2, 2, 16, 16, torch.float32, True)
    for _ in range(2):
        o = gfwagen.attention(q, k, k, g, window=6, backend="triton")
    assert general_calls["fwd"] == 2 and not launch_plans._plans
    with monkeypatch.context() as m:
        m.setenv(launch_plans.PLANS_ENV, "0")
        assert torch.equal(o, gfwagen.attention(q, k, k, g, window=6, backend="triton"))


def test_plans_are_forgotten_when_what_they_assumed_changes(general_calls, monkeypatch):
    q, k, v, g = make_inputs(1, 20, 2, 2, 16, 16, torch.float32, True)
    gfwagen.attention(q, k, v, g, window=6, backend="triton")
    assert launch_plans._plans
    reset_snapshot()  # the configs came from the database snapshot
    assert not launch_plans._plans
    gfwagen.attention(q, k, v, g, window=6, backend="triton")
    assert general_calls["fwd"] == 2

    # a clear() while a call is being recorded (a config passed over midway) keeps that
    # recording from becoming a plan; the next call records again
    launch_plans.clear()
    run_forward = dispatch.run_forward

    def clearing(*a, **kw):
        launch_plans.clear()
        return run_forward(*a, **kw)

    monkeypatch.setattr(dispatch, "run_forward", clearing)
    gfwagen.attention(q, k, v, g, window=6, backend="triton")
    assert not launch_plans._plans
    monkeypatch.setattr(dispatch, "run_forward", run_forward)
    gfwagen.attention(q, k, v, g, window=6, backend="triton")
    assert [type(p) for p in launch_plans._plans.values()] == [launch_plans._Plan]

    monkeypatch.setenv(launch_plans.PLANS_ENV, "0")
    launch_plans.clear()
    gfwagen.attention(q, k, v, g, window=6, backend="triton")
    assert not launch_plans._plans


def test_a_replay_that_fails_falls_back_to_the_general_path(general_calls, monkeypatch):
    q, k, v, g = make_inputs(1, 20, 2, 2, 16, 16, torch.float32, True)
    want = gfwagen.attention(q, k, v, g, window=6, backend="triton")
    (key, plan), = launch_plans._plans.items()

    def broken(tensors):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(plan, "replay", broken)
    assert torch.equal(gfwagen.attention(q, k, v, g, window=6, backend="triton"), want)
    assert general_calls["fwd"] == 2 and key not in launch_plans._plans
    gfwagen.attention(q, k, v, g, window=6, backend="triton")  # recorded again
    assert isinstance(launch_plans._plans[key], launch_plans._Plan)


def test_a_launch_taking_a_tensor_by_keyword_is_not_planned():
    """Keyword arguments are constexprs and options, replayed as recorded: a tensor there
    would be the recording's, not the call's."""
    x = torch.empty(4)
    launcher = types.SimpleNamespace(kernel=None, compiled={})
    plan = launch_plans._Plan((x,), [], [(launcher, None, (1,), (x,), {"BLOCK": 16})], (x,))
    assert plan.steps[0][3] == ((0, 0),)
    with pytest.raises(launch_plans._Unplannable, match="by keyword"):
        launch_plans._Plan((x,), [], [(launcher, None, (1,), (x,), {"Y": x})], (x,))


def test_a_view_of_a_buffer_as_another_dtype_is_remade_on_replay():
    """The bias tables' launch takes a float32 buffer and the same memory as int16: a replay
    passes its own buffer and that buffer's int16 view (and a slice of it), not the recording's."""
    seen = []

    def launch(*args):
        seen.append(args)

    x = torch.ones(4)
    buf = torch.empty(2, 8)
    halves = buf.view(torch.int16)
    part = halves[:, 4:]
    plan = launch_plans._Plan((x,), [buf], [(None, launch, None, (x, buf, halves, part, 3), {})],
                              (buf,))
    (out,) = plan.replay((x,))
    _, b, h, p, n = seen[-1]
    assert b is out and b.data_ptr() != buf.data_ptr() and n == 3
    assert h.dtype == torch.int16 and h.shape == (2, 16) and h.data_ptr() == b.data_ptr()
    assert p.shape == (2, 12) and p.stride() == (16, 1)
    assert p.data_ptr() == b.data_ptr() + 8
    odd = buf.view(torch.int8)[:, 1:]  # one byte in: not at an int16 boundary, but int8 is fine
    plan = launch_plans._Plan((x,), [buf], [(None, launch, None, (odd,), {})], (buf,))
    (out,) = plan.replay((x,))
    assert seen[-1][0].data_ptr() == out.data_ptr() + 1
