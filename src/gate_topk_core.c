/*
 * gate_topk_core.c - noisy top-k gating of one row, shared by the topk and
 * hmoe gates.  Shazeer et al. 2017: H(x)_i = (x W_g)_i + N(0,1) *
 * Softplus((x W_noise)_i) (eq. 4, with t2t's noise_epsilon added to the
 * softplus), G(x) = Softmax(KeepTopK(H(x), k)) (eqs. 3, 5), and the smooth
 * load P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / std_i)
 * (eqs. 8-9), where kth_excluding is the (k+1)-th largest H when i is in the
 * top k and the k-th largest otherwise (t2t's threshold_if_in /
 * threshold_if_out).  The backward pass follows docs/GATES.md: gradients of
 * P reach the clean logit, the noise scale, and the entry of H that sets the
 * threshold (no stop-gradient, PAPERS.md section 2.7 item 6).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gate_topk_core.h"
#include "gate_util.h"
#include "internal.h"

static void *tk_calloc(size_t a, size_t b, size_t elem, bool *ok)
{
    size_t n;
    if (!*ok || !ccr_mul_ok(a, b, &n) || n == 0) {
        *ok = false;
        return NULL;
    }
    void *p = calloc(n, elem);
    if (p == NULL)
        *ok = false;
    return p;
}

ccr_status tk_core_init(tk_core *c, ccr_ctx *ctx, size_t rows, size_t n, size_t k,
                        double noise_eps)
{
    memset(c, 0, sizeof *c);
    size_t rn;
    if (!ccr_mul_ok(rows, n, &rn) || !ccr_mul_ok(rn, sizeof(double), &rn))
        CCR_FAIL(ctx, CCR_EINVAL, "gate buffers of %zu x %zu entries overflow", rows, n);
    c->rows = rows;
    c->n = n;
    c->k = k;
    c->ntop = k < n ? k + 1 : k;
    c->noise_eps = noise_eps;
    c->want_lse = true;
    bool ok = true;
    c->clean = tk_calloc(rows, n, sizeof(float), &ok);
    c->raw = tk_calloc(rows, n, sizeof(float), &ok);
    c->std = tk_calloc(rows, n, sizeof(float), &ok);
    c->sig = tk_calloc(rows, n, sizeof(double), &ok);
    c->noise = tk_calloc(rows, n, sizeof(float), &ok);
    c->h = tk_calloc(rows, n, sizeof(float), &ok);
    c->top = tk_calloc(rows, c->ntop, sizeof(int32_t), &ok);
    c->gates = tk_calloc(rows, k, sizeof(float), &ok);
    c->p = tk_calloc(rows, n, sizeof(double), &ok);
    c->lse = tk_calloc(rows, 1, sizeof(double), &ok);
    c->dclean = tk_calloc(rows, n, sizeof(float), &ok);
    c->draw = tk_calloc(rows, n, sizeof(float), &ok);
    c->hk = tk_calloc(k, 1, sizeof(float), &ok);
    c->dg = tk_calloc(k, 1, sizeof(float), &ok);
    c->dh = tk_calloc(n, 1, sizeof(float), &ok);
    c->dstd = tk_calloc(n, 1, sizeof(double), &ok);
    c->in_top = tk_calloc(n, 1, 1, &ok);
    if (!ok) {
        tk_core_free(c);
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate gate buffers (%zu rows of %zu)", rows, n);
    }
    return CCR_OK;
}

void tk_core_free(tk_core *c)
{
    free(c->clean);
    free(c->raw);
    free(c->std);
    free(c->sig);
    free(c->noise);
    free(c->h);
    free(c->top);
    free(c->gates);
    free(c->p);
    free(c->lse);
    free(c->dclean);
    free(c->draw);
    free(c->hk);
    free(c->dg);
    free(c->dh);
    free(c->dstd);
    free(c->in_top);
    memset(c, 0, sizeof *c);
}

bool tk_core_smooth(const tk_core *c, bool train) { return train && c->k < c->n; }

/* Marks the row's top-k members in c->in_top. */
static void tk_mark_top(tk_core *c, const int32_t *top)
{
    memset(c->in_top, 0, c->n);
    for (size_t s = 0; s < c->k; s++)
        c->in_top[top[s]] = 1;
}

/* The index j whose H is expert i's threshold (eq. 9): the (k+1)-th
 * largest if i is in the top k, else the k-th largest. */
static size_t tk_thr_index(const tk_core *c, const int32_t *top, size_t i)
{
    return (size_t)(c->in_top[i] ? top[c->k] : top[c->k - 1]);
}

void tk_core_row_forward(tk_core *c, size_t r, bool train, gsl_rng *rng)
{
    if (train)
        gate_noise_fill(c->noise + r * c->n, c->n, rng);
    tk_core_row_forward_drawn(c, r, train);
}

/* 1/sqrt(2 pi), the standard normal density at 0. */
#define TK_INV_SQRT_2PI 0.39894228040143267794
/* 1/sqrt(2). */
#define TK_SQRT1_2 0.70710678118654752440

void tk_core_row_forward_drawn(tk_core *c, size_t r, bool train)
{
    const size_t n = c->n, k = c->k;
    const float *restrict clean = c->clean + r * n, *restrict raw = c->raw + r * n;
    float *restrict std = c->std + r * n, *restrict noise = c->noise + r * n;
    float *restrict h = c->h + r * n;
    int32_t *top = c->top + r * c->ntop;
    if (train) {
        /* softplus(x) = max(x, 0) + log1p(e) and sigmoid(x) = (x >= 0 ? 1 :
         * e) / (1 + e) with e = exp(-|x|): one exp for both (the same values
         * as gate_softplus and gate_sigmoid, bit for bit); the sigmoid is
         * kept for the backward pass. */
        double *restrict sig = c->sig + r * n;
        const double eps = c->noise_eps;
        for (size_t i = 0; i < n; i++) {
            const double x = (double)raw[i];
            const double e = exp(-fabs(x));
            std[i] = (float)((x > 0.0 ? x : 0.0) + log1p(e) + eps);
            sig[i] = (x >= 0.0 ? 1.0 : e) / (1.0 + e);
        }
        for (size_t i = 0; i < n; i++)
            h[i] = (float)((double)clean[i] + (double)noise[i] * (double)std[i]);
    } else {
        memset(std, 0, n * sizeof *std);
        memset(noise, 0, n * sizeof *noise);
        memcpy(h, clean, n * sizeof *h);
    }
    gate_topk(h, n, c->ntop, top);
    for (size_t s = 0; s < k; s++)
        c->hk[s] = h[top[s]];
    gate_softmax(c->hk, k, c->gates + r * k);
    c->lse[r] = c->want_lse ? gate_logsumexp(clean, n) : 0.0;
    if (!tk_core_smooth(c, train))
        return;
    tk_mark_top(c, top);
    /* P = Phi(u) = erfc(-u / sqrt 2) / 2, u = (clean - thr) / std. */
    const double thr_in = (double)h[top[k]], thr_out = (double)h[top[k - 1]];
    const unsigned char *restrict in_top = c->in_top;
    double *restrict p = c->p + r * n;
    for (size_t i = 0; i < n; i++) {
        const double diff = (double)clean[i] - (in_top[i] ? thr_in : thr_out);
        if (std[i] > 0.0f)
            p[i] = 0.5 * erfc(-(diff / (double)std[i]) * TK_SQRT1_2);
        else /* noise scale underflowed (noise_eps = 0): a step, no gradient */
            p[i] = diff > 0.0 ? 1.0 : (diff < 0.0 ? 0.0 : 0.5);
    }
}

void tk_core_row_backward(tk_core *c, size_t r, bool train, const float *dg,
                          const double *dload, double zcoef)
{
    const size_t n = c->n, k = c->k;
    const float *restrict clean = c->clean + r * n;
    const float *restrict std = c->std + r * n, *restrict noise = c->noise + r * n;
    const float *restrict h = c->h + r * n;
    const int32_t *top = c->top + r * c->ntop;
    float *restrict dclean = c->dclean + r * n, *restrict draw = c->draw + r * n;
    float *restrict dh = c->dh;
    double *restrict dstdv = c->dstd;
    memset(dh, 0, n * sizeof *dh);
    memset(dstdv, 0, n * sizeof *dstdv);
    /* Through the gate values: softmax backward over the kept k. */
    if (dg != NULL) {
        memset(c->dg, 0, k * sizeof(float));
        gate_softmax_backward(c->gates + r * k, dg, k, c->dg);
        for (size_t s = 0; s < k; s++)
            dh[top[s]] += c->dg[s];
    }
    memset(dclean, 0, n * sizeof *dclean);
    /* Through the smooth load: P = Phi(u), u = (clean - thr) / std. */
    if (dload != NULL && tk_core_smooth(c, train)) {
        tk_mark_top(c, top);
        for (size_t i = 0; i < n; i++) {
            if (dload[i] == 0.0 || !(std[i] > 0.0f))
                continue;
            size_t j = tk_thr_index(c, top, i);
            double s = (double)std[i];
            double u = ((double)clean[i] - (double)h[j]) / s;
            double t = dload[i] * (TK_INV_SQRT_2PI * exp(-0.5 * u * u)) / s; /* dL/dclean_i */
            dclean[i] += (float)t;
#ifndef CCR_MUTANT_LOAD_THRESHOLD  /* mutants: tests/gradcheck_mutants.sh */
            dh[j] -= (float)t;  /* dL/dthr, thr = H_j */
#endif
#ifndef CCR_MUTANT_LOAD_STD
            dstdv[i] -= t * u;
#endif
        }
    }
    /* z-loss c * lse^2: d/dclean = 2 c lse softmax(clean). */
#ifdef CCR_MUTANT_TOPK_ZLOSS
    zcoef = 0.0;
#endif
    if (zcoef != 0.0) {
        double g = 2.0 * zcoef * c->lse[r];
        for (size_t i = 0; i < n; i++)
            dclean[i] += (float)(g * exp((double)clean[i] - c->lse[r]));
    }
    /* H = clean + noise * std; std = softplus(raw) + eps, dstd/draw =
     * sigmoid(raw), kept by the forward pass. */
    for (size_t i = 0; i < n; i++)
        dclean[i] += dh[i];
    if (train) {
        const double *restrict sig = c->sig + r * n;
        for (size_t i = 0; i < n; i++) {
            double dstd = dstdv[i] + (double)dh[i] * (double)noise[i]
#ifdef CCR_MUTANT_NOISE_STD
                                         * 0.0
#endif
                ;
            draw[i] = (float)(dstd * sig[i]);
        }
    }
}

void tk_cv2_grad(const double *v, size_t n, double coef, double *dv)
{
    if (n <= 1 || coef == 0.0) {
        for (size_t i = 0; i < n; i++)
            dv[i] = 0.0;
        return;
    }
    double mean = 0.0, var = 0.0;
    for (size_t i = 0; i < n; i++)
        mean += v[i];
    mean /= (double)n;
    for (size_t i = 0; i < n; i++)
        var += (v[i] - mean) * (v[i] - mean);
    var /= (double)n;
    double den = mean * mean + 1e-10;
    /* CV^2 = var / den: d var/dv_i = 2 (v_i - mean) / n (the mean's own
     * derivative cancels), d den/dv_i = 2 mean / n. */
    for (size_t i = 0; i < n; i++)
        dv[i] = coef * ((2.0 / (double)n) * (v[i] - mean) / den -
                        var * (2.0 * mean / (double)n) / (den * den));
}

static ccr_status tk_check_nonneg(ccr_ctx *ctx, const char *name, double v)
{
    if (!isfinite(v) || v < 0.0)
        CCR_FAIL(ctx, CCR_EINVAL, "%s = %g: must be finite and >= 0", name, v);
    return CCR_OK;
}

ccr_status tk_check_common(ccr_ctx *ctx, const ccr_gate_config *cfg)
{
    CCR_TRY(tk_check_nonneg(ctx, "w_importance", cfg->w_importance));
    CCR_TRY(tk_check_nonneg(ctx, "w_load", cfg->w_load));
    CCR_TRY(tk_check_nonneg(ctx, "z_loss", cfg->z_loss));
    CCR_TRY(tk_check_nonneg(ctx, "noise_eps", cfg->noise_eps));
    return CCR_OK;
}

void tk_fill_stats(ccr_gate_stats *st, const ccr_gate_config *cfg, const double *imp,
                   const double *load, const double *counts, size_t n, double loss_z)
{
    st->loss_importance = cfg->w_importance * ccr_cv_squared(imp, n);
    st->loss_load = cfg->w_load * ccr_cv_squared(load, n);
    st->loss_z = loss_z;
    st->aux_loss = st->loss_importance + st->loss_load + loss_z;
    st->cv_importance = gate_cv(imp, n);
    st->cv_load = gate_cv(load, n);
    st->cv_load_count = gate_cv(counts, n);
    st->max_mean_load = gate_max_over_mean(load, n);
    st->max_mean_count = gate_max_over_mean(counts, n);
    st->dropped = 0;
}
