"""The OpenAPI document of the daemon's HTTP API, generated from the msgspec Structs it speaks.

Daemon side; imports no mlx. Bodies come from `msgspec.json.schema_components`, so the schema
cannot drift from what the handlers decode and encode; this module only lists the routes.
"""

from __future__ import annotations

from typing import Any

import msgspec

from . import __version__
from .admin import ActionResult, LogChunk, StatusBody
from .errors import ErrorBody
from .schemas import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                      CompletionRequest, ModelList, ModelObject, TextCompletion)

_REF = "#/components/schemas/{name}"

# (method, path, summary, request body type, response type, tag, path parameters)
_ROUTES: list[tuple[str, str, str, type | None, type | None, str, tuple[str, ...]]] = [
    ("post", "/v1/chat/completions", "Create a chat completion (SSE when stream is true)",
     ChatCompletionRequest, ChatCompletion, "openai", ()),
    ("post", "/v1/completions", "Create a text completion (SSE when stream is true)",
     CompletionRequest, TextCompletion, "openai", ()),
    ("get", "/v1/models", "List the models this server can serve", None, ModelList,
     "openai", ()),
    ("get", "/v1/models/{model_id}", "One model (ids may contain '/')", None, ModelObject,
     "openai", ("model_id",)),
    ("get", "/health", "Liveness: 200 while serving, 503 while shutting down", None, None,
     "health", ()),
    ("get", "/v1/health", "Workers, their states and memory figures", None, None, "health",
     ()),
    ("get", "/metrics", "Prometheus metrics (text format)", None, None, "health", ()),
    ("get", "/openapi.json", "This document", None, None, "health", ()),
    ("get", "/docs", "This document as Swagger UI (assets served locally)", None, None, "docs",
     ()),
    ("get", "/redoc", "This document as ReDoc (assets served locally)", None, None, "docs", ()),
    ("get", "/docs/assets/{name}", "A Swagger UI / ReDoc asset", None, None, "docs",
     ("name",)),
    ("get", "/admin/status", "Daemon and every model's worker state", None, StatusBody,
     "admin", ()),
    ("post", "/admin/models/{model_id}/start", "Load a model (clears FATAL)", None,
     ActionResult, "admin", ("model_id",)),
    ("post", "/admin/models/{model_id}/stop", "Unload a model, draining its requests first",
     None, ActionResult, "admin", ("model_id",)),
    ("post", "/admin/models/{model_id}/restart", "Stop, then start a model", None,
     ActionResult, "admin", ("model_id",)),
    ("get", "/admin/models/{model_id}/log", "A chunk of a worker's log (stream=stdout|stderr, "
     "offset, tail)", None, LogChunk, "admin", ("model_id",)),
    ("post", "/admin/reload", "Re-read the configuration; refused whole on any error", None,
     None, "admin", ()),
    ("post", "/admin/shutdown", "Drain and stop the daemon", None, None, "admin", ()),
]

_ERRORS = {"400": "Invalid request", "401": "Missing or wrong key", "404": "Unknown model",
           "429": "Queue full", "502": "The worker died", "503": "Server state (loading "
           "failed, no memory, shutting down)", "504": "Timed out"}


def _operation(summary: str, body: type | None, response: type | None, tag: str,
               params: tuple[str, ...], refs: dict[type, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": {}}
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True,
                             "schema": {"type": "string"}} for p in params]
    if body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": refs[body]}}}
    ok: dict[str, Any] = {"description": "OK"}
    if response is not None:
        ok["content"] = {"application/json": {"schema": refs[response]}}
    if body is ChatCompletionRequest:
        ok.setdefault("content", {})["text/event-stream"] = {
            "schema": refs[ChatCompletionChunk]}
    elif body is CompletionRequest:
        ok.setdefault("content", {})["text/event-stream"] = {"schema": refs[TextCompletion]}
    op["responses"]["200"] = ok
    for status, text in _ERRORS.items():
        op["responses"][status] = {"description": text, "content": {
            "application/json": {"schema": refs[ErrorBody]}}}
    return op


def openapi_document() -> dict[str, Any]:
    types = [ChatCompletionRequest, ChatCompletion, ChatCompletionChunk, CompletionRequest,
             TextCompletion, ModelList,
             ModelObject, StatusBody, ActionResult, LogChunk, ErrorBody]
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    refs = dict(zip(types, schemas))
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, body, response, tag, params in _ROUTES:
        paths.setdefault(path, {})[method] = _operation(summary, body, response, tag, params,
                                                        refs)
    return {
        "openapi": "3.1.0",
        "info": {"title": "mlxrouter", "version": __version__,
                 "description": "OpenAI-compatible inference server for MLX models. /admin/* "
                                "is reachable from loopback only unless an admin key is set."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
