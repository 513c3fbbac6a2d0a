/*
 * gate_topk.cu - the device half of gate "topk" (src/gate_topk.c): noisy
 * top-k gating, Shazeer et al. 2017 eqs. 3-5, with the importance and
 * smooth load losses (eqs. 6-11) and the optional ST-MoE z-loss.
 *
 * Forward: clean = x W_g and, in train, raw = x W_noise by the backend's
 * GEMM; the batch x E N(0, 1) draws on the host with gdev_noise (the CPU's
 * tk_core_row_forward draws E per example, examples in order: the same
 * count and order), uploaded; the rows on the device (cuda/gate_topk_core.cu).
 * Importance, the true counts and the smooth Load are summed per expert
 * over the batch on the device in the CPU's order (one thread per expert),
 * downloaded, and the losses computed on the host by tk_fill_stats, the CPU
 * gate's function.  The routing weights are the core's gates ([batch, k],
 * the table's layout); ids are the first k of each row's top.
 * Backward: tk_cv2_grad on the host from the forward's Importance and Load
 * (as topk_backward does), uploaded; dg = dweights + dImportance per slot,
 * the core's row backward, then the weight gradients and dx by GEMM in the
 * CPU's order (w_g, then w_noise).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gate_topk_core.cuh"  // provides: tkd_core
#include "gate_topk_core.h"    // provides: tk_cv2_grad, tk_fill_stats

#define GTOPK_BLOCK 256

typedef struct gtopk_state {
    ccr_backend *be;
    ccr_gate_config cfg;
    size_t d, e, k, max_batch, batch;
    bool train;                 /* mode of the last forward */
    ccr_arena *arena;           /* NULL until bind */
    size_t i_wg, i_wn;
    tkd_core core;              /* rows = max_batch, width E, top k */
    int32_t *ids;               /* device [max_batch, k] route ids */
    float *dg;                  /* device [max_batch, k] dL/d(gate value) */
    double *sums;               /* device [3E]: Importance | counts | smooth Load */
    double *dvec;               /* device [2E]: dImportance | dLoad */
    int *flag;                  /* device int for gdev_find_nonfinite */
    float *noise_h;             /* host [max_batch, E] the draws before upload */
    double *sums_h;             /* host [3E]: Importance | counts | Load (= counts if not
                                   smooth), of the last forward */
    double *dvec_h;             /* host [2E] */
    double *lse_h;              /* host [max_batch] */
} gtopk_state;

/* route ids: the first k of each row's top (topk_forward's ids[b k + q] =
 * top[q]). */
static __global__ void gtopk_ids_kernel(const int32_t *top, size_t ntop, size_t k, size_t total,
                                        int32_t *ids)
{
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x)
        ids[t] = top[(t / k) * ntop + t % k];
}

/* topk_backward's dg[q] = (float)((double)dweights[b k + q] + dimp[ids[b k + q]]):
 * Importance is the sum of the weights, its gradient joins dweights. */
static __global__ void gtopk_dg_kernel(const float *dweights, const double *dimp,
                                       const int32_t *ids, size_t total, float *dg)
{
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x)
        dg[t] = (float)((double)dweights[t] + dimp[ids[t]]);
}

static void gtopk_free(void *state)
{
    gtopk_state *s = (gtopk_state *)state;
    ccr_backend *be = s->be;
    tkd_core_free(&s->core);
    if (be != NULL) {
        ccr_backend_free_buffer(be, s->ids);
        ccr_backend_free_buffer(be, s->dg);
        ccr_backend_free_buffer(be, s->sums);
        ccr_backend_free_buffer(be, s->dvec);
        ccr_backend_free_buffer(be, s->flag);
    }
    free(s->noise_h);
    free(s->sums_h);
    free(s->dvec_h);
    free(s->lse_h);
    memset(s, 0, sizeof *s);
}

static ccr_status gtopk_init(void *state, ccr_backend *be, const ccr_gate *g, size_t max_batch)
{
    gtopk_state *s = (gtopk_state *)state;
    const ccr_gate_config *cfg = ccr_gate_get_config(g);
    if (cfg == NULL)
        CCR_FAIL(be->ctx, CCR_EINVAL, "gate topk: no host gate");
    /* The host gate validated the configuration (topk_init); re-checked
     * here only where a bad value would index out of bounds. */
    const size_t e = cfg->n_experts, k = cfg->k;
    if (e == 0 || k == 0 || k > e || ccr_gate_n_matrices(g) != e || ccr_gate_slots(g) != k)
        CCR_FAIL(be->ctx, CCR_EINVAL, "gate topk: k = %zu, n_experts = %zu", k, e);
    size_t bk, be_n, e3;
    if (!ccr_mul_ok(max_batch, k, &bk) || !ccr_mul_ok(max_batch, e, &be_n) ||
        !ccr_mul_ok(e, 3, &e3))
        CCR_FAIL(be->ctx, CCR_EINVAL, "gate topk: sizes overflow (n_experts %zu, batch %zu)", e,
                 max_batch);
    s->be = be;
    s->cfg = *cfg;
    s->d = cfg->d_in;
    s->e = e;
    s->k = k;
    s->max_batch = max_batch;
    CCR_TRY(tkd_core_init(&s->core, be, max_batch, e, k, cfg->noise_eps));
    s->core.want_lse = cfg->z_loss > 0.0; /* lse is read only for the z-loss */
    ccr_status st = CCR_OK;
    s->ids = (int32_t *)tkd_dev_buf(&st, be, bk, sizeof(int32_t));
    s->dg = (float *)tkd_dev_buf(&st, be, bk, sizeof(float));
    s->sums = (double *)tkd_dev_buf(&st, be, e3, sizeof(double));
    s->dvec = (double *)tkd_dev_buf(&st, be, e, 2 * sizeof(double));
    s->flag = (int *)tkd_dev_buf(&st, be, 1, sizeof(int));
    s->noise_h = (float *)tkd_host_buf(&st, be, be_n, sizeof(float));
    s->sums_h = (double *)tkd_host_buf(&st, be, e3, sizeof(double));
    s->dvec_h = (double *)tkd_host_buf(&st, be, e, 2 * sizeof(double));
    s->lse_h = (double *)tkd_host_buf(&st, be, max_batch, sizeof(double));
    if (st != CCR_OK) {
        gtopk_free(s);
        return st;
    }
    return CCR_OK;
}

static ccr_status gtopk_bind(void *state, ccr_arena *a, const char *prefix)
{
    gtopk_state *s = (gtopk_state *)state;
    CCR_TRY(gdev_find(a, s->be->ctx, prefix, "w_g", &s->i_wg));
    CCR_TRY(gdev_find(a, s->be->ctx, prefix, "w_noise", &s->i_wn));
    s->arena = a;
    return CCR_OK;
}

static ccr_status gtopk_forward(void *state, const float *x, size_t batch, bool train,
                                gsl_rng *rng, ccr_route *route, ccr_gate_stats *stats)
{
    gtopk_state *s = (gtopk_state *)state;
    ccr_backend *be = s->be;
    const float *wg = s->arena ? ccr_arena_value(s->arena, s->i_wg) : NULL;
    const float *wn = s->arena ? ccr_arena_value(s->arena, s->i_wn) : NULL;
    if (wg == NULL || wn == NULL)
        CCR_FAIL(be->ctx, CCR_EINVAL, "gate topk: parameters not bound to a finalized arena");
    if (batch == 0 || batch > s->max_batch)
        CCR_FAIL(be->ctx, CCR_EBADLEN, "gate topk: batch %zu not in 1..%zu", batch,
                 s->max_batch);
    if (train && rng == NULL)
        CCR_FAIL(be->ctx, CCR_EINVAL, "topk: rng is NULL in train mode");
    const size_t d = s->d, e = s->e, k = s->k, bk = batch * k; /* <= max_batch k */
    tkd_core *c = &s->core;
    const bool smooth = tkd_core_smooth(c, train);
    CCR_TRY(be->k->gemm(be, false, false, batch, e, d, 1.0f, x, d, wg, e, 0.0f, c->clean, e));
    if (train) {
        CCR_TRY(be->k->gemm(be, false, false, batch, e, d, 1.0f, x, d, wn, e, 0.0f, c->raw, e));
        /* tk_core_row_forward draws E per row, rows in order: batch E in all. */
        CCR_TRY(gdev_noise(be, rng, s->noise_h, c->noise, batch * e));
    }
    CCR_TRY(tkd_core_forward(c, batch, train));
    gtopk_ids_kernel<<<ccr_grid(bk, GTOPK_BLOCK), GTOPK_BLOCK, 0, gdev_stream(be)>>>(
        c->top, c->ntop, k, bk, s->ids);
    CCR_CUDA_LAUNCHED(be);
    /* ccr_gate_forward's check, before anything is reported. */
    CCR_TRY(tkd_check_weights(be, "topk", c->gates, batch, k, s->flag));
    /* topk_forward's per-example loop: imp[top[q]] += g[q], counts[top[q]] += 1
     * and load[i] += p[b, i], in example order. */
    double *imp = s->sums_h, *counts = s->sums_h + e, *load = s->sums_h + 2 * e;
    CCR_TRY(tkd_route_sums(be, s->ids, c->gates, batch, k, e, s->sums, s->sums + e));
    if (smooth)
        CCR_TRY(tkd_colsum_d(be, c->p, batch, e, e, s->sums + 2 * e));
    CCR_TRY(ccr_backend_get(be, s->sums_h, s->sums, (smooth ? 3 : 2) * e * sizeof(double)));
    if (!smooth)
        memcpy(load, counts, e * sizeof(double));
    double zsum = 0.0;
    if (s->cfg.z_loss > 0.0) { /* else lse is 0 on the CPU and loss_z is 0 */
        CCR_TRY(ccr_backend_get(be, s->lse_h, c->lse, batch * sizeof(double)));
        for (size_t b = 0; b < batch; b++)
            zsum += s->lse_h[b] * s->lse_h[b];
    }
    double loss_z = s->cfg.z_loss > 0.0 ? s->cfg.z_loss * zsum / (double)batch : 0.0;
    tk_fill_stats(stats, &s->cfg, imp, load, counts, e, loss_z);
    s->batch = batch;
    s->train = train;
    route->batch = batch;
    route->slots = k;
    route->n_matrices = e;
    route->ids = s->ids;
    route->weights = c->gates;
    return CCR_OK;
}

static ccr_status gtopk_backward(void *state, const ccr_gate_bwd_args *a)
{
    gtopk_state *s = (gtopk_state *)state;
    ccr_backend *be = s->be;
    const size_t d = s->d, e = s->e, k = s->k, batch = a->batch;
    const bool train = s->train, smooth = tkd_core_smooth(&s->core, train);
    if (s->arena == NULL)
        CCR_FAIL(be->ctx, CCR_EINVAL, "gate topk: parameters not bound");
    float *wg = ccr_arena_value(s->arena, s->i_wg), *wn = ccr_arena_value(s->arena, s->i_wn);
    float *dwg = ccr_arena_grad(s->arena, s->i_wg), *dwn = ccr_arena_grad(s->arena, s->i_wn);
    if (wg == NULL || dwg == NULL || wn == NULL || dwn == NULL)
        CCR_FAIL(be->ctx, CCR_EINVAL, "gate topk: parameters not bound to a finalized arena");
    if (s->batch == 0 || batch != s->batch)
        CCR_FAIL(be->ctx, CCR_EINVAL, "gate topk: backward batch %zu, last forward %zu", batch,
                 s->batch);
    /* topk_backward: the CV^2 gradients from the forward's Importance and Load. */
    double *dimp = s->dvec_h, *dload = s->dvec_h + e;
    tk_cv2_grad(s->sums_h, e, s->cfg.w_importance, dimp);
    tk_cv2_grad(s->sums_h + 2 * e, e, smooth ? s->cfg.w_load : 0.0, dload);
    CCR_TRY(ccr_backend_set(be, s->dvec, s->dvec_h, 2 * e * sizeof(double)));
    const double zcoef = s->cfg.z_loss > 0.0 ? s->cfg.z_loss / (double)batch : 0.0;
    tkd_core *c = &s->core;
    const size_t bk = batch * k;
    gtopk_dg_kernel<<<ccr_grid(bk, GTOPK_BLOCK), GTOPK_BLOCK, 0, gdev_stream(be)>>>(
        a->dweights, s->dvec, s->ids, bk, s->dg);
    CCR_CUDA_LAUNCHED(be);
    CCR_TRY(tkd_core_backward(c, batch, train, s->dg, smooth ? s->dvec + e : NULL, NULL, zcoef));
    /* gate_matmul_backward: dW += x^T g, then dx += g W^T; w_g first. */
    CCR_TRY(be->k->gemm(be, true, false, d, e, batch, 1.0f, a->x, d, c->dclean, e, 1.0f, dwg,
                        e));
    if (a->dx != NULL)
        CCR_TRY(be->k->gemm(be, false, true, batch, d, e, 1.0f, c->dclean, e, wg, e, 1.0f, a->dx,
                            d));
    if (train) {
        CCR_TRY(be->k->gemm(be, true, false, d, e, batch, 1.0f, a->x, d, c->draw, e, 1.0f, dwn,
                            e));
        if (a->dx != NULL)
            CCR_TRY(be->k->gemm(be, false, true, batch, d, e, 1.0f, c->draw, e, wn, e, 1.0f,
                                a->dx, d));
    }
    return CCR_OK;
}

const ccr_gate_dev_type ccr_gate_dev_topk = {
    .host = &ccr_gate_topk,
    .state_size = sizeof(gtopk_state),
    .init = gtopk_init,
    .free = gtopk_free,
    .bind = gtopk_bind,
    .forward = gtopk_forward,
    .backward = gtopk_backward,
};
