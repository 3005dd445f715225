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
from pathlib import Path
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from . import library, protocol
from .access import CORS, AccessMiddleware, request_id
from .admin import admin_routes
from .calls import Group, token_cap
from .discovery import NOT_ON_DISK, configured_capabilities, served_context
from .docs_pages import docs_routes
from .config import ModelSpec
from .errors import (BodyTimeout, BodyTooLarge, ClientGone, InvalidRequest, MethodNotAllowed,
                     ModelNotFound, NotFound, RouterError, ShuttingDown, error_body,
                     error_headers)
from .openapi import openapi_document
from .runtime import AppState, Interrupted, app_state, json_response, unless_set
from .schemas import (ChatCompletionRequest, ChatShape, CompletionRequest, GenerationParams,
                      ModelList, ModelObject, NamedToolChoice, TextShape, check_completion,
                      check_supported, decode_body, message_dicts, tool_dicts)
from .vision import collect_media, is_vision_model, refuse_for_vision

log = logging.getLogger(__name__)


# ---- errors: the one place exceptions become OpenAI error JSON


async def on_router_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RouterError)
    if exc.status >= 500:
        log.warning("request failed status=%d code=%s: %s", exc.status, exc.code, exc.message)
    return json_response(error_body(exc), exc.status, error_headers(exc))


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = MethodNotAllowed if exc.status_code == 405 else NotFound
    err = kind(f"{request.method} {request.url.path}: {exc.detail}")
    err.status = exc.status_code  # 404 or 405 (with its Allow header)
    return json_response(error_body(err), exc.status_code, exc.headers)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    ref = secrets.token_hex(6)
    log.error("unhandled error ref=%s path=%s", ref, request.url.path, exc_info=exc)
    err = RouterError(f"internal server error (ref {ref})")
    return json_response(error_body(err), 500)


# ---- request plumbing


async def read_body(request: Request, limit: int, timeout_s: float = 60.0) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s "
                          "(request_body_timeout_s)") from None
    except ClientDisconnect:  # a 499, not an unhandled error with two tracebacks
        raise ClientGone("the client closed the connection while sending its request") from None
    return b"".join(chunks)


def sampling_for(req: GenerationParams, spec: ModelSpec, pressure: str,
                 choice: int = 0) -> protocol.SamplingParams:
    """Request values, else the model's configured defaults; max_tokens capped by pressure.
    Choice i of a seeded n > 1 request samples with seed + i: reproducible, not identical."""
    max_tokens = asked = req.token_limit or spec.max_tokens
    cap = token_cap(spec, pressure)
    if cap is not None and cap < max_tokens:
        log.info("memory pressure %s: max_tokens %d capped to %d for model=%s", pressure,
                 max_tokens, cap, spec.id)
        max_tokens = cap
    if isinstance(req, ChatCompletionRequest):
        logprobs, top = bool(req.logprobs), req.top_logprobs or 0
    else:
        logprobs, top = req.logprobs is not None, req.logprobs or 0
    return protocol.SamplingParams(
        max_tokens=max_tokens,
        fit_to_context=req.token_limit is None,
        asked_max_tokens=asked if req.token_limit is not None and asked > max_tokens else 0,
        temperature=spec.temp if req.temperature is None else req.temperature,
        top_p=spec.top_p if req.top_p is None else req.top_p,
        top_k=spec.top_k if req.top_k is None else req.top_k,
        min_p=spec.min_p if req.min_p is None else req.min_p,
        seed=None if req.seed is None else req.seed + choice,
        stop=req.stop_list,
        repetition_penalty=(spec.repetition_penalty if req.repetition_penalty is None
                            else req.repetition_penalty),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
        logprobs=logprobs,
        top_logprobs=top,
    )


async def _respond(group: Group, req: GenerationParams, request: Request) -> Response:
    if req.stream:
        return await group.stream(bool(req.stream_options and req.stream_options.include_usage),
                                  request)
    return await group.complete(request)


def _counted(endpoint: str):
    """Requests that fail before a Group exists are counted here, without a model label
    (the model may be any string a client sent)."""
    def wrap(handler):
        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RouterError as exc:
                metrics = app_state(request).metrics
                if metrics is not None and not getattr(exc, "recorded", False):
                    metrics.rejected("", exc.code)
                    metrics.request_done("", endpoint, exc.status, duration_s=0.0)
                raise
        return route
    return wrap


async def _admit(request: Request, type_: type) -> tuple[AppState, Any, ModelSpec]:
    state = app_state(request)
    if state.shutting_down:
        raise ShuttingDown("the server is shutting down")
    server = state.config.server
    try:  # SIGTERM while the body arrives: not let in, and not waited for
        body = await unless_set(
            read_body(request, server.max_body_bytes, server.request_body_timeout_s),
            state.stopping)
    except Interrupted:
        raise ShuttingDown("the server is shutting down") from None
    if state.shutting_down:
        raise ShuttingDown("the server is shutting down")
    req = decode_body(body, type_)
    return state, req, state.supervisor.spec(req.model)


# apply_chat_template's own parameters: a request may not set them through template variables.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "tokenize",
    "add_generation_prompt", "continue_final_message", "return_dict", "return_tensors",
    "return_assistant_tokens_mask", "padding", "truncation", "max_length", "tokenizer_kwargs",
    "self", "kwargs", "sanitize_control_tokens",
    "conversations",  # transformers' render_jinja_template's own
})


def template_kwargs(req: ChatCompletionRequest) -> dict[str, Any]:
    kwargs = dict(req.chat_template_kwargs or {})
    bad = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if bad:
        raise InvalidRequest(f"chat_template_kwargs may not set {', '.join(bad)}",
                             param="chat_template_kwargs")
    if req.reasoning_effort is not None:
        kwargs["reasoning_effort"] = req.reasoning_effort
    return kwargs


async def response_grammar(req: ChatCompletionRequest) -> str | None:
    """response_format as a grammar for the worker; a schema llguidance cannot take is a 400
    here, before any worker is involved. Compiled off the event loop (large schemas)."""
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    from .constrain import grammar_for_response_format

    return await asyncio.to_thread(grammar_for_response_format, msgspec.to_builtins(rf))


@_counted("chat.completions")
async def chat_completions(request: Request) -> Response:
    state, req, spec = await _admit(request, ChatCompletionRequest)
    check_supported(req)
    if is_vision_model(spec):  # refused before an image is fetched or the model is loaded
        rf = req.response_format
        refuse_for_vision(protocol.Request(
            rid=0, sampling=protocol.SamplingParams(max_tokens=1, logprobs=bool(req.logprobs)),
            tools=tool_dicts(req), template_kwargs=template_kwargs(req),
            grammar="response_format" if rf is not None and rf.type != "text" else None))
    messages = message_dicts(req.messages)
    media = await collect_media(state.config.server, spec, req.messages, req.n)  # vision.py
    tools = tool_dicts(req)
    if tools is not None and not (spec.enable_function_calling and spec.supports_tools
                                  is not False):
        raise InvalidRequest(f"model '{spec.id}' does not support tool calling (it is turned "
                             f"off in its configuration)", param="tools")
    if tools and (req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)):
        # a forced call compiles the tools' schemas: what it cannot take is a 400 here, not
        # after the model's load (auto uses no grammar and takes any schema)
        from .constrain import check_tool_schemas

        await asyncio.to_thread(check_tool_schemas, tools, req.tool_choice)
    grammar = await response_grammar(req)
    choice = req.tool_choice if req.tool_choice not in (None, "none") else "auto"
    pressure = state.supervisor.pressure
    requests = [protocol.Request(
        rid=state.broker.next_rid(), sampling=sampling_for(req, spec, pressure, i),
        messages=messages, request_id=request_id.get(), tools=tools,
        tool_choice=msgspec.to_builtins(choice),
        parallel_tool_calls=req.parallel_tool_calls is not False, grammar=grammar,
        template_kwargs=template_kwargs(req), media=media) for i in range(req.n)]
    group = Group(state, spec, requests, ChatShape(logprobs=bool(req.logprobs)), req.model,
                  [0] * req.n, [""] * req.n)
    return await _respond(group, req, request)


@_counted("completions")
async def completions(request: Request) -> Response:
    state, req, spec = await _admit(request, CompletionRequest)
    prompts = check_completion(req)
    pressure = state.supervisor.pressure
    requests, prompt_of, prefix = [], [], []
    for p, prompt in enumerate(prompts):
        for i in range(req.n):
            requests.append(protocol.Request(
                rid=state.broker.next_rid(), sampling=sampling_for(req, spec, pressure, i),
                prompt=prompt, request_id=request_id.get()))
            prompt_of.append(p)
            prefix.append(prompt if req.echo and isinstance(prompt, str) else "")
    if requests and is_vision_model(spec):  # before the model is loaded for it
        refuse_for_vision(requests[0])
    group = Group(state, spec, requests, TextShape(req.logprobs, prefix), req.model,
                  prompt_of, prefix)
    return await _respond(group, req, request)


def _model_object(state: AppState, model_id: str) -> ModelObject:
    st = state.supervisor.state_of(model_id)
    owner = model_id.split("/", 1)[0] if "/" in model_id else "mlxrouter"
    info = state.supervisor.catalog.info(model_id)
    estimate, spec = None, None
    if info is not None and info.usable:
        try:
            spec = state.supervisor.spec(model_id)
            estimate = state.supervisor.need_bytes(spec)
        except RouterError:
            estimate = None
    if info is None and state.supervisor.downloadable(model_id):
        extra = dict(reason=library.PULLED_ON_FIRST_REQUEST)
    elif info is None or not info.usable:
        extra = dict(usable=False, source=info.source if info is not None else "config",
                     reason=info.reason if info is not None else NOT_ON_DISK)
    else:
        extra = dict(
            source=info.source, architecture=info.architecture, quantization=info.quantization,
            parameters=info.parameters, weights_bytes=info.weights_bytes,
            context_length=(served_context(spec) if spec is not None
                            else info.context_length),
            capabilities=(configured_capabilities(info.capabilities, spec) if spec is not None
                          else list(info.capabilities)))
    return ModelObject(id=model_id, created=int(state.started_at), owned_by=owner,
                       loaded=st.value == "RUNNING", state=st.value,
                       path=_model_path(state, model_id),
                       estimated_memory_bytes=estimate, **extra)


def _model_path(state: AppState, model_id: str) -> str:
    """Where the model is loaded from: its configured path, else where discovery found it."""
    configured = state.config.models.get(model_id)
    if configured is not None and configured.path:
        return str(Path(configured.path).expanduser())
    return state.supervisor.catalog.path_of(model_id) or ""


async def list_models(request: Request) -> Response:
    state = app_state(request)
    ids = state.supervisor.catalog.ids()
    return json_response(ModelList([_model_object(state, m) for m in ids]))


async def get_model(request: Request) -> Response:
    state = app_state(request)
    model_id = request.path_params["model_id"]
    if not state.supervisor.catalog.knows(model_id):
        raise ModelNotFound(state.supervisor.not_found_message(model_id), param="model")
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
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/health", health_detail, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        *docs_routes(),
    ]
    app = Starlette(routes=routes + admin_routes(), exception_handlers={
        RouterError: on_router_error,
        HTTPException: on_http_error,
        Exception: on_unexpected,
    }, middleware=[
        # Outermost first: a CORS preflight carries no key and must not meet the key check.
        *([Middleware(CORS, allow_origins=state.config.server.cors_origins,
                      allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                      expose_headers=["x-request-id"])]
          if state.config is not None and state.config.server.cors_origins else []),
        Middleware(AccessMiddleware, state=state),
    ])
    app.state.router = state
    return app
