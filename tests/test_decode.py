"""gfwagen.decode: the ring-cache decode (Triton under the interpreter on the CPU, and torch)
against the float64 reference on each sequence's full history."""

import pytest
import torch
from conftest import rel_err

from gfwagen.decode import decode_attention
from gfwagen.reference import naive_attention


def _case(lengths, S, Hq, Hkv, D, R, window, gated, dtype, seed=0):
    """Per-sequence histories of L_b + S tokens; the ring holds the last min(L_b, R) of the
    first L_b at slot p % R (other slots: large finite garbage), the S new tokens apart."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    q = torch.empty(B, S, Hq, D, dtype=dtype)
    k_new = torch.empty(B, S, Hkv, D, dtype=dtype)
    v_new = torch.empty(B, S, Hkv, D, dtype=dtype)
    k_ring = (torch.randn(B, R, Hkv, D, generator=g) * 1e3).to(dtype)
    v_ring = (torch.randn(B, R, Hkv, D, generator=g) * 1e3).to(dtype)
    c_ring = torch.randn(B, R, Hq, generator=g).double() * 1e3 if gated else None
    c_new = torch.empty(B, S, Hq, dtype=torch.float64) if gated else None
    refs = []
    for b, L in enumerate(lengths):
        T = L + S
        qf = torch.randn(1, T, Hq, D, generator=g).to(dtype)
        kf = torch.randn(1, T, Hkv, D, generator=g).to(dtype)
        vf = torch.randn(1, T, Hkv, D, generator=g).to(dtype)
        lg = None
        if gated:
            lg = torch.nn.functional.logsigmoid(torch.randn(1, T, Hq, generator=g) + 1.0)
            # a long past: absolute prefix sums far from 0 (the relative form must absorb it)
            c = torch.cumsum(lg[0].double(), 0) - 5e4
            ref = c[L - 1] if L > 0 else torch.full((Hq,), -5e4, dtype=torch.float64)
            c_new[b] = c[L:] - ref
        for p in range(max(0, L - R), L):
            k_ring[b, p % R], v_ring[b, p % R] = kf[0, p], vf[0, p]
            if gated:
                c_ring[b, p % R] = c[p] - ref
        q[b], k_new[b], v_new[b] = qf[0, L:], kf[0, L:], vf[0, L:]
        o = naive_attention(qf.double(), kf.double(), vf.double(),
                            None if lg is None else lg.double(), window=window)
        refs.append(o[0, L:])
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    if gated:
        c_ring, c_new = c_ring.float(), c_new.float()
    return (q, k_new, v_new, k_ring, v_ring, seqlens, c_ring, c_new), torch.stack(refs)


TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 1)])
@pytest.mark.parametrize("W,S", [(24, 1), (40, 3)])
@pytest.mark.parametrize("gated", [True, False])
def test_decode_matches_reference(dtype, Hq, Hkv, W, S, gated):
    # not-yet-full ring, exactly full, wrapped more than twice
    lengths = [5, W, 3 * W + 7]
    args, ref = _case(lengths, S, Hq, Hkv, 16, W, W, gated, dtype)
    for backend in ("torch", "triton"):
        o = decode_attention(*args, window=W, backend=backend, n_splits=3, block_n=16)
        assert o.shape == ref.shape and o.dtype == dtype
        assert rel_err(o, ref) < TOL[dtype], backend


@pytest.mark.parametrize("R,window,lengths", [
    (33, 24, [0, 11, 90]),       # ring longer than the window; an empty ring (prefill of 1)
    (23, 24, [23, 50, 1]),       # the smallest ring a window of 24 needs (W - 1)
    (40, None, [0, 17, 38]),     # full causal over a ring of max_length
])
def test_decode_ring_sizes_and_full_causal(R, window, lengths):
    S = 2
    args, ref = _case(lengths, S, 4, 2, 16, R, window, True, torch.float32, seed=1)
    for backend in ("torch", "triton"):
        for n_splits in (1, 4):
            o = decode_attention(*args, window=window, backend=backend, n_splits=n_splits,
                                 block_n=16)
            assert rel_err(o, ref) < 1e-5, (backend, n_splits)


def test_decode_rank3_single_token_and_out():
    args, ref = _case([7, 30, 61], 1, 4, 2, 16, 24, 24, True, torch.float32, seed=2)
    q, k_new, v_new, k_ring, v_ring, seqlens, c_ring, c_new = args
    out = torch.empty(3, 4, 16)
    o = decode_attention(q[:, 0], k_new[:, 0], v_new[:, 0], k_ring, v_ring, seqlens, c_ring,
                         c_new[:, 0], window=24, backend="triton", out=out, n_splits=2,
                         block_n=16)
    assert o.data_ptr() == out.data_ptr()
    assert rel_err(o, ref[:, 0]) < 1e-5
    # kv-head-major ring ([B, Hkv, R, D] storage: each head's R x D slab contiguous)
    kt = k_ring.transpose(1, 2).contiguous().transpose(1, 2)
    vt = v_ring.transpose(1, 2).contiguous().transpose(1, 2)
    o2 = decode_attention(q, k_new, v_new, kt, vt, seqlens, c_ring, c_new, window=24,
                          backend="triton", block_n=16)
    assert rel_err(o2, ref) < 1e-5


@pytest.mark.parametrize("kw,chunks", [
    (dict(), [7] + [1] * 12),                     # prefill, then decode; the ring wraps
    (dict(num_kv_heads=1), [3, 4, 1, 3, 1, 2]),   # MQA, multi-token steps
    (dict(gate=False), [5] + [1] * 6),
])
def test_layer_cache_with_triton_decode_matches_full_forward(monkeypatch, kw, chunks):
    """GatedFWACache's decode step through the Triton kernel (interpreted on the CPU) gives the
    no-cache forward, token for token."""
    from test_nn import _layer

    import gfwagen.nn as gnn
    from gfwagen.nn import GatedFWACache

    calls = []

    def forced(*a, **k):
        calls.append(k["backend"])
        return decode_attention(*a, **{**k, "backend": "triton", "block_n": 16})

    monkeypatch.setattr(gnn, "decode_attention", forced)
    layer = _layer(**kw).eval()
    T = sum(chunks)
    x = torch.randn(2, T, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = layer(x)
        cache, outs, s = GatedFWACache(), [], 0
        for n in chunks:
            y, cache = layer(x[:, s:s + n], cache)
            outs.append(y)
            s += n
    assert len(calls) == len(chunks) - 1
    assert (torch.cat(outs, dim=1) - full).abs().max().item() < 1e-5


def test_decode_float64_absolute_gate_state():
    """float64 gate sums far from 0 (as GatedFWACache keeps them) give the relative result."""
    args, ref = _case([9, 24, 77], 2, 4, 2, 16, 24, 24, True, torch.float32, seed=4)
    q, k_new, v_new, k_ring, v_ring, seqlens, c_ring, c_new = args
    base = torch.randn(3, 1, 4, dtype=torch.float64) * 1e6
    c_ring64, c_new64 = c_ring.double() + base, c_new.double() + base
    for backend in ("torch", "triton"):
        o = decode_attention(q, k_new, v_new, k_ring, v_ring, seqlens, c_ring64, c_new64,
                             window=24, backend=backend, n_splits=2, block_n=16)
        assert rel_err(o, ref) < 1e-5, backend


def test_decode_bfloat16():
    args, ref = _case([5, 24, 79], 1, 4, 2, 16, 24, 24, True, torch.bfloat16, seed=5)
    for backend in ("torch", "triton"):
        o = decode_attention(*args, window=24, backend=backend, n_splits=2, block_n=16)
        assert o.dtype == torch.bfloat16 and rel_err(o, ref) < 2e-2, backend


AOT_SCRIPT = r"""
import inspect, json
import triton
from triton.backends.compiler import GPUTarget
from gfwagen.template_loader import load_template

m = load_template("triton", "decode")


def build(kernel, types, constexprs, nw, ns):
    params = list(inspect.signature(kernel.fn).parameters)
    sig = {p: ("constexpr" if p in constexprs else types.get(p, "i32")) for p in params}
    # what the JIT infers at run time for 16-byte aligned pointers and strides divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if p not in constexprs and (sig[p].startswith("*") or p.startswith("stride_"))}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, attrs=attrs,
                                    constexprs={(params.index(k),): v
                                                for k, v in constexprs.items()})
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=nw, num_stages=ns))
    return dict(shared=out.metadata.shared, cp_async=out.asm["ptx"].count("cp.async.cg"))


res = []
for dt, cdt, bn, nw, ns in [("bf16", "fp32", 64, 4, 3), ("fp32", "fp64", 32, 4, 2)]:
    types = {p: "*" + dt for p in ["Q", "KN", "VN", "K", "V"]}
    types.update(CR="*" + cdt, CQ="*" + cdt, SEQLENS="*i32", PM="*fp32", PL="*fp32",
                 PACC="*fp32", scale="fp32")
    ce = dict(G=4, BLOCK_M=16, BLOCK_N=bn, BLOCK_S=16, HEAD_D=128, HEAD_DV=128, D_PAD=128,
              DV_PAD=128, GATED=True, DOT_PREC="ieee" if dt == "fp32" else "tf32",
              WIDE_OFFSETS=False)
    res.append(build(m._decode_split, types, ce, nw, ns))
# fp32 again, with 64-bit ring offsets (common.wide_offsets)
res.append(build(m._decode_split, types, dict(ce, WIDE_OFFSETS=True), nw, ns))
res.append(build(m._decode_combine, dict(PM="*fp32", PL="*fp32", PACC="*fp32", O="*bf16"),
                 dict(G=4, BLOCK_M=16, SPLIT_PAD=16, HEAD_DV=128, DV_PAD=128), 4, 1))
print(json.dumps(res))
"""


@pytest.mark.timeout(600)
def test_decode_compiles_for_sm90_with_pipelined_loads():
    """The decode kernels compile for Hopper without a GPU; the ring's K/V tiles go through
    cp.async (software-pipelined), not plain register loads."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    split_bf16, split_fp32, split_wide, combine = json.loads(
        proc.stdout.strip().splitlines()[-1])
    for b in (split_bf16, split_fp32, split_wide):
        assert b["cp_async"] > 0 and 0 < b["shared"] <= 232448, b
    assert combine["shared"] <= 232448


def test_decode_ring_past_2_31_elements():
    """A ring whose slots pass 2^31 elements of a batch entry (R slots of a 2^25-element
    stride here; R = 2^21 at 8 heads of 128 in practice): its int32 slot offsets wrapped
    (a segfault under the interpreter); common.wide_offsets makes them int64."""
    R, stride = 80, 2**25
    args, ref = _case([100], 1, 2, 1, 16, R, None, True, torch.float32, seed=2)
    try:
        store = torch.empty(R * stride, dtype=torch.float32)
    except RuntimeError as e:  # an address space too small to reserve it
        pytest.skip(f"could not reserve {R * stride * 4 / 2**30:.0f} GiB: {e}")
    rings = [store.as_strided((1, R, 1, 16), (R * stride, stride, 16, 1), i * 16)
             for i in range(2)]
    for big, small in zip(rings, args[3:5]):
        big.copy_(small)
    args = (*args[:3], *rings, *args[5:])
    o = decode_attention(*args, window=None, backend="triton", n_splits=2, block_n=16)
    assert rel_err(o, ref) < 1e-5
