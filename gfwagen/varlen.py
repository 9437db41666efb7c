"""Packed variable-length batches (FlashAttention's convention): B = 1, the sequences laid
end to end along T, and cu_seqlens = [0, len_0, len_0 + len_1, ..., T].

The kernels do not take cu_seqlens itself but one start and one end per position, so a tile
finds its rows' sequences with two loads and no search. The window and the gate restart at
every sequence start: a pair (i, j) counts only when j >= start(i). The gate needs nothing
else: for i and j in one sequence, c_i - c_j of the global prefix sum equals the sequence's
own, and its gradient restarts through `gate.gate_grad_from_sums(..., seg_end)`.
"""

from __future__ import annotations

import torch


def segment_bounds(cu_seqlens: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end): int32 [T] on cu_seqlens' device, start[t] <= t < end[t] <= T, computed
    without reading cu_seqlens on the host (no device sync; safe in CUDA graphs).

    Clamped so that every kernel stays in bounds and every row keeps its own key even when
    cu_seqlens is malformed (its values are only checked on request: validate.py)."""
    cu = cu_seqlens.to(torch.int64)
    pos = torch.arange(T, device=cu.device, dtype=torch.int64)
    n = cu.numel() - 1
    seq = torch.searchsorted(cu[1:].contiguous(), pos, right=True).clamp_(max=max(n - 1, 0))
    start = torch.minimum(cu[seq], pos).clamp_(min=0)
    end = torch.maximum(cu[seq + 1], pos + 1).clamp_(max=T)
    return start.to(torch.int32), end.to(torch.int32)


def lengths(cu_seqlens: torch.Tensor) -> list[int]:
    """The sequence lengths on the host (a device sync on CUDA: CPU paths only)."""
    cu = cu_seqlens.tolist()
    return [b - a for a, b in zip(cu[:-1], cu[1:])]
