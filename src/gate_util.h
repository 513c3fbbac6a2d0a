/*
 * gate_util.h - numerical building blocks shared by the gate types.
 *
 * All functions are deterministic and work on host memory.  Reductions run
 * in double in index order.
 */
#ifndef CCR_GATE_UTIL_H
#define CCR_GATE_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <gsl/gsl_rng.h>

#include "ccr/ccr_arena.h"
#include "ccr/ccr_common.h"
#include "ccr/ccr_gate.h"

CCR_BEGIN_DECLS

/* out[B, n] = x[B, d] W[d, n] (+ out if accumulate), via cblas_sgemm. */
void gate_matmul(const float *x, const float *w, size_t batch, size_t d, size_t n,
                 float *out, bool accumulate);

/* dW[d, n] += x^T g (x [B, d], g [B, n]); dx[B, d] += g W^T if dx != NULL. */
void gate_matmul_backward(const float *x, const float *w, const float *g, size_t batch,
                          size_t d, size_t n, float *dw, float *dx);

/* p[i] = softmax(z)[i] over n entries, max-subtracted, sum in double. */
void gate_softmax(const float *z, size_t n, float *p);

/* Given p = softmax(z) and dp = dL/dp, adds dL/dz to dz:
 * dz_i += p_i (dp_i - sum_j p_j dp_j). */
void gate_softmax_backward(const float *p, const float *dp, size_t n, float *dz);

/* Indices of the k largest entries of v[n], by decreasing value; ties go to
 * the lower index.  k <= n. */
void gate_topk(const float *v, size_t n, size_t k, int32_t *idx);

/* log(1 + e^x) without overflow, and its derivative, the logistic. */
double gate_softplus(double x);
double gate_sigmoid(double x);

/* log-sum-exp of z[n] in double (the z-loss's inner term). */
double gate_logsumexp(const float *z, size_t n);

/* Fills n floats with N(0, 1/d_in) draws (cfg->randomize) or zeros. */
void gate_init_weights(float *w, size_t n, size_t d_in, bool randomize, gsl_rng *rng);

/* Fills n floats with N(0, sd^2) draws. */
void gate_init_normal(float *w, size_t n, double sd, gsl_rng *rng);

/* Fills n floats with the noisy gates' N(0, 1) draws, one per entry in
 * index order: gsl_ran_gaussian_ziggurat(rng, 1.0), GSL's fastest exact
 * Gaussian (the training step draws one per gate entry; the polar
 * gsl_ran_gaussian cost hmoe's E = 4096 step more, docs/RESULTS.md). */
void gate_noise_fill(float *z, size_t n, gsl_rng *rng);

/* Declares a tensor named prefix+name; returns its arena index in *idx. */
ccr_status gate_declare(ccr_arena *a, const char *prefix, const char *name, size_t rank,
                        const size_t *shape, size_t *idx);

/* Per-expert vectors of one batch: CV (sqrt of ccr_cv_squared) and
 * max/mean (0 if the mean is 0). */
double gate_cv(const double *v, size_t n);
double gate_max_over_mean(const double *v, size_t n);

/* Number of distinct ids >= 0 among ids[n], given n_matrices; uses seen
 * (n_matrices bytes of scratch). */
size_t gate_count_distinct(const int32_t *ids, size_t n, size_t n_matrices,
                           unsigned char *seen);

CCR_END_DECLS

#endif /* CCR_GATE_UTIL_H */
