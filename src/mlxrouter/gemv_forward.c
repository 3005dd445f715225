/* Preloaded into Linux workers ahead of OpenBLAS (see gemv.py and config.worker_blas): decode-shaped matrix
 * products skip OpenBLAS's gemm.
 *
 * MLX's CPU backend computes every float32 matmul with cblas_sgemm, including the few-row
 * products of decode: one row per stream through every projection (x W^T, W the N x K weights),
 * one query row per attention head. OpenBLAS 0.3.21 (Debian 12) runs those through its blocked
 * gemm, packing (copying) the weights on every call, which costs more than the arithmetic when
 * A has a handful of rows. Here:
 *   - x W^T with 1 to MLXROUTER_SMALL_GEMM_MAX_M rows (default 16 with AVX2 or AVX-512, else 0;
 *     0 turns it off) goes to the
 *     kernel of small_gemm.h, which streams each weight row once, split by columns over a pool
 *     of threads (MLXROUTER_GEMM_THREADS, default the cores this process may run on);
 *   - x W (W K x N) with as many rows and under 65536 multiply-adds (attention's weights times
 *     values, per head) goes to the same header's kernel_nn, on the calling thread;
 *   - any other one-row product goes to OpenBLAS's sgemv;
 *   - everything else (prefill) to OpenBLAS's sgemm unchanged.
 * Results differ from plain OpenBLAS only by summation order. docs/performance.md has the
 * measurements. */
#define _GNU_SOURCE
#include <dlfcn.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef void (*kernel_fn)(int, int, int, int, float, const float *, int, const void *, int,
                          float, float *, int);
typedef void (*kernel_nn_fn)(int, int, int, float, const float *, int, const float *, int,
                             float, float *, int);

static sgemm_fn next_sgemm;
static sgemv_fn next_sgemv;
static unsigned long forwarded, small;

/* The kernel once per instruction set and register block: "tall" blocks (8 rows of A by one
 * weight row, two with AVX-512's 32 registers) for up to 8 rows, one pass over the weights;
 * "wide" ones (4 x 4) above that. Measured on 2 cores (docs/performance.md): these streamed
 * the weights fastest from 1 to 8 rows, 4 x 4 at 12 and 16. AVX2 (16 registers) uses its
 * 4 x 2 blocks at every M: on an AVX2-only Zen machine an 8 x 1 block, which loads 9 vectors
 * per 8 multiply-adds against 6 for 4 x 2, made an 8-row pass over SmolLM2's half weights
 * 25-31 ms against 19-26, and 1 to 4 rows no faster. Every block shape sums each dot product
 * the same way, so the results are the same bit for bit. small_gemm.h undefines the
 * parameters. */
#define NAME(x) x##_generic_tall
#define LANES 4
#define MR 8
#define NR 1
#define TARGET
#include "small_gemm.h"
#define NAME(x) x##_generic_wide
#define LANES 4
#define MR 2
#define NR 2
#define TARGET
#include "small_gemm.h"
#if defined(__x86_64__)
#define NAME(x) x##_avx2_wide
#define LANES 8
#define MR 4
#define NR 2
#define TARGET __attribute__((target("avx2,fma")))
#include "small_gemm.h"
/* With AVX-512, 256-bit vectors but its 32 registers ("avx512"), or 512-bit ones ("zmm").
 * On Zen 4, which runs a 512-bit operation in two 256-bit halves, the 256-bit kernels
 * streamed the weights 5-15% faster at 1 to 16 rows; on Zen 5, which has full-width 512-bit
 * units, the 512-bit ones were 12-15% faster over half copies (benchmarks/small_gemm.py,
 * docs/performance.md). So "zmm" is the default on AMD from family 0x1A (Zen 5) on and
 * "avx512" elsewhere (unmeasured on Intel); MLXROUTER_SMALL_GEMM_ISA names either. */
#define NAME(x) x##_avx512_tall
#define LANES 8
#define MR 8
#define NR 2
#define TARGET __attribute__((target("avx512f,avx512vl,fma")))
#include "small_gemm.h"
#define NAME(x) x##_avx512_wide
#define LANES 8
#define MR 4
#define NR 4
#define TARGET __attribute__((target("avx512f,avx512vl,fma")))
#include "small_gemm.h"
#define NAME(x) x##_zmm_tall
#define LANES 16
#define MR 8
#define NR 2
#define TARGET __attribute__((target("avx512f,avx512vl,fma")))
#include "small_gemm.h"
#define NAME(x) x##_zmm_wide
#define LANES 16
#define MR 4
#define NR 4
#define TARGET __attribute__((target("avx512f,avx512vl,fma")))
#include "small_gemm.h"

/* The same kernels over half copies of the weights (see "Shadows" below): float16 widened
 * by F16C's vcvtph2ps, bfloat16 by a 16-bit shift. 8 lanes, with AVX2 or AVX-512's
 * registers. */
#define F16_LOAD(p) (_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p))))
#define F16_LOAD1(p) (_cvtsh_ss(*(p)))
#define BF16_LOAD(p) (_mm256_castsi256_ps(_mm256_slli_epi32( \
    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16)))
static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#define NAME(x) x##_avx2_wide_f16
#define LANES 8
#define MR 4
#define NR 2
#define TARGET __attribute__((target("avx2,fma,f16c")))
#define BTYPE uint16_t
#define LOADB(p) ((NAME(vec))F16_LOAD(p))
#define LOADB1(p) F16_LOAD1(p)
#include "small_gemm.h"
#define NAME(x) x##_avx2_wide_bf16
#define LANES 8
#define MR 4
#define NR 2
#define TARGET __attribute__((target("avx2,fma")))
#define BTYPE uint16_t
#define LOADB(p) ((NAME(vec))BF16_LOAD(p))
#define LOADB1(p) bf16_to_float(*(p))
#include "small_gemm.h"
#define NAME(x) x##_avx512_tall_f16
#define LANES 8
#define MR 8
#define NR 2
#define TARGET __attribute__((target("avx512f,avx512vl,fma,f16c")))
#define BTYPE uint16_t
#define LOADB(p) ((NAME(vec))F16_LOAD(p))
#define LOADB1(p) F16_LOAD1(p)
#include "small_gemm.h"
#define NAME(x) x##_avx512_wide_f16
#define LANES 8
#define MR 4
#define NR 4
#define TARGET __attribute__((target("avx512f,avx512vl,fma,f16c")))
#define BTYPE uint16_t
#define LOADB(p) ((NAME(vec))F16_LOAD(p))
#define LOADB1(p) F16_LOAD1(p)
#include "small_gemm.h"
#define NAME(x) x##_avx512_tall_bf16
#define LANES 8
#define MR 8
#define NR 2
#define TARGET __attribute__((target("avx512f,avx512vl,avx2,fma")))
#define BTYPE uint16_t
#define LOADB(p) ((NAME(vec))BF16_LOAD(p))
#define LOADB1(p) bf16_to_float(*(p))
#include "small_gemm.h"
#define NAME(x) x##_avx512_wide_bf16
#define LANES 8
#define MR 4
#define NR 4
#define TARGET __attribute__((target("avx512f,avx512vl,avx2,fma")))
#define BTYPE uint16_t
#define LOADB(p) ((NAME(vec))BF16_LOAD(p))
#define LOADB1(p) bf16_to_float(*(p))
#include "small_gemm.h"
/* And 16 lanes, with AVX-512's 512-bit vectors. */
#define F16_LOAD16(p) (_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p))))
#define BF16_LOAD16(p) (_mm512_castsi512_ps(_mm512_slli_epi32( \
    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16)))
#define NAME(x) x##_zmm_tall_f16
#define LANES 16
#define MR 8
#define NR 2
#define TARGET __attribute__((target("avx512f,avx512vl,fma,f16c")))
#define BTYPE uint16_t
#define LOADB(p) ((NAME(vec))F16_LOAD16(p))
#define LOADB1(p) F16_LOAD1(p)
#include "small_gemm.h"
#define NAME(x) x##_zmm_wide_f16
#define LANES 16
#define MR 4
#define NR 4
#define TARGET __attribute__((target("avx512f,avx512vl,fma,f16c")))
#define BTYPE uint16_t
#define LOADB(p) ((NAME(vec))F16_LOAD16(p))
#define LOADB1(p) F16_LOAD1(p)
#include "small_gemm.h"
#define NAME(x) x##_zmm_tall_bf16
#define LANES 16
#define MR 8
#define NR 2
#define TARGET __attribute__((target("avx512f,avx512vl,fma")))
#define BTYPE uint16_t
#define LOADB(p) ((NAME(vec))BF16_LOAD16(p))
#define LOADB1(p) bf16_to_float(*(p))
#include "small_gemm.h"
#define NAME(x) x##_zmm_wide_bf16
#define LANES 16
#define MR 4
#define NR 4
#define TARGET __attribute__((target("avx512f,avx512vl,fma")))
#define BTYPE uint16_t
#define LOADB(p) ((NAME(vec))BF16_LOAD16(p))
#define LOADB1(p) bf16_to_float(*(p))
#include "small_gemm.h"
#endif

enum { TALL_MAX_M = 8 };
static kernel_fn kernel_tall = kernel_generic_tall, kernel_wide = kernel_generic_wide;
/* By shadow kind (1 float16, 2 bfloat16): NULL where this CPU or ISA has none. */
static kernel_fn half_tall[3], half_wide[3];
static kernel_nn_fn kernel_nn = kernel_nn_generic_tall;
static const char *isa = "generic";
static int max_m = 16;

/* The pool. A call's columns are cut into chunks that the calling thread and the helpers
 * claim one at a time from a shared counter, so a helper the scheduler has not run yet costs
 * nothing: the caller takes the chunks itself and waits only for chunks already claimed.
 * Chunks are at most CHUNK columns, and as many as a multiple of the threads, so that threads
 * that start together finish together: with 64-column chunks, SmolLM2's 576-column products
 * were 9 chunks (5 for one thread, 4 for the other) and its 192-column ones 3, and at 8 rows,
 * where a pass is bound by arithmetic, the thread left alone ran at half the pool's speed.
 * Equal shares made a pass over SmolLM2's half weights 13.0-13.3 ms at 8 rows instead of
 * 13.6-13.9, and 8.4-8.8 instead of 8.8-9.2 at one (Zen 4, 2 cores; 32-column chunks were
 * slower: a chunk's first column blocks are not prefetched).
 * Helpers spin briefly for the next call (decode issues product after product), then sleep on
 * a condition variable. They keep the floating-point environment (rounding, flush-to-zero) of
 * the thread that started them; MLX never changes it. */
enum { MAX_THREADS = 64, SPIN = 1000, MIN_WORK = 1 << 16, CHUNK = 64 };

struct task {
    kernel_fn kernel;
    int m, n, k, lda, ldb, ldc, chunk;  /* columns per chunk */
    float alpha, beta;
    const float *a;
    const void *b;
    float *c;
};

/* The claim counter: generation (bits 40-63) | chunks in this call (20-39) | next chunk (0-19).
 * A claim is valid when its chunk is below its call's count; a late helper's stale claim is
 * not, so a call's task is never rewritten while a valid claim on it is running. A thread
 * overshoots by at most two claims per call (one left from a pass over the previous call), so
 * fewer than 2^19 chunks keep the next-chunk field from carrying into the count (products of
 * under 2^18 * CHUNK columns make at most 2^18 + threads); generations only need to differ
 * from the last one. */
static uint64_t claims;
static int done;  /* chunks of the current call computed */
static int caller_asleep;
static struct task task;
static int threads = 1, sleepers, started;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER, finished = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t caller = PTHREAD_MUTEX_INITIALIZER;  /* one pooled call at a time */

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Computes chunks until none is left: how many it computed. */
static int work_through(void) {
    int computed = 0;
    for (;;) {
        uint64_t claim = __atomic_fetch_add(&claims, 1, __ATOMIC_ACQUIRE);
        uint64_t chunk = claim & 0xfffff, chunks = (claim >> 20) & 0xfffff;
        if (chunk >= chunks) return computed;
        int j0 = (int)chunk * task.chunk;
        int j1 = j0 + task.chunk < task.n ? j0 + task.chunk : task.n;
        task.kernel(task.m, j0, j1, task.k, task.alpha, task.a, task.lda, task.b, task.ldb,
               task.beta, task.c, task.ldc);
        computed++;
        if (__atomic_add_fetch(&done, 1, __ATOMIC_SEQ_CST) == (int)chunks &&
            __atomic_load_n(&caller_asleep, __ATOMIC_SEQ_CST)) {
            pthread_mutex_lock(&lock);
            pthread_cond_signal(&finished);
            pthread_mutex_unlock(&lock);
        }
    }
}

static void *helper(void *arg) {
    (void)arg;
    uint64_t seen = 0;
    for (;;) {
        uint64_t now;
        int spins = 0;
        while ((now = __atomic_load_n(&claims, __ATOMIC_ACQUIRE) >> 40) == seen && spins < SPIN) {
            relax();
            spins++;
        }
        if (now == seen) {
            pthread_mutex_lock(&lock);
            __atomic_fetch_add(&sleepers, 1, __ATOMIC_SEQ_CST);
            while ((now = __atomic_load_n(&claims, __ATOMIC_SEQ_CST) >> 40) == seen)
                pthread_cond_wait(&wake, &lock);
            __atomic_fetch_sub(&sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&lock);
        }
        seen = now;
        work_through();
    }
    return NULL;
}

static void start_pool(void) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int i = 1; i < threads; i++) {
        pthread_t id;
        if (pthread_create(&id, &attr, helper, NULL) != 0) {
            __atomic_store_n(&threads, i, __ATOMIC_RELAXED);  /* fewer helpers: still right */
            break;
        }
    }
    pthread_attr_destroy(&attr);
    started = 1;
}

/* A forked child has none of the parent's helpers: it starts its own on first use. */
static void after_fork_in_child(void) {
    started = 0;
    claims = 0;
    done = sleepers = caller_asleep = 0;
    pthread_mutex_init(&lock, NULL);
    pthread_cond_init(&wake, NULL);
    pthread_cond_init(&finished, NULL);
    pthread_mutex_init(&caller, NULL);
}

static void small_gemm(int m, int n, int k, float alpha, const float *a, int lda,
                       const void *b, int ldb, float beta, float *c, int ldc, kernel_fn tall,
                       kernel_fn wide) {
    __atomic_fetch_add(&small, 1, __ATOMIC_RELAXED);
    kernel_fn kernel = m <= TALL_MAX_M ? tall : wide;
    /* Rounds of one chunk per thread; columns per chunk a multiple of 4 (a kernel's NR), at
     * most CHUNK. Which thread computes a column never changes its result. */
    int pool = __atomic_load_n(&threads, __ATOMIC_RELAXED);
    int rounds = (n + pool * CHUNK - 1) / (pool * CHUNK);
    int per = ((n + rounds * pool - 1) / (rounds * pool) + 3) & ~3;
    int chunks = (n + per - 1) / per;
    /* Small products, and a second thread calling while one is pooled (two MLX streams),
     * run on the calling thread alone. */
    if (pool == 1 || chunks < 2 || (long)m * n * k < MIN_WORK ||
        pthread_mutex_trylock(&caller) != 0) {
        kernel(m, 0, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    if (!started) start_pool();
    task = (struct task){kernel, m, n, k, lda, ldb, ldc, per, alpha, beta, a, b, c};
    __atomic_store_n(&done, 0, __ATOMIC_RELAXED);
    uint64_t generation = (__atomic_load_n(&claims, __ATOMIC_RELAXED) >> 40) + 1;
    __atomic_store_n(&claims, (generation << 40) | ((uint64_t)chunks << 20), __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&sleepers, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&lock);
    }
    work_through();
    /* The helpers' last chunks: spin a little, then sleep. A helper that another process
     * preempted mid-chunk (on 2 cores, the daemon or the client handling a token) may take a
     * while; asleep, the caller leaves its core to that helper instead of spinning on it. */
    for (int spins = 0; __atomic_load_n(&done, __ATOMIC_ACQUIRE) < chunks; spins++) {
        if (spins < SPIN) {
            relax();
            continue;
        }
        pthread_mutex_lock(&lock);
        __atomic_store_n(&caller_asleep, 1, __ATOMIC_SEQ_CST);
        while (__atomic_load_n(&done, __ATOMIC_SEQ_CST) < chunks)
            pthread_cond_wait(&finished, &lock);
        __atomic_store_n(&caller_asleep, 0, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&lock);
    }
    pthread_mutex_unlock(&caller);
}

/* Shadows: half copies (float16 or bfloat16) of float32 weights that the half type holds
 * exactly, which is every weight of a model published in float16 or bfloat16, or dequantized
 * from one whose scales are (what workers run on the CPU). The worker registers them after
 * loading (gemv.py); a product x W^T over a registered W then reads the half copy, half the
 * bytes per pass over the weights, which is what a decode step waits on, with the same
 * results bit for bit (small_gemm.h). Registration happens before the model's first product
 * and the arrays stay alive for the life of the process, so lookups need no lock and a
 * registered address is never reused for another array. */
enum { SHADOW_F16 = 1, SHADOW_BF16 = 2, MAX_SHADOWS = 1 << 16 };
struct shadow {
    const float *w;
    const void *half;
    long rows, cols;
    int kind;
};
static struct shadow shadows[MAX_SHADOWS];  /* sorted by w */
static int n_shadows;
static unsigned long shadow_products;

static int shadow_index(const float *w) {  /* the first entry not below w */
    int lo = 0, hi = n_shadows;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (shadows[mid].w < w) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* 0 when registered; -1 for a kind this CPU has no kernel for (the caller frees the copy),
 * -2 when the table is full or the arguments are wrong. */
int mlxrouter_gemv_shadow(const float *w, long rows, long cols, const void *half, int kind) {
    if (kind != SHADOW_F16 && kind != SHADOW_BF16) return -2;
    if (half_tall[kind] == NULL) return -1;
    if (w == NULL || half == NULL || rows < 1 || cols < 1) return -2;
    int i = shadow_index(w);
    if (i < n_shadows && shadows[i].w == w) {
        shadows[i] = (struct shadow){w, half, rows, cols, kind};
        return 0;
    }
    if (n_shadows == MAX_SHADOWS) return -2;
    memmove(shadows + i + 1, shadows + i, (size_t)(n_shadows - i) * sizeof *shadows);
    shadows[i] = (struct shadow){w, half, rows, cols, kind};
    n_shadows++;
    return 0;
}

/* How many products read a shadow (the tests read it). */
unsigned long mlxrouter_gemv_shadow_products(void) {
    return __atomic_load_n(&shadow_products, __ATOMIC_RELAXED);
}

static const struct shadow *find_shadow(const float *b, int n, int k, int ldb) {
    if (n_shadows == 0) return NULL;
    int i = shadow_index(b);
    if (i == n_shadows || shadows[i].w != b) return NULL;
    const struct shadow *sh = &shadows[i];
    return ldb == sh->cols && n <= sh->rows && k <= sh->cols ? sh : NULL;
}

static void resolve_next(void) {
    next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    next_sgemv = (sgemv_fn)dlsym(RTLD_NEXT, "cblas_sgemv");
}

#if defined(__x86_64__)
#include <cpuid.h>
/* AMD from family 0x1A (Zen 5) on: 512-bit vector units of full width, where Zen 4 splits a
 * 512-bit operation in two. */
static int full_width_avx512(void) {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return 0;
    int amd = ebx == 0x68747541 && edx == 0x69746e65 && ecx == 0x444d4163;  /* AuthenticAMD */
    if (!amd || !__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
    unsigned family = (eax >> 8) & 0xf;
    if (family == 0xf) family += (eax >> 20) & 0xff;
    return family >= 0x1a;
}
#endif

__attribute__((constructor)) static void resolve(void) {
    resolve_next();
    /* MLXROUTER_SMALL_GEMM_ISA=generic or avx2 caps the instruction set (the tests run each);
     * zmm or avx512 picks AVX-512's 512-bit or 256-bit vectors (the default: see the kernels
     * above). */
    const char *cap = getenv("MLXROUTER_SMALL_GEMM_ISA");
    if (cap && !*cap) cap = NULL;
    int generic_only = cap && strcmp(cap, "generic") == 0;
    int no_avx512 = generic_only || (cap && strcmp(cap, "avx2") == 0);
    (void)no_avx512;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (!no_avx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) {
        int f16c = __builtin_cpu_supports("f16c");
        if (cap ? strcmp(cap, "zmm") == 0 : full_width_avx512()) {
            kernel_tall = kernel_zmm_tall, kernel_wide = kernel_zmm_wide,
            kernel_nn = kernel_nn_zmm_tall, isa = "zmm";
            half_tall[SHADOW_BF16] = kernel_zmm_tall_bf16;
            half_wide[SHADOW_BF16] = kernel_zmm_wide_bf16;
            if (f16c)
                half_tall[SHADOW_F16] = kernel_zmm_tall_f16,
                half_wide[SHADOW_F16] = kernel_zmm_wide_f16;
        } else {
            kernel_tall = kernel_avx512_tall, kernel_wide = kernel_avx512_wide,
            kernel_nn = kernel_nn_avx512_tall, isa = "avx512";
            half_tall[SHADOW_BF16] = kernel_avx512_tall_bf16;
            half_wide[SHADOW_BF16] = kernel_avx512_wide_bf16;
            if (f16c)
                half_tall[SHADOW_F16] = kernel_avx512_tall_f16,
                half_wide[SHADOW_F16] = kernel_avx512_wide_f16;
        }
    } else if (!generic_only && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        /* 4 x 2 blocks at every M (see the instances above). */
        kernel_tall = kernel_wide = kernel_avx2_wide;
        kernel_nn = kernel_nn_avx2_wide, isa = "avx2";
        half_tall[SHADOW_BF16] = half_wide[SHADOW_BF16] = kernel_avx2_wide_bf16;
        if (__builtin_cpu_supports("f16c"))
            half_tall[SHADOW_F16] = half_wide[SHADOW_F16] = kernel_avx2_wide_f16;
    }
#endif
    /* The portable kernel (no AVX2: ARM, older x86) is off unless asked for: on the x86 machine
     * it was measured on, its batch-of-8 step was slower than OpenBLAS's, and it is unmeasured
     * on ARM (docs/performance.md). */
    if (strcmp(isa, "generic") == 0) max_m = 0;
    const char *env = getenv("MLXROUTER_SMALL_GEMM_MAX_M");
    if (env && *env) max_m = atoi(env);
    env = getenv("MLXROUTER_GEMM_THREADS");
    if (env && *env) {
        threads = atoi(env);
    } else {
        cpu_set_t set;
        threads = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
    }
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    pthread_atfork(NULL, NULL, after_fork_in_child);
}

/* How many products went to sgemv, and to the small-M kernel, and which instruction set the
 * kernel uses (the tests read them). */
unsigned long mlxrouter_gemv_forwarded(void) {
    return __atomic_load_n(&forwarded, __ATOMIC_RELAXED);
}

const char *mlxrouter_small_gemm_isa(void) { return isa; }

unsigned long mlxrouter_small_gemm(void) {
    return __atomic_load_n(&small, __ATOMIC_RELAXED);
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
    if (next_sgemm == NULL)  /* OpenBLAS loaded after this library's constructor ran */
        resolve_next();
    if (next_sgemm == NULL) {
        fputs("mlxrouter gemv_forward: no cblas_sgemm after this library\n", stderr);
        abort();
    }
    /* alpha 0 (A and B unread, by BLAS's rules) and products too wide for the pool's chunk
     * counter are OpenBLAS's. */
    int ours = order == ROW_MAJOR && trans_a == NO_TRANS && alpha != 0.0f && m >= 1 &&
               m <= max_m && n >= 1 && n < (1 << 18) * CHUNK && k >= 1;
    if (ours && trans_b == TRANS) {  /* x W^T: the kernel's own shape */
        const struct shadow *sh = find_shadow(b, n, k, ldb);
        if (sh != NULL) {
            __atomic_fetch_add(&shadow_products, 1, __ATOMIC_RELAXED);
            small_gemm(m, n, k, alpha, a, lda, sh->half, ldb, beta, c, ldc,
                       half_tall[sh->kind], half_wide[sh->kind]);
        } else {
            small_gemm(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, kernel_tall, kernel_wide);
        }
        return;
    }
    if (ours && trans_b == NO_TRANS && (long)m * n * k < MIN_WORK) {  /* attention: a V */
        __atomic_fetch_add(&small, 1, __ATOMIC_RELAXED);
        kernel_nn(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    if (next_sgemv != NULL && order == ROW_MAJOR && m == 1 && n > 1 && k > 1) {
        /* The row of A: contiguous, or one column of a row-major K x lda when transposed. */
        int inc_a = trans_a == NO_TRANS ? 1 : lda;
        __atomic_fetch_add(&forwarded, 1, __ATOMIC_RELAXED);
        if (trans_b == NO_TRANS)  /* c = a B, B row-major K x N: B^T a */
            next_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_a, beta, c, 1);
        else                      /* c = a B^T, B row-major N x K: B a */
            next_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_a, beta, c, 1);
        return;
    }
    next_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
