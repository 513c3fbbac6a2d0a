/*
 * test_grad.c - finite-difference gradient checks of every layer and loss.
 *
 * The reference is an independent double-precision forward pass of the same
 * MLP written here (linear layers, activations, mean softmax cross-entropy);
 * central differences of it are compared with ccr's analytic float
 * gradients for every parameter, for each activation, on both the reference
 * and the cblas kernel tables.  The optimisers are checked against their
 * closed forms (Kingma & Ba's Adam, PyTorch-convention SGD momentum).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ccr_test.h"

#define B 6
#define D_IN 5

static ccr_ctx *ctx;
static gsl_rng *rng;

static void setup(void)
{
    ck_assert_int_eq(ccr_ctx_init(&ctx), CCR_OK);
    rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, 7);
}

static void teardown(void)
{
    gsl_rng_free(rng);
    ccr_ctx_free(ctx);
}

static double act_d(ccr_act a, double x)
{
    switch (a) {
    case CCR_ACT_RELU: return x > 0 ? x : 0;
    case CCR_ACT_TANH: return tanh(x);
    case CCR_ACT_SIGMOID: return 1.0 / (1.0 + exp(-x));
    default: return x;
    }
}

/* Double-precision loss of the net [D_IN -> 7 -> act -> 4 -> act -> 3] with
 * parameters p (the arena's tensors in order, as doubles). */
static double ref_loss(double *const *p, const float *x, const int32_t *y, ccr_act act)
{
    const size_t dims[4] = {D_IN, 7, 4, 3};
    double total = 0.0;
    for (size_t e = 0; e < B; e++) {
        double h[8], o[8];
        for (size_t i = 0; i < D_IN; i++)
            h[i] = x[e * D_IN + i];
        for (size_t l = 0; l < 3; l++) {
            const double *w = p[2 * l], *b = p[2 * l + 1];
            for (size_t j = 0; j < dims[l + 1]; j++) {
                double acc = b[j];
                for (size_t i = 0; i < dims[l]; i++)
                    acc += h[i] * w[i * dims[l + 1] + j];
                o[j] = l < 2 ? act_d(act, acc) : acc;
            }
            memcpy(h, o, sizeof o);
        }
        double m = h[0];
        for (size_t j = 1; j < 3; j++)
            m = h[j] > m ? h[j] : m;
        double s = 0;
        for (size_t j = 0; j < 3; j++)
            s += exp(h[j] - m);
        total += m + log(s) - h[y[e]];
    }
    return total / B;
}

static void check_net_grad(ccr_act act, bool use_ref)
{
    ccr_backend *be;
    ccr_net *net;
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    CCR_CK_OK(ctx, ccr_backend_cpu_set_use_ref(be, use_ref));
    CCR_CK_OK(ctx, ccr_net_init(be, D_IN, B, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 7));
    CCR_CK_OK(ctx, ccr_net_add_act(net, act));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 4));
    CCR_CK_OK(ctx, ccr_net_add_act(net, act));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 3));
    CCR_CK_OK(ctx, ccr_net_finalize(net, rng));
    ccr_arena *a = ccr_net_params(net);
    ck_assert_int_eq((int)ccr_arena_count(a), 6);
    /* Larger weights than the default init so every layer matters. */
    for (size_t t = 0; t < 6; t++) {
        float v[64];
        ccr_test_fill_uniform(rng, v, ccr_arena_size(a, t), -1.5f, 1.5f);
        CCR_CK_OK(ctx, ccr_arena_set(a, t, v));
    }
    float x[B * D_IN];
    int32_t y[B];
    ccr_test_fill_uniform(rng, x, B * D_IN, -1, 1);
    for (size_t e = 0; e < B; e++)
        y[e] = (int32_t)gsl_rng_uniform_int(rng, 3);

    CCR_CK_OK(ctx, ccr_arena_zero_grad(a));
    ccr_step_stats st;
    CCR_CK_OK(ctx, ccr_net_loss_grad(net, x, y, B, &st));

    double *p[6];
    for (size_t t = 0; t < 6; t++) {
        size_t n = ccr_arena_size(a, t);
        p[t] = malloc(n * sizeof(double));
        float v[64];
        CCR_CK_OK(ctx, ccr_arena_get(a, t, v));
        for (size_t i = 0; i < n; i++)
            p[t][i] = v[i];
    }
    double l0 = ref_loss(p, x, y, act);
    ck_assert_msg(fabs(l0 - st.loss) < 1e-5 * (1 + fabs(l0)), "loss %g vs reference %g",
                  st.loss, l0);
    const double h = 1e-5;
    double worst = 0.0;
    for (size_t t = 0; t < 6; t++) {
        float g[64];
        CCR_CK_OK(ctx, ccr_arena_get_grad(a, t, g));
        for (size_t i = 0; i < ccr_arena_size(a, t); i++) {
            double keep = p[t][i];
            p[t][i] = keep + h;
            double lp = ref_loss(p, x, y, act);
            p[t][i] = keep - h;
            double lm = ref_loss(p, x, y, act);
            p[t][i] = keep;
            double num = (lp - lm) / (2 * h);
            double err = fabs(num - g[i]) / (1e-4 + fabs(num));
            if (err > worst)
                worst = err;
            ck_assert_msg(fabs(num - g[i]) <= 2e-4 + 2e-3 * fabs(num),
                          "%s %s: d/d%s[%zu] analytic %.7g numeric %.7g", ccr_act_name(act),
                          use_ref ? "ref" : "blas", ccr_arena_name(a, t), i, g[i], num);
        }
    }
    for (size_t t = 0; t < 6; t++)
        free(p[t]);
    ccr_net_free(net);
    ccr_backend_free(be);
}

START_TEST(test_grad_relu) { check_net_grad(CCR_ACT_RELU, _i); }
END_TEST
START_TEST(test_grad_tanh) { check_net_grad(CCR_ACT_TANH, _i); }
END_TEST
START_TEST(test_grad_sigmoid) { check_net_grad(CCR_ACT_SIGMOID, _i); }
END_TEST
START_TEST(test_grad_identity) { check_net_grad(CCR_ACT_IDENTITY, _i); }
END_TEST

/* Backward accumulates: two backward passes without zero_grad double it. */
START_TEST(test_grad_accumulates)
{
    ccr_backend *be;
    ccr_net *net;
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    CCR_CK_OK(ctx, ccr_net_init(be, D_IN, B, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 3));
    CCR_CK_OK(ctx, ccr_net_finalize(net, rng));
    float x[B * D_IN], g1[32], g2[32];
    int32_t y[B] = {0, 1, 2, 0, 1, 2};
    ccr_test_fill_uniform(rng, x, B * D_IN, -1, 1);
    ccr_step_stats st;
    ccr_arena *a = ccr_net_params(net);
    CCR_CK_OK(ctx, ccr_arena_zero_grad(a));
    CCR_CK_OK(ctx, ccr_net_loss_grad(net, x, y, B, &st));
    CCR_CK_OK(ctx, ccr_arena_get_grad(a, 0, g1));
    CCR_CK_OK(ctx, ccr_net_loss_grad(net, x, y, B, &st));
    CCR_CK_OK(ctx, ccr_arena_get_grad(a, 0, g2));
    for (size_t i = 0; i < ccr_arena_size(a, 0); i++)
        ck_assert_float_eq_tol(g2[i], 2 * g1[i], 1e-6f);
    ccr_net_free(net);
    ccr_backend_free(be);
}
END_TEST

/* Softmax cross-entropy: loss = logsumexp - z_y; gradient by finite
 * differences; correctness flag = first argmax. */
START_TEST(test_xent_known)
{
    ccr_backend *be;
    ccr_net *net;
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    CCR_CK_OK(ctx, ccr_net_init(be, 2, 2, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 3));
    CCR_CK_OK(ctx, ccr_net_finalize(net, rng));
    /* W = [[1,0,-1],[0,2,0]], b = [0.5,0,0]: logits are hand-computable. */
    float w[6] = {1, 0, -1, 0, 2, 0}, b[3] = {0.5f, 0, 0};
    CCR_CK_OK(ctx, ccr_arena_set(ccr_net_params(net), 0, w));
    CCR_CK_OK(ctx, ccr_arena_set(ccr_net_params(net), 1, b));
    float x[4] = {1, 1, -2, 0.25f};
    int32_t y[2] = {1, 2};
    /* logits: [1.5, 2, -1] and [-1.5, 0.5, 2]. */
    double z[2][3] = {{1.5, 2, -1}, {-1.5, 0.5, 2}};
    double want = 0;
    for (int r = 0; r < 2; r++) {
        double s = 0;
        for (int c = 0; c < 3; c++)
            s += exp(z[r][c]);
        want += log(s) - z[r][y[r]];
    }
    ccr_step_stats st;
    CCR_CK_OK(ctx, ccr_net_eval(net, x, y, 2, &st));
    ck_assert_double_eq_tol(st.loss, want / 2, 1e-6);
    ck_assert_int_eq((int)st.correct, 2);   /* argmaxes 1 and 2 */
    y[0] = 0;
    CCR_CK_OK(ctx, ccr_net_eval(net, x, y, 2, &st));
    ck_assert_int_eq((int)st.correct, 1);
    ccr_net_free(net);
    ccr_backend_free(be);
}
END_TEST

/* Adam's first step moves every weight by lr * g / (|g| + eps) (bias
 * correction makes m_hat = g, v_hat = g^2); SGD momentum follows
 * v1 = g1, w1 = w0 - lr g1; v2 = mu v1 + g2, w2 = w1 - lr v2. */
START_TEST(test_optim_closed_form)
{
    ccr_backend *be;
    ccr_arena *a;
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    CCR_CK_OK(ctx, ccr_arena_init(be, &a));
    size_t shape[1] = {5};
    CCR_CK_OK(ctx, ccr_arena_add(a, "p", 1, shape, NULL));
    CCR_CK_OK(ctx, ccr_arena_finalize(a));
    float w0[5] = {1, -2, 0.5f, 3, 0}, g[5] = {0.1f, -0.3f, 2, -1e-3f, 0.7f}, w[5];
    for (int kind = 0; kind < 2; kind++) {
        ccr_optim_config oc = ccr_optim_defaults(kind ? CCR_OPTIM_ADAM : CCR_OPTIM_SGD);
        oc.lr = 0.01f;
        ccr_optim *o;
        CCR_CK_OK(ctx, ccr_arena_set(a, 0, w0));
        CCR_CK_OK(ctx, ccr_optim_init(a, &oc, &o));
        memcpy(ccr_arena_grad(a, 0), g, sizeof g);
        CCR_CK_OK(ctx, ccr_optim_step(o));
        CCR_CK_OK(ctx, ccr_arena_get(a, 0, w));
        for (int i = 0; i < 5; i++) {
            double want = kind ? w0[i] - 0.01 * g[i] / (fabs(g[i]) + 1e-8) : w0[i] - 0.01 * g[i];
            ck_assert_double_eq_tol(w[i], want, 1e-6);
        }
        if (kind == 0) {
            /* Second SGD step with the same gradient: v2 = 0.9 g + g. */
            CCR_CK_OK(ctx, ccr_optim_step(o));
            CCR_CK_OK(ctx, ccr_arena_get(a, 0, w));
            for (int i = 0; i < 5; i++)
                ck_assert_double_eq_tol(w[i], w0[i] - 0.01 * g[i] - 0.01 * 1.9 * g[i], 1e-6);
        }
        ccr_optim_free(o);
    }
    ccr_arena_free(a);
    ccr_backend_free(be);
}
END_TEST

/* The optimised CPU Adam (float, PyTorch's arrangement) against the double
 * reference over many steps and awkward lengths. */
START_TEST(test_adam_fast_vs_ref)
{
    ccr_backend *fast, *ref;
    ccr_arena *a[2];
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &fast));
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &ref));
    CCR_CK_OK(ctx, ccr_backend_cpu_set_use_ref(ref, true));
    ccr_backend *bes[2] = {fast, ref};
    ccr_optim *o[2];
    size_t shape[1] = {1037};
    float w0[1037], g[1037];
    ccr_test_fill_uniform(rng, w0, 1037, -1, 1);
    for (int i = 0; i < 2; i++) {
        CCR_CK_OK(ctx, ccr_arena_init(bes[i], &a[i]));
        CCR_CK_OK(ctx, ccr_arena_add(a[i], "p", 1, shape, NULL));
        CCR_CK_OK(ctx, ccr_arena_finalize(a[i]));
        CCR_CK_OK(ctx, ccr_arena_set(a[i], 0, w0));
        ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
        oc.lr = 0.01f;
        oc.weight_decay = 1e-3f;
        CCR_CK_OK(ctx, ccr_optim_init(a[i], &oc, &o[i]));
    }
    for (int step = 0; step < 50; step++) {
        ccr_test_fill_uniform(rng, g, 1037, -1, 1);
        for (int i = 0; i < 2; i++) {
            memcpy(ccr_arena_grad(a[i], 0), g, sizeof g);
            CCR_CK_OK(ctx, ccr_optim_step(o[i]));
        }
    }
    ccr_test_assert_nmse(ccr_arena_value(a[0], 0), ccr_arena_value(a[1], 0), 1037, 1e-12,
                         "adam fast vs ref");
    ck_assert_int_ne(memcmp(ccr_arena_value(a[0], 0), w0, sizeof w0), 0);
    for (int i = 0; i < 2; i++) {
        ccr_optim_free(o[i]);
        ccr_arena_free(a[i]);
    }
    ccr_backend_free(fast);
    ccr_backend_free(ref);
}
END_TEST

static Suite *grad_suite(void)
{
    Suite *s = suite_create("grad");
    TCase *tc = tcase_create("fd");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    /* Loop index 0: cblas kernels; 1: reference kernels. */
    tcase_add_loop_test(tc, test_grad_relu, 0, 2);
    tcase_add_loop_test(tc, test_grad_tanh, 0, 2);
    tcase_add_loop_test(tc, test_grad_sigmoid, 0, 2);
    tcase_add_loop_test(tc, test_grad_identity, 0, 2);
    tcase_add_test(tc, test_grad_accumulates);
    tcase_add_test(tc, test_xent_known);
    tcase_add_test(tc, test_optim_closed_form);
    tcase_add_test(tc, test_adam_fast_vs_ref);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return ccr_test_run(grad_suite()); }
