"""Tool calls parsed out of recorded model outputs, whatever the chunking: the same calls with
ids and JSON arguments, no markup in content, text that is not a call passed through, and a
call that does not parse kept as content. The named chat templates and the parsers must agree:
calls a template renders into an assistant turn come back out of the parser unchanged."""

from __future__ import annotations

import json
import logging
import random
import tomllib
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mlxrouter.chat import template_messages
from mlxrouter.templates import NAMES, TOOL_CALL_TAGS, TOOL_FORMAT, named_template
from mlxrouter.toolcalls import (
    KNOWN_FORMATS,
    Parsed,
    ToolCallStream,
    ToolFormat,
    detect_format,
    format_by_name,
)

pytestmark = pytest.mark.timeout(60)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "tool_outputs"
# Markup of each family that must never reach content once a call was parsed.
MARKUP = {
    "hermes": ["<tool_call>", "</tool_call>", '"arguments"'],
    "qwen3_coder": ["<tool_call>", "<function=", "<parameter="],
    "mistral": ["[TOOL_CALLS]", "[ARGS]"],
    "llama3_json": ["<|python_tag|>", '"parameters"'],
    "pythonic": ["<|python_start|>", "<|python_end|>", "("],
    "lfm2": ["<|tool_call_start|>", "<|tool_call_end|>"],
    "harmony": ["<|channel|>", "<|message|>", "<|start|>", "<|end|>", "<|call|>", "<|return|>",
                "<|constrain|>", "to=functions"],
    "phi4": ["<|tool_call|>", "<|/tool_call|>", '"arguments"'],
    "deepseek_v3": ["<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
                    "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>", "```"],
}


def load_cases() -> list[Any]:
    params = []
    for path in sorted(FIXTURES.glob("*.toml")):
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        tools = json.loads(data["tools"])
        for case in data["case"]:
            params.append(pytest.param(data["format"], tools, case,
                                       id=f"{path.stem}: {case['name']}"))
    return params


CASES = load_cases()


def run(fmt: ToolFormat, tools: list[dict],
        pieces: list[str]) -> tuple[list[Parsed], ToolCallStream]:
    stream = ToolCallStream(fmt, tools)
    out = [stream.feed(p) for p in pieces]
    out.append(stream.finish())
    return out, stream


def random_pieces(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, 5)
        pieces.append(text[i:i + n])
        i += n
    return pieces


def assemble(parsed: list[Parsed]) -> dict[str, Any]:
    """Merge deltas the way an OpenAI client does, checking the delta rules on the way."""
    calls: dict[int, dict[str, Any]] = {}
    for p in parsed:
        for d in p.calls:
            if d.index not in calls:
                assert d.id and d.name, "the first delta of a call carries its id and name"
                calls[d.index] = {"id": d.id, "name": d.name, "arguments": ""}
            else:
                assert d.id is None and d.name is None, "id and name come once"
            calls[d.index]["arguments"] += d.arguments
    assert sorted(calls) == list(range(len(calls))), "indexes count up from 0"
    return {
        "content": "".join(p.content for p in parsed),
        "reasoning": "".join(p.reasoning for p in parsed),
        "calls": [calls[i] for i in sorted(calls)],
    }


def check(fmt_name: str, case: dict[str, Any], got: dict[str, Any], stream: ToolCallStream) -> None:
    assert got["content"] == case["content"]
    assert got["reasoning"] == case.get("reasoning", "")
    assert [c["name"] for c in got["calls"]] == [c["name"] for c in case["calls"]]
    for call, want in zip(got["calls"], case["calls"]):
        assert json.loads(call["arguments"]) == json.loads(want["arguments"])
        assert call["id"] == want.get("id") or (
            "id" not in want and call["id"].startswith("call_") and len(call["id"]) > 10)
    assert len({c["id"] for c in got["calls"]}) == len(got["calls"])
    assert stream.called == bool(case["calls"])
    if case["calls"]:
        for mark in MARKUP[fmt_name]:
            assert mark not in got["content"]


@pytest.mark.parametrize(("fmt_name", "tools", "case"), CASES)
def test_fixture_all_at_once(fmt_name: str, tools: list[dict], case: dict[str, Any]) -> None:
    parsed, stream = run(format_by_name(fmt_name), tools, [case["output"]])
    check(fmt_name, case, assemble(parsed), stream)


@pytest.mark.parametrize(("fmt_name", "tools", "case"), CASES)
def test_fixture_in_small_random_pieces(fmt_name: str, tools: list[dict],
                                        case: dict[str, Any]) -> None:
    fmt = format_by_name(fmt_name)
    whole = assemble(run(fmt, tools, [case["output"]])[0])
    for seed in range(8):
        parsed, stream = run(fmt, tools, random_pieces(case["output"], seed))
        got = assemble(parsed)
        check(fmt_name, case, got, stream)
        assert [(c["name"], c["arguments"]) for c in got["calls"]] == [
            (c["name"], c["arguments"]) for c in whole["calls"]]


@pytest.mark.parametrize(("fmt_name", "tools", "case"), CASES)
def test_fixture_one_char_at_a_time(fmt_name: str, tools: list[dict], case: dict[str, Any]) -> None:
    parsed, stream = run(format_by_name(fmt_name), tools, list(case["output"]))
    check(fmt_name, case, assemble(parsed), stream)


@pytest.mark.parametrize("fmt_name", ["hermes", "qwen3_coder", "mistral", "lfm2", "llama3_json",
                                      "pythonic", "harmony", "phi4", "deepseek_v3"])
def test_plain_text_passes_through_unchanged(fmt_name: str) -> None:
    text = ("Hello, world!  Prices < 5 € and {braces}, [brackets] (parens) | pipes; "
            "日本語 ✓\n\n  trailing spaces and newlines \n\n")
    if fmt_name == "harmony":
        text = "<|channel|>final<|message|>" + text
    expected = text.removeprefix("<|channel|>final<|message|>")
    for seed in range(5):
        parsed, stream = run(format_by_name(fmt_name), [], random_pieces(text, seed))
        got = assemble(parsed)
        assert got["content"] == expected
        assert got["calls"] == [] and not stream.called


def test_content_is_streamed_not_buffered_until_the_end() -> None:
    stream = ToolCallStream(format_by_name("hermes"), [])
    assert stream.feed("Let me ").content == "Let me"  # the space waits: a call may follow
    assert stream.feed("check").content == " check"
    assert stream.feed(" the <").content == " the"  # "<" may open <tool_call>
    assert stream.feed("b>weather</b>").content == " <b>weather</b>"
    assert stream.feed("<tool_").content == ""
    assert stream.feed("call>").content == ""
    part = stream.feed('\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert part.content == "" and [c.name for c in part.calls] == ["get_weather"]
    assert json.loads(part.calls[0].arguments) == {"city": "Paris"}
    end = stream.finish()
    assert end.content == "" and end.calls == [] and stream.called


def test_marker_split_across_feeds() -> None:
    stream = ToolCallStream(format_by_name("hermes"), [])
    pieces = ["Sure.", "<tool", "_ca", "ll>\n{\"name\": \"f\", ", "\"arguments\": {\"x\": [1, 2]}}",
              "\n</tool", "_call", ">"]
    got = assemble([stream.feed(p) for p in pieces] + [stream.finish()])
    assert got["content"] == "Sure."
    assert [(c["name"], json.loads(c["arguments"])) for c in got["calls"]] == [("f", {"x": [1, 2]})]


def test_text_after_a_call_is_content_without_the_gap() -> None:
    parsed, stream = run(format_by_name("hermes"), [], [
        '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n\nDone', " now."])
    got = assemble(parsed)
    assert got["content"] == "Done now."
    assert [c["name"] for c in got["calls"]] == ["f"] and stream.called


def test_each_complete_call_is_emitted_before_the_output_ends() -> None:
    stream = ToolCallStream(format_by_name("hermes"), [])
    first = stream.feed('<tool_call>\n{"name": "a", "arguments": {"n": 1}}\n</tool_call>\n'
                        '<tool_call>\n')
    assert [(c.index, c.name) for c in first.calls] == [(0, "a")]
    second = stream.feed('{"name": "b", "arguments": {"n": 2}}\n</tool_call>')
    assert [(c.index, c.name) for c in second.calls] == [(1, "b")]
    assert stream.finish().calls == []


def test_malformed_call_is_released_as_content_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    raw = 'Hi.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}\n</tool_call>\nBye.'
    with caplog.at_level(logging.WARNING, logger="mlxrouter.toolcalls"):
        parsed, stream = run(format_by_name("hermes"), [], random_pieces(raw, 3))
    got = assemble(parsed)
    assert got["content"] == raw and got["calls"] == [] and not stream.called
    assert any("tool call not parsed" in r.getMessage() for r in caplog.records)


def test_a_call_cut_off_inside_its_end_marker_is_still_a_call() -> None:
    """max_tokens ended the output in "</tool_call>": the call before it is whole. One cut
    inside its arguments stays content, as written."""
    whole = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool'
    for seed in range(3):
        parsed, stream = run(format_by_name("hermes"), [], random_pieces(whole, seed))
        got = assemble(parsed)
        assert got["content"] == "" and stream.called
        assert [(c["name"], json.loads(c["arguments"])) for c in got["calls"]] == [("f", {"x": 1})]
    cut = '<tool_call>\n{"name": "f", "arguments": {"x": 1'
    parsed, stream = run(format_by_name("hermes"), [], [cut])
    assert assemble(parsed)["content"] == cut and not stream.called


def test_an_end_marker_inside_an_argument_does_not_end_the_call() -> None:
    """A coding agent's edit of text holding "</tool_call>" came back as content, no call."""
    args = {"text": "use </tool_call> to close", "n": 1}
    raw = ('<tool_call>\n' + json.dumps({"name": "edit", "arguments": args})
           + '\n</tool_call>\nDone.')
    for seed in range(4):
        parsed, stream = run(format_by_name("hermes"), [], random_pieces(raw, seed))
        got = assemble(parsed)
        assert [(c["name"], json.loads(c["arguments"])) for c in got["calls"]] == [
            ("edit", args)], seed
        assert got["content"] == "Done."
    # a string that never closes: the call ended at its first marker after all, and the
    # next call is still a call
    two = ('<tool_call>\n{"name": "a", "arguments": {"p": "open</tool_call>\n'
           '<tool_call>\n{"name": "b", "arguments": {"q": "/tmp/y"}}\n</tool_call>')
    for seed in range(3):
        parsed, stream = run(format_by_name("hermes"), [], random_pieces(two, seed))
        got = assemble(parsed)
        assert [(c["name"], json.loads(c["arguments"])) for c in got["calls"]] == [
            ("b", {"q": "/tmp/y"})], (seed, got)
        assert got["content"].startswith('<tool_call>\n{"name": "a"')
    unclosed = '<tool_call>\n{"name": "a", "arguments": {"p": "open</tool_call>\nBye.'
    parsed, stream = run(format_by_name("hermes"), [], [unclosed])
    assert assemble(parsed)["content"] == unclosed and not stream.called
    deep = "<tool_call>\n" + "[" * 5000 + "</tool_call>\nAfter."  # past json's depth
    parsed, stream = run(format_by_name("hermes"), [], [deep])
    assert assemble(parsed)["content"] == deep
    # a call that does not parse at its marker, and is not inside a string, is content at once
    broken = '<tool_call>\n{"name": "f", "arguments": {"x": 1}\n</tool_call>\nBye.'
    stream = ToolCallStream(format_by_name("hermes"), [])
    assert stream.feed(broken).content.startswith("<tool_call>")


def test_unknown_tool_name_is_still_a_call(caplog: pytest.LogCaptureFixture) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    with caplog.at_level(logging.INFO, logger="mlxrouter.toolcalls"):
        parsed, stream = run(format_by_name("hermes"), tools, [
            '<tool_call>\n{"name": "launch_rocket", "arguments": {"when": "now"}}\n</tool_call>'])
    assert [c["name"] for c in assemble(parsed)["calls"]] == ["launch_rocket"] and stream.called
    assert any("launch_rocket" in r.getMessage() for r in caplog.records)


def test_harmony_reasoning_streams_before_the_answer() -> None:
    stream = ToolCallStream(format_by_name("harmony"), [])
    first = stream.feed("<|channel|>analysis<|message|>Thinking about it")
    assert first.reasoning == "Thinking about it" and first.content == ""
    second = stream.feed(" more.<|end|><|start|>assistant<|channel|>final<|message|>The answer")
    assert second.reasoning == " more." and second.content == "The answer"
    assert stream.finish().content == ""


def test_llama3_json_answer_is_released_once_it_cannot_be_a_call() -> None:
    stream = ToolCallStream(format_by_name("llama3_json"), [])
    assert stream.feed("{").content == ""  # could still open a call
    assert stream.feed('"answer": ').content == '{"answer":'  # the space waits for what follows
    assert stream.feed("42}").content == " 42}"
    assert stream.finish().content == "" and not stream.called


def test_format_by_name_knows_every_listed_name_and_rejects_others() -> None:
    for name in KNOWN_FORMATS:
        fmt = format_by_name(name)
        assert isinstance(fmt, ToolFormat) and callable(fmt.parse)
        assert fmt.style != "marked" or fmt.start
    with pytest.raises(ValueError, match="unknown tool-call format 'nope'"):
        format_by_name("nope")


@pytest.mark.parametrize(("template", "expected"), [
    ("{{- '<|start|>assistant<|channel|>commentary to=functions.' + name }}"
     "{{- '<|message|>' + args + '<|call|>' }}", "harmony"),
    ('Respond in the format {"name": function name, "parameters": dictionary of argument name '
     "and its value}. Do not use variables.", "llama3_json"),
    ("respond in the format [func_name1(params_name1=params_value1, "
     "params_name2=params_value2...), func_name2(params)]", "pythonic"),
    ("{{- '<|im_start|>' + message.role + '\\n' + message.content }}", None),
    # Phi-4-mini's own template declares tools in the system turn and names no call marker.
    ("{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] "
     "+ '<|/tool|>' + '<|end|>' }}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}",
     "phi4"),
    ("{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + "
     "'<｜tool▁sep｜>' + tool['function']['name'] + '\\n```json\\n' + args + '\\n```"
     "<｜tool▁call▁end｜>'}}", "deepseek_v3"),
    # Granite writes <|tool_call|> too, but it is not Phi's format (no end marker, no <|tool|>).
    ("{{- '<|start_of_role|>assistant<|end_of_role|><|tool_call|>' + message.tool_calls | tojson "
     "+ '<|end_of_text|>' }}", None),
    (named_template("phi4"), "phi4"),
    (named_template("deepseek"), "deepseek_v3"),
])
def test_detect_format_sniffs_templates_mlx_lm_does_not_know(template: str,
                                                            expected: str | None) -> None:
    tokenizer = SimpleNamespace(tool_parser=None, tool_call_start=None, tool_call_end=None,
                                chat_template=template)
    fmt = detect_format(tokenizer)
    assert (fmt.name if fmt else None) == expected


def test_detect_format_on_the_tiny_model_and_its_streaming_detokenizer(tiny_model: Path) -> None:
    """The real path: mlx-lm picks json_tools for the tiny ChatML model; tokens of a call are
    detokenized one at a time, and each step's text segment is fed as the engine does."""
    from mlx_lm.tokenizer_utils import load

    tokenizer = load(tiny_model)
    fmt = detect_format(tokenizer)
    assert fmt is not None
    assert (fmt.name, fmt.style, fmt.start, fmt.end) == ("hermes", "marked", "<tool_call>",
                                                         "</tool_call>")
    text = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Zürich", "unit": "celsius"}}\n</tool_call>')
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<tool_call>") in ids  # one added token, not bytes
    detok = tokenizer.detokenizer
    stream = ToolCallStream(fmt, [])
    parsed = []
    for token in ids:
        detok.add_token(token)
        parsed.append(stream.feed(detok.last_segment))
    detok.finalize()
    parsed.append(stream.feed(detok.last_segment))
    parsed.append(stream.finish())
    got = assemble(parsed)
    assert got["content"] == "I will check."
    assert [(c["name"], json.loads(c["arguments"])) for c in got["calls"]] == [
        ("get_weather", {"city": "Zürich", "unit": "celsius"})]


# ---- templates and parsers agree

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "options": {"type": "object"}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Current time.",
    "parameters": {"type": "object", "properties": {}}}}
QUESTION = "What is the weather in Zürich, and what time is it?"
# The text the generation prompt ends with, after which the model writes its answer; and the
# end-of-turn token an engine drops (eos) before the output reaches the parser.
ASSISTANT_HEADER = {"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                    "qwen": "<|im_start|>assistant\n", "chatml": "<|im_start|>assistant\n",
                    "phi4": "<|assistant|>", "deepseek": "<｜Assistant｜>",
                    "gpt-oss": "<|start|>assistant", "generic": "### Assistant:\n"}
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen": "<|im_end|>\n", "chatml": "<|im_end|>\n",
               "phi4": "<|end|>", "deepseek": "<｜end▁of▁sentence｜>", "gpt-oss": "<|call|>",
               "generic": "\n\n"}


def jinja_render(name: str, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    """A named template rendered as transformers' apply_chat_template renders it: a sandboxed
    environment with trim_blocks/lstrip_blocks, loop controls, raise_exception, strftime_now and
    a tojson that keeps non-ASCII text."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(named_template(name)).render(
        messages=template_messages(messages), tools=[WEATHER, CLOCK],
        add_generation_prompt=generation_prompt)


def assistant_output(name: str, assistant: dict[str, Any]) -> str:
    """What a model prompted with template `name` writes to produce `assistant`: the rendered
    assistant turn after the generation prompt's header, without its end-of-turn token."""
    user = {"role": "user", "content": QUESTION}
    prompt = jinja_render(name, [user], generation_prompt=True)
    header = ASSISTANT_HEADER[name]
    # DeepSeek's prompt also opens R1's <think>, which the reasoning splitter takes care of.
    assert prompt.endswith(header) or prompt.endswith(header + "<think>\n"), prompt[-80:]
    full = jinja_render(name, [user, assistant], generation_prompt=False)
    start = full.index(header, full.index(QUESTION)) + len(header)
    turn = full[start:]
    assert turn.endswith(END_OF_TURN[name]), turn[-80:]
    return turn.removesuffix(END_OF_TURN[name])


# Arguments as an OpenAI client sends them (a JSON string) and as an object, with what trips
# parsers: nesting, non-ASCII text, quotes, backslashes, brackets and braces inside strings.
CALLS = [
    ("get_weather", {"city": "Zürich \"Altstadt\" 東京 🌦", "options": {
        "units": ["°C", "km/h"], "path": "C:\\tmp\\x", "braces": "}{][)(",
        "deep": {"list": [1, 2.5, None, True, {"k": "v"}]}}}),
    ("get_time", {}),
]


def assistant_message(content: str | None) -> dict[str, Any]:
    calls = [{"id": f"call_{i}", "type": "function",
              "function": {"name": name, "arguments": json.dumps(args) if i == 0 else args}}
             for i, (name, args) in enumerate(CALLS)]
    return {"role": "assistant", "content": content, "tool_calls": calls}


@pytest.mark.parametrize("template", NAMES)
def test_every_named_template_has_a_parser_with_its_markers(template: str) -> None:
    fmt = format_by_name(TOOL_FORMAT[template])
    assert isinstance(fmt, ToolFormat) and callable(fmt.parse)
    if fmt.style == "marked":
        assert (fmt.start, fmt.end) == TOOL_CALL_TAGS[template]
    else:
        assert TOOL_CALL_TAGS[template] == ("", "")


@pytest.mark.parametrize("template", NAMES)
def test_calls_rendered_by_a_named_template_parse_back(template: str) -> None:
    output = assistant_output(template, assistant_message(None))
    fmt = format_by_name(TOOL_FORMAT[template])
    for pieces in ([output], list(output), random_pieces(output, 7)):
        parsed, stream = run(fmt, [WEATHER, CLOCK], pieces)
        got = assemble(parsed)
        assert got["content"] == "" and stream.called, output
        assert [(c["name"], json.loads(c["arguments"])) for c in got["calls"]] == CALLS, output


# Llama 3.1 writes a call as the whole answer; text before the JSON makes it an answer.
@pytest.mark.parametrize("template", [n for n in NAMES if TOOL_FORMAT[n] != "llama3_json"])
def test_text_before_calls_rendered_by_a_named_template_stays_content(template: str) -> None:
    output = assistant_output(template, assistant_message("Let me look that up."))
    parsed, stream = run(format_by_name(TOOL_FORMAT[template]), [WEATHER, CLOCK],
                         random_pieces(output, 11))
    got = assemble(parsed)
    assert got["content"] == "Let me look that up." and stream.called, output
    assert [(c["name"], json.loads(c["arguments"])) for c in got["calls"]] == CALLS, output


def test_deepseek_calls_come_out_when_their_block_closes() -> None:
    """Calls of one block are emitted together, in order, once <｜tool▁calls▁end｜> arrives."""
    stream = ToolCallStream(format_by_name("deepseek"), [])
    first = stream.feed("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>a\n"
                        "```json\n{\"n\": 1}\n```<｜tool▁call▁end｜>\n")
    assert first.calls == [] and first.content == ""
    second = stream.feed("<｜tool▁call▁begin｜>b<｜tool▁sep｜>{\"n\": 2}<｜tool▁call▁end｜>"
                         "<｜tool▁calls▁end｜>")
    assert [(c.index, c.name, json.loads(c.arguments)) for c in second.calls] == [
        (0, "a", {"n": 1}), (1, "b", {"n": 2})]
    end = stream.finish()
    assert end.calls == [] and end.content == "" and stream.called
