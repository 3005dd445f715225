"""Crash isolation with real processes: workers are SIGKILLed, SIGSTOPped and fail to load;
the daemon is SIGTERMed and SIGKILLed. The daemon must keep serving and never hang a client."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import threading
import time

import httpx
import openai
import psutil
import pytest

from conftest import wait_for, wait_gone

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse."}]
# 40 ms per engine step: a 200-token stream lasts ~8 s, long enough to kill it midway.
SLOW = {"delay_per_token_s": 0.04}


def _slow_daemon(start_daemon, tiny_model, **fault):
    return start_daemon({"tiny": {"path": str(tiny_model), "fault": {**SLOW, **fault}}},
                        supervisor={"silence_timeout_s": 2.0})


def test_worker_sigkill_mid_stream_fails_that_stream_and_the_next_request_works(
        start_daemon, tiny_model):
    daemon = _slow_daemon(start_daemon, tiny_model)
    client = daemon.openai()
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=200,
                                            stream=True)
    chunks = iter(stream)
    next(chunks)
    next(chunks)
    pid = daemon.worker_pid("tiny")
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError) as info:
        for _ in chunks:
            pass
    error_after = time.monotonic() - killed_at
    assert "exited unexpectedly" in str(info.value.message)
    assert error_after < 5
    assert daemon.http.get("/health").status_code == 200
    metrics = daemon.http.get("/metrics").text
    # it failed after generating: no refusal, and what it generated counts
    assert 'mlxrouter_rejections_total{model="tiny",reason="worker_crashed"}' not in metrics
    generated = [line for line in metrics.splitlines()
                 if line.startswith('mlxrouter_generated_tokens_total{model="tiny"}')]
    assert generated and float(generated[0].split()[-1]) >= 1, generated
    lost = wait_for(lambda: daemon.workers()["tiny"]["state"] == "EXITED"
                    and daemon.workers()["tiny"], 5, "EXITED")
    assert "exited unexpectedly with signal 9" in lost["reason"]  # why it is not running
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
    assert resp.usage.completion_tokens == 3
    assert daemon.worker_pid("tiny") not in (None, pid)
    # stopped on purpose after that: STOPPED, not EXITED again
    assert daemon.http.post("/admin/models/tiny/stop").json()["state"] == "STOPPED"
    assert daemon.workers()["tiny"]["state"] == "STOPPED"


def test_worker_sigkill_during_non_streaming_request_is_a_502(start_daemon, tiny_model):
    daemon = _slow_daemon(start_daemon, tiny_model, crash_after_tokens=5)
    with pytest.raises(openai.InternalServerError) as info:
        daemon.openai().chat.completions.create(model="tiny", messages=MESSAGES,
                                                max_tokens=50)
    assert info.value.status_code == 502
    assert info.value.body["code"] == "worker_crashed"
    assert daemon.http.get("/health").status_code == 200


def test_sigstopped_worker_is_detected_killed_and_replaced(start_daemon, tiny_model):
    daemon = _slow_daemon(start_daemon, tiny_model)
    client = daemon.openai()
    stream = iter(client.chat.completions.create(model="tiny", messages=MESSAGES,
                                                 max_tokens=200, stream=True))
    next(stream)
    pid = daemon.worker_pid("tiny")
    proc = psutil.Process(pid)
    stopped_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    assert time.monotonic() - stopped_at < 8
    wait_gone(proc, 5)
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert resp.usage.completion_tokens == 2


def test_worker_that_fails_to_load_gives_a_503_with_its_reason(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "fault": {"fail_load": 1}}})
    with pytest.raises(openai.APIStatusError) as info:
        daemon.openai().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert info.value.status_code == 503
    assert info.value.body["code"] == "model_load_failed"
    assert "fault injection: load failed" in info.value.body["message"]
    assert daemon.http.get("/health").status_code == 200


def test_a_broken_model_dir_fails_its_requests_not_the_daemon(start_daemon, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    daemon = start_daemon({"broken": {"path": str(broken)}})
    resp = daemon.http.post("/v1/chat/completions", json={"model": "broken",
                                                          "messages": MESSAGES})
    assert resp.status_code == 503
    # refused with discovery's reason, without a worker started for it
    assert resp.json()["error"]["code"] == "model_unavailable"
    assert f"cannot be served from its configured path {broken}: " in (
        resp.json()["error"]["message"])
    assert daemon.http.get("/health").status_code == 200


def test_a_configured_path_that_does_not_exist_says_so(start_daemon, tmp_path):
    daemon = start_daemon({"gone": {"path": str(tmp_path / "no-such-model")}})
    resp = daemon.http.post("/v1/chat/completions", json={"model": "gone",
                                                          "messages": MESSAGES})
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "model_unavailable"
    assert f"path {tmp_path / 'no-such-model'}: no such directory" in (
        resp.json()["error"]["message"])
    assert "HFValidationError" not in resp.json()["error"]["message"]


def test_sigterm_lets_the_stream_in_flight_finish_then_exits_cleanly(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "fault": {"delay_per_token_s": 0.02}}})
    client = daemon.openai()
    stream = iter(client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=60, stream=True,
        stream_options={"include_usage": True}))
    next(stream)
    worker = psutil.Process(daemon.worker_pid("tiny"))
    daemon.proc.send_signal(signal.SIGTERM)
    # New requests are refused while it drains.
    wait_for(lambda: daemon.http.get("/health").status_code == 503, 5, "draining health")
    rest = list(stream)
    assert rest[-1].usage.completion_tokens == 60
    assert daemon.proc.wait(30) == 0
    wait_gone(worker, 5)
    assert not (daemon.run_dir / "gw.sock").exists()


def _sigterm_with_a_stream_and_a_queued_request(daemon, queued_model: str, max_tokens: int,
                                                queued_now) -> tuple[list[str], list]:
    """A long stream on "tiny" generating and a request for `queued_model` waiting
    (`queued_now` says when) as the daemon gets SIGTERM; its SSE lines and the waiting
    request's response, once the daemon has exited 0."""
    lines: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{daemon.base_url}/v1/chat/completions", timeout=60, json={
                "model": "tiny", "messages": MESSAGES, "max_tokens": 500,
                "stream": True}) as resp:
            lines.extend(line for line in resp.iter_lines() if line)

    queued: list[httpx.Response] = []
    threads = [threading.Thread(target=stream), threading.Thread(target=lambda: queued.append(
        httpx.post(f"{daemon.base_url}/v1/chat/completions", timeout=60, json={
            "model": queued_model, "messages": MESSAGES, "max_tokens": max_tokens})))]
    threads[0].start()
    wait_for(lambda: sum(line.startswith("data: {") for line in lines) > 3, 30,
             "a stream generating")
    threads[1].start()
    wait_for(queued_now, 30, "a request waiting")
    daemon.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=30)
    assert daemon.proc.wait(30) == 0
    return lines, queued


def test_requests_left_when_the_drain_runs_out_get_a_503_or_an_error_event(start_daemon,
                                                                           tiny_model):
    """A stream still generating and a request still waiting for its model to load when
    drain_timeout_s runs out fail in OpenAI's shape, not as a cut connection or an empty 500."""
    daemon = start_daemon(
        {"tiny": {"path": str(tiny_model), "fault": {"delay_per_token_s": 0.05}},
         "loading": {"path": str(tiny_model), "fault": {"load_delay_s": 30}}},
        supervisor={"drain_timeout_s": 1.0})
    # One load at a time: "tiny" first, generating, then "loading" (which never finishes).
    lines, queued = _sigterm_with_a_stream_and_a_queued_request(
        daemon, "loading", 2,
        lambda: daemon.workers().get("loading", {}).get("state") == "STARTING")
    assert queued[0].status_code == 503, queued[0].text
    assert queued[0].json()["error"]["code"] == "shutting_down"
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "drain_timeout_s" in events[-1]["error"]["message"], events[-1]
    assert events[-1]["error"]["code"] == "shutting_down"
    assert len(events) > 3 and lines[-1].startswith("data: {\"error\"")  # no [DONE] after it


def test_a_request_queued_behind_a_full_batch_gets_the_503_when_the_drain_runs_out(
        start_daemon, tiny_model):
    """The streams failed first freed their slots, which went to the queued request: it ran
    past the deadline and the HTTP server cut it off with an empty 500."""
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "max_running": 1,
                                    "fault": {"delay_per_token_s": 0.05}}},
                          supervisor={"drain_timeout_s": 1.0})
    _, queued = _sigterm_with_a_stream_and_a_queued_request(
        daemon, "tiny", 100, lambda: daemon.workers()["tiny"]["waiting"] == 1)
    assert queued[0].status_code == 503, (queued[0].status_code, queued[0].text)
    assert queued[0].json()["error"]["code"] == "shutting_down"


def test_a_crash_fails_a_streamed_n_request_at_once_while_a_choice_waits(start_daemon,
                                                                        tiny_model):
    """Two of three choices generating (max_running 2) when the worker dies: the third,
    waiting for a slot, kept the request open until the model had loaded again, so the client
    heard of the crash a whole load later."""
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "max_running": 2, "preload": True,
                                    "fault": {"crash_after_tokens": 4, "load_delay_s": 6,
                                              "delay_per_token_s": 0.05}}})
    wait_for(lambda: daemon.workers().get("tiny", {}).get("state") == "RUNNING", 30, "the load")
    started = time.monotonic()
    with httpx.stream("POST", f"{daemon.base_url}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": MESSAGES, "max_tokens": 50, "n": 3,
            "stream": True}) as resp:
        # before stream_commit_after_s it is a real 502, after it the stream's error event
        body = resp.read().decode()
    elapsed = time.monotonic() - started
    last = [line for line in body.splitlines() if line.strip()][-1].removeprefix("data: ")
    assert json.loads(last)["error"]["code"] == "worker_crashed", body
    assert elapsed < 5, elapsed  # not after a 6 s reload


def test_a_request_whose_body_never_ends_gets_a_503_at_sigterm(start_daemon):
    """A body still arriving at SIGTERM is refused at once. Before, the request was let in
    when the rest came and cut off with an empty 500; counted as busy instead, it held the
    drain for the whole drain_timeout_s and was cut off all the same."""
    daemon = start_daemon(supervisor={"drain_timeout_s": 20.0})
    url = httpx.URL(daemon.base_url)
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mo")
        time.sleep(0.5)
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        answered = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 503"), reply
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "shutting_down"
    assert answered < 3, answered
    assert daemon.proc.wait(15) == 0


@pytest.mark.parametrize("pdeathsig", [True, False], ids=["pdeathsig", "getppid"])
def test_workers_exit_by_themselves_when_the_daemon_is_sigkilled(start_daemon, tiny_model,
                                                                 pdeathsig):
    fault = {} if pdeathsig else {"no_pdeathsig": 1}
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "fault": fault}})
    daemon.openai().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1)
    worker = psutil.Process(daemon.worker_pid("tiny"))
    killed_at = time.monotonic()
    daemon.proc.kill()
    daemon.proc.wait()
    wait_gone(worker, 10)
    assert time.monotonic() - killed_at < 10
    assert not daemon.worker_processes()
    # Without PDEATHSIG it was the worker's own once-a-second parent check that ended it.
    noticed = f"daemon (pid {daemon.proc.pid}) is gone; exiting" in daemon.worker_log("tiny")
    assert noticed == (not pdeathsig)


def test_a_second_daemon_on_the_same_run_dir_refuses_to_start(start_daemon):
    import subprocess
    import sys

    daemon = start_daemon()
    out = subprocess.run(
        [sys.executable, "-m", "mlxrouter", "serve", "--config",
         str(daemon.root / "supervisor.toml")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert f"already running (pid {daemon.proc.pid})" in out.stderr
    assert daemon.http.get("/health").status_code == 200


def test_a_failure_handling_one_requests_output_fails_only_that_request(start_daemon,
                                                                       tiny_model):
    # The 5th token of every sequence makes the engine's per-sequence output handling raise
    # (fault injection); a sequence that ends sooner is unaffected, in the same batch.
    daemon = start_daemon({"tiny": {"path": str(tiny_model),
                                    "fault": {"output_error_at_token": 5,
                                              "delay_per_token_s": 0.02}}})
    client = daemon.openai()
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1)
    pid = daemon.wait_worker("tiny")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        long = pool.submit(daemon.http.post, "/v1/chat/completions", json={
            "model": "tiny", "messages": MESSAGES, "max_tokens": 20, "temperature": 0})
        short = pool.submit(client.chat.completions.create, model="tiny", messages=MESSAGES,
                            max_tokens=4, temperature=0)
        failed, ok = long.result(60), short.result(60)
    assert failed.status_code == 500
    assert failed.json()["error"]["message"].startswith("the model's output could not be "
                                                        "processed")
    assert ok.usage.completion_tokens == 4
    assert daemon.worker_pid("tiny") == pid  # the worker and its batch went on
    assert client.chat.completions.create(model="tiny", messages=MESSAGES,
                                          max_tokens=3).usage.completion_tokens == 3


def test_a_stalled_daemon_does_not_kill_its_workers_for_its_own_silence(start_daemon,
                                                                        tiny_model):
    """The daemon's event loop stops for longer than the silence timeout (here SIGSTOP; a
    suspended laptop, a swapped-out daemon): the workers' heartbeats wait unread in the
    socket, which is the daemon's fault, not theirs, so none is killed as silent."""
    daemon = start_daemon(supervisor={"silence_timeout_s": 2.0})
    client = daemon.openai()
    assert client.chat.completions.create(model="tiny", messages=MESSAGES,
                                          max_tokens=2).usage.completion_tokens == 2
    pid = daemon.worker_pid("tiny")
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(4)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    time.sleep(2.5)  # ticks after the stall, and a heartbeat or two
    assert daemon.worker_pid("tiny") == pid
    assert "silent for" not in daemon.output()
    assert "event loop stalled" in daemon.output()
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert resp.usage.completion_tokens == 2
    assert daemon.worker_pid("tiny") == pid


def test_a_kernel_rebuild_at_a_worker_start_does_not_stall_the_daemon(start_daemon,
                                                                      tiny_model, tmp_path):
    """A worker's start finds its preloaded library gone (a cleaned cache, an upgraded MLX)
    and rebuilds it, seconds of compiling: the daemon keeps answering and keeps its other
    workers meanwhile."""
    from mlxrouter import gemv, mlx_ops
    from mlxrouter.config import cache_home

    kernels = mlx_ops.library(cache_home() / "lib")
    forwarder = gemv.library(cache_home() / "lib")
    if kernels is None or forwarder is None:
        assert not os.environ.get("CI"), "CI ran without a compiler for the native libraries"
        pytest.skip("needs the native libraries (Linux x86-64, a C and a C++ compiler)")
    private = tmp_path / "cache"  # the daemon's own cache, with copies of both
    (private / "mlxrouter" / "lib").mkdir(parents=True)
    for lib in (kernels, forwarder):
        shutil.copy(lib, private / "mlxrouter" / "lib" / lib.name)
    daemon = start_daemon({"tiny": {"path": str(tiny_model)},
                           "other": {"path": str(tiny_model)}},
                          supervisor={"silence_timeout_s": 2.0},
                          env={"XDG_CACHE_HOME": str(private)})
    client = daemon.openai()
    assert client.chat.completions.create(model="tiny", messages=MESSAGES,
                                          max_tokens=2).usage.completion_tokens == 2
    pid = daemon.worker_pid("tiny")
    (private / "mlxrouter" / "lib" / kernels.name).unlink()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        other = pool.submit(client.chat.completions.create, model="other", messages=MESSAGES,
                            max_tokens=2)
        wait_for(lambda: "starting worker model=other" in daemon.output(), 10)
        answered = []
        while not other.done():  # the rebuild: several seconds of compiling
            started = time.monotonic()
            assert daemon.http.get("/health").status_code == 200
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1)
            answered.append(time.monotonic() - started)
            time.sleep(0.2)
        assert other.result().usage.completion_tokens == 2
    assert "built the vectorized MLX CPU kernels" in daemon.output()
    assert len(answered) >= 2 and max(answered) < 1.5, answered
    assert daemon.worker_pid("tiny") == pid
    assert "silent for" not in daemon.output()


def test_a_worker_lost_while_loading_reports_its_own_reason_not_an_earlier_workers_line(
        start_daemon, tiny_model):
    """The reason came from the model's log file, shared by every worker of the model: a
    worker killed while loading showed the previous worker's last line ("request ended
    ..."), and a watchdog kill never said it was one."""
    daemon = start_daemon({"tiny": {"path": str(tiny_model)}},
                          supervisor={"load_timeout_s": 8.0, "start_retries": 5})
    assert daemon.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": MESSAGES, "max_tokens": 2}).status_code == 200
    (daemon.root / "workers" / "model0.toml").write_text(
        f'id = "tiny"\npath = "{tiny_model}"\nfault = {{ load_delay_s = 60 }}\n')
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.workers()["tiny"]["state"] == "STOPPED", 15, "the old worker")

    def load_fails() -> dict:
        return daemon.http.post("/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": MESSAGES, "max_tokens": 2}).json()["error"]

    # killed from outside while loading
    result: list[dict] = []
    thread = threading.Thread(target=lambda: result.append(load_fails()))
    thread.start()
    pid = wait_for(lambda: daemon.worker_pid("tiny", state="STARTING"), 15, "a loading worker")
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    thread.join(30)
    assert "signal 9 while loading" in result[0]["message"], result[0]
    assert "request ended" not in result[0]["message"]
    # killed by the watchdog (load_timeout_s), after the backoff
    wait_for(lambda: daemon.workers()["tiny"]["state"] != "BACKOFF", 15, "the backoff")
    error = load_fails()
    assert "killed by the supervisor: not ready after 8s" in error["message"], error
    assert "request ended" not in error["message"]
