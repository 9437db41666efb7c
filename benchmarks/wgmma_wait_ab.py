#!/usr/bin/env python3
"""The key-bias forward (bias_mma) without the wait Triton 3.6 puts between the bias product
and Q K^T. Triton issues the one-step product of ones and the key biases, then
`wgmma.wait_group 0`, then Q K^T onto the same accumulator; PTX lets wgmmas of one shape chain
an accumulator without that wait. A stages hook drops it from the forward's PTX: a probe, not
shipped (the hook is one global slot of Triton's, and Triton's cache key does not see it).

    python benchmarks/wgmma_wait_ab.py --offline      # no GPU: the SASS with and without
    python benchmarks/wgmma_wait_ab.py --shape S5 --calls 40 --graph \\
        --variant tuned --variant tuned:plain       # fwd_variants.py's options, patched

Run the GPU form in a process of its own: it points TRITON_CACHE_DIR at a fresh directory,
so that no binary built without the hook is reused. benchmarks/RESULTS.md, session 32: S5's
gated forward 0.9% faster, gated / ungated 1.137 against 1.147.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_MMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.(\S+)\s+\{([^}]*)\}")
_WAIT = "wgmma.wait_group.sync.aligned 0;"


def drop_chained_waits(ptx: str) -> tuple[str, int]:
    """PTX without each full wgmma wait that only separates two wgmmas of one shape on the
    same accumulator registers, with nothing else touching those registers in between; and
    how many it dropped."""
    lines, out, dropped, last = ptx.split("\n"), [], 0, None
    for i, line in enumerate(lines):
        m = _MMA.search(line)
        if m:
            last = (m.group(1), m.group(2).replace(" ", ""))
        if _WAIT in line and last is not None and _chains(lines, i + 1, last):
            dropped += 1
            continue
        out.append(line)
    return "\n".join(out), dropped


def _chains(lines: list[str], start: int, acc: tuple[str, str]) -> bool:
    regs = set(acc[1].split(","))
    for line in lines[start:]:
        m = _MMA.search(line)
        if m:
            return (m.group(1), m.group(2).replace(" ", "")) == acc
        code = line.strip()
        if code.startswith("$L") or "bra" in code or "ret;" in code:
            return False  # a branch or label: the next wgmma may not be the one that runs
        if not code.startswith("//") and "wgmma" not in code and regs & set(
                re.findall(r"%r\d+", code)):
            return False
    return False


def install() -> None:
    from triton import knobs

    def hook(backend, stages, options, language, capability):
        make_ptx = stages["ptx"]

        def ptx(src, metadata):
            text = make_ptx(src, metadata)
            if metadata.get("name", "").startswith("gfwa_fwd_kernel"):
                text, n = drop_chained_waits(text)
                print(f"[wgmma_wait_ab] {metadata['name']}: {n} waits dropped", file=sys.stderr)
            return text
        stages["ptx"] = ptx
    knobs.runtime.add_stages_inspection_hook = hook


def offline() -> None:
    """S5's shipped key-bias tile, built for sm_90a with and without the waits."""
    import triton

    from gfwagen.offline import compile_pass
    from gfwagen.spec import KernelConfig, KernelSpec

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    spec = KernelSpec("triton", "fwd", 64, 64, 512, "bf16", True, 1)
    ptx = compile_pass(spec, KernelConfig(64, 64, 4, 2, extra=(("bias_mma", True),
                                                               ("maxnreg", 128)))).ptx
    patched, n = drop_chained_waits(ptx)
    print(f"waits dropped: {n}")
    with tempfile.TemporaryDirectory() as d:
        for name, text in (("as built", ptx), ("waits dropped", patched)):
            src, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
            src.write_text(text)
            subprocess.run([tools / "ptxas", "-arch=sm_90a", src, "-o", cubin], check=True)
            sass = subprocess.run([tools / "nvdisasm", "-c", cubin], check=True,
                                  capture_output=True, text=True).stdout
            ins = [x for x in sass.splitlines()
                   if re.match(r"\s*/\*[0-9a-f]{4,}\*/", x) and "NOP" not in x]
            print(f"{name:14s} instructions {len(ins)}, WARPGROUP.DEPBAR "
                  f"{sum('WARPGROUP.DEPBAR' in x for x in ins)}")


def main() -> None:
    if sys.argv[1:] == ["--offline"]:
        offline()
        return
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="wgmma-wait-ab-")
    install()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fwd_variants

    fwd_variants.main()


if __name__ == "__main__":
    main()
