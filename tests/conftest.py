import os

import pytest
import torch

# Without a GPU the Triton templates run in Triton's interpreter. It must be chosen before the
# templates are first imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_takes_float_args_as_fp32() -> None:
    """A compiled Triton kernel takes a Python float argument as fp32 (Triton types it so),
    but the interpreter computes with the float64 value. So a scale that fp32 holds as zero
    (1e-116) gave NaN on the H200 and the right answer here (RESULTS.md session 51). The
    interpreter now sees what the GPU sees."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    as_given = interpreter._implicit_cvt

    def convert(arg):
        if isinstance(arg, float):
            handle = interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32)
            return tl.tensor(handle, tl.float32)
        return as_given(arg)

    interpreter._implicit_cvt = convert


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_takes_float_args_as_fp32()


@pytest.fixture(autouse=True)
def _no_launch_plans_from_earlier_tests():
    """Launch plans keep what a call decided (gfwagen.launch_plans): a test that patches
    gfwagen.dispatch must not find a plan an earlier test recorded for the same signature."""
    from gfwagen import launch_plans

    launch_plans.clear()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def log_gpu_errors(label: str, errs: dict) -> None:
    """One `GPUERR label name=err ...` line on stdout and, when GFWAGEN_GPU_LOG names a file,
    appended there: pytest-xdist workers' stdout is not shown, and a run's log carries the
    numbers."""
    line = f"GPUERR {label} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items())
    print(line)
    if os.environ.get("GFWAGEN_GPU_LOG"):
        with open(os.environ["GFWAGEN_GPU_LOG"], "a") as f:
            f.write(line + "\n")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e||, in float64. Where the exact answer is zero (W = 1 makes dq and dk
    zero) the float64 reference is zero or rounding noise: for float32 inputs at W = 1 its
    norm is ~3e-13 over 1.5M elements, and dividing by it turns the kernel's float32 rounding
    (RMS ~2e-7) into a "relative error" of 1e8. Below an RMS of 1e-9, far under any real
    gradient of these O(1) inputs and far over float64 noise, the reference counts as zero and
    the result is the largest absolute error instead."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.isfinite(a).all(), "non-finite values in result"
    if not a.numel():
        return 0.0
    if e.norm().item() <= 1e-9 * e.numel() ** 0.5:
        return (a - e).abs().max().item()
    return ((a - e).norm() / e.norm()).item()


def make_inputs(B, T, Hq, Hkv, D, Dv, dtype, gated, device="cpu", gate_scale=1.0, seed=None):
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(os.urandom(4), "little") if seed is None else seed)
    q = torch.randn(B, T, Hq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, T, Hkv, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, T, Hkv, Dv, generator=g).to(device=device, dtype=dtype)
    log_gate = None
    if gated:
        # Realistic gates: log-sigmoid of a logit, in (-inf, 0), mostly near 0.
        log_gate = (torch.nn.functional.logsigmoid(torch.randn(B, T, Hq, generator=g) + 3.0)
                    * gate_scale).to(device)
    return q, k, v, log_gate
