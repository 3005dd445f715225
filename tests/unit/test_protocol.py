"""Wire messages between daemon and workers: round trips, tolerance of newer peers, garbage."""

from __future__ import annotations

import typing

import msgspec
import pytest

from mlxrouter import protocol
from mlxrouter.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Delta,
    End,
    Error,
    Hello,
    Progress,
    Ready,
    Request,
    SamplingParams,
    Started,
    Stats,
    Step,
    decode,
    encode,
)

EXAMPLES: list[protocol.Message] = [
    Hello(identity="org--name/abc123/1", pid=4242, protocol_version=PROTOCOL_VERSION,
          package_version="0.1.0", mlx_version="0.29.1"),
    Hello(identity="tiny/b/2", pid=1, protocol_version=1, package_version="0.1.0"),
    Progress(message="loading weights 3/7"),
    Ready(load_s=1.25, weights_bytes=270_000_000, memory_bytes=300_000_000, max_context=8192,
          backend="cpu"),
    Ready(load_s=0.0, weights_bytes=0, memory_bytes=0, max_context=0),
    Stats(engine_steps=10, active_sequences=2, mlx_active_bytes=1, mlx_cache_bytes=2,
          mlx_peak_bytes=3),
    Stats(engine_steps=0, active_sequences=0),
    Request(rid=2**63 - 1, sampling=SamplingParams(max_tokens=16),
            messages=[{"role": "user", "content": "hi"}], request_id="chatcmpl-1"),
    Request(rid=7, sampling=SamplingParams(max_tokens=5, temperature=0.0, top_p=0.9, top_k=40,
                                           min_p=0.05, seed=123, stop=["\n\n", "END"]),
            prompt="Once upon a time"),
    Request(rid=8, sampling=SamplingParams(max_tokens=1), prompt=[1, 2, 3]),
    Request(rid=9, sampling=SamplingParams(max_tokens=1, seed=0),
            messages=[{"role": "assistant", "content": None,
                       "tool_calls": [{"id": "c1", "function": {"name": "f"}}]}]),
    Cancel(rid=7),
    Started(rid=7, prompt_tokens=12, cached_tokens=4),
    Started(rid=7, prompt_tokens=0),
    Step(deltas=[Delta(rid=7, content="Hel", tokens=1), Delta(rid=8, content="", tokens=1),
                 Delta(rid=9, content="ünïcødé 🎉")]),
    Step(deltas=[]),
    End(rid=7, finish_reason="length", prompt_tokens=12, completion_tokens=5, cached_tokens=4),
    End(rid=7, finish_reason="cancelled"),
    Error(rid=7, code="context_length_exceeded", message="prompt has 9000 tokens; limit 8192"),
]


def test_protocol_version_is_a_positive_int() -> None:
    assert type(PROTOCOL_VERSION) is int
    assert PROTOCOL_VERSION >= 1


def test_every_message_type_has_an_example() -> None:
    union = set(typing.get_args(protocol.Message))
    assert union == {type(m) for m in EXAMPLES}


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: protocol.Message) -> None:
    data = encode(msg)
    assert isinstance(data, bytes)
    back = decode(data)
    assert type(back) is type(msg)
    assert back == msg


def test_tags_are_distinct() -> None:
    tags = [t.__struct_config__.tag for t in typing.get_args(protocol.Message)]
    assert len(tags) == len(set(tags))


def test_unknown_fields_from_a_newer_peer_are_ignored() -> None:
    raw = msgspec.msgpack.encode({"t": "end", "rid": 3, "finish_reason": "stop",
                                  "completion_tokens": 2, "logprobs": [0.1, 0.2],
                                  "new_thing": {"nested": True}})
    assert decode(raw) == End(rid=3, finish_reason="stop", completion_tokens=2)


def test_unknown_fields_in_nested_structs_are_ignored() -> None:
    raw = msgspec.msgpack.encode({
        "t": "step",
        "deltas": [{"rid": 1, "content": "a", "tokens": 1, "audio": "hmm"}],
    })
    assert decode(raw) == Step(deltas=[Delta(rid=1, content="a", tokens=1)])
    raw = msgspec.msgpack.encode({
        "t": "request", "rid": 1, "prompt": "x",
        "sampling": {"max_tokens": 3, "dry_multiplier": 1.1},
    })
    assert decode(raw) == Request(rid=1, sampling=SamplingParams(max_tokens=3), prompt="x")


def test_hello_from_a_newer_peer_still_shows_its_version() -> None:
    raw = msgspec.msgpack.encode({"t": "hello", "identity": "m/b/1", "pid": 5,
                                  "protocol_version": PROTOCOL_VERSION + 1,
                                  "package_version": "9.9", "capabilities": ["vision"]})
    msg = decode(raw)
    assert isinstance(msg, Hello)
    assert msg.protocol_version == PROTOCOL_VERSION + 1


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",  # never-used msgpack byte
    b"\x93\x01\x02",  # truncated array
    b"not msgpack at all",
])
def test_garbage_bytes_raise_msgspec_errors(data: bytes) -> None:
    with pytest.raises(msgspec.MsgspecError):
        decode(data)


@pytest.mark.parametrize("obj", [
    {"t": "teleport", "rid": 1},  # unknown tag
    {"rid": 1, "finish_reason": "stop"},  # no tag at all
    {"t": "end", "finish_reason": "stop"},  # required field missing
    {"t": "end", "rid": "one", "finish_reason": "stop"},  # wrong type
    [1, 2, 3],
    42,
])
def test_well_formed_msgpack_that_is_not_a_message_raises_validation_error(obj: object) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(msgspec.msgpack.encode(obj))


def test_defaults_are_omitted_on_the_wire() -> None:
    # Small frames: a Delta with only a rid and a token count carries no empty content.
    raw = msgspec.msgpack.decode(encode(Step(deltas=[Delta(rid=1, tokens=1)])))
    assert raw == {"t": "step", "deltas": [{"rid": 1, "tokens": 1}]}
