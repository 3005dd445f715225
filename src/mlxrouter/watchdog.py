"""Liveness and idleness checks the supervisor runs every tick.

Runs in the daemon; imports no mlx. None of it rests on heartbeat silence alone: a worker's
death is seen by reaping; these catch the live-but-useless ones (SIGSTOPped, wedged engine,
stuck load) and the idle ones (TTL, critical memory pressure).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .states import State

if TYPE_CHECKING:
    from .supervisor import Supervisor

log = logging.getLogger(__name__)


def check_workers(sup: Supervisor, now: float) -> None:
    cfg = sup.config.supervisor
    for slot in list(sup.slots().values()):
        w = slot.worker
        if w is None or w.proc is None or w.proc.returncode is not None:
            continue
        if w.state in (State.STARTING, State.RUNNING, State.DRAINING):
            if now - w.last_seen > cfg.silence_timeout_s:
                sup.kill(w, f"silent for {now - w.last_seen:.1f}s")
                continue
        if w.state is State.STARTING and now - w.progress_at > cfg.load_timeout_s:
            sup.kill(w, f"not ready after {cfg.load_timeout_s:.0f}s")
            continue
        active = w.stats.active_sequences if w.stats else 0
        if active and now - w.steps_moved_at > cfg.engine_stall_timeout_s:
            sup.kill(w, f"engine made no progress for {now - w.steps_moved_at:.0f}s "
                        f"with {active} active sequences")
            continue
        if w.state is not State.RUNNING or w.in_flight or slot.waiters or slot.spec.pinned:
            continue
        ttl = slot.spec.idle_ttl_s
        if ttl > 0 and now - slot.last_used > ttl:
            sup.stop_idle(w, "idle")
        elif sup.pressure == "critical":
            sup.stop_idle(w, "pressure")
