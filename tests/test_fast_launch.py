"""templates/triton/common.py's launcher: a launch reuses the compiled kernel of an earlier
one only when Triton 3.6 would have specialized both alike, and passes every parameter in
order. CPU only: Triton's own specializer, and a stand-in kernel that records its calls."""

import types

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
