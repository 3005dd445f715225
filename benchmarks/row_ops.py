#!/usr/bin/env python
"""The rotary embeddings and RMS normalizations of one SmolLM2-135M step (mlx_ops.cpp).

Each measurement runs in a fresh process with the environment mlxrouter gives its workers
(OpenBLAS with the gemv forwarder, mlxrouter's MLX kernels preloaded) and times, as one graph
each, a step's 60 rotary embeddings (each of 30 layers' queries, 9 heads of 64, and keys, 3
heads of 64, at per-sequence offsets as mlx-lm's batch cache gives them) and 61 RMS
normalizations (576 values a row, each feeding the next), in two shapes: a prefill of 8
prompts of --tokens tokens and a decode step of --batch sequences; and the logsumexp of a
decode step's logits (--batch rows of SmolLM2's 49,152-token vocabulary), which mlx-lm's batch
step takes to normalize them, and their argmax (greedy sampling). Configurations, alternated
round after round: MLX's own ops (MLXROUTER_FAST_OPS_EXCEPT=rope,rms_norm,logsumexp,argmax),
mlxrouter's, and with --ops-lib another build of mlx_ops (an older one, to see what a change to
it is worth).
Cells are medians over rounds of each run's median.

Usage:
    .venv/bin/python benchmarks/row_ops.py [--tokens 128] [--batch 8] [--rounds 5]
        [--ops-lib ~/.cache/mlxrouter/lib/libmlxrouter-mlx-ops-<hash>.so] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
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
tokens, batch, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
def arr(*shape):
    return mx.array(rng.standard_normal(shape).astype(np.float32))
def median_ms(f):
    f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3
out = {}
for name, B, T, start in (("prefill", 8, tokens, 0), ("decode", batch, 1, 150)):
    offsets = mx.array((rng.integers(0, 16, B) + start).astype(np.int32))
    layers = [(arr(B, 9, T, 64), arr(B, 3, T, 64)) for _ in range(30)]
    h, w = arr(B, T, 576), arr(576)
    mx.eval(layers, h, w)
    def rope():
        mx.eval([mx.fast.rope(a, 64, traditional=False, base=1e5, scale=1.0, offset=offsets)
                 for q, k in layers for a in (q, k)])
    def rms_norm():
        x = h
        for _ in range(61):
            x = mx.fast.rms_norm(x, w, 1e-5)
        mx.eval(x)
    out[f"60 rotary embeddings, {name}"] = median_ms(rope)
    out[f"61 RMS norms, {name}"] = median_ms(rms_norm)
logits = arr(batch, 49_152)
mx.eval(logits)
out["logsumexp, decode"] = median_ms(lambda: mx.eval(mx.logsumexp(logits, axis=-1)))
out["argmax, decode"] = median_ms(lambda: mx.eval(mx.argmax(logits, axis=-1)))
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128, help="tokens of each of the 8 prompts")
    p.add_argument("--batch", type=int, default=8, help="sequences of the decode step")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=31)
    p.add_argument("--ops-lib", type=Path, help="another build of mlx_ops to time as well")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    workers = worker_env(Path(tempfile.mkdtemp(prefix="row-ops-")))
    preload = workers["LD_PRELOAD"].split(":")
    configs = {"MLX's ops": {"MLXROUTER_FAST_OPS_EXCEPT": "rope,rms_norm,logsumexp,argmax"},
               "mlxrouter's": {}}
    if args.ops_lib:
        other = [str(args.ops_lib.expanduser()) if "libmlxrouter-mlx-ops" in lib else lib
                 for lib in preload]
        configs[f"mlxrouter's, {args.ops_lib.name}"] = {"LD_PRELOAD": ":".join(other)}
    argv = [str(args.tokens), str(args.batch), str(args.reps)]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    for round_no in range(args.rounds):
        print(f"round {round_no + 1}/{args.rounds}", file=sys.stderr)
        for name, overrides in configs.items():
            runs[name].append(measure(CHILD, argv, workers, overrides))
    table = {name: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
             for name, rs in runs.items()}
    columns = list(next(iter(table.values())))
    print(f"| ms, median of {args.rounds} rounds | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, cells in table.items():
        print(f"| {name} | " + " | ".join(f"{cells[c]:.2f}" for c in columns) + " |")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"ops_lib": str(args.ops_lib),
                                                                    "json": None},
                                         "runs": runs, "table": table}, indent=1))


if __name__ == "__main__":
    main()
