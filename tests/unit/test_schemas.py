"""OpenAI request bodies (decode, validation, unsupported parameters) and OpenAI-shaped errors."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from mlxrouter import errors
from mlxrouter.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    NoMemory,
    QueueFull,
    RouterError,
    error_body,
    error_headers,
    from_code,
)
from mlxrouter.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    check_supported,
    decode_body,
    message_dicts,
    tool_dicts,
)


def body(**fields: Any) -> bytes:
    base: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    base.update(fields)
    return json.dumps(base).encode()


def parse(**fields: Any) -> ChatCompletionRequest:
    return decode_body(body(**fields), ChatCompletionRequest)


def rejected(raw: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        decode_body(raw, ChatCompletionRequest)
    assert info.value.status == 400
    return info.value


# ---- decode_body

def test_minimal_body_decodes() -> None:
    req = parse()
    assert req.model == "tiny"
    assert req.messages == [ChatMessage(role="user", content="hi")]
    assert req.stream is False
    assert req.n == 1
    assert req.stop_list == []
    assert req.token_limit is None


def test_vendor_extensions_are_tolerated() -> None:
    req = parse(some_vendor_field={"x": 1}, metadata={"a": "b"})
    assert req.model == "tiny"


def test_stop_and_token_limit_helpers() -> None:
    assert parse(stop="END").stop_list == ["END"]
    assert parse(stop=["a", "b"]).stop_list == ["a", "b"]
    assert parse(max_tokens=10).token_limit == 10
    assert parse(max_tokens=10, max_completion_tokens=20).token_limit == 20


@pytest.mark.parametrize("raw", [b"", b"   \n\t"])
def test_empty_body_is_a_400(raw: bytes) -> None:
    err = rejected(raw)
    assert "empty" in err.message


@pytest.mark.parametrize("raw", [b"{", b"{'model': 'x'}", b"\xff\xfe", b"model=tiny"])
def test_invalid_json_is_a_400(raw: bytes) -> None:
    err = rejected(raw)
    assert "JSON" in err.message
    assert err.param is None


@pytest.mark.parametrize("raw", [b"[]", b"null", b'"hello"', b"42"])
def test_non_object_json_is_a_400(raw: bytes) -> None:
    err = rejected(raw)
    assert "object" in err.message


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": "lots"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"n": 0}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stop": 5}, "stop"),
    ({"stop": ["ok", 1]}, "stop[1]"),
    ({"stop": [str(i) for i in range(17)]}, "stop"),
    ({"seed": 1.5}, "seed"),
    ({"model": 3}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 5}]},
     "messages[1].content"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0].text"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
])
def test_wrong_values_name_the_field(fields: dict[str, Any], param: str) -> None:
    err = rejected(body(**fields))
    assert err.param == param
    assert err.code == "invalid_request"
    assert err.error_type == "invalid_request_error"


def test_missing_model_names_model() -> None:
    err = rejected(json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode())
    assert err.param == "model"
    assert "model" in err.message


def test_missing_messages_names_messages() -> None:
    err = rejected(b'{"model": "tiny"}')
    assert err.param == "messages"


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool"])
def test_every_openai_role_is_accepted(role: str) -> None:
    req = parse(messages=[{"role": role, "content": "x"}])
    assert req.messages[0].role == role


def test_an_assistants_refusal_part_reads_as_its_text() -> None:
    req = parse(messages=[{"role": "user", "content": "x"},
                          {"role": "assistant", "content": [
                              {"type": "refusal", "refusal": "I can't help with that."}]},
                          {"role": "user", "content": "ok"}])
    check_supported(req)
    part = req.messages[1].content[0]
    assert (type(part).__name__, part.text) == ("TextPart", "I can't help with that.")
    assert message_dicts(req.messages)[1]["content"] == "I can't help with that."
    from_user = parse(messages=[{"role": "user", "content": [
        {"type": "refusal", "refusal": "no"}]}])
    with pytest.raises(InvalidRequest) as err:
        check_supported(from_user)
    assert err.value.param == "messages[0].content[0].type"
    assert "'assistant'" in err.value.message


@pytest.mark.parametrize("role", ["user", "assistant", "system"])
def test_an_empty_content_array_is_a_400(role: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        check_supported(parse(messages=[{"role": role, "content": []}]))
    assert err.value.param == "messages[0].content" and "empty array" in err.value.message


# ---- check_supported

_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

@pytest.mark.parametrize("fields, param", [
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"verbosity": "low"}, "verbosity"),
    ({"stop": ""}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    # tool calling and structured output: accepted, but not in every combination
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [_TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice"),
    ({"tools": [_TOOL, _TOOL]}, "tools"),
    ({"tools": [_TOOL], "response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema"),
    ({"top_logprobs": 3}, "top_logprobs"),
])
def test_unsupported_parameters_are_a_400_naming_them(fields: dict[str, Any], param: str) -> None:
    req = parse(**fields)
    with pytest.raises(InvalidRequest) as info:
        check_supported(req)
    assert info.value.status == 400
    assert info.value.param == param
    assert param.split("[")[0] in info.value.message


# Images and files are checked against the model later (vision.py); audio never works.
@pytest.mark.parametrize("part, kind", [
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "input_audio"),
])
def test_non_text_content_parts_are_a_400_naming_them(part: dict[str, Any], kind: str) -> None:
    req = parse(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "look:"}, part]},
    ])
    with pytest.raises(InvalidRequest) as info:
        check_supported(req)
    assert info.value.status == 400
    assert info.value.param == "messages[1].content[1].type"
    assert kind in info.value.message


@pytest.mark.parametrize("role", ["user", "system", "developer", "tool"])
def test_missing_content_is_a_400_except_for_assistant(role: str) -> None:
    req = parse(messages=[{"role": role, **({"tool_call_id": "c1"} if role == "tool" else {})}])
    with pytest.raises(InvalidRequest) as info:
        check_supported(req)
    assert info.value.param == "messages[0].content"


def test_assistant_without_content_is_accepted() -> None:
    check_supported(parse(messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "again"},
    ]))


@pytest.mark.parametrize("fields", [
    {},
    {"logprobs": False},
    {"presence_penalty": 0},
    {"presence_penalty": 0.0},
    {"frequency_penalty": 0},
    {"repetition_penalty": 1.0},
    {"logit_bias": {}},
    {"tools": []},
    {"tool_choice": "none"},
    {"parallel_tool_calls": True},
    {"parallel_tool_calls": False},
    {"modalities": ["text"]},
    {"verbosity": "medium"},
    {"verbosity": None},
    {"tools": None, "response_format": None, "logprobs": None},
    {"n": 1},
    {"stop": ["END"], "seed": 1, "user": "u1", "stream": True,
     "stream_options": {"include_usage": True}, "temperature": 0, "top_p": 1,
     "top_k": 0, "min_p": 0, "max_tokens": 1, "max_completion_tokens": 2},
])
def test_harmless_values_are_accepted(fields: dict[str, Any]) -> None:
    check_supported(parse(**fields))


def test_response_format_text_is_accepted() -> None:
    check_supported(parse(response_format={"type": "text"}))


# ---- message_dicts

def test_message_dicts_join_text_parts_and_map_developer_to_system() -> None:
    req = parse(messages=[
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hello, "},
                                     {"type": "text", "text": "world"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ])
    assert message_dicts(req.messages) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hello, world"},
        {"role": "assistant", "content": "Hi."},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]


def test_message_dicts_are_plain_builtins() -> None:
    req = parse(messages=[{"role": "user", "content": "x", "name": "bob"}])
    out = message_dicts(req.messages)
    assert out == [{"role": "user", "content": "x", "name": "bob"}]
    # They cross the process boundary in protocol.Request.
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(out)) == out


# ---- errors: OpenAI's error shape

def test_error_body_has_openai_shape() -> None:
    exc = InvalidRequest("max_tokens must be >= 1", param="max_tokens")
    payload = json.loads(msgspec.json.encode(error_body(exc)))
    assert payload == {"error": {"message": "max_tokens must be >= 1",
                                 "type": "invalid_request_error",
                                 "param": "max_tokens",
                                 "code": "invalid_request"}}


def test_error_body_param_is_null_when_unknown() -> None:
    payload = json.loads(msgspec.json.encode(error_body(RouterError("boom"))))
    assert payload == {"error": {"message": "boom", "type": "server_error", "param": None,
                                 "code": "internal_error"}}


def test_error_body_from_decode_failure() -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_body(body(temperature=9), ChatCompletionRequest)
    payload = json.loads(msgspec.json.encode(error_body(info.value)))
    assert payload["error"]["param"] == "temperature"
    assert payload["error"]["type"] == "invalid_request_error"
    assert set(payload["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("exc, retry_after", [
    (QueueFull("queue full"), "1"),
    (NoMemory("no memory"), "5"),
    (errors.ModelLoadFailed("failed"), "5"),
    (errors.ShuttingDown("bye"), "5"),
    (errors.OutOfMemory("oom"), "1"),
])
def test_retryable_errors_carry_retry_after(exc: RouterError, retry_after: str) -> None:
    headers = error_headers(exc)
    assert headers["Retry-After"] == retry_after
    assert exc.status in (429, 503)


@pytest.mark.parametrize("exc", [
    InvalidRequest("bad"), ContextLengthExceeded("long"), errors.Unauthorized("who"),
    errors.ModelNotFound("which"), errors.WorkerCrashed("dead"), RouterError("x"),
])
def test_other_errors_carry_no_retry_after(exc: RouterError) -> None:
    assert "Retry-After" not in error_headers(exc)


def test_statuses_users_see() -> None:
    assert QueueFull("x").status == 429
    assert QueueFull("x").error_type == "rate_limit_error"
    assert NoMemory("x").status == 503
    assert errors.Unauthorized("x").status == 401
    assert errors.ModelNotFound("x").status == 404
    assert errors.BodyTooLarge("x").status == 413
    assert errors.WorkerCrashed("x").status == 502
    assert errors.Timeout("x").status == 504


@pytest.mark.parametrize("code, cls, status", [
    ("context_length_exceeded", ContextLengthExceeded, 400),
    ("invalid_request", InvalidRequest, 400),
    ("worker_crashed", errors.WorkerCrashed, 502),
    ("model_load_failed", errors.ModelLoadFailed, 503),
    ("no_memory", NoMemory, 503),
    ("out_of_memory", errors.OutOfMemory, 503),
    ("timeout", errors.Timeout, 504),
])
def test_from_code_maps_worker_codes_back(code: str, cls: type[RouterError], status: int
                                          ) -> None:
    exc = from_code(code, "details from the worker")
    assert type(exc) is cls
    assert exc.status == status
    assert exc.code == code
    assert exc.message == "details from the worker"
    assert str(exc) == "details from the worker"


@pytest.mark.parametrize("code", ["something_new", "", "internal_error"])
def test_from_code_unknown_code_is_a_500(code: str) -> None:
    exc = from_code(code, "what happened")
    assert type(exc) is RouterError
    assert exc.status == 500
    assert exc.message == "what happened"


def test_context_length_exceeded_is_an_invalid_request() -> None:
    exc = from_code("context_length_exceeded", "too long")
    assert isinstance(exc, InvalidRequest)
    payload = json.loads(msgspec.json.encode(error_body(exc)))
    assert payload["error"]["code"] == "context_length_exceeded"
    assert payload["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("fields", [
    {"logit_bias": {"50256": -100}}, {"presence_penalty": 0.5}, {"frequency_penalty": -1.0},
    {"repetition_penalty": 1.2},
])
def test_penalties_and_logit_bias_are_honoured_parameters(fields):
    req = decode_body(json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                  **fields}).encode(), ChatCompletionRequest)
    check_supported(req)


@pytest.mark.parametrize("fields, param", [
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias[...]"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_bad_penalties_and_logit_bias_name_the_field(fields, param):
    with pytest.raises(InvalidRequest) as info:
        req = decode_body(json.dumps({"model": "m", "messages": [
            {"role": "user", "content": "x"}], **fields}).encode(), ChatCompletionRequest)
        check_supported(req)
    assert info.value.param == param


@pytest.mark.parametrize("fields", [
    {"tools": [_TOOL]},
    {"tools": [_TOOL], "tool_choice": "required", "parallel_tool_calls": False},
    {"tools": [_TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
    {"tools": [_TOOL], "tool_choice": "none", "response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema",
                         "json_schema": {"name": "x", "schema": {"type": "object"}}}},
    {"logprobs": True, "top_logprobs": 5},
    {"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}},
    *({"reasoning_effort": effort} for effort in ("none", "minimal", "xhigh", "max")),
])
def test_tool_and_format_parameters_are_accepted(fields: dict[str, Any]) -> None:
    check_supported(parse(**fields))


@pytest.mark.parametrize("fields, path", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
])
def test_malformed_tool_and_format_parameters_are_a_400(fields: dict[str, Any], path: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(**fields)
    assert info.value.status == 400
    assert info.value.param is not None and info.value.param.startswith(path.split("[")[0])


def test_tool_dicts_are_what_the_template_sees() -> None:
    req = parse(tools=[_TOOL])
    assert tool_dicts(req) == [_TOOL]
    assert tool_dicts(parse(tools=[_TOOL], tool_choice="none")) is None
    assert tool_dicts(parse()) is None


def test_a_tool_result_must_name_its_call() -> None:
    req = parse(messages=[{"role": "user", "content": "x"}, {"role": "tool", "content": "4"}])
    with pytest.raises(InvalidRequest) as info:
        check_supported(req)
    assert info.value.param == "messages[1].tool_call_id"
    # by the function's name, as chat-templates.md says the named templates take it
    check_supported(parse(messages=[{"role": "user", "content": "x"},
                                    {"role": "tool", "content": "4", "name": "add"}]))


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                         for i in range(700)}}}}]}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(3000)}}}}},
     "response_format.json_schema.schema"),
])
def test_unusable_or_oversized_tools_and_schemas_are_a_400(fields: dict[str, Any],
                                                          param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_supported(parse(**fields))
    assert info.value.param == param


def test_text_offsets_follow_what_each_token_adds() -> None:
    """From a token's bytes where they are its text (byte-level BPE: a lone space shown late
    still starts at 0), else from what the detokenizer showed for it (WordPiece "##ing" adds
    3 characters, not 5)."""
    from mlxrouter.protocol import TokenLogprob
    from mlxrouter.schemas import TextShape

    bpe = TextShape(logprobs=0)._logprobs(0, [TokenLogprob("", -0.1, [], b" "),
                                               TokenLogprob(" 4", -0.1, [], b"4"),
                                               TokenLogprob(",", -0.1, [], b",")])
    naive = TextShape(logprobs=0)._logprobs(0, [TokenLogprob("play", -0.1, [], b"play", 4),
                                                 TokenLogprob("ing", -0.1, [], b"##ing", 3),
                                                 TokenLogprob(" now", -0.1, [], b"now", 4)])
    assert bpe.text_offset == [0, 1, 2]
    assert naive.text_offset == [0, 4, 7]


def test_a_legacy_function_call_in_the_history_is_refused_not_dropped() -> None:
    """The assistant's `function_call` was dropped without a word: the model saw a turn
    with no call in it."""
    req = parse(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None,
         "function_call": {"name": "get_weather", "arguments": "{}"}}])
    with pytest.raises(InvalidRequest, match="legacy .functions. API") as info:
        check_supported(req)
    assert info.value.param == "messages[1].function_call"
    assert "tool_calls" in info.value.message


def test_a_function_role_message_is_told_to_be_a_tool_message() -> None:
    err = rejected(body(messages=[{"role": "function", "name": "f", "content": "1"}]))
    assert err.param == "messages[0].role"
    assert "a function's result is a 'tool' message" in err.message
