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
    .venv/bin/python benchmarks/supervision.py [--kills 5] [--swaps 6]
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
import time
from importlib import metadata
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

import openai  # noqa: E402
import psutil  # noqa: E402
from conftest import Daemon, spawn_daemon, wait_for, wait_for_gone, write_config  # noqa: E402
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
    tokens_before_kill: list[int] = []
    warm_s: list[float] = []
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
                chat(client, "tiny", 1)
                t_ok = now()
                new = daemon.workers()["tiny"]
                if new["pid"] in (None, pid):
                    raise RuntimeError(f"worker was not replaced: {new}")
                error_s.append(t_err - t_kill)
                recover_s.append(t_ok - t_kill)
                tokens_before_kill.append(seen)
                if new.get("load_s") is not None:
                    load_s.append(float(new["load_s"]))
                done += 1
            if "daemon_after" not in memory:
                memory["daemon_after"] = mem_of(daemon.proc.pid)
                memory["worker"] = mem_of(daemon.worker_pid("tiny"))
        finally:
            h.stop(daemon)
    results["kill"] = {
        "error_s": summary(error_s), "recover_s": summary(recover_s),
        "worker_load_s": summary(load_s), "warm_request_s": summary(warm_s),
        "chunks_before_kill": tokens_before_kill,
    }
    results["memory_kill_daemon"] = memory


def bench_swap(h: Harness, paths: tuple[Path, Path], swaps: int,
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
        current = "a"
        for _ in range(swaps):
            target = "b" if current == "a" else "a"
            t0 = now()
            chat(client, target, 1)
            swap_s.append(now() - t0)
            status = daemon.workers()
            if live_models(daemon) != {target}:
                raise RuntimeError(f"both models loaded, the budget was not enforced: {status}")
            if status[target].get("load_s") is not None:
                load_s.append(float(status[target]["load_s"]))
            t0 = now()
            chat(client, target, 1)
            warm_s.append(now() - t0)
            current = target
        memory["daemon_after"] = mem_of(daemon.proc.pid)
        memory["worker"] = mem_of(daemon.worker_pid(current))
        results["swap"] = {
            "cold_first_request_s": cold_s, "cold_worker_load_s": cold_load,
            "swap_request_s": summary(swap_s), "swap_worker_load_s": summary(load_s),
            "warm_request_s": summary(warm_s),
        }
        results["memory_swap_daemon"] = memory
        results["swap_requests_served"] = 1 + 2 * swaps
    finally:
        h.stop(daemon)


# ---------------------------------------------------------------- report

def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

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


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
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
            row("  of which: replacement worker's model load (worker-reported load_s)",
                k["worker_load_s"]),
            row("  reference: same request to a warm worker", k["warm_request_s"]),
        ]
    s = results.get("swap")
    if s:
        out += [
            row("swap request (evict loaded model, load the other, 1 token)",
                s["swap_request_s"]),
            row("  of which: new worker's model load (worker-reported load_s)",
                s["swap_worker_load_s"]),
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
                  "daemon_after": ("daemon", "after serving"),
                  "worker": ("worker (tiny model)", "after serving")}
        for part, (proc, when) in labels.items():
            v = mem.get(part)
            if v:
                out.append(f"| {proc} ({name}) | {when} | {mb(v['rss'])} | {mb(v['pss'])} | "
                           f"{mb(v['uss'])} |")
    if k:
        out += ["", f"Kill runs: {k['error_s']['n']} (at most {KILLS_PER_DAEMON} per daemon, "
                f"to stay under the crash-loop limit); stream chunks received before each "
                f"kill: {k['chunks_before_kill']}."]
    if s:
        out += [f"Swap runs: {s['swap_request_s']['n']} swaps (A→B→A…), budget 1.5 GB, each "
                f"model declares 1.0 GB × 1.0 safety margin; "
                f"{results['swap_requests_served']} requests served by the swap daemon."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5, help="SIGKILL repetitions (default 5)")
    parser.add_argument("--swaps", type=int, default=6, help="model swaps (default 6)")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--json", type=Path, help="write raw results as JSON here")
    args = parser.parse_args(argv)

    started = now()
    results: dict[str, Any] = {"machine": machine(),
                               "params": {"kills": args.kills, "swaps": args.swaps}}
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
                bench_swap(h, (model_a, model_b), args.swaps, results)
        finally:
            h.close()
    results["wall_s"] = now() - started

    report = render(results, args)
    print(report)
    if args.out:
        args.out.write_text(report)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
