/*
 * gate.c - the generic gate layer: the registry of gate types, instance
 * allocation, and argument validation done once here so that every gate
 * type can trust its inputs (GSL's gsl_rng_alloc pattern, SQLite's
 * vfs_find for lookup by name).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ccr/ccr_gate.h"
#include "internal.h"  // provides: CCR_FAIL, CCR_TRY

struct ccr_gate {
    const ccr_gate_type *type;
    void *state;
    ccr_ctx *ctx;
    ccr_gate_config cfg;
    size_t max_batch;
    size_t last_batch;   /* batch of the last forward (0: none) */
};

static const ccr_gate_type *const gate_registry[] = {
    &ccr_gate_none, &ccr_gate_dense, &ccr_gate_topk, &ccr_gate_hmoe,
    &ccr_gate_switch, &ccr_gate_signtree, NULL,
};

const ccr_gate_type *const *ccr_gate_types(void) { return gate_registry; }

const ccr_gate_type *ccr_gate_type_find(const char *name)
{
    if (name == NULL)
        return NULL;
    for (const ccr_gate_type *const *t = gate_registry; *t != NULL; t++)
        if (strcmp((*t)->name, name) == 0)
            return *t;
    return NULL;
}

const char *ccr_gate_type_names(void)
{
    return "none, dense, topk, hmoe, switch, signtree";
}

ccr_status ccr_gate_type_lookup(ccr_ctx *ctx, const char *name, const ccr_gate_type **out)
{
    CCR_CHECK_NULL(ctx, out);
    const ccr_gate_type *t = ccr_gate_type_find(name);
    if (t == NULL)
        CCR_FAIL(ctx, CCR_EINVAL, "unknown gate '%s' (valid: %s)", name ? name : "(null)",
                 ccr_gate_type_names());
    *out = t;
    return CCR_OK;
}

bool ccr_gate_type_uses(const ccr_gate_type *t, ccr_gate_option opt)
{
    return t != NULL && (t->options & (unsigned)opt) != 0;
}

const char *ccr_gate_option_name(ccr_gate_option opt)
{
    static const char *const names[CCR_GATE_N_OPTIONS] = {
        "n_experts", "k", "n_groups", "k_groups", "k2", "depth", "combine", "bits_from",
        "grad_mode", "capacity_factor", "eval_capacity_factor", "w_importance", "w_load",
        "aux_alpha", "z_loss", "noise_eps", "randomize",
    };
    for (unsigned i = 0; i < CCR_GATE_N_OPTIONS; i++)
        if ((unsigned)opt == 1u << i)
            return names[i];
    return NULL;
}

/* The one place of the gate defaults; the drivers start from them too
 * (experiments/common.c: drv_gate_defaults), and every gate accepts them. */
ccr_gate_config ccr_gate_config_default(void)
{
    ccr_gate_config c = {
        .d_in = 0, .n_experts = 8, .k = 2, .n_groups = 2, .k_groups = 2, .k2 = 2, .depth = 4,
        .combine = CCR_COMBINE_PATH, .bits_from = CCR_BITS_PROJECTION,
        /* ste: the best-supported reading of ccr-tree --readings (GATES.md) */
        .grad_mode = CCR_GRAD_STE, .capacity_factor = 1.25, .eval_capacity_factor = 0.0,
        .w_importance = 0.1, .w_load = 0.1, .aux_alpha = 0.01, .z_loss = 0.0,
        .noise_eps = 0.01, .randomize = false,
    };
    return c;
}

ccr_status ccr_route_validate(ccr_ctx *ctx, const ccr_route *r)
{
    CCR_CHECK_NULL(ctx, r);
    if (r->batch == 0 || r->slots == 0 || r->n_matrices == 0)
        CCR_FAIL(ctx, CCR_EINVAL, "empty routing table (batch %zu, slots %zu, matrices %zu)",
                 r->batch, r->slots, r->n_matrices);
    CCR_CHECK_NULL(ctx, r->ids);
    CCR_CHECK_NULL(ctx, r->weights);
    for (size_t i = 0; i < r->batch * r->slots; i++) {
        int32_t id = r->ids[i];
        if (id < -1 || (id >= 0 && (size_t)id >= r->n_matrices))
            CCR_FAIL(ctx, CCR_EINVAL, "route[%zu][%zu]: id %d not in -1..%zu", i / r->slots,
                     i % r->slots, (int)id, r->n_matrices - 1);
        if (!isfinite(r->weights[i]))
            CCR_FAIL(ctx, CCR_EINVAL, "route[%zu][%zu]: weight is not finite", i / r->slots,
                     i % r->slots);
    }
    return CCR_OK;
}

ccr_status ccr_route_counts(ccr_ctx *ctx, const ccr_route *r, size_t *counts, size_t n,
                            size_t *routed)
{
    CCR_CHECK_NULL(ctx, r);
    CCR_CHECK_NULL(ctx, counts);
    if (n != r->n_matrices)
        CCR_FAIL(ctx, CCR_EINVAL, "counts has %zu entries, the table routes to %zu matrices", n,
                 r->n_matrices);
    size_t pairs;
    if (!ccr_mul_ok(r->batch, r->slots, &pairs))
        CCR_FAIL(ctx, CCR_EINVAL, "routing table of %zu x %zu overflows", r->batch, r->slots);
    if (pairs > 0)
        CCR_CHECK_NULL(ctx, r->ids);
    for (size_t m = 0; m < n; m++)
        counts[m] = 0;
    size_t total = 0;
    for (size_t i = 0; i < pairs; i++) {
        int32_t id = r->ids[i];
        if (id < -1 || (id >= 0 && (size_t)id >= n))
            CCR_FAIL(ctx, CCR_EINVAL, "route[%zu][%zu]: id %d not in -1..%zu", i / r->slots,
                     i % r->slots, (int)id, n - 1);
        if (id >= 0) {
            counts[id]++;
            total++;
        }
    }
    if (routed != NULL)
        *routed = total;
    return CCR_OK;
}

ccr_status ccr_gate_alloc(ccr_ctx *ctx, const ccr_gate_type *type, const ccr_gate_config *cfg,
                          size_t max_batch, ccr_gate **out)
{
    if (type == NULL)
        CCR_FAIL(ctx, CCR_EINVAL, "no gate type given (valid: %s)", ccr_gate_type_names());
    CCR_CHECK_NULL(ctx, cfg);
    CCR_CHECK_NULL(ctx, out);
    if (max_batch == 0)
        CCR_FAIL(ctx, CCR_EINVAL, "max_batch is 0");
    if (cfg->d_in == 0)
        CCR_FAIL(ctx, CCR_EINVAL, "gate %s: d_in is 0", type->name);
    ccr_gate *g = calloc(1, sizeof *g);
    void *state = calloc(1, type->state_size ? type->state_size : 1);
    if (g == NULL || state == NULL) {
        free(g);
        free(state);
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate gate %s", type->name);
    }
    g->type = type;
    g->state = state;
    g->ctx = ctx;
    g->cfg = *cfg;
    g->max_batch = max_batch;
    ccr_status s = type->init(state, ctx, &g->cfg, max_batch);
    if (s != CCR_OK) {
        free(state);
        free(g);
        return s;
    }
    *out = g;
    return CCR_OK;
}

void ccr_gate_free(ccr_gate *g)
{
    if (g == NULL)
        return;
    g->type->free(g->state);
    free(g->state);
    free(g);
}

/* Getters: NULL / 0 for a NULL gate (the NULL-handle rule, ccr.h). */
const ccr_gate_type *ccr_gate_get_type(const ccr_gate *g) { return g ? g->type : NULL; }
const ccr_gate_config *ccr_gate_get_config(const ccr_gate *g) { return g ? &g->cfg : NULL; }
size_t ccr_gate_n_matrices(const ccr_gate *g) { return g ? g->type->n_matrices(g->state) : 0; }
size_t ccr_gate_slots(const ccr_gate *g) { return g ? g->type->slots(g->state) : 0; }
size_t ccr_gate_max_batch(const ccr_gate *g) { return g ? g->max_batch : 0; }

ccr_status ccr_gate_declare(ccr_gate *g, ccr_arena *a, const char *prefix)
{
    if (g == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(g->ctx, a);
    return g->type->declare(g->state, a, prefix ? prefix : "");
}

ccr_status ccr_gate_init_params(ccr_gate *g, gsl_rng *rng)
{
    if (g == NULL)
        return CCR_EINVAL;
    if (g->cfg.randomize)
        CCR_CHECK_NULL(g->ctx, rng);
    return g->type->init_params(g->state, rng);
}

ccr_status ccr_gate_set_comm(ccr_gate *g, ccr_comm *comm)
{
    if (g == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(g->ctx, comm);
    if (g->type->set_comm == NULL)
        CCR_FAIL(g->ctx, CCR_EUNSUP, "gate %s keeps per-rank statistics (no set_comm)",
                 g->type->name);
    return g->type->set_comm(g->state, comm);
}

ccr_status ccr_gate_forward(ccr_gate *g, const float *x, size_t batch, bool train,
                            gsl_rng *rng, ccr_route *route, ccr_gate_stats *stats)
{
    if (g == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(g->ctx, x);
    CCR_CHECK_NULL(g->ctx, route);
    CCR_CHECK_NULL(g->ctx, stats);
    if (batch == 0 || batch > g->max_batch)
        CCR_FAIL(g->ctx, CCR_EBADLEN, "batch %zu not in 1..%zu", batch, g->max_batch);
    if (!ccr_all_finite(x, batch * g->cfg.d_in))
        CCR_FAIL(g->ctx, CCR_EDOM, "gate input holds NaN or infinity");
    ccr_gate_stats st;
    memset(&st, 0, sizeof st);
    ccr_route r;
    CCR_TRY(g->type->forward(g->state, x, batch, train, rng, &r, &st));
    /* Finite input, non-finite weights: the gate's parameters diverged. */
    for (size_t k = 0; k < batch * r.slots; k++)  /* batch * slots was allocated */
        if (r.ids[k] >= 0 && !isfinite(r.weights[k]))
            CCR_FAIL(g->ctx, CCR_EDOM,
                     "gate %s: routing weight of example %zu slot %zu is %g (NaN or infinite "
                     "gate parameters?)", g->type->name, k / r.slots, k % r.slots,
                     (double)r.weights[k]);
    g->last_batch = batch;
    *route = r;
    *stats = st;
    return CCR_OK;
}

ccr_status ccr_gate_backward(ccr_gate *g, const ccr_gate_bwd_args *a)
{
    if (g == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(g->ctx, a);
    CCR_CHECK_NULL(g->ctx, a->x);
    CCR_CHECK_NULL(g->ctx, a->dweights);
    if (g->last_batch == 0 || a->batch != g->last_batch)
        CCR_FAIL(g->ctx, CCR_EINVAL, "backward batch %zu does not match the last forward (%zu)",
                 a->batch, g->last_batch);
    return g->type->backward(g->state, a);
}

double ccr_gate_flops(const ccr_gate *g, bool train)
{
    return g ? g->type->flops(g->state, train) : 0.0;
}

double ccr_gate_matrices_per_example(const ccr_gate *g)
{
    return g ? g->type->matrices_per_example(g->state) : 0.0;
}

size_t ccr_gate_n_exports(const ccr_gate *g)
{
    return g && g->type->n_exports ? g->type->n_exports(g->state) : 0;
}

ccr_status ccr_gate_get_export(const ccr_gate *g, size_t i, const char **name, size_t *rank,
                               size_t shape[4], const float **data)
{
    if (g == NULL)
        return CCR_EINVAL;
    if (g->type->get_export == NULL || i >= ccr_gate_n_exports(g))
        CCR_FAIL(g->ctx, CCR_EINVAL, "gate %s has no export %zu", g->type->name, i);
    return g->type->get_export(g->state, i, name, rank, shape, data);
}
