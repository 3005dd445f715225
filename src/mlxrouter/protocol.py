"""Wire messages between the daemon's broker and worker processes (ZeroMQ frames, msgpack).

Imported by both sides; imports only msgspec. One tagged union, one encoder, one decoder.
Unknown fields are ignored so a newer peer can add fields; anything that changes the meaning of
an existing field bumps PROTOCOL_VERSION, which the worker reports in Hello.

Invariants: every Request gets exactly one terminal message (End or Error); Cancel is answered
with End(finish_reason="cancelled"); rids are never reused within a daemon run.
"""

from __future__ import annotations

from typing import Any

import msgspec

PROTOCOL_VERSION = 1


class _Msg(msgspec.Struct, tag_field="t", omit_defaults=True):
    pass


# worker -> daemon, worker lifecycle


class Hello(_Msg, tag="hello"):
    identity: str
    pid: int
    protocol_version: int
    package_version: str
    mlx_version: str = ""


class Progress(_Msg, tag="progress"):
    message: str


class Ready(_Msg, tag="ready"):
    load_s: float
    weights_bytes: int
    memory_bytes: int
    max_context: int
    backend: str = ""


class Stats(_Msg, tag="stats"):
    engine_steps: int
    active_sequences: int
    mlx_active_bytes: int = 0
    mlx_cache_bytes: int = 0
    mlx_peak_bytes: int = 0


# daemon -> worker


class SamplingParams(msgspec.Struct, omit_defaults=True):
    max_tokens: int
    # The client left max_tokens out (max_tokens is a default): lower it to what the context
    # has room for, as OpenAI does, instead of refusing the request.
    fit_to_context: bool = False
    # What the client asked for when memory pressure capped max_tokens below it: the request
    # must still fit the context with it (a 400 does not depend on the host's memory).
    asked_max_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = []
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # token id -> additive bias, as OpenAI's logit_bias (keys already checked to be ints)
    logit_bias: dict[int, float] = {}
    # Log probability of each sampled token, with this many alternatives (0 = just its own).
    logprobs: bool = False
    top_logprobs: int = 0


class Media(msgspec.Struct, omit_defaults=True):
    """An image or a PDF of a chat request, as the client sent it (checked, never decoded, by
    the gateway). The vision worker decodes it, with these limits."""

    kind: str  # "image" | "pdf"
    data: bytes
    max_pixels: int = 0  # per image or rendered page; 0 = no limit
    max_pages: int = 0  # PDFs
    dpi: int = 150  # PDFs are rendered at this resolution
    param: str = ""  # its content part, e.g. "messages[0].content[1]", for the worker's 400s
    # The whole request's images + PDF pages, and their pixels as rendered; 0 = no limit.
    request_max_images: int = 0
    request_max_pixels: int = 0
    shared_by: int = 1  # n choices decode the same media: each gets 1/n of the request limits
    # The whole request's decoding and rendering, in a child process killed after it; 0 = none.
    decode_timeout_s: float = 0.0


class Request(_Msg, tag="request"):
    rid: int
    sampling: SamplingParams
    # Chat: OpenAI messages, already validated by the gateway. Completion: prompt.
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    request_id: str = ""
    # OpenAI tools (as dicts), rendered by the chat template; None = no tool calling.
    tools: list[dict[str, Any]] | None = None
    # "auto", "required" or {"type": "function", "function": {"name": ...}} (constrained).
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    # response_format as a grammar (constrain.grammar_for_response_format), checked already.
    grammar: str | None = None
    # Extra chat template variables (chat_template_kwargs, reasoning_effort).
    template_kwargs: dict[str, Any] = {}
    # Images and PDFs, in the order of their {"type": "image", "media": i} parts in messages.
    media: list[Media] = []


class Cancel(_Msg, tag="cancel"):
    rid: int


# worker -> daemon, per request


class Started(_Msg, tag="started"):
    rid: int
    prompt_tokens: int
    cached_tokens: int = 0


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    """A piece of a tool call: id and name in a call's first piece; arguments are fragments
    of a JSON string that concatenate to the whole."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


class TopLogprob(msgspec.Struct, array_like=True):
    token: str
    logprob: float
    raw: bytes = b""  # the token's own bytes (a piece of a UTF-8 character, say)


class TokenLogprob(msgspec.Struct, array_like=True):
    """`token` is the text this token added to the output (possibly "" while a character is
    incomplete), so the tokens of a choice join to its text; `raw` is the token's bytes."""

    token: str
    logprob: float
    top: list[TopLogprob] = []
    raw: bytes = b""
    # characters it adds to the text, for text_offset: -1 = count its `raw` bytes decoded
    # (byte-level BPE, SentencePiece), else what the detokenizer showed for it
    chars: int = -1


class Delta(msgspec.Struct, omit_defaults=True):
    rid: int
    content: str = ""
    # Text inside the model's reasoning markers (<think>...</think>), never part of content.
    reasoning: str = ""
    tokens: int = 0
    tool_calls: list[ToolCallDelta] = []
    # One entry per sampled token of this step, when the request asked for logprobs.
    logprobs: list[TokenLogprob] = []


class Step(_Msg, tag="step"):
    deltas: list[Delta]


class End(_Msg, tag="end"):
    rid: int
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # The worker's own time for this sequence: from its engine taking the Request to this End
    # (templating, prefill, decode). What the daemon adds on top is the router's overhead.
    elapsed_s: float = 0.0


class Error(_Msg, tag="error"):
    rid: int
    code: str
    message: str
    param: str | None = None


Message = Hello | Progress | Ready | Stats | Request | Cancel | Started | Step | End | Error

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Message:
    """Decode one frame; raises msgspec.DecodeError / ValidationError on garbage."""
    return _decoder.decode(data)
