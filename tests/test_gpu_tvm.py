"""The TVM backend on a CUDA GPU (skipped without one, or without TVM's CUDA runtime):
forward (tensor cores for fp16/bf16) and backward against float64, every shape class."""

import pytest
import torch
from conftest import log_gpu_errors, make_inputs, rel_err
from test_gpu import CASES, DTYPES, check_case_against_float64

from gfwagen.reference import reference_forward

tvm_backend = pytest.importorskip("gfwagen.backends.tvm_backend")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not tvm_backend.HAVE_TVM, reason="apache-tvm not installed"),
]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_tvm_matches_float64(case, dtype_name):
    check_case_against_float64(case, dtype_name, "tvm")


@pytest.mark.parametrize("cfg", [(16, 16, 1, 16), (32, 32, 2, 32), (64, 128, 2, 128),
                                 (128, 64, 1, 64), (128, 128, 2, 128), (64, 64, 2, 32),
                                 (64, 128, 1, 32),
                                 # more keys per tile than threads (the gate staging loops)
                                 (16, 64, 1, 64), (32, 128, 2, 32)])
def test_gpu_tvm_tensor_core_configs(cfg):
    """Every tile shape the tuner may pick gives the same answer (T and W off the tiles)."""
    from gfwagen.spec import KernelConfig

    bm, bn, ns, sn = cfg
    q, k, v, g = make_inputs(2, 777, 8, 2, 128, 128, torch.bfloat16, True, device="cuda")
    config = KernelConfig(block_m=bm, block_n=bn, num_warps=bm // 16, num_stages=ns,
                          extra=(("sub_n", sn),) if sn != bn else ())
    o, lse = tvm_backend.tvm_forward(q, k, v, g, 200, None, config)
    d = [t.double() for t in (q, k, v)]
    o64, lse64 = reference_forward(*d, g.double(), 200)
    errs = {"o": rel_err(o, o64), "lse": rel_err(lse, lse64)}
    log_gpu_errors(f"tvm-tc {bm}x{bn}s{ns}/{sn}", errs)
    assert errs["o"] < 1e-2 and errs["lse"] < 1e-4, errs


def test_gpu_tvm_runs_on_the_current_stream():
    """A kernel launched under another stream is ordered after that stream's earlier work."""
    q, k, v, g = make_inputs(1, 1024, 4, 4, 64, 64, torch.float16, True, device="cuda")
    o_ref, _ = tvm_backend.tvm_forward(q, k, v, g, 128)  # compiled before the timed part
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # the inputs are written after a long GPU sleep
        q2 = q * 1.0
        o, _ = tvm_backend.tvm_forward(q2, k, v, g, 128)
    s.synchronize()
    assert torch.equal(o, o_ref)


def test_gpu_tvm_misaligned_views():
    """Contiguous views 2 bytes off a 16-byte boundary (cp.async needs the boundary)."""
    B, T, H, D = 1, 300, 2, 64
    n = B * T * H * D
    store = torch.randn(3 * n + 3, device="cuda", dtype=torch.bfloat16)
    q, k, v = (store[1 + i * n:1 + (i + 1) * n].view(B, T, H, D) for i in range(3))
    assert q.data_ptr() % 16 == 2
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda") + 3)
    o, _ = tvm_backend.tvm_forward(q, k, v, g, 77)
    o_ref, _ = tvm_backend.tvm_forward(q.clone(), k.clone(), v.clone(), g, 77)
    assert torch.equal(o, o_ref)
