#!/usr/bin/env python
"""mlxrouter's decode attention and rotary embedding (mlx_ops.cpp) against MLX's own CPU ops.

Each measurement runs in a fresh process with the environment mlxrouter gives its workers
(OpenBLAS with the gemv forwarder, and mlxrouter's MLX kernels preloaded): once with these two
left to MLX (MLXROUTER_FAST_OPS_EXCEPT=attention,rope: MLX's composed CPU fallbacks, on
mlxrouter's softmax), and with them, the attention on 1 thread and on every core. It times
the ops of one
SmolLM2-135M decode step: 30 layers' attention of one query per head (9 query heads, 3
key-value heads of 64) against each layer's own keys and values (a cache of `--keys` keys,
sliced from a 256-key buffer as mlx-lm's cache is, left-padded by a boolean mask for a batch),
and the 60 rotary embeddings of the queries and keys. Every layer has its own cache, so the
keys and values stream from memory as in a real step. Runs alternate between the
configurations, round after round; cells are medians over rounds of each run's median step.

With --model (a float32 mlx-lm model, such as the throughput benchmark's SmolLM2 copy in
its work directory), each run also times whole decode steps of mlx-lm's BatchGenerator on that
model: the batch's prompts of --keys tokens, then the median of 40 steps after 10.

Usage:
    .venv/bin/python benchmarks/decode_ops.py [--batch 1,8] [--keys 200] [--rounds 3]
        [--model DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CHILD = r"""
import json, statistics, sys, time
import numpy as np
import mlx.core as mx
B, T, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
def arr(*shape):
    return mx.array(rng.standard_normal(shape).astype(np.float32))
layers = [(arr(B, 9, 1, 64), arr(B, 3, 256, 64), arr(B, 3, 256, 64), arr(B, 3, 1, 64))
          for _ in range(30)]
pad = rng.integers(0, T // 2, B) if B > 1 else np.zeros(1, int)
mask = mx.array(np.arange(T)[None, None, None, :] >= pad[:, None, None, None]) if B > 1 else None
offset = mx.array((T - pad).astype(np.int32)) if B > 1 else T
mx.eval(layers)
if mask is not None:
    mx.eval(mask)
def attention():
    return [mx.fast.scaled_dot_product_attention(q, k[:, :, :T], v[:, :, :T], scale=0.125,
                                                 mask=mask) for q, k, v, _ in layers]
def rope():
    return [mx.fast.rope(x, 64, traditional=False, base=10000.0, scale=1.0, offset=offset)
            for q, _, _, kx in layers for x in (q, kx)]
out = {}
if len(sys.argv) > 4:  # whole decode steps of a model
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator
    model, _ = load(sys.argv[4])
    gen = BatchGenerator(model, stop_tokens=set(), max_tokens=10_000)
    gen.insert([[(7 * i + 13 * j) % 20_000 + 100 for j in range(T)] for i in range(B)],
               max_tokens=[10_000] * B)
    while not any(r for r in gen.next()):  # until the prompts are in
        pass
    times = []
    for i in range(50):
        t = time.perf_counter()
        gen.next()
        times.append(time.perf_counter() - t)
    out["step"] = statistics.median(times[10:]) * 1e3
for name, f in (("attention", attention), ("rope", rope)):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(f())
        times.append(time.perf_counter() - t)
    out[name] = statistics.median(times[1:]) * 1e3
print(json.dumps(out))
"""

CONFIGS = {"MLX's own": {"MLXROUTER_FAST_OPS_EXCEPT": "attention,rope"},
           "mlxrouter, 1 thread": {"MLXROUTER_ATTENTION_THREADS": "1"},
           "mlxrouter, every core": {}}


def worker_env(work: Path) -> dict[str, str]:
    """The environment mlxrouter's workers get (preloads, MLX_DISABLE_COMPILE)."""
    from mlxrouter.config import load_config, worker_environment

    cfg = work / "bench.toml"
    cfg.write_text(f"[supervisor]\nrun_dir = {json.dumps(str(work / 'run'))}\n")
    config = load_config(cfg)
    env = worker_environment(config, config.spec_for("m", str(work)))
    if "libmlxrouter-mlx-ops" not in env.get("LD_PRELOAD", ""):
        sys.exit("the kernels cannot be built here (see the log above)")
    return env


def measure(code: str, argv: list[str], workers: dict[str, str], overrides: dict[str, str],
            timeout_s: float = 600) -> dict[str, float]:
    """One fresh process running `code` with `argv`, in the workers' environment (none of the
    caller's MLXROUTER_ settings) plus a configuration's overrides: the JSON it prints."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLXROUTER_")}
    out = subprocess.run([sys.executable, "-c", code, *argv],
                         env={**base, **workers, **overrides}, capture_output=True, text=True,
                         check=True, timeout=timeout_s)
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="1,8")
    p.add_argument("--keys", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--model", type=Path, help="a float32 mlx-lm model: also time decode steps")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    workers = worker_env(Path(tempfile.mkdtemp(prefix="decode-ops-")))
    batches = [int(b) for b in args.batch.split(",")]
    ops = ["attention", "rope"] + (["step"] if args.model else [])
    runs: dict[str, dict[int, dict[str, list[float]]]] = {
        c: {b: {op: [] for op in ops} for b in batches} for c in CONFIGS}
    model = [str(args.model)] if args.model else []
    for r in range(args.rounds):
        order = list(CONFIGS) if r % 2 == 0 else list(CONFIGS)[::-1]
        for b in batches:
            for name in order:
                got = measure(CHILD, [str(b), str(args.keys), str(args.reps), *model], workers,
                              CONFIGS[name])
                for op, ms in got.items():
                    runs[name][b][op].append(ms)
                print(f"round {r + 1} batch {b} {name}: {got}", file=sys.stderr)

    print(f"\nOne SmolLM2-135M decode step's ops, {args.keys} keys, {os.cpu_count()} cores; "
          f"median of {args.rounds} rounds\n")
    label = {"attention": "attention ×30", "rope": "rope ×60", "step": "decode step"}
    print("| | " + " | ".join(f"{label[op]}, batch {b}" for b in batches for op in ops) + " |")
    print("|---|" + "---|" * len(ops) * len(batches))
    table: dict[str, dict[str, float]] = {}
    for name in CONFIGS:
        cells = []
        for b in batches:
            for op in ops:
                ms = statistics.median(runs[name][b][op])
                table.setdefault(name, {})[f"{op} batch {b}"] = ms
                cells.append(f"{ms:.2f} ms")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median_ms": table}, indent=1))


if __name__ == "__main__":
    main()
