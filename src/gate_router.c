/*
 * gate_router.c - the softmax router of the dense gate (Shazeer et al.
 * 2017, eq. 2: G(x) = Softmax(x W_g)) and of the Switch Transformer
 * (Fedus et al., p_i(x) = softmax over all N experts of the router logits),
 * with the router z-loss of ST-MoE (Zoph et al. 2022, eq. 5):
 *
 *     L_z = z * (1/B) sum_b (log sum_j exp(logits_{b,j}))^2,
 *     dL_z/dlogits_{b,j} = z * (2/B) * lse_b * p_{b,j}
 *
 * (the derivative of logsumexp is the softmax).  Kept apart from the gates
 * so that both use one implementation of the logits, the softmax and the
 * z-loss; the gates add their own dL/dp through the softmax backward.
 */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gate_router.h"
#include "gate_util.h"  // provides: gate_matmul, gate_softmax, gate_logsumexp, ...
#include "internal.h"   // provides: CCR_FAIL, CCR_FAIL_EXPR, ccr_mul_ok

ccr_status gate_router_init(gate_router *r, ccr_ctx *ctx, const char *gate, size_t d_in,
                            size_t n, double z_loss, size_t max_batch)
{
    if (n == 0)
        CCR_FAIL(ctx, CCR_EINVAL, "gate %s: n_experts is 0", gate);
    if (!isfinite(z_loss) || z_loss < 0.0)
        CCR_FAIL(ctx, CCR_EINVAL, "gate %s: z_loss %g must be finite and >= 0", gate, z_loss);
    /* cblas takes int extents; route ids are int32. */
    if (d_in > INT_MAX || n > INT_MAX || n > INT32_MAX || max_batch > INT_MAX)
        CCR_FAIL(ctx, CCR_EINVAL,
                 "gate %s: d_in %zu, n_experts %zu or max_batch %zu above %d", gate, d_in, n,
                 max_batch, INT_MAX);
    size_t wn, bn;
    if (!ccr_mul_ok(d_in, n, &wn) || !ccr_mul_ok(max_batch, n, &bn) ||
        bn > SIZE_MAX / sizeof(float))
        CCR_FAIL(ctx, CCR_EINVAL, "gate %s: d_in %zu x n_experts %zu x max_batch %zu overflows",
                 gate, d_in, n, max_batch);
    memset(r, 0, sizeof *r);
    r->ctx = ctx;
    r->gate = gate;
    r->d_in = d_in;
    r->n = n;
    r->max_batch = max_batch;
    r->z_loss = z_loss;
    r->logits = ccr_mallocn(bn, sizeof(float));
    r->probs = ccr_mallocn(bn, sizeof(float));
    r->dz = ccr_mallocn(bn, sizeof(float));
    r->lse = ccr_mallocn(max_batch, sizeof(double));
    if (r->logits == NULL || r->probs == NULL || r->dz == NULL || r->lse == NULL) {
        gate_router_free(r);
        CCR_FAIL(ctx, CCR_ENOMEM, "gate %s: cannot allocate router buffers for %zu x %zu",
                 gate, max_batch, n);
    }
    return CCR_OK;
}

void gate_router_free(gate_router *r)
{
    free(r->logits);
    free(r->probs);
    free(r->dz);
    free(r->lse);
    r->logits = r->probs = r->dz = NULL;
    r->lse = NULL;
}

ccr_status gate_router_declare(gate_router *r, ccr_arena *a, const char *prefix)
{
    size_t shape[2] = {r->d_in, r->n};
    CCR_TRY(gate_declare(a, prefix, "w_g", 2, shape, &r->w_idx));
    r->arena = a;
    return CCR_OK;
}

/* The host pointer to W_g, or NULL (with a message) before declare/finalize. */
static float *router_weights(gate_router *r)
{
    float *w = r->arena ? ccr_arena_value(r->arena, r->w_idx) : NULL;
    if (w == NULL)
        (void)CCR_FAIL_EXPR(r->ctx, CCR_EINVAL,
                            "gate %s: parameters not declared or arena not finalized", r->gate);
    return w;
}

ccr_status gate_router_init_params(gate_router *r, double sd, gsl_rng *rng)
{
    float *w = router_weights(r);
    if (w == NULL)
        return CCR_EINVAL;
    if (sd > 0.0)
        gate_init_normal(w, r->d_in * r->n, sd, rng);
    else
        gate_init_weights(w, r->d_in * r->n, r->d_in, false, rng);
    return CCR_OK;
}

ccr_status gate_router_forward(gate_router *r, const float *x, size_t batch, double *zsum_out)
{
    const float *w = router_weights(r);
    if (w == NULL)
        return CCR_EINVAL;
    const size_t n = r->n;
    gate_matmul(x, w, batch, r->d_in, n, r->logits, false);
    double zsum = 0.0;
    for (size_t b = 0; b < batch; b++) {
        const float *z = r->logits + b * n;
        gate_softmax(z, n, r->probs + b * n);
        if (r->z_loss > 0.0) {
            r->lse[b] = gate_logsumexp(z, n);
            zsum += r->lse[b] * r->lse[b];
        }
    }
    *zsum_out = zsum;
    r->zbatch = (double)batch;
    return CCR_OK;
}

double gate_router_zloss(gate_router *r, double zsum, size_t batch)
{
    r->zbatch = (double)batch;
    return r->z_loss > 0.0 ? r->z_loss * zsum / (double)batch : 0.0;
}

float *gate_router_grad_begin(gate_router *r, size_t batch)
{
    memset(r->dz, 0, batch * r->n * sizeof(float));
    return r->dz;
}

ccr_status gate_router_grad_end(gate_router *r, const float *x, size_t batch, float *dx)
{
    const float *w = router_weights(r);
    if (w == NULL)
        return CCR_EINVAL;
    float *dw = ccr_arena_grad(r->arena, r->w_idx);
    const size_t n = r->n;
#ifndef CCR_MUTANT_ROUTER_ZLOSS  /* tests/gradcheck_mutants.sh */
    if (r->z_loss > 0.0) {
#else
    if (0) {
#endif
        const double c = 2.0 * r->z_loss / r->zbatch;
        for (size_t b = 0; b < batch; b++) {
            const double g = c * r->lse[b];
            const float *p = r->probs + b * n;
            float *dz = r->dz + b * n;
            for (size_t j = 0; j < n; j++)
                dz[j] += (float)(g * (double)p[j]);
        }
    }
    gate_matmul_backward(x, w, r->dz, batch, r->d_in, n, dw, dx);
    return CCR_OK;
}
