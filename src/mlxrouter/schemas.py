"""OpenAI request and response bodies as msgspec Structs (daemon side; imports no mlx).

Unknown fields are tolerated (clients send vendor extensions), typed fields are validated when the
body is decoded, and OpenAI parameters this server does not implement are declared here so that
they are rejected with a 400 naming them instead of being silently ignored.
"""

from __future__ import annotations

import codecs
import re
from typing import Annotated, Any, Literal

import msgspec

from .errors import InvalidRequest
from .vision import check_messages

NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ImageURL(msgspec.Struct):
    url: str
    detail: str | None = None


class ImagePart(msgspec.Struct, tag_field="type", tag="image_url"):
    image_url: ImageURL


class FilePart(msgspec.Struct, tag_field="type", tag="file"):
    file: dict[str, Any]


class AudioPart(msgspec.Struct, tag_field="type", tag="input_audio"):
    input_audio: dict[str, Any]


class RefusalPart(msgspec.Struct, tag_field="type", tag="refusal"):
    """An assistant's earlier refusal sent back in the history (OpenAI allows it there);
    the model sees it as that message's text (vision.check_messages)."""
    refusal: str


ContentPart = TextPart | ImagePart | FilePart | AudioPart | RefusalPart


class FunctionCall(msgspec.Struct):
    name: str
    # OpenAI sends a JSON string; an object is accepted too.
    arguments: str | dict[str, Any] = "{}"


class ToolCall(msgspec.Struct):
    """A tool call: in an assistant message going back to the model, and in answers."""

    function: FunctionCall
    id: str = ""
    type: Literal["function"] = "function"


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # an assistant's reasoning, as answers give it: templates that keep it in a tool loop
    # (qwen, gpt-oss) render it
    reasoning_content: str | None = None
    # the legacy functions API's call: refused (check_chat), never dropped without a word
    function_call: Any = None


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = False  # null (the SDK's None) means the default

    def __post_init__(self) -> None:
        self.include_usage = bool(self.include_usage)


# OpenAI parameters not implemented, with the value that means "not used".
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "functions": None,
    "function_call": None,
    "audio": None,
    "modalities": None,
    "prediction": None,
    "web_search_options": None,
    "verbosity": None,
}
# Values of those parameters that are equivalent to leaving them out.
_HARMLESS: dict[str, tuple[Any, ...]] = {
    "modalities": (["text"],),
    "verbosity": ("medium",),  # OpenAI's default
}
# Chat parameters that a text completion would otherwise ignore without a word.
_CHAT_ONLY = ("max_completion_tokens", "response_format", "tools", "tool_choice",
              "parallel_tool_calls", "top_logprobs", "reasoning_effort", "chat_template_kwargs",
              "messages")
_HINTS = {
    "functions": "; use 'tools' (the legacy 'functions' API is not supported)",
    "function_call": "; use 'tool_choice' (the legacy 'functions' API is not supported)",
}

FunctionName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]


class FunctionDef(msgspec.Struct, omit_defaults=True):
    name: FunctionName
    description: str | None = None
    # A JSON schema object for the arguments; None = no arguments.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct):
    type: Literal["function"]
    function: FunctionDef


class FunctionRef(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    type: Literal["function"]
    function: FunctionRef


class JSONSchemaFormat(msgspec.Struct, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, omit_defaults=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class GenerationParams(msgspec.Struct, kw_only=True):
    """What chat and text completions share: the model, sampling, stopping, streaming."""

    model: str
    max_tokens: PosInt | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=16)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=16)] | None = 1
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    # Not OpenAI's; mlx-lm's multiplicative penalty over the last 20 tokens (1 = off).
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0)] | None = None
    logit_bias: dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        # OpenAI's schema makes these nullable, and its SDK sends null for a None argument:
        # null means the default, as for every other parameter here.
        self.n = 1 if self.n is None else self.n
        self.stream = bool(self.stream)

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(GenerationParams, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: PosInt | None = None
    tools: Annotated[list[Tool], msgspec.Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    # Passed to the chat template (as gpt-oss's templates take it); the openai SDK's values.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh",
                              "max"] | None = None
    # Extra variables for the chat template, e.g. {"enable_thinking": false}.
    chat_template_kwargs: dict[str, Any] | None = None
    # Declared only to be refused; see check_supported.
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    verbosity: Any = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


MAX_PROMPTS = 32  # prompts in one /v1/completions request


class CompletionRequest(GenerationParams, kw_only=True):
    # A string, a list of strings, a list of token ids or a list of such lists (at most
    # MAX_PROMPTS prompts; one list of token ids is one prompt, of any length)
    prompt: str | Annotated[list[Any], msgspec.Meta(min_length=1)]
    echo: bool | None = False
    # Declared only to be refused; see check_completion.
    suffix: str | None = None
    best_of: int | None = None
    # Log probabilities of the sampled token and this many alternatives per token.
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    # Chat's; declared only to be refused (see _CHAT_ONLY).
    max_completion_tokens: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    top_logprobs: Any = None
    reasoning_effort: Any = None
    chat_template_kwargs: Any = None
    messages: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.echo = bool(self.echo)

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (strings or token id lists); 400 when malformed."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(_token_id(x) for x in p):
            return [list(p)]
        if len(p) > MAX_PROMPTS:
            raise InvalidRequest(f"prompt holds {len(p)} prompts; at most {MAX_PROMPTS} are "
                                 f"taken in one request", param="prompt")
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, list) and x and all(_token_id(t) for t in x) for x in p):
            return [list(x) for x in p]
        raise InvalidRequest("prompt must be a string, a list of strings, a list of token ids "
                             "or a list of token id lists", param="prompt")


def _token_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**31


def check_completion(req: CompletionRequest) -> list[str | list[int]]:
    for name in _CHAT_ONLY:
        if getattr(req, name) is not None:
            hint = {"max_completion_tokens": "; use 'max_tokens'",
                    "top_logprobs": "; 'logprobs' takes the number of alternatives here"
                    }.get(name, "; send it to /v1/chat/completions")
            raise InvalidRequest(f"parameter '{name}' is not a text completions parameter"
                                 f"{hint}", param=name)
    if req.suffix:
        raise InvalidRequest("parameter 'suffix' (insertion) is not supported by this server",
                             param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidRequest("parameter 'best_of' is not supported by this server yet",
                             param="best_of")
    if req.echo and req.logprobs is not None:
        raise InvalidRequest("logprobs together with echo is not supported (it would need the "
                             "prompt's log probabilities)", param="logprobs")
    _check_common(req)
    prompts = req.prompts()
    if req.echo and not all(isinstance(p, str) for p in prompts):
        raise InvalidRequest("echo needs text prompts (token id prompts cannot be echoed "
                             "without the model's tokenizer)", param="echo")
    return prompts


def _check_common(req: GenerationParams) -> None:
    for key in req.logit_bias or {}:
        if not (key.isascii() and key.isdigit()) or int(key) >= 2**31:
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}",
                                 param="logit_bias")
    if any(s == "" for s in req.stop_list):
        raise InvalidRequest("stop strings must not be empty", param="stop")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true",
                             param="stream_options")


def check_supported(req: ChatCompletionRequest) -> None:
    for name, unset in _UNSUPPORTED_DEFAULTS.items():
        value = getattr(req, name)
        if value is unset or value in _HARMLESS.get(name, ()):
            continue
        raise InvalidRequest(f"parameter '{name}' is not supported by this server"
                             f"{_HINTS.get(name, '')}", param=name)
    _check_common(req)
    _check_tools(req)
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    rf = req.response_format
    if rf is not None and rf.type == "json_schema" and (
            rf.json_schema is None or rf.json_schema.schema is None):
        raise InvalidRequest("response_format.json_schema.schema is required for type "
                             "'json_schema'",
                             param="response_format.json_schema")
    if rf is not None and rf.json_schema is not None and rf.json_schema.schema is not None and (
            len(msgspec.json.encode(rf.json_schema.schema)) > MAX_SCHEMA_BYTES):
        raise InvalidRequest(f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes",
                             param="response_format.json_schema.schema")
    for i, msg in enumerate(req.messages):
        if msg.function_call is not None:
            raise InvalidRequest(
                f"messages[{i}].function_call is not supported (the legacy 'functions' API); "
                "give the call as tool_calls: [{id, type: 'function', function: {name, "
                "arguments}}], and its result as a 'tool' message",
                param=f"messages[{i}].function_call")
        # the call it answers, by id (OpenAI's way) or by its function's name (older clients;
        # the named templates match either)
        if msg.role == "tool" and not msg.tool_call_id and not msg.name:
            raise InvalidRequest(f"messages[{i}]: a 'tool' message needs the tool_call_id of "
                                 f"the call it answers (or the function's name)",
                                 param=f"messages[{i}].tool_call_id")
    check_messages(req.messages)  # content parts: vision.py


# Grammars compile in the daemon and again per model in the worker: seconds for huge schemas.
MAX_SCHEMA_BYTES = 32 * 1024
MAX_TOOLS_BYTES = 64 * 1024


def _check_tools(req: ChatCompletionRequest) -> None:
    tools, choice = req.tools or [], req.tool_choice
    if tools and len(msgspec.json.encode(tools)) > MAX_TOOLS_BYTES:
        raise InvalidRequest(f"tools are larger than {MAX_TOOLS_BYTES} bytes of JSON",
                             param="tools")
    for i, tool in enumerate(tools):
        params = tool.function.parameters
        if params is not None and params.get("type", "object") != "object":
            raise InvalidRequest("a function's parameters must be a JSON schema of type "
                                 "'object'", param=f"tools[{i}].function.parameters")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("tools: function names must be unique", param="tools")
    if choice is not None and choice != "none" and not tools:
        raise InvalidRequest("tool_choice is only allowed when tools are given",
                             param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise InvalidRequest(f"tool_choice names function '{choice.function.name}', which is "
                             f"not among the tools", param="tool_choice")
    rf = req.response_format
    if tools and choice != "none" and rf is not None and rf.type != "text":
        raise InvalidRequest("response_format together with tools is not supported: use "
                             "tool_choice 'none' or leave response_format out",
                             param="response_format")


def tool_dicts(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools as the chat template and the worker see them (None when no tools apply)."""
    if not req.tools or req.tool_choice == "none":
        return None
    return [msgspec.to_builtins(t) for t in req.tools]


_PATH = re.compile(r" - at `\$\.?(.*)`$")


def decode_body(body: bytes, type_: type[msgspec.Struct]) -> Any:
    """Decode a JSON body, turning every failure into a 400 that names the field."""
    if not body.strip():
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH.search(text)
        param = match.group(1) if match else None
        if text.startswith("Object missing required field"):
            field = text.split("`")[1]
            param = f"{param}.{field}" if param else field
        hint = ("; a function's result is a 'tool' message (the legacy 'functions' API is "
                "not supported)" if text.startswith("Invalid enum value 'function'")
                and (param or "").endswith(".role") else "")
        raise InvalidRequest(f"invalid request: {text}{hint}", param=param or None) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as plain dicts for the chat template; text parts joined into one string.
    Image and file parts keep their place as {"type": "image", "media": i}, i counting them
    across the conversation: their bytes travel in Request.media (vision.collect_media)."""
    out = []
    media = 0
    for msg in messages:
        d = msgspec.to_builtins(msg)
        if msg.content is None:  # an assistant's turn with only tool calls: templates
            d["content"] = ""    # read message['content'] and may add it to a string
        if isinstance(msg.content, list):
            if all(isinstance(p, TextPart) for p in msg.content):
                d["content"] = "".join(p.text for p in msg.content)
            else:
                d["content"] = []
                for p in msg.content:
                    if isinstance(p, TextPart):
                        d["content"].append({"type": "text", "text": p.text})
                    else:
                        d["content"].append({"type": "image", "media": media})
                        media += 1
        if msg.role == "developer":
            d["role"] = "system"
        out.append(d)
    return out


# Responses


class PromptTokensDetails(msgspec.Struct, frozen=True):
    cached_tokens: int = 0


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class AssistantMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct):
    content: list[TokenLogprob] | None
    refusal: None = None


class Choice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class ChunkFunction(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str = ""


class ChunkToolCall(msgspec.Struct, omit_defaults=True):
    index: int
    function: ChunkFunction
    id: str | None = None
    type: str | None = None


class ChunkDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: Usage | None = None


class ModelObject(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    object: str = "model"
    loaded: bool = False
    state: str = "STOPPED"
    path: str = ""
    # From discovery (docs/models.md): what the model is and what loading it is budgeted at.
    source: str = ""
    architecture: str = ""
    quantization: str = ""
    parameters: int | None = None
    weights_bytes: int | None = None
    estimated_memory_bytes: int | None = None
    context_length: int | None = None
    capabilities: list[str] = []
    # False (with the reason) for a configured model that cannot be served as it is on disk.
    usable: bool = True
    reason: str | None = None


class TextLogprobs(msgspec.Struct):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: TextLogprobs | None = None


class TextCompletion(msgspec.Struct):
    """Both the answer and each streamed event of /v1/completions (OpenAI uses one object)."""

    id: str
    created: int
    model: str
    choices: list[TextChoice]
    object: str = "text_completion"
    system_fingerprint: str | None = None
    usage: Usage | None = None


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8", "surrogatepass"))


def spelling(text: str, raw: bytes) -> str:
    """How a token is named in logprobs: its own bytes as text, the same for a token chosen
    and the same token among the alternatives; bytes that are not whole UTF-8 characters (a
    piece of an emoji) as OpenAI writes them, `bytes:\\xf0\\x9f`, so that no two tokens share a
    name. `text` (what the token added to the output) where the bytes are not known."""
    if not raw:
        return text
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def chat_logprobs(entries) -> ChoiceLogprobs:
    return ChoiceLogprobs([
        TokenLogprob(spelling(e.token, e.raw), e.logprob,
                     list(e.raw) if e.raw else _utf8(e.token),
                     [TopLogprob(spelling(t.token, t.raw), t.logprob,
                                 list(t.raw) if t.raw else _utf8(t.token))
                      for t in e.top])
        for e in entries])


def tool_calls_out(calls) -> list[ToolCall] | None:
    """Whole calls (protocol.ToolCallDelta, merged) as an assistant message's tool_calls."""
    return [ToolCall(FunctionCall(c.name, c.arguments), c.id) for c in calls] or None


class ChatShape:
    """chat.completion answers and chat.completion.chunk events."""

    endpoint, id_prefix = "chat.completions", "chatcmpl"

    def __init__(self, logprobs: bool = False) -> None:
        self.logprobs = logprobs

    def body(self, cid, created, model, choices, usage):
        return ChatCompletion(cid, created, model, [
            Choice(i, AssistantMessage("assistant", None if a.tool_calls and not a.text
                                       else a.text, a.reasoning or None,
                                       tool_calls_out(a.tool_calls)),
                   a.end.finish_reason,
                   chat_logprobs(a.logprobs) if self.logprobs else None)
            for i, a in enumerate(choices)], usage)

    def opening(self, cid, created, model, index):
        # The role comes in each choice's first delta only.
        return ChatCompletionChunk(cid, created, model,
                                   [ChunkChoice(index, ChunkDelta(role="assistant", content=""))])

    def delta(self, cid, created, model, index, chunk):
        calls = [ChunkToolCall(c.index, ChunkFunction(c.name or None, c.arguments),
                               c.id or None, "function" if c.id else None)
                 for c in chunk.tool_calls]
        delta = ChunkDelta(content=chunk.text or None, reasoning_content=chunk.reasoning or None,
                           tool_calls=calls or None)
        logprobs = chat_logprobs(chunk.logprobs) if self.logprobs and chunk.logprobs else None
        return ChatCompletionChunk(cid, created, model, [ChunkChoice(index, delta, None,
                                                                     logprobs)])

    def finish(self, cid, created, model, index, reason):
        return ChatCompletionChunk(cid, created, model, [ChunkChoice(index, ChunkDelta(), reason)])

    def usage_chunk(self, cid, created, model, usage):
        return ChatCompletionChunk(cid, created, model, [], usage=usage)


class TextShape:
    """text_completion answers and events. `logprobs` = alternatives per token, or None."""

    endpoint, id_prefix = "completions", "cmpl"

    def __init__(self, logprobs: int | None = None, prefix: list[str] | None = None) -> None:
        self.logprobs = logprobs
        # Characters before each choice's next token (text_offset counts from the choice's
        # start, the echoed prompt included), counted from the tokens' own bytes: the text an
        # entry carries is what the detokenizer let out at that step, which can be held back
        # (a lone space goes out with the next token).
        self._offset: dict[int, int] = {i: len(p) for i, p in enumerate(prefix or [])}
        self._utf8: dict[int, codecs.IncrementalDecoder] = {}

    def _logprobs(self, index: int, entries) -> TextLogprobs | None:
        if self.logprobs is None:
            return None
        out = TextLogprobs([], [], [], [])
        decoder = self._utf8.setdefault(index, codecs.getincrementaldecoder("utf-8")("replace"))
        for e in entries:
            out.tokens.append(spelling(e.token, e.raw))
            out.token_logprobs.append(e.logprob)
            out.top_logprobs.append({spelling(t.token, t.raw): t.logprob for t in e.top})
            out.text_offset.append(self._offset.get(index, 0))
            shown = (e.chars if e.chars >= 0 else len(decoder.decode(e.raw)) if e.raw
                     else len(e.token))
            self._offset[index] = self._offset.get(index, 0) + shown
        return out

    def body(self, cid, created, model, choices, usage):
        return TextCompletion(cid, created, model, [
            TextChoice(i, a.text, a.end.finish_reason, self._logprobs(i, a.logprobs))
            for i, a in enumerate(choices)], usage=usage)

    def opening(self, cid, created, model, index):
        return None

    def delta(self, cid, created, model, index, chunk):
        lp = self._logprobs(index, chunk.logprobs) if chunk.logprobs else None
        return TextCompletion(cid, created, model, [TextChoice(index, chunk.text, None, lp)])

    def finish(self, cid, created, model, index, reason):
        return TextCompletion(cid, created, model, [TextChoice(index, "", reason)])

    def usage_chunk(self, cid, created, model, usage):
        return TextCompletion(cid, created, model, [], usage=usage)


class ModelList(msgspec.Struct):
    data: list[ModelObject]
    object: str = "list"
