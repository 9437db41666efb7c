import os

import pytest
import torch

# Without a GPU the Triton templates run in Triton's interpreter. It must be chosen before the
# templates are first imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e||, in float64. Against an all-zero reference (W = 1 makes dq and dk
    exactly zero) it is the largest absolute value instead: rounding noise is then small in
    absolute terms but would be infinite relative to zero."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.isfinite(a).all(), "non-finite values in result"
    if e.norm().item() == 0.0:
        return a.abs().max().item() if a.numel() else 0.0
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
