/*
 * test_gate_switch.c - the none, dense and switch gates (docs/GATES.md).
 *
 * Known answers computed here in double: dense weights are the softmax of
 * x W_g; switch takes the argmax of the unrenormalised softmax (ties to
 * the lower index), drops in batch order beyond C = ceil(cf B / E) clamped
 * to [1, B], and its aux loss alpha E sum f_i P_i counts f before the drops
 * (Fedus et al. eqs. 4-6; PAPERS.md §7); the z-loss is z mean_b lse_b^2
 * (ST-MoE eq. 5).  Gradients of L = sum r w + aux_loss are checked by
 * central differences against every gate parameter and every input, with
 * dropped examples in the switch batch.  Bad configurations fail with
 * CCR_EINVAL naming the option and leave the output untouched.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ccr_test.h"

static ccr_ctx *ctx;
static ccr_backend *be;
static gsl_rng *rng;

static void setup(void)
{
    ctx = ccr_test_ctx();
    ck_assert_int_eq(ccr_backend_cpu_init(ctx, &be), CCR_OK);
    rng = ccr_test_rng(2017);
}

static void teardown(void)
{
    gsl_rng_free(rng);
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
}

/* A gate with its parameters declared in an arena of their own (none has
 * no parameters: its arena stays empty and is not finalized). */
typedef struct tgate {
    ccr_gate *g;
    ccr_arena *a;
    size_t d_in, n, slots;
    float *w;   /* gate.w_g values [d_in, E], or NULL */
    float *dw;  /* its gradient */
} tgate;

static void tgate_make(tgate *t, const ccr_gate_type *type, const ccr_gate_config *cfg,
                       size_t max_batch, unsigned long seed)
{
    memset(t, 0, sizeof *t);
    CCR_CK_OK(ctx, ccr_gate_alloc(ctx, type, cfg, max_batch, &t->g));
    CCR_CK_OK(ctx, ccr_arena_init(be, &t->a));
    CCR_CK_OK(ctx, ccr_gate_declare(t->g, t->a, "gate."));
    t->d_in = cfg->d_in;
    t->n = ccr_gate_n_matrices(t->g);
    t->slots = ccr_gate_slots(t->g);
    if (ccr_arena_count(t->a) == 0)
        return;
    ck_assert_uint_eq(ccr_arena_count(t->a), 1);
    CCR_CK_OK(ctx, ccr_arena_finalize(t->a));
    gsl_rng *r = ccr_test_rng(seed);
    CCR_CK_OK(ctx, ccr_gate_init_params(t->g, r));
    gsl_rng_free(r);
    size_t idx;
    CCR_CK_OK(ctx, ccr_arena_find(t->a, "gate.w_g", &idx));
    ck_assert_uint_eq(ccr_arena_size(t->a, idx), t->d_in * t->n);
    t->w = ccr_arena_value(t->a, idx);
    t->dw = ccr_arena_grad(t->a, idx);
}

static void tgate_free(tgate *t)
{
    ccr_gate_free(t->g);
    ccr_arena_free(t->a);
}

/* W_g = identity [E, E], so that the logits are x itself. */
static void set_identity(tgate *t)
{
    ck_assert_uint_eq(t->d_in, t->n);
    for (size_t i = 0; i < t->n * t->n; i++)
        t->w[i] = (i % (t->n + 1) == 0) ? 1.0f : 0.0f;
}

/* Double logits of row b and its softmax / logsumexp. */
static void ref_row(const tgate *t, const float *x, size_t b, double *p, double *lse)
{
    double z[16], m = -INFINITY, s = 0.0;
    ck_assert_uint_le(t->n, 16);
    for (size_t j = 0; j < t->n; j++) {
        z[j] = 0.0;
        for (size_t k = 0; k < t->d_in; k++)
            z[j] += (double)x[b * t->d_in + k] * (double)t->w[k * t->n + j];
        m = z[j] > m ? z[j] : m;
    }
    for (size_t j = 0; j < t->n; j++)
        s += exp(z[j] - m);
    for (size_t j = 0; j < t->n; j++)
        p[j] = exp(z[j] - m) / s;
    *lse = m + log(s);
}

static void fwd(tgate *t, const float *x, size_t batch, ccr_route *r, ccr_gate_stats *st)
{
    CCR_CK_OK(ctx, ccr_gate_forward(t->g, x, batch, true, rng, r, st));
    CCR_CK_OK(ctx, ccr_route_validate(ctx, r));
    ck_assert_uint_eq(r->batch, batch);
    ck_assert_uint_eq(r->slots, t->slots);
    ck_assert_uint_eq(r->n_matrices, t->n);
}

static const float *export_of(const tgate *t, const char *want, size_t len)
{
    for (size_t i = 0; i < ccr_gate_n_exports(t->g); i++) {
        const char *name;
        size_t rank, shape[4];
        const float *data;
        CCR_CK_OK(ctx, ccr_gate_get_export(t->g, i, &name, &rank, shape, &data));
        if (strcmp(name, want) == 0) {
            ck_assert_uint_eq(rank, 1);
            ck_assert_uint_eq(shape[0], len);
            return data;
        }
    }
    ck_abort_msg("no export %s", want);
    return NULL;
}

static ccr_gate_config base_cfg(size_t d_in, size_t n)
{
    ccr_gate_config c = ccr_gate_config_default();
    c.d_in = d_in;
    c.n_experts = n;
    return c;
}

/* ---- registry and none ---------------------------------------------------- */

START_TEST(test_registry)
{
    ck_assert_ptr_eq(ccr_gate_type_find("none"), &ccr_gate_none);
    ck_assert_ptr_eq(ccr_gate_type_find("dense"), &ccr_gate_dense);
    ck_assert_ptr_eq(ccr_gate_type_find("switch"), &ccr_gate_switch);
    const ccr_gate_type *t[3] = {&ccr_gate_none, &ccr_gate_dense, &ccr_gate_switch};
    for (int i = 0; i < 3; i++) {
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
        ref_row(&t, x, b, p, &lse);
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
    ck_assert_double_eq_tol(st.aux_loss, st.loss_z, 1e-12);
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
    const ccr_gate_type *types[2] = {&ccr_gate_dense, &ccr_gate_switch};
    for (int i = 0; i < 2; i++) {
        ccr_gate *g;
        CCR_CK_OK(ctx, ccr_gate_alloc(ctx, types[i], &c, 4, &g));
        float x[2] = {1, 2};
        ccr_route r = {0};
        ccr_gate_stats st;
        CCR_CK_STATUS(ctx, ccr_gate_forward(g, x, 1, false, NULL, &r, &st), CCR_EINVAL);
        ck_assert_ptr_null(r.ids);
        ccr_gate_free(g);
    }
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
        ref_row(&t, x, b, p, &lse);
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
        ref_row(&t, x, b, p, &lse);
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

/* L = sum_bs r_bs w_bs + aux_loss in double; the routing goes to ids. */
static double fd_loss(tgate *t, const float *x, size_t batch, const double *r, int32_t *ids,
                      ccr_gate_stats *st_out)
{
    ccr_route rt;
    ccr_gate_stats st;
    CCR_CK_OK(ctx, ccr_gate_forward(t->g, x, batch, true, rng, &rt, &st));
    double L = st.aux_loss;
    for (size_t i = 0; i < batch * t->slots; i++)
        L += r[i] * (double)rt.weights[i];
    memcpy(ids, rt.ids, batch * t->slots * sizeof *ids);
    if (st_out)
        *st_out = st;
    return L;
}

static bool fd_close(double num, double ana) { return fabs(num - ana) <= 2e-3 + 2e-2 * fabs(num); }

#define FD_B 12
#define FD_D 5

static void check_grad(const ccr_gate_type *type, size_t n, double cf, bool zero_r)
{
    ccr_gate_config c = base_cfg(FD_D, n);
    c.randomize = true;
    /* Without the task term, larger coefficients make the aux gradients dominate. */
    c.aux_alpha = zero_r ? 4.0 : 0.5;
    c.z_loss = zero_r ? 0.5 : 0.1;
    c.capacity_factor = cf;
    tgate t;
    tgate_make(&t, type, &c, FD_B, 11);
    /* Larger logits than the N(0, 1/d) init gives, for wider routing margins. */
    for (size_t i = 0; i < FD_D * n; i++)
        t.w[i] *= 3.0f;
    float x[FD_B * FD_D], dx[FD_B * FD_D];
    ccr_test_fill_uniform(rng, x, FD_B * FD_D, -1, 1);
    const size_t ns = FD_B * t.slots;
    double r[FD_B * 16];
    float rf[FD_B * 16];
    for (size_t i = 0; i < ns; i++) {
        r[i] = zero_r ? 0.0 : 2.0 * gsl_rng_uniform(rng) - 1.0;
        rf[i] = (float)r[i];
    }
    int32_t ids0[FD_B * 16], ids1[FD_B * 16], ids2[FD_B * 16];
    ccr_gate_stats st;
    fd_loss(&t, x, FD_B, r, ids0, &st);
    if (type == &ccr_gate_switch) {
        ck_assert_msg(st.dropped > 0 && st.dropped < FD_B, "dropped %zu", st.dropped);
        ck_assert(st.loss_switch > 0.0);
    }
    ck_assert(st.loss_z > 0.0);
    CCR_CK_OK(ctx, ccr_arena_zero_grad(t.a));
    memset(dx, 0, sizeof dx);
    ccr_gate_bwd_args ba = {.x = x, .batch = FD_B, .dweights = rf, .dx = dx};
    CCR_CK_OK(ctx, ccr_gate_backward(t.g, &ba));

    const float h = 1e-2f;
    size_t total = 0, skipped = 0;
    for (int which = 0; which < 2; which++) {
        float *v = which == 0 ? t.w : x;
        const float *ana = which == 0 ? t.dw : dx;
        const size_t len = which == 0 ? FD_D * n : FD_B * FD_D;
        for (size_t i = 0; i < len; i++) {
            const float keep = v[i];
            v[i] = keep + h;
            double lp = fd_loss(&t, x, FD_B, r, ids1, NULL);
            v[i] = keep - h;
            double lm = fd_loss(&t, x, FD_B, r, ids2, NULL);
            v[i] = keep;
            total++;
            if (memcmp(ids1, ids0, ns * sizeof *ids0) != 0 ||
                memcmp(ids2, ids0, ns * sizeof *ids0) != 0) {
                skipped++;
                continue;
            }
            double num = (lp - lm) / (2.0 * (double)h);
            ck_assert_msg(fd_close(num, ana[i]), "%s %s[%zu]: numeric %.6g analytic %.6g",
                          type->name, which == 0 ? "w_g" : "x", i, num, (double)ana[i]);
        }
    }
    ck_assert_msg(skipped * 10 < total, "%s: skipped %zu of %zu", type->name, skipped, total);

    /* Gradients accumulate: a second backward doubles them. */
    float dw1[FD_D * 16];
    memcpy(dw1, t.dw, FD_D * n * sizeof *dw1);
    fd_loss(&t, x, FD_B, r, ids1, NULL);
    CCR_CK_OK(ctx, ccr_gate_backward(t.g, &ba));
    for (size_t i = 0; i < FD_D * n; i++)
        ck_assert_double_eq_tol(t.dw[i], 2.0 * dw1[i], 1e-5 * (1.0 + fabs(dw1[i])));
    tgate_free(&t);
}

START_TEST(test_dense_grad) { check_grad(&ccr_gate_dense, 4, 1.0, false); }
END_TEST

START_TEST(test_dense_grad_aux_only) { check_grad(&ccr_gate_dense, 3, 1.0, true); }
END_TEST

START_TEST(test_switch_grad) { check_grad(&ccr_gate_switch, 3, 0.75, false); }
END_TEST

START_TEST(test_switch_grad_aux_only) { check_grad(&ccr_gate_switch, 3, 0.75, true); }
END_TEST

/* ---- configuration errors ------------------------------------------------- */

static void expect_einval(const ccr_gate_type *type, const ccr_gate_config *c, const char *opt)
{
    ccr_gate *sentinel = (ccr_gate *)&sentinel;
    ccr_gate *g = sentinel;
    CCR_CK_STATUS(ctx, ccr_gate_alloc(ctx, type, c, 8, &g), CCR_EINVAL);
    ck_assert_ptr_eq(g, sentinel);
    ck_assert_msg(strstr(ccr_ctx_errmsg(ctx), opt) != NULL, "%s: message '%s' lacks '%s'",
                  type->name, ccr_ctx_errmsg(ctx), opt);
}

START_TEST(test_config_errors)
{
    ccr_gate_config c = base_cfg(3, 4);
    const double bad_cf[4] = {0.0, -1.0, NAN, INFINITY};
    for (int i = 0; i < 4; i++) {
        c.capacity_factor = bad_cf[i];
        expect_einval(&ccr_gate_switch, &c, "capacity_factor");
    }
    c = base_cfg(3, 4);
    c.aux_alpha = -0.01;
    expect_einval(&ccr_gate_switch, &c, "aux_alpha");
    c.aux_alpha = NAN;
    expect_einval(&ccr_gate_switch, &c, "aux_alpha");
    c = base_cfg(3, 4);
    c.z_loss = -1.0;
    expect_einval(&ccr_gate_switch, &c, "z_loss");
    expect_einval(&ccr_gate_dense, &c, "z_loss");
    c.z_loss = NAN;
    expect_einval(&ccr_gate_dense, &c, "z_loss");
    c = base_cfg(3, 0);
    expect_einval(&ccr_gate_switch, &c, "n_experts");
    expect_einval(&ccr_gate_dense, &c, "n_experts");
    expect_einval(&ccr_gate_none, &c, "n_experts");
    c = base_cfg(3, 2);
    expect_einval(&ccr_gate_none, &c, "n_experts");
    /* Good configurations at the edges are accepted. */
    c = base_cfg(3, 1);
    c.capacity_factor = 1e-300;
    c.aux_alpha = 0.0;
    const ccr_gate_type *types[3] = {&ccr_gate_none, &ccr_gate_dense, &ccr_gate_switch};
    for (int i = 0; i < 3; i++) {
        ccr_gate *g = NULL;
        CCR_CK_OK(ctx, ccr_gate_alloc(ctx, types[i], &c, 1, &g));
        ck_assert_ptr_nonnull(g);
        ccr_gate_free(g);
    }
}
END_TEST

/* ---- determinism ------------------------------------------------------------ */

static void run_once(const ccr_gate_type *type, int32_t *ids, float *w, float *dw, float *dx)
{
    ccr_gate_config c = base_cfg(FD_D, 4);
    c.randomize = true;
    c.z_loss = 0.01;
    c.capacity_factor = 0.75;
    tgate t;
    tgate_make(&t, type, &c, FD_B, 99);
    gsl_rng *r = ccr_test_rng(5);
    float x[FD_B * FD_D], dwt[FD_B * 4];
    ccr_test_fill_uniform(r, x, FD_B * FD_D, -3, 3);
    ccr_test_fill_uniform(r, dwt, FD_B * 4, -1, 1);
    gsl_rng_free(r);
    ccr_route rt;
    ccr_gate_stats st;
    fwd(&t, x, FD_B, &rt, &st);
    memcpy(ids, rt.ids, FD_B * t.slots * sizeof *ids);
    memcpy(w, rt.weights, FD_B * t.slots * sizeof *w);
    memset(dx, 0, FD_B * FD_D * sizeof *dx);
    ccr_gate_bwd_args ba = {.x = x, .batch = FD_B, .dweights = dwt, .dx = dx};
    CCR_CK_OK(ctx, ccr_gate_backward(t.g, &ba));
    memcpy(dw, t.dw, FD_D * 4 * sizeof *dw);
    tgate_free(&t);
}

START_TEST(test_determinism)
{
    const ccr_gate_type *types[2] = {&ccr_gate_dense, &ccr_gate_switch};
    for (int k = 0; k < 2; k++) {
        int32_t ids[2][FD_B * 4];
        float w[2][FD_B * 4], dw[2][FD_D * 4], dx[2][FD_B * FD_D];
        for (int rep = 0; rep < 2; rep++)
            run_once(types[k], ids[rep], w[rep], dw[rep], dx[rep]);
        const size_t slots = types[k] == &ccr_gate_dense ? 4 : 1;
        ck_assert(memcmp(ids[0], ids[1], FD_B * slots * sizeof(int32_t)) == 0);
        ck_assert(memcmp(w[0], w[1], FD_B * slots * sizeof(float)) == 0);
        ck_assert(memcmp(dw[0], dw[1], sizeof dw[0]) == 0);
        ck_assert(memcmp(dx[0], dx[1], sizeof dx[0]) == 0);
    }
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("gate_switch");
    TCase *tc = tcase_create("known");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_registry);
    tcase_add_test(tc, test_none_route);
    tcase_add_test(tc, test_dense_softmax);
    tcase_add_test(tc, test_dense_zero_init_uniform);
    tcase_add_test(tc, test_forward_before_declare);
    tcase_add_test(tc, test_switch_argmax_ties);
    tcase_add_test(tc, test_switch_drops_and_aux);
    tcase_add_test(tc, test_switch_capacity_clamp);
    tcase_add_test(tc, test_switch_uniform_aux_is_alpha);
    suite_add_tcase(s, tc);
    TCase *tg = tcase_create("grad");
    tcase_add_checked_fixture(tg, setup, teardown);
    tcase_set_timeout(tg, 120);
    tcase_add_test(tg, test_dense_grad);
    tcase_add_test(tg, test_dense_grad_aux_only);
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
