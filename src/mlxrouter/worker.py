"""A worker process: one model, one engine thread, one DEALER socket.

Started by the supervisor as `python -m mlxrouter.worker --identity ... --endpoint ... --spec ...`
(a fresh interpreter, never a fork). The main thread owns the DEALER socket: it forwards Requests
and Cancels to the engine thread, forwards the engine's messages to the daemon, sends Stats every
second and watches the daemon (PR_SET_PDEATHSIG on Linux plus a parent-pid check everywhere).
The engine thread owns every MLX object from load to exit; it talks back through an inproc pipe.

Exit codes: 0 stopped (SIGTERM), 70 engine failure, 71 daemon gone, 72 load failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import msgspec
import psutil
import zmq

from . import __version__, protocol
from .config import ModelSpec
from .process import PrivateLogFile, die_with_parent
from .vision import is_vision_model

log = logging.getLogger("mlxrouter.worker")

EXIT_ENGINE_FAILED = 70
EXIT_PARENT_GONE = 71
EXIT_LOAD_FAILED = 72
_OUT_ENDPOINT = "inproc://engine-out"
_STOP = object()


def measure_memory_bytes() -> int:
    """This process's memory: Pss on Linux (shared pages split fairly), else RSS."""
    proc = psutil.Process()
    try:
        return int(proc.memory_full_info().pss)
    except (AttributeError, psutil.AccessDenied):
        return int(proc.memory_info().rss)


def lower_compute_priority(nice: int) -> None:
    """Give every thread of this worker but the main (I/O) thread and ZeroMQ's the nice value
    `nice`: the engine thread, MLX's stream threads and the BLAS pool, all started by now;
    threads they start later inherit it. Linux sets nice per thread; elsewhere it is left."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    main = threading.main_thread().native_id
    for tid in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            if int(tid) != main and not name.startswith("ZMQbg"):
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except (OSError, ValueError):  # a thread that ended meanwhile
            continue


class EngineThread(threading.Thread):
    """Loads the model, then admits, cancels and steps between batch steps. No locks."""

    def __init__(self, spec: ModelSpec, ctx: zmq.Context, memory_limit: int) -> None:
        super().__init__(name="engine", daemon=True)
        self.spec = spec
        self.memory_limit = memory_limit
        self.ctx = ctx
        self.inbox: queue.Queue = queue.Queue()
        self.engine = None
        self.failed = False

    def run(self) -> None:
        # engine thread only: MLX objects are created and used on this thread
        out = self.ctx.socket(zmq.PAIR)
        out.connect(_OUT_ENDPOINT)

        def emit(msg: protocol.Message) -> None:
            out.send(protocol.encode(msg))

        try:
            self._serve(emit)
        except BaseException as exc:  # the engine is gone: tell the daemon, then end the worker
            log.exception("engine failed")
            self.failed = True
            if self.engine is not None:
                self.engine.fail_all("worker_crashed", f"the model's engine failed: {exc}")
        finally:
            out.send(b"")  # wakes the main thread, which exits
            out.close(linger=1000)

    def _serve(self, emit) -> None:
        from . import engine as engine_mod  # imports mlx: only ever in a worker

        fault = engine_mod.FaultPlan(self.spec.fault)
        engine_cls: type = engine_mod.TextEngine
        if is_vision_model(self.spec):  # its config.json or supports_vision: mlx-vlm
            from .vlm_engine import VisionEngine as engine_cls
        engine = engine_cls(self.spec, emit, fault, self.memory_limit)
        started = time.monotonic()
        emit(protocol.Progress(message=f"loading {self.spec.path}"))
        if not Path(self.spec.path).expanduser().exists():
            # mlx-lm would take the path for a Hub repo id and fail with HFValidationError
            raise FileNotFoundError(f"the model path {self.spec.path} does not exist")
        engine.load()
        half = engine.half_copies
        self.engine = engine
        lower_compute_priority(self.spec.compute_nice)
        emit(protocol.Ready(
            load_s=round(time.monotonic() - started, 3), weights_bytes=engine.weights_bytes,
            memory_bytes=measure_memory_bytes(), max_context=engine.max_context,
            backend=engine_mod.describe_backend()))
        log.info("ready model=%s load_s=%.2f weights_mb=%.0f load_dtype=%s half_copies=%d "
                 "half_mb=%.0f", self.spec.id, time.monotonic() - started,
                 engine.weights_bytes / 2**20, engine.load_dtype, half[0], half[1] / 2**20)
        # Requests that reach an idle worker together (a client's parallel calls, the next
        # round of a closed loop) arrive a few milliseconds apart. When the last busy spell
        # ran several sequences at once, the worker waits up to batch_wait_ms for each next
        # one until as many have come, so they are prefilled as one batch instead of the
        # first alone and the rest after it; a client that sends one request at a time never
        # waits.
        wait_s = self.spec.batch_wait_ms / 1000
        expected = peak = 1  # sequences at once: in the last busy spell, in this one
        while True:
            idle = engine.active == 0
            try:
                item = self.inbox.get(timeout=None if idle else 0)
            except queue.Empty:
                item = None
            while item is not None:
                if item is _STOP:
                    return
                if isinstance(item, protocol.Request):
                    engine.submit(item)
                elif isinstance(item, protocol.Cancel):
                    engine.cancel(item.rid)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
                    if idle and wait_s > 0 and 0 < engine.active < expected:
                        try:
                            item = self.inbox.get(timeout=wait_s)
                        except queue.Empty:
                            pass
            if engine.active:
                peak = max(peak, engine.active)
                try:
                    engine.step()
                except (RuntimeError, MemoryError) as exc:
                    if not engine_mod.is_allocation_failure(exc):
                        raise
                    engine.recover_from_oom(exc)
                if engine.active == 0:
                    expected, peak = peak, 1


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.identity: str = args.identity
        self.endpoint: str = args.endpoint
        self.parent_pid: int = args.parent_pid
        self.spec = msgspec.json.decode(args.spec, type=ModelSpec)
        self.memory_limit: int = args.memory_limit
        self.ctx = zmq.Context()
        self.stopping = False

    def run(self) -> int:
        # Test aids: no_pdeathsig leaves only the getppid check (as on macOS); no_parent_watch
        # leaves neither, to stand for a wedged worker that outlives its daemon.
        fault = self.spec.fault
        self.watch_parent = not fault.get("no_parent_watch")
        if self.watch_parent and not fault.get("no_pdeathsig"):
            die_with_parent()
        if self.watch_parent and os.getppid() != self.parent_pid:
            return EXIT_PARENT_GONE  # the daemon died before PDEATHSIG was armed
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # ctl-C in the daemon's terminal
        # SIGTERM must wake the poll at once (eviction waits for this exit), not at the next tick.
        self._wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        self._wake_w = wake_w

        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, self.identity.encode())
        dealer.setsockopt(zmq.LINGER, 2000)
        dealer.connect(self.endpoint)
        pipe = self.ctx.socket(zmq.PAIR)
        pipe.bind(_OUT_ENDPOINT)

        import mlx.core as mx  # version only; the engine thread does the rest

        dealer.send(protocol.encode(protocol.Hello(
            identity=self.identity, pid=os.getpid(), protocol_version=protocol.PROTOCOL_VERSION,
            package_version=__version__, mlx_version=mx.__version__)))
        engine = EngineThread(self.spec, self.ctx, self.memory_limit)
        engine.start()
        code = self._loop(dealer, pipe, engine)
        # A step in progress finishes (they are short); a wedged one is not waited for. The
        # process then ends with os._exit in main(), so no zmq context teardown can hang it.
        engine.inbox.put(_STOP)
        engine.join(timeout=2.0)
        dealer.close(linger=1000)
        return code

    def _loop(self, dealer: zmq.Socket, pipe: zmq.Socket, engine: EngineThread) -> int:
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(pipe, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        next_tick = time.monotonic()
        while True:
            if self.stopping:
                engine.inbox.put(_STOP)
                return 0
            timeout_ms = max(0, int((next_tick - time.monotonic()) * 1000))
            events = dict(poller.poll(timeout_ms))
            if self._wake_r.fileno() in events:
                self._wake_r.recv(64)  # a signal arrived; its handler has run by now
            if dealer in events:
                self._from_daemon(dealer, engine)
            if pipe in events:
                while True:
                    try:
                        data = pipe.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if not data:
                        return EXIT_ENGINE_FAILED if engine.engine else EXIT_LOAD_FAILED
                    dealer.send(data)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + 1.0
                if self.watch_parent and os.getppid() != self.parent_pid:
                    log.error("daemon (pid %d) is gone; exiting", self.parent_pid)
                    return EXIT_PARENT_GONE
                dealer.send(protocol.encode(self._stats(engine)))

    def _from_daemon(self, dealer: zmq.Socket, engine: EngineThread) -> None:
        while True:
            try:
                data = dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = protocol.decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("undecodable message from daemon: %s", exc)
                continue
            if isinstance(msg, (protocol.Request, protocol.Cancel)):
                engine.inbox.put(msg)

    def _stats(self, engine: EngineThread) -> protocol.Stats:
        eng = engine.engine
        if eng is None:
            return protocol.Stats(engine_steps=0, active_sequences=0)
        from .engine import mlx_memory

        active, cache, peak = mlx_memory()
        return protocol.Stats(engine_steps=eng.steps, active_sequences=eng.active,
                              mlx_active_bytes=active, mlx_cache_bytes=cache,
                              mlx_peak_bytes=peak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlxrouter.worker")
    parser.add_argument("--identity", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--spec", required=True, help="the ModelSpec as JSON")
    parser.add_argument("--memory-limit", type=int, default=0,
                        help="bytes the supervisor budgeted for this worker")
    parser.add_argument("--log-file", help="the worker's log (stderr when not given)")
    parser.add_argument("--log-max-bytes", type=int, default=10 * 2**20)
    parser.add_argument("--log-backups", type=int, default=3)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    handler: logging.Handler = (
        PrivateLogFile(args.log_file, maxBytes=args.log_max_bytes,
                       backupCount=args.log_backups)
        if args.log_file else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s worker:{args.identity.split('/')[0]} %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    code = Worker(args).run()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
