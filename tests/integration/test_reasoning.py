"""Reasoning models: text inside <think>...</think> goes to reasoning_content, never content;
reasoning_response = "disable" drops it."""

from __future__ import annotations

import pytest

from tinymodel import CHATML_TEMPLATE, build_tiny_llama

def reasoning(msg) -> str | None:
    """The openai client keeps unknown fields as extra attributes, absent when not sent."""
    return getattr(msg, "reasoning_content", None)


MESSAGES = [{"role": "user", "content": "Think, then answer: what is 2 + 2?"}]
# Like DeepSeek-R1 / Qwen3 thinking templates: the generation prompt opens the reasoning block.
THINKING_TEMPLATE = CHATML_TEMPLATE.replace("'<|im_start|>assistant\\n'",
                                            "'<|im_start|>assistant\\n<think>\\n'")


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory):
    assert THINKING_TEMPLATE != CHATML_TEMPLATE
    return build_tiny_llama(tmp_path_factory.mktemp("think") / "thinker",
                            chat_template=THINKING_TEMPLATE)


@pytest.fixture(scope="module")
def think_ids(thinking_model):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(thinking_model)
    return tok, tok.convert_tokens_to_ids("</think>")


def test_reasoning_goes_to_reasoning_content_until_the_block_closes(start_daemon,
                                                                    thinking_model, think_ids):
    tok, end_think = think_ids
    client = start_daemon({"thinker": {"path": str(thinking_model)}}).openai()
    thinking = client.chat.completions.create(model="thinker", messages=MESSAGES,
                                              max_tokens=6, temperature=0)
    msg = thinking.choices[0].message
    assert reasoning(msg) and msg.content == ""
    assert "<think>" not in reasoning(msg)
    # Force the closing marker first: everything after it is the answer.
    closed = client.chat.completions.create(
        model="thinker", messages=MESSAGES, max_tokens=3, temperature=0,
        logit_bias={str(end_think): 100})
    assert reasoning(closed.choices[0].message) is None
    assert closed.choices[0].message.content == "</think></think>"  # only the first closes
    streamed = list(client.chat.completions.create(model="thinker", messages=MESSAGES,
                                                   max_tokens=6, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    thought = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                      for c in streamed if c.choices)
    assert (thought, text) == (reasoning(msg), msg.content)


def test_reasoning_can_be_dropped(start_daemon, thinking_model):
    client = start_daemon({"thinker": {"path": str(thinking_model),
                                       "reasoning_response": "disable"}}).openai()
    msg = client.chat.completions.create(model="thinker", messages=MESSAGES, max_tokens=6,
                                         temperature=0).choices[0].message
    assert reasoning(msg) is None and msg.content == ""


def test_stop_strings_and_logprobs_are_about_the_answer(start_daemon, thinking_model,
                                                        think_ids):
    """A stop string met in the reasoning ended the request there, with an empty answer, and
    the reasoning's tokens (and its markers) were among the answer's logprobs, even with
    the reasoning dropped."""
    tok, end_think = think_ids
    daemon = start_daemon({"thinker": {"path": str(thinking_model)},
                           "quiet": {"path": str(thinking_model),
                                     "reasoning_response": "disable"}})
    client = daemon.openai()
    ask = dict(messages=MESSAGES, max_tokens=6, temperature=0)
    thought = reasoning(client.chat.completions.create(
        model="thinker", logit_bias={str(end_think): -100}, **ask).choices[0].message)
    assert len(thought) >= 3
    stopped = client.chat.completions.create(
        model="thinker", logit_bias={str(end_think): -100}, stop=[thought[1:3]],
        **ask).choices[0]
    assert stopped.finish_reason == "length" and reasoning(stopped.message) == thought
    for model in ("thinker", "quiet"):
        inside = client.chat.completions.create(
            model=model, logit_bias={str(end_think): -100}, logprobs=True, **ask).choices[0]
        assert not inside.logprobs or not inside.logprobs.content, inside.logprobs
    closed = client.chat.completions.create(
        model="thinker", messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True,
        logit_bias={str(end_think): 100}).choices[0]
    assert closed.message.content == "</think></think>"
    assert [e.token for e in closed.logprobs.content] == ["</think>", "</think>"]


def test_models_without_an_opened_block_answer_in_content(start_daemon, tiny_model):
    client = start_daemon({"tiny": {"path": str(tiny_model)}}).openai()
    msg = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6,
                                         temperature=0).choices[0].message
    assert msg.content and reasoning(msg) is None


def test_constrained_output_after_an_opened_reasoning_block_is_the_answer(start_daemon,
                                                                         thinking_model):
    """A template that opens <think> (R1, Qwen3-Thinking) must not swallow a forced tool call
    or a response_format answer into reasoning_content: the grammar's output is the answer."""
    import json

    client = start_daemon({"thinker": {"path": str(thinking_model)}}).openai()
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
              "required": ["city"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model="thinker", messages=MESSAGES, max_tokens=40, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "place", "schema": schema, "strict": True}})
    msg = answer.choices[0].message
    assert reasoning(msg) is None
    assert set(json.loads(msg.content)) == {"city"}
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                 "maxLength": 8}},
                       "required": ["city"], "additionalProperties": False}}}
    called = client.chat.completions.create(
        model="thinker", messages=MESSAGES, max_tokens=60, temperature=0, tools=[tool],
        tool_choice="required")
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert reasoning(choice.message) is None
