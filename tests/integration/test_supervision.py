"""Supervision with real processes: memory budgets and hot-swap, backoff and FATAL, admission
limits, timeouts, idle unloading, pressure caps, stale workers and engine out-of-memory."""

from __future__ import annotations

import contextlib
import hashlib
import json

import os
import signal
import sys
import threading
import time

import httpx
import openai
import psutil
import pytest

from conftest import gone, spawn_daemon, wait_for, wait_for_gone, wait_gone

MESSAGES = [{"role": "user", "content": "Tell me a story about two lighthouses."}]


def _chat(daemon, model: str, **kwargs) -> httpx.Response:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 3, **kwargs}
    return daemon.http.post("/v1/chat/completions", json=body)


def _live_models(daemon) -> set[str]:
    return {m for m, w in daemon.workers().items()
            if w["state"] in ("STARTING", "RUNNING", "DRAINING", "STOPPING")}


def _two_models(tiny_model, **a_opts):
    base = {"path": str(tiny_model), "required_memory_gb": 1.0, "safety_margin": 1.0}
    return {"a": {**base, **a_opts}, "b": dict(base)}


def test_budget_for_one_model_swaps_them_and_never_holds_both(start_daemon, tiny_model):
    daemon = start_daemon(_two_models(tiny_model), supervisor={"memory_budget_gb": 1.5})
    for model in ["a", "b", "a", "b"]:
        resp = _chat(daemon, model)
        assert resp.status_code == 200, resp.text
        assert _live_models(daemon) == {model}
        assert len(daemon.worker_processes()) == 1
    assert daemon.workers()["a"]["state"] in ("STOPPED", "EXITED")


def test_a_stream_on_a_is_not_cut_when_b_is_asked_for(start_daemon, tiny_model):
    daemon = start_daemon(_two_models(tiny_model, fault={"delay_per_token_s": 0.03}),
                          supervisor={"memory_budget_gb": 1.5})
    client = daemon.openai()
    stream = iter(client.chat.completions.create(model="a", messages=MESSAGES,
                                                 max_tokens=60, stream=True))
    next(stream)
    result: dict = {}

    def ask_b() -> None:
        result["b"] = _chat(daemon, "b")
        result["b_done"] = time.monotonic()

    thread = threading.Thread(target=ask_b)
    thread.start()
    wait_for(lambda: daemon.workers().get("b", {}).get("waiting") == 1, 5, "b to queue")
    chunks = list(stream)
    a_done = time.monotonic()
    thread.join(30)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert result["b"].status_code == 200
    assert result["b_done"] > a_done
    assert _live_models(daemon) == {"b"}


def test_model_bigger_than_the_budget_is_a_clear_503(start_daemon, tiny_model):
    daemon = start_daemon({"big": {"path": str(tiny_model), "required_memory_gb": 10.0,
                                   "safety_margin": 1.0}},
                          supervisor={"memory_budget_gb": 1.5})
    resp = _chat(daemon, "big")
    assert resp.status_code == 503
    err = resp.json()["error"]
    assert err["code"] == "insufficient_memory"
    assert "10.00 GB" in err["message"] and "1.50 GB" in err["message"]
    assert "lower its required_memory_gb" in err["message"]  # not max_context: no effect here
    assert resp.headers["x-should-retry"] == "false"
    assert daemon.worker_processes() == []


def test_a_model_that_never_fits_is_refused_before_it_queues(start_daemon, tiny_model):
    """Requests queued first: a full queue answered 429 "try again shortly" to a model that
    can never load."""
    daemon = start_daemon({"big": {"path": str(tiny_model), "required_memory_gb": 10.0,
                                   "max_queue": 0}},
                          supervisor={"memory_budget_gb": 1.5})
    for _ in range(2):
        resp = _chat(daemon, "big")
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "insufficient_memory"


def test_pinned_busy_model_makes_the_other_wait_then_503_no_memory(start_daemon, tiny_model):
    daemon = start_daemon(_two_models(tiny_model, pinned=True),
                          supervisor={"memory_budget_gb": 1.5, "load_wait_timeout_s": 1.0})
    assert _chat(daemon, "a").status_code == 200
    resp = _chat(daemon, "b")
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "no_memory"
    assert "Retry-After" in resp.headers
    assert _live_models(daemon) == {"a"}


def test_a_start_that_waits_for_room_too_long_says_it_gave_up(start_daemon, tiny_model):
    """A preload's or a ctl start's wait was dropped without a word: STOPPED, no reason,
    nothing in daemon.log."""
    daemon = start_daemon(_two_models(tiny_model, pinned=True),
                          supervisor={"memory_budget_gb": 1.5, "load_wait_timeout_s": 1.0})
    assert _chat(daemon, "a").status_code == 200  # pinned: "b" never gets its room
    assert daemon.http.post("/admin/models/b/start", timeout=30).status_code == 503
    reason = daemon.workers()["b"].get("reason", "")
    assert "given up after load_wait_timeout_s (1 s)" in reason, daemon.workers()["b"]
    assert "model=b: its start was given up" in (daemon.log_dir / "daemon.log").read_text()


def test_a_failed_models_retries_do_not_evict_a_model_in_use(start_daemon, tiny_model):
    """Room for one model. "bad" fails its start (BACKOFF, then retried by itself); "a"
    serves meanwhile. Retries nobody waits for never stop "a"; a request for "bad" may."""
    base = {"path": str(tiny_model), "required_memory_gb": 1.0, "safety_margin": 1.0}
    daemon = start_daemon({"a": dict(base), "bad": {**base, "fault": {"fail_load": 1}}},
                          supervisor={"memory_budget_gb": 1.5, "start_retries": 3})
    assert _chat(daemon, "bad").status_code == 503  # failed start: BACKOFF 1 s, then 2 s, ...
    assert _chat(daemon, "a").status_code == 200
    pid = daemon.worker_pid("a")
    assert pid is not None, daemon.workers()
    deadline = time.monotonic() + 5  # past two retries' backoff
    while time.monotonic() < deadline:
        assert daemon.worker_pid("a") == pid, daemon.workers()
        time.sleep(0.1)
    assert "retry waits for room" in daemon.workers()["bad"].get("reason", ""), (
        daemon.workers()["bad"])
    assert _chat(daemon, "a").status_code == 200 and daemon.worker_pid("a") == pid
    asked = _chat(daemon, "bad")  # a request for it makes room as any start does
    assert asked.status_code == 503 and asked.json()["error"]["code"] == "model_load_failed"
    assert daemon.worker_pid("a") != pid


@pytest.mark.parametrize("model", ["gone", "org/gone"])
def test_an_idle_worker_whose_directory_was_deleted_stops_by_itself(start_daemon,
                                                                     tiny_model, model):
    """(models rm of a loaded model) its worker stayed RUNNING, holding memory and a place
    among max_loaded_models, while every request for it got 404. In the org/name layout the
    removal changed no root's mtime, and the model was served on (until a listing)."""
    import shutil

    daemon = start_daemon({})
    copy = daemon.root / "models" / model
    shutil.copytree(tiny_model, copy)
    assert _chat(daemon, model).status_code == 200
    pid = daemon.worker_pid(model)
    shutil.rmtree(copy)
    wait_for(lambda: _chat(daemon, model).status_code == 404, 10, "the model to be forgotten")
    wait_for(lambda: not psutil.pid_exists(pid), 10, "the worker to stop by itself")
    assert "its idle worker stops" in (daemon.log_dir / "daemon.log").read_text()
    assert daemon.http.post(f"/admin/models/{model}/stop").status_code == 404  # it is gone
    # ... from the status views too, once its worker has exited
    wait_for(lambda: model not in daemon.workers(), 5, "the model to leave /v1/health")
    gauges = [line for line in daemon.http.get("/metrics").text.splitlines()
              if line.startswith("mlxrouter_worker_") and f'model="{model}"' in line]
    assert not gauges  # (its request counters stay: they are history)
    listed = daemon.http.get("/admin/status").json()["workers"]
    assert model not in [m["model"] for m in listed]
    shutil.copytree(tiny_model, copy)  # back again: served afresh (unknown ids rescan at
    wait_for(lambda: _chat(daemon, model).status_code == 200, 5, "the model")  # most 1/s)
    assert daemon.workers()[model]["restarts"] == 0


def test_ctl_stop_stops_retries_and_loads_for_good(start_daemon, tiny_model):
    """As supervisorctl's: a model in BACKOFF stops retrying, and one loading for a waiting
    request stops and does not load again for it (the request gets a 503)."""
    daemon = start_daemon({"bad": {"path": str(tiny_model), "fault": {"fail_load": 1}},
                           "slow": {"path": str(tiny_model), "fault": {"load_delay_s": 3}}},
                          supervisor={"start_retries": 3})
    assert _chat(daemon, "bad").status_code == 503
    assert daemon.workers()["bad"]["state"] == "BACKOFF"
    stopped = daemon.http.post("/admin/models/bad/stop").json()
    assert stopped["message"] == "retries stopped" and stopped["state"] == "EXITED", stopped
    deadline = time.monotonic() + 4  # past the 1 s and 2 s backoffs
    while time.monotonic() < deadline:
        assert daemon.workers()["bad"]["state"] == "EXITED", daemon.workers()["bad"]
        time.sleep(0.1)
    waiting: list[httpx.Response] = []
    asker = threading.Thread(target=lambda: waiting.append(_chat(daemon, "slow")))
    asker.start()
    wait_for(lambda: daemon.workers().get("slow", {}).get("state") == "STARTING", 5, "the load")
    assert daemon.http.post("/admin/models/slow/stop").json()["message"] == "stopped"
    asker.join(10)
    assert waiting[0].status_code == 503, waiting[0].text
    assert "was stopped" in waiting[0].json()["error"]["message"]
    assert waiting[0].headers["x-should-retry"] == "true"  # a new request loads it again
    time.sleep(1)
    assert daemon.workers()["slow"]["pid"] is None, daemon.workers()["slow"]


def test_start_failures_back_off_then_go_fatal_with_the_reason(start_daemon, tiny_model):
    daemon = start_daemon({"bad": {"path": str(tiny_model), "fault": {"fail_load": 1}}},
                          supervisor={"start_retries": 1})
    first = _chat(daemon, "bad")
    assert first.status_code == 503
    assert first.json()["error"]["code"] == "model_load_failed"
    assert "fault injection: load failed" in first.json()["error"]["message"]
    during = _chat(daemon, "bad")  # BACKOFF: refused at once, with how long to wait
    if during.json()["error"]["code"] == "model_load_failed":
        assert int(during.headers["Retry-After"]) >= 1
    wait_for(lambda: daemon.workers()["bad"]["state"] == "FATAL", 15, "FATAL")
    resp = _chat(daemon, "bad")
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "model_unavailable"
    assert "fault injection: load failed" in resp.json()["error"]["message"]
    assert resp.headers["x-should-retry"] == "false"
    assert daemon.http.get("/health").status_code == 200


def test_over_max_running_plus_max_queue_is_429(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "max_running": 1, "max_queue": 1,
                                    "fault": {"delay_per_token_s": 0.05}}})
    client = daemon.openai()
    running = iter(client.chat.completions.create(model="tiny", messages=MESSAGES,
                                                  max_tokens=30, stream=True))
    next(running)
    queued: dict = {}
    thread = threading.Thread(target=lambda: queued.update(r=_chat(daemon, "tiny")))
    thread.start()
    wait_for(lambda: daemon.workers()["tiny"]["waiting"] == 1, 5, "one queued request")
    resp = _chat(daemon, "tiny")
    assert resp.status_code == 429
    assert resp.json()["error"]["code"] == "queue_full"
    assert resp.json()["error"]["message"] == (
        "model 'tiny' has 1 requests running and 1 waiting (max_queue 1); try again shortly")
    assert resp.headers["Retry-After"] == "1"
    list(running)
    thread.join(30)
    assert queued["r"].status_code == 200


def test_request_timeout_is_504_and_the_worker_keeps_serving(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "timeout_s": 1.0, "preload": True,
                                    "fault": {"delay_per_token_s": 0.05}}})
    pid = daemon.wait_worker("tiny")
    started = time.monotonic()
    resp = _chat(daemon, "tiny", max_tokens=100)
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "timeout"
    assert time.monotonic() - started < 3
    with pytest.raises(openai.APIError) as info:
        list(daemon.openai().chat.completions.create(model="tiny", messages=MESSAGES,
                                                     max_tokens=100, stream=True))
    assert "time limit" in str(info.value.message)
    assert _chat(daemon, "tiny", max_tokens=2).status_code == 200
    assert daemon.worker_pid("tiny") == pid
    assert daemon.workers()["tiny"]["in_flight"] == 0


def test_idle_ttl_unloads_and_the_next_request_reloads(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "idle_ttl_s": 1.0}})
    assert _chat(daemon, "tiny").status_code == 200
    worker = psutil.Process(daemon.worker_pid("tiny"))
    wait_for(lambda: daemon.workers()["tiny"]["state"] == "STOPPED", 10, "idle unload")
    wait_gone(worker, 5)
    assert _chat(daemon, "tiny").status_code == 200


def test_preload_starts_the_model_without_a_request(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "preload": True}})
    daemon.wait_worker("tiny", timeout=30)


def test_critical_pressure_caps_max_tokens_and_evicts_idle_workers(start_daemon, tiny_model):
    # A threshold far above this machine's memory makes the pressure level critical.
    daemon = start_daemon(
        {"tiny": {"path": str(tiny_model), "memory_pressure_max_tokens": {"critical": 2}}},
        supervisor={"memory_threshold_gb": 100000.0})
    health = daemon.http.get("/v1/health").json()
    assert health["memory"]["pressure"] == "critical"
    assert health["memory"]["available_bytes"] > 0
    resp = daemon.openai().chat.completions.create(model="tiny", messages=MESSAGES,
                                                   max_tokens=10)
    assert resp.usage.completion_tokens == 2
    assert resp.choices[0].finish_reason == "length"
    # a max_tokens the context cannot hold is a 400 whatever the pressure caps it to
    with pytest.raises(openai.BadRequestError) as info:
        daemon.openai().chat.completions.create(model="tiny", messages=MESSAGES,
                                                max_tokens=100_000)
    assert info.value.body["code"] == "context_length_exceeded"
    assert "asks for 100000 more" in info.value.body["message"]
    wait_for(lambda: daemon.workers()["tiny"]["state"] == "STOPPED", 10, "pressure eviction")


def test_engine_out_of_memory_fails_the_batch_not_the_worker(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "fault": {"oom_after_tokens": 3}}})
    resp = _chat(daemon, "tiny", max_tokens=10)
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "out_of_memory"
    pid = daemon.worker_pid("tiny")
    assert _chat(daemon, "tiny", max_tokens=5).status_code == 200
    assert daemon.worker_pid("tiny") == pid


def test_crash_loop_goes_fatal(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model),
                                    "fault": {"crash_after_tokens": 2}}})
    codes = [_chat(daemon, "tiny", max_tokens=5).status_code for _ in range(7)]
    assert codes[:6] == [502] * 6
    assert codes[6] == 503
    state = daemon.workers()["tiny"]
    assert state["state"] == "FATAL" and "crash loop" in state["reason"]
    # ctl start clears FATAL and the crash history with it: one more crash is a 502 and a
    # restart, not FATAL again at once
    assert daemon.http.post("/admin/models/tiny/start").status_code == 200
    assert _chat(daemon, "tiny", max_tokens=5).status_code == 502
    assert _chat(daemon, "tiny", max_tokens=1).status_code == 200
    assert daemon.workers()["tiny"]["state"] == "RUNNING"


def test_a_reload_keeps_why_a_worker_crashed(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model),
                                    "fault": {"crash_after_tokens": 2}}})
    assert _chat(daemon, "tiny", max_tokens=5).status_code == 502
    before = daemon.workers()["tiny"]
    assert before["state"] == "EXITED" and "exited unexpectedly" in before["reason"]

    assert daemon.http.post("/admin/reload").status_code == 200

    after = daemon.workers()["tiny"]
    assert (after["state"], after["reason"]) == ("EXITED", before["reason"])


def test_ids_that_would_share_a_file_name_keep_their_own_pid_files_and_logs(start_daemon,
                                                                            tiny_model):
    """"x--y" and "x/y" were both x--y: one pid file for two workers (ctl stop of one removed
    it while the other ran) and one log with both models' lines."""
    import shutil

    daemon = start_daemon({"x--y": {"path": str(tiny_model)}})
    shutil.copytree(tiny_model, daemon.root / "models" / "x" / "y")
    for model in ("x--y", "x/y"):
        assert _chat(daemon, model).status_code == 200
    assert len(list((daemon.run_dir / "workers").glob("*.pid"))) == 2
    assert "model=x/y " in daemon.worker_log("x/y")
    assert "model=x--y " in daemon.worker_log("x--y")
    assert "model=x--y " not in daemon.worker_log("x/y")
    assert "model=x/y " not in daemon.worker_log("x--y")


def test_logs_written_before_logs_were_private_are_made_private(tmp_path, tiny_model):
    """Rotated logs and a worker's stderr log from before stayed world-readable, with the
    signed URLs logged then."""
    from conftest import write_config

    (tmp_path / "models").mkdir()
    config = write_config(tmp_path, models={"tiny": {"path": str(tiny_model)}})
    (tmp_path / "logs").mkdir()
    old = [tmp_path / "logs" / name for name in ("daemon.log.1", "worker-tiny.stderr.log")]
    for file in old:
        file.write_text("old\n")
        file.chmod(0o644)
    daemon = spawn_daemon(tmp_path, config)
    try:
        assert _chat(daemon, "tiny").status_code == 200
        for file in old:
            assert file.stat().st_mode & 0o077 == 0, file
    finally:
        daemon.stop()
        assert not wait_for_gone(daemon)


def test_restarted_daemon_reaps_a_stale_worker(start_daemon, tiny_model):
    # no_parent_watch: the worker cannot notice its daemon's death (a wedged worker would not).
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "fault": {"no_parent_watch": 1}}})
    assert _chat(daemon, "tiny").status_code == 200
    stale = psutil.Process(daemon.worker_pid("tiny"))
    daemon.proc.kill()
    daemon.proc.wait()
    time.sleep(1.5)  # longer than a watching worker's getppid period: it would be gone by now
    assert not gone(stale)
    second = spawn_daemon(daemon.root, daemon.root / "supervisor.toml")
    try:
        wait_gone(stale, 10)
        assert not list((daemon.run_dir / "workers").glob("*.pid"))
        assert _chat(second, "tiny").status_code == 200
    finally:
        second.stop()
        assert not wait_for_gone(second)


def test_workers_run_with_the_system_blas_preloaded(start_daemon, tiny_model):
    from mlxrouter import gemv, mlx_ops
    from mlxrouter.config import cache_home, find_system_blas

    digest = hashlib.sha256(gemv.source()).hexdigest()[:12]  # this source's build

    blis, openblas = find_system_blas("blis"), find_system_blas("openblas")
    if not (blis and openblas and gemv.compiler()):
        # scripts/bootstrap.sh installs both on Debian-family systems, and CI has a compiler.
        assert not os.environ.get("CI"), "CI ran without BLIS, OpenBLAS or a C compiler"
        pytest.skip("needs system BLIS, OpenBLAS and a C compiler")

    def maps(daemon) -> str:
        assert _chat(daemon, "tiny").status_code == 200
        return open(f"/proc/{daemon.worker_pid('tiny')}/maps").read()

    # auto: the gemv forwarder, built in the user's cache, ahead of OpenBLAS; the MLX kernels
    daemon = start_daemon()
    mapped = maps(daemon)
    forwarder = list((cache_home() / "lib").glob(f"libmlxrouter-gemv-{digest}.so"))
    assert len(forwarder) == 1 and str(forwarder[0]) in mapped
    kernels = cache_home() / "lib" / mlx_ops.RECIPE.name()
    assert str(kernels) in mapped
    preload = next(v for v in open(f"/proc/{daemon.worker_pid('tiny')}/environ", "rb").read()
                   .split(b"\0") if v.startswith(b"LD_PRELOAD="))
    assert preload.decode().split("=", 1)[1].split(":")[:2] == [str(kernels), str(forwarder[0])]
    assert os.path.realpath(openblas[1]) in mapped and "libblis" not in mapped
    # BLIS when chosen, on every core
    chosen = start_daemon(supervisor={"system_blas": "blis"})
    mapped = maps(chosen)
    assert os.path.realpath(blis[1]) in mapped and "libopenblas" not in mapped
    env = open(f"/proc/{chosen.worker_pid('tiny')}/environ", "rb").read().split(b"\0")
    assert f"BLIS_NUM_THREADS={len(os.sched_getaffinity(0))}".encode() in env
    # OpenBLAS alone when the forwarder is turned off
    plain = start_daemon(supervisor={"system_blas": "openblas", "gemv_forward": False})
    mapped = maps(plain)
    assert "libopenblas" in mapped and "libmlxrouter-gemv" not in mapped
    off = start_daemon(supervisor={"use_system_blas": False, "mlx_cpu_kernels": False})
    mapped = maps(off)
    assert "libopenblas.so" not in mapped and "libblis.so" not in mapped
    assert "libmlxrouter-gemv" not in mapped and "libmlxrouter-mlx-ops" not in mapped


def _thread_nices(pid: int) -> dict[str, list[int]]:
    """Nice values of a process's threads by kind: main, ZeroMQ's, and the others."""
    out: dict[str, list[int]] = {"main": [], "zmq": [], "compute": []}
    for tid in os.listdir(f"/proc/{pid}/task"):
        comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
        stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        nice = int(stat.rsplit(")", 1)[1].split()[16])  # field 19, after "pid (comm)"
        kind = "main" if int(tid) == pid else "zmq" if comm.startswith("ZMQbg") else "compute"
        out[kind].append(nice)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_worker_compute_threads_yield_to_its_io_thread(start_daemon, tiny_model):
    daemon = start_daemon(models={"tiny": {"path": str(tiny_model)},
                                  "tiny-same": {"path": str(tiny_model), "compute_nice": 0}})
    assert _chat(daemon, "tiny").status_code == 200
    nices = _thread_nices(daemon.worker_pid("tiny"))
    assert nices["main"] == [0] and set(nices["zmq"]) == {0}
    assert nices["compute"] and set(nices["compute"]) == {5}  # engine, MLX and BLAS threads
    assert _chat(daemon, "tiny").status_code == 200
    assert _chat(daemon, "tiny-same").status_code == 200
    assert set(sum(_thread_nices(daemon.worker_pid("tiny-same")).values(), [])) == {0}


def test_daemon_sigterm_leaves_no_worker_and_no_pidfile(start_daemon):
    daemon = start_daemon()
    assert _chat(daemon, "tiny").status_code == 200
    assert list((daemon.run_dir / "workers").glob("*.pid"))
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    assert daemon.worker_processes() == []
    assert not list((daemon.run_dir / "workers").glob("*.pid"))


def test_cli_serve_port_flag_overrides_the_file(tmp_path, tiny_model):
    from conftest import write_config

    (tmp_path / "models").mkdir()
    config = write_config(tmp_path, models={"tiny": {"path": str(tiny_model)}})
    with socket_port() as port:
        pass
    daemon = spawn_daemon(tmp_path, config, "--port", str(port))
    try:
        assert daemon.port == port
    finally:
        daemon.stop()
        assert not wait_for_gone(daemon)


def test_serve_on_a_port_in_use_or_out_of_range_says_so_and_exits(tmp_path, tiny_model):
    import socket
    import subprocess
    import sys

    from conftest import write_config

    (tmp_path / "models").mkdir()
    config = write_config(tmp_path, models={"tiny": {"path": str(tiny_model)}})

    def serve(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mlxrouter", "serve", "--config",
                               str(config), *extra], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = serve("--port", str(port))
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Address already in use" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "gw.sock").exists()
    assert "cannot listen on" in (tmp_path / "logs" / "daemon.log").read_text()
    done = serve("--port", "99999")
    assert done.returncode == 2 and "not a port" in done.stderr


class socket_port:
    """A free TCP port on 127.0.0.1 (closed again on exit)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


def test_sighup_reloads_models_and_keeps_the_old_config_on_errors(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "max_tokens": 3}})
    assert _chat(daemon, "tiny", max_tokens=None).json()["usage"]["completion_tokens"] == 3
    pid = daemon.worker_pid("tiny")
    workers = daemon.root / "workers"
    # A hot change (default max_tokens) and a new model, in one reload.
    (workers / "model0.toml").write_text(f'id = "tiny"\npath = "{tiny_model}"\nmax_tokens = 5\n')
    (workers / "extra.toml").write_text(f'path = "{tiny_model}"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "extra" in {m["id"] for m in daemon.http.get("/v1/models").json()["data"]},
             10, "the added model")
    assert _chat(daemon, "tiny", max_tokens=None).json()["usage"]["completion_tokens"] == 5
    assert daemon.worker_pid("tiny") == pid  # hot: same worker
    assert _chat(daemon, "extra").status_code == 200
    # A broken file: the whole reload is refused and the current config stays.
    (workers / "broken.toml").write_text('path = "/x"\nno_such_key = 1\n')
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "no_such_key" in daemon.output(), 10, "the reload error in the log")
    assert _chat(daemon, "extra").status_code == 200
    (workers / "broken.toml").unlink()
    # A removed model 404s and its worker stops; a cold change restarts the worker.
    (workers / "extra.toml").unlink()
    (workers / "model0.toml").write_text(
        f'id = "tiny"\npath = "{tiny_model}"\nmax_tokens = 5\nmax_context = 1024\n')
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: _chat(daemon, "extra").status_code == 404, 10, "extra to be removed")
    # once its worker is gone it is no longer listed (ctl status, /v1/health)
    wait_for(lambda: "extra" not in daemon.workers(), 10, "extra to stop")
    assert _chat(daemon, "tiny").status_code == 200
    assert daemon.worker_pid("tiny") not in (None, pid)


def test_wedged_engine_is_killed_and_its_request_fails_fast(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "preload": True,
                                    "fault": {"stall_after_tokens": 3}}},
                          supervisor={"engine_stall_timeout_s": 2.0})
    worker = psutil.Process(daemon.wait_worker("tiny"))
    started = time.monotonic()
    resp = _chat(daemon, "tiny", max_tokens=20)
    assert resp.status_code == 502
    assert 2.0 <= time.monotonic() - started < 8
    # the request hears why, not only "exited unexpectedly (signal 9)"
    assert "killed by the supervisor: engine made no progress" in resp.json()["error"]["message"]
    wait_gone(worker, 5)
    assert "engine made no progress" in daemon.output()


def test_max_loaded_models_evicts_to_stay_under_the_count(start_daemon, tiny_model):
    daemon = start_daemon({"a": {"path": str(tiny_model)}, "b": {"path": str(tiny_model)}},
                          supervisor={"max_loaded_models": 1})
    for model in ["a", "b", "a"]:
        assert _chat(daemon, model).status_code == 200
        assert _live_models(daemon) == {model}


def test_odd_sampling_values_fail_nothing_and_crash_nothing(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "preload": True}})
    pid = daemon.wait_worker("tiny")
    for extra in ({"seed": -5, "temperature": 1.0}, {"top_k": 100000, "temperature": 1.0},
                  {"seed": 2**63 - 1, "temperature": 0.5}):
        resp = _chat(daemon, "tiny", **extra)
        assert resp.status_code == 200, (extra, resp.text)
    too_big = _chat(daemon, "tiny", seed=2**64 + 3)
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "seed"
    assert daemon.worker_pid("tiny") == pid


def test_a_waiter_leaving_mid_eviction_does_not_block_later_loads(start_daemon, tiny_model):
    base = {"path": str(tiny_model), "required_memory_gb": 1.0, "safety_margin": 1.0}
    daemon = start_daemon({"a": base, "b": {**base, "timeout_s": 1.0}, "c": base},
                          supervisor={"memory_budget_gb": 1.5, "stop_timeout_s": 2.0})
    assert _chat(daemon, "a").status_code == 200
    os.kill(daemon.worker_pid("a"), signal.SIGSTOP)  # a victim slow to exit: SIGKILL in 2 s
    assert _chat(daemon, "b").status_code == 504  # gave up while a was still stopping
    resp = _chat(daemon, "c")
    assert resp.status_code == 200, resp.text
    assert _live_models(daemon) == {"c"}


def test_idle_time_is_not_an_engine_stall(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "preload": True,
                                    "fault": {"delay_per_token_s": 1.2}}},
                          supervisor={"engine_stall_timeout_s": 2.0})
    pid = daemon.wait_worker("tiny")
    time.sleep(3)  # idle for longer than the stall timeout
    assert _chat(daemon, "tiny", max_tokens=2).status_code == 200
    assert daemon.worker_pid("tiny") == pid


def test_preloaded_model_is_not_unloaded_by_its_ttl_at_once(start_daemon, tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "preload": True,
                                    "idle_ttl_s": 60.0}})
    pid = daemon.wait_worker("tiny")
    time.sleep(2.5)  # two supervisor ticks
    assert daemon.worker_pid("tiny") == pid


def test_out_of_range_token_ids_and_huge_ints_are_400s_that_leak_nothing(start_daemon,
                                                                         tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "max_running": 1,
                                    "preload": True}})
    pid = daemon.wait_worker("tiny")
    for prompt in ([5, 100000], [5, 583], [[1], [2**40]]):
        resp = daemon.http.post("/v1/completions", json={"model": "tiny", "prompt": prompt,
                                                         "max_tokens": 2})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "prompt"
    for body in ({"max_tokens": 10**23}, {"top_k": 2**64}, {"logit_bias": {"²": 1}}):
        resp = _chat(daemon, "tiny", **body)
        assert resp.status_code == 400, (body, resp.text)
    deep = b'{"model": "tiny", "messages": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    assert daemon.http.post("/v1/chat/completions", content=deep).status_code == 400
    assert _chat(daemon, "tiny").status_code == 200  # the one batch slot was given back
    assert daemon.worker_pid("tiny") == pid


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_while_queued_is_cancelled_at_once(start_daemon, tiny_model,
                                                               stream):
    """A request queued behind a full batch whose client hangs up never runs, and its 499
    is logged then, under its own request id (a stream's ran to the end for nobody)."""
    daemon, busy = _one_slot_taken(start_daemon, tiny_model, max_queue=2)
    with _raw_chat(daemon, "left-in-queue", max_tokens=30, stream=stream):
        wait_for(lambda: daemon.workers()["tiny"]["waiting"] == 1, 5, "it to queue")
    left = time.monotonic()
    wait_for(lambda: daemon.workers()["tiny"]["waiting"] == 0, 2, "it to be cancelled")
    wait_for(lambda: "[left-in-queue]" in daemon.output(), 2, "its 499 in the log")
    assert daemon.workers()["tiny"]["in_flight"] == 1
    assert time.monotonic() - left < 1.5  # well before the busy request ends (3 s)
    line = next(x for x in daemon.output().splitlines() if "[left-in-queue]" in x)
    assert "status=499" in line, line
    busy.join(30)
    assert not [x for x in daemon.worker_log("tiny").splitlines()
                if "request_id=left-in-queue" in x and "finish=length" in x]


def test_a_client_that_leaves_mid_stream_is_logged_at_once_under_its_own_id(start_daemon,
                                                                            tiny_model):
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "preload": True,
                                    "fault": {"delay_per_token_s": 0.05}}})
    daemon.wait_worker("tiny")
    with _raw_chat(daemon, "left-mid-stream", max_tokens=100, stream=True) as sock:
        seen = b""
        while seen.count(b"data: ") < 3:
            seen += sock.recv(65536)
    wait_for(lambda: "[left-mid-stream]" in daemon.output(), 3, "its 499 in the log")
    line = next(x for x in daemon.output().splitlines() if "[left-mid-stream]" in x)
    assert "status=499" in line, line
    wait_for(lambda: "finish=cancelled" in daemon.worker_log("tiny"), 3, "the cancel")
    assert daemon.workers()["tiny"]["in_flight"] == 0


def _one_slot_taken(start_daemon, tiny_model, max_queue: int):
    """A daemon whose one batch slot a slow request (in a thread) holds for about 3 s."""
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "max_running": 1,
                                    "max_queue": max_queue, "preload": True,
                                    "fault": {"delay_per_token_s": 0.05}}})
    daemon.wait_worker("tiny")
    busy = threading.Thread(target=_chat, args=(daemon, "tiny"), kwargs={"max_tokens": 60})
    busy.start()
    wait_for(lambda: daemon.workers()["tiny"]["in_flight"] == 1, 5, "the busy request")
    return daemon, busy


@contextlib.contextmanager
def _raw_chat(daemon, request_id: str, **body):
    """A chat request on a plain socket, which the test may close at any moment."""
    import socket

    data = json.dumps({"model": "tiny", "messages": MESSAGES, **body}).encode()
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nX-Request-ID: %s\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (request_id.encode(), len(data), data))
        yield sock


def test_a_failed_choice_stops_its_siblings(start_daemon, tiny_model):
    # Another client holds the one running slot: of n=2 choices the first queues, the second
    # finds the queue full (429), and the first must not stay queued for nobody.
    daemon, busy = _one_slot_taken(start_daemon, tiny_model, max_queue=1)
    resp = _chat(daemon, "tiny", n=2, max_tokens=100)
    assert resp.status_code == 429
    wait_for(lambda: daemon.workers()["tiny"]["in_flight"] == 1
             and daemon.workers()["tiny"]["waiting"] == 0, 3, "the sibling to be cancelled")
    busy.join(30)


def test_a_reload_that_lowers_max_loaded_models_stops_idle_workers_at_once(start_daemon,
                                                                           tiny_model):
    daemon = start_daemon({"a": {"path": str(tiny_model)}, "b": {"path": str(tiny_model)},
                           "c": {"path": str(tiny_model)}})
    for model in ["a", "b", "c"]:
        assert _chat(daemon, model).status_code == 200
    assert _live_models(daemon) == {"a", "b", "c"}
    config = daemon.root / "supervisor.toml"
    config.write_text(config.read_text().replace("[supervisor]\n",
                                                 "[supervisor]\nmax_loaded_models = 1\n"))
    daemon.proc.send_signal(signal.SIGHUP)
    # the least recently used go first; "c" was used last
    wait_for(lambda: _live_models(daemon) == {"c"}, 10, "a and b to stop")
    assert daemon.workers()["a"]["state"] == "STOPPED"
    assert _chat(daemon, "c").status_code == 200


def test_a_reload_that_changes_reasoning_response_restarts_the_worker(start_daemon, tiny_model):
    """The worker applies reasoning_response: a reload said "reloaded" and the old value
    stayed in force until a restart."""
    daemon = start_daemon({"tiny": {"path": str(tiny_model)}})
    assert _chat(daemon, "tiny").status_code == 200
    pid = daemon.worker_pid("tiny")
    (daemon.root / "workers" / "model0.toml").write_text(
        f'id = "tiny"\npath = "{tiny_model}"\nreasoning_response = "disable"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "restarts for reasoning_response" in daemon.output(), 10, "the restart")
    assert _chat(daemon, "tiny").status_code == 200
    assert daemon.worker_pid("tiny") not in (None, pid)


def test_a_zero_queue_refuses_the_load_and_says_so(start_daemon, tiny_model):
    """It said "has 8 requests running and 0 waiting" of a model not loaded, then a 429
    "try again shortly", though no retry could ever load it."""
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "max_queue": 0}})
    resp = _chat(daemon, "tiny")
    assert resp.status_code == 503 and resp.headers["x-should-retry"] == "false"
    assert resp.json()["error"]["code"] == "model_unavailable"
    assert "with max_queue = 0 no request can wait for its load: start it with " \
        "`mlxrouter ctl start tiny`" in resp.json()["error"]["message"]
    assert daemon.http.post("/admin/models/tiny/start").status_code == 200
    assert _chat(daemon, "tiny").status_code == 200


def test_a_zero_queue_model_whose_start_waits_for_room_answers_try_again(start_daemon,
                                                                        tiny_model):
    """While `ctl start` waits for room, a request is a retryable 429, and once the model is
    loaded it is served: nothing else will start the model, but that start is coming."""
    daemon = start_daemon({"busy": {"path": str(tiny_model), "fault": {"delay_per_token_s": 0.1}},
                           "z": {"path": str(tiny_model), "max_queue": 0}},
                          supervisor={"max_loaded_models": 1})
    stream = _streaming(daemon, "busy")
    starter, started = _admin_in_background(daemon, "/admin/models/z/start")
    wait_for(lambda: _chat(daemon, "z").status_code == 429, 10, "a 429 while the start waits")
    resp = _chat(daemon, "z")
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1", resp.text
    assert resp.json()["error"]["code"] == "queue_full"
    assert "is not loaded and its queue is full" in resp.json()["error"]["message"]
    list(stream)
    starter.join(60)
    assert started == {"status": 200}
    assert _chat(daemon, "z").status_code == 200


def _streaming(daemon, model: str):
    """A stream of 40 tokens to `model`, its first chunk read: the request is running."""
    stream = iter(daemon.openai().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=40, stream=True))
    next(stream)
    return stream


def _admin_in_background(daemon, path: str) -> tuple[threading.Thread, dict[str, int]]:
    """POST `path` on a thread (a ctl start or stop that waits); its status lands in the
    dict as "status"."""
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.update(
        status=daemon.http.post(path, timeout=60).status_code))
    thread.start()
    return thread, result


def test_a_cold_reload_starts_again_what_nothing_else_would(start_daemon, tiny_model):
    """A max_queue = 0 model restarted for a cold field stayed STOPPED for good (no request
    may wait for its load, and the 429 meanwhile promised "a new worker starts after it");
    a `ctl start` waiting on a load that a reload restarted failed with no_memory."""
    daemon = start_daemon({"z": {"path": str(tiny_model), "max_queue": 0},
                           "slow": {"path": str(tiny_model), "fault": {"load_delay_s": 3}}})
    assert daemon.http.post("/admin/models/z/start").status_code == 200
    old = daemon.worker_pid("z")
    starter, started = _admin_in_background(daemon, "/admin/models/slow/start")
    wait_for(lambda: daemon.workers().get("slow", {}).get("state") == "STARTING", 10,
             "slow STARTING")
    (daemon.root / "workers" / "model0.toml").write_text(
        f'id = "z"\npath = "{tiny_model}"\nmax_queue = 0\nmax_running = 3\n')
    (daemon.root / "workers" / "model1.toml").write_text(
        f'id = "slow"\npath = "{tiny_model}"\nfault = {{ load_delay_s = 1 }}\n')
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.worker_pid("z") not in (None, old), 30, "z started again")
    assert _chat(daemon, "z").status_code == 200
    starter.join(60)
    assert started == {"status": 200}
    assert daemon.worker_pid("slow") is not None


def test_a_cold_reload_while_ctl_stop_drains_does_not_start_it_again(start_daemon, tiny_model):
    """A max_queue = 0 model draining for `ctl stop` came back after a reload: the operator's
    stop was undone."""
    daemon = start_daemon({"z": {"path": str(tiny_model), "max_queue": 0,
                                 "fault": {"delay_per_token_s": 0.1}}})
    assert daemon.http.post("/admin/models/z/start", timeout=60).status_code == 200
    stream = _streaming(daemon, "z")
    stopper, stopped = _admin_in_background(daemon, "/admin/models/z/stop")
    wait_for(lambda: daemon.workers()["z"]["state"] in ("DRAINING", "STOPPING"), 10, "draining")
    (daemon.root / "workers" / "model0.toml").write_text(
        f'id = "z"\npath = "{tiny_model}"\nmax_queue = 0\nmax_running = 3\n')
    daemon.proc.send_signal(signal.SIGHUP)
    list(stream)
    stopper.join(60)
    assert stopped == {"status": 200}
    wait_for(lambda: daemon.workers()["z"]["state"] == "STOPPED", 20, "z stopped")
    time.sleep(2)  # (a start would come within a tick or two)
    assert daemon.workers()["z"]["state"] == "STOPPED", daemon.workers()["z"]


def test_loads_start_in_the_order_their_requests_came(start_daemon, tiny_model):
    """Models waiting for room were planned in the order the daemon first saw them, not the
    order their requests came."""
    daemon = start_daemon({"a": {"path": str(tiny_model)}, "d": {"path": str(tiny_model)},
                           "b": {"path": str(tiny_model), "fault": {"delay_per_token_s": 0.1}}},
                          supervisor={"max_loaded_models": 1})
    assert _chat(daemon, "a").status_code == 200  # "a" is known first
    stream = iter(daemon.openai().chat.completions.create(
        model="b", messages=MESSAGES, max_tokens=30, stream=True))
    next(stream)
    results: dict[str, int] = {}
    threads = []
    for model in ("d", "a"):  # "d" asks first
        t = threading.Thread(target=lambda m=model: results.update({m: _chat(daemon, m)
                                                                    .status_code}))
        t.start()
        threads.append(t)
        wait_for(lambda m=model: daemon.workers().get(m, {}).get("waiting") == 1, 10,
                 f"{model} waiting")
    list(stream)
    for t in threads:
        t.join(60)
    assert results == {"d": 200, "a": 200}
    log = (daemon.log_dir / "daemon.log").read_text()
    assert log.rindex("starting worker model=d ") < log.rindex("starting worker model=a ")
