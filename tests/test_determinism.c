/*
 * test_determinism.c - the same seed and thread count give a bitwise-
 * identical training trajectory: initial parameters, shuffled batch order,
 * per-step losses and final parameters.  A different seed gives a different
 * one (so the check is not vacuous).
 */
#include <stdlib.h>
#include <string.h>

#include "ccr_test.h"

#define N 600
#define D 12
#define STEPS 30
#define BATCH 40

typedef struct trajectory {
    double loss[STEPS];
    float *params;
    size_t n_params;
} trajectory;

static void run(unsigned long seed, bool use_ref, ccr_optim_kind kind, trajectory *t)
{
    ccr_ctx *ctx;
    ccr_backend *be;
    ck_assert_int_eq(ccr_ctx_init(&ctx), CCR_OK);
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    CCR_CK_OK(ctx, ccr_backend_cpu_set_use_ref(be, use_ref));
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, seed);
    /* Data from a fixed generator (independent of seed), so only the
     * library's use of the RNG varies. */
    gsl_rng *data_rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(data_rng, 1234);
    ccr_dataset *ds;
    CCR_CK_OK(ctx, ccr_dataset_alloc(ctx, N, D, 3, &ds));
    ccr_test_fill_uniform(data_rng, ds->x, N * D, -1, 1);
    for (size_t i = 0; i < N; i++)
        ds->y[i] = (int32_t)((ds->x[i * D] > 0) + (ds->x[i * D + 1] > 0.5f));

    ccr_net *net;
    CCR_CK_OK(ctx, ccr_net_init(be, D, BATCH, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 64));
    CCR_CK_OK(ctx, ccr_net_add_act(net, CCR_ACT_RELU));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 3));
    CCR_CK_OK(ctx, ccr_net_finalize(net, rng));
    ccr_optim *o;
    ccr_optim_config oc = ccr_optim_defaults(kind);
    CCR_CK_OK(ctx, ccr_optim_init(ccr_net_params(net), &oc, &o));
    size_t perm[N];
    float xb[BATCH * D];
    int32_t yb[BATCH];
    ccr_permutation(rng, perm, N);
    for (size_t s = 0; s < STEPS; s++) {
        size_t off = (s * BATCH) % N;
        if (off == 0 && s > 0)
            ccr_permutation(rng, perm, N);
        ccr_dataset_gather(ds, perm + off, BATCH, xb, yb);
        ccr_step_stats st;
        CCR_CK_OK(ctx, ccr_train_step(net, o, rng, xb, yb, BATCH, &st));
        t->loss[s] = st.loss;
    }
    ccr_arena *a = ccr_net_params(net);
    t->n_params = ccr_arena_block_len(a);
    t->params = malloc(t->n_params * sizeof(float));
    memcpy(t->params, ccr_arena_values(a), t->n_params * sizeof(float));
    ccr_optim_free(o);
    ccr_net_free(net);
    ccr_dataset_free(ds);
    gsl_rng_free(data_rng);
    gsl_rng_free(rng);
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
}

/* _i: bit 0 = reference kernels, bit 1 = Adam. */
START_TEST(test_same_seed_same_bits)
{
    bool use_ref = _i & 1;
    ccr_optim_kind kind = (_i & 2) ? CCR_OPTIM_ADAM : CCR_OPTIM_SGD;
    trajectory a, b, c;
    run(5, use_ref, kind, &a);
    run(5, use_ref, kind, &b);
    run(6, use_ref, kind, &c);
    ck_assert_mem_eq(a.loss, b.loss, sizeof a.loss);
    ck_assert_int_eq((int)a.n_params, (int)b.n_params);
    ck_assert_mem_eq(a.params, b.params, a.n_params * sizeof(float));
    ck_assert_int_ne(memcmp(a.params, c.params, a.n_params * sizeof(float)), 0);
    ck_assert_int_ne(memcmp(a.loss, c.loss, sizeof a.loss), 0);
    /* Training made progress (the trajectory is not trivially constant). */
    ck_assert_double_lt(a.loss[STEPS - 1], a.loss[0]);
    free(a.params);
    free(b.params);
    free(c.params);
}
END_TEST

static Suite *det_suite(void)
{
    Suite *s = suite_create("determinism");
    TCase *tc = tcase_create("trajectory");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_same_seed_same_bits, 0, 4);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return ccr_test_run(det_suite()); }
