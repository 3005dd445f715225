"""Prompt rendering and output text handling for a worker: chat templates, stop strings.

Runs in a worker process (per-request code: an exception here fails only that request). Every
call into the tokenizer's template goes through here, since mlx-lm's wrapper API moves.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import InvalidRequest


def render_chat(tokenizer: Any, messages: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None = None, template: str | None = None,
                extra: dict[str, Any] | None = None) -> list[int]:
    """Token ids of the conversation rendered by the chat template: `template` (a configured
    named or file template) or else the model's own. Tools, earlier tool calls and tool
    results all go through the template, as the model was trained to see them."""
    if template is None and not getattr(tokenizer, "has_chat_template", False):
        raise InvalidRequest("this model has no chat template; use /v1/completions or set "
                             "a chat_template for it")
    from jinja2 import TemplateError

    kwargs = dict(extra or {})
    if tools:
        kwargs["tools"] = tools
    if template is not None:
        kwargs["chat_template"] = template
    try:
        ids = tokenizer.apply_chat_template(template_messages(messages),
                                            add_generation_prompt=True, tokenize=True, **kwargs)
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        # The template's own message (e.g. "roles must alternate") is what the user needs.
        raise InvalidRequest(f"the model's chat template rejected the messages: {exc}") from None
    return list(ids)


def check_template(template: Any, where: str) -> None:
    """A chat template that does not parse fails the model's load, naming where it came from
    (every request used to be a 400 blaming its messages). Parsed as transformers renders it
    (its extensions: `{% generation %}`, loop controls); named variants (a dict) each."""
    from jinja2 import TemplateSyntaxError

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # another transformers: rendering reports it, as before
        return
    variants = template.items() if isinstance(template, dict) else [("", template)]
    for name, source in variants:
        if not isinstance(source, str):
            continue
        try:
            _compile_jinja_template(source)
        except TemplateSyntaxError as exc:
            label = f"{where} ({name!r})" if name else where
            raise ValueError(f"the chat template of {label} does not parse: {exc} (line "
                             f"{exc.lineno})") from None


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates expect them: tool call arguments as objects (OpenAI
    sends JSON strings; templates render them with `tojson`)."""
    out = []
    for msg in messages:
        calls = msg.get("tool_calls")
        if calls:
            msg = {**msg, "tool_calls": [_call_for_template(c) for c in calls]}
        out.append(msg)
    return out


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass  # left as the string the client sent; templates print it as is
    return {**call, "function": fn}


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


class HeldLogprobs:
    """Per-token log probabilities released as their tokens' text is (StopText): a token whose
    text is held back keeps its entry until some of that text is shown, and when a stop string cuts
    the output, the tokens that only made the cut text lose theirs, so the entries match the
    content they came with (a stop "." no longer left a "." among the logprobs)."""

    def __init__(self) -> None:
        self._held: list[tuple[Any, int, int]] = []  # (entry, start, end) in the fed text
        self._fed = 0
        self._shown = 0

    def add(self, entry: Any, text: str) -> None:
        self._held.append((entry, self._fed, self._fed + len(text)))
        self._fed += len(text)

    def release(self, shown: str, cut: bool, final: bool) -> list[Any]:
        """The entries to send with `shown`, the text just let through; `cut`: a stop string
        ended the output there; `final`: the output ended and nothing is held back."""
        self._shown += len(shown)
        if cut:  # a token shows if any of its text does; those held after the cut never will
            out = [e for e, start, _ in self._held if start < self._shown]
            self._held = []
            return out
        if final:
            out, self._held = [e for e, _, _ in self._held], []
            return out
        n = 0  # a token goes with the first of its text shown (so " cap" of " capital"
        # carries its entry even when a possible stop string holds back "ital")
        while n < len(self._held) and (self._held[n][1] < self._shown
                                       or self._held[n][2] <= self._shown):
            n += 1
        out, self._held = [e for e, _, _ in self._held[:n]], self._held[n:]
        return out
