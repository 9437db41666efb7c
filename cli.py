"""gfwagen's command line: thin click commands over the gfwagen modules.

Conventions: data goes to stdout, logs and progress to stderr. Exit codes: 0 ok, 1 runtime
error (a bad file, an unreadable database), 2 usage error, 3 no GPU or the wrong GPU.
Installed as the console script `gfwagen` (pyproject: gfwagen = "cli:main").
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

import click

EXIT_RUNTIME, EXIT_USAGE, EXIT_NO_GPU = 1, 2, 3
# gfwagen.spec.PASSES, written out: importing gfwagen (torch) would slow every command's start
PASSES = ("fwd", "bwd_kv", "bwd_q", "bwd_ds")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class RuntimeFailure(click.ClickException):
    exit_code = EXIT_RUNTIME


class NoGPU(click.ClickException):
    exit_code = EXIT_NO_GPU


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def runtime_errors(fn):
    """Turn the database's and the file system's errors into exit code 1 with one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from gfwagen.db import DatabaseError

        try:
            return fn(*args, **kwargs)
        except DatabaseError as e:
            raise RuntimeFailure(str(e)) from None
        except OSError as e:
            raise RuntimeFailure(f"{e.filename or ''}: {e.strerror or e}") from None

    return wrapper


db_option = click.option(
    "--db", "db_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Tuning database file. [default: $GFWAGEN_DB, else "
         "$XDG_CACHE_HOME/gfwagen/tuning.sqlite or ~/.cache/gfwagen/tuning.sqlite]")
format_option = click.option("--format", "fmt", type=click.Choice(["table", "json"]),
                             default="table", show_default=True, help="Output format.")


def _resolve(db_path: Path | None) -> Path:
    from gfwagen.db import default_db_path

    return db_path if db_path is not None else default_db_path()


@click.group(context_settings=CONTEXT)
def main():
    """gfwagen: gated sliding-window attention kernels, their tuner and tuning database."""


# ---- gfwagen db ... --------------------------------------------------------------------------

@main.group(context_settings=CONTEXT)
def db():
    """Inspect and share the tuning database."""


def _config_text(cfg: dict) -> str:
    s = f"bm{cfg['block_m']} bn{cfg['block_n']} w{cfg['num_warps']} s{cfg['num_stages']}"
    extra = " ".join(f"{k}={v}" for k, v in sorted((cfg.get("extra") or {}).items()))
    return f"{s} {extra}".strip()


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


@db.command("show", context_settings=CONTEXT)
@db_option
@format_option
@runtime_errors
def db_show(db_path, fmt):
    """Show the database's row counts and its best config per device, spec and seqlen."""
    from gfwagen.db import SCHEMA_VERSION, TuningDB

    path = _resolve(db_path)
    if path.is_file():
        with TuningDB(path, readonly=True) as tdb:
            counts, best = tdb.counts(), tdb.best_entries()
    else:
        _log(f"no tuning database at {path} yet")
        counts = {"devices": 0, "toolchains": 0, "trials": 0, "best": 0}
        best = []
    if fmt == "json":
        _emit_json({"path": str(path), "schema_version": SCHEMA_VERSION, "counts": counts,
                    "best": best})
        return
    click.echo(f"database: {path} (schema v{SCHEMA_VERSION})")
    click.echo("  ".join(f"{k}: {v}" for k, v in counts.items()))
    if not best:
        return
    rows = [["model", "arch", "backend", "pass", "hd/vd", "window", "dtype", "gated", "group",
             "T", "config", "median_ms", "n"]]
    for b in best:
        s = b["spec"]
        rows.append([b["model"], b["arch"], b["backend"], b["pass"],
                     f"{s['head_dim']}/{s['value_dim']}", str(s["window"] or "full"),
                     s["dtype"], "yes" if s["gated"] else "no", str(s["group"]),
                     str(b["seqlen_bucket"]), _config_text(b["config"]),
                     f"{b['median_ms']:.4g}", str(b["n_trials"])])
    click.echo()
    click.echo(_table(rows))


@db.command("export", context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.option("--best-only", is_flag=True,
              help="Only the measurement behind each best config (the compact form shipped "
                   "in tuning_db/); without it, every trial.")
@click.option("--newest", is_flag=True,
              help="As --best-only, but where a device and problem were tuned under several "
                   "toolchains (compiler, timer or template versions), only the one measured "
                   "last: what a re-tune supersedes is left out.")
@db_option
@runtime_errors
def db_export(file, best_only, newest, db_path):
    """Write the database as diff-friendly JSON lines to FILE ('-' for stdout)."""
    from gfwagen.db import TuningDB

    path = _resolve(db_path)
    if not path.is_file():
        raise RuntimeFailure(f"no tuning database at {path}")
    with TuningDB(path, readonly=True) as tdb:
        if str(file) == "-":
            counts = tdb.export_jsonl(stream=sys.stdout, best_only=best_only, newest=newest)
        else:
            counts = tdb.export_jsonl(file, best_only=best_only, newest=newest)
    _log(f"exported {counts['devices']} devices, {counts['toolchains']} toolchains, "
         f"{counts['trials']} trials to {file}")


def _summary(verb: str, result: dict) -> str:
    parts = [f"{v['new']} new {k} ({v['existing']} already present)" for k, v in result.items()]
    return f"{verb}: " + ", ".join(parts)


@db.command("import", context_settings=CONTEXT)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@db_option
@runtime_errors
def db_import(file, db_path):
    """Add the rows of a JSON-lines export FILE. Idempotent; a bad file changes nothing."""
    from gfwagen.db import TuningDB

    with TuningDB(_resolve(db_path)) as tdb:
        result = tdb.import_jsonl(file)
    _log(_summary(f"imported {file}", result))


@db.command("merge", context_settings=CONTEXT)
@click.argument("other", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@db_option
@runtime_errors
def db_merge(other, db_path):
    """Add every measurement of another tuning database OTHER (only read). All or nothing."""
    from gfwagen.db import TuningDB

    with TuningDB(_resolve(db_path)) as tdb:
        result = tdb.merge(other)
    _log(_summary(f"merged {other}", result))


@db.command("which", context_settings=CONTEXT)
@click.option("--head-dim", type=click.IntRange(min=1), required=True)
@click.option("--value-dim", type=click.IntRange(min=1), default=None,
              help="[default: the head dim]")
@click.option("--window", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sliding window; 0 is full causal.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16",
              show_default=True)
@click.option("--seqlen", type=click.IntRange(min=1), required=True)
@click.option("--heads", type=click.IntRange(min=1), required=True, help="Query heads.")
@click.option("--kv-heads", type=click.IntRange(min=1), default=None,
              help="[default: --heads]")
@click.option("--gated/--no-gated", default=True, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "triton", "tvm", "reference"]),
              default="triton", show_default=True,
              help="auto: the backend the op's backend='auto' takes on that GPU (the one the "
                   "database measured faster for the pass's direction, else triton).")
@click.option("--pass", "pass_", type=click.Choice(list(PASSES)), default="fwd",
              show_default=True)
@click.option("--fingerprint", "fingerprint_file", type=click.Path(exists=True, dir_okay=False),
              default=None, help="Ask for this device instead of the local one: a JSON file "
                                 "holding a fingerprint (the 'device' of `gfwagen doctor "
                                 "--format json`).")
@click.option("--shipped/--no-shipped", default=True, show_default=True,
              help="Also use the tuning_db/*.jsonl files shipped with gfwagen.")
@db_option
@format_option
@runtime_errors
def db_which(head_dim, value_dim, window, dtype, seqlen, heads, kv_heads, gated, backend,
             pass_, fingerprint_file, shipped, db_path, fmt):
    """Print which config a call would use, and why (tuned entry or heuristic default)."""
    from gfwagen.db import Snapshot, arch, device_fingerprint, gpu_model_name
    from gfwagen.db.records import check_fingerprint
    from gfwagen.dispatch import faster_backend
    from gfwagen.heuristics import default_config
    from gfwagen.spec import Problem

    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise click.UsageError(f"--heads {heads} is not a multiple of --kv-heads {kv_heads}")
    problem = Problem(1, seqlen, heads, kv_heads, head_dim, value_dim or head_dim, window,
                      dtype, gated)
    try:
        spec = problem.spec("triton" if backend == "auto" else backend, pass_)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if fingerprint_file:
        try:
            fp = check_fingerprint(json.loads(Path(fingerprint_file).read_text()))
        except ValueError as e:  # DatabaseError and JSONDecodeError are ValueErrors
            raise click.BadParameter(str(e), param_hint="--fingerprint") from None
    else:
        fp = device_fingerprint()
    snap = Snapshot.load(db_path=db_path, shipped=shipped)
    times, compared_gated = None, False
    if backend == "auto":
        # as on a GPU with TVM's CUDA runtime (without it the op keeps Triton)
        backend, times, compared_gated = faster_backend(snap, spec, seqlen, fp)
        spec = spec.replace(backend=backend)
    cfg, reason = snap.lookup(spec, seqlen, fp)
    tuned = cfg is not None
    if cfg is None:
        cfg = default_config(spec)
    if fmt == "json":
        _emit_json({"spec": spec.as_dict(), "seqlen": seqlen, "config": cfg.as_dict(),
                    "tuned": tuned, "reason": reason, "auto_ms": times,
                    "auto_compared_gated": compared_gated,
                    "device": {"name": fp["name"], "model": gpu_model_name(fp),
                               "arch": arch(fp)},
                    "sources": list(snap.sources)})
        return
    if times is not None:
        ms = ", ".join(f"{b} {'-' if t is None else f'{t:.3f} ms'}" for b, t in times.items())
        what = "forward" if pass_ == "fwd" else "backward"
        if compared_gated:
            what = f"gated {what}, as only one backend has ungated times"
        click.echo(f"backend: {backend} (tuned {what}: {ms})")
    click.echo(f"config: {_config_text(cfg.as_dict())}")
    click.echo(f"why:    {reason}")


# ---- gfwagen doctor --------------------------------------------------------------------------

def _version(*dists: str) -> str | None:
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _doctor_report(db_path: Path | None) -> tuple[dict, int]:
    import torch

    from gfwagen.db import (
        SCHEMA_VERSION,
        DatabaseError,
        TuningDB,
        arch,
        device_fingerprint,
        device_key,
        gpu_model_name,
        shipped_dir,
    )
    from gfwagen.db.lookup import shipped_files

    cuda = torch.cuda.is_available()
    fp = device_fingerprint()
    report = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": fp,
        "gpu": {"cuda_available": cuda, "count": torch.cuda.device_count() if cuda else 0,
                "model": gpu_model_name(fp), "arch": arch(fp), "device_key": device_key(fp)},
        "versions": {"torch": torch.__version__, "triton": _version("triton", "pytorch-triton"),
                     "tvm": _version("apache-tvm", "tvm"), "optuna": _version("optuna"),
                     "sqlite-utils": _version("sqlite-utils"), "click": _version("click")},
    }
    code = 0
    path = _resolve(db_path)
    dbinfo = {"path": str(path), "exists": path.is_file(), "schema_version": None,
              "counts": None, "error": None}
    if path.is_file():
        try:
            with TuningDB(path, readonly=True) as tdb:
                dbinfo["counts"] = tdb.counts()
                dbinfo["schema_version"] = SCHEMA_VERSION
        except DatabaseError as e:
            dbinfo["error"] = str(e)
            code = EXIT_RUNTIME
    report["database"] = dbinfo
    d = shipped_dir()
    report["shipped"] = {"dir": str(d) if d else None, "files": [f.name for f in shipped_files()]}
    has = {m: importlib.util.find_spec(m) is not None for m in ("triton", "tvm")}
    report["backends"] = {
        "reference": {"available": True, "why": "pure PyTorch"},
        "triton": {"available": has["triton"] and cuda,
                   "why": "installed, CUDA GPU" if has["triton"] and cuda else
                   "needs triton and a CUDA GPU; TRITON_INTERPRET=1 runs it on the CPU"},
        "tvm": {"available": has["tvm"],
                "why": ("installed" + (", CUDA GPU" if cuda else ", CPU (llvm) only"))
                if has["tvm"] else "tvm not installed"},
    }
    if code == 0 and not cuda:
        code = EXIT_NO_GPU
    return report, code


@main.command("doctor", context_settings=CONTEXT)
@db_option
@format_option
def doctor(db_path, fmt):
    """Check the GPU, the versions, the tuning database and the backends.

    Exits 0 when all is well, 1 when the database is unreadable, 3 when there is no GPU."""
    report, code = _doctor_report(db_path)
    if fmt == "json":
        _emit_json(report)
    else:
        g, dbi = report["gpu"], report["database"]
        fp = report["device"]
        click.echo(f"python       {report['python']} on {report['platform']}")
        if g["cuda_available"]:
            click.echo(f"gpu          {fp['name']} ({g['model']}, {g['arch']}, {fp['sm_count']} "
                       f"SMs, {fp['memory_bytes'] / 2**30:.0f} GiB), {g['count']} visible; "
                       f"driver CUDA {fp['driver_version']}, torch CUDA {fp['cuda_version']}")
        else:
            click.echo("gpu          none (CUDA not available)")
        click.echo(f"device key   {g['device_key']}")
        for k, v in report["versions"].items():
            click.echo(f"{k:<12} {v or 'not installed'}")
        state = (f"error: {dbi['error']}" if dbi["error"] else
                 "  ".join(f"{k}: {v}" for k, v in dbi["counts"].items()) if dbi["exists"]
                 else "not created yet")
        click.echo(f"database     {dbi['path']}: {state}")
        sh = report["shipped"]
        click.echo(f"shipped      {sh['dir'] or 'none'}: {', '.join(sh['files']) or 'no files'}")
        for name, b in report["backends"].items():
            click.echo(f"backend      {name}: {'yes' if b['available'] else 'no'} ({b['why']})")
    if code == EXIT_NO_GPU:
        _log("doctor: no CUDA GPU; kernels fall back to the PyTorch reference")
    click.get_current_context().exit(code)


# ---- gfwagen db plot -------------------------------------------------------------------------

@db.command("plot", context_settings=CONTEXT)
@db_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the PNGs. [default: plots/ next to the database]")
@runtime_errors
def db_plot(db_path, out_dir):
    """Write optimization-history and parameter-importance PNGs for the recorded studies."""
    from gfwagen.tuner.plots import plot_db

    path = _resolve(db_path)
    if not path.is_file():
        raise RuntimeFailure(f"no tuning database at {path}")
    written, skipped = plot_db(path, out_dir or path.parent / "plots")
    for s in skipped:
        _log(f"skipped {s}")
    for w in written:
        click.echo(str(w))
    _log(f"wrote {len(written)} plots")


# ---- gfwagen generate ------------------------------------------------------------------------

def _spec_options(fn):
    for opt in reversed([
        click.option("--backend", type=click.Choice(["triton", "tvm"]), default="triton",
                     show_default=True),
        click.option("--pass", "pass_", type=click.Choice(list(PASSES)),
                     default="fwd", show_default=True),
        click.option("--head-dim", type=click.IntRange(min=1), default=128, show_default=True),
        click.option("--value-dim", type=click.IntRange(min=1), default=None,
                     help="[default: the head dim]"),
        click.option("--window", type=click.IntRange(min=0), default=512, show_default=True,
                     help="Sliding window; 0 is full causal."),
        click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16",
                     show_default=True),
        click.option("--gated/--no-gated", default=True, show_default=True),
        click.option("--group", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Query heads per kv head."),
    ]):
        fn = opt(fn)
    return fn


@main.command("generate", context_settings=CONTEXT)
@_spec_options
@click.option("--block-m", type=int, default=None, help="[default: the heuristic config]")
@click.option("--block-n", type=int, default=None)
@click.option("--num-warps", type=int, default=None)
@click.option("--num-stages", type=int, default=None)
@click.option("--target", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="TVM only: which schedule of the template.")
@click.option("--build", "do_build", is_flag=True,
              help="Also compile ahead of time (Triton: needs a CUDA GPU).")
@format_option
def generate_cmd(backend, pass_, head_dim, value_dim, window, dtype, gated, group, block_m,
                 block_n, num_warps, num_stages, target, do_build, fmt):
    """Print the specialized kernel source for a spec and config (the cache path on stderr).

    Triton: the constexpr bindings the launcher uses, then the template files; TVM: the
    PrimFunc's TVMScript. The source and a manifest are cached under
    $GFWAGEN_CACHE_DIR/kernels/<backend>/<key>/."""
    from gfwagen import generator
    from gfwagen.heuristics import default_config
    from gfwagen.spec import KernelConfig, KernelSpec

    try:
        spec = KernelSpec(backend, pass_, head_dim, value_dim or head_dim, window, dtype, gated,
                          group)
        base = default_config(spec)
        if backend == "tvm":
            from gfwagen.backends import tvm_backend

            base = (tvm_backend.DEFAULT_CPU_CONFIG if target == "cpu"
                    else tvm_backend.default_cuda_config(spec))
        cfg = KernelConfig(block_m or base.block_m, block_n or base.block_n,
                           num_warps or base.num_warps, num_stages or base.num_stages, base.extra)
        generator.check_config(spec, cfg)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    tgt = target if backend == "tvm" else None
    try:
        gk = (generator.build(spec, cfg, target=tgt) if do_build
              else generator.generate(spec, cfg, tgt))
    except RuntimeError as e:
        if "CUDA" in str(e):
            raise NoGPU(str(e)) from None
        raise RuntimeFailure(str(e)) from None
    _log(f"{'wrote' if gk.created else 'cached'} {gk.directory}")
    if fmt == "json":
        _emit_json({"key": gk.key, "directory": str(gk.directory),
                    "source_path": str(gk.source_path), "manifest": gk.manifest(),
                    "source": gk.source_path.read_text()})
    else:
        click.echo(gk.source_path.read_text(), nl=False)


# ---- gfwagen tune ----------------------------------------------------------------------------

def _class_shapes() -> list[tuple]:
    """One shape per (head dim, window) class: T = max(4096, 2W) so the window slides over
    at least one more window's worth of keys, B so that every shape holds 32768 tokens. Then
    full causal attention (window 0, the Forgetting Transformer's) per head dim at T = 8192;
    other lengths take its entries through the nearest sequence-length bucket."""
    out = []
    for d in (64, 128, 256):
        for w in (256, 512, 1024, 2048, 4096, 8192):
            t = max(4096, 2 * w)
            out.append((f"C-d{d}-w{w}", 32768 // t, t, 16, 16, d, w))
    out += [(f"C-d{d}-causal", 4, 8192, 16, 16, d, 0) for d in (64, 128, 256)]
    return out


# (name, batch, seqlen, heads, kv_heads, head_dim, window); all bf16, gated, value dim = head dim
PRESETS = {
    "standard": [("S1", 8, 4096, 16, 16, 128, 512), ("S2", 8, 4096, 16, 16, 128, 1024),
                 ("S3", 2, 16384, 16, 16, 128, 1024), ("S4", 2, 16384, 16, 16, 128, 4096),
                 ("S5", 8, 4096, 16, 16, 64, 512)],
    "quick": [("Q1", 2, 1024, 4, 4, 64, 256)],
    "classes": _class_shapes(),
}
PRESETS["ship"] = PRESETS["standard"] + PRESETS["classes"]  # what the shipped H200 DB holds


def _parse_devices(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        devs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected indices like 0,1; got {text!r}",
                                 param_hint="--devices") from None
    if not devs or len(set(devs)) != len(devs) or min(devs) < 0:
        raise click.BadParameter(f"expected distinct indices like 0,1; got {text!r}",
                                 param_hint="--devices")
    return devs


def _check_gpu(gpu: str, devices: list[int] | None) -> str:
    """The mode the tuner runs in ('cuda' or 'cpu'); NoGPU (exit 3) when the GPU asked for
    is not what is there."""
    import torch

    from gfwagen.db import device_fingerprint, gpu_model_name

    want = gpu.lower()
    if want == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if want == "auto":
            _log("tune: no CUDA GPU visible; --gpu auto tunes the CPU (TVM llvm backend)")
            return "cpu"
        raise NoGPU(f"--gpu {gpu}: no CUDA GPU is visible on this machine; tune on a machine "
                    f"with an {gpu.upper()}, or use --gpu auto / --gpu cpu")
    n = torch.cuda.device_count()
    for d in devices or [torch.cuda.current_device()]:
        if d >= n:
            raise NoGPU(f"--devices: GPU {d} is not visible ({n} visible)")
        model = gpu_model_name(device_fingerprint(d))
        if want != "auto" and model != want:
            raise NoGPU(f"--gpu {gpu}: GPU {d} is a {torch.cuda.get_device_name(d)} ({model}), "
                        f"not an {gpu.upper()}; use --gpu auto to tune whatever is there")
    return "cuda"


def _default_compile_jobs(mode: str, devices: list[int] | None) -> int:
    """On a GPU, one compile process per core (at most 16), shared out among the devices'
    driver processes; elsewhere none (the CPU is what is being timed)."""
    if mode != "cuda":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    return max(1, min(16, cores // max(1, len(devices or [0]))))


def _tried_configs(texts) -> list:
    """--try's JSON configs as KernelConfigs; a malformed one is a usage error naming it."""
    from gfwagen.spec import KernelConfig

    out = []
    for text in texts:
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise TypeError(f"a {type(d).__name__}, not an object")
            out.append(KernelConfig.from_dict(d))
        except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise click.BadParameter(f"{text!r}: {e}; expected a JSON object with block_m, "
                                     "block_n, num_warps, num_stages and optionally extra",
                                     param_hint="--try") from None
    return out


def _with_tried(job, configs):
    """job enqueueing the --try configs that fit its kernel (the others are logged, not run)."""
    import dataclasses

    from gfwagen.tuner import space
    from gfwagen.tuner.study import gpu_space

    backend = job.spec().backend
    settable = space.space_extras(backend)
    out = []
    for c in configs:
        outside = sorted(set(dict(c.extra)) - settable)
        if outside:
            # the study would time the config without them (session 47 dueled gate_tma so)
            _log(f"tune: --try {c.as_dict()} skipped for {job.label}: extra "
                 f"{', '.join(outside)} is not a knob of the tuner's {backend} space "
                 f"({', '.join(sorted(settable))}), so the study cannot time it")
            continue
        ok, why = space.feasible(job.spec(), c, gpu=gpu_space(job))
        if ok:
            try:  # a value the pass's space lacks would stop the study when enqueued
                params = space.config_params(job.spec(), c, job.knobs, gpu_space(job))
            except ValueError as e:
                ok, why = False, str(e)
        if ok:
            runs = space.config_from_params(job.spec(), params, gpu_space(job))
            if runs != c:  # say so: a switch dropped here once went unnoticed for a call
                _log(f"tune: --try {c.as_dict()} runs as {runs.as_dict()} for {job.label}: "
                     "the pass's space drops what means nothing at these tiles and fills "
                     "what the pass needs")
            out.append(c.as_dict())
        else:
            _log(f"tune: --try {c.as_dict()} skipped for {job.label}: {why}")
    return dataclasses.replace(job, enqueue=tuple(out))


@main.command("tune", context_settings=CONTEXT)
@click.option("--gpu", default="auto", show_default=True,
              help="The GPU model to tune (e.g. h200; exit 3 when it is not the one visible), "
                   "'auto' for whatever is there, or 'cpu' for the TVM llvm backend.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="standard",
              show_default=True,
              help="standard: shapes S1-S5; quick: one small shape; classes: head dim "
                   "64/128/256 x window 256-8192, 32768 tokens each; ship: standard + "
                   "classes. Shape options below replace the preset.")
@click.option("--only", default=None,
              help="Comma-separated shape names of the preset to tune (e.g. S2,S4), so that "
                   "several processes can share a preset out among GPUs or hosts.")
@click.option("--head-dim", type=click.IntRange(min=1), default=None)
@click.option("--window", type=click.IntRange(min=0), default=None, help="0 is full causal.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16",
              show_default=True)
@click.option("--seqlen", type=click.IntRange(min=1), default=None)
@click.option("--batch", type=click.IntRange(min=1), default=None)
@click.option("--heads", type=click.IntRange(min=1), default=None)
@click.option("--kv-heads", type=click.IntRange(min=1), default=None)
@click.option("--gated/--no-gated", default=True, show_default=True)
@click.option("--passes", default=None, help="Comma-separated passes [default: fwd,bwd_kv,bwd_q,"
                                             "bwd_ds (the stored-dS backward, whole); TVM: "
                                             "fwd,bwd_kv (its backward is one config)]")
@click.option("--trials", type=click.IntRange(min=1), default=40, show_default=True,
              help="Trials per study: one study per shape and pass, so a preset of many "
                   "shapes runs this many for each. Ignored by --sweep.")
@click.option("--sweep", is_flag=True,
              help="Run every feasible config of the space once per shape and pass, in a "
                   "study of its own (name suffixed -sweep), recorded like any trial.")
@click.option("--knobs", default=None,
              help="Comma-separated Triton template switches to search besides tiles, warps "
                   "and stages (tma, prefetch_gate, full_masks; maxnreg, the forward's "
                   "register cap: off, 128 or 168), or 'none'. [default: tma]")
@click.option("--compile-jobs", type=click.IntRange(min=1), default=None,
              help="Processes compiling candidates in parallel, and the batch of trials "
                   "asked at once. [default: min(16, CPU cores / devices) on a GPU, else 1]")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=120.0, show_default=True,
              help="Seconds one candidate may take (compile, check and timing) before it is "
                   "killed and recorded as a timeout.")
@click.option("--backend", type=click.Choice(["triton", "tvm"]), default=None,
              help="[default: triton on a GPU, tvm on the CPU]")
@click.option("--devices", default=None,
              help="GPU indices, e.g. 0,1: one worker process per GPU on one shared study.")
@click.option("--storage", default=None,
              help="Optuna RDB URL (e.g. postgresql://...) of a study shared by several hosts; "
                   "each host records its own trials in its own --db.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Folder for the PNGs [default: plots/ next to the database].")
@click.option("--no-plots", is_flag=True, help="Skip the plots.")
@click.option("--fake-timer", is_flag=True, hidden=True, envvar="GFWAGEN_FAKE_TIMER",
              help="Testing: run candidates as the CPU reference and time them synthetically.")
@click.option("--seed", type=int, default=None, hidden=True)
@click.option("--resume", is_flag=True, help="Continue the studies of an earlier run.")
@click.option("--refine", is_flag=True,
              help="Try the database's best config for each shape and pass first, then it with "
                   "each searched knob flipped (e.g. after adding --knobs prefetch_gate), then "
                   "search as usual.")
@click.option("--try", "try_configs", multiple=True, metavar="JSON",
              help="A config to measure right after the default, as JSON (e.g. "
                   "'{\"block_m\": 128, \"block_n\": 64, \"num_warps\": 4, \"num_stages\": 2, "
                   "\"extra\": {\"sub_n\": 64}}'); repeatable; tried for every shape and pass "
                   "of the run where it fits. Needs --trials of at least 1 + their number.")
@click.option("--duel", type=click.IntRange(min=0), default=0, show_default=True,
              help="After the search, time its two fastest configs this many more times each, "
                   "alternately, and up to twice as many again while their medians lie within "
                   "their timings' spread; the database pools each config's timings by "
                   "median, so configs within a few percent are not ordered by one timing "
                   "each (one GPU only).")
@db_option
@format_option
@runtime_errors
def tune(gpu, preset, only, head_dim, window, dtype, seqlen, batch, heads, kv_heads, gated, passes,
         trials, sweep, knobs, compile_jobs, timeout, backend, devices, storage, plots_dir,
         no_plots, fake_timer, seed, resume, refine, try_configs, duel, db_path, fmt):
    """Tune the kernels' configs with Optuna and record every trial in the tuning database.

    Every candidate runs in a worker process, is checked against the reference before it is
    timed, and a candidate that fails to compile, crashes, hangs or is wrong is recorded
    with its status and never becomes the best. Data (the summary) goes to stdout."""
    from gfwagen.spec import Problem
    from gfwagen.tuner import space
    from gfwagen.tuner.pool import Workers
    from gfwagen.tuner.study import TuneJob, config_text, run, run_on_devices, sweep_job

    devs = _parse_devices(devices)
    if fake_timer and gpu.lower() in ("auto", "cpu"):
        # the fake pipeline runs anywhere; a named GPU is still checked (exit 3 without it)
        mode = "fake"
        backend = backend or ("tvm" if gpu.lower() == "cpu" else "triton")
    else:
        mode = _check_gpu(gpu, devs)
    if mode == "cpu":
        if backend == "triton":
            raise click.UsageError("--backend triton needs a GPU; the CPU tunes the tvm backend")
        backend = "tvm"
        if devs:
            raise click.UsageError("--devices needs GPUs")
        import importlib.util

        if importlib.util.find_spec("tvm") is None:
            raise RuntimeFailure("CPU tuning uses the TVM llvm backend, and apache-tvm is not "
                                 "installed")
    backend = backend or "triton"
    if backend == "tvm" and mode == "cuda":
        from gfwagen.backends import tvm_backend

        if not tvm_backend.cuda_runtime_available():
            raise RuntimeFailure("--backend tvm on a GPU needs a TVM build with its CUDA runtime "
                                 "(the PyPI wheel has none; it compiles CUDA but cannot launch "
                                 "it); use --gpu cpu to tune the TVM llvm kernels")
    if fake_timer:
        mode = "fake"
    pass_list = passes.split(",") if passes else list(space.passes(backend))
    for p in pass_list:
        if p not in space.passes(backend):
            raise click.BadParameter(f"{p!r}; {backend} tunes {', '.join(space.passes(backend))}"
                                     + (" (its backward is one config)" if backend == "tvm"
                                        else ""), param_hint="--passes")
    shapes = PRESETS[preset]
    if only:
        names = [n for n in only.split(",") if n]
        unknown = [n for n in names if n not in {s[0] for s in shapes}]
        if unknown:
            raise click.BadParameter(f"{', '.join(unknown)} not in preset {preset} "
                                     f"({', '.join(s[0] for s in shapes)})", param_hint="--only")
        shapes = [s for s in shapes if s[0] in names]
    if any(x is not None for x in (head_dim, window, seqlen, batch, heads, kv_heads)):
        base = shapes[0]
        shapes = [("custom", batch or base[1], seqlen or base[2], heads or base[3],
                   kv_heads or (heads or base[4]), head_dim or base[5],
                   base[6] if window is None else window)]
    problems = []
    for name, b, t, h, hkv, d, w in shapes:
        if h % hkv:
            raise click.UsageError(f"--heads {h} is not a multiple of --kv-heads {hkv}")
        problems.append((name, Problem(b, t, h, hkv, d, d, w, dtype, gated)))
    path = _resolve(db_path)
    jobs = compile_jobs or _default_compile_jobs(mode, devs)
    knob_list = None
    if knobs is not None:
        try:
            knob_list = space.check_knobs(k for k in knobs.split(",") if k and k != "none")
        except ValueError as e:
            raise click.BadParameter(f"{e}, or none", param_hint="--knobs") from None
    if mode == "cpu" and jobs > 1:
        _log("tune: --compile-jobs gains nothing on the CPU: TVM keeps compiled kernels per "
             "process, so the timing worker compiles again")
    tried = _tried_configs(try_configs)
    if tried and not sweep and not resume and trials < 1 + len(tried):
        # trial 0 is always the default (study.prepare): a smaller budget never reaches them
        raise click.BadParameter(
            f"--trials {trials} measures the default config only; the {len(tried)} --try "
            f"config(s) run after it: use --trials {1 + len(tried)} or more",
            param_hint="--trials")
    if refine and not sweep:
        # the study measures its enqueued configs before it searches (study.create_study)
        seeds = 2 + len(space.DEFAULT_KNOBS if knob_list is None else knob_list) + len(tried)
        if trials <= seeds:
            _log(f"tune: --trials {trials} is spent on what --refine and --try enqueue first "
                 f"(the default, the database's best, one flip per knob, the --try configs: "
                 f"up to {seeds}), leaving the search none; raise --trials to search")
    multi = bool(devs and len(devs) > 1)
    if duel and (multi or sweep):
        raise click.UsageError("--duel re-times a search's two fastest configs on one GPU: "
                               "drop --devices or --sweep")
    results = []
    # one driver here (single device): its worker processes serve every study; with
    # several devices each study's driver processes start their own
    with Workers(mode, timeout, devs[0] if devs else None, 0 if multi else jobs) as workers:
        for name, problem in problems:
            for p in pass_list:
                if p == "bwd_ds" and not 0 < (problem.window or 0) < problem.seqlen:
                    _log(f"tune: {name}: no bwd_ds study (the stored-dS backward needs a "
                         f"window shorter than the sequence; this one sees all of it)")
                    continue
                job = TuneJob(problem, backend, p, trials, mode=mode, timeout=timeout,
                              db_path=str(path), storage=storage, resume=resume, seed=seed,
                              label=f"{name} {p}" + (" sweep" if sweep else ""),
                              compile_jobs=jobs, knobs=knob_list, refine=refine, duel=duel)
                job = _with_tried(job, tried)
                if sweep:
                    job = sweep_job(job)
                try:
                    if multi:
                        res = run_on_devices(job, devs)
                    else:
                        job.device = devs[0] if devs else None
                        res = run(job, workers=workers)
                except RuntimeError as e:
                    raise RuntimeFailure(str(e)) from None
                results.append((name, res))
    if not no_plots:
        _tune_plots(results, storage, path, plots_dir or path.parent / "plots", mode)
    if fmt == "json":
        _emit_json({"database": str(path), "mode": mode,
                    "studies": [{"shape": n, **r.as_dict()} for n, r in results]})
        return
    rows = [["shape", "pass", "trials", "ok", "failed", "wrong", "timeout", "best config",
             "best ms", "default ms", "speed-up"]]
    for n, r in results:
        d = r.as_dict()
        rows.append([n, r.pass_, str(r.trials)] +
                    [str(r.statuses.get(s, 0)) for s in ("ok", "failed", "wrong", "timeout")] +
                    [config_text(r.best_config), _ms(r.best_ms), _ms(r.default_ms),
                     f"{d['speedup']:.2f}x" if d["speedup"] else "-"])
    click.echo(_table(rows))
    _log(f"trials recorded in {path}")


def _ms(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _tune_plots(results, storage, db_path, out_dir, mode) -> None:
    import optuna

    from gfwagen.tuner.plots import save_study_plots
    from gfwagen.tuner.study import TuneJob, storage_for

    for _, r in results:
        job = TuneJob(r.problem, r.backend, r.pass_, 0, mode=mode, storage=storage,
                      study_name=r.study_name)
        try:
            study = optuna.load_study(study_name=r.study_name, storage=storage_for(job))
            written, skipped = save_study_plots(study, out_dir)
        except (ImportError, ValueError, RuntimeError, KeyError) as e:
            _log(f"plots for {r.study_name} skipped: {e}")
            continue
        for s in skipped:
            _log(f"plot skipped: {s}")
        for w in written:
            _log(f"plot {w}")

if __name__ == "__main__":
    main()
