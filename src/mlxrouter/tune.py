"""`mlxrouter models tune NAME`: measure a model in a real worker and write its worker file.

Runs in the user's shell; imports no mlx. It starts a private `mlxrouter serve` (temp config,
free port, this one model, batch of 1, no prompt cache), drives it over HTTP exactly as a client
would, reads load time and memory from /v1/health (the worker's Ready and Stats figures and the
supervisor's Pss measurement), then stops it. From those figures it derives
`required_memory_gb`, `max_tokens` and `memory_pressure_max_tokens` and writes them into
`workers/NAME.toml`, keeping every other line of an existing file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import datetime, timezone
from pathlib import Path

import httpx
import msgspec

from . import memory
from .config import Config, ConfigError, WorkerFile
from .discovery import Catalog, sources_for
from .states import slug

# Tokens decoded per measurement; max_tokens is what this speed decodes in this long.
DECODE_TOKENS = 32
MAX_TOKENS_BUDGET_S = 60.0
TUNED_KEYS = ("required_memory_gb", "max_tokens", "memory_pressure_max_tokens")


class TuneError(Exception):
    pass


class Point(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    decode_tokens_per_s: float | None
    peak_bytes: int


class TuneResult(msgspec.Struct):
    model: str
    path: str
    load_s: float
    memory_after_load_bytes: int
    bytes_per_1k_tokens: int
    bytes_per_1k_tokens_config: int
    points: list[Point]
    context: int
    values: dict
    worker_file: str = ""


# ---- the private daemon


class _Daemon:
    """`mlxrouter serve` on a free port with a temp config naming only this model."""

    def __init__(self, config: Config, model_id: str, path: str, context: int) -> None:
        spec = config.spec_for(model_id, path)
        self.dir = Path(tempfile.mkdtemp(prefix="mlxr-tune-"))
        self.model_id = model_id
        sup = {"model_directory": str(self.dir / "models"), "run_dir": str(self.dir / "run"),
               "log_dir": str(self.dir / "logs"), "import_embedded_model": False,
               "preload_default_model": False, "discovery_sources": ["model_directory"],
               "use_system_blas": config.supervisor.use_system_blas,
               "system_blas": config.supervisor.system_blas,
               "gemv_forward": config.supervisor.gemv_forward}
        worker = {"id": model_id, "path": path, "max_running": 1, "max_context": context,
                  "prompt_cache_bytes": 0, "load_dtype": spec.load_dtype, "env": spec.env,
                  "compute_nice": spec.compute_nice,
                  "timeout_s": 3600.0}
        (self.dir / "workers").mkdir(parents=True)
        (self.dir / "models").mkdir()
        (self.dir / "supervisor.toml").write_text(
            _toml({"server": {"host": "127.0.0.1", "port": 0}, "supervisor": sup}))
        (self.dir / "workers" / "model.toml").write_text(_toml(worker))
        self.headers = ({"Authorization": f"Bearer {config.server.api_keys[0]}"}
                        if config.server.api_keys else {})
        self.admin = ({"Authorization": f"Bearer {config.server.admin_key}"}
                      if config.server.admin_key else {})
        self.proc: subprocess.Popen | None = None
        self.http: httpx.Client | None = None

    def start(self, timeout: float = 60) -> None:
        out = open(self.dir / "serve.out", "wb")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlxrouter", "serve", "--config",
             str(self.dir / "supervisor.toml"), "--model-dir", str(self.dir / "models")],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TuneError(f"the tuning daemon exited with {self.proc.returncode}: "
                                f"{self.log_tail()}")
            try:
                info = json.loads((self.dir / "run" / "daemon.lock").read_text() or "{}")
            except (OSError, ValueError):
                info = {}
            if info.get("port") and info.get("pid") == self.proc.pid:
                self.http = httpx.Client(base_url=f"http://127.0.0.1:{info['port']}",
                                         headers=self.headers, timeout=600)
                return
            time.sleep(0.05)
        raise TuneError("the tuning daemon did not start in time")

    def log_tail(self) -> str:
        text = ""
        for name in ("logs/daemon.log", "serve.out"):
            try:
                text += (self.dir / name).read_text(errors="replace")[-1500:]
            except OSError:
                pass
        return text.strip()

    def worker(self) -> dict:
        body = self.http.get("/v1/health").json()
        for w in body.get("workers", []):
            if w["model"] == self.model_id:
                return w
        return {}

    def stop(self) -> None:
        if self.http is not None:
            self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _toml(table: dict) -> str:
    """A small TOML writer for the flat tables this module writes (strings, numbers, bools,
    lists of strings, inline tables)."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    lines = []
    for key, v in table.items():
        if isinstance(v, dict) and key in ("server", "supervisor", "defaults"):
            lines.append(f"[{key}]")
            lines += [f"{k} = {value(x)}" for k, x in v.items()]
        else:
            lines.insert(0, f"{key} = {value(v)}")
    return "\n".join(lines) + "\n"


# ---- measuring


def _wait_stats(daemon: _Daemon, before: dict, timeout: float = 1.5) -> dict:
    """The worker's figures after Stats (sent every second) reflect the last request."""
    deadline = time.monotonic() + timeout
    w = daemon.worker()
    while time.monotonic() < deadline and (
            w.get("memory_bytes") == before.get("memory_bytes")):
        time.sleep(0.1)
        w = daemon.worker()
    return w


def _peak(w: dict) -> int:
    """The worker's peak memory as the supervisor measures it for its budget (Pss on Linux,
    phys_footprint on macOS), so the derived figures are in the budget's own units."""
    return int(w.get("memory_bytes") or 0)


def _complete(daemon: _Daemon, prompt: str, max_tokens: int) -> tuple[dict, float]:
    t0 = time.monotonic()
    resp = daemon.http.post("/v1/completions", json={
        "model": daemon.model_id, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0})
    elapsed = time.monotonic() - t0
    if resp.status_code != 200:
        raise TuneError(f"completion failed ({resp.status_code}): {resp.text[:300]}")
    return resp.json().get("usage", {}), elapsed


def _measure_point(daemon: _Daemon, prompt: str) -> Point:
    """Decode speed from two requests on the same prompt (1 token, then DECODE_TOKENS): the
    difference is pure decoding, whatever prefill costs and however the stream is chunked."""
    before = daemon.worker()
    _, t_one = _complete(daemon, prompt, 1)
    usage, t_all = _complete(daemon, prompt, DECODE_TOKENS)
    after = _wait_stats(daemon, before)
    done = int(usage.get("completion_tokens", 0))
    rate = round((done - 1) / (t_all - t_one), 2) if done > 1 and t_all > t_one else None
    return Point(int(usage.get("prompt_tokens", 0)), done, rate, _peak(after))


def _prompt_for(tokens: int, per_word: float) -> str:
    return " hello" * max(1, int(tokens / per_word))


def _slope(points: list[Point]) -> int:
    """Least-squares bytes per token of prompt, from (prompt_tokens, peak) pairs; >= 0."""
    if len(points) < 2:
        return 0
    xs = [p.prompt_tokens for p in points]
    ys = [p.peak_bytes for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0
    return max(0, int(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var))


# ---- deriving the settings


def derive(*, load_bytes: int, per_token_bytes: int, context: int, max_running: int,
           prompt_cache_bytes: int, decode_tps: float | None, current_max_tokens: int) -> dict:
    """Worker-file values from measured figures. required_memory_gb: memory after load plus a
    full context for every batch slot plus the prompt cache (the supervisor multiplies it by
    safety_margin). max_tokens: what the slowest measured decode speed produces in
    MAX_TOKENS_BUDGET_S, within the context. Pressure caps: 1/2, 1/4, 1/8 of that, the high
    and critical ones also held to 256 MB / 64 MB of context growth."""
    need = load_bytes + per_token_bytes * context * max_running + prompt_cache_bytes
    required_gb = math.ceil(need / memory.GB * 100) / 100
    if decode_tps:
        max_tokens = int(decode_tps * MAX_TOKENS_BUDGET_S) // 16 * 16
        max_tokens = max(16, min(max_tokens, context))
    else:
        max_tokens = current_max_tokens
    per_token = max(per_token_bytes, 1)
    caps = {
        "moderate": max(16, max_tokens // 2),
        "high": max(16, min(max_tokens // 4, 256 * 2**20 // per_token)),
        "critical": max(16, min(max_tokens // 8, 64 * 2**20 // per_token)),
    }
    caps = {k: min(v, max_tokens) for k, v in caps.items()}
    return {"required_memory_gb": required_gb, "max_tokens": max_tokens,
            "memory_pressure_max_tokens": caps}


def measure(config: Config, model_id: str, *, contexts: list[int] | None = None) -> TuneResult:
    """Load the model in a private daemon and measure it at a few prompt sizes."""
    catalog = Catalog(config.model_directory, {m: o.path for m, o in config.models.items()},
                      sources_for(config))
    info = catalog.info(model_id)
    if info is None:
        raise TuneError(f"no model '{model_id}' (see `mlxrouter models list`)")
    if not info.usable:
        raise TuneError(f"model '{model_id}' is not usable: {info.reason}")
    try:
        spec = config.spec_for(model_id, info.path)
    except ConfigError as exc:
        raise TuneError(str(exc)) from None
    cfg = json.loads(Path(spec.path, "config.json").read_text())
    context = memory.effective_context(spec.max_context, memory.model_max_context(cfg))
    sizes = sorted({min(c, context - DECODE_TOKENS - 8) for c in (contexts or [512, 2048, 8192])
                    if c > 0})
    sizes = [s for s in sizes if s > 0]
    daemon = _Daemon(config, model_id, spec.path, context)
    ok = False
    try:
        daemon.start()
        resp = daemon.http.post(f"/admin/models/{model_id}/start", headers=daemon.admin)
        if resp.status_code != 200:
            raise TuneError(f"the model failed to load: {resp.text[:500]}")
        loaded = _wait_stats(daemon, {})
        load_s = float(loaded.get("load_s") or 0.0)
        load_bytes = int(loaded.get("memory_bytes") or 0)
        calib, _ = _complete(daemon, " hello" * 64, 1)
        per_word = max(int(calib.get("prompt_tokens", 64)) / 64, 0.01)
        points = [_measure_point(daemon, _prompt_for(n, per_word)) for n in sizes]
        ok = True
    finally:
        daemon.stop()
        if ok:
            daemon.cleanup()
    measured = _slope(points)
    from_config = memory.kv_bytes_per_token(cfg)
    per_token = max(measured, from_config)
    rates = [p.decode_tokens_per_s for p in points if p.decode_tokens_per_s]
    values = derive(load_bytes=load_bytes, per_token_bytes=per_token, context=context,
                    max_running=spec.max_running, prompt_cache_bytes=spec.prompt_cache_bytes,
                    decode_tps=min(rates) if rates else None,
                    current_max_tokens=spec.max_tokens)
    return TuneResult(model=model_id, path=spec.path, load_s=load_s,
                      memory_after_load_bytes=load_bytes, bytes_per_1k_tokens=measured * 1000,
                      bytes_per_1k_tokens_config=from_config * 1000, points=points,
                      context=context, values=values)


# ---- the worker file


def workers_dir_for(config: Config) -> Path:
    """`workers/` beside the main config file: the one `load_config` reads. Without a config
    file that is `$MLXROUTER_HOME/workers`, read once `$MLXROUTER_HOME/supervisor.toml` exists
    (tune_target creates it)."""
    from .config import state_home

    if config.source and not config.source.endswith(".json"):
        return Path(config.source).parent / "workers"
    return state_home() / "workers"


def tune_target(config: Config, model_id: str, workers_dir: Path | None = None) -> Path:
    """The worker file tune will write for `model_id`, checked before anything is measured:
    a file the config loader would not read, or one that would define the model a second
    time, is a TuneError."""
    from .config import state_home

    if workers_dir is not None:
        return worker_file_for(workers_dir, model_id)
    if config.source.endswith(".json"):
        raise TuneError(f"{config.source} is a seed config.json, which reads no worker files; "
                        f"use a supervisor.toml (or pass --workers-dir and copy the values "
                        f"into config.json by hand)")
    if config.source:
        try:
            in_main = model_id in tomllib.loads(Path(config.source).read_text()).get(
                "models", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise TuneError(f"{config.source}: {exc}") from None
        if in_main:
            raise TuneError(f"model '{model_id}' is defined in {config.source} ([models."
                            f"{json.dumps(model_id)}]); tune writes worker files: move that "
                            f"table into {workers_dir_for(config)}/<name>.toml (with "
                            f"id = {json.dumps(model_id)}) and run tune again")
    else:
        main = state_home() / "supervisor.toml"  # what load_config reads when given no path
        if not main.exists():
            main.parent.mkdir(parents=True, exist_ok=True)
            main.write_text("# Created by `mlxrouter models tune` so that workers/ beside it "
                            "is read.\n# Settings: docs/configuration.md.\n")
    return worker_file_for(workers_dir_for(config), model_id)


def worker_file_for(directory: Path, model_id: str) -> Path:
    """The file that already defines `model_id`, else `<slug>.toml`."""
    for file in sorted(directory.glob("*.toml")):
        try:
            data = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if data.get("id", file.stem) == model_id:
            return file
    return directory / f"{slug(model_id)}.toml"  # (x--y and x/y: two files)


def update_worker_file(file: Path, model_id: str, values: dict, note: str) -> None:
    """Set the tuned keys in a worker file, keeping every other line (comments too). The
    result must decode as a WorkerFile, else nothing is written."""
    lines = file.read_text().splitlines() if file.exists() else []
    if not lines and model_id != file.stem:
        lines = [f"id = {json.dumps(model_id)}"]
    top_end = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("[")), len(lines))
    top = [ln for ln in lines[:top_end]
           if ln.split("=", 1)[0].strip() not in TUNED_KEYS
           and not ln.startswith("# tuned by mlxrouter models tune")]
    rest, skipping = [], False
    for ln in lines[top_end:]:
        header = ln.strip()
        if header.startswith("["):
            skipping = header.strip("[] ") in TUNED_KEYS
        if not skipping:
            rest.append(ln)
    while top and not top[-1].strip():
        top.pop()
    new = [f"# tuned by mlxrouter models tune: {note}"]
    new += [f"{k} = {_toml({k: values[k]}).split(' = ', 1)[1].strip()}" for k in TUNED_KEYS]
    text = "\n".join(top + new + ([""] + rest if rest else [])) + "\n"
    try:
        msgspec.convert(tomllib.loads(text), WorkerFile)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise TuneError(f"{file}: the updated file would not load ({exc}); left unchanged")
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".toml.tmp")
    tmp.write_text(text)
    tmp.replace(file)


# the file's note in MB of 2**20 bytes, as `models list`, tune's own output and the config's *_gb
# keys count (see cli._size)
def tune(config: Config, model_id: str, *, contexts: list[int] | None = None,
         workers_dir: Path | None = None) -> TuneResult:
    file = tune_target(config, model_id, workers_dir)
    result = measure(config, model_id, contexts=contexts)
    rates = [p.decode_tokens_per_s for p in result.points if p.decode_tokens_per_s]
    note = (f"{datetime.now(timezone.utc):%Y-%m-%d}, load {result.load_s:.2f}s, "
            f"{result.memory_after_load_bytes / 2**20:.0f} MB after load, "
            f"{max(result.bytes_per_1k_tokens, result.bytes_per_1k_tokens_config) / 2**20:.2f}"
            f" MB per 1K tokens, decode {min(rates) if rates else 0:.1f} tok/s")
    update_worker_file(file, model_id, result.values, note)
    result.worker_file = str(file)
    return result
