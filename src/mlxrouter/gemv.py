"""The gemv forwarder: a small C library preloaded ahead of OpenBLAS that sends single-row
matrix products (one-stream decode) to OpenBLAS's threaded sgemv instead of its gemm.

Built by the daemon with the system C compiler the first time a worker needs it (about 0.1 s),
into `<run_dir>/lib`, named by the source's hash so an upgrade builds a new one; without a
compiler workers fall back to the next BLAS choice (config.worker_blas).
"""
from __future__ import annotations

import functools
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
BUILD_TIMEOUT_S = 60.0


def source() -> bytes:
    return resources.files(__package__).joinpath(SOURCE).read_bytes()


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.lru_cache(maxsize=8)
def library(cache_dir: Path) -> Path | None:
    """The built library in `cache_dir`, building it when missing; None (logged once per
    directory) when it cannot be built."""
    code = source()
    out = cache_dir / f"libmlxrouter-gemv-{hashlib.sha256(code).hexdigest()[:12]}.so"
    if any(c in str(out) for c in " :"):  # LD_PRELOAD splits on both
        log.warning("no gemv forwarder: its path %r would not survive LD_PRELOAD; choose a "
                    "run_dir without spaces or colons", str(out))
        return None
    if out.exists():
        return out
    cc = compiler()
    if cc is None:
        log.warning("no C compiler (cc, gcc or $CC): workers run OpenBLAS without the gemv "
                    "forwarder, or BLIS when installed (docs/performance.md)")
        return None
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as tmp:
        src = Path(tmp) / SOURCE
        src.write_bytes(code)
        built = Path(tmp) / out.name
        try:
            proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(built), str(src),
                                   "-ldl"], capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("building the gemv forwarder with %s failed: %r", cc, exc)
            return None
        if proc.returncode != 0 or not built.exists():
            log.warning("building the gemv forwarder with %s failed (exit %d): %s", cc,
                        proc.returncode, proc.stderr.strip()[-500:])
            return None
        os.replace(built, out)  # atomic: a concurrent builder's copy is as good
    log.info("built the gemv forwarder: %s", out)
    return out
