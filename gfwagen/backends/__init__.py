"""Backends: each runs its templates on torch tensors behind the same calls (a forward that
returns (o, lse), and a backward that returns (dq, dk, dv, dlog_gate)), so that the op's
dispatch and the tuner never branch on a backend's internals.

- triton_backend: the CUDA kernels (and, under TRITON_INTERPRET=1, the same kernels on the
  CPU for tests);
- tvm_backend: TensorIR kernels built for llvm (the CPU) and CUDA.
"""
