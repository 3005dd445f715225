"""Chat completions through the real daemon, a real worker and a tiny real MLX model,
driven by the official openai client and raw httpx."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about the weather in Paris today."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture
def daemon(start_daemon):
    return start_daemon()


def _sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_non_streaming_completion_counts_tokens_like_the_tokenizer(daemon, tokenizer):
    client = daemon.openai()
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=7,
                                          temperature=0)
    expected_prompt = len(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True))
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == expected_prompt
    assert resp.usage.completion_tokens == 7
    assert resp.usage.total_tokens == expected_prompt + 7


def _server_timing(header: str) -> dict[str, float]:
    parts = (part.strip().split(";dur=") for part in header.split(","))
    return {name: float(dur) for name, dur in parts}


def test_server_timing_says_where_a_response_spent_its_time(start_daemon, tiny_model):
    """Non-streaming responses carry Server-Timing: the wait for the worker (here its cold
    start), the worker's own time (here a slow prefill) and the total in the router."""
    daemon = start_daemon({"tiny": {"path": str(tiny_model),
                                    "fault": {"prefill_delay_s": 0.3}}})
    client = daemon.openai()
    timings = []
    for _ in range(2):  # cold (the worker starts), then warm
        started = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=MESSAGES, max_tokens=2, temperature=0)
        latency_ms = (time.perf_counter() - started) * 1000
        assert raw.parse().usage.completion_tokens == 2
        timing = _server_timing(raw.headers["server-timing"])
        assert set(timing) == {"queue", "worker", "total"}
        assert 300 <= timing["worker"] < timing["total"] <= latency_ms
        assert timing["queue"] + timing["worker"] <= timing["total"]
        timings.append(timing)
    assert timings[1]["queue"] < timings[0]["queue"]  # no worker to start the second time
    # A stream's headers go out before its time is known: no header, but the log has it.
    with daemon.http.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": MESSAGES, "max_tokens": 2, "stream": True}) as resp:
        assert resp.status_code == 200
        assert "server-timing" not in resp.headers
        assert [line for line in resp.iter_lines() if line][-1] == "data: [DONE]"
    log_text = (daemon.log_dir / "daemon.log").read_text()
    logged = [int(m) for m in re.findall(r"chat.completions model=tiny status=200 choices=1 "
                                         r"duration_ms=\d+ worker_ms=(\d+)", log_text)]
    assert len(logged) == 3
    assert all(abs(m - t["worker"]) <= 1 for m, t in zip(logged, timings))
    assert logged[2] >= 300


def test_streaming_matches_non_streaming_and_follows_openai_chunk_shapes(daemon):
    client = daemon.openai()
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12,
                                          temperature=0)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant"] and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 12
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens


def test_raw_sse_wire_format(daemon):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with daemon.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache"
        events = _sse_events(resp)
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in p["choices"][0]["delta"] for p in parsed[1:])
    assert len({p["id"] for p in parsed}) == 1


def test_stop_string_ends_generation_and_never_appears(daemon):
    client = daemon.openai()
    base = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24,
                                          temperature=0).choices[0].message.content
    assert len(base) > 8
    stop = base[5:8]
    expected = base[: base.index(stop)]
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24,
                                          temperature=0, stop=[stop, "\u2603never"])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == expected
    assert stop not in resp.choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="tiny", messages=MESSAGES,
                                                max_tokens=24, temperature=0, stop=stop,
                                                stream=True))
    assert streamed == expected


def test_seed_makes_sampling_reproducible(daemon):
    client = daemon.openai()

    def sample(seed: int) -> str:
        return client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=seed,
        ).choices[0].message.content

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in range(4)}) > 1


def test_a_vanishing_temperature_or_top_p_answers_like_greedy(daemon):
    """1/temperature overflows float32 below ~3e-39 and top_p is 0 in float32 below ~1e-45:
    both sampled from garbage (all logits inf, or every token dropped)."""
    client = daemon.openai()

    def answer(**sampling) -> str:
        return client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=12, seed=7, **sampling,
        ).choices[0].message.content

    greedy = answer(temperature=0)
    assert answer(temperature=1e-39) == greedy
    assert answer(temperature=1e-300) == greedy
    assert answer(temperature=1.0, top_p=1e-46) == greedy
    assert answer(temperature=1.0, top_p=1e-300) == greedy


def test_max_completion_tokens_is_honoured(daemon):
    resp = daemon.openai().chat.completions.create(
        model="tiny", messages=MESSAGES, max_completion_tokens=3)
    assert resp.usage.completion_tokens == 3
    assert resp.choices[0].finish_reason == "length"


def test_null_means_the_default_for_every_optional_parameter(daemon):
    """The SDK sends null for an argument given as None; OpenAI's schema allows it."""
    client = daemon.openai()
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2,
                                          n=None, stream=None, temperature=None, seed=None)
    assert len(resp.choices) == 1 and resp.usage.completion_tokens == 2
    done = client.completions.create(model="tiny", prompt="Once", max_tokens=2, echo=None,
                                     n=None, stream=None)
    assert len(done.choices) == 1 and not done.choices[0].text.startswith("Once")
    raw = daemon.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": MESSAGES, "max_tokens": 2, "stream": True,
        "stream_options": {"include_usage": None}})
    assert raw.status_code == 200
    assert '"usage":{' not in raw.text.replace(" ", "")  # null: the default, no usage chunk


def test_messages_of_every_role_and_text_parts(daemon):
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "what is "},
                                     {"type": "text", "text": "2+2?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 2}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
    ]
    resp = daemon.openai().chat.completions.create(model="tiny", messages=messages,
                                                   max_tokens=2)
    assert resp.usage.completion_tokens == 2


def test_unknown_model_is_a_404_in_openai_shape(daemon):
    with pytest.raises(openai.NotFoundError) as info:
        daemon.openai().chat.completions.create(model="no/such-model", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found"
    assert "no/such-model" in info.value.body["message"]


def test_a_model_found_but_not_usable_says_why_in_its_404(daemon, tiny_model):
    half = daemon.root / "models" / "half-copied"
    half.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_model) / name, half / name)  # the weights have not arrived yet
    with pytest.raises(openai.NotFoundError) as info:
        daemon.openai().chat.completions.create(model="half-copied", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found"
    assert f"found at {half} but cannot be served" in info.value.body["message"]
    assert "no .safetensors weights" in info.value.body["message"]
    shutil.rmtree(half)


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"},
     "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 3},
     "temperature"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "two words"}}]}, "tools[0].function.name"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 17}, "n"),
])
def test_invalid_fields_are_400s_that_name_the_field(daemon, body, param):
    resp = daemon.http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]"])
def test_malformed_bodies_are_400s(daemon, content):
    resp = daemon.http.post("/v1/chat/completions", content=content,
                            headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_prompt_longer_than_the_context_is_a_400(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "max_context": 64}})
    resp = daemon.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "word " * 100}]})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"
    assert resp.json()["error"]["param"] == "messages"
    # no max_tokens was asked for: the message must not claim the default was
    assert "leaves no room for a completion" in resp.json()["error"]["message"]
    assert "asks for" not in resp.json()["error"]["message"]
    raw = daemon.http.post("/v1/completions", json={"model": "tiny", "prompt": "word " * 100})
    assert raw.status_code == 400
    assert raw.json()["error"]["code"] == "context_length_exceeded"
    assert raw.json()["error"]["param"] == "prompt"


def test_text_that_cannot_fit_is_refused_before_it_is_tokenized(start_daemon, tiny_model,
                                                                 tokenizer):
    """Megabytes of prompt were tokenized on the engine thread first (seconds, while every
    stream of the model waited), then refused."""
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "max_context": 64}})
    longest = max(len(t) for t in tokenizer._tokenizer.get_vocab())
    chat = daemon.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "x" * (64 * longest + 1)}]})
    text = daemon.http.post("/v1/completions", json={"model": "tiny",
                                                     "prompt": "x" * (64 * longest + 1)})
    many = daemon.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": ""}] * 65})
    for resp, param in ((chat, "messages"), (text, "prompt"), (many, "messages")):
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert (error["code"], error["param"]) == ("context_length_exceeded", param)
    assert f"its longest token has {longest} characters" in chat.json()["error"]["message"]
    assert "has 65 messages, each at least one token" in many.json()["error"]["message"]
    fits = daemon.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert fits.status_code == 200


def test_a_default_max_tokens_is_lowered_to_the_room_the_context_has(start_daemon, tiny_model,
                                                                     tokenizer):
    # The model's max_tokens (20) does not fit after this prompt; a client that set no limit
    # (Open WebUI sends none) gets what fits, as from OpenAI. One that asked for 20 gets a 400.
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "max_context": 64,
                                    "max_tokens": 20}})
    messages = [{"role": "user", "content": "word " * 12}]
    prompt = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert 44 < prompt < 64
    body = {"model": "tiny", "messages": messages, "temperature": 0,
            "logit_bias": {str(t): -100 for t in tokenizer.eos_token_ids}}
    resp = daemon.http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["usage"]["completion_tokens"] == 64 - prompt
    assert out["choices"][0]["finish_reason"] == "length"
    asked = daemon.http.post("/v1/chat/completions", json={**body, "max_tokens": 20})
    assert asked.status_code == 400
    assert asked.json()["error"]["code"] == "context_length_exceeded"


def test_models_endpoints(daemon, tiny_model):
    # A model found on disk in the HF cache layout is listed with its org/name id.
    snap = daemon.root / "models" / "models--acme--tiny-chat" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in Path(tiny_model).iterdir():  # copies: links may not point outside the roots
        shutil.copy(f, snap / f.name)
    listing = daemon.http.get("/v1/models").json()
    assert listing["object"] == "list"
    ids = {m["id"] for m in listing["data"]}
    assert {"tiny", "acme/tiny-chat"} <= ids
    for m in listing["data"]:
        assert m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"]
    paths = {m["id"]: m["path"] for m in listing["data"]}
    assert paths["tiny"] == str(tiny_model)  # configured, outside the model directory
    assert paths["acme/tiny-chat"] == str(snap)  # discovered
    one = daemon.http.get("/v1/models/acme/tiny-chat")
    assert one.status_code == 200 and one.json()["id"] == "acme/tiny-chat"
    assert daemon.http.get("/v1/models/acme/nope").status_code == 404
    # It is servable, not just listed.
    resp = daemon.openai().chat.completions.create(model="acme/tiny-chat", messages=MESSAGES,
                                                   max_tokens=2)
    assert resp.usage.completion_tokens == 2
    assert daemon.http.get("/v1/models/acme/tiny-chat").json()["loaded"] is True


def test_second_request_is_batched_not_queued_behind_the_first(start_daemon, tiny_model):
    # 50 ms per step: a 40-token request takes ~2 s; a second one joining the batch finishes
    # long before the first does if the engine batches continuously.
    daemon = start_daemon({"tiny": {"path": str(tiny_model),
                                    "fault": {"delay_per_token_s": 0.05}}})
    client = daemon.openai()
    done: dict[str, float] = {}

    def long_request() -> None:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40)
        done["long"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    thread.start()
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40,
                                            stream=True)
    first = next(iter(stream))  # the long request is now generating too
    assert first.choices[0].delta.role == "assistant"
    short = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
    done["short"] = time.monotonic()
    for _ in stream:
        pass
    thread.join(30)
    assert short.usage.completion_tokens == 3
    assert done["short"] < done["long"]


def test_requests_sent_together_to_an_idle_worker_start_in_one_batch(start_daemon, tiny_model):
    # batch_wait_ms: once a worker has run several sequences at once, when it is idle again and
    # gets a request it waits up to that long for each next one until as many have come. Here
    # 600 ms, and the second request comes 300 ms after the first: both are prefilled
    # together, so their first tokens come in the same step, when the second arrived. With
    # 0, or for a client that has only ever sent one request at a time, nothing waits.
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "batch_wait_ms": 600},
                           "tiny-now": {"path": str(tiny_model), "batch_wait_ms": 0}})
    client = daemon.openai()

    def ask(model: str, question: str, max_tokens: int, firsts: dict[str, float]) -> None:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}],
            max_tokens=max_tokens, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and question not in firsts:
                firsts[question] = time.monotonic()

    def staggered(model: str, gap: float, max_tokens: int = 4) -> tuple[float, list[float]]:
        """Two requests, the second `gap` seconds after the first: their first tokens' times."""
        firsts: dict[str, float] = {}
        t0 = time.monotonic()
        threads = []
        for question in ("Where is Paris?", "Where is Rome?"):
            threads.append(threading.Thread(target=ask, args=(model, question, max_tokens,
                                                              firsts)))
            threads[-1].start()
            time.sleep(gap)
        for thread in threads:
            thread.join(60)
        return t0, [firsts["Where is Paris?"], firsts["Where is Rome?"]]

    for model in ("tiny", "tiny-now"):
        ask(model, "Hello?", 1, {})  # loaded, and one request at a time so far
        t0, (a, b) = staggered(model, 0.3)
        assert a - t0 < 0.3, model  # nothing waited: the first answered before the second came
        staggered(model, 0.0, max_tokens=200)  # two at once
        t0, (a, b) = staggered(model, 0.3)
        if model == "tiny":
            assert a - t0 >= 0.29  # waited for the second (and no longer: two had come)
            assert abs(a - b) < 0.1
        else:
            assert a - t0 < 0.3
    # Two ran at once last; one comes alone: it waits the 600 ms for the other, once.
    for expected_wait in (True, False):
        firsts: dict[str, float] = {}
        t0 = time.monotonic()
        ask("tiny", "Where is Oslo?", 2, firsts)
        assert (firsts["Where is Oslo?"] - t0 >= 0.55) is expected_wait


def test_health_endpoints(daemon):
    assert daemon.http.get("/health").json() == {"status": "ok"}
    daemon.openai().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1)
    detail = daemon.http.get("/v1/health").json()
    (worker,) = detail["workers"]
    assert worker["model"] == "tiny" and worker["state"] == "RUNNING"
    assert worker["pid"] > 0 and worker["memory_bytes"] > 0
    assert detail["memory"]["total_bytes"] > 0


def test_logit_bias_forces_a_token(daemon, tokenizer):
    token = tokenizer.encode("Paris", add_special_tokens=False)[0]
    resp = daemon.openai().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
        logit_bias={str(token): 100})
    assert resp.choices[0].message.content == tokenizer.decode([token]) * 5
    bad = daemon.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": MESSAGES, "logit_bias": {"999999": 5}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"
    many = daemon.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": MESSAGES,
        "logit_bias": {str(t): 1 for t in range(10**6, 10**6 + 50_000)}})
    assert many.status_code == 400  # the error names a few, not all 50,000
    assert "and 49992 more" in many.json()["error"]["message"] and len(many.content) < 1000


def test_penalties_change_what_is_generated(daemon, tokenizer):
    client = daemon.openai()

    def distinct(**kw) -> int:
        text = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24,
                                              temperature=0, **kw).choices[0].message.content
        return len(set(tokenizer.encode(text, add_special_tokens=False)))

    plain = distinct()
    assert distinct(frequency_penalty=2.0) > plain
    assert distinct(presence_penalty=2.0) > plain
    assert distinct(extra_body={"repetition_penalty": 5.0}) > plain


def test_model_sampling_defaults_apply_when_the_request_leaves_them_out(start_daemon,
                                                                         tiny_model):
    """A configured default behaves exactly like the same value sent in the request."""
    daemon = start_daemon({
        "plain": {"path": str(tiny_model)},
        "tuned": {"path": str(tiny_model), "repetition_penalty": 3.0, "temp": 0.0,
                  "max_tokens": 24},
    })
    client = daemon.openai()
    ask = dict(messages=MESSAGES)
    tuned = client.chat.completions.create(model="tuned", **ask)
    explicit = client.chat.completions.create(model="plain", temperature=0, max_tokens=24,
                                              extra_body={"repetition_penalty": 3.0}, **ask)
    unpenalized = client.chat.completions.create(model="plain", temperature=0, max_tokens=24,
                                                 **ask)
    assert tuned.usage.completion_tokens == 24
    assert tuned.choices[0].message.content == explicit.choices[0].message.content
    assert tuned.choices[0].message.content != unpenalized.choices[0].message.content


def test_a_wrong_method_is_a_405_in_openai_shape(daemon) -> None:
    resp = daemon.http.get("/v1/chat/completions")
    assert resp.status_code == 405
    assert "POST" in resp.headers["allow"]
    err = resp.json()["error"]
    assert err["code"] == "method_not_allowed" and err["type"] == "invalid_request_error"
    assert "GET /v1/chat/completions" in err["message"]


def test_a_small_temperature_on_float16_log_probabilities_is_still_near_greedy():
    """float16 log probabilities times 1/t overflowed to -inf for every token from t ~ 1.5e-5
    (a float16 model on Metal), and the draw was uniform."""
    import mlx.core as mx

    from mlxrouter.engine import make_sampler
    from mlxrouter.protocol import SamplingParams

    logprobs = mx.array([[-7.0, -0.001, -3.0, -5.0]], dtype=mx.float16)
    for seed in range(20):
        sample = make_sampler(SamplingParams(max_tokens=1, temperature=1e-6, seed=seed))
        assert sample(logprobs).item() == 1
