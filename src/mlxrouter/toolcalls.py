"""Model output -> OpenAI tool calls, incrementally: one `ToolCallStream` per sequence.

Runs in the worker, on the engine thread, after the reasoning splitter: it is fed decoded text
piece by piece (special-token markers included as text) and hands back what is safe to show
(`content`), harmony's analysis channel (`reasoning`) and tool-call deltas. Call bodies are
parsed by mlx-lm's own parsers (`mlx_lm.tool_parsers.*`, imported lazily by `format_by_name`);
this module only finds where calls start and end, which mlx-lm does inside its server. The few
families mlx-lm has no parser for (harmony, phi4, deepseek_v3) are parsed here.

Invariants: markup of a parsed call never reaches `content`; text that is not a call is never
lost (a call that does not parse is released as content, raw); content is held back only while
its tail could still start a call, plus whitespace that is dropped if a call follows it.
Imports no MLX itself; the daemon has no reason to import it.
"""

from __future__ import annotations

import ast
import importlib
import json
import logging
import re
import secrets
from collections.abc import Callable
from typing import Any, Literal

import msgspec

log = logging.getLogger(__name__)

Style = Literal["marked", "llama3_json", "pythonic", "harmony"]


class ToolFormat(msgspec.Struct, frozen=True):
    """How one model family writes tool calls.

    style "marked": calls sit between `start` and `end`; an empty `end` means a call runs to the
    next `start` or to the end of the output (Mistral's `[TOOL_CALLS]`). "llama3_json" and
    "pythonic" have no markers: the whole output is the call. "harmony" routes gpt-oss channels.
    `parse(body, tools)` turns one call body into {"name", "arguments"} or a list of them and
    raises ValueError (or SyntaxError, KeyError...) on anything else.
    """

    name: str
    style: Style
    parse: Callable[[str, Any], Any]
    start: str = ""
    end: str = ""


class ToolCallDelta(msgspec.Struct, frozen=True):
    """One OpenAI `tool_calls` delta. id and name come with a call's first delta only; the
    `arguments` fragments of one index concatenate to a JSON object."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


class Parsed(msgspec.Struct, frozen=True):
    """What one `feed`/`finish` produced: text to show, harmony's analysis text (always "" for
    other families: their reasoning is split off before this module) and call deltas."""

    content: str = ""
    reasoning: str = ""
    calls: list[ToolCallDelta] = []


# format name -> (style, mlx_lm.tool_parsers module or None)
_FORMATS: dict[str, tuple[Style, str | None]] = {
    "hermes": ("marked", "json_tools"),
    "qwen3_coder": ("marked", "qwen3_coder"),
    "mistral": ("marked", "mistral"),
    "lfm2": ("marked", "pythonic"),
    "llama3_json": ("llama3_json", "json_tools"),
    "pythonic": ("pythonic", "pythonic"),
    "harmony": ("harmony", None),
    "phi4": ("marked", None),
    "deepseek_v3": ("marked", None),
}
_ALIASES = {"json_tools": "hermes", "qwen": "hermes", "qwen2_5": "hermes", "llama3": "llama3_json",
            "llama4_pythonic": "pythonic", "gpt_oss": "harmony", "gpt-oss": "harmony",
            "phi4_mini": "phi4", "deepseek": "deepseek_v3", "deepseek_r1": "deepseek_v3",
            "deepseek_v31": "deepseek_v3"}
# mlx-lm parsers without an entry above still work as "marked" formats under their own name.
_MLX_ONLY = ("function_gemma", "gemma4", "glm47", "kimi_k2", "kimi_k3", "laguna", "longcat",
             "minicpm5", "minimax_m2", "muse_spark")
KNOWN_FORMATS: tuple[str, ...] = tuple(_FORMATS) + tuple(_ALIASES) + _MLX_ONLY

# Markers of the families parsed here, as templates.TOOL_CALL_TAGS has them (a test keeps the two
# equal). DeepSeek's are single tokens spelled with U+FF5C (fullwidth bar) and U+2581 ("▁"),
# not "|" and "_".
_PHI4_START, _PHI4_END = "<|tool_call|>", "<|/tool_call|>"
_DS_CALLS_BEGIN = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
_DS_CALLS_END = "<\uff5ctool\u2581calls\u2581end\uff5c>"
_DS_CALL_BEGIN = "<\uff5ctool\u2581call\u2581begin\uff5c>"
_DS_CALL_END = "<\uff5ctool\u2581call\u2581end\uff5c>"
_DS_SEP = "<\uff5ctool\u2581sep\uff5c>"
_MARKERS = {"phi4": (_PHI4_START, _PHI4_END), "deepseek_v3": (_DS_CALLS_BEGIN, _DS_CALLS_END)}

# Chat-template text that names a family mlx-lm does not detect (checked in this order). Phi-4's
# own template only declares tools (<|tool|>...<|/tool|>); Granite also writes <|tool_call|> but
# never <|tool|>, so that is what tells Phi apart.
_SNIFF: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("harmony", ("<|channel|>", "<|call|>")),
    ("pythonic", ("func_name1(",)),
    ("llama3_json", ('"parameters": dictionary of argument name',)),
    ("llama3_json", ("<|python_tag|>", '"parameters"')),
    ("deepseek_v3", (_DS_CALLS_BEGIN, _DS_SEP)),
    ("phi4", ("<|tool|>", "<|/tool|>", "<|assistant|>")),
)


def format_by_name(name: str) -> ToolFormat:
    """The format for an explicit per-model setting (`tool_call_format`); ValueError if unknown."""
    name = _ALIASES.get(name, name)
    if name in _FORMATS:
        style, module_name = _FORMATS[name]
    elif name in _MLX_ONLY:
        style, module_name = "marked", name
    else:
        raise ValueError(f"unknown tool-call format {name!r}; known: {', '.join(KNOWN_FORMATS)}")
    if module_name is None:
        start, end = _MARKERS.get(name, ("", ""))
        return ToolFormat(name=name, style=style, parse=_OWN_PARSERS[name], start=start, end=end)
    module = importlib.import_module(f"mlx_lm.tool_parsers.{module_name}")
    if style == "marked":
        return ToolFormat(name=name, style=style, parse=module.parse_tool_call,
                          start=module.tool_call_start, end=module.tool_call_end or "")
    if style == "llama3_json":
        return ToolFormat(name=name, style=style, parse=_parse_llama3)
    return ToolFormat(name=name, style=style, parse=module.parse_tool_call)


def detect_format(tokenizer: Any) -> ToolFormat | None:
    """The format of a loaded mlx-lm TokenizerWrapper: mlx-lm's own choice (tool_call_start,
    tool_call_end, tool_parser) when it made one, else a family its chat template names."""
    parser = getattr(tokenizer, "tool_parser", None)
    start = getattr(tokenizer, "tool_call_start", None)
    if parser is not None and start:
        module = getattr(parser, "__module__", "") or ""
        short = module.rsplit(".", 1)[-1]
        name = {"json_tools": "hermes", "pythonic": "lfm2"}.get(short, short)
        return ToolFormat(name=name, style="marked", parse=parser, start=start,
                          end=getattr(tokenizer, "tool_call_end", None) or "")
    template = _template_text(getattr(tokenizer, "chat_template", None))
    if template is None:
        return None
    for name, needles in _SNIFF:
        if all(needle in template for needle in needles):
            return format_by_name(name)
    return None


def _template_text(template: Any) -> str | None:
    """A tokenizer may carry several named templates; "tool_use" is the one rendered with tools."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        for key in ("tool_use", "default"):
            if isinstance(template.get(key), str):
                return template[key]
        return next((t for t in template.values() if isinstance(t, str)), None)
    return None


def _parse_llama3(text: str, tools: Any) -> Any:
    """`{"name": ..., "parameters": {...}}`; a JSON answer without parameters is not a call."""
    obj = json.loads(text)
    if not isinstance(obj, dict) or not ({"parameters", "arguments"} & obj.keys()):
        raise ValueError("not a Llama 3 tool call")
    return obj


def _parse_harmony(text: str, tools: Any) -> Any:
    """`functions.NAME<|message|>{json}`: the recipient, then the JSON body (empty means {})."""
    recipient, _, body = text.partition("<|message|>")
    body = body.strip()
    return {"name": recipient.strip().removeprefix("functions."),
            "arguments": json.loads(body) if body else {}}


def _parse_phi4(text: str, tools: Any) -> Any:
    """Phi-4-mini: `[{"name": ..., "arguments": {...}}, ...]` (a lone object too). Items in
    OpenAI's own shape, {"type": "function", "function": {...}}, are unwrapped."""
    obj = json.loads(text)
    items = obj if isinstance(obj, list) else [obj]
    return [item["function"] if isinstance(item, dict) and isinstance(item.get("function"), dict)
            else item for item in items]


# One call of a DeepSeek calls block, whitespace around it allowed: BEGIN head SEP tail END.
_DS_CALL = re.compile(r"\s*" + re.escape(_DS_CALL_BEGIN) + r"(.*?)" + re.escape(_DS_SEP) + r"(.*?)"
                      + re.escape(_DS_CALL_END) + r"\s*", re.S)
_DS_FENCE = re.compile(r"\s*```[ \t]*(?:json)?\s*(.*?)\s*```\s*", re.S)


def _parse_deepseek(text: str, tools: Any) -> Any:
    """The body of a DeepSeek calls block: calls one after another, nothing else between them.
    V3/R1 write `function<sep>NAME`, a newline and the arguments in a ```json fence (the head is
    the call type); V3.1 writes `NAME<sep>{...}`. A call that does not parse fails the block."""
    calls, pos = [], 0
    while pos < len(text):
        match = _DS_CALL.match(text, pos)
        if match is None:
            raise ValueError("not a DeepSeek tool call")
        head, tail = match.group(1).strip(), match.group(2)
        if head == "function" and not tail.lstrip().startswith("{"):
            name, _, fenced = tail.partition("\n")
            body = _DS_FENCE.fullmatch(fenced)
            if body is None:
                raise ValueError("DeepSeek call arguments are not a ```json block")
            calls.append({"name": name, "arguments": body.group(1)})
        else:
            calls.append({"name": head, "arguments": tail})
        pos = match.end()
    return calls


_OWN_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "harmony": _parse_harmony, "phi4": _parse_phi4, "deepseek_v3": _parse_deepseek}


class _Call(msgspec.Struct, frozen=True):
    name: str
    arguments: str
    id: str | None


def _normalize(parsed: Any) -> list[_Call]:
    """Parser output -> calls with JSON-object arguments; ValueError on any other shape."""
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items:
        raise ValueError("no call in the parsed output")
    calls = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError(f"a call must be an object, got {type(item).__name__}")
        name = item.get("name")
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            args = json.loads(args) if args.strip() else {}
        if not isinstance(name, str) or not name.strip() or not isinstance(args, dict):
            raise ValueError("a call needs a name and an object of arguments")
        model_id = item.get("id")
        calls.append(_Call(name.strip(), json.dumps(args, ensure_ascii=False, allow_nan=False),
                           model_id if isinstance(model_id, str) and model_id else None))
    return calls


def _parse_calls(fmt: ToolFormat, body: str, tools: list[dict],
                 quiet: bool = False) -> list[_Call] | None:
    """Calls in one body, or None (logged, unless `quiet`: a trial) when the model wrote
    something else there."""
    try:
        return _normalize(fmt.parse(body.strip(), tools))
    except (ValueError, SyntaxError, KeyError, TypeError, AttributeError, IndexError,
            RecursionError, MemoryError) as exc:  # the last two: nesting too deep to parse
        if quiet:
            return None
        log.warning("tool call not parsed, released as content format=%s error=%s body=%r",
                    fmt.name, exc, body[:200])
        return None


def _partial_tail(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


def _first(text: str, markers: tuple[str, ...], start: int = 0) -> tuple[int, str]:
    """(position, marker) of the earliest of `markers` in `text`, or (-1, "")."""
    found = [(i, m) for m in markers if (i := text.find(m, start)) >= 0]
    return min(found) if found else (-1, "")


class _Sink:
    """What one feed produced. Whitespace right before a call and right after one is dropped
    (OpenAI's content is empty for a pure tool-call answer), so trailing whitespace of content
    is held until the next visible character says which way it goes."""

    def __init__(self, tools: list[dict]) -> None:
        self.known = {(t.get("function") or {}).get("name") for t in tools if isinstance(t, dict)}
        self.count = 0
        self.pending_ws = ""
        self.after_call = False
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[ToolCallDelta] = []

    def say(self, text: str) -> None:
        if self.after_call:
            text = text.lstrip()
            if not text:
                return
            self.after_call = False
        text = self.pending_ws + text
        body = text.rstrip()
        self.pending_ws = text[len(body):]
        self.content.append(body)

    def think(self, text: str) -> None:
        self.reasoning.append(text)

    def call(self, calls: list[_Call]) -> None:
        self.pending_ws = ""
        self.after_call = True
        for c in calls:
            if c.name not in self.known:
                log.info("tool call names a function the request did not offer name=%s", c.name)
            call_id = c.id or "call_" + secrets.token_hex(12)
            self.calls.append(ToolCallDelta(index=self.count, id=call_id, name=c.name,
                                            arguments=c.arguments))
            self.count += 1

    def take(self, final: bool) -> Parsed:
        if final:
            self.content.append(self.pending_ws)
            self.pending_ws = ""
        out = Parsed(content="".join(self.content), reasoning="".join(self.reasoning),
                     calls=self.calls)
        self.content, self.reasoning, self.calls = [], [], []
        return out


def _inside_a_string(body: str) -> bool:
    """Whether a call's JSON body so far stops inside a string: an end marker found there is
    part of an argument, not the call's end."""
    text = body.strip()
    if not text.startswith(("{", "[")):
        return False
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return exc.msg.startswith("Unterminated string")
    except (RecursionError, ValueError):  # nested past the parser's depth: not a call
        return False
    return False


class _Marked:
    """Calls between a start and an end marker, anywhere in the output."""

    def __init__(self, fmt: ToolFormat, tools: list[dict]) -> None:
        self.fmt, self.tools = fmt, tools
        self.buf = ""
        self.inside = False
        self.searched = 0  # buf[:searched] holds no complete end marker
        # The first end marker passed over as text inside an argument's string: the call
        # ends there after all if no later marker closes a call that parses.
        self.skipped: int | None = None

    def feed(self, text: str, sink: _Sink, final: bool) -> None:
        self.buf += text
        start = self.fmt.start
        while True:
            if not self.inside:
                i = self.buf.find(start)
                if i < 0:
                    keep = 0 if final else _partial_tail(self.buf, (start,))
                    sink.say(self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return
                sink.say(self.buf[:i])
                self.buf, self.inside, self.searched = self.buf[i + len(start):], True, 0
            # An end-less call (Mistral) ends where the next one starts, or with the output.
            end = self.fmt.end or start
            j = self.buf.find(end, self.searched)
            if j >= 0 and self.fmt.end and _inside_a_string(self.buf[:j]):
                # the marker is text in an argument ("use </tool_call> to close"): the call
                # ends at a later one
                self.skipped = j if self.skipped is None else self.skipped
                self.searched = j + 1
                continue
            if self.skipped is not None and (
                    (j < 0 and final) or (j >= 0 and _parse_calls(
                        self.fmt, self.buf[:j], self.tools, quiet=True) is None)):
                j = self.skipped  # no later marker closes a call: the first one did
            if j < 0 and not final:
                self.searched = max(0, len(self.buf) - len(end) + 1)
                return
            if j < 0:
                body, self.buf, closer = self.buf, "", ""
                # Cut off inside its end marker (max_tokens): the call itself may be whole.
                cut = _partial_tail(body, (self.fmt.end,)) if self.fmt.end else 0
                if cut:
                    body, closer = body[:-cut], body[-cut:]
            else:
                body, closer = self.buf[:j], self.fmt.end
                self.buf = self.buf[j + len(closer):]
            self.inside, self.skipped = False, None
            self._close(body, closer, sink)

    def _close(self, body: str, closer: str, sink: _Sink) -> None:
        calls = _parse_calls(self.fmt, body, self.tools)
        if calls is None:
            sink.say(self.fmt.start + body + closer)
        else:
            sink.call(calls)


class _Bare:
    """Calls without markers (Llama 3.x JSON, pythonic lists): the output is a call only if it
    starts like one. Undecided text is buffered; a call that does not parse becomes content."""

    def __init__(self, fmt: ToolFormat, tools: list[dict]) -> None:
        self.fmt, self.tools = fmt, tools
        self.tag = "<|python_tag|>" if fmt.style == "llama3_json" else "<|python_start|>"
        self.state = "undecided"
        self.buf = ""
        self.scanned = 0  # buf[:scanned] holds no end of a call ("]" / "}") not yet tried

    def feed(self, text: str, sink: _Sink, final: bool) -> None:
        if self.state == "text":
            sink.say(text)
            return
        self.buf += text
        if self.state == "after":
            self._after(sink, final)
            return
        if self.state == "undecided":
            verdict = self._decide()
            if verdict is None and not final:
                return
            if not verdict:
                self._release(sink)
                return
            self.state = "call"
        if self.fmt.style == "llama3_json":
            self._json_calls(sink, final)
        else:
            self._pythonic_calls(sink, final)

    def _release(self, sink: _Sink) -> None:
        sink.say(self.buf)
        self.buf = ""
        self.state = "text"

    def _decide(self) -> bool | None:
        """True: starts like a call; False: does not; None: cannot tell yet."""
        s = self.buf.lstrip()
        if s.startswith(self.tag):
            s = s[len(self.tag):].lstrip()
        elif self.tag.startswith(s):
            return None
        if not s:
            return None
        if self.fmt.style == "llama3_json":
            return _json_call_head(s)
        if re.match(r"\[\s*[A-Za-z_][\w.]*\s*\(", s):
            return True
        return None if re.fullmatch(r"\[\s*(?:[A-Za-z_][\w.]*\s*)?", s) else False

    def _json_calls(self, sink: _Sink, final: bool) -> None:
        decoder = json.JSONDecoder()
        while True:
            s = self.buf
            pos = len(s) - len(s.lstrip())
            if sink.count == 0 and s[pos:].startswith(self.tag):
                pos += len(self.tag)
                pos += len(s[pos:]) - len(s[pos:].lstrip())
            if sink.count and s[pos:pos + 1] == ";":  # vLLM's separator for parallel calls
                pos += 1 + len(s[pos + 1:]) - len(s[pos + 1:].lstrip())
            if pos == len(s):
                if final:
                    self._release(sink)
                return
            if s[pos] != "{" or _json_call_head(s[pos:]) is False:
                self._release(sink)
                return
            if not final and "}" not in s[self.scanned:]:
                return  # an object can only have been completed by a new "}"
            try:
                _, end = decoder.raw_decode(s, pos)
            except (ValueError, RecursionError):  # RecursionError: nested deeper than Python
                self.scanned = len(s)
                if final:
                    self._release(sink)
                return
            if not self._emit(s[pos:end], s[end:], sink):
                return

    def _pythonic_calls(self, sink: _Sink, final: bool) -> None:
        """The list is complete at the first "]" up to which the text parses as Python."""
        s = self.buf
        for p in range(self.scanned, len(s)):
            if s[p] != "]":
                continue
            head = s[:p + 1].strip().removeprefix(self.tag)
            try:
                tree = ast.parse(head.strip(), mode="eval").body
            except (SyntaxError, ValueError, RecursionError, MemoryError):  # too deep: MemoryError
                continue
            if not _is_call_list(tree):
                self._release(sink)
            elif self._emit(head, s[p + 1:], sink):
                self.state = "after"
                self._after(sink, final)
            return
        self.scanned = len(s)
        if final:
            self._release(sink)

    def _after(self, sink: _Sink, final: bool) -> None:
        """Drop Llama 4's <|python_end|> after the list; whatever else follows is content."""
        s = self.buf.lstrip()
        if not final and _PY_END.startswith(s):
            return
        self.buf = s.removeprefix(_PY_END)
        self._release(sink)

    def _emit(self, body: str, rest: str, sink: _Sink) -> bool:
        """Emit the calls in `body` and go on with `rest`; False once the output is content."""
        calls = _parse_calls(self.fmt, body, self.tools)
        if calls is None:
            self._release(sink)
            return False
        sink.call(calls)
        self.buf, self.scanned = rest, 0
        return True


_PY_END = "<|python_end|>"


def _json_call_head(s: str) -> bool | None:
    """Does `s` (starting at "{") open a call object? Its first key says: name/type/function."""
    m = re.match(r'\{\s*"((?:[^"\\]|\\.)*)"\s*:', s)
    if m:
        return m.group(1) in ("name", "type", "function")
    if re.fullmatch(r'\{\s*(?:"(?:[^"\\]|\\.)*(?:\\|"\s*)?)?', s):
        return None
    return False


def _is_call_list(tree: ast.expr) -> bool:
    """`[f(a=1), g()]`: a non-empty list of calls with keyword arguments only."""
    return (isinstance(tree, ast.List) and bool(tree.elts)
            and all(isinstance(e, ast.Call) and not e.args for e in tree.elts))


_H_TOKENS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>",
             "<|constrain|>")
_H_ENDS = ("<|end|>", "<|call|>", "<|return|>")


class _Harmony:
    """gpt-oss: `<|channel|>NAME[ to=RECIPIENT][ <|constrain|>json]<|message|>BODY<|end|>`, one
    message after another. analysis -> reasoning, a recipient -> a tool call, the rest
    (final, commentary preambles) -> content. The closing `<|call|>`/`<|return|>` are eos
    tokens and usually never reach the text, so the output's end closes a message too.
    The prompt ends with `<|start|>assistant`, so the output may open with the rest of that
    header (` to=functions.x<|channel|>...`)."""

    def __init__(self, fmt: ToolFormat, tools: list[dict]) -> None:
        self.fmt, self.tools = fmt, tools
        self.state = "begin"
        self.buf = ""
        self.header = ""
        self.recipient: str | None = None
        self.channel = ""
        self.searched = 0  # buf[:searched] of a call's body holds no complete end marker

    def feed(self, text: str, sink: _Sink, final: bool) -> None:
        self.buf += text
        while self._step(sink, final):
            pass

    def _step(self, sink: _Sink, final: bool) -> bool:
        if self.state == "begin":
            head = self.buf.lstrip()[:3]
            if not final and (not head or len(head) < 3 and "to=".startswith(head)):
                return False
            self.state = "header" if head == "to=" else "outside"
            self.header = ""
            return True
        if self.state == "outside":
            i, marker = _first(self.buf, ("<|start|>", "<|channel|>"))
            if i < 0:
                self._stream(sink.say, final)
                return False
            sink.say(self.buf[:i])
            self.header, self.buf, self.state = marker, self.buf[i + len(marker):], "header"
            return True
        if self.state == "header":
            i = self.buf.find("<|message|>")
            if i < 0:
                if final:
                    sink.say(self.header + self.buf)
                    self.buf = ""
                return False
            self._open(self.header + self.buf[:i])
            self.buf, self.state = self.buf[i + len("<|message|>"):], "body"
            return True
        i, marker = _first(self.buf, _H_ENDS + ("<|start|>", "<|channel|>"), self.searched)
        if i < 0:
            if self.recipient is None:
                self._stream(sink.think if self.channel == "analysis" else sink.say, final)
            elif final:
                self._call(self.buf, "", sink)
                self.buf = ""
            else:
                self.searched = max(0, len(self.buf) - len("<|channel|>") + 1)
            return False
        closer = marker if marker in _H_ENDS else ""
        if self.recipient is None:
            (sink.think if self.channel == "analysis" else sink.say)(self.buf[:i])
        else:
            self._call(self.buf[:i], closer, sink)
        self.buf, self.state, self.searched = self.buf[i + len(closer):], "outside", 0
        return True

    def _open(self, header: str) -> None:
        self.header = header
        channel = re.search(r"<\|channel\|>\s*(\w+)", header)
        recipient = re.search(r"\bto=([^\s<]+)", header)
        self.channel = channel.group(1) if channel else ""
        self.recipient = recipient.group(1) if recipient else None

    def _stream(self, out: Callable[[str], None], final: bool) -> None:
        keep = 0 if final else _partial_tail(self.buf, _H_TOKENS)
        out(self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]

    def _call(self, body: str, closer: str, sink: _Sink) -> None:
        calls = _parse_calls(self.fmt, f"{self.recipient}<|message|>{body}", self.tools)
        if calls is None:
            sink.say(f"{self.header}<|message|>{body}{closer}")
        else:
            sink.call(calls)


_SCANNERS: dict[str, Callable[[ToolFormat, list[dict]], Any]] = {
    "marked": _Marked, "llama3_json": _Bare, "pythonic": _Bare, "harmony": _Harmony}


class ToolCallStream:
    """Tool calls out of one sequence's decoded text. `feed` each new piece, `finish` once at
    the end (any finish reason); `called` says whether finish_reason becomes "tool_calls"."""

    def __init__(self, fmt: ToolFormat, tools: list[dict]) -> None:
        self.fmt = fmt
        self.tools = tools
        self._sink = _Sink(tools)
        self._scanner = _SCANNERS[fmt.style](fmt, tools)

    def feed(self, text: str) -> Parsed:
        self._scanner.feed(text, self._sink, False)
        return self._sink.take(final=False)

    def finish(self) -> Parsed:
        self._scanner.feed("", self._sink, True)
        return self._sink.take(final=True)

    @property
    def called(self) -> bool:
        return self._sink.count > 0
