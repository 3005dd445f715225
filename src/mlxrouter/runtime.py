"""What the daemon's route handlers share: the live config and the components they talk to.

Daemon side; imports no mlx. One instance per daemon, kept in `app.state.router` (lifespan state,
not a global).
"""

from __future__ import annotations

import asyncio

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from .broker import Broker
from .config import Config
from .metrics import Metrics
from .supervisor import Supervisor

_json = msgspec.json.Encoder()


@dataclass
class AppState:
    config: Config
    broker: Broker
    supervisor: Supervisor
    metrics: Metrics | None = None
    reload: Callable[[], tuple[bool, str]] | None = None
    shutdown: Callable[[], None] | None = None
    started_at: float = field(default_factory=time.time)
    shutting_down: bool = False
    # HTTP requests between their headers and their response's end (AccessMiddleware): the
    # drain waits for those too, e.g. one whose body was still arriving when SIGTERM came
    requests_in_progress: int = 0
    # set with shutting_down: a request body still arriving is refused at once (503)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


class Interrupted(Exception):
    """unless_set: the event came first."""


async def unless_set(awaitable: Any, event: asyncio.Event) -> Any:
    """`awaitable`'s result, unless `event` is set first: then the work is cancelled (a
    thread's runs on to its end) and Interrupted is raised."""
    work = asyncio.ensure_future(awaitable)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise Interrupted
    return work.result()


def json_response(payload: object, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    return Response(_json.encode(payload), status_code=status, headers=headers,
                    media_type="application/json")


def app_state(request: Request) -> AppState:
    return request.app.state.router
