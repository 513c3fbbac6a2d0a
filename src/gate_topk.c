/*
 * gate_topk.c - noisy top-k gating (Shazeer et al. 2017).  Each example
 * keeps the k largest of H(x) = x W_g + N(0,1) * (Softplus(x W_noise) +
 * noise_eps) (eq. 4) and weights them by G(x) = Softmax(KeepTopK(H, k))
 * (eqs. 3, 5).  The auxiliary losses are w_importance * CV(Importance)^2
 * with Importance = sum over the batch of G (eqs. 6-7) and w_load *
 * CV(Load)^2 (eq. 11) with the smooth Load_i = sum_x P(x, i),
 * P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / std_i) (eqs. 8-10),
 * replaced by the true counts in eval or when k == E; plus the optional
 * ST-MoE z-loss.  The per-row work lives in gate_topk_core.c, which hmoe
 * shares; this file adds the batch matrix products, the routing table, the
 * batch losses and their gradients (docs/GATES.md, "topk").
 */
#include <stdlib.h>
#include <string.h>

#include "gate_topk_core.h"
#include "gate_util.h"
#include "internal.h"

typedef struct topk_state {
    ccr_ctx *ctx;
    ccr_gate_config cfg;
    size_t d, e, k, max_batch, batch;
    bool train;                 /* mode of the last forward */
    ccr_arena *arena;
    size_t i_wg, i_wn;
    tk_core core;               /* rows = max_batch, width E */
    int32_t *ids;               /* [max_batch, k] */
    float *weights;             /* [max_batch, k] */
    double *imp, *load, *counts, *dimp, *dload;  /* [E] */
    float *imp_f, *load_f;      /* [E] exported copies */
    unsigned char *seen;        /* [E] */
    float *dg;                  /* [k] */
    double gbatch;              /* the last forward's (global) batch */
    ccr_comm *comm;             /* expert parallelism: statistics over its ranks (or NULL) */
    double *red;                /* [3 E + 2] Importance, Load, counts, sum lse^2, batch */
} topk_state;

static void topk_free(void *state)
{
    topk_state *s = state;
    tk_core_free(&s->core);
    free(s->ids);
    free(s->weights);
    free(s->imp);
    free(s->load);
    free(s->counts);
    free(s->dimp);
    free(s->dload);
    free(s->imp_f);
    free(s->load_f);
    free(s->seen);
    free(s->dg);
    free(s->red);
    memset(s, 0, sizeof *s);
}

static ccr_status topk_init(void *state, ccr_ctx *ctx, const ccr_gate_config *cfg,
                            size_t max_batch)
{
    topk_state *s = state;
    if (cfg->n_experts == 0)
        CCR_FAIL(ctx, CCR_EINVAL, "topk: n_experts is 0");
    if (cfg->k == 0 || cfg->k > cfg->n_experts)
        CCR_FAIL(ctx, CCR_EINVAL, "topk: k = %zu not in 1..n_experts (%zu)", cfg->k,
                 cfg->n_experts);
    CCR_TRY(tk_check_common(ctx, cfg));
    size_t dk, de;
    if (cfg->n_experts > (size_t)INT32_MAX || !ccr_mul_ok(cfg->d_in, cfg->n_experts, &de) ||
        !ccr_mul_ok(max_batch, cfg->k, &dk))
        CCR_FAIL(ctx, CCR_EINVAL, "topk: sizes overflow (d_in %zu, n_experts %zu, batch %zu)",
                 cfg->d_in, cfg->n_experts, max_batch);
    s->ctx = ctx;
    s->cfg = *cfg;
    s->d = cfg->d_in;
    s->e = cfg->n_experts;
    s->k = cfg->k;
    s->max_batch = max_batch;
    CCR_TRY(tk_core_init(&s->core, ctx, max_batch, s->e, s->k, cfg->noise_eps));
    s->core.want_lse = cfg->z_loss > 0.0; /* lse is read only for the z-loss */
    const size_t e = s->e;
    s->ids = calloc(dk, sizeof(int32_t));
    s->weights = calloc(dk, sizeof(float));
    s->imp = calloc(e, sizeof(double));
    s->load = calloc(e, sizeof(double));
    s->counts = calloc(e, sizeof(double));
    s->dimp = calloc(e, sizeof(double));
    s->dload = calloc(e, sizeof(double));
    s->imp_f = calloc(e, sizeof(float));
    s->load_f = calloc(e, sizeof(float));
    s->seen = calloc(e, 1);
    s->dg = calloc(s->k, sizeof(float));
    if (!s->ids || !s->weights || !s->imp || !s->load || !s->counts || !s->dimp ||
        !s->dload || !s->imp_f || !s->load_f || !s->seen || !s->dg) {
        topk_free(s);
        CCR_FAIL(ctx, CCR_ENOMEM, "topk: cannot allocate buffers for batch %zu", max_batch);
    }
    return CCR_OK;
}

static size_t topk_n_matrices(const void *state) { return ((const topk_state *)state)->e; }
static size_t topk_slots(const void *state) { return ((const topk_state *)state)->k; }

static ccr_status topk_declare(void *state, ccr_arena *a, const char *prefix)
{
    topk_state *s = state;
    size_t shape[2] = {s->d, s->e};
    CCR_TRY(gate_declare(a, prefix, "w_g", 2, shape, &s->i_wg));
    CCR_TRY(gate_declare(a, prefix, "w_noise", 2, shape, &s->i_wn));
    s->arena = a;
    return CCR_OK;
}

static ccr_status topk_init_params(void *state, gsl_rng *rng)
{
    topk_state *s = state;
    if (s->arena == NULL)
        CCR_FAIL(s->ctx, CCR_EINVAL, "topk: parameters not declared");
    float *wg = ccr_arena_value(s->arena, s->i_wg), *wn = ccr_arena_value(s->arena, s->i_wn);
    if (wg == NULL || wn == NULL)
        CCR_FAIL(s->ctx, CCR_EINVAL, "topk: arena not finalized");
    gate_init_weights(wg, s->d * s->e, s->d, s->cfg.randomize, rng);
    gate_init_weights(wn, s->d * s->e, s->d, s->cfg.randomize, rng);
    return CCR_OK;
}

static ccr_status topk_forward(void *state, const float *x, size_t batch, bool train,
                               gsl_rng *rng, ccr_route *route, ccr_gate_stats *st)
{
    topk_state *s = state;
    const float *wg = s->arena ? ccr_arena_value(s->arena, s->i_wg) : NULL;
    const float *wn = s->arena ? ccr_arena_value(s->arena, s->i_wn) : NULL;
    if (wg == NULL || wn == NULL)
        CCR_FAIL(s->ctx, CCR_EINVAL, "topk: parameters not declared in a finalized arena");
    if (train && rng == NULL)
        CCR_FAIL(s->ctx, CCR_EINVAL, "topk: rng is NULL in train mode");
    const size_t e = s->e, k = s->k;
    tk_core *c = &s->core;
    gate_matmul(x, wg, batch, s->d, e, c->clean, false);
    if (train)
        gate_matmul(x, wn, batch, s->d, e, c->raw, false);
    const bool smooth = tk_core_smooth(c, train);
    for (size_t i = 0; i < e; i++)
        s->imp[i] = s->load[i] = s->counts[i] = 0.0;
    double zsum = 0.0;
    for (size_t b = 0; b < batch; b++) {
        tk_core_row_forward(c, b, train, rng);
        const int32_t *top = c->top + b * c->ntop;
        const float *g = c->gates + b * k;
        for (size_t q = 0; q < k; q++) {
            s->ids[b * k + q] = top[q];
            s->weights[b * k + q] = g[q];
            s->imp[top[q]] += (double)g[q];
            s->counts[top[q]] += 1.0;
        }
        if (smooth)
            for (size_t i = 0; i < e; i++)
                s->load[i] += c->p[b * e + i];
        zsum += c->lse[b] * c->lse[b];
    }
    double gb = (double)batch;  /* the global batch under expert parallelism */
    if (s->comm != NULL) {
        double *red = s->red;
        memcpy(red, s->imp, e * sizeof *red);
        memcpy(red + e, s->load, e * sizeof *red);
        memcpy(red + 2 * e, s->counts, e * sizeof *red);
        red[3 * e] = zsum, red[3 * e + 1] = gb;
        CCR_TRY(ccr_comm_allreduce_sum_f64(s->comm, red, 3 * e + 2));
        memcpy(s->imp, red, e * sizeof *red);
        memcpy(s->load, red + e, e * sizeof *red);
        memcpy(s->counts, red + 2 * e, e * sizeof *red);
        zsum = red[3 * e], gb = red[3 * e + 1];
    }
    s->gbatch = gb;
    if (!smooth)
        memcpy(s->load, s->counts, e * sizeof(double));
    for (size_t i = 0; i < e; i++) {
        s->imp_f[i] = (float)s->imp[i];
        s->load_f[i] = (float)s->load[i];
    }
    double loss_z = s->cfg.z_loss > 0.0 ? s->cfg.z_loss * zsum / gb : 0.0;
    tk_fill_stats(st, &s->cfg, s->imp, s->load, s->counts, e, loss_z);
    st->distinct = gate_count_distinct(s->ids, batch * k, e, s->seen);
    s->batch = batch;
    s->train = train;
    route->batch = batch;
    route->slots = k;
    route->n_matrices = e;
    route->ids = s->ids;
    route->weights = s->weights;
    return CCR_OK;
}

static ccr_status topk_backward(void *state, const ccr_gate_bwd_args *a)
{
    topk_state *s = state;
    const size_t e = s->e, k = s->k, batch = a->batch;
    const bool train = s->train, smooth = tk_core_smooth(&s->core, train);
    if (s->arena == NULL)
        CCR_FAIL(s->ctx, CCR_EINVAL, "topk: parameters not declared");
    float *wg = ccr_arena_value(s->arena, s->i_wg), *wn = ccr_arena_value(s->arena, s->i_wn);
    float *dwg = ccr_arena_grad(s->arena, s->i_wg), *dwn = ccr_arena_grad(s->arena, s->i_wn);
    if (wg == NULL || dwg == NULL || wn == NULL || dwn == NULL)
        CCR_FAIL(s->ctx, CCR_EINVAL, "topk: parameters not declared in a finalized arena");
    tk_cv2_grad(s->imp, e, s->cfg.w_importance, s->dimp);
    tk_cv2_grad(s->load, e, smooth ? s->cfg.w_load : 0.0, s->dload);
    double zcoef = s->cfg.z_loss > 0.0 ? s->cfg.z_loss / s->gbatch : 0.0;
    tk_core *c = &s->core;
    for (size_t b = 0; b < batch; b++) {
        /* Importance is the sum of the weights: its gradient joins dweights. */
        for (size_t q = 0; q < k; q++)
            s->dg[q] = (float)((double)a->dweights[b * k + q]
#ifndef CCR_MUTANT_TOPK_IMPORTANCE  /* tests/gradcheck_mutants.sh */
                               + s->dimp[s->ids[b * k + q]]
#endif
                               );
        tk_core_row_backward(c, b, train, s->dg, smooth ? s->dload : NULL, zcoef);
    }
    gate_matmul_backward(a->x, wg, c->dclean, batch, s->d, e, dwg, a->dx);
    if (train)
        gate_matmul_backward(a->x, wn, c->draw, batch, s->d, e, dwn, a->dx);
    return CCR_OK;
}

static ccr_status topk_set_comm(void *state, ccr_comm *comm)
{
    topk_state *s = state;
    free(s->red);
    s->red = ccr_malloc3(3, s->e + 1, sizeof *s->red);
    if (s->red == NULL)
        return CCR_ENOMEM;
    s->comm = comm;
    return CCR_OK;
}

static double topk_flops(const void *state, bool train)
{
    const topk_state *s = state;
    return (train ? 4.0 : 2.0) * (double)s->d * (double)s->e;
}

static double topk_matrices(const void *state) { return (double)((const topk_state *)state)->k; }

static size_t topk_n_exports(const void *state)
{
    CCR_UNUSED(state);
    return 3;
}

static ccr_status topk_get_export(const void *state, size_t i, const char **name, size_t *rank,
                                  size_t shape[4], const float **data)
{
    const topk_state *s = state;
    static const char *const names[3] = {"noise", "importance", "load"};
    memset(shape, 0, 4 * sizeof(size_t));
    *name = names[i];
    if (i == 0) {
        *rank = 2;
        shape[0] = s->batch;
        shape[1] = s->e;
        *data = s->core.noise;
    } else {
        *rank = 1;
        shape[0] = s->e;
        *data = i == 1 ? s->imp_f : s->load_f;
    }
    return CCR_OK;
}

const ccr_gate_type ccr_gate_topk = {
    .name = "topk",
    .paper = "Shazeer et al. 2017, noisy top-k gating, eqs. 3-11",
    .param_group = "gate.",
    .state_size = sizeof(topk_state),
    .init = topk_init,
    .free = topk_free,
    .n_matrices = topk_n_matrices,
    .slots = topk_slots,
    .declare = topk_declare,
    .init_params = topk_init_params,
    .forward = topk_forward,
    .backward = topk_backward,
    .flops = topk_flops,
    .matrices_per_example = topk_matrices,
    .n_exports = topk_n_exports,
    .get_export = topk_get_export,
    .options = CCR_GATE_OPT_N_EXPERTS | CCR_GATE_OPT_K | CCR_GATE_OPT_W_IMPORTANCE |
               CCR_GATE_OPT_W_LOAD | CCR_GATE_OPT_Z_LOSS | CCR_GATE_OPT_NOISE_EPS |
               CCR_GATE_OPT_RANDOMIZE,
    .set_comm = topk_set_comm,
};
