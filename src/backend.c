/*
 * backend.c - the generic backend layer: argument validation, then dispatch
 * through the backend's vtable (src/backend_impl.h).  Validation happens here
 * once, so backend implementations can trust their inputs.
 */
#include "backend_impl.h"  // provides: struct ccr_backend, ccr_backend_i
#include "ccr/ccr_tensor.h"
#include "internal.h"      // provides: CCR_FAIL, CCR_CHECK_NULL

void ccr_backend_free(ccr_backend *be)
{
    if (be != NULL)
        be->iface->free(be);
}

const char *ccr_backend_name(const ccr_backend *be)
{
    if (be == NULL)
        return "";
    if (be->is_cpu && be->k == &ccr_cpu_ref_kernels)
        return "cpu-ref";
    return be->iface->name;
}

const char *ccr_backend_describe(const ccr_backend *be) { return be ? be->describe : ""; }

ccr_ctx *ccr_backend_ctx(const ccr_backend *be) { return be ? be->ctx : NULL; }

ccr_status ccr_backend_alloc(ccr_backend *be, size_t bytes, void **out)
{
    if (be == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(be->ctx, out);
    if (bytes == 0)
        CCR_FAIL(be->ctx, CCR_EINVAL, "zero-byte allocation");
    return be->iface->alloc(be, bytes, out);
}

void ccr_backend_free_buffer(ccr_backend *be, void *buf)
{
    if (be != NULL && buf != NULL)
        be->iface->free_buffer(be, buf);
}

ccr_status ccr_backend_set(ccr_backend *be, void *dst, const void *src, size_t bytes)
{
    if (be == NULL)
        return CCR_EINVAL;
    if (bytes == 0)
        return CCR_OK;
    CCR_CHECK_NULL(be->ctx, dst);
    CCR_CHECK_NULL(be->ctx, src);
    return be->iface->set(be, dst, src, bytes);
}

ccr_status ccr_backend_get(ccr_backend *be, void *dst, const void *src, size_t bytes)
{
    if (be == NULL)
        return CCR_EINVAL;
    if (bytes == 0)
        return CCR_OK;
    CCR_CHECK_NULL(be->ctx, dst);
    CCR_CHECK_NULL(be->ctx, src);
    return be->iface->get(be, dst, src, bytes);
}

ccr_status ccr_backend_memset(ccr_backend *be, void *dst, int value, size_t bytes)
{
    if (be == NULL)
        return CCR_EINVAL;
    if (bytes == 0)
        return CCR_OK;
    CCR_CHECK_NULL(be->ctx, dst);
    return be->iface->memset(be, dst, value, bytes);
}

ccr_status ccr_backend_synchronize(ccr_backend *be)
{
    if (be == NULL)
        return CCR_EINVAL;
    return be->iface->synchronize(be);
}

ccr_status ccr_backend_set_math(ccr_backend *be, ccr_math math)
{
    if (be == NULL)
        return CCR_EINVAL;
    if (math != CCR_MATH_FP32 && math != CCR_MATH_TF32 && math != CCR_MATH_BF16)
        CCR_FAIL(be->ctx, CCR_EINVAL, "unknown math mode %d (fp32 0, tf32 1, bf16 2)",
                 (int)math);
    if (be->iface->set_math != NULL)
        return be->iface->set_math(be, math);
    if (math != CCR_MATH_FP32)
        CCR_FAIL(be->ctx, CCR_EUNSUP, "backend %s computes in FP32 only", be->iface->name);
    return CCR_OK;
}

ccr_status ccr_backend_gemm(ccr_backend *be, bool trans_a, bool trans_b, size_t m, size_t n,
                            size_t k, float alpha, const float *a, size_t lda, const float *b,
                            size_t ldb, float beta, float *c, size_t ldc)
{
    if (be == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(be->ctx, a);
    CCR_CHECK_NULL(be->ctx, b);
    CCR_CHECK_NULL(be->ctx, c);
    if (m == 0 || n == 0 || k == 0)
        CCR_FAIL(be->ctx, CCR_EINVAL, "empty gemm m=%zu n=%zu k=%zu", m, n, k);
    size_t a_cols = trans_a ? m : k, b_cols = trans_b ? k : n;
    if (lda < a_cols || ldb < b_cols || ldc < n)
        CCR_FAIL(be->ctx, CCR_EINVAL, "stride too small: lda=%zu (>= %zu) ldb=%zu (>= %zu) ldc=%zu (>= %zu)",
                 lda, a_cols, ldb, b_cols, ldc, n);
    if (be->k->gemm == NULL)
        CCR_FAIL(be->ctx, CCR_EUNSUP, "gemm not supported by backend %s", be->iface->name);
    return be->k->gemm(be, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

ccr_status ccr_mat_gemm(ccr_backend *be, bool trans_a, bool trans_b, float alpha, ccr_mat a,
                        ccr_mat b, float beta, ccr_mat c)
{
    if (be == NULL)
        return CCR_EINVAL;
    const ccr_mat *views[3] = {&a, &b, &c};
    for (int i = 0; i < 3; i++) {
        if (views[i]->data == NULL || views[i]->rows == 0 || views[i]->cols == 0 ||
            views[i]->ld < views[i]->cols)
            CCR_FAIL(be->ctx, CCR_EINVAL, "view %c is empty, NULL or has ld < cols", "ABC"[i]);
    }
    size_t am = trans_a ? a.cols : a.rows, ak = trans_a ? a.rows : a.cols;
    size_t bk = trans_b ? b.cols : b.rows, bn = trans_b ? b.rows : b.cols;
    if (am != c.rows || bn != c.cols || ak != bk)
        CCR_FAIL(be->ctx, CCR_EBADLEN, "op(A) is %zux%zu, op(B) is %zux%zu, C is %zux%zu",
                 am, ak, bk, bn, c.rows, c.cols);
    return ccr_backend_gemm(be, trans_a, trans_b, c.rows, c.cols, ak, alpha, a.data, a.ld,
                            b.data, b.ld, beta, c.data, c.ld);
}
