#!/usr/bin/env python
"""The one-sequence fast path (engine.Solo) against the same request as a batch of one.

Two TextEngines on the same model in one process (SmolLM2-135M-Instruct as float32, the
throughput benchmark's copy), one with `solo_fast_path = true` and one with `false`, answer
the same prompts in alternating pairs (the order flipping each pair), greedy, EOS suppressed
so every request decodes max_tokens. This machine's speed drifts by more than the difference
sought, so the figures are medians of per-pair ratios and differences. Runs in the workers'
environment (BLAS preload, MLX_DISABLE_COMPILE), re-executing itself with it.

Usage:
    .venv/bin/python benchmarks/fast_path.py [--pairs 40] [--max-tokens 48]
        [--prompt-tokens 128] [--work-dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def measure(model: Path, args: argparse.Namespace) -> dict:
    from mlxrouter import bench, protocol
    from mlxrouter.config import ModelSpec
    from mlxrouter.engine import FaultPlan, TextEngine

    out: list[protocol.Message] = []
    engines = {}
    for solo in (True, False):
        spec = ModelSpec(id="m", path=str(model), prompt_cache_bytes=0, solo_fast_path=solo)
        engines[solo] = TextEngine(spec, out.append, FaultPlan({}))
        engines[solo].load()
    eos = engines[True].tokenizer.eos_token_ids
    sampling = protocol.SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                       logit_bias={int(e): -100.0 for e in eos})

    def once(index: int, solo: bool) -> tuple[float, float]:
        """(seconds to the first token, decode tokens/s after it)."""
        engine = engines[solo]
        out.clear()
        started = time.perf_counter()
        engine.submit(protocol.Request(rid=index, sampling=sampling, messages=bench.make_messages(
            index, args.prompt_tokens, "fast-path")))
        times = []
        while engine.active:
            seen = len(out)
            engine.step()
            if any(isinstance(m, protocol.Step) for m in out[seen:]):
                times.append(time.perf_counter())
        if len(times) != args.max_tokens:
            raise RuntimeError(f"expected {args.max_tokens} tokens, got {len(times)}")
        return times[0] - started, (len(times) - 1) / (times[-1] - times[0])

    once(0, True)
    once(1, False)
    pairs = []
    for k in range(args.pairs):
        order = (True, False) if k % 2 == 0 else (False, True)
        pairs.append({solo: once(100 + 2 * k + solo, solo) for solo in order})

    def med(values: list[float], digits: int) -> float:
        return round(statistics.median(values), digits)

    ratios = [p[True][1] / p[False][1] for p in pairs]
    return {
        "pairs": args.pairs, "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens,
        "solo_decode_tok_s_p50": med([p[True][1] for p in pairs], 2),
        "batch_decode_tok_s_p50": med([p[False][1] for p in pairs], 2),
        "solo_over_batch_decode": med(ratios, 4),
        "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "solo_ttft_ms_p50": med([p[True][0] * 1000 for p in pairs], 1),
        "batch_ttft_ms_p50": med([p[False][0] * 1000 for p in pairs], 1),
        "solo_minus_batch_ttft_ms": med([(p[True][0] - p[False][0]) * 1000 for p in pairs], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the model copies go (default: a temporary directory)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model is None:  # the parent: prepare the model, then run in the workers' env
        import throughput

        work = args.work_dir or Path(tempfile.mkdtemp(prefix="mlxrouter-fast-path-"))
        work.mkdir(parents=True, exist_ok=True)
        _, f32 = throughput.prepare_model(work)
        env = throughput.env_for(f32, work)
        return subprocess.call([sys.executable, __file__, *(argv or sys.argv[1:]),
                                "--model", str(f32)], env={**os.environ, **env})
    result = measure(args.model, args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
