/*
 * test_nonfinite.c - numbers that are not numbers (issue 9, class 3).
 * Non-finite parameters are rejected where they enter (ccr_arena_set,
 * checkpoints, naming the tensor), a non-finite loss is CCR_EDOM from
 * ccr_net_loss_grad / ccr_net_eval / ccr_train_step, a non-finite gradient
 * norm stops ccr_train_step before the update, gates refuse non-finite
 * routing weights, and a row of outputs holding NaN or infinity is never
 * counted as a correct prediction.  Each failure leaves the parameters as
 * they were.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ccr_test.h"
#include "ref/ref.h"  // provides: ccr_ref_softmax_xent

static ccr_ctx *ctx;
static ccr_backend *be;
static gsl_rng *rng;

static void setup(void)
{
    ck_assert_int_eq(ccr_ctx_init(&ctx), CCR_OK);
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, 9);
}

static void teardown(void)
{
    gsl_rng_free(rng);
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
}

/* Asserts CCR_EDOM with `word` in the message. */
#define EXPECT_EDOM(expr, word)                                                       \
    do {                                                                              \
        ccr_ctx_clear_error(ctx);                                                     \
        CCR_CK_STATUS(ctx, expr, CCR_EDOM);                                           \
        ck_assert_msg(strstr(ccr_ctx_errmsg(ctx), word) != NULL, "%s: '%s' lacks '%s'", \
                      #expr, ccr_ctx_errmsg(ctx), word);                              \
    } while (0)

/* d_in -> linear(h) -> linear(classes), finalized. */
static ccr_net *mlp(size_t d_in, size_t h, size_t classes, size_t batch)
{
    ccr_net *net;
    CCR_CK_OK(ctx, ccr_net_init(be, d_in, batch, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, h));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, classes));
    CCR_CK_OK(ctx, ccr_net_finalize(net, rng));
    return net;
}

/* A copy of every parameter value. */
static float *snapshot(ccr_net *net, size_t *n)
{
    ccr_arena *a = ccr_net_params(net);
    *n = ccr_arena_block_len(a);
    float *v = malloc(*n * sizeof *v);
    memcpy(v, ccr_arena_values(a), *n * sizeof *v);  /* CPU: host memory */
    return v;
}

static void assert_unchanged(ccr_net *net, const float *before, size_t n)
{
    ck_assert_mem_eq(ccr_arena_values(ccr_net_params(net)), before, n * sizeof *before);
}

START_TEST(test_arena_set_rejects)
{
    ccr_net *net = mlp(3, 4, 2, 4);
    ccr_arena *a = ccr_net_params(net);
    size_t n, i;
    float *before = snapshot(net, &n);
    CCR_CK_OK(ctx, ccr_arena_find(a, "layers.1.b", &i));
    float v[2] = {0.5f, NAN};
    EXPECT_EDOM(ccr_arena_set(a, i, v), "layers.1.b");
    v[1] = -INFINITY;
    EXPECT_EDOM(ccr_arena_set(a, i, v), "element 1");
    assert_unchanged(net, before, n);
    v[1] = 1.0f;
    CCR_CK_OK(ctx, ccr_arena_set(a, i, v));
    free(before);
    ccr_net_free(net);
}
END_TEST

/* A checkpoint with one NaN is refused naming the tensor; nothing loaded. */
START_TEST(test_checkpoint_rejects)
{
    ccr_net *net = mlp(3, 4, 2, 4);
    const char *good = ccr_test_path("nf-good.safetensors");
    CCR_CK_OK(ctx, ccr_net_save(net, good));
    ccr_safetensors *f;
    CCR_CK_OK(ctx, ccr_safetensors_read(ctx, good, &f));
    size_t nt = ccr_safetensors_count(f);
    ccr_st_tensor *t = calloc(nt, sizeof *t);
    float *bufs[8] = {0};
    ck_assert_uint_le(nt, 8);
    for (size_t k = 0; k < nt; k++) {
        t[k] = *ccr_safetensors_at(f, k);
        size_t m = ccr_st_tensor_numel(&t[k]);
        bufs[k] = malloc(m * sizeof(float));
        memcpy(bufs[k], t[k].data, m * sizeof(float));
        if (strcmp(t[k].name, "param.layers.0.w") == 0)
            bufs[k][m - 1] = INFINITY;
        t[k].data = bufs[k];
    }
    const char *meta[16];
    size_t nm = ccr_safetensors_meta_count(f);
    ck_assert_uint_le(nm, 8);
    for (size_t k = 0; k < nm; k++) {
        meta[2 * k] = ccr_safetensors_meta_key(f, k);
        meta[2 * k + 1] = ccr_safetensors_meta(f, meta[2 * k]);
    }
    const char *bad = ccr_test_path("nf-bad.safetensors");
    CCR_CK_OK(ctx, ccr_safetensors_write(ctx, bad, t, nt, meta, nm));
    ccr_safetensors_free(f);
    size_t n;
    float *before = snapshot(net, &n);
    EXPECT_EDOM(ccr_net_load(net, bad), "param.layers.0.w");
    EXPECT_EDOM(ccr_arena_load(ccr_net_params(net), bad), "param.layers.0.w");
    assert_unchanged(net, before, n);
    CCR_CK_OK(ctx, ccr_net_load(net, good));
    for (size_t k = 0; k < nt; k++)
        free(bufs[k]);
    free(t);
    free(before);
    ccr_net_free(net);
}
END_TEST

/* Finite parameters whose outputs overflow: the loss is infinite or NaN,
 * and loss_grad, eval and train_step say so instead of returning CCR_OK. */
START_TEST(test_nonfinite_loss)
{
    ccr_net *net = mlp(2, 2, 2, 4);
    ccr_arena *a = ccr_net_params(net);
    for (size_t i = 0; i < ccr_arena_count(a); i++) {
        float v[4] = {3e38f, 3e38f, -3e38f, 3e38f};
        CCR_CK_OK(ctx, ccr_arena_set(a, i, v));
    }
    float x[8] = {1e30f, 1e30f, 2e30f, 1e30f, 1e30f, 3e30f, 1e30f, 1e30f};
    int32_t y[4] = {0, 1, 0, 1};
    ccr_step_stats st = {.loss = 42.0};
    size_t n;
    float *before = snapshot(net, &n);
    EXPECT_EDOM(ccr_net_loss_grad(net, x, y, 4, &st), "loss is not finite");
    EXPECT_EDOM(ccr_net_eval(net, x, y, 4, &st), "loss is not finite");
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_SGD);
    ccr_optim *opt;
    CCR_CK_OK(ctx, ccr_optim_init(a, &oc, &opt));
    EXPECT_EDOM(ccr_train_step(net, opt, rng, x, y, 4, &st), "loss is not finite");
    ck_assert(st.loss == 42.0);  /* stats untouched */
    assert_unchanged(net, before, n);
    ccr_optim_free(opt);
    free(before);
    ccr_net_free(net);
}
END_TEST

/* A finite loss whose gradient overflows: d_in 2 -> 1 -> 3 with W1 = 0 (so
 * the logits are 0 and p = 1/3) and W2 = [3e38, -3e38, -3e38]: dL/dh =
 * -2/3 3e38 - 2/3 3e38 overflows float.  The step must not update. */
START_TEST(test_nonfinite_gradient)
{
    ccr_net *net = mlp(2, 1, 3, 2);
    ccr_arena *a = ccr_net_params(net);
    size_t i;
    float zero[3] = {0, 0, 0}, w2[3] = {3e38f, -3e38f, -3e38f};
    CCR_CK_OK(ctx, ccr_arena_find(a, "layers.0.w", &i));
    CCR_CK_OK(ctx, ccr_arena_set(a, i, zero));
    CCR_CK_OK(ctx, ccr_arena_find(a, "layers.0.b", &i));
    CCR_CK_OK(ctx, ccr_arena_set(a, i, zero));
    CCR_CK_OK(ctx, ccr_arena_find(a, "layers.1.w", &i));
    CCR_CK_OK(ctx, ccr_arena_set(a, i, w2));
    CCR_CK_OK(ctx, ccr_arena_find(a, "layers.1.b", &i));
    CCR_CK_OK(ctx, ccr_arena_set(a, i, zero));
    float x[4] = {1, 1, 1, 1};
    int32_t y[2] = {0, 0};
    ccr_step_stats st;
    CCR_CK_OK(ctx, ccr_net_loss_grad(net, x, y, 2, &st));  /* the loss is finite */
    ck_assert(fabs(st.loss - log(3.0)) < 1e-6);
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    ccr_optim *opt;
    CCR_CK_OK(ctx, ccr_optim_init(a, &oc, &opt));
    size_t n;
    float *before = snapshot(net, &n);
    EXPECT_EDOM(ccr_train_step(net, opt, rng, x, y, 2, &st), "gradient norm");
    assert_unchanged(net, before, n);
    ccr_optim_free(opt);
    free(before);
    ccr_net_free(net);
}
END_TEST

/* Gates whose parameters hold NaN (written past ccr_arena_set, as a bug or
 * a diverged optimiser would) refuse to route with non-finite weights. */
START_TEST(test_gate_nonfinite_weights)
{
    const char *names[] = {"dense", "topk", "hmoe", "switch"};
    for (size_t t = 0; t < 4; t++) {
        ccr_gate_config gc = ccr_gate_config_default();
        gc.d_in = 4;
        gc.n_experts = 4;
        gc.k = 2;
        gc.n_groups = 2;
        gc.k2 = 1;
        gc.capacity_factor = 4.0;
        ccr_gate *g;
        CCR_CK_OK(ctx, ccr_gate_alloc(ctx, ccr_gate_type_find(names[t]), &gc, 8, &g));
        ccr_arena *a;
        CCR_CK_OK(ctx, ccr_arena_init(be, &a));
        CCR_CK_OK(ctx, ccr_gate_declare(g, a, ""));
        CCR_CK_OK(ctx, ccr_arena_finalize(a));
        CCR_CK_OK(ctx, ccr_gate_init_params(g, rng));
        for (size_t i = 0; i < ccr_arena_count(a); i++) {
            float *v = ccr_arena_value(a, i);  /* CPU: host memory */
            for (size_t k = 0; k < ccr_arena_size(a, i); k++)
                v[k] = NAN;
        }
        float x[32];
        ccr_test_fill_uniform(rng, x, 32, -1, 1);
        ccr_route r;
        ccr_gate_stats st;
        ccr_ctx_clear_error(ctx);
        ccr_status s = ccr_gate_forward(g, x, 8, false, rng, &r, &st);
        ck_assert_msg(s == CCR_EDOM, "gate %s: %s (%s)", names[t], ccr_strerror(s),
                      ccr_ctx_errmsg(ctx));
        ck_assert_msg(strstr(ccr_ctx_errmsg(ctx), "routing weight") != NULL, "%s",
                      ccr_ctx_errmsg(ctx));
        ccr_gate_free(g);
        ccr_arena_free(a);
    }
}
END_TEST

/* The loss kernel: a row holding NaN or infinity is never correct (the
 * argmax of a NaN row used to fall on class 0, counted as a prediction). */
START_TEST(test_accuracy_ignores_nonfinite_rows)
{
    enum { R = 5, C = 3 };
    const float z[R * C] = {NAN, NAN, NAN,            /* all NaN, label 0 */
                            1, NAN, 0,                /* NaN elsewhere, label 0 */
                            INFINITY, 0, 0,           /* +inf on the label */
                            0, -INFINITY, -1,         /* -inf elsewhere, label 0 */
                            2, 1, 0};                 /* finite: correct */
    const int32_t y[R] = {0, 0, 0, 0, 0}, want[R] = {0, 0, 0, 0, 1};
    float loss[R];
    int32_t cor[R];
    ccr_ref_softmax_xent(z, y, R, C, 1.0f, loss, cor, NULL);
    ck_assert_mem_eq(cor, want, sizeof want);
}
END_TEST

static Suite *nonfinite_suite(void)
{
    Suite *s = suite_create("nonfinite");
    TCase *tc = tcase_create("nonfinite");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_arena_set_rejects);
    tcase_add_test(tc, test_checkpoint_rejects);
    tcase_add_test(tc, test_nonfinite_loss);
    tcase_add_test(tc, test_nonfinite_gradient);
    tcase_add_test(tc, test_gate_nonfinite_weights);
    tcase_add_test(tc, test_accuracy_ignores_nonfinite_rows);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return ccr_test_run(nonfinite_suite()); }
