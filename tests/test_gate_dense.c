/*
 * test_gate_dense.c - the none and dense gates (docs/GATES.md).
 *
 * Known answers computed here in double: none routes every example to its
 * one matrix with weight 1; dense weights are the softmax of x W_g and the
 * z-loss is z mean_b lse_b^2 (ST-MoE eq. 5) and the importance loss
 * w_importance CV(sum_b p)^2 (Shazeer eqs. 6-7).  Gradients of L = sum r w +
 * aux_loss are checked by central differences against every gate parameter
 * and every input.  Bad configurations fail with CCR_EINVAL naming the
 * option and leave the output untouched.  The switch gate is in
 * test_gate_switch.c; the shared fixture is gate_ref.c.
 */
#include <math.h>
#include <string.h>

#include "gate_ref.h"

static void setup(void) { gate_fixture_open(2017); }

static void teardown(void) { gate_fixture_close(); }

/* ---- registry and none ---------------------------------------------------- */

START_TEST(test_registry)
{
    ck_assert_ptr_eq(ccr_gate_type_find("none"), &ccr_gate_none);
    ck_assert_ptr_eq(ccr_gate_type_find("dense"), &ccr_gate_dense);
    const ccr_gate_type *t[2] = {&ccr_gate_none, &ccr_gate_dense};
    for (int i = 0; i < 2; i++) {
        ck_assert_str_eq(t[i]->param_group, "gate.");
        ck_assert_uint_gt(strlen(t[i]->paper), 0);
        ck_assert_uint_gt(t[i]->state_size, 0);
    }
}
END_TEST

START_TEST(test_none_route)
{
    ccr_gate_config c = base_cfg(3, 1);
    c.z_loss = 0.5; /* ignored */
    tgate t;
    tgate_make(&t, &ccr_gate_none, &c, 8, 1);
    ck_assert_uint_eq(ccr_arena_count(t.a), 0);
    ck_assert_uint_eq(t.n, 1);
    ck_assert_uint_eq(t.slots, 1);
    float x[5 * 3], dx[5 * 3];
    ccr_test_fill_uniform(rng, x, 15, -1, 1);
    ccr_route r;
    ccr_gate_stats st;
    fwd(&t, x, 5, &r, &st);
    for (size_t b = 0; b < 5; b++) {
        ck_assert_int_eq(r.ids[b], 0);
        ck_assert(r.weights[b] == 1.0f);
    }
    ck_assert(st.aux_loss == 0.0 && st.loss_z == 0.0);
    ck_assert_uint_eq(st.distinct, 1);
    ck_assert_uint_eq(st.dropped, 0);
    ck_assert(st.cv_importance == 0.0 && st.cv_load_count == 0.0);
    ck_assert(export_of(&t, "importance", 1)[0] == 5.0f);
    ck_assert(export_of(&t, "load", 1)[0] == 5.0f);
    ck_assert(ccr_gate_flops(t.g, true) == 0.0);
    ck_assert(ccr_gate_matrices_per_example(t.g) == 1.0);
    /* Backward leaves dx untouched. */
    float dwt[5] = {1, 2, 3, 4, 5};
    for (size_t i = 0; i < 15; i++)
        dx[i] = 7.0f;
    ccr_gate_bwd_args ba = {.x = x, .batch = 5, .dweights = dwt, .dx = dx};
    CCR_CK_OK(ctx, ccr_gate_backward(t.g, &ba));
    for (size_t i = 0; i < 15; i++)
        ck_assert(dx[i] == 7.0f);
    tgate_free(&t);
}
END_TEST

/* ---- dense ---------------------------------------------------------------- */

START_TEST(test_dense_softmax)
{
    ccr_gate_config c = base_cfg(3, 4);
    c.randomize = true;
    c.z_loss = 0.01;
    tgate t;
    tgate_make(&t, &ccr_gate_dense, &c, 8, 3);
    ck_assert_uint_eq(t.slots, 4);
    float x[5 * 3];
    ccr_test_fill_uniform(rng, x, 15, -2, 2);
    ccr_route r;
    ccr_gate_stats st;
    fwd(&t, x, 5, &r, &st);
    double imp[4] = {0}, zsum = 0.0;
    for (size_t b = 0; b < 5; b++) {
        double p[4], lse, sum = 0.0;
        ref_softmax_row(&t, x, b, p, &lse);
        zsum += lse * lse;
        for (size_t s = 0; s < 4; s++) {
            ck_assert_int_eq(r.ids[b * 4 + s], (int)s);
            ck_assert_double_eq_tol(r.weights[b * 4 + s], p[s], 1e-6);
            sum += r.weights[b * 4 + s];
            imp[s] += p[s];
        }
        ck_assert_double_eq_tol(sum, 1.0, 1e-6);
    }
    ck_assert_double_eq_tol(st.loss_z, 0.01 * zsum / 5, 1e-7);
    /* Shazeer's importance loss (eqs. 6-7) applies to dense too. */
    ck_assert(c.w_importance == 0.1);
    ck_assert_double_eq_tol(st.loss_importance, 0.1 * ref_cv2(imp, 4), 1e-7);
    ck_assert(st.loss_importance > 0.0);
    ck_assert_double_eq_tol(st.aux_loss, st.loss_importance + st.loss_z, 1e-12);
    const float *ie = export_of(&t, "importance", 4), *le = export_of(&t, "load", 4);
    for (size_t s = 0; s < 4; s++) {
        ck_assert_double_eq_tol(ie[s], imp[s], 1e-5);
        ck_assert(le[s] == 5.0f);
    }
    ck_assert_uint_eq(st.distinct, 4);
    ck_assert(st.cv_load == 0.0 && st.cv_load_count == 0.0);
    ck_assert_double_eq_tol(st.max_mean_count, 1.0, 1e-12);
    ck_assert(ccr_gate_flops(t.g, true) == 2.0 * 3 * 4);
    ck_assert(ccr_gate_matrices_per_example(t.g) == 4.0);
    tgate_free(&t);
}
END_TEST

START_TEST(test_dense_zero_init_uniform)
{
    /* Zero-initialised W_g: p = 1/E, lse = log E. */
    ccr_gate_config c = base_cfg(2, 5);
    c.z_loss = 0.1;
    tgate t;
    tgate_make(&t, &ccr_gate_dense, &c, 3, 1);
    float x[3 * 2] = {1, -2, 0.5f, 3, -1, 0};
    ccr_route r;
    ccr_gate_stats st;
    fwd(&t, x, 3, &r, &st);
    for (size_t i = 0; i < 15; i++)
        ck_assert_double_eq_tol(r.weights[i], 0.2, 1e-7);
    ck_assert_double_eq_tol(st.loss_z, 0.1 * log(5.0) * log(5.0), 1e-7);
    ck_assert_double_eq_tol(st.cv_importance, 0.0, 1e-6);
    tgate_free(&t);
}
END_TEST

START_TEST(test_forward_before_declare)
{
    ccr_gate_config c = base_cfg(2, 2);
    ccr_gate *g;
    CCR_CK_OK(ctx, ccr_gate_alloc(ctx, &ccr_gate_dense, &c, 4, &g));
    float x[2] = {1, 2};
    ccr_route r = {0};
    ccr_gate_stats st;
    CCR_CK_STATUS(ctx, ccr_gate_forward(g, x, 1, false, NULL, &r, &st), CCR_EINVAL);
    ck_assert_ptr_null(r.ids);
    ccr_gate_free(g);
}
END_TEST

/* ---- finite-difference gradients ------------------------------------------ */

START_TEST(test_dense_grad) { check_grad(&ccr_gate_dense, 4, 1.0, false); }
END_TEST

START_TEST(test_dense_grad_aux_only) { check_grad(&ccr_gate_dense, 3, 1.0, true); }
END_TEST

/* ---- configuration errors ------------------------------------------------- */

START_TEST(test_config_errors)
{
    ccr_gate_config c = base_cfg(3, 4);
    c.z_loss = -1.0;
    expect_einval(&ccr_gate_dense, &c, "z_loss");
    c.z_loss = 0.0;
    c.w_importance = -0.5;
    expect_einval(&ccr_gate_dense, &c, "w_importance");
    c.w_importance = NAN;
    expect_einval(&ccr_gate_dense, &c, "w_importance");
    c.w_importance = 0.1;
    c.z_loss = NAN;
    expect_einval(&ccr_gate_dense, &c, "z_loss");
    c = base_cfg(3, 0);
    expect_einval(&ccr_gate_dense, &c, "n_experts");
    /* none reads no option: any n_experts (and the rest) is accepted and
     * it routes to its one matrix, so gates swap by name alone. */
    const size_t any_e[3] = {0, 2, 8};
    for (int i = 0; i < 3; i++) {
        c = base_cfg(3, any_e[i]);
        c.k = 0;
        c.capacity_factor = -1.0;
        ccr_gate *g = NULL;
        CCR_CK_OK(ctx, ccr_gate_alloc(ctx, &ccr_gate_none, &c, 2, &g));
        ck_assert_uint_eq(ccr_gate_n_matrices(g), 1);
        ck_assert_uint_eq(ccr_gate_slots(g), 1);
        ccr_gate_free(g);
    }
    /* Good configurations at the edges are accepted. */
    c = base_cfg(3, 1);
    c.capacity_factor = 1e-300;
    c.aux_alpha = 0.0;
    const ccr_gate_type *types[2] = {&ccr_gate_none, &ccr_gate_dense};
    for (int i = 0; i < 2; i++) {
        ccr_gate *g = NULL;
        CCR_CK_OK(ctx, ccr_gate_alloc(ctx, types[i], &c, 1, &g));
        ck_assert_ptr_nonnull(g);
        ccr_gate_free(g);
    }
}
END_TEST

/* ---- determinism ------------------------------------------------------------ */

START_TEST(test_determinism)
{
    tgate_assert_deterministic(&ccr_gate_dense, 4);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("gate_dense");
    TCase *tc = tcase_create("known");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_registry);
    tcase_add_test(tc, test_none_route);
    tcase_add_test(tc, test_dense_softmax);
    tcase_add_test(tc, test_dense_zero_init_uniform);
    tcase_add_test(tc, test_forward_before_declare);
    suite_add_tcase(s, tc);
    TCase *tg = tcase_create("grad");
    tcase_add_checked_fixture(tg, setup, teardown);
    tcase_set_timeout(tg, 120);
    tcase_add_test(tg, test_dense_grad);
    tcase_add_test(tg, test_dense_grad_aux_only);
    suite_add_tcase(s, tg);
    TCase *te = tcase_create("errors");
    tcase_add_checked_fixture(te, setup, teardown);
    tcase_add_test(te, test_config_errors);
    tcase_add_test(te, test_determinism);
    suite_add_tcase(s, te);
    return s;
}

int main(void) { return ccr_test_run(suite()); }
