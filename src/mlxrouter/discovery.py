"""Model discovery: which model directories exist under the model directory, and their ids.

Runs in the daemon and the CLI; reads only the file system (no mlx). Layouts:
  <root>/<name>/config.json                               id "<name>"
  <root>/<org>--<name>/config.json                        id "<org>/<name>"
  <root>/<org>/<name>/config.json                         id "<org>/<name>"
  <root>/models--<org>--<name>/snapshots/<rev>/config.json id "<org>/<name>" (HF cache layout)
A model dir has config.json, weights (*.safetensors) and a tokenizer; anything else is skipped
with a reason, never a crash.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import msgspec

log = logging.getLogger(__name__)


class DiscoveredModel(msgspec.Struct, frozen=True):
    id: str
    path: str
    usable: bool = True
    reason: str = ""
    vision: bool = False


def _check_model_dir(path: Path) -> str:
    """Empty string when `path` looks like a loadable MLX model dir, else why not."""
    if not (path / "config.json").is_file():
        return "no config.json"
    if not any(path.glob("*.safetensors")):
        return "no .safetensors weights (incomplete download or not an MLX model)"
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
            or (path / "tokenizer_config.json").is_file()):
        return "no tokenizer"
    return ""


def _is_vision(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "vision_config" in cfg


def _snapshot(repo_dir: Path) -> Path | None:
    """The snapshot `refs/main` points at, else the most recently modified one."""
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    try:
        rev = ref.read_text().strip() if ref.is_file() else ""
    except (OSError, ValueError):  # unreadable or not UTF-8: fall back to the newest snapshot
        rev = ""
    if rev and (snapshots / rev).is_dir():
        return snapshots / rev
    revs = [p for p in snapshots.glob("*") if p.is_dir()] if snapshots.is_dir() else []
    return max(revs, key=lambda p: p.stat().st_mtime) if revs else None


def _entry(model_id: str, path: Path) -> DiscoveredModel:
    reason = _check_model_dir(path)
    return DiscoveredModel(id=model_id, path=str(path), usable=not reason, reason=reason,
                           vision=not reason and _is_vision(path))


def scan(root: Path) -> dict[str, DiscoveredModel]:
    found: dict[str, DiscoveredModel] = {}
    if not root.is_dir():
        return found
    for child in sorted(root.iterdir()):
        try:
            if not child.is_dir() or child.name.startswith("."):
                continue
            if child.name.startswith("models--"):
                parts = child.name.split("--")[1:]
                snap = _snapshot(child)
                model_id = "/".join(parts)
                if snap is None:
                    found[model_id] = DiscoveredModel(model_id, str(child), False, "no snapshot")
                else:
                    found[model_id] = _entry(model_id, snap)
            elif (child / "config.json").exists():
                found[child.name.replace("--", "/", 1)] = _entry(
                    child.name.replace("--", "/", 1), child)
            else:
                for sub in sorted(child.iterdir()):
                    if sub.is_dir() and (sub / "config.json").exists():
                        found[f"{child.name}/{sub.name}"] = _entry(
                            f"{child.name}/{sub.name}", sub)
        except (OSError, ValueError) as exc:
            log.warning("discovery: skipped %s: %s", child, exc)
    return found


class Catalog:
    """Configured models plus what is on disk; rescans when the directory changes."""

    def __init__(self, root: Path, configured: dict[str, str | None]) -> None:
        self.root = root
        self._configured = configured
        self._found: dict[str, DiscoveredModel] = {}
        self._stamp: float | None = None
        self._forced_at = 0.0

    def configure(self, root: Path, configured: dict[str, str | None]) -> None:
        """A reloaded config: new root and configured models; rescan on next use."""
        self.root = root
        self._configured = configured
        self._stamp = None

    def refresh(self, force: bool = False) -> None:
        try:
            stamp = self.root.stat().st_mtime
        except OSError:
            stamp = None
        if force or stamp != self._stamp or self._stamp is None:
            self._found = scan(self.root)
            self._stamp = stamp

    def ids(self) -> list[str]:
        # A download finishing inside an existing dir changes no root mtime: always rescan
        # here (a few stat calls per model); lookups by id use the cached scan first.
        self.refresh(force=True)
        usable = {m.id for m in self._found.values() if m.usable}
        return sorted(usable | set(self._configured))

    def path_of(self, model_id: str) -> str | None:
        """The discovered path for a model id, or None. Configured paths win in config.spec_for."""
        self.refresh()
        found = self._found.get(model_id)
        if (found is None or not found.usable) and time.monotonic() - self._forced_at > 1.0:
            # A model dropped into a subdirectory changes no root mtime; at most once a second,
            # so a stream of requests for unknown models cannot keep the loop scanning.
            self._forced_at = time.monotonic()
            self.refresh(force=True)
            found = self._found.get(model_id)
        return found.path if found is not None and found.usable else None

    def knows(self, model_id: str) -> bool:
        return model_id in self._configured or self.path_of(model_id) is not None
