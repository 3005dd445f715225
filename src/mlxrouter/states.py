"""The records the supervisor owns: worker incarnations, per-model slots, lease waiters.

Runs in the daemon; imports no mlx. Only the supervisor (and its watchdog) mutate these.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import time
from collections import deque
from pathlib import Path

import msgspec

from . import protocol
from .broker import Lease
from .config import ModelSpec

CRASH_LOOP_EXITS = 5


class State(enum.StrEnum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    DRAINING = "DRAINING"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    BACKOFF = "BACKOFF"
    FATAL = "FATAL"


LIVE = (State.STARTING, State.RUNNING, State.DRAINING, State.STOPPING)


def slug(model_id: str) -> str:
    """A model id as a file name (logs, pid files): "/" becomes "--". An id that could meet
    another that way ("x--y" and "x/y", "x-/y" and "x/-y") gets a hash of itself too, so two
    models never share a pid file or a log."""
    name = model_id.replace("/", "--")
    if "--" in model_id or "-/" in model_id or "/-" in model_id:
        name += "~" + hashlib.sha256(model_id.encode()).hexdigest()[:8]
    return name


class Worker:
    """One incarnation of one model's worker process."""

    def __init__(self, spec: ModelSpec, identity: str, cost_bytes: int) -> None:
        self.spec = spec
        self.identity = identity
        self.state = State.STARTING
        self.proc: asyncio.subprocess.Process | None = None
        self.started_now()  # again at the spawn (Supervisor._run_process)
        self.ready_at: float | None = None
        self.in_flight = 0
        self.estimate_bytes = cost_bytes
        self.peak_bytes = 0
        self.rss_at_measure = 0  # RSS when Pss was last read, and when (supervisor._measure)
        self.measured_at = float("-inf")
        self.pss_pending = False  # a reading of its Pss is running on a thread
        self.ready_msg: protocol.Ready | None = None
        self.stats: protocol.Stats | None = None
        self.stop_reason = ""
        self.kill_reason = ""  # why the supervisor SIGKILLed it (watchdog), if it did
        # Sizes of its log files when it was spawned: its own lines come after (the files are
        # the model's, shared with earlier workers)
        self.log_offsets: dict[Path, int] = {}
        self.exited = asyncio.get_running_loop().create_future()

    def started_now(self) -> None:
        """The process exists from now: building its environment before (which may compile
        a preloaded library) is no silence of its own and no part of its load."""
        self.spawned_at = self.last_seen = self.progress_at = time.monotonic()
        self.steps_moved_at = self.spawned_at

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def cost_bytes(self) -> int:
        return max(self.estimate_bytes, self.peak_bytes)


class Waiter:
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.since = time.monotonic()  # loads are planned in the order requests came
        self.future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()


class Slot:
    """A model's record across incarnations: its worker, waiters, failures and backoff."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.worker: Worker | None = None
        self.waiters: deque[Waiter] = deque()
        self.want_start = False
        self.failures = 0
        self.backoff_until = 0.0
        self.fatal_reason = ""
        self.last_error = ""
        self.exits: deque[float] = deque(maxlen=CRASH_LOOP_EXITS + 1)
        self.restarts = 0
        self.last_used = 0.0
        self.wait_since: float | None = None
        self.removed = False  # by a reload: listed only until its worker is gone
        self.stopped_on_purpose = False  # its last worker was stopped, not lost
        self.stops = 0  # ctl stops so far (a ctl start that waited tells them from no room)

    @property
    def state(self) -> State:
        if self.worker is not None:
            return self.worker.state
        if self.fatal_reason:
            return State.FATAL
        if self.backoff_until > time.monotonic():
            return State.BACKOFF
        lost = (self.exits or self.failures) and not self.stopped_on_purpose
        return State.EXITED if lost else State.STOPPED


class WorkerStatus(msgspec.Struct):
    model: str
    state: str
    pid: int | None
    uptime_s: float | None
    in_flight: int
    waiting: int
    memory_bytes: int | None
    cost_bytes: int | None
    load_s: float | None
    restarts: int
    reason: str
    mlx_active_bytes: int | None = None
    mlx_cache_bytes: int | None = None
    mlx_peak_bytes: int | None = None


