/*
 * backend_cpu.c - the CPU backend.
 *
 * Memory is 64-byte aligned host memory.  The kernel table starts as the
 * scalar references of src/ref/ (ccr_cpu_ref_kernels); the shipped table
 * (ccr_cpu_kernels) overrides GEMM with OpenBLAS's cblas_sgemm, BLIS-style.
 * ccr_backend_cpu_set_use_ref switches between the two for tests.
 */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_impl.h"  // provides: struct ccr_backend, ccr_kernels
#include "blas_core.h"     // provides: ccr_blas_select
#include "cpu_kernels.h"   // provides: ccr_cpu_adam_step
#include "internal.h"      // provides: CCR_FAIL
#include "ref/ref.h"       // provides: ccr_ref_* kernels

/* ---- kernels: thin wrappers that give the references the table's shape ---- */

static ccr_status ref_gemm(ccr_backend *be, bool ta, bool tb, size_t m, size_t n, size_t k,
                           float alpha, const float *a, size_t lda, const float *b,
                           size_t ldb, float beta, float *c, size_t ldc)
{
    CCR_UNUSED(be);
    ccr_ref_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return CCR_OK;
}

static ccr_status blas_gemm(ccr_backend *be, bool ta, bool tb, size_t m, size_t n, size_t k,
                            float alpha, const float *a, size_t lda, const float *b,
                            size_t ldb, float beta, float *c, size_t ldc)
{
    /* cblas takes int sizes; larger problems than INT_MAX fall back to the
     * reference rather than overflow. */
    const size_t lim = (size_t)2147483647;
    if (m > lim || n > lim || k > lim || lda > lim || ldb > lim || ldc > lim)
        return ref_gemm(be, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                (int)m, (int)n, (int)k, alpha, a, (int)lda, b, (int)ldb, beta, c, (int)ldc);
    return CCR_OK;
}

static ccr_status ref_bias_add(ccr_backend *be, float *y, const float *bias, size_t rows,
                               size_t cols)
{
    CCR_UNUSED(be);
    ccr_ref_bias_add(y, bias, rows, cols);
    return CCR_OK;
}

static ccr_status ref_bias_grad(ccr_backend *be, float *db, const float *dy, size_t rows,
                                size_t cols)
{
    CCR_UNUSED(be);
    ccr_ref_bias_grad(db, dy, rows, cols);
    return CCR_OK;
}

static ccr_status ref_act_fwd(ccr_backend *be, ccr_act act, const float *x, float *y, size_t n)
{
    CCR_UNUSED(be);
    ccr_ref_act_fwd(act, x, y, n);
    return CCR_OK;
}

static ccr_status ref_act_bwd(ccr_backend *be, ccr_act act, const float *y, const float *dy,
                              float *dx, size_t n)
{
    CCR_UNUSED(be);
    ccr_ref_act_bwd(act, y, dy, dx, n);
    return CCR_OK;
}

static ccr_status ref_softmax_xent(ccr_backend *be, const float *logits, const int32_t *labels,
                                   size_t rows, size_t cols, float scale, float *loss,
                                   int32_t *correct, float *dlogits)
{
    CCR_UNUSED(be);
    ccr_ref_softmax_xent(logits, labels, rows, cols, scale, loss, correct, dlogits);
    return CCR_OK;
}

static ccr_status ref_sgd_step(ccr_backend *be, float *w, const float *g, float *v, size_t n,
                               float lr, float mu, float wd)
{
    CCR_UNUSED(be);
    ccr_ref_sgd_step(w, g, v, n, lr, mu, wd);
    return CCR_OK;
}

static ccr_status ref_adam_step(ccr_backend *be, float *w, const float *g, float *m, float *v,
                                size_t n, float lr, float b1, float b2, float eps, float wd,
                                uint64_t t)
{
    CCR_UNUSED(be);
    ccr_ref_adam_step(w, g, m, v, n, lr, b1, b2, eps, wd, t);
    return CCR_OK;
}

static ccr_status cpu_adam_step(ccr_backend *be, float *w, const float *g, float *m, float *v,
                                size_t n, float lr, float b1, float b2, float eps, float wd,
                                uint64_t t)
{
    CCR_UNUSED(be);
    ccr_cpu_adam_step(w, g, m, v, n, lr, b1, b2, eps, wd, t);
    return CCR_OK;
}

/* The ranges ops: the table's own step kernels, range after range. */
static ccr_status ref_sgd_ranges(ccr_backend *be, float *w, const float *g, float *v,
                                 const size_t *off, size_t n, size_t len, float lr, float mu,
                                 float wd)
{
    CCR_UNUSED(be);
    for (size_t r = 0; r < n; r++)
        ccr_ref_sgd_step(w + off[r], g + off[r], v ? v + off[r] : NULL, len, lr, mu, wd);
    return CCR_OK;
}

/* Adam over the ranges with one table's step kernel. */
typedef void (*cpu_adam_fn)(float *w, const float *g, float *m, float *v, size_t n, float lr,
                            float b1, float b2, float eps, float wd, uint64_t t);

static void adam_ranges_with(cpu_adam_fn step, float *w, const float *g, float *m, float *v,
                             const size_t *off, const uint64_t *t, size_t n, size_t len,
                             float lr, float b1, float b2, float eps, float wd)
{
    for (size_t r = 0; r < n; r++)
        step(w + off[r], g + off[r], m + off[r], v + off[r], len, lr, b1, b2, eps, wd, t[r]);
}

static ccr_status ref_adam_ranges(ccr_backend *be, float *w, const float *g, float *m, float *v,
                                  const size_t *off, const uint64_t *t, size_t n, size_t len,
                                  float lr, float b1, float b2, float eps, float wd)
{
    CCR_UNUSED(be);
    adam_ranges_with(ccr_ref_adam_step, w, g, m, v, off, t, n, len, lr, b1, b2, eps, wd);
    return CCR_OK;
}

static ccr_status cpu_adam_ranges(ccr_backend *be, float *w, const float *g, float *m, float *v,
                                  const size_t *off, const uint64_t *t, size_t n, size_t len,
                                  float lr, float b1, float b2, float eps, float wd)
{
    CCR_UNUSED(be);
    adam_ranges_with(ccr_cpu_adam_step, w, g, m, v, off, t, n, len, lr, b1, b2, eps, wd);
    return CCR_OK;
}

static ccr_status ref_zero_ranges(ccr_backend *be, float *x, const size_t *off, size_t n,
                                  size_t len)
{
    CCR_UNUSED(be);
    for (size_t r = 0; r < n; r++)
        memset(x + off[r], 0, len * sizeof *x);
    return CCR_OK;
}

static ccr_status ref_sum_squares(ccr_backend *be, const float *x, size_t n, double *out)
{
    CCR_UNUSED(be);
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += (double)x[i] * (double)x[i];
    *out = s;
    return CCR_OK;
}

/* ---- the sequence models' ops (one implementation for both tables) ---- */

static ccr_status ref_scale(ccr_backend *be, float *x, size_t n, float k)
{
    CCR_UNUSED(be);
    ccr_ref_scale(x, n, k);
    return CCR_OK;
}

static ccr_status ref_mul(ccr_backend *be, const float *a, const float *b, float *y, size_t n)
{
    CCR_UNUSED(be);
    ccr_ref_mul(a, b, y, n);
    return CCR_OK;
}

static ccr_status ref_add(ccr_backend *be, const float *a, const float *b, float *y, size_t n)
{
    CCR_UNUSED(be);
    ccr_ref_add(a, b, y, n);
    return CCR_OK;
}

static ccr_status ref_gather_rows(ccr_backend *be, const float *table, size_t d,
                                  const int32_t *ids, size_t n, float *out)
{
    CCR_UNUSED(be);
    ccr_ref_gather_rows(table, d, ids, n, out);
    return CCR_OK;
}

static ccr_status ref_segment_add_rows(ccr_backend *be, float *dst, size_t d, const float *src,
                                       const int32_t *rows, const int32_t *start,
                                       const int32_t *seg_dst, size_t n_seg)
{
    CCR_UNUSED(be);
    ccr_ref_segment_add_rows(dst, d, src, rows, start, seg_dst, n_seg);
    return CCR_OK;
}

static ccr_status ref_lstm_fwd(ccr_backend *be, float *z, const float *c_prev, float *c,
                               float *tc, float *h, size_t batch, size_t d)
{
    CCR_UNUSED(be);
    ccr_ref_lstm_fwd(z, c_prev, c, tc, h, batch, d);
    return CCR_OK;
}

static ccr_status ref_lstm_bwd(ccr_backend *be, const float *z, const float *c_prev,
                               const float *tc, const float *dh_out, const float *dh_rec,
                               float *dc, float *dz, size_t batch, size_t d)
{
    CCR_UNUSED(be);
    ccr_ref_lstm_bwd(z, c_prev, tc, dh_out, dh_rec, dc, dz, batch, d);
    return CCR_OK;
}

static ccr_status ref_softmax_nll(ccr_backend *be, float *z, const int32_t *tgt, size_t rows,
                                  size_t cols, double *nll)
{
    CCR_UNUSED(be);
    ccr_ref_softmax_nll(z, tgt, rows, cols, nll);
    return CCR_OK;
}

static ccr_status ref_softmax_nll_bwd(ccr_backend *be, float *z, const int32_t *tgt, size_t rows,
                                      size_t cols, float scale)
{
    CCR_UNUSED(be);
    ccr_ref_softmax_nll_bwd(z, tgt, rows, cols, scale);
    return CCR_OK;
}

#define CCR_CPU_SEQ_OPS                          \
    .scale = ref_scale,                          \
    .mul = ref_mul,                              \
    .add = ref_add,                              \
    .gather_rows = ref_gather_rows,              \
    .segment_add_rows = ref_segment_add_rows,    \
    .lstm_fwd = ref_lstm_fwd,                    \
    .lstm_bwd = ref_lstm_bwd,                    \
    .softmax_nll = ref_softmax_nll,              \
    .softmax_nll_bwd = ref_softmax_nll_bwd

const ccr_kernels ccr_cpu_ref_kernels = {
    .gemm = ref_gemm,
    .bias_add = ref_bias_add,
    .bias_grad = ref_bias_grad,
    .act_fwd = ref_act_fwd,
    .act_bwd = ref_act_bwd,
    .softmax_xent = ref_softmax_xent,
    .sgd_step = ref_sgd_step,
    .adam_step = ref_adam_step,
    .sum_squares = ref_sum_squares,
    .sgd_ranges = ref_sgd_ranges,
    .adam_ranges = ref_adam_ranges,
    .zero_ranges = ref_zero_ranges,
    CCR_CPU_SEQ_OPS,
};

const ccr_kernels ccr_cpu_kernels = {
    .gemm = blas_gemm,
    .bias_add = ref_bias_add,
    .bias_grad = ref_bias_grad,
    .act_fwd = ref_act_fwd,
    .act_bwd = ref_act_bwd,
    .softmax_xent = ref_softmax_xent,
    .sgd_step = ref_sgd_step,
    .adam_step = cpu_adam_step,
    .sum_squares = ref_sum_squares,
    .sgd_ranges = ref_sgd_ranges,
    .adam_ranges = cpu_adam_ranges,
    .zero_ranges = ref_zero_ranges,
    CCR_CPU_SEQ_OPS,
};

/* ---- buffers --------------------------------------------------------------- */

static void cpu_free(ccr_backend *be) { free(be); }

static ccr_status cpu_alloc(ccr_backend *be, size_t bytes, void **out)
{
    size_t rounded = (bytes + 63) / 64 * 64;
    if (rounded < bytes)
        CCR_FAIL(be->ctx, CCR_ENOMEM, "allocation of %zu bytes overflows", bytes);
    void *p = aligned_alloc(64, rounded);
    if (p == NULL)
        CCR_FAIL(be->ctx, CCR_ENOMEM, "cannot allocate %zu bytes", bytes);
    memset(p, 0, rounded);
    *out = p;
    return CCR_OK;
}

static void cpu_free_buffer(ccr_backend *be, void *buf)
{
    CCR_UNUSED(be);
    free(buf);
}

static ccr_status cpu_copy(ccr_backend *be, void *dst, const void *src, size_t bytes)
{
    CCR_UNUSED(be);
    memmove(dst, src, bytes);
    return CCR_OK;
}

static ccr_status cpu_memset(ccr_backend *be, void *dst, int value, size_t bytes)
{
    CCR_UNUSED(be);
    memset(dst, value, bytes);
    return CCR_OK;
}

static ccr_status cpu_synchronize(ccr_backend *be)
{
    CCR_UNUSED(be);
    return CCR_OK;
}

static const ccr_backend_i cpu_iface = {
    .name = "cpu",
    .free = cpu_free,
    .alloc = cpu_alloc,
    .free_buffer = cpu_free_buffer,
    .set = cpu_copy,
    .get = cpu_copy,
    .memset = cpu_memset,
    .copy = cpu_copy,
    .synchronize = cpu_synchronize,
};

ccr_status ccr_backend_cpu_init(ccr_ctx *ctx, ccr_backend **out)
{
    CCR_CHECK_NULL(ctx, out);
    ccr_blas_select(); /* the OpenBLAS core, once per process (blas.c) */
    ccr_backend *be = calloc(1, sizeof *be);
    if (be == NULL)
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate the CPU backend");
    be->iface = &cpu_iface;
    be->k = &ccr_cpu_kernels;
    be->ctx = ctx;
    be->is_cpu = true;
    /* OPENBLAS_VERSION is " OpenBLAS 0.3.21 ": trim it. */
    const char *ver = OPENBLAS_VERSION;
    while (*ver == ' ')
        ver++;
    int len = (int)strlen(ver);
    while (len > 0 && ver[len - 1] == ' ')
        len--;
    snprintf(be->describe, sizeof be->describe, "%.*s core=%s threads=%d", len, ver,
             ccr_blas_corename(), ccr_blas_num_threads());
    *out = be;
    return CCR_OK;
}

ccr_status ccr_backend_cpu_set_use_ref(ccr_backend *be, bool use_ref)
{
    if (be == NULL)
        return CCR_EINVAL;
    if (!be->is_cpu)
        CCR_FAIL(be->ctx, CCR_EUNSUP, "backend %s has no reference mode", be->iface->name);
    be->k = use_ref ? &ccr_cpu_ref_kernels : &ccr_cpu_kernels;
    return CCR_OK;
}
