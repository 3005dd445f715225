"""Tiny random-weight MLX text models, built on disk for tests (offline, fast).

``build_tiny_llama(path)`` writes a complete model directory that ``mlx_lm.load``
accepts:

- ``config.json``: a 2-layer llama (hidden 64, 4 heads, 2 kv heads, intermediate 128),
  tied embeddings, vocab size equal to the tokenizer's.
- ``model.safetensors``: the parameters of a randomly initialised
  ``mlx_lm.models.llama.Model`` (``mx.random.seed(seed)``, so one seed always gives
  the same bytes), saved with ``mx.save_safetensors(..., metadata={"format": "mlx"})``.
- ``tokenizer.json``: a byte-level BPE made with ``tokenizers`` (all 256 byte tokens
  plus a few hundred merges learned from a built-in English corpus), with the ChatML
  special tokens ``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>`` and the added
  tokens ``<think>``, ``</think>``, ``<tool_call>``, ``</tool_call>``.
- ``tokenizer_config.json``: ``PreTrainedTokenizerFast`` with a ChatML (Qwen/Hermes
  style) chat template, ``CHATML_TEMPLATE``.

The eos token is ``<|im_end|>``. Output of the random model is gibberish, but the
eos token is made very unlikely (see ``_tame``) so ``max_tokens`` and
``finish_reason == "length"`` are reliably testable. Tests that need a "stop"
finish can use a logits processor / logit bias, or stop tokens of their own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = [
    "CHATML_TEMPLATE",
    "EOS_TOKEN",
    "SPECIAL_TOKENS",
    "ADDED_TOKENS",
    "build_tiny_llama",
]

EOS_TOKEN = "<|im_end|>"
# Special tokens (skipped by ``decode(..., skip_special_tokens=True)``).
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
# Non-special added tokens, like Qwen3's: they survive decoding, so reasoning and
# tool-call parsers can see them in the text.
ADDED_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]

_NUM_MERGES = 320
# See _tame().
EMBED_SCALE = 0.1
SHRINK = 0.05
BIAS_VALUE = 0.1
BIAS_GAIN = 600.0  # for 2 layers; scaled by sqrt(layers / 2)

# A ChatML template in the Qwen2.5 / Hermes style.
# - roles: system, user, assistant, tool (consecutive tool messages are grouped in
#   one user turn as <tool_response> blocks);
# - content may be a string, None, or a list of parts whose text parts are joined
#   with "" (as mlx_lm.server does);
# - assistant tool_calls (OpenAI shape, arguments as a JSON string or an object)
#   are rendered as <tool_call>{"name": ..., "arguments": ...}</tool_call>;
# - ``tools`` are listed in a <tools></tools> block of the system turn;
# - ``add_generation_prompt`` appends "<|im_start|>assistant\n".
# It names both "<tool_call>" and "tool_call.name", which is how mlx_lm infers its
# ``json_tools`` tool parser.
CHATML_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is none -%}"
    "{%- elif content is string -%}{{- content -}}"
    "{%- else -%}"
    "{%- for part in content -%}"
    "{%- if part is string -%}{{- part -}}"
    "{%- elif part is mapping and part.get('type', 'text') == 'text' -%}"
    "{{- part.get('text', '') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0].role == 'system' %}"
    "{{- render_content(messages[0].content) + '\\n\\n' }}"
    "{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}"
    "{{- '\\n' }}{{- tool | tojson }}"
    "{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n'
    "</tool_call><|im_end|>\\n' }}"
    "{%- elif messages and messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + render_content(messages[0].content) + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}"
    "{%- endif %}"
    "{{- '\\n<tool_response>\\n' + render_content(message.content) + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- set text = render_content(message.content) %}"
    "{%- if message.tool_calls %}"
    "{%- if text %}{{- '\\n' + text }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- else %}"
    "{{- '\\n' + text }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + render_content(message.content)"
    " + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Training text for the BPE merges: plain English plus the shapes the tests send
# (chat markup, JSON tool calls), so common words and JSON punctuation get merges.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. Hello, world! How are you today?
I am fine, thank you. What is the capital of France? The capital of France is Paris.
What is the weather like in London? It is raining in London and sunny in Madrid.
You are a helpful assistant. Please answer the question as briefly as you can.
Tell me a story about a small robot that wanted to learn how to paint the sea.
Once upon a time there was a little robot who lived in a house near the water.
Every morning the robot looked at the waves and wondered what colour they were.
The robot asked the cat, the bird and the old man, but nobody knew the answer.
Count from one to ten: one, two, three, four, five, six, seven, eight, nine, ten.
Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2024 appear in text.
The server streams tokens to the client, and the client prints them as they arrive.
A model reads a prompt, thinks about it, and then writes an answer for the user.
Let me think about this step by step before I give the final answer to the user.
First, we read the question. Second, we find the facts. Third, we write the reply.
The function returns a list of results, and each result has a name and a value.
Call the tool with the city name to get the current temperature in that city.
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"name": "get_time", "arguments": {"timezone": "Europe/London"}}
{"type": "function", "function": {"name": "search", "parameters": {"type": "object",
"properties": {"query": {"type": "string", "description": "The search query"}},
"required": ["query"]}}}
def add(a, b):
    return a + b
for i in range(10):
    print(i, "hello")
This is a test. This is only a test. Testing, testing, one, two, three.
Good morning! Good night! See you later. Thanks a lot, have a nice day.
"""


def _build_tokenizer():
    """A deterministic byte-level BPE tokenizer (``tokenizers.Tokenizer``)."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # all 256 byte symbols
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + _NUM_MERGES,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=alphabet,
        special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tok


def _token_classes(tok, base_vocab: int):
    """Split the vocabulary for ``_tame``: (quiet ids, silent ids).

    Silent: every special and added token, eos included. Quiet: BPE tokens that do
    not decode to printable ASCII with some non-space character (whitespace-only,
    control and lone non-ASCII byte tokens). The rest are the "visible" tokens.
    """
    quiet, silent = [], []
    for i in range(tok.get_vocab_size(with_added_tokens=True)):
        if i >= base_vocab:
            silent.append(i)
            continue
        text = tok.decode([i])
        if not (text.isascii() and text.isprintable() and text.strip()):
            quiet.append(i)
    return quiet, silent


def _tame(weights, quiet: list[int], silent: list[int], layers: int):
    """Make a random model's output tame: visible ASCII gibberish, no early eos.

    Why: with tied embeddings the lm head *is* the embedding matrix E, so the logit
    of token j is dot(h, E[j]), h being the final RMS-normalised hidden state.
    Random weights give every token a logit of similar size, so a plain random
    model stops at an arbitrary step (``max_tokens`` / finish_reason "length" tests
    become flaky, above all when sampling at temperature 1), emits "\\n" forever
    (prompts end with "assistant\\n" and the residual stream favours repeating the
    input token), lone UTF-8 bytes, or <think>/<tool_call>.

    How (only embedding rows, one hidden dimension and a few norm/projection
    entries change; everything else stays random):
    1. E is scaled by ``EMBED_SCALE`` (weakens the "repeat the input token" pull;
       greedy output gets more varied).
    2. The rows of the quiet and silent tokens (``_token_classes``) are shrunk by
       ``SHRINK``: without a bias their logits sit near 0, mid-pack.
    3. Hidden dimension ``d = hidden - 1`` becomes a bias unit. No layer reads it
       (its input/post-attention norm weights are 0) or writes it (its o_proj and
       down_proj rows are 0), so the input token's E[tok, d] reaches the final
       norm unchanged; the final norm's weight for d is ``BIAS_GAIN`` (times
       sqrt(layers / 2)). The logit of token j gets a bonus proportional to
       E[tok, d] * E[j, d], tok being the input token. E[j, d] is
       ``BIAS_VALUE`` for visible tokens, half that for quiet tokens and 0 for
       silent ones, eos included: eos is biased downward by about 15 nats or more
       relative to the visible tokens at every step (half of that when the input
       token is a quiet one such as the "\\n" that ends every chat prompt), so
       greedy decoding never picks it and sampling at temperature 1 practically
       never does. (After a silent input token, e.g. a prompt that ends with
       "<|im_end|>", there is no bonus for one step; eos then sits mid-pack,
       still below the greedy choice.)
    Tests that need finish_reason "stop" should stop on a token the model does
    emit, or force eos with a logits processor.
    """
    import mlx.core as mx

    key = "model.embed_tokens.weight"
    dtype = weights[key].dtype
    emb = weights[key] * EMBED_SCALE
    n, hidden = emb.shape
    d = hidden - 1
    bias = mx.full((n,), BIAS_VALUE)
    bias[mx.array(quiet)] = BIAS_VALUE / 2
    bias[mx.array(silent)] = 0.0
    shrunk = mx.zeros((n,), dtype=mx.bool_)
    shrunk[mx.array(quiet + silent)] = True
    emb = mx.where(shrunk[:, None], emb * SHRINK, emb)
    is_d = mx.arange(hidden) == d
    emb = mx.where(is_d[None, :], bias[:, None], emb)
    weights[key] = emb.astype(dtype)

    def zero_row(name):
        w = weights[name]
        weights[name] = mx.where(is_d[:, None], 0.0, w).astype(w.dtype)

    def zero_entry(name):
        w = weights[name]
        weights[name] = mx.where(is_d, 0.0, w).astype(w.dtype)

    for i in range(layers):
        p = f"model.layers.{i}."
        zero_entry(p + "input_layernorm.weight")
        zero_entry(p + "post_attention_layernorm.weight")
        zero_row(p + "self_attn.o_proj.weight")
        zero_row(p + "mlp.down_proj.weight")
    norm = weights["model.norm.weight"]
    # The residual stream grows with depth, and h[d] = x[d] / rms(x) shrinks with it.
    gain = BIAS_GAIN * math.sqrt(max(layers, 1) / 2)
    weights["model.norm.weight"] = mx.where(is_d, gain, norm).astype(norm.dtype)
    return weights


def build_tiny_llama(
    path: Path,
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    max_position_embeddings: int = 2048,
    chat_template: str | None = None,
) -> Path:
    """Write a tiny random llama model directory at ``path`` and return ``path``.

    ``seed`` fixes the weights (same seed, same ``model.safetensors`` bytes);
    ``chat_template`` replaces ``CHATML_TEMPLATE`` in ``tokenizer_config.json``.
    ``hidden`` must be a multiple of 4 (4 attention heads, 2 kv heads).
    Side effect: calls ``mx.random.seed(seed)``, i.e. resets MLX's global RNG.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    if hidden % 4:
        raise ValueError("hidden must be a multiple of 4")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tok = _build_tokenizer()
    base_vocab = tok.get_vocab_size(with_added_tokens=False)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos_id = tok.token_to_id(EOS_TOKEN)
    tok.save(str(path / "tokenizer.json"))

    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": tok.token_to_id("<|endoftext|>"),
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))

    model_keys = {f.name for f in llama.ModelArgs.__dataclass_fields__.values()}
    args = llama.ModelArgs(**{k: v for k, v in config.items() if k in model_keys})
    mx.random.seed(seed)
    model = llama.Model(args)
    weights = dict(tree_flatten(model.parameters()))
    weights = _tame(weights, *_token_classes(tok, base_vocab), layers)
    mx.eval(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # ChatML models (Qwen) have no bos token: prompts start with <|im_start|>.
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "chat_template": CHATML_TEMPLATE if chat_template is None else chat_template,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return path
