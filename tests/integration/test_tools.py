"""Tool calling through the real daemon, worker and tiny model, with the official openai client:
forced calls (constrained decoding) are valid, streamed deltas reassemble to the same call, a
multi-turn tool loop goes back through the chat template, and tool-call markup never shows up
in content."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in London?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture
def daemon(start_daemon):
    return start_daemon()


def _assert_valid_call(call, names=("get_weather",)) -> dict:
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name in names
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


def _named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def test_named_tool_choice_gives_a_valid_call_even_from_a_random_model(daemon):
    client = daemon.openai()
    for seed in (1, 2, 3):
        resp = client.chat.completions.create(
            model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice=_named("get_weather"),
            max_tokens=120, temperature=1.0, seed=seed)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert len(choice.message.tool_calls) == 1
        _assert_valid_call(choice.message.tool_calls[0])
        assert not choice.message.content  # the call's markup is not content


@pytest.mark.parametrize("template", ["llama3", "phi4"])
def test_a_forced_call_in_the_llama3_and_phi4_formats_is_parsed(start_daemon, tiny_model,
                                                                template):
    """Forced in the format's own shape ("parameters" for Llama 3, a list for phi4) and read
    back as a tool call."""
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "chat_template": template}})
    resp = daemon.openai().chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], tool_choice=_named("get_weather"),
        max_tokens=120, temperature=1.0, seed=3)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert len(choice.message.tool_calls) == 1
    _assert_valid_call(choice.message.tool_calls[0])


def test_stop_strings_never_cut_a_forced_call(daemon):
    """A forced call is all markup and JSON, and a stop string matched inside it ("}" here)
    cut it: no call came back, only raw markup as content with finish_reason "stop"."""
    for stop in (["}"], ["get_weather", '"city"']):
        choice = daemon.openai().chat.completions.create(
            model="tiny", messages=ASK, tools=[WEATHER], tool_choice=_named("get_weather"),
            max_tokens=120, temperature=0, stop=stop).choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1 and not choice.message.content
        _assert_valid_call(choice.message.tool_calls[0])


def test_required_tool_choice_calls_one_of_the_tools(daemon):
    client = daemon.openai()
    resp = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
        max_tokens=120, temperature=0.9, seed=7)
    assert resp.choices[0].finish_reason == "tool_calls"
    for call in resp.choices[0].message.tool_calls:
        _assert_valid_call(call, names=("get_weather", "get_time"))


def test_streamed_tool_call_deltas_reassemble_to_the_non_streamed_call(daemon):
    client = daemon.openai()
    kwargs = dict(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required",
                  max_tokens=120, temperature=0.8, seed=11)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            if piece.index not in calls:  # the first piece of a call carries id, type, name
                assert piece.id and piece.id.startswith("call_")
                assert piece.type == "function" and piece.function.name
                calls[piece.index] = {"name": piece.function.name, "arguments": ""}
            else:
                assert not piece.function.name
            calls[piece.index]["arguments"] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert "<tool_call>" not in content and "</tool_call>" not in content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole]


def test_a_streamed_calls_logprobs_come_with_its_deltas(start_daemon, tiny_model):
    """The call's markup shows nothing: its tokens' entries go out with the next delta that
    shows something, never in chunks of their own (one token per read: the delay)."""
    daemon = start_daemon({"tiny": {"path": str(tiny_model),
                                    "fault": {"delay_per_token_s": 0.02}}})
    client = daemon.openai()
    kwargs = dict(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required",
                  max_tokens=120, temperature=0.8, seed=11, logprobs=True)
    whole = client.chat.completions.create(**kwargs)
    entries, bare = [], []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices or not chunk.choices[0].logprobs:
            continue
        entries += [e.token for e in chunk.choices[0].logprobs.content]
        delta = chunk.choices[0].delta
        if not (delta.content or delta.tool_calls):
            bare.append(chunk)
    assert entries == [e.token for e in whole.choices[0].logprobs.content]
    assert bare == []


def test_multi_turn_tool_loop_renders_the_call_and_its_result(daemon, tokenizer):
    client = daemon.openai()
    first = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=120,
        temperature=0.5, seed=3)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 11}'},
    ]
    second = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER],
                                            max_tokens=5, temperature=0)
    assert second.choices[0].finish_reason in ("length", "stop")
    assert second.choices[0].message.content is not None
    template_messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": json.loads(call.function.arguments)}}]},
        messages[-1],
    ]
    rendered = tokenizer.apply_chat_template(template_messages, tools=[WEATHER],
                                             add_generation_prompt=True, tokenize=False)
    assert "<tool_response>\n{\"temperature_c\": 11}\n</tool_response>" in rendered
    assert second.usage.prompt_tokens == len(tokenizer.encode(rendered,
                                                              add_special_tokens=False))


def test_tool_choice_none_leaves_the_tools_out_of_the_prompt(daemon):
    client = daemon.openai()
    with_tools = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER],
                                                max_tokens=1, temperature=0)
    without = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER],
                                             tool_choice="none", max_tokens=1, temperature=0)
    plain = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=1,
                                           temperature=0)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens
    assert without.usage.prompt_tokens == plain.usage.prompt_tokens


def test_auto_tool_choice_with_plain_text_output_is_content(daemon):
    resp = daemon.openai().chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], max_tokens=8, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.tool_calls is None
    assert choice.message.content


def test_tools_to_a_model_with_tools_turned_off_is_a_400(start_daemon, tiny_model):
    daemon = start_daemon({"notools": {"path": str(tiny_model), "supports_tools": False}})
    with pytest.raises(openai.BadRequestError) as info:
        daemon.openai().chat.completions.create(model="notools", messages=ASK, tools=[WEATHER],
                                                max_tokens=4)
    assert info.value.body["param"] == "tools"
    assert "notools" in info.value.body["message"]
    ok = daemon.openai().chat.completions.create(model="notools", messages=ASK, max_tokens=2)
    assert ok.choices[0].message.content is not None


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": _named("nope")}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_inconsistent_tool_requests_are_a_400_naming_the_parameter(daemon, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        daemon.openai().chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER],
                                                max_tokens=4, **extra)
    assert info.value.body["param"] == param


@pytest.mark.parametrize("choice", ["required", _named("f")])
@pytest.mark.parametrize("params, problem", [
    ({"type": "object", "properties": {"a": {"type": "strang"}}}, "strang"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}},
     "uniqueItems"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(a"}}},
     "unclosed group"),
])
def test_a_tool_schema_a_forced_call_cannot_take_is_a_400_from_the_daemon(start_daemon,
                                                                        tiny_model, choice,
                                                                        params, problem):
    """A forced call loaded the model first to answer a 400 that quoted llguidance's whole
    grammar; the cause of a regex error is on the message's last line."""
    daemon = start_daemon()
    bad = {"type": "function", "function": {"name": "f", "strict": True, "parameters": params}}
    with pytest.raises(openai.BadRequestError) as info:
        daemon.openai().chat.completions.create(model="tiny", messages=ASK, max_tokens=2,
                                                tools=[WEATHER, bad], tool_choice=choice)
    body = info.value.body
    assert body["param"] == "tools[1].function.parameters"
    assert problem in body["message"] and "function 'f'" in body["message"]
    assert "x-guidance" not in body["message"] and len(body["message"]) < 400
    assert not daemon.worker_processes()  # no worker was started for it


def test_auto_tool_choice_takes_a_schema_only_constrained_decoding_cannot(daemon):
    """A look-ahead pattern is valid JSON Schema: auto uses no grammar and must take it."""
    odd = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "^(?!foo).*$"}}}}}
    reply = daemon.openai().chat.completions.create(model="tiny", messages=ASK, max_tokens=2,
                                                    tools=[odd])
    assert reply.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_forced_choice_on_a_format_the_grammar_cannot_write_is_a_400(start_daemon, tiny_model):
    daemon = start_daemon({"mistral": {"path": str(tiny_model), "tool_call_format": "mistral"}})
    client = daemon.openai()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="mistral", messages=ASK, tools=[WEATHER],
                                       tool_choice="required", max_tokens=40)
    assert info.value.body["param"] == "tool_choice"
    assert "mistral" in info.value.body["message"]
    # auto still works for it, and the worker is fine
    ok = client.chat.completions.create(model="mistral", messages=ASK, tools=[WEATHER],
                                        max_tokens=3)
    assert ok.choices[0].finish_reason == "length"


def test_a_forced_call_cut_by_max_tokens_is_length_and_its_text_is_kept(daemon):
    resp = daemon.openai().chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=6,
        temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.tool_calls is None
    assert choice.message.content.startswith("<tool_call>")  # the model's output is not lost


def test_a_call_nested_too_deep_to_parse_fails_no_other_request(daemon, tokenizer):
    # The grammar lets a recursive schema nest without end; logit_bias makes the model open
    # ~1100 arrays. Python's parsers give up on such depth (RecursionError): that must stay
    # this request's problem, never end the worker and its other requests.
    import threading

    nest = {"type": "array", "items": {"$ref": "#/$defs/n"}}
    tool = {"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}},
                                    "required": ["a"], "$defs": {"n": nest}}}}
    bracket = tokenizer.convert_tokens_to_ids("[")
    assert daemon.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": ASK, "max_tokens": 1}).status_code == 200
    pid = daemon.wait_worker("tiny")
    other: dict = {}

    def bystander() -> None:
        other["resp"] = daemon.http.post("/v1/chat/completions", json={
            "model": "tiny", "messages": ASK, "max_tokens": 200, "temperature": 0,
            "logit_bias": {str(t): -100 for t in tokenizer.eos_token_ids}})

    thread = threading.Thread(target=bystander)
    thread.start()
    deep = daemon.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": ASK, "tools": [tool], "tool_choice": _named("f"),
        "logit_bias": {str(bracket): 100}, "temperature": 0, "max_tokens": 1100}, timeout=120)
    thread.join(120)
    assert deep.status_code == 200, deep.text
    choice = deep.json()["choices"][0]
    assert choice["finish_reason"] == "length" and not choice["message"].get("tool_calls")
    assert choice["message"]["content"].count("[") > 1000  # released as text, not lost
    assert other["resp"].status_code == 200, other["resp"].text
    assert other["resp"].json()["usage"]["completion_tokens"] == 200
    assert daemon.worker_pid("tiny") == pid
