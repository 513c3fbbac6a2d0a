/*
 * gate_dense.c - softmax gating over all experts, Shazeer et al. 2017,
 * eq. 2: G_sigma(x) = Softmax(x W_g).  Every expert runs for every
 * example: E slots, slot s = expert s with weight p_s, so the layer is the
 * dense (non-sparse) mixture y = sum_i G(x)_i E_i(x) of eq. 1, the
 * reference point for the sparse gates.  Aux losses: Shazeer's importance
 * loss w_importance * CV(Importance)^2 (eqs. 6-7, defined on any gate's G)
 * and the optional router z-loss of ST-MoE (Zoph et al. 2022, eq. 5), see
 * gate_router.c.  There is no load loss: every expert runs.
 *
 * Importance = sum_b p (eq. 6); Load = counts = batch for every expert (all
 * run), so the load CV is 0 and max/mean 1.  Backward: dL/dp_{b,i} =
 * dweights[b,i] + w_importance dCV^2/dImportance_i, then the softmax
 * backward dz = p (dp - sum_j p_j dp_j), plus the z-loss term, into W_g and
 * x.  The route's weights point at the router's probabilities.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ccr/ccr_gate.h"
#include "gate_router.h"  // provides: gate_router (logits, softmax, z-loss)
#include "gate_topk_core.h" // provides: tk_cv2_grad
#include "gate_util.h"    // provides: gate_softmax_backward, gate_cv, gate_max_over_mean
#include "internal.h"     // provides: CCR_FAIL, CCR_TRY, CCR_UNUSED

typedef struct dense_state {
    gate_router r;
    size_t n;           /* E */
    bool randomize;
    double w_importance;
    int32_t *ids;       /* [max_batch, E] row b = 0, 1, ..., E-1 (constant) */
    double *imp;        /* [E] Importance of the last forward */
    double *load;       /* [E] counts of the last forward (= batch) */
    float *imp_out;     /* [E] exported copies */
    float *load_out;    /* [E] */
    double *dimp;       /* [E] w_importance dCV^2/dImportance */
    float *dp;          /* [E] backward scratch: dL/dp of one example */
    ccr_comm *comm;     /* expert parallelism: statistics over its ranks (or NULL) */
    double *red;        /* [E + 2] Importance, sum lse^2, batch: one all-reduce */
} dense_state;

static void dense_free(void *state)
{
    dense_state *s = state;
    gate_router_free(&s->r);
    free(s->ids);
    free(s->imp);
    free(s->load);
    free(s->imp_out);
    free(s->load_out);
    free(s->dimp);
    free(s->dp);
    free(s->red);
    s->red = NULL;
    s->dimp = NULL;
    s->dp = NULL;
    s->ids = NULL;
    s->imp = s->load = NULL;
    s->imp_out = s->load_out = NULL;
}

static ccr_status dense_init(void *state, ccr_ctx *ctx, const ccr_gate_config *cfg,
                             size_t max_batch)
{
    dense_state *s = state;
    const size_t n = cfg->n_experts;
    if (!isfinite(cfg->w_importance) || cfg->w_importance < 0.0)
        CCR_FAIL(ctx, CCR_EINVAL, "gate dense: w_importance = %g: must be finite and >= 0",
                 cfg->w_importance);
    /* Validates n_experts, z_loss and every size product. */
    CCR_TRY(gate_router_init(&s->r, ctx, "dense", cfg->d_in, n, cfg->z_loss, max_batch));
    s->n = n;
    s->randomize = cfg->randomize;
    s->w_importance = cfg->w_importance;
    s->ids = ccr_malloc3(max_batch, n, sizeof *s->ids);
    s->imp = calloc(n, sizeof *s->imp);
    s->load = calloc(n, sizeof *s->load);
    s->imp_out = calloc(n, sizeof *s->imp_out);
    s->load_out = calloc(n, sizeof *s->load_out);
    s->dimp = calloc(n, sizeof *s->dimp);
    s->dp = calloc(n, sizeof *s->dp);
    if (s->ids == NULL || s->imp == NULL || s->load == NULL || s->imp_out == NULL ||
        s->load_out == NULL || s->dimp == NULL || s->dp == NULL) {
        dense_free(s);
        CCR_FAIL(ctx, CCR_ENOMEM, "gate dense: cannot allocate a table of %zu x %zu",
                 max_batch, n);
    }
    for (size_t b = 0; b < max_batch; b++)
        for (size_t i = 0; i < n; i++)
            s->ids[b * n + i] = (int32_t)i;
    return CCR_OK;
}

static size_t dense_n_matrices(const void *state) { return ((const dense_state *)state)->n; }

static size_t dense_slots(const void *state) { return ((const dense_state *)state)->n; }

static ccr_status dense_declare(void *state, ccr_arena *a, const char *prefix)
{
    dense_state *s = state;
    return gate_router_declare(&s->r, a, prefix);
}

static ccr_status dense_init_params(void *state, gsl_rng *rng)
{
    dense_state *s = state;
    return gate_router_init_params(&s->r, s->randomize ? 1.0 / sqrt((double)s->r.d_in) : 0.0,
                                   rng);
}

static ccr_status dense_forward(void *state, const float *x, size_t batch, bool train,
                                gsl_rng *rng, ccr_route *route, ccr_gate_stats *stats)
{
    dense_state *s = state;
    CCR_UNUSED(train);
    CCR_UNUSED(rng);
    const size_t n = s->n;
    double zsum;
    CCR_TRY(gate_router_forward(&s->r, x, batch, &zsum));
    for (size_t i = 0; i < n; i++)
        s->imp[i] = 0.0;
    for (size_t b = 0; b < batch; b++)
        for (size_t i = 0; i < n; i++)
            s->imp[i] += (double)s->r.probs[b * n + i];
    double gb = (double)batch;  /* the global batch under expert parallelism */
    if (s->comm != NULL) {
        memcpy(s->red, s->imp, n * sizeof *s->red);
        s->red[n] = zsum, s->red[n + 1] = gb;
        CCR_TRY(ccr_comm_allreduce_sum_f64(s->comm, s->red, n + 2));
        memcpy(s->imp, s->red, n * sizeof *s->red);
        zsum = s->red[n], gb = s->red[n + 1];
    }
    const double loss_z = gate_router_zloss(&s->r, zsum, (size_t)gb);
    for (size_t i = 0; i < n; i++)
        s->load[i] = gb;
    for (size_t i = 0; i < n; i++) {
        s->imp_out[i] = (float)s->imp[i];
        s->load_out[i] = (float)s->load[i];
    }
    *route = (ccr_route){
        .batch = batch, .slots = n, .n_matrices = n, .ids = s->ids, .weights = s->r.probs,
    };
    const double cv_load = gate_cv(s->load, n), mm_load = gate_max_over_mean(s->load, n);
    const double loss_imp = s->w_importance * ccr_cv_squared(s->imp, n);
    *stats = (ccr_gate_stats){
        .aux_loss = loss_imp + loss_z,
        .loss_importance = loss_imp,
        .loss_z = loss_z,
        .cv_importance = gate_cv(s->imp, n),
        .cv_load = cv_load,
        .cv_load_count = cv_load,
        .max_mean_load = mm_load,
        .max_mean_count = mm_load,
        .dropped = 0,
        .distinct = n,
    };
    return CCR_OK;
}

static ccr_status dense_backward(void *state, const ccr_gate_bwd_args *a)
{
    dense_state *s = state;
    const size_t n = s->n;
    float *dz = gate_router_grad_begin(&s->r, a->batch);
    /* dL/dp_{b,s} = dweights[b, s] (slot s holds expert s) + the importance
     * loss's dL/dImportance_s (Importance_s = sum_b p_{b,s}). */
    tk_cv2_grad(s->imp, n, s->w_importance, s->dimp);
    for (size_t b = 0; b < a->batch; b++) {
        for (size_t i = 0; i < n; i++)
            s->dp[i] = (float)((double)a->dweights[b * n + i] + s->dimp[i]);
        gate_softmax_backward(s->r.probs + b * n, s->dp, n, dz + b * n);
    }
    return gate_router_grad_end(&s->r, a->x, a->batch, a->dx);
}

static ccr_status dense_set_comm(void *state, ccr_comm *comm)
{
    dense_state *s = state;
    free(s->red);
    s->red = ccr_mallocn(s->n + 2, sizeof *s->red);
    if (s->red == NULL)
        return CCR_ENOMEM;
    s->comm = comm;
    return CCR_OK;
}

static double dense_flops(const void *state, bool train)
{
    const dense_state *s = state;
    CCR_UNUSED(train);
    return 2.0 * (double)s->r.d_in * (double)s->n;
}

static double dense_matrices_per_example(const void *state)
{
    return (double)((const dense_state *)state)->n;
}

static size_t dense_n_exports(const void *state)
{
    CCR_UNUSED(state);
    return 2;
}

static ccr_status dense_get_export(const void *state, size_t i, const char **name,
                                   size_t *rank, size_t shape[4], const float **data)
{
    const dense_state *s = state;
    *name = i == 0 ? "importance" : "load";
    *rank = 1;
    shape[0] = s->n;
    *data = i == 0 ? s->imp_out : s->load_out;
    return CCR_OK;
}

const ccr_gate_type ccr_gate_dense = {
    .name = "dense",
    .paper = "softmax over all experts, Shazeer et al. 2017 eq. 2 (importance loss eqs. 6-7)",
    .param_group = "gate.",
    .state_size = sizeof(dense_state),
    .init = dense_init,
    .free = dense_free,
    .n_matrices = dense_n_matrices,
    .slots = dense_slots,
    .declare = dense_declare,
    .init_params = dense_init_params,
    .forward = dense_forward,
    .backward = dense_backward,
    .flops = dense_flops,
    .matrices_per_example = dense_matrices_per_example,
    .n_exports = dense_n_exports,
    .get_export = dense_get_export,
    .options = CCR_GATE_OPT_N_EXPERTS | CCR_GATE_OPT_W_IMPORTANCE | CCR_GATE_OPT_Z_LOSS |
               CCR_GATE_OPT_RANDOMIZE,
    .set_comm = dense_set_comm,
};
