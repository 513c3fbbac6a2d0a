/*
 * gemm_ref.c - the scalar reference GEMM, the oracle for cblas and cuBLAS.
 *
 * Row-major C = alpha op(A) op(B) + beta C.  Each dot product accumulates in
 * double in increasing k, so the result is deterministic and at least as
 * accurate as any float GEMM it is compared with.
 */
#include "ref/ref.h"

void ccr_ref_gemm(bool trans_a, bool trans_b, size_t m, size_t n, size_t k, float alpha,
                  const float *a, size_t lda, const float *b, size_t ldb, float beta,
                  float *c, size_t ldc)
{
    for (size_t i = 0; i < m; i++) {
        for (size_t j = 0; j < n; j++) {
            double acc = 0.0;
            for (size_t p = 0; p < k; p++) {
                float av = trans_a ? a[p * lda + i] : a[i * lda + p];
                float bv = trans_b ? b[j * ldb + p] : b[p * ldb + j];
                acc += (double)av * (double)bv;
            }
            float old = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
            c[i * ldc + j] = (float)((double)alpha * acc) + old;
        }
    }
}
