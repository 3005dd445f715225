/* One instance of the small-M matrix product kernel, included by gemv_forward.c once per
 * instruction set and register block with these defined (and undefined at the end):
 *   NAME(x)  the instance's names      LANES  floats per vector
 *   MR, NR   rows of A and of B per register block (MR * NR accumulators)
 *   TARGET   a function attribute naming the instruction set, or nothing
 * and optionally, for weights kept as 16-bit halves (see gemv_forward.c's shadows):
 *   BTYPE    the element type of B (float when not defined)
 *   LOADB(p) LANES elements of B at p as a vector of floats; LOADB1(p) one as a float
 * Widening a half is exact, and the arithmetic is the same in every instance, so products
 * over a half copy equal those over the float32 weights it was made from, bit for bit.
 *
 * Computes C = alpha A B^T + beta C for row-major A (M x K), B (N x K) and C (M x N): a
 * block of MR rows of A against NR rows of B keeps its MR * NR dot products in vector
 * registers over all of K, so each weight row is read from memory once per call instead of
 * being packed first. Columns [j0, j1) only: the caller splits N between threads.
 * kernel_nn below does C = alpha A B + beta C for the small products of attention. */

typedef float NAME(vec) __attribute__((vector_size(LANES * sizeof(float)), aligned(4),
                                        may_alias));
#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 2  /* column blocks between the one computed and the one prefetched */
#endif
#ifndef BTYPE
#define BTYPE float
#define LOADB(p) (*(const NAME(vec) *)(p))
#define LOADB1(p) (*(p))
#define SMALL_GEMM_FLOAT_B
#endif

/* The sum of a vector's lanes: halves added in registers. __builtin_shufflevector (clang, GCC
 * 12 and newer) narrows the vector; older GCC has __builtin_shuffle, which keeps its width. */
#if !defined(__clang__) && __GNUC__ < 12 && !defined(SMALL_GEMM_OLD_GCC)
#define SMALL_GEMM_OLD_GCC
#endif
TARGET static inline __attribute__((always_inline)) float NAME(hsum)(NAME(vec) v) {
#if defined(SMALL_GEMM_OLD_GCC) && LANES >= 8
    typedef int lanes __attribute__((vector_size(LANES * sizeof(int))));
#if LANES == 16
    v += __builtin_shuffle(v, (lanes){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v += __builtin_shuffle(v, (lanes){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
#else
    v += __builtin_shuffle(v, (lanes){4, 5, 6, 7, 0, 1, 2, 3});
#endif
    NAME(vec) q = v;
#else
#if LANES == 16
    typedef float half __attribute__((vector_size(8 * sizeof(float))));
    half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
             __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#elif LANES == 8
    typedef float half __attribute__((vector_size(8 * sizeof(float))));
    half h = v;
#endif
#if LANES >= 8
    typedef float quarter __attribute__((vector_size(4 * sizeof(float))));
    quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) +
                __builtin_shufflevector(h, h, 4, 5, 6, 7);
#else
    NAME(vec) q = v;
#endif
#endif
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* mr x nr dot products (mr <= MR, nr <= NR): constants at every call site, so the loops
 * unroll and the accumulators stay in registers. With `next`, also prefetches the NR weight
 * rows there: the last row block of a column block, which reads its weights from L1, fetches
 * a later column block's from memory meanwhile (without it the arithmetic and the memory
 * traffic of several row blocks took turns, and M = 8 streamed half as fast as M = 1).
 * PREFETCH_BLOCKS ahead: with the next block only, an 8-row block's arithmetic (a few
 * hundred cycles) was shorter than a trip to memory; two ahead made a pass over SmolLM2's
 * half weights 8.6 ms instead of 10.1-10.9 at 8 rows and 7.7 instead of 8.2 at one (Zen 5,
 * 512-bit; 256-bit and AVX2 kernels gained too; three ahead was no better, eight worse).
 * Into L2 (prefetcht1), not L1: prefetches into L1 hold its few miss buffers for a whole
 * trip to memory, and an 8-row block, which also loads 8 vectors of A per step, then
 * waited on them: its pass over SmolLM2's weights took 26.5 ms against 23 into L2
 * (benchmarks/small_gemm.py, 2 cores, Zen 4). */
TARGET static inline __attribute__((always_inline)) void NAME(block)(
    int mr, int nr, int k, float alpha, const float *a, int lda, const BTYPE *b, int ldb,
    float beta, float *c, int ldc, const BTYPE *next) {
    NAME(vec) acc[MR][NR] = {{{0}}};
    int p = 0;
    for (; p + LANES <= k; p += LANES) {
        NAME(vec) av[MR], bv[NR];
        _Pragma("GCC unroll 8") for (int r = 0; r < mr; r++)
            av[r] = *(const NAME(vec) *)(a + (long)r * lda + p);
        _Pragma("GCC unroll 8") for (int s = 0; s < nr; s++)
            bv[s] = LOADB(b + (long)s * ldb + p);
        if (next)
            _Pragma("GCC unroll 8") for (int s = 0; s < NR; s++)
                __builtin_prefetch(next + (long)s * ldb + p, 0, 2);
        _Pragma("GCC unroll 8") for (int r = 0; r < mr; r++)
            _Pragma("GCC unroll 8") for (int s = 0; s < nr; s++)
                acc[r][s] += av[r] * bv[s];
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < mr; r++) {
        _Pragma("GCC unroll 8") for (int s = 0; s < nr; s++) {
            float sum = NAME(hsum)(acc[r][s]);
            for (int q = p; q < k; q++)
                sum += a[(long)r * lda + q] * LOADB1(b + (long)s * ldb + q);
            float *out = c + (long)r * ldc + s;
            /* beta 0 never reads C: it may hold NaN (BLAS semantics). */
            *out = beta == 0.0f ? alpha * sum : alpha * sum + beta * *out;
        }
    }
}

/* Every row block against the column block at bj (NR_ rows of B); the last row block
 * prefetches `next`. The rows left over (fewer than MR) get a block of their own size: a
 * constant in every case, as NAME(block) needs (R_ < MR ? R_ : 1 keeps the unreachable cases
 * within the accumulator array). */
_Static_assert(MR <= 8, "NAME_ROWS has cases for up to 7 leftover rows");
#define NAME_REST(R_, NR_) \
    case R_: NAME(block)(R_ < MR ? R_ : 1, NR_, k, alpha, a + (long)i * lda, lda, bj, ldb, \
                         beta, c + (long)i * ldc + j, ldc, next); break;
#define NAME_ROWS(NR_) \
    for (; i + MR <= m; i += MR) \
        NAME(block)(MR, NR_, k, alpha, a + (long)i * lda, lda, bj, ldb, beta, \
                    c + (long)i * ldc + j, ldc, i + MR == m ? next : NULL); \
    switch (m - i) { \
        NAME_REST(1, NR_) NAME_REST(2, NR_) NAME_REST(3, NR_) NAME_REST(4, NR_) \
        NAME_REST(5, NR_) NAME_REST(6, NR_) NAME_REST(7, NR_) \
    }

TARGET static void NAME(kernel)(int m, int j0, int j1, int k, float alpha, const float *a,
                                int lda, const void *bv, int ldb, float beta, float *c,
                                int ldc) {
    const BTYPE *b = (const BTYPE *)bv;
    int j = j0;
    /* Column blocks outermost: NR weight rows stay in L1 while every row block of A uses
     * them; A itself (M x K, at most a few hundred KB) stays in L2. */
    for (; j + NR <= j1; j += NR) {
        const BTYPE *bj = b + (long)j * ldb;
        const BTYPE *next = j + (PREFETCH_BLOCKS + 1) * NR <= j1
                                ? bj + (long)PREFETCH_BLOCKS * NR * ldb : NULL;
        int i = 0;
        NAME_ROWS(NR)
    }
    for (; j < j1; j++) {
        const BTYPE *bj = b + (long)j * ldb, *next = NULL;
        int i = 0;
        NAME_ROWS(1)
    }
}

#undef NAME_ROWS
#undef NAME_REST
#undef BTYPE
#undef LOADB
#undef LOADB1

#ifdef SMALL_GEMM_FLOAT_B
#undef SMALL_GEMM_FLOAT_B

/* C = alpha A B + beta C for row-major B (K x N): attention's weights times values, one query
 * row per head (small N and K). Each row of C is NB vectors wide at a time, summed over K. */
TARGET static inline __attribute__((always_inline)) void NAME(columns)(
    int nb, int k, float alpha, const float *a, const float *b, int ldb, float beta, float *c) {
    NAME(vec) acc[4] = {0};
    for (int p = 0; p < k; p++) {
        float x = a[p];
        _Pragma("GCC unroll 4") for (int v = 0; v < nb; v++)
            acc[v] += x * *(const NAME(vec) *)(b + (long)p * ldb + v * LANES);
    }
    _Pragma("GCC unroll 4") for (int v = 0; v < nb; v++) {
        NAME(vec) *out = (NAME(vec) *)(c + v * LANES);
        *out = beta == 0.0f ? alpha * acc[v] : alpha * acc[v] + beta * *out;
    }
}

TARGET __attribute__((unused)) static void NAME(kernel_nn)(int m, int n, int k, float alpha, const float *a, int lda,
                                   const float *b, int ldb, float beta, float *c, int ldc) {
    for (int i = 0; i < m; i++) {
        const float *ai = a + (long)i * lda;
        float *ci = c + (long)i * ldc;
        int j = 0;
        for (; j + 4 * LANES <= n; j += 4 * LANES)
            NAME(columns)(4, k, alpha, ai, b + j, ldb, beta, ci + j);
        for (; j + LANES <= n; j += LANES)
            NAME(columns)(1, k, alpha, ai, b + j, ldb, beta, ci + j);
        for (; j < n; j++) {
            float sum = 0.0f;
            for (int p = 0; p < k; p++) sum += ai[p] * b[(long)p * ldb + j];
            ci[j] = beta == 0.0f ? alpha * sum : alpha * sum + beta * ci[j];
        }
    }
}
#endif /* SMALL_GEMM_FLOAT_B: kernel_nn only for float weights */
#undef NAME
#undef LANES
#undef MR
#undef NR
#undef TARGET
