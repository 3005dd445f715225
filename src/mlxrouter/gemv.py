"""The gemv forwarder: a small C library preloaded ahead of OpenBLAS that computes the
few-row matrix products of decode itself (a small-M kernel on a thread pool, or OpenBLAS's
sgemv for one row) instead of OpenBLAS's gemm, which packs the weights on every call.

Built by the daemon with the system C compiler the first time it is needed (1-3 s), into the
user's cache (`~/.cache/mlxrouter/lib`, else `<run_dir>/lib`), named by the sources' hash so an
upgrade builds a new one and daemons with other run directories share it (native.py); without
a compiler workers fall back to the next BLAS choice (config.worker_blas).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .native import Recipe

SOURCE = "gemv_forward.c"
HEADERS = ("small_gemm.h",)  # included by SOURCE


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _command(cc: str, source: Path, out: Path) -> list[str]:
    return [cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(out), str(source), "-ldl"]


RECIPE = Recipe(label="libmlxrouter-gemv", what="gemv forwarder",
                without="BLIS or OpenBLAS alone", files=(SOURCE, *HEADERS), command=_command,
                compiler=compiler, no_compiler="no C compiler (cc, gcc or $CC)")


def sources() -> dict[str, bytes]:
    return RECIPE.sources()


def source(code: dict[str, bytes] | None = None) -> bytes:
    """Every source file (of `code`, else as installed), in order: what the library's name is
    a hash of."""
    return b"".join((sources() if code is None else code).values())


def library(*dirs: Path) -> Path | None:
    """The built forwarder in the first of `dirs` that has it or where it can be built, else
    None (Recipe.library)."""
    return RECIPE.library(*dirs)
