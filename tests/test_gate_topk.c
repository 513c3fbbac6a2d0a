/*
 * test_gate_topk.c - the noisy top-k gate (Shazeer et al. 2017;
 * docs/GATES.md "topk"): known answers from the equations, a Monte-Carlo
 * check of the smooth load P(x, i), finite-difference gradients of every
 * parameter and of x, config errors, and determinism.  The hierarchical
 * gate is in test_gate_hmoe.c; the shared reference is gate_ref.c.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <gsl/gsl_cdf.h>
#include <gsl/gsl_randist.h>

#include "gate_ref.h"

/* ---- topk known answers ---------------------------------------------------- */

START_TEST(topk_eval_known)
{
    ccr_gate_config c = topk_cfg(2, 4, 2);
    env v;
    env_open(&v, &ccr_gate_topk, &c, 4, 1);
    const float wg[8] = {0.5f, 2.0f, -1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 0.0f};
    memcpy(env_param(&v, "gate.w_g"), wg, sizeof wg);
    const float x[4] = {1, 0, 0, 1};
    ccr_route r;
    ccr_gate_stats st;
    CCR_CK_OK(v.ctx, ccr_gate_forward(v.g, x, 2, false, NULL, &r, &st));
    ck_assert_uint_eq(r.slots, 2);
    ck_assert_uint_eq(r.n_matrices, 4);
    const double e1 = exp(1.0);
    /* example 0: clean [0.5 2 -1 1] -> ids 1, 3, softmax([2, 1]) */
    ck_assert_int_eq(r.ids[0], 1);
    ck_assert_int_eq(r.ids[1], 3);
    ck_close(r.weights[0], e1 / (1 + e1), 1e-6, "w00");
    ck_close(r.weights[1], 1 / (1 + e1), 1e-6, "w01");
    /* example 1: clean [1 1 1 0]: a three-way tie goes to the lower indices */
    ck_assert_int_eq(r.ids[2], 0);
    ck_assert_int_eq(r.ids[3], 1);
    ck_close(r.weights[2], 0.5, 1e-7, "w10");
    ck_close(r.weights[3], 0.5, 1e-7, "w11");
    const double imp[4] = {0.5, 0.5 + e1 / (1 + e1), 0.0, 1 / (1 + e1)};
    const double cnt[4] = {1, 2, 0, 1};
    const float *ei = env_export(&v, "importance", NULL), *el = env_export(&v, "load", NULL);
    size_t nl;
    const float *en = env_export(&v, "noise", &nl);
    ck_assert_uint_eq(nl, 8);
    for (size_t i = 0; i < 4; i++) {
        ck_close(ei[i], imp[i], 1e-6, "importance");
        ck_assert_float_eq(el[i], (float)cnt[i]); /* eval: true counts */
    }
    for (size_t i = 0; i < nl; i++)
        ck_assert_float_eq(en[i], 0.0f);
    ck_close(st.loss_importance, 0.1 * ref_cv2(imp, 4), 1e-6, "loss_importance");
    ck_close(st.loss_load, 0.1 * ref_cv2(cnt, 4), 1e-6, "loss_load");
    ck_close(st.aux_loss, st.loss_importance + st.loss_load, 1e-12, "aux");
    ck_close(st.cv_importance, sqrt(ref_cv2(imp, 4)), 1e-6, "cv_importance");
    ck_close(st.cv_load_count, sqrt(ref_cv2(cnt, 4)), 1e-6, "cv_load_count");
    ck_close(st.max_mean_count, 2.0, 1e-12, "max/mean");
    ck_assert_uint_eq(st.distinct, 3);
    ck_assert(st.loss_z == 0.0 && st.dropped == 0);
    ck_close(ccr_gate_flops(v.g, false), 16.0, 0, "flops eval");
    ck_close(ccr_gate_flops(v.g, true), 32.0, 0, "flops train");
    ck_close(ccr_gate_matrices_per_example(v.g), 2.0, 0, "matrices");
    env_close(&v);
}
END_TEST

/* Train mode: the draws are gsl_ran_gaussian_ziggurat(rng, 1) in row-major order,
 * H = clean + n (softplus(raw) + eps), gates = softmax over the top k of H,
 * and Load = sum of Phi((clean - thr) / std). */
START_TEST(topk_train_known)
{
    const size_t d = 3, e = 5, k = 2, B = 6;
    ccr_gate_config c = topk_cfg(d, e, k);
    c.randomize = true;
    c.noise_eps = 0.05;
    c.z_loss = 0.01;
    env v;
    env_open(&v, &ccr_gate_topk, &c, B, 3);
    float x[18];
    ccr_test_fill_uniform(v.rng, x, B * d, -1.0f, 1.0f);
    gsl_rng_set(v.rng, 77);
    ccr_route r;
    ccr_gate_stats st;
    CCR_CK_OK(v.ctx, ccr_gate_forward(v.g, x, B, true, v.rng, &r, &st));
    gsl_rng *r2 = ccr_test_rng(77);
    const float *noise = env_export(&v, "noise", NULL);
    for (size_t i = 0; i < B * e; i++)
        ck_assert_float_eq(noise[i], (float)gsl_ran_gaussian_ziggurat(r2, 1.0));
    gsl_rng_free(r2);
    const float *wg = env_param(&v, "gate.w_g"), *wn = env_param(&v, "gate.w_noise");
    double imp[5] = {0}, load[5] = {0}, z = 0.0;
    for (size_t b = 0; b < B; b++) {
        double clean[5], raw[5];
        ref_mm(x + b * d, wg, d, e, clean);
        ref_mm(x + b * d, wn, d, e, raw);
        rrow o;
        ref_topk_row(clean, raw, noise + b * e, e, k, true, c.noise_eps, &o);
        for (size_t s = 0; s < k; s++) {
            ck_assert_int_eq(r.ids[b * k + s], o.top[s]);
            ck_close(r.weights[b * k + s], o.g[s], 1e-5, "gate");
            imp[o.top[s]] += o.g[s];
        }
        double m = clean[0], se = 0.0;
        for (size_t i = 0; i < e; i++) {
            load[i] += o.p[i];
            m = clean[i] > m ? clean[i] : m;
        }
        for (size_t i = 0; i < e; i++)
            se += exp(clean[i] - m);
        z += (m + log(se)) * (m + log(se)) / (double)B;
    }
    const float *ei = env_export(&v, "importance", NULL), *el = env_export(&v, "load", NULL);
    for (size_t i = 0; i < e; i++) {
        ck_close(ei[i], imp[i], 1e-5, "importance");
        ck_close(el[i], load[i], 1e-5, "smooth load");
    }
    ck_close(st.loss_importance, c.w_importance * ref_cv2(imp, e), 1e-4, "loss_importance");
    ck_close(st.loss_load, c.w_load * ref_cv2(load, e), 1e-4, "loss_load");
    ck_close(st.loss_z, c.z_loss * z, 1e-5, "loss_z");
    ck_close(st.aux_loss, st.loss_importance + st.loss_load + st.loss_z, 1e-12, "aux");
    ck_close(st.cv_load, sqrt(ref_cv2(load, e)), 1e-4, "cv_load");
    env_close(&v);
}
END_TEST

/* A hand case with k = 1: expert top[0] is compared with the second largest
 * H (thr_in), every other expert with the largest (thr_out). */
START_TEST(topk_smooth_load_hand)
{
    ccr_gate_config c = topk_cfg(1, 3, 1);
    env v;
    env_open(&v, &ccr_gate_topk, &c, 1, 1);
    const float wg[3] = {1.0f, 0.0f, -1.0f}, wn[3] = {0.0f, 0.5f, -0.5f};
    memcpy(env_param(&v, "gate.w_g"), wg, sizeof wg);
    memcpy(env_param(&v, "gate.w_noise"), wn, sizeof wn);
    const float x[1] = {1.0f};
    ccr_route r;
    ccr_gate_stats st;
    gsl_rng_set(v.rng, 11);
    CCR_CK_OK(v.ctx, ccr_gate_forward(v.g, x, 1, true, v.rng, &r, &st));
    const float *n = env_export(&v, "noise", NULL), *load = env_export(&v, "load", NULL);
    double sd[3], h[3];
    for (int i = 0; i < 3; i++) {
        sd[i] = log1p(exp((double)wn[i])) + 0.01;
        h[i] = wg[i] + n[i] * sd[i];
    }
    int first = 0;
    for (int i = 1; i < 3; i++)
        first = h[i] > h[first] ? i : first;
    int second = -1;
    for (int i = 0; i < 3; i++)
        if (i != first && (second < 0 || h[i] > h[second]))
            second = i;
    ck_assert_int_eq(r.ids[0], first);
    ck_close(r.weights[0], 1.0, 1e-7, "k = 1 weight");
    for (int i = 0; i < 3; i++) {
        double thr = i == first ? h[second] : h[first];
        ck_close(load[i], gsl_cdf_ugaussian_P((wg[i] - thr) / sd[i]), 1e-6, "P(x,i)");
    }
    env_close(&v);
}
END_TEST

/* P(x, i) is the probability that i is in the top k under a fresh draw of
 * its own noise, the others' held fixed: estimate it by sampling. */
static double mc_case(size_t e, size_t k, const float *wg, const float *wn, unsigned long seed)
{
    ccr_gate_config c = topk_cfg(1, e, k);
    env v;
    env_open(&v, &ccr_gate_topk, &c, 1, seed);
    memcpy(env_param(&v, "gate.w_g"), wg, e * sizeof(float));
    memcpy(env_param(&v, "gate.w_noise"), wn, e * sizeof(float));
    const float x[1] = {1.0f};
    ccr_route r;
    ccr_gate_stats st;
    CCR_CK_OK(v.ctx, ccr_gate_forward(v.g, x, 1, true, v.rng, &r, &st));
    const float *n = env_export(&v, "noise", NULL), *load = env_export(&v, "load", NULL);
    double sd[MAXN], h[MAXN], worst = 0.0;
    for (size_t i = 0; i < e; i++) {
        sd[i] = log1p(exp((double)wn[i])) + c.noise_eps;
        h[i] = wg[i] + n[i] * sd[i];
    }
    gsl_rng *mc = ccr_test_rng(seed + 1000);
    const size_t draws = 40000;
    for (size_t i = 0; i < e; i++) {
        size_t hits = 0;
        for (size_t t = 0; t < draws; t++) {
            double hi = wg[i] + gsl_ran_gaussian(mc, 1.0) * sd[i];
            size_t above = 0;
            for (size_t j = 0; j < e; j++)
                if (j != i && (h[j] > hi || (h[j] == hi && j < i)))
                    above++;
            hits += above < k;
        }
        double est = (double)hits / (double)draws, diff = fabs(est - load[i]);
        worst = diff > worst ? diff : worst;
        ck_assert_msg(diff <= 0.01, "expert %zu: Monte-Carlo %.4f, smooth P %.4f", i, est,
                      (double)load[i]);
    }
    gsl_rng_free(mc);
    env_close(&v);
    return worst;
}

START_TEST(topk_smooth_load_monte_carlo)
{
    const float wg4[4] = {0.3f, 0.1f, 0.0f, -0.2f}, wn4[4] = {-0.5f, 0.0f, -1.0f, 0.2f};
    const float wg6[6] = {0.2f, -0.4f, 0.5f, 0.1f, 0.0f, 0.3f};
    const float wn6[6] = {0.0f, 0.5f, -0.7f, 0.3f, -0.2f, 1.0f};
    double w = 0.0, t;
    for (unsigned long seed = 1; seed <= 3; seed++) {
        t = mc_case(4, 2, wg4, wn4, seed);
        w = t > w ? t : w;
        t = mc_case(6, 1, wg6, wn6, seed);
        w = t > w ? t : w;
        t = mc_case(6, 3, wg6, wn6, seed);
        w = t > w ? t : w;
    }
    fprintf(stderr, "topk smooth load vs Monte-Carlo (40000 draws): max |diff| %.4f\n", w);
}
END_TEST

/* CV^2 of one entry is 0; k == E and eval use the true counts. */
START_TEST(topk_counts_and_single_expert)
{
    const double one[1] = {3.0};
    ck_assert(ccr_cv_squared(one, 1) == 0.0);
    ccr_gate_config c = topk_cfg(2, 1, 1);
    c.randomize = true;
    env v;
    env_open(&v, &ccr_gate_topk, &c, 4, 2);
    float x[8];
    ccr_test_fill_uniform(v.rng, x, 8, -1, 1);
    ccr_route r;
    ccr_gate_stats st;
    CCR_CK_OK(v.ctx, ccr_gate_forward(v.g, x, 4, true, v.rng, &r, &st));
    ck_assert(st.aux_loss == 0.0 && st.cv_importance == 0.0 && st.cv_load == 0.0);
    for (size_t b = 0; b < 4; b++)
        ck_assert(r.ids[b] == 0 && r.weights[b] == 1.0f);
    env_close(&v);

    c = topk_cfg(2, 3, 3); /* k == E in train: counts (= B each), no smooth load */
    c.randomize = true;
    env_open(&v, &ccr_gate_topk, &c, 4, 2);
    CCR_CK_OK(v.ctx, ccr_gate_forward(v.g, x, 4, true, v.rng, &r, &st));
    const float *load = env_export(&v, "load", NULL);
    for (size_t i = 0; i < 3; i++)
        ck_assert_float_eq(load[i], 4.0f);
    ck_assert(st.loss_load == 0.0 && st.cv_load_count == 0.0);
    ck_close(st.max_mean_count, 1.0, 1e-12, "max/mean");
    env_close(&v);
}
/* ---- finite-difference gradients ------------------------------------------- */

/* Against the double-precision reference of gate_ref.c (central differences
 * with Richardson, tolerance 16 FLT_EPSILON x each tensor's gradient scale;
 * the worst error seen is about 2 FLT_EPSILON x scale, and
 * tests/gradcheck_mutants.sh shows that dropping any gradient term fails). */
START_TEST(topk_grad)
{
    ccr_gate_config c = topk_cfg(4, 6, 2);
    for (unsigned long seed = 2; seed <= 3; seed++) {
        noisy_grad_check(&ccr_gate_topk, c, 8, true, seed);
        noisy_grad_check(&ccr_gate_topk, c, 8, false, seed);
    }
    c.z_loss = 0.1;
    noisy_grad_check(&ccr_gate_topk, c, 8, true, 5);
    noisy_grad_check(&ccr_gate_topk, c, 8, false, 5);
    noisy_grad_check(&ccr_gate_topk, topk_cfg(3, 4, 1), 6, true, 5);
    noisy_grad_check(&ccr_gate_topk, topk_cfg(3, 4, 1), 6, false, 2);
    noisy_grad_check(&ccr_gate_topk, topk_cfg(3, 3, 3), 5, true, 5); /* k == E: no smooth load */
}
END_TEST

/* ---- config errors and determinism ------------------------------------------ */

START_TEST(topk_config_errors)
{
    ccr_gate_config c = topk_cfg(4, 4, 0);
    noisy_expect_einval(&ccr_gate_topk, c, "k");
    c.k = 5;
    noisy_expect_einval(&ccr_gate_topk, c, "k");
    noisy_expect_einval(&ccr_gate_topk, topk_cfg(4, 0, 1), "n_experts");
    c = topk_cfg(4, 4, 2);
    c.w_load = -0.1;
    noisy_expect_einval(&ccr_gate_topk, c, "w_load");
    c = topk_cfg(4, 4, 2);
    c.w_importance = NAN;
    noisy_expect_einval(&ccr_gate_topk, c, "w_importance");
    c = topk_cfg(4, 4, 2);
    c.noise_eps = -1e-3;
    noisy_expect_einval(&ccr_gate_topk, c, "noise_eps");
    c = topk_cfg(4, 4, 2);
    c.z_loss = -1;
    noisy_expect_einval(&ccr_gate_topk, c, "z_loss");
}
END_TEST

START_TEST(topk_determinism) { noisy_determinism(&ccr_gate_topk, topk_cfg(4, 6, 2), "noise"); }
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("gate_topk");
    TCase *k = tcase_create("known");
    tcase_add_test(k, topk_eval_known);
    tcase_add_test(k, topk_train_known);
    tcase_add_test(k, topk_smooth_load_hand);
    tcase_add_test(k, topk_smooth_load_monte_carlo);
    tcase_add_test(k, topk_counts_and_single_expert);
    suite_add_tcase(s, k);
    TCase *g = tcase_create("grad");
    tcase_set_timeout(g, 120);
    tcase_add_test(g, topk_grad);
    suite_add_tcase(s, g);
    TCase *e = tcase_create("errors");
    tcase_add_test(e, topk_config_errors);
    tcase_add_test(e, topk_determinism);
    suite_add_tcase(s, e);
    return s;
}

int main(void) { return ccr_test_run(suite()); }
