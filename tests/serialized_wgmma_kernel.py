"""A kernel that ptxas is known to serialize (C7515): the control that shows
test_triton_compile's check for that warning can fail. An accumulator carried from one
pipelined loop into the next, as the dk/dv kernel's three loops carried dk and dv."""

import triton
import triton.language as tl


@triton.jit
def two_loops(A, B, C, K, BM: tl.constexpr, BK: tl.constexpr):
    offs_m = tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    acc = tl.zeros([BM, BM], tl.float32)
    for k0 in tl.range(0, K // 2, BK):
        a = tl.load(A + offs_m[:, None] * K + k0 + offs_k[None, :])
        b = tl.load(B + offs_m[:, None] * K + k0 + offs_k[None, :])
        acc += tl.dot(a, tl.trans(b))
    for k0 in tl.range(K // 2, K, BK):
        a = tl.load(A + offs_m[:, None] * K + k0 + offs_k[None, :])
        b = tl.load(B + offs_m[:, None] * K + k0 + offs_k[None, :])
        acc += tl.exp2(tl.dot(a, tl.trans(b)))
    tl.store(C + offs_m[:, None] * BM + offs_m[None, :], acc)


def build(num_stages: int):
    """The control compiled for sm_90 as an OfflineBuild."""
    from triton.backends.compiler import GPUTarget

    from gfwagen.offline import OfflineBuild

    src = triton.compiler.ASTSource(
        fn=two_loops,
        signature={"A": "*bf16", "B": "*bf16", "C": "*fp32", "K": "i32", "BM": "constexpr",
                   "BK": "constexpr"},
        constexprs={(4,): 64, (5,): 64},
        attrs={(i,): [["tt.divisibility", 16]] for i in range(4)})
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=4, num_stages=num_stages))
    return OfflineBuild("sm_90", out.asm["ptx"], out.asm["cubin"], out.metadata.shared, None,
                        None)
