/*
 * test_sparse_step.c - the sparse training step (issue 10), for every gate
 * (topk, hmoe, switch, signtree, dense, none):
 *   - ccr_arena_zero_grad, which clears only the bank matrices written since
 *     the last zeroing, leaves the whole gradient block zero, and the
 *     gradients after it are bitwise those after zeroing the whole block by
 *     hand, over steps whose routes change; ccr_arena_grad_norm, which reads
 *     only the written ranges, is bitwise the norm of the whole block;
 *   - SGD without momentum or weight decay gives bitwise the same parameters
 *     in sparse and dense mode, and the sparse one updates fewer parameters
 *     where a batch leaves matrices unused;
 *   - sparse Adam equals a reference of its documented rule written here
 *     (lazy Adam: dense tensors at the global step count, each bank matrix
 *     used by the batch at its own count, unused ones untouched), bitwise;
 *   - ccr_optim_flops counts the parameters updated times 13 (Adam), 15
 *     with weight decay.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ccr_test.h"

#define D_IN 6
#define D_H 8
#define D_OUT 3
#define BATCH 8
#define STEPS 10
#define COND_LAYER 2

static const char *const gates[] = {"topk", "hmoe", "switch", "signtree", "dense", "none"};
#define N_GATES (sizeof gates / sizeof gates[0])

static ccr_ctx *ctx;
static ccr_backend *be;
static float xs[STEPS][BATCH * D_IN];
static int32_t ys[STEPS][BATCH];

static void setup(void)
{
    ctx = ccr_test_ctx();
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    gsl_rng *r = ccr_test_rng(4321);
    for (size_t s = 0; s < STEPS; s++) {
        ccr_test_fill_uniform(r, xs[s], BATCH * D_IN, -2, 2);
        for (size_t b = 0; b < BATCH; b++)
            ys[s][b] = (int32_t)((xs[s][b * D_IN] > 0) + (xs[s][b * D_IN + 1] > 0.3f));
    }
    gsl_rng_free(r);
}

static void teardown(void)
{
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
}

/* D_IN -> linear D_H -> tanh -> cond(gate, 16 matrices where the gate has a
 * choice) -> D_OUT. */
static ccr_net *build(const char *gate)
{
    ccr_net *net;
    CCR_CK_OK(ctx, ccr_net_init(be, D_IN, BATCH, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, D_H));
    CCR_CK_OK(ctx, ccr_net_add_act(net, CCR_ACT_TANH));
    ccr_cond_config c = ccr_cond_config_default();
    c.gate = ccr_gate_type_find(gate);
    ck_assert_ptr_nonnull(c.gate);
    c.gate_cfg.n_experts = strcmp(gate, "dense") == 0 ? 4 : 16;
    c.gate_cfg.k = 2;
    if (strcmp(gate, "hmoe") == 0) {
        c.gate_cfg.n_groups = 4;
        c.gate_cfg.k_groups = 1;
        c.gate_cfg.k = 1;
        c.gate_cfg.k2 = 2;
    }
    c.gate_cfg.depth = 3;
    c.gate_cfg.randomize = true;
    c.gate_cfg.capacity_factor = 1.0;
    c.hidden = 5;
    c.d_out = D_OUT;
    CCR_CK_OK(ctx, ccr_net_add_cond(net, &c));
    gsl_rng *r = ccr_test_rng(17);
    CCR_CK_OK(ctx, ccr_net_finalize(net, r));
    gsl_rng_free(r);
    return net;
}

/* The bank tensors of the conditional layer (2 or 4), by name. */
static size_t bank_tensors(const ccr_net *net, size_t *idx)
{
    static const char *const names[] = {"w1", "b1", "w2", "b2", "w", "b"};
    const ccr_arena *p = ccr_net_params(net);
    size_t n = 0;
    for (size_t g = 0; g < 2; g++) {
        for (size_t i = 0; i < 6; i++) {
            char full[64];
            snprintf(full, sizeof full, "layers.%d.%s%s", COND_LAYER,
                     g == 0 ? "experts." : "tree.", names[i]);
            for (size_t t = 0; t < ccr_arena_count(p); t++)
                if (strcmp(ccr_arena_name(p, t), full) == 0)
                    idx[n++] = t;
        }
    }
    ck_assert(n == 2 || n == 4);
    return n;
}

static bool all_zero(const float *g, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (g[i] != 0.0f)
            return false;
    return true;
}

START_TEST(zeroing_is_exact)
{
    const char *gate = gates[_i];
    ccr_net *net = build(gate);
    ccr_arena *p = ccr_net_params(net);
    size_t n = ccr_arena_block_len(p);
    float *g = ccr_arena_grads(p), *ga = malloc(n * sizeof *ga);
    ck_assert_ptr_nonnull(ga);
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_SGD);
    oc.momentum = 0.0f;
    oc.lr = 0.5f;   /* large steps: routes change between steps */
    ccr_optim *o;
    CCR_CK_OK(ctx, ccr_optim_init(p, &oc, &o));
    gsl_rng *r = ccr_test_rng(5), *r2 = ccr_test_rng(5);
    for (size_t s = 0; s < STEPS; s++) {
        ccr_step_stats st;
        CCR_CK_OK(ctx, ccr_arena_zero_grad(p));
        ck_assert_msg(all_zero(g, n), "%s step %zu: gradient block not zero", gate, s);
        gsl_rng_memcpy(r2, r);
        CCR_CK_OK(ctx, ccr_net_loss_grad_mode(net, xs[s], ys[s], BATCH, CCR_MODE_TRAIN, r, &st));
        memcpy(ga, g, n * sizeof *g);
        /* The norm reads only the written ranges; bitwise the whole block's. */
        double s2 = 0.0, nrm;
        for (size_t i = 0; i < n; i++)
            s2 += (double)g[i] * g[i];
        CCR_CK_OK(ctx, ccr_arena_grad_norm(p, &nrm));
        ck_assert_msg(nrm == sqrt(s2), "%s step %zu: norm %.17g, block %.17g", gate, s, nrm,
                      sqrt(s2));
        /* The same pass after zeroing every gradient by hand. */
        memset(g, 0, n * sizeof *g);
        CCR_CK_OK(ctx, ccr_net_loss_grad_mode(net, xs[s], ys[s], BATCH, CCR_MODE_TRAIN, r2, &st));
        ck_assert_msg(memcmp(ga, g, n * sizeof *g) == 0, "%s step %zu: gradients differ",
                      gate, s);
        CCR_CK_OK(ctx, ccr_optim_step(o));
    }
    CCR_CK_OK(ctx, ccr_arena_zero_grad(p));
    ck_assert(all_zero(g, n));
    gsl_rng_free(r);
    gsl_rng_free(r2);
    ccr_optim_free(o);
    free(ga);
    ccr_net_free(net);
}
END_TEST

/* Trains STEPS steps with ccr_train_step; returns the parameter block and
 * the sum over steps of the parameters updated. */
static float *train(const char *gate, const ccr_optim_config *oc, size_t *updated)
{
    ccr_net *net = build(gate);
    ccr_arena *p = ccr_net_params(net);
    ccr_optim *o;
    CCR_CK_OK(ctx, ccr_optim_init(p, oc, &o));
    gsl_rng *r = ccr_test_rng(9);
    *updated = 0;
    for (size_t s = 0; s < STEPS; s++) {
        ccr_step_stats st;
        CCR_CK_OK(ctx, ccr_train_step(net, o, r, xs[s], ys[s], BATCH, &st));
        *updated += ccr_optim_last_updated(o);
    }
    size_t n = ccr_arena_block_len(p);
    float *w = malloc(n * sizeof *w);
    ck_assert_ptr_nonnull(w);
    memcpy(w, ccr_arena_values(p), n * sizeof *w);
    gsl_rng_free(r);
    ccr_optim_free(o);
    ccr_net_free(net);
    return w;
}

START_TEST(sgd_sparse_is_dense)
{
    const char *gate = gates[_i];
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_SGD);
    oc.momentum = 0.0f;
    oc.lr = 0.3f;
    size_t ud, us;
    float *wd = train(gate, &oc, &ud);
    oc.sparse = true;
    float *ws = train(gate, &oc, &us);
    ccr_net *net = build(gate);
    size_t n = ccr_arena_block_len(ccr_net_params(net));
    ccr_net_free(net);
    ck_assert_msg(memcmp(wd, ws, n * sizeof *wd) == 0, "%s: sparse SGD differs", gate);
    ck_assert_uint_eq(ud, STEPS * n);
    ck_assert_uint_le(us, ud);
    if (strcmp(gate, "topk") == 0 || strcmp(gate, "hmoe") == 0 ||
        strcmp(gate, "switch") == 0 || strcmp(gate, "signtree") == 0)
        ck_assert_msg(us < ud, "%s: sparse step updated every parameter", gate);
    free(wd);
    free(ws);
}
END_TEST

/* The documented rule's reference (the CPU kernel's float formula). */
static void ref_adam(float *w, const float *g, float *m, float *v, size_t n,
                     const ccr_optim_config *c, uint64_t t)
{
    const float step = (float)((double)c->lr / (1.0 - pow((double)c->beta1, (double)t)));
    const float isc2 = (float)(1.0 / sqrt(1.0 - pow((double)c->beta2, (double)t)));
    const float a1 = 1.0f - c->beta1, a2 = 1.0f - c->beta2;
    for (size_t i = 0; i < n; i++) {
        float gi = g[i] + c->weight_decay * w[i];
        float mi = c->beta1 * m[i] + a1 * gi;
        float vi = c->beta2 * v[i] + a2 * gi * gi;
        m[i] = fabsf(mi) < FLT_MIN ? 0.0f : mi;
        v[i] = vi < FLT_MIN ? 0.0f : vi;
        w[i] -= step * m[i] / (sqrtf(v[i]) * isc2 + c->eps);
    }
}

START_TEST(lazy_adam_is_its_rule)
{
    const char *gate = gates[_i];
    ccr_net *net = build(gate);
    ccr_arena *p = ccr_net_params(net);
    size_t bank[4], nb = bank_tensors(net, bank);
    ccr_cond *cond;
    ccr_gate_stats gs;
    CCR_CK_OK(ctx, ccr_net_cond(net, COND_LAYER, &cond, &gs));
    size_t E = ccr_gate_n_matrices(ccr_cond_gate(cond));
    size_t n = ccr_arena_block_len(p);
    /* Reference state, per tensor at the tensor's block offset. */
    float *w = malloc(n * sizeof *w), *m = calloc(n, sizeof *m), *v = calloc(n, sizeof *v);
    uint64_t *t_row = calloc(E, sizeof *t_row);
    bool *used = calloc(E, sizeof *used);
    ck_assert(w && m && v && t_row && used);
    const float *w0 = ccr_arena_values(p), *g = ccr_arena_grads(p);
    memcpy(w, w0, n * sizeof *w);
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    oc.lr = 0.05f;
    oc.weight_decay = 0.01f;
    oc.sparse = true;
    ccr_optim *o;
    CCR_CK_OK(ctx, ccr_optim_init(p, &oc, &o));
    gsl_rng *r = ccr_test_rng(3);
    size_t skipped = 0;
    for (uint64_t s = 1; s <= STEPS; s++) {
        ccr_step_stats st;
        CCR_CK_OK(ctx, ccr_arena_zero_grad(p));
        CCR_CK_OK(ctx, ccr_net_loss_grad_mode(net, xs[s - 1], ys[s - 1], BATCH, CCR_MODE_TRAIN,
                                              r, &st));
        const ccr_route *rt = ccr_cond_route(cond);
        memset(used, 0, E * sizeof *used);
        for (size_t q = 0; q < rt->batch * rt->slots; q++)
            if (rt->ids[q] >= 0)
                used[rt->ids[q]] = true;
        size_t expect = 0;
        for (size_t i = 0; i < ccr_arena_count(p); i++) {
            size_t off = (size_t)(ccr_arena_value(p, i) - w0), sz = ccr_arena_size(p, i);
            bool is_bank = false;
            for (size_t k = 0; k < nb; k++)
                is_bank |= bank[k] == i;
            if (!is_bank) {
                ref_adam(w + off, g + off, m + off, v + off, sz, &oc, s);
                expect += sz;
                continue;
            }
            size_t row = sz / E;
            for (size_t e = 0; e < E; e++) {
                if (!used[e])
                    continue;
                /* Each matrix counts its own steps (once per step, not per tensor). */
                uint64_t te = t_row[e] + 1;
                ref_adam(w + off + e * row, g + off + e * row, m + off + e * row,
                         v + off + e * row, row, &oc, te);
                expect += row;
            }
        }
        for (size_t e = 0; e < E; e++) {
            t_row[e] += used[e];
            skipped += !used[e];
        }
        CCR_CK_OK(ctx, ccr_optim_step(o));
        for (size_t i = 0; i < ccr_arena_count(p); i++) {
            size_t off = (size_t)(ccr_arena_value(p, i) - w0), sz = ccr_arena_size(p, i);
            ck_assert_msg(memcmp(w + off, w0 + off, sz * sizeof *w) == 0,
                          "%s step %llu: tensor %s differs from lazy Adam's rule", gate,
                          (unsigned long long)s, ccr_arena_name(p, i));
        }
        /* Updated: the reference's count, up to the padding of dense ranges. */
        size_t up = ccr_optim_last_updated(o);
        ck_assert_uint_ge(up, expect);
        ck_assert_uint_lt(up, expect + 16 * ccr_arena_count(p));
        ck_assert_double_eq(ccr_optim_flops(o), 15.0 * (double)up);
    }
    if (strcmp(gate, "topk") == 0 || strcmp(gate, "switch") == 0 ||
        strcmp(gate, "hmoe") == 0 || strcmp(gate, "signtree") == 0)
        ck_assert_msg(skipped > 0, "%s: every matrix used every step; the test tests nothing",
                      gate);
    gsl_rng_free(r);
    ccr_optim_free(o);
    free(w);
    free(m);
    free(v);
    free(t_row);
    free(used);
    ccr_net_free(net);
}
END_TEST

/* Dense Adam is unchanged: ccr_optim_last_updated is the whole block. */
START_TEST(dense_updates_everything)
{
    ccr_net *net = build("topk");
    ccr_arena *p = ccr_net_params(net);
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    ccr_optim *o;
    CCR_CK_OK(ctx, ccr_optim_init(p, &oc, &o));
    gsl_rng *r = ccr_test_rng(1);
    ccr_step_stats st;
    CCR_CK_OK(ctx, ccr_train_step(net, o, r, xs[0], ys[0], BATCH, &st));
    ck_assert_uint_eq(ccr_optim_last_updated(o), ccr_arena_block_len(p));
    ck_assert_double_eq(ccr_optim_flops(o), 13.0 * (double)ccr_arena_block_len(p));
    gsl_rng_free(r);
    ccr_optim_free(o);
    ccr_net_free(net);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("sparse_step");
    TCase *t = tcase_create("sparse");
    tcase_add_checked_fixture(t, setup, teardown);
    tcase_set_timeout(t, 120);
    tcase_add_loop_test(t, zeroing_is_exact, 0, (int)N_GATES);
    tcase_add_loop_test(t, sgd_sparse_is_dense, 0, (int)N_GATES);
    tcase_add_loop_test(t, lazy_adam_is_its_rule, 0, (int)N_GATES);
    tcase_add_test(t, dense_updates_everything);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return ccr_test_run(suite()); }
