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
import platform
import sys
from pathlib import Path

import click

EXIT_RUNTIME, EXIT_USAGE, EXIT_NO_GPU = 1, 2, 3
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
@db_option
@runtime_errors
def db_export(file, db_path):
    """Write the database as diff-friendly JSON lines to FILE ('-' for stdout)."""
    from gfwagen.db import TuningDB

    path = _resolve(db_path)
    if not path.is_file():
        raise RuntimeFailure(f"no tuning database at {path}")
    with TuningDB(path, readonly=True) as tdb:
        if str(file) == "-":
            counts = tdb.export_jsonl(stream=sys.stdout)
        else:
            counts = tdb.export_jsonl(file)
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
@click.option("--backend", type=click.Choice(["triton", "tvm", "reference"]),
              default="triton", show_default=True)
@click.option("--pass", "pass_", type=click.Choice(["fwd", "bwd_kv", "bwd_q"]), default="fwd",
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
    from gfwagen.heuristics import default_config
    from gfwagen.spec import Problem

    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise click.UsageError(f"--heads {heads} is not a multiple of --kv-heads {kv_heads}")
    problem = Problem(1, seqlen, heads, kv_heads, head_dim, value_dim or head_dim, window,
                      dtype, gated)
    try:
        spec = problem.spec(backend, pass_)
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
    cfg, reason = snap.lookup(spec, seqlen, fp)
    tuned = cfg is not None
    if cfg is None:
        cfg = default_config(spec)
    if fmt == "json":
        _emit_json({"spec": spec.as_dict(), "seqlen": seqlen, "config": cfg.as_dict(),
                    "tuned": tuned, "reason": reason,
                    "device": {"name": fp["name"], "model": gpu_model_name(fp),
                               "arch": arch(fp)},
                    "sources": list(snap.sources)})
        return
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


# ---- room for the pipeline's other commands ------------------------------------------------
# `gfwagen tune ...` (gfwagen.tuner) and `gfwagen generate ...` (gfwagen.generator) go here,
# as thin @main.command()s like the ones above: parse options, call the module, print data to
# stdout and progress to stderr, raise NoGPU (exit 3) when they need a GPU and find none.


if __name__ == "__main__":
    main()
