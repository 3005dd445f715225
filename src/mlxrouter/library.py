"""The model library on disk: pull from the Hugging Face Hub, link from the HF cache or LM
Studio (and back), remove.

Runs in the CLI, and `pull` also in a thread of the daemon (on-demand downloads); imports no
mlx. huggingface_hub is imported only inside `pull` (it reads HF_ENDPOINT / HF_TOKEN itself).
Nothing here copies weights: links are symlinks, and `remove` never deletes outside the model
directory (a link is unlinked, its target left alone).
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from fnmatch import fnmatch
from pathlib import Path

from . import discovery
from .discovery import DiscoveredModel, Source

log = logging.getLogger(__name__)

# What a model needs and nothing else: configs, tokenizer, chat template, processor files, and
# the weights (with an index, only the shards it names: Mistral-style repos also carry a
# `consolidated.safetensors` of the same weights). Top level only: no onnx/ or original/.
METADATA_PATTERNS = [
    "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "*.tiktoken", "chat_template.json",
    "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json",
]
INDEX = "model.safetensors.index.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class LibraryError(Exception):
    """A library operation failed; the message says why, for the user."""


# How a failed download goes on, in pull's message; the daemon, which downloads on demand,
# says it its own way (Supervisor._download)
RESUME_HINT = "run pull again to resume"
# The reason listed for a configured repo id not downloaded yet, with downloads allowed.
PULLED_ON_FIRST_REQUEST = "not downloaded yet: the first request for it pulls it"


class RepoNotFound(LibraryError):
    """The hub has no such repository (or it is private / gated without a token)."""


def is_repo_id(name: str) -> bool:
    """`org/name` that the Hub itself would accept. `--` is refused too: the folder a pull
    writes (`org--name`) would be the same for `a--b/c` and `a/b--c`. The hub's own validator
    is imported lazily (callers in the daemon only get here with allow_download on)."""
    if not _REPO_ID.match(name) or ".." in name or "--" in name:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def pull_target(model_directory: Path, repo_id: str) -> Path:
    return model_directory / repo_id.replace("/", "--")


class Cancelled(LibraryError):
    """The pull was told to stop (its deadline passed, or the daemon is shutting down)."""


# One pull at a time per target folder: a retry after an abandoned (hung) pull waits for that
# thread to end (its per-request timeouts bound the wait) instead of writing beside it.
_target_locks: dict[Path, threading.Lock] = {}
_target_locks_guard = threading.Lock()


def _lock_for(target: Path) -> threading.Lock:
    with _target_locks_guard:
        return _target_locks.setdefault(target.absolute(), threading.Lock())


def _bound_hub_requests() -> None:
    """Give every Hub request a timeout. huggingface_hub's shared client has none, and
    `repo_info` passes `timeout=None` explicitly, so a server that accepts and never answers
    would block the pull forever. Connect/read/write/pool timeouts are
    HF_HUB_DOWNLOAD_TIMEOUT seconds (its own setting, default 10); explicit timeouts that
    huggingface_hub passes are kept."""
    import httpx2
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils import _http

    if getattr(_http._GLOBAL_CLIENT_FACTORY, "mlxrouter_bounded", False):
        return
    limit = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)

    class Bounded(httpx2.Client):
        def build_request(self, *args, timeout=httpx2.USE_CLIENT_DEFAULT, **kwargs):
            if timeout is None:
                timeout = httpx2.USE_CLIENT_DEFAULT
            return super().build_request(*args, timeout=timeout, **kwargs)

    def factory() -> httpx2.Client:
        return Bounded(event_hooks={"request": [_http.hf_request_event_hook]},
                       follow_redirects=True, timeout=httpx2.Timeout(limit))

    factory.mlxrouter_bounded = True  # type: ignore[attr-defined]
    set_client_factory(factory)


def pull(repo_id: str, model_directory: Path, *, revision: str | None = None,
         progress: bool = True, deadline: float | None = None,
         cancel: threading.Event | None = None) -> Path:
    """Download the files a model needs into `<model_directory>/<org>--<name>`, resuming what
    an earlier pull left, then check that discovery finds a usable model there.

    `deadline` (time.monotonic()) and `cancel` stop a pull at its next chunk of bytes; each Hub
    request also times out on its own (HF_HUB_DOWNLOAD_TIMEOUT). A failed pull that got no
    model file leaves no folder behind; one with files keeps them, so pulling again resumes."""
    if not is_repo_id(repo_id):
        why = (": ids with '--' are refused, since the folder a pull writes (org--name) would "
               "be the same for two of them" if "--" in repo_id else " (org/name)")
        raise LibraryError(f"'{repo_id}' is not a Hugging Face repo id mlxrouter pulls{why}")
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    from tqdm.auto import tqdm

    _bound_hub_requests()

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"download of '{repo_id}' was cancelled")
        if deadline is not None and time.monotonic() > deadline:
            raise Cancelled(f"download of '{repo_id}' ran past its deadline")

    class Bar(tqdm):  # every chunk of bytes passes here: the place to stop a pull
        def __init__(self, *args, **kwargs):
            if not progress:
                kwargs["disable"] = True  # the daemon logs instead of drawing bars
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            check()
            return super().update(n)

    def fetch(names: list[str], commit: str) -> None:
        if names:
            snapshot_download(repo_id, revision=commit, local_dir=target, allow_patterns=names,
                              tqdm_class=Bar, max_workers=4)

    target = pull_target(model_directory, repo_id)
    if target.is_symlink():
        raise LibraryError(f"{target} is a link to {target.resolve()} (made by `models link`): "
                           f"a pull would write into the linked folder; remove the link "
                           f"(`mlxrouter models rm {repo_id}`) to pull a copy of its own")
    with _lock_for(target):
        check()
        log.info("pull repo=%s revision=%s into %s", repo_id, revision or "main", target)
        try:
            info = HfApi().model_info(repo_id, revision=revision)
            names = [s.rfilename for s in info.siblings or [] if "/" not in s.rfilename]
            _require_safetensors(repo_id, names)
            metadata = [n for n in names if any(fnmatch(n, p) for p in METADATA_PATTERNS)]
            fetch(metadata, info.sha)  # the index first: it says which shards to fetch
            weights = _weights_to_fetch(names, target)
            fetch(weights, info.sha)
            if target.is_dir():
                _remove_stale(target, set(metadata) | set(weights))
        except RepositoryNotFoundError:
            _remove_if_empty(target)
            raise RepoNotFound(f"the Hugging Face Hub has no model '{repo_id}' (or it is "
                               f"private or gated; set HF_TOKEN)") from None
        except RevisionNotFoundError:
            _remove_if_empty(target)
            raise RepoNotFound(f"'{repo_id}' has no revision '{revision}'") from None
        except LibraryError:  # cancelled, or nothing MLX can load
            _remove_if_empty(target)
            raise
        except Exception as exc:  # HTTP, protocol, file system: all one failed download
            _remove_if_empty(target)
            raise LibraryError(f"download of '{repo_id}' failed ({RESUME_HINT}): "
                               f"{_first_line(exc)}") from None
        except BaseException:
            _remove_if_empty(target)
            raise
    reason = discovery.check_model_dir(target)
    if reason:
        raise LibraryError(f"downloaded '{repo_id}' to {target}, but it is not a usable MLX "
                           f"model: {reason}")
    return target


def _require_safetensors(repo_id: str, names: list[str]) -> None:
    """Refuse before downloading anything when the repo holds no weights MLX loads."""
    if any(n.endswith(".safetensors") for n in names):
        return
    if any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        kind = ": it holds a PyTorch checkpoint (convert it with `mlx_lm.convert`)"
    elif any(n.endswith(".gguf") for n in names):
        kind = ": it holds GGUF files (download one and use `mlxrouter models import-gguf`)"
    else:
        kind = ""
    raise LibraryError(f"'{repo_id}' is not a usable MLX model: no .safetensors weights{kind}")


def _weights_to_fetch(names: list[str], target: Path) -> list[str]:
    """The shards the downloaded index names, or every top-level .safetensors without one."""
    if INDEX not in names:
        return [n for n in names if n.endswith(".safetensors")]
    weight_map = discovery.read_json(target / INDEX).get("weight_map")
    wanted = set(weight_map.values()) if isinstance(weight_map, dict) else set()
    return sorted(n for n in names if n in wanted)


def _remove_stale(target: Path, fetched: set[str]) -> None:
    """Model files an earlier pull (another revision, an older layout) left that this snapshot
    lacks: kept, they would be loaded with the new config (mlx-lm reads every *.safetensors)."""
    for f in target.iterdir():
        if f.name in fetched or not f.is_file() or f.is_symlink():
            continue
        if f.name.endswith(".safetensors") or any(fnmatch(f.name, p)
                                                  for p in METADATA_PATTERNS):
            log.info("pull: removing %s (not in the snapshot just fetched)", f)
            f.unlink()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _remove_if_empty(path: Path) -> None:
    """A pull that got nothing leaves no directory behind: no model file, and nothing in its
    own .cache/ but tree listings and locks (no partial `.incomplete` bytes to resume from)."""
    try:
        if not path.is_dir() or path.is_symlink():
            return
        if any(p.name != ".cache" for p in path.iterdir()):
            return
        if any(f.name.endswith(".incomplete") and f.stat().st_size > 0
               for f in path.rglob("*") if f.is_file()):
            return
        shutil.rmtree(path)
    except OSError:
        pass


# ---- link


def _link(link: Path, target: Path) -> str:
    if link.is_symlink() or link.exists():
        return f"skipped {link} (already exists)"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=True)
    return f"linked {link} -> {target}"


def _refuse_unknown(names: list[str] | None, ids: list[str], where: str) -> None:
    """An id asked for by name that is not there is refused before anything is linked."""
    unknown = [name for name in names or () if name not in ids]
    if unknown:
        listed = ", ".join(sorted(set(ids))) or "none"
        raise LibraryError(f"no model {', '.join(map(repr, unknown))} {where} "
                           f"(ids there: {listed})")


def link_into_model_directory(model_directory: Path, sources: list[Source],
                              names: list[str] | None = None) -> list[str]:
    """Symlink usable models of the HF cache / LM Studio into the model directory: an HF repo
    as `models--org--name` (its refs keep choosing the snapshot), an LM Studio model as
    `org--name`. Returns one line per model for the user."""
    have = discovery.scan(model_directory) if model_directory.is_dir() else {}
    lines = []
    home = model_directory.resolve()
    roots = tuple(s.root.resolve() for s in sources if s.root.is_dir()) + (home,)
    found = [(source, model) for source in sources
             if source.name != "model_directory" and source.scanned
             for model in discovery.scan(source.root, source.name, roots).values()]
    _refuse_unknown(names, [model.id for _, model in found], "in the HF cache or LM Studio")
    model_directory.mkdir(parents=True, exist_ok=True)
    for source, model in found:
        if names and model.id not in names:
            continue
        if Path(model.path).resolve().is_relative_to(home):
            lines.append(f"skipped {model.id} (a link into {model_directory} already)")
        elif not model.usable:
            lines.append(f"skipped {model.id} ({model.reason})")
        elif model.id in have:
            lines.append(f"skipped {model.id} (already in {model_directory})")
        elif source.name == "hf_cache":
            repo = Path(model.path).parent.parent  # snapshots/<rev> -> models--org--name
            lines.append(_link(model_directory / repo.name, repo))
        else:
            lines.append(_link(model_directory / model.id.replace("/", "--"),
                               Path(model.path)))
        have[model.id] = model
    return lines


def link_into_lmstudio(model_directory: Path, lmstudio_dir: Path,
                       names: list[str] | None = None,
                       roots: tuple[Path, ...] = ()) -> list[str]:
    """Symlink usable models of the model directory into LM Studio's org/name layout (ids
    without an org go under `mlxrouter/`). `roots`: every configured root, where the model
    directory's own links (made by `models link`) may lead."""
    lines = []
    present = discovery.scan(lmstudio_dir, "lmstudio") if lmstudio_dir.is_dir() else {}
    mine = discovery.scan(model_directory, roots=(model_directory.resolve(), *roots))
    _refuse_unknown(names, list(mine), f"in {model_directory}")
    for model in mine.values():
        if names and model.id not in names:
            continue
        if not model.usable:
            lines.append(f"skipped {model.id} ({model.reason})")
            continue
        model_id = model.id if "/" in model.id else f"mlxrouter/{model.id}"
        if model_id in present:
            lines.append(f"skipped {model.id} (already in {lmstudio_dir})")
            continue
        lines.append(_link(lmstudio_dir / model_id, Path(model.path).resolve()))
    return lines


# ---- remove


def removal_target(model_directory: Path, model: DiscoveredModel) -> Path:
    """The entry under the model directory that holds `model`: its top-level dir or link,
    or `<org>/<name>` for the nested layout."""
    root = model_directory.absolute()
    path = Path(model.path).absolute()
    rel = path.relative_to(root)
    top = root / rel.parts[0]
    if len(rel.parts) == 1 or top.name.startswith("models--"):
        return top
    return top / rel.parts[1]


def remove(model_directory: Path, model_id: str) -> tuple[Path, str]:
    """Remove a model from the model directory: unlink a link, delete a real directory that
    lies inside the model directory. Returns (path, what was done)."""
    model = discovery.scan(model_directory).get(model_id)
    if model is None:
        raise LibraryError(f"no model '{model_id}' in {model_directory}")
    target = removal_target(model_directory, model)
    linked = _linked_parent(model_directory, target)
    if linked is not None:
        raise LibraryError(f"{linked} is a symlink; not removing '{model_id}' through it "
                           f"(remove the link itself, or the model where it really lies)")
    if target.is_symlink():
        target.unlink()
        _prune_empty_org(model_directory, target)
        return target, "unlinked"
    if not target.resolve().is_relative_to(model_directory.resolve()):
        raise LibraryError(f"{target} resolves outside {model_directory}; not deleting it")
    shutil.rmtree(target)  # never follows links inside: they are unlinked, targets kept
    _prune_empty_org(model_directory, target)
    return target, "deleted"


def _linked_parent(model_directory: Path, target: Path) -> Path | None:
    """The first symlink between the model directory and `target` (both excluded), if any:
    through `alias -> .` the id `alias/m` names the real `m`, which is not to be deleted."""
    root = model_directory.absolute()
    rel = target.absolute().relative_to(root)
    path = root
    for part in rel.parts[:-1]:
        path = path / part
        if path.is_symlink():
            return path
    return None


def _prune_empty_org(model_directory: Path, removed: Path) -> None:
    parent = removed.parent
    if parent.absolute() != model_directory.absolute():
        try:
            parent.rmdir()
        except OSError:
            pass


def dir_bytes(path: Path) -> int:
    """Bytes a removal frees: files under a real dir (links not followed), 0 for a link."""
    if path.is_symlink():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


# ---- listing


def budgeted_bytes(config, model_id: str, path: str) -> int | None:
    """What the supervisor budgets a load of this model at, before any worker was measured
    (the supervisor's own figure: memory.estimate_cost or required_memory_gb)."""
    from . import memory
    from .config import ConfigError

    try:
        spec = config.spec_for(model_id, path)
    except ConfigError:
        return None
    return memory.budgeted_bytes(spec, memory.DEFAULT_OVERHEAD_BYTES)


def list_rows(config, states: dict[str, str] | None = None) -> list[dict]:
    """Every model discovery finds (unusable ones with their reason) plus configured ones,
    as plain dicts: what `models list --json` prints."""
    found = discovery.scan_sources(discovery.sources_for(config))
    catalog = discovery.Catalog(config.model_directory,
                                {m: o.path for m, o in config.models.items()})
    for model_id in config.models:
        info = catalog.info(model_id) if config.models[model_id].path else None
        if info is not None:
            found[model_id] = info
        elif model_id not in found:
            # named in the config, not on disk: listed as /v1/models lists it
            pulled = config.supervisor.allow_download and is_repo_id(model_id)
            found[model_id] = discovery.DiscoveredModel(
                model_id, "", usable=pulled, source="config",
                reason=PULLED_ON_FIRST_REQUEST if pulled else discovery.NOT_ON_DISK)
    rows = []
    for model in sorted(found.values(), key=lambda m: m.id):
        from .config import ConfigError

        caps, context = list(model.capabilities), model.context_length
        if model.usable:
            try:
                spec = config.spec_for(model.id, model.path)
                caps = discovery.configured_capabilities(model.capabilities, spec)
                context = discovery.served_context(spec)
            except ConfigError:
                pass
        rows.append({
            "id": model.id, "path": model.path, "source": model.source,
            "usable": model.usable, "reason": model.reason or None,
            "architecture": model.architecture, "quantization": model.quantization,
            "parameters": model.parameters, "weights_bytes": model.weights_bytes,
            "estimated_memory_bytes": (budgeted_bytes(config, model.id, model.path)
                                       if model.usable else None),
            "context_length": context,
            "capabilities": caps, "vision": "vision" in caps,
            # (an unusable model has no state: the daemon does not know it)
            "state": (states or {}).get(model.id, "STOPPED" if states is not None
                                        and model.usable else None),
        })
        rows[-1]["loaded"] = rows[-1]["state"] == "RUNNING"
    return rows
