#!/usr/bin/env python
"""mlxrouter's prefill attention and shared row kernels (mlx_ops.cpp) against MLX's own ops.

Each measurement runs in a fresh process with the environment mlxrouter gives its workers
(OpenBLAS with the gemv forwarder, mlxrouter's MLX kernels preloaded) in one of three
configurations: attention left to MLX (MLXROUTER_FAST_OPS_EXCEPT=attention: MLX's composed
CPU fallback, on mlxrouter's softmax), mlxrouter's attention on one thread
(MLXROUTER_ATTENTION_THREADS=1, which also keeps the softmax, normalization, SiLU and RoPE
rows on MLX's stream thread), and mlxrouter's on every core. Two shapes of SmolLM2-135M
(9 query heads sharing 3 key-value heads of 64, 30 layers): a batch of 8 prompts of --tokens
tokens, left-padded by a boolean mask as mlx-lm's batch cache masks them, and one prompt of
--long tokens with MLX's "causal" mask. It times the 30 layers' attentions of each; with
--model (a float32 mlx-lm model, such as the throughput benchmark's SmolLM2 copy in its work
directory) also the model's whole prefill of each shape. Runs alternate between the
configurations, round after round; cells are medians over rounds of each run's median.

Usage:
    .venv/bin/python benchmarks/prefill_ops.py [--tokens 131] [--long 2000] [--rounds 3]
        [--model DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_ops import measure, worker_env  # noqa: E402

CHILD = r"""
import json, statistics, sys, time
import numpy as np
import mlx.core as mx
short, long_, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
def arr(*shape):
    return mx.array(rng.standard_normal(shape).astype(np.float32))
pad = rng.integers(0, short // 4, 8)
keep = (np.arange(short)[:, None] >= np.arange(short)[None, :])[None, None] & (
    np.arange(short)[None, None, None, :] >= pad[:, None, None, None])
shapes = {"batch": (8, short, mx.array(keep)), "long": (1, long_, "causal")}
def median_ms(f, n):
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3
out = {}
for name, (B, T, mask) in shapes.items():
    layers = [(arr(B, 9, T, 64), arr(B, 3, T, 64), arr(B, 3, T, 64)) for _ in range(30)]
    mx.eval(layers)
    out[f"attention {name}"] = median_ms(lambda: mx.eval([
        mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
        for q, k, v in layers]), reps if name == "batch" else max(2, reps // 4))
    del layers
if len(sys.argv) > 4:  # whole prefills of a model
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache
    model, _ = load(sys.argv[4])
    for name, (B, T, _) in shapes.items():
        x = mx.array(rng.integers(100, 20_000, (B, T)))
        def prefill():
            cache = make_prompt_cache(model)
            model(x, cache=cache)
            mx.eval([c.state for c in cache])
        out[f"prefill {name}"] = median_ms(prefill, 5 if name == "batch" else 2)
print(json.dumps(out))
"""

CONFIGS = {"MLX's attention": {"MLXROUTER_FAST_OPS_EXCEPT": "attention"},
           "mlxrouter, 1 thread": {"MLXROUTER_ATTENTION_THREADS": "1"},
           "mlxrouter, every core": {}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=131, help="tokens of each of the 8 prompts")
    p.add_argument("--long", type=int, default=2000, help="tokens of the one long prompt")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--model", type=Path, help="a float32 mlx-lm model: also time prefills")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    workers = worker_env(Path(tempfile.mkdtemp(prefix="prefill-ops-")))
    runs: dict[str, dict[str, list[float]]] = {c: {} for c in CONFIGS}
    model = [str(args.model)] if args.model else []
    for r in range(args.rounds):
        for name in list(CONFIGS) if r % 2 == 0 else list(CONFIGS)[::-1]:
            got = measure(CHILD, [str(args.tokens), str(args.long), str(args.reps), *model],
                          workers, CONFIGS[name], timeout_s=900)
            for op, ms in got.items():
                runs[name].setdefault(op, []).append(ms)
            print(f"round {r + 1} {name}: {got}", file=sys.stderr)

    ops = list(runs["mlxrouter, every core"])
    label = {"attention batch": f"30 attentions, 8 × {args.tokens}",
             "attention long": f"30 attentions, 1 × {args.long}",
             "prefill batch": f"prefill, 8 × {args.tokens}",
             "prefill long": f"prefill, 1 × {args.long}"}
    print(f"\nSmolLM2-135M prefill shapes, {os.cpu_count()} cores; median of {args.rounds} "
          "rounds\n")
    print("| | " + " | ".join(label[op] for op in ops) + " |")
    print("|---|" + "---|" * len(ops))
    table = {name: {op: statistics.median(runs[name][op]) for op in ops} for name in CONFIGS}
    for name in CONFIGS:
        print(f"| {name} | " + " | ".join(f"{table[name][op]:.0f} ms" for op in ops) + " |")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median_ms": table}, indent=1))


if __name__ == "__main__":
    main()
