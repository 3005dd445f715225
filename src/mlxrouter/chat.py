"""Prompt rendering and output text handling for a worker: chat templates, stop strings.

Runs in a worker process (per-request code: an exception here fails only that request). Every
call into the tokenizer's template goes through here, since mlx-lm's wrapper API moves.
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidRequest


def render_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of the conversation rendered by the model's own chat template."""
    if not getattr(tokenizer, "has_chat_template", False):
        raise InvalidRequest("this model has no chat template; use /v1/completions or set "
                             "a chat_template for it")
    from jinja2 import TemplateError

    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        # The template's own message (e.g. "roles must alternate") is what the user needs.
        raise InvalidRequest(f"the model's chat template rejected the messages: {exc}") from None
    return list(ids)


def render_completion(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        return list(prompt)
    return list(tokenizer.encode(prompt))


class StopText:
    """Finds stop strings in streamed text and holds back what could be the start of one.

    The stop string itself is never emitted; text is held back only as long as it may still
    become a stop string (at most the longest stop string minus one character).
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        self._buf += text
        hits = [i for i in (self._buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._buf = self._buf[: min(hits)], ""
            return out, True
        keep = self._partial_len()
        cut = len(self._buf) - keep
        out, self._buf = self._buf[:cut], self._buf[cut:]
        return out, False

    def _partial_len(self) -> int:
        """Length of the longest tail of the buffer that starts some stop string."""
        buf = self._buf
        for n in range(min(len(buf), max(len(s) for s in self._stops) - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out
