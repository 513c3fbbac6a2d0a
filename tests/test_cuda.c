/*
 * test_cuda.c - CUDA backend parity with the CPU reference (ggml's
 * test-backend-ops shape): every entry of the kernel table on awkward shapes,
 * device buffer round trips and errors, and a whole training run compared
 * step by step.  Exits 77 (skipped) when ccr has no CUDA or no GPU is found.
 * Runs with CK_FORK=no: a forked child must not use CUDA.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_impl.h"  // provides: the kernel table (be->k)
#include "ccr_test.h"
#include "ref/ref.h"       // provides: ccr_ref_* (the specification)

static ccr_ctx *ctx;
static ccr_backend *gpu;
static gsl_rng *rng;

/* Uploads n floats to a new device buffer. */
static float *up(const float *h, size_t n)
{
    float *d;
    CCR_CK_OK(ctx, ccr_backend_alloc(gpu, n * sizeof *d, (void **)&d));
    CCR_CK_OK(ctx, ccr_backend_set(gpu, d, h, n * sizeof *d));
    return d;
}

static void down(float *h, const float *d, size_t n)
{
    CCR_CK_OK(ctx, ccr_backend_get(gpu, h, d, n * sizeof *h));
}

static float *rnd(size_t n, float lo, float hi)
{
    float *v = malloc(n * sizeof *v);
    ccr_test_fill_uniform(rng, v, n, lo, hi);
    return v;
}

START_TEST(test_buffers)
{
    unsigned char h[1000], back[1000];
    for (int i = 0; i < 1000; i++)
        h[i] = (unsigned char)(3 * i);
    void *d;
    CCR_CK_OK(ctx, ccr_backend_alloc(gpu, 1000, &d));
    CCR_CK_OK(ctx, ccr_backend_get(gpu, back, d, 1000));   /* zero-filled */
    for (int i = 0; i < 1000; i++)
        ck_assert_int_eq(back[i], 0);
    CCR_CK_OK(ctx, ccr_backend_set(gpu, d, h, 1000));
    CCR_CK_OK(ctx, ccr_backend_memset(gpu, d, 0x5A, 10));
    CCR_CK_OK(ctx, ccr_backend_get(gpu, back, d, 1000));
    ck_assert_int_eq(back[3], 0x5A);
    ck_assert_mem_eq(back + 10, h + 10, 990);
    ccr_backend_free_buffer(gpu, d);
    void *huge = (void *)0x1;
    CCR_CK_STATUS(ctx, ccr_backend_alloc(gpu, (size_t)1 << 50, &huge), CCR_EDEVMEM);
    ck_assert_ptr_eq(huge, (void *)0x1);
    ck_assert_str_eq(ccr_backend_name(gpu), "cuda");
    CCR_CK_STATUS(ctx, ccr_backend_cpu_set_use_ref(gpu, true), CCR_EUNSUP);
}
END_TEST

START_TEST(test_gemm_parity)
{
    const size_t dims[][3] = {{1, 1, 1}, {7, 5, 3}, {33, 17, 65}, {128, 1, 31}, {257, 129, 97}};
    for (size_t t = 0; t < sizeof dims / sizeof dims[0]; t++) {
        for (int ta = 0; ta < 2; ta++) {
            for (int tb = 0; tb < 2; tb++) {
                size_t m = dims[t][0], n = dims[t][1], k = dims[t][2];
                size_t lda = (ta ? m : k) + 1, ldb = (tb ? k : n) + 2, ldc = n + 3;
                size_t na = (ta ? k : m) * lda, nb = (tb ? n : k) * ldb, nc = m * ldc;
                float *a = rnd(na, -1, 1), *b = rnd(nb, -1, 1), *c = rnd(nc, -1, 1);
                float *got = malloc(nc * sizeof *got);
                float *da = up(a, na), *db = up(b, nb), *dc = up(c, nc);
                CCR_CK_OK(ctx, ccr_backend_gemm(gpu, ta, tb, m, n, k, 0.5f, da, lda, db, ldb,
                                                -0.25f, dc, ldc));
                down(got, dc, nc);
                ccr_ref_gemm(ta, tb, m, n, k, 0.5f, a, lda, b, ldb, -0.25f, c, ldc);
                ccr_test_assert_nmse(got, c, nc, 1e-10, "cuda gemm");
                free(a), free(b), free(c), free(got);
                ccr_backend_free_buffer(gpu, da);
                ccr_backend_free_buffer(gpu, db);
                ccr_backend_free_buffer(gpu, dc);
            }
        }
    }
}
END_TEST

START_TEST(test_elementwise_parity)
{
    const size_t shapes[][2] = {{1, 1}, {3, 7}, {129, 33}, {1000, 10}};
    for (size_t t = 0; t < 4; t++) {
        size_t rows = shapes[t][0], cols = shapes[t][1], n = rows * cols;
        float *y = rnd(n, -3, 3), *bias = rnd(cols, -1, 1), *db = rnd(cols, -1, 1);
        float *got = malloc(n * sizeof *got), *gotb = malloc(cols * sizeof *gotb);
        float *dy = up(y, n), *dbias = up(bias, cols), *ddb = up(db, cols);
        CCR_CK_OK(ctx, gpu->k->bias_add(gpu, dy, dbias, rows, cols));
        CCR_CK_OK(ctx, gpu->k->bias_grad(gpu, ddb, dy, rows, cols));
        ccr_ref_bias_add(y, bias, rows, cols);
        ccr_ref_bias_grad(db, y, rows, cols);
        down(got, dy, n);
        down(gotb, ddb, cols);
        ccr_test_assert_nmse(got, y, n, 0, "bias_add");   /* one rounding: exact */
        ccr_test_assert_nmse(gotb, db, cols, 1e-14, "bias_grad");
        for (int act = 0; act < 4; act++) {
            float *out = malloc(n * sizeof *out), *g = rnd(n, -1, 1);
            float *dx = malloc(n * sizeof *dx);
            float *dout, *dg;
            CCR_CK_OK(ctx, ccr_backend_alloc(gpu, n * sizeof(float), (void **)&dout));
            dg = up(g, n);
            CCR_CK_OK(ctx, gpu->k->act_fwd(gpu, (ccr_act)act, dy, dout, n));
            CCR_CK_OK(ctx, gpu->k->act_bwd(gpu, (ccr_act)act, dout, dg, dg, n));
            ccr_ref_act_fwd((ccr_act)act, y, out, n);
            ccr_ref_act_bwd((ccr_act)act, out, g, dx, n);
            down(got, dout, n);
            ccr_test_assert_nmse(got, out, n, 1e-12, ccr_act_name((ccr_act)act));
            down(got, dg, n);
            ccr_test_assert_nmse(got, dx, n, 1e-12, "act_bwd");
            free(out), free(g), free(dx);
            ccr_backend_free_buffer(gpu, dout);
            ccr_backend_free_buffer(gpu, dg);
        }
        free(y), free(bias), free(db), free(got), free(gotb);
        ccr_backend_free_buffer(gpu, dy);
        ccr_backend_free_buffer(gpu, dbias);
        ccr_backend_free_buffer(gpu, ddb);
    }
}
END_TEST

START_TEST(test_softmax_xent_parity)
{
    const size_t shapes[][2] = {{1, 2}, {5, 3}, {130, 10}, {17, 1000}};
    for (size_t t = 0; t < 4; t++) {
        size_t rows = shapes[t][0], cols = shapes[t][1], n = rows * cols;
        float *z = rnd(n, -8, 8), *d = malloc(n * sizeof *d), *got = malloc(n * sizeof *got);
        float *loss = malloc(rows * 4), *gl = malloc(rows * 4);
        int32_t *lab = malloc(rows * 4), *cor = malloc(rows * 4), *gc = malloc(rows * 4);
        for (size_t r = 0; r < rows; r++)
            lab[r] = (int32_t)gsl_rng_uniform_int(rng, cols);
        float *dz = up(z, n), *dd, *dl;
        int32_t *dlab, *dc;
        CCR_CK_OK(ctx, ccr_backend_alloc(gpu, n * 4, (void **)&dd));
        CCR_CK_OK(ctx, ccr_backend_alloc(gpu, rows * 4, (void **)&dl));
        CCR_CK_OK(ctx, ccr_backend_alloc(gpu, rows * 4, (void **)&dc));
        CCR_CK_OK(ctx, ccr_backend_alloc(gpu, rows * 4, (void **)&dlab));
        CCR_CK_OK(ctx, ccr_backend_set(gpu, dlab, lab, rows * 4));
        CCR_CK_OK(ctx, gpu->k->softmax_xent(gpu, dz, dlab, rows, cols, 0.5f, dl, dc, dd));
        ccr_ref_softmax_xent(z, lab, rows, cols, 0.5f, loss, cor, d);
        down(got, dd, n);
        down(gl, dl, rows);
        CCR_CK_OK(ctx, ccr_backend_get(gpu, gc, dc, rows * 4));
        ccr_test_assert_nmse(got, d, n, 1e-12, "dlogits");
        ccr_test_assert_nmse(gl, loss, rows, 1e-12, "loss");
        ck_assert_mem_eq(gc, cor, rows * 4);
        free(z), free(d), free(got), free(loss), free(gl), free(lab), free(cor), free(gc);
        ccr_backend_free_buffer(gpu, dz);
        ccr_backend_free_buffer(gpu, dd);
        ccr_backend_free_buffer(gpu, dl);
        ccr_backend_free_buffer(gpu, dc);
        ccr_backend_free_buffer(gpu, dlab);
    }
}
END_TEST

/* Rows holding NaN or infinity never count as correct (issue 9): the
 * argmax would otherwise fall on class 0.  Same flags as the reference. */
START_TEST(test_softmax_xent_nonfinite)
{
    const size_t rows = 5, cols = 40, n = rows * cols;
    float z[5 * 40];
    for (size_t i = 0; i < n; i++)
        z[i] = -1.0f;
    z[0 * cols + 33] = NAN;       /* row 0: NaN late in the row, label 0 */
    z[1 * cols + 0] = INFINITY;   /* row 1: +inf on the label */
    z[2 * cols + 7] = -INFINITY;  /* row 2: -inf elsewhere, label 0 */
    z[3 * cols + 0] = 2.0f;       /* row 3: finite, label 0: correct */
    z[4 * cols + 0] = NAN;        /* row 4: NaN on the label */
    int32_t lab[5] = {0, 0, 0, 0, 0}, cor[5], gc[5];
    float loss[5], *dz = up(z, n), *dl;
    int32_t *dlab, *dc;
    CCR_CK_OK(ctx, ccr_backend_alloc(gpu, rows * 4, (void **)&dl));
    CCR_CK_OK(ctx, ccr_backend_alloc(gpu, rows * 4, (void **)&dc));
    CCR_CK_OK(ctx, ccr_backend_alloc(gpu, rows * 4, (void **)&dlab));
    CCR_CK_OK(ctx, ccr_backend_set(gpu, dlab, lab, rows * 4));
    CCR_CK_OK(ctx, gpu->k->softmax_xent(gpu, dz, dlab, rows, cols, 1.0f, dl, dc, NULL));
    CCR_CK_OK(ctx, ccr_backend_get(gpu, gc, dc, rows * 4));
    ccr_ref_softmax_xent(z, lab, rows, cols, 1.0f, loss, cor, NULL);
    const int32_t want[5] = {0, 0, 0, 1, 0};
    ck_assert_mem_eq(cor, want, sizeof want);
    ck_assert_mem_eq(gc, want, sizeof want);
    ccr_backend_free_buffer(gpu, dz);
    ccr_backend_free_buffer(gpu, dl);
    ccr_backend_free_buffer(gpu, dc);
    ccr_backend_free_buffer(gpu, dlab);
}
END_TEST

START_TEST(test_optim_parity)
{
    const size_t n = 1001;
    float *w = rnd(n, -1, 1), *g = rnd(n, -1, 1), *m = rnd(n, -0.1f, 0.1f),
          *v = rnd(n, 0, 0.01f), *got = malloc(n * 4);
    float *dw = up(w, n), *dg = up(g, n), *dm = up(m, n), *dv = up(v, n);
    CCR_CK_OK(ctx, gpu->k->adam_step(gpu, dw, dg, dm, dv, n, 1e-2f, 0.9f, 0.999f, 1e-8f, 1e-3f, 3));
    ccr_ref_adam_step(w, g, m, v, n, 1e-2f, 0.9f, 0.999f, 1e-8f, 1e-3f, 3);
    CCR_CK_OK(ctx, gpu->k->sgd_step(gpu, dw, dg, dm, n, 0.1f, 0.9f, 1e-4f));
    ccr_ref_sgd_step(w, g, m, n, 0.1f, 0.9f, 1e-4f);
    down(got, dw, n);
    ccr_test_assert_nmse(got, w, n, 1e-12, "optim w");
    down(got, dm, n);
    ccr_test_assert_nmse(got, m, n, 1e-12, "optim m");
    free(w), free(g), free(m), free(v), free(got);
    ccr_backend_free_buffer(gpu, dw);
    ccr_backend_free_buffer(gpu, dg);
    ccr_backend_free_buffer(gpu, dm);
    ccr_backend_free_buffer(gpu, dv);
}
END_TEST

/* The ranges ops (sparse optimiser, sparse zeroing): on the device, Adam,
 * SGD (with and without momentum) and zeroing over scattered ranges of
 * different step counts equal the per-range step kernels bit for bit, and
 * the CPU reference's ranges op to float rounding; floats outside the
 * ranges are untouched.  More ranges than one launch holds
 * (CCR_CUDA_RANGES) and a range length that is not a multiple of 256. */
START_TEST(test_ranges_parity)
{
    const size_t len = 40, nr = 33000, n = 2 * nr * len + 7;
    size_t *off = malloc(nr * sizeof *off);
    uint64_t *t = malloc(nr * sizeof *t);
    for (size_t r = 0; r < nr; r++)
        off[r] = 2 * r * len + (r % 5), t[r] = 1 + (r * 7) % 13;
    float *w = rnd(n, -1, 1), *g = rnd(n, -1, 1), *m = rnd(n, -0.1f, 0.1f),
          *v = rnd(n, 0, 0.01f), *got = malloc(n * 4), *want = malloc(n * 4);
    float *a[4], *b[4];  /* w g m v: a by ranges, b by per-range steps */
    const float *h[4] = {w, g, m, v};
    for (int k = 0; k < 4; k++)
        a[k] = up(h[k], n), b[k] = up(h[k], n);
    CCR_CK_OK(ctx, gpu->k->adam_ranges(gpu, a[0], a[1], a[2], a[3], off, t, nr, len, 1e-2f, 0.9f,
                                       0.999f, 1e-8f, 1e-3f));
    CCR_CK_OK(ctx, gpu->k->sgd_ranges(gpu, a[0], a[1], a[2], off, nr, len, 0.1f, 0.9f, 1e-4f));
    CCR_CK_OK(ctx, gpu->k->sgd_ranges(gpu, a[0], a[1], NULL, off, nr, len, 0.1f, 0.0f, 0.0f));
    CCR_CK_OK(ctx, gpu->k->zero_ranges(gpu, a[1], off + 1, nr - 1, len));
    for (size_t r = 0; r < nr; r++) {
        size_t o = off[r];
        CCR_CK_OK(ctx, gpu->k->adam_step(gpu, b[0] + o, b[1] + o, b[2] + o, b[3] + o, len, 1e-2f,
                                         0.9f, 0.999f, 1e-8f, 1e-3f, t[r]));
        CCR_CK_OK(ctx, gpu->k->sgd_step(gpu, b[0] + o, b[1] + o, b[2] + o, len, 0.1f, 0.9f, 1e-4f));
        CCR_CK_OK(ctx, gpu->k->sgd_step(gpu, b[0] + o, b[1] + o, NULL, len, 0.1f, 0.0f, 0.0f));
        if (r > 0)
            CCR_CK_OK(ctx, ccr_backend_memset(gpu, b[1] + o, 0, len * 4));
    }
    for (int k = 0; k < 4; k++) {
        down(got, a[k], n);
        down(want, b[k], n);
        ck_assert_msg(memcmp(got, want, n * 4) == 0, "buffer %d differs from the per-range steps", k);
    }
    /* The CPU reference's ranges op on host copies. */
    ccr_cpu_ref_kernels.adam_ranges(NULL, w, g, m, v, off, t, nr, len, 1e-2f, 0.9f, 0.999f,
                                    1e-8f, 1e-3f);
    ccr_cpu_ref_kernels.sgd_ranges(NULL, w, g, m, off, nr, len, 0.1f, 0.9f, 1e-4f);
    ccr_cpu_ref_kernels.sgd_ranges(NULL, w, g, NULL, off, nr, len, 0.1f, 0.0f, 0.0f);
    ccr_cpu_ref_kernels.zero_ranges(NULL, g, off + 1, nr - 1, len);
    down(got, a[0], n);
    ccr_test_assert_nmse(got, w, n, 1e-12, "ranges w");
    down(got, a[1], n);
    ck_assert_mem_eq(got, g, n * 4);
    free(off), free(t), free(w), free(g), free(m), free(v), free(got), free(want);
    for (int k = 0; k < 4; k++) {
        ccr_backend_free_buffer(gpu, a[k]);
        ccr_backend_free_buffer(gpu, b[k]);
    }
}
END_TEST

/* TF32 and BF16 (ccr_backend_set_math): a GEMM of random data moves away
 * from the FP32 result by the mode's rounding - TF32 (10-bit mantissa)
 * measurably but below 1e-4 normalised, BF16 (7 bits; cuBLAS may also pick
 * TF32 for it) below 1e-3 - and FP32 restored gives the FP32 result again,
 * bit for bit. */
START_TEST(test_math_modes)
{
    const size_t m = 96, n = 80, k = 512;
    float *a = rnd(m * k, -1, 1), *b = rnd(k * n, -1, 1), *c32 = malloc(m * n * 4),
          *c = malloc(m * n * 4);
    float *da = up(a, m * k), *db = up(b, k * n), *dc;
    CCR_CK_OK(ctx, ccr_backend_alloc(gpu, m * n * 4, (void **)&dc));
    CCR_CK_OK(ctx, gpu->k->gemm(gpu, false, false, m, n, k, 1.0f, da, k, db, n, 0.0f, dc, n));
    down(c32, dc, m * n);
    const ccr_math modes[2] = {CCR_MATH_TF32, CCR_MATH_BF16};
    const double lo[2] = {1e-10, 0.0}, hi[2] = {1e-4, 1e-3};
    for (int t = 0; t < 2; t++) {
        CCR_CK_OK(ctx, ccr_backend_set_math(gpu, modes[t]));
        CCR_CK_OK(ctx, gpu->k->gemm(gpu, false, false, m, n, k, 1.0f, da, k, db, n, 0.0f, dc, n));
        down(c, dc, m * n);
        double num = 0.0, den = 0.0;
        for (size_t i = 0; i < m * n; i++)
            num += ((double)c[i] - c32[i]) * ((double)c[i] - c32[i]),
                den += (double)c32[i] * c32[i];
        ck_assert_msg(num / den >= lo[t] && num / den < hi[t], "mode %d: NMSE %g", (int)modes[t],
                      num / den);
        CCR_CK_OK(ctx, ccr_backend_set_math(gpu, CCR_MATH_FP32));
        CCR_CK_OK(ctx, gpu->k->gemm(gpu, false, false, m, n, k, 1.0f, da, k, db, n, 0.0f, dc, n));
        down(c, dc, m * n);
        ck_assert_mem_eq(c, c32, m * n * 4);
    }
    free(a), free(b), free(c32), free(c);
    ccr_backend_free_buffer(gpu, da);
    ccr_backend_free_buffer(gpu, db);
    ccr_backend_free_buffer(gpu, dc);
}
END_TEST

/* sum_squares (the gradient-norm check of ccr_train_step): the device's
 * fixed tree equals the CPU's in-order double sum to double rounding, and is
 * the same on every call; sizes below, at and above one stage's reach. */
START_TEST(test_sum_squares_parity)
{
    const size_t sizes[] = {1, 255, 257, 1024 * 256 + 3, 3000001};
    for (size_t t = 0; t < sizeof sizes / sizeof *sizes; t++) {
        size_t n = sizes[t];
        float *x = rnd(n, -2, 2), *dx = up(x, n);
        double want, got, again;
        CCR_CK_OK(ctx, ccr_cpu_ref_kernels.sum_squares(NULL, x, n, &want));
        CCR_CK_OK(ctx, gpu->k->sum_squares(gpu, dx, n, &got));
        CCR_CK_OK(ctx, gpu->k->sum_squares(gpu, dx, n, &again));
        ck_assert_msg(fabs(got - want) <= 1e-12 * want, "n %zu: %.17g vs %.17g", n, got, want);
        ck_assert_msg(memcmp(&got, &again, sizeof got) == 0, "n %zu: not reproducible", n);
        free(x);
        ccr_backend_free_buffer(gpu, dx);
    }
}
END_TEST

/* The same MLP trained for 25 Adam steps on CPU and GPU from the same seed:
 * per-step losses agree to float rounding and the parameters stay close. */
START_TEST(test_training_parity)
{
    ccr_backend *cpu;
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &cpu));
    ccr_backend *bes[2] = {cpu, gpu};
    ccr_net *net[2];
    ccr_optim *opt[2];
    for (int i = 0; i < 2; i++) {
        gsl_rng_set(rng, 99);
        CCR_CK_OK(ctx, ccr_net_init(bes[i], 20, 64, &net[i]));
        CCR_CK_OK(ctx, ccr_net_add_linear(net[i], 48));
        CCR_CK_OK(ctx, ccr_net_add_act(net[i], CCR_ACT_TANH));
        CCR_CK_OK(ctx, ccr_net_add_linear(net[i], 5));
        CCR_CK_OK(ctx, ccr_net_finalize(net[i], rng));
        ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
        CCR_CK_OK(ctx, ccr_optim_init(ccr_net_params(net[i]), &oc, &opt[i]));
    }
    float x[64 * 20];
    int32_t y[64];
    for (int step = 0; step < 25; step++) {
        ccr_test_fill_uniform(rng, x, 64 * 20, -1, 1);
        for (int e = 0; e < 64; e++)
            y[e] = (x[e * 20] > 0) + 2 * (x[e * 20 + 1] > 0);
        ccr_step_stats s[2];
        for (int i = 0; i < 2; i++)
            CCR_CK_OK(ctx, ccr_train_step(net[i], opt[i], NULL, x, y, 64, &s[i]));
        ck_assert_msg(fabs(s[0].loss - s[1].loss) < 1e-4 * (1 + fabs(s[0].loss)),
                      "step %d: cpu loss %.8g gpu %.8g", step, s[0].loss, s[1].loss);
    }
    ccr_arena *a0 = ccr_net_params(net[0]), *a1 = ccr_net_params(net[1]);
    for (size_t t = 0; t < ccr_arena_count(a0); t++) {
        size_t n = ccr_arena_size(a0, t);
        float *p0 = malloc(n * 4), *p1 = malloc(n * 4);
        CCR_CK_OK(ctx, ccr_arena_get(a0, t, p0));
        CCR_CK_OK(ctx, ccr_arena_get(a1, t, p1));
        ccr_test_assert_nmse(p1, p0, n, 1e-8, ccr_arena_name(a0, t));
        free(p0), free(p1);
    }
    for (int i = 0; i < 2; i++) {
        ccr_optim_free(opt[i]);
        ccr_net_free(net[i]);
    }
    ccr_backend_free(cpu);
}
END_TEST

/* CCR_INPUT_BACKEND on CUDA: a network reading x in place from device memory
 * trains bit for bit as the same network fed host memory (same kernels,
 * same data), and NaN in device memory is found on the device (CCR_EDOM,
 * parameters untouched). */
START_TEST(test_device_input)
{
    ccr_net *net[2];
    ccr_optim *opt[2];
    for (int i = 0; i < 2; i++) {
        gsl_rng_set(rng, 7);
        CCR_CK_OK(ctx, ccr_net_init(gpu, 33, 40, &net[i]));
        CCR_CK_OK(ctx, ccr_net_add_linear(net[i], 17));
        CCR_CK_OK(ctx, ccr_net_add_act(net[i], CCR_ACT_RELU));
        CCR_CK_OK(ctx, ccr_net_add_linear(net[i], 3));
        CCR_CK_OK(ctx, ccr_net_finalize(net[i], rng));
        ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
        CCR_CK_OK(ctx, ccr_optim_init(ccr_net_params(net[i]), &oc, &opt[i]));
    }
    CCR_CK_OK(ctx, ccr_net_set_input_memory(net[1], CCR_INPUT_BACKEND));
    float x[40 * 33];
    int32_t y[40];
    float *dx = NULL;
    CCR_CK_OK(ctx, ccr_backend_alloc(gpu, sizeof x, (void **)&dx));
    for (int step = 0; step < 5; step++) {
        ccr_test_fill_uniform(rng, x, 40 * 33, -1, 1);
        for (int e = 0; e < 40; e++)
            y[e] = e % 3;
        CCR_CK_OK(ctx, ccr_backend_set(gpu, dx, x, sizeof x));
        ccr_step_stats s[2];
        CCR_CK_OK(ctx, ccr_train_step(net[0], opt[0], NULL, x, y, 40, &s[0]));
        CCR_CK_OK(ctx, ccr_train_step(net[1], opt[1], NULL, dx, y, 40, &s[1]));
        ck_assert(memcmp(&s[0].loss, &s[1].loss, sizeof s[0].loss) == 0);
    }
    ccr_arena *a0 = ccr_net_params(net[0]), *a1 = ccr_net_params(net[1]);
    size_t n = ccr_arena_n_params(a0);
    float *p0 = malloc(n * 4), *p1 = malloc(n * 4), *p2 = malloc(n * 4);
    down(p0, ccr_arena_values(a0), n);
    down(p1, ccr_arena_values(a1), n);
    ck_assert_mem_eq(p0, p1, n * 4);
    float inf = INFINITY;
    CCR_CK_OK(ctx, ccr_backend_set(gpu, dx + 40 * 33 - 1, &inf, sizeof inf));
    ccr_step_stats s;
    ck_assert_int_eq(ccr_train_step(net[1], opt[1], NULL, dx, y, 40, &s), CCR_EDOM);
    down(p2, ccr_arena_values(a1), n);
    ck_assert_mem_eq(p1, p2, n * 4);
    free(p0), free(p1), free(p2);
    ccr_backend_free_buffer(gpu, dx);
    for (int i = 0; i < 2; i++) {
        ccr_optim_free(opt[i]);
        ccr_net_free(net[i]);
    }
}
END_TEST

int main(void)
{
    if (ccr_ctx_init(&ctx) != CCR_OK)
        return 1;
    ccr_status s = ccr_backend_cuda_init(ctx, 0, &gpu);
    if (s == CCR_EUNSUP || s == CCR_ENODEV) {
        printf("test_cuda: skipped: %s\n", ccr_ctx_errmsg(ctx));
        ccr_ctx_free(ctx);
        return 77;
    }
    if (s != CCR_OK) {
        fprintf(stderr, "test_cuda: CUDA init failed: %s\n", ccr_ctx_errmsg(ctx));
        return 1;
    }
    printf("test_cuda: %s\n", ccr_backend_describe(gpu));
    rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, 2024);
    Suite *su = suite_create("cuda");
    TCase *tc = tcase_create("parity");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_buffers);
    tcase_add_test(tc, test_gemm_parity);
    tcase_add_test(tc, test_elementwise_parity);
    tcase_add_test(tc, test_softmax_xent_parity);
    tcase_add_test(tc, test_softmax_xent_nonfinite);
    tcase_add_test(tc, test_optim_parity);
    tcase_add_test(tc, test_ranges_parity);
    tcase_add_test(tc, test_sum_squares_parity);
    tcase_add_test(tc, test_math_modes);
    tcase_add_test(tc, test_training_parity);
    tcase_add_test(tc, test_device_input);
    suite_add_tcase(su, tc);
    SRunner *sr = srunner_create(su);
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    gsl_rng_free(rng);
    ccr_backend_free(gpu);
    ccr_ctx_free(ctx);
    return failed == 0 ? 0 : 1;
}
