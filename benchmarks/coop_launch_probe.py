#!/usr/bin/env python3
"""Does TVM 0.27 launch a kernel cooperatively when it carries `tirx.use_cooperative_launch`?

A grid barrier inside the persistent forward (its records made in a prologue instead of a
launch of their own) is safe only if every block is resident at once, which a cooperative
launch guarantees or refuses. Here each block arrives on a global counter and spins until
every block has: co-resident grids finish; a grid past co-residency hangs when launched
plainly, and a cooperative launch should refuse it (cudaErrorCooperativeLaunchTooLarge).

    for r in plain-small coop-small coop-big plain-big; do
        timeout 40 python benchmarks/coop_launch_probe.py $r; echo "$r rc=$?"; done

H200, TVM 0.27 (session 50): both small grids finished (132 of 132); coop-big hung like
plain-big, killed at 40 s with no error. So the function attribute does not make TVM launch
cooperatively, as far as this shows: the barrier would need a launch of our own."""
import sys

import torch
import tvm
import tvm_ffi
from tvm.script import tirx as T

_BAR = ('__forceinline__ __device__ int gfwa_grid_bar(int* c, int n) {\n'
        '  __syncthreads();\n'
        '  if (threadIdx.x == 0) { atomicAdd(c, 1); while (atomicAdd(c, 0) < n) {} }\n'
        '  __syncthreads(); return 0; }\n')


def make(nb, coop):
    attrs = {"global_symbol": "k", "tirx.noalias": True}
    if coop:
        attrs["tirx.use_cooperative_launch"] = True

    @T.prim_func
    def k(c: T.Buffer((1,), "int32"), out: T.Buffer((nb * 128,), "int32")):
        T.func_attr(attrs)
        for bx in T.thread_binding(nb, thread="blockIdx.x"):
            for tx in T.thread_binding(128, thread="threadIdx.x"):
                out[bx * 128 + tx] = T.cuda.func_call("gfwa_grid_bar", T.address_of(c[0]), nb,
                                                      source_code=_BAR, return_type="int32")
    return k


if __name__ == "__main__":
    mode, size = sys.argv[1].split("-")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    # big: 40 blocks of 128 threads an SM, past the 2048 threads an SM holds
    nb = sms if size == "small" else sms * 40
    ex = tvm.compile(tvm.IRModule({"k": make(nb, mode == "coop")}),
                     target={"kind": "cuda", "arch": "sm_90"})
    c = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.full((nb * 128,), -1, dtype=torch.int32, device="cuda")
    try:
        with tvm_ffi.use_torch_stream():
            ex["k"](c, out)
        torch.cuda.synchronize()
        print(sys.argv[1], "finished: counter", c.item(), "of", nb, flush=True)
    except Exception as e:  # noqa: BLE001
        print(sys.argv[1], "raised:", type(e).__name__, str(e)[:300], flush=True)
