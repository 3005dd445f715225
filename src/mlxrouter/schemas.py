"""OpenAI request and response bodies as msgspec Structs (daemon side; imports no mlx).

Unknown fields are tolerated (clients send vendor extensions), typed fields are validated when the
body is decoded, and OpenAI parameters this server does not implement are declared here so that
they are rejected with a 400 naming them instead of being silently ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from .errors import InvalidRequest

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


ContentPart = TextPart | ImagePart | FilePart | AudioPart


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


# OpenAI parameters not implemented yet, with the value that means "not used".
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "parallel_tool_calls": None,
    "response_format": None,
    "logprobs": None,
    "top_logprobs": None,
    "reasoning_effort": None,
    "chat_template_kwargs": None,
    "audio": None,
    "modalities": None,
    "prediction": None,
    "web_search_options": None,
}
# Values of those parameters that are equivalent to leaving them out.
_HARMLESS: dict[str, tuple[Any, ...]] = {
    "logprobs": (False,),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (True, False),
    "modalities": (["text"],),
    "response_format": ({"type": "text"},),
}


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
    n: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    # Not OpenAI's; mlx-lm's multiplicative penalty over the last 20 tokens (1 = off).
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0)] | None = None
    logit_bias: dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

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
    # Declared only to be refused; see check_supported.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    reasoning_effort: Any = None
    chat_template_kwargs: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationParams, kw_only=True):
    # A string, a list of strings, a list of token ids or a list of such lists.
    prompt: str | Annotated[list[Any], msgspec.Meta(min_length=1, max_length=32)]
    echo: bool = False
    # Declared only to be refused; see check_completion.
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (strings or token id lists); 400 when malformed."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(_token_id(x) for x in p):
            return [list(p)]
        if all(isinstance(x, list) and x and all(_token_id(t) for t in x) for x in p):
            return [list(x) for x in p]
        raise InvalidRequest("prompt must be a string, a list of strings, a list of token ids "
                             "or a list of token id lists", param="prompt")


def _token_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**31


def check_completion(req: CompletionRequest) -> list[str | list[int]]:
    if req.suffix:
        raise InvalidRequest("parameter 'suffix' (insertion) is not supported by this server",
                             param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidRequest("parameter 'best_of' is not supported by this server yet",
                             param="best_of")
    if req.logprobs is not None:
        raise InvalidRequest("parameter 'logprobs' is not supported by this server yet",
                             param="logprobs")
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
        raise InvalidRequest(f"parameter '{name}' is not supported by this server yet",
                             param=name)
    _check_common(req)
    for i, msg in enumerate(req.messages):
        if msg.content is None and msg.role != "assistant":
            raise InvalidRequest(f"messages[{i}].content is required for role '{msg.role}'",
                                 param=f"messages[{i}].content")
        if isinstance(msg.content, list):
            for j, part in enumerate(msg.content):
                if not isinstance(part, TextPart):
                    raise InvalidRequest(
                        f"messages[{i}].content[{j}]: content of type "
                        f"'{type(part).__struct_config__.tag}' is not supported by this model",
                        param=f"messages[{i}].content[{j}].type")


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
        raise InvalidRequest(f"invalid request: {text}", param=param or None) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as plain dicts for the chat template; text parts joined into one string."""
    out = []
    for msg in messages:
        d = msgspec.to_builtins(msg)
        if isinstance(msg.content, list):
            d["content"] = "".join(p.text for p in msg.content if isinstance(p, TextPart))
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


class Choice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class ChunkDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: None = None


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


class TextChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class TextCompletion(msgspec.Struct):
    """Both the answer and each streamed event of /v1/completions (OpenAI uses one object)."""

    id: str
    created: int
    model: str
    choices: list[TextChoice]
    object: str = "text_completion"
    system_fingerprint: str | None = None
    usage: Usage | None = None


class ChatShape:
    """chat.completion answers and chat.completion.chunk events."""

    endpoint, id_prefix = "chat.completions", "chatcmpl"

    def body(self, cid, created, model, choices, usage):
        return ChatCompletion(cid, created, model, [
            Choice(i, AssistantMessage("assistant", a.text, a.reasoning or None),
                   a.end.finish_reason)
            for i, a in enumerate(choices)], usage)

    def opening(self, cid, created, model, index):
        # The role comes in each choice's first delta only.
        return ChatCompletionChunk(cid, created, model,
                                   [ChunkChoice(index, ChunkDelta(role="assistant", content=""))])

    def delta(self, cid, created, model, index, text, reasoning=""):
        delta = ChunkDelta(content=text or None, reasoning_content=reasoning or None)
        return ChatCompletionChunk(cid, created, model, [ChunkChoice(index, delta)])

    def finish(self, cid, created, model, index, reason):
        return ChatCompletionChunk(cid, created, model, [ChunkChoice(index, ChunkDelta(), reason)])

    def usage_chunk(self, cid, created, model, usage):
        return ChatCompletionChunk(cid, created, model, [], usage=usage)


class TextShape:
    """text_completion answers and events."""

    endpoint, id_prefix = "completions", "cmpl"

    def body(self, cid, created, model, choices, usage):
        return TextCompletion(cid, created, model, [
            TextChoice(i, a.text, a.end.finish_reason) for i, a in enumerate(choices)],
            usage=usage)

    def opening(self, cid, created, model, index):
        return None

    def delta(self, cid, created, model, index, text, reasoning=""):
        return TextCompletion(cid, created, model, [TextChoice(index, text)])

    def finish(self, cid, created, model, index, reason):
        return TextCompletion(cid, created, model, [TextChoice(index, "", reason)])

    def usage_chunk(self, cid, created, model, usage):
        return TextCompletion(cid, created, model, [], usage=usage)


class ModelList(msgspec.Struct):
    data: list[ModelObject]
    object: str = "list"
