/*
 * gate_none.c - no gating: the baseline of a single dense FFN expert.
 * Every example uses bank matrix 0 with weight 1, i.e. Shazeer et al.
 * (2017) eq. 1 with one expert and G(x) = 1, the dense model that the
 * conditional-computation papers compare against.  No parameters, no aux
 * loss (the z-loss option is ignored), no gradient (dx is left untouched).
 *
 * The gate reads no option (its `options` mask is empty): n_experts and
 * the rest are ignored, not validated, so a program that swaps gates by
 * name passes the same configuration to every gate.  Importance and Load
 * are the per-expert counts (both = batch) and are exported as
 * "importance" and "load" [1].
 */
#include <stdint.h>
#include <stdlib.h>

#include "ccr/ccr_comm.h"
#include "ccr/ccr_gate.h"
#include "internal.h"  // provides: CCR_FAIL, CCR_UNUSED

typedef struct none_state {
    ccr_ctx *ctx;
    size_t max_batch;
    int32_t *ids;       /* [max_batch] all 0 */
    float *weights;     /* [max_batch] all 1 */
    float importance;   /* batch of the last forward */
    float load;         /* the same: every example runs matrix 0 */
    ccr_comm *comm;     /* expert parallelism: the batch over its ranks (or NULL) */
} none_state;

static ccr_status none_init(void *state, ccr_ctx *ctx, const ccr_gate_config *cfg,
                            size_t max_batch)
{
    none_state *s = state;
    CCR_UNUSED(cfg);
    if (max_batch > SIZE_MAX / sizeof(float))
        CCR_FAIL(ctx, CCR_EINVAL, "gate none: max_batch %zu too large", max_batch);
    s->ctx = ctx;
    s->max_batch = max_batch;
    s->ids = calloc(max_batch, sizeof *s->ids);
    s->weights = ccr_mallocn(max_batch, sizeof *s->weights);
    if (s->ids == NULL || s->weights == NULL) {
        free(s->ids);
        free(s->weights);
        s->ids = NULL;
        s->weights = NULL;
        CCR_FAIL(ctx, CCR_ENOMEM, "gate none: cannot allocate a table of %zu examples",
                 max_batch);
    }
    for (size_t b = 0; b < max_batch; b++)
        s->weights[b] = 1.0f;
    return CCR_OK;
}

static void none_free(void *state)
{
    none_state *s = state;
    free(s->ids);
    free(s->weights);
    s->ids = NULL;
    s->weights = NULL;
}

static size_t none_n_matrices(const void *state)
{
    CCR_UNUSED(state);
    return 1;
}

static size_t none_slots(const void *state)
{
    CCR_UNUSED(state);
    return 1;
}

static ccr_status none_declare(void *state, ccr_arena *a, const char *prefix)
{
    CCR_UNUSED(state);
    CCR_UNUSED(a);
    CCR_UNUSED(prefix);
    return CCR_OK;
}

static ccr_status none_init_params(void *state, gsl_rng *rng)
{
    CCR_UNUSED(state);
    CCR_UNUSED(rng);
    return CCR_OK;
}

static ccr_status none_forward(void *state, const float *x, size_t batch, bool train,
                               gsl_rng *rng, ccr_route *route, ccr_gate_stats *stats)
{
    none_state *s = state;
    CCR_UNUSED(x);
    CCR_UNUSED(train);
    CCR_UNUSED(rng);
    /* The table is constant: ids 0 and weights 1 were written in init. */
    *route = (ccr_route){
        .batch = batch, .slots = 1, .n_matrices = 1, .ids = s->ids, .weights = s->weights,
    };
    double global = (double)batch;
    if (s->comm != NULL)  /* the exports are the global batch's */
        CCR_TRY(ccr_comm_allreduce_sum_f64(s->comm, &global, 1));
    s->importance = (float)global;
    s->load = (float)global;
    /* One expert: CV of a single entry is 0, max/mean is 1. */
    *stats = (ccr_gate_stats){
        .aux_loss = 0.0, .cv_importance = 0.0, .cv_load = 0.0, .cv_load_count = 0.0,
        .max_mean_load = 1.0, .max_mean_count = 1.0, .dropped = 0, .distinct = 1,
    };
    return CCR_OK;
}

static ccr_status none_set_comm(void *state, ccr_comm *comm)
{
    ((none_state *)state)->comm = comm;
    return CCR_OK;
}

static ccr_status none_backward(void *state, const ccr_gate_bwd_args *a)
{
    CCR_UNUSED(state);
    CCR_UNUSED(a);
    return CCR_OK;
}

static double none_flops(const void *state, bool train)
{
    CCR_UNUSED(state);
    CCR_UNUSED(train);
    return 0.0;
}

static double none_matrices_per_example(const void *state)
{
    CCR_UNUSED(state);
    return 1.0;
}

static size_t none_n_exports(const void *state)
{
    CCR_UNUSED(state);
    return 2;
}

static ccr_status none_get_export(const void *state, size_t i, const char **name, size_t *rank,
                                  size_t shape[4], const float **data)
{
    const none_state *s = state;
    *name = i == 0 ? "importance" : "load";
    *rank = 1;
    shape[0] = 1;
    *data = i == 0 ? &s->importance : &s->load;
    return CCR_OK;
}

const ccr_gate_type ccr_gate_none = {
    .name = "none",
    .paper = "no gating: one dense FFN expert (baseline)",
    .param_group = "gate.",
    .state_size = sizeof(none_state),
    .init = none_init,
    .free = none_free,
    .n_matrices = none_n_matrices,
    .slots = none_slots,
    .declare = none_declare,
    .init_params = none_init_params,
    .forward = none_forward,
    .backward = none_backward,
    .flops = none_flops,
    .matrices_per_example = none_matrices_per_example,
    .n_exports = none_n_exports,
    .get_export = none_get_export,
    .set_comm = none_set_comm,
    .options = 0u,
};
