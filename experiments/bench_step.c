/*
 * ccr-bench-step - one training step of a big conditional layer, dense
 * against sparse (issue 10, docs/RESULTS.md "Sparse training step").
 *
 * Two identical networks  d -> cond(gate, E experts, FFN hidden h) -> d ->
 * linear 10, trained on the same random batches, steps alternating:
 *   dense:  the whole gradient block cleared (what ccr_arena_zero_grad did
 *           before issue 10), forward+backward, dense optimiser;
 *   sparse: ccr_arena_zero_grad (touched bank matrices only), the same
 *           forward+backward, ccr_optim_config.sparse.
 * One JSON line per mode on stdout: medians of the three phases and of the
 * step, parameters updated, optimiser FLOPs, the BLAS core.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blas_core.h"
#include "ccr/ccr.h"
#include "common.h"
#include "internal.h"  // provides: ccr_malloc3, ccr_mallocn, ccr_calloc3

#define PROG "ccr-bench-step"

static void usage(void)
{
    printf("usage: ccr-bench-step [--gate topk] [--experts 1024] [--k 2] [--d 64]\n"
           "                      [--hidden 256] [--batch 256] [--steps 20] [--optim adam|sgd]\n"
           "Times a training step of d -> cond(gate, E, FFN hidden) -> d -> linear 10,\n"
           "dense (whole gradient block cleared, dense optimiser) against sparse\n"
           "(ccr_arena_zero_grad, ccr_optim_config.sparse), steps alternating.\n");
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, size_t n)
{
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

typedef struct run {
    ccr_net *net;
    ccr_optim *opt;
    double *t_zero, *t_lg, *t_opt, *t_step;
    size_t updated;
    double opt_flops;
} run;

int main(int argc, char **argv)
{
    const char *gate = "topk";
    size_t E = 1024, k = 2, d = 64, h = 256, B = 256, steps = 20;
    ccr_optim_kind kind = CCR_OPTIM_ADAM;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (drv_parse_common(PROG, a, usage))
            continue;
        if (v == NULL)
            drv_bad_option(PROG, a, v);
        if (strcmp(a, "--gate") == 0) gate = v;
        else if (strcmp(a, "--experts") == 0) E = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--k") == 0) k = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--d") == 0) d = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--hidden") == 0) h = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--batch") == 0) B = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--steps") == 0) steps = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--optim") == 0) {
            if (strcmp(v, "adam") == 0) kind = CCR_OPTIM_ADAM;
            else if (strcmp(v, "sgd") == 0) kind = CCR_OPTIM_SGD;
            else drv_usage_error(PROG, "--optim must be adam or sgd");
        } else drv_bad_option(PROG, a, v);
        i++;
    }
    ccr_ctx *ctx;
    ccr_backend *be;
    gsl_rng *rng;
    drv_one_process(PROG);
    drv_setup(PROG, false, 1, &ctx, &be, &rng);
    ccr_cond_config cc = drv_gate_defaults();
    cc.gate = ccr_gate_type_find(gate);
    if (cc.gate == NULL)
        drv_usage_error(PROG, "--gate: unknown gate '%s'", gate);
    cc.gate_cfg.n_experts = E;
    cc.gate_cfg.k = k;
    cc.bank = CCR_BANK_FFN;
    cc.hidden = h;
    cc.d_out = d;
    float *x = ccr_malloc3(B, d, sizeof *x);
    int32_t *y = ccr_mallocn(B, sizeof *y);
    run r[2];
    memset(r, 0, sizeof r);
    for (int m = 0; m < 2; m++) {
        r[m].t_zero = ccr_calloc3(4, steps, sizeof(double));
        if (r[m].t_zero == NULL)
            drv_fail(PROG, ctx, CCR_ENOMEM, "timers");
        r[m].t_lg = r[m].t_zero + steps;
        r[m].t_opt = r[m].t_lg + steps;
        r[m].t_step = r[m].t_opt + steps;
    }
    if (x == NULL || y == NULL)
        drv_fail(PROG, ctx, CCR_ENOMEM, "batch");
    for (int m = 0; m < 2; m++) {
        ccr_status s = ccr_net_init(be, d, B, &r[m].net);
        if (s == CCR_OK) s = ccr_net_add_cond(r[m].net, &cc);
        if (s == CCR_OK) s = ccr_net_add_linear(r[m].net, 10);
        gsl_rng *init = drv_rng(PROG, ctx, 7);
        if (s == CCR_OK) s = ccr_net_finalize(r[m].net, init);
        gsl_rng_free(init);
        ccr_optim_config oc = ccr_optim_defaults(kind);
        oc.sparse = m == 1;
        if (kind == CCR_OPTIM_SGD)
            oc.momentum = 0.0f;
        if (s == CCR_OK) s = ccr_optim_init(ccr_net_params(r[m].net), &oc, &r[m].opt);
        if (s != CCR_OK)
            drv_fail(PROG, ctx, s, "building the network");
    }
    for (size_t t = 0; t < steps; t++) {
        for (size_t i = 0; i < B * d; i++)
            x[i] = (float)(2.0 * gsl_rng_uniform(rng) - 1.0);
        for (size_t b = 0; b < B; b++)
            y[b] = (int32_t)gsl_rng_uniform_int(rng, 10);
        for (int m = 0; m < 2; m++) {
            ccr_arena *p = ccr_net_params(r[m].net);
            ccr_step_stats st;
            double t0 = drv_now();
            ccr_status s = CCR_OK;
            if (m == 0)
                memset(ccr_arena_grads(p), 0, ccr_arena_block_len(p) * sizeof(float));
            else
                s = ccr_arena_zero_grad(p);
            double t1 = drv_now();
            if (s == CCR_OK)
                s = ccr_net_loss_grad_mode(r[m].net, x, y, B, CCR_MODE_TRAIN, rng, &st);
            double t2 = drv_now();
            if (s == CCR_OK)
                s = ccr_optim_step(r[m].opt);
            double t3 = drv_now();
            if (s != CCR_OK)
                drv_fail(PROG, ctx, s, "training step");
            r[m].t_zero[t] = t1 - t0;
            r[m].t_lg[t] = t2 - t1;
            r[m].t_opt[t] = t3 - t2;
            r[m].t_step[t] = t3 - t0;
            r[m].updated += ccr_optim_last_updated(r[m].opt);
            r[m].opt_flops += ccr_optim_flops(r[m].opt);
        }
    }
    for (int m = 0; m < 2; m++) {
        ccr_flops fl = ccr_net_flops(r[m].net);
        printf("{\"driver\":\"%s\",\"mode\":\"%s\",\"gate\":\"%s\",\"experts\":%zu,\"k\":%zu,"
               "\"d\":%zu,\"hidden\":%zu,\"batch\":%zu,\"steps\":%zu,\"optim\":\"%s\","
               "\"params\":%zu,\"blas_core\":\"%s\",\"seconds_zero\":%.6g,"
               "\"seconds_fwdbwd\":%.6g,\"seconds_optim\":%.6g,\"seconds_step\":%.6g,"
               "\"us_per_example_step\":%.4g,\"params_updated_per_step\":%.6g,"
               "\"optim_flops_per_step\":%.6g,\"fwdbwd_flops_per_step\":%.6g}\n",
               PROG, m ? "sparse" : "dense", gate, E, k, d, h, B, steps,
               kind == CCR_OPTIM_ADAM ? "adam" : "sgd", ccr_net_n_params(r[m].net),
               ccr_blas_corename(), median(r[m].t_zero, steps), median(r[m].t_lg, steps),
               median(r[m].t_opt, steps), median(r[m].t_step, steps),
               1e6 * median(r[m].t_step, steps) / (double)B,
               (double)r[m].updated / (double)steps, r[m].opt_flops / (double)steps,
               (fl.fwd + fl.bwd) * (double)B);
        ccr_optim_free(r[m].opt);
        ccr_net_free(r[m].net);
        free(r[m].t_zero);
    }
    free(x);
    free(y);
    drv_teardown(PROG, ctx, be, rng, NULL, NULL);
    return 0;
}
