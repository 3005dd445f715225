"""Named chat templates, rendered the way a worker renders them: a real tokenizer without a
template of its own, loaded by mlx_lm.load, and its wrapper's apply_chat_template with the
named template passed as `chat_template=` (transformers' sandboxed Jinja environment)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jinja2.exceptions import TemplateError

from mlxrouter.errors import InvalidRequest
from mlxrouter.templates import (
    NAMES,
    TOOL_CALL_TAGS,
    TOOL_FORMAT,
    TemplateNotFound,
    named_template,
    template_source,
)
from tinymodel import build_tiny_llama

pytestmark = pytest.mark.timeout(60)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone.",
    "parameters": {"type": "object", "required": ["timezone"], "properties": {
        "timezone": {"type": "string"}}}}}
TOOLS = [WEATHER, CLOCK]

# What each family shows around a user turn, an assistant turn and as the generation prompt.
USER = {"llama3": "<|start_header_id|>user<|end_header_id|>\n\n", "qwen": "<|im_start|>user\n",
        "chatml": "<|im_start|>user\n", "phi4": "<|user|>", "deepseek": "<｜User｜>",
        "gpt-oss": "<|start|>user<|message|>", "generic": "### User:\n"}
ASSISTANT = {"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
             "qwen": "<|im_start|>assistant\n", "chatml": "<|im_start|>assistant\n",
             "phi4": "<|assistant|>", "deepseek": "<｜Assistant｜>",
             "gpt-oss": "<|start|>assistant<|channel|>final<|message|>",
             "generic": "### Assistant:\n"}
GEN_PROMPT = {"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
              "qwen": "<|im_start|>assistant\n", "chatml": "<|im_start|>assistant\n",
              "phi4": "<|assistant|>", "deepseek": "<｜Assistant｜><think>\n",
              "gpt-oss": "<|start|>assistant", "generic": "### Assistant:\n"}
# The family's tools section: present with tools, absent without.
TOOLS_MARKER = {"llama3": "Environment: ipython", "qwen": "<tools>", "chatml": "<tools>",
                "phi4": "<|tool|>[", "deepseek": "## Tools", "gpt-oss": "namespace functions {",
                "generic": "## Tools"}
# get_weather({"city": "Paris"}) as the family writes a call...
CALL = {
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "qwen": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "chatml": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "phi4": '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|>',
    "deepseek": '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n'
                '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    "gpt-oss": '<|start|>assistant<|channel|>commentary to=functions.get_weather '
               '<|constrain|>json<|message|>{"city": "Paris"}<|call|>',
    "generic": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
}
# ...and its result "sunny, 21C" coming back.
RESULT = {
    "llama3": "<|start_header_id|>ipython<|end_header_id|>\n\nsunny, 21C<|eot_id|>",
    "qwen": "<|im_start|>user\n<tool_response>\nsunny, 21C\n</tool_response><|im_end|>",
    "chatml": '<|im_start|>tool\n<tool_response>\n{"name": "get_weather", "content": "sunny, 21C"}'
              "\n</tool_response><|im_end|>",
    "phi4": "<|tool|>sunny, 21C<|end|>",
    "deepseek": "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny, 21C<｜tool▁output▁end｜>"
                "<｜tool▁outputs▁end｜>",
    "gpt-oss": "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
               "sunny, 21C<|end|>",
    "generic": "### Tool Result (get_weather):\nsunny, 21C\n\n",
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny model's tokenizer with its chat template removed: a model that needs a named one."""
    from mlx_lm import load

    path = build_tiny_llama(tmp_path_factory.mktemp("notemplate") / "m")
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["chat_template"]
    config_file.write_text(json.dumps(config))
    _, tok = load(str(path))
    assert not tok.has_chat_template
    return tok


def render(tok: Any, name: str, messages: list[dict[str, Any]], tools: list | None = None,
           generation_prompt: bool = True, **kwargs: Any) -> str:
    return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                   tokenize=False, chat_template=named_template(name), **kwargs)


def call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


def assert_in_order(text: str, *parts: str) -> None:
    at = 0
    for part in parts:
        found = text.find(part, at)
        assert found >= 0, f"{part!r} missing after offset {at} in:\n{text}"
        at = found + len(part)


CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Count to three"}]


@pytest.mark.parametrize("name", NAMES)
def test_roles_in_order_and_generation_prompt_last(tokenizer: Any, name: str) -> None:
    text = render(tokenizer, name, CHAT)
    assert_in_order(text, "You are terse.", USER[name] + "Hi there",
                    ASSISTANT[name] + "Hello!", USER[name] + "Count to three")
    assert text.endswith(GEN_PROMPT[name])
    without = render(tokenizer, name, CHAT, generation_prompt=False)
    assert text.startswith(without) and not without.endswith(GEN_PROMPT[name])
    assert TOOLS_MARKER[name] not in text


@pytest.mark.parametrize("name", NAMES)
def test_developer_role_is_the_system_prompt(tokenizer: Any, name: str) -> None:
    as_developer = [{"role": "developer", "content": "You are terse."}, *CHAT[1:]]
    assert render(tokenizer, name, as_developer) == render(tokenizer, name, CHAT)


@pytest.mark.parametrize("name", NAMES)
def test_text_parts_are_joined(tokenizer: Any, name: str) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Count "},
                                          {"type": "text", "text": "to three"}]}]
    plain = [{"role": "user", "content": "Count to three"}]
    assert render(tokenizer, name, parts) == render(tokenizer, name, plain)


@pytest.mark.parametrize("name", NAMES)
def test_tools_section_names_every_tool_and_parameter(tokenizer: Any, name: str) -> None:
    text = render(tokenizer, name, CHAT, tools=TOOLS)
    head = text[:text.index(USER[name] + "Hi there")]
    assert TOOLS_MARKER[name] in head
    for word in ("You are terse.", "get_weather", "Current weather in a city.", "city", "unit",
                 "get_time", "timezone"):
        assert word in head, f"{word!r} not in the {name} tools section:\n{head}"


def test_gpt_oss_declares_tools_in_typescript(tokenizer: Any) -> None:
    text = render(tokenizer, "gpt-oss", CHAT, tools=TOOLS)
    assert ("// Current weather in a city.\ntype get_weather = (_: {\n// City name\ncity: string,\n"
            'unit?: "celsius" | "fahrenheit",\n}) => any;') in text
    assert "type get_time = (_: {\ntimezone: string,\n}) => any;" in text
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text


def test_gpt_oss_typescript_for_unions_arrays_and_nested_objects(tokenizer: Any) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {
            "a": {"type": ["string", "null"]},
            "b": {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "string"}}]},
            "c": {"type": "object", "required": ["x"],
                  "properties": {"x": {"type": "boolean", "description": "one\ntwo"}}},
            "d": {"type": "array", "items": {"enum": [1, 2]}}}}}}
    bare = {"type": "function", "function": {"name": "ping"}}
    text = render(tokenizer, "gpt-oss", CHAT, tools=[tool, bare])
    assert ("type f = (_: {\na?: string | null,\nb?: number | string[],\n"
            "c?: {\n// one\n// two\nx: boolean,\n},\nd?: (1 | 2)[],\n}) => any;") in text
    assert "type ping = () => any;" in text


def tool_loop(arguments: Any) -> list[dict[str, Any]]:
    """Two rounds: one call and its result, an answer, then two parallel calls and results."""
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [call("call_1", "get_weather", arguments)]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
        {"role": "assistant", "content": "It is sunny in Paris."},
        {"role": "user", "content": "And Oslo, and the time there?"},
        {"role": "assistant", "content": "",
         "tool_calls": [call("call_2", "get_weather", {"city": "Oslo"}),
                        call("call_3", "get_time", {"timezone": "Europe/Oslo"})]},
        {"role": "tool", "tool_call_id": "call_2", "content": "snow, -3C"},
        {"role": "tool", "tool_call_id": "call_3", "content": "14:05"},
    ]


@pytest.mark.parametrize("name", NAMES)
def test_multi_turn_tool_loop(tokenizer: Any, name: str) -> None:
    text = render(tokenizer, name, tool_loop({"city": "Paris"}), tools=TOOLS)
    oslo = CALL[name].replace("Paris", "Oslo")
    assert_in_order(text, TOOLS_MARKER[name], USER[name] + "Weather in Paris?", CALL[name],
                    RESULT[name], "It is sunny in Paris.", "And Oslo, and the time there?",
                    oslo.split("Oslo")[0], "get_time", "Europe/Oslo", "snow, -3C", "14:05")
    assert text.endswith(GEN_PROMPT[name])
    assert "Oslo" not in text[:text.index("It is sunny in Paris.")]


@pytest.mark.parametrize(("name", "grouped"), [
    ("qwen", "<|im_start|>user\n<tool_response>\nsnow, -3C\n</tool_response>\n"
             "<tool_response>\n14:05\n</tool_response><|im_end|>\n<|im_start|>assistant\n"),
    ("deepseek", "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>snow, -3C<｜tool▁output▁end｜>\n"
                 "<｜tool▁output▁begin｜>14:05<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
                 "<｜Assistant｜>"),
])
def test_consecutive_tool_results_share_one_turn(tokenizer: Any, name: str, grouped: str) -> None:
    assert grouped in render(tokenizer, name, tool_loop({"city": "Paris"}), tools=TOOLS)


@pytest.mark.parametrize("name", NAMES)
def test_arguments_as_json_string_or_object_render_alike(tokenizer: Any, name: str) -> None:
    as_string = render(tokenizer, name, tool_loop(json.dumps({"city": "Paris"})), tools=TOOLS)
    as_object = render(tokenizer, name, tool_loop({"city": "Paris"}), tools=TOOLS)
    assert as_string == as_object


@pytest.mark.parametrize("name", NAMES)
def test_declared_tool_call_tags_frame_the_rendered_call(tokenizer: Any, name: str) -> None:
    start, end = TOOL_CALL_TAGS[name]
    assert CALL[name].startswith(start) and CALL[name].endswith(end)
    text = render(tokenizer, name, tool_loop({"city": "Paris"}), tools=TOOLS)
    assert start in text[text.index("Weather in Paris?"):]


def test_tool_formats_cover_every_template() -> None:
    assert set(TOOL_FORMAT) == set(NAMES) == set(TOOL_CALL_TAGS)
    assert TOOL_FORMAT["qwen"] == TOOL_FORMAT["chatml"] == TOOL_FORMAT["generic"] == "hermes"
    assert TOOL_FORMAT["llama3"] == "llama3_json" and TOOL_FORMAT["gpt-oss"] == "harmony"
    assert TOOL_FORMAT["phi4"] == "phi4" and TOOL_FORMAT["deepseek"] == "deepseek_v3"


def test_qwen_thinking_switch(tokenizer: Any) -> None:
    on = render(tokenizer, "qwen", CHAT, enable_thinking=True)
    off = render(tokenizer, "qwen", CHAT, enable_thinking=False)
    assert on.endswith("<|im_start|>assistant\n") and "<think>" not in on
    assert off == on + "<think>\n\n</think>\n\n"


def test_deepseek_thinking_switch(tokenizer: Any) -> None:
    on = render(tokenizer, "deepseek", CHAT, enable_thinking=True)
    off = render(tokenizer, "deepseek", CHAT, enable_thinking=False)
    assert on.endswith("<｜Assistant｜><think>\n")
    assert off.endswith("<｜Assistant｜></think>")
    assert on.startswith("<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hi there")


@pytest.mark.parametrize("name", ["llama3", "chatml", "phi4", "gpt-oss", "generic"])
def test_thinking_switch_is_ignored_where_the_family_has_none(tokenizer: Any, name: str) -> None:
    assert (render(tokenizer, name, CHAT, enable_thinking=True)
            == render(tokenizer, name, CHAT, enable_thinking=False))


def test_reasoning_is_kept_only_in_the_ongoing_turn(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "OLD THOUGHT"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "reasoning_content": "NEW THOUGHT",
         "tool_calls": [call("c", "get_weather", {"city": "Paris"})]},
        {"role": "tool", "tool_call_id": "c", "content": "sunny, 21C"},
    ]
    qwen = render(tokenizer, "qwen", messages, tools=TOOLS)
    assert "OLD THOUGHT" not in qwen
    assert "<|im_start|>assistant\n<think>\nNEW THOUGHT\n</think>\n\n<tool_call>" in qwen
    harmony = render(tokenizer, "gpt-oss", messages, tools=TOOLS)
    assert "OLD THOUGHT" not in harmony
    assert_in_order(harmony, "<|channel|>analysis<|message|>NEW THOUGHT<|end|>",
                    "to=functions.get_weather", "sunny, 21C")


def test_deepseek_drops_earlier_reasoning_from_content(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "<think>\nOLD THOUGHT\n</think>\n\nA1"},
                {"role": "user", "content": "Q2"}]
    text = render(tokenizer, "deepseek", messages)
    assert "OLD THOUGHT" not in text
    assert "<｜Assistant｜>A1<｜end▁of▁sentence｜><｜User｜>Q2" in text


@pytest.mark.parametrize(("effort", "shown"), [("low", "low"), ("high", "high"),
                                               (None, "medium")])
def test_gpt_oss_reasoning_effort_in_system_message(tokenizer: Any, effort: str | None,
                                                    shown: str) -> None:
    kwargs = {"reasoning_effort": effort} if effort else {}
    text = render(tokenizer, "gpt-oss", CHAT, **kwargs)
    system = text[:text.index("<|end|>")]
    assert system.startswith("<|start|>system<|message|>")
    assert f"\nReasoning: {shown}\n" in system
    assert "# Instructions\n\nYou are terse." in text[len(system):]


def test_gpt_oss_rejects_an_unknown_reasoning_effort(tokenizer: Any) -> None:
    with pytest.raises(TemplateError, match="reasoning_effort must be low, medium or high"):
        render(tokenizer, "gpt-oss", CHAT, reasoning_effort="extreme")


@pytest.mark.parametrize("name", NAMES)
def test_unknown_role_is_an_error_not_dropped(tokenizer: Any, name: str) -> None:
    messages = [*CHAT, {"role": "critic", "content": "bad"}]
    with pytest.raises(TemplateError, match=f'{name} chat template cannot render a message with '
                                            'role "critic"'):
        render(tokenizer, name, messages)


@pytest.mark.parametrize("name", NAMES)
def test_image_part_is_an_error_not_dropped(tokenizer: Any, name: str) -> None:
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(TemplateError, match="renders text only, but a user message has a "
                                            "image_url part"):
        render(tokenizer, name, messages)


def test_gpt_oss_needs_to_know_which_function_a_result_is_from(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Hi"},
                {"role": "tool", "content": "orphan result"}]
    with pytest.raises(TemplateError, match="needs the function name of every tool result"):
        render(tokenizer, "gpt-oss", messages)


@pytest.mark.parametrize("name", NAMES)
def test_a_tool_result_named_by_its_function_renders(tokenizer: Any, name: str) -> None:
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [call("c1", "get_weather", {"city": "Oslo"})]},
                {"role": "tool", "name": "get_weather", "content": "sunny, 21C"}]
    assert "sunny, 21C" in render(tokenizer, name, messages)


def test_deepseek_rejects_a_late_system_message(tokenizer: Any) -> None:
    with pytest.raises(TemplateError, match="system messages at the start"):
        render(tokenizer, "deepseek", [*CHAT, {"role": "system", "content": "late"}])


def test_rendered_prompt_tokenizes_like_the_worker_does(tokenizer: Any) -> None:
    messages = tool_loop({"city": "Paris"})
    kwargs = {"tools": TOOLS, "add_generation_prompt": True, "chat_template": named_template("qwen")}
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    assert ids and all(isinstance(i, int) for i in ids)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(TemplateNotFound) as caught:
        named_template("llama2")
    exc = caught.value
    assert isinstance(exc, InvalidRequest) and isinstance(exc, ValueError)
    assert exc.status == 400 and exc.param == "chat_template"
    assert "'llama2'" in exc.message and all(name in exc.message for name in NAMES)


def test_template_source_takes_a_name_or_a_file(tmp_path: Path) -> None:
    assert template_source("gpt-oss") == named_template("gpt-oss")
    custom = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (tmp_path / "mine.jinja").write_text(custom)
    assert template_source(str(tmp_path / "mine.jinja")) == custom
    assert template_source("mine.jinja", base_dir=tmp_path) == custom
    with pytest.raises(TemplateNotFound, match="chat template file not found: .*absent.jinja"):
        template_source("absent.jinja", base_dir=tmp_path)
    with pytest.raises(TemplateNotFound, match="unknown chat template 'mistral'"):
        template_source("mistral", base_dir=tmp_path)
