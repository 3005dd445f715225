"""Getting answers out of workers for one HTTP request: leases, fan-out, collecting, streaming.

Runs on the daemon's event loop; imports no mlx. A request for several choices (`n`, or a list
of prompts) becomes one worker sequence per choice, each with its own lease, generated side by
side in the worker's batch and merged here by choice index. The response status is committed
only once every sequence has Started; after that errors are SSE error events.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, NamedTuple, Protocol

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from . import protocol
from .broker import Chunk, RequestStream
from .config import ModelSpec
from .errors import InvalidRequest, RouterError, Timeout
from .memory import LEVELS
from .runtime import AppState, json_response
from .schemas import PromptTokensDetails, Usage
from .streaming import SSE_HEADERS, StreamFormat

log = logging.getLogger(__name__)


def token_cap(spec: ModelSpec, pressure: str) -> int | None:
    """The tightest `memory_pressure_max_tokens` cap of this level and the milder ones."""
    caps = spec.memory_pressure_max_tokens
    levels = LEVELS[1: LEVELS.index(pressure) + 1]
    found = [caps[lvl] for lvl in levels if lvl in caps]
    return min(found) if found else None


class Call:
    """One sequence's way into a worker: lease, submit, wait for Started, read deltas."""

    def __init__(self, state: AppState, spec: ModelSpec, request: protocol.Request,
                 deadline: float) -> None:
        self.state = state
        self.spec = spec
        self.request = request
        self.deadline = deadline
        self.stream: RequestStream | None = None
        self.t0 = time.monotonic()
        self.queue_s: float | None = None
        self.ttft_s: float | None = None
        self.tokens = 0  # generated so far
        self._last_chunk_at = 0.0

    async def open(self) -> RequestStream:
        lease = await self.state.supervisor.acquire(self.spec, self.deadline)
        self.queue_s = time.monotonic() - self.t0
        self.stream = self.state.broker.submit(lease, self.request)
        try:
            await self._within_deadline(asyncio.shield(self.stream.started))
        except BaseException:
            self.close()
            raise
        return self.stream

    async def next_chunk(self) -> Chunk:
        assert self.stream is not None
        chunk = await self._within_deadline(self.stream.next_chunk())
        tokens = chunk.tokens
        self.tokens += tokens
        now = time.monotonic()
        if tokens and self.ttft_s is None:
            self.ttft_s = now - self.t0
        elif tokens and self.state.metrics is not None:
            self.state.metrics.inter_token(self.spec.id, (now - self._last_chunk_at) / tokens)
        if tokens:
            self._last_chunk_at = now
        return chunk

    async def collect(self) -> Answer:
        stream = self.stream or await self.open()
        parts, thoughts, calls, logprobs = [], [], [], []
        try:
            while True:
                chunk = await self.next_chunk()
                parts.append(chunk.text)
                thoughts.append(chunk.reasoning)
                calls += chunk.tool_calls
                logprobs += chunk.logprobs
                if stream.done:
                    break
        finally:
            self.close()
        if stream.error is not None:
            raise stream.error
        assert stream.end is not None
        return Answer("".join(parts), "".join(thoughts), stream.end, merge_tool_calls(calls),
                      tuple(logprobs))

    async def _within_deadline(self, awaitable):
        try:
            async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                return await awaitable
        except TimeoutError:
            self.close()
            raise Timeout(f"the request exceeded its time limit of {self.spec.timeout_s:g}s "
                          f"(model '{self.spec.id}')") from None

    def close(self) -> None:
        """Cancel the sequence in its worker unless it already ended. Synchronous on purpose."""
        if self.stream is not None and not self.stream.done:
            self.state.broker.cancel(self.stream.rid)


class Answer(NamedTuple):
    text: str
    reasoning: str
    end: protocol.End
    tool_calls: tuple[protocol.ToolCallDelta, ...] = ()  # whole calls, by index
    logprobs: tuple[protocol.TokenLogprob, ...] = ()


def merge_tool_calls(pieces: list[protocol.ToolCallDelta]) -> tuple[protocol.ToolCallDelta, ...]:
    """Whole calls from streamed pieces: id and name from a call's first piece, arguments
    concatenated."""
    calls: dict[int, protocol.ToolCallDelta] = {}
    for p in pieces:
        have = calls.get(p.index)
        calls[p.index] = p if have is None else msgspec.structs.replace(
            have, arguments=have.arguments + p.arguments)
    return tuple(calls[i] for i in sorted(calls))


class Shape(Protocol):
    """How one endpoint spells its answers (chat.completion vs text_completion)."""

    endpoint: str
    id_prefix: str

    def body(self, cid: str, created: int, model: str, choices: list[Answer],
             usage: Usage) -> msgspec.Struct: ...

    def opening(self, cid: str, created: int, model: str, index: int) -> msgspec.Struct | None:
        ...

    def delta(self, cid: str, created: int, model: str, index: int, chunk: Chunk
              ) -> msgspec.Struct: ...

    def finish(self, cid: str, created: int, model: str, index: int, reason: str
               ) -> msgspec.Struct: ...

    def usage_chunk(self, cid: str, created: int, model: str, usage: Usage
                    ) -> msgspec.Struct: ...


class Group:
    """All the sequences of one HTTP request. `prefix[i]` is text shown before choice i's
    output (completions' echo); `prompt_of[i]` says which prompt choice i answers."""

    def __init__(self, state: AppState, spec: ModelSpec, requests: list[protocol.Request],
                 shape: Shape, model: str, prompt_of: list[int], prefix: list[str]) -> None:
        capacity = spec.max_running + spec.max_queue
        if len(requests) > capacity:  # a 429 would be retried forever: it can never fit
            raise InvalidRequest(
                f"this request needs {len(requests)} sequences (n choices for each prompt), "
                f"more than model '{spec.id}' ever admits at once (max_running "
                f"{spec.max_running} + max_queue {spec.max_queue} = {capacity})", param="n")
        self.t0 = time.monotonic()
        deadline = self.t0 + spec.timeout_s  # the whole request: queue, load, generation
        self.calls = [Call(state, spec, r, deadline) for r in requests]
        self.state, self.spec, self.shape, self.model = state, spec, shape, model
        self.prompt_of, self.prefix = prompt_of, prefix
        self.cid = f"{shape.id_prefix}-{requests[0].rid:x}{secrets.token_hex(4)}"
        self.created = int(time.time())
        self._recorded = False

    async def _all(self, coros) -> list:
        """Run one coroutine per sequence; the first failure cancels the siblings (no choice
        keeps generating for a request that already failed)."""
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            await self._abandon(tasks)
            raise

    async def _abandon(self, tasks: list[asyncio.Future]) -> None:
        """A choice failed (or the client left): the others stop, and the request closes."""
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.close()

    async def open(self) -> None:
        """Every choice started. A choice that fails meanwhile (its worker crashed) fails the
        request at once: the others may still wait for a batch slot, and they waited for the
        model's reload before the client heard of the crash."""
        tasks = [asyncio.ensure_future(c.open()) for c in self.calls]
        try:
            while not all(t.done() for t in tasks):
                running = [c.stream.ended for c in self.calls
                           if c.stream is not None and not c.stream.done]
                await asyncio.wait([*(t for t in tasks if not t.done()), *running],
                                   return_when=asyncio.FIRST_COMPLETED)
                for task in tasks:
                    if task.done() and task.exception() is not None:
                        raise task.exception()
                for call in self.calls:
                    if call.stream is not None and call.stream.error is not None:
                        raise call.stream.error
        except BaseException:
            await self._abandon(tasks)
            raise

    def close(self) -> None:
        for call in self.calls:
            call.close()

    def usage(self, ends: list[protocol.End]) -> Usage:
        """Each prompt counts once, however many choices answer it."""
        prompts = {self.prompt_of[i]: e.prompt_tokens for i, e in enumerate(ends)}
        cached = {self.prompt_of[i]: e.cached_tokens for i, e in enumerate(ends)}
        completion = sum(e.completion_tokens for e in ends)
        prompt = sum(prompts.values())
        return Usage(prompt, completion, prompt + completion,
                     PromptTokensDetails(cached_tokens=sum(cached.values())))

    def record(self, status: int, usage: Usage | None = None,
               error: RouterError | None = None, worker_s: float | None = None) -> float:
        """Log and count this request once, whichever way it ended; its duration so far."""
        duration = time.monotonic() - self.t0
        if self._recorded:
            return duration
        self._recorded = True
        generated = any(c.ttft_s is not None for c in self.calls)
        if usage is None and generated:  # failed midway: what it did still counts
            usage = self._usage_so_far()
        log.info("%s model=%s status=%d choices=%d duration_ms=%.0f%s prompt_tokens=%d "
                 "completion_tokens=%d%s", self.shape.endpoint, self.spec.id, status,
                 len(self.calls), duration * 1000,
                 f" worker_ms={worker_s * 1000:.0f}" if worker_s is not None else "",
                 usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
                 f" error={error.code}" if error else "")
        metrics = self.state.metrics
        if metrics is None:
            return duration
        if error is not None:
            error.recorded = True  # the route's catch-all must not count it again
            if not generated:  # (a failure after the first token is no refusal)
                metrics.rejected(self.spec.id, error.code)
        first = self.calls[0]
        metrics.request_done(
            self.spec.id, self.shape.endpoint, status, duration_s=duration,
            queue_s=first.queue_s, ttft_s=first.ttft_s,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            cached_tokens=usage.prompt_tokens_details.cached_tokens if usage else 0)
        return duration

    def _usage_so_far(self) -> Usage:
        prompts: dict[int, int] = {}
        for i, call in enumerate(self.calls):
            started = call.stream.started if call.stream is not None else None
            if started is not None and started.done() and not started.cancelled() and (
                    started.exception() is None):
                prompts[self.prompt_of[i]] = started.result().prompt_tokens
        prompt, completion = sum(prompts.values()), sum(c.tokens for c in self.calls)
        return Usage(prompt, completion, prompt + completion, PromptTokensDetails())

    # ---- non-streaming

    async def complete(self, request: Request) -> Response:
        work = asyncio.ensure_future(self._collect_all())
        watcher = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not work.done():  # the client left: stop generating for nobody
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work.cancelled():
            self.record(499)
            return Response(status_code=499)
        try:
            results = work.result()
        except RouterError as exc:
            self.record(exc.status, error=exc)
            raise
        ends = [a.end for a in results]
        usage = self.usage(ends)
        worker_s = max(e.elapsed_s for e in ends)
        duration = self.record(200, usage, worker_s=worker_s)
        choices = [a._replace(text=self.prefix[i] + a.text) for i, a in enumerate(results)]
        # What the time went to, for browsers' devtools and for measuring the router's own
        # overhead (total - worker): the wait for a batch slot, the slowest choice's time in
        # the worker, everything from admission to this response.
        queue_s = max(c.queue_s or 0.0 for c in self.calls)
        timing = (f"queue;dur={queue_s * 1000:.2f}, "
                  f"worker;dur={worker_s * 1000:.2f}, total;dur={duration * 1000:.2f}")
        return json_response(self.shape.body(self.cid, self.created, self.model, choices,
                                             usage), headers={"server-timing": timing})

    async def _collect_all(self) -> list[Answer]:
        try:
            return await self._all(c.collect() for c in self.calls)
        finally:
            self.close()

    # ---- streaming

    async def stream(self, include_usage: bool, request: Request) -> Response:
        opening = asyncio.ensure_future(self.open())
        watcher = asyncio.ensure_future(_until_disconnect(request))
        commit_after = self.state.config.server.stream_commit_after_s
        try:  # (asyncio.wait never cancels what it waits for)
            await asyncio.wait({opening, watcher}, timeout=commit_after,
                               return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            opening.cancel()
            raise
        finally:
            watcher.cancel()
        if watcher.done() and not watcher.cancelled():
            # The client left before anything was sent (queued behind a full batch, or
            # waiting for a load): nobody is there to stream to.
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
            self.close()
            self.record(499)
            return Response(status_code=499)
        if opening.done() and opening.exception() is not None:
            exc = opening.exception()
            if isinstance(exc, RouterError):
                self.record(exc.status, error=exc)
            raise exc  # failed before Started: a real HTTP status
        fmt = StreamFormat(self.spec.streaming_format)
        return ClosingStreamingResponse(self._sse(opening, include_usage, fmt),
                                        media_type=fmt.media_type, headers=SSE_HEADERS)

    async def _sse(self, opening: asyncio.Future, include_usage: bool,
                   fmt: StreamFormat) -> AsyncIterator[bytes]:
        interval = self.state.config.server.keepalive_interval_s
        args = (self.cid, self.created, self.model)
        events = merged = None
        try:
            yield fmt.start()
            while not opening.done():
                done, _ = await asyncio.wait({opening}, timeout=interval)
                if not done:
                    yield fmt.keepalive()
            if (exc := opening.exception()) is not None:
                self.record(getattr(exc, "status", 500), error=exc)
                yield fmt.error(exc)
                yield fmt.end(failed=True)
                return
            for i in range(len(self.calls)):
                first = self.shape.opening(*args, i)
                if first is not None:
                    yield fmt.chunk(first)
                if self.prefix[i]:
                    yield fmt.chunk(self.shape.delta(*args, i, Chunk(self.prefix[i], "", 0)))
            ends: dict[int, protocol.End] = {}
            # Entries of tokens that showed nothing (tool-call markup) wait for the next
            # chunk of their choice that shows something, rather than go out on their own.
            unshown: dict[int, tuple[protocol.TokenLogprob, ...]] = {}
            merged = self._merged(interval)
            events = self._batched(merged)
            async for index, chunk, end in events:
                if index is None:  # nothing for a while (a long prompt being processed)
                    yield fmt.keepalive()
                    continue
                shows = bool(chunk.text or chunk.reasoning or chunk.tool_calls)
                if chunk.logprobs and not shows and end is None:
                    unshown[index] = unshown.get(index, ()) + chunk.logprobs
                    continue
                if index in unshown:
                    chunk = chunk._replace(logprobs=unshown.pop(index) + chunk.logprobs)
                if shows or chunk.logprobs:
                    yield fmt.chunk(self.shape.delta(*args, index, chunk))
                if end is not None:
                    ends[index] = end
                    yield fmt.chunk(self.shape.finish(*args, index, end.finish_reason))
            usage = self.usage([ends[i] for i in range(len(self.calls))])
            self.record(200, usage, worker_s=max(e.elapsed_s for e in ends.values()))
            if include_usage:
                yield fmt.chunk(self.shape.usage_chunk(*args, usage))
            yield fmt.end()
        except RouterError as exc:
            self.record(exc.status, error=exc)
            yield fmt.error(exc)
            yield fmt.end(failed=True)
        finally:
            if not opening.done():
                opening.cancel()
            self.close()
            self.record(499)  # no-op unless the client left mid-stream
            if events is not None:  # the pumps stop now, not when these are collected
                await events.aclose()
                await merged.aclose()

    async def _batched(self, events):
        """stream_chunk_size: hold each choice's text until it has that many tokens (or ends)."""
        size = self.spec.stream_chunk_size
        if size <= 1:
            async for event in events:
                yield event
            return
        held: dict[int, Chunk] = {}
        async for index, chunk, end in events:
            if index is None:
                yield index, chunk, end
                continue
            have = held.pop(index, Chunk("", "", 0))
            merged = Chunk(have.text + chunk.text, have.reasoning + chunk.reasoning,
                           have.tokens + chunk.tokens, have.tool_calls + chunk.tool_calls,
                           have.logprobs + chunk.logprobs)
            if end is None and merged.tokens < size:
                held[index] = merged
                continue
            yield index, merged, end

    async def _merged(self, keepalive_s: float
                      ) -> AsyncIterator[tuple[int | None, Chunk, protocol.End | None]]:
        """Deltas of every sequence as they come; raises the first sequence's error. An index
        of None means nothing came for `keepalive_s` (the caller sends a keep-alive)."""
        queue: asyncio.Queue[tuple[int, Chunk, Any]] = asyncio.Queue()

        async def pump(index: int, call: Call) -> None:
            try:
                while True:
                    chunk = await call.next_chunk()
                    stream = call.stream
                    assert stream is not None
                    if stream.done:
                        queue.put_nowait((index, chunk, stream.error or stream.end))
                        return
                    queue.put_nowait((index, chunk, None))
            except RouterError as exc:
                queue.put_nowait((index, Chunk("", "", 0), exc))

        tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(self.calls)]
        try:
            for _ in range(len(self.calls)):
                while True:
                    try:
                        async with asyncio.timeout(keepalive_s):
                            index, text, last = await queue.get()
                    except TimeoutError:
                        yield None, Chunk("", "", 0), None
                        continue
                    if isinstance(last, RouterError):
                        raise last
                    yield index, text, last
                    if last is not None:
                        break
        finally:
            for task in tasks:
                task.cancel()


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator when the response ends, however it ends. Starlette cancels
    the sending when the client leaves but leaves the generator suspended at its `yield`;
    its `finally` (which cancels the generation in the worker and logs the 499) then ran only
    when the garbage collector got to it, seconds to minutes later, in another request's
    context."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
