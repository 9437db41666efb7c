"""The generator: a kernel is (template, spec, config), and this module owns its on-disk cache.

    kernel_key(spec, config)          stable hash of the template files the pass uses (their
                                      bytes), the spec, the config and the toolchain versions
    specialized_source(spec, config)  what gets compiled, readable: Triton: the constexpr
                                      bindings the launcher passes, then the template files;
                                      TVM: the PrimFunc's TVMScript
    generate(spec, config)            writes source + manifest.json into
                                      cache_root()/kernels/<backend>/<key>/ (idempotent)
    build(spec, config, device)       compiles ahead of time by running the pass once on tiny
                                      inputs; Triton keeps the binary in its own on-disk cache
                                      (the manifest says where), TVM/llvm exports kernel.so

Running a kernel stays with the backends (gfwagen.backends.*): they load the template by path
and launch it with the same bindings listed here, so the generated source is the artefact one
reads, diffs and keys on, not a second copy that could drift from what runs.

TVM's backward takes one config for both of its kernels (tvm_backend.tvm_backward), so the
tuner tunes it as pass "bwd_kv"; a TVM "bwd_q" spec still generates its own PrimFunc here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path

from gfwagen.spec import KernelConfig, KernelSpec, stable_hash
from gfwagen.template_loader import template_path, template_source_hash

# The template file each (backend, pass) launches; its relative imports are followed.
PASS_TEMPLATE = {"fwd": "fwd", "bwd_kv": "bwd", "bwd_q": "bwd", "bwd_ds": "bwd"}
# Templates a TVM pass may build instead of its pass file: the GPU forward's tensor-core
# ones (tvm_backend picks them by config), which the pass file does not import.
TVM_ALTERNATES = {"fwd": ("fwd_cuda", "fwd_wgmma")}
LAUNCHERS = {"fwd": "launch_forward", "bwd_kv": "launch_dkdv", "bwd_q": "launch_dq",
             "bwd_ds": "launch_dkdv + launch_dq_ds"}
MANIFEST = "manifest.json"
TVM_LIBRARY = "kernel.so"
_REL_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import\s", re.MULTILINE)
# the one tile height that is not a power of two: templates/tvm/fwd_wgmma.py's pingpong
# schedule with three consumer warpgroups of 64 rows
WGMMA_THREE_ROWS = 192


def wgmma_num_warps(block_m: int) -> int:
    """num_warps of a TVM wgmma forward config: a warp per 16 rows; three consumers count
    their producer's too (KernelConfig takes powers of two; the template reads none of it)."""
    return 16 if block_m == WGMMA_THREE_ROWS else max(1, block_m // 16)


def gate_chunk() -> int:
    try:
        from gfwagen.gate import GATE_CHUNK
    except ImportError:  # pragma: no cover - the gate module's constant moved
        return 256
    return int(GATE_CHUNK)


def cache_root() -> Path:
    """$GFWAGEN_CACHE_DIR, else $XDG_CACHE_HOME/gfwagen, else ~/.cache/gfwagen."""
    env = os.environ.get("GFWAGEN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "gfwagen"


def _require_template_backend(spec: KernelSpec) -> None:
    if spec.backend not in ("triton", "tvm"):
        raise ValueError(f"backend {spec.backend!r} has no templates; the generator handles "
                         "'triton' and 'tvm'")


def template_files(spec: KernelSpec) -> list[str]:
    """Names (no .py) of the template files the spec's pass uses: its pass file and, in
    order, every sibling it imports relatively."""
    _require_template_backend(spec)
    out, todo = [], [PASS_TEMPLATE[spec.pass_]]
    if spec.backend == "tvm":
        todo += TVM_ALTERNATES.get(spec.pass_, ())
    while todo:
        name = todo.pop(0)
        if name in out:
            continue
        out.append(name)
        todo += _REL_IMPORT.findall(template_path(spec.backend, name).read_text())
    return out


def check_config(spec: KernelSpec, config: KernelConfig) -> None:
    """Raise ValueError when the backend's templates cannot take `config`."""
    if spec.backend == "triton":
        chunk = gate_chunk()
        for name in ("block_m", "block_n"):
            v = getattr(config, name)
            if v < 16 or chunk % v:
                raise ValueError(f"triton: {name}={v} must be a power of two >= 16 dividing "
                                 f"the gate chunk {chunk}")
        n = config.get("maxnreg", False)
        if n is not False and not (type(n) is int and 32 <= n <= 255 and n % 8 == 0):
            raise ValueError(f"triton: maxnreg={n!r} must be a multiple of 8 in [32, 255] "
                             "(registers per thread), or left out")
        if n and spec.pass_ != "fwd":
            raise ValueError(f"triton: maxnreg is a forward knob; the {spec.pass_} "
                             "launchers take none")
        if config.get("bias_mma", False) and spec.pass_ != "fwd":
            raise ValueError(f"triton: bias_mma is a forward knob; the {spec.pass_} "
                             "kernels read the gate tables")
    elif spec.backend == "tvm" and config.block_m & (config.block_m - 1):
        if not (config.block_m == WGMMA_THREE_ROWS and spec.pass_ == "fwd"
                and config.get("wgmma", False) and config.get("pingpong", False)):
            raise ValueError(f"tvm: block_m={config.block_m} must be a power of two; only the "
                             f"wgmma pingpong forward also takes {WGMMA_THREE_ROWS} (three "
                             "consumer warpgroups)")


def _toolchain() -> dict:
    from gfwagen.db.fingerprint import toolchain

    # kernel_key hashes the templates the pass reads itself: an edit elsewhere keeps its cache
    return {k: v for k, v in toolchain().items() if k != "templates"}


def kernel_key(spec: KernelSpec, config: KernelConfig, target: str | None = None) -> str:
    """Stable across processes; changes with any template byte the pass uses, the spec, the
    config, the toolchain versions and (TVM) the target ('cpu' or 'gpu')."""
    _require_template_backend(spec)
    files = {f"{spec.backend}/{n}.py": template_source_hash(spec.backend, n)
             for n in template_files(spec)}
    return stable_hash({"templates": files, "spec": spec.as_dict(), "config": config.as_dict(),
                        "toolchain": _toolchain(), "target": _target(spec, target)}, n=20)


def _target(spec: KernelSpec, target: str | None) -> str:
    if spec.backend == "triton":
        return "cuda"
    target = target or "cpu"
    if target not in ("cpu", "gpu"):
        raise ValueError(f"tvm target must be 'cpu' or 'gpu', got {target!r}")
    return target


def dot_precision(dtype: str) -> str:
    """What triton_backend passes as DOT_PREC (fp32 inputs get ieee dots, not tf32)."""
    return "ieee" if dtype == "fp32" else "tf32"


def constexpr_bindings(spec: KernelSpec, config: KernelConfig) -> dict:
    """The compile-time constants the Triton launcher binds for this (spec, config) on a
    sequence longer than the window and the tiles (shorter sequences shrink the tiles and
    turn the window into 0 = full causal, as the backend's _fit / kernel_window do)."""
    return {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "HEAD_D": spec.head_dim,
            "HEAD_DV": spec.value_dim, "WINDOW": spec.window, "GATED": spec.gated,
            "GROUP": spec.group, "GATE_CHUNK": gate_chunk(),
            "DOT_PREC": dot_precision(spec.dtype), "num_warps": config.num_warps,
            "num_stages": config.num_stages}


def specialized_source(spec: KernelSpec, config: KernelConfig, target: str | None = None) -> str:
    check_config(spec, config)
    key = kernel_key(spec, config, target)
    head = [f"# gfwagen generated kernel: {spec.backend} {spec.pass_}  key {key}",
            f"# spec:   {json.dumps(spec.as_dict(), sort_keys=True)}",
            f"# config: {json.dumps(config.as_dict(), sort_keys=True)}"]
    if spec.backend == "tvm":
        from gfwagen.backends.tvm_backend import make_primfunc

        t = _target(spec, target)
        script = make_primfunc(spec, config, t).script()
        return "\n".join(head + [f"# target: {t} (TVMScript of the PrimFunc)", "", script, ""])
    files = template_files(spec)
    head += [f"# constexpr bindings of {PASS_TEMPLATE[spec.pass_]}.{LAUNCHERS[spec.pass_]} "
             "(WINDOW 0 = full causal; sequences no longer than the window or a tile run",
             "# with WINDOW=0 and tiles shrunk to the sequence):"]
    head += [f"#   {k} = {v!r}" for k, v in constexpr_bindings(spec, config).items()]
    parts = ["\n".join(head), ""]
    for n in files:
        parts += [f"# ---- templates/triton/{n}.py  sha256:"
                  f"{template_source_hash('triton', n)} ----",
                  template_path("triton", n).read_text()]
    return "\n".join(parts)


@dataclasses.dataclass(frozen=True)
class GeneratedKernel:
    key: str
    directory: Path
    source_path: Path
    created: bool  # False: found in the cache, nothing written

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def kernel_dir(spec: KernelSpec, config: KernelConfig, target: str | None = None) -> Path:
    return cache_root() / "kernels" / spec.backend / kernel_key(spec, config, target)


def _source_name(spec: KernelSpec) -> str:
    return f"{spec.pass_}.{'py' if spec.backend == 'triton' else 'tvmscript.py'}"


def generate(spec: KernelSpec, config: KernelConfig, target: str | None = None) -> GeneratedKernel:
    """Write the specialized source and its manifest into the cache, unless already there.
    The manifest is written last, so a directory with a manifest is complete."""
    key = kernel_key(spec, config, target)
    d = cache_root() / "kernels" / spec.backend / key
    src = d / _source_name(spec)
    if (d / MANIFEST).is_file() and src.is_file():
        return GeneratedKernel(key, d, src, created=False)
    text = specialized_source(spec, config, target)
    d.mkdir(parents=True, exist_ok=True)
    _write_atomic(src, text)
    manifest = {"key": key, "backend": spec.backend, "pass": spec.pass_,
                "target": _target(spec, target), "spec": spec.as_dict(),
                "config": config.as_dict(), "source": src.name,
                "templates": {f"{spec.backend}/{n}.py": template_source_hash(spec.backend, n)
                              for n in template_files(spec)},
                "toolchain": _toolchain(), "built": None}
    if spec.backend == "triton":
        manifest["constexprs"] = constexpr_bindings(spec, config)
    _write_atomic(d / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return GeneratedKernel(key, d, src, created=True)


# ---- ahead-of-time build -------------------------------------------------------------------

def _tiny_inputs(spec: KernelSpec, config: KernelConfig, device):
    """One kv head, one group of query heads, a sequence long enough that neither the tiles
    shrink nor the window collapses to full causal (both are compile-time constants)."""
    import torch

    from gfwagen.spec import DTYPES

    tile = max(config.block_m, config.block_n, 16)
    T = max(tile, spec.window + 1 if spec.window else tile)
    T = -(-T // tile) * tile
    dt = DTYPES[spec.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    H, Hkv = spec.group, 1

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    q, k, v = rnd(1, T, H, spec.head_dim), rnd(1, T, Hkv, spec.head_dim), rnd(1, T, Hkv,
                                                                               spec.value_dim)
    log_gate = None
    if spec.gated:
        log_gate = torch.nn.functional.logsigmoid(
            torch.randn(1, T, H, generator=g) + 3.0).to(device)
    return q, k, v, log_gate, rnd(1, T, H, spec.value_dim)


def triton_cache_dir() -> str:
    try:
        import triton

        return str(triton.knobs.cache.dir)
    except Exception:  # pragma: no cover - older triton
        return os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache")


def _build_triton(spec: KernelSpec, config: KernelConfig, device) -> dict:
    import torch

    from gfwagen.backends import triton_backend as tb
    from gfwagen.reference import reference_forward

    dev = torch.device(device if device is not None else "cuda")
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("building a triton kernel needs a CUDA device (Triton compiles "
                           "for the GPU it runs on)")
    q, k, v, g, do = _tiny_inputs(spec, config, dev)
    window = spec.window or None
    scale = spec.head_dim ** -0.5
    if spec.pass_ == "fwd":
        tb.forward(q, k, v, g, window, scale, config)
    else:
        o, lse = reference_forward(q, k, v, g, window, scale)
        if spec.pass_ == "bwd_ds":
            tb.backward(do, q, k, v, o, lse.float(), g, window, scale,
                        *tb.stored_configs(config), stored=True)
        else:
            st = tb.prepare_backward(do, q, k, v, o, lse.float(), g, window, scale)
            (tb.backward_kv if spec.pass_ == "bwd_kv" else tb.backward_q)(st, config)
    torch.cuda.synchronize(dev)
    return {"triton_cache_dir": triton_cache_dir(), "device": torch.cuda.get_device_name(dev)}


def _build_tvm(spec: KernelSpec, config: KernelConfig, kdir: Path, target: str) -> dict:
    # tvm_backend caches compiled modules in-process only and has no hook to take a prebuilt
    # one, so the exported library is written (and loadable via load_tvm_library) but the
    # backend still compiles on first use in each process.
    import tvm

    from gfwagen.backends import tvm_backend as vb

    if target != "cpu":
        ex = vb.build_cuda(spec, config)
        (kdir / f"{spec.pass_}.cu").write_text(vb.cuda_source(ex))
        return {"cuda_source": f"{spec.pass_}.cu"}
    tgt = vb._cpu_target("llvm")  # the backend's own target, so the library matches its build
    mod = tvm.compile(vb.make_primfunc(spec, config, "cpu"), target=tgt)
    lib = kdir / TVM_LIBRARY
    tmp = kdir / f".{TVM_LIBRARY}.tmp.so"
    mod.export_library(str(tmp))
    os.replace(tmp, lib)
    return {"library": TVM_LIBRARY, "llvm_target": tgt,
            "loaded_by_backend": hasattr(vb, "load_prebuilt")}


def load_tvm_library(spec: KernelSpec, config: KernelConfig):
    """The module `build` exported for a TVM/llvm kernel, or None when not built."""
    lib = kernel_dir(spec, config, "cpu") / TVM_LIBRARY
    if not lib.is_file():
        return None
    import tvm

    return tvm.runtime.load_module(str(lib))


def build(spec: KernelSpec, config: KernelConfig, device=None,
          target: str | None = None) -> GeneratedKernel:
    """generate(), then compile ahead of time and record it in the manifest. Already built
    (same key) -> nothing is compiled or written."""
    gk = generate(spec, config, target)
    man = gk.manifest()
    if man.get("built"):
        return gk
    import datetime as _dt

    if spec.backend == "triton":
        info = _build_triton(spec, config, device)
    else:
        info = _build_tvm(spec, config, gk.directory, _target(spec, target))
    man["built"] = {**info, "at": _dt.datetime.now(_dt.timezone.utc).isoformat()}
    _write_atomic(gk.manifest_path, json.dumps(man, indent=2, sort_keys=True) + "\n")
    return dataclasses.replace(gk, created=True)
