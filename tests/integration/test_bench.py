"""`mlxrouter bench` against a real daemon serving the tiny model: the report a user reads
(table on stdout, JSON file) has every figure, and server errors are counted, not hidden."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)

LEVEL_FIELDS = {"concurrency", "requests", "ok", "errors", "error_kinds", "wall_s",
                "prompt_tokens_mean", "cached_tokens_mean", "completion_tokens", "ttft_ms",
                "itl_ms", "latency_ms", "stream_tok_s", "aggregate_tok_s"}


def bench(base_url: str, tmp_path: Path, *args: str, rc: int = 0
          ) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mlxrouter", "bench", "--base-url", base_url, "--json",
         str(out), "--no-progress", *args],
        capture_output=True, text=True, timeout=150)
    assert proc.returncode == rc, proc.stderr
    return proc, json.loads(out.read_text())


def table_rows(stdout: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in stdout.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    return [[c.strip() for c in row] for row in rows]


def test_streaming_report_has_every_figure(start_daemon, tiny_model, tmp_path):
    # 10 ms per token: tokens arrive in separate chunks even on a busy machine (a slow client
    # gets buffered tokens coalesced into one chunk, which leaves no gap to time).
    daemon = start_daemon({"tiny": {"path": str(tiny_model),
                                    "fault": {"delay_per_token_s": 0.01}}})
    proc, report = bench(f"{daemon.base_url}/v1", tmp_path, "--model", "tiny",
                         "--concurrency", "1,3", "--requests", "3", "--prompt-tokens", "40",
                         "--max-tokens", "6", "--history-tokens", "300",
                         "--history-reps", "1")
    assert report["errors"] == 0
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 3]
    # the model's load is the warm-up's, not the first level's (its figures measured it)
    assert report["warmup"]["ok"] and report["warmup"]["latency_ms"] > 0
    assert report["levels"][0]["ttft_ms"]["p99"] < report["warmup"]["latency_ms"]
    assert "warm-up request:" in proc.stdout
    for lv in report["levels"]:
        assert set(lv) == LEVEL_FIELDS
        assert (lv["requests"], lv["ok"], lv["errors"], lv["error_kinds"]) == (3, 3, 0, {})
        # usage is read from the stream: the tiny model never stops before max_tokens
        assert lv["completion_tokens"] == 3 * 6
        assert lv["prompt_tokens_mean"] >= 25  # at least one token per word of the prompt
        assert 0 < lv["ttft_ms"]["p50"] <= lv["ttft_ms"]["p99"] < lv["latency_ms"]["p99"]
        assert 0 < lv["itl_ms"]["p50"] <= lv["itl_ms"]["p99"]
        assert lv["stream_tok_s"]["p50"] > 0
        assert lv["aggregate_tok_s"] == pytest.approx(18 / lv["wall_s"], rel=0.02)
    mt = report["multiturn"]
    assert mt["errors"] == 0 and mt["reps"] == 1
    assert mt["prompt_tokens_mean"] > 250
    # the daemon's prompt cache serves the history of the next turn
    assert mt["cached_tokens_mean"] > 200
    assert mt["cold_ttft_ms"]["p50"] > 0 and mt["next_turn_ttft_ms"]["p50"] > 0

    rows = table_rows(proc.stdout)
    assert rows[0][:3] == ["concurrency", "requests", "errors"]
    assert [r[:3] for r in rows[1:3]] == [["1", "3", "0"], ["3", "3", "0"]]
    assert rows[3][0] == "history tokens"
    assert "errors:" not in proc.stdout


def test_non_streaming_and_completions_reports(start_daemon, tmp_path):
    daemon = start_daemon()
    proc, report = bench(f"{daemon.base_url}/v1", tmp_path, "--model", "tiny",
                         "--concurrency", "2", "--requests", "2", "--max-tokens", "1",
                         "--no-stream", "--format", "json")
    assert json.loads(proc.stdout) == report
    (lv,) = report["levels"]
    assert (lv["ok"], lv["completion_tokens"]) == (2, 2)
    assert lv["ttft_ms"]["p50"] is None and lv["latency_ms"]["p50"] > 0

    _, report = bench(f"{daemon.base_url}/v1", tmp_path, "--model", "tiny",
                      "--concurrency", "1", "--requests", "2", "--max-tokens", "5",
                      "--endpoint", "completions")
    (lv,) = report["levels"]
    assert (lv["ok"], lv["completion_tokens"]) == (2, 10)
    assert lv["ttft_ms"]["p50"] > 0


def test_http_errors_are_counted_by_kind(start_daemon, tmp_path):
    daemon = start_daemon()
    proc, report = bench(f"{daemon.base_url}/v1", tmp_path, "--model", "no-such-model",
                         "--concurrency", "2", "--requests", "4", "--max-tokens", "4", rc=1)
    assert "every request failed" in proc.stderr  # exit 1: scripts can tell
    (lv,) = report["levels"]
    assert (lv["ok"], lv["errors"]) == (0, 4)
    assert lv["error_kinds"] == {"404 model_not_found": 4}
    assert report["errors"] == 4
    assert lv["aggregate_tok_s"] == 0
    assert "errors: 404 model_not_found x4" in proc.stdout


def test_queue_full_and_mid_stream_errors_are_counted(start_daemon, tiny_model, tmp_path):
    # One request at a time and no queue: the other streams get 429 while it runs.
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "max_running": 1,
                                    "max_queue": 0, "preload": True,
                                    "fault": {"delay_per_token_s": 0.05}}})
    daemon.wait_worker("tiny")  # no queue: a request may not even wait for the load
    _, report = bench(f"{daemon.base_url}/v1", tmp_path, "--model", "tiny",
                      "--concurrency", "3", "--requests", "6", "--max-tokens", "8")
    (lv,) = report["levels"]
    assert lv["ok"] >= 1 and lv["errors"] >= 1 and lv["ok"] + lv["errors"] == 6
    assert set(lv["error_kinds"]) == {"429 queue_full"}
    assert lv["completion_tokens"] == 8 * lv["ok"]

    crashing = start_daemon({"tiny": {"path": str(tiny_model),
                                      "fault": {"crash_after_tokens": 3}}})
    _, report = bench(f"{crashing.base_url}/v1", tmp_path, "--model", "tiny",
                      "--concurrency", "1", "--requests", "1", "--max-tokens", "8", rc=1)
    (lv,) = report["levels"]
    assert (lv["ok"], lv["errors"]) == (0, 1)
    (kind,) = lv["error_kinds"]
    assert kind.startswith("stream ")



def test_unreachable_server_and_bad_flags(tmp_path):
    with socket.socket() as s:  # a port nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, report = bench(f"http://127.0.0.1:{port}/v1", tmp_path, "--model", "m",
                      "--concurrency", "2", "--requests", "3", rc=1)
    (lv,) = report["levels"]
    assert (lv["ok"], lv["errors"]) == (0, 3)
    assert lv["error_kinds"] == {"transport ConnectError": 3}

    bad = subprocess.run([sys.executable, "-m", "mlxrouter", "bench", "--model", "m",
                          "--concurrency", "4,0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "concurrency levels must be integers >= 1" in bad.stderr
    for args, says in ((["--timeout", "0"], "must be > 0"),
                       (["--temperature", "nan"], "must be 0 to 2"),  # was "invalid JSON"
                       (["--temperature", "-1"], "must be 0 to 2"),
                       (["--json", str(tmp_path / "no" / "such" / "dir.json")],
                        "cannot write the JSON report"),
                       # figures that would be mislabelled: a level of 4 that never ran 4
                       # streams, and ITL over every choice's tokens timed on the first
                       (["--concurrency", "4", "--requests", "2"], "fewer than the concurrency"),
                       (["--extra-body", '{"n": 2}'], "may not set n")):
        bad = subprocess.run([sys.executable, "-m", "mlxrouter", "bench", "--model", "m",
                              "--base-url", f"http://127.0.0.1:{port}/v1", *args],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and says in bad.stderr, bad.stderr


def test_ctrl_c_keeps_the_levels_that_finished(start_daemon, tiny_model, tmp_path):
    import signal
    import time

    from conftest import wait_for

    daemon = start_daemon({"tiny": {"path": str(tiny_model), "preload": True,
                                    "fault": {"delay_per_token_s": 0.05}}})
    daemon.wait_worker("tiny")
    out = tmp_path / "partial.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxrouter", "bench", "--base-url", f"{daemon.base_url}/v1",
         "--model", "tiny", "--concurrency", "1,1", "--requests", "1", "--max-tokens", "60",
         "--json", str(out), "--no-progress", "--no-warmup"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        # as from a terminal: a test run started in the background inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: daemon.worker_log("tiny").count("request started") == 2, 30,
             "the second level")
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted: the levels above are the ones that finished" in stdout
    report = json.loads(out.read_text())
    assert report["interrupted"] and len(report["levels"]) == 1
    assert report["levels"][0]["ok"] == 1


def test_timeout_bounds_a_whole_stream(start_daemon, tiny_model, tmp_path):
    """--timeout ("seconds per request") bounded each read only: a stream sending a token
    every 0.2 s ran its whole 4 s past a 1 s timeout and counted as ok."""
    daemon = start_daemon({"tiny": {"path": str(tiny_model), "preload": True,
                                    "fault": {"delay_per_token_s": 0.2}}})
    daemon.wait_worker("tiny")
    proc, report = bench(f"{daemon.base_url}/v1", tmp_path, "--model", "tiny", "--no-warmup",
                         "--concurrency", "1", "--requests", "1", "--max-tokens", "20",
                         "--timeout", "1", "--extra-body", '{"logit_bias": {"2": -100}}',
                         rc=1)
    (lv,) = report["levels"]
    assert lv["error_kinds"] == {"timeout (--timeout)": 1}, lv
    assert lv["latency_ms"]["p50"] is None or lv["latency_ms"]["p50"] < 2500
