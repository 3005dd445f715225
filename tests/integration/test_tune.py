"""`mlxrouter models tune NAME` on the tiny model: a real private daemon and worker measure it,
and the worker file it writes is one the config loader accepts, with the user's keys kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import write_config

from mlxrouter.config import load_config

pytestmark = pytest.mark.timeout(240)


def run_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(root / "hf-home")}
    env.pop("MLX_MODEL_DIR", None)
    return subprocess.run([sys.executable, "-m", "mlxrouter", *args, "--config",
                           str(root / "supervisor.toml")],
                          capture_output=True, text=True, env=env, timeout=200)


def tune_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any("mlxr-tune-" in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_tune_measures_the_model_and_updates_its_worker_file(tmp_path: Path,
                                                            tiny_model: Path) -> None:
    write_config(tmp_path, models={"tiny": {"path": str(tiny_model), "idle_ttl_s": 30,
                                            "max_tokens": 7, "max_context": 1024}})
    worker_file = tmp_path / "workers" / "model0.toml"
    worker_file.write_text("# my notes on tiny\n" + worker_file.read_text()
                           + "\n[memory_pressure_max_tokens]\nhigh = 3\n")

    out = run_cli(tmp_path, "models", "tune", "tiny", "--contexts", "32,128,600", "--json")

    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    weights = (tiny_model / "model.safetensors").stat().st_size
    assert result["worker_file"] == str(worker_file)
    assert 0 < result["load_s"] < 60
    assert result["memory_after_load_bytes"] > weights
    sizes = [p["prompt_tokens"] for p in result["points"]]
    assert sizes == sorted(sizes) and sizes[0] >= 16 and sizes[-1] >= 400
    assert all(p["completion_tokens"] == 32 for p in result["points"])
    assert all(p["decode_tokens_per_s"] and p["decode_tokens_per_s"] > 0
               for p in result["points"])
    assert result["context"] == 1024
    assert result["bytes_per_1k_tokens_config"] == 1000 * 2 * 2 * 2 * 16 * 4

    text = worker_file.read_text()
    assert text.startswith("# my notes on tiny\n")
    assert "[memory_pressure_max_tokens]" not in text
    # the note counts MB as `models list` and tune's own output do (2**20 bytes)
    assert f"{result['memory_after_load_bytes'] / 2**20:.0f} MB after load" in text
    config = load_config(tmp_path / "supervisor.toml")
    spec = config.spec_for("tiny")
    values = result["values"]
    assert spec.idle_ttl_s == 30  # the user's other keys stay
    assert spec.required_memory_gb == values["required_memory_gb"]
    assert spec.required_memory_gb * 2**30 >= result["memory_after_load_bytes"]
    assert spec.max_tokens == values["max_tokens"] and 16 <= spec.max_tokens <= 1024
    caps = spec.memory_pressure_max_tokens
    assert set(caps) == {"moderate", "high", "critical"}
    assert spec.max_tokens >= caps["moderate"] >= caps["high"] >= caps["critical"] >= 1
    assert not tune_processes()


def test_tune_of_an_unknown_or_unusable_model_fails_with_the_reason(tmp_path: Path) -> None:
    write_config(tmp_path)
    (tmp_path / "models" / "half").mkdir(parents=True)
    (tmp_path / "models" / "half" / "config.json").write_text("{}")

    unknown = run_cli(tmp_path, "models", "tune", "no-such-model")
    half = run_cli(tmp_path, "models", "tune", "half")

    assert unknown.returncode == 1 and "no model 'no-such-model'" in unknown.stderr
    assert half.returncode == 1 and "not usable" in half.stderr
    # sizes below 1 measured nothing, and a "tuned" file was written anyway
    for bad in ("0", "-5", "512,0"):
        refused = run_cli(tmp_path, "models", "tune", "half", "--contexts", bad)
        assert refused.returncode == 2 and "--contexts takes token counts" in refused.stderr
    assert not list((tmp_path / "workers").glob("*.toml"))
