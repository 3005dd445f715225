"""The supervisor: spawns, watches, stops and respawns worker processes; owns all worker state.

Runs on the daemon's event loop; imports no mlx. Only this module changes a worker's state.
Request handlers never look at a worker and act on it: they take a lease
(`await supervisor.acquire(model, deadline)`), which waits for RUNNING, counts the request in
flight and is released exactly once (by the broker, on the request's terminal message or the
worker's death).

Workers are fresh interpreters (`python -m mlxrouter.worker`), never forks, in their own process
group, with stdout/stderr appended to a log file (never a pipe: an undrained pipe blocks the
worker mid-step).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import secrets
import signal
import sys
import time
from collections import deque
from pathlib import Path

import msgspec
import psutil

from . import __version__, protocol
from .broker import Broker, Lease
from .config import Config, ModelSpec, worker_environment
from .discovery import Catalog
from .errors import ModelLoadFailed, ModelNotFound, RouterError, ShuttingDown, Timeout, WorkerCrashed

log = logging.getLogger(__name__)


class State(enum.StrEnum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    DRAINING = "DRAINING"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    BACKOFF = "BACKOFF"
    FATAL = "FATAL"


def slug(model_id: str) -> str:
    return model_id.replace("/", "--")


def last_log_line(path: Path, limit: int = 4096) -> str:
    """The last non-empty line of a worker log: the reason a failed start reports."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else ""


class Worker:
    """One incarnation of one model's worker process."""

    def __init__(self, spec: ModelSpec, identity: str, log_path: Path) -> None:
        self.spec = spec
        self.identity = identity
        self.log_path = log_path
        self.state = State.STARTING
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.spawned_at = time.monotonic()
        self.last_seen = time.monotonic()
        self.in_flight = 0
        self.hello: protocol.Hello | None = None
        self.ready_msg: protocol.Ready | None = None
        self.stats: protocol.Stats | None = None
        self.stop_requested = False
        self.exit_code: int | None = None
        self.watcher: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class WorkerStatus(msgspec.Struct):
    model: str
    state: str
    pid: int | None
    uptime_s: float
    in_flight: int
    memory_bytes: int | None
    load_s: float | None
    restarts: int


class Supervisor:
    def __init__(self, config: Config, broker: Broker, catalog: Catalog) -> None:
        self.config = config
        self.broker = broker
        self.catalog = catalog
        self.boot_id = secrets.token_hex(4)
        self._workers: dict[str, Worker] = {}
        self._incarnations: dict[str, int] = {}
        self._by_identity: dict[str, Worker] = {}
        self._exits: dict[str, deque[float]] = {}
        self._closing = False
        self._watchdog: asyncio.Task | None = None

    # ---- lifecycle of the supervisor itself

    def start(self) -> None:
        self._watchdog = asyncio.create_task(self._watch(), name="supervisor-watchdog")

    async def close(self) -> None:
        """Stop every worker and wait until each is reaped."""
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        await asyncio.gather(*(self.stop(model) for model in list(self._workers)),
                             return_exceptions=True)

    # ---- requests

    def spec(self, model_id: str) -> ModelSpec:
        if not self.catalog.knows(model_id):
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
        return self.config.spec_for(model_id, self.catalog.path_of(model_id))

    async def acquire(self, model_id: str, deadline: float) -> Lease:
        """Wait until the model's worker is RUNNING and count one request in flight on it."""
        while True:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            worker = self._workers.get(model_id)
            if worker is None:
                worker = self._spawn(self.spec(model_id))
            if worker.state is State.RUNNING:
                worker.in_flight += 1
                return Lease(worker.identity, lambda w=worker: self._release(w))
            if worker.state is not State.STARTING:
                # STOPPING: wait for it to be reaped, then spawn anew.
                await asyncio.sleep(0.05)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"model '{model_id}' did not become ready in time")
            try:
                await asyncio.wait_for(asyncio.shield(worker.ready), remaining)
            except TimeoutError:
                raise Timeout(f"model '{model_id}' did not become ready in time") from None

    def _release(self, worker: Worker) -> None:
        worker.in_flight -= 1

    # ---- spawning and reaping

    def _spawn(self, spec: ModelSpec) -> Worker:
        n = self._incarnations.get(spec.id, 0) + 1
        self._incarnations[spec.id] = n
        identity = f"{slug(spec.id)}/{self.boot_id}/{n}"
        log_path = self.config.log_dir / f"worker-{slug(spec.id)}.log"
        worker = Worker(spec, identity, log_path)
        self._workers[spec.id] = worker
        self._by_identity[identity] = worker
        # Registered before it exists, so its first message is never dropped.
        self.broker.register(identity)
        worker.watcher = asyncio.create_task(self._run(worker), name=f"worker:{spec.id}")
        log.info("spawning worker model=%s identity=%s", spec.id, identity)
        return worker

    def _argv(self, worker: Worker) -> list[str]:
        return [
            sys.executable, "-m", "mlxrouter.worker",
            "--identity", worker.identity,
            "--endpoint", self.broker.endpoint,
            "--parent-pid", str(os.getpid()),
            "--spec", msgspec.json.encode(worker.spec).decode(),
        ]

    async def _run(self, worker: Worker) -> None:
        """Start the process and reap it; the one place a worker's exit is handled."""
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(worker.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                *self._argv(worker),
                stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd,
                env=worker_environment(self.config, worker.spec), process_group=0,
                cwd=str(self.config.run_dir))
        except OSError as exc:
            self._on_exit(worker, None, f"could not start worker: {exc}")
            return
        finally:
            os.close(fd)
        code = await worker.proc.wait()
        self._on_exit(worker, code, last_log_line(worker.log_path))

    def _on_exit(self, worker: Worker, code: int | None, last_line: str) -> None:
        model = worker.spec.id
        worker.exit_code = code
        expected = worker.stop_requested or self._closing
        how = f"signal {-code}" if code is not None and code < 0 else f"code {code}"
        was_starting = worker.state is State.STARTING
        worker.state = State.STOPPED if expected else State.EXITED
        if not expected:
            self._exits.setdefault(model, deque(maxlen=20)).append(time.monotonic())
            log.warning("worker exited model=%s pid=%s %s last_line=%r",
                        model, worker.pid, how, last_line)
        else:
            log.info("worker stopped model=%s pid=%s %s", model, worker.pid, how)
        if was_starting and not worker.ready.done():
            detail = f": {last_line}" if last_line else ""
            worker.ready.set_exception(ModelLoadFailed(
                f"model '{model}' failed to load (worker exited with {how}){detail}"))
            worker.ready.exception()  # retrieved here; waiters re-raise it
        self.broker.fail_worker(worker.identity, WorkerCrashed(
            f"the worker serving model '{model}' exited unexpectedly ({how})"))
        self.broker.unregister(worker.identity)
        self._by_identity.pop(worker.identity, None)
        if self._workers.get(model) is worker:
            del self._workers[model]

    async def stop(self, model_id: str) -> bool:
        """SIGTERM to the worker's process group, then SIGKILL after stop_timeout_s."""
        worker = self._workers.get(model_id)
        if worker is None:
            return False
        worker.stop_requested = True
        worker.state = State.STOPPING
        if worker.proc is not None and worker.proc.returncode is None:
            self._signal(worker, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(worker.watcher),
                                       self.config.supervisor.stop_timeout_s)
            except TimeoutError:
                self._signal(worker, signal.SIGKILL)
        if worker.watcher is not None:
            await asyncio.gather(worker.watcher, return_exceptions=True)
        return True

    def _signal(self, worker: Worker, sig: signal.Signals) -> None:
        try:
            os.killpg(worker.pid, sig)
        except (ProcessLookupError, PermissionError, TypeError):
            pass

    # ---- messages from workers (via the broker)

    def on_worker_message(self, identity: str, msg: protocol.Message) -> None:
        worker = self._by_identity.get(identity)
        if worker is None:
            return
        worker.last_seen = time.monotonic()
        match msg:
            case protocol.Hello():
                worker.hello = msg
                if msg.protocol_version != protocol.PROTOCOL_VERSION:
                    log.error("worker model=%s speaks protocol %s, daemon %s (package upgraded "
                              "under a running daemon?)", worker.spec.id, msg.protocol_version,
                              protocol.PROTOCOL_VERSION)
                    self._fail_start(worker, "protocol version mismatch: worker "
                                     f"{msg.protocol_version} ({msg.package_version}), daemon "
                                     f"{protocol.PROTOCOL_VERSION} ({__version__})")
            case protocol.Ready():
                if worker.state is State.STARTING:
                    worker.ready_msg = msg
                    worker.state = State.RUNNING  # STARTING -> RUNNING: the worker sent Ready
                    log.info("worker ready model=%s pid=%s load_s=%.2f memory_mb=%.0f",
                             worker.spec.id, worker.pid, msg.load_s, msg.memory_bytes / 2**20)
                    if not worker.ready.done():
                        worker.ready.set_result(None)
            case protocol.Stats():
                worker.stats = msg
            case protocol.Progress():
                log.info("worker loading model=%s: %s", worker.spec.id, msg.message)

    def _fail_start(self, worker: Worker, reason: str) -> None:
        if not worker.ready.done():
            worker.ready.set_exception(ModelLoadFailed(reason))
            worker.ready.exception()
        worker.stop_requested = True
        self._signal(worker, signal.SIGKILL)

    async def _watch(self) -> None:
        """Kill workers that went silent (SIGSTOPped, wedged) or never finished loading."""
        sup = self.config.supervisor
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for worker in list(self._workers.values()):
                if worker.proc is None or worker.proc.returncode is not None:
                    continue
                if worker.state in (State.STARTING, State.RUNNING) and (
                        now - worker.last_seen > sup.silence_timeout_s):
                    log.warning("worker silent for %.1fs, killing model=%s pid=%s",
                                now - worker.last_seen, worker.spec.id, worker.pid)
                    self._signal(worker, signal.SIGKILL)
                elif worker.state is State.STARTING and (
                        now - worker.spawned_at > sup.load_timeout_s):
                    log.warning("worker load timed out model=%s pid=%s", worker.spec.id,
                                worker.pid)
                    self._signal(worker, signal.SIGKILL)

    # ---- views

    def status(self) -> list[WorkerStatus]:
        now = time.monotonic()
        return [
            WorkerStatus(
                model=w.spec.id, state=w.state.value, pid=w.pid,
                uptime_s=round(now - w.spawned_at, 1), in_flight=w.in_flight,
                memory_bytes=w.ready_msg.memory_bytes if w.ready_msg else None,
                load_s=w.ready_msg.load_s if w.ready_msg else None,
                restarts=len(self._exits.get(w.spec.id, ())))
            for w in self._workers.values()
        ]

    def memory_figures(self) -> dict[str, int]:
        vm = psutil.virtual_memory()
        workers = sum(w.ready_msg.memory_bytes for w in self._workers.values() if w.ready_msg)
        return {"total_bytes": vm.total, "available_bytes": vm.available,
                "daemon_rss_bytes": psutil.Process().memory_info().rss,
                "workers_bytes": workers}

    def state_of(self, model_id: str) -> State:
        worker = self._workers.get(model_id)
        return worker.state if worker is not None else State.STOPPED

    def preload(self, model_id: str) -> None:
        """Start a model in the background (after the server listens); errors are logged."""
        try:
            if model_id not in self._workers:
                self._spawn(self.spec(model_id))
        except RouterError as exc:
            log.warning("preload of model=%s skipped: %s", model_id, exc.message)
