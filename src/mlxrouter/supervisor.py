"""The supervisor: starts, watches, stops and respawns workers; owns all worker state.

Runs on the daemon's event loop; imports no mlx. Only this module changes a worker's state.
Request handlers never look at a worker and act on it: they take a lease
(`await supervisor.acquire(model, deadline)`), which waits for RUNNING and a free batch slot,
counts the request in flight and is released exactly once (by the broker, on the request's
terminal message or the worker's death).

One planning loop (`_tick`, run on every change and every second) decides loads from one FIFO of
intents, one load at a time, with the pure planner in `memory.plan_load`; it evicts only idle,
unpinned workers, least recently used first, and never a busy one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from . import __version__, library, memory, protocol
from .broker import Broker, Lease
from .config import Config, ConfigError, ModelSpec, worker_environment
from .discovery import Catalog, check_model_dir, sources_for
from .errors import (InsufficientMemory, ModelLoadFailed, ModelNotFound, ModelStopped,
                     ModelUnavailable, NoMemory, QueueFull, RouterError, ShuttingDown, Timeout,
                     WorkerCrashed)
from .process import (PidFile, last_log_line, log_sizes, reap_stale, rotate, signal_group,
                      spawn)
from .states import CRASH_LOOP_EXITS, Slot, State, Waiter, Worker, WorkerStatus, slug
from .watchdog import check_workers

log = logging.getLogger(__name__)

CRASH_LOOP_WINDOW_S = 600.0
# Settings a running worker was started with; changing one on reload restarts it.
COLD_FIELDS = ("path", "engine", "load_dtype", "compute_nice", "max_running", "max_context",
               "env", "fault", "prompt_cache_bytes", "prompt_cache_size", "chat_template",
               "tool_call_format", "supports_vision", "supports_tools",
               "enable_function_calling", "solo_fast_path", "batch_wait_ms",
               "half_weights", "prefill_step_size", "reasoning_response")
MEASURE_INTERVAL_S = 1.0
# A tick later than its 1 s timer by more than this: the daemon stood still (_forgive_stall).
STALL_FORGIVEN_S = 0.5
PSS_AFTER_GROWTH_BYTES = 2**20
PSS_MAX_AGE_S = 30.0
# After a victim is reaped, a load waits up to this long for its memory to show as available.
MEMORY_RECOVERY_S = 5.0


class Supervisor:
    def __init__(self, config: Config, broker: Broker, catalog: Catalog) -> None:
        self.config = config
        self.broker = broker
        self.catalog = catalog
        catalog.use_sources(sources_for(config))
        # On-demand downloads by model id: one at a time per model, shared by its requests.
        self._downloads: dict[str, asyncio.Task[None]] = {}
        self.boot_id = secrets.token_hex(4)
        sup = config.supervisor
        self.budget_bytes = (int(sup.memory_budget_gb * memory.GB) if sup.memory_budget_gb
                             else memory.default_budget_bytes())
        self._read_pressure()
        self._slots: dict[str, Slot] = {}
        self._by_identity: dict[str, Worker] = {}
        self._incarnation = 0
        self._last_tick = 0.0
        self._loading: Slot | None = None
        self._last_reap = 0.0
        self._overhead_bytes = memory.DEFAULT_OVERHEAD_BYTES
        self._closing = False
        self._stopping = False  # begin_shutdown: draining, then close()
        self._download_waiting = 0  # requests waiting for a download (see waiting())
        self._wakeup: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._measured_at = float("-inf")
        self._loop_task: asyncio.Task | None = None
        # Observers (metrics): (kind, model, reason) and (model, load seconds).
        self.on_event: Callable[[str, str, str], None] = lambda kind, model, reason: None
        self.on_loaded: Callable[[str, float], None] = lambda model, seconds: None

    # ---- lifecycle of the supervisor itself

    def start(self) -> None:
        killed = reap_stale(self._pid_dir)
        if killed:
            log.warning("reaped %d stale worker(s) of a previous daemon: %s", len(killed), killed)
        self._loop_task = asyncio.create_task(self._run(), name="supervisor")

    def begin_shutdown(self) -> None:
        """The daemon drains: nothing starts a model any more (a ctl start waiting for a load
        answers 503 shutting_down at once, while the HTTP server can still send it)."""
        self._stopping = True

    async def close(self) -> None:
        """Stop every worker and wait until each is reaped."""
        self._closing = True
        for task in list(self._downloads.values()):
            task.cancel()  # its thread is told to stop and, a daemon thread, is never joined
        for slot in self._slots.values():
            self._fail_waiters(slot, ShuttingDown("the server is shutting down"))
            if slot.worker is not None:
                self._begin_stop(slot.worker, "shutdown", drain=False)
        workers = [s.worker for s in self._slots.values() if s.worker is not None]
        if workers:
            grace = self.config.supervisor.stop_timeout_s + 5
            _, late = await asyncio.wait([w.exited for w in workers], timeout=grace)
            for w in workers:
                if not w.exited.done():
                    self.kill(w, "still running at shutdown")
            if late:
                await asyncio.wait(late, timeout=5)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)

    @property
    def _pid_dir(self):
        return self.config.run_dir / "workers"

    def _wake(self) -> None:
        if not self._wakeup.done():
            self._wakeup.set_result(None)

    # ---- requests

    def not_found_message(self, model_id: str) -> str:
        """Why a model id is not served: unknown, or found on disk but not usable (a download
        in progress, a checkpoint that is not MLX's, a broken link): then where and why."""
        found = self.catalog.info(model_id)
        if found is not None and not found.usable and found.reason:
            return (f"The model '{model_id}' was found at {found.path} but cannot be served: "
                    f"{found.reason}")
        return f"The model '{model_id}' does not exist"

    def spec(self, model_id: str) -> ModelSpec:
        if not self.catalog.knows(model_id):
            if self.downloadable(model_id):
                # acquire() downloads it first; the spec points where the download lands.
                return self.config.spec_for(model_id, str(
                    library.pull_target(self.config.model_directory, model_id)))
            raise ModelNotFound(self.not_found_message(model_id), param="model")
        configured = self.config.models.get(model_id)
        found = None if configured is not None and configured.path else (
            self.catalog.path_of(model_id))
        try:
            return self.config.spec_for(model_id, found)
        except ConfigError as exc:
            raise ModelUnavailable(str(exc)) from None

    def _slot(self, spec: ModelSpec) -> Slot:
        slot = self._slots.get(spec.id)
        if slot is None:
            slot = self._slots[spec.id] = Slot(spec)
        elif slot.worker is None:
            slot.spec = spec  # a new incarnation starts with the current settings
        return slot

    async def acquire(self, spec: ModelSpec, deadline: float) -> Lease:
        """Wait until the model's worker is RUNNING with a free batch slot; take a lease."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if spec.id in self._downloads or (
                self.downloadable(spec.id) and not self.catalog.knows(spec.id)):
            await self._download(spec.id, deadline)
        slot = self._slot(spec)
        if slot.fatal_reason:
            raise ModelUnavailable(f"model '{spec.id}' is unavailable: {slot.fatal_reason}")
        if slot.worker is None:
            self._refuse_if_not_a_model(slot.spec)
            self._refuse_if_it_never_fits(slot.spec)
        left = slot.backoff_until - time.monotonic()
        if slot.worker is None and left > 0:
            raise ModelLoadFailed(f"model '{spec.id}' failed to start and is backing off: "
                                  f"{slot.last_error}", retry_after_s=left)
        worker = slot.worker
        if (worker is not None and worker.state is State.RUNNING and not slot.waiters
                and worker.in_flight < worker.spec.max_running):
            return self._lease(slot, worker)
        if spec.max_queue == 0 and worker is None and not slot.want_start:  # nothing loads it:
            raise ModelUnavailable(  # a retry loads nothing either
                f"model '{spec.id}' is not loaded, and with max_queue = 0 no request can wait "
                f"for its load: start it with `mlxrouter ctl start {spec.id}` (or set "
                f"preload = true for it)")
        if len(slot.waiters) >= spec.max_queue:
            running = worker.in_flight if worker is not None else 0
            if worker is None or worker.state is not State.RUNNING:
                state = ("is not loaded" if worker is None else
                         "is loading" if worker.state is State.STARTING else
                         f"is {worker.state.value.lower()} (a new worker starts after it)")
                raise QueueFull(f"model '{spec.id}' {state} and its queue is full "
                                f"({len(slot.waiters)} waiting, max_queue {spec.max_queue}); "
                                f"try again shortly")
            raise QueueFull(f"model '{spec.id}' has {running} requests running and "
                            f"{len(slot.waiters)} waiting (max_queue {spec.max_queue}); "
                            f"try again shortly")
        waiter = Waiter(deadline)
        slot.waiters.append(waiter)
        self._wake()
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can return a lease to a task that
            # was cancelled in the same iteration, and that lease would never be released.
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await asyncio.shield(waiter.future)
        except TimeoutError:
            self._drop_waiter(slot, waiter)
            raise Timeout(f"timed out waiting for model '{spec.id}' "
                          f"(state {slot.state.value})") from None
        except BaseException:
            self._drop_waiter(slot, waiter)
            raise

    def _drop_waiter(self, slot: Slot, waiter: Waiter) -> None:
        """A waiter that leaves (timeout, client gone) gives back a lease it was just handed."""
        try:
            slot.waiters.remove(waiter)
        except ValueError:
            pass
        fut = waiter.future
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled() and fut.exception() is None:
            fut.result().release()  # granted just as the waiter gave up

    def _lease(self, slot: Slot, worker: Worker) -> Lease:
        worker.in_flight += 1
        slot.last_used = time.monotonic()
        return Lease(worker.identity, lambda: self._release(slot, worker))

    def _release(self, slot: Slot, worker: Worker) -> None:
        worker.in_flight -= 1
        slot.last_used = time.monotonic()
        if worker.in_flight == 0 and worker.state is State.DRAINING:
            self._begin_stop(worker, worker.stop_reason, drain=False)
        self._grant(slot)
        # An idle worker may be evicted for a model that waits for memory: plan now. Otherwise
        # no tick: it would read /proc/meminfo (~0.4 ms of the event loop) between a request's
        # End and its response, and the next periodic tick sees the same state.
        if worker.in_flight == 0 and any(map(self._needs_start, self._slots.values())):
            self._wake()

    def _grant(self, slot: Slot) -> None:
        worker = slot.worker
        while (worker is not None and worker.state is State.RUNNING and slot.waiters
               and worker.in_flight < worker.spec.max_running):
            waiter = slot.waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(self._lease(slot, worker))

    def _fail_waiters(self, slot: Slot, error: RouterError) -> None:
        while slot.waiters:
            waiter = slot.waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(error)

    # ---- the planning loop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A plain future, not wait_for(Event.wait()): cancelling this task must never
            # race with a wake-up (3.11's wait_for can swallow the cancellation).
            self._wakeup = loop.create_future()
            timer = loop.call_later(0.25 if self._loading else 1.0, self._wake)
            try:
                await self._wakeup
            finally:
                timer.cancel()
            try:
                self._tick()
            except Exception:  # the loop must outlive any one bad decision
                log.exception("supervisor tick failed")

    def _tick(self) -> None:
        now = time.monotonic()
        self._forgive_stall(now)
        self._measure(now)
        check_workers(self, now)
        self._forget_gone()
        for slot in self._slots.values():
            if slot.worker is None and slot.failures and 0 < slot.backoff_until <= now:
                slot.backoff_until = 0.0
                slot.want_start = True  # BACKOFF over: retry on our own, like supervisord
            if not self._needs_start(slot):
                slot.wait_since = None  # a later waiter gets its own full wait
            elif slot.wait_since is not None and (
                    now - slot.wait_since > self.config.supervisor.load_wait_timeout_s):
                short = ("no room" if slot.last_error.startswith("max_loaded_models")
                         else "not enough memory")
                self._fail_waiters(slot, NoMemory(
                    f"{short} to load model '{slot.spec.id}' in time: {slot.last_error}"))
                gave_up = ""
                if slot.want_start:  # a preload or ctl start: no client hears of it
                    wait_s = self.config.supervisor.load_wait_timeout_s
                    gave_up = (f"its start was given up after load_wait_timeout_s "
                               f"({wait_s:g} s): {short} ({slot.last_error})")
                    log.warning("model=%s: %s", slot.spec.id, gave_up)
                # (no longer waiting: its live figures would go stale in status, so only a
                # start given up keeps a reason, as what happened)
                slot.wait_since, slot.want_start, slot.last_error = None, False, gave_up
        if not self._closing:
            self._plan(now)

    def _forget_gone(self) -> None:
        """A model whose directory was deleted (or that a reload removed) leaves status,
        /v1/health and the gauges once its worker is gone and nobody waits for it; if it comes
        back it starts afresh."""
        for model_id, slot in list(self._slots.items()):
            if (slot.waiters or model_id in self._downloads
                    or self.catalog.knows(model_id)):
                continue
            w = slot.worker
            if w is None:
                del self._slots[model_id]
                log.info("model=%s is gone from disk and config; forgotten", model_id)
            elif w.state is State.RUNNING and w.in_flight == 0:
                # deleted while loaded (models rm): its requests get 404 now, so the worker
                # only held memory and a place among max_loaded_models
                log.info("model=%s is gone from disk and config; its idle worker stops",
                         model_id)
                slot.want_start = False
                self._begin_stop(w, "removed from disk", drain=True)

    def _forgive_stall(self, now: float) -> None:
        """Ticks come at least every second. A longer gap means the daemon itself stood still
        (SIGSTOP, a suspended machine, swapping, a blocking call): its workers' heartbeats
        wait unread meanwhile, so that time does not count as their silence, and neither
        does it count against a load or an engine's progress."""
        gap = now - self._last_tick if self._last_tick else 0.0
        self._last_tick = now
        stall = gap - 1.0
        if stall < STALL_FORGIVEN_S:
            return
        log.warning("the daemon's event loop stalled for %.1fs; workers' silence over it is "
                    "not held against them", stall)
        for slot in self._slots.values():
            if slot.worker is not None:
                w = slot.worker  # (never past now: a message since counts as it is)
                w.last_seen = min(now, w.last_seen + stall)
                w.progress_at = min(now, w.progress_at + stall)
                w.steps_moved_at = min(now, w.steps_moved_at + stall)

    def _needs_start(self, slot: Slot) -> bool:
        return (slot.worker is None and not slot.fatal_reason and slot.backoff_until <= 0
                and (bool(slot.waiters) or slot.want_start))

    def _plan(self, now: float) -> None:
        if any(s.worker is not None and s.worker.state is State.STOPPING
               for s in self._slots.values()):
            return  # a victim is still exiting: its memory is not free yet
        if self._loading is not None:
            if self._loading.worker is not None:
                return  # one load at a time
            if not self._needs_start(self._loading):
                self._loading = None  # its waiters left; the slot is free again
        if self._loading is not None:
            candidates = [self._loading]
        else:
            # FIFO: the model whose oldest request has waited longest first; starts no request
            # waits for (ctl start, preload, a retry) after them
            candidates = sorted((s for s in self._slots.values() if self._needs_start(s)),
                                key=lambda s: s.waiters[0].since if s.waiters else math.inf)
        for slot in candidates:
            need = self._need_bytes(slot.spec)
            residents = [memory.Resident(s.spec.id, s.worker.cost_bytes,
                                         self._evictable(s), s.last_used)
                         for s in self._slots.values() if s.worker is not None]
            available = (self.pressure_inputs.available_bytes
                         if self.pressure in ("high", "critical") else None)
            plan = memory.plan_load(need, self.budget_bytes,
                                    self.config.supervisor.max_loaded_models, residents,
                                    available)
            if plan.action == "impossible":
                slot.last_error = plan.reason
                log.warning("model=%s cannot start: it %s", slot.spec.id, plan.reason)
                self._fail_waiters(slot, self._never_fits(slot.spec, plan.reason))
                slot.want_start = False
                if self._loading is slot:
                    self._loading = None
                continue
            if plan.action == "wait":
                slot.last_error = plan.reason
                slot.wait_since = slot.wait_since or now
                if self._loading is slot:
                    self._loading = None
                continue
            if plan.action == "evict" and slot.failures and not slot.waiters:
                # A retry after a failed start (BACKOFF over) that no request waits for takes
                # the room it finds: it does not stop models in use for a model that may fail
                # again. A request for it, or ctl start, evicts as any start does.
                slot.last_error = (f"its retry waits for room (it would stop "
                                   f"{', '.join(plan.victims)})")
                if self._loading is slot:
                    self._loading = None
                continue
            self._loading = slot
            if plan.action == "evict":
                for victim in plan.victims:
                    self._begin_stop(self._slots[victim].worker, "evicted", drain=False)
                    self.on_event("eviction", victim, plan.reason or "memory")
                return
            if (now - self._last_reap < MEMORY_RECOVERY_S
                    and memory.read_pressure_inputs().available_bytes < need):
                return  # the victim's memory is not back yet; look again in 250 ms
            slot.wait_since = None
            self._spawn(slot, need)
            return

    @staticmethod
    def _never_fits(spec: ModelSpec, reason: str) -> InsufficientMemory:
        advice = ("lower its required_memory_gb or safety_margin"
                  if spec.required_memory_gb is not None
                  else "lower its max_context or max_running")
        return InsufficientMemory(f"model '{spec.id}' {reason}; {advice}, or raise "
                                  f"memory_budget_gb")

    def _refuse_if_not_a_model(self, spec: ModelSpec) -> None:
        """A configured path with no model there is a 503 at once, with the reason: starting
        a worker for it failed four times (each a retryable 503) before the model went FATAL.
        Discovered paths were checked when found."""
        configured = self.config.models.get(spec.id)
        if configured is None or not configured.path:
            return
        reason = check_model_dir(Path(spec.path))
        if reason:
            raise ModelUnavailable(f"model '{spec.id}' cannot be served from its configured "
                                   f"path {spec.path}: {reason}")

    def _refuse_if_it_never_fits(self, spec: ModelSpec) -> None:
        """A model bigger than the whole budget gets its 503 at once, not after queueing
        (where a full queue answered 429 "try again shortly", and a load in progress
        delayed the 503 by its length)."""
        try:
            need = self._need_bytes(spec)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return  # unreadable files or a config of an odd shape: the load says why
        plan = memory.plan_load(need, self.budget_bytes, 0, [])
        if plan.action == "impossible":
            raise self._never_fits(spec, plan.reason)

    def downloadable(self, model_id: str) -> bool:
        return self.config.supervisor.allow_download and library.is_repo_id(model_id)

    async def _download(self, model_id: str, deadline: float) -> None:
        """Pull a model before its load is planned: the load slot is not held, the loop is
        not blocked, and a client that leaves does not stop the download."""
        task = self._downloads.get(model_id)
        if task is None:
            task = asyncio.create_task(self._pull(model_id), name=f"download:{model_id}")
            self._downloads[model_id] = task
            task.add_done_callback(lambda t: self._downloaded(model_id, t))
        self._download_waiting += 1  # the drain waits for these as for queued requests
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await asyncio.shield(task)
        except TimeoutError:
            raise Timeout(f"timed out waiting for the download of model '{model_id}'") from None
        except library.RepoNotFound as exc:
            raise ModelNotFound(str(exc), param="model") from None
        except library.LibraryError as exc:
            why = str(exc).replace(library.RESUME_HINT, "a new request resumes it")
            raise ModelLoadFailed(f"model '{model_id}' could not be downloaded: {why}",
                                  retry_after_s=30) from None
        except asyncio.CancelledError:
            task_now = asyncio.current_task()
            if (self._closing or self._stopping) and task_now is not None and (
                    not task_now.cancelling()):
                # the download was cancelled by the shutdown, not this request
                raise ShuttingDown("the server is shutting down") from None
            raise
        finally:
            self._download_waiting -= 1

    async def _pull(self, model_id: str) -> Path:
        """library.pull in a daemon thread of its own, not the loop's default executor: loop
        close joins that executor, so a hung Hub would keep a stopped daemon from exiting.
        Past download_timeout_s (or on shutdown) the thread is told to stop at its next chunk
        and the download counts as failed; each Hub request has its own timeout too."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Path] = loop.create_future()
        cancel = threading.Event()
        limit = self.config.supervisor.download_timeout_s

        def settle(value: Path | None, error: BaseException | None) -> None:
            if result.done():
                return
            if error is not None:
                result.set_exception(error)
            else:
                result.set_result(value)

        def run() -> None:
            value, error = None, None
            try:
                value = library.pull(model_id, self.config.model_directory, progress=False,
                                     deadline=time.monotonic() + limit, cancel=cancel)
            except BaseException as exc:  # handed to the loop, never lost in the thread
                error = exc
            try:
                loop.call_soon_threadsafe(settle, value, error)
            except RuntimeError:
                pass  # the loop is closed: the daemon is gone, nobody is waiting

        threading.Thread(target=run, name=f"download:{model_id}", daemon=True).start()
        try:
            async with asyncio.timeout(limit):
                return await result
        except TimeoutError:
            raise library.LibraryError(
                f"the download did not finish within download_timeout_s ({limit:g}s)") from None
        finally:
            cancel.set()  # a no-op once the pull is done; else it stops at its next chunk

    def _downloaded(self, model_id: str, task: asyncio.Task) -> None:
        """A finished download leaves the map whatever its outcome, so the next request for
        the model starts afresh instead of waiting on a dead one."""
        if self._downloads.get(model_id) is task:
            del self._downloads[model_id]
        if task.cancelled():
            return
        if task.exception() is None:
            log.info("download finished model=%s path=%s", model_id, task.result())
            self.catalog.refresh(force=True)
        else:
            log.warning("download failed model=%s: %s", model_id, task.exception())

    def need_bytes(self, spec: ModelSpec) -> int:
        """What a load of `spec` is budgeted at (shown by /v1/models)."""
        return self._need_bytes(spec)

    def _evictable(self, slot: Slot) -> bool:
        w = slot.worker
        return (w is not None and w.state is State.RUNNING and w.in_flight == 0
                and not slot.waiters and not slot.spec.pinned)

    def _need_bytes(self, spec: ModelSpec) -> int:
        return memory.budgeted_bytes(spec, self._overhead_bytes)

    def _read_pressure(self) -> None:
        sup = self.config.supervisor
        self.pressure_inputs = memory.read_pressure_inputs()
        self.pressure = memory.pressure_level(
            self.pressure_inputs, threshold_bytes=int(sup.memory_threshold_gb * memory.GB),
            swap_high_percent=sup.swap_high_percent,
            swap_critical_percent=sup.swap_critical_percent)

    def _measure(self, now: float) -> None:
        """System memory every tick (cheap); workers' own figures at most once per
        MEASURE_INTERVAL_S: a tick runs on every lease change. A worker's Pss is read again
        only when its RSS (microseconds) has grown by PSS_AFTER_GROWTH_BYTES since the last
        reading, or that reading is PSS_MAX_AGE_S old: a steady worker's memory is not re-read
        every second. The reading itself runs on a thread (`_read_pss`): the kernel walks
        the worker's page tables for it, ~2 ms for an idle SmolLM2 worker but 17-40 ms while
        it decodes 8 streams on 2 cores, and on the event loop that held back every
        stream's tokens meanwhile."""
        self._read_pressure()
        if now - self._measured_at < MEASURE_INTERVAL_S:
            return
        self._measured_at = now
        for slot in self._slots.values():
            w = slot.worker
            if w is None or w.state is not State.RUNNING or w.pid is None or w.pss_pending:
                continue
            rss = memory.resident_bytes(w.pid)
            if rss is None or (rss < w.rss_at_measure + PSS_AFTER_GROWTH_BYTES
                               and now - w.measured_at < PSS_MAX_AGE_S):
                continue
            w.rss_at_measure, w.measured_at = rss, now
            w.pss_pending = True
            reading = asyncio.get_running_loop().run_in_executor(
                None, memory.process_memory_bytes, w.pid)
            reading.add_done_callback(functools.partial(self._read_pss, w))

    @staticmethod
    def _read_pss(w: Worker, reading: asyncio.Future[int | None]) -> None:
        """A worker's Pss has been read (`_measure`): its peak, with MLX's GPU memory on
        Metal, which Pss does not show."""
        w.pss_pending = False
        measured = None if reading.cancelled() or reading.exception() else reading.result()
        if measured is not None and w.ready_msg and w.ready_msg.backend != "cpu" and w.stats:
            measured += w.stats.mlx_active_bytes + w.stats.mlx_cache_bytes
        if measured is not None:
            w.peak_bytes = max(w.peak_bytes, measured)

    # ---- spawning, stopping, reaping

    def _spawn(self, slot: Slot, need_bytes: int) -> None:
        self._incarnation += 1
        spec = slot.spec
        identity = f"{slug(spec.id)}/{self.boot_id}/{self._incarnation}"
        worker = Worker(spec, identity, need_bytes)
        slot.worker = worker
        slot.want_start = False
        if not slot.failures:  # a wait for room (or one given up) is over; a failure stays
            slot.last_error = ""
        self._by_identity[identity] = worker
        self.broker.register(identity)  # before it exists: its first message is never dropped
        asyncio.create_task(self._run_process(slot, worker), name=f"worker:{spec.id}")
        log.info("starting worker model=%s identity=%s cost_mb=%.0f", spec.id, identity,
                 need_bytes / 2**20)

    def _argv(self, worker: Worker) -> list[str]:
        sup = self.config.supervisor
        log_file, _ = self.log_paths(worker.spec.id)
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        # "--identity=ID": an id may start with "-" (a directory named "-x"), which argparse
        # took for an option
        return [sys.executable, "-m", "mlxrouter.worker", f"--identity={worker.identity}",
                "--endpoint", self.broker.endpoint, "--parent-pid", str(os.getpid()),
                "--memory-limit", str(worker.estimate_bytes), f"--log-file={log_file}",
                "--log-max-bytes", str(sup.log_max_bytes), "--log-backups",
                str(sup.log_backups), "--log-level", level,
                f"--spec={msgspec.json.encode(worker.spec).decode()}"]

    def log_paths(self, model_id: str) -> tuple[Path, Path]:
        """The worker's own log (rotated by size) and its raw stdout/stderr (tracebacks,
        C-level output), like supervisord's stdout and stderr logs."""
        base = f"{self.config.log_dir / f'worker-{slug(model_id)}'}"
        # (not with_suffix: it cut "Qwen2.5-7B" to "Qwen2", so dotted ids shared one log)
        return Path(f"{base}.log"), Path(f"{base}.stderr.log")

    async def _run_process(self, slot: Slot, worker: Worker) -> None:
        """Start the process and reap it: the one place a worker's exit is handled."""
        pidfile = PidFile(self._pid_dir, slug(worker.spec.id))
        try:
            # Off the event loop: it may compile a preloaded library whose build is missing
            # (a cleaned cache, an upgraded MLX), seconds during which the daemon would
            # answer nothing and read no heartbeat.
            env = await asyncio.to_thread(worker_environment, self.config, worker.spec)
            if worker.state is State.STOPPING:  # stopped meanwhile: nothing to start
                self._on_exit(slot, worker, None, "")
                return
            log_file, stderr_file = self.log_paths(worker.spec.id)
            rotate(stderr_file, self.config.supervisor.log_max_bytes,
                   self.config.supervisor.log_backups)
            worker.log_offsets = log_sizes(log_file, stderr_file)
            worker.proc = await spawn(self._argv(worker), log_path=stderr_file, env=env,
                                      cwd=self.config.run_dir)
            worker.started_now()  # its silence and its load count from here, not the build
        except Exception as exc:  # bad env, missing interpreter: a failed start, not a hang
            self._on_exit(slot, worker, None, f"could not start the worker: {exc}")
            return
        pidfile.write(worker.proc.pid, self.boot_id)
        if worker.state is State.STOPPING:  # stopped while it was being spawned
            signal_group(worker.pid, signal.SIGTERM)
        code = await worker.proc.wait()
        pidfile.remove()
        reason = (f"killed by the supervisor: {worker.kill_reason}" if worker.kill_reason
                  else last_log_line(*self.log_paths(worker.spec.id), since=worker.log_offsets))
        self._on_exit(slot, worker, code, reason)

    def _on_exit(self, slot: Slot, worker: Worker, code: int | None, last_line: str) -> None:
        now = time.monotonic()
        model = worker.spec.id
        how = f"signal {-code}" if code is not None and code < 0 else f"code {code}"
        expected = worker.state is State.STOPPING or self._closing
        was_starting = worker.state is State.STARTING
        worker.state = State.STOPPED if expected else State.EXITED
        self._last_reap = now
        if expected:
            log.info("worker stopped model=%s pid=%s %s reason=%s uptime_s=%.1f "
                     "peak_memory_mb=%.0f", model, worker.pid, how, worker.stop_reason,
                     now - worker.spawned_at, worker.peak_bytes / 2**20)
        else:
            log.warning("worker exited model=%s pid=%s %s last_line=%r", model, worker.pid,
                        how, last_line)
            self.on_event("start_failure" if was_starting else "crash", model, how)
        detail = f": {last_line}" if last_line else ""
        slot.stopped_on_purpose = expected
        if not expected and not was_starting:  # what status shows while it is EXITED
            slot.last_error = f"the worker exited unexpectedly with {how}{detail}"
        if was_starting and not expected:
            self._start_failed(slot, f"worker exited with {how} while loading{detail}")
        elif not expected:
            slot.exits.append(now)
            slot.restarts += 1
            recent = [t for t in slot.exits if now - t < CRASH_LOOP_WINDOW_S]
            if len(recent) > CRASH_LOOP_EXITS:
                slot.fatal_reason = (f"crash loop: {len(recent)} unexpected exits in "
                                     f"{CRASH_LOOP_WINDOW_S / 60:.0f} minutes (last: {how})")
                self._fail_waiters(slot, ModelUnavailable(
                    f"model '{model}' is unavailable: {slot.fatal_reason}"))
        # a watchdog's kill says why (silent, stalled, over its memory) to the requests too
        why = f": killed by the supervisor: {worker.kill_reason}" if worker.kill_reason else ""
        self.broker.fail_worker(worker.identity, WorkerCrashed(
            f"the worker serving model '{model}' exited unexpectedly ({how}){why}"))
        self.broker.unregister(worker.identity)
        self._by_identity.pop(worker.identity, None)
        if slot.worker is worker:
            slot.worker = None
        if self._loading is slot:
            self._loading = None
        if not worker.exited.done():
            worker.exited.set_result(code)
        self._wake()

    def _start_failed(self, slot: Slot, reason: str) -> None:
        model = slot.spec.id
        slot.failures += 1
        slot.last_error = reason
        if slot.failures > self.config.supervisor.start_retries:
            slot.fatal_reason = f"failed to start {slot.failures} times; last: {reason}"
            log.error("model=%s is FATAL: %s", model, slot.fatal_reason)
        else:
            backoff = min(30.0, 2.0 ** (slot.failures - 1))
            slot.backoff_until = time.monotonic() + backoff
            log.warning("model=%s start failed (%d), BACKOFF %.0fs", model, slot.failures,
                        backoff)
        self._fail_waiters(slot, ModelLoadFailed(f"model '{model}' failed to load: {reason}"))

    def _begin_stop(self, worker: Worker | None, reason: str, drain: bool) -> None:
        """RUNNING -> DRAINING (in-flight requests finish) -> STOPPING (SIGTERM, then KILL)."""
        if worker is None or worker.state in (State.STOPPING, State.STOPPED, State.EXITED):
            return
        worker.stop_reason = reason
        if drain and worker.in_flight > 0:
            worker.state = State.DRAINING
            return
        worker.state = State.STOPPING
        signal_group(worker.pid, signal.SIGTERM)
        asyncio.get_running_loop().call_later(
            self.config.supervisor.stop_timeout_s,
            lambda: None if worker.exited.done() else signal_group(worker.pid, signal.SIGKILL))

    def stop_idle(self, worker: Worker, reason: str) -> None:
        log.info("unloading idle worker model=%s reason=%s", worker.spec.id, reason)
        self.on_event("eviction", worker.spec.id, reason)
        self._begin_stop(worker, reason, drain=False)

    def kill(self, worker: Worker, why: str) -> None:
        log.warning("killing worker model=%s pid=%s: %s", worker.spec.id, worker.pid, why)
        worker.kill_reason = worker.kill_reason or why
        signal_group(worker.pid, signal.SIGKILL)

    # ---- messages from workers (via the broker)

    def on_worker_message(self, identity: str, msg: protocol.Message) -> None:
        worker = self._by_identity.get(identity)
        if worker is None:
            return
        worker.last_seen = time.monotonic()
        match msg:
            case protocol.Hello() if msg.protocol_version != protocol.PROTOCOL_VERSION:
                slot = self._slots[worker.spec.id]
                slot.fatal_reason = (
                    f"protocol version mismatch: worker {msg.protocol_version} "
                    f"({msg.package_version}), daemon {protocol.PROTOCOL_VERSION} "
                    f"({__version__}); restart the daemon after upgrading")
                self._fail_waiters(slot, ModelUnavailable(slot.fatal_reason))
                self._begin_stop(worker, "protocol mismatch", drain=False)
            case protocol.Ready() if worker.state is State.STARTING:
                self._on_ready(worker, msg)
            case protocol.Stats():
                # Idle time is not a stall: the clock runs only while sequences are active.
                prev = worker.stats
                if (prev is None or prev.active_sequences == 0 or msg.active_sequences == 0
                        or msg.engine_steps != prev.engine_steps):
                    worker.steps_moved_at = time.monotonic()
                worker.stats = msg
            case protocol.Progress():
                worker.progress_at = time.monotonic()  # a loading worker extends its timeout
                log.info("worker loading model=%s: %s", worker.spec.id, msg.message)

    def _on_ready(self, worker: Worker, msg: protocol.Ready) -> None:
        slot = self._slots[worker.spec.id]
        worker.ready_msg = msg
        worker.ready_at = time.monotonic()
        worker.peak_bytes = msg.memory_bytes
        worker.state = State.RUNNING  # STARTING -> RUNNING: the worker sent Ready
        slot.last_used = worker.ready_at  # idle TTL counts from here, not from the epoch
        slot.failures, slot.last_error = 0, ""
        if self._overhead_bytes == memory.DEFAULT_OVERHEAD_BYTES:
            self._overhead_bytes = max(64 * 2**20, msg.memory_bytes - msg.weights_bytes)
        if self._loading is slot:
            self._loading = None
        log.info("worker ready model=%s pid=%s load_s=%.2f memory_mb=%.0f", worker.spec.id,
                 worker.pid, msg.load_s, msg.memory_bytes / 2**20)
        self.on_event("ready", worker.spec.id, "")
        self.on_loaded(worker.spec.id, msg.load_s)
        self._grant(slot)
        self._wake()

    # ---- control (admin API, preload)

    def request_start(self, spec: ModelSpec) -> Slot:
        """Start a model without a request (preload, ctl start); clears FATAL and BACKOFF."""
        if self._closing or self._stopping:
            raise ShuttingDown("the server is shutting down")
        slot = self._slot(spec)
        if slot.fatal_reason:  # a fresh crash loop, not one more crash, makes it FATAL again
            slot.exits.clear()
        slot.fatal_reason, slot.failures, slot.backoff_until = "", 0, 0.0
        # already there: nothing to start later, unless it is on its way out (a ctl stop or a
        # reload draining it), when it starts again once it has gone
        slot.want_start = slot.worker is None or slot.worker.state in (State.DRAINING,
                                                                       State.STOPPING)
        self._wake()
        return slot

    async def start_and_wait(self, spec: ModelSpec, timeout: float) -> State:
        """ctl start: load now (clearing FATAL / BACKOFF); raise if the load fails."""
        self._refuse_if_it_never_fits(spec)
        slot = self.request_start(spec)
        stops = slot.stops
        deadline = time.monotonic() + timeout
        reason = ""  # the last wait reason seen: a timed-out wait clears it as it gives up
        while time.monotonic() < deadline:
            if self._closing or self._stopping:
                raise ShuttingDown("the server is shutting down")
            if slot.state is State.RUNNING and not slot.want_start:
                return State.RUNNING
            # a reason while it waits for room; once its worker starts, that wait is over
            reason = (slot.last_error or reason) if slot.worker is None else ""
            if slot.fatal_reason or (slot.worker is None and slot.failures):
                raise ModelLoadFailed(f"model '{spec.id}' failed to start: {slot.last_error}")
            if slot.worker is None and not slot.want_start and not slot.waiters:
                if slot.removed:
                    raise ModelUnavailable(f"model '{spec.id}' was removed by a configuration "
                                           f"reload while it started")
                if slot.stops != stops:
                    raise ModelStopped(f"model '{spec.id}' was stopped (ctl stop) while it "
                                       f"started")
                self._refuse_if_it_never_fits(slot.spec)  # the budget changed meanwhile
                raise NoMemory(f"model '{spec.id}' could not be started: "
                               f"{reason or 'its start was called off'}")
            await asyncio.sleep(0.05)
        raise Timeout(f"model '{spec.id}' did not become ready in {timeout:.0f}s")

    def has_worker(self, model_id: str) -> bool:
        slot = self._slots.get(model_id)
        return slot is not None and slot.worker is not None

    async def stop(self, model_id: str, reason: str = "requested", *,
                   for_good: bool = False) -> bool:
        """Drain and stop a model's worker; True if there was one. `for_good` (ctl stop, as
        supervisorctl's): nothing starts it again by itself either, neither a BACKOFF retry
        nor the requests waiting for its load (they get a 503); a new request still does."""
        slot = self._slots.get(model_id)
        if slot is not None and for_good:
            slot.stops += 1  # a ctl start waiting for it says it was stopped
            slot.want_start = False
            if slot.worker is None and slot.backoff_until:
                slot.backoff_until = 0.0  # its retries end; EXITED with the start's failure
            self._fail_waiters(slot, ModelStopped(
                f"model '{model_id}' was stopped ({reason}) while this request waited for it"
                + ("; a new request loads it again" if slot.spec.max_queue else "")))
        worker = slot.worker if slot is not None else None
        if worker is None:
            return False
        slot.want_start = False
        self._begin_stop(worker, reason, drain=True)
        await asyncio.shield(worker.exited)
        return True

    def reload(self, config: Config) -> None:
        """Apply a new config: hot fields at once, cold fields by draining and respawning,
        removed models drain and stop. Requests already admitted keep their spec."""
        self.config = config
        self.catalog.use_sources(sources_for(config))
        sup = config.supervisor
        self.budget_bytes = (int(sup.memory_budget_gb * memory.GB) if sup.memory_budget_gb
                             else memory.default_budget_bytes())
        for model_id, slot in self._slots.items():
            try:
                spec = self.spec(model_id)
            except RouterError as exc:  # removed from the config and not on disk
                slot.want_start, slot.removed = False, True
                self._fail_waiters(slot, ModelUnavailable(
                    f"model '{model_id}' was removed by a configuration reload"))
                self._begin_stop(slot.worker, "removed", drain=True)
                log.info("reload: model=%s removed (%s)", model_id, exc.message)
                continue
            slot.removed = False
            running = slot.worker.spec if slot.worker is not None else slot.spec
            cold = [f for f in COLD_FIELDS if getattr(running, f) != getattr(spec, f)]
            if spec != slot.spec:
                slot.fatal_reason, slot.failures, slot.backoff_until = "", 0, 0.0
                slot.exits.clear()  # a fresh crash loop, not one more crash, makes it FATAL
            if slot.worker is None and not slot.waiters and slot.state is State.STOPPED:
                # reasons worked out under the old settings (waits for room); why a worker
                # crashed or failed to start stays while its model shows EXITED or BACKOFF
                slot.last_error = ""
            slot.spec = spec
            if cold and slot.worker is not None:
                log.info("reload: model=%s restarts for %s", model_id, ", ".join(cold))
                # started again once drained when something wanted it up: a start under way
                # (ctl start, a preload) or a model nothing else would start (preload, or
                # max_queue = 0: no request may wait for a load); else the next request does
                # (not one already on its way out: a ctl stop, an eviction, an idle stop)
                if slot.worker.state is State.STARTING or (
                        slot.worker.state is State.RUNNING
                        and (spec.preload or spec.max_queue == 0)):
                    slot.want_start = True
                self._begin_stop(slot.worker, "reload", drain=True)
        self._shrink_to_limits()
        self._wake()

    def _shrink_to_limits(self) -> None:
        """After a reload lowered memory_budget_gb or max_loaded_models: stop idle workers,
        least recently used first, until the rest fit. Busy or pinned ones stay (the next
        load that needs their room waits for them, as always)."""
        sup = self.config.supervisor
        live = [s for s in self._slots.values()
                if s.worker is not None and s.worker.state is not State.STOPPING]

        def over() -> str:
            if sup.max_loaded_models > 0 and len(live) > sup.max_loaded_models:
                return "max_loaded_models"
            if sum(s.worker.cost_bytes for s in live) > self.budget_bytes:
                return "memory"
            return ""

        for slot in sorted((s for s in live if self._evictable(s)), key=lambda s: s.last_used):
            reason = over()
            if not reason:
                return
            log.info("reload: model=%s stops to fit the new %s", slot.spec.id,
                     "max_loaded_models" if reason == "max_loaded_models" else "memory budget")
            live.remove(slot)
            self._begin_stop(slot.worker, "evicted", drain=False)
            self.on_event("eviction", slot.spec.id, reason)

    # ---- views

    def status(self) -> list[WorkerStatus]:
        now = time.monotonic()
        out = []
        for slot in self._slots.values():
            w = slot.worker
            if slot.removed and w is None:
                continue
            out.append(WorkerStatus(
                model=slot.spec.id, state=slot.state.value, pid=w.pid if w else None,
                uptime_s=round(now - w.spawned_at, 1) if w else None,
                in_flight=w.in_flight if w else 0, waiting=len(slot.waiters),
                memory_bytes=w.peak_bytes or None if w else None,
                cost_bytes=w.cost_bytes if w else None,
                load_s=w.ready_msg.load_s if w and w.ready_msg else None,
                restarts=slot.restarts,
                reason=slot.fatal_reason or slot.last_error or (w.stop_reason if w else ""),
                mlx_active_bytes=w.stats.mlx_active_bytes if w and w.stats else None,
                mlx_cache_bytes=w.stats.mlx_cache_bytes if w and w.stats else None,
                mlx_peak_bytes=w.stats.mlx_peak_bytes if w and w.stats else None))
        return out

    def state_of(self, model_id: str) -> State:
        slot = self._slots.get(model_id)
        return slot.state if slot is not None else State.STOPPED

    def memory_figures(self) -> dict[str, object]:
        inputs = self.pressure_inputs
        committed = sum(s.worker.cost_bytes for s in self._slots.values() if s.worker)
        return {
            "budget_bytes": self.budget_bytes, "committed_bytes": committed,
            "pressure": self.pressure, "available_bytes": inputs.available_bytes,
            "total_bytes": inputs.total_bytes, "swap_percent": inputs.swap_percent,
            "psi_some_avg10": inputs.psi_some_avg10,
            "threshold_bytes": int(self.config.supervisor.memory_threshold_gb * memory.GB),
            "max_loaded_models": self.config.supervisor.max_loaded_models,
        }

    def slots(self) -> dict[str, Slot]:
        return self._slots

    def fail_waiting(self, error: RouterError) -> None:
        """Every request still queued for a lease fails now (a drain that ran out), and so do
        those waiting for a download (cancelled: they answer 503 shutting_down)."""
        for slot in self._slots.values():
            self._fail_waiters(slot, error)
        for task in list(self._downloads.values()):
            task.cancel()

    def waiting(self) -> int:
        """Requests queued for a lease (loading, memory, a full batch) or for a download:
        drain counts them."""
        return sum(len(s.waiters) for s in self._slots.values()) + self._download_waiting
