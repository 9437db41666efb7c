"""Finds and loads kernel templates from the top-level `templates/` folder.

Templates are plain Python files (Triton @jit kernels, TVM PrimFunc factories) that import
nothing from gfwagen, so the folder can sit beside the package in a checkout and inside it in
an installed wheel. They are imported by path under the private package
`gfwagen_templates`; Triton needs a real file behind each kernel (it reads the source), which
this keeps.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType


@functools.cache
def templates_dir() -> Path:
    env = os.environ.get("GFWAGEN_TEMPLATES")
    here = Path(__file__).resolve().parent
    candidates = ([Path(env)] if env else []) + [here / "templates", here.parent / "templates"]
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"gfwagen templates folder not found; looked in {candidates}")


def template_path(backend: str, name: str) -> Path:
    p = templates_dir() / backend / f"{name}.py"
    if not p.is_file():
        raise FileNotFoundError(f"no template {backend}/{name}.py under {templates_dir()}")
    return p


def template_source_hash(backend: str, name: str) -> str:
    return hashlib.sha256(template_path(backend, name).read_bytes()).hexdigest()[:16]


def templates_hash() -> str:
    """Of every template file (both backends) under templates_dir(): what the tuning
    database's toolchain records (gfwagen.db.fingerprint.toolchain)."""
    return _dir_hash(templates_dir())


@functools.cache
def _dir_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        if "__pycache__" not in p.parts:
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _ensure_package(name: str, path: Path) -> None:
    if name not in sys.modules:
        pkg = ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules[name] = pkg


@functools.cache
def load_template(backend: str, name: str) -> ModuleType:
    """Imports templates/<backend>/<name>.py as gfwagen_templates.<backend>.<name>; the two
    parent packages are synthesized so templates can share helpers by relative import."""
    template_path(backend, name)
    _ensure_package("gfwagen_templates", templates_dir())
    _ensure_package(f"gfwagen_templates.{backend}", templates_dir() / backend)
    return importlib.import_module(f"gfwagen_templates.{backend}.{name}")
