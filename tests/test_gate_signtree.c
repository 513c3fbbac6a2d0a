/*
 * test_gate_signtree.c - the sign-bit tree gate (ccr's reading of Cho &
 * Bengio 2014, docs/GATES.md "signtree"): heap node ids and leaf ids for
 * known bits, the zero tie rule, slot and weight layout, matrix counts,
 * depth 0 and depth 20, depth validation, the two gradient modes (ste
 * checked against its definition with the small linear bank of
 * gate_ref.c, siblings through eval_matrix or the batched eval_dots),
 * diagnostics on a hand case, and determinism.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gate_ref.h"

static void setup(void) { gate_fixture_open(11); }

static void teardown(void) { gate_fixture_close(); }

static ccr_gate_config tree_cfg(size_t d_in, size_t depth, ccr_combine comb, ccr_bits_from bf,
                                ccr_grad_mode gm)
{
    ccr_gate_config c = ccr_gate_config_default();
    c.d_in = d_in;
    c.depth = depth;
    c.combine = comb;
    c.bits_from = bf;
    c.grad_mode = gm;
    return c;
}

/* A gate with its parameters declared under "tree.", finalized and
 * initialised; *arena is NULL when it has none. */
static ccr_gate *make_gate(const ccr_gate_config *c, size_t max_batch, ccr_arena **arena)
{
    ccr_gate *g;
    CCR_CK_OK(ctx, ccr_gate_alloc(ctx, &ccr_gate_signtree, c, max_batch, &g));
    *arena = NULL;
    if (c->bits_from == CCR_BITS_PROJECTION && c->depth > 0) {
        CCR_CK_OK(ctx, ccr_arena_init(be, arena));
        CCR_CK_OK(ctx, ccr_gate_declare(g, *arena, "tree."));
        CCR_CK_OK(ctx, ccr_arena_finalize(*arena));
        CCR_CK_OK(ctx, ccr_gate_init_params(g, rng));
    }
    return g;
}

static float *param(ccr_arena *a, const char *name, bool grad)
{
    size_t i;
    CCR_CK_OK(ctx, ccr_arena_find(a, name, &i));
    return grad ? ccr_arena_grad(a, i) : ccr_arena_value(a, i);
}

static void check_ids(const ccr_route *r, size_t b, const int32_t *want, size_t n)
{
    ck_assert_uint_eq(r->slots, n);
    for (size_t s = 0; s < n; s++) {
        ck_assert_msg(r->ids[b * n + s] == want[s], "example %zu slot %zu: id %d, want %d", b,
                      s, (int)r->ids[b * n + s], (int)want[s]);
        ck_assert(r->weights[b * n + s] == 1.0f);
    }
}

/* Export i of g, asserting its name and rank. */
static const float *get_export(ccr_gate *g, size_t i, const char *want, size_t want_rank,
                               size_t shape[4])
{
    const char *name;
    size_t rank;
    const float *data;
    CCR_CK_OK(ctx, ccr_gate_get_export(g, i, &name, &rank, shape, &data));
    ck_assert_str_eq(name, want);
    ck_assert_uint_eq(rank, want_rank);
    return data;
}

START_TEST(test_type)
{
    ck_assert_ptr_eq(ccr_gate_type_find("signtree"), &ccr_gate_signtree);
    ck_assert_str_eq(ccr_gate_signtree.param_group, "tree.");
    ck_assert_ptr_nonnull(strstr(ccr_gate_signtree.paper, "ccr's reading"));
    /* The default reading (ccr-tree --readings, docs/GATES.md): bits from the
     * gate's projection, trained straight-through, path combine. */
    ccr_gate_config c = ccr_gate_config_default();
    ck_assert_int_eq(c.grad_mode, CCR_GRAD_STE);
    ck_assert_int_eq(c.bits_from, CCR_BITS_PROJECTION);
    ck_assert_int_eq(c.combine, CCR_COMBINE_PATH);
}
END_TEST

/* Bits from the input: d = 3, rows giving bits 101, 000 (zeros, -0) and 011. */
static const float known_x[3 * 4] = {1.0f, -1.0f, 2.0f, 9.0f,   0.0f, -0.0f, 0.0f, 5.0f,
                                     -1.0f, 2.0f, 0.5f, -7.0f};

/* Path ids 0 2 5 12 / 0 1 3 7 / 0 1 4 10; leaf ids 0b101, 0, 0b011. */
START_TEST(test_known_input)
{
    bool path = _i == 0;
    ccr_gate_config c = tree_cfg(4, 3, path ? CCR_COMBINE_PATH : CCR_COMBINE_LEAF,
                                 CCR_BITS_INPUT, CCR_GRAD_NONE);
    ccr_arena *a;
    ccr_gate *g = make_gate(&c, 3, &a);
    ck_assert_ptr_null(a);
    ck_assert_uint_eq(ccr_gate_n_matrices(g), path ? 15 : 8);
    ck_assert_uint_eq(ccr_gate_slots(g), path ? 4 : 1);
    ccr_route r;
    ccr_gate_stats st;
    CCR_CK_OK(ctx, ccr_gate_forward(g, known_x, 3, path, NULL, &r, &st));
    CCR_CK_OK(ctx, ccr_route_validate(ctx, &r));
    ck_assert_uint_eq(r.batch, 3);
    ck_assert_uint_eq(r.n_matrices, path ? 15 : 8);
    if (path) {
        check_ids(&r, 0, (const int32_t[]){0, 2, 5, 12}, 4);
        check_ids(&r, 1, (const int32_t[]){0, 1, 3, 7}, 4);
        check_ids(&r, 2, (const int32_t[]){0, 1, 4, 10}, 4);
    } else {
        check_ids(&r, 0, (const int32_t[]){5}, 1);
        check_ids(&r, 1, (const int32_t[]){0}, 1);
        check_ids(&r, 2, (const int32_t[]){3}, 1);
    }
    /* Exports: bits 0/1 and a = x_j itself. */
    ck_assert_uint_eq(ccr_gate_n_exports(g), 5);
    size_t shape[4];
    const float *data = get_export(g, 3, "bits", 2, shape);
    ck_assert(shape[0] == 3 && shape[1] == 3);
    const float want_bits[9] = {1, 0, 1, 0, 0, 0, 0, 1, 1};
    ck_assert(memcmp(data, want_bits, sizeof want_bits) == 0);
    data = get_export(g, 4, "a", 2, shape);
    for (size_t b = 0; b < 3; b++)
        for (size_t j = 0; j < 3; j++)
            ck_assert(data[b * 3 + j] == known_x[b * 4 + j]);
    const char *name;
    size_t rank;
    CCR_CK_STATUS(ctx, ccr_gate_get_export(g, 5, &name, &rank, shape, &data), CCR_EINVAL);
    ck_assert(ccr_gate_flops(g, true) == 0.0);
    ck_assert(ccr_gate_matrices_per_example(g) == (path ? 4.0 : 1.0));
    ccr_gate_free(g);
}
END_TEST

/* Bits from a = x W_bits + c with hand-set parameters; an exact zero goes left. */
START_TEST(test_known_projection)
{
    ccr_gate_config c = tree_cfg(2, 3, CCR_COMBINE_PATH, CCR_BITS_PROJECTION, CCR_GRAD_NONE);
    ccr_arena *a;
    ccr_gate *g = make_gate(&c, 2, &a);
    ck_assert_ptr_nonnull(a);
    ck_assert_uint_eq(ccr_arena_count(a), 2);
    size_t i;
    CCR_CK_OK(ctx, ccr_arena_find(a, "tree.w_bits", &i));
    ck_assert_uint_eq(ccr_arena_rank(a, i), 2);
    ck_assert_uint_eq(ccr_arena_shape(a, i)[0], 2);
    ck_assert_uint_eq(ccr_arena_shape(a, i)[1], 3);
    CCR_CK_OK(ctx, ccr_arena_find(a, "tree.c_bits", &i));
    ck_assert_uint_eq(ccr_arena_rank(a, i), 1);
    ck_assert_uint_eq(ccr_arena_shape(a, i)[0], 3);
    /* zero parameters: every a is 0, every example goes left */
    memset(param(a, "tree.w_bits", false), 0, 6 * sizeof(float));
    memset(param(a, "tree.c_bits", false), 0, 3 * sizeof(float));
    const float x[4] = {1.0f, 2.0f, 3.0f, -1.0f};
    ccr_route r;
    ccr_gate_stats st;
    CCR_CK_OK(ctx, ccr_gate_forward(g, x, 2, true, NULL, &r, &st));
    check_ids(&r, 0, (const int32_t[]){0, 1, 3, 7}, 4);
    check_ids(&r, 1, (const int32_t[]){0, 1, 3, 7}, 4);
    /* W = [[1, 0, 1], [0, 1, 1]], c = [0, -2, -5]:
     * x = (1, 2): a = (1, 0, -2), bits 1 0 0 (the exact 0 goes left), path 0 2 5 11
     * x = (3, 3): a = (3, 1, 1), bits 1 1 1, path 0 2 6 14 */
    float *w = param(a, "tree.w_bits", false), *cb = param(a, "tree.c_bits", false);
    const float wv[6] = {1, 0, 1, 0, 1, 1}, cv[3] = {0, -2, -5};
    memcpy(w, wv, sizeof wv);
    memcpy(cb, cv, sizeof cv);
    const float x2[4] = {1.0f, 2.0f, 3.0f, 3.0f};
    CCR_CK_OK(ctx, ccr_gate_forward(g, x2, 2, true, NULL, &r, &st));
    check_ids(&r, 0, (const int32_t[]){0, 2, 5, 11}, 4);
    check_ids(&r, 1, (const int32_t[]){0, 2, 6, 14}, 4);
    size_t shape[4];
    const float *data = get_export(g, 4, "a", 2, shape);
    const float want_a[6] = {1, 0, -2, 3, 1, 1};
    ck_assert(memcmp(data, want_a, sizeof want_a) == 0);
    ck_assert(ccr_gate_flops(g, true) == 2.0 * 2 * 3);
    ck_assert(ccr_gate_flops(g, false) == 2.0 * 2 * 3);
    ccr_gate_free(g);
    ccr_arena_free(a);
}
END_TEST

START_TEST(test_layout)
{
    for (size_t d = 0; d <= 12; d++) {
        for (int comb = 0; comb < 2; comb++) {
            for (int bf = 0; bf < 2; bf++) {
                ccr_gate_config c = tree_cfg(16, d, (ccr_combine)comb, (ccr_bits_from)bf,
                                             CCR_GRAD_NONE);
                ccr_gate *g;
                CCR_CK_OK(ctx, ccr_gate_alloc(ctx, &ccr_gate_signtree, &c, 2, &g));
                size_t want_n = comb == CCR_COMBINE_PATH ? ((size_t)2 << d) - 1 : (size_t)1 << d;
                size_t want_s = comb == CCR_COMBINE_PATH ? d + 1 : 1;
                ck_assert_uint_eq(ccr_gate_n_matrices(g), want_n);
                ck_assert_uint_eq(ccr_gate_slots(g), want_s);
                ck_assert(ccr_gate_matrices_per_example(g) == (double)want_s);
                ck_assert(ccr_gate_flops(g, true) ==
                          (bf == CCR_BITS_PROJECTION ? 2.0 * 16 * (double)d : 0.0));
                ck_assert_uint_eq(ccr_gate_n_exports(g), d > 0 ? 5 : 3);
                ccr_gate_free(g);
            }
        }
    }
}
END_TEST

START_TEST(test_depth0)
{
    for (int comb = 0; comb < 2; comb++) {
        ccr_gate_config c = tree_cfg(3, 0, (ccr_combine)comb, CCR_BITS_PROJECTION,
                                     CCR_GRAD_STE);
        ccr_gate *g;
        CCR_CK_OK(ctx, ccr_gate_alloc(ctx, &ccr_gate_signtree, &c, 4, &g));
        ccr_arena *a;
        CCR_CK_OK(ctx, ccr_arena_init(be, &a));
        CCR_CK_OK(ctx, ccr_gate_declare(g, a, "tree."));
        ck_assert_uint_eq(ccr_arena_count(a), 0); /* no bit parameters */
        ccr_arena_free(a);
        CCR_CK_OK(ctx, ccr_gate_init_params(g, rng));
        float x[12];
        ccr_test_fill_uniform(rng, x, 12, -1.0f, 1.0f);
        ccr_route r;
        ccr_gate_stats st;
        CCR_CK_OK(ctx, ccr_gate_forward(g, x, 4, true, NULL, &r, &st));
        ck_assert_uint_eq(r.n_matrices, 1);
        for (size_t b = 0; b < 4; b++)
            check_ids(&r, b, (const int32_t[]){0}, 1);
        ck_assert_uint_eq(st.distinct, 1);
        size_t shape[4];
        const float *data = get_export(g, 2, "leaf_counts", 1, shape);
        ck_assert_uint_eq(shape[0], 1);
        ck_assert(data[0] == 4.0f);
        float dw[4] = {1, 2, 3, 4}, dx[12] = {0};
        ccr_gate_bwd_args ba = {.x = x, .batch = 4, .dweights = dw, .dx = dx};
        CCR_CK_OK(ctx, ccr_gate_backward(g, &ba)); /* nothing to do, no eval needed */
        for (size_t i = 0; i < 12; i++)
            ck_assert(dx[i] == 0.0f);
        ccr_gate_free(g);
    }
}
END_TEST

/* Depth 20 routes a batch (no bank is allocated: 2^21 - 1 node matrices). */
START_TEST(test_depth20)
{
    const size_t d = 20, d_in = 24, B = 64;
    ccr_gate_config c = tree_cfg(d_in, d, CCR_COMBINE_PATH, CCR_BITS_PROJECTION, CCR_GRAD_NONE);
    c.randomize = true;
    ccr_arena *ap, *al;
    ccr_gate *gp = make_gate(&c, B, &ap);
    c.combine = CCR_COMBINE_LEAF;
    ccr_gate *gl = make_gate(&c, B, &al);
    ck_assert_uint_eq(ccr_gate_n_matrices(gp), ((size_t)1 << 21) - 1);
    ck_assert_uint_eq(ccr_gate_n_matrices(gl), (size_t)1 << 20);
    ck_assert_uint_eq(ccr_gate_slots(gp), 21);
    /* same bit parameters in both */
    CCR_CK_OK(ctx, ccr_arena_set(al, 0, ccr_arena_value(ap, 0)));
    CCR_CK_OK(ctx, ccr_arena_set(al, 1, ccr_arena_value(ap, 1)));
    float *x = malloc(B * d_in * sizeof *x);
    ck_assert_ptr_nonnull(x);
    ccr_test_fill_uniform(rng, x, B * d_in, -1.0f, 1.0f);
    ccr_route rp, rl;
    ccr_gate_stats sp, sl;
    CCR_CK_OK(ctx, ccr_gate_forward(gp, x, B, true, NULL, &rp, &sp));
    CCR_CK_OK(ctx, ccr_gate_forward(gl, x, B, true, NULL, &rl, &sl));
    CCR_CK_OK(ctx, ccr_route_validate(ctx, &rp));
    CCR_CK_OK(ctx, ccr_route_validate(ctx, &rl));
    size_t distinct_leaves = 0;
    for (size_t b = 0; b < B; b++) {
        const int32_t *id = rp.ids + b * 21;
        ck_assert_int_eq(id[0], 0);
        for (size_t l = 1; l <= d; l++)
            ck_assert(id[l] == 2 * id[l - 1] + 1 || id[l] == 2 * id[l - 1] + 2);
        ck_assert_int_eq(id[d] - (((int32_t)1 << 20) - 1), rl.ids[b]);
        bool seen = false;
        for (size_t e = 0; e < b; e++)
            seen = seen || rl.ids[e] == rl.ids[b];
        distinct_leaves += !seen;
    }
    ck_assert_uint_eq(sl.distinct, distinct_leaves);
    ck_assert_uint_gt(sp.distinct, distinct_leaves); /* the shared top of the tree too */
    ck_assert(sp.cv_load_count == sl.cv_load_count);
    ck_assert(sp.aux_loss == 0.0);
    free(x);
    ccr_gate_free(gp);
    ccr_gate_free(gl);
    ccr_arena_free(ap);
    ccr_arena_free(al);
}
END_TEST

START_TEST(test_bad_config)
{
    ccr_gate *g = NULL;
    const size_t bad_path[] = {31, 32, 40, 62, 63, 64, 1000, SIZE_MAX};
    for (size_t i = 0; i < sizeof bad_path / sizeof bad_path[0]; i++) {
        ccr_gate_config c = tree_cfg(8, bad_path[i], CCR_COMBINE_PATH, CCR_BITS_PROJECTION,
                                     CCR_GRAD_NONE);
        CCR_CK_STATUS(ctx, ccr_gate_alloc(ctx, &ccr_gate_signtree, &c, 4, &g), CCR_EINVAL);
        ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "depth"));
        c.combine = CCR_COMBINE_LEAF;
        if (bad_path[i] > 31)
            CCR_CK_STATUS(ctx, ccr_gate_alloc(ctx, &ccr_gate_signtree, &c, 4, &g), CCR_EINVAL);
    }
    ck_assert_ptr_null(g);
    /* bit parameters above 2^34 floats */
    ccr_gate_config c = tree_cfg((size_t)1 << 32, 8, CCR_COMBINE_PATH, CCR_BITS_PROJECTION,
                                 CCR_GRAD_NONE);
    CCR_CK_STATUS(ctx, ccr_gate_alloc(ctx, &ccr_gate_signtree, &c, 4, &g), CCR_EINVAL);
    ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "depth"));
    /* bits from the input need depth <= d_in */
    c = tree_cfg(4, 5, CCR_COMBINE_PATH, CCR_BITS_INPUT, CCR_GRAD_NONE);
    CCR_CK_STATUS(ctx, ccr_gate_alloc(ctx, &ccr_gate_signtree, &c, 4, &g), CCR_EINVAL);
    ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "bits_from"));
    c.depth = 4;
    CCR_CK_OK(ctx, ccr_gate_alloc(ctx, &ccr_gate_signtree, &c, 4, &g));
    ccr_gate_free(g);
    /* enum values out of range */
    c = tree_cfg(4, 2, (ccr_combine)7, CCR_BITS_INPUT, CCR_GRAD_NONE);
    CCR_CK_STATUS(ctx, ccr_gate_alloc(ctx, &ccr_gate_signtree, &c, 4, &g), CCR_EINVAL);
    ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "combine"));
    c = tree_cfg(4, 2, CCR_COMBINE_PATH, (ccr_bits_from)7, CCR_GRAD_NONE);
    CCR_CK_STATUS(ctx, ccr_gate_alloc(ctx, &ccr_gate_signtree, &c, 4, &g), CCR_EINVAL);
    c = tree_cfg(4, 2, CCR_COMBINE_PATH, CCR_BITS_INPUT, (ccr_grad_mode)7);
    CCR_CK_STATUS(ctx, ccr_gate_alloc(ctx, &ccr_gate_signtree, &c, 4, &g), CCR_EINVAL);
    /* projection parameters must be declared (and finalized) before use */
    c = tree_cfg(4, 2, CCR_COMBINE_PATH, CCR_BITS_PROJECTION, CCR_GRAD_NONE);
    CCR_CK_OK(ctx, ccr_gate_alloc(ctx, &ccr_gate_signtree, &c, 4, &g));
    float x[4] = {0};
    ccr_route r;
    ccr_gate_stats st;
    CCR_CK_STATUS(ctx, ccr_gate_forward(g, x, 1, true, NULL, &r, &st), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_gate_init_params(g, rng), CCR_EINVAL);
    ccr_arena *a;
    CCR_CK_OK(ctx, ccr_arena_init(be, &a));
    CCR_CK_OK(ctx, ccr_gate_declare(g, a, "tree."));
    CCR_CK_STATUS(ctx, ccr_gate_forward(g, x, 1, true, NULL, &r, &st), CCR_EINVAL);
    ccr_arena_free(a);
    ccr_gate_free(g);
}
END_TEST

/* Loop index: bit 0 = combine leaf, bit 1 = bits from the input, bit 2 =
 * grad_mode none (no parameter gradient, dx untouched, the bank never asked). */
/* The batched callback (ccr_gate_bwd_args.eval_dots) on the fake bank: each
 * pair through fake_dot; counts its calls. */
static size_t fake_dots_calls;

static ccr_status fake_dots(void *bank, size_t n, const size_t *mat, const size_t *row,
                           const float *x, const float *dy, double *out)
{
    fake_bank *fb = bank;
    fake_dots_calls++;
    for (size_t i = 0; i < n; i++)
        if (mat[i] >= fb->n)
            return CCR_EINVAL;
    for (size_t i = 0; i < n; i++) {
        fb->calls++;
        out[i] = fake_dot(fb, mat[i], x + row[i] * fb->d_in, dy + row[i] * fb->d_out);
    }
    return CCR_OK;
}

/* _i: bit 0 leaf, bit 1 bits from the input, bit 2 grad_mode none, bit 3
 * the siblings through eval_dots (eval_matrix and scratch NULL). */
START_TEST(test_grad)
{
    enum { d = 3, d_in = 5, d_out = 4, B = 7 };
    float scratch[d_out];
    bool dots = (_i & 8) != 0;
    fake_dots_calls = 0;
    ccr_combine comb = (_i & 1) ? CCR_COMBINE_LEAF : CCR_COMBINE_PATH;
    ccr_bits_from bf = (_i & 2) ? CCR_BITS_INPUT : CCR_BITS_PROJECTION;
    ccr_gate_config c = tree_cfg(d_in, d, comb, bf, (_i & 4) ? CCR_GRAD_NONE : CCR_GRAD_STE);
    c.randomize = true;
    ccr_arena *a;
    ccr_gate *g = make_gate(&c, B, &a);
    size_t n = ccr_gate_n_matrices(g), slots = ccr_gate_slots(g);
    fake_bank fb;
    fake_bank_init(&fb, n, d_in, d_out, rng);
    float x[B * d_in], dy[B * d_out], dx[B * d_in], dx0[B * d_in];
    ccr_test_fill_uniform(rng, x, B * d_in, -1.0f, 1.0f);
    ccr_test_fill_uniform(rng, dy, B * d_out, -1.0f, 1.0f);
    ccr_test_fill_uniform(rng, dx0, B * d_in, -1.0f, 1.0f);
    memcpy(dx, dx0, sizeof dx);
    ccr_route r;
    ccr_gate_stats st;
    CCR_CK_OK(ctx, ccr_gate_forward(g, x, B, true, NULL, &r, &st));
    const float *w = a ? param(a, "tree.w_bits", false) : NULL;
    const float *cb = a ? param(a, "tree.c_bits", false) : NULL;
    /* the bits, checked against a computed here */
    size_t shape[4];
    const float *bits = get_export(g, 3, "bits", 2, shape);
    const float *av = get_export(g, 4, "a", 2, shape);
    for (size_t b = 0; b < B; b++) {
        for (size_t j = 0; j < d; j++) {
            double want = x[b * d_in + j];
            if (w != NULL) {
                want = cb[j];
                for (size_t i = 0; i < d_in; i++)
                    want += (double)x[b * d_in + i] * w[i * d + j];
            }
            ck_assert(fabs(av[b * d + j] - want) <= 1e-5);
            ck_assert(bits[b * d + j] == (av[b * d + j] > 0.0f ? 1.0f : 0.0f));
        }
    }
    /* dweights as the layer computes them: dy . M_id(x) */
    float dwt[B * (d + 1)];
    for (size_t b = 0; b < B; b++)
        for (size_t s = 0; s < slots; s++)
            dwt[b * slots + s] = (float)fake_dot(&fb, (size_t)r.ids[b * slots + s],
                                                 x + b * d_in, dy + b * d_out);
    /* expected da_l = dy . (M_right(x) - M_left(x)) */
    float da[B * d];
    size_t leaves = (size_t)1 << d;
    for (size_t b = 0; b < B; b++) {
        size_t node = 0, leaf = 0;
        for (size_t l = 1; l <= d; l++)
            leaf = 2 * leaf + (bits[b * d + l - 1] != 0.0f);
        for (size_t l = 1; l <= d; l++) {
            size_t left, right;
            if (comb == CCR_COMBINE_PATH) {
                left = 2 * node + 1;
                right = 2 * node + 2;
                node = bits[b * d + l - 1] != 0.0f ? right : left;
            } else {
                size_t mask = leaves >> l;
                left = leaf & ~mask;
                right = leaf | mask;
            }
            const float *xb = x + b * d_in, *dyb = dy + b * d_out;
            da[b * d + l - 1] = (float)(fake_dot(&fb, right, xb, dyb) -
                                        fake_dot(&fb, left, xb, dyb));
        }
    }
    ccr_gate_bwd_args ba = {.x = x, .batch = B, .dweights = dwt, .dx = dx, .dy = dy,
                            .d_out = d_out, .eval_matrix = dots ? NULL : fake_eval,
                            .bank = &fb, .scratch = dots ? NULL : scratch,
                            .eval_dots = dots ? fake_dots : NULL};
    CCR_CK_OK(ctx, ccr_gate_backward(g, &ba));
    if (c.grad_mode == CCR_GRAD_NONE) {
        for (size_t i = 0; i < B * d_in; i++)
            ck_assert(dx[i] == dx0[i]);
        ck_assert_uint_eq(fb.calls, 0);
        for (size_t i = 0; a != NULL && i < ccr_arena_block_len(a); i++)
            ck_assert(ccr_arena_grads(a)[i] == 0.0f);
        ba.eval_matrix = NULL; /* not needed */
        CCR_CK_OK(ctx, ccr_gate_backward(g, &ba));
        goto cleanup;
    }
    ck_assert_uint_eq(fb.calls, B * d); /* only the siblings are evaluated */
    ck_assert_uint_eq(fake_dots_calls, dots ? 1 : 0); /* all of them in one call */
    float want_dx[B * d_in];
    for (size_t b = 0; b < B; b++) {
        for (size_t i = 0; i < d_in; i++) {
            double v = dx0[b * d_in + i];
            for (size_t j = 0; j < d; j++)
                v += w ? (double)da[b * d + j] * w[i * d + j] : (i == j ? da[b * d + j] : 0.0);
            want_dx[b * d_in + i] = (float)v;
        }
    }
    ccr_test_assert_nmse(dx, want_dx, B * d_in, 1e-10, "dx");
    if (a != NULL) {
        float want_dw[d_in * d], want_dc[d];
        for (size_t j = 0; j < d; j++) {
            double sc = 0.0;
            for (size_t b = 0; b < B; b++)
                sc += da[b * d + j];
            want_dc[j] = (float)sc;
            for (size_t i = 0; i < d_in; i++) {
                double sw = 0.0;
                for (size_t b = 0; b < B; b++)
                    sw += (double)x[b * d_in + i] * da[b * d + j];
                want_dw[i * d + j] = (float)sw;
            }
        }
        ccr_test_assert_nmse(param(a, "tree.w_bits", true), want_dw, d_in * d, 1e-10, "dW_bits");
        ccr_test_assert_nmse(param(a, "tree.c_bits", true), want_dc, d, 1e-10, "dc_bits");
        /* gradients accumulate; without dx only the parameters move */
        CCR_CK_OK(ctx, ccr_gate_backward(g, &(ccr_gate_bwd_args){
                                              .x = x, .batch = B, .dweights = dwt, .dy = dy,
                                              .d_out = d_out, .eval_matrix = fake_eval,
                                              .bank = &fb, .scratch = scratch}));
        for (size_t j = 0; j < d; j++)
            want_dc[j] *= 2.0f;
        ccr_test_assert_nmse(param(a, "tree.c_bits", true), want_dc, d, 1e-10, "2 dc_bits");
    }
    /* ste needs the bank: no callback is an error, and a failing callback's
     * status comes back with the outputs untouched */
    memcpy(dx, dx0, sizeof dx);
    ba.eval_matrix = NULL;
    ba.eval_dots = NULL;
    CCR_CK_STATUS(ctx, ccr_gate_backward(g, &ba), CCR_EINVAL);
    ba.eval_matrix = dots ? NULL : fake_eval;
    ba.eval_dots = dots ? fake_dots : NULL;
    fb.n = 0;
    CCR_CK_STATUS(ctx, ccr_gate_backward(g, &ba), CCR_EINVAL);
    ck_assert(memcmp(dx, dx0, sizeof dx) == 0);
    fb.n = n;
cleanup:
    fake_bank_free(&fb);
    ccr_gate_free(g);
    ccr_arena_free(a);
}
END_TEST

/* Leaves 0, 0, 3, 1 of d = 2: counts (2, 1, 0, 1), mean 1, variance 0.5. */
START_TEST(test_diagnostics)
{
    const float x[4 * 2] = {-1, -1, 0, -2, 1, 1, -3, 2};
    for (int comb = 0; comb < 2; comb++) {
        ccr_gate_config c = tree_cfg(2, 2, (ccr_combine)comb, CCR_BITS_INPUT, CCR_GRAD_NONE);
        ccr_arena *a;
        ccr_gate *g = make_gate(&c, 4, &a);
        ccr_route r;
        ccr_gate_stats st;
        CCR_CK_OK(ctx, ccr_gate_forward(g, x, 4, true, NULL, &r, &st));
        double cv = sqrt(0.5 / (1.0 + 1e-10));
        ck_assert(fabs(st.cv_load_count - cv) <= 1e-12);
        ck_assert(st.cv_importance == st.cv_load_count && st.cv_load == st.cv_load_count);
        ck_assert(fabs(st.max_mean_count - 2.0) <= 1e-12);
        ck_assert(st.max_mean_load == st.max_mean_count);
        ck_assert(st.aux_loss == 0.0 && st.loss_importance == 0.0 && st.loss_load == 0.0 &&
                  st.loss_switch == 0.0 && st.loss_z == 0.0);
        ck_assert_uint_eq(st.dropped, 0);
        /* path: nodes {0,1,3} {0,1,3} {0,2,6} {0,1,4} -> 6 distinct; leaf: 3 */
        ck_assert_uint_eq(st.distinct, comb == CCR_COMBINE_PATH ? 6 : 3);
        const float want[4] = {2, 1, 0, 1};
        const char *const names[3] = {"importance", "load", "leaf_counts"};
        for (size_t i = 0; i < 3; i++) {
            size_t shape[4];
            const float *data = get_export(g, i, names[i], 1, shape);
            ck_assert_uint_eq(shape[0], 4);
            ck_assert(memcmp(data, want, sizeof want) == 0);
        }
        /* a second, smaller batch: counts are of that batch only */
        CCR_CK_OK(ctx, ccr_gate_forward(g, x + 4, 1, true, NULL, &r, &st));
        ck_assert_uint_eq(st.distinct, comb == CCR_COMBINE_PATH ? 3 : 1);
        ck_assert(fabs(st.max_mean_count - 4.0) <= 1e-12);
        ccr_gate_free(g);
    }
}
END_TEST

/* Two gates from the same seed give bitwise identical routes, stats and gradients. */
static void run_once(unsigned long seed, int32_t *ids, ccr_gate_stats *st, float *grads,
                     float *dx)
{
    enum { d = 4, d_in = 6, B = 16, d_out = 3 };
    float scratch[d_out];
    gsl_rng_set(rng, seed);
    ccr_gate_config c = tree_cfg(d_in, d, CCR_COMBINE_PATH, CCR_BITS_PROJECTION, CCR_GRAD_STE);
    c.randomize = true;
    ccr_arena *a;
    ccr_gate *g = make_gate(&c, B, &a);
    fake_bank fb;
    fake_bank_init(&fb, ccr_gate_n_matrices(g), d_in, d_out, rng);
    float x[B * d_in], dy[B * d_out], dw[B * 5];
    ccr_test_fill_uniform(rng, x, B * d_in, -1.0f, 1.0f);
    ccr_test_fill_uniform(rng, dy, B * d_out, -1.0f, 1.0f);
    ccr_test_fill_uniform(rng, dw, B * 5, -1.0f, 1.0f);
    ccr_route r;
    CCR_CK_OK(ctx, ccr_gate_forward(g, x, B, true, NULL, &r, st));
    memcpy(ids, r.ids, B * 5 * sizeof *ids);
    memset(dx, 0, B * d_in * sizeof *dx);
    ccr_gate_bwd_args ba = {.x = x, .batch = B, .dweights = dw, .dx = dx, .dy = dy,
                            .d_out = d_out, .eval_matrix = fake_eval, .bank = &fb,
                            .scratch = scratch};
    CCR_CK_OK(ctx, ccr_gate_backward(g, &ba));
    ck_assert_uint_le(ccr_arena_block_len(a), 256);
    memcpy(grads, ccr_arena_grads(a), ccr_arena_block_len(a) * sizeof *grads);
    fake_bank_free(&fb);
    ccr_gate_free(g);
    ccr_arena_free(a);
}

START_TEST(test_determinism)
{
    int32_t ids1[80], ids2[80];
    ccr_gate_stats s1, s2;
    float g1[256] = {0}, g2[256] = {0}, dx1[96], dx2[96];
    run_once(5, ids1, &s1, g1, dx1);
    run_once(5, ids2, &s2, g2, dx2);
    ck_assert(memcmp(ids1, ids2, sizeof ids1) == 0);
    ck_assert(memcmp(&s1, &s2, sizeof s1) == 0);
    ck_assert(memcmp(g1, g2, sizeof g1) == 0);
    ck_assert(memcmp(dx1, dx2, sizeof dx1) == 0);
    run_once(6, ids2, &s2, g2, dx2);
    ck_assert(memcmp(g1, g2, sizeof g1) != 0);
}
END_TEST

static Suite *signtree_suite(void)
{
    Suite *s = suite_create("gate_signtree");
    TCase *tc = tcase_create("signtree");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_type);
    tcase_add_loop_test(tc, test_known_input, 0, 2);
    tcase_add_test(tc, test_known_projection);
    tcase_add_test(tc, test_layout);
    tcase_add_test(tc, test_depth0);
    tcase_add_test(tc, test_depth20);
    tcase_add_test(tc, test_bad_config);
    tcase_add_loop_test(tc, test_grad, 0, 16);
    tcase_add_test(tc, test_diagnostics);
    tcase_add_test(tc, test_determinism);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return ccr_test_run(signtree_suite()); }
