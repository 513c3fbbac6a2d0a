/*
 * gate_switch.c - Switch Transformer routing (Fedus, Zoph & Shazeer,
 * arXiv 2101.03961): top-1 on the softmax over all E experts, with an
 * expert capacity and the load-balancing loss of eqs. 4-6.
 *
 * Per example b: p = softmax(x W_g), i* = argmax p (ties to the lower
 * index); one slot, id i*, weight p_{i*}, *not* renormalised (multiplying by
 * p_{i*} is what makes the router differentiable).
 *
 * Capacity C = ceil(capacity_factor * B / E) in training and
 * ceil(eval_capacity_factor * B / E) in evaluation, eval_capacity_factor 0
 * meaning no limit (the Switch Transformer keeps a separate evaluation
 * factor; ccr's default drops nothing in evaluation, so an example's output
 * does not depend on which examples share its batch).  ccr_switch_capacity
 * computes it so that a product that is an integer in decimal rounds to it
 * (1.1 * 100 / 10 = 11, although the double 1.1 is a little above 1.1), and
 * clamps to [1, B] (ccr's choice: ceil, so that factor 1 with a perfectly
 * balanced batch drops nothing; the clamp makes a huge factor harmless).
 * Examples are assigned in batch order with 0-based positions, so exactly C
 * fit (the paper's pseudo-code, read literally, keeps C - 1);
 * an example whose expert is full is dropped: id -1, weight 0, and the
 * layer outputs 0 for it.  No buffer depends on C: only per-expert counters.
 *
 * Aux loss (eqs. 4-6): f_i = (1/B) #{b : i*_b = i} counted *before* the
 * drops (the router's choice; PAPERS.md §7, a loss after the mask reads
 * low), P_i = (1/B) sum_b p_{b,i} over every example, dropped or not,
 * loss_switch = aux_alpha * E * sum_i f_i P_i (= aux_alpha at uniform
 * routing).  f has no gradient, so dL/dp_{b,i} = aux_alpha * E * f_i / B.
 * Plus the optional ST-MoE z-loss (gate_router.c).
 *
 * Stats: Importance = sum_b p; Load = counts = kept examples per expert
 * (no smooth load); exported as "importance", "load" and "choice" (the
 * pre-capacity counts B f_i), each [E].
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ccr/ccr_gate.h"
#include "gate_router.h"  // provides: gate_router (logits, softmax, z-loss)
#include "gate_util.h"    // provides: gate_topk, gate_softmax_backward, gate_cv, ...
#include "internal.h"     // provides: CCR_FAIL, CCR_TRY, CCR_UNUSED

typedef struct switch_state {
    gate_router r;
    size_t n;               /* E */
    double capacity_factor;
    double eval_capacity_factor; /* 0: no limit in evaluation */
    double aux_alpha;
    bool randomize;
    int32_t *ids;           /* [max_batch] expert or -1 (dropped) */
    float *weights;         /* [max_batch] p_{i*}, 0 when dropped */
    int32_t *choice;        /* [max_batch] i* before the capacity mask */
    size_t *chosen;         /* [E] #examples whose argmax is i (before drops) */
    size_t *kept;           /* [E] #examples routed to i (after drops) */
    double *imp;            /* [E] Importance sum_b p_{b,i} */
    double *cnt;            /* [E] kept as doubles, for the CV helpers */
    float *exports;         /* [3, E] importance, load, choice */
    unsigned char *seen;    /* [E] scratch of gate_count_distinct */
    float *dp;              /* [E] backward scratch, dL/dp of one example */
    double gbatch;          /* the last forward's (global) batch */
    ccr_comm *comm;         /* expert parallelism: statistics over its ranks (or NULL) */
    double *red;            /* [P E + E + 2] its all-reduce: counts per rank, Importance,
                               sum lse^2, batch */
} switch_state;

static void switch_free(void *state)
{
    switch_state *s = state;
    gate_router_free(&s->r);
    free(s->ids);
    free(s->weights);
    free(s->choice);
    free(s->chosen);
    free(s->kept);
    free(s->imp);
    free(s->cnt);
    free(s->exports);
    free(s->seen);
    free(s->dp);
    free(s->red);
    s->red = NULL;
    s->ids = s->choice = NULL;
    s->weights = s->exports = s->dp = NULL;
    s->chosen = s->kept = NULL;
    s->imp = s->cnt = NULL;
    s->seen = NULL;
}

static ccr_status switch_init(void *state, ccr_ctx *ctx, const ccr_gate_config *cfg,
                              size_t max_batch)
{
    switch_state *s = state;
    if (!isfinite(cfg->capacity_factor) || cfg->capacity_factor <= 0.0)
        CCR_FAIL(ctx, CCR_EINVAL, "gate switch: capacity_factor %g must be finite and > 0",
                 cfg->capacity_factor);
    if (!isfinite(cfg->eval_capacity_factor) || cfg->eval_capacity_factor < 0.0)
        CCR_FAIL(ctx, CCR_EINVAL,
                 "gate switch: eval_capacity_factor %g must be finite and >= 0 (0 = no limit)",
                 cfg->eval_capacity_factor);
    if (!isfinite(cfg->aux_alpha) || cfg->aux_alpha < 0.0)
        CCR_FAIL(ctx, CCR_EINVAL, "gate switch: aux_alpha %g must be finite and >= 0",
                 cfg->aux_alpha);
    const size_t n = cfg->n_experts;
    /* Validates n_experts, z_loss and the sizes (max_batch * E fits). */
    CCR_TRY(gate_router_init(&s->r, ctx, "switch", cfg->d_in, n, cfg->z_loss, max_batch));
    s->n = n;
    s->capacity_factor = cfg->capacity_factor;
    s->eval_capacity_factor = cfg->eval_capacity_factor;
    s->aux_alpha = cfg->aux_alpha;
    s->randomize = cfg->randomize;
    s->ids = ccr_mallocn(max_batch, sizeof *s->ids);
    s->weights = ccr_mallocn(max_batch, sizeof *s->weights);
    s->choice = ccr_mallocn(max_batch, sizeof *s->choice);
    s->chosen = calloc(n, sizeof *s->chosen);
    s->kept = calloc(n, sizeof *s->kept);
    s->imp = calloc(n, sizeof *s->imp);
    s->cnt = calloc(n, sizeof *s->cnt);
    s->exports = ccr_calloc3(3, n, sizeof *s->exports);
    s->seen = calloc(n, 1);
    s->dp = calloc(n, sizeof *s->dp);
    if (s->ids == NULL || s->weights == NULL || s->choice == NULL || s->chosen == NULL ||
        s->kept == NULL || s->imp == NULL || s->cnt == NULL || s->exports == NULL ||
        s->seen == NULL || s->dp == NULL) {
        switch_free(s);
        CCR_FAIL(ctx, CCR_ENOMEM, "gate switch: cannot allocate buffers for %zu x %zu",
                 max_batch, n);
    }
    return CCR_OK;
}

static size_t switch_n_matrices(const void *state) { return ((const switch_state *)state)->n; }

static size_t switch_slots(const void *state)
{
    CCR_UNUSED(state);
    return 1;
}

static ccr_status switch_declare(void *state, ccr_arena *a, const char *prefix)
{
    switch_state *s = state;
    return gate_router_declare(&s->r, a, prefix);
}

static ccr_status switch_init_params(void *state, gsl_rng *rng)
{
    switch_state *s = state;
    /* The Switch Transformer's router init, N(0, s/d_in) with s = 0.1 (the
     * paper truncates at a bound it does not state; ccr does not truncate).
     * Zeros would tie every logit and send every example to expert 0. */
    double d = (double)s->r.d_in;
    return gate_router_init_params(&s->r, s->randomize ? 1.0 / sqrt(d) : sqrt(0.1 / d), rng);
}

size_t ccr_switch_capacity(double cf, size_t batch, size_t n_experts)
{
    if (batch == 0 || n_experts == 0 || !isfinite(cf) || cf < 0.0)
        return 0;
    if (cf == 0.0)
        return batch; /* no limit */
    /* q = cf B / E carries at most ~3 roundings of relative size 2^-53 (cf
     * itself, the product, the quotient): a q within 8 ulp of an integer is
     * that integer (cf = 1.1, B = 100, E = 10 gives 11.000000000000002 in
     * double, which is 11), any other q is rounded up.  The clamp happens in
     * double, so a huge factor never becomes a huge integer. */
    const double q = cf * (double)batch / (double)n_experts;
    const double r = nearbyint(q);
    double c = fabs(q - r) <= 8.0 * DBL_EPSILON * fabs(q) ? r : ceil(q);
    if (!(c >= 1.0))
        return 1;
    if (c >= (double)batch)
        return batch;
    return (size_t)c;
}

static ccr_status switch_forward(void *state, const float *x, size_t batch, bool train,
                                 gsl_rng *rng, ccr_route *route, ccr_gate_stats *stats)
{
    switch_state *s = state;
    CCR_UNUSED(rng);
    const size_t n = s->n;
    double zsum;
    CCR_TRY(gate_router_forward(&s->r, x, batch, &zsum));
    for (size_t i = 0; i < n; i++) {
        s->chosen[i] = 0;
        s->kept[i] = 0;  /* until the positions below: earlier choosers of i */
        s->imp[i] = 0.0;
    }
    for (size_t b = 0; b < batch; b++) {
        const float *p = s->r.probs + b * n;
        int32_t top;
        gate_topk(p, n, 1, &top);  /* argmax, ties to the lower index */
        s->choice[b] = top;
        s->chosen[top]++;
        for (size_t i = 0; i < n; i++)
            s->imp[i] += (double)p[i];
    }
    double gb = (double)batch;  /* the global batch under expert parallelism */
    if (s->comm != NULL) {
        /* Every rank's choice counts (rows of a P x E matrix), Importance,
         * sum lse^2 and batch in one all-reduce; this rank's positions start
         * after the choosers of the ranks before it. */
        const size_t P = (size_t)ccr_comm_size(s->comm), r = (size_t)ccr_comm_rank(s->comm);
        double *red = s->red, *tail = red + P * n;
        memset(red, 0, (P * n + n + 2) * sizeof *red);
        for (size_t i = 0; i < n; i++)
            red[r * n + i] = (double)s->chosen[i], tail[i] = s->imp[i];
        tail[n] = zsum, tail[n + 1] = gb;
        CCR_TRY(ccr_comm_allreduce_sum_f64(s->comm, red, P * n + n + 2));
        for (size_t i = 0; i < n; i++) {
            double before = 0.0, all = 0.0;
            for (size_t p = 0; p < P; p++)
                all += red[p * n + i], before += p < r ? red[p * n + i] : 0.0;
            s->kept[i] = (size_t)before;
            s->chosen[i] = (size_t)all;
            s->imp[i] = tail[i];
        }
        zsum = tail[n], gb = tail[n + 1];
    }
    s->gbatch = gb;
    const size_t cap = ccr_switch_capacity(train ? s->capacity_factor : s->eval_capacity_factor,
                                           (size_t)gb, n);
    /* An example keeps its expert when fewer than cap examples before it
     * (in the global batch's order) chose the same one. */
    for (size_t b = 0; b < batch; b++) {
        const int32_t top = s->choice[b];
        if (s->kept[top]++ < cap) {
            s->ids[b] = top;
            s->weights[b] = s->r.probs[b * n + (size_t)top];
        } else {
            s->ids[b] = -1;
            s->weights[b] = 0.0f;
        }
    }
    /* loss_switch = alpha E sum_i f_i P_i with f_i = chosen_i / B, P_i = imp_i / B. */
    double fp = 0.0;
    size_t dropped = 0;
    for (size_t i = 0; i < n; i++) {
        const size_t kept = s->chosen[i] < cap ? s->chosen[i] : cap;
        dropped += s->chosen[i] - kept;
        s->kept[i] = kept;
        fp += ((double)s->chosen[i] / gb) * (s->imp[i] / gb);
        s->cnt[i] = (double)kept;
        s->exports[i] = (float)s->imp[i];
        s->exports[n + i] = (float)kept;
        s->exports[2 * n + i] = (float)s->chosen[i];
    }
    const double loss_switch = s->aux_alpha * (double)n * fp;
    const double loss_z = gate_router_zloss(&s->r, zsum, (size_t)gb);
    *route = (ccr_route){
        .batch = batch, .slots = 1, .n_matrices = n, .ids = s->ids, .weights = s->weights,
    };
    const double cv_cnt = gate_cv(s->cnt, n), mm_cnt = gate_max_over_mean(s->cnt, n);
    *stats = (ccr_gate_stats){
        .aux_loss = loss_switch + loss_z,
        .loss_switch = loss_switch,
        .loss_z = loss_z,
        .cv_importance = gate_cv(s->imp, n),
        .cv_load = cv_cnt,
        .cv_load_count = cv_cnt,
        .max_mean_load = mm_cnt,
        .max_mean_count = mm_cnt,
        .dropped = dropped,
        .distinct = gate_count_distinct(s->ids, batch, n, s->seen),
    };
    return CCR_OK;
}

static ccr_status switch_set_comm(void *state, ccr_comm *comm)
{
    switch_state *s = state;
    size_t P = (size_t)ccr_comm_size(comm), m;
    if (!ccr_mul_ok(P + 1, s->n, &m) || !ccr_add_ok(m, 2, &m))
        return CCR_ENOMEM;
    free(s->red);
    s->red = ccr_mallocn(m, sizeof *s->red);
    if (s->red == NULL)
        return CCR_ENOMEM;
    s->comm = comm;
    return CCR_OK;
}

static ccr_status switch_backward(void *state, const ccr_gate_bwd_args *a)
{
    switch_state *s = state;
    const size_t n = s->n, batch = a->batch;
    float *dz = gate_router_grad_begin(&s->r, batch);
    /* d loss_switch / dp_{b,i} = alpha E f_i / B = alpha E chosen_i / B^2. */
    const double coef = s->aux_alpha * (double)n / (s->gbatch * s->gbatch)
#ifdef CCR_MUTANT_SWITCH_AUX  /* tests/gradcheck_mutants.sh */
                        * 0.0
#endif
        ;
    for (size_t b = 0; b < batch; b++) {
        for (size_t i = 0; i < n; i++)
            s->dp[i] = (float)(coef * (double)s->chosen[i]);
        if (s->ids[b] >= 0)  /* a dropped example's weight is not used */
            s->dp[s->ids[b]] += a->dweights[b];
        gate_softmax_backward(s->r.probs + b * n, s->dp, n, dz + b * n);
    }
    return gate_router_grad_end(&s->r, a->x, batch, a->dx);
}

static double switch_flops(const void *state, bool train)
{
    const switch_state *s = state;
    CCR_UNUSED(train);
    return 2.0 * (double)s->r.d_in * (double)s->n;
}

static double switch_matrices_per_example(const void *state)
{
    CCR_UNUSED(state);
    return 1.0;
}

static size_t switch_n_exports(const void *state)
{
    CCR_UNUSED(state);
    return 3;
}

static ccr_status switch_get_export(const void *state, size_t i, const char **name,
                                    size_t *rank, size_t shape[4], const float **data)
{
    static const char *const names[3] = {"importance", "load", "choice"};
    const switch_state *s = state;
    *name = names[i];
    *rank = 1;
    shape[0] = s->n;
    *data = s->exports + i * s->n;
    return CCR_OK;
}

const ccr_gate_type ccr_gate_switch = {
    .name = "switch",
    .paper = "Fedus et al. (Switch Transformer): top-1, capacity, aux loss eqs. 4-6",
    .param_group = "gate.",
    .state_size = sizeof(switch_state),
    .init = switch_init,
    .free = switch_free,
    .n_matrices = switch_n_matrices,
    .slots = switch_slots,
    .declare = switch_declare,
    .init_params = switch_init_params,
    .forward = switch_forward,
    .backward = switch_backward,
    .flops = switch_flops,
    .matrices_per_example = switch_matrices_per_example,
    .n_exports = switch_n_exports,
    .get_export = switch_get_export,
    .options = CCR_GATE_OPT_N_EXPERTS | CCR_GATE_OPT_CAPACITY_FACTOR |
               CCR_GATE_OPT_EVAL_CAPACITY_FACTOR | CCR_GATE_OPT_AUX_ALPHA | CCR_GATE_OPT_Z_LOSS |
               CCR_GATE_OPT_RANDOMIZE,
    .set_comm = switch_set_comm,
};
