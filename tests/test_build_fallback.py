"""A tuned config whose kernel does not build falls back to the default, with one warning, and
W >= T problems look up the causal kernel they run. Session 15 on the H200: a window class's
tuned dq tiles (128x128, 8 warps, tma) crashed ptxas in the causal variant that a W >= T
problem runs; the op raised from deep in Triton."""

import warnings

import pytest
import torch
from triton.runtime.errors import PTXASError

from gfwagen import dispatch
from gfwagen.backends import triton_backend as tb
from gfwagen.heuristics import default_config
from gfwagen.spec import KernelConfig, Problem, effective_window

BAD = KernelConfig(block_m=128, block_n=128, num_warps=8, num_stages=2, extra=(("tma", True),))
CRASH = "`ptxas` failed with error code -11"


@pytest.mark.parametrize("window, seqlen, expected", [
    (4096, 1100, 0), (1100, 1100, 0), (1099, 1100, 1099), (None, 50, 0), (1, 1, 0), (1, 2, 1)])
def test_effective_window(window, seqlen, expected):
    assert effective_window(window, seqlen) == expected


def test_a_window_covering_the_sequence_looks_up_the_causal_kernel():
    q = torch.empty(1, 1100, 8, 128)
    assert dispatch._spec("triton", "fwd", q, q, 4096, True, 1).window == 0
    assert dispatch._spec("triton", "fwd", q, q, 1000, True, 1).window == 1024
    assert Problem(1, 1100, 8, 2, 128, 128, 4096, "bf16").spec("triton", "bwd_q").window == 0
    assert Problem(1, 8192, 8, 2, 128, 128, 4096, "bf16").spec("triton", "bwd_q").window == 4096


def test_launch_build_failures_name_the_pass_and_config():
    with pytest.raises(tb.KernelBuildError, match=r"Triton bwd_q kernel did not build on "
                                                  r"KernelConfig\(block_m=128.*error code -11"):
        with tb._launching(torch.empty(1), "bwd_q", BAD):
            raise PTXASError(CRASH)
    with pytest.raises(ValueError, match="not a build failure"):  # other errors pass through
        with tb._launching(torch.empty(1), "bwd_q", BAD):
            raise ValueError("not a build failure")


@pytest.fixture
def tuned_bad(monkeypatch):
    """The dispatch as on a GPU whose database hands every Triton pass BAD."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton on CPU tensors
    monkeypatch.setattr(dispatch, "_consults_database", lambda spec, device: True)
    monkeypatch.setattr(dispatch, "_lookup", lambda spec, bucket, dev: BAD)
    monkeypatch.setattr(dispatch, "_unbuildable", set())


def _inputs():
    q = torch.randn(1, 100, 2, 64)
    return q, q.clone(), q.clone()


def test_forward_falls_back_to_the_default_once(tuned_bad, monkeypatch):
    seen = []

    def fake_forward(q, k, v, log_gate, window, scale, cfg, segs, gate):
        seen.append(cfg)
        if cfg == BAD:
            raise tb.KernelBuildError("fwd", cfg, PTXASError(CRASH))
        return "ran"

    monkeypatch.setattr(tb, "forward", fake_forward)
    q, k, v = _inputs()
    default = default_config(dispatch._spec("triton", "fwd", q, v, 32, False, 1), 128)
    with pytest.warns(RuntimeWarning, match=r"fwd kernel did not build.*Running the default"):
        assert dispatch.run_forward(q, k, v, None, 32, None, "triton") == "ran"
    assert seen == [BAD, default]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: straight to the default
        assert dispatch.run_forward(q, k, v, None, 32, None, "triton") == "ran"
    assert seen[2:] == [default]


def test_a_default_that_does_not_build_raises(tuned_bad, monkeypatch):
    def fake_forward(q, k, v, log_gate, window, scale, cfg, segs, gate):
        raise tb.KernelBuildError("fwd", cfg, PTXASError(CRASH))

    monkeypatch.setattr(tb, "forward", fake_forward)
    q, k, v = _inputs()
    with pytest.warns(RuntimeWarning), pytest.raises(tb.KernelBuildError, match="error code"):
        dispatch.run_forward(q, k, v, None, 32, None, "triton")


def test_backward_falls_back_per_pass(tuned_bad, monkeypatch):
    seen = []

    def fake_backward(do, q, k, v, o, lse, log_gate, window, scale, cfg_kv, cfg_q, stored,
                      segs, gate):
        seen.append((cfg_kv, cfg_q))
        if cfg_q == BAD:  # dq's tuned tiles fail; dk/dv's build
            raise tb.KernelBuildError("bwd_q", cfg_q, PTXASError(CRASH))
        return "grads"

    monkeypatch.setattr(tb, "backward_preferring_stored", fake_backward)
    q, k, v = _inputs()
    default_q = default_config(dispatch._spec("triton", "bwd_q", q, v, 32, False, 1), 128)
    with pytest.warns(RuntimeWarning, match="bwd_q kernel did not build"):
        assert dispatch.run_backward(q, q, k, v, q, None, None, 32, None, "triton") == "grads"
    assert seen == [(BAD, BAD), (BAD, default_q)]


def test_a_stored_ds_config_that_does_not_build_means_recomputing(tuned_bad):
    spec = dispatch._spec("triton", "bwd_ds", torch.empty(1, 100, 2, 64),
                          torch.empty(1, 100, 2, 64), 32, True, 1)
    err = tb.KernelBuildError("bwd_ds", BAD, PTXASError(CRASH))
    with pytest.warns(RuntimeWarning, match="Running the recomputing backward"):
        dispatch._passed_over(spec, err, 100, torch.device("cpu"))
    assert (spec, BAD, "cpu") in dispatch._unbuildable
    with pytest.raises(tb.KernelBuildError):  # the same failure twice is not papered over
        dispatch._passed_over(spec, err, 100, torch.device("cpu"))
