"""The model name `mlxrouter models import-gguf` gives a GGUF file when none is asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxrouter.cli import gguf_model_name


@pytest.mark.parametrize("file, name", [
    ("Qwen2.5-0.5B-Instruct-Q8_0.gguf", "qwen2.5-0.5b-instruct-q8_0"),
    ("Llama-3.1-8B-Instruct.gguf", "llama-3.1-8b-instruct"),
    ("Llama-3.2-1B-Instruct.gguf", "llama-3.2-1b-instruct"),
    ("llama-2-7b.Q4_K_M.gguf", "llama-2-7b"),
    ("mistral-7b-instruct-v0.2.IQ3_XS.gguf", "mistral-7b-instruct-v0.2"),
    ("phi-3-mini.F16.gguf", "phi-3-mini"),
    ("smollm2-135m-instruct.gguf", "smollm2-135m-instruct"),
])
def test_only_the_extension_and_a_dotted_quant_tag_are_dropped(file: str, name: str) -> None:
    assert gguf_model_name(Path("/downloads") / file) == name
