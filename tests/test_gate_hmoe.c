/*
 * test_gate_hmoe.c - the hierarchical MoE gate (Shazeer et al. 2017;
 * docs/GATES.md "hmoe"): known answers (a hand case, and random train and
 * eval cases against a double-precision reference built on gate_ref.c's
 * top-k row, with the order of the noise draws), an empty group, finite-
 * difference gradients of every parameter and of x, config errors, and
 * determinism.  The flat top-k gate is in test_gate_topk.c.
 */
#include <math.h>
#include <string.h>

#include <gsl/gsl_randist.h>

#include "gate_ref.h"

END_TEST

/* ---- hmoe known answers ---------------------------------------------------- */

/* Reference hmoe forward from the parameters and the exported draws. */
static void ref_hmoe(env *v, const ccr_gate_config *c, const float *x, size_t B, bool train,
                     int32_t *ids, double *w, double *imp, double *load)
{
    const size_t d = c->d_in, a = c->n_groups, bs = c->n_experts / a, k = c->k_groups, k2 = c->k2;
    const float *pg = env_param(v, "gate.primary.w_g"), *pn = env_param(v, "gate.primary.w_noise");
    const float *sg = env_param(v, "gate.secondary.w_g"), *sn = env_param(v, "gate.secondary.w_noise");
    const float *np = env_export(v, "noise.primary", NULL);
    const float *ns = env_export(v, "noise.secondary", NULL);
    double lp[MAXN] = {0}, cnt[MAXN] = {0}, ls[MAXN] = {0}, counts[MAXN] = {0};
    for (size_t i = 0; i < a * bs; i++)
        imp[i] = 0.0;
    for (size_t b = 0; b < B; b++) {
        double clean[MAXN], raw[MAXN];
        rrow o, o2;
        ref_mm(x + b * d, pg, d, a, clean);
        ref_mm(x + b * d, pn, d, a, raw);
        ref_topk_row(clean, raw, np + b * a, a, k, train, c->noise_eps, &o);
        for (size_t i = 0; i < a; i++)
            lp[i] += train && k < a ? o.p[i] : 0.0;
        for (size_t p = 0; p < k; p++) {
            size_t i = (size_t)o.top[p];
            cnt[i] += 1.0;
            ref_mm(x + b * d, sg + i * d * bs, d, bs, clean);
            ref_mm(x + b * d, sn + i * d * bs, d, bs, raw);
            ref_topk_row(clean, raw, ns + (b * a + i) * bs, bs, k2, train, c->noise_eps, &o2);
            for (size_t q = 0; q < k2; q++) {
                size_t id = i * bs + (size_t)o2.top[q], s = b * k * k2 + p * k2 + q;
                ids[s] = (int32_t)id;
                w[s] = o.g[p] * o2.g[q];
                imp[id] += w[s];
                counts[id] += 1.0;
            }
            for (size_t j = 0; j < bs; j++)
                ls[i * bs + j] += train && k2 < bs ? o2.p[j] : 0.0;
        }
    }
    for (size_t i = 0; i < a; i++)
        for (size_t j = 0; j < bs; j++) {
            double l1 = train && k < a ? lp[i] : cnt[i];
            double l2 = train && k2 < bs ? ls[i * bs + j] : counts[i * bs + j];
            load[i * bs + j] = l1 * l2 / (cnt[i] + 1e-10); /* eq. 14 */
        }
}

static void hmoe_check_case(ccr_gate_config c, size_t B, bool train, unsigned long seed)
{
    const size_t e = c.n_experts, slots = c.k_groups * c.k2;
    c.randomize = true;
    env v;
    env_open(&v, &ccr_gate_hmoe, &c, B, seed);
    float x[64];
    ccr_test_fill_uniform(v.rng, x, B * c.d_in, -1, 1);
    gsl_rng_set(v.rng, seed + 5);
    ccr_route r;
    ccr_gate_stats st;
    CCR_CK_OK(v.ctx, ccr_gate_forward(v.g, x, B, train, v.rng, &r, &st));
    ck_assert_uint_eq(r.slots, slots);
    ck_assert_uint_eq(r.n_matrices, e);
    int32_t ids[256];
    double w[256], imp[MAXN], load[MAXN];
    ref_hmoe(&v, &c, x, B, train, ids, w, imp, load);
    for (size_t s = 0; s < B * slots; s++) {
        ck_assert_int_eq(r.ids[s], ids[s]);
        ck_close(r.weights[s], w[s], 1e-5, "hmoe weight");
    }
    const float *ei = env_export(&v, "importance", NULL), *el = env_export(&v, "load", NULL);
    for (size_t i = 0; i < e; i++) {
        ck_close(ei[i], imp[i], 1e-5, "Importance_H");
        ck_close(el[i], load[i], 1e-4, "Load_H");
    }
    ck_assert(isfinite(st.aux_loss));
    ck_close(st.loss_importance, c.w_importance * ref_cv2(imp, e), 1e-4, "hmoe loss_importance");
    ck_close(st.loss_load, c.w_load * ref_cv2(load, e), 1e-4, "hmoe loss_load");
    if (train) { /* draw order: a primary draws, then the selected groups' */
        const size_t a = c.n_groups, bs = e / a;
        const float *np = env_export(&v, "noise.primary", NULL);
        const float *ns = env_export(&v, "noise.secondary", NULL);
        gsl_rng *r2 = ccr_test_rng(seed + 5);
        for (size_t b = 0; b < B; b++) {
            for (size_t i = 0; i < a; i++)
                ck_assert_float_eq(np[b * a + i], (float)gsl_ran_gaussian_ziggurat(r2, 1.0));
            for (size_t p = 0; p < c.k_groups; p++) {
                size_t grp = (size_t)r.ids[b * slots + p * c.k2] / bs;
                for (size_t j = 0; j < bs; j++)
                    ck_assert_float_eq(ns[(b * a + grp) * bs + j],
                                       (float)gsl_ran_gaussian_ziggurat(r2, 1.0));
            }
        }
        gsl_rng_free(r2);
    }
    env_close(&v);
}

START_TEST(hmoe_known)
{
    /* Hand case, eval: x0 = e_0, x1 = e_1 read rows of the weights. */
    ccr_gate_config c = hmoe_cfg(2, 3, 3, 2, 2);
    env v;
    env_open(&v, &ccr_gate_hmoe, &c, 2, 1);
    const float pg[6] = {1, 3, 2, 0, 0, 1};
    const float sg[18] = {0, 0, 0, 0.5f, -1, 2, 1, -1, 0.5f, 0, 0, 0, -1, 2, 0, 1, 1, 0};
    memcpy(env_param(&v, "gate.primary.w_g"), pg, sizeof pg);
    memcpy(env_param(&v, "gate.secondary.w_g"), sg, sizeof sg);
    const float x[4] = {1, 0, 0, 1};
    ccr_route r;
    ccr_gate_stats st;
    CCR_CK_OK(v.ctx, ccr_gate_forward(v.g, x, 2, false, NULL, &r, &st));
    /* x0: groups 1 (3), 2 (2); group 1 members 0 (1), 2 (0.5); group 2: 1 (2), 2 (0) */
    const int32_t want[8] = {3, 5, 7, 8, 6, 7, 2, 0};
    const double s1 = 1 / (1 + exp(-1.0)), s15 = 1 / (1 + exp(-1.5)), s05 = 1 / (1 + exp(-0.5));
    const double s2 = 1 / (1 + exp(-2.0));
    /* x1: groups 2 (1), 0 (0, tie with 1 -> 0); group 2: 0, 1 tie; group 0: 2, 0 */
    const double ww[8] = {s1 * s05, s1 * (1 - s05), (1 - s1) * s2, (1 - s1) * (1 - s2),
                          s1 * 0.5, s1 * 0.5, (1 - s1) * s15, (1 - s1) * (1 - s15)};
    for (size_t s = 0; s < 8; s++) {
        ck_assert_int_eq(r.ids[s], want[s]);
        ck_close(r.weights[s], ww[s], 1e-6, "hmoe hand weight");
    }
    ck_close(ccr_gate_flops(v.g, false), 2.0 * 2 * 3 + 2 * 2.0 * 2 * 3, 0, "flops eval");
    ck_close(ccr_gate_flops(v.g, true), 4.0 * 2 * 3 + 2 * 4.0 * 2 * 3, 0, "flops train");
    ck_close(ccr_gate_matrices_per_example(v.g), 4.0, 0, "matrices");
    ck_assert_uint_eq(ccr_gate_slots(v.g), 4);
    ck_assert_uint_eq(ccr_gate_n_matrices(v.g), 9);
    ck_assert_uint_eq(st.distinct, 7);
    env_close(&v);
    /* Random cases against the reference, train and eval. */
    hmoe_check_case(hmoe_cfg(3, 3, 3, 2, 2), 6, true, 4);
    hmoe_check_case(hmoe_cfg(3, 3, 3, 2, 2), 6, false, 4);
    hmoe_check_case(hmoe_cfg(2, 4, 3, 2, 1), 5, true, 5);
    hmoe_check_case(hmoe_cfg(2, 2, 2, 2, 2), 4, true, 6); /* k == a, k2 == b: counts */
}
END_TEST

/* A group no example selects: Load_H stays finite thanks to +1e-10. */
START_TEST(hmoe_empty_group)
{
    ccr_gate_config c = hmoe_cfg(2, 4, 2, 1, 1);
    c.randomize = true;
    c.w_importance = c.w_load = 0.5;
    env v;
    env_open(&v, &ccr_gate_hmoe, &c, 2, 9);
    float x[4] = {0.3f, -0.8f, 0.5f, 0.1f};
    ccr_route r;
    ccr_gate_stats st;
    CCR_CK_OK(v.ctx, ccr_gate_forward(v.g, x, 2, true, v.rng, &r, &st));
    ck_assert(isfinite(st.aux_loss) && isfinite(st.loss_load));
    const float *load = env_export(&v, "load", NULL);
    size_t empty = 0;
    for (size_t i = 0; i < 4; i++) {
        bool used = (size_t)r.ids[0] / 2 == i || (size_t)r.ids[1] / 2 == i;
        if (!used) {
            empty++;
            ck_assert(load[2 * i] == 0.0f && load[2 * i + 1] == 0.0f);
        }
    }
    ck_assert_uint_ge(empty, 2);
    float dw[2] = {0.7f, -0.2f}, dx[4] = {0};
    ccr_gate_bwd_args ba = {.x = x, .batch = 2, .dweights = dw, .dx = dx};
    CCR_CK_OK(v.ctx, ccr_arena_zero_grad(v.a));
    CCR_CK_OK(v.ctx, ccr_gate_backward(v.g, &ba));
    for (size_t i = 0; i < ccr_arena_count(v.a); i++) {
        const float *gr = ccr_arena_grad(v.a, i);
        for (size_t j = 0; j < ccr_arena_size(v.a, i); j++)
            ck_assert(isfinite(gr[j]));
    }
    for (size_t i = 0; i < 4; i++)
        ck_assert(isfinite(dx[i]));
    env_close(&v);
}
END_TEST

/* ---- finite-difference gradients ------------------------------------------- */

/* Against the double-precision reference of gate_ref.c (central differences
 * with Richardson, tolerance 16 FLT_EPSILON x each tensor's gradient scale;
 * the worst error seen is about 2 FLT_EPSILON x scale, and
 * tests/gradcheck_mutants.sh shows that dropping any gradient term fails). */
START_TEST(hmoe_grad)
{
    ccr_gate_config c = hmoe_cfg(3, 3, 3, 2, 2);
    for (unsigned long seed = 1; seed <= 2; seed++) {
        noisy_grad_check(&ccr_gate_hmoe, c, 6, true, seed);
        noisy_grad_check(&ccr_gate_hmoe, c, 6, false, seed);
    }
    c.z_loss = 0.1;
    noisy_grad_check(&ccr_gate_hmoe, c, 6, true, 3);
    noisy_grad_check(&ccr_gate_hmoe, c, 6, false, 3);
    noisy_grad_check(&ccr_gate_hmoe, hmoe_cfg(2, 4, 2, 1, 1), 2, true, 4); /* empty groups */
    noisy_grad_check(&ccr_gate_hmoe, hmoe_cfg(3, 4, 3, 2, 1), 5, true, 5);
    noisy_grad_check(&ccr_gate_hmoe, hmoe_cfg(2, 2, 2, 2, 2), 4, true, 6); /* k == a, k2 == b */
}
END_TEST

/* ---- batched secondary gates and exports built on request -------------------- */

/* Scale of a float array: its largest |entry|, at least 1e-3. */
static double scale_of(const float *v, size_t n)
{
    double m = 1e-3;
    for (size_t i = 0; i < n; i++)
        m = fabs((double)v[i]) > m ? fabs((double)v[i]) : m;
    return m;
}

/* The secondary gates are batched per group (one GEMM over the rows routed
 * to a group).  Against the same gate run one example at a time (batch 1:
 * every group GEMM has one row, the per-example path), on the same draws:
 * several groups, B much larger than a.  Without aux losses the parameter
 * gradients are sums over examples and dx is per example, so the two must
 * agree to float rounding; the routes and the draws agree exactly. */
static void hmoe_batched_case(bool train, unsigned long seed)
{
    enum { D = 6, A = 8, BS = 8, K = 2, K2 = 2, B = 200 };
    ccr_gate_config c = hmoe_cfg(D, A, BS, K, K2);
    c.randomize = true;
    c.w_importance = c.w_load = 0.0;
    env v1, v2;
    env_open(&v1, &ccr_gate_hmoe, &c, B, seed);
    env_open(&v2, &ccr_gate_hmoe, &c, 1, seed); /* the same parameters */
    static float x[B * D], dw[B * K * K2], dx1[B * D], dx2[B * D], ns1[B * A * BS];
    static float np1[B * A], w1[B * K * K2];
    static int32_t ids1[B * K * K2];
    ccr_test_fill_uniform(v1.rng, x, B * D, -1, 1);
    ccr_test_fill_uniform(v1.rng, dw, B * K * K2, -1, 1);
    memset(dx1, 0, sizeof dx1);
    memset(dx2, 0, sizeof dx2);
    gsl_rng_set(v1.rng, seed + 11);
    gsl_rng_set(v2.rng, seed + 11);
    ccr_route r;
    ccr_gate_stats st;
    CCR_CK_OK(v1.ctx, ccr_gate_forward(v1.g, x, B, train, v1.rng, &r, &st));
    memcpy(ids1, r.ids, sizeof ids1);
    memcpy(w1, r.weights, sizeof w1);
    size_t n;
    memcpy(np1, env_export(&v1, "noise.primary", &n), sizeof np1);
    ck_assert_uint_eq(n, B * A);
    memcpy(ns1, env_export(&v1, "noise.secondary", &n), sizeof ns1);
    ck_assert_uint_eq(n, B * A * BS);
    ccr_gate_bwd_args ba = {.x = x, .batch = B, .dweights = dw, .dx = dx1};
    CCR_CK_OK(v1.ctx, ccr_arena_zero_grad(v1.a));
    CCR_CK_OK(v1.ctx, ccr_gate_backward(v1.g, &ba));
    CCR_CK_OK(v2.ctx, ccr_arena_zero_grad(v2.a));
    size_t used[A] = {0};
    for (size_t b = 0; b < B; b++) {
        CCR_CK_OK(v2.ctx, ccr_gate_forward(v2.g, x + b * D, 1, train, v2.rng, &r, &st));
        for (size_t s = 0; s < K * K2; s++) {
            ck_assert_int_eq(r.ids[s], ids1[b * K * K2 + s]);
            ck_close(r.weights[s], w1[b * K * K2 + s], 1e-5, "batched hmoe weight");
            used[(size_t)r.ids[s] / BS]++;
        }
        const float *np = env_export(&v2, "noise.primary", NULL);
        const float *ns = env_export(&v2, "noise.secondary", NULL);
        ck_assert_mem_eq(np, np1 + b * A, A * sizeof(float));
        ck_assert_mem_eq(ns, ns1 + b * A * BS, A * BS * sizeof(float));
        ccr_gate_bwd_args b2 = {.x = x + b * D, .batch = 1, .dweights = dw + b * K * K2,
                                .dx = dx2 + b * D};
        CCR_CK_OK(v2.ctx, ccr_gate_backward(v2.g, &b2));
    }
    size_t groups = 0;
    for (size_t i = 0; i < A; i++)
        groups += used[i] > 0;
    ck_assert_uint_ge(groups, 4); /* several groups, each with many rows */
    for (size_t t = 0; t < ccr_arena_count(v1.a); t++) {
        const float *g1 = ccr_arena_grad(v1.a, t), *g2 = ccr_arena_grad(v2.a, t);
        const size_t m = ccr_arena_size(v1.a, t);
        const double sc = scale_of(g2, m);
        for (size_t j = 0; j < m; j++)
            ck_assert_msg(fabs((double)g1[j] - (double)g2[j]) <= 1e-5 * sc,
                          "%s[%zu]: batched %g, per example %g", ccr_arena_name(v1.a, t), j,
                          (double)g1[j], (double)g2[j]);
    }
    const double sx = scale_of(dx2, B * D);
    for (size_t j = 0; j < B * D; j++)
        ck_assert_msg(fabs((double)dx1[j] - (double)dx2[j]) <= 1e-5 * sx,
                      "dx[%zu]: batched %g, per example %g", j, (double)dx1[j], (double)dx2[j]);
    env_close(&v1);
    env_close(&v2);
}

START_TEST(hmoe_batched)
{
    hmoe_batched_case(true, 21);
    hmoe_batched_case(false, 22);
}
END_TEST

/* noise.secondary, importance and load are built when asked for.  What a
 * caller reads is what the eager exports held: every draw of every
 * example replayed from the seed in the documented order, each at (b,
 * selected group), 0 elsewhere; Importance_H the weights summed per expert
 * in double; after a second, smaller forward (then an eval one), the
 * export shows that forward, not a stale one. */
START_TEST(hmoe_exports_on_request)
{
    enum { D = 5, A = 6, BS = 4, K = 2, K2 = 2, B = 64 };
    ccr_gate_config c = hmoe_cfg(D, A, BS, K, K2);
    c.randomize = true;
    env v;
    env_open(&v, &ccr_gate_hmoe, &c, B, 31);
    static float x[B * D], want[B * A * BS];
    ccr_test_fill_uniform(v.rng, x, B * D, -1, 1);
    const size_t batches[3] = {B, B / 3, B / 2};
    const bool trains[3] = {true, true, false};
    for (size_t t = 0; t < 3; t++) {
        const size_t nb = batches[t], slots = K * K2;
        gsl_rng_set(v.rng, 40 + t);
        ccr_route r;
        ccr_gate_stats st;
        CCR_CK_OK(v.ctx, ccr_gate_forward(v.g, x, nb, trains[t], v.rng, &r, &st));
        gsl_rng *r2 = ccr_test_rng(40 + t);
        memset(want, 0, sizeof want);
        for (size_t b = 0; b < nb && trains[t]; b++) {
            for (size_t i = 0; i < A; i++)
                (void)gsl_ran_gaussian_ziggurat(r2, 1.0); /* the primary's */
            for (size_t p = 0; p < K; p++) {
                size_t grp = (size_t)r.ids[b * slots + p * K2] / BS;
                for (size_t j = 0; j < BS; j++)
                    want[(b * A + grp) * BS + j] = (float)gsl_ran_gaussian_ziggurat(r2, 1.0);
            }
        }
        gsl_rng_free(r2);
        double imp[A * BS] = {0};
        for (size_t s = 0; s < nb * slots; s++)
            imp[r.ids[s]] += (double)r.weights[s];
        for (int rep = 0; rep < 2; rep++) { /* asking twice changes nothing */
            size_t n;
            const float *ns = env_export(&v, "noise.secondary", &n);
            ck_assert_uint_eq(n, nb * A * BS);
            ck_assert_mem_eq(ns, want, n * sizeof(float));
            const float *ei = env_export(&v, "importance", &n);
            ck_assert_uint_eq(n, A * BS);
            for (size_t i = 0; i < A * BS; i++)
                ck_assert(ei[i] == (float)imp[i]);
        }
    }
    env_close(&v);
}
END_TEST

/* ---- config errors and determinism ------------------------------------------ */

START_TEST(hmoe_config_errors)
{
    noisy_expect_einval(&ccr_gate_hmoe, hmoe_cfg(4, 4, 2, 0, 1), "k_groups");
    noisy_expect_einval(&ccr_gate_hmoe, hmoe_cfg(4, 4, 2, 5, 1), "k_groups");
    noisy_expect_einval(&ccr_gate_hmoe, hmoe_cfg(4, 4, 2, 2, 3), "k2");
    noisy_expect_einval(&ccr_gate_hmoe, hmoe_cfg(4, 4, 2, 2, 0), "k2");
    ccr_gate_config c = hmoe_cfg(4, 4, 2, 2, 1);
    c.n_experts = 6; /* 4 groups do not divide 6 experts */
    noisy_expect_einval(&ccr_gate_hmoe, c, "n_groups");
    c.n_groups = 0;
    noisy_expect_einval(&ccr_gate_hmoe, c, "n_groups");
    c = hmoe_cfg(4, 4, 2, 2, 1);
    c.n_experts = 0;
    noisy_expect_einval(&ccr_gate_hmoe, c, "n_experts");
    c = hmoe_cfg(4, 4, 2, 2, 1);
    c.w_load = -1;
    noisy_expect_einval(&ccr_gate_hmoe, c, "w_load");
    c = hmoe_cfg(4, 4, 2, 2, 1);
    c.noise_eps = -0.5;
    noisy_expect_einval(&ccr_gate_hmoe, c, "noise_eps");
}
END_TEST

START_TEST(hmoe_determinism)
{
    noisy_determinism(&ccr_gate_hmoe, hmoe_cfg(4, 3, 2, 2, 1), "noise.primary");
    noisy_determinism(&ccr_gate_hmoe, hmoe_cfg(4, 3, 2, 2, 1), "noise.secondary");
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("gate_hmoe");
    TCase *k = tcase_create("known");
    tcase_add_test(k, hmoe_known);
    tcase_add_test(k, hmoe_empty_group);
    suite_add_tcase(s, k);
    TCase *g = tcase_create("grad");
    tcase_set_timeout(g, 120);
    tcase_add_test(g, hmoe_grad);
    suite_add_tcase(s, g);
    TCase *bt = tcase_create("batched");
    tcase_set_timeout(bt, 60);
    tcase_add_test(bt, hmoe_batched);
    tcase_add_test(bt, hmoe_exports_on_request);
    suite_add_tcase(s, bt);
    TCase *e = tcase_create("errors");
    tcase_add_test(e, hmoe_config_errors);
    tcase_add_test(e, hmoe_determinism);
    suite_add_tcase(s, e);
    return s;
}

int main(void) { return ccr_test_run(suite()); }
