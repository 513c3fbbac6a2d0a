/*
 * backend_impl.h - the private backend vtable and kernel table.
 *
 * A backend is a table of buffer operations plus a table of kernels, one
 * typed pointer per primitive op (ggml's ggml_backend_i).  The CPU backend
 * starts from the references in src/ref/ and overrides entries with faster
 * versions (BLIS); the CUDA backend fills the same table with launchers.
 * Arguments reaching these pointers have been validated by the public layer.
 * A NULL kernel means "unsupported on this backend".
 */
#ifndef CCR_BACKEND_IMPL_H
#define CCR_BACKEND_IMPL_H

#include <stdbool.h>

#include "ccr/ccr_backend.h"
#include "ccr/ccr_nn.h"  // provides: ccr_act

CCR_BEGIN_DECLS

typedef struct ccr_kernels {
    ccr_status (*gemm)(ccr_backend *be, bool ta, bool tb, size_t m, size_t n, size_t k,
                       float alpha, const float *a, size_t lda, const float *b, size_t ldb,
                       float beta, float *c, size_t ldc);
    ccr_status (*bias_add)(ccr_backend *be, float *y, const float *bias, size_t rows,
                           size_t cols);
    ccr_status (*bias_grad)(ccr_backend *be, float *db, const float *dy, size_t rows,
                            size_t cols);
    ccr_status (*act_fwd)(ccr_backend *be, ccr_act act, const float *x, float *y, size_t n);
    ccr_status (*act_bwd)(ccr_backend *be, ccr_act act, const float *y, const float *dy,
                          float *dx, size_t n);
    ccr_status (*softmax_xent)(ccr_backend *be, const float *logits, const int32_t *labels,
                               size_t rows, size_t cols, float scale, float *loss,
                               int32_t *correct, float *dlogits);
    ccr_status (*sgd_step)(ccr_backend *be, float *w, const float *g, float *v, size_t n,
                           float lr, float mu, float wd);
    ccr_status (*adam_step)(ccr_backend *be, float *w, const float *g, float *m, float *v,
                            size_t n, float lr, float b1, float b2, float eps, float wd,
                            uint64_t t);
    /* *out (host) = sum of x[i]^2 over n floats, in double: the reference
     * adds in index order; the CUDA kernel in a fixed tree (the same result
     * every run, equal to the reference to double rounding). */
    ccr_status (*sum_squares)(ccr_backend *be, const float *x, size_t n, double *out);
    /* The sparse optimiser's and zeroing's batches: n ranges of len floats,
     * range r at float offset off[r] (a host array) of every buffer given,
     * with Adam's step count t[r] (host): exactly what sgd_step / adam_step
     * / a zeroing does on each range in turn, in one pass (one launch on a
     * device instead of one per bank matrix).  v of sgd_ranges may be NULL
     * (no momentum) as in sgd_step. */
    ccr_status (*sgd_ranges)(ccr_backend *be, float *w, const float *g, float *v,
                             const size_t *off, size_t n, size_t len, float lr, float mu,
                             float wd);
    ccr_status (*adam_ranges)(ccr_backend *be, float *w, const float *g, float *m, float *v,
                              const size_t *off, const uint64_t *t, size_t n, size_t len,
                              float lr, float b1, float b2, float eps, float wd);
    ccr_status (*zero_ranges)(ccr_backend *be, float *x, const size_t *off, size_t n,
                              size_t len);
    /* The sequence models' ops (specified in src/ref/ref.h, seq_ref.c;
     * reached through src/ops.h).  Index arrays are backend memory. */
    /* x[i] *= k (gradient clipping on a device). */
    ccr_status (*scale)(ccr_backend *be, float *x, size_t n, float k);
    ccr_status (*mul)(ccr_backend *be, const float *a, const float *b, float *y, size_t n);
    ccr_status (*add)(ccr_backend *be, const float *a, const float *b, float *y, size_t n);
    ccr_status (*gather_rows)(ccr_backend *be, const float *table, size_t d, const int32_t *ids,
                              size_t n, float *out);
    ccr_status (*segment_add_rows)(ccr_backend *be, float *dst, size_t d, const float *src,
                                   const int32_t *rows, const int32_t *start,
                                   const int32_t *seg_dst, size_t n_seg);
    ccr_status (*lstm_fwd)(ccr_backend *be, float *z, const float *c_prev, float *c, float *tc,
                           float *h, size_t batch, size_t d);
    ccr_status (*lstm_bwd)(ccr_backend *be, const float *z, const float *c_prev, const float *tc,
                           const float *dh_out, const float *dh_rec, float *dc, float *dz,
                           size_t batch, size_t d);
    /* nll is backend memory ([rows] doubles). */
    ccr_status (*softmax_nll)(ccr_backend *be, float *z, const int32_t *tgt, size_t rows,
                              size_t cols, double *nll);
    ccr_status (*softmax_nll_bwd)(ccr_backend *be, float *z, const int32_t *tgt, size_t rows,
                                  size_t cols, float scale);
} ccr_kernels;

typedef struct ccr_backend_i {
    const char *name;
    void (*free)(ccr_backend *be);
    ccr_status (*alloc)(ccr_backend *be, size_t bytes, void **out);
    void (*free_buffer)(ccr_backend *be, void *buf);
    ccr_status (*set)(ccr_backend *be, void *dst, const void *src, size_t bytes);
    ccr_status (*get)(ccr_backend *be, void *dst, const void *src, size_t bytes);
    ccr_status (*memset)(ccr_backend *be, void *dst, int value, size_t bytes);
    /* Backend memory to backend memory; the ranges do not overlap. */
    ccr_status (*copy)(ccr_backend *be, void *dst, const void *src, size_t bytes);
    ccr_status (*synchronize)(ccr_backend *be);
    /* Selects ccr_math (validated); NULL: FP32 only. */
    ccr_status (*set_math)(ccr_backend *be, ccr_math math);
} ccr_backend_i;

struct ccr_backend {
    const ccr_backend_i *iface;
    const ccr_kernels *k;      /* the kernel table in use */
    ccr_ctx *ctx;              /* where errors are reported */
    bool is_cpu;
    char describe[160];        /* ccr_backend_describe */
    void *impl;                /* backend-private state (CUDA handles) */
};

/* The CPU kernel tables: references, and references + cblas GEMM. */
extern const ccr_kernels ccr_cpu_ref_kernels;
extern const ccr_kernels ccr_cpu_kernels;

CCR_END_DECLS

#endif /* CCR_BACKEND_IMPL_H */
