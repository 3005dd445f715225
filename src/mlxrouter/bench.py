"""`mlxrouter bench`: a load generator for any OpenAI-compatible base URL.

Runs in the user's shell (or a benchmark script); imports no mlx, so it measures a server from
the outside exactly as a client sees it. Requests go out over async httpx and SSE is parsed by
hand, so every chunk is timed when its bytes arrive (the openai client would add its own
parsing between the wire and the clock).

Definitions (the same for every server measured):
- TTFT: request sent -> first chunk that carries content (or reasoning) text.
- ITL (inter-token latency): a stream's decode time (first to last content chunk) divided by
  its completion tokens minus one; a server may pack several tokens into one chunk, so gaps
  between chunks alone would overstate it. `tokens/s per stream` is its inverse.
- Aggregate tokens/s: completion tokens of every successful request in a level / the level's
  wall time (first request sent -> last response done).
- Completion tokens come from `usage` (stream_options.include_usage); a server that sends no
  usage is counted one token per content chunk.
- Errors: an HTTP status >= 400 (kind `<status> <code>`), an error event inside a stream
  (`stream <code>`), a stream cut short (`stream ended without [DONE]`), a body that is not
  JSON (`invalid JSON`), or a transport failure (`transport <ExceptionName>`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

import httpx
import msgspec

_WORDS = ("the river light house stone garden window music paper silver morning winter "
          "city bridge forest ocean mountain letter story table friend market village "
          "summer evening number orange yellow castle dragon candle island harbor train "
          "station doctor teacher kitchen bottle coffee bread apple cloud thunder rain "
          "garden planet rocket engine signal pocket ladder mirror basket feather pencil "
          "blanket lantern compass anchor meadow valley canyon desert glacier").split()


class BenchConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One benchmark run: what to send, how hard, and where."""

    base_url: str  # as the openai client's base_url, e.g. http://127.0.0.1:8800/v1
    model: str
    concurrency: tuple[int, ...] = (1, 4, 8)
    # Requests per concurrency level; 0 = twice the level.
    requests: int = 0
    prompt_tokens: int = 128
    max_tokens: int = 64
    stream: bool = True
    endpoint: Literal["chat", "completions"] = "chat"
    temperature: float = 0.0
    api_key: str | None = None
    timeout_s: float = 600.0
    # Merged into every request body (e.g. logit_bias to keep a model from stopping early).
    extra_body: dict[str, Any] = {}
    # Multi-turn scenario: a conversation history of about this many tokens; 0 = skip.
    history_tokens: int = 0
    history_reps: int = 3
    # Mixed into every prompt, so runs never hit each other's prompt caches.
    salt: str = ""
    # One short request before the levels, so that none of them measures a model's load.
    warmup: bool = True


class RequestResult(msgspec.Struct, kw_only=True):
    ok: bool
    error: str = ""
    ttft_s: float | None = None
    latency_s: float = 0.0
    decode_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int = 0
    content_chunks: int = 0
    text: str = ""
    # A non-streaming response's Server-Timing (mlxrouter: queue, worker, total), in ms.
    server_timing: dict[str, float] = {}

    @property
    def itl_s(self) -> float | None:
        if self.decode_s is None or self.completion_tokens < 2 or self.decode_s <= 0:
            return None
        return self.decode_s / (self.completion_tokens - 1)


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, count)))


def make_prompt(index: int, tokens: int, salt: str = "") -> str:
    """About `tokens` tokens of plain words (one word is about one BPE token), opening with a
    tag unique to (salt, index), for /v1/completions."""
    rng = random.Random(f"{salt}:{index}")
    return f"[{salt}{index:05d}] Continue this list: " + _words(rng, tokens - 15)


def make_messages(index: int, tokens: int, salt: str = "") -> list[dict[str, str]]:
    """A chat of about `tokens` tokens once templated. The unique tag opens the system
    message, so the prompt differs from every other request's right after the template's
    first marker: a server's prompt cache cannot shorten the prefill of a fresh request."""
    rng = random.Random(f"{salt}:{index}")
    return [{"role": "system", "content": f"[{salt}{index:05d}] You are a helpful assistant."},
            {"role": "user", "content": "Continue this list: " + _words(rng, tokens - 32)}]


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _error_kind(status: int, body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        err = None
    code = (err.get("code") or err.get("type") or "") if isinstance(err, dict) else ""
    return f"{status} {code}".strip()


class Client:
    """Sends one request and times it; never raises for a server's or a network's failure."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        limits = httpx.Limits(max_connections=max((*config.concurrency, 1)) + 2)
        self.http = httpx.AsyncClient(base_url=config.base_url.rstrip("/"), headers=headers,
                                      timeout=config.timeout_s, limits=limits)

    async def aclose(self) -> None:
        await self.http.aclose()

    def request(self, index: int) -> dict[str, Any]:
        """The body of the load levels' request number `index`."""
        cfg = self.config
        prompt = (make_messages(index, cfg.prompt_tokens, cfg.salt) if cfg.endpoint == "chat"
                  else make_prompt(index, cfg.prompt_tokens, cfg.salt))
        return self.body(prompt, cfg.max_tokens, cfg.stream)

    def body(self, prompt: str | list[dict[str, Any]], max_tokens: int,
             stream: bool) -> dict[str, Any]:
        cfg = self.config
        body: dict[str, Any] = {"model": cfg.model, "max_tokens": max_tokens,
                                "temperature": cfg.temperature, "stream": stream}
        if cfg.endpoint == "chat":
            body["messages"] = (prompt if isinstance(prompt, list)
                                else [{"role": "user", "content": prompt}])
        else:
            body["prompt"] = prompt
        if stream:
            body["stream_options"] = {"include_usage": True}
        return {**body, **cfg.extra_body}

    async def send(self, body: dict[str, Any]) -> RequestResult:
        path = "/chat/completions" if self.config.endpoint == "chat" else "/completions"
        started = time.perf_counter()
        try:
            # the whole request, a stream's every event included (httpx's timeout is per read)
            async with asyncio.timeout(self.config.timeout_s):
                if body.get("stream"):
                    result = await self._stream(path, body, started)
                else:
                    result = await self._whole(path, body)
        except httpx.HTTPError as exc:
            result = RequestResult(ok=False, error=f"transport {type(exc).__name__}")
        except TimeoutError:
            result = RequestResult(ok=False, error="timeout (--timeout)")
        except ValueError:  # a body or an SSE event that is not JSON
            result = RequestResult(ok=False, error="invalid JSON")
        result.latency_s = time.perf_counter() - started
        return result

    async def _whole(self, path: str, body: dict[str, Any]) -> RequestResult:
        resp = await self.http.post(path, json=body)
        if resp.status_code >= 400:
            return RequestResult(ok=False, error=_error_kind(resp.status_code, resp.content))
        data = resp.json()
        result = RequestResult(ok=True,
                               server_timing=server_timing(resp.headers.get("server-timing")))
        choice = (data.get("choices") or [{}])[0]
        result.text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
        _apply_usage(result, data.get("usage"))
        return result

    async def _stream(self, path: str, body: dict[str, Any], started: float) -> RequestResult:
        result = RequestResult(ok=True)
        first = last = None
        done = False
        pieces: list[str] = []
        async with self.http.stream("POST", path, json=body) as resp:
            if resp.status_code >= 400:
                return RequestResult(ok=False,
                                     error=_error_kind(resp.status_code, await resp.aread()))
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                event = json.loads(payload)
                if "error" in event:
                    err = event["error"] if isinstance(event["error"], dict) else {}
                    result.ok = False
                    result.error = f"stream {err.get('code') or err.get('type') or 'error'}"
                    break
                text = _chunk_text(event)
                if text:
                    first = first if first is not None else now
                    last = now
                    result.content_chunks += 1
                    pieces.append(text)
                if event.get("usage"):
                    _apply_usage(result, event["usage"])
        if result.ok and not done:  # the stream ended early, without an error event
            result.ok, result.error = False, "stream ended without [DONE]"
        result.text = "".join(pieces)
        if first is not None:
            result.ttft_s = first - started
            result.decode_s = last - first
        if not result.completion_tokens:
            result.completion_tokens = result.content_chunks
        return result


def server_timing(header: str | None) -> dict[str, float]:
    """`Server-Timing: queue;dur=0.05, worker;dur=81.2` as {"queue": 0.05, ...} (ms);
    entries without a duration are left out."""
    out: dict[str, float] = {}
    for entry in (header or "").split(","):
        name, *params = (p.strip() for p in entry.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if name and key.strip() == "dur":
                try:
                    out[name] = float(value.strip().strip('"'))
                except ValueError:
                    pass
    return out


def _chunk_text(event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    if delta is not None:
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


def _apply_usage(result: RequestResult, usage: dict[str, Any] | None) -> None:
    if not usage:
        return
    result.completion_tokens = int(usage.get("completion_tokens") or 0)
    result.prompt_tokens = usage.get("prompt_tokens")
    details = usage.get("prompt_tokens_details") or {}
    result.cached_tokens = details.get("cached_tokens")


def _ms(values: list[float]) -> dict[str, float | None]:
    def r(v: float | None) -> float | None:
        return round(v * 1000, 2) if v is not None else None

    return {"p50": r(percentile(values, 50)), "p99": r(percentile(values, 99)),
            "mean": r(statistics.fmean(values)) if values else None}


def summarize_level(concurrency: int, results: list[RequestResult], wall_s: float
                    ) -> dict[str, Any]:
    """One concurrency level's figures, as they appear in the JSON report."""
    ok = [r for r in results if r.ok]
    completion = sum(r.completion_tokens for r in ok)
    per_stream = [1 / r.itl_s for r in ok if r.itl_s]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": dict(Counter(r.error for r in results if not r.ok)),
        "wall_s": round(wall_s, 3),
        "prompt_tokens_mean": _mean([r.prompt_tokens for r in ok]),
        "cached_tokens_mean": _mean([r.cached_tokens for r in ok]),
        "completion_tokens": completion,
        "ttft_ms": _ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": _ms([r.itl_s for r in ok if r.itl_s]),
        "latency_ms": _ms([r.latency_s for r in ok]),
        "stream_tok_s": {"p50": _round(percentile(per_stream, 50)),
                         "mean": _round(statistics.fmean(per_stream) if per_stream else None)},
        "aggregate_tok_s": round(completion / wall_s, 2) if wall_s > 0 else None,
    }


def _round(value: float | None, digits: int = 2) -> float | None:
    return round(value, digits) if value is not None else None


def _mean(values: list[int | None]) -> float | None:
    """Mean of the values a server reported (None where it did not report one)."""
    known = [v for v in values if v is not None]
    return round(statistics.fmean(known), 1) if known else None


async def run_level(client: Client, concurrency: int, count: int, offset: int,
                    tick: Callable[[], None]) -> dict[str, Any]:
    """`count` requests, `concurrency` at a time (closed loop: each stream sends its next
    request as soon as its last one ends)."""
    indices = iter(range(offset, offset + count))
    results: list[RequestResult] = []

    async def stream_loop() -> None:
        for index in indices:
            results.append(await client.send(client.request(index)))
            tick()

    started = time.perf_counter()
    await asyncio.gather(*(stream_loop() for _ in range(concurrency)))
    return summarize_level(concurrency, results, time.perf_counter() - started)


def make_history(tokens: int, salt: str) -> list[dict[str, str]]:
    """A user/assistant conversation of about `tokens` tokens, opening with a unique tag."""
    turns = max(1, tokens // 100)
    messages = [{"role": "system", "content": f"[{salt}] You are a helpful assistant."}]
    for i in range(turns):
        messages.append({"role": "user", "content": make_prompt(i, 50, f"{salt}u")})
        messages.append({"role": "assistant", "content": make_prompt(i, 40, f"{salt}a")})
    return messages


async def run_multiturn(client: Client, tick: Callable[[], None]) -> dict[str, Any]:
    """TTFT of a cold request with a long history vs the next turn of that conversation,
    which a server with a prompt cache answers from the cached history."""
    cfg = client.config
    cold: list[RequestResult] = []
    warm: list[RequestResult] = []
    for rep in range(cfg.history_reps):
        messages = make_history(cfg.history_tokens, f"{cfg.salt}h{rep}-")
        messages.append({"role": "user", "content": "Summarise the list in one line."})
        first = await client.send(client.body(messages, cfg.max_tokens, True))
        tick()
        cold.append(first)
        messages += [{"role": "assistant", "content": first.text},
                     {"role": "user", "content": "Now name three more items."}]
        warm.append(await client.send(client.body(messages, cfg.max_tokens, True)))
        tick()
    cold_ttft = [r.ttft_s for r in cold if r.ok and r.ttft_s is not None]
    warm_ttft = [r.ttft_s for r in warm if r.ok and r.ttft_s is not None]
    c50, w50 = percentile(cold_ttft, 50), percentile(warm_ttft, 50)
    everything = cold + warm
    return {
        "history_tokens": cfg.history_tokens,
        "reps": cfg.history_reps,
        "errors": sum(not r.ok for r in everything),
        "error_kinds": dict(Counter(r.error for r in everything if not r.ok)),
        # of the next turn: the history, the first answer and the new question
        "prompt_tokens_mean": _mean([r.prompt_tokens for r in warm]),
        "cached_tokens_mean": _mean([r.cached_tokens for r in warm]),
        "cold_ttft_ms": _ms(cold_ttft),
        "next_turn_ttft_ms": _ms(warm_ttft),
        "next_turn_over_cold": round(w50 / c50, 3) if c50 and w50 is not None else None,
    }


def level_sizes(config: BenchConfig) -> list[tuple[int, int]]:
    return [(c, config.requests or 2 * c) for c in config.concurrency]


async def run_bench(config: BenchConfig, progress: bool = False) -> dict[str, Any]:
    """The whole run: every concurrency level in order, then the multi-turn scenario."""
    from tqdm import tqdm

    sizes = level_sizes(config)
    total = sum(n for _, n in sizes) + (2 * config.history_reps if config.history_tokens else 0)
    bar = tqdm(total=total, disable=not progress, unit="req", file=sys.stderr,
               dynamic_ncols=True)
    client = Client(config)
    report: dict[str, Any] = {
        "base_url": config.base_url, "model": config.model,
        "settings": msgspec.to_builtins(config, builtin_types=None) | {"api_key": None},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "levels": [],
    }
    try:
        if config.warmup:
            bar.set_description("warm-up")
            warm = await client.send(client.body(f"Say hello. {config.salt}", 1, False))
            report["warmup"] = {"ok": warm.ok, "error": warm.error,
                                "latency_ms": round(warm.latency_s * 1000, 1)}
        offset = 0
        for concurrency, count in sizes:
            bar.set_description(f"concurrency {concurrency}")
            report["levels"].append(await run_level(client, concurrency, count, offset,
                                                    bar.update))
            offset += count
        if config.history_tokens:
            bar.set_description("multi-turn")
            report["multiturn"] = await run_multiturn(client, bar.update)
    except asyncio.CancelledError:  # Ctrl-C (asyncio.run cancels this task): keep what ran
        report["interrupted"] = True
    finally:
        bar.close()
        await client.aclose()
    report["errors"] = sum(lv["errors"] for lv in report["levels"]) + report.get(
        "multiturn", {}).get("errors", 0)
    return report


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def format_table(report: dict[str, Any]) -> str:
    """The report as markdown tables (readable in a terminal, pasteable into docs)."""
    head = ("| concurrency | requests | errors | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
            "| ITL p99 ms | tok/s per stream p50 | aggregate tok/s | wall s |")
    lines = [f"{report['model']} @ {report['base_url']}", ""]
    warm = report.get("warmup")
    if warm:  # its time includes the model's load when it was not loaded yet
        lines += [f"warm-up request: {warm['latency_ms']} ms"
                  + ("" if warm["ok"] else f" ({warm['error']})"), ""]
    lines += [head, "|" + "---|" * 10]
    for lv in report["levels"]:
        lines.append("| " + " | ".join(_cell(v) for v in (
            lv["concurrency"], lv["requests"], lv["errors"], lv["ttft_ms"]["p50"],
            lv["ttft_ms"]["p99"], lv["itl_ms"]["p50"], lv["itl_ms"]["p99"],
            lv["stream_tok_s"]["p50"], lv["aggregate_tok_s"], lv["wall_s"])) + " |")
    kinds = Counter()
    for lv in report["levels"]:
        kinds.update(lv["error_kinds"])
    mt = report.get("multiturn")
    if mt:
        kinds.update(mt["error_kinds"])
        lines += ["", "| history tokens | next-turn prompt tokens | cold TTFT p50 ms "
                  "| next-turn TTFT p50 ms | ratio | cached tokens |", "|---|---|---|---|---|---|",
                  "| " + " | ".join(_cell(v) for v in (
                      mt["history_tokens"], mt["prompt_tokens_mean"],
                      mt["cold_ttft_ms"]["p50"], mt["next_turn_ttft_ms"]["p50"],
                      mt["next_turn_over_cold"], mt["cached_tokens_mean"])) + " |"]
    if kinds:
        lines += ["", "errors: " + ", ".join(f"{k} x{n}" for k, n in kinds.most_common())]
    if report.get("interrupted"):
        lines += ["", "interrupted: the levels above are the ones that finished"]
    return "\n".join(lines)


# ---- command line


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be integers >= 1")
    return levels


def _checked(convert: Callable[[str], Any], what: str, ok: Callable[[Any], bool],
             says: str) -> Callable[[str], Any]:
    """An argparse type: `convert` the text (else "not <what>"), refused with `says` unless
    `ok` (written so that nan fails it)."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(says)
        return value
    return parse


_non_negative = _checked(int, "an integer", lambda v: v >= 0, "must be >= 0")
_positive = _checked(int, "an integer", lambda v: v >= 1, "must be >= 1")
_seconds = _checked(float, "a number", lambda v: v > 0, "must be > 0")
# (nan and inf too: such a request could not even be written)
_temperature = _checked(float, "a number", lambda v: 0 <= v <= 2, "must be 0 to 2")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="load-test any OpenAI-compatible server",
                       description="Load-test an OpenAI-compatible server: TTFT, inter-token "
                                   "latency, tokens/s per stream and aggregate, errors.")
    p.add_argument("--base-url", default="http://127.0.0.1:8800/v1",
                   help="the API's base URL, as the openai client takes it (default: %(default)s)")
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=_levels, default=(1, 4, 8),
                   help="comma-separated levels (default: 1,4,8)")
    p.add_argument("--requests", type=_non_negative, default=0,
                   help="requests per level (default: twice the level)")
    p.add_argument("--prompt-tokens", type=_positive, default=128,
                   help="about this many prompt tokens; a chat's template and its unique "
                        "system message make up about 40 of them, the least there can be")
    p.add_argument("--max-tokens", type=_positive, default=64)
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="non-streaming requests (no TTFT or ITL)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--temperature", type=_temperature, default=0.0)
    p.add_argument("--history-tokens", type=_non_negative, default=0,
                   help="also run the multi-turn scenario with about this much history")
    p.add_argument("--history-reps", type=_positive, default=3)
    p.add_argument("--extra-body", type=_json_object, default={},
                   help="JSON merged into every request body")
    p.add_argument("--api-key")
    p.add_argument("--timeout", type=_seconds, default=600.0,
                   help="seconds per request, a stream's whole answer included")
    p.add_argument("--json", dest="json_path", help="also write the JSON report here")
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="what goes to stdout (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="no request before the levels (the first level may then include "
                        "the model's load)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.history_tokens and args.endpoint != "chat":
        print("mlxrouter bench: --history-tokens needs --endpoint chat", file=sys.stderr)
        return 2
    if args.requests and args.requests < max(args.concurrency):
        print(f"mlxrouter bench: --requests {args.requests} is fewer than the concurrency "
              f"level {max(args.concurrency)}: that level would never run as many streams "
              f"at once", file=sys.stderr)
        return 2
    if args.extra_body.get("n", 1) != 1 or args.extra_body.get("best_of", 1) != 1:
        # usage counts every choice's tokens while the timing follows the first one
        print("mlxrouter bench: --extra-body may not set n or best_of: the figures are per "
              "choice of one-choice requests", file=sys.stderr)
        return 2
    config = BenchConfig(
        base_url=args.base_url, model=args.model, concurrency=args.concurrency,
        requests=args.requests, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
        stream=args.stream, endpoint=args.endpoint, temperature=args.temperature,
        api_key=args.api_key, timeout_s=args.timeout, extra_body=args.extra_body,
        history_tokens=args.history_tokens, history_reps=args.history_reps,
        salt=f"{random.randrange(16**6):06x}", warmup=args.warmup)
    if args.json_path:  # found out now, not after the whole run
        folder = os.path.dirname(os.path.abspath(args.json_path))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK) or (
                os.path.isdir(args.json_path)):
            print(f"mlxrouter bench: cannot write the JSON report to {args.json_path}",
                  file=sys.stderr)
            return 2
    try:
        report = asyncio.run(run_bench(config, progress=args.progress))
    except KeyboardInterrupt:  # interrupted before anything could be kept
        print("mlxrouter bench: interrupted", file=sys.stderr)
        return 130
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    if args.json_path:
        try:
            with open(args.json_path, "w") as f:
                json.dump(report, f, indent=2)
        except OSError as exc:
            print(f"mlxrouter bench: cannot write {args.json_path}: {exc}", file=sys.stderr)
            return 1
    if report.get("interrupted"):
        return 130
    # A run where nothing succeeded measured nothing: scripts must be able to tell.
    if report["levels"] and not any(lv["ok"] for lv in report["levels"]):
        print(f"mlxrouter bench: every request failed ({report['errors']} errors)",
              file=sys.stderr)
        return 1
    return 0
