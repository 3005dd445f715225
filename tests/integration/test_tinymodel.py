"""Checks for tests/tinymodel.py: the tiny random llama that other tests build on."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parents[1])
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
from mlx_lm.generate import BatchGenerator, StopSequences  # noqa: E402

from tinymodel import ADDED_TOKENS, CHATML_TEMPLATE, SPECIAL_TOKENS, build_tiny_llama  # noqa: E402

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is the weather "},
            {"type": "text", "text": "in Paris?"},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]

PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Tell me a story.",
    "hello world",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return mlx_lm.load(str(tiny_dir))


def _chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
    )


def _run_batch(model, prompts, *, max_tokens, stop_tokens, stop_sequences=None):
    """Drive a BatchGenerator to completion: {uid: (tokens, finish_reason, all_tokens)}."""
    gen = BatchGenerator(model, stop_tokens=stop_tokens)
    try:
        uids = gen.insert(
            prompts, max_tokens=[max_tokens] * len(prompts), stop_sequences=stop_sequences
        )
        tokens = {uid: [] for uid in uids}
        done = {}
        for _ in range(10 * max_tokens + 10):
            if len(done) == len(uids):
                break
            prompt_responses, generation_responses = gen.next()
            for r in generation_responses:
                assert r.uid in tokens and r.uid not in done
                tokens[r.uid].append(r.token)
                if r.finish_reason is not None:
                    done[r.uid] = (r.finish_reason, r.all_tokens)
                    assert r.prompt_cache is not None
                else:
                    assert r.prompt_cache is None and r.all_tokens is None
        else:
            pytest.fail("BatchGenerator did not finish")
        assert gen.next() == ([], [])
        return {uid: (tokens[uid], *done[uid]) for uid in uids}
    finally:
        gen.close()


def test_files_and_config(tiny_dir):
    assert sorted(p.name for p in tiny_dir.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 2
    assert config["hidden_size"] == 64
    assert config["num_attention_heads"] == 4
    assert config["num_key_value_heads"] == 2
    assert config["intermediate_size"] == 128
    assert config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] > 0 and config["rope_theta"] > 0

    tok_json = json.loads((tiny_dir / "tokenizer.json").read_text())
    assert tok_json["model"]["type"] == "BPE"
    assert tok_json["decoder"]["type"] == "ByteLevel"
    base = len(tok_json["model"]["vocab"])
    added = {t["content"]: t for t in tok_json["added_tokens"]}
    assert set(added) == set(SPECIAL_TOKENS) | set(ADDED_TOKENS)
    assert config["vocab_size"] == base + len(added)
    # All 256 bytes plus a few hundred merges.
    assert 256 + 200 <= base <= 256 + 500
    assert len(tok_json["model"]["merges"]) == base - 256
    assert config["eos_token_id"] == added["<|im_end|>"]["id"]
    assert all(added[t]["special"] for t in SPECIAL_TOKENS)

    tok_config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["eos_token"] == "<|im_end|>"
    assert tok_config["pad_token"] == "<|endoftext|>"
    assert tok_config["model_max_length"] == 2048
    assert tok_config["chat_template"] == CHATML_TEMPLATE

    weights, metadata = mx.load(str(tiny_dir / "model.safetensors"), return_metadata=True)
    assert metadata == {"format": "mlx"}
    assert weights["model.embed_tokens.weight"].shape == (config["vocab_size"], 64)
    assert "lm_head.weight" not in weights


def test_build_options(tmp_path):
    path = build_tiny_llama(
        tmp_path / "m",
        layers=1,
        hidden=32,
        max_position_embeddings=256,
        chat_template="{{ messages[0]['content'] }}",
    )
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    assert config["hidden_size"] == 32
    assert config["max_position_embeddings"] == 256
    model, tokenizer = mlx_lm.load(str(path))
    assert len(model.layers) == 1
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "plain"}], tokenize=False
    )
    assert text == "plain"


def test_build_is_fast(tmp_path):
    build_tiny_llama(tmp_path / "warm")  # imports done
    start = time.perf_counter()
    build_tiny_llama(tmp_path / "timed")
    assert time.perf_counter() - start < 1.0


def test_load(loaded):
    model, tokenizer = loaded
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    assert set(tokenizer.eos_token_ids) == {eos_id}
    # mlx-lm infers its reasoning and tool-call handling from the tokenizer.
    assert tokenizer.has_thinking and tokenizer.think_start == "<think>"
    assert tokenizer.tool_parser is not None
    assert tokenizer.tool_call_start == "<tool_call>"
    assert tokenizer.tool_call_end == "</tool_call>"
    logits = model(mx.array([_chat_ids(tokenizer, "Hi")]))
    assert logits.shape[-1] == model.args.vocab_size
    assert not mx.isnan(logits).any().item()


def test_chat_template_conversation_with_tools(loaded):
    _, tokenizer = loaded
    text = tokenizer.apply_chat_template(
        CONVERSATION, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools")
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in text
    assert "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n" in text
    assert (
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
    ) in text
    assert (
        "<|im_start|>user\n<tool_response>\n"
        '{"temp": 21}\n</tool_response><|im_end|>\n'
    ) in text
    assert text.endswith("<|im_start|>assistant\n")
    assert "None" not in text

    ids = tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=True)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert tokenizer.decode(ids) == text

    # Arguments given as an object render the same; no tools, no tools block.
    dict_args = [dict(m) for m in CONVERSATION]
    dict_args[2] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    }
    assert (
        tokenizer.apply_chat_template(
            dict_args, tools=TOOLS, add_generation_prompt=True, tokenize=False
        )
        == text
    )
    plain = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert plain.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert "<tools>" not in plain
    assert not plain.endswith("<|im_start|>assistant\n")


def test_encode_decode_round_trip(loaded):
    _, tokenizer = loaded
    text = 'Hello, world! The quick brown fox: {"a": [1, 2.5]} #42 ~ok?'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) < len(text)  # merges do something
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text) == ids  # no bos/eos added
    # Any bytes survive (byte-level BPE).
    assert tokenizer.decode(tokenizer.encode("naïve café ✓")) == "naïve café ✓"


def test_special_tokens_are_single_ids(loaded):
    _, tokenizer = loaded
    ids = {}
    for token in SPECIAL_TOKENS + ADDED_TOKENS:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        assert len(encoded) == 1, token
        ids[token] = encoded[0]
        assert tokenizer.decode(encoded) == token
    assert len(set(ids.values())) == len(ids)
    # Inside text too.
    encoded = tokenizer.encode("a<think>b</think><tool_call>{}</tool_call>")
    for token in ("<think>", "</think>", "<tool_call>", "</tool_call>"):
        assert ids[token] in encoded
    # Special tokens are dropped by skip_special_tokens, the added ones are kept.
    mixed = [ids["<|im_start|>"], ids["<think>"], ids["<|im_end|>"]]
    assert tokenizer.decode(mixed, skip_special_tokens=True) == "<think>"
    chat = _chat_ids(tokenizer, "Hi")
    assert chat[0] == ids["<|im_start|>"] and chat.count(ids["<|im_end|>"]) == 1


def test_batch_generator_two_prompts(loaded):
    model, tokenizer = loaded
    eos_id = tokenizer.eos_token_id
    prompts = [_chat_ids(tokenizer, PROMPTS[0]), _chat_ids(tokenizer, PROMPTS[1])]
    results = _run_batch(model, prompts, max_tokens=8, stop_tokens=[[eos_id]])
    assert len(results) == 2
    for (tokens, finish_reason, all_tokens), prompt in zip(results.values(), prompts):
        assert finish_reason == "length"
        assert len(tokens) == 8
        assert eos_id not in tokens
        # all_tokens at the finish: the prompt and every generated token.
        assert all_tokens == prompt + tokens
        assert tokenizer.decode(tokens).strip()


def test_greedy_output_is_tame(loaded):
    """Greedy decoding never stops early on eos, and emits visible ASCII."""
    model, tokenizer = loaded
    eos_id = tokenizer.eos_token_id
    prompts = [_chat_ids(tokenizer, p) for p in PROMPTS]
    results = _run_batch(model, prompts, max_tokens=8, stop_tokens=[[eos_id]])
    for tokens, finish_reason, _ in results.values():
        assert finish_reason == "length" and len(tokens) == 8
        text = tokenizer.decode(tokens)
        assert text.isascii() and text.strip()
    # eos is far below the greedy choice at the first step.
    logits = model(mx.array([prompts[1]]))[0, -1]
    logprobs = logits - mx.logsumexp(logits)
    assert logprobs.max().item() - logprobs[eos_id].item() > 5


def test_stop_token_finishes_with_that_token(loaded):
    """BatchGenerator's finish on a stop sequence returns the stop token itself."""
    model, tokenizer = loaded
    eos_id = tokenizer.eos_token_id
    prompt = _chat_ids(tokenizer, PROMPTS[0])
    (free,) = _run_batch(model, [prompt], max_tokens=4, stop_tokens=[[eos_id]]).values()
    first = free[0][0]
    (stopped,) = _run_batch(
        model,
        [prompt],
        max_tokens=4,
        stop_tokens=[[eos_id]],
        stop_sequences=[StopSequences([[eos_id], [first]])],
    ).values()
    tokens, finish_reason, all_tokens = stopped
    assert finish_reason == "stop"
    assert tokens == [first]
    assert all_tokens == prompt + [first]


def test_same_seed_same_weights_and_seeds_differ(tmp_path):
    a = build_tiny_llama(tmp_path / "a", seed=0)
    b = build_tiny_llama(tmp_path / "b", seed=0)
    c = build_tiny_llama(tmp_path / "c", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()

    outputs = []
    for path in (a, c):
        model, tokenizer = mlx_lm.load(str(path))
        prompts = [_chat_ids(tokenizer, p) for p in PROMPTS]
        results = _run_batch(model, prompts, max_tokens=8, stop_tokens=[[tokenizer.eos_token_id]])
        outputs.append([r[0] for r in results.values()])
    assert outputs[0] != outputs[1]
