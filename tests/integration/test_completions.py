"""Several choices per request (n, prompt lists) and the text completions endpoint, with the
openai client against a real daemon and the tiny model."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture
def client(start_daemon):
    return start_daemon().openai()


def test_chat_n_returns_n_seeded_reproducible_choices(client):
    def ask():
        return client.chat.completions.create(model="tiny", messages=MESSAGES, n=3,
                                              max_tokens=6, temperature=1.0, seed=7)

    first, again = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1
    assert all(c.finish_reason == "length" for c in first.choices)
    assert first.usage.completion_tokens == 18
    single = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6)
    assert first.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once


def test_streamed_choices_reassemble_to_the_non_streamed_ones(client):
    kwargs = dict(model="tiny", messages=MESSAGES, n=2, max_tokens=8, temperature=1.0, seed=3)
    whole = client.chat.completions.create(**kwargs)
    parts = {0: "", 1: ""}
    finishes = {}
    roles = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            parts[choice.index] += choice.delta.content or ""
            if choice.delta.role:
                roles.append(choice.index)
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert parts == {c.index: c.message.content for c in whole.choices}
    assert sorted(roles) == [0, 1] and finishes == {0: "length", 1: "length"}


def test_text_completion_counts_the_prompt_like_the_tokenizer(client, tokenizer):
    prompt = "Once upon a time"
    resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=5,
                                      temperature=0)
    assert resp.object == "text_completion"
    assert resp.choices[0].text and resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert resp.usage.completion_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == resp.choices[0].text
    by_ids = client.completions.create(model="tiny", prompt=tokenizer.encode(prompt),
                                       max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == resp.choices[0].text
    # one list of token ids is one prompt, however long (the 32 is a count of prompts)
    long = tokenizer.encode(prompt + " there was a lighthouse" * 8)
    assert len(long) > 32
    by_long_ids = client.completions.create(model="tiny", prompt=long, max_tokens=1)
    assert by_long_ids.usage.prompt_tokens == len(long)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=["x"] * 33, max_tokens=1)
    assert caught.value.body["param"] == "prompt"
    assert "33 prompts; at most 32" in caught.value.body["message"]


def test_an_empty_prompt_is_a_400_naming_the_prompt(client):
    for prompt in ("", ["Once", ""]):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
        assert caught.value.body["param"] == "prompt"
        assert "empty" in caught.value.body["message"]


def test_prompt_lists_times_n_give_every_choice_in_order(client):
    resp = client.completions.create(model="tiny", prompt=["Hello", "Goodbye"], n=2,
                                     max_tokens=3, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    texts = [c.text for c in resp.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: same prompt, same text
    assert resp.usage.completion_tokens == 12


def test_echo_prepends_the_prompt(client):
    resp = client.completions.create(model="tiny", prompt="The sea", echo=True, max_tokens=3,
                                     temperature=0)
    plain = client.completions.create(model="tiny", prompt="The sea", max_tokens=3,
                                      temperature=0)
    assert resp.choices[0].text == "The sea" + plain.choices[0].text


def test_a_completion_keeps_the_leading_space_that_continues_its_prompt(client, tokenizer):
    """Text completions continue the prompt: a first token " the" stays " the" (mlx-lm's
    detokenizers drop that space, which suits a chat answer only), in the text, the stream,
    echo and the logprobs' tokens."""
    (the,) = tokenizer.encode(" the", add_special_tokens=False)
    forced = {"logit_bias": {str(the): 100}, "max_tokens": 2, "temperature": 0}
    resp = client.completions.create(model="tiny", prompt="Once upon", logprobs=1, **forced)
    assert resp.choices[0].text.startswith(" the the"), resp.choices[0].text
    assert resp.choices[0].logprobs.tokens == [" the", " the"]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon", stream=True, **forced) if c.choices)
    assert streamed == resp.choices[0].text
    echoed = client.completions.create(model="tiny", prompt="Once upon", echo=True, **forced)
    assert echoed.choices[0].text == "Once upon the the"
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, **forced)
    assert chat.choices[0].message.content == "the the"  # an answer starts without it


@pytest.mark.parametrize("kwargs, param", [
    ({"prompt": "x", "suffix": "end"}, "suffix"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logprobs": 2, "echo": True}, "logprobs"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [[1, 2], [3]], "echo": True}, "echo"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "extra_body": {"max_completion_tokens": 2}}, "max_completion_tokens"),
    ({"prompt": "x", "extra_body": {"response_format": {"type": "json_object"}}},
     "response_format"),
    ({"prompt": "x", "extra_body": {"tools": []}}, "tools"),
    ({"prompt": "x", "extra_body": {"messages": [{"role": "user", "content": "x"}]}},
     "messages"),
])
def test_unsupported_or_malformed_completion_requests_are_400s(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", max_tokens=2, **kwargs)
    assert info.value.body["param"] == param


def test_more_choices_than_the_model_ever_admits_is_a_400_not_a_429(start_daemon, tiny_model):
    # 10 prompts x n=8 = 80 sequences > max_running 4 + max_queue 8: a 429 would be retried
    # by the client forever; a 400 says why. What fits still runs.
    client = start_daemon({"tiny": {"path": str(tiny_model), "max_running": 4,
                                    "max_queue": 8}}).openai()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=["a"] * 10, n=8, max_tokens=1)
    assert info.value.body["param"] == "n"
    assert "80 sequences" in info.value.body["message"]
    assert "max_running 4 + max_queue 8 = 12" in info.value.body["message"]
    resp = client.completions.create(model="tiny", prompt=["a"] * 4, n=2, max_tokens=1)
    assert len(resp.choices) == 8
