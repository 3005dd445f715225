"""GGUF import: tiny llama GGUF files written here with gguf.GGUFWriter become loadable MLX dirs.

Covers the tensor types mx.load keeps quantized (Q4_0, Q4_1, Q8_0), the ones that go through the
gguf dequantizer (BF16, Q4_K, Q6_K, Q5_0), and the refusals. No network, no real model file.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from tokenizers import pre_tokenizers

from mlxrouter.gguf import GGUFImportError, import_gguf, main

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 256, 4, 2, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Q4_0 / Q4_1 / Q8_0 stay quantized; the rest exercise the dequantizer (mx.load gets Q4_K wrong).
MIXED_TYPES = {
    "token_embd": Q.Q8_0,
    "output": Q.F16,
    "blk.0.attn_q": Q.Q4_0,
    "blk.0.attn_k": Q.Q4_1,
    "blk.0.attn_v": Q.Q8_0,
    "blk.0.attn_output": Q.F16,
    "blk.0.ffn_gate": Q.Q4_0,
    "blk.0.ffn_up": Q.BF16,
    "blk.0.ffn_down": Q.Q4_K,
    "blk.1.ffn_down": Q.Q6_K,
}
# One Q5_0 tensor makes mx.load reject the whole file, so every tensor is dequantized.
FALLBACK_TYPES = {**MIXED_TYPES, "blk.1.ffn_gate": Q.Q5_0}
LAYER_SHAPES = {
    "attn_q": (HIDDEN, HIDDEN),
    "attn_k": (HIDDEN // HEADS * KV_HEADS, HIDDEN),
    "attn_v": (HIDDEN // HEADS * KV_HEADS, HIDDEN),
    "attn_output": (HIDDEN, HIDDEN),
    "ffn_gate": (FFN, HIDDEN),
    "ffn_up": (FFN, HIDDEN),
    "ffn_down": (HIDDEN, FFN),
}


def vocabulary() -> list[str]:
    merged = ["".join(m.split(" ")) for m in MERGES]
    return SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + merged


def k_quant_blocks(rng: np.random.Generator, shape: tuple[int, int], kind: Q) -> np.ndarray:
    """Random K-quant blocks with sane scales (gguf can dequantize K-quants but not make them)."""
    rows, cols = shape
    n_blocks = rows * cols // 256
    if kind == Q.Q4_K:  # d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        blocks = rng.integers(0, 256, (n_blocks, 144), dtype=np.uint8)
        blocks[:, 0:4] = np.array([2e-4, 1e-3], np.float16).view(np.uint8)
    else:  # Q6_K: 128 + 64 bytes of 6-bit values, 16 int8 scales, d (f16)
        blocks = rng.integers(0, 256, (n_blocks, 210), dtype=np.uint8)
        blocks[:, 208:210] = np.array([5e-5], np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def tensor_data(rng: np.random.Generator, shape: tuple[int, ...], kind: Q) -> np.ndarray:
    if kind in (Q.Q4_K, Q.Q6_K):
        return k_quant_blocks(rng, shape, kind)
    if kind == Q.Q8_1:  # a type the gguf package cannot dequantize
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        row_bytes = shape[1] // block_size * block_bytes
        return rng.integers(0, 256, (shape[0], row_bytes), dtype=np.uint8)
    values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    return values if kind == Q.F32 else gguf.quants.quantize(values, kind)


def write_gguf(
    path: Path,
    types: dict[str, Q] = MIXED_TYPES,
    *,
    arch: str = "llama",
    tokenizer_model: str = "gpt2",
    pre: str = "smollm",
    add_bos: bool = False,
    tied: bool = False,
    rope_freqs: np.ndarray | None = None,
) -> Path:
    rng = np.random.default_rng(0)
    tokens = vocabulary()
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd": (len(tokens), HIDDEN),
        "output_norm": (HIDDEN,),
    }
    if not tied:
        shapes["output"] = (len(tokens), HIDDEN)
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.{name}": shape for name, shape in LAYER_SHAPES.items()}
        shapes |= {f"blk.{i}.attn_norm": (HIDDEN,), f"blk.{i}.ffn_norm": (HIDDEN,)}
    for name, shape in shapes.items():
        kind = types.get(name, Q.F32 if len(shape) == 1 else Q.Q4_0)
        writer.add_tensor(f"{name}.weight", tensor_data(rng, shape, kind), raw_dtype=kind)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def imported_weight(
    weights: dict[str, mx.array], module: str, config: dict[str, Any]
) -> np.ndarray:
    if f"{module}.scales" not in weights:
        return np.array(weights[f"{module}.weight"].astype(mx.float32))
    spec = config["quantization"][module]
    w, scales, biases = (weights[f"{module}.{k}"] for k in ("weight", "scales", "biases"))
    values = mx.dequantize(w, scales, biases, group_size=spec["group_size"], bits=spec["bits"])
    return np.array(values.astype(mx.float32))


def module_for(gguf_name: str) -> str:
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    stem = gguf_name.removesuffix(".weight")
    if stem in names:
        return names[stem]
    _, layer, kind = stem.split(".")
    target = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }[kind]
    return f"model.layers.{layer}.{target}"


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("gguf")
    summary = import_gguf(write_gguf(root / "tiny.gguf"), root / "model")
    return root / "model", summary


@pytest.mark.parametrize("types", [MIXED_TYPES, FALLBACK_TYPES], ids=["mixed", "mx-load-fallback"])
def test_weights_match_reference_dequantization(tmp_path: Path, types: dict[str, Q]) -> None:
    source = write_gguf(tmp_path / "tiny.gguf", types)
    import_gguf(source, tmp_path / "model")
    weights = mx.load(str(tmp_path / "model" / "model.safetensors"))
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    for tensor in gguf.GGUFReader(source).tensors:
        reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        reference = reference.reshape([int(n) for n in reversed(tensor.shape)])
        actual = imported_weight(weights, module_for(tensor.name), config)
        scale = float(np.abs(reference).max())
        np.testing.assert_allclose(
            actual, reference, rtol=2e-3, atol=2e-3 * scale, err_msg=tensor.name
        )


def test_fallback_keeps_nothing_quantized(tmp_path: Path) -> None:
    summary = import_gguf(write_gguf(tmp_path / "tiny.gguf", FALLBACK_TYPES), tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert "quantization" not in config
    assert summary["quantization"]["quantized_modules"] == 0


def test_config_records_rope_and_per_layer_bits(imported: tuple[Path, dict[str, Any]]) -> None:
    model_dir, summary = imported
    config = json.loads((model_dir / "config.json").read_text())
    assert config["rope_traditional"] is True
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is False
    assert (config["hidden_size"], config["num_key_value_heads"], config["vocab_size"]) == (
        HIDDEN, KV_HEADS, len(vocabulary()),
    )
    quantization = config["quantization"]
    assert (quantization["group_size"], quantization["bits"]) == (32, 4)
    assert quantization["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert quantization["model.layers.0.self_attn.v_proj"]["bits"] == 8
    assert quantization["model.layers.0.self_attn.k_proj"]["bits"] == 4
    assert "model.layers.0.mlp.down_proj" not in quantization  # Q4_K: dequantized
    assert "lm_head" not in quantization  # F16
    assert summary["quantization"]["dequantized_tensors"] == 3  # BF16, Q4_K, Q6_K
    assert summary["tensor_types"]["Q4_K"] == 1
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == 2


def test_mlx_lm_loads_generates_and_tokenizes(imported: tuple[Path, dict[str, Any]]) -> None:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(imported[0]))
    text = "hello world"
    ids = tokenizer.encode(text)
    assert len(ids) < len(text)  # the merges apply
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [1]
    messages = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert tokenizer.decode(prompt) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    steps = list(mlx_lm.stream_generate(model, tokenizer, prompt=prompt, max_tokens=3))
    assert 1 <= len(steps) <= 3


@pytest.mark.parametrize(
    ("pre", "add_bos", "words"),
    [
        ("smollm", False, ["x", "Ġ", "1", "2", "3"]),
        ("llama-bpe", True, ["x", "Ġ", "123"]),
        ("gpt-2", False, ["x", "Ġ123"]),
    ],
)
def test_pre_tokenizer_and_bos_follow_metadata(
    tmp_path: Path, pre: str, add_bos: bool, words: list[str]
) -> None:
    from tokenizers import Tokenizer

    import_gguf(write_gguf(tmp_path / "tiny.gguf", pre=pre, add_bos=add_bos), tmp_path / "model")
    tokenizer = Tokenizer.from_file(str(tmp_path / "model" / "tokenizer.json"))
    assert [word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str("x 123")] == words
    assert (tokenizer.encode("x").ids[0] == 1) is add_bos
    tokenizer_config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is add_bos


def test_tied_embeddings_when_output_is_absent(tmp_path: Path) -> None:
    import_gguf(write_gguf(tmp_path / "tiny.gguf", tied=True), tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True


def llama3_factors(factor: float) -> np.ndarray:
    dims, base, original = HIDDEN // HEADS, 10000.0, 8192
    out = []
    for i in range(0, dims, 2):
        wavelen = 2 * math.pi * base ** (i / dims)
        smooth = (original / wavelen - 1) / (4 - 1)
        if wavelen < original / 4:
            out.append(1.0)
        elif wavelen > original:
            out.append(factor)
        else:
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)


def test_rope_freqs_as_llama3_scaling(tmp_path: Path) -> None:
    import_gguf(write_gguf(tmp_path / "tiny.gguf", rope_freqs=llama3_factors(8.0)), tmp_path / "m")
    scaling = json.loads((tmp_path / "m" / "config.json").read_text())["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0


def test_unknown_rope_freqs_refused(tmp_path: Path) -> None:
    source = write_gguf(tmp_path / "tiny.gguf", rope_freqs=np.linspace(1, 3, HIDDEN // HEADS // 2))
    with pytest.raises(GGUFImportError, match="rope_freqs"):
        import_gguf(source, tmp_path / "model")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"arch": "mamba"}, "architecture 'mamba'"),
        ({"tokenizer_model": "llama"}, "tokenizer model 'llama' is not supported yet"),
        ({"pre": "qwen2"}, "pre-tokenizer 'qwen2' is not supported yet"),
        ({"types": {**MIXED_TYPES, "blk.1.attn_q": Q.Q8_1}}, "blk.1.attn_q.weight has type Q8_1"),
    ],
)
def test_unsupported_files_refused(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    source = write_gguf(tmp_path / "tiny.gguf", **options)
    with pytest.raises(GGUFImportError, match=message):
        import_gguf(source, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]  # no half model left


def test_non_empty_out_dir_refused(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("mine")
    with pytest.raises(GGUFImportError, match="not an empty directory"):
        import_gguf(write_gguf(tmp_path / "tiny.gguf"), tmp_path / "model")
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["keep.txt"]


def test_empty_out_dir_is_filled(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    import_gguf(write_gguf(tmp_path / "tiny.gguf"), tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_main_reports_errors_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    assert main([str(bogus), str(tmp_path / "model")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "GGUF" in captured.err
    assert captured.out == ""


def test_main_prints_one_json_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(write_gguf(tmp_path / "tiny.gguf")), str(tmp_path / "model")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["architecture"] == "llama" and summary["n_tensors"] == 2 * 9 + 3


def test_import_gguf_name_is_a_model_id_not_a_path(tmp_path: Path) -> None:
    """`--name ../x` or `/abs` wrote outside the model directory (`--out` is for that)."""
    import os
    import subprocess
    import sys

    source = write_gguf(tmp_path / "tiny.gguf")
    models = tmp_path / "models"
    env = {**os.environ, "MLXROUTER_HOME": str(tmp_path / "home")}
    env.pop("MLXROUTER_CONFIG", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mlxrouter", "models", "import-gguf",
                               str(source), "--model-dir", str(models), *args],
                              capture_output=True, text=True, timeout=120, env=env)

    for name in ("../escape", str(tmp_path / "abs"), ".hidden", "a/b/c", "a//b"):
        done = run("--name", name)
        assert done.returncode == 2 and "--name takes a model id" in done.stderr, (name, done)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "abs").exists()
    assert run("--name", "org/mine").returncode == 0
    assert (models / "org" / "mine" / "config.json").is_file()
    # an id that is there already, in another directory: the import would hide one of them
    shutil.copytree(models / "org" / "mine", models / "org--other")
    clash = run("--name", "org/other")
    assert clash.returncode == 2 and "there is a model 'org/other' already" in clash.stderr
    assert not (models / "org" / "other").exists()
    # the hint names the directory it was given (it pointed `models rm` at ~/models)
    assert clash.stderr.startswith("mlxrouter: import failed: ")
    assert f"mlxrouter models rm org/other --model-dir {models})" in clash.stderr
    # "org--mine" is the id org/mine, which is there (it imported a copy hidden behind it)
    hidden = run("--name", "org--mine")
    assert hidden.returncode == 2 and "there is a model 'org/mine' already" in hidden.stderr
    assert not (models / "org--mine").exists()
