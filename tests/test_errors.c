/*
 * test_errors.c - every documented error of the core, backend, arena,
 * network and optimiser APIs, provoked; each must return the documented
 * status, leave a message on the context, and leave outputs untouched.
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
    gsl_rng_set(rng, 11);
}

static void teardown(void)
{
    gsl_rng_free(rng);
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
}

/* Asserts status `want` and a non-empty message, then clears the message. */
#define EXPECT(expr, want)                                                     \
    do {                                                                       \
        ccr_ctx_clear_error(ctx);                                              \
        CCR_CK_STATUS(ctx, expr, want);                                        \
        ck_assert_msg(ccr_ctx_errmsg(ctx)[0] != '\0', "%s: no message", #expr); \
    } while (0)

static ccr_net *small_net(void)
{
    ccr_net *net;
    CCR_CK_OK(ctx, ccr_net_init(be, 3, 4, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 5));
    CCR_CK_OK(ctx, ccr_net_add_act(net, CCR_ACT_TANH));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 2));
    CCR_CK_OK(ctx, ccr_net_finalize(net, rng));
    return net;
}

START_TEST(test_backend_errors)
{
    void *p = (void *)0x1;
    EXPECT(ccr_backend_alloc(be, 0, &p), CCR_EINVAL);
    ck_assert_ptr_eq(p, (void *)0x1);
    EXPECT(ccr_backend_alloc(be, 16, NULL), CCR_EINVAL);
    EXPECT(ccr_backend_alloc(be, SIZE_MAX - 8, &p), CCR_ENOMEM);
    ck_assert_ptr_eq(p, (void *)0x1);
    EXPECT(ccr_backend_set(be, NULL, "x", 1), CCR_EINVAL);
    EXPECT(ccr_backend_get(be, &p, NULL, 1), CCR_EINVAL);
    EXPECT(ccr_backend_memset(be, NULL, 0, 4), CCR_EINVAL);
    ck_assert_int_eq(ccr_backend_alloc(NULL, 4, &p), CCR_EINVAL);
    ccr_backend *out = (ccr_backend *)0x1;
    EXPECT(ccr_backend_cpu_init(ctx, NULL), CCR_EINVAL);
    /* Without CUDA compiled in: CCR_EUNSUP; with CUDA but no GPU: CCR_ENODEV. */
    ccr_ctx_clear_error(ctx);
    ccr_status s = ccr_backend_cuda_init(ctx, 0, &out);
    if (s != CCR_OK) {
        ck_assert_msg(s == CCR_EUNSUP || s == CCR_ENODEV || s == CCR_ECUDA, "cuda init: %s",
                      ccr_strerror(s));
        ck_assert_ptr_eq(out, (ccr_backend *)0x1);
        ck_assert_str_ne(ccr_ctx_errmsg(ctx), "");
    } else {
        ck_assert_int_eq(ccr_backend_cpu_set_use_ref(out, true), CCR_EUNSUP);
        ccr_backend_free(out);
    }
    EXPECT(ccr_backend_cuda_init(ctx, 1 << 20, &out), s == CCR_OK ? CCR_ENODEV : s);
}
END_TEST

START_TEST(test_gemm_errors)
{
    float a[6] = {1, 2, 3, 4, 5, 6}, b[6] = {1, 1, 1, 1, 1, 1}, c[4] = {9, 9, 9, 9};
    const float keep[4] = {9, 9, 9, 9};
    EXPECT(ccr_backend_gemm(be, false, false, 2, 2, 3, 1, a, 2, b, 2, 0, c, 2), CCR_EINVAL);
    EXPECT(ccr_backend_gemm(be, false, false, 0, 2, 3, 1, a, 3, b, 2, 0, c, 2), CCR_EINVAL);
    EXPECT(ccr_backend_gemm(be, false, false, 2, 2, 3, 1, NULL, 3, b, 2, 0, c, 2), CCR_EINVAL);
    ccr_mat A = ccr_mat_make(a, 2, 3), B = ccr_mat_make(b, 2, 3), C = ccr_mat_make(c, 2, 2);
    EXPECT(ccr_mat_gemm(be, false, false, 1, A, B, 0, C), CCR_EBADLEN);   /* 2x3 * 2x3 */
    ccr_mat Bad = {a, 2, 3, 2};
    EXPECT(ccr_mat_gemm(be, false, true, 1, Bad, B, 0, C), CCR_EINVAL);  /* ld < cols */
    ck_assert_mem_eq(c, keep, sizeof c);
    CCR_CK_OK(ctx, ccr_mat_gemm(be, false, true, 1, A, B, 0, C));          /* A B^T is 2x2 */
    ck_assert_float_eq(c[0], 6);
}
END_TEST

START_TEST(test_arena_errors)
{
    ccr_arena *a;
    CCR_CK_OK(ctx, ccr_arena_init(be, &a));
    size_t shape[2] = {2, 3}, zero[2] = {2, 0}, idx = 77;
    EXPECT(ccr_arena_finalize(a), CCR_EINVAL);                     /* empty */
    EXPECT(ccr_arena_add(a, "w", 0, shape, &idx), CCR_EINVAL);       /* rank 0 */
    EXPECT(ccr_arena_add(a, "w", 5, shape, &idx), CCR_EINVAL);       /* rank 5 */
    EXPECT(ccr_arena_add(a, "w", 2, zero, &idx), CCR_EINVAL);        /* zero extent */
    EXPECT(ccr_arena_add(a, "", 2, shape, &idx), CCR_EINVAL);        /* empty name */
    char longname[100];
    memset(longname, 'x', 99);
    longname[99] = '\0';
    EXPECT(ccr_arena_add(a, longname, 2, shape, &idx), CCR_EINVAL);
    EXPECT(ccr_arena_add(a, NULL, 2, shape, &idx), CCR_EINVAL);
    ck_assert_int_eq((int)idx, 77);
    CCR_CK_OK(ctx, ccr_arena_add(a, "w", 2, shape, &idx));
    EXPECT(ccr_arena_add(a, "w", 2, shape, &idx), CCR_EINVAL);       /* duplicate */
    ck_assert_int_eq((int)ccr_arena_count(a), 1);
    EXPECT(ccr_arena_zero_grad(a), CCR_EINVAL);                    /* not finalized */
    float buf[6];
    EXPECT(ccr_arena_set(a, 0, buf), CCR_EINVAL);
    CCR_CK_OK(ctx, ccr_arena_finalize(a));
    EXPECT(ccr_arena_finalize(a), CCR_EINVAL);
    EXPECT(ccr_arena_add(a, "v", 2, shape, &idx), CCR_EINVAL);
    EXPECT(ccr_arena_get(a, 1, buf), CCR_EINVAL);                  /* index out of range */
    EXPECT(ccr_arena_load(a, "/nonexistent/ccr.safetensors"), CCR_EIO);
    ccr_arena_free(a);
}
END_TEST

START_TEST(test_net_build_errors)
{
    ccr_net *net = (ccr_net *)0x1;
    EXPECT(ccr_net_init(be, 0, 4, &net), CCR_EINVAL);
    EXPECT(ccr_net_init(be, 3, 0, &net), CCR_EINVAL);
    ck_assert_ptr_eq(net, (ccr_net *)0x1);
    CCR_CK_OK(ctx, ccr_net_init(be, 3, 4, &net));
    EXPECT(ccr_net_finalize(net, rng), CCR_EINVAL);                /* no layers */
    EXPECT(ccr_net_add_linear(net, 0), CCR_EINVAL);
    EXPECT(ccr_net_add_act(net, (ccr_act)42), CCR_EINVAL);
    CCR_CK_OK(ctx, ccr_net_add_act(net, CCR_ACT_RELU));
    EXPECT(ccr_net_finalize(net, rng), CCR_EINVAL);                /* no parameters */
    ccr_net_free(net);
    CCR_CK_OK(ctx, ccr_net_init(be, 3, 4, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 2));
    float x[3] = {1, 2, 3};
    const float *y = NULL;
    EXPECT(ccr_net_forward(net, x, 1, &y), CCR_EINVAL);            /* not finalized */
    EXPECT(ccr_net_finalize(net, NULL), CCR_EINVAL);
    CCR_CK_OK(ctx, ccr_net_finalize(net, rng));
    EXPECT(ccr_net_finalize(net, rng), CCR_EINVAL);
    EXPECT(ccr_net_add_linear(net, 2), CCR_EINVAL);                /* after finalize */
    EXPECT(ccr_net_backward(net, x), CCR_EINVAL);                  /* no forward yet */
    ck_assert_ptr_null(y);
    ccr_act act = CCR_ACT_TANH;
    ck_assert_int_eq(ccr_act_from_name("swish", &act), CCR_EINVAL);
    ck_assert_int_eq((int)act, (int)CCR_ACT_TANH);
    ccr_net_free(net);
}
END_TEST

/* Bad input to a training step changes no parameter. */
START_TEST(test_step_errors_lose_nothing)
{
    ccr_net *net = small_net();
    ccr_arena *a = ccr_net_params(net);
    ccr_optim *o;
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    CCR_CK_OK(ctx, ccr_optim_init(a, &oc, &o));
    size_t n = ccr_arena_block_len(a);
    float *before = malloc(n * sizeof *before);
    memcpy(before, ccr_arena_values(a), n * sizeof *before);
    float x[12] = {0};
    int32_t y[4] = {0, 1, 0, 1};
    ccr_step_stats st = {.loss = -1};
    EXPECT(ccr_train_step(net, o, rng, x, y, 0, &st), CCR_EBADLEN);
    EXPECT(ccr_train_step(net, o, rng, x, y, 5, &st), CCR_EBADLEN);
    y[2] = 2;                                                      /* label out of range */
    EXPECT(ccr_train_step(net, o, rng, x, y, 4, &st), CCR_EINVAL);
    y[2] = -1;
    EXPECT(ccr_train_step(net, o, rng, x, y, 4, &st), CCR_EINVAL);
    y[2] = 0;
    x[5] = NAN;
    EXPECT(ccr_train_step(net, o, rng, x, y, 4, &st), CCR_EDOM);
    x[5] = INFINITY;
    EXPECT(ccr_net_eval(net, x, y, 4, &st), CCR_EDOM);
    EXPECT(ccr_net_eval(net, x, y, 0, &st), CCR_EBADLEN);
    ck_assert_mem_eq(before, ccr_arena_values(a), n * sizeof *before);
    ck_assert_double_eq(st.loss, -1);
    const float *out = NULL;
    EXPECT(ccr_net_forward(net, x, 2, &out), CCR_EDOM);
    ck_assert_ptr_null(out);
    free(before);
    ccr_optim_free(o);
    ccr_net_free(net);
}
END_TEST

START_TEST(test_optim_errors)
{
    ccr_net *net = small_net();
    ccr_arena *a = ccr_net_params(net);
    ccr_optim *o = (ccr_optim *)0x1;
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_SGD);
    oc.lr = 0;
    EXPECT(ccr_optim_init(a, &oc, &o), CCR_EINVAL);
    oc.lr = NAN;
    EXPECT(ccr_optim_init(a, &oc, &o), CCR_EINVAL);
    oc = ccr_optim_defaults(CCR_OPTIM_SGD);
    oc.momentum = 1.0f;
    EXPECT(ccr_optim_init(a, &oc, &o), CCR_EINVAL);
    oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    oc.beta2 = 1.0f;
    EXPECT(ccr_optim_init(a, &oc, &o), CCR_EINVAL);
    oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    oc.eps = 0;
    EXPECT(ccr_optim_init(a, &oc, &o), CCR_EINVAL);
    oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    oc.weight_decay = -1;
    EXPECT(ccr_optim_init(a, &oc, &o), CCR_EINVAL);
    oc.weight_decay = 0;
    oc.kind = (ccr_optim_kind)9;
    EXPECT(ccr_optim_init(a, &oc, &o), CCR_EINVAL);
    ck_assert_ptr_eq(o, (ccr_optim *)0x1);
    oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    CCR_CK_OK(ctx, ccr_optim_init(a, &oc, &o));
    EXPECT(ccr_optim_set_lr(o, -1), CCR_EINVAL);
    ccr_optim_free(o);
    ccr_net_free(net);
}
END_TEST

/* Loading a checkpoint of another architecture, or a missing or corrupt
 * file, fails without touching the parameters. */
START_TEST(test_checkpoint_errors)
{
    ccr_net *net = small_net(), *other;
    CCR_CK_OK(ctx, ccr_net_init(be, 3, 4, &other));
    CCR_CK_OK(ctx, ccr_net_add_linear(other, 4));
    CCR_CK_OK(ctx, ccr_net_finalize(other, rng));
    const char *path = ccr_test_path("other.safetensors");
    CCR_CK_OK(ctx, ccr_net_save(other, path));
    ccr_arena *a = ccr_net_params(net);
    size_t n = ccr_arena_block_len(a);
    float *before = malloc(n * sizeof *before);
    memcpy(before, ccr_arena_values(a), n * sizeof *before);
    EXPECT(ccr_net_load(net, path), CCR_EFORMAT);
    EXPECT(ccr_net_load(net, "/nonexistent/x.safetensors"), CCR_EIO);
    ck_assert_int_eq(ccr_test_write_file(path, "\x10\0\0\0\0\0\0\0{}", 10), 0);
    EXPECT(ccr_net_load(net, path), CCR_EFORMAT);
    ck_assert_mem_eq(before, ccr_arena_values(a), n * sizeof *before);
    EXPECT(ccr_net_save(net, "/nonexistent/dir/x.safetensors"), CCR_EIO);
    unlink(path);
    free(before);
    ccr_net_free(other);
    ccr_net_free(net);
}
END_TEST

static Suite *errors_suite(void)
{
    Suite *s = suite_create("errors");
    TCase *tc = tcase_create("core");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_backend_errors);
    tcase_add_test(tc, test_gemm_errors);
    tcase_add_test(tc, test_arena_errors);
    tcase_add_test(tc, test_net_build_errors);
    tcase_add_test(tc, test_step_errors_lose_nothing);
    tcase_add_test(tc, test_optim_errors);
    tcase_add_test(tc, test_checkpoint_errors);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return ccr_test_run(errors_suite()); }
