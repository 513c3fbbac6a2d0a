/*
 * test_cond_parallel.c - the routed matmul's two ways of using threads
 * (ccr_cond_config.parallel: one GEMM at a time with OpenBLAS's threads, or
 * the groups side by side on the layer's pool) give the same layer: output,
 * dx and every gradient agree with each other within float rounding, each
 * is bitwise identical across two runs, and both match a naive per-example
 * reference of the bank (forward for FFN and linear banks, the bank's
 * gradients for linear ones).  Run at OpenBLAS thread counts 1 and 3, with
 * the counting sort's two ways of ordering groups (a bank larger than the
 * batch's pairs, and smaller).  The optional per-matrix timing
 * (ccr_cond_set_timing) changes no result and times exactly the matrices
 * the batch used.
 */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ccr_test.h"

#define B 48
#define D_IN 6
#define D_OUT 5
#define HID 7

typedef struct run_out {
    float y[B * D_OUT], dx[B * D_IN];
    float *grads, *values;
    size_t n;
    size_t off[4];   /* the bank's tensors (w1 b1 w2 b2, or w b) in values/grads */
    ccr_route route; /* ids and weights copied below */
    int32_t ids[B * 64];
    float w[B * 64];
    size_t group_threads; /* ccr_cond_group_threads after the forward */
} run_out;

static ccr_ctx *ctx;
static ccr_backend *be;

static ccr_cond_config config(const char *gate, ccr_bank_kind bank, ccr_cond_parallel par)
{
    ccr_cond_config c = ccr_cond_config_default();
    c.gate_name = gate;
    c.bank = bank;
    c.d_in = D_IN;
    c.d_out = D_OUT;
    c.hidden = HID;
    c.parallel = par;
    c.gate_cfg.n_experts = 16;
    c.gate_cfg.k = 4;
    c.gate_cfg.n_groups = 4;
    c.gate_cfg.depth = 6;  /* signtree: 127 node matrices, more than 7 x batch pairs below */
    c.gate_cfg.randomize = true;
    return c;
}

/* One forward (training) and backward of a fresh layer; everything copied
 * out.  tsec: per-matrix timing into it (ccr_cond_set_timing), or NULL. */
static void run_layer(const ccr_cond_config *cfg, size_t batch, run_out *o, double *tsec)
{
    ccr_cond *c;
    ccr_arena *a;
    gsl_rng *rng = ccr_test_rng(5);
    CCR_CK_OK(ctx, ccr_cond_alloc(be, cfg, B, &c));
    CCR_CK_OK(ctx, ccr_arena_init(be, &a));
    CCR_CK_OK(ctx, ccr_cond_declare(c, a, ""));
    CCR_CK_OK(ctx, ccr_arena_finalize(a));
    CCR_CK_OK(ctx, ccr_cond_init_params(c, rng));
    CCR_CK_OK(ctx, ccr_cond_set_timing(c, tsec));
    ck_assert_uint_eq(ccr_cond_group_threads(c), 0); /* no forward yet */
    float x[B * D_IN], dy[B * D_OUT];
    gsl_rng *data = ccr_test_rng(77);
    ccr_test_fill_uniform(data, x, B * D_IN, -1, 1);
    ccr_test_fill_uniform(data, dy, B * D_OUT, -1, 1);
    ccr_gate_stats st;
    memset(o->y, 0, sizeof o->y);
    memset(o->dx, 0, sizeof o->dx);
    CCR_CK_OK(ctx, ccr_cond_forward(c, x, batch, true, rng, o->y, &st));
    o->group_threads = ccr_cond_group_threads(c);
    CCR_CK_OK(ctx, ccr_arena_zero_grad(a));
    CCR_CK_OK(ctx, ccr_cond_backward(c, dy, o->dx));
    o->n = ccr_arena_n_params(a);
    o->grads = malloc(o->n * sizeof(float));
    o->values = malloc(o->n * sizeof(float));
    ck_assert_ptr_nonnull(o->grads);
    ck_assert_ptr_nonnull(o->values);
    memcpy(o->grads, ccr_arena_grads(a), o->n * sizeof(float));
    memcpy(o->values, ccr_arena_values(a), o->n * sizeof(float));
    const ccr_route *r = ccr_cond_route(c);
    ck_assert_uint_le(r->slots, 64);
    o->route = *r;
    memcpy(o->ids, r->ids, batch * r->slots * sizeof(int32_t));
    memcpy(o->w, r->weights, batch * r->slots * sizeof(float));
    /* The bank's tensors come first, in declaration order. */
    bool ffn = cfg->bank == CCR_BANK_FFN;
    const char *w0 = strcmp(cfg->gate_name, "signtree") == 0 ? (ffn ? "tree.w1" : "tree.w")
                                                              : (ffn ? "experts.w1" : "experts.w");
    ck_assert_str_eq(ccr_arena_name(a, 0), w0);
    for (size_t i = 0; i < (ffn ? 4u : 2u); i++)
        o->off[i] = (size_t)(ccr_arena_value(a, i) - ccr_arena_values(a));
    ccr_arena_free(a);
    ccr_cond_free(c);
    gsl_rng_free(rng);
    gsl_rng_free(data);
    (void)dy;
}

static void free_out(run_out *o)
{
    free(o->grads);
    free(o->values);
}

/* y_b = sum_s w M_id(x_b), each example on its own, in double. */
static void reference_forward(const run_out *o, ccr_bank_kind bank, size_t batch, float *y)
{
    float x[B * D_IN], dy[B * D_OUT];
    gsl_rng *data = ccr_test_rng(77);
    ccr_test_fill_uniform(data, x, B * D_IN, -1, 1);
    ccr_test_fill_uniform(data, dy, B * D_OUT, -1, 1);
    gsl_rng_free(data);
    size_t S = o->route.slots;
    const float *v = o->values;
    for (size_t b = 0; b < batch; b++) {
        for (size_t j = 0; j < D_OUT; j++) {
            double acc = 0.0;
            for (size_t s = 0; s < S; s++) {
                int32_t m = o->ids[b * S + s];
                if (m < 0)
                    continue;
                double out;
                if (bank == CCR_BANK_FFN) {
                    const float *w1 = v + o->off[0], *b1 = v + o->off[1], *w2 = v + o->off[2],
                                *b2 = v + o->off[3];
                    out = b2[m * D_OUT + j];
                    for (size_t k = 0; k < HID; k++) {
                        double hk = b1[m * HID + k];
                        for (size_t i = 0; i < D_IN; i++)
                            hk += (double)x[b * D_IN + i] * w1[(m * D_IN + i) * HID + k];
                        out += (hk > 0 ? hk : 0) * w2[(m * HID + k) * D_OUT + j];
                    }
                } else {
                    const float *w = v + o->off[0], *bb = v + o->off[1];
                    out = bb[m * D_OUT + j];
                    for (size_t i = 0; i < D_IN; i++)
                        out += (double)x[b * D_IN + i] * w[(m * D_IN + i) * D_OUT + j];
                }
                acc += o->w[b * S + s] * out;
            }
            y[b * D_OUT + j] = (float)acc;
        }
    }
}

/* A linear bank's gradients: dW_m = sum over pairs x_b^T (w dy_b), db_m = sum w dy_b. */
static void reference_linear_grads(const run_out *o, size_t batch, float *gw, float *gb)
{
    float x[B * D_IN], dy[B * D_OUT];
    gsl_rng *data = ccr_test_rng(77);
    ccr_test_fill_uniform(data, x, B * D_IN, -1, 1);
    ccr_test_fill_uniform(data, dy, B * D_OUT, -1, 1);
    gsl_rng_free(data);
    size_t E = o->route.n_matrices, S = o->route.slots;
    memset(gw, 0, E * D_IN * D_OUT * sizeof *gw);
    memset(gb, 0, E * D_OUT * sizeof *gb);
    for (size_t b = 0; b < batch; b++)
        for (size_t s = 0; s < S; s++) {
            int32_t m = o->ids[b * S + s];
            if (m < 0)
                continue;
            float wt = o->w[b * S + s];
            for (size_t j = 0; j < D_OUT; j++) {
                gb[m * D_OUT + j] += wt * dy[b * D_OUT + j];
                for (size_t i = 0; i < D_IN; i++)
                    gw[(m * D_IN + i) * D_OUT + j] += x[b * D_IN + i] * wt * dy[b * D_OUT + j];
            }
        }
}

static void check(const char *gate, ccr_bank_kind bank, size_t batch, int threads)
{
    int prev = openblas_get_num_threads();
    openblas_set_num_threads(threads);
    run_out *o[3];
    ccr_cond_parallel par[3] = {CCR_COND_PAR_BLAS, CCR_COND_PAR_EXPERTS, CCR_COND_PAR_EXPERTS};
    for (int i = 0; i < 3; i++) {
        o[i] = calloc(1, sizeof *o[i]);
        ck_assert_ptr_nonnull(o[i]);
        ccr_cond_config cfg = config(gate, bank, par[i]);
        run_layer(&cfg, batch, o[i], NULL);
    }
    char label[96];
    snprintf(label, sizeof label, "%s bank %d batch %zu threads %d", gate, (int)bank, batch,
             threads);
    /* The two experts runs: bitwise identical. */
    ck_assert_msg(memcmp(o[1]->y, o[2]->y, sizeof o[1]->y) == 0, "%s: y differs", label);
    ck_assert_msg(memcmp(o[1]->dx, o[2]->dx, sizeof o[1]->dx) == 0, "%s: dx differs", label);
    ck_assert_msg(memcmp(o[1]->grads, o[2]->grads, o[1]->n * sizeof(float)) == 0,
                  "%s: grads differ", label);
    /* Same routing in both modes; blas against experts within rounding. */
    ck_assert(memcmp(o[0]->ids, o[1]->ids, sizeof o[0]->ids) == 0);
    ccr_test_assert_nmse(o[1]->y, o[0]->y, batch * D_OUT, 1e-10, label);
    ccr_test_assert_nmse(o[1]->dx, o[0]->dx, batch * D_IN, 1e-10, label);
    ccr_test_assert_nmse(o[1]->grads, o[0]->grads, o[0]->n, 1e-10, label);
    /* Both against the naive reference. */
    float yref[B * D_OUT];
    reference_forward(o[0], bank, batch, yref);
    for (int i = 0; i < 2; i++)
        ccr_test_assert_nmse(o[i]->y, yref, batch * D_OUT, 1e-10, label);
    if (bank == CCR_BANK_LINEAR) {
        size_t E = o[0]->route.n_matrices;
        float *gw = malloc(E * D_IN * D_OUT * sizeof *gw), *gb = malloc(E * D_OUT * sizeof *gb);
        ck_assert(gw != NULL && gb != NULL);
        reference_linear_grads(o[0], batch, gw, gb);
        for (int i = 0; i < 2; i++) {
            ccr_test_assert_nmse(o[i]->grads + o[i]->off[0], gw, E * D_IN * D_OUT, 1e-10, label);
            ccr_test_assert_nmse(o[i]->grads + o[i]->off[1], gb, E * D_OUT, 1e-10, label);
        }
        free(gw);
        free(gb);
    }
    for (int i = 0; i < 3; i++) {
        free_out(o[i]);
        free(o[i]);
    }
    openblas_set_num_threads(prev);
}

static const char *gates[] = {"topk", "hmoe", "switch", "signtree"};

START_TEST(test_modes_agree)
{
    const char *gate = gates[_i / 4];
    ccr_bank_kind bank = (_i / 2) % 2 ? CCR_BANK_LINEAR : CCR_BANK_FFN;
    int threads = _i % 2 ? 3 : 1;
    check(gate, bank, B, threads);
    check(gate, bank, 3, threads);  /* few pairs: the bank outnumbers them */
}
END_TEST

/* Per-matrix timing on a straight-through path tree (and, _i odd, without
 * the straight-through gradient), both modes at 3 threads: the same
 * results as untimed, forward and backward seconds > 0 exactly for the
 * matrices the batch used, the sibling evaluations only with ste and
 * never for the root, and the group threads the mode implies. */
START_TEST(test_timing)
{
    int prev = openblas_get_num_threads();
    openblas_set_num_threads(3);
    const ccr_cond_parallel par[2] = {CCR_COND_PAR_BLAS, CCR_COND_PAR_EXPERTS};
    for (int p = 0; p < 2; p++) {
        ccr_cond_config cfg = config("signtree", CCR_BANK_LINEAR, par[p]);
        cfg.gate_cfg.grad_mode = _i ? CCR_GRAD_NONE : CCR_GRAD_STE;
        run_out *o = calloc(2, sizeof *o);
        ck_assert_ptr_nonnull(o);
        const size_t n = 127; /* 2^(depth + 1) - 1 node matrices */
        double *t = calloc(3 * n, sizeof *t);
        ck_assert_ptr_nonnull(t);
        run_layer(&cfg, B, &o[0], NULL);
        run_layer(&cfg, B, &o[1], t);
        ck_assert_uint_eq(o[1].route.n_matrices, n);
        ck_assert(memcmp(o[0].y, o[1].y, sizeof o[0].y) == 0);
        ck_assert(memcmp(o[0].dx, o[1].dx, sizeof o[0].dx) == 0);
        ck_assert(memcmp(o[0].grads, o[1].grads, o[0].n * sizeof(float)) == 0);
        ck_assert_uint_eq(o[1].group_threads, par[p] == CCR_COND_PAR_EXPERTS ? 3 : 1);
        bool used[127] = {false};
        for (size_t i = 0; i < B * o[1].route.slots; i++)
            if (o[1].ids[i] >= 0)
                used[o[1].ids[i]] = true;
        double dots = 0.0;
        for (size_t m = 0; m < n; m++) {
            ck_assert_msg(used[m] ? t[m] > 0.0 : t[m] == 0.0, "fwd time of %zu: %g", m, t[m]);
            ck_assert_msg(used[m] ? t[n + m] > 0.0 : t[n + m] == 0.0, "bwd time of %zu", m);
            ck_assert(t[2 * n + m] >= 0.0);
            dots += t[2 * n + m];
        }
        ck_assert(t[2 * n] == 0.0); /* the root has no sibling */
        ck_assert(_i ? dots == 0.0 : dots > 0.0);
        free(t);
        free_out(&o[0]);
        free_out(&o[1]);
        free(o);
    }
    openblas_set_num_threads(prev);
}
END_TEST

/* An unknown mode is refused at allocation. */
START_TEST(test_bad_mode)
{
    ccr_cond_config cfg = config("topk", CCR_BANK_FFN, CCR_COND_PAR_AUTO);
    ccr_cond *c;
    cfg.parallel = (ccr_cond_parallel)7;
    CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &cfg, B, &c), CCR_EINVAL);
    ck_assert_int_eq((int)ccr_cond_config_default().parallel, (int)CCR_COND_PAR_AUTO);
}
END_TEST

static void setup(void)
{
    ctx = ccr_test_ctx();
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
}

static void teardown(void)
{
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
}

int main(void)
{
    Suite *s = suite_create("cond_parallel");
    TCase *tc = tcase_create("modes");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_modes_agree, 0, 16);
    tcase_add_test(tc, test_bad_mode);
    tcase_add_loop_test(tc, test_timing, 0, 2);
    suite_add_tcase(s, tc);
    return ccr_test_run(s);
}
