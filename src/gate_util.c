/*
 * gate_util.c - numerical building blocks shared by the gate types:
 * matrix products through cblas, softmax and its backward, top-k with a
 * lowest-index tie-break, softplus, log-sum-exp, CV^2 (t2t's CVSquared) and
 * the normal CDF (GSL).
 */
#include <gsl/gsl_cblas.h> /* the cblas prototypes; the symbols come from OpenBLAS */
#include <gsl/gsl_cdf.h>
#include <gsl/gsl_randist.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "gate_util.h"

void gate_matmul(const float *x, const float *w, size_t batch, size_t d, size_t n,
                 float *out, bool accumulate)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)batch, (int)n, (int)d, 1.0f,
                x, (int)d, w, (int)n, accumulate ? 1.0f : 0.0f, out, (int)n);
}

void gate_matmul_backward(const float *x, const float *w, const float *g, size_t batch,
                          size_t d, size_t n, float *dw, float *dx)
{
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)d, (int)n, (int)batch, 1.0f, x,
                (int)d, g, (int)n, 1.0f, dw, (int)n);
    if (dx != NULL)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)batch, (int)d, (int)n, 1.0f,
                    g, (int)n, w, (int)n, 1.0f, dx, (int)d);
}

void gate_softmax(const float *z, size_t n, float *p)
{
    float m = z[0];
    for (size_t i = 1; i < n; i++)
        m = z[i] > m ? z[i] : m;
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += exp((double)z[i] - (double)m);
    for (size_t i = 0; i < n; i++)
        p[i] = (float)(exp((double)z[i] - (double)m) / s);
}

void gate_softmax_backward(const float *p, const float *dp, size_t n, float *dz)
{
    double dot = 0.0;
    for (size_t i = 0; i < n; i++)
        dot += (double)p[i] * (double)dp[i];
    for (size_t i = 0; i < n; i++)
        dz[i] += (float)((double)p[i] * ((double)dp[i] - dot));
}

void gate_topk(const float *v, size_t n, size_t k, int32_t *idx)
{
    /* Selection by insertion into a sorted list of k: O(n k), fine for the
     * k <= 8 of MoE gates; ties keep the earlier (lower) index first. */
    size_t have = 0;
    for (size_t i = 0; i < n; i++) {
        if (have == k && !(v[i] > v[idx[k - 1]]))
            continue;
        size_t pos = have < k ? have : k - 1;
        while (pos > 0 && v[i] > v[idx[pos - 1]]) {
            idx[pos] = idx[pos - 1];
            pos--;
        }
        idx[pos] = (int32_t)i;
        if (have < k)
            have++;
    }
}

double gate_softplus(double x) { return x > 0 ? x + log1p(exp(-x)) : log1p(exp(x)); }

double gate_sigmoid(double x)
{
    if (x >= 0)
        return 1.0 / (1.0 + exp(-x));
    double e = exp(x);
    return e / (1.0 + e);
}

double gate_logsumexp(const float *z, size_t n)
{
    double m = z[0];
    for (size_t i = 1; i < n; i++)
        m = z[i] > m ? z[i] : m;
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += exp((double)z[i] - m);
    return m + log(s);
}

void gate_init_weights(float *w, size_t n, size_t d_in, bool randomize, gsl_rng *rng)
{
    if (randomize)
        gate_init_normal(w, n, 1.0 / sqrt((double)d_in), rng);
    else
        memset(w, 0, n * sizeof *w);
}

void gate_init_normal(float *w, size_t n, double sd, gsl_rng *rng)
{
    for (size_t i = 0; i < n; i++)
        w[i] = (float)gsl_ran_gaussian(rng, sd);
}

void gate_noise_fill(float *z, size_t n, gsl_rng *rng)
{
    for (size_t i = 0; i < n; i++)
        z[i] = (float)gsl_ran_gaussian_ziggurat(rng, 1.0);
}

ccr_status gate_declare(ccr_arena *a, const char *prefix, const char *name, size_t rank,
                        const size_t *shape, size_t *idx)
{
    char full[CCR_ARENA_MAX_NAME];
    int w = snprintf(full, sizeof full, "%s%s", prefix, name);
    if (w < 0 || (size_t)w >= sizeof full)
        return ccr_arena_add(a, "", rank, shape, idx); /* reports "name length" */
    return ccr_arena_add(a, full, rank, shape, idx);
}

double ccr_cv_squared(const double *v, size_t n)
{
    if (v == NULL || n <= 1)
        return 0.0;
    double mean = 0.0;
    for (size_t i = 0; i < n; i++)
        mean += v[i];
    mean /= (double)n;
    double var = 0.0;
    for (size_t i = 0; i < n; i++)
        var += (v[i] - mean) * (v[i] - mean);
    var /= (double)n;
    return var / (mean * mean + 1e-10);
}

double ccr_normal_cdf(double z) { return gsl_cdf_ugaussian_P(z); }

double gate_cv(const double *v, size_t n) { return sqrt(ccr_cv_squared(v, n)); }

double gate_max_over_mean(const double *v, size_t n)
{
    double mx = 0.0, sum = 0.0;
    for (size_t i = 0; i < n; i++) {
        sum += v[i];
        mx = v[i] > mx ? v[i] : mx;
    }
    return sum > 0.0 ? mx / (sum / (double)n) : 0.0;
}

size_t gate_count_distinct(const int32_t *ids, size_t n, size_t n_matrices,
                           unsigned char *seen)
{
    memset(seen, 0, n_matrices);
    size_t d = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] >= 0 && !seen[ids[i]]) {
            seen[ids[i]] = 1;
            d++;
        }
    }
    return d;
}
