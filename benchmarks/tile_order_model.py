#!/usr/bin/env python3
"""How much could persistent or longest-first tile scheduling gain the forward? A list-scheduling
model, no GPU: each query tile costs its key-tile count plus one (its loads and epilogue), and
the GPU's block slots (SMs x blocks per SM) take tiles greedily in a given order. Prints the
makespan over the average load for the launch order the kernels use (query tile fastest, then
batch x head), that order reversed within a head, and longest first. RESULTS, session 15.

    python benchmarks/tile_order_model.py
"""

from __future__ import annotations

import heapq
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SHAPES  # noqa: E402

# (block_m, block_n) of the shipped gated forward configs (tuning_db/h200.jsonl) and the blocks
# per SM they are taken to reach: S5's three as session 14 counted them, S4's 8-warp tile one,
# two for the other four-warp tiles (an estimate: their registers allow two or three)
TILES = {"S1": (64, 32, 2), "S2": (64, 64, 2), "S3": (64, 64, 2), "S4": (128, 128, 1),
         "S5": (64, 64, 3)}
SMS = 132


def tile_costs(T: int, W: int, block_m: int, block_n: int) -> list[int]:
    """Per query tile: the key tiles its window touches, plus one."""
    costs = []
    for i in range(-(-T // block_m)):
        lo = max(0, (i * block_m - W + 1) // block_n)
        hi = ((i + 1) * block_m - 1) // block_n
        costs.append(hi - lo + 2)
    return costs


def makespan(costs: list[int], slots: int) -> float:
    free = [0.0] * slots
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def orders(shape, block_m: int, block_n: int) -> dict[str, list[int]]:
    per_head = tile_costs(shape.T, shape.W, block_m, block_n)
    launch = per_head * (shape.B * shape.H)
    return {"launch": launch, "reversed": per_head[::-1] * (shape.B * shape.H),
            "longest first": sorted(launch, reverse=True)}


def main() -> None:
    for name, (bm, bn, per_sm) in TILES.items():
        slots = SMS * per_sm
        runs = orders(SHAPES[name], bm, bn)
        avg = sum(runs["launch"]) / slots
        print(f"{name} {bm}x{bn}, {per_sm}/SM: " + ", ".join(
            f"{k} {makespan(v, slots) / avg:.4f}" for k, v in runs.items()))


if __name__ == "__main__":
    main()
