"""Streaming wire formats: how chunks, keep-alives, errors and the end look on the wire.

Daemon side; imports no mlx. `sse` is OpenAI's (`data: {chunk}` ... `data: [DONE]`); the seed
project's `json_lines` (one chunk per line) and `json_array` (one JSON array, written as it
grows) carry the same chunk objects. After the first byte an error can only be one more chunk:
`{"error": {...}}` (the openai client raises on it in SSE).
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
    return encode_sse(error_body(exc))


class StreamFormat:
    """One streaming format: media type, framing of each chunk, start and end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.media_type = {"sse": "text/event-stream", "json_lines": "application/x-ndjson",
                           "json_array": "application/json"}[name]
        self._count = 0

    def start(self) -> bytes:
        return b"[" if self.name == "json_array" else b""

    def chunk(self, payload: msgspec.Struct) -> bytes:
        body = _encoder.encode(payload)
        self._count += 1
        if self.name == "sse":
            return b"data: " + body + b"\n\n"
        if self.name == "json_lines":
            return body + b"\n"
        return (b"," if self._count > 1 else b"") + body

    def error(self, exc: RouterError) -> bytes:
        return self.chunk(error_body(exc))

    def keepalive(self) -> bytes:
        """SSE comments; whitespace is valid between JSON lines and array elements."""
        return SSE_KEEPALIVE if self.name == "sse" else b"\n"

    def end(self, failed: bool = False) -> bytes:
        """The stream's last bytes. After an error event SSE sends no [DONE] (a client that
        takes [DONE] for success must not take a failed stream for a whole one); a JSON
        array still closes."""
        if failed and self.name == "sse":
            return b""
        return {"sse": SSE_DONE, "json_lines": b"", "json_array": b"]"}[self.name]
