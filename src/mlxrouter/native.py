"""Native libraries that mlxrouter compiles on first use and preloads into Linux workers: the
gemv forwarder (gemv.py) and the vectorized MLX CPU kernels (mlx_ops.py).

Each is built from the package's sources with the system compiler into the first directory
that works (the user's cache, else the run directory), named by a hash of its sources and of
whatever else it was built against, so that an upgrade builds a new one and every daemon of
the same user shares it. A directory where a build failed is not tried again in this process,
and the failure is logged once; workers then run without the library.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 120.0


@dataclass
class Recipe:
    label: str  # the library is lib<label>-<digest>.so
    what: str  # for the log: "gemv forwarder"
    without: str  # what workers get without it, for the warning
    files: tuple[str, ...]  # package files; the first is the one compiled
    # (compiler, source file, output) -> the command line
    command: Callable[[str, Path, Path], list[str]]
    compiler: Callable[[], str | None]
    no_compiler: str  # the reason given when compiler() finds none
    # Whatever else the build depends on (the MLX it links against), hashed into the name.
    salt: Callable[[], bytes] = lambda: b""
    # "" or why this machine cannot have the library at all (checked before the compiler).
    unsupported: Callable[[], str] = lambda: ""
    # Directories where a build failed, and why: not tried again in this process (a worker's
    # every start would otherwise rerun the compiler), and the warning is logged once.
    failed: dict[Path, str] = field(default_factory=dict)

    def sources(self) -> dict[str, bytes]:
        package = resources.files(__package__)
        return {name: package.joinpath(name).read_bytes() for name in self.files}

    def name(self, code: dict[str, bytes] | None = None) -> str:
        text = b"".join((self.sources() if code is None else code).values())
        return f"{self.label}-{hashlib.sha256(text + self.salt()).hexdigest()[:12]}.so"

    def library(self, *dirs: Path) -> Path | None:
        """The built library in the first of `dirs` that has it or where it can be built; None
        when none can (logged once). Looked for on disk each time, so a deleted copy is
        rebuilt."""
        code = self.sources()
        name = self.name(code)
        new_failures = False
        for cache_dir in dirs:
            out = cache_dir / name
            if out.exists():
                return out
            if cache_dir in self.failed:
                continue
            why = self._unusable(out) or self._build(code, out)
            if not why:
                log.info("built the %s: %s", self.what, out)
                return out
            self.failed[cache_dir] = why
            new_failures = True
        if new_failures:
            log.warning("no %s, workers get %s (docs/performance.md): %s", self.what,
                        self.without, "; ".join(self.failed[d] for d in dirs))
        return None

    def _unusable(self, out: Path) -> str:
        if any(c in str(out) for c in " :"):  # LD_PRELOAD splits on both
            return (f"its path {str(out)!r} would not survive LD_PRELOAD; choose a run_dir "
                    "without spaces or colons")
        return self.unsupported() or ("" if self.compiler() else self.no_compiler)

    def _build(self, code: dict[str, bytes], out: Path) -> str:
        """Compiles into a temporary directory beside `out`, then renames: "" or what
        failed."""
        cc = self.compiler() or ""
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
                for name, text in code.items():
                    (Path(tmp) / name).write_bytes(text)
                built = Path(tmp) / out.name
                proc = subprocess.run(self.command(cc, Path(tmp) / self.files[0], built),
                                      capture_output=True, text=True,
                                      timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
                if proc.returncode != 0 or not built.exists():
                    return (f"building it with {cc} failed (exit {proc.returncode}): "
                            f"{proc.stderr.strip()[-500:]}")
                os.replace(built, out)  # atomic: a concurrent builder's copy is as good
        except (OSError, subprocess.TimeoutExpired) as exc:  # unwritable run_dir, hung compiler
            return f"building it with {cc} in {out.parent} failed: {exc!r}"
        return ""
