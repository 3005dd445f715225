"""logprobs / top_logprobs in OpenAI's shapes for chat and for completions, from the real
model's distribution (greedy decoding picks the most likely token)."""

from __future__ import annotations

import json
import math

import httpx
import pytest

ASK = [{"role": "user", "content": "Count from one to ten."}]


@pytest.fixture
def daemon(start_daemon):
    return start_daemon()


def test_chat_logprobs_follow_the_greedy_choice(daemon):
    resp = daemon.openai().chat.completions.create(
        model="tiny", messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    choice = resp.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == resp.usage.completion_tokens == 8
    assert "".join(e.token for e in entries) == choice.message.content
    for e in entries:
        assert e.logprob <= 0 and e.bytes == list(e.token.encode())
        assert len(e.top_logprobs) == 3
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert e.top_logprobs[0].token == e.token  # greedy: the most likely token
        assert math.isclose(e.top_logprobs[0].logprob, e.logprob, abs_tol=1e-5)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-4


def test_chat_logprobs_without_alternatives_and_when_not_asked(daemon):
    client = daemon.openai()
    resp = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4,
                                          temperature=0.8, seed=2, logprobs=True)
    assert [e.top_logprobs for e in resp.choices[0].logprobs.content] == [[]] * 4
    plain = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_streamed_chat_logprobs_equal_the_non_streamed(daemon):
    client = daemon.openai()
    kwargs = dict(model="tiny", messages=ASK, max_tokens=6, temperature=0, logprobs=True,
                  top_logprobs=2)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [e for c in client.chat.completions.create(stream=True, **kwargs)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in whole]


def test_a_stop_string_takes_its_tokens_logprobs_with_it(start_daemon, tiny_model):
    """The tokens that only made the stop string (never shown) have no logprobs; a token
    that shows in part keeps its entry. Forced tokens: " the" three times (the content's
    first space is trimmed, the token keeps its own spelling, as its bytes), each streamed on
    its own (the delay)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    daemon = start_daemon({"tiny": {"path": str(tiny_model),
                                    "fault": {"delay_per_token_s": 0.05}}})
    (the,) = load_tokenizer(tiny_model).encode(" the", add_special_tokens=False)
    client = daemon.openai()
    kwargs = dict(model="tiny", messages=ASK, max_tokens=3, temperature=0, logprobs=True,
                  logit_bias={str(the): 100})
    for stop, content, tokens in [("e t", "th", [" the"]), (" the the", "the", [" the"]),
                                  ("the", "", []), ("xyz", "the the the", [" the"] * 3)]:
        whole = client.chat.completions.create(stop=stop, **kwargs).choices[0]
        assert whole.message.content == content, stop
        assert [e.token for e in whole.logprobs.content] == tokens, stop
        parts = list(client.chat.completions.create(stop=stop, stream=True, **kwargs))
        streamed = [e.token for c in parts if c.choices and c.choices[0].logprobs
                    for e in c.choices[0].logprobs.content]
        assert streamed == tokens, stop
        # each entry comes with its token's (first) text, never in a chunk of its own
        assert all(c.choices[0].delta.content for c in parts
                   if c.choices and c.choices[0].logprobs), stop


def test_completions_logprobs_use_the_legacy_shape(daemon):
    resp = httpx.post(f"{daemon.base_url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "one, two,", "max_tokens": 5, "temperature": 0,
        "logprobs": 2}).json()
    lp = resp["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert "".join(lp["tokens"]) == resp["choices"][0]["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(5)]


def test_text_offset_points_at_each_token_even_when_its_text_comes_late(daemon, tiny_model):
    """A lone space token's text goes out with the next token (the BPE detokenizer holds it):
    its offset is still where it starts, and each token is found at its offset."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    space = load_tokenizer(tiny_model)._tokenizer.convert_tokens_to_ids("Ġ")
    for stream in (False, True):
        r = httpx.post(f"{daemon.base_url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "1, 2, 3,", "max_tokens": 3, "temperature": 0,
            "logprobs": 0, "stream": stream, "logit_bias": {str(space): 100}})
        if stream:
            events = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: {")]
            choices = [e["choices"][0] for e in events if e["choices"]]
            text = "".join(c["text"] for c in choices)
            tokens = [t for c in choices if c["logprobs"] for t in c["logprobs"]["tokens"]]
            offsets = [o for c in choices if c["logprobs"] for o in c["logprobs"]["text_offset"]]
        else:
            choice = r.json()["choices"][0]
            text, tokens = choice["text"], choice["logprobs"]["tokens"]
            offsets = choice["logprobs"]["text_offset"]
        assert (text, tokens) == ("   ", [" ", " ", " "])
        assert offsets == [0, 1, 2], stream


def test_completions_logprobs_with_echo_is_a_400(daemon):
    r = httpx.post(f"{daemon.base_url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "one", "max_tokens": 2, "logprobs": 1, "echo": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_a_byte_token_reports_its_own_byte(daemon, tiny_model):
    """A byte-level BPE token holding half a UTF-8 character: its bytes are that byte, it is
    named as OpenAI names such tokens (`bytes:\\xc3`), the same as among the alternatives,
    and the bytes join to the text."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(tiny_model)
    half = tok._tokenizer.convert_tokens_to_ids("Ã")  # byte 0xC3, the first of "é" and others
    resp = daemon.openai().chat.completions.create(
        model="tiny", messages=ASK, max_tokens=3, temperature=0, logprobs=True,
        logit_bias={str(half): 100}, top_logprobs=2)
    entries = resp.choices[0].logprobs.content
    assert entries[0].bytes == [0xC3]
    assert entries[0].token == "bytes:\\xc3" == entries[0].top_logprobs[0].token
    joined = b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace")
    assert joined == resp.choices[0].message.content


def test_partial_character_alternatives_keep_their_own_names(daemon, tiny_model):
    """Every alternative that is a piece of a character was named "\\ufffd": in the legacy
    shape's {token: logprob} they overwrote each other, and the chosen token was not among
    them. Three such tokens (bytes 0xC3, 0xE2, 0xF0) are pushed to the top here."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    ids = load_tokenizer(tiny_model)._tokenizer.convert_tokens_to_ids(["Ã", "â", "ð"])
    resp = httpx.post(f"{daemon.base_url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "one, two,", "max_tokens": 3, "temperature": 0,
        "logprobs": 5, "logit_bias": {str(ids[0]): 40, str(ids[1]): 39, str(ids[2]): 38}}).json()
    lp = resp["choices"][0]["logprobs"]
    assert lp["tokens"] == ["bytes:\\xc3"] * 3
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 5  # 5 distinct names: none lost to another
        assert {"bytes:\\xc3", "bytes:\\xe2", "bytes:\\xf0"} <= set(top)
        assert top[token] == pytest.approx(value, abs=1e-5)  # greedy: the chosen is there


def test_alternatives_a_constraint_rules_out_are_left_out(daemon):
    """A grammar masks tokens to -inf, which JSON writes as null: they are not alternatives."""
    resp = httpx.post(f"{daemon.base_url}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": ASK, "max_tokens": 3, "logprobs": True,
        "top_logprobs": 5, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"const": "x"}}}})
    assert resp.status_code == 200, resp.text
    entries = resp.json()["choices"][0]["logprobs"]["content"]
    assert entries and entries[0]["token"] == '"'
    for e in entries:
        assert all(isinstance(t["logprob"], float) for t in e["top_logprobs"]), e
        assert e["top_logprobs"][0]["token"] == e["token"]
