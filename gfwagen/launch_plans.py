"""Launch plans: what one direction of a call allocated and launched, recorded once per call
signature and replayed on later calls with the same signature.

The general path (gfwagen.dispatch down to the templates' launchers) decides the backend, the
configs, the tiles and every kernel argument again on each call: about 0.75 ms of host time per
forward+backward at S5 on a slow H200 host, more than the kernels' 1.13 ms with the autograd
engine's share added (benchmarks/RESULTS.md, sessions 29 and 30). All of it follows from the
call's signature: the tensors' shapes, strides, dtypes, devices and 16-byte alignment, the
scalar arguments, the settings read from the environment, and the tuning database. So the first
call of a signature runs the general path under a recorder, and later ones only allocate the
same buffers and make the same launches, straight to each compiled kernel's launcher.

A recording becomes a plan only when everything it did is something a replay repeats: buffer
allocations, views, and launches through the templates' launchers (templates/triton/common.py),
every one of them (on CUDA, Triton's own launch hook counts them), or through its
foreign_launch (TVM's compiled kernels, their tensors passed as torch tensors). Any other tensor
operation (a copy, a fill, a host read), the reference backend or a config that failed to
build leaves that signature on the general path. A replay that raises forgets its plan and
runs the general path.

clear() forgets every plan: gfwagen calls it when what the plans assumed changes (the database
snapshot, a config passed over, a buffer size that ran out of memory); code that patches
gfwagen.dispatch (tests, benchmarks) calls it too. GFWAGEN_LAUNCH_PLANS: "auto" (default; CUDA
tensors), "1" (also the Triton interpreter on CPU tensors: the tests), "0" (never).
"""

from __future__ import annotations

import functools
import os
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gfwagen.template_loader import load_template

PLANS_ENV = "GFWAGEN_LAUNCH_PLANS"
# the settings the general path reads from the environment on each call
_SETTINGS = ("GFWAGEN_GATE_SUMS", "GFWAGEN_STORED_DS_MAX_MB")

_aten = torch.ops.aten
_ALLOCATIONS = frozenset({_aten.empty.memory_format, _aten.empty_strided.default,
                          _aten.empty_like.default, _aten.new_empty.default,
                          _aten.new_empty_strided.default})

_plans: dict[tuple, object] = {}  # signature -> _Plan, or NotPlanned
_MAX_PLANS = 4096


class NotPlanned(str):
    """Why a signature has no plan (it takes the general path on every call)."""


def clear() -> None:
    """Forget every plan (and every signature found unplannable). A recording in progress on
    this thread does not become one: what changed may have changed its path midway (a config
    passed over after its first launches)."""
    _plans.clear()
    if getattr(_this_recording, "active", False):
        _this_recording.cleared = True


def enabled(t: torch.Tensor) -> bool:
    """Whether calls on t's device are planned (GFWAGEN_LAUNCH_PLANS)."""
    mode = os.environ.get(PLANS_ENV, "auto")
    if mode == "0":
        return False
    return t.is_cuda or (mode == "1" and os.environ.get("TRITON_INTERPRET") == "1")


def _tensor_key(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device,
                                   t.data_ptr() % 16 == 0)


def run(fn, tensors: tuple, statics: tuple):
    """fn(*tensors, *statics), through the plan of this signature when there is one. fn is a
    module-level function (it is part of the key) returning tensors, None and plain values,
    nested in tuples; `statics` are its other arguments (hashable), tensors[0] is not None."""
    if not enabled(tensors[0]):
        return fn(*tensors, *statics)
    if len({id(t) for t in tensors if t is not None}) != sum(t is not None for t in tensors):
        # one tensor twice: which argument a launch took would be unknown
        return fn(*tensors, *statics)
    key = (fn, statics, tuple(os.environ.get(s) for s in _SETTINGS),
           tuple(_tensor_key(t) for t in tensors))
    plan = _plans.get(key, False)
    if type(plan) is NotPlanned:
        return fn(*tensors, *statics)
    if plan is not False:
        try:
            return plan.replay(tensors)
        except Exception:
            _plans.pop(key, None)  # the general path raises it again, or answers
            return fn(*tensors, *statics)
    out, plan = _record(fn, tensors, statics)
    if plan is not None:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[key] = plan
    return out


# ------------------------------------------------------------------------------ recording
# the recording in progress on this thread: active, and why it may not become a plan (why:
# declined by the general path; cleared: clear() ran meanwhile)
_this_recording = threading.local()


def foreign_launch(call, *args) -> None:
    """call(*args), a launch outside Triton's launchers (TVM's compiled kernels): a step of the
    plan that a recording in progress on this thread makes."""
    load_template("triton", "common").foreign_launch(call, *args)


def decline(why: str) -> None:
    """Called by the general path where a recording in progress must not become a plan
    (another backend's kernels, which a replay would not launch)."""
    if getattr(_this_recording, "active", False):
        _this_recording.why = why


class _Allocations(TorchDispatchMode):
    """Keeps each buffer the recorded call allocates, in order; notes the first operation that
    is neither an allocation nor a view. Launches are the launchers' to record, and what runs
    inside them is not the call's."""

    def __init__(self):
        super().__init__()
        self.buffers: list[torch.Tensor] = []
        self.refused: str | None = None
        self.launching = load_template("triton", "common").launching

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.launching():  # Triton's own: scratch, and the interpreter's copies
            return out
        if func in _ALLOCATIONS:
            self.buffers.append(out)
        elif not func.is_view and self.refused is None:
            self.refused = str(func)
        return out


class _LaunchCount:
    """Triton's launch hook, counting this thread's launches while a recording runs."""

    def __init__(self):
        self.thread, self.n = threading.get_ident(), 0

    def __call__(self, *_):
        if threading.get_ident() == self.thread:
            self.n += 1


def _record(fn, tensors, statics):
    """fn(*tensors, *statics) through the general path, and its plan: a _Plan, NotPlanned, or
    None when clear() ran meanwhile (the next call records again)."""
    import triton

    common = load_template("triton", "common")
    hooks = triton.knobs.runtime.launch_enter_hook
    # (the interpreter calls no launch hooks)
    count = _LaunchCount() if tensors[0].is_cuda and hasattr(hooks, "add") else None
    steps: list = []
    allocs = _Allocations()
    _this_recording.active, _this_recording.why, _this_recording.cleared = True, None, False
    if count is not None:
        hooks.add(count)
    try:
        with allocs, common.recording_launches(steps):
            out = fn(*tensors, *statics)
    finally:
        _this_recording.active = False
        if count is not None:
            hooks.remove(count)
    if _this_recording.cleared:
        return out, None
    why = _this_recording.why or (f"it ran {allocs.refused}" if allocs.refused else None)
    triton_steps = sum(launcher is not None for launcher, *_ in steps)
    if why is None and count is not None and count.n != triton_steps:
        why = f"{count.n - triton_steps} launches outside the templates' launchers"
    if why is not None:
        return out, NotPlanned(why)
    try:
        return out, _Plan(tensors, allocs.buffers, steps, out)
    except _Unplannable as e:
        return out, NotPlanned(str(e))


class _Unplannable(Exception):
    pass


# ------------------------------------------------------------------------------ the plan
class _Plan:
    """Slots: the call's tensors, then the buffers it allocated, then views of either; steps:
    launches with their constant arguments and the slots of their tensor arguments."""

    def __init__(self, tensors, buffers, steps, out):
        self.n_in = len(tensors)
        self._known = list(tensors)
        self._makers: list = []
        self._views: dict = {}
        self._buffers = buffers
        self._buffer_slot: dict[int, int] = {}
        self.steps = [self._step(*s) for s in steps]
        self.out = self._template(out)
        self.device = tensors[0].device if tensors[0].is_cuda else None
        # a launch other than a direct one may need the descriptors' scratch allocator, which
        # each thread sets for itself (triton_backend._ensure_tma_allocator)
        self.ensure_allocator = None
        if self.device is not None and any(getattr(call.func, "fast", None) is None
                                           and call.func is not _foreign_launch
                                           for call, *_ in self.steps):
            from gfwagen.backends.triton_backend import _ensure_tma_allocator

            self.ensure_allocator = _ensure_tma_allocator
        del self._known, self._buffers  # the recorded call's tensors go with it

    def _slot(self, t) -> int:
        for i, x in enumerate(self._known):
            if x is t:
                return i
        for b in self._buffers:
            if b is t:
                return self._buffer(b)
        return self._view(t)

    def _buffer(self, b) -> int:
        i = self._buffer_slot.get(id(b))
        if i is None:
            size, stride, dtype, device = tuple(b.shape), b.stride(), b.dtype, b.device
            self._makers.append(lambda env: torch.empty_strided(size, stride, dtype=dtype,
                                                                device=device))
            self._known.append(b)
            i = self._buffer_slot[id(b)] = len(self._known) - 1
        return i

    def _view(self, t) -> int:
        storage = t.untyped_storage().data_ptr()
        bases = [b for b in self._buffers if b.untyped_storage().data_ptr() == storage]
        if bases:
            base = self._buffer(bases[0])
        else:
            bases = [i for i, x in enumerate(self._known[:self.n_in])
                     if x is not None and x.untyped_storage().data_ptr() == storage]
            if len(bases) != 1:  # none: not this call's; several: whose view is unknown
                raise _Unplannable(f"a launch took a tensor of {len(bases)} of the call's")
            base = bases[0]
        b = self._known[base]
        # the offset in t's elements: a view may read the buffer as another dtype (the bias
        # tables' int16 halves of a float32 buffer)
        rel, odd = divmod(t.storage_offset() * t.element_size()
                          - b.storage_offset() * b.element_size(), t.element_size())
        if odd:
            raise _Unplannable("a launch took a view between two elements")
        spec = (base, t.dtype, tuple(t.shape), t.stride(), rel)
        if spec[1:] == (b.dtype, tuple(b.shape), b.stride(), 0):
            # the buffer itself, as another Python object: what the dispatch mode saw
            # allocated is not always the object its caller got
            return base
        i = self._views.get(spec)
        if i is None:
            _, dtype, size, stride, rel = spec
            try:
                b.view(dtype)
            except RuntimeError as e:
                raise _Unplannable(f"a launch took a {dtype} view it cannot remake: {e}") from e

            def make(env):
                src = env[base] if env[base].dtype == dtype else env[base].view(dtype)
                return src.as_strided(size, stride, src.storage_offset() + rel)

            self._makers.append(make)
            self._known.append(t)
            i = self._views[spec] = len(self._known) - 1
        return i

    def _step(self, launcher, key, grid, args, kw):
        if launcher is None:  # common.foreign_launch: key is the call
            consts, refs = self._arguments(args, plain_only=True)
            return functools.partial(_foreign_launch, key), None, consts, refs
        if any(isinstance(v, torch.Tensor) for v in kw.values()):
            # a keyword argument is a constexpr or an option: a replay would pass it as recorded
            raise _Unplannable("a launch took a tensor by keyword")
        consts, refs = self._arguments(args)
        direct = launcher.compiled.get(key) if key is not None else None
        if direct is not None:
            call = functools.partial(direct, key[0])
        else:  # not cached by the launcher (the interpreter): Triton's own launch each time
            call = functools.partial(_triton_launch, launcher.kernel, kw)
        return call, grid, consts, refs

    def _arguments(self, args, plain_only=False):
        """A launch's arguments as constants (tensors None) and (position, slot) of its
        tensors. plain_only (a foreign launch): any other argument must be a plain value;
        anything else may wrap some tensor's memory (a DLPack view), which a replay would
        pass as recorded, the recorded call's buffer."""
        consts, refs = list(args), []
        for pos, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                consts[pos] = None
                refs.append((pos, self._slot(a)))
            elif plain_only and not isinstance(a, (bool, int, float, type(None))):
                raise _Unplannable(f"a launch took a {type(a).__name__}")
        return consts, tuple(refs)

    def _template(self, out):
        if isinstance(out, tuple):
            return tuple(self._template(x) for x in out)
        if isinstance(out, torch.Tensor):
            return _Slot(self._slot(out))
        if out is None or isinstance(out, (bool, int, float, str)):
            return out
        raise _Unplannable(f"it returned a {type(out).__name__}")

    def replay(self, tensors):
        if self.ensure_allocator is not None:
            self.ensure_allocator()
        if self.device is not None and self.device.index != torch.cuda.current_device():
            with torch.cuda.device(self.device):
                return self._replay(tensors)
        return self._replay(tensors)

    def _replay(self, tensors):
        env = list(tensors)
        for make in self._makers:
            env.append(make(env))
        for call, grid, consts, refs in self.steps:
            args = consts.copy()
            for pos, i in refs:
                args[pos] = env[i]
            call(grid, args)
        return _build(self.out, env)


class _Slot:
    __slots__ = ("i",)

    def __init__(self, i):
        self.i = i


def _build(template, env):
    if type(template) is _Slot:
        return env[template.i]
    if type(template) is tuple:
        return tuple(_build(x, env) for x in template)
    return template


def _foreign_launch(call, grid, args):
    call(*args)


def _triton_launch(kernel, kw, grid, args):
    kernel[grid](*args, **kw)
