"""The seed's streaming options: json_lines and json_array formats, stream_chunk_size."""

from __future__ import annotations

import json

MESSAGES = [{"role": "user", "content": "Count to ten."}]


def _body(**extra):
    return {"model": "tiny", "messages": MESSAGES, "max_tokens": 9, "temperature": 0,
            "stream": True, **extra}


def test_json_lines_and_json_array_carry_the_same_chunks(start_daemon, tiny_model):
    sse = start_daemon({"tiny": {"path": str(tiny_model)}})
    reference = sse.openai().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=9, temperature=0).choices[0].message.content
    lines = start_daemon({"tiny": {"path": str(tiny_model), "streaming_format": "json_lines"}})
    with lines.http.stream("POST", "/v1/chat/completions", json=_body()) as resp:
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        chunks = [json.loads(line) for line in resp.iter_lines() if line.strip()]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == reference
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    array = start_daemon({"tiny": {"path": str(tiny_model), "streaming_format": "json_array"}})
    resp = array.http.post("/v1/chat/completions", json=_body(
        stream_options={"include_usage": True}))
    assert resp.headers["content-type"].startswith("application/json")
    items = resp.json()  # one valid JSON array
    assert "".join(c["choices"][0]["delta"].get("content", "")
                   for c in items if c["choices"]) == reference
    assert items[-1]["usage"]["completion_tokens"] == 9


def test_stream_chunk_size_groups_tokens(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "stream_chunk_size": 4,
                                    "fault": {"delay_per_token_s": 0.02}}})
    chunks = list(daemon.openai().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=9, temperature=0, stream=True))
    contents = [c.choices[0].delta.content for c in chunks
                if c.choices and c.choices[0].delta.content]
    # 9 tokens, at least 4 per chunk except the last: 2 or 3 chunks (a read may find more
    # than 4 tokens waiting), where chunk size 1 streams nearly every token on its own.
    assert 2 <= len(contents) <= 3


def test_keep_alive_comments_while_a_long_prompt_is_processed(start_daemon, tiny_model):
    """After the response commits (the worker Started the request) a long prefill sends no
    tokens for a while; proxies and clients must still see bytes."""
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "fault": {"prefill_delay_s": 1.2}}},
                          server={"keepalive_interval_s": 0.2})
    with daemon.http.stream("POST", "/v1/chat/completions", json=_body()) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line]
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    first_content = next(i for i, line in enumerate(lines)
                         if line.startswith("data: {") and '"content":"' in line
                         and '"content":""' not in line)
    alive = [line for line in lines[first_data:first_content] if line == ": keep-alive"]
    assert len(alive) >= 3
    assert lines[-1] == "data: [DONE]"
