"""Helpers shared by the Triton templates (imported relatively; nothing from gfwagen)."""

import contextlib
import functools
import inspect
import os
import threading

import triton
import triton.language as tl
from torch import Tensor as _Tensor

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# A key's row of key-bias pieces (key_bias.py writes them, fwd.py reads them): three
# pieces, then zeros; the forward reads 16 at a time, a bf16 wgmma's k step.
KEY_BIAS_WIDTH = tl.constexpr(8)


# GFWAGEN_FAST_LAUNCH=0: every launch through Triton's own binding (for A/B timing)
FAST_LAUNCH = os.environ.get("GFWAGEN_FAST_LAUNCH", "1") != "0"


def _arg_key(a):
    """What Triton 3.6 specializes a launch argument on, or finer: tensors on dtype and
    16-byte alignment; ints on being 1, divisible by 16 and their integer type; bools by
    value; None and floats by type. None for anything else (that launch is not cached)."""
    t = type(a)
    if t is int:
        return (a == 1, a % 16 == 0, -(1 << 31) <= a < (1 << 31), a < (1 << 63))
    if t is bool or a is None:
        return (t, a)
    if t is float:
        return t
    if hasattr(a, "data_ptr"):
        return (a.dtype, a.data_ptr() % 16 == 0)
    return None


class _Launcher:
    """kernel[grid](*args, **kw) that, after Triton's first launch for the same argument
    properties (_arg_key), the same constexprs and options and the same device, launches the
    compiled kernel it returned directly: Triton's binding, cache key and lookup were 50-70 us
    of host time per launch on session 11's H200 host (benchmarks/host_split.py), 2-9 us on
    session 26's. A hit goes straight to the compiled kernel's C launcher (_Direct) when no
    launch hooks are set, which saved 2-4 us more a launch there. Under the interpreter
    nothing is cached."""

    def __init__(self, kernel):
        self.kernel = kernel
        # the interpreter's kernels (TRITON_INTERPRET=1) are not JITFunctions: never cached
        self.enabled = FAST_LAUNCH and isinstance(kernel, triton.runtime.jit.JITFunction)
        params = inspect.signature(kernel.fn).parameters
        self.names = list(params)
        self.defaults = {n: p.default for n, p in params.items()}
        self.compiled = {}

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def _launch(self, grid, *args, **kw):
        self.bind(grid, *args, **kw)()

    def bind(self, grid, *args, **kw):
        """kernel[grid](*args, **kw) as a call to make later, looked up now: a caller that
        binds a launch before it issues another one leaves only the C launch between the two
        kernels (the GPU would idle through the lookup otherwise: about 10 us per launch on
        the H200's host)."""
        # a grid function (Triton calls it with the bound arguments) takes Triton's path
        key = self._key(args, kw) if self.enabled and type(grid) is tuple else None
        try:
            hit = self.compiled.get(key) if key is not None else None
        except TypeError:  # an unhashable constexpr: Triton's own path
            key = hit = None
        if hit is None:
            call = functools.partial(self._first, key, grid, args, kw)
        else:
            call = functools.partial(hit, key[0], grid, args)
        into = getattr(_recording, "steps", None)
        if into is not None:  # gfwagen.launch_plans: in the order the launches are made
            return functools.partial(_record_then_launch, into, (self, key, grid, args, kw), call)
        return call

    def _first(self, key, grid, args, kw):
        compiled = self.kernel[grid](*args, **kw)
        if key is not None and hasattr(compiled, "packed_metadata"):
            if len(self.compiled) > 4096:  # many distinct shapes: start over
                self.compiled.clear()
            # the compiled kernel takes every parameter in order, constexprs included
            tail = tuple(kw[n] if n in kw else self.defaults[n] for n in self.names[len(args) :])
            self.compiled[key] = _Direct(compiled, tail)

    @staticmethod
    def _key(args, kw):
        # _arg_key inlined for the common types: a launch's key is built on every call
        key = [triton.runtime.driver.active.get_current_device()]
        append = key.append
        for a in args:
            t = type(a)
            if t is int:
                append((a == 1, a % 16 == 0, -(1 << 31) <= a < (1 << 31), a < (1 << 63)))
            elif t is _Tensor:
                append((a.dtype, a.data_ptr() % 16 == 0))
            elif t is float:
                append(float)
            else:
                k = _arg_key(a)
                if k is None:
                    return None
                append(k)
        for name, v in kw.items():
            if type(v) not in _PLAIN:
                k = _arg_key(v) if hasattr(v, "data_ptr") else v
                if k is None and v is not None:
                    return None
                v = k
            append((name, v))
        return tuple(key)


_recording = threading.local()


@contextlib.contextmanager
def recording_launches(into: list):
    """Appends (launcher, key, grid, args, kw) to `into` for each launch this thread makes
    through a _Launcher meanwhile, as it is made (gfwagen.launch_plans records calls so)."""
    prev = getattr(_recording, "steps", None)
    _recording.steps = into
    try:
        yield
    finally:
        _recording.steps = prev


def _record_then_launch(into, step, call):
    into.append(step)
    _recording.launching = True  # what the launch itself allocates is Triton's (scratch)
    try:
        call()
    finally:
        _recording.launching = False


def foreign_launch(call, *args):
    """call(*args): a launch outside Triton (TVM's compiled kernels), recorded where
    recording_launches runs as (None, call, None, args, {}), in order with Triton's."""
    into = getattr(_recording, "steps", None)
    if into is None:
        call(*args)
        return
    _record_then_launch(into, (None, call, None, args, {}), functools.partial(call, *args))


def launching() -> bool:
    """Whether this thread is inside a launch that recording_launches records."""
    return getattr(_recording, "launching", False)


# constexpr and option values that key by themselves
_PLAIN = (int, bool, str, float, type(None))


def _hooks_set() -> bool:
    """Whether anything observes launches (Triton 3.6's hook chains, or a plain hook)."""
    rt = triton.knobs.runtime
    return any(getattr(h, "calls", h) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


# The C launch's arguments are Triton 3.6's (tests/test_fast_launch.py checks them against its
# runner); other versions take the runner's path.
_DIRECT_LAUNCH = triton.__version__.split(".")[:2] == ["3", "6"]


class _Direct:
    """One compiled kernel and the constexprs that follow a launch's positional arguments.
    Calling it launches as CompiledKernel[grid](*args) does, less what that spends per call
    when nothing observes launches: the launch-metadata dict and the calls into empty hook
    chains, the device query (the key holds the device), and the scratch allocators of a
    kernel that needs no scratch."""

    def __init__(self, compiled, tail):
        self.compiled, self.tail = compiled, tail
        run = getattr(compiled, "run", None)  # loads the module if the first launch did not
        self.fast = None
        if (_DIRECT_LAUNCH and getattr(run, "global_scratch_size", 1) == 0
                and getattr(run, "profile_scratch_size", 1) == 0 and hasattr(run, "launch")):
            self.fast = run.launch
            self.head = (compiled.function, run.launch_cooperative_grid, run.launch_pdl, None,
                         None, compiled.packed_metadata, None, None, None)

    def __call__(self, device, grid, args):
        # a compiled kernel's runner indexes all three grid dimensions; JITFunction pads them
        grid = grid + (1,) * (3 - len(grid))
        if self.fast is None or _hooks_set():
            self.compiled[grid](*args, *self.tail)
            return
        stream = triton.runtime.driver.active.get_current_stream(device)
        self.fast(grid[0], grid[1], grid[2], stream, *self.head, *args, *self.tail)


@functools.cache
def launcher(kernel):
    """The _Launcher of a @triton.jit kernel: launcher(k)[grid](...) as k[grid](...)."""
    return _Launcher(kernel)


def cdiv(a, b):
    """Host-side ceil(a / b). triton.cdiv and triton.next_power_of_2 are constexpr functions
    in Triton 3.6, whose host calls unwrap every argument: about 4 us each under a profiler,
    27 of them per forward+backward before the launchers used these."""
    return -(-a // b)


def next_pow2(n):
    """Host-side smallest power of two >= n (n >= 1), as triton.next_power_of_2."""
    return 1 << max(0, n - 1).bit_length()


def heads_per_program(H):
    """Heads one program of the gate kernels (gate.py, gate_sums.py) covers: a power of two
    for tl.arange, at most 16."""
    return min(16, next_pow2(H))


@triton.jit
def key_tile_phases(m0, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """Key-tile bounds for query rows [m0, m0+BLOCK_M): [lo, int_lo) edge, [int_lo, int_hi)
    interior, [int_hi, hi) diagonal. All starts are multiples of BLOCK_N."""
    hi = tl.minimum(T, m0 + BLOCK_M)
    lo = m0 * 0
    int_lo = m0 * 0
    if WINDOW > 0:
        lo = (tl.maximum(m0 - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
        first_full = tl.maximum(m0 + BLOCK_M - WINDOW, 0)
        int_lo = tl.maximum(lo, ((first_full + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    int_lo = tl.minimum(int_lo, hi)
    int_hi = tl.maximum(((m0 + 1) // BLOCK_N) * BLOCK_N, int_lo)
    return lo, int_lo, int_hi, hi


@triton.jit
def gate_tile_load(cl_base, cb_base, t0, T, BLOCK: tl.constexpr, GATE_CHUNK: tl.constexpr):
    """The gate tables' values for positions [t0, t0+BLOCK): the chunk-local float32 sums and
    the chunk's float64 base. Reads one base past the last chunk when t0 >= T (the table is
    padded by one) so a prefetch beyond the end needs no branch."""
    offs = t0 + tl.arange(0, BLOCK)
    local = tl.load(cl_base + offs, mask=offs < T, other=0.0)
    base = tl.load(cb_base + t0 // GATE_CHUNK)
    return local, base


@triton.jit
def load_vector(base, offs, T, MASKED: tl.constexpr):
    if MASKED:
        vec = tl.load(base + offs, mask=offs < T, other=0.0)
    else:
        vec = tl.load(base + offs)
    return vec


def wide_offsets(*tensors) -> bool:
    """Whether some element of a batch entry of these [B, T, heads, D] tensors lies 2^31 or
    more elements past the entry's start: the kernels' row and head offsets (an int32 index
    times an int32 stride) would wrap there, so they take WIDE_OFFSETS, which makes those
    strides int64 (a long sequence of many heads: T = 2^20 at 32 heads of 128 passes it).
    Below it the kernels compile as without the flag. A contiguous tensor of fewer than
    2^31 elements is answered without its strides: 1 us for a forward's four tensors, where
    summing them took 5 (session 27, a CPU timing; every launch pays it, and session 26
    counted what a launch's host time costs, benchmarks/RESULTS.md)."""
    return any((t.numel() >= 2**31 or not t.is_contiguous())
               and sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:])) >= 2**31
               for t in tensors if t is not None)


@triton.jit
def wide_strides(stride_t, stride_h, WIDE_OFFSETS: tl.constexpr):
    """A tensor's row and head strides, as int64 when the launch takes WIDE_OFFSETS
    (wide_offsets): every offset they scale is then computed in 64 bits."""
    if WIDE_OFFSETS:  # one return: Triton's compiler refuses two of different types
        stride_t = stride_t.to(tl.int64)
        stride_h = stride_h.to(tl.int64)
    return stride_t, stride_h


@triton.jit
def load_rows(
    base, offs, stride, T, WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr, MASKED: tl.constexpr
):
    """Rows `offs` of a [T, WIDTH] slab (row stride `stride`, last dim contiguous), as a
    [len(offs), WIDTH_PAD] tile (WIDTH_PAD: WIDTH's next power of two; columns past WIDTH read
    as 0). Rows past T read as 0 when MASKED; unmasked (interior) tiles never reach T."""
    cols = tl.arange(0, WIDTH_PAD)
    ptrs = base + offs[:, None] * stride + cols[None, :]
    if WIDTH_PAD != WIDTH:
        if MASKED:
            rows = tl.load(ptrs, mask=(offs < T)[:, None] & (cols < WIDTH)[None, :], other=0.0)
        else:
            rows = tl.load(ptrs, mask=(cols < WIDTH)[None, :], other=0.0)
    else:
        if MASKED:
            rows = tl.load(ptrs, mask=(offs < T)[:, None], other=0.0)
        else:
            rows = tl.load(ptrs)
    return rows


@triton.jit
def pair_mask(qi, kj, T, WINDOW: tl.constexpr, PART: tl.constexpr = 0):
    """Which (query qi, key kj) pairs count: causal, inside the window, query in range (a key
    past T is then past every counted query). qi and kj broadcast to the tile's shape.
    PART 1 tests only the window's far bound and PART 2 only the causal one (each with the
    query range): exact on the tiles where the other bound holds for every pair, which
    split_bounds says."""
    if PART == 1:
        valid = (kj > qi - WINDOW) & (qi < T)
    elif PART == 2:
        valid = (kj <= qi) & (qi < T)
    else:
        valid = (kj <= qi) & (qi < T)
        if WINDOW > 0:
            valid = valid & (kj > qi - WINDOW)
    return valid


def split_bounds(window, block_m, block_n, varlen):
    """Whether each masked key tile of key_tile_phases needs one bound only: the window
    edge's tiles lie wholly below the diagonal and the diagonal's wholly inside the window
    once the window spans both tiles (W >= BLOCK_M + BLOCK_N, or no window). Packed
    sequences move interior tiles to the edge, so they keep both. Half the compares and
    selects per score on masked tiles: 4 of 10 key tiles at S5's forward. (The dk/dv
    kernel's one loop would need a second branch for it, which cost the eight-warp tiles
    12-20 KB of shared memory in an offline build.)"""
    return not varlen and (window == 0 or window >= block_m + block_n)


@triton.jit
def gate_tile(
    cl,
    cb_base,
    t0,
    cb_ref,
    T,
    BLOCK: tl.constexpr,
    GATE_CHUNK: tl.constexpr,
    MASKED: tl.constexpr,
    VEC_TMA: tl.constexpr = False,
):
    """Gate sums (log2 units) of the tile at t0 relative to the chunk base cb_ref, in two
    parts: the chunk-local float32 values and one float32 offset for the tile (a float64
    base difference, the only float64 operation per tile), so that a kernel can add the
    offset per row rather than per value. cl: the local table's row, a pointer, or with
    VEC_TMA its vector_descriptor."""
    off = (tl.load(cb_base + t0 // GATE_CHUNK) - cb_ref).to(tl.float32)
    if VEC_TMA:
        local = cl.load([t0])
    else:
        local = load_vector(cl, t0 + tl.arange(0, BLOCK), T, MASKED)
    return local, off


@triton.jit
def gate_tile_prefetched(
    nxt_local,
    nxt_base,
    cl_base,
    cb_base,
    t0,
    cb_ref,
    T,
    BLOCK: tl.constexpr,
    GATE_CHUNK: tl.constexpr,
):
    """gate_tile from values loaded one tile ahead (their latency hidden behind this tile's
    dots); issues the next tile's loads."""
    off = (nxt_base - cb_ref).to(tl.float32)
    local = nxt_local
    nxt_local, nxt_base = gate_tile_load(cl_base, cb_base, t0 + BLOCK, T, BLOCK, GATE_CHUNK)
    return local, off, nxt_local, nxt_base


@triton.jit
def vector_descriptor(base, T, BLOCK: tl.constexpr):
    """A Hopper tensor descriptor over the float32 vector [T] at `base` (16-byte aligned: a
    row of a [..., T] table with T % 4 == 0) that loads [BLOCK] pieces, zeros past T. One
    bulk copy per tile instead of a few bytes per thread, each with its own address and
    bounds check (offline at S4's forward, its offset already added per row: the gate's
    extra SASS instructions per key tile from 122 to 73, of 535 ungated)."""
    return tl.make_tensor_descriptor(base, shape=[T], strides=[1], block_shape=[BLOCK])


# The fewest float32 a vector_descriptor's box may hold. A bulk tensor copy writes shared
# memory at a 128-byte aligned address; boxes of 16 float32 (64 bytes) stopped 16-row tiles'
# backward with a CUDA "misaligned address" on the H200 (RESULTS.md, session 29).
VECTOR_TMA_MIN_BLOCK = 32


def vectors_tma_usable(T, block, *vectors):
    """Whether vector_descriptor can address these [..., T] float32 tables row by row in
    boxes of `block`."""
    return (block >= VECTOR_TMA_MIN_BLOCK and T % 4 == 0
            and all(v.data_ptr() % 16 == 0 for v in vectors))


@triton.jit
def varlen_key_phases(
    lo, int_lo, int_hi, hi, SEG_START, m0, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """key_tile_phases narrowed to packed sequences (cu_seqlens): no tile before the first
    row's sequence start is visited, and tiles before the last row's start move from the
    unmasked interior to the masked edge. Starts never decrease along T, so the block's
    first and last rows bound every row's start."""
    first = tl.load(SEG_START + m0)
    last = tl.load(SEG_START + tl.minimum(m0 + BLOCK_M, T) - 1)
    lo = tl.maximum(lo, (first // BLOCK_N) * BLOCK_N)
    int_lo = tl.minimum(tl.maximum(int_lo, ((last + BLOCK_N - 1) // BLOCK_N) * BLOCK_N), hi)
    int_hi = tl.maximum(int_hi, int_lo)
    return lo, int_lo, int_hi, hi


@triton.jit
def varlen_query_phases(
    lo, int_lo, int_hi, hi, SEG_END, n0, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """The dk/dv kernel's query-tile phases narrowed to packed sequences: no query past the
    last key's sequence end is visited, and query tiles past the first key's end are masked."""
    first = tl.load(SEG_END + n0)
    last = tl.load(SEG_END + tl.minimum(n0 + BLOCK_N, T) - 1)
    hi = tl.minimum(hi, last)
    int_lo = tl.minimum(int_lo, hi)
    int_hi = tl.maximum(tl.minimum(int_hi, (first // BLOCK_M) * BLOCK_M), int_lo)
    return lo, int_lo, int_hi, hi


@triton.jit
def row_tile_descriptor(
    base, T, stride, BLOCK: tl.constexpr, WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr
):
    """A Hopper tensor descriptor over the [T, WIDTH] slab at `base` (row stride `stride`,
    last dim contiguous) that loads [BLOCK, WIDTH_PAD] tiles: rows past T and columns past
    WIDTH arrive as zeros, as load_rows' masked loads give them."""
    return tl.make_tensor_descriptor(
        base, shape=[T, WIDTH], strides=[stride, 1], block_shape=[BLOCK, WIDTH_PAD]
    )
