"""Half copies of float32 weights (model setting half_weights): a float16 model, loaded as
float32 on the CPU, answers the same with its decode products reading float16 copies as
without them, through a real daemon and worker."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from mlxrouter.config import find_system_blas


@pytest.fixture(scope="module")
def f16_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import mlx.core as mx

    path = tmp_path_factory.mktemp("f16") / "tiny-f16"
    shutil.copytree(tiny_model, path)
    weights = mx.load(str(tiny_model / "model.safetensors"))
    mx.save_safetensors(str(path / "model.safetensors"),
                        {k: v.astype(mx.float16) for k, v in weights.items()},
                        metadata={"format": "mlx"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16"}))
    return path


def test_a_float16_model_answers_the_same_with_and_without_half_copies(start_daemon,
                                                                       f16_model: Path) -> None:
    if not sys.platform.startswith("linux") or find_system_blas("openblas") is None:
        pytest.skip("half copies need the gemv forwarder: Linux with OpenBLAS")
    daemon = start_daemon({"half": {"path": str(f16_model)},
                           "full": {"path": str(f16_model), "half_weights": False}})
    client = daemon.openai()
    answers = {}
    for model in ("half", "full"):
        # Every token's products, from the first layer to the logits, read the copies.
        replies = [client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=24,
            temperature=0, logprobs=True, top_logprobs=3) for question in
            ("Where is Paris?", "Name three colours.")]
        answers[model] = [(r.choices[0].message.content,
                           [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs])
                            for t in r.choices[0].logprobs.content]) for r in replies]
    assert answers["half"] == answers["full"]  # tokens and log probabilities, exactly
    assert all(len(tokens) == 24 for _, tokens in answers["half"])
    copies = {model: re.search(r"half_copies=(\d+) half_mb=", daemon.worker_log(model))
              for model in ("half", "full")}
    assert copies["half"] and int(copies["half"].group(1)) > 0
    assert copies["full"] and int(copies["full"].group(1)) == 0
