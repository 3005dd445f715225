"""Tool calls parsed out of recorded model outputs, whatever the chunking: the same calls with
ids and JSON arguments, no markup in content, text that is not a call passed through, and a
call that does not parse kept as content."""

from __future__ import annotations

import json
import logging
import random
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mlxrouter.toolcalls import (
    KNOWN_FORMATS,
    Parsed,
    ToolCallStream,
    ToolFormat,
    detect_format,
    format_by_name,
)

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
                                      "pythonic", "harmony"])
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
