"""response_format through the real daemon and worker: the tiny random-weight model's output
parses and validates because decoding is constrained (llguidance), streaming or not."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture
def daemon(start_daemon):
    return start_daemon()


def _schema_format(schema=PERSON, strict=True) -> dict:
    return {"type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": strict}}


@pytest.mark.parametrize("seed", [1, 2])
def test_json_schema_output_validates_from_a_random_model(daemon, seed):
    resp = daemon.openai().chat.completions.create(
        model="tiny", messages=ASK, response_format=_schema_format(), max_tokens=150,
        temperature=1.0, seed=seed)
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_output_is_a_json_object(daemon):
    resp = daemon.openai().chat.completions.create(
        model="tiny", messages=ASK, response_format={"type": "json_object"}, max_tokens=60,
        temperature=0.7, seed=5)
    content = resp.choices[0].message.content
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert content.lstrip().startswith("{")


def test_streamed_json_schema_output_validates_and_matches_non_streamed(daemon):
    client = daemon.openai()
    kwargs = dict(model="tiny", messages=ASK, response_format=_schema_format(),
                  max_tokens=150, temperature=0.9, seed=4)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), PERSON)


def test_unconstrained_output_of_the_same_request_is_not_json(daemon):
    """The check above would be meaningless if the model wrote JSON by itself."""
    resp = daemon.openai().chat.completions.create(
        model="tiny", messages=ASK, max_tokens=30, temperature=1.0, seed=1)
    with pytest.raises(ValueError):
        json.loads(resp.choices[0].message.content)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"$ref": "https://example.com/x.json"}}},
    {"type": "wat"},
    {"$ref": "#"},  # valid JSON Schema, but a grammar that cannot start
    {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(3000)}},
])
def test_schemas_that_cannot_be_enforced_are_a_400(daemon, schema):
    with pytest.raises(openai.BadRequestError) as info:
        daemon.openai().chat.completions.create(
            model="tiny", messages=ASK, response_format=_schema_format(schema), max_tokens=5)
    assert info.value.status_code == 400
    assert info.value.body["param"].startswith("response_format")
    assert info.value.body["message"]


def test_output_complete_at_exactly_max_tokens_is_not_reported_as_cut(daemon):
    """A document the grammar accepts, ending at the max_tokens-th token, said "length", so
    the SDK's parse() raised LengthFinishReasonError over a valid result."""
    schema = {"type": "object", "properties": {"c": {"enum": ["x"]}}, "required": ["c"],
              "additionalProperties": False}
    client = daemon.openai()
    ask = dict(model="tiny", messages=ASK, response_format=_schema_format(schema),
               temperature=0)
    free = client.chat.completions.create(max_tokens=40, **ask)
    assert free.choices[0].message.content == '{"c": "x"}'
    usage = free.usage.completion_tokens  # the document's tokens, and the EOS after them
    exact = client.chat.completions.create(max_tokens=usage - 1, **ask).choices[0]
    assert (exact.message.content, exact.finish_reason) == ('{"c": "x"}', "stop")
    short = client.chat.completions.create(max_tokens=usage - 2, **ask).choices[0]
    assert short.finish_reason == "length" and short.message.content != '{"c": "x"}'
