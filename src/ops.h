/*
 * ops.h - the backend's element-wise and sequence-model kernels for code that
 * builds a model outside the layer API (the LSTM language model of
 * experiments/lm_model.c), one call per kernel-table entry.  Every pointer is
 * backend memory (device memory on CUDA), ids included; the specification of
 * each op is its reference in src/ref/ref.h.  A backend without the op gives
 * CCR_EUNSUP; the caller has checked shapes and id ranges.  Private to the
 * library and its drivers: not installed.
 */
#ifndef CCR_OPS_H
#define CCR_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "ccr/ccr_backend.h"
#include "ccr/ccr_nn.h"  // provides: ccr_act

CCR_BEGIN_DECLS

/* CCR_OK when the backend has every op below, else CCR_EUNSUP naming the
 * first one missing (a model checks once, at allocation). */
ccr_status ccr_ops_check(ccr_backend *be);

/* n floats from src to dst (both backend memory, not overlapping). */
ccr_status ccr_op_copy(ccr_backend *be, float *dst, const float *src, size_t n);
/* x *= k. */
ccr_status ccr_op_scale(ccr_backend *be, float *x, size_t n, float k);
/* y = a * b and y = a + b element-wise; y may alias a or b. */
ccr_status ccr_op_mul(ccr_backend *be, const float *a, const float *b, float *y, size_t n);
ccr_status ccr_op_add(ccr_backend *be, const float *a, const float *b, float *y, size_t n);
/* y[r, :] += bias; db += column sums of dy; activations (ccr_ref_act_*). */
ccr_status ccr_op_bias_add(ccr_backend *be, float *y, const float *bias, size_t rows,
                           size_t cols);
ccr_status ccr_op_bias_grad(ccr_backend *be, float *db, const float *dy, size_t rows,
                            size_t cols);
ccr_status ccr_op_act_fwd(ccr_backend *be, ccr_act act, const float *x, float *y, size_t n);
ccr_status ccr_op_act_bwd(ccr_backend *be, ccr_act act, const float *y, const float *dy,
                          float *dx, size_t n);
/* Embedding lookup and its gradient (ccr_ref_gather_rows,
 * ccr_ref_segment_add_rows). */
ccr_status ccr_op_gather_rows(ccr_backend *be, const float *table, size_t d, const int32_t *ids,
                              size_t n, float *out);
ccr_status ccr_op_segment_add_rows(ccr_backend *be, float *dst, size_t d, const float *src,
                                   const int32_t *rows, const int32_t *start,
                                   const int32_t *seg_dst, size_t n_seg);
/* One LSTM timestep (ccr_ref_lstm_fwd / ccr_ref_lstm_bwd). */
ccr_status ccr_op_lstm_fwd(ccr_backend *be, float *z, const float *c_prev, float *c, float *tc,
                           float *h, size_t batch, size_t d);
ccr_status ccr_op_lstm_bwd(ccr_backend *be, const float *z, const float *c_prev, const float *tc,
                           const float *dh_out, const float *dh_rec, float *dc, float *dz,
                           size_t batch, size_t d);
/* Full softmax with per-row NLL (nll: [rows] doubles of backend memory) and
 * its backward (ccr_ref_softmax_nll, ccr_ref_softmax_nll_bwd). */
ccr_status ccr_op_softmax_nll(ccr_backend *be, float *z, const int32_t *tgt, size_t rows,
                              size_t cols, double *nll);
ccr_status ccr_op_softmax_nll_bwd(ccr_backend *be, float *z, const int32_t *tgt, size_t rows,
                                  size_t cols, float scale);

CCR_END_DECLS

#endif /* CCR_OPS_H */
