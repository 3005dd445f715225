"""The gemv forwarder: a small C library preloaded ahead of OpenBLAS that computes the
few-row matrix products of decode itself (a small-M kernel on a thread pool, or OpenBLAS's
sgemv for one row) instead of OpenBLAS's gemm, which packs the weights on every call.

Built by the daemon with the system C compiler the first time it is needed (1-3 s), into the
user's cache (`~/.cache/mlxrouter/lib`, else `<run_dir>/lib`), named by the sources' hash so an
upgrade builds a new one and daemons with other run directories share it; without a compiler
workers fall back to the next BLAS choice (config.worker_blas).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = "gemv_forward.c"
HEADERS = ("small_gemm.h",)  # included by SOURCE
BUILD_TIMEOUT_S = 60.0


def sources() -> dict[str, bytes]:
    package = resources.files(__package__)
    return {name: package.joinpath(name).read_bytes() for name in (SOURCE, *HEADERS)}


def source(code: dict[str, bytes] | None = None) -> bytes:
    """Every source file (of `code`, else as installed), in order: what the library's name is
    a hash of."""
    return b"".join((sources() if code is None else code).values())


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


# Directories where a build failed, and why: not tried again in this process (a worker's every
# start would otherwise rerun the compiler), and the warning is logged once.
_failed: dict[Path, str] = {}


def library(*dirs: Path) -> Path | None:
    """The built library in the first of `dirs` that has it or where it can be built; None
    when none can (logged once). Looked for on disk each time, so a deleted copy is rebuilt."""
    code = sources()
    digest = hashlib.sha256(source(code)).hexdigest()[:12]
    name = f"libmlxrouter-gemv-{digest}.so"
    new_failures = False
    for cache_dir in dirs:
        out = cache_dir / name
        if out.exists():
            return out
        if cache_dir in _failed:
            continue
        why = _unusable(out) or _build(code, out)
        if not why:
            log.info("built the gemv forwarder: %s", out)
            return out
        _failed[cache_dir] = why
        new_failures = True
    if new_failures:
        log.warning("no gemv forwarder, workers get BLIS or OpenBLAS alone "
                    "(docs/performance.md): %s", "; ".join(_failed[d] for d in dirs))
    return None


def _unusable(out: Path) -> str:
    if any(c in str(out) for c in " :"):  # LD_PRELOAD splits on both
        return (f"its path {str(out)!r} would not survive LD_PRELOAD; choose a run_dir "
                "without spaces or colons")
    if compiler() is None:
        return "no C compiler (cc, gcc or $CC)"
    return ""


def _build(code: dict[str, bytes], out: Path) -> str:
    """Compiles into a temporary directory beside `out`, then renames: "" or what failed."""
    cc = compiler()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
            for name, text in code.items():
                (Path(tmp) / name).write_bytes(text)
            built = Path(tmp) / out.name
            proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(built),
                                   str(Path(tmp) / SOURCE), "-ldl"], capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
            if proc.returncode != 0 or not built.exists():
                return (f"building it with {cc} failed (exit {proc.returncode}): "
                        f"{proc.stderr.strip()[-500:]}")
            os.replace(built, out)  # atomic: a concurrent builder's copy is as good
    except (OSError, subprocess.TimeoutExpired) as exc:  # unwritable run_dir, hung compiler
        return f"building it with {cc} in {out.parent} failed: {exc!r}"
    return ""
