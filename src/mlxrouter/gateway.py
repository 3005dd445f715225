"""The gateway: Starlette routes that parse, validate, admit and stream back.

Runs on the daemon's event loop; imports no mlx. It is thin: templates, tokenization and
generation happen in workers. Response status is committed only once the worker has Started the
request (so every earlier failure is a real HTTP status); a streaming response whose model is
still loading commits after `stream_commit_after_s` and sends keep-alive comments.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from . import protocol
from .access import AccessMiddleware, request_id
from .broker import RequestStream
from .config import ModelSpec
from .errors import (BodyTooLarge, InvalidRequest, ModelNotFound, NotFound, RouterError,
                     ShuttingDown, Timeout, error_body, error_headers)
from .memory import LEVELS
from .schemas import (AssistantMessage, ChatCompletion, ChatCompletionChunk,
                      ChatCompletionRequest, Choice, ChunkChoice, ChunkDelta, ModelList,
                      ModelObject, PromptTokensDetails, Usage, check_supported, decode_body,
                      message_dicts)
from .admin import admin_routes
from .openapi import openapi_document
from .runtime import AppState, app_state, json_response
from .streaming import SSE_DONE, SSE_HEADERS, SSE_KEEPALIVE, encode_sse, encode_sse_error

log = logging.getLogger(__name__)


# ---- errors: the one place exceptions become OpenAI error JSON


async def on_router_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RouterError)
    if exc.status >= 500:
        log.warning("request failed status=%d code=%s: %s", exc.status, exc.code, exc.message)
    return json_response(error_body(exc), exc.status, error_headers(exc))


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    err = NotFound(f"{request.method} {request.url.path}: {exc.detail}")
    err.status = exc.status_code  # 404 or 405, same shape
    return json_response(error_body(err), exc.status_code)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    ref = secrets.token_hex(6)
    log.error("unhandled error ref=%s path=%s", ref, request.url.path, exc_info=exc)
    err = RouterError(f"internal server error (ref {ref})")
    return json_response(error_body(err), 500)


# ---- request plumbing


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def token_cap(spec: ModelSpec, pressure: str) -> int | None:
    """The tightest `memory_pressure_max_tokens` cap of this level and the milder ones."""
    caps = spec.memory_pressure_max_tokens
    levels = LEVELS[1: LEVELS.index(pressure) + 1]
    found = [caps[lvl] for lvl in levels if lvl in caps]
    return min(found) if found else None


def sampling_for(req: ChatCompletionRequest, spec: ModelSpec,
                 pressure: str) -> protocol.SamplingParams:
    """Request values, else the model's configured defaults; max_tokens capped by pressure."""
    max_tokens = req.token_limit or spec.max_tokens
    cap = token_cap(spec, pressure)
    if cap is not None and cap < max_tokens:
        log.info("memory pressure %s: max_tokens %d capped to %d for model=%s", pressure,
                 max_tokens, cap, spec.id)
        max_tokens = cap
    return protocol.SamplingParams(
        max_tokens=max_tokens,
        temperature=spec.temp if req.temperature is None else req.temperature,
        top_p=spec.top_p if req.top_p is None else req.top_p,
        top_k=spec.top_k if req.top_k is None else req.top_k,
        min_p=spec.min_p if req.min_p is None else req.min_p,
        seed=req.seed,
        stop=req.stop_list,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
    )


class Call:
    """One request's way into a worker: lease, submit, wait for Started."""

    def __init__(self, state: AppState, spec: ModelSpec, request: protocol.Request) -> None:
        self.state = state
        self.spec = spec
        self.request = request
        self.stream: RequestStream | None = None
        self.t0 = time.monotonic()
        # The whole request (queue, load, generation) must end by then: 504 otherwise.
        self.deadline = self.t0 + spec.timeout_s
        self.queue_s: float | None = None
        self.ttft_s: float | None = None
        self._last_chunk_at = 0.0
        self._recorded = False

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

    async def next_chunk(self) -> tuple[str, int]:
        assert self.stream is not None
        text, tokens = await self._within_deadline(self.stream.next_chunk())
        now = time.monotonic()
        metrics = self.state.metrics
        if tokens and self.ttft_s is None:
            self.ttft_s = now - self.t0
        elif tokens and metrics is not None:
            metrics.inter_token(self.spec.id, (now - self._last_chunk_at) / tokens)
        if tokens:
            self._last_chunk_at = now
        return text, tokens

    def record(self, status: int, end: protocol.End | None = None,
               error: RouterError | None = None) -> None:
        """Metrics for this request, once, whichever way it ended."""
        metrics = self.state.metrics
        if self._recorded:
            return
        self._recorded = True
        log.info("chat.completions model=%s status=%d duration_ms=%.0f prompt_tokens=%d "
                 "completion_tokens=%d%s", self.spec.id, status,
                 (time.monotonic() - self.t0) * 1000, end.prompt_tokens if end else 0,
                 end.completion_tokens if end else 0, f" error={error.code}" if error else "")
        if metrics is None:
            return
        if error is not None:
            error.recorded = True  # the route's catch-all must not count it again
            metrics.rejected(self.spec.id, error.code)
        metrics.request_done(
            self.spec.id, "chat.completions", status, duration_s=time.monotonic() - self.t0,
            queue_s=self.queue_s, ttft_s=self.ttft_s,
            prompt_tokens=end.prompt_tokens if end else 0,
            completion_tokens=end.completion_tokens if end else 0,
            cached_tokens=end.cached_tokens if end else 0)

    async def _within_deadline(self, awaitable):
        try:
            async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                return await awaitable
        except TimeoutError:
            self.close()
            raise Timeout(f"the request exceeded its time limit of {self.spec.timeout_s:g}s "
                          f"(model '{self.spec.id}')") from None

    def close(self) -> None:
        """Cancel the request in its worker unless it already ended. Synchronous on purpose."""
        if self.stream is not None and not self.stream.done:
            self.state.broker.cancel(self.stream.rid)


def _usage(end: protocol.End) -> Usage:
    return Usage(prompt_tokens=end.prompt_tokens, completion_tokens=end.completion_tokens,
                 total_tokens=end.prompt_tokens + end.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=end.cached_tokens))


async def _collect(call: Call) -> tuple[str, protocol.End]:
    stream = await call.open()
    try:
        parts = []
        while True:
            text, _ = await call.next_chunk()
            parts.append(text)
            if stream.done:
                break
    finally:
        call.close()
    if stream.error is not None:
        raise stream.error
    assert stream.end is not None
    return "".join(parts), stream.end


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _complete(call: Call, request: Request, model: str) -> Response:
    work = asyncio.ensure_future(_collect(call))
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():  # the client left: stop generating for nobody
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        return Response(status_code=499)
    try:
        text, end = work.result()
    except RouterError as exc:
        call.record(exc.status, error=exc)
        raise
    call.record(200, end)
    body = ChatCompletion(
        id=f"chatcmpl-{call.request.rid:x}{secrets.token_hex(4)}", created=int(time.time()),
        model=model, choices=[Choice(0, AssistantMessage("assistant", text), end.finish_reason)],
        usage=_usage(end))
    return json_response(body)


async def _sse(call: Call, opening: asyncio.Future, model: str,
               include_usage: bool) -> AsyncIterator[bytes]:
    cid = f"chatcmpl-{call.request.rid:x}{secrets.token_hex(4)}"
    created = int(time.time())

    def chunk(delta: ChunkDelta, finish: str | None = None) -> bytes:
        return encode_sse(ChatCompletionChunk(cid, created, model,
                                              [ChunkChoice(0, delta, finish)]))

    interval = call.state.config.server.keepalive_interval_s
    try:
        while not opening.done():
            done, _ = await asyncio.wait({opening}, timeout=interval)
            if not done:
                yield SSE_KEEPALIVE
        try:
            stream: RequestStream = opening.result()
        except RouterError as exc:
            call.record(exc.status, error=exc)
            yield encode_sse_error(exc)
            return
        yield chunk(ChunkDelta(role="assistant", content=""))
        while True:
            try:
                text, _ = await call.next_chunk()
            except RouterError as exc:
                call.record(exc.status, error=exc)
                yield encode_sse_error(exc)
                return
            if text:
                yield chunk(ChunkDelta(content=text))
            if stream.done:
                break
        if stream.error is not None:
            call.record(stream.error.status, error=stream.error)
            yield encode_sse_error(stream.error)
            return
        assert stream.end is not None
        call.record(200, stream.end)
        yield chunk(ChunkDelta(), stream.end.finish_reason)
        if include_usage:
            yield encode_sse(ChatCompletionChunk(cid, created, model, [],
                                                 usage=_usage(stream.end)))
        yield SSE_DONE
    finally:
        if not opening.done():
            opening.cancel()
        call.close()


async def _stream(call: Call, model: str, include_usage: bool) -> Response:
    opening = asyncio.ensure_future(call.open())
    commit_after = call.state.config.server.stream_commit_after_s
    try:
        await asyncio.wait({opening}, timeout=commit_after)  # never raises, never cancels it
    except asyncio.CancelledError:
        opening.cancel()
        raise
    if opening.done() and opening.exception() is not None:
        exc = opening.exception()
        if isinstance(exc, RouterError):
            call.record(exc.status, error=exc)
        raise exc  # failed before Started: a real HTTP status
    return StreamingResponse(_sse(call, opening, model, include_usage),
                             media_type="text/event-stream", headers=SSE_HEADERS)


# ---- routes


async def chat_completions(request: Request) -> Response:
    try:
        return await _chat_completions(request)
    except RouterError as exc:
        metrics = app_state(request).metrics
        if metrics is not None and not getattr(exc, "recorded", False):
            metrics.rejected("", exc.code)  # no model label: it may be any string a client sent
            metrics.request_done("", "chat.completions", exc.status, duration_s=0.0)
        raise


async def _chat_completions(request: Request) -> Response:
    state = app_state(request)
    if state.shutting_down:
        raise ShuttingDown("the server is shutting down")
    body = await read_body(request, state.config.server.max_body_bytes)
    req: ChatCompletionRequest = decode_body(body, ChatCompletionRequest)
    check_supported(req)
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true",
                             param="stream_options")
    spec = state.supervisor.spec(req.model)
    call = Call(state, spec, protocol.Request(
        rid=state.broker.next_rid(), sampling=sampling_for(req, spec, state.supervisor.pressure),
        messages=message_dicts(req.messages),
        request_id=request_id.get()))
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await _stream(call, req.model, include_usage)
    return await _complete(call, request, req.model)


def _model_object(state: AppState, model_id: str) -> ModelObject:
    st = state.supervisor.state_of(model_id)
    owner = model_id.split("/", 1)[0] if "/" in model_id else "mlxrouter"
    return ModelObject(id=model_id, created=int(state.started_at), owned_by=owner,
                       loaded=st.value == "RUNNING", state=st.value,
                       path=state.supervisor.catalog.path_of(model_id) or "")


async def list_models(request: Request) -> Response:
    state = app_state(request)
    ids = state.supervisor.catalog.ids()
    return json_response(ModelList([_model_object(state, m) for m in ids]))


async def get_model(request: Request) -> Response:
    state = app_state(request)
    model_id = request.path_params["model_id"]
    if not state.supervisor.catalog.knows(model_id):
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
    return json_response(_model_object(state, model_id))


async def metrics_text(request: Request) -> Response:
    metrics = app_state(request).metrics
    if metrics is None:
        raise NotFound("metrics are not enabled")
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


async def openapi_json(request: Request) -> Response:
    return json_response(openapi_document())


async def health(request: Request) -> Response:
    state = app_state(request)
    status = "shutting_down" if state.shutting_down else "ok"
    return json_response({"status": status}, 503 if state.shutting_down else 200)


async def health_detail(request: Request) -> Response:
    state = app_state(request)
    return json_response({
        "status": "shutting_down" if state.shutting_down else "ok",
        "uptime_s": round(time.time() - state.started_at, 1),
        "in_flight": state.broker.in_flight,
        "workers": state.supervisor.status(),
        "memory": state.supervisor.memory_figures(),
    })


def build_app(state: AppState) -> Starlette:
    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/health", health_detail, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
    ]
    app = Starlette(routes=routes + admin_routes(), exception_handlers={
        RouterError: on_router_error,
        HTTPException: on_http_error,
        Exception: on_unexpected,
    }, middleware=[
        # Outermost first: a CORS preflight carries no key and must not meet the key check.
        *([Middleware(CORSMiddleware, allow_origins=state.config.server.cors_origins,
                      allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                      expose_headers=["x-request-id"])]
          if state.config is not None and state.config.server.cors_origins else []),
        Middleware(AccessMiddleware, state=state),
    ])
    app.state.router = state
    return app
