"""How a tuning study spends its trials around the TPE sampler: the best configs of the
nearest problems already tuned (warm start) and an initial design of tiles first, TPE in the
middle, and a closing refinement of the best tiles' pipelines.

Why: measured on the H200's S1 sweeps (benchmarks/RESULTS.md), the time of a config is
decided by its tile (block_m, block_n, warps) and then by a rugged pipeline axis (stages,
switches): 32x64 w4 takes 0.966 ms at 1 stage and 1.148 ms at 2 in S1's dk/dv pass. Plain
multivariate TPE with a quarter of the sweep's trials spent them on every stage of a few
mediocre tiles and missed the best tile in 6 of 10 backward studies (replayed offline,
benchmarks/tuner_replay.py). Measuring every tile once at the default pipeline, then letting
TPE choose, then trying the remaining pipelines of the best tiles found a config within 3%
of the sweep's best in every replay.

A "tile" is a config without its pipeline knobs; both backends' configs split that way.
"""

from __future__ import annotations

import dataclasses
import math

from gfwagen.spec import KernelConfig, KernelSpec
from gfwagen.tuner import space

TILE_FIELDS = ("block_m", "block_n", "num_warps")
DESIGN_SHARE = 0.5  # at most this share of a study's trials goes to the initial design
WARM_START = 3  # best configs of the nearest tuned problems, tried right after the default
REFINE_SHARE = 0.25  # the last quarter of a driver's trials refines the best tiles


def tile_of(config: KernelConfig) -> tuple:
    return tuple(getattr(config, f) for f in TILE_FIELDS)


def design_budget(n_trials: int) -> int:
    return int(n_trials * DESIGN_SHARE)


def refine_budget(n_trials: int) -> int:
    return int(round(n_trials * REFINE_SHARE))


def _distance(a: tuple, b: tuple) -> float:
    return sum(abs(math.log2(x) - math.log2(y)) for x, y in zip(a, b, strict=True))


def design(spec: KernelSpec, default: KernelConfig, n: int, knobs=None,
           gpu: bool = True) -> list[KernelConfig]:
    """Up to n configs, one per feasible tile other than the default's, each with the
    default's pipeline (stages and switches), nearest tiles to the default's first, so that
    a small budget stays near what the heuristic already judged good."""
    if n <= 0:
        return []
    home = tile_of(default)
    out, seen = [], {home}
    tiles = sorted({tile_of(c) for c in space.enumerate_configs(spec, gpu=gpu, knobs=knobs)},
                   key=lambda t: (_distance(t, home), t))
    for t in tiles:
        if t in seen:
            continue
        cfg = KernelConfig(block_m=t[0], block_n=t[1], num_warps=t[2],
                           num_stages=default.num_stages, extra=default.extra)
        if space.feasible(spec, cfg, gpu=gpu)[0]:
            seen.add(t)
            out.append(cfg)
            if len(out) == n:
                break
    return out


def refinements(spec: KernelSpec, measured: dict[KernelConfig, float], taken: set,
                knobs=None, gpu: bool = True) -> list[KernelConfig]:
    """The feasible configs not in `taken` that share a tile with a measured one, the best
    tiles first (by their fastest measurement), within a tile the stage counts nearest to
    that tile's fastest config first."""
    best: dict[tuple, KernelConfig] = {}
    for cfg, ms in measured.items():
        t = tile_of(cfg)
        if t not in best or ms < measured[best[t]]:
            best[t] = cfg
    by_tile: dict[tuple, list[KernelConfig]] = {}
    for c in space.enumerate_configs(spec, gpu=gpu, knobs=knobs):
        if c not in taken and tile_of(c) in best:
            by_tile.setdefault(tile_of(c), []).append(c)
    out = []
    for t in sorted(best, key=lambda t: measured[best[t]]):
        s = best[t].num_stages
        out += sorted(by_tile.get(t, []), key=lambda c: (abs(c.num_stages - s), c.num_stages,
                                                          sorted(c.extra)))
    return out


def own_best(entries: list[dict], spec: KernelSpec, seqlen: int,
             model: str) -> KernelConfig | None:
    """The best config that `entries` (TuningDB.best_entries) hold for this very problem
    class (spec and sequence-length bucket) on this GPU model, or None."""
    from gfwagen.db.records import seqlen_bucket, spec_class

    own, bucket = spec_class(spec).as_dict(), seqlen_bucket(seqlen)
    for e in entries:
        if e.get("model") == model and e["spec"] == own and e["seqlen_bucket"] == bucket:
            return KernelConfig.from_dict(e["config"])
    return None


def knob_flips(best: KernelConfig, spec: KernelSpec, knobs: tuple[str, ...],
               gpu: bool) -> list[KernelConfig]:
    """`best` itself, then `best` with each knob flipped, the feasible ones: what a new knob
    (or a new template) does to a known winner, measured before the search wanders off."""
    out = [best]
    for k in (k for k in knobs if k in space.KNOBS):  # not TVM's TENSOR_CORE pseudo-knob
        if space.idle_knob(spec, k, best.block_m, best.block_n):
            continue  # the same kernel
        f = flipped(best, k)
        if space.feasible(spec, f, gpu=gpu)[0]:
            out.append(f)
    return out


def flipped(config: KernelConfig, knob: str) -> KernelConfig:
    """config with the boolean switch `knob` (absent: off) turned the other way."""
    extra = tuple((n, v) for n, v in config.extra if n != knob)
    return dataclasses.replace(config, extra=extra + ((knob, not config.get(knob, False)),))


def warm_start(entries: list[dict], spec: KernelSpec, seqlen: int, model: str,
               k: int = WARM_START) -> list[KernelConfig]:
    """The best configs that `entries` (TuningDB.best_entries) record on the same GPU model
    for the k nearest other problems of the same backend, pass, head and value dims, dtype
    and gate (nearest in log2 of window, sequence length and GQA group), so that tuning S2
    starts from what won at S1. The problem's own entry is left out: a study never starts
    from its own answer. An ungated Triton problem starts from its gated class's best, which
    the op runs for it until it has an entry of its own (db.lookup's stand-in): a first
    ungated tune must not pick tiles slower than those (at d64 W4096, six trials without
    them picked a forward 2.3% slower, benchmarks/RESULTS.md, session 33)."""
    from gfwagen.db.records import seqlen_bucket, spec_class

    own, bucket = spec_class(spec).as_dict(), seqlen_bucket(seqlen)
    same = ("backend", "pass_", "head_dim", "value_dim", "dtype", "gated")
    ranked = []
    if not spec.gated and spec.backend == "triton":
        twin = own_best(entries, spec.replace(gated=True), seqlen, model)
        if twin is not None:
            ranked.append((-1.0, twin))
    for e in entries:
        s = e["spec"]
        if e.get("model") != model or any(s.get(f) != own[f] for f in same):
            continue
        if s == own and e["seqlen_bucket"] == bucket:
            continue
        w = s["window"] or e["seqlen_bucket"]  # full causal: the window is the sequence
        d = _distance((w, e["seqlen_bucket"], s["group"]),
                      (own["window"] or bucket, bucket, own["group"]))
        ranked.append((d, KernelConfig.from_dict(e["config"])))
    out = []
    for _, cfg in sorted(ranked, key=lambda x: (x[0], repr(x[1]))):
        if cfg not in out:
            out.append(cfg)
    return out[:k]
