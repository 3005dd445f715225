"""Shared fixtures: tiny models built offline and a real daemon started as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from mlxrouter.daemon import local_url
from mlxrouter.states import slug

sys.path.insert(0, str(Path(__file__).parent))

from tinymodel import build_tiny_llama  # noqa: E402


def wait_for(predicate: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def gone(proc: psutil.Process) -> bool:
    """The process has exited (a zombie counts). Checks this very process: a pid alone can be
    reused, and an exiting process briefly shows no command line yet is still running."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid_or_proc: int | psutil.Process, timeout: float = 10) -> None:
    proc = pid_or_proc if isinstance(pid_or_proc, psutil.Process) else psutil.Process(
        pid_or_proc)
    wait_for(lambda: gone(proc), timeout, f"process {proc.pid} to exit")


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def write_config(root: Path, *, models: dict[str, dict[str, Any]] | None = None,
                 server: dict[str, Any] | None = None,
                 supervisor: dict[str, Any] | None = None,
                 defaults: dict[str, Any] | None = None) -> Path:
    """A supervisor.toml plus one workers/<name>.toml per model, like a user would write."""
    sections = {
        "server": {"port": 0, **(server or {})},
        "supervisor": {
            "model_directory": str(root / "models"),
            "run_dir": str(root / "run"),
            "log_dir": str(root / "logs"),
            "import_embedded_model": False,
            "preload_default_model": False,
            **(supervisor or {}),
        },
        "defaults": defaults or {},
    }
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path = root / "supervisor.toml"
    path.write_text("\n".join(lines) + "\n")
    workers = root / "workers"
    workers.mkdir(exist_ok=True)
    for i, (model_id, values) in enumerate((models or {}).items()):
        body = [f"id = {json.dumps(model_id)}"] + [
            f"{k} = {_toml_value(v)}" for k, v in values.items()]
        (workers / f"model{i}.toml").write_text("\n".join(body) + "\n")
    return path


class Daemon:
    """`mlxrouter serve` running as a real subprocess."""

    def __init__(self, root: Path, proc: subprocess.Popen) -> None:
        self.root = root
        self.proc = proc
        self.run_dir = root / "run"
        self.log_dir = root / "logs"
        info = wait_for(self._lock_info, 30, "the daemon to write its port")
        self.port = info["port"]
        self.base_url = local_url(info)  # as ctl reaches it (an IPv6 host in brackets)
        self.http = httpx.Client(base_url=self.base_url, timeout=60)
        wait_for(self._healthy, 30, "/health")

    def _lock_info(self) -> dict | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.output()}")
        try:
            info = json.loads((self.run_dir / "daemon.lock").read_text() or "{}")
        except (OSError, ValueError):
            return None
        # A lock file left by a SIGKILLed daemon still holds that daemon's pid and port.
        return info if info.get("port") and info.get("pid") == self.proc.pid else None

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def output(self) -> str:
        log = self.log_dir / "daemon.log"
        return log.read_text()[-4000:] if log.exists() else ""

    def worker_log(self, model_id: str) -> str:
        path = self.log_dir / f"worker-{slug(model_id)}.log"
        return path.read_text() if path.exists() else ""

    def workers(self) -> dict[str, dict]:
        body = self.http.get("/v1/health").json()
        return {w["model"]: w for w in body["workers"]}

    def worker_pid(self, model_id: str, state: str = "RUNNING") -> int | None:
        w = self.workers().get(model_id)
        return w["pid"] if w and w["state"] == state else None

    def wait_worker(self, model_id: str, timeout: float = 60) -> int:
        return wait_for(lambda: self.worker_pid(model_id), timeout, f"worker {model_id}")

    def openai(self, **kwargs: Any):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused",
                             max_retries=0, timeout=60, **kwargs)

    def worker_processes(self) -> list[psutil.Process]:
        """Every live worker process this daemon's run dir spawned, whoever its parent is now."""
        marker = f"ipc://{self.run_dir}/gw.sock"
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                cmd = proc.info["cmdline"] or []
                if marker in cmd and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        return self.proc.returncode


def spawn_daemon(root: Path, config: Path, *extra: str, env: dict[str, str] | None = None
                 ) -> Daemon:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("MLX_MODEL_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxrouter", "serve", "--config", str(config), *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=full_env, start_new_session=True)
    try:
        return Daemon(root, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight llama built once per session (read-only for tests)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def start_daemon(tmp_path: Path, tiny_model: Path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons with a config the test describes; all are stopped and their workers
    checked for at teardown (a leftover worker fails the test)."""
    started: list[Daemon] = []

    def start(models: dict[str, dict[str, Any]] | None = None, *,
              env: dict[str, str] | None = None, **sections: Any) -> Daemon:
        root = tmp_path / f"d{len(started)}"
        (root / "models").mkdir(parents=True)
        if models is None:
            models = {"tiny": {"path": str(tiny_model)}}
        config = write_config(root, models=models, **sections)
        daemon = spawn_daemon(root, config, env=env)
        started.append(daemon)
        return daemon

    yield start
    leftovers = []
    for daemon in started:
        daemon.stop()
        alive = wait_for_gone(daemon)
        leftovers += alive
    assert not leftovers, f"worker processes left behind: {[p.pid for p in leftovers]}"


def wait_for_gone(daemon: Daemon, timeout: float = 15) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    alive = daemon.worker_processes()
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = daemon.worker_processes()
    for proc in alive:
        proc.kill()
    return alive
