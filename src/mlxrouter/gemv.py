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
from typing import Any

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


# ---- shadows (in a worker, with the forwarder preloaded)

SHADOW_KINDS = (("float16", 1), ("bfloat16", 2))  # gemv_forward.c's SHADOW_F16, SHADOW_BF16
# Registered weights and their copies by address: alive as long as the process, as the C side
# needs; a weight already here is not copied again.
_kept: dict[int, tuple[Any, Any]] = {}


def shadow_weights(model: Any, min_size: int = 4096) -> tuple[int, int]:
    """Give the forwarder a half copy of every float32 matrix the half type holds exactly
    (all of them, for a model published in float16 or bfloat16 or dequantized from one), so
    decode's products read half the bytes with the same results (gemv_forward.c, "Shadows").
    Returns how many matrices got one and the copies' bytes; (0, 0) without the forwarder.
    Call after the weights are final and before decoding starts (the forwarder's table has no
    lock); the copies and the weights are kept for the life of the process, so no other array
    gets a registered address (a second call copies only weights it has not seen). A weight
    written in place afterwards (`w[...] = v`) would leave its copy stale: nothing does."""
    import ctypes

    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    try:
        register = ctypes.CDLL(None).mlxrouter_gemv_shadow
    except AttributeError:
        return 0, 0
    register.restype = ctypes.c_int
    register.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                         ctypes.c_int]
    count = size = 0
    for _, w in tree_flatten(model.parameters()):
        if w.ndim != 2 or w.dtype != mx.float32 or w.size < min_size:
            continue
        view = np.array(w, copy=False)  # the buffer MLX hands to cblas_sgemm
        if not view.flags["C_CONTIGUOUS"] or view.ctypes.data in _kept:
            continue
        for name, kind in SHADOW_KINDS:
            half = w.astype(getattr(mx, name))
            if mx.array_equal(half.astype(mx.float32), w).item():
                break
        else:
            continue
        copy = np.array(half.view(mx.uint16))
        code = register(view.ctypes.data, w.shape[0], w.shape[1], copy.ctypes.data, kind)
        if code != 0:
            if code == -1:  # no kernel for this kind on this CPU
                continue
            break
        _kept[view.ctypes.data] = (w, copy)
        count, size = count + 1, size + copy.nbytes
    mx.clear_cache()  # the checks' float32 and half temporaries
    return count, size
