"""Operations against a real daemon: `mlxrouter ctl`, the admin API, API keys, request ids in
logs, log rotation and Prometheus metrics."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_for, wait_gone

MESSAGES = [{"role": "user", "content": "Say something."}]


def ctl(daemon, *args: str, key: str | None = None) -> subprocess.CompletedProcess:
    extra = ["--admin-key", key] if key else []
    return subprocess.run(
        [sys.executable, "-m", "mlxrouter", "ctl", "--config",
         str(daemon.root / "supervisor.toml"), *extra, *args],
        capture_output=True, text=True, timeout=60)


def chat(daemon, model: str = "tiny", **headers) -> int:
    return daemon.http.post("/v1/chat/completions", headers=headers, json={
        "model": model, "messages": MESSAGES, "max_tokens": 2}).status_code


def test_ctl_status_start_stop_restart_pid_and_exit_codes(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model)}, "other": {"path": str(tiny_model)}})
    out = ctl(daemon, "status")
    assert out.returncode == 0
    lines = {ln.split()[0]: ln for ln in out.stdout.splitlines()}
    assert lines["tiny"].split()[1] == "STOPPED" and lines["other"].split()[1] == "STOPPED"
    assert ctl(daemon, "status", "tiny").returncode == 3  # not running

    started = ctl(daemon, "start", "tiny")
    assert started.returncode == 0, started.stderr
    pid = daemon.worker_pid("tiny")
    old = psutil.Process(pid)
    line = ctl(daemon, "status", "tiny")
    assert line.returncode == 0
    assert f"RUNNING   pid {pid}, uptime 0:00:0" in line.stdout
    assert "in-flight 0, restarts 0" in line.stdout
    as_json = json.loads(ctl(daemon, "status", "--json").stdout)
    assert {w["model"]: w["state"] for w in as_json} == {"other": "STOPPED", "tiny": "RUNNING"}
    assert ctl(daemon, "pid", "tiny").stdout.strip() == str(pid)
    assert ctl(daemon, "pid").stdout.strip() == str(daemon.proc.pid)

    assert ctl(daemon, "restart", "tiny").returncode == 0
    new_pid = daemon.worker_pid("tiny")
    assert new_pid != pid
    wait_gone(old, 10)
    assert ctl(daemon, "stop", "all").returncode == 0
    wait_for(lambda: not daemon.worker_processes(), 10, "workers to stop")
    assert daemon.workers()["tiny"]["state"] == "STOPPED"
    stopped = ctl(daemon, "pid", "tiny")  # it printed 0: `kill $(...)` hit its own group
    assert (stopped.returncode, stopped.stdout) == (3, "")
    assert "tiny: not running (STOPPED)" in stopped.stderr
    assert ctl(daemon, "tail", "tiny", "--bytes", "-5").returncode == 2

    unknown = ctl(daemon, "status", "nope")
    assert unknown.returncode == 4 and "no such model" in unknown.stdout
    assert ctl(daemon, "start", "nope").returncode == 4


def test_ctl_start_of_a_model_over_the_budget_says_insufficient_memory(start_daemon,
                                                                         tiny_model):
    """As a request for it does: it was no_memory, the code for a load that waited too long."""
    daemon = start_daemon({"big": {"path": str(tiny_model), "required_memory_gb": 4.0}},
                          supervisor={"memory_budget_gb": 1.0})
    out = ctl(daemon, "start", "big")
    assert out.returncode == 1
    assert "insufficient_memory" in out.stdout + out.stderr
    assert "needs 4.80 GB but the memory budget is 1.00 GB" in out.stdout + out.stderr
    resp = daemon.http.post("/admin/models/big/start")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "insufficient_memory"


def test_ctl_and_models_list_reach_a_daemon_on_an_ipv6_host(start_daemon, tiny_model):
    """ctl and models list built http://::1:port and failed with a traceback."""
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "preload": True}},
                          server={"host": "::1", "admin_key": "adm-1"})
    assert daemon.base_url.startswith("http://[::1]:")
    daemon.wait_worker("tiny")
    status = ctl(daemon, "status", "tiny", key="adm-1")
    assert status.returncode == 0 and "RUNNING" in status.stdout, status.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "mlxrouter", "models", "list", "--json", "--config",
         str(daemon.root / "supervisor.toml")], capture_output=True, text=True, timeout=60,
        env={**os.environ, "MLXROUTER_ADMIN_KEY": "adm-1"})
    assert listed.returncode == 0, listed.stderr
    assert {m["id"]: m["state"] for m in json.loads(listed.stdout)}["tiny"] == "RUNNING"
    # a wrong admin key: the states are unknown (null), not every model STOPPED
    wrong = subprocess.run(
        [sys.executable, "-m", "mlxrouter", "models", "list", "--json", "--config",
         str(daemon.root / "supervisor.toml")], capture_output=True, text=True, timeout=60,
        env={**os.environ, "MLXROUTER_ADMIN_KEY": "wrong"})
    assert {m["id"]: m["state"] for m in json.loads(wrong.stdout)}["tiny"] is None
    assert "listening on http://[::1]:" in (daemon.log_dir / "daemon.log").read_text()


def test_ctl_start_while_the_model_drains_starts_it_again(start_daemon, tiny_model):
    """It failed with "could not be started: " and nothing after the colon, leaving the
    model STOPPED."""
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "preload": True,
                                    "fault": {"delay_per_token_s": 0.05}}})
    old = daemon.wait_worker("tiny")
    stream = iter(daemon.openai().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=40, stream=True))
    next(stream)
    stopping = threading.Thread(target=ctl, args=(daemon, "stop", "tiny"))
    stopping.start()
    wait_for(lambda: daemon.workers()["tiny"]["state"] == "DRAINING", 10, "the drain")
    started = ctl(daemon, "start", "tiny")
    assert started.returncode == 0, started.stdout + started.stderr
    list(stream)
    stopping.join(30)
    assert daemon.workers()["tiny"]["state"] == "RUNNING"
    assert daemon.worker_pid("tiny") not in (None, old)


def test_ctl_start_all_says_when_a_start_stopped_an_earlier_one(start_daemon, tiny_model):
    """Each start evicted the one before; ctl printed "started (RUNNING)" for all and 0."""
    daemon = start_daemon({"a": {"path": str(tiny_model)}, "b": {"path": str(tiny_model)}},
                          supervisor={"max_loaded_models": 1})
    assert chat(daemon, "a") == 200 and chat(daemon, "b") == 200  # both known to status
    out = ctl(daemon, "start", "all")
    assert out.returncode == 3, out.stdout + out.stderr
    assert "stopped again to make room" in out.stderr and "1 of 2 are running" in out.stderr


def test_ctl_start_during_a_shutdown_is_refused(start_daemon, tiny_model):
    """It started workers and said "started (RUNNING)" while the daemon shut down."""
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "preload": True,
                                    "fault": {"delay_per_token_s": 0.05}},
                           "other": {"path": str(tiny_model)}},
                          supervisor={"drain_timeout_s": 20.0})
    daemon.wait_worker("tiny")
    stream = iter(daemon.openai().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=60, stream=True))
    next(stream)
    assert ctl(daemon, "shutdown").returncode == 0
    refused = ctl(daemon, "start", "other")
    assert refused.returncode == 1
    assert "shutting_down" in refused.stdout + refused.stderr
    list(stream)
    assert daemon.proc.wait(30) == 0
    assert "shutdown asked through the admin API" in (daemon.log_dir / "daemon.log").read_text()


def test_a_ctl_start_waiting_for_a_load_when_sigterm_comes_gets_shutting_down(start_daemon,
                                                                              tiny_model):
    """It was cut off by the HTTP server's graceful timeout: "ERROR (500): " and nothing."""
    daemon = start_daemon({"slow": {"path": str(tiny_model), "fault": {"load_delay_s": 30}}})
    started = subprocess.Popen(
        [sys.executable, "-m", "mlxrouter", "ctl", "--config",
         str(daemon.root / "supervisor.toml"), "start", "slow"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: daemon.workers().get("slow", {}).get("state") == "STARTING", 30,
             "the load")
    daemon.proc.send_signal(signal.SIGTERM)
    out, _ = started.communicate(timeout=30)
    assert started.returncode == 1
    assert "shutting_down" in out and "(500)" not in out, out
    assert daemon.proc.wait(30) == 0


def test_ctl_names_a_model_whose_id_holds_url_characters(start_daemon, tiny_model):
    """The id went into the URL as is: `ctl stop m%41` stopped "mA", `a#b` reached nothing."""
    daemon = start_daemon({"mA": {"path": str(tiny_model), "preload": True},
                           "m%41": {"path": str(tiny_model)},
                           "a#b": {"path": str(tiny_model)}})
    daemon.wait_worker("mA")

    stop = ctl(daemon, "stop", "m%41")
    start = ctl(daemon, "start", "a#b")
    tail = ctl(daemon, "tail", "../../etc/passwd")

    assert "m%41" in stop.stdout and daemon.workers()["mA"]["state"] == "RUNNING"
    assert start.returncode == 0 and "a#b" in start.stdout, start
    assert daemon.workers()["a#b"]["state"] == "RUNNING"
    assert tail.returncode == 4 and "no such model" in tail.stdout + tail.stderr, tail


def test_ctl_stop_drains_the_request_in_flight(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "preload": True,
                                    "fault": {"delay_per_token_s": 0.03}}})
    daemon.wait_worker("tiny")
    stream = iter(daemon.openai().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=40, stream=True))
    next(stream)
    stopper = subprocess.Popen([sys.executable, "-m", "mlxrouter", "ctl", "--config",
                                str(daemon.root / "supervisor.toml"), "stop", "tiny"],
                               stdout=subprocess.PIPE, text=True)
    wait_for(lambda: daemon.workers()["tiny"]["state"] == "DRAINING", 10, "DRAINING")
    rest = list(stream)
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    assert stopper.wait(30) == 0


def test_ctl_tail_follow_shows_new_lines(start_daemon):
    daemon = start_daemon()
    assert chat(daemon) == 200
    tail = subprocess.Popen([sys.executable, "-m", "mlxrouter", "ctl", "--config",
                             str(daemon.root / "supervisor.toml"), "tail", "-f", "tiny"],
                            stdout=subprocess.PIPE, text=True,
                            # Ctrl-C as at a terminal, even when these tests run in a
                            # background job, which inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: queue.Queue[str] = queue.Queue()  # read on a thread: readline alone may block
    threading.Thread(target=lambda: [lines.put(line) for line in tail.stdout],
                     daemon=True).start()

    def read_until(text: str, timeout_s: float) -> str:
        seen, deadline = "", time.monotonic() + timeout_s
        while text not in seen and (left := deadline - time.monotonic()) > 0:
            try:
                seen += lines.get(timeout=left)
            except queue.Empty:
                break
        return seen

    try:
        assert "worker:tiny" in lines.get(timeout=20)  # the header comes first
        assert chat(daemon, **{"X-Request-ID": "tail-me-123"}) == 200
        assert "request started request_id=tail-me-123" in read_until("tail-me-123", 20)
    finally:
        tail.send_signal(signal.SIGINT)
        tail.wait(10)
    stderr = ctl(daemon, "tail", "--stderr", "tiny")
    assert stderr.returncode == 0
    # more than one 64 KiB chunk asked for: the end of the log, not a chunk from its middle
    with open(daemon.log_dir / "worker-tiny.log", "a") as log:
        log.write("".join(f"padding line {i:06d}\n" for i in range(8000)))  # 160 KB
    big = ctl(daemon, "tail", "tiny", "--bytes", "100000")
    assert big.returncode == 0 and big.stdout.endswith("padding line 007999\n")
    assert len(big.stdout) == 100_000


def test_ctl_with_a_main_file_that_does_not_parse(start_daemon):
    """ctl reads the daemon's run dir and admin key from the main file: one that does not
    parse is said to be unreadable (it sent no key, and the daemon's 401 hid the syntax
    error), and --url alone still reaches a daemon that has no admin key."""
    daemon = start_daemon()
    main = daemon.root / "supervisor.toml"
    main.write_text(main.read_text() + "this is [not toml\n")
    broken = ctl(daemon, "status")
    assert broken.returncode == 2 and "supervisor.toml cannot be read" in broken.stderr
    told = ctl(daemon, "--url", daemon.base_url, "status")
    assert told.returncode == 0 and "tiny" in told.stdout, told.stderr


def test_ctl_reload_adds_and_removes_a_model(start_daemon, tiny_model):
    daemon = start_daemon()
    workers = daemon.root / "workers"
    (workers / "second.toml").write_text(f'path = "{tiny_model}"\n')
    out = ctl(daemon, "reload")
    assert out.returncode == 0 and "reloaded" in out.stdout
    assert chat(daemon, "second") == 200
    (workers / "second.toml").unlink()
    assert ctl(daemon, "reload").returncode == 0
    assert chat(daemon, "second") == 404
    (workers / "bad.toml").write_text("max_tokens = 'many'\n")
    failed = ctl(daemon, "reload")
    assert failed.returncode == 1 and "bad.toml" in failed.stderr
    assert chat(daemon) == 200


def test_a_log_dir_changed_by_a_reload_waits_for_a_restart(start_daemon):
    daemon = start_daemon()
    assert chat(daemon) == 200
    main = daemon.root / "supervisor.toml"
    moved = daemon.root / "logs2"
    main.write_text(main.read_text().replace(str(daemon.log_dir), str(moved)))
    assert ctl(daemon, "reload").returncode == 0
    assert "log_dir changes take effect after a restart" in daemon.output()
    tail = ctl(daemon, "tail", "tiny")  # still where the worker writes
    assert tail.returncode == 0 and "request ended" in tail.stdout, tail
    assert chat(daemon) == 200
    assert not moved.exists()


def test_models_with_dots_in_their_ids_keep_their_own_logs(start_daemon, tiny_model):
    daemon = start_daemon({"m-2.5": {"path": str(tiny_model)},
                           "m-2.6": {"path": str(tiny_model)}})
    for model in ("m-2.5", "m-2.6"):
        assert daemon.http.post("/v1/chat/completions", headers={"X-Request-ID": model},
                                json={"model": model, "messages": MESSAGES,
                                      "max_tokens": 2}).status_code == 200
    for model, other in (("m-2.5", "m-2.6"), ("m-2.6", "m-2.5")):
        log = (daemon.log_dir / f"worker-{model}.log").read_text()
        assert f"request_id={model}" in log and f"request_id={other}" not in log
        assert f"request_id={model}" in ctl(daemon, "tail", model).stdout
    assert not (daemon.log_dir / "worker-m-2.log").exists()


def test_a_stalled_or_abandoned_request_body_is_ended_quietly(start_daemon):
    """Headers, then a body that stops: a 408 after request_body_timeout_s, the connection
    closed (each held a file descriptor for ever). A client that leaves mid-body: a 499 in
    the log and metrics, not an unhandled error with two tracebacks."""
    import socket

    daemon = start_daemon(server={"request_body_timeout_s": 1.0})
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(head)
        started = time.monotonic()
        reply = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            reply += chunk
        assert time.monotonic() - started < 5
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"code":"request_timeout"' in reply.replace(b" ", b"")
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(head)
        time.sleep(0.3)
    wait_for(lambda: 'status="499"' in daemon.http.get("/metrics").text, 5, "the 499")
    assert chat(daemon) == 200
    log = (daemon.log_dir / "daemon.log").read_text()
    assert "unhandled error" not in log and "Traceback" not in log


def test_capabilities_follow_the_models_settings(start_daemon, tiny_model):
    """/v1/models and `models list` say what is served: supports_vision forces vision on or
    off, and tools are off with supports_tools = false."""
    from mlxrouter.config import load_config
    from mlxrouter.library import list_rows

    daemon = start_daemon({"as-vision": {"path": str(tiny_model), "supports_vision": True},
                           "no-tools": {"path": str(tiny_model), "supports_tools": False}})
    served = {m["id"]: m["capabilities"] for m in daemon.http.get("/v1/models").json()["data"]}
    assert served["as-vision"] == ["text", "vision", "reasoning"]  # vision: served without tools
    assert served["no-tools"] == ["text", "reasoning"]
    listed = {r["id"]: r for r in list_rows(load_config(daemon.root / "supervisor.toml"))}
    assert listed["as-vision"]["capabilities"] == served["as-vision"]
    assert listed["as-vision"]["vision"] is True
    assert listed["no-tools"]["capabilities"] == served["no-tools"]


def test_capabilities_follow_a_configured_chat_template_or_call_format(start_daemon,
                                                                        tiny_model, tmp_path):
    """A model without tools in its own template that is served with a named template or a
    tool_call_format takes tools: /v1/models said it did not."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    tok_config = json.loads((bare / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tok_config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (bare / name).unlink(missing_ok=True)
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    daemon = start_daemon({"bare": {"path": str(bare)},
                           "named": {"path": str(bare), "chat_template": "chatml"},
                           "format": {"path": str(tiny_model), "tool_call_format": "hermes",
                                      "chat_template": str(plain)},
                           "plain-file": {"path": str(tiny_model), "chat_template": str(plain)}})
    served = {m["id"]: m["capabilities"] for m in daemon.http.get("/v1/models").json()["data"]}
    assert "tools" not in served["bare"]
    assert "tools" in served["named"] and "tools" in served["format"]
    # with a template file the call format still comes from the model's own files
    assert "tools" in served["plain-file"]
    reply = daemon.openai().chat.completions.create(
        model="named", messages=MESSAGES, max_tokens=2, tool_choice="required", tools=[{
            "type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert reply.choices[0].message.tool_calls or reply.choices[0].finish_reason == "length"


def test_ctl_shutdown_and_unreachable_daemon(start_daemon):
    daemon = start_daemon()
    assert ctl(daemon, "shutdown").returncode == 0
    assert daemon.proc.wait(30) == 0
    gone = ctl(daemon, "status")
    assert gone.returncode == 7
    assert "not running" in gone.stderr


def test_api_keys_guard_the_api_but_not_health(start_daemon):
    daemon = start_daemon(server={"api_keys": ["sk-local-1", "sk-local-2"]})
    assert daemon.http.get("/health").status_code == 200
    denied = daemon.http.post("/v1/chat/completions", json={"model": "tiny",
                                                           "messages": MESSAGES})
    assert denied.status_code == 401
    assert denied.json()["error"]["type"] == "invalid_request_error"  # as OpenAI's own 401
    assert daemon.http.get("/v1/models",
                           headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert daemon.http.get("/metrics").status_code == 401
    assert chat(daemon, Authorization="Bearer sk-local-2") == 200
    import openai

    ok = openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="sk-local-1", max_retries=0)
    assert ok.models.list().data
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="nope",
                      max_retries=0).models.list()
    assert "sk-local" not in daemon.output()
    # refused keys are counted, so an operator can alert on them (they were in no metric)
    scraped = daemon.http.get("/metrics", headers={"Authorization": "Bearer sk-local-1"}).text
    assert 'mlxrouter_requests_total{endpoint="chat.completions",model="",status="401"} 1.0' \
        in scraped
    # (the /metrics scrape without a key is not counted: the API's clients are)
    assert 'mlxrouter_rejections_total{model="",reason="invalid_api_key"} 3.0' in scraped


def test_admin_key_guards_the_admin_api(start_daemon):
    daemon = start_daemon(server={"admin_key": "adm-secret"})
    assert daemon.http.get("/admin/status").status_code == 401
    assert ctl(daemon, "status", key="wrong").returncode == 1
    assert ctl(daemon, "status", key="adm-secret").returncode == 0
    assert ctl(daemon, "status").returncode == 0  # read from the config file
    assert daemon.http.get("/admin/status", headers={
        "Authorization": "Bearer adm-secret"}).json()["daemon"]["pid"] == daemon.proc.pid


def test_request_ids_are_echoed_and_logged_by_daemon_and_worker(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model)}, "broken": {"path": "/nonexistent"}})
    resp = daemon.http.post("/v1/chat/completions", headers={"X-Request-ID": "abc-42"},
                            json={"model": "broken", "messages": MESSAGES})
    assert resp.headers["x-request-id"] == "abc-42"
    assert resp.status_code == 503
    assert "[abc-42]" in daemon.output()
    generated = daemon.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": MESSAGES, "max_tokens": 1})
    rid = generated.headers["x-request-id"]
    assert rid.startswith("req-")
    assert f"request_id={rid}" in daemon.worker_log("tiny")


def test_an_inherited_openblas_coretype_is_logged_and_reaches_the_worker(
        start_daemon, tiny_model, monkeypatch):
    from mlxrouter.config import find_system_blas

    if sys.platform != "linux" or find_system_blas("openblas") is None:
        pytest.skip("OpenBLAS workers need Linux and an installed OpenBLAS")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    daemon = start_daemon(supervisor={"system_blas": "openblas"})
    assert chat(daemon) == 200
    assert "(OPENBLAS_CORETYPE=Haswell from the environment)" in daemon.output()
    environ = Path(f"/proc/{daemon.wait_worker('tiny')}/environ").read_bytes().split(b"\0")
    assert b"OPENBLAS_CORETYPE=Haswell" in environ
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    plain = start_daemon(supervisor={"system_blas": "openblas"}).output()
    preload = [line for line in plain.splitlines() if "workers preload" in line]
    assert len(preload) == 1 and "libopenblas" in preload[0]
    assert "OPENBLAS_CORETYPE" not in preload[0]


def test_logs_rotate_at_the_configured_size(start_daemon, tiny_model):
    daemon = start_daemon(supervisor={"log_max_bytes": 1500, "log_backups": 2})
    for _ in range(12):
        assert chat(daemon) == 200
    logs = daemon.log_dir
    assert (logs / "worker-tiny.log.1").exists()
    assert not (logs / "worker-tiny.log.3").exists()
    assert (logs / "worker-tiny.log").stat().st_size <= 1500
    assert (logs / "daemon.log.1").exists()


def _samples(daemon) -> dict[tuple[str, tuple], float]:
    text = daemon.http.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_move_with_real_requests_and_count_restarts(start_daemon):
    daemon = start_daemon()
    for stream in (False, True):
        resp = daemon.openai().chat.completions.create(model="tiny", messages=MESSAGES,
                                                       max_tokens=4, stream=stream)
        if stream:
            list(resp)
    assert chat(daemon, "no-such-model") == 404
    m = _samples(daemon)
    assert m[("mlxrouter_requests_total",
              (("endpoint", "chat.completions"), ("model", "tiny"), ("status", "200")))] == 2
    assert m[("mlxrouter_requests_total",
              (("endpoint", "chat.completions"), ("model", ""), ("status", "404")))] == 1
    assert m[("mlxrouter_generated_tokens_total", (("model", "tiny"),))] == 8
    assert m[("mlxrouter_time_to_first_token_seconds_count", (("model", "tiny"),))] == 2
    assert m[("mlxrouter_inter_token_latency_seconds_count", (("model", "tiny"),))] >= 1
    assert m[("mlxrouter_queue_time_seconds_count", (("model", "tiny"),))] == 2
    assert m[("mlxrouter_model_load_duration_seconds_count", (("model", "tiny"),))] == 1
    assert m[("mlxrouter_worker_state", (("model", "tiny"), ("state", "RUNNING")))] == 1
    assert m[("mlxrouter_memory_budget_bytes", ())] > 0
    assert m[("mlxrouter_worker_memory_bytes", (("model", "tiny"),))] > 0
    assert all(name.startswith("mlxrouter_") for name, _ in m)

    psutil.Process(daemon.worker_pid("tiny")).kill()
    wait_for(lambda: _samples(daemon).get(
        ("mlxrouter_worker_restarts_total", (("model", "tiny"), ("reason", "signal 9")))) == 1,
        10, "the restart to be counted")


def test_openapi_documents_every_route_including_admin(start_daemon):
    from openapi_spec_validator import validate

    daemon = start_daemon(server={"api_keys": ["k"]})
    resp = daemon.http.get("/openapi.json")  # open, like /health
    assert resp.status_code == 200
    doc = resp.json()
    validate(doc)
    documented = set(doc["paths"])
    served = {r.path for r in daemon_app_routes()}
    for path in served:
        assert path.replace("{model_id:path}", "{model_id}") in documented, path
    admin = doc["paths"]["/admin/models/{model_id}/stop"]["post"]
    assert admin["tags"] == ["admin"]
    assert "$ref" in doc["paths"]["/v1/chat/completions"]["post"]["requestBody"][
        "content"]["application/json"]["schema"]


def daemon_app_routes():
    """The routes the real app serves (built without starting anything)."""
    from mlxrouter.gateway import build_app

    class _State:
        config = None

    return build_app(_State()).routes


def test_cors_preflight_is_answered_for_allowed_origins(start_daemon):
    daemon = start_daemon(server={"cors_origins": ["http://localhost:3000"],
                                  "api_keys": ["k"]})
    preflight = daemon.http.options("/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    other = daemon.http.options("/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers
    # refused in OpenAI's shape, as a request from that origin is (it was text/plain)
    assert other.status_code == 403
    assert other.json()["error"]["code"] == "forbidden"
    assert "http://evil.example is not allowed" in other.json()["error"]["message"]
    method = daemon.http.options("/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "DELETE"})
    assert method.status_code == 400 and "method" in method.json()["error"]["message"]
    real = daemon.http.get("/v1/models", headers={"Origin": "http://localhost:3000",
                                                   "Authorization": "Bearer k"})
    assert real.status_code == 200
    assert real.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "x-request-id" in real.headers["access-control-expose-headers"].lower()


def test_web_pages_cannot_drive_admin_or_the_api(start_daemon):
    daemon = start_daemon()
    evil = {"Origin": "https://evil.example"}
    assert daemon.http.post("/admin/shutdown", headers=evil).status_code == 403
    assert daemon.http.post("/admin/reload", headers={"Host": "evil.example"}).status_code == 403
    assert daemon.http.post("/v1/chat/completions", headers=evil, json={
        "model": "tiny", "messages": MESSAGES}).status_code == 403
    local_ui = {"Origin": "http://localhost:3000"}
    assert chat(daemon, **local_ui) == 200
    assert daemon.http.get("/admin/status").status_code == 200
    assert daemon.proc.poll() is None
