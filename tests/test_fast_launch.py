"""templates/triton/common.py's launcher: a launch reuses the compiled kernel of an earlier
one only when Triton 3.6 would have specialized both alike, and passes every parameter in
order. CPU only: Triton's own specializer, and a stand-in kernel that records its calls."""

import types

import pytest
import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

from gfwagen.template_loader import load_template

common = load_template("triton", "common")

INTS = [0, 1, 2, 15, 16, 17, 32, 4096, 4097, (1 << 31) - 16, (1 << 31) - 1, 1 << 31,
        (1 << 31) + 16, -1, -16, -(1 << 31), -(1 << 31) - 16, (1 << 62), (1 << 63),
        (1 << 63) + 16]


def _values():
    base = torch.empty(64, dtype=torch.float32)
    half = torch.empty(64, dtype=torch.float16)
    return INTS + [True, False, None, 0.5, 2.0, base, base[1:], base[4:], half, half[1:],
                   half[8:], torch.empty(8, dtype=torch.int32)]


def test_arg_key_is_at_least_as_fine_as_tritons_specialization():
    seen = {}
    for v in _values():
        k = common._arg_key(v)
        assert k is not None, v
        spec = native_specialize_impl(BaseBackend, v, False, True, True)
        if k in seen:
            assert seen[k] == spec, (v, k, spec)
        seen[k] = spec
    assert common._arg_key(object()) is None


def test_launch_key_inlines_arg_key(monkeypatch):
    """_Launcher._key spells _arg_key out for ints and tensors: the same key parts."""
    _fake_driver(monkeypatch)
    for v in _values():
        assert common._Launcher._key((v,), {})[1:] == (common._arg_key(v),), v
        kw_part = common._Launcher._key((), {"X": v})[1]
        assert kw_part == ("X", common._arg_key(v) if isinstance(v, torch.Tensor) else v), v
    assert common._Launcher._key((object(),), {}) is None


class _Compiled:
    packed_metadata = object()

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("fast", grid, args))


class _Kernel:
    """Stands in for a JITFunction: its launch records the call and returns a compiled
    kernel, as JITFunction.run does."""

    def __init__(self):
        self.log = []

        def fn(x, n, flag, BLOCK, EXTRA=7):
            pass

        self.fn = fn

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.log.append(("triton", grid, args, kw))
            return _Compiled(self.log)
        return run


def test_launcher_reuses_only_matching_launches(monkeypatch):
    kern = _Kernel()
    lau = common._Launcher(kern)
    lau.enabled = True
    monkeypatch.setattr(triton.runtime, "driver",
                        types.SimpleNamespace(active=types.SimpleNamespace(
                            get_current_device=lambda: 0)))
    x = torch.empty(64)
    lau[(4, 2)](x, 32, True, BLOCK=64, num_warps=4)
    lau[(5, 1)](x, 48, True, BLOCK=64, num_warps=4)  # same properties: the compiled kernel
    assert kern.log[0][0] == "triton"
    assert kern.log[1] == ("fast", (5, 1, 1), (x, 48, True, 64, 7))
    lau[(5, 1)](x, 47, True, BLOCK=64, num_warps=4)  # 47 is not divisible by 16
    lau[(5, 1)](x[1:], 48, True, BLOCK=64, num_warps=4)  # misaligned
    lau[(5, 1)](x, 48, False, BLOCK=64, num_warps=4)  # another bool
    lau[(5, 1)](x, 48, True, BLOCK=32, num_warps=4)  # another constexpr
    lau[(5, 1)](x, 48, True, BLOCK=64, num_warps=8)  # another option
    lau[(5, 1)](x, 1, True, BLOCK=64, num_warps=4)  # Triton makes 1 a constant
    assert [e[0] for e in kern.log[2:]] == ["triton"] * 6
    lau[(1, 1)](x, 64, True, BLOCK=64, EXTRA=9, num_warps=4)  # a default overridden: new key
    lau[(1, 1)](x, 80, True, BLOCK=64, EXTRA=9, num_warps=4)
    assert kern.log[-1] == ("fast", (1, 1, 1), (x, 80, True, 64, 9))
    # one-dimensional grid: a compiled kernel's runner reads three dimensions
    lau[(3,)](x, 16, True, BLOCK=64, num_warps=4)
    lau[(2,)](x, 16, True, BLOCK=64, num_warps=4)
    assert kern.log[-1] == ("fast", (2, 1, 1), (x, 16, True, 64, 7))
    # a grid function is Triton's to call: never cached
    for _ in range(2):
        lau[lambda meta: (1,)](x, 16, True, BLOCK=64, num_warps=4)
    assert [e[0] for e in kern.log[-2:]] == ["triton", "triton"]


def test_kernels_that_are_not_jitfunctions_keep_tritons_path():
    """The interpreter's kernels (TRITON_INTERPRET=1) are not JITFunctions: never cached."""
    kern = _Kernel()
    lau = common._Launcher(kern)
    assert not lau.enabled
    x = torch.empty(64)
    for _ in range(2):
        lau[(1,)](x, 32, True, BLOCK=64)
    assert [e[0] for e in kern.log] == ["triton", "triton"]


def _compiled_kernel(log, scratch=0):
    """A real CompiledKernel (Triton 3.6's runner code) over a real CudaLauncher's __call__,
    built without a GPU: the C launch records its arguments."""
    from triton.backends.nvidia.driver import CudaLauncher
    from triton.compiler.compiler import CompiledKernel

    run = object.__new__(CudaLauncher)
    run.launch = lambda *a: log.append(a)
    run.global_scratch_size = run.profile_scratch_size = scratch
    run.global_scratch_align = run.profile_scratch_align = 1
    run.launch_cooperative_grid, run.launch_pdl, run.num_ctas = 0, 1, 1
    ck = object.__new__(CompiledKernel)
    ck._run, ck.function, ck.packed_metadata = run, 1234, (4, 1, 0)
    ck.name, ck.src, ck.module = "k", None, None
    ck._init_handles = lambda: None
    return ck


def _fake_driver(monkeypatch):
    from triton.compiler import compiler

    fake = types.SimpleNamespace(active=types.SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda dev: 77 + dev))
    monkeypatch.setattr(triton.runtime, "driver", fake)
    monkeypatch.setattr(compiler, "driver", fake)


@pytest.mark.skipif(not common._DIRECT_LAUNCH, reason="the direct launch follows Triton 3.6")
def test_direct_launch_passes_what_tritons_runner_passes(monkeypatch):
    """_Direct skips CompiledKernel's runner; the C launch must get the same arguments, less
    the launch metadata and hooks that nothing observes."""
    _fake_driver(monkeypatch)
    log = []
    ck = _compiled_kernel(log)
    x = torch.empty(64)
    ck[(5, 1, 1)](x, 48, True, 64, 7)
    direct = common._Direct(ck, (64, 7))
    assert direct.fast is not None
    direct(0, (5, 1), (x, 48, True))
    theirs, ours = log
    assert len(theirs) == len(ours)
    for i, (a, b) in enumerate(zip(theirs, ours, strict=True)):
        if i in (10, 11, 12):  # launch metadata, enter and exit hooks
            assert b is None
        else:
            assert a is b or a == b, (i, a, b)
    assert ours[3] == 77 and ours[9] == (4, 1, 0)


def test_direct_launch_keeps_tritons_runner_for_hooks_and_scratch(monkeypatch):
    _fake_driver(monkeypatch)
    x = torch.empty(64)
    log = []
    direct = common._Direct(_compiled_kernel(log, scratch=16), ())
    assert direct.fast is None  # scratch to allocate: the runner's path
    log = []
    ck = _compiled_kernel(log)
    hook = print
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        common._Direct(ck, ())(0, (1,), (x,))
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    # Triton's runner went: its launch metadata and hook chain reach the C launch, which
    # calls the hooks
    assert log[0][10].get()["name"] == "k"
    assert log[0][11] is triton.knobs.runtime.launch_enter_hook


def test_recorded_launches_come_in_the_order_they_are_made():
    """recording_launches (gfwagen.launch_plans) records a bound launch when it is made, not
    when it is bound: the key-bias forward binds its own launch before it makes the one
    that writes the biases, and a replay must keep the order the GPU saw."""
    first, second = _Kernel(), _Kernel()
    la, lb = common._Launcher(first), common._Launcher(second)
    seen = []
    x = torch.empty(64)
    steps = []
    with common.recording_launches(steps):
        bound = la.bind((1,), x, 16, True, BLOCK=64)
        assert not steps
        lb[(2,)](x, 32, True, BLOCK=64)
        seen.append(common.launching())
        bound()
    assert [s[0] for s in steps] == [lb, la]
    assert steps[0][2:] == ((2,), (x, 32, True), {"BLOCK": 64})
    assert seen == [False] and not common.launching()
    lb[(2,)](x, 32, True, BLOCK=64)  # no recording now
    assert len(steps) == 2 and len(second.log) == 2


def test_a_launch_being_recorded_is_marked_while_it_runs():
    """What a launch allocates (Triton's scratch, the interpreter's copies) is not the
    recorded call's own: the recorder asks common.launching()."""
    inside = []

    class Probe(_Kernel):
        def __getitem__(self, grid):
            inside.append(common.launching())
            return super().__getitem__(grid)

    probe = Probe()
    with common.recording_launches([]):
        common._Launcher(probe)[(1,)](torch.empty(4), 16, True, BLOCK=16)
    common._Launcher(probe)[(1,)](torch.empty(4), 16, True, BLOCK=16)
    assert inside == [True, False]


def test_a_kernel_keeps_one_launcher():
    """The cache lives in the launcher: a new one per launch would never hit."""
    kern = _Kernel()
    assert common.launcher(kern) is common.launcher(kern)


def test_wide_offsets_past_2_31_elements_of_a_batch_entry():
    """common.wide_offsets: True only where an element of a batch entry lies 2^31 or more
    elements past the entry's start, counted from the shape and strides (no storage needed
    here: stand-ins), and without them for contiguous tensors under 2^31 elements."""
    def view(shape, stride):
        dense, numel = [], 1
        for n in reversed(shape):
            dense.insert(0, numel)
            numel *= n
        return types.SimpleNamespace(shape=shape, stride=lambda: stride, numel=lambda: numel,
                                     is_contiguous=lambda: list(stride) == dense)

    wide = common.wide_offsets
    assert not wide(torch.empty(2, 64, 4, 16), None, torch.empty(0, 5, 4, 16))
    # T = 2^20 at 32 heads of 128, contiguous: the last row starts past 2^31
    assert wide(view((1, 1 << 20, 32, 128), (1 << 32, 4096, 128, 1)))
    # the same at 16 heads ends one element short of it; more batches do not add to it
    assert not wide(view((4, 1 << 20, 16, 128), (1 << 31, 2048, 128, 1)))
    # [B, H, T, D] memory seen as [B, T, H, D] (the heads' stride T * D): the same bounds
    assert wide(view((1, 1 << 20, 32, 128), (1 << 32, 128, 1 << 27, 1)))
    assert not wide(view((1, 1 << 20, 16, 128), (1 << 31, 128, 1 << 27, 1)))
