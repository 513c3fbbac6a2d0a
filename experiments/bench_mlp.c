/*
 * ccr-bench-mlp - speed of the dense baseline's training step, measured side
 * by side with the GEMMs it contains.
 *
 * For each batch size it times (a) ccr_train_step on an MLP (forward,
 * softmax cross-entropy, backward, Adam) and (b) the same matrix products
 * alone, issued as raw backend GEMMs of identical shapes (cblas_sgemm on the
 * CPU, cublasSgemm on CUDA), and (c) one square sgemm with the same FLOP
 * count.  It reports GFLOP/s of each and the ratios step / same-shape GEMMs
 * (what ccr adds around the products) and same-shape / square (what the
 * shapes cost).  One JSONL record per batch size with --out.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "internal.h"  // provides: ccr_mallocn, ccr_malloc3, ccr_mul_ok
#include "outputs.h"

#define PROG "ccr-bench-mlp"
#define MAXL 16
#define POOL 8

static void usage(void)
{
    printf("usage: ccr-bench-mlp [--backend cpu|cuda] [--hidden 512,256] [--d-in 784]\n"
           "                     [--classes 10] [--batches 32,128,512] [--seconds 0.5]\n"
           "                     [--seed N] [--out FILE] [--quick]\n"
           "Times ccr_train_step against the same GEMMs issued alone and against a\n"
           "square sgemm of equal FLOPs; prints a table, one JSONL record per batch.\n");
}

typedef struct gemm_shape {
    bool ta, tb;
    size_t m, n, k;
} gemm_shape;

/* The products of one training step of widths w[0..nl] (w[0] = d_in):
 * forward x W per layer, dW = x^T dy per layer, dx = dy W^T for layers > 0. */
static size_t step_shapes(const size_t *w, size_t nl, size_t batch, gemm_shape *s)
{
    size_t n = 0;
    for (size_t l = 0; l < nl; l++)
        s[n++] = (gemm_shape){false, false, batch, w[l + 1], w[l]};
    for (size_t l = 0; l < nl; l++) {
        s[n++] = (gemm_shape){true, false, w[l], w[l + 1], batch};
        if (l > 0)
            s[n++] = (gemm_shape){false, true, batch, w[l], w[l + 1]};
    }
    return n;
}

/* Runs the statement(s) once to warm up, then repeatedly until `seconds`
 * have passed, synchronising the backend after each; stores seconds per run
 * in out. */
#define TIME_LOOP(be, seconds, out, ...)                                    \
    do {                                                                    \
        __VA_ARGS__;                                                        \
        ccr_backend_synchronize(be);                                        \
        size_t reps_ = 0;                                                   \
        double t0_ = drv_now(), el_;                                        \
        do {                                                                \
            __VA_ARGS__;                                                    \
            reps_++;                                                        \
            ccr_backend_synchronize(be);                                    \
            el_ = drv_now() - t0_;                                          \
        } while (el_ < (seconds));                                          \
        (out) = el_ / (double)reps_;                                        \
    } while (0)

/* A fresh MLP of widths w[0..nl] (ReLU) with Adam, initialised from rng. */
static void build_net(ccr_ctx *ctx, ccr_backend *be, const size_t *w, size_t nl, size_t batch,
                      gsl_rng *rng, ccr_net **net, ccr_optim **opt)
{
    ccr_status s = ccr_net_init(be, w[0], batch, net);
    for (size_t l = 0; l < nl && s == CCR_OK; l++) {
        s = ccr_net_add_linear(*net, w[l + 1]);
        if (s == CCR_OK && l + 1 < nl)
            s = ccr_net_add_act(*net, CCR_ACT_RELU);
    }
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    if (s == CCR_OK) s = ccr_net_finalize(*net, rng);
    if (s == CCR_OK) s = ccr_optim_init(ccr_net_params(*net), &oc, opt);
    if (s != CCR_OK)
        drv_fail(PROG, ctx, s, "net");
}

int main(int argc, char **argv)
{
    size_t hidden[MAXL] = {512, 256}, nh = 2, batches[MAXL] = {32, 128, 512}, nb = 3;
    size_t d_in = 784, classes = 10;
    double seconds = 0.5;
    unsigned long seed = 1;
    bool cuda = false;
    const char *out_path = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0) { usage(); return 0; }
        if (strcmp(a, "--quick") == 0) { seconds = 0.05; continue; }
        i++;
        if (strcmp(a, "--backend") == 0 && v && (strcmp(v, "cpu") == 0 || strcmp(v, "cuda") == 0))
            cuda = strcmp(v, "cuda") == 0;
        else if (strcmp(a, "--hidden") == 0) nh = drv_parse_size_list(PROG, a, v, hidden, MAXL - 2);
        else if (strcmp(a, "--batches") == 0) nb = drv_parse_size_list(PROG, a, v, batches, MAXL);
        else if (strcmp(a, "--d-in") == 0) d_in = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--classes") == 0) classes = drv_parse_size(PROG, a, v, 2);
        else if (strcmp(a, "--seconds") == 0) seconds = drv_parse_double(PROG, a, v, 1e-3, 600);
        else if (strcmp(a, "--seed") == 0) seed = drv_parse_seed(PROG, a, v);
        else if (strcmp(a, "--out") == 0 && v) out_path = v;
        else drv_usage_error(PROG, "unknown or incomplete option '%s'", a);
    }
    drv_io_output("--out", out_path);
    drv_io_check(PROG);
    size_t w[MAXL];
    w[0] = d_in;
    memcpy(w + 1, hidden, nh * sizeof *w);
    w[nh + 1] = classes;
    size_t nl = nh + 1, max_batch = 0;
    for (size_t i = 0; i < nb; i++)
        max_batch = batches[i] > max_batch ? batches[i] : max_batch;

    ccr_ctx *ctx;
    ccr_backend *be;
    gsl_rng *rng;
    drv_one_process(PROG);
    drv_setup(PROG, cuda, seed, &ctx, &be, &rng);
    ccr_status s;

    /* A pool of POOL random batches, cycled through: training thousands of
     * steps on one fixed batch drives gradients and Adam's second moments
     * into the subnormal range, where every float operation is ~100x
     * slower, and the benchmark would measure that instead of ccr. */
    size_t pool_n, buf_bytes;
    if (!ccr_mul3_ok(POOL, max_batch, d_in, &pool_n))
        drv_fail(PROG, ctx, ccr_mem_check(ctx, SIZE_MAX, "input pool"), "buffers");
    float *x = ccr_mallocn(pool_n, sizeof *x);
    int32_t *y = ccr_malloc3(POOL, max_batch, sizeof *y);
    if (x == NULL || y == NULL)
        drv_fail(PROG, ctx, CCR_ENOMEM, "input pool");
    for (size_t i = 0; i < POOL * max_batch * d_in; i++)
        x[i] = (float)gsl_rng_uniform(rng);
    for (size_t i = 0; i < POOL * max_batch; i++)
        y[i] = (int32_t)gsl_rng_uniform_int(rng, classes);
    size_t turn = 0;
    size_t big = 0;
    for (size_t l = 0; l <= nl; l++)
        big = w[l] > big ? w[l] : big;
    size_t sq_max = 4096;
    size_t buf_n;
    if (!ccr_mul_ok(big, max_batch > big ? max_batch : big, &buf_n) ||
        !ccr_mul_ok(buf_n > sq_max * sq_max ? buf_n : sq_max * sq_max, 4, &buf_bytes))
        drv_fail(PROG, ctx, ccr_mem_check(ctx, SIZE_MAX, "GEMM buffers"), "buffers");
    float *ga, *gb, *gc;
    if ((s = ccr_backend_alloc(be, buf_bytes, (void **)&ga)) != CCR_OK ||
        (s = ccr_backend_alloc(be, buf_bytes, (void **)&gb)) != CCR_OK ||
        (s = ccr_backend_alloc(be, buf_bytes, (void **)&gc)) != CCR_OK)
        drv_fail(PROG, ctx, s, "buffers");

    ccr_jsonl *out;
    ccr_record *rec;
    drv_open_out(PROG, ctx, out_path, &rec, &out);

    fprintf(stderr, "%s: %s | %s\n", PROG, ccr_backend_describe(be), drv_machine());
    printf("| batch | step ms | step GFLOP/s | same-shape GEMMs ms | GEMM GFLOP/s | square sgemm GFLOP/s | input copy ms | step / GEMMs | GEMMs / square |\n");
    printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (size_t bi = 0; bi < nb; bi++) {
        size_t B = batches[bi];
        /* A fresh network per batch size, timed over a short window: a
         * network that has fitted its few benchmark batches produces
         * subnormal gradients, which slow x86 arithmetic ~100x and would be
         * measured instead of ccr (docs/RESULTS.md, "Subnormals"). */
        ccr_net *net;
        ccr_optim *opt;
        build_net(ctx, be, w, nl, B, rng, &net, &opt);
        ccr_flops fl = ccr_net_flops(net);
        gemm_shape sh[3 * MAXL];
        size_t ns = step_shapes(w, nl, B, sh);
        double gemm_flops = 0;
        for (size_t i = 0; i < ns; i++)
            gemm_flops += 2.0 * (double)sh[i].m * (double)sh[i].n * (double)sh[i].k;
        double step_flops = (fl.fwd + fl.bwd) * (double)B;
        double t_step, t_gemm, t_sq, t_in;
        ccr_step_stats st;
        TIME_LOOP(be, seconds, t_step, {
            size_t j = turn++ % POOL;
            s = ccr_train_step(net, opt, rng, x + j * B * d_in, y + j * B, B, &st);
        });
        if (s != CCR_OK)
            drv_fail(PROG, ctx, s, "train step");
        TIME_LOOP(be, seconds, t_gemm, for (size_t i = 0; i < ns; i++) {
            size_t lda = sh[i].ta ? sh[i].m : sh[i].k, ldb = sh[i].tb ? sh[i].k : sh[i].n;
            s = ccr_backend_gemm(be, sh[i].ta, sh[i].tb, sh[i].m, sh[i].n, sh[i].k, 1.0f, ga,
                                 lda, gb, ldb, 0.0f, gc, sh[i].n);
        });
        /* The input staging every step performs: the host batch copied to
         * the backend (a memcpy on the CPU, a host-to-device copy on CUDA). */
        TIME_LOOP(be, seconds, t_in, s = ccr_backend_set(be, ga, x, B * d_in * sizeof *x));
        /* A square sgemm of the same FLOPs: n = cbrt(flops / 2). */
        size_t n = (size_t)llround(cbrt(gemm_flops / 2.0));
        n = n < 1 ? 1 : (n > sq_max ? sq_max : n);
        double sq_flops = 2.0 * (double)n * (double)n * (double)n;
        TIME_LOOP(be, seconds, t_sq, s = ccr_backend_gemm(be, false, false, n, n, n, 1.0f, ga, n,
                                                            gb, n, 0.0f, gc, n));
        if (s != CCR_OK)
            drv_fail(PROG, ctx, s, "gemm");
        double g_step = step_flops / t_step * 1e-9, g_gemm = gemm_flops / t_gemm * 1e-9,
               g_sq = sq_flops / t_sq * 1e-9;
        printf("| %zu | %.3f | %.1f | %.3f | %.1f | %.1f | %.3f | %.2f | %.2f |\n", B,
               t_step * 1e3, g_step, t_gemm * 1e3, g_gemm, g_sq, t_in * 1e3, t_step / t_gemm,
               g_sq / g_gemm);
        ccr_record_clear(rec);
        s = drv_record_base(rec, PROG, be, seed);
        if (s == CCR_OK) s = ccr_record_add_str(rec, "device", ccr_backend_describe(be));
        if (s == CCR_OK) s = ccr_record_add_int(rec, "batch", (int64_t)B);
        if (s == CCR_OK) s = ccr_record_add_int(rec, "params", (int64_t)ccr_net_n_params(net));
        if (s == CCR_OK) s = ccr_record_add_double(rec, "flops_step", step_flops);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "flops_gemm", gemm_flops);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "step_seconds", t_step);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "gemm_seconds", t_gemm);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "input_copy_seconds", t_in);
        if (s == CCR_OK) s = ccr_record_add_int(rec, "square_n", (int64_t)n);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "square_gflops", g_sq);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "step_gflops", g_step);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "gemm_gflops", g_gemm);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "ratio_step_to_gemm", t_step / t_gemm);
        if (s == CCR_OK && out) s = ccr_jsonl_write(out, rec);
        if (s != CCR_OK)
            drv_fail(PROG, ctx, s, "record");
        ccr_optim_free(opt);
        ccr_net_free(net);
    }
    if ((s = drv_io_close(out)) != CCR_OK)
        drv_fail(PROG, ctx, s, "close");
    ccr_backend_free_buffer(be, ga);
    ccr_backend_free_buffer(be, gb);
    ccr_backend_free_buffer(be, gc);
    free(x);
    free(y);
    drv_teardown(PROG, ctx, be, rng, NULL, rec);
    return 0;
}
