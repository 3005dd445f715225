#!/usr/bin/env python
"""The gemv forwarder's small-M kernel (gemv_forward.c) on the weight products of one
SmolLM2-135M decode step, per instruction set.

A C driver calls cblas_sgemm through the preloaded forwarder the way MLX does in decode
(x Wᵀ, row-major, M rows of x) for every weight matrix of SmolLM2-135M's 30 layers and its
tied 49,152 x 576 output head: 538 MB of float32 weights, far more than the caches, so each
pass streams them from memory as a decode step does. It reports the time of one pass, and the
weight bytes per second, at each number of rows M (the streams of a batch), with the kernel's
instruction set forced by MLXROUTER_SMALL_GEMM_ISA. Runs alternate between the instruction
sets, round after round; each cell is the median over rounds of each run's best pass.

On x86-64 it also measures the machine's multiply-add peak (independent 256-bit FMA chains on
every core, best of 3) and gives each cell's arithmetic rate as a share of it: at one row a
pass is bound by memory, at 8 and more rows by arithmetic on a 2-core machine.

Usage:
    .venv/bin/python benchmarks/small_gemm.py [--rows 1,4,8,16] [--isa avx512,zmm,avx2]
        [--rounds 3] [--passes 5] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpuinfo import describe_cpu  # noqa: E402

DRIVER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef const char *(*isa_fn)(void);
typedef int (*shadow_fn)(const float *, long, long, const void *, int);
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
/* One SmolLM2-135M layer (N x K): q, k, v, o, gate, up, down; then the output head. */
static const int SHAPES[7][2] = {{576, 576}, {192, 576}, {192, 576}, {576, 576},
                                 {1536, 576}, {1536, 576}, {576, 1536}};
enum { LAYERS = 30, VOCAB = 49152, HIDDEN = 576 };
int main(int argc, char **argv) {
    int m = atoi(argv[1]), passes = atoi(argv[2]);
    sgemm_fn sgemm = (sgemm_fn)dlsym(RTLD_DEFAULT, "cblas_sgemm");
    isa_fn isa = (isa_fn)dlsym(RTLD_DEFAULT, "mlxrouter_small_gemm_isa");
    shadow_fn shadow = (shadow_fn)dlsym(RTLD_DEFAULT, "mlxrouter_gemv_shadow");
    int half = argc > 3 && atoi(argv[3]);
    if (!sgemm || !isa || !shadow) { fputs("no forwarder preloaded\n", stderr); return 2; }
    float *w[LAYERS * 7 + 1];
    size_t bytes = 0;
    for (int i = 0; i <= LAYERS * 7; i++) {
        size_t n = i == LAYERS * 7 ? (size_t)VOCAB * HIDDEN
                                   : (size_t)SHAPES[i % 7][0] * SHAPES[i % 7][1];
        w[i] = aligned_alloc(64, n * sizeof(float));
        for (size_t j = 0; j < n; j++) w[i][j] = (float)((j * 7 + i) % 13) * 0.01f - 0.06f;
        bytes += n * sizeof(float);
        if (half) {  /* a float16 copy the forwarder reads instead (gemv.shadow_weights) */
            unsigned short *h = aligned_alloc(64, n * sizeof *h);
            for (size_t j = 0; j < n; j++) h[j] = (unsigned short)(0x2000 + (j * 7 + i) % 13);
            if (shadow(w[i], (long)(n / (i == LAYERS * 7 ? HIDDEN : SHAPES[i % 7][1])),
                       i == LAYERS * 7 ? HIDDEN : SHAPES[i % 7][1], h, 1) != 0) {
                fputs("no float16 kernel for this instruction set\n", stderr);
                return 3;
            }
            bytes -= n * sizeof(float) / 2;
        }
    }
    float *x = aligned_alloc(64, 16 * 1536 * sizeof(float));
    float *c = aligned_alloc(64, 16 * (size_t)VOCAB * sizeof(float));
    for (int j = 0; j < 16 * 1536; j++) x[j] = (float)(j % 11) * 0.1f;
    double best = 1e9;
    for (int p = 0; p < passes; p++) {
        double t0 = now();
        for (int i = 0; i < LAYERS * 7; i++)
            sgemm(101, 111, 112, m, SHAPES[i % 7][0], SHAPES[i % 7][1], 1.0f, x,
                  SHAPES[i % 7][1], w[i], SHAPES[i % 7][1], 0.0f, c, SHAPES[i % 7][0]);
        sgemm(101, 111, 112, m, VOCAB, HIDDEN, 1.0f, x, HIDDEN, w[LAYERS * 7], HIDDEN, 0.0f,
              c, VOCAB);
        double dt = now() - t0;
        if (dt < best) best = dt;
    }
    printf("{\"isa\": \"%s\", \"ms\": %.3f, \"bytes\": %zu}\n", isa(), best * 1e3, bytes);
    return 0;
}
"""


# Every core runs 12 independent chains of 256-bit multiply-adds (more than an FMA's latency
# times the FMA units, so the units never wait): the most float32 arithmetic it can do.
PEAK = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
enum { STEPS = 100000000 };
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
__attribute__((target("avx2,fma"))) static void *chains(void *out) {
    __m256 a[12], b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
    for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps((float)i);
    for (long n = 0; n < STEPS / 12; n++) {
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) a[i] = _mm256_fmadd_ps(a[i], b, c);
    }
    float sum = 0, lanes[8];
    for (int i = 0; i < 12; i++) {
        _mm256_storeu_ps(lanes, a[i]);
        sum += lanes[0];
    }
    *(float *)out = sum;
    return NULL;
}
int main(int argc, char **argv) {
    int threads = atoi(argv[1]);
    pthread_t t[256];
    float out[256];
    double t0 = now();
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, chains, &out[i]);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    double flops = (double)threads * (STEPS / 12) * 12 * 8 * 2;
    printf("%.1f %g\n", flops / (now() - t0) / 1e9, out[0]);
    return 0;
}
"""


def fma_peak(cc: str, work: Path, threads: int) -> float | None:
    """GFLOP/s of `threads` cores' independent 256-bit multiply-adds (best of 3), or None off
    x86-64 or without AVX2."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    (work / "peak.c").write_text(PEAK)
    built = subprocess.run([cc, "-O2", "-pthread", "-o", str(work / "peak"),
                            str(work / "peak.c")], capture_output=True)
    if built.returncode != 0:
        return None
    best = 0.0
    for _ in range(3):
        run = subprocess.run([str(work / "peak"), str(threads)], capture_output=True, text=True)
        if run.returncode != 0:  # no AVX2: an illegal instruction
            return None
        best = max(best, float(run.stdout.split()[0]))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,4,8,16")
    p.add_argument("--isa", default="avx512,zmm,avx2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--threads", default="", help="MLXROUTER_GEMM_THREADS (default: all cores)")
    p.add_argument("--half", action="store_true",
                   help="register float16 copies of the weights (shadows), as workers do")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    from mlxrouter import gemv
    from mlxrouter.config import find_system_blas

    work = Path(tempfile.mkdtemp(prefix="small-gemm-"))
    forwarder = gemv.library(work / "lib")
    found = find_system_blas("openblas")
    openblas = found[1] if found else None
    cc = gemv.compiler()
    if forwarder is None or openblas is None or cc is None:
        sys.exit("needs a C compiler and the system OpenBLAS (scripts/bootstrap.sh)")
    driver = work / "driver"
    (work / "driver.c").write_text(DRIVER)
    subprocess.run([cc, "-O2", "-o", str(driver), str(work / "driver.c"), "-ldl"], check=True)

    rows = [int(r) for r in args.rows.split(",")]
    isas = args.isa.split(",")
    results: dict[str, dict[int, list[float]]] = {i: {m: [] for m in rows} for i in isas}
    got_isa: dict[str, str] = {}
    bytes_ = 0
    for r in range(args.rounds):
        order = isas if r % 2 == 0 else isas[::-1]
        for m in rows:
            for isa in order:
                env = {**os.environ, "LD_PRELOAD": f"{forwarder} {openblas}",
                       "MLXROUTER_SMALL_GEMM_ISA": isa, "MLXROUTER_SMALL_GEMM_MAX_M": "16"}
                if args.threads:
                    env["MLXROUTER_GEMM_THREADS"] = args.threads
                out = subprocess.run([str(driver), str(m), str(args.passes),
                                      "1" if args.half else "0"], env=env,
                                     capture_output=True, text=True, check=True)
                run = json.loads(out.stdout)
                got_isa[isa] = run["isa"]
                bytes_ = run["bytes"]
                results[isa][m].append(run["ms"])
                print(f"round {r + 1} M={m} {isa}: {run['ms']:.2f} ms", file=sys.stderr)

    threads = int(args.threads) if args.threads else os.cpu_count() or 1
    peak = fma_peak(cc, work, threads)
    cpu = describe_cpu()
    print(f"\n{cpu}, {os.cpu_count()} cores; {bytes_ / 1e6:.0f} MB of weights per pass; "
          f"median of {args.rounds} rounds (best of {args.passes} passes each)")
    # Two flops per weight and row: half copies are 2 bytes a weight, float32 ones 4.
    weights = bytes_ / (2 if args.half else 4)
    if peak:
        print(f"multiply-add peak, 256-bit FMA on {threads} "
              f"thread{'s' if threads > 1 else ''}: {peak:.0f} GFLOP/s")
    print()
    print("| kernel (MLXROUTER_SMALL_GEMM_ISA) | " + " | ".join(f"M={m}" for m in rows) + " |")
    print("|---|" + "---|" * len(rows))
    table = {}
    for isa in isas:
        cells = []
        for m in rows:
            ms = statistics.median(results[isa][m])
            table.setdefault(isa, {})[m] = ms
            gflops = 2 * m * weights / ms / 1e6
            share = f", {100 * gflops / peak:.0f}% of peak" if peak else ""
            cells.append(f"{ms:.1f} ms ({bytes_ / ms / 1e6:.1f} GB/s, "
                         f"{gflops:.0f} GFLOP/s{share})")
        print(f"| {isa} ({got_isa[isa]}) | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "bytes": bytes_, "runs": results,
                                         "fma_peak_gflops": peak,
                                         "median_ms": table, "isa": got_isa}, indent=1))


if __name__ == "__main__":
    main()
