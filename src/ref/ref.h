/*
 * ref.h - the scalar reference kernels (src/ref/).
 *
 * Each function is the specification of one op: plain loops, a fixed
 * reduction order (so results are bitwise-reproducible), shapes in the
 * comments.  Optimised CPU kernels and CUDA kernels are tested against these.
 * All matrices are row-major.  None of these can fail: the public layer has
 * validated every argument before calling them.
 */
#ifndef CCR_REF_H
#define CCR_REF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ccr/ccr_nn.h"  // provides: ccr_act

/* C[m,n] = alpha * op(A)[m,k] op(B)[k,n] + beta * C; the sum over k runs in
 * increasing order in double precision.  beta == 0 ignores C's old content
 * (NaN included), as BLAS does. */
void ccr_ref_gemm(bool trans_a, bool trans_b, size_t m, size_t n, size_t k, float alpha,
                  const float *a, size_t lda, const float *b, size_t ldb, float beta,
                  float *c, size_t ldc);

/* y[r, c] += bias[c] for y[rows, cols]. */
void ccr_ref_bias_add(float *y, const float *bias, size_t rows, size_t cols);

/* db[c] += sum_r dy[r, c], summed over r in increasing order. */
void ccr_ref_bias_grad(float *db, const float *dy, size_t rows, size_t cols);

/* y[i] = f(x[i]) for the activation f; y may alias x. */
void ccr_ref_act_fwd(ccr_act act, const float *x, float *y, size_t n);

/* dx[i] = dy[i] * f'(x_i), written in terms of the output y[i] = f(x_i)
 * (relu: y > 0; tanh: 1 - y^2; sigmoid: y (1 - y)).  dx may alias dy. */
void ccr_ref_act_bwd(ccr_act act, const float *y, const float *dy, float *dx, size_t n);

/* Softmax cross-entropy over logits[rows, cols] with labels[rows] in
 * [0, cols): loss[r] = logsumexp(logits[r]) - logits[r, label[r]];
 * correct[r] = 1 if the first argmax of logits[r] equals the label;
 * if dlogits != NULL, dlogits[r, c] = scale * (softmax(logits[r])_c - [c == label]),
 * with entries below FLT_MIN in magnitude written as 0 (see nn_ref.c).
 * dlogits may alias logits. */
void ccr_ref_softmax_xent(const float *logits, const int32_t *labels, size_t rows,
                          size_t cols, float scale, float *loss, int32_t *correct,
                          float *dlogits);

/* SGD with momentum (PyTorch convention): g' = g + wd w; v = mu v + g';
 * w -= lr v.  With mu == 0, v is not read or written (may be NULL).
 * Moments below FLT_MIN in magnitude are stored as 0 (see optim_ref.c). */
void ccr_ref_sgd_step(float *w, const float *g, float *v, size_t n, float lr, float mu,
                      float wd);

/* Adam (Kingma & Ba, with bias correction at step t >= 1):
 * g' = g + wd w; m = b1 m + (1-b1) g'; v = b2 v + (1-b2) g'^2;
 * w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
 * Moments below FLT_MIN in magnitude are stored as 0 (see optim_ref.c). */
void ccr_ref_adam_step(float *w, const float *g, float *m, float *v, size_t n, float lr,
                       float b1, float b2, float eps, float wd, uint64_t t);

/* ---- sequence models (seq_ref.c) --------------------------------------- */

/* x[i] *= k. */
void ccr_ref_scale(float *x, size_t n, float k);

/* y[i] = a[i] * b[i] and y[i] = a[i] + b[i]; y may alias a or b. */
void ccr_ref_mul(const float *a, const float *b, float *y, size_t n);
void ccr_ref_add(const float *a, const float *b, float *y, size_t n);

/* out[r, :] = table[ids[r], :] for n rows of width d (an embedding lookup);
 * ids in range. */
void ccr_ref_gather_rows(const float *table, size_t d, const int32_t *ids, size_t n, float *out);

/* For each segment s < n_seg: dst[seg_dst[s], :] += src[rows[p], :] for p
 * in [start[s], start[s + 1]), added one row at a time in that order (an
 * embedding gradient: the segments are the distinct ids, each listing its
 * rows in increasing order, so the result equals adding every row to its id
 * in row order).  Distinct segments name distinct dst rows. */
void ccr_ref_segment_add_rows(float *dst, size_t d, const float *src, const int32_t *rows,
                              const int32_t *start, const int32_t *seg_dst, size_t n_seg);

/* One LSTM timestep over batch rows of width d.  z [batch, 4d] holds the
 * pre-activations of the input, forget, candidate and output gates on entry
 * and sigmoid / sigmoid / tanh / sigmoid of them on return;
 * c = f c_prev + i g, tc = tanh(c), h = o tc (each [batch, d]). */
void ccr_ref_lstm_fwd(float *z, const float *c_prev, float *c, float *tc, float *h, size_t batch,
                      size_t d);

/* Its backward: z the activations and tc as the forward left them; dh =
 * dh_out + dh_rec (the gradient of h from above and from the next step);
 * dc [batch, d] holds dL/dc of the next step on entry and dL/dc_prev on
 * return; dz [batch, 4d] receives dL/d(pre-activations). */
void ccr_ref_lstm_bwd(const float *z, const float *c_prev, const float *tc, const float *dh_out,
                      const float *dh_rec, float *dc, float *dz, size_t batch, size_t d);

/* In-place softmax of one row of n >= 1 values in a fixed order (see
 * seq_ref.c); returns log(sum(exp(z))) of the input in double. */
double ccr_ref_softmax_row(float *z, size_t n);

/* Row softmax of z [rows, cols] in place; nll[r] = logsumexp(z_r) -
 * z_r[tgt[r]] in double, 0 where tgt[r] == -1 (not scored). */
void ccr_ref_softmax_nll(float *z, const int32_t *tgt, size_t rows, size_t cols, double *nll);

/* z (probabilities) becomes scale * (z - onehot(tgt)) row by row; rows with
 * tgt[r] == -1 become 0. */
void ccr_ref_softmax_nll_bwd(float *z, const int32_t *tgt, size_t rows, size_t cols, float scale);

#endif /* CCR_REF_H */
