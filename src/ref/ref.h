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

#endif /* CCR_REF_H */
