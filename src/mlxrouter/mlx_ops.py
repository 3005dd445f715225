"""mlxrouter's vectorized MLX CPU kernels (mlx_ops.cpp): sigmoid (the SiLU of every MLP),
softmax (attention) and logsumexp (mlx-lm's batch step) for float32 on x86-64, bit-identical
to MLX's own, which compute exp one value at a time there (docs/performance.md).

A C++ library built against the installed MLX's headers and libmlx.so, by the daemon with the
system C++ compiler the first time a worker needs it (about 3 s; native.py), and preloaded
into Linux x86-64 workers ahead of everything else. Named by its source, the MLX version and
where that MLX is, so another virtual environment or MLX gets its own build. The daemon finds
MLX without importing it.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path

from .native import Recipe

SOURCE = "mlx_ops.cpp"
HEADERS = ("decode_attention.h",)  # included by SOURCE


def mlx_dir() -> Path | None:
    """The installed mlx package's directory (with include/ and lib/), found without importing
    it."""
    try:
        spec = importlib.util.find_spec("mlx")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _unsupported() -> str:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"only built for Linux on x86-64 (this is {sys.platform} {platform.machine()})"
    found = mlx_dir()
    if found is None or not (found / "include" / "mlx" / "ops.h").exists():
        return "the installed MLX has no C++ headers"
    if not (found / "lib" / "libmlx.so").exists():
        return f"no libmlx.so in {found / 'lib'}"
    return ""


def _salt() -> bytes:
    found = mlx_dir()
    try:
        version = metadata.version("mlx")
    except metadata.PackageNotFoundError:
        version = "?"
    return f"\0mlx {version} at {found}".encode()


def _command(cxx: str, source: Path, out: Path) -> list[str]:
    found = mlx_dir()
    assert found is not None  # _unsupported() said so
    lib = found / "lib"
    # -ffp-contract=off: no fused multiply-adds but the ones written, as in MLX's own build;
    # -fno-strict-aliasing: MLX's headers read an int vector as a float one.
    return [cxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-ffp-contract=off",
            "-fno-strict-aliasing", "-I", str(found / "include"), "-o", str(out), str(source),
            "-L", str(lib), "-lmlx", f"-Wl,-rpath,{lib}", "-Wl,--no-undefined", "-ldl"]


RECIPE = Recipe(label="libmlxrouter-mlx-ops", what="vectorized MLX CPU kernels",
                without="MLX's own", files=(SOURCE, *HEADERS), command=_command, compiler=compiler,
                no_compiler="no C++ compiler (c++, g++ or $CXX)",
                salt=_salt, unsupported=_unsupported)


def library(*dirs: Path) -> Path | None:
    """The built library in the first of `dirs` that has it or where it can be built, else
    None (Recipe.library)."""
    return RECIPE.library(*dirs)
