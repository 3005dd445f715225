"""The admin API behind `mlxrouter ctl`: status, start / stop / restart, logs, reload, shutdown.

Daemon side; imports no mlx. Reachable from loopback only unless an admin key is configured
(see `access`). Like everything else it asks the supervisor to act and never changes worker
state itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import __version__
from .errors import InvalidRequest, ModelNotFound, ShuttingDown
from .runtime import app_state, json_response
from .states import State, WorkerStatus

log = logging.getLogger(__name__)

LOG_CHUNK_BYTES = 64 * 1024


class DaemonInfo(msgspec.Struct):
    pid: int
    version: str
    boot_id: str
    uptime_s: float
    in_flight: int
    shutting_down: bool


class StatusBody(msgspec.Struct):
    daemon: DaemonInfo
    workers: list[WorkerStatus]


class LogChunk(msgspec.Struct):
    model: str
    path: str
    offset: int
    text: str
    # The file read (its inode), sent back with the next offset: a rotation shows as a new
    # one, and the rest of the old file is read first. `more`: the file was longer than this.
    inode: int = 0
    more: bool = False


class ActionResult(msgspec.Struct):
    model: str
    state: str
    message: str = ""


def _statuses(request: Request) -> list[WorkerStatus]:
    """Every model the daemon knows, loaded or not (not loaded = STOPPED)."""
    state = app_state(request)
    sup = state.supervisor
    known = {s.model: s for s in sup.status()}
    for model_id in sup.catalog.ids():
        known.setdefault(model_id, WorkerStatus(
            model=model_id, state=State.STOPPED.value, pid=None, uptime_s=None, in_flight=0,
            waiting=0, memory_bytes=None, cost_bytes=None, load_s=None, restarts=0, reason=""))
    return sorted(known.values(), key=lambda s: s.model)


async def status(request: Request) -> Response:
    state = app_state(request)
    info = DaemonInfo(pid=os.getpid(), version=__version__, boot_id=state.supervisor.boot_id,
                      uptime_s=round(time.time() - state.started_at, 1),
                      in_flight=state.broker.in_flight, shutting_down=state.shutting_down)
    return json_response(StatusBody(info, _statuses(request)))


def _model(request: Request, running: bool = False) -> str:
    """The model id of the path; with `running`, also a model no longer configured or on disk
    (its directory deleted) whose worker still runs: it can still be stopped and read."""
    model_id = request.path_params["model_id"]
    state = app_state(request)
    if not state.supervisor.catalog.knows(model_id) and not (
            running and state.supervisor.has_worker(model_id)):
        raise ModelNotFound(f"no such model: '{model_id}'", param="model")
    return model_id


def _not_while_shutting_down(state) -> None:
    """Workers started now would only be stopped by the shutdown under way."""
    if state.shutting_down:
        raise ShuttingDown("the server is shutting down")


async def start(request: Request) -> Response:
    state = app_state(request)
    _not_while_shutting_down(state)
    model_id = _model(request)
    timeout = state.config.supervisor.load_timeout_s + 5
    final = await state.supervisor.start_and_wait(state.supervisor.spec(model_id), timeout)
    return json_response(ActionResult(model_id, final.value))


async def stop(request: Request) -> Response:
    state = app_state(request)
    model_id = _model(request, running=True)
    before = state.supervisor.state_of(model_id)
    was_running = await state.supervisor.stop(model_id, reason="ctl stop", for_good=True)
    message = ("stopped" if was_running else "retries stopped" if before is State.BACKOFF
               else "not running")
    return json_response(ActionResult(model_id, state.supervisor.state_of(model_id).value,
                                      message))


async def restart(request: Request) -> Response:
    state = app_state(request)
    _not_while_shutting_down(state)
    model_id = _model(request)
    await state.supervisor.stop(model_id, reason="ctl restart")
    timeout = state.config.supervisor.load_timeout_s + 5
    final = await state.supervisor.start_and_wait(state.supervisor.spec(model_id), timeout)
    return json_response(ActionResult(model_id, final.value, "restarted"))


async def logs(request: Request) -> Response:
    """A chunk of a worker's log from `offset` (or its last `tail` bytes): what `ctl tail`
    prints, and polls with the returned offset for `-f`."""
    state = app_state(request)
    model_id = _model(request, running=True)
    main_log, stderr_log = state.supervisor.log_paths(model_id)
    path = stderr_log if request.query_params.get("stream") == "stderr" else main_log
    try:
        offset = int(request.query_params.get("offset", "-1"))
        tail = int(request.query_params.get("tail", "1600"))
        inode = int(request.query_params.get("inode", "0"))
    except ValueError:
        raise InvalidRequest("offset, tail and inode must be integers", param="offset") from None
    data, end, inode, more = await asyncio.to_thread(_read_log, path, offset, tail, inode)
    return json_response(LogChunk(model_id, str(path), end, data.decode(errors="replace"),
                                  inode, more))


def _read_log(path: Path, offset: int, tail: int, inode: int = 0
              ) -> tuple[bytes, int, int, bool]:
    """Up to LOG_CHUNK_BYTES from `offset` of the file `inode` (0: unknown): (bytes, next
    offset, the inode they came from, more to read now). When the log was rotated under the
    reader (another inode, or shorter than the offset), the rest of the old file (now `.1`)
    comes first, then the new one from its start: lines written in between are not lost."""
    try:
        st = path.stat()
    except OSError:
        return b"", 0, 0, False
    if offset < 0:  # first call: the last `tail` bytes
        offset, inode = max(0, st.st_size - tail), st.st_ino
    elif (inode and inode != st.st_ino) or offset > st.st_size:
        rest = b""
        rotated = path.with_name(path.name + ".1")
        try:
            if inode and rotated.stat().st_ino == inode:
                with open(rotated, "rb") as f:
                    f.seek(offset)
                    rest = f.read(LOG_CHUNK_BYTES)
        except OSError:
            pass
        if len(rest) == LOG_CHUNK_BYTES:  # more of the old file first
            return rest, offset + len(rest), inode, True
        data, end, inode, more = _read_log(path, 0, 0, st.st_ino)
        return rest + data, end, inode, more
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(LOG_CHUNK_BYTES)
    return data, offset + len(data), inode or st.st_ino, offset + len(data) < st.st_size


async def reload(request: Request) -> Response:
    state = app_state(request)
    if state.reload is None:
        raise InvalidRequest("this daemon cannot reload its configuration")
    ok, message = state.reload()
    if not ok:
        raise InvalidRequest(message)
    return json_response({"status": "ok", "message": message})


async def shutdown(request: Request) -> Response:
    state = app_state(request)
    if state.shutdown is not None:
        log.info("shutdown asked through the admin API (ctl shutdown): shutting down")
        asyncio.get_running_loop().call_soon(state.shutdown)
    return json_response({"status": "shutting down", "pid": os.getpid()}, 202)


def admin_routes() -> list[Route]:
    model = "/admin/models/{model_id:path}"
    return [
        Route("/admin/status", status, methods=["GET"]),
        Route(f"{model}/start", start, methods=["POST"]),
        Route(f"{model}/stop", stop, methods=["POST"]),
        Route(f"{model}/restart", restart, methods=["POST"]),
        Route(f"{model}/log", logs, methods=["GET"]),
        Route("/admin/reload", reload, methods=["POST"]),
        Route("/admin/shutdown", shutdown, methods=["POST"]),
    ]

