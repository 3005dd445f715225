/* Preloaded into Linux workers ahead of OpenBLAS (see mlxrouter/blas.py): sends single-row
 * matrix products to sgemv.
 *
 * MLX's CPU backend computes every float32 matmul with cblas_sgemm, including the 1 x K times
 * K x N products of one-stream decode (one token through every projection, one query row per
 * attention head). OpenBLAS 0.3.21 (Debian 12) runs those through its blocked gemm, packing the
 * weights on every call; its threaded sgemv computes the same product without the copy. On
 * SmolLM2-135M f32, 2 cores, decode went from 72 to 35 ms per token (docs/performance.md).
 * Everything else goes to the next cblas_sgemm unchanged, so results differ from plain OpenBLAS
 * only by summation order. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);

static sgemm_fn next_sgemm;
static sgemv_fn next_sgemv;
static unsigned long forwarded;

__attribute__((constructor)) static void resolve(void) {
    next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    next_sgemv = (sgemv_fn)dlsym(RTLD_NEXT, "cblas_sgemv");
}

/* How many products went to sgemv (the tests read it). */
unsigned long mlxrouter_gemv_forwarded(void) {
    return __atomic_load_n(&forwarded, __ATOMIC_RELAXED);
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
    if (next_sgemm == NULL) {
        fputs("mlxrouter gemv_forward: no cblas_sgemm after this library\n", stderr);
        abort();
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
