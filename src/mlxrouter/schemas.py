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
PosInt = Annotated[int, msgspec.Meta(ge=1)]


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


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_tokens: PosInt | None = None
    max_completion_tokens: PosInt | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=16)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    n: PosInt = 1
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] = 0.0
    # Not OpenAI's; mlx-lm's multiplicative penalty over the last 20 tokens (1 = off).
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0)] | None = None
    logit_bias: dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
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
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def check_supported(req: ChatCompletionRequest) -> None:
    for name, unset in _UNSUPPORTED_DEFAULTS.items():
        value = getattr(req, name)
        if value is unset or value in _HARMLESS.get(name, ()):
            continue
        raise InvalidRequest(f"parameter '{name}' is not supported by this server yet",
                             param=name)
    if req.n != 1:
        raise InvalidRequest("only n=1 is supported by this server yet", param="n")
    for key in req.logit_bias or {}:
        if not key.lstrip("-").isdigit() or int(key) < 0:
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}",
                                 param="logit_bias")
    if any(s == "" for s in req.stop_list):
        raise InvalidRequest("stop strings must not be empty", param="stop")
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


class AssistantMessage(msgspec.Struct):
    role: str
    content: str | None


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


class ModelList(msgspec.Struct):
    data: list[ModelObject]
    object: str = "list"
