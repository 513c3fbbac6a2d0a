/*
 * ccr_tensor.h - minimal row-major matrix views.
 *
 * A view does not own memory: it names `rows` x `cols` floats starting at
 * `data` with `ld` floats between the starts of consecutive rows (ld >= cols).
 * The memory belongs to a backend (ccr_backend_alloc) or to the caller.
 *
 *     ccr_mat x = ccr_mat_make(buf, batch, 784);      // whole batch
 *     ccr_mat x0 = ccr_mat_rows(x, 0, 32);             // first 32 examples
 *     ccr_mat_gemm(be, false, false, 1.0f, x0, w, 0.0f, y0);   // y0 = x0 w
 */
#ifndef CCR_TENSOR_H
#define CCR_TENSOR_H

#include <stdbool.h>

#include "ccr_backend.h"
#include "ccr_common.h"
#include "ccr_status.h"

CCR_BEGIN_DECLS

typedef struct ccr_mat {
    float *data;   /* first element; backend or host memory */
    size_t rows;   /* number of rows */
    size_t cols;   /* number of columns */
    size_t ld;     /* row stride in floats, >= cols */
} ccr_mat;

/* A dense view (ld = cols). */
static inline ccr_mat ccr_mat_make(float *data, size_t rows, size_t cols)
{
    ccr_mat m = {data, rows, cols, cols};
    return m;
}

/* Rows [r0, r0 + n) of m; the caller guarantees r0 + n <= m.rows. */
static inline ccr_mat ccr_mat_rows(ccr_mat m, size_t r0, size_t n)
{
    ccr_mat v = {m.data + r0 * m.ld, n, m.cols, m.ld};
    return v;
}

/* C = alpha * op(A) op(B) + beta * C with shapes taken from the views.
 * Returns CCR_EBADLEN (message names the shapes) when op(A) is not
 * C.rows x K, op(B) is not K x C.cols, CCR_EINVAL for empty or NULL views or
 * ld < cols.  C is untouched on error. */
ccr_status ccr_mat_gemm(ccr_backend *be, bool trans_a, bool trans_b, float alpha,
                        ccr_mat a, ccr_mat b, float beta, ccr_mat c);

CCR_END_DECLS

#endif /* CCR_TENSOR_H */
