/*
 * test_gate_switch.c - the switch gate (docs/GATES.md).
 *
 * Known answers computed here in double: switch takes the argmax of the
 * unrenormalised softmax of x W_g (ties to the lower index), drops in batch
 * order beyond C = ceil(cf B / E) clamped to [1, B], and its aux loss
 * alpha E sum f_i P_i counts f before the drops (Fedus et al. eqs. 4-6;
 * PAPERS.md §7); the z-loss is z mean_b lse_b^2 (ST-MoE eq. 5).  Gradients
 * of L = sum r w + aux_loss are checked by central differences against
 * every gate parameter and every input, with dropped examples in the batch.
 * Bad configurations fail with CCR_EINVAL naming the option and leave the
 * output untouched.  The none and dense gates are in test_gate_dense.c; the
 * shared fixture is gate_ref.c.
 */
#include <math.h>
#include <string.h>

#include "gate_ref.h"

static void setup(void) { gate_fixture_open(2017); }

static void teardown(void) { gate_fixture_close(); }

/* W_g = identity [E, E], so that the logits are x itself. */
static void set_identity(tgate *t)
{
    ck_assert_uint_eq(t->d_in, t->n);
    for (size_t i = 0; i < t->n * t->n; i++)
        t->w[i] = (i % (t->n + 1) == 0) ? 1.0f : 0.0f;
}

/* ---- registry ------------------------------------------------------------- */

START_TEST(test_registry)
{
    ck_assert_ptr_eq(ccr_gate_type_find("switch"), &ccr_gate_switch);
    ck_assert_str_eq(ccr_gate_switch.param_group, "gate.");
    ck_assert_uint_gt(strlen(ccr_gate_switch.paper), 0);
    ck_assert_uint_gt(ccr_gate_switch.state_size, 0);
}
END_TEST

START_TEST(test_forward_before_declare)
{
    ccr_gate_config c = base_cfg(2, 2);
    ccr_gate *g;
    CCR_CK_OK(ctx, ccr_gate_alloc(ctx, &ccr_gate_switch, &c, 4, &g));
    float x[2] = {1, 2};
    ccr_route r = {0};
    ccr_gate_stats st;
    CCR_CK_STATUS(ctx, ccr_gate_forward(g, x, 1, false, NULL, &r, &st), CCR_EINVAL);
    ck_assert_ptr_null(r.ids);
    ccr_gate_free(g);
}
END_TEST

/* ---- switch known answers -------------------------------------------------- */

START_TEST(test_switch_argmax_ties)
{
    ccr_gate_config c = base_cfg(4, 4);
    c.capacity_factor = 4.0;
    tgate t;
    tgate_make(&t, &ccr_gate_switch, &c, 4, 1);
    set_identity(&t);
    float x[4 * 4] = {
        1, 3, 3, 0,      /* tie between 1 and 2 -> 1 */
        2, 2, 2, 2,      /* all tied -> 0 */
        -1, -2, -3, 0.5f, /* -> 3 */
        0, 0, 1, 1,      /* -> 2 */
    };
    const int want[4] = {1, 0, 3, 2};
    ccr_route r;
    ccr_gate_stats st;
    fwd(&t, x, 4, &r, &st);
    ck_assert_uint_eq(st.dropped, 0);
    for (size_t b = 0; b < 4; b++) {
        double p[4], lse;
        ref_softmax_row(&t, x, b, p, &lse);
        ck_assert_int_eq(r.ids[b], want[b]);
        /* Not renormalised: the full-softmax probability. */
        ck_assert_double_eq_tol(r.weights[b], p[want[b]], 1e-7);
    }
    ck_assert_double_eq_tol(r.weights[1], 0.25, 1e-7);
    ck_assert_uint_eq(st.distinct, 4);
    ck_assert(ccr_gate_flops(t.g, false) == 2.0 * 4 * 4);
    ck_assert(ccr_gate_matrices_per_example(t.g) == 1.0);
    tgate_free(&t);
}
END_TEST

/* Batch of B examples over E = 2 with identity W: example b prefers
 * pref[b] with logits (+1, -1) or (-1, +1) scaled by s_b. */
static void prefs_to_x(const int *pref, size_t batch, float *x)
{
    for (size_t b = 0; b < batch; b++) {
        float s = 1.0f + 0.1f * (float)b;
        x[2 * b] = pref[b] == 0 ? s : -s;
        x[2 * b + 1] = -x[2 * b];
    }
}

START_TEST(test_switch_drops_and_aux)
{
    ccr_gate_config c = base_cfg(2, 2);
    c.capacity_factor = 1.0; /* C = ceil(1 * 10 / 2) = 5 */
    c.aux_alpha = 0.3;
    c.z_loss = 0.02;
    tgate t;
    tgate_make(&t, &ccr_gate_switch, &c, 16, 1);
    set_identity(&t);
    const int pref[10] = {0, 0, 1, 0, 0, 0, 1, 0, 0, 1}; /* 7 prefer expert 0 */
    float x[20];
    prefs_to_x(pref, 10, x);
    ccr_route r;
    ccr_gate_stats st;
    fwd(&t, x, 10, &r, &st);
    ck_assert_uint_eq(st.dropped, 2);
    double fP = 0.0, P[2] = {0, 0}, zsum = 0.0;
    for (size_t b = 0; b < 10; b++) {
        double p[2], lse;
        ref_softmax_row(&t, x, b, p, &lse);
        P[0] += p[0] / 10;
        P[1] += p[1] / 10;
        zsum += lse * lse;
        /* The 6th and 7th examples preferring 0 (batch positions 7 and 8). */
        if (b == 7 || b == 8) {
            ck_assert_int_eq(r.ids[b], -1);
            ck_assert(r.weights[b] == 0.0f);
        } else {
            ck_assert_int_eq(r.ids[b], pref[b]);
            ck_assert_double_eq_tol(r.weights[b], p[pref[b]], 1e-7);
        }
    }
    /* f counted before the drops: 0.7 and 0.3 (after them it would be 0.5). */
    fP = 0.7 * P[0] + 0.3 * P[1];
    ck_assert_double_eq_tol(st.loss_switch, 0.3 * 2 * fP, 1e-7);
    ck_assert_double_eq_tol(st.loss_z, 0.02 * zsum / 10, 1e-7);
    ck_assert_double_eq_tol(st.aux_loss, st.loss_switch + st.loss_z, 1e-12);
    const float *load = export_of(&t, "load", 2), *ch = export_of(&t, "choice", 2);
    ck_assert(load[0] == 5.0f && load[1] == 3.0f);
    ck_assert(ch[0] == 7.0f && ch[1] == 3.0f);
    /* Counts 5, 3: CV = 1/4, max/mean = 5/4. */
    ck_assert_double_eq_tol(st.cv_load_count, 0.25, 1e-9);
    ck_assert_double_eq_tol(st.cv_load, 0.25, 1e-9);
    ck_assert_double_eq_tol(st.max_mean_count, 1.25, 1e-9);
    ck_assert_uint_eq(st.distinct, 2);
    const float *imp = export_of(&t, "importance", 2);
    ck_assert_double_eq_tol(imp[0], 10 * P[0], 1e-5);

    /* A smaller batch through the same gate recomputes C = ceil(4/2) = 2. */
    fwd(&t, x, 4, &r, &st); /* prefs 0 0 1 0 */
    ck_assert_uint_eq(st.dropped, 1);
    ck_assert_int_eq(r.ids[3], -1);
    tgate_free(&t);
}
END_TEST

START_TEST(test_switch_capacity_clamp)
{
    const int all0[10] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    const int mixed[10] = {1, 0, 0, 1, 0, 0, 0, 0, 0, 0};
    float x[20];
    /* Huge factors (C would exceed B, or cf B overflows to inf) clamp to B:
     * nothing drops, and allocation does not depend on the factor. */
    const double huge[3] = {5.0, 1e300, 1.7e308};
    for (int k = 0; k < 3; k++) {
        ccr_gate_config c = base_cfg(2, 2);
        c.capacity_factor = huge[k];
        tgate t;
        tgate_make(&t, &ccr_gate_switch, &c, 10, 1);
        set_identity(&t);
        prefs_to_x(all0, 10, x);
        ccr_route r;
        ccr_gate_stats st;
        fwd(&t, x, 10, &r, &st);
        ck_assert_uint_eq(st.dropped, 0);
        for (size_t b = 0; b < 10; b++)
            ck_assert_int_eq(r.ids[b], 0);
        fwd(&t, x, 1, &r, &st);
        ck_assert_uint_eq(st.dropped, 0);
        tgate_free(&t);
    }
    /* A tiny factor clamps up to C = 1: the first example of each expert. */
    ccr_gate_config c = base_cfg(2, 2);
    c.capacity_factor = 1e-9;
    tgate t;
    tgate_make(&t, &ccr_gate_switch, &c, 10, 1);
    set_identity(&t);
    prefs_to_x(mixed, 10, x);
    ccr_route r;
    ccr_gate_stats st;
    fwd(&t, x, 10, &r, &st);
    ck_assert_uint_eq(st.dropped, 8);
    ck_assert_int_eq(r.ids[0], 1);
    ck_assert_int_eq(r.ids[1], 0);
    for (size_t b = 2; b < 10; b++)
        ck_assert_int_eq(r.ids[b], -1);
    const float *load = export_of(&t, "load", 2);
    ck_assert(load[0] == 1.0f && load[1] == 1.0f);
    tgate_free(&t);
}
END_TEST

START_TEST(test_switch_capacity_exact)
{
    /* Products that are integers in decimal give that integer, although the
     * double product lies just above it (ceil of 11.000000000000002 is 12). */
    ck_assert_uint_eq(ccr_switch_capacity(1.1, 100, 10), 11);
    ck_assert_uint_eq(ccr_switch_capacity(2.2, 45, 9), 11);
    ck_assert_uint_eq(ccr_switch_capacity(1.1, 90, 3), 33);
    ck_assert_uint_eq(ccr_switch_capacity(2.3, 100, 10), 23);  /* 22.999999999999996 */
    /* Non-integer products round up. */
    ck_assert_uint_eq(ccr_switch_capacity(0.7, 10, 3), 3);      /* 2.33 */
    ck_assert_uint_eq(ccr_switch_capacity(1.25, 10, 4), 4);     /* 3.125 */
    ck_assert_uint_eq(ccr_switch_capacity(1.1, 7, 3), 3);       /* 2.57 */
    ck_assert_uint_eq(ccr_switch_capacity(1.0000001, 100, 10), 11);
    ck_assert_uint_eq(ccr_switch_capacity(0.9999999, 100, 10), 10);
    ck_assert_uint_eq(ccr_switch_capacity(1.25, 128, 8), 20);
    /* Clamps, no limit, neutral values. */
    ck_assert_uint_eq(ccr_switch_capacity(1e-9, 10, 2), 1);
    ck_assert_uint_eq(ccr_switch_capacity(5.0, 10, 2), 10);
    ck_assert_uint_eq(ccr_switch_capacity(1.7e308, 10, 2), 10);
    ck_assert_uint_eq(ccr_switch_capacity(0.0, 12, 4), 12);
    ck_assert_uint_eq(ccr_switch_capacity(-1.0, 12, 4), 0);
    ck_assert_uint_eq(ccr_switch_capacity(NAN, 12, 4), 0);
    ck_assert_uint_eq(ccr_switch_capacity(1.0, 0, 4), 0);
    ck_assert_uint_eq(ccr_switch_capacity(1.0, 12, 0), 0);
    /* The gate uses it: B = 100, E = 2, cf = 1.1 gives C = 55; 60 examples
     * prefer expert 0, so 5 drop (ceil of the double product kept 56). */
    ccr_gate_config c = base_cfg(2, 2);
    c.capacity_factor = 1.1;
    tgate t;
    tgate_make(&t, &ccr_gate_switch, &c, 100, 1);
    set_identity(&t);
    int pref[100];
    for (size_t b = 0; b < 100; b++)
        pref[b] = b < 60 ? 0 : 1;
    float x[200];
    prefs_to_x(pref, 100, x);
    ccr_route r;
    ccr_gate_stats st;
    fwd(&t, x, 100, &r, &st);
    ck_assert_uint_eq(st.dropped, 5);
    ck_assert(export_of(&t, "load", 2)[0] == 55.0f);
    tgate_free(&t);
}
END_TEST

START_TEST(test_switch_eval_capacity)
{
    /* Training capacity C = ceil(0.5 * 10 / 2) = 3; evaluation drops
     * nothing by default (eval_capacity_factor 0), and uses its own factor
     * when one is given. */
    const int pref[10] = {0, 0, 1, 0, 0, 0, 1, 0, 0, 1};
    float x[20];
    prefs_to_x(pref, 10, x);
    const double eval_cf[3] = {0.0, 0.5, 0.8};
    const size_t want_eval[3] = {0, 7 - 3, 7 - 4}; /* caps 10, 3, 4; 7 prefer expert 0 */
    for (int i = 0; i < 3; i++) {
        ccr_gate_config c = base_cfg(2, 2);
        c.capacity_factor = 0.5;
        c.eval_capacity_factor = eval_cf[i];
        tgate t;
        tgate_make(&t, &ccr_gate_switch, &c, 10, 1);
        set_identity(&t);
        ccr_route r;
        ccr_gate_stats st;
        fwd(&t, x, 10, &r, &st); /* train */
        ck_assert_uint_eq(st.dropped, 4);
        CCR_CK_OK(ctx, ccr_gate_forward(t.g, x, 10, false, NULL, &r, &st));
        ck_assert_uint_eq(st.dropped, want_eval[i]);
        if (eval_cf[i] == 0.0)
            for (size_t b = 0; b < 10; b++)
                ck_assert_int_eq(r.ids[b], pref[b]);
        tgate_free(&t);
    }
}
END_TEST

START_TEST(test_switch_uniform_aux_is_alpha)
{
    /* Row b has logit 2 at expert b % 4, 0 elsewhere: by symmetry f_i = P_i = 1/4. */
    ccr_gate_config c = base_cfg(4, 4);
    c.aux_alpha = 0.01;
    c.capacity_factor = 1.0;
    tgate t;
    tgate_make(&t, &ccr_gate_switch, &c, 8, 1);
    set_identity(&t);
    float x[8 * 4] = {0};
    for (size_t b = 0; b < 8; b++)
        x[b * 4 + b % 4] = 2.0f;
    ccr_route r;
    ccr_gate_stats st;
    fwd(&t, x, 8, &r, &st);
    ck_assert_uint_eq(st.dropped, 0);
    ck_assert_double_eq_tol(st.loss_switch, 0.01, 1e-8);
    ck_assert_double_eq_tol(st.aux_loss, 0.01, 1e-8);
    ck_assert_double_eq_tol(st.cv_importance, 0.0, 1e-6);
    ck_assert_double_eq_tol(st.cv_load_count, 0.0, 1e-12);
    ck_assert_double_eq_tol(st.max_mean_count, 1.0, 1e-12);
    tgate_free(&t);
}
END_TEST

/* ---- finite-difference gradients ------------------------------------------ */

START_TEST(test_switch_grad) { check_grad(&ccr_gate_switch, 3, 0.75, false); }
END_TEST

START_TEST(test_switch_grad_aux_only) { check_grad(&ccr_gate_switch, 3, 0.75, true); }
END_TEST

/* ---- configuration errors ------------------------------------------------- */

START_TEST(test_config_errors)
{
    ccr_gate_config c = base_cfg(3, 4);
    const double bad_cf[4] = {0.0, -1.0, NAN, INFINITY};
    for (int i = 0; i < 4; i++) {
        c.capacity_factor = bad_cf[i];
        expect_einval(&ccr_gate_switch, &c, "capacity_factor");
    }
    c = base_cfg(3, 4);
    const double bad_eval[3] = {-1.0, NAN, INFINITY};
    for (int i = 0; i < 3; i++) {
        c.eval_capacity_factor = bad_eval[i];
        expect_einval(&ccr_gate_switch, &c, "eval_capacity_factor");
    }
    c = base_cfg(3, 4);
    c.aux_alpha = -0.01;
    expect_einval(&ccr_gate_switch, &c, "aux_alpha");
    c.aux_alpha = NAN;
    expect_einval(&ccr_gate_switch, &c, "aux_alpha");
    c = base_cfg(3, 4);
    c.z_loss = -1.0;
    expect_einval(&ccr_gate_switch, &c, "z_loss");
    c = base_cfg(3, 0);
    expect_einval(&ccr_gate_switch, &c, "n_experts");
    /* A good configuration at the edges is accepted. */
    c = base_cfg(3, 1);
    c.capacity_factor = 1e-300;
    c.aux_alpha = 0.0;
    ccr_gate *g = NULL;
    CCR_CK_OK(ctx, ccr_gate_alloc(ctx, &ccr_gate_switch, &c, 1, &g));
    ck_assert_ptr_nonnull(g);
    ccr_gate_free(g);
}
END_TEST

/* ---- determinism ------------------------------------------------------------ */

START_TEST(test_determinism)
{
    tgate_assert_deterministic(&ccr_gate_switch, 1);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("gate_switch");
    TCase *tc = tcase_create("known");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_registry);
    tcase_add_test(tc, test_forward_before_declare);
    tcase_add_test(tc, test_switch_argmax_ties);
    tcase_add_test(tc, test_switch_drops_and_aux);
    tcase_add_test(tc, test_switch_capacity_clamp);
    tcase_add_test(tc, test_switch_capacity_exact);
    tcase_add_test(tc, test_switch_eval_capacity);
    tcase_add_test(tc, test_switch_uniform_aux_is_alpha);
    suite_add_tcase(s, tc);
    TCase *tg = tcase_create("grad");
    tcase_add_checked_fixture(tg, setup, teardown);
    tcase_set_timeout(tg, 120);
    tcase_add_test(tg, test_switch_grad);
    tcase_add_test(tg, test_switch_grad_aux_only);
    suite_add_tcase(s, tg);
    TCase *te = tcase_create("errors");
    tcase_add_checked_fixture(te, setup, teardown);
    tcase_add_test(te, test_config_errors);
    tcase_add_test(te, test_determinism);
    suite_add_tcase(s, te);
    return s;
}

int main(void) { return ccr_test_run(suite()); }
