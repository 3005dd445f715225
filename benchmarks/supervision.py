#!/usr/bin/env python
"""Supervision benchmark against real processes.

Starts the real `mlxrouter serve` daemon as a subprocess (through the test suite's
`spawn_daemon`), with real worker processes serving tiny random-weight llama models built
offline (`tests/tinymodel.py`), and measures:

1. Crash recovery: SIGKILL a worker mid-stream; time from the kill to the streaming client's
   error, and from the kill to the next (non-streaming) request completing, which includes the
   respawn and model load.
2. Hot-swap: two models, a memory budget that fits only one; request A, B, A, ... and time each
   request that forces a swap, vs. a request to the already-loaded model.
3. The daemon's resident memory (RSS, and PSS/USS on Linux) with no model loaded and after
   serving; the worker's for reference.

Usage:
    .venv/bin/python benchmarks/supervision.py [--kills 5] [--swaps 6] [--serve 50]
                                               [--out results.md] [--json results.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

import openai  # noqa: E402
import psutil  # noqa: E402
from cpuinfo import describe_cpu  # noqa: E402
from conftest import Daemon, spawn_daemon, wait_for_gone, write_config  # noqa: E402
from tinymodel import build_tiny_llama  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse."}]
# Slows every engine step so a stream lasts long enough to be killed midway.
SLOW_FAULT = {"delay_per_token_s": 0.03}
# The supervisor marks a model FATAL after more than this many unexpected exits in 10 min
# (mlxrouter.states.CRASH_LOOP_EXITS); kills are spread over fresh daemons to stay under it.
KILLS_PER_DAEMON = 5
LIVE = ("STARTING", "RUNNING", "DRAINING", "STOPPING")
MB = 1024 * 1024


# ---------------------------------------------------------------- helpers

def now() -> float:
    return time.perf_counter()


def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None, "values": []}
    return {"n": len(values), "median": statistics.median(values), "min": min(values),
            "max": max(values), "values": values}


def mem_of(pid: int) -> dict[str, int | None]:
    proc = psutil.Process(pid)
    out: dict[str, int | None] = {"rss": proc.memory_info().rss, "pss": None, "uss": None}
    if sys.platform.startswith("linux"):
        try:
            full = proc.memory_full_info()
            out["pss"] = getattr(full, "pss", None)
            out["uss"] = getattr(full, "uss", None)
        except (psutil.AccessDenied, OSError):
            pass
    return out


LINUX = sys.platform.startswith("linux")


def clock() -> float:
    """The clock `spawned_at` is on: seconds since boot on Linux (what /proc/PID/stat uses)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if LINUX else time.time()


def spawned_at(pid: int) -> float:
    """When the process was created, on `clock()` (Linux: clock-tick, i.e. 10 ms, resolution).

    psutil's create_time() adds the boot time, which /proc/stat gives in whole seconds, so it
    is not comparable with time.time() to better than a second; the raw start time is.
    """
    if LINUX:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    return psutil.Process(pid).create_time()


def watch_exit(pid: int) -> tuple[threading.Thread, list[float]]:
    """A thread that records (on `clock()`) when `pid` exits (turns zombie or disappears)."""
    when: list[float] = []

    def poll() -> None:
        try:
            proc = psutil.Process(pid)
            while proc.status() != psutil.STATUS_ZOMBIE:
                time.sleep(0.005)
        except psutil.NoSuchProcess:
            pass
        when.append(clock())

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    return thread, when


def chat(client: openai.OpenAI, model: str, max_tokens: int) -> Any:
    resp = client.chat.completions.create(model=model, messages=MESSAGES,
                                          max_tokens=max_tokens)
    if resp.usage is None or resp.usage.completion_tokens != max_tokens:
        raise RuntimeError(f"unexpected response from {model}: {resp}")
    return resp


def live_models(daemon: Daemon) -> set[str]:
    return {m for m, w in daemon.workers().items() if w["state"] in LIVE}


class Harness:
    """Starts daemons under one temp dir and guarantees every process is gone at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemons: list[Daemon] = []

    def start(self, models: dict[str, dict[str, Any]], **sections: Any) -> Daemon:
        root = self.root / f"d{len(self.daemons)}"
        (root / "models").mkdir(parents=True)
        config = write_config(root, models=models, **sections)
        daemon = spawn_daemon(root, config)
        self.daemons.append(daemon)
        return daemon

    def stop(self, daemon: Daemon) -> None:
        try:
            daemon.stop()
        finally:
            leftovers = wait_for_gone(daemon)  # kills any worker still there
            if leftovers:
                print(f"warning: killed leftover workers {[p.pid for p in leftovers]}",
                      file=sys.stderr)

    def close(self) -> None:
        for daemon in self.daemons:
            try:
                self.stop(daemon)
            except Exception as exc:  # keep cleaning up the others
                print(f"warning: cleanup of daemon {daemon.proc.pid}: {exc!r}", file=sys.stderr)
                if daemon.proc.poll() is None:
                    daemon.proc.kill()
                    daemon.proc.wait()


# ---------------------------------------------------------------- benchmarks

def bench_kill(h: Harness, model_path: Path, kills: int, results: dict[str, Any]) -> None:
    error_s: list[float] = []
    recover_s: list[float] = []
    load_s: list[float] = []
    chunks_received: list[int] = []
    warm_s: list[float] = []
    to_spawn_s: list[float] = []
    spawn_to_ok_s: list[float] = []
    memory: dict[str, Any] = {}
    done = 0
    while done < kills:
        daemon = h.start({"tiny": {"path": str(model_path), "fault": SLOW_FAULT}},
                         supervisor={"silence_timeout_s": 2.0})
        try:
            if not memory:
                memory["daemon_idle"] = mem_of(daemon.proc.pid)
            client = daemon.openai()
            chat(client, "tiny", 1)  # cold start
            for _ in range(3):  # steady-state latency of the same request, worker warm
                t0 = now()
                chat(client, "tiny", 1)
                warm_s.append(now() - t0)
            for _ in range(min(KILLS_PER_DAEMON, kills - done)):
                stream = iter(client.chat.completions.create(
                    model="tiny", messages=MESSAGES, max_tokens=1000, stream=True))
                seen = 0
                while seen < 3:  # role chunk + a couple of tokens: generation is under way
                    next(stream)
                    seen += 1
                pid = daemon.worker_pid("tiny")
                assert pid, "no running worker to kill"
                t_kill = now()
                os.kill(pid, signal.SIGKILL)
                try:
                    for _ in stream:
                        seen += 1
                except openai.APIError as exc:
                    t_err = now()
                    if "exited unexpectedly" not in str(exc.message):
                        raise RuntimeError(f"unexpected stream error: {exc.message}") from exc
                else:
                    raise RuntimeError("the stream ended without an error after SIGKILL")
                wall_req = clock()
                chat(client, "tiny", 1)
                t_ok = now()
                wall_ok = clock()
                new = daemon.workers()["tiny"]
                if new["pid"] in (None, pid):
                    raise RuntimeError(f"worker was not replaced: {new}")
                born = spawned_at(new["pid"])
                to_spawn_s.append(max(0.0, born - wall_req))
                spawn_to_ok_s.append(wall_ok - born)
                error_s.append(t_err - t_kill)
                recover_s.append(t_ok - t_kill)
                chunks_received.append(seen)
                if new.get("load_s") is not None:
                    load_s.append(float(new["load_s"]))
                done += 1
            if "daemon_after" not in memory:  # the first daemon: 4 + 2 per kill requests
                memory["requests_served"] = 4 + 2 * min(KILLS_PER_DAEMON, kills)
                memory["daemon_after"] = mem_of(daemon.proc.pid)
                memory["worker"] = mem_of(daemon.worker_pid("tiny"))
        finally:
            h.stop(daemon)
    results["kill"] = {
        "error_s": summary(error_s), "recover_s": summary(recover_s),
        "worker_load_s": summary(load_s), "warm_request_s": summary(warm_s),
        "request_to_spawn_s": summary(to_spawn_s), "spawn_to_response_s": summary(spawn_to_ok_s),
        "chunks_received": chunks_received,
    }
    results["memory_kill_daemon"] = memory


def bench_swap(h: Harness, paths: tuple[Path, Path], swaps: int, serve: int,
               results: dict[str, Any]) -> None:
    base = {"required_memory_gb": 1.0, "safety_margin": 1.0}
    daemon = h.start({"a": {"path": str(paths[0]), **base}, "b": {"path": str(paths[1]), **base}},
                     supervisor={"memory_budget_gb": 1.5})
    memory: dict[str, Any] = {}
    try:
        memory["daemon_idle"] = mem_of(daemon.proc.pid)
        client = daemon.openai()
        t0 = now()
        chat(client, "a", 1)
        cold_s = now() - t0
        cold_load = daemon.workers()["a"].get("load_s")
        swap_s: list[float] = []
        load_s: list[float] = []
        warm_s: list[float] = []
        evict_s: list[float] = []
        gap_s: list[float] = []
        start_s: list[float] = []
        current = "a"
        for _ in range(swaps):
            target = "b" if current == "a" else "a"
            old_pid = daemon.worker_pid(current)
            assert old_pid, f"{current} is not running"
            watcher, exited = watch_exit(old_pid)
            wall0 = clock()
            t0 = now()
            chat(client, target, 1)
            swap_s.append(now() - t0)
            wall_done = clock()
            watcher.join(5)
            status = daemon.workers()
            born = spawned_at(status[target]["pid"])
            if exited:
                evict_s.append(exited[0] - wall0)
                gap_s.append(max(0.0, born - exited[0]))
            start_s.append(wall_done - born)
            if live_models(daemon) != {target}:
                raise RuntimeError(f"both models loaded, the budget was not enforced: {status}")
            if status[target].get("load_s") is not None:
                load_s.append(float(status[target]["load_s"]))
            t0 = now()
            chat(client, target, 1)
            warm_s.append(now() - t0)
            current = target
        for i in range(serve):  # more traffic before "after serving": half of it streamed
            if i % 2:
                chunks = list(client.chat.completions.create(
                    model=current, messages=MESSAGES, max_tokens=8, stream=True))
                if not chunks:
                    raise RuntimeError("empty stream")
            else:
                chat(client, current, 8)
        memory["daemon_after"] = mem_of(daemon.proc.pid)
        memory["worker"] = mem_of(daemon.worker_pid(current))
        memory["requests_served"] = 1 + 2 * swaps + serve
        results["swap"] = {
            "cold_first_request_s": cold_s, "cold_worker_load_s": cold_load,
            "swap_request_s": summary(swap_s), "swap_worker_load_s": summary(load_s),
            "evict_s": summary(evict_s), "exit_to_spawn_s": summary(gap_s),
            "spawn_to_response_s": summary(start_s),
            "warm_request_s": summary(warm_s),
        }
        results["memory_swap_daemon"] = memory
    finally:
        h.stop(daemon)


# ---------------------------------------------------------------- report

def machine() -> dict[str, Any]:
    cpu = describe_cpu()

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "n/a"

    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu": cpu, "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": platform.python_version(), "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"), "mlxrouter": version("mlxrouter"),
    }


def ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.0f}"


def row(label: str, s: dict[str, Any]) -> str:
    return f"| {label} | {s['n']} | {ms(s['median'])} | {ms(s['min'])} | {ms(s['max'])} |"


def mb(x: int | None) -> str:
    return "n/a" if x is None else f"{x / MB:.1f}"


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        "# mlxrouter supervision benchmark",
        "",
        f"- date: {m['date']}",
        f"- machine: {m['cpu']}, {m['logical_cores']} logical / {m['physical_cores']} "
        f"physical cores, {m['ram_gb']} GiB RAM, {m['os']}",
        f"- versions: python {m['python']}, mlx {m['mlx']}, mlx-lm {m['mlx_lm']}, "
        f"mlxrouter {m['mlxrouter']}",
        f"- models: tiny random-weight llama (2 layers, hidden 64); kill runs use a "
        f"{SLOW_FAULT['delay_per_token_s'] * 1000:.0f} ms/token fault delay; "
        f"all timed requests are non-streaming with max_tokens=1 unless noted",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"- total wall time: {results['wall_s']:.1f} s",
        "",
        "## Timings (ms)",
        "",
        "| measurement | n | median | min | max |",
        "|---|---|---|---|---|",
    ]
    k = results.get("kill")
    if k:
        out += [
            row("SIGKILL mid-stream → streaming client gets its error", k["error_s"]),
            row("SIGKILL → next request completes (respawn + load + 1 token)", k["recover_s"]),
            row("  request sent → replacement worker process created", k["request_to_spawn_s"]),
            row("  worker process created → response (interpreter + imports + load + token)",
                k["spawn_to_response_s"]),
            row("  of which: model load (worker-reported load_s)", k["worker_load_s"]),
            row("  reference: same request to a warm worker (with the fault delay)",
                k["warm_request_s"]),
        ]
    s = results.get("swap")
    if s:
        out += [
            row("swap request (evict loaded model, load the other, 1 token)",
                s["swap_request_s"]),
            row("  request sent → evicted worker has exited", s["evict_s"]),
            row("  evicted worker exited → new worker process created", s["exit_to_spawn_s"]),
            row("  new worker process created → response (interpreter + imports + load + "
                "token)", s["spawn_to_response_s"]),
            row("  of which: model load (worker-reported load_s)", s["swap_worker_load_s"]),
            row("request to the already-loaded model", s["warm_request_s"]),
            f"| first request after daemon start (cold load, nothing to evict) | 1 | "
            f"{ms(s['cold_first_request_s'])} | | |",
        ]
    out += ["", "## Memory (MiB)", "", "| process | when | RSS | PSS | USS |",
            "|---|---|---|---|---|"]
    for key, name in (("memory_kill_daemon", "crash-recovery daemon"),
                      ("memory_swap_daemon", "hot-swap daemon")):
        mem = results.get(key)
        if not mem:
            continue
        labels = {"daemon_idle": ("daemon", "started, no model loaded"),
                  "daemon_after": ("daemon", f"after serving {mem['requests_served']} "
                                             "requests"),
                  "worker": ("worker (tiny model)", "after serving")}
        for part, (proc, when) in labels.items():
            v = mem.get(part)
            if v:
                out.append(f"| {proc} ({name}) | {when} | {mb(v['rss'])} | {mb(v['pss'])} | "
                           f"{mb(v['uss'])} |")
    if k:
        out += ["", f"Kill runs: {k['error_s']['n']} (at most {KILLS_PER_DAEMON} per daemon, "
                f"to stay under the crash-loop limit); SSE chunks each killed stream "
                f"got in all (3 read before the kill): {k['chunks_received']}."]
    if s:
        out += [f"Swap runs: {s['swap_request_s']['n']} swaps (A→B→A…), budget 1.5 GB, each "
                f"model declares 1.0 GB × 1.0 safety margin (two different random models)."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5, help="SIGKILL repetitions (default 5)")
    parser.add_argument("--swaps", type=int, default=6, help="model swaps (default 6)")
    parser.add_argument("--serve", type=int, default=50,
                        help="extra requests (8 tokens, half streamed) the hot-swap daemon "
                             "serves before its 'after serving' memory reading (default 50)")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--json", type=Path, help="write raw results as JSON here")
    args = parser.parse_args(argv)

    started = now()
    results: dict[str, Any] = {"machine": machine(),
                               "params": {"kills": args.kills, "swaps": args.swaps,
                                          "serve": args.serve}}
    with tempfile.TemporaryDirectory(prefix="mlxrouter-bench-") as tmp:
        root = Path(tmp)
        print("building tiny models...", file=sys.stderr)
        model_a = build_tiny_llama(root / "models" / "tiny-a", seed=0)
        model_b = build_tiny_llama(root / "models" / "tiny-b", seed=1)
        h = Harness(root)
        try:
            if args.kills > 0:
                print(f"crash recovery: {args.kills} kills...", file=sys.stderr)
                bench_kill(h, model_a, args.kills, results)
            if args.swaps > 0:
                print(f"hot-swap: {args.swaps} swaps...", file=sys.stderr)
                bench_swap(h, (model_a, model_b), args.swaps, args.serve, results)
        finally:
            h.close()
    results["wall_s"] = now() - started

    report = render(results)
    print(report)
    if args.out:
        args.out.write_text(report)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
