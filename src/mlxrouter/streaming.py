"""Server-sent events: how chunks, keep-alives, errors and the end marker look on the wire.

Daemon side; imports no mlx.
"""

from __future__ import annotations

import msgspec

from .errors import RouterError, error_body

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"

_encoder = msgspec.json.Encoder()


def encode_sse(payload: msgspec.Struct) -> bytes:
    return b"data: " + _encoder.encode(payload) + b"\n\n"


def encode_sse_error(exc: RouterError) -> bytes:
    """After the first byte an error can only be an event; the openai client raises on it."""
    return encode_sse(error_body(exc))
