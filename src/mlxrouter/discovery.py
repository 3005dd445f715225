"""Model discovery: which model directories exist under the configured roots, their ids and
what each one is (architecture, size, context, capabilities), or why it cannot be used.

Runs in the daemon and the CLI; reads only the file system (no mlx, no mlx_vlm import: the
mlx-vlm architecture list is read from its package directory). Roots are scanned in order
(`Source`s, first id wins): the model directory, the Hugging Face cache, LM Studio's models.
Layouts under a root:
  <root>/<name>/config.json                               id "<name>"
  <root>/<org>--<name>/config.json                        id "<org>/<name>"
  <root>/<org>/<name>/config.json                         id "<org>/<name>"
  <root>/models--<org>--<name>/snapshots/<rev>/config.json id "<org>/<name>" (HF cache layout)
A model dir has config.json, safetensors weights (every shard its index names) and a tokenizer;
anything else is listed as unusable with a reason, never a crash. Symlinks are followed, but a
model whose directory or files resolve outside every configured root is unusable, and an org
level symlink that resolves inside its own root is skipped (it would only repeat ids).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import struct
import time
from pathlib import Path
from typing import Any

import msgspec

from .config import LMSTUDIO_DEFAULTS

log = logging.getLogger(__name__)

SOURCES = ("model_directory", "hf_cache", "lmstudio")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")


class DiscoveredModel(msgspec.Struct, frozen=True):
    id: str
    path: str
    usable: bool = True
    reason: str = ""
    vision: bool = False
    source: str = "model_directory"
    architecture: str = ""
    model_type: str = ""
    quantization: str = ""
    parameters: int | None = None
    weights_bytes: int = 0
    context_length: int | None = None
    capabilities: tuple[str, ...] = ()


class Source(msgspec.Struct, frozen=True):
    """One root to scan. `hf_cache` roots hold only `models--org--name` repos."""

    name: str
    root: Path
    # False: a configured directory left out of discovery_sources: not scanned, but links
    # made by `models link` may still lead into it
    scanned: bool = True


# ---- what a model dir is


# Tokenizers of large vocabularies reach ~30 MB; nothing a scan reads is bigger.
MAX_METADATA_BYTES = 64 * 2**20


def _read_bytes(path: Path) -> bytes | None:
    """A metadata file's bytes; None unless it is a regular file of a sane size (a FIFO or a
    link to /dev/zero named like a model file must not hang or flood a scan)."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_METADATA_BYTES:
            return None
        return path.read_bytes()
    except OSError:
        return None


def read_json(path: Path) -> dict:
    raw = _read_bytes(path)
    try:
        data = json.loads(raw) if raw is not None else None
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    try:
        real = path.resolve()
    except (OSError, RuntimeError):
        return False
    return any(real.is_relative_to(r) for r in roots)


def _weight_files(path: Path) -> tuple[list[Path], str]:
    """The safetensors files of a model dir, or why there are none usable."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(n, str) and n and "/" not in n and n not in (".", "..")
                for n in weight_map.values()):
            return [], "model.safetensors.index.json has no valid weight_map"
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if not names:
            return [], "model.safetensors.index.json names no weight files"
        if missing:
            return [], (f"incomplete download: {len(missing)} of {len(names)} weight shards "
                        f"missing ({missing[0]})")
        return [path / n for n in names], ""
    files = sorted(path.glob("*.safetensors"))
    if files:
        broken = [f.name for f in files if not f.is_file()]
        if broken:  # a link to a deleted blob, a directory of that name
            return [], f"weight file {broken[0]} is missing or not a file (a broken link?)"
        return files, ""
    if any(path.glob("*.gguf")):
        return [], "GGUF checkpoint, not MLX (import it with `mlxrouter models import-gguf`)"
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        return [], "PyTorch checkpoint (.bin/.pt), not MLX safetensors"
    return [], "no .safetensors weights (incomplete download or not an MLX model)"


def _config_problem(path: Path) -> str:
    """Why a model's config.json cannot be loaded (both mlx-lm and mlx-vlm need a JSON object
    with a model_type), else ''."""
    raw = _read_bytes(path)
    if raw is None:
        return "config.json is unreadable or too large"
    try:
        config = json.loads(raw)
    except ValueError:
        return "config.json is not valid JSON (a truncated or damaged file?)"
    if not isinstance(config, dict):
        return "config.json is not a JSON object"
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        return "config.json has no model_type"
    if "text_config" in config and not isinstance(config["text_config"], dict):
        return "config.json's text_config is not an object"
    # what the memory estimate reads: a string or a list there made the listing, /v1/models
    # and every load's planning fail
    text = config.get("text_config", config)
    for key in _SIZE_KEYS:
        value = text.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 0):
            return f"config.json's {key} is not a whole number ({value!r})"
    quant = config.get("quantization")
    if quant is not None and not isinstance(quant, dict):
        return "config.json's quantization is not an object"
    bits = (quant or {}).get("bits")
    if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or bits < 1):
        return f"config.json's quantization.bits is not a whole number ({bits!r})"
    return ""


_SIZE_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "hidden_size", "max_position_embeddings")


def check_model_dir(path: Path, roots: tuple[Path, ...] = ()) -> str:
    """Empty string when `path` looks like a loadable MLX model dir, else why not.
    With `roots`, the dir and its files must resolve inside one of them."""
    if roots and not _inside(path, roots):
        return "symlink points outside the configured model roots"
    if not path.is_dir():
        return "no such directory"
    if not (path / "config.json").is_file():
        if any(path.glob("*.gguf")):
            return "GGUF checkpoint, not MLX (import it with `mlxrouter models import-gguf`)"
        return "no config.json"
    files, reason = _weight_files(path)
    if reason:
        return reason
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return "no tokenizer"
    metadata = [path / n for n in (*TOKENIZER_FILES, *TEMPLATE_FILES, "added_tokens.json")
                if (path / n).exists()]
    if roots and not all(_inside(f, roots) for f in [path / "config.json", *files, *metadata]):
        return "a model file links outside the configured model roots"
    config_problem = _config_problem(path / "config.json")  # (read only inside the roots)
    if config_problem:
        return config_problem
    return ""


_check_model_dir = check_model_dir  # the name earlier callers used


def _vlm_architectures() -> frozenset[str]:
    """mlx-vlm model types that have a vision tower (a `vision.py`), read from its package
    directory without importing it (the daemon must not import mlx_vlm)."""
    try:
        spec = importlib.util.find_spec("mlx_vlm")
    except (ImportError, ValueError):
        return frozenset()
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    found = set()
    for location in spec.submodule_search_locations:
        found |= {p.parent.name for p in Path(location).glob("models/*/vision.py")}
    return frozenset(found)


_VLM: frozenset[str] | None = None


def _is_vision(config: dict) -> bool:
    global _VLM
    if "vision_config" in config:
        return True
    if _VLM is None:
        _VLM = _vlm_architectures()
    return str(config.get("model_type", "")) in _VLM


def vision_capable(config: dict) -> bool:
    """Whether a model's config.json makes it a vision model (a vision_config, or a model_type
    that mlx-vlm serves with a vision tower); never guessed from its name."""
    return isinstance(config, dict) and _is_vision(config)


def _chat_template(path: Path) -> str:
    parts = []
    tok_cfg = read_json(path / "tokenizer_config.json")
    for source in (tok_cfg.get("chat_template"), read_json(path / "chat_template.json")
                   .get("chat_template")):
        if isinstance(source, str):
            parts.append(source)
        elif isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
            parts += [t.get("template", "") for t in source if isinstance(t, dict)]
    raw = _read_bytes(path / "chat_template.jinja")
    if raw is not None:
        parts.append(raw.decode("utf-8", "replace"))
    return "\n".join(p for p in parts if isinstance(p, str))


def _has_think_tokens(path: Path) -> bool:
    return any(b'"</think>"' in (_read_bytes(path / name) or b"")
               for name in ("tokenizer_config.json", "tokenizer.json", "added_tokens.json"))


def capabilities(path: Path, config: dict) -> tuple[str, ...]:
    """From the model's own files, never its name: vision from its config (vision_config or an
    mlx-vlm architecture with a vision tower), tools and reasoning from its chat template and
    tokenizer."""
    template = _chat_template(path)
    caps = ["text"]
    if vision_capable(config):
        caps.append("vision")
    if "tools" in template:
        caps.append("tools")
    if "<think>" in template or "enable_thinking" in template or _has_think_tokens(path):
        caps.append("reasoning")
    return tuple(caps)


def served_context(spec: Any) -> int:
    """The context a worker enforces for the model: its `max_context` (0 = the model's own),
    never more than the model's, read from config.json as the worker reads it
    (`max_position_embeddings`, 4096 where it does not say)."""
    from .memory import _model_config, effective_context, model_max_context

    return effective_context(spec.max_context,
                             model_max_context(_model_config(Path(spec.path))))


def configured_capabilities(found: tuple[str, ...], spec: Any) -> list[str]:
    """A model's capabilities as it is served: what its files say, with its settings applied
    (`supports_vision` forces vision on or off; tools off with `supports_tools = false` or
    `enable_function_calling = false`, and for vision models, which the vision engine serves
    without tools)."""
    caps = [c for c in found if c != "vision" or spec.supports_vision is not False]
    if spec.supports_vision and "vision" not in caps:
        caps.insert(1, "vision")
    template = getattr(spec, "chat_template", None)
    if template:  # a configured template replaces the model's own (templates.py)
        from .templates import TOOL_FORMAT

        # every named template renders tools and sets the call format; with a template file
        # the worker still takes the format from the model's own files, as found above
        if template in TOOL_FORMAT and "tools" not in caps:
            caps.insert(len([c for c in caps if c in ("text", "vision")]), "tools")
    if getattr(spec, "tool_call_format", None) and "tools" not in caps:
        caps.insert(len([c for c in caps if c in ("text", "vision")]), "tools")
    if spec.supports_tools is False or spec.enable_function_calling is False or (
            "vision" in caps):  # the vision engine refuses tools (vlm_engine)
        caps = [c for c in caps if c != "tools"]
    return caps


def _bits_of(quant: Any, base: str, default: int | None) -> int | None:
    """A quantized module's bits: its own entry in config.json's quantization (mixed-bit
    models, e.g. an 8-bit embedding in a 4-bit model), else the model's."""
    own = quant.get(base) if isinstance(quant, dict) else None
    bits = own.get("bits") if isinstance(own, dict) else None
    return bits if isinstance(bits, int) and 0 < bits <= 32 else default


def _safetensors_parameters(files: list[Path], bits: int | None,
                            quant: Any = None) -> int | None:
    """Parameter count from the safetensors headers (a few KB read per file). Quantized
    weights (those with a `.scales` sibling) hold 32/bits values per uint32."""
    total = 0
    for file in files:
        try:
            with file.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > 100 * 2**20:
                    return None
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error):
            return None
        if not isinstance(header, dict):
            return None
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            if name.endswith((".scales", ".biases")):
                continue
            shape = info.get("shape")
            if not isinstance(shape, list) or not all(
                    isinstance(d, int) and d >= 0 for d in shape):
                return None  # not a header we understand: no count rather than a wrong one
            count = math.prod(shape)
            base = name.rsplit(".", 1)[0]
            own = _bits_of(quant, base, bits)
            if own and info.get("dtype") == "U32" and f"{base}.scales" in header:
                count = count * 32 // own
            total += count
    return total or None


def _quantization(config: dict) -> str:
    q = config.get("quantization") or config.get("quantization_config") or {}
    if isinstance(q, dict) and q.get("bits"):
        group = f", group {q['group_size']}" if q.get("group_size") else ""
        return f"{q['bits']}-bit{group}"
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return str(config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype")
               or "")


def _context_length(config: dict) -> int | None:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_ctx"):
        value = text.get(key) or config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


# Description of a usable dir, by (path, config mtime, weight files and sizes): a rescan of an
# unchanged library reads no headers or templates again.
_described: dict[tuple, dict] = {}


def describe(path: Path) -> dict:
    """Metadata fields of DiscoveredModel for a usable model dir (cached)."""
    config_file = path / "config.json"
    files, _ = _weight_files(path)
    try:
        sizes = tuple((f.name, f.stat().st_size) for f in files)
        key = (str(path), config_file.stat().st_mtime_ns, sizes)
    except OSError:
        return {}
    cached = _described.get(key)
    if cached is not None:
        return cached
    config = read_json(config_file)
    quant = config.get("quantization")
    bits = quant.get("bits") if isinstance(quant, dict) else None
    bits = bits if isinstance(bits, int) and 0 < bits <= 32 else None
    archs = config.get("architectures")
    info = {
        "architecture": str(archs[0]) if isinstance(archs, list) and archs else str(
            config.get("model_type", "")),
        "model_type": str(config.get("model_type", "")),
        "quantization": _quantization(config),
        "parameters": _safetensors_parameters(files, bits, quant),
        "weights_bytes": sum(s for _, s in sizes),
        "context_length": _context_length(config),
        "capabilities": capabilities(path, config),
    }
    info["vision"] = "vision" in info["capabilities"]
    _described[key] = info
    return info


def _entry(model_id: str, path: Path, source: str = "model_directory",
           roots: tuple[Path, ...] = ()) -> DiscoveredModel:
    reason = check_model_dir(path, roots)
    if reason:
        return DiscoveredModel(id=model_id, path=str(path), usable=False, reason=reason,
                               source=source)
    try:
        info = describe(path)
    except (TypeError, AttributeError, KeyError, ValueError, OverflowError, OSError) as exc:
        # Metadata of a shape no check above foresaw, or a file gone since the check: this
        # model is unusable, the scan goes on.
        log.warning("discovery: cannot describe %s: %r", path, exc)
        return DiscoveredModel(id=model_id, path=str(path), usable=False, source=source,
                               reason=f"unreadable metadata: {exc}")
    return DiscoveredModel(id=model_id, path=str(path), source=source, **info)


# ---- scanning roots


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


def _scan_child(child: Path, source: str, roots: tuple[Path, ...],
                found: dict[str, DiscoveredModel], root: Path | None = None) -> None:
    if child.name.startswith("models--"):
        model_id = "/".join(child.name.split("--")[1:])
        snap = _snapshot(child)
        if snap is None:
            _add(found, DiscoveredModel(model_id, str(child), False, "no snapshot",
                                        source=source))
        else:
            _add(found, _entry(model_id, snap, source, roots))
    elif source == "hf_cache":
        return  # datasets--*, .locks, xet: not models
    elif (child / "config.json").exists() or any(child.glob("*.gguf")) or any(
            child.glob("*.safetensors")):
        # (a GGUF-only dir, or weights without their config.json, is listed as unusable
        # with the reason, not taken for an org dir and left out)
        _add(found, _entry(child.name.replace("--", "/", 1), child, source, roots))
    elif root is not None and child.is_symlink() and _inside(child, (root,)):
        # An org-level link back into its own root (`alias -> .`) only repeats models under
        # a second id, and removing `alias/m` would delete the real `m`.
        log.debug("discovery: skipped %s (links inside %s)", child, root)
    else:
        for sub in sorted(child.iterdir()):
            try:
                if sub.is_dir() and not sub.name.startswith(".") and (
                        (sub / "config.json").exists() or any(sub.glob("*.gguf"))):
                    _add(found, _entry(f"{child.name}/{sub.name}", sub, source, roots))
            except OSError as exc:  # one unreadable model, not the whole org
                _add(found, DiscoveredModel(f"{child.name}/{sub.name}", str(sub), False,
                                            f"cannot be read: {exc}", source=source))


_warned_twice: set[tuple[str, str, str]] = set()


def _add(found: dict[str, DiscoveredModel], model: DiscoveredModel) -> None:
    """Record a model; for an id seen before, a usable entry beats an unusable one and
    otherwise the first one stays (a half-finished copy must not hide a complete one).
    Within one root two directories can name the same id (`org--name` and `org/name`): the
    hidden one is logged once, since nothing else would show it."""
    seen = found.get(model.id)
    if seen is None or (model.usable and not seen.usable):
        found[model.id] = model
    kept = found[model.id]
    if seen is not None and seen.source == model.source and seen.path != model.path:
        hidden = model if kept is seen else seen
        key = (model.id, kept.path, hidden.path)
        if key not in _warned_twice:
            _warned_twice.add(key)
            log.warning("discovery: two directories are model '%s': %s is served, %s is "
                        "hidden (rename or remove one)", model.id, kept.path, hidden.path)


def scan(root: Path, source: str = "model_directory",
         roots: tuple[Path, ...] | None = None) -> dict[str, DiscoveredModel]:
    """Every model dir under one root. `roots`: where symlinks may lead (default: `root`)."""
    found: dict[str, DiscoveredModel] = {}
    if not root.is_dir():
        return found
    root_real = root.resolve()
    allowed = roots if roots is not None else (root_real,)
    try:
        children = sorted(root.iterdir())
    except OSError as exc:
        log.warning("discovery: cannot read %s: %s", root, exc)
        return found
    for child in children:
        try:
            if not child.is_dir() or child.name.startswith("."):
                continue
            _scan_child(child, source, allowed, found, root_real)
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("discovery: skipped %s: %s", child, exc)
    return found


def scan_sources(sources: list[Source]) -> dict[str, DiscoveredModel]:
    """All sources in order; an id found in an earlier source hides the same id later,
    unless only the later one is usable. A later source's link to a directory an earlier
    source serves under another id (`models link --lmstudio` puts `mine` into LM Studio as
    `mlxrouter/mine`) is the same model, not a second one to serve."""
    roots = tuple(r for r in (_real(s.root) for s in sources) if r is not None)
    found: dict[str, DiscoveredModel] = {}
    for source in (s for s in sources if s.scanned):
        served = {_real(Path(m.path)): m.id for m in found.values() if m.usable}
        for model in scan(source.root, source.name, roots).values():
            # only a link: a source's own directory is never hidden (a user's link in the
            # model directory to an HF snapshot keeps the repo id served too)
            linked = model.usable and os.path.islink(model.path)
            other = served.get(_real(Path(model.path))) if linked else None
            if other is not None and other != model.id:
                continue
            _add(found, model)
    return found


def _real(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return None


def sources_for(config) -> list[Source]:
    """The configured discovery sources of a `config.Config`, in order."""
    sup = config.supervisor
    roots = {"model_directory": config.model_directory,
             "hf_cache": Path(sup.hf_cache_dir).expanduser() if sup.hf_cache_dir else None,
             # with neither default there at load, LM Studio's own default is watched: made
             # later (LM Studio installed while the daemon runs), it is scanned then
             "lmstudio": Path(sup.lmstudio_dir or LMSTUDIO_DEFAULTS[0]).expanduser()}
    return ([Source(name, roots[name]) for name in sup.discovery_sources
             if roots.get(name) is not None]
            + [Source(name, root, scanned=False) for name, root in roots.items()
               if root is not None and name not in sup.discovery_sources])


# Why a configured model without a `path` cannot be served when discovery does not find it.
NOT_ON_DISK = "has no path and was not found on disk"


class Catalog:
    """Configured models plus what is on disk; rescans when the directory changes."""

    def __init__(self, root: Path, configured: dict[str, str | None],
                 sources: list[Source] | None = None) -> None:
        self.root = root
        self._configured = configured
        self._sources = sources
        self._found: dict[str, DiscoveredModel] = {}
        self._stamp: tuple | None = None
        self._forced_at = 0.0

    def configure(self, root: Path, configured: dict[str, str | None]) -> None:
        """A reloaded config: new root and configured models; rescan on next use."""
        self.root = root
        self._configured = configured
        self._stamp = None

    def use_sources(self, sources: list[Source]) -> None:
        """Scan these roots (in order) instead of the model directory alone."""
        self._sources = sources
        self._stamp = None

    def sources(self) -> list[Source]:
        if self._sources is None:
            return [Source("model_directory", self.root)]
        return [s if s.name != "model_directory" else Source(s.name, self.root, s.scanned)
                for s in self._sources]

    def _mtimes(self) -> tuple:
        out = []
        for source in self.sources():
            try:
                out.append(source.root.stat().st_mtime_ns)
            except OSError:
                out.append(None)
        return tuple(out)

    def refresh(self, force: bool = False) -> None:
        stamp = self._mtimes()
        if force or stamp != self._stamp or self._stamp is None:
            self._found = scan_sources(self.sources())
            self._stamp = stamp

    def ids(self) -> list[str]:
        # A download finishing inside an existing dir changes no root mtime: always rescan
        # here (a few stat calls per model; metadata is cached); lookups by id use the
        # cached scan first.
        self.refresh(force=True)
        usable = {m.id for m in self._found.values() if m.usable}
        return sorted(usable | set(self._configured))

    def models(self) -> dict[str, DiscoveredModel]:
        """Everything the last scan found, unusable dirs included."""
        self.refresh()
        return dict(self._found)

    def info(self, model_id: str) -> DiscoveredModel | None:
        """What discovery knows of a model: the scanned entry, or a configured path described."""
        configured = self._configured.get(model_id)
        if configured:
            path = Path(configured).expanduser()
            reason = check_model_dir(path)
            return DiscoveredModel(model_id, str(path), not reason, reason, source="config",
                                   **(describe(path) if not reason else {}))
        self.refresh()
        return self._found.get(model_id)

    def path_of(self, model_id: str) -> str | None:
        """The discovered path for a model id, or None. Configured paths win in config.spec_for."""
        self.refresh()
        found = self._found.get(model_id)
        if found is not None and found.usable and not (Path(found.path) / "config.json").exists():
            # removed (`models rm org/x` changes the mtime of org/, not of the root): rescan
            self.refresh(force=True)
            found = self._found.get(model_id)
        elif (found is None or not found.usable) and time.monotonic() - self._forced_at > 1.0:
            # A model dropped into a subdirectory changes no root mtime; at most once a second,
            # so a stream of requests for unknown models cannot keep the loop scanning.
            self._forced_at = time.monotonic()
            self.refresh(force=True)
            found = self._found.get(model_id)
        return found.path if found is not None and found.usable else None

    def knows(self, model_id: str) -> bool:
        return model_id in self._configured or self.path_of(model_id) is not None
