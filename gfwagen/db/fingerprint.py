"""Who measured: the device fingerprint and the toolchain, and their stable keys.

A fingerprint is a flat dict with the same fields on every machine (None where a field does
not apply), so its key is stable: a hash of all of its fields. Reading it never imports
triton or tvm (versions come from package metadata) and never initialises more of CUDA than
torch.cuda.get_device_properties does.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import platform
import re
from pathlib import Path

from gfwagen.spec import stable_hash
from gfwagen.template_loader import templates_hash

FINGERPRINT_FIELDS = ("kind", "name", "compute_capability", "sm_count", "memory_bytes",
                      "driver_version", "cuda_version", "processor")
TOOLCHAIN_FIELDS = ("torch", "triton", "tvm", "timer", "templates")
# Fields a toolchain record may lack (made before the field existed): they join the key only
# where set, so those records keep the keys they were stored under.
_LATER_FIELDS = ("timer", "templates")
# How the tuner times a candidate (gfwagen.tuner.timing). Part of the toolchain, so that times
# measured one way never compete for `best` with times measured another: until session 13 the
# timer slept before every timed call and measured bursts, which flattered some tiles by up to
# 10% at S4; its times stay in the databases as another toolchain's, used where nothing newer
# covers a problem. Records without the field (made before it) hash as they always did.
TIMER = "sustained-1"


def _cuda_driver_version() -> str | None:
    """The driver's CUDA version (cuDriverGetVersion, e.g. '12.8'): always readable where CUDA
    works, unlike NVML's driver string, so the device key does not depend on pynvml."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        v = ctypes.c_int(0)
        if cuda.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value:
            return f"{v.value // 1000}.{v.value % 1000 // 10}"
    return None


def _cpu_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _device_index(device) -> int:
    import torch

    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    d = torch.device(device)
    return d.index if d.index is not None else torch.cuda.current_device()


@functools.cache
def _cuda_fingerprint(index: int) -> dict:
    import torch

    p = torch.cuda.get_device_properties(index)
    return {
        "kind": "cuda",
        "name": p.name,
        "compute_capability": f"{p.major}.{p.minor}",
        "sm_count": int(p.multi_processor_count),
        "memory_bytes": int(p.total_memory),
        "driver_version": _cuda_driver_version(),
        "cuda_version": torch.version.cuda,
        "processor": None,
    }


@functools.cache
def _cpu_fingerprint() -> dict:
    return {
        "kind": "cpu",
        "name": "cpu",
        "compute_capability": None,
        "sm_count": os.cpu_count(),
        "memory_bytes": _cpu_memory_bytes(),
        "driver_version": None,
        "cuda_version": None,
        "processor": platform.processor() or platform.machine() or None,
    }


def device_fingerprint(device=None) -> dict:
    """The fingerprint of a CUDA device (index, torch.device or 'cuda:N'; None = current), or
    of the CPU when CUDA is not available. `sm_count` is the CPU count on a CPU."""
    import torch

    wants_cpu = device is not None and not isinstance(device, int) \
        and torch.device(device).type == "cpu"
    if wants_cpu or not torch.cuda.is_available():
        return dict(_cpu_fingerprint())
    return dict(_cuda_fingerprint(_device_index(device)))


def device_key(fp: dict) -> str:
    return stable_hash({f: fp.get(f) for f in FINGERPRINT_FIELDS})


def _dist_version(*names: str, module: str | None = None) -> str | None:
    """The first of the distributions `names` installed, else (module) the version its
    package's _version.py states."""
    for n in names:
        try:
            return importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return _source_version(module) if module else None


_VERSION_LINE = re.compile(r"""^__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", re.M)


def _source_version(module: str) -> str | None:
    """`module`'s version from its _version.py, read as text, without importing the package
    (find_spec of a top-level name runs none of it). An install without distribution
    metadata, such as the GPU host's TVM unpacked from a tarball, recorded "tvm": null in
    every toolchain until session 46, so TVM trials were taken under any TVM version."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or ()) if spec else ():
        try:
            m = _VERSION_LINE.search((Path(folder) / "_version.py").read_text())
        except OSError:
            continue
        if m:
            return m.group(1)
    return None


def toolchain() -> dict:
    """Versions of torch, triton and tvm (None for one that is not installed), the timer's,
    and the kernel templates' (template_loader.templates_hash): a template edited and
    re-tuned is another toolchain, so its times replace the old template's (`db export
    --newest`) instead of pooling with them in one config's median. Until session 19 they
    pooled: three re-tuned entries kept the old code's medians."""
    try:
        import torch

        torch_version = str(torch.__version__)
    except ImportError:
        torch_version = None
    return {
        "torch": torch_version,
        "triton": _dist_version("triton", "pytorch-triton"),
        "tvm": _dist_version("apache-tvm", "tvm", "mlc-ai-nightly", module="tvm"),
        "timer": TIMER,
        "templates": templates_hash(),
    }


def toolchain_key(tc: dict) -> str:
    return stable_hash({f: tc.get(f) for f in TOOLCHAIN_FIELDS
                        if f not in _LATER_FIELDS or tc.get(f) is not None})


_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro", "amd", "radeon", "gpu", "graphics"}
# Memory sizes and packaging that do not change the chip: 80gb, sxm4, pcie, hbm3, nvl...
_VARIANT = re.compile(r"^(\d+gb|sxm\d*|pcie|hbm\d*e?|nvl|nvlink|smx\d*|oam|mxm)$")


def gpu_model_name(fp: dict) -> str:
    """A short model name that ignores memory size and packaging: 'NVIDIA H200' -> 'h200',
    'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA A100-SXM4-80GB' -> 'a100',
    'NVIDIA GeForce RTX 4090' -> 'rtx4090'; 'cpu' for a CPU."""
    if fp.get("kind") == "cpu" or not fp.get("name"):
        return "cpu"
    name = str(fp["name"]).lower().split(" mig ")[0]
    tokens = [t for t in re.split(r"[\s\-_/,()]+", name) if t]
    keep = [t for t in tokens if t not in _VENDOR_WORDS and not _VARIANT.match(t)]
    return "".join(keep) or re.sub(r"\W+", "", name)


def arch(fp: dict) -> str:
    """'sm_90' for compute capability 9.0, 'sm_100' for 10.0; 'cpu_<machine>' for a CPU."""
    cc = fp.get("compute_capability")
    if fp.get("kind") == "cpu" or not cc:
        proc = str(fp.get("processor") or "unknown").lower()
        return "cpu_" + re.sub(r"\W+", "_", proc)
    major, _, minor = str(cc).partition(".")
    return f"sm_{int(major)}{int(minor or 0)}"
