"""Constrained decoding with llguidance: response_format grammars and forced tool calls.

Two halves, one job (turn "the output must match X" into a token mask):

- Grammar builders (`grammar_for_response_format`, `grammar_for_tool_call`) run in the daemon
  or in a worker. They import llguidance lazily and never import mlx: a request with a schema
  llguidance cannot compile is a 400 that names the problem, before any worker sees it.
- `ConstraintFactory` runs in a worker, on the engine thread (it imports mlx). One per model;
  `processor(grammar)` gives a fresh per-sequence mlx-lm logits processor.

JSON is constrained to one layout (`{"a": 1, "b": [2, 3]}`: ", " and ": " separators, no other
whitespace). Why: free whitespace lets a weak model emit newlines forever, and this is the
layout models see most (Python's json.dumps) and what chat templates render for tool calls.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from mlxrouter.errors import ConstraintFailed, InvalidRequest

if TYPE_CHECKING:
    import mlx.core as mx
    import numpy as np

__all__ = [
    "ConstraintError",
    "ConstraintFactory",
    "GrammarProcessor",
    "grammar_for_response_format",
    "grammar_for_tool_call",
]

# JSON layout options for llguidance's schema compiler (see the module docstring).
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {},
                                 "additionalProperties": False}
_MAX_MESSAGE_CHARS = 600
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class ConstraintError(ConstraintFailed):
    """A constrained sequence went wrong inside the matcher (a token the grammar rejects, a
    grammar that cannot be built with this tokenizer): the request fails, the worker lives."""


# Daemon side (no mlx).


def grammar_for_response_format(response_format: Mapping[str, Any] | Any) -> str | None:
    """The llguidance grammar for an OpenAI `response_format`, or None for plain text.

    `json_object` allows any JSON object; `json_schema` compiles `json_schema.schema`. With
    `strict: true` a keyword llguidance does not implement is a 400 naming it; otherwise such
    keywords are ignored (llguidance's `lenient`) and the rest of the schema still holds.
    """
    rf = _builtins(response_format)
    if not isinstance(rf, Mapping):
        raise InvalidRequest("response_format must be an object", param="response_format")
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return _compile_schema(_ANY_OBJECT, strict=True, param="response_format")
    if kind != "json_schema":
        raise InvalidRequest(f"response_format.type '{kind}' is not supported; use 'text', "
                             "'json_object' or 'json_schema'", param="response_format.type")
    spec = rf.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if not isinstance(schema, Mapping):
        raise InvalidRequest("response_format.json_schema.schema must be a JSON schema object",
                             param="response_format.json_schema.schema")
    return _compile_schema(schema, strict=spec.get("strict") is True,
                           param="response_format.json_schema.schema")


def grammar_for_tool_call(tools: list[Mapping[str, Any]], choice: str | Mapping[str, Any],
                          start: str = "", end: str = "", *, max_calls: int = 1,
                          special_tokens: Mapping[str, int] | None = None,
                          args_key: str = "arguments") -> str:
    """A grammar for `start {"name": N, "arguments": A} end`, N an allowed tool, A valid
    against N's `parameters` (Hermes/Qwen: start="<tool_call>\\n", end="\\n</tool_call>").
    `args_key`: the arguments' key as the model's format writes it (Llama 3: "parameters").

    `choice` is "required" (any of the tools) or {"type": "function", "function": {"name"}}.
    Up to `max_calls` calls, separated by "\\n"; the default is exactly one, because a weak
    model that may add calls rarely stops adding them. Text in start/end that is a key of
    `special_tokens` (text -> id, see `ConstraintFactory.special_tokens`) must be emitted as
    that one token: llguidance never matches special tokens against literal text.
    """
    functions = _functions(tools)
    names = _allowed_names(functions, choice)
    if max_calls < 1:
        raise ValueError("max_calls must be at least 1")
    rules = []
    for i, name in enumerate(names):
        fn = functions[name]
        params = _arguments_schema(fn.get("parameters"))
        head = f'{{"name": {json.dumps(name)}, {json.dumps(args_key)}: '
        rules.append(f"call_{i}: {_lark_literal(head)} args_{i} \"}}\"")
        schema = _with_layout(params, strict=fn.get("strict") is True)
        rules.append(f"args_{i}: %json {json.dumps(schema)}")
    one = "call: " + " | ".join(f"call_{i}" for i in range(len(names)))
    wrapped = " ".join(p for p in (_lark_text(start, special_tokens), "call",
                                   _lark_text(end, special_tokens)) if p)
    calls = "tool_call"
    for _ in range(max_calls - 1):
        calls = f'tool_call ("\\n" {calls})?'
    lark = "\n".join([f"start: {calls}", f"tool_call: {wrapped}", one, *rules])
    grammar = _llguidance().LLMatcher.grammar_from_lark(lark)
    _validate(grammar, "tools", "a tool's parameters schema is not supported for "
                                "constrained decoding")
    return grammar


def _arguments_schema(params: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A function's arguments are a JSON object: a `parameters` schema that does not say its
    type (OpenAI's check takes it as "object") must not let a forced call write null."""
    if not params:
        return _NO_ARGUMENTS
    return params if "type" in params else {"type": "object", **params}


def check_tool_schemas(tools: list[Mapping[str, Any]], choice: Any = "required") -> None:
    """Every tool's `parameters` that a forced call (`choice`: "required", or a named
    function: that one only) may use, compiled as the call would compile it: a schema it
    cannot take (an unknown type, a remote $ref, a look-ahead pattern; with `strict`, a
    keyword llguidance does not implement) is a 400 naming the tool, before any worker is
    involved."""
    choice = _builtins(choice) if not isinstance(choice, str) else choice
    named = (choice.get("function") or {}).get("name") if isinstance(choice, Mapping) else None
    for i, tool in enumerate(_builtins(list(tools)) or []):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        params = fn.get("parameters") if isinstance(fn, Mapping) else None
        if not isinstance(params, Mapping) or (named is not None and fn.get("name") != named):
            continue  # no parameters; other shapes are _functions' (and msgspec's) to refuse
        param = f"tools[{i}].function.parameters"
        key = json.dumps([_arguments_schema(params), fn.get("strict") is True],
                         sort_keys=True, default=str)
        problem = _schema_problem(key, param)
        if problem:
            raise InvalidRequest(f"{param} (function '{fn.get('name')}') {problem}",
                                 param=param)


@functools.lru_cache(maxsize=512)
def _schema_problem(key: str, param: str) -> str:
    """Why a tool's schema (key: its JSON and strictness) cannot be compiled, else ''. Cached:
    agents send the same tools with every request."""
    schema, strict = json.loads(key)
    try:
        _compile_schema(schema, strict=strict, param=param)
    except InvalidRequest as exc:
        return exc.message.removeprefix(f"{param} ")  # "is not a valid JSON schema: ..."
    return ""


def _builtins(value: Any) -> Any:
    if isinstance(value, Mapping) or value is None:
        return value
    import msgspec

    return msgspec.to_builtins(value)


def _llguidance() -> Any:
    import llguidance

    return llguidance


def _with_layout(schema: Mapping[str, Any], *, strict: bool) -> dict[str, Any]:
    """The schema with our JSON layout and leniency as its top-level `x-guidance`."""
    own = schema.get("x-guidance")
    options = {**_LAYOUT, **(own if isinstance(own, Mapping) else {}), "lenient": not strict}
    return {**schema, "x-guidance": options}


def _compile_schema(schema: Mapping[str, Any], *, strict: bool, param: str) -> str:
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(_with_layout(schema, strict=strict))
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"{param} is not a valid JSON schema: {exc}", param=param) from None
    _validate(grammar, param, f"{param} is not supported for constrained decoding")
    return grammar


def _validate(grammar: str, param: str, prefix: str) -> None:
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        detail = "; ".join(_short(m) for m in messages)[:_MAX_MESSAGE_CHARS]
        raise InvalidRequest(f"{prefix}: {detail}", param=param)


def _functions(tools: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    functions: dict[str, Mapping[str, Any]] = {}
    for i, tool in enumerate(_builtins(list(tools)) or []):
        is_function = isinstance(tool, Mapping) and tool.get("type") == "function"
        fn = tool.get("function") if is_function else None
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise InvalidRequest(f"tools[{i}] must be a function tool with a name of 1-64 "
                                 "letters, digits, '_', '.', ':' or '-'", param=f"tools[{i}]")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object",
                                 param=f"tools[{i}].function.parameters")
        functions[name] = fn
    if not functions:
        raise InvalidRequest("tool_choice requires at least one tool", param="tools")
    return functions


def _allowed_names(functions: Mapping[str, Any], choice: str | Mapping[str, Any]) -> list[str]:
    choice = _builtins(choice) if not isinstance(choice, str) else choice
    if choice == "required":
        return list(functions)
    if isinstance(choice, Mapping):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if name in functions:
            return [name]
        raise InvalidRequest(f"tool_choice names function '{name}', which is not among the "
                             "tools", param="tool_choice")
    raise ValueError(f"tool_choice {choice!r} does not force a call; no grammar applies")


def _lark_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _lark_text(text: str, special_tokens: Mapping[str, int] | None) -> str:
    """`text` as lark items: its special tokens as `<[id]>`, the rest as string literals."""
    if not text:
        return ""
    specials = sorted(special_tokens or {}, key=len, reverse=True)
    if not specials:
        return _lark_literal(text)
    pattern = "(" + "|".join(re.escape(s) for s in specials if s) + ")"
    items = []
    for piece in re.split(pattern, text):
        if piece in (special_tokens or {}):
            items.append(f"<[{special_tokens[piece]}]>")
        elif piece:
            items.append(_lark_literal(piece))
    return " ".join(items)


# Worker side (imports mlx; engine thread only).

_COMPILED_KEPT = 8


_GRAMMAR_LINE = re.compile(r"^\s*\d+\s*\|")  # "  5 | args_0: %json {...}": a grammar listing


def _short(message: str | None) -> str:
    """llguidance's errors can carry the parser state and the whole grammar: keep the gist
    (the cause can be on a later line: "regex parse error:\n (a\n ^\nerror: unclosed
    group"), on one line."""
    if not message:
        return ""
    lines = [ln.strip() for ln in message.strip().splitlines()
             if ln.strip() and not _GRAMMAR_LINE.match(ln)]
    # the parser's state dump (tokens so far, timings) follows "<state>": not for clients
    text = " ".join(lines).split("<state>", 1)[0].strip()
    return text if len(text) <= 300 else text[:297] + "..."


@functools.cache
def _limits() -> Any:
    """llguidance's limits, but for items in a row of its parser: 2,000 by default, which
    an object of ~600 optional properties (20 KB of schema) passes at its first key, so
    the request failed after it started. A row is still bounded by the items one step may
    add (`step_max_items`, 50,000). An object of 1,000 properties with SmolLM2's tokenizer:
    masks of 1.1 ms (4.3 at most) a token."""
    import llguidance

    return llguidance.LLParserLimits(max_items_in_row=50_000)


class ConstraintFactory:
    """Builds per-sequence grammar processors for one model's tokenizer.

    The llguidance tokenizer costs ~1 s for a 50k vocabulary, so it is built on first use
    and kept. `tokenizer` is mlx-lm's TokenizerWrapper or a fast Hugging Face tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        inner = getattr(tokenizer, "_tokenizer", None)  # mlx-lm's wrapper holds the HF one
        self._hf = inner if hasattr(inner, "backend_tokenizer") else tokenizer
        eos = getattr(tokenizer, "eos_token_ids", None) or self._hf.eos_token_id
        eos = [eos] if isinstance(eos, int) else eos
        self.eos_token_ids: list[int] = sorted(int(t) for t in eos if t is not None)
        self._ll: Any = None
        self._special: dict[str, int] | None = None
        # Compiled matchers by grammar, copied per sequence: building one can take seconds
        # for a large schema, and n choices of one request share their grammar.
        self._compiled: dict[str, Any] = {}

    @property
    def ll_tokenizer(self) -> Any:
        if self._ll is None:
            import llguidance.hf

            self._ll = llguidance.hf.from_tokenizer(self._hf, eos_token=self.eos_token_ids)
        return self._ll

    @property
    def special_tokens(self) -> dict[str, int]:
        """Text -> id of the added tokens llguidance treats as special (<tool_call>, ...)."""
        if self._special is None:
            ll = self.ll_tokenizer
            added = getattr(self._hf, "added_tokens_decoder", {}) or {}
            self._special = {str(tok): int(i) for i, tok in added.items()
                             if i < ll.vocab_size and ll.is_special_token(int(i))}
        return self._special

    def tool_call_grammar(self, tools: list[Mapping[str, Any]], choice: str | Mapping[str, Any],
                          start: str = "", end: str = "", *, max_calls: int = 1,
                          args_key: str = "arguments") -> str:
        """`grammar_for_tool_call` with this tokenizer's special tokens for the markers."""
        return grammar_for_tool_call(tools, choice, start, end, max_calls=max_calls,
                                     special_tokens=self.special_tokens, args_key=args_key)

    def processor(self, grammar: str) -> GrammarProcessor:
        import llguidance

        base = self._compiled.pop(grammar, None)
        if base is None:
            base = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0,
                                        limits=_limits())
        self._compiled[grammar] = base  # most recent last
        while len(self._compiled) > _COMPILED_KEPT:
            del self._compiled[next(iter(self._compiled))]
        return GrammarProcessor(self, base.deep_copy())


class GrammarProcessor:
    """An mlx-lm logits processor `(tokens, logits) -> logits` for one sequence.

    `tokens` is whatever context mlx-lm keeps (the prompt, and with BatchGenerator any
    cached `all_tokens`, then the sampled tokens): the first call only notes its length,
    later calls feed the tokens past it to the matcher. Once the grammar is complete only
    eos is allowed, so generation stops. A matcher failure never raises here, since that
    would break the whole batch's step: the sequence is ended with eos and `error` is
    set; the engine calls `raise_for_error()` when the sequence finishes.

    Put it last among a sequence's processors: one after it could revive a masked token.
    BatchGenerator shows each token to the processors before it returns that token, so
    `accepted` is current when the sequence finishes. Not for speculative decoding (its
    context can shrink); one processor per sequence, never reused.
    """

    def __init__(self, factory: ConstraintFactory, matcher: Any) -> None:
        self._factory = factory
        self._matcher = matcher
        self.error: str | None = _short(matcher.get_error()) or None
        self._seen: int | None = None
        self._words: np.ndarray | None = None
        self._eos_only: mx.array | None = None

    @property
    def accepted(self) -> bool:
        """The tokens so far form a complete output (false when cut off by max_tokens)."""
        return self.error is None and self._matcher.is_accepting()

    @property
    def finished(self) -> bool:
        """Complete, and nothing but EOS may follow: `12` of an integer is accepted, yet the
        model may have been writing `12345`; `{"a": 1}` is finished."""
        return self.error is None and self._matcher.is_stopped()

    def precheck(self, n_logits: int, param: str = "response_format") -> None:
        """Compute the first mask now, so a grammar that cannot start (a schema llguidance
        accepts but cannot run with this tokenizer) is a 400 before the request starts; and,
        on a copy, the mask after the tokens the grammar forces (`{"key":`, `<tool_call>`),
        where llguidance's limits (a recursive required child, a huge repetition) bite."""
        if self.error is None:
            self._allowed(n_logits)
        if self.error is None:
            self.error = _short(self._probe_forced()) or None
        if self.error is not None:
            raise InvalidRequest(f"the output format cannot be enforced for this model: "
                                 f"{self.error}", param=param)

    def _probe_forced(self) -> str:
        import llguidance.numpy
        import numpy as np

        probe = self._matcher.deep_copy()
        forced = probe.compute_ff_tokens()
        if forced and probe.consume_tokens(forced):
            llguidance.numpy.fill_next_token_bitmask(probe, np.zeros_like(self._words))
        return probe.get_error() if probe.is_error() else ""

    def raise_for_error(self) -> None:
        if self.error is not None:
            first_line = self.error.strip().splitlines()[0][:_MAX_MESSAGE_CHARS]
            raise ConstraintError(f"constrained decoding failed: {first_line}")

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._seen is None:
            self._seen = int(tokens.size)
        elif self.error is None:
            self._consume(tokens[self._seen:].tolist())
            self._seen = int(tokens.size)
        if self.error is not None:
            return self._mask_eos_only(logits)
        allowed = self._allowed(logits.shape[-1])
        if allowed is None:
            return self._mask_eos_only(logits)
        import mlx.core as mx

        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))

    def _consume(self, new_tokens: list[int]) -> None:
        for token in new_tokens:
            if self._matcher.is_stopped() and token in self._factory.eos_token_ids:
                continue
            if not self._matcher.consume_token(token):
                self.error = _short(self._matcher.get_error()) or f"token {token} was rejected"
                return

    def _allowed(self, n_logits: int) -> mx.array | None:
        """The allowed-token mask as bools over the model's vocabulary (ids past the
        tokenizer's are never allowed); None when the matcher allows nothing."""
        import llguidance.numpy
        import mlx.core as mx
        import numpy as np

        if self._words is None:
            self._words = np.zeros((1, (self._factory.ll_tokenizer.vocab_size + 31) // 32),
                                   dtype=np.int32)
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._words)
        if self._matcher.is_error():
            self.error = _short(self._matcher.get_error()) or "the grammar failed"
            return None
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")
        if n_logits > bits.size:
            bits = np.concatenate([bits, np.zeros(n_logits - bits.size, dtype=np.uint8)])
        bits = bits[:n_logits]
        if not bits.any():
            self.error = "the grammar allows no further token"
            return None
        return mx.array(bits.view(np.bool_))

    def _mask_eos_only(self, logits: mx.array) -> mx.array:
        import mlx.core as mx

        if self._eos_only is None or self._eos_only.size != logits.shape[-1]:
            ids = mx.arange(logits.shape[-1])
            eos = mx.array(self._factory.eos_token_ids)
            self._eos_only = (ids[:, None] == eos[None, :]).any(axis=1)
        return mx.where(self._eos_only, logits, mx.array(-mx.inf, dtype=logits.dtype))

