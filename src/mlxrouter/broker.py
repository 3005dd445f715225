"""The broker: the daemon's one ZeroMQ ROUTER socket and the per-request buffers behind it.

Runs on the daemon's event loop; imports no mlx. One reader task never awaits anything but
`recv`: it appends a worker's deltas to the request's buffer and wakes the writer (the HTTP
handler), which drains everything buffered at once. Sends use DONTWAIT, so they are synchronous
and work inside a cancelled `finally` (`cancel`). Worker lifecycle messages (Hello, Progress,
Ready, Stats) go to the supervisor's callback; traffic from unregistered identities is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
from collections.abc import Callable
from typing import NamedTuple
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from . import protocol
from .errors import InvalidRequest, RouterError, WorkerCrashed, from_code

log = logging.getLogger(__name__)

# macOS limits AF_UNIX paths to ~104 bytes.
_MAX_IPC_PATH = 100


def ipc_dir(run_dir: Path) -> Path:
    """Where sockets live: the run dir, or a private /tmp dir when its paths would be too long."""
    if len(str(run_dir / "gw.sock")) <= _MAX_IPC_PATH:
        return run_dir
    digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:8]
    short = Path(f"/tmp/mlxr-{os.getuid()}-{digest}")
    short.mkdir(mode=0o700, exist_ok=True)
    st = short.lstat()
    if short.is_symlink() or st.st_uid != os.getuid():
        raise RuntimeError(f"refusing socket dir {short}: symlink or owned by another user")
    return short


class Lease:
    """One request's claim on a worker; `release` runs its callback exactly once."""

    def __init__(self, identity: str, on_release: Callable[[], None]) -> None:
        self.identity = identity
        self._on_release: Callable[[], None] | None = on_release

    def release(self) -> None:
        callback, self._on_release = self._on_release, None
        if callback is not None:
            callback()


class Chunk(NamedTuple):
    """Everything a sequence produced since the last read."""

    text: str
    reasoning: str
    tokens: int
    tool_calls: tuple[protocol.ToolCallDelta, ...] = ()
    logprobs: tuple[protocol.TokenLogprob, ...] = ()


class RequestStream:
    """The daemon's view of one request in a worker: a start signal and a delta buffer."""

    def __init__(self, rid: int, lease: Lease) -> None:
        self.rid = rid
        self.lease = lease
        self.started: asyncio.Future[protocol.Started] = (
            asyncio.get_running_loop().create_future())
        self.end: protocol.End | None = None
        self.error: RouterError | None = None
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._tokens = 0
        self._calls: list[protocol.ToolCallDelta] = []
        self._logprobs: list[protocol.TokenLogprob] = []
        self._wake = asyncio.Event()
        # done at finish(): what a request waiting for its other choices to start watches
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def done(self) -> bool:
        return self.end is not None or self.error is not None

    def on_started(self, msg: protocol.Started) -> None:
        if not self.started.done():
            self.started.set_result(msg)

    def on_delta(self, delta: protocol.Delta) -> None:
        if self.done:
            return
        if delta.content:
            self._text.append(delta.content)
        if delta.reasoning:
            self._reasoning.append(delta.reasoning)
        self._calls += delta.tool_calls
        self._logprobs += delta.logprobs
        self._tokens += delta.tokens
        self._wake.set()

    def finish(self, end: protocol.End | None, error: RouterError | None = None) -> None:
        """Terminal: exactly once, whichever comes first (End, Error, worker death)."""
        if self.done:
            return
        self.end, self.error = end, error
        if not self.started.done():
            if error is not None:
                self.started.set_exception(error)
                # Nobody may be awaiting it (a cancelled handler); don't warn about that.
                self.started.exception()
            else:
                self.started.set_result(protocol.Started(rid=self.rid, prompt_tokens=0))
        self._wake.set()
        if not self.ended.done():
            self.ended.set_result(None)
        self.lease.release()

    async def next_chunk(self) -> Chunk:
        """Wait until something is buffered or the request ended; return all buffered text."""
        if not (self._text or self._reasoning or self._tokens or self._calls or self.done):
            await self._wake.wait()
        self._wake.clear()
        chunk = Chunk("".join(self._text), "".join(self._reasoning), self._tokens,
                      tuple(self._calls), tuple(self._logprobs))
        self._text.clear()
        self._reasoning.clear()
        self._calls.clear()
        self._logprobs.clear()
        self._tokens = 0
        return chunk


WorkerCallback = Callable[[str, protocol.Message], None]


class Broker:
    def __init__(self, run_dir: Path) -> None:
        self.endpoint = f"ipc://{ipc_dir(run_dir) / 'gw.sock'}"
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._rids = itertools.count(1)
        self._streams: dict[int, RequestStream] = {}
        self._registered: set[str] = set()
        self._on_worker: WorkerCallback = lambda identity, msg: None
        self._reader: asyncio.Task | None = None
        self.dropped_messages = 0

    def start(self, on_worker: WorkerCallback) -> None:
        path = self.endpoint.removeprefix("ipc://")
        if os.path.exists(path):
            os.unlink(path)  # a stale socket from a crashed daemon; the run lock is ours
        self._sock.bind(self.endpoint)
        os.chmod(path, 0o600)
        self._on_worker = on_worker
        self._reader = asyncio.create_task(self._read_loop(), name="broker-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._sock.close(linger=0)
        self._ctx.term()
        path = self.endpoint.removeprefix("ipc://")
        if os.path.exists(path):
            os.unlink(path)

    def register(self, identity: str) -> None:
        self._registered.add(identity)

    def unregister(self, identity: str) -> None:
        self._registered.discard(identity)

    def next_rid(self) -> int:
        return next(self._rids)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def submit(self, lease: Lease, request: protocol.Request) -> RequestStream:
        """Send a Request to the leased worker; the stream owns the lease from here on."""
        stream = RequestStream(request.rid, lease)
        self._streams[request.rid] = stream
        try:
            if lease.identity not in self._registered:  # reaped since the lease was granted
                raise WorkerCrashed(f"worker {lease.identity.split('/')[0]} exited")
            self.send(lease.identity, request)
        except RouterError as exc:
            self._finish(stream, None, exc)
            raise
        except (OverflowError, TypeError, ValueError) as exc:  # not encodable: the lease goes back
            error = InvalidRequest(f"the request could not be encoded: {exc}")
            self._finish(stream, None, error)
            raise error from None
        return stream

    def cancel(self, rid: int) -> None:
        """Synchronous, so it works in a cancelled `finally`. The worker answers with End."""
        stream = self._streams.get(rid)
        if stream is None or stream.done:
            return
        try:
            self.send(stream.lease.identity, protocol.Cancel(rid=rid))
        except RouterError as exc:
            self._finish(stream, None, exc)

    def send(self, identity: str, msg: protocol.Message) -> None:
        fut = self._sock.send_multipart([identity.encode(), protocol.encode(msg)],
                                        flags=zmq.DONTWAIT)
        exc = fut.exception()
        if exc is not None:
            raise WorkerCrashed(f"worker {identity.split('/')[0]} is unreachable ({exc})")

    def fail_all(self, error: RouterError) -> None:
        """Every request in flight fails now; its worker is told to stop generating it."""
        for stream in list(self._streams.values()):
            self.cancel(stream.rid)
            self._finish(stream, None, error)

    def fail_worker(self, identity: str, error: RouterError) -> None:
        """The worker died: every request it was serving fails now."""
        for stream in [s for s in self._streams.values() if s.lease.identity == identity]:
            self._finish(stream, None, error)

    def _finish(self, stream: RequestStream, end: protocol.End | None,
                error: RouterError | None) -> None:
        self._streams.pop(stream.rid, None)
        stream.finish(end, error)

    async def _read_loop(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                self._dispatch(frames)
            except Exception:  # one bad message must not kill the reader
                log.exception("broker: failed to handle a message")

    def _dispatch(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.dropped_messages += 1
            return
        identity = frames[0].decode(errors="replace")
        if identity not in self._registered:
            self.dropped_messages += 1
            log.warning("broker: dropped message from unregistered identity=%s", identity)
            return
        try:
            msg = protocol.decode(frames[1])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.dropped_messages += 1
            log.warning("broker: undecodable message from identity=%s: %s", identity, exc)
            return
        match msg:
            case protocol.Step(deltas=deltas):
                for delta in deltas:
                    stream = self._stream_of(identity, delta.rid)
                    if stream is not None:
                        stream.on_delta(delta)
            case protocol.Started():
                if (stream := self._stream_of(identity, msg.rid)) is not None:
                    stream.on_started(msg)
            case protocol.End():
                if (stream := self._stream_of(identity, msg.rid)) is not None:
                    self._finish(stream, msg, None)
            case protocol.Error():
                if (stream := self._stream_of(identity, msg.rid)) is not None:
                    self._finish(stream, None, from_code(msg.code, msg.message, msg.param))
            case _:
                self._on_worker(identity, msg)

    def _stream_of(self, identity: str, rid: int) -> RequestStream | None:
        stream = self._streams.get(rid)
        if stream is None or stream.lease.identity != identity:
            self.dropped_messages += 1
            return None
        return stream
