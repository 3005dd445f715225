"""Who may call what, and which request a log line is about: ASGI middleware of the gateway.

Runs in the daemon; imports no mlx. API keys (`Authorization: Bearer`, constant-time compare)
guard /v1/* and /metrics when configured; /health stays open. /admin/* needs the admin key when
one is set, else answers loopback clients only. Every request gets an id (the client's
`X-Request-ID` if sane, else a new one) that is echoed back and stamped on every log line
written while handling it. Keys never reach a log.
"""

from __future__ import annotations

import contextvars
import hmac
import ipaddress
import logging
import re
import secrets
from typing import Any
from urllib.parse import urlsplit

import msgspec
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import (Forbidden, InvalidRequest, RouterError, Unauthorized, error_body,
                     error_headers)

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# The API's description is not secret, and a browser cannot send a bearer key when it loads a
# page: the docs pages, their assets and /openapi.json are open like /health.
_OPEN_PATHS = ("/health", "/openapi.json", "/docs", "/redoc")
_OPEN_PREFIXES = ("/docs/",)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record (for the `%(request_id)s` format field)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def _is_loopback(host: str | None) -> bool:
    try:
        address = ipaddress.ip_address(host) if host is not None else None
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # an IPv4 client of a dual-stack ("::") socket
    return address is not None and address.is_loopback


def _from_this_machine(scope: Scope) -> bool:
    """A loopback client. (Not one from the address the daemon is bound to: a reverse proxy on
    this machine connects from there for every remote client behind it.)"""
    return _is_loopback((scope.get("client") or (None,))[0])


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _matches(token: str | None, keys: list[str]) -> bool:
    if token is None:
        return False
    found = False
    for key in keys:  # compare against every key: timing says nothing about which matched
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _loopback_origin(origin: str) -> bool:
    host = urlsplit(origin).hostname or ""
    return host == "localhost" or _is_loopback(host)


def _check_browser(scope: Scope, cors_origins: list[str], admin: bool) -> None:
    """A web page the user visits can make the browser call us (CSRF, DNS rebinding): a
    request carrying an Origin must come from an allowed origin; /admin from none at all."""
    origin = _header(scope, b"origin")
    if origin is None:
        return
    if admin:
        raise Forbidden("/admin does not accept requests from web pages")
    if "*" in cors_origins or origin in cors_origins or _loopback_origin(origin):
        return
    raise Forbidden(f"origin {origin} is not allowed (add it to cors_origins)")


def _check_host(scope: Scope) -> None:
    """DNS rebinding: loopback trust needs a loopback Host header too."""
    host = _header(scope, b"host") or ""
    name = urlsplit(f"//{host}").hostname or ""
    if name != "localhost" and not _is_loopback(name):
        raise Forbidden(f"/admin is only reachable as localhost, not as {host!r}, unless "
                        f"an admin key is configured")


def check_access(scope: Scope, api_keys: list[str], admin_key: str | None,
                 cors_origins: list[str] = ()) -> None:
    path: str = scope["path"]
    if path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES):
        return
    token = _bearer(scope)
    admin = path.startswith("/admin")
    _check_browser(scope, list(cors_origins), admin)
    if admin:
        if admin_key:
            if not _matches(token, [admin_key]):
                raise Unauthorized("a valid admin key is required for /admin")
        elif not _from_this_machine(scope):
            client = (scope.get("client") or ("?",))[0]
            raise Forbidden(f"/admin is only reachable over loopback (this request came "
                            f"from {client}) unless an admin key is configured (admin_key, "
                            f"or MLXROUTER_ADMIN_KEY)")
        else:
            _check_host(scope)
        return
    if api_keys and not _matches(token, api_keys):
        raise Unauthorized("Incorrect API key provided" if token else
                           "Missing API key: send 'Authorization: Bearer <key>'")


# The endpoints whose answers mlxrouter_requests_total counts (gateway._counted).
_COUNTED_PATHS = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions"}


class AccessMiddleware:
    """Keys are read from the live config on every request, so a reload applies at once."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = _client_request_id(scope) or f"req-{secrets.token_hex(8)}"
        token = request_id.set(rid)
        try:
            try:
                server = self.state.config.server
                check_access(scope, server.api_keys, server.admin_key, server.cors_origins)
            except RouterError as exc:  # counted as the endpoints count their refusals
                metrics = getattr(self.state, "metrics", None)
                if metrics is not None and scope["path"].startswith("/v1/"):  # the API's
                    # clients; not /admin (ctl) nor /metrics (a scraper's key)
                    metrics.rejected("", exc.code)
                    endpoint = _COUNTED_PATHS.get(scope["path"].rstrip("/"))
                    if endpoint is not None:
                        metrics.request_done("", endpoint, exc.status, duration_s=0.0)
                return await _send_error(send, exc, rid)
            self.state.requests_in_progress += 1
            try:
                await self.app(scope, receive, _with_request_id(send, rid))
            finally:
                self.state.requests_in_progress -= 1
        finally:
            request_id.reset(token)


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1").strip()
            return text if _SANE_ID.match(text) else None
    return None


def _with_request_id(send: Send, rid: str) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()),
                                              (b"x-request-id", rid.encode())]}
        await send(message)

    return wrapped


async def _send_error(send: Send, exc: RouterError, rid: str) -> None:
    body = msgspec.json.encode(error_body(exc))
    headers = [(b"content-type", b"application/json"), (b"x-request-id", rid.encode()),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error_headers(exc).items()]
    if exc.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class CORS(CORSMiddleware):
    """Starlette's CORS, with a refused preflight in OpenAI's error shape (it answered a
    text/plain "Disallowed CORS origin"): 403 for an origin not in cors_origins, as a request
    from it gets, 400 for a method or headers not allowed."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        failures = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        origin = request_headers.get("origin", "")
        exc: RouterError = (
            Forbidden(f"origin {origin} is not allowed (add it to cors_origins)")
            if "origin" in failures.split(", ") else
            InvalidRequest(f"CORS preflight refused: {failures} not allowed"))
        headers = {k: v for k, v in response.headers.items()
                   if k.lower().startswith("access-control-") or k.lower() == "vary"}
        return JSONResponse(msgspec.to_builtins(error_body(exc)), exc.status,
                            {**headers, **error_headers(exc)})
