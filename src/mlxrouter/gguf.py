"""Import llama-family GGUF files as MLX model directories (`mlxrouter models import-gguf`).

Owns the GGUF -> MLX conversion: hyperparameters to `config.json`, tensors to
`model.safetensors` (Q4_0 / Q4_1 / Q8_0 kept quantized, everything else dequantized), and the
vocabulary to a `tokenizers` byte-level BPE (`tokenizer.json`, `tokenizer_config.json`).
Anything it cannot convert faithfully raises `GGUFImportError`; it never writes a model that
would load but compute something else.

Runs in the CLI process or in a subprocess of the daemon (`python -m mlxrouter.gguf FILE OUT`),
never inside the daemon: it imports mlx, which the daemon must not. mlx, numpy, gguf and
tokenizers are imported inside the functions that use them, so `import mlxrouter.gguf` is cheap.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import mlx.core as mx
    import numpy as np
    from gguf import GGUFReader, ReaderTensor
    from tokenizers import Tokenizer
    from tokenizers.pre_tokenizers import PreTokenizer
    from tokenizers.processors import PostProcessor

logger = logging.getLogger(__name__)

GROUP_SIZE = 32
# The types taken from MLX's bundled GGUF reader, which converts them exactly and keeps the
# quantized ones quantized. It returns Q4_K as f16 with wrong values, so everything else goes
# through the gguf package's dequantizer.
_MLX_NATIVE_TYPES = frozenset({"F32", "F16", "Q4_0", "Q4_1", "Q8_0"})
_MLX_QUANTIZED_TYPES = frozenset({"Q4_0", "Q4_1", "Q8_0"})
_GLOBAL_MODULES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_ROPE_FREQS = "rope_freqs.weight"
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_REQUIRED = object()


class GGUFImportError(ValueError):
    """A GGUF file this importer cannot turn into a faithful MLX model, or an unusable target."""


def import_gguf(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Convert `gguf_path` into a new MLX model directory `out_dir`; return a summary."""
    started = time.perf_counter()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _check_out_dir(out_dir)
    reader = _open_reader(gguf_path)
    config = _model_config(reader)
    tokenizer_files = _tokenizer_files(reader, config)
    converted = _convert_tensors(reader, gguf_path, config)
    if converted.bits_by_module:
        config["quantization"] = _quantization_config(converted.bits_by_module)
    _write_model_dir(out_dir, {"config.json": _json(config), **tokenizer_files}, converted.weights)
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    summary = {
        "architecture": config["model_type"],
        "out_dir": str(out_dir),
        "n_tensors": len(reader.tensors),
        "tensor_types": dict(sorted(types.items())),
        "quantization": _quantization_summary(converted),
        "seconds": round(time.perf_counter() - started, 2),
    }
    logger.info("gguf imported path=%s out=%s seconds=%s", gguf_path, out_dir, summary["seconds"])
    return summary


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise GGUFImportError(f"{out_dir} already exists and is not an empty directory")


def _open_reader(path: Path) -> GGUFReader:
    from gguf import GGUFReader

    if not path.is_file():
        raise GGUFImportError(f"no such file: {path}")
    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError) as exc:
        raise GGUFImportError(f"{path} is not a readable GGUF file: {exc}") from exc


def _field(reader: GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    entry = reader.fields.get(key)
    if entry is None:
        if default is _REQUIRED:
            raise GGUFImportError(f"GGUF metadata {key} is missing")
        return default
    return entry.contents()


def _float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (1e-05, not 9.99999974e-06)."""
    import numpy as np

    return float(str(np.float32(value)))


def _model_config(reader: GGUFReader) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFImportError(f"architecture {arch!r} is not supported yet (only llama)")
    if experts := _field(reader, "llama.expert_count", 0):
        raise GGUFImportError(f"mixture-of-experts llama ({experts} experts) is not supported yet")
    hidden = int(_field(reader, "llama.embedding_length"))
    n_heads = int(_field(reader, "llama.attention.head_count"))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // n_heads))
    if int(_field(reader, "llama.attention.value_length", head_dim)) != head_dim:
        raise GGUFImportError("different key and value head sizes are not supported")
    if int(_field(reader, "llama.rope.dimension_count", head_dim)) != head_dim:
        raise GGUFImportError("partial rotary embeddings (rope.dimension_count) are not supported")
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _float32(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(_field(reader, "llama.rope.freq_base", 10000.0)),
        # GGUF stores llama's Q/K rows permuted for GGML's interleaved rope; traditional rope
        # computes the same thing without un-permuting (possibly quantized) weights.
        "rope_traditional": True,
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
    }
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling == "linear":
        factor = _float32(_field(reader, "llama.rope.scaling.factor"))
        config["rope_scaling"] = {"type": "linear", "factor": factor}
    elif scaling != "none":
        raise GGUFImportError(f"rope scaling {scaling!r} is not supported yet")
    return config


def _llama3_rope_scaling(factors: np.ndarray, config: dict[str, Any]) -> dict[str, Any]:
    """Recognise `rope_freqs` as Llama 3.1's rope scaling, the only kind llama.cpp writes for llama.

    llama.cpp bakes the scaling into per-frequency factors and drops its parameters, so rebuild
    the factors from Llama 3's published parameters and accept only an exact match.
    """
    import numpy as np

    dims, theta = config["head_dim"], config["rope_theta"]
    factor, low, high, original = float(factors.max()), 1.0, 4.0, 8192
    wavelens = 2 * np.pi * theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    smooth = (original / wavelens - low) / (high - low)
    expected = np.where(wavelens < original / high, 1.0, 1 / ((1 - smooth) / factor + smooth))
    expected = np.where(wavelens > original / low, factor, expected)
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-4):
        raise GGUFImportError("rope_freqs.weight holds rope scaling this importer does not know")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def _module_path(name: str, n_layers: int) -> tuple[str, str]:
    """Map a GGUF tensor name to (MLX module path, parameter) or raise for names we do not know."""
    base, _, param = name.rpartition(".")
    parts = base.split(".")
    if param == "weight" and len(parts) == 1 and parts[0] in _GLOBAL_MODULES:
        return _GLOBAL_MODULES[parts[0]], param
    if param == "weight" and len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_MODULES:
        if parts[1].isdigit() and int(parts[1]) < n_layers:
            return f"model.layers.{int(parts[1])}.{_LAYER_MODULES[parts[2]]}", param
    raise GGUFImportError(f"tensor {name} is not part of a llama model this importer knows")


def _expected_modules(n_layers: int) -> set[str]:
    layers = {f"model.layers.{i}.{m}" for i in range(n_layers) for m in _LAYER_MODULES.values()}
    return layers | {"model.embed_tokens", "model.norm"}


@dataclass
class _Converted:
    weights: dict[str, mx.array] = field(default_factory=dict)
    bits_by_module: dict[str, int] = field(default_factory=dict)
    n_dequantized: int = 0


def _convert_tensors(reader: GGUFReader, path: Path, config: dict[str, Any]) -> _Converted:
    """MLX weights by name; completes `config` with what only the tensors tell."""
    n_layers = config["num_hidden_layers"]
    kinds = {t.tensor_type.name for t in reader.tensors}
    native = _load_native(path) if kinds & _MLX_NATIVE_TYPES else {}
    out = _Converted()
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            _set_rope_scaling(config, _llama3_rope_scaling(_dequantize(tensor, "float32"), config))
            continue
        module, param = _module_path(tensor.name, n_layers)
        kind = tensor.tensor_type.name
        if native is not None and kind in _MLX_QUANTIZED_TYPES:
            triple = _native_triple(native, tensor.name)
            out.bits_by_module[module] = _infer_bits(tensor.name, triple)
            out.weights.update({f"{module}.{key}": value for key, value in triple.items()})
        elif native is not None and kind in _MLX_NATIVE_TYPES:
            out.weights[f"{module}.{param}"] = native[tensor.name]
        else:
            out.weights[f"{module}.{param}"] = _dequantize_for_mlx(tensor)
            out.n_dequantized += kind not in ("F32", "F16")
    modules = {key.rpartition(".")[0] for key in out.weights}
    if missing := sorted(_expected_modules(n_layers) - modules):
        raise GGUFImportError(f"GGUF file lacks tensors for {', '.join(missing[:5])}")
    config["tie_word_embeddings"] = "lm_head" not in modules
    config["vocab_size"] = int(out.weights["model.embed_tokens.weight"].shape[0])
    return out


def _set_rope_scaling(config: dict[str, Any], scaling: dict[str, Any]) -> None:
    if "rope_scaling" in config:
        raise GGUFImportError("GGUF file has both rope scaling metadata and rope_freqs.weight")
    config["rope_scaling"] = scaling


def _load_native(path: Path) -> dict[str, mx.array] | None:
    """Tensors from MLX's own GGUF reader, or None when it rejects the file as a whole.

    mx.load converts every tensor up front and raises on types it lacks (Q5_0, Q5_1, Q3_K,
    Q5_K, IQ*), so one such tensor makes the whole file go through the gguf dequantizer.
    """
    import mlx.core as mx

    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as exc:
        logger.warning("gguf mx.load refused path=%s error=%s; dequantizing all", path, exc)
        return None


def _native_triple(native: dict[str, mx.array], name: str) -> dict[str, mx.array]:
    stem = name.removesuffix(".weight")
    try:
        return {key: native[f"{stem}.{key}"] for key in ("weight", "scales", "biases")}
    except KeyError as exc:
        raise GGUFImportError(f"MLX's GGUF reader returned no quantized data for {name}") from exc


def _infer_bits(name: str, triple: dict[str, mx.array]) -> int:
    in_features = triple["scales"].shape[-1] * GROUP_SIZE
    packed = triple["weight"].shape[-1] * 32
    if packed % in_features or packed // in_features not in (4, 8):
        raise GGUFImportError(f"unexpected quantized layout for {name}")
    return packed // in_features


def _dequantize(tensor: ReaderTensor, dtype: str) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        kind = tensor.tensor_type.name
        raise GGUFImportError(f"tensor {tensor.name} has type {kind}, not supported yet") from exc
    return values.reshape([int(n) for n in reversed(tensor.shape)]).astype(dtype)


def _dequantize_for_mlx(tensor: ReaderTensor) -> mx.array:
    """Dequantize to float16; vectors and F32 tensors stay float32 (small, and exact)."""
    import mlx.core as mx
    import numpy as np

    if len(tensor.shape) == 1 or tensor.tensor_type.name == "F32":
        return mx.array(_dequantize(tensor, "float32"))
    values = _dequantize(tensor, "float16")
    if not np.isfinite(values).all():
        raise GGUFImportError(f"tensor {tensor.name} has values outside the float16 range")
    return mx.array(values)


def _quantization_config(bits_by_module: dict[str, int]) -> dict[str, Any]:
    # mlx_lm's loader takes a per-module dict keyed by module path before the defaults.
    default_bits = collections.Counter(bits_by_module.values()).most_common(1)[0][0]
    per_module = {m: {"group_size": GROUP_SIZE, "bits": b} for m, b in bits_by_module.items()}
    return {"group_size": GROUP_SIZE, "bits": default_bits, **dict(sorted(per_module.items()))}


def _quantization_summary(converted: _Converted) -> dict[str, Any]:
    bits = collections.Counter(converted.bits_by_module.values())
    return {
        "group_size": GROUP_SIZE if bits else None,
        "bits": bits.most_common(1)[0][0] if bits else None,
        "quantized_modules": len(converted.bits_by_module),
        "dequantized_tensors": converted.n_dequantized,
    }


def _tokenizer_files(reader: GGUFReader, config: dict[str, Any]) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and generation_config.json text from the metadata."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFImportError(f"tokenizer model {model!r} is not supported yet (only gpt2)")
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    roles = ("bos", "eos", "eot", "eom", "unknown", "padding")
    ids = {role: _token_id(reader, role, len(tokens)) for role in roles}
    if ids["eos"] is None:
        raise GGUFImportError("GGUF metadata tokenizer.ggml.eos_token_id is missing")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", ids["bos"] is not None))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    if add_bos and ids["bos"] is None:
        raise GGUFImportError("GGUF asks for a BOS token but has no tokenizer.ggml.bos_token_id")
    tokenizer = _byte_level_bpe(reader, tokens)
    tokenizer.post_processor = _post_processor(
        tokens, ids["bos"] if add_bos else None, ids["eos"] if add_eos else None
    )
    names = {key: tokens[i] for key, i in ids.items() if i is not None}
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names.get("bos"),
        "eos_token": names["eos"],
        "unk_token": names.get("unknown"),
        "pad_token": names.get("padding"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if (template := _field(reader, "tokenizer.chat_template", None)) is not None:
        tokenizer_config["chat_template"] = template
    stop_ids = list(dict.fromkeys(i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None))
    config.update({"bos_token_id": ids["bos"], "eos_token_id": ids["eos"]})
    generation_config = {
        "bos_token_id": ids["bos"],
        "eos_token_id": stop_ids if len(stop_ids) > 1 else ids["eos"],
    }
    return {
        "tokenizer.json": tokenizer.to_str(),
        "tokenizer_config.json": _json(_without_none(tokenizer_config)),
        "generation_config.json": _json(generation_config),
    }


def _without_none(mapping: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in mapping.items() if value is not None}


def _token_id(reader: GGUFReader, key: str, n_tokens: int) -> int | None:
    value = _field(reader, f"tokenizer.ggml.{key}_token_id", None)
    if value is not None and not 0 <= int(value) < n_tokens:
        raise GGUFImportError(f"tokenizer.ggml.{key}_token_id {value} is outside the vocabulary")
    return None if value is None else int(value)


def _byte_level_bpe(reader: GGUFReader, tokens: list[str]) -> Tokenizer:
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import BPE

    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFImportError("the GGUF vocabulary has duplicate tokens")
    merges = [tuple(merge.split(" ")) for merge in _field(reader, "tokenizer.ggml.merges")]
    if any(len(pair) != 2 for pair in merges):
        raise GGUFImportError("tokenizer.ggml.merges has an entry that is not a pair")
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    # CONTROL tokens are HF's special added tokens; USER_DEFINED ones its other added tokens.
    special = [tokens[i] for i, kind in enumerate(types) if kind == _TOKEN_CONTROL]
    user = [tokens[i] for i, kind in enumerate(types) if kind == _TOKEN_USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tokenizer


def _pre_tokenizer(pre: str) -> PreTokenizer:
    """The HF pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre` name."""
    from tokenizers import Regex, pre_tokenizers

    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
    if pre in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in ("gpt-2", "default"):
        if pre == "default":
            logger.warning("gguf names no pre-tokenizer, using GPT-2's byte-level split")
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    raise GGUFImportError(f"pre-tokenizer {pre!r} is not supported yet (smollm, llama-bpe, gpt-2)")


def _post_processor(tokens: list[str], bos: int | None, eos: int | None) -> PostProcessor:
    from tokenizers import processors

    if bos is None and eos is None:
        return processors.ByteLevel(trim_offsets=False)
    first = [tokens[bos]] if bos is not None else []
    last = [tokens[eos]] if eos is not None else []
    single = " ".join(f"{piece}:0" for piece in [*first, "$A", *last])
    pair = single + " " + " ".join(f"{piece}:1" for piece in [*first, "$B", *last])
    special = [(tokens[i], i) for i in dict.fromkeys(i for i in (bos, eos) if i is not None)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def _write_model_dir(out_dir: Path, texts: dict[str, str], weights: dict[str, mx.array]) -> None:
    """Write into a hidden sibling directory, then rename it into place in one step."""
    import mlx.core as mx

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.import-", dir=out_dir.parent))
    try:
        for name, text in texts.items():
            (staging / name).write_text(text, encoding="utf-8")
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        staging.chmod(0o755)
        # rename() replaces an empty directory and fails on a non-empty one, so a directory that
        # appeared since _check_out_dir is never overwritten.
        os.rename(staging, out_dir)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise GGUFImportError(f"cannot write {out_dir}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlxrouter.gguf", description="Import a llama GGUF file as an MLX model dir."
    )
    parser.add_argument("gguf_file", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        summary = import_gguf(args.gguf_file, args.out_dir)
    except GGUFImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
