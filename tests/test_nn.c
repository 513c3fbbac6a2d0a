/*
 * test_nn.c - networks: parameter and FLOP accounting, forward against a
 * hand computation, chunked evaluation, input read in place from backend
 * memory, checkpoint round trip, and training
 * that actually learns a task.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ccr_test.h"

static ccr_ctx *ctx;
static ccr_backend *be;
static gsl_rng *rng;

static void setup(void)
{
    ck_assert_int_eq(ccr_ctx_init(&ctx), CCR_OK);
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, 3);
}

static void teardown(void)
{
    gsl_rng_free(rng);
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
}

static ccr_net *mlp(size_t d_in, size_t batch, const size_t *widths, size_t n, ccr_act act)
{
    ccr_net *net;
    CCR_CK_OK(ctx, ccr_net_init(be, d_in, batch, &net));
    for (size_t i = 0; i < n; i++) {
        CCR_CK_OK(ctx, ccr_net_add_linear(net, widths[i]));
        if (i + 1 < n)
            CCR_CK_OK(ctx, ccr_net_add_act(net, act));
    }
    CCR_CK_OK(ctx, ccr_net_finalize(net, rng));
    return net;
}

/* 784-512-256-10: params = sum (in+1) out; forward FLOPs = sum (2 in out +
 * out); backward = sum (2 in out + out) + sum over layers > 0 of 2 in out. */
START_TEST(test_accounting)
{
    const size_t w[3] = {512, 256, 10};
    ccr_net *net = mlp(784, 4, w, 3, CCR_ACT_RELU);
    size_t want_params = 785 * 512 + 513 * 256 + 257 * 10;
    ck_assert_int_eq((int)ccr_net_n_params(net), (int)want_params);
    ck_assert_int_eq((int)ccr_arena_n_params(ccr_net_params(net)), (int)want_params);
    double mm = 2.0 * (784 * 512 + 512 * 256 + 256 * 10);
    ccr_flops f = ccr_net_flops(net);
    ck_assert_double_eq(f.fwd, mm + 512 + 256 + 10);
    ck_assert_double_eq(f.bwd, mm + 512 + 256 + 10 + 2.0 * (512 * 256 + 256 * 10));
    ck_assert_int_eq((int)ccr_net_n_layers(net), 5);
    ccr_layer_info info;
    CCR_CK_OK(ctx, ccr_net_layer_info(net, 1, &info));
    ck_assert_str_eq(info.kind, "relu");
    ck_assert_int_eq((int)info.n_params, 0);
    CCR_CK_OK(ctx, ccr_net_layer_info(net, 2, &info));
    ck_assert_str_eq(info.kind, "linear");
    ck_assert_int_eq((int)info.d_in, 512);
    ck_assert_int_eq((int)info.d_out, 256);
    ck_assert_double_eq(info.flops_fwd, 2.0 * 512 * 256 + 256);
    ck_assert_int_eq(ccr_net_layer_info(net, 5, &info), CCR_EINVAL);
    ck_assert_int_eq((int)ccr_net_d_out(net), 10);
    ccr_net_free(net);
}
END_TEST

/* Default init is U(-1/sqrt(d_in), 1/sqrt(d_in)) for W and b. */
START_TEST(test_init_range)
{
    const size_t w[1] = {300};
    ccr_net *net = mlp(100, 1, w, 1, CCR_ACT_RELU);
    ccr_arena *a = ccr_net_params(net);
    float *v = malloc(30000 * sizeof *v);
    CCR_CK_OK(ctx, ccr_arena_get(a, 0, v));
    double mx = 0, sum = 0, sq = 0;
    for (size_t i = 0; i < 30000; i++) {
        mx = fabs(v[i]) > mx ? fabs(v[i]) : mx;
        sum += v[i];
        sq += (double)v[i] * v[i];
    }
    ck_assert_double_le(mx, 0.1);
    ck_assert_double_gt(mx, 0.099);
    ck_assert_double_lt(fabs(sum / 30000), 0.002);
    /* Variance of U(-a, a) is a^2 / 3. */
    ck_assert_double_eq_tol(sq / 30000, 0.01 / 3, 2e-4);
    free(v);
    ccr_net_free(net);
}
END_TEST

START_TEST(test_forward_by_hand)
{
    const size_t w[2] = {2, 2};
    ccr_net *net = mlp(3, 2, w, 2, CCR_ACT_RELU);
    ccr_arena *a = ccr_net_params(net);
    float w0[6] = {1, -1, 2, 0, 0, 1}, b0[2] = {0, -1}, w1[4] = {1, 2, 3, 4}, b1[2] = {0.5f, 0};
    CCR_CK_OK(ctx, ccr_arena_set(a, 0, w0));
    CCR_CK_OK(ctx, ccr_arena_set(a, 1, b0));
    CCR_CK_OK(ctx, ccr_arena_set(a, 2, w1));
    CCR_CK_OK(ctx, ccr_arena_set(a, 3, b1));
    float x[6] = {1, 2, 3, -1, 0, 1};
    /* h1 = relu(x W0 + b0): [1+4, -1+3-1] = [5, 1]; [-1, 1+1-1] -> [0, 1].
     * y = h1 W1 + b1: [5+3+0.5, 10+4] = [8.5, 14]; [3.5, 4]. */
    const float *y;
    CCR_CK_OK(ctx, ccr_net_forward(net, x, 2, &y));
    float host[4];
    CCR_CK_OK(ctx, ccr_backend_get(be, host, y, sizeof host));
    const float want[4] = {8.5f, 14, 3.5f, 4};
    for (int i = 0; i < 4; i++)
        ck_assert_float_eq(host[i], want[i]);
    ccr_net_free(net);
}
END_TEST

/* Evaluating n examples in chunks of max_batch equals one big batch. */
START_TEST(test_eval_chunks)
{
    const size_t w[2] = {16, 4};
    ccr_net *small = mlp(8, 7, w, 2, CCR_ACT_TANH);
    gsl_rng_set(rng, 3);
    ccr_net *big = mlp(8, 50, w, 2, CCR_ACT_TANH);
    float x[50 * 8];
    int32_t y[50];
    ccr_test_fill_uniform(rng, x, 400, -2, 2);
    for (int i = 0; i < 50; i++)
        y[i] = i % 4;
    ccr_step_stats s1, s2;
    CCR_CK_OK(ctx, ccr_net_eval(small, x, y, 50, &s1));
    CCR_CK_OK(ctx, ccr_net_eval(big, x, y, 50, &s2));
    ck_assert_double_eq_tol(s1.loss, s2.loss, 1e-6);
    ck_assert_int_eq((int)s1.correct, (int)s2.correct);
    ck_assert_int_eq((int)s1.batch, 50);
    ccr_net_free(small);
    ccr_net_free(big);
}
END_TEST

/* CCR_INPUT_BACKEND: x read in place from backend memory trains exactly as
 * the staged host copy (three Adam steps, then evaluation: bit for bit);
 * NaN in it is refused (CCR_EDOM) before anything is computed; an unknown
 * value is CCR_EINVAL; a backward after switching needs a new forward. */
START_TEST(test_input_memory)
{
    const size_t w[2] = {12, 3}, B = 9, d = 5;
    ccr_net *nets[2];
    ccr_optim *opts[2];
    for (int k = 0; k < 2; k++) {
        gsl_rng_set(rng, 11);
        nets[k] = mlp(d, B, w, 2, CCR_ACT_RELU);
        ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
        CCR_CK_OK(ctx, ccr_optim_init(ccr_net_params(nets[k]), &oc, &opts[k]));
    }
    float x[3 * 9 * 5];
    int32_t y[3 * 9];
    ccr_test_fill_uniform(rng, x, 3 * B * d, -2, 2);
    for (size_t i = 0; i < 3 * B; i++)
        y[i] = (int32_t)(i % 3);
    float *xb;
    CCR_CK_OK(ctx, ccr_backend_alloc(be, sizeof x, (void **)&xb));
    CCR_CK_OK(ctx, ccr_backend_set(be, xb, x, sizeof x));
    CCR_CK_OK(ctx, ccr_net_set_input_memory(nets[1], CCR_INPUT_BACKEND));
    ccr_step_stats st[2];
    for (size_t step = 0; step < 3; step++) {
        CCR_CK_OK(ctx, ccr_train_step(nets[0], opts[0], NULL, x + step * B * d, y + step * B, B,
                                      &st[0]));
        CCR_CK_OK(ctx, ccr_train_step(nets[1], opts[1], NULL, xb + step * B * d, y + step * B, B,
                                      &st[1]));
        ck_assert(memcmp(&st[0].loss, &st[1].loss, sizeof st[0].loss) == 0);
    }
    const ccr_arena *a0 = ccr_net_params(nets[0]), *a1 = ccr_net_params(nets[1]);
    size_t n = ccr_arena_n_params(a0);
    ck_assert_mem_eq(ccr_arena_values(a0), ccr_arena_values(a1), n * sizeof(float));
    CCR_CK_OK(ctx, ccr_net_eval(nets[0], x, y, 3 * B, &st[0]));
    CCR_CK_OK(ctx, ccr_net_eval(nets[1], xb, y, 3 * B, &st[1]));
    ck_assert(memcmp(&st[0].loss, &st[1].loss, sizeof st[0].loss) == 0);
    ck_assert_int_eq((int)st[0].correct, (int)st[1].correct);

    /* NaN in backend memory: refused, parameters untouched. */
    float *before = malloc(n * sizeof *before);
    memcpy(before, ccr_arena_values(a1), n * sizeof *before);
    float nan = NAN;
    CCR_CK_OK(ctx, ccr_backend_set(be, xb + 7, &nan, sizeof nan));
    ck_assert_int_eq(ccr_train_step(nets[1], opts[1], NULL, xb, y, B, &st[1]), CCR_EDOM);
    ck_assert_mem_eq(ccr_arena_values(a1), before, n * sizeof(float));

    /* Switching: a pending backward is gone; unknown values refused. */
    const float *out;
    CCR_CK_OK(ctx, ccr_net_forward(nets[1], xb + B * d, B, &out));
    CCR_CK_OK(ctx, ccr_net_set_input_memory(nets[1], CCR_INPUT_HOST));
    ck_assert_int_eq(ccr_net_backward(nets[1], out), CCR_EINVAL);
    ck_assert_int_eq(ccr_net_set_input_memory(nets[1], (ccr_input_memory)2), CCR_EINVAL);
    ck_assert_int_eq(ccr_net_set_input_memory(NULL, CCR_INPUT_HOST), CCR_EINVAL);
    free(before);
    ccr_backend_free_buffer(be, xb);
    for (int k = 0; k < 2; k++) {
        ccr_optim_free(opts[k]);
        ccr_net_free(nets[k]);
    }
}
END_TEST

START_TEST(test_checkpoint_round_trip)
{
    const size_t w[2] = {6, 3};
    ccr_net *a = mlp(4, 5, w, 2, CCR_ACT_SIGMOID);
    ccr_net *b = mlp(4, 5, w, 2, CCR_ACT_SIGMOID);   /* different draws */
    float x[20];
    ccr_test_fill_uniform(rng, x, 20, -1, 1);
    const float *ya, *yb;
    float ha[15], hb[15];
    CCR_CK_OK(ctx, ccr_net_forward(a, x, 5, &ya));
    CCR_CK_OK(ctx, ccr_backend_get(be, ha, ya, sizeof ha));
    CCR_CK_OK(ctx, ccr_net_forward(b, x, 5, &yb));
    CCR_CK_OK(ctx, ccr_backend_get(be, hb, yb, sizeof hb));
    ck_assert_int_ne(memcmp(ha, hb, sizeof ha), 0);
    const char *path = ccr_test_path("net.safetensors");
    CCR_CK_OK(ctx, ccr_net_save(a, path));
    CCR_CK_OK(ctx, ccr_net_load(b, path));
    CCR_CK_OK(ctx, ccr_net_forward(b, x, 5, &yb));
    CCR_CK_OK(ctx, ccr_backend_get(be, hb, yb, sizeof hb));
    ck_assert_mem_eq(ha, hb, sizeof ha);
    ccr_safetensors *f;
    CCR_CK_OK(ctx, ccr_safetensors_read(ctx, path, &f));
    ck_assert_str_eq(ccr_safetensors_meta(f, "architecture"), "4;linear:6;sigmoid;linear:3");
    ck_assert_ptr_nonnull(ccr_safetensors_find(f, "param.layers.2.w"));
    ccr_safetensors_free(f);
    unlink(path);
    ccr_net_free(a);
    ccr_net_free(b);
}
END_TEST

/* A task that needs the hidden layer: y = quadrant of (x0, x1) with XOR-like
 * labels (sign x0 != sign x1), plus noise inputs.  A linear model cannot
 * beat ~50%; the MLP must reach > 95% on held-out data with both optimisers. */
START_TEST(test_learns_xor)
{
    const size_t n = 2000, d = 6;
    float *x = malloc(n * d * sizeof *x);
    int32_t *y = malloc(n * sizeof *y);
    ccr_test_fill_uniform(rng, x, n * d, -1, 1);
    for (size_t i = 0; i < n; i++)
        y[i] = (x[i * d] > 0) != (x[i * d + 1] > 0);
    const size_t w[2] = {32, 2};
    ccr_net *net = mlp(d, 50, w, 2, CCR_ACT_RELU);
    ccr_optim_config oc = ccr_optim_defaults(_i ? CCR_OPTIM_ADAM : CCR_OPTIM_SGD);
    oc.lr = _i ? 0.01f : 0.1f;
    ccr_optim *o;
    CCR_CK_OK(ctx, ccr_optim_init(ccr_net_params(net), &oc, &o));
    ccr_step_stats st, first = {0}, test;
    for (int epoch = 0; epoch < 40; epoch++) {
        for (size_t i0 = 0; i0 < 1500; i0 += 50) {
            CCR_CK_OK(ctx, ccr_train_step(net, o, rng, x + i0 * d, y + i0, 50, &st));
            if (epoch == 0 && i0 == 0)
                first = st;
        }
    }
    CCR_CK_OK(ctx, ccr_net_eval(net, x + 1500 * d, y + 1500, 500, &test));
    ck_assert_double_lt(test.loss, first.loss / 4);
    ck_assert_msg(test.correct > 475, "held-out accuracy %zu/500", test.correct);
    ccr_optim_free(o);
    ccr_net_free(net);
    free(x);
    free(y);
}
END_TEST

START_TEST(test_act_names)
{
    ccr_act a;
    for (int i = 0; i < 4; i++) {
        CCR_CK_OK(ctx, ccr_act_from_name(ccr_act_name((ccr_act)i), &a));
        ck_assert_int_eq((int)a, i);
    }
    ck_assert_ptr_null(ccr_act_name((ccr_act)17));
}
END_TEST

static Suite *nn_suite(void)
{
    Suite *s = suite_create("nn");
    TCase *tc = tcase_create("net");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_accounting);
    tcase_add_test(tc, test_init_range);
    tcase_add_test(tc, test_forward_by_hand);
    tcase_add_test(tc, test_eval_chunks);
    tcase_add_test(tc, test_input_memory);
    tcase_add_test(tc, test_checkpoint_round_trip);
    tcase_add_loop_test(tc, test_learns_xor, 0, 2);
    tcase_add_test(tc, test_act_names);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return ccr_test_run(nn_suite()); }
