"""The prompt cache: later turns reuse the KV cache of earlier ones, the output is the same as
without the cache, and an exact hit (a prompt equal to an earlier prompt plus its completion)
just works."""

from __future__ import annotations

from pathlib import Path

import pytest

SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 20}


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(tiny_model)


def _turns(client):
    first = [SYSTEM, {"role": "user", "content": "Tell me about lighthouses."}]
    a = client.chat.completions.create(model="tiny", messages=first, max_tokens=8,
                                       temperature=0)
    second = first + [{"role": "assistant", "content": a.choices[0].message.content},
                      {"role": "user", "content": "And about harbours?"}]
    b = client.chat.completions.create(model="tiny", messages=second, max_tokens=8,
                                       temperature=0)
    return a, b


def test_next_turn_reuses_the_cache_and_answers_the_same(start_daemon, tiny_model):
    cached = start_daemon({"tiny": {"path": str(tiny_model)}}).openai()
    uncached = start_daemon({"tiny": {"path": str(tiny_model), "prompt_cache_bytes": 0}}).openai()
    a1, b1 = _turns(cached)
    a2, b2 = _turns(uncached)
    assert a1.usage.prompt_tokens_details.cached_tokens == 0
    assert b1.usage.prompt_tokens_details.cached_tokens > a1.usage.prompt_tokens // 2
    assert b2.usage.prompt_tokens_details.cached_tokens == 0
    assert a1.choices[0].message.content == a2.choices[0].message.content
    assert b1.choices[0].message.content == b2.choices[0].message.content


def test_exact_hit_request_simply_works(start_daemon, tiny_model, tokenizer):
    client = start_daemon({"tiny": {"path": str(tiny_model)}}).openai()
    prompt = tokenizer.encode("Once upon a time there was a lighthouse")
    forced = tokenizer.encode(" sea", add_special_tokens=False)[0]
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=1,
                                      temperature=0, logit_bias={str(forced): 100})
    assert first.usage.completion_tokens == 1
    # The cache now holds exactly prompt + [forced]: asking for that is an exact hit.
    again = client.completions.create(model="tiny", prompt=prompt + [forced], max_tokens=4,
                                      temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == len(prompt)
    assert again.usage.completion_tokens == 4
    twice = client.completions.create(model="tiny", prompt=prompt + [forced], max_tokens=4,
                                      temperature=0)
    assert twice.choices[0].text == again.choices[0].text


def test_a_prompt_cache_too_small_for_one_turn_says_so_in_the_worker_log(start_daemon,
                                                                         tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "prompt_cache_bytes": 1000}})
    a, b = _turns(daemon.openai())
    assert b.usage.prompt_tokens_details.cached_tokens == 0
    log = daemon.worker_log("tiny")
    assert "more than prompt_cache_bytes = 1000, so it is not kept" in log
    assert log.count("prompt cache: a finished sequence") == 1  # once, not per request
