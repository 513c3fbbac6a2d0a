/*
 * test_signtree_dots.c - the conditional layer's batched eval_dots callback
 * (ccr_gate_bwd_args.eval_dots, used by the sign-bit tree's straight-through
 * backward) against its per-row eval_matrix:
 *   - through a whole layer: a wrapper gate type runs the signtree backward
 *     twice on the same arguments, once with eval_dots cleared (row by row
 *     through eval_matrix) and once as the layer passed it, and the test
 *     compares W_bits, c_bits and dx gradients (depth 4, batch 96, leaf and
 *     path, linear and FFN banks);
 *   - called directly: random (matrix, row) pairs, more than the layer's
 *     workspace holds (so the call works in chunks), half of them on one
 *     matrix (more rows than a GEMM block of the FFN bank), each dot against
 *     dy . eval_matrix(x), the same call twice bitwise equal, an
 *     out-of-range matrix refused;
 *   - the layer leaves eval_dots NULL for grad_mode none.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ccr_test.h"

#define D_IN 160 /* rows of d_in + hidden + 2 d_out floats: the layer's blocks of
                    2^16 floats hold 350 rows (FFN), fewer than B x DEPTH */
#define D_OUT 11
#define HID 5
#define DEPTH 4
#define B 96
#define MAX_GRAD 1024 /* floats of the gate's gradients: d_in x depth + depth */

static ccr_ctx *ctx;
static ccr_backend *be;
static gsl_rng *rng;

static void setup(void)
{
    ck_assert_int_eq(ccr_ctx_init(&ctx), CCR_OK);
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, 17);
}

static void teardown(void)
{
    gsl_rng_free(rng);
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
}

/* ---- a wrapper around the signtree gate ------------------------------------- */

typedef struct wrap_state {
    ccr_gate *inner;
    ccr_arena *arena;
    size_t first, end;      /* the inner gate's tensors in the arena */
    bool called;            /* backward ran */
    /* what the layer passed */
    ccr_status (*eval_dots)(void *, size_t, const size_t *, const size_t *, const float *,
                            const float *, double *);
    ccr_status (*eval_matrix)(void *, size_t, const float *, float *);
    void *bank;
    /* the gradients of the eval_matrix run (the layer keeps the eval_dots run) */
    float grad_ref[MAX_GRAD];
    float dx_ref[B * D_IN];
    size_t n_grad;
} wrap_state;

static wrap_state *wrap_last; /* the instance the test created (one at a time) */

static ccr_status wrap_init(void *s, ccr_ctx *c, const ccr_gate_config *cfg, size_t mb)
{
    wrap_state *w = s;
    wrap_last = w;
    return ccr_gate_alloc(c, &ccr_gate_signtree, cfg, mb, &w->inner);
}
static void wrap_free(void *s) { ccr_gate_free(((wrap_state *)s)->inner); }
static size_t wrap_n_mat(const void *s)
{
    return ccr_gate_n_matrices(((const wrap_state *)s)->inner);
}
static size_t wrap_slots(const void *s) { return ccr_gate_slots(((const wrap_state *)s)->inner); }
static ccr_status wrap_declare(void *s, ccr_arena *a, const char *p)
{
    wrap_state *w = s;
    w->arena = a;
    w->first = ccr_arena_count(a);
    ccr_status st = ccr_gate_declare(w->inner, a, p);
    w->end = ccr_arena_count(a);
    return st;
}
static ccr_status wrap_init_params(void *s, gsl_rng *r)
{
    return ccr_gate_init_params(((wrap_state *)s)->inner, r);
}
static ccr_status wrap_forward(void *s, const float *x, size_t batch, bool train, gsl_rng *r,
                               ccr_route *route, ccr_gate_stats *st)
{
    return ccr_gate_forward(((wrap_state *)s)->inner, x, batch, train, r, route, st);
}
/* Copies the inner gate's gradients to dst, or back from src. */
static size_t wrap_grads(wrap_state *w, float *dst, const float *src)
{
    size_t off = 0;
    for (size_t i = w->first; i < w->end; i++) {
        size_t n = ccr_arena_size(w->arena, i);
        ck_assert(off + n <= MAX_GRAD);
        float *g = ccr_arena_grad(w->arena, i);
        if (dst != NULL)
            memcpy(dst + off, g, n * sizeof *g);
        else
            memcpy(g, src + off, n * sizeof *g);
        off += n;
    }
    return off;
}
static ccr_status wrap_backward(void *s, const ccr_gate_bwd_args *a)
{
    wrap_state *w = s;
    w->called = true;
    w->eval_dots = a->eval_dots;
    w->eval_matrix = a->eval_matrix;
    w->bank = a->bank;
    if (a->eval_dots == NULL)
        return ccr_gate_backward(w->inner, a);
    /* the row-by-row run first, on saved inputs, then restore and rerun */
    float g0[MAX_GRAD], dx0[B * D_IN];
    ck_assert(a->batch <= B && a->dx != NULL);
    size_t nx = a->batch * D_IN;
    w->n_grad = wrap_grads(w, g0, NULL);
    memcpy(dx0, a->dx, nx * sizeof *dx0);
    ccr_gate_bwd_args rows = *a;
    rows.eval_dots = NULL;
    ccr_status st = ccr_gate_backward(w->inner, &rows);
    if (st != CCR_OK)
        return st;
    wrap_grads(w, w->grad_ref, NULL);
    memcpy(w->dx_ref, a->dx, nx * sizeof *dx0);
    wrap_grads(w, NULL, g0);
    memcpy(a->dx, dx0, nx * sizeof *dx0);
    return ccr_gate_backward(w->inner, a);
}
static double wrap_flops(const void *s, bool train)
{
    return ccr_gate_flops(((const wrap_state *)s)->inner, train);
}
static double wrap_mpe(const void *s)
{
    return ccr_gate_matrices_per_example(((const wrap_state *)s)->inner);
}

static ccr_gate_type wrap_gate(void)
{
    ccr_gate_type t = {
        .name = "signtree-wrap", .paper = "test: signtree, backward run both ways",
        .param_group = "tree.", .state_size = sizeof(wrap_state), .init = wrap_init,
        .free = wrap_free, .n_matrices = wrap_n_mat, .slots = wrap_slots,
        .declare = wrap_declare, .init_params = wrap_init_params, .forward = wrap_forward,
        .backward = wrap_backward, .flops = wrap_flops, .matrices_per_example = wrap_mpe,
        .options = ccr_gate_signtree.options, .linear_bank = true};
    return t;
}

/* ---- the tests --------------------------------------------------------------- */

/* _i: bit 0 leaf (else path), bit 1 FFN bank (else linear). */
/* A layer of cc for B examples in its own arena, parameters initialised;
 * returns the wrapper gate's state. */
static wrap_state *make_layer(const ccr_cond_config *cc, ccr_cond **c, ccr_arena **a)
{
    CCR_CK_OK(ctx, ccr_cond_alloc(be, cc, B, c));
    wrap_state *w = wrap_last;
    CCR_CK_OK(ctx, ccr_arena_init(be, a));
    CCR_CK_OK(ctx, ccr_cond_declare(*c, *a, ""));
    CCR_CK_OK(ctx, ccr_arena_finalize(*a));
    CCR_CK_OK(ctx, ccr_cond_init_params(*c, rng));
    return w;
}

START_TEST(test_layer_both_ways)
{
    ccr_gate_type t = wrap_gate();
    ccr_cond_config cc = ccr_cond_config_default();
    cc.gate = &t;
    cc.bank = (_i & 2) ? CCR_BANK_FFN : CCR_BANK_LINEAR;
    cc.d_in = D_IN;
    cc.d_out = D_OUT;
    cc.hidden = HID;
    cc.gate_cfg.depth = DEPTH;
    cc.gate_cfg.combine = (_i & 1) ? CCR_COMBINE_LEAF : CCR_COMBINE_PATH;
    cc.gate_cfg.bits_from = CCR_BITS_PROJECTION;
    cc.gate_cfg.grad_mode = CCR_GRAD_STE;
    cc.gate_cfg.randomize = true;
    ccr_cond *c;
    ccr_arena *a;
    wrap_state *w = make_layer(&cc, &c, &a);
    size_t n_mat = ccr_gate_n_matrices(w->inner);

    float *x = malloc(B * D_IN * sizeof *x), *dy = malloc(B * D_OUT * sizeof *dy);
    float *y = malloc(B * D_OUT * sizeof *y), *dx = malloc(B * D_IN * sizeof *dx);
    ck_assert(x && dy && y && dx);
    ccr_test_fill_uniform(rng, x, B * D_IN, -1.0f, 1.0f);
    ccr_test_fill_uniform(rng, dy, B * D_OUT, -1.0f, 1.0f);
    ccr_gate_stats st;
    CCR_CK_OK(ctx, ccr_arena_zero_grad(a));
    CCR_CK_OK(ctx, ccr_cond_forward(c, x, B, true, rng, y, &st));
    ck_assert_msg(st.distinct > n_mat / 2, "only %zu of %zu matrices used", st.distinct, n_mat);
    CCR_CK_OK(ctx, ccr_cond_backward(c, dy, dx));
    ck_assert(w->called);
    ck_assert_msg(w->eval_dots != NULL, "the layer did not pass eval_dots");
    ck_assert(w->eval_matrix != NULL);

    /* the gate's gradients and dx, batched vs row by row */
    ck_assert_uint_eq(w->n_grad, D_IN * DEPTH + DEPTH);
    float got[MAX_GRAD];
    wrap_grads(w, got, NULL);
    double gmax = 0.0;
    for (size_t i = 0; i < w->n_grad; i++)
        gmax = fmax(gmax, fabs(w->grad_ref[i]));
    ck_assert_msg(gmax > 1e-3, "gate gradients vanish (%g)", gmax);
    ccr_test_assert_nmse(got, w->grad_ref, w->n_grad, 1e-10, "W_bits, c_bits");
    ccr_test_assert_nmse(dx, w->dx_ref, B * D_IN, 1e-10, "dx");
    for (size_t i = 0; i < w->n_grad; i++)
        ck_assert_msg(fabs(got[i] - w->grad_ref[i]) <= 1e-5 * (1.0 + fabs(w->grad_ref[i])),
                      "gradient %zu: %g batched, %g row by row", i, got[i], w->grad_ref[i]);

    /* direct calls: more pairs than the workspace (B x DEPTH), in chunks */
    enum { N = 2 * B * DEPTH + 37 };
    size_t *mat = malloc(N * sizeof *mat), *row = malloc(N * sizeof *row);
    double *out = malloc(N * sizeof *out), *out2 = malloc(N * sizeof *out2);
    ck_assert(mat && row && out && out2);
    for (size_t i = 0; i < N; i++) { /* the first half on matrix 0: blocks split */
        mat[i] = i < N / 2 ? 0 : gsl_rng_uniform_int(rng, n_mat);
        row[i] = gsl_rng_uniform_int(rng, B);
    }
    CCR_CK_OK(ctx, w->eval_dots(w->bank, N, mat, row, x, dy, out));
    float yrow[D_OUT];
    for (size_t i = 0; i < N; i++) {
        CCR_CK_OK(ctx, w->eval_matrix(w->bank, mat[i], x + row[i] * D_IN, yrow));
        double ref = 0.0, scale = 0.0;
        for (size_t j = 0; j < D_OUT; j++) {
            ref += (double)dy[row[i] * D_OUT + j] * yrow[j];
            scale += fabs((double)dy[row[i] * D_OUT + j] * yrow[j]);
        }
        ck_assert_msg(fabs(out[i] - ref) <= 1e-5 * (scale + 1e-6),
                      "pair %zu (matrix %zu, row %zu): %.9g, eval_matrix %.9g", i, mat[i],
                      row[i], out[i], ref);
    }
    CCR_CK_OK(ctx, w->eval_dots(w->bank, N, mat, row, x, dy, out2));
    ck_assert(memcmp(out, out2, N * sizeof *out) == 0);
    CCR_CK_OK(ctx, w->eval_dots(w->bank, 0, mat, row, x, dy, out2));
    mat[N / 2] = n_mat;
    CCR_CK_STATUS(ctx, w->eval_dots(w->bank, N, mat, row, x, dy, out2), CCR_EINVAL);

    free(mat);
    free(row);
    free(out);
    free(out2);
    free(x);
    free(dy);
    free(y);
    free(dx);
    ccr_cond_free(c);
    ccr_arena_free(a);
}
END_TEST

/* Without a straight-through gradient the layer sizes no workspace and passes
 * no eval_dots; the gate's backward is a no-op. */
START_TEST(test_none_no_dots)
{
    ccr_gate_type t = wrap_gate();
    ccr_cond_config cc = ccr_cond_config_default();
    cc.gate = &t;
    cc.d_in = D_IN;
    cc.d_out = D_OUT;
    cc.gate_cfg.depth = DEPTH;
    cc.gate_cfg.grad_mode = CCR_GRAD_NONE;
    ccr_cond *c;
    ccr_arena *a;
    wrap_state *w = make_layer(&cc, &c, &a);
    float x[8 * D_IN], y[8 * D_OUT], dy[8 * D_OUT], dx[8 * D_IN];
    ccr_test_fill_uniform(rng, x, 8 * D_IN, -1.0f, 1.0f);
    ccr_test_fill_uniform(rng, dy, 8 * D_OUT, -1.0f, 1.0f);
    ccr_gate_stats st;
    CCR_CK_OK(ctx, ccr_cond_forward(c, x, 8, true, rng, y, &st));
    CCR_CK_OK(ctx, ccr_cond_backward(c, dy, dx));
    ck_assert(w->called);
    ck_assert(w->eval_dots == NULL);
    ck_assert(w->eval_matrix != NULL);
    ccr_cond_free(c);
    ccr_arena_free(a);
}
END_TEST

static Suite *dots_suite(void)
{
    Suite *s = suite_create("signtree_dots");
    TCase *tc = tcase_create("dots");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_layer_both_ways, 0, 4);
    tcase_add_test(tc, test_none_no_dots);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return ccr_test_run(dots_suite()); }
