"""Constrained decoding: response_format and forced tool calls hold even for a random model.

Grammar builders are checked through llguidance matchers on the tiny model's tokenizer
(does a document match, is a special token required); generation runs in-process through
mlx-lm's BatchGenerator with the real tiny random-weight model, greedy and sampled.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import jsonschema
import llguidance
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from mlxrouter.constrain import (
    ConstraintError,
    ConstraintFactory,
    _limits,
    _short,
    check_tool_schemas,
    grammar_for_response_format,
    grammar_for_tool_call,
)
from mlxrouter.errors import InvalidRequest, error_body, error_headers

pytestmark = pytest.mark.timeout(60)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "pet": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/pet"}]},
    },
    "required": ["name", "age", "tags", "pet"],
    "additionalProperties": False,
    "$defs": {"pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
                      "required": ["kind"], "additionalProperties": False}},
}

WEATHER = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"hours": {"type": "integer", "minimum": 0, "maximum": 23}},
    "required": ["hours"], "additionalProperties": False}}}
PING = {"type": "function", "function": {"name": "ping"}}
TOOLS = [WEATHER, TIME, PING]
HERMES = ("<tool_call>\n", "\n</tool_call>")


def json_schema_format(schema: dict, strict: bool | None = True) -> dict:
    spec = {"name": "out", "schema": schema}
    if strict is not None:
        spec["strict"] = strict
    return {"type": "json_schema", "json_schema": spec}


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load(str(tiny_model))


@pytest.fixture(scope="module")
def factory(loaded) -> ConstraintFactory:
    return ConstraintFactory(loaded[1])


def matches(factory: ConstraintFactory, grammar: str, tokens: list[int]) -> bool:
    """Whether the grammar accepts exactly these tokens as a complete output."""
    matcher = llguidance.LLMatcher(factory.ll_tokenizer, grammar, log_level=0,
                                   limits=_limits())  # as the worker builds them
    return matcher.consume_tokens(tokens) and matcher.is_accepting()


def text_matches(factory: ConstraintFactory, grammar: str, text: str) -> bool:
    return matches(factory, grammar, factory.ll_tokenizer.tokenize_str(text))


def generate(loaded, prompt: str, jobs: list[tuple[list, object]], max_tokens: int = 64):
    """Run one batch through BatchGenerator: jobs are (logits processors, sampler or None);
    returns (token ids, finish_reason) per job."""
    model, tokenizer = loaded
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True)
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids])
    try:
        uids = gen.insert([ids] * len(jobs), max_tokens=[max_tokens] * len(jobs),
                          samplers=[s for _, s in jobs],
                          logits_processors=[p for p, _ in jobs])
        out: dict[int, list[int]] = {u: [] for u in uids}
        finished: dict[int, str] = {}
        while len(finished) < len(uids):
            for r in gen.next_generated():
                out[r.uid].append(r.token)
                if r.finish_reason:
                    finished[r.uid] = r.finish_reason
    finally:
        gen.close()
    return [(out[u], finished[u]) for u in uids]


def greedy_and_sampled(factory: ConstraintFactory, grammar: str, n_sampled: int = 3):
    """One greedy job and n sampled ones (temperature 1), each with its own processor."""
    mx.random.seed(7)
    jobs = [([factory.processor(grammar)], None)]
    jobs += [([factory.processor(grammar)], make_sampler(temp=1.0)) for _ in range(n_sampled)]
    return jobs


# Daemon side: grammars from response_format.


def test_text_format_has_no_grammar():
    assert grammar_for_response_format({"type": "text"}) is None


def test_json_schema_grammar_accepts_valid_and_rejects_invalid_documents(factory):
    grammar = grammar_for_response_format(json_schema_format(PERSON))
    good = '{"name": "Ann", "age": 31, "tags": ["a"], "pet": {"kind": "cat"}}'
    jsonschema.validate(json.loads(good), PERSON)
    assert text_matches(factory, grammar, good)
    for bad in ['{"name": "Ann", "age": 31, "tags": ["a"]}',  # missing required
                '{"name": "Ann", "age": 200, "tags": [], "pet": null}',  # above maximum
                '{"name": "Ann", "age": 3, "tags": ["c"], "pet": null}',  # not in enum
                '{"name": "Ann", "age": 3, "tags": [], "pet": null, "x": 1}']:  # closed
        assert not text_matches(factory, grammar, bad), bad


@pytest.mark.parametrize(("schema", "feature"), [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}},
     "uniqueItems"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "zipcode"}}},
     "zipcode"),
])
def test_unsupported_feature_with_strict_is_a_400_naming_it(schema, feature):
    with pytest.raises(InvalidRequest) as info:
        grammar_for_response_format(json_schema_format(schema, strict=True))
    body = error_body(info.value)
    assert info.value.status == 400
    assert body.error.type == "invalid_request_error"
    assert body.error.param == "response_format.json_schema.schema"
    assert feature in body.error.message


def test_without_strict_unsupported_keywords_are_ignored_but_the_rest_holds(factory):
    schema = {"type": "object", "properties": {"n": {"type": "integer"},
                                                "s": {"type": "array", "uniqueItems": True}},
              "required": ["n"], "additionalProperties": False}
    for strict in (False, None):
        grammar = grammar_for_response_format(json_schema_format(schema, strict=strict))
        assert text_matches(factory, grammar, '{"n": 5, "s": [1, 1]}')
        assert not text_matches(factory, grammar, '{"n": "five"}')


def test_the_gateway_struct_works_like_the_dict(factory):
    import msgspec

    from mlxrouter.schemas import ResponseFormat

    rf = msgspec.convert(json_schema_format(PERSON), ResponseFormat)
    grammar = grammar_for_response_format(rf)
    assert text_matches(factory, grammar, '{"name": "A", "age": 1, "tags": [], "pet": null}')
    assert not text_matches(factory, grammar, '{"name": "A"}')


@pytest.mark.parametrize(("response_format", "param"), [
    (json_schema_format({"type": "wat"}, strict=False), "response_format.json_schema.schema"),
    (json_schema_format({"$ref": "https://example.com/s.json"}, strict=False),
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "yaml"}, "response_format.type"),
])
def test_broken_response_format_is_a_400(response_format, param):
    with pytest.raises(InvalidRequest) as info:
        grammar_for_response_format(response_format)
    assert info.value.status == 400 and info.value.param == param


def test_json_object_allows_any_object_and_nothing_else(factory):
    grammar = grammar_for_response_format({"type": "json_object"})
    assert text_matches(factory, grammar, '{"a": [1, {"b": null}], "c": "d"}')
    assert text_matches(factory, grammar, "{}")
    for bad in ['[1, 2]', '"text"', '{"a": 1', 'Sure! {"a": 1}', '{"a": 1}\n\nDone']:
        assert not text_matches(factory, grammar, bad), bad


def test_daemon_side_builders_import_no_mlx():
    code = (
        "import sys, mlxrouter.constrain as c\n"
        "c.grammar_for_response_format({'type': 'json_object'})\n"
        "c.grammar_for_tool_call([{'type': 'function', 'function': {'name': 'f'}}], "
        "'required', '<tool_call>', '</tool_call>')\n"
        "heavy = {'mlx', 'mlx_lm', 'mlx_vlm', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr


# Tool-call grammars.


def call_tokens(factory: ConstraintFactory, body: dict, markers: bool = True) -> list[int]:
    tok = factory.ll_tokenizer
    inner = tok.tokenize_str("\n" + json.dumps(body) + "\n")
    if not markers:
        return tok.tokenize_str(json.dumps(body))
    return [factory.special_tokens["<tool_call>"], *inner, factory.special_tokens["</tool_call>"]]


def test_required_tool_call_grammar_allows_each_tool_with_valid_arguments(factory):
    grammar = factory.tool_call_grammar(TOOLS, "required", *HERMES)
    for body in [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}},
                 {"name": "get_time", "arguments": {"hours": 7}},
                 {"name": "ping", "arguments": {}}]:
        assert matches(factory, grammar, call_tokens(factory, body)), body
    for body in [{"name": "get_weather", "arguments": {"city": "Paris"}},
                 {"name": "get_time", "arguments": {"hours": 24}},
                 {"name": "get_date", "arguments": {}},
                 {"name": "ping", "arguments": {"x": 1}}]:
        assert not matches(factory, grammar, call_tokens(factory, body)), body


def test_named_tool_choice_allows_only_that_tool(factory):
    grammar = factory.tool_call_grammar(
        TOOLS, {"type": "function", "function": {"name": "get_time"}}, *HERMES)
    assert matches(factory, grammar, call_tokens(
        factory, {"name": "get_time", "arguments": {"hours": 3}}))
    assert not matches(factory, grammar, call_tokens(
        factory, {"name": "ping", "arguments": {}}))


def test_markers_that_are_special_tokens_must_be_those_tokens(factory):
    body = {"name": "ping", "arguments": {}}
    text = HERMES[0] + json.dumps(body) + HERMES[1]
    spelled = [t for ch in text for t in factory.ll_tokenizer.tokenize_str(ch)]
    assert factory.ll_tokenizer.decode_str(spelled) == text
    assert factory.special_tokens["<tool_call>"] not in spelled
    with_specials = factory.tool_call_grammar(TOOLS, "required", *HERMES)
    assert matches(factory, with_specials, call_tokens(factory, body))
    assert not matches(factory, with_specials, spelled)
    # Without the tokenizer's special tokens (a model whose markers are plain text).
    plain = grammar_for_tool_call(TOOLS, "required", *HERMES)
    assert matches(factory, plain, spelled)


def test_bare_json_call_without_markers(factory):
    grammar = grammar_for_tool_call(TOOLS, "required")
    body = {"name": "get_time", "arguments": {"hours": 0}}
    assert matches(factory, grammar, call_tokens(factory, body, markers=False))


def test_a_forced_call_takes_the_arguments_key_of_the_models_format(factory):
    """Llama 3 writes "parameters" (its template and parser say so): forcing "arguments"
    made the model write what it was never trained on."""
    grammar = factory.tool_call_grammar(TOOLS, "required", args_key="parameters")
    tok = factory.ll_tokenizer
    assert matches(factory, grammar, tok.tokenize_str(
        json.dumps({"name": "get_time", "parameters": {"hours": 1}})))
    assert not matches(factory, grammar, tok.tokenize_str(
        json.dumps({"name": "get_time", "arguments": {"hours": 1}})))
    # phi4's list between its markers, as the engine asks for it
    listed = grammar_for_tool_call(TOOLS, "required", "<|tool_call|>[", "]<|/tool_call|>")
    assert matches(factory, listed, tok.tokenize_str(
        '<|tool_call|>[{"name": "ping", "arguments": {}}]<|/tool_call|>'))


def test_max_calls_bounds_the_number_of_calls(factory):
    one = call_tokens(factory, {"name": "ping", "arguments": {}})
    newline = factory.ll_tokenizer.tokenize_str("\n")
    two, three = one + newline + one, one + newline + one + newline + one
    single = factory.tool_call_grammar(TOOLS, "required", *HERMES)
    double = factory.tool_call_grammar(TOOLS, "required", *HERMES, max_calls=2)
    assert matches(factory, single, one) and not matches(factory, single, two)
    assert matches(factory, double, two) and not matches(factory, double, three)


@pytest.mark.parametrize(("tools", "choice", "param"), [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ([], "required", "tools"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "required", "tools[0]"),
    ([{"type": "function", "function": {"name": "f", "parameters": "object"}}], "required",
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"not": {}}}}}}], "required", "tools"),
])
def test_bad_tools_are_a_400(tools, choice, param):
    with pytest.raises(InvalidRequest) as info:
        grammar_for_tool_call(tools, choice, *HERMES)
    assert info.value.status == 400 and info.value.param == param


def test_auto_tool_choice_has_no_grammar():
    with pytest.raises(ValueError):
        grammar_for_tool_call(TOOLS, "auto")


# Worker side: real generation with the tiny random-weight model.


def test_unconstrained_tiny_model_does_not_write_json(loaded):
    [(tokens, _)] = generate(loaded, "Reply in JSON.", [([], None)], max_tokens=24)
    with pytest.raises(ValueError):
        json.loads(loaded[1].decode(tokens))


def test_json_schema_output_parses_and_validates(loaded, factory):
    grammar = grammar_for_response_format(json_schema_format(PERSON))
    jobs = greedy_and_sampled(factory, grammar)
    results = generate(loaded, "Describe a person as JSON.", jobs)
    eos = loaded[1].eos_token_ids
    for (tokens, finish), (processors, _) in zip(results, jobs):
        assert finish == "stop" and tokens[-1] in eos
        jsonschema.validate(json.loads(loaded[1].decode(tokens[:-1])), PERSON)
        assert processors[0].accepted and processors[0].error is None
    assert len({tuple(t) for t, _ in results}) > 1  # sampled outputs differ: really sampled


def bias(amounts: dict[int, float]):
    """A logits processor for a model that 'wants' these tokens (id -> extra logit)."""
    ids, values = mx.array(list(amounts)), mx.array(list(amounts.values()))

    def processor(tokens, logits):
        return logits + mx.zeros(logits.shape[-1]).at[ids].add(values)
    return processor


def test_json_object_keeps_a_model_that_wants_to_stop_going_until_the_object_is_whole(
        loaded, factory):
    tokenizer = loaded[1]
    eos = sorted(tokenizer.eos_token_ids)
    brace = tokenizer.encode("}", add_special_tokens=False)
    quote = tokenizer.encode('"', add_special_tokens=False)
    assert len(brace) == len(quote) == 1
    # Wants to stop (eos first), else to close strings and objects.
    steer = bias({eos[0]: 60.0, quote[0]: 35.0, brace[0]: 30.0})
    [(free, _)] = generate(loaded, "JSON please.", [([steer], None)], max_tokens=16)
    assert free == eos[:1]  # unconstrained, it stops at once with no output
    grammar = grammar_for_response_format({"type": "json_object"})
    processor = factory.processor(grammar)
    [(tokens, finish)] = generate(loaded, "JSON please.", [([steer, processor], None)],
                                  max_tokens=32)
    assert finish == "stop" and tokens[-1] in eos
    assert isinstance(json.loads(tokenizer.decode(tokens[:-1])), dict)
    assert processor.accepted


def test_forced_tool_call_is_a_valid_call_with_special_token_markers(loaded, factory):
    tokenizer = loaded[1]
    start, end = factory.special_tokens["<tool_call>"], factory.special_tokens["</tool_call>"]
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"}
               for t in TOOLS}
    grammar = factory.tool_call_grammar(TOOLS, "required", *HERMES)
    named = factory.tool_call_grammar(
        TOOLS, {"type": "function", "function": {"name": "get_time"}}, *HERMES)
    jobs = greedy_and_sampled(factory, grammar) + [([factory.processor(named)], None)]
    results = generate(loaded, "What is the weather in Paris?", jobs)
    for tokens, finish in results:
        assert finish == "stop" and tokens[-1] in tokenizer.eos_token_ids
        assert tokens[0] == start and tokens[-2] == end
        text = tokenizer.decode(tokens[1:-2])
        assert text.startswith("\n") and text.endswith("\n")
        call = json.loads(text)
        assert set(call) == {"name", "arguments"} and call["name"] in schemas
        jsonschema.validate(call["arguments"], schemas[call["name"]])
    assert json.loads(tokenizer.decode(results[-1][0][1:-2]))["name"] == "get_time"


def test_extra_vocabulary_rows_are_never_allowed(factory, loaded):
    grammar = grammar_for_response_format({"type": "json_object"})
    processor = factory.processor(grammar)
    n_tok = factory.ll_tokenizer.vocab_size
    logits = mx.zeros((1, n_tok + 64)).at[:, n_tok:].add(1000.0)  # padded lm head
    masked = processor(mx.array([1, 2, 3]), logits)
    allowed = np.isfinite(np.array(masked[0]))
    assert not allowed[n_tok:].any()
    texts = [loaded[1].decode([i]) for i in np.flatnonzero(allowed)]
    assert "{" in texts and all(t.startswith("{") for t in texts)


def test_rejected_token_ends_the_sequence_and_reports_an_error(factory):
    grammar = grammar_for_response_format({"type": "json_object"})
    processor = factory.processor(grammar)
    n = factory.ll_tokenizer.vocab_size
    logits = mx.zeros((1, n))
    processor(mx.array([5]), logits)
    bad = factory.ll_tokenizer.tokenize_str("[")
    masked = processor(mx.array([5, *bad]), logits)  # "[" was masked; a sampler bug, say
    allowed = np.flatnonzero(np.isfinite(np.array(masked[0])))
    assert allowed.tolist() == sorted(factory.eos_token_ids)
    assert processor.error and not processor.accepted
    with pytest.raises(ConstraintError, match="constrained decoding failed"):
        processor.raise_for_error()


def test_grammar_this_tokenizer_cannot_build_ends_the_sequence_with_an_error(factory):
    grammar = llguidance.LLMatcher.grammar_from_lark('start: <no_such_token> "x"')
    processor = factory.processor(grammar)
    masked = processor(mx.array([5]), mx.zeros((1, factory.ll_tokenizer.vocab_size)))
    allowed = np.flatnonzero(np.isfinite(np.array(masked[0])))
    assert allowed.tolist() == sorted(factory.eos_token_ids)
    with pytest.raises(ConstraintError, match="no_such_token"):
        processor.raise_for_error()


def synthetic_tokenizer(n_vocab: int):
    """A byte-level BPE fast tokenizer with n_vocab tokens (random pieces, no merges)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    vocab = {s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    pieces = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789{}[]":,Ġ'
    while len(vocab) < n_vocab - 3:
        vocab.setdefault("".join(rng.choices(pieces, k=rng.randint(2, 8))), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def test_mask_cost_per_step_with_a_49k_vocabulary():
    factory = ConstraintFactory(synthetic_tokenizer(49152))
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "tags": {"type": "array",
                                                        "items": {"type": "string"}}}}
    grammar = grammar_for_response_format(json_schema_format(schema))
    doc = '{"name": "John Smith the third", "tags": ["a", "quick brown fox", "jumps"]}'
    tokens = factory.ll_tokenizer.tokenize_str(doc)
    processor = factory.processor(grammar)
    logits = mx.random.normal((1, 49152))
    context = [0, 1]
    mx.eval(processor(mx.array(context), logits))
    times = []
    for token in tokens:
        context.append(token)
        t0 = time.perf_counter()
        mx.eval(processor(mx.array(context), logits))
        times.append(time.perf_counter() - t0)
    assert processor.accepted and processor.error is None
    median_ms = float(np.median(times)) * 1e3
    print(f"mask step, 49152 tokens: median {median_ms:.3f} ms over {len(times)} steps")
    assert median_ms < 20  # ~0.1-0.3 ms here; a decode step of a 135M model is ~100 ms


@pytest.mark.parametrize("schema, cause", [
    ({"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}, "required": ["n"],
      "$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}},
                      "required": ["c"]}}}, "Too many items"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^a{1000}{1000}$"}},
      "required": ["a"]}, "too many expressions"),
])
def test_a_schema_that_fails_after_its_forced_start_is_a_400_before_generating(
        factory, schema, cause):
    """llguidance compiles these and gives a first mask, then fails once `{"n":` is in: the
    request was a 500 (retried by the SDK) after it started, or a stream's error event."""
    grammar = grammar_for_response_format({"type": "json_schema",
                                           "json_schema": {"name": "x", "schema": schema}})
    processor = factory.processor(grammar)
    with pytest.raises(InvalidRequest, match=cause) as info:
        processor.precheck(factory.ll_tokenizer.vocab_size)
    assert info.value.status == 400 and info.value.param == "response_format"
    fine = factory.processor(grammar_for_response_format({"type": "json_object"}))
    fine.precheck(factory.ll_tokenizer.vocab_size)
    assert fine.error is None


def test_a_parameters_schema_without_a_type_still_forces_an_object(factory):
    """OpenAI's check (and ours) takes such a schema as an object, but the forced call's
    grammar did not: `"arguments": null` (or 9) came out, no call parsed, markup as content."""
    untyped = [{"type": "function", "function": {"name": "f", "parameters": {
        "properties": {"c": {"enum": ["a", "b"]}}, "required": ["c"]}}}]
    grammar = factory.tool_call_grammar(untyped, "required", *HERMES)
    assert matches(factory, grammar, call_tokens(factory, {"name": "f", "arguments": {"c": "a"}}))
    for arguments in (None, 9, ["a"]):
        assert not matches(factory, grammar, call_tokens(
            factory, {"name": "f", "arguments": arguments})), arguments


def test_a_named_tool_choice_is_not_refused_for_another_tools_schema():
    bad = {"type": "function", "function": {"name": "bad", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}
    check_tool_schemas([bad, TIME], {"type": "function", "function": {"name": "get_time"}})
    with pytest.raises(InvalidRequest, match="function 'bad'") as info:
        check_tool_schemas([bad, TIME], "required")
    assert info.value.param == "tools[0].function.parameters"


def test_an_object_of_many_optional_properties_is_enforced_to_its_end(factory):
    """600 optional properties (20 KB of schema) passed the precheck and failed at the first
    key ("Current row has 2399 items; max is 2000"): a 500 after the request started."""
    props = {f"p{i}": {"type": "boolean"} for i in range(600)}
    grammar = grammar_for_response_format(json_schema_format(
        {"type": "object", "properties": props, "additionalProperties": False}))
    processor = factory.processor(grammar)
    processor.precheck(factory.ll_tokenizer.vocab_size)
    assert text_matches(factory, grammar, '{"p3": true, "p599": false}')
    assert not text_matches(factory, grammar, '{"p600": true}')


def test_a_matcher_error_keeps_its_cause_and_drops_the_parser_state():
    message = ("Parser Error: Current row has 2399 items; max is 2000\n<state>\nTokens: "
               "\u27e6{\u27e7\nParser: {\"compute_time_us\": 12}")
    assert _short(message) == "Parser Error: Current row has 2399 items; max is 2000"
    assert error_headers(ConstraintError("x")) == {"x-should-retry": "false"}


@pytest.mark.parametrize("schema, text, finished", [
    ({"type": "object", "properties": {"c": {"enum": ["x"]}}, "required": ["c"],
      "additionalProperties": False}, '{"c": "x"}', True),
    ({"type": "integer"}, "12", False),  # accepted, but 12345 was as likely on its way
    ({"type": "number"}, "1.5", False),
])
def test_finished_means_nothing_but_eos_may_follow(factory, schema, text, finished):
    """What turns a max_tokens cut into "stop": accepting alone said so of a number."""
    processor = factory.processor(grammar_for_response_format(json_schema_format(schema)))
    processor._consume(factory.ll_tokenizer.tokenize_str(text))
    assert processor.accepted and processor.finished is finished
