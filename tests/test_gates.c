/*
 * test_gates.c - conformance of every registered gate type (GSL's
 * "for (t = types; *t; t++)" loop as a Check loop test), the routed matmul
 * against a brute-force evaluation (with a user-defined gate type that
 * emits duplicates and dropped slots), finite-difference gradients of the
 * conditional layer for every gate and both bank kinds, the residual
 * connection, and a network with a conditional layer that trains.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ccr_test.h"

#define D_IN 6
#define D_OUT 5
#define HID 7
#define B 12

#define UNUSED(x) ((void)(x))

static ccr_ctx *ctx;
static ccr_backend *be;
static gsl_rng *rng;

static bool all_finite(const float *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(v[i]))
            return false;
    return true;
}

static void setup(void)
{
    ck_assert_int_eq(ccr_ctx_init(&ctx), CCR_OK);
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, 5);
}

static void teardown(void)
{
    gsl_rng_free(rng);
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
}

static size_t n_types(void)
{
    size_t n = 0;
    for (const ccr_gate_type *const *t = ccr_gate_types(); *t != NULL; t++)
        n++;
    return n;
}

/* A valid, small configuration for each gate (none ignores n_experts). */
static ccr_cond_config config_for(const ccr_gate_type *t, ccr_bank_kind bank)
{
    ccr_cond_config c = ccr_cond_config_default();
    c.gate = t;
    c.bank = bank;
    c.d_in = D_IN;
    c.d_out = D_OUT;
    c.hidden = HID;
    c.gate_cfg.n_experts = 8;
    c.gate_cfg.k = 2;
    c.gate_cfg.n_groups = 2;
    c.gate_cfg.k_groups = 2;
    c.gate_cfg.k2 = 2;
    c.gate_cfg.depth = 3;
    c.gate_cfg.capacity_factor = 1.0;
    c.gate_cfg.randomize = true;
    c.gate_cfg.w_importance = 0.3;
    c.gate_cfg.w_load = 0.3;
    c.gate_cfg.aux_alpha = 0.05;
    return c;
}

/* Allocates, declares, finalizes and initialises a standalone layer. */
static ccr_cond *make_cond(const ccr_cond_config *cfg, ccr_arena **arena, unsigned long seed)
{
    ccr_cond *c;
    CCR_CK_OK(ctx, ccr_cond_alloc(be, cfg, B, &c));
    CCR_CK_OK(ctx, ccr_arena_init(be, arena));
    CCR_CK_OK(ctx, ccr_cond_declare(c, *arena, ""));
    CCR_CK_OK(ctx, ccr_arena_finalize(*arena));
    gsl_rng_set(rng, seed);
    CCR_CK_OK(ctx, ccr_cond_init_params(c, rng));
    return c;
}

static bool weights_sum_to_one(const char *name)
{
    return strcmp(name, "dense") == 0 || strcmp(name, "topk") == 0 ||
           strcmp(name, "hmoe") == 0;
}

/* ---- conformance loop over the registry ---------------------------------- */

START_TEST(test_registry)
{
    ck_assert_int_eq((int)n_types(), 6);
    const char *names[] = {"none", "dense", "topk", "hmoe", "switch", "signtree"};
    for (int i = 0; i < 6; i++) {
        const ccr_gate_type *t = ccr_gate_type_find(names[i]);
        ck_assert_ptr_nonnull(t);
        ck_assert_str_eq(t->name, names[i]);
        ck_assert_msg(t->paper != NULL && t->paper[0] != '\0', "%s: no paper line", names[i]);
        ck_assert_msg(strstr(ccr_gate_type_names(), names[i]) != NULL, "%s unlisted", names[i]);
    }
    ck_assert_ptr_null(ccr_gate_type_find("nope"));
    ck_assert_ptr_null(ccr_gate_type_find(NULL));
}
END_TEST

START_TEST(test_conformance)
{
    const ccr_gate_type *t = ccr_gate_types()[_i];
    for (int bank = 0; bank < 2; bank++) {
        ccr_cond_config cfg = config_for(t, (ccr_bank_kind)bank);
        ccr_arena *a;
        ccr_cond *c = make_cond(&cfg, &a, 17);
        float x[B * D_IN], y[B * D_OUT], y2[B * D_OUT];
        ccr_test_fill_uniform(rng, x, B * D_IN, -1, 1);
        for (int train = 0; train < 2; train++) {
            ccr_gate_stats st;
            gsl_rng_set(rng, 99);
            CCR_CK_OK(ctx, ccr_cond_forward(c, x, B, train, rng, y, &st));
            const ccr_route *r = ccr_cond_route(c);
            CCR_CK_OK(ctx, ccr_route_validate(ctx, r));
            ck_assert_int_eq((int)r->batch, B);
            ck_assert_int_eq((int)r->n_matrices, (int)ccr_gate_n_matrices(ccr_cond_gate(c)));
            size_t used = 0;
            for (size_t b = 0; b < B; b++) {
                double sum = 0.0;
                for (size_t s = 0; s < r->slots; s++) {
                    int32_t id = r->ids[b * r->slots + s];
                    if (id < 0)
                        continue;
                    used++;
                    sum += r->weights[b * r->slots + s];
                    /* No matrix twice in one example. */
                    for (size_t s2 = s + 1; s2 < r->slots; s2++)
                        ck_assert_msg(r->ids[b * r->slots + s2] != id, "%s: duplicate id %d",
                                      t->name, (int)id);
                }
                if (weights_sum_to_one(t->name))
                    ck_assert_msg(fabs(sum - 1.0) < 1e-5, "%s: weights sum to %g", t->name, sum);
            }
            ck_assert_msg(isfinite(st.aux_loss) && st.aux_loss >= 0, "%s: aux %g", t->name,
                          st.aux_loss);
            ck_assert(all_finite(y, B * D_OUT));
            /* FLOPs counted from the executed table = analytic, except for
             * examples dropped for capacity. */
            double analytic = ccr_cond_flops(c, train);
            double counted_want = analytic - (double)st.dropped / B * ccr_cond_matrix_flops(c);
            ck_assert_msg(fabs(st.flops_counted - counted_want) <= 1e-9 * analytic,
                          "%s: counted %.1f analytic %.1f dropped %zu", t->name, st.flops_counted,
                          analytic, st.dropped);
            ck_assert_int_eq((int)(used + st.dropped),
                             (int)(B * ccr_gate_matrices_per_example(ccr_cond_gate(c)) + 0.5));
            ck_assert_int_ge((int)st.distinct, 1);
            /* Determinism: the same seed gives the same bits. */
            gsl_rng_set(rng, 99);
            ccr_gate_stats st2;
            CCR_CK_OK(ctx, ccr_cond_forward(c, x, B, train, rng, y2, &st2));
            ck_assert_mem_eq(y, y2, sizeof y);
            ck_assert_double_eq(st.aux_loss, st2.aux_loss);
        }
        ccr_cond_free(c);
        ccr_arena_free(a);
    }
}
END_TEST

/* Configurations every gate must reject, and what each specific gate must. */
START_TEST(test_bad_configs)
{
    const ccr_gate_type *t = ccr_gate_types()[_i];
    ccr_cond *c = (ccr_cond *)0x1;
    ccr_cond_config cfg = config_for(t, CCR_BANK_FFN);
    cfg.d_in = 0;
    CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &cfg, B, &c), CCR_EINVAL);
    cfg = config_for(t, CCR_BANK_FFN);
    CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &cfg, 0, &c), CCR_EINVAL);
    cfg.hidden = 0;
    CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &cfg, B, &c), CCR_EINVAL);
    cfg = config_for(t, CCR_BANK_FFN);
    cfg.residual = true;             /* needs d_in == d_out; D_IN != D_OUT */
    CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &cfg, B, &c), CCR_EINVAL);
    cfg = config_for(t, CCR_BANK_FFN);
    if (strcmp(t->name, "topk") == 0) {
        cfg.gate_cfg.k = 0;
        CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &cfg, B, &c), CCR_EINVAL);
        cfg.gate_cfg.k = 9;
        CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &cfg, B, &c), CCR_EINVAL);
    } else if (strcmp(t->name, "hmoe") == 0) {
        cfg.gate_cfg.n_groups = 3;   /* does not divide 8 */
        CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &cfg, B, &c), CCR_EINVAL);
        cfg.gate_cfg.n_groups = 2;
        cfg.gate_cfg.k2 = 5;         /* > 4 experts per group */
        CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &cfg, B, &c), CCR_EINVAL);
    } else if (strcmp(t->name, "switch") == 0) {
        cfg.gate_cfg.capacity_factor = 0.0;
        CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &cfg, B, &c), CCR_EINVAL);
        cfg.gate_cfg.capacity_factor = -1.0;
        CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &cfg, B, &c), CCR_EINVAL);
    } else if (strcmp(t->name, "signtree") == 0) {
        cfg.gate_cfg.depth = 40;
        CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &cfg, B, &c), CCR_EINVAL);
        /* Fits the gate but the bank would be too large for memory. */
        cfg.gate_cfg.depth = 28;
        CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &cfg, B, &c), CCR_ENOMEM);
    } else if (strcmp(t->name, "dense") == 0) {
        cfg.gate_cfg.n_experts = 0;
        CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &cfg, B, &c), CCR_EINVAL);
    } else if (strcmp(t->name, "none") == 0) {
        /* none reads no option: n_experts 2 is accepted (ignored), see
         * test_gate_config.c; an unknown gate name is refused instead. */
        cfg.gate = NULL;
        cfg.gate_name = "nonee";
        CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &cfg, B, &c), CCR_EINVAL);
    }
    ck_assert_ptr_eq(c, (ccr_cond *)0x1);
    ck_assert_str_ne(ccr_ctx_errmsg(ctx), "");
}
END_TEST

/* Forward errors leave the output untouched. */
START_TEST(test_forward_errors)
{
    const ccr_gate_type *t = ccr_gate_types()[_i];
    ccr_cond_config cfg = config_for(t, CCR_BANK_LINEAR);
    ccr_arena *a;
    ccr_cond *c = make_cond(&cfg, &a, 3);
    float x[B * D_IN], y[B * D_OUT], keep[B * D_OUT];
    ccr_gate_stats st;
    ccr_test_fill_uniform(rng, x, B * D_IN, -1, 1);
    for (int i = 0; i < B * D_OUT; i++)
        y[i] = keep[i] = 42.0f;
    CCR_CK_STATUS(ctx, ccr_cond_forward(c, x, 0, false, rng, y, &st), CCR_EBADLEN);
    CCR_CK_STATUS(ctx, ccr_cond_forward(c, x, B + 1, false, rng, y, &st), CCR_EBADLEN);
    x[7] = NAN;
    CCR_CK_STATUS(ctx, ccr_cond_forward(c, x, B, false, rng, y, &st), CCR_EDOM);
    ck_assert_mem_eq(y, keep, sizeof y);
    CCR_CK_STATUS(ctx, ccr_cond_backward(c, y, NULL), CCR_EINVAL);   /* no forward yet */
    ccr_cond_free(c);
    ccr_arena_free(a);
}
END_TEST

/* ---- the routed matmul against brute force -------------------------------- */

/* A user-defined gate type: emits a preset table (duplicates and -1s
 * included) and has no parameters. */
typedef struct fixed_state {
    size_t n_mat, slots;
    int32_t ids[B * 3];
    float w[B * 3];
    float dweights[B * 3];   /* what the layer passed back */
} fixed_state;

/* The test reaches into the instance it created (one at a time). */
static fixed_state *fixed_last;

static ccr_status fixed_init(void *s, ccr_ctx *c, const ccr_gate_config *cfg, size_t mb)
{
    UNUSED(c);
    UNUSED(mb);
    fixed_state *f = s;
    f->n_mat = cfg->n_experts;
    f->slots = 3;
    fixed_last = f;
    return CCR_OK;
}
static void fixed_free(void *s) { UNUSED(s); }
static size_t fixed_n_mat(const void *s) { return ((const fixed_state *)s)->n_mat; }
static size_t fixed_slots(const void *s) { return ((const fixed_state *)s)->slots; }
static ccr_status fixed_declare(void *s, ccr_arena *a, const char *p)
{
    UNUSED(s);
    UNUSED(a);
    UNUSED(p);
    return CCR_OK;
}
static ccr_status fixed_init_params(void *s, gsl_rng *r)
{
    UNUSED(s);
    UNUSED(r);
    return CCR_OK;
}
static ccr_status fixed_forward(void *s, const float *x, size_t batch, bool train, gsl_rng *r,
                                ccr_route *route, ccr_gate_stats *st)
{
    UNUSED(x);
    UNUSED(train);
    UNUSED(r);
    fixed_state *f = s;
    *route = (ccr_route){batch, f->slots, f->n_mat, f->ids, f->w};
    for (size_t i = 0; i < batch * f->slots; i++)
        st->dropped += f->ids[i] < 0;
    st->distinct = 1;
    return CCR_OK;
}
static ccr_status fixed_backward(void *s, const ccr_gate_bwd_args *a)
{
    fixed_state *f = s;
    memcpy(f->dweights, a->dweights, a->batch * f->slots * sizeof(float));
    return CCR_OK;
}
static double fixed_flops(const void *s, bool train)
{
    UNUSED(s);
    UNUSED(train);
    return 0.0;
}
static double fixed_mpe(const void *s) { return (double)((const fixed_state *)s)->slots; }

static const ccr_gate_type fixed_gate = {
    .name = "fixed", .paper = "test: a preset routing table", .param_group = "gate.",
    .state_size = sizeof(fixed_state), .init = fixed_init, .free = fixed_free,
    .n_matrices = fixed_n_mat, .slots = fixed_slots, .declare = fixed_declare,
    .init_params = fixed_init_params, .forward = fixed_forward, .backward = fixed_backward,
    .flops = fixed_flops, .matrices_per_example = fixed_mpe,
};

/* M_m(x) evaluated by plain loops from the arena (the specification). */
static void brute_matrix(const ccr_arena *a, ccr_bank_kind bank, size_t m, const float *x,
                         double *out)
{
    if (bank == CCR_BANK_LINEAR) {
        const float *w = ccr_arena_value(a, 0) + m * D_IN * D_OUT, *bb = ccr_arena_value(a, 1);
        for (size_t j = 0; j < D_OUT; j++) {
            double acc = bb[m * D_OUT + j];
            for (size_t i = 0; i < D_IN; i++)
                acc += (double)x[i] * w[i * D_OUT + j];
            out[j] = acc;
        }
        return;
    }
    const float *w1 = ccr_arena_value(a, 0) + m * D_IN * HID, *b1 = ccr_arena_value(a, 1);
    const float *w2 = ccr_arena_value(a, 2) + m * HID * D_OUT, *b2 = ccr_arena_value(a, 3);
    double h[HID];
    for (size_t j = 0; j < HID; j++) {
        double acc = b1[m * HID + j];
        for (size_t i = 0; i < D_IN; i++)
            acc += (double)x[i] * w1[i * HID + j];
        h[j] = acc > 0 ? acc : 0;
    }
    for (size_t j = 0; j < D_OUT; j++) {
        double acc = b2[m * D_OUT + j];
        for (size_t i = 0; i < HID; i++)
            acc += h[i] * w2[i * D_OUT + j];
        out[j] = acc;
    }
}

START_TEST(test_routed_matmul_brute_force)
{
    ccr_bank_kind bank = (ccr_bank_kind)_i;
    ccr_cond_config cfg = ccr_cond_config_default();
    cfg.gate = &fixed_gate;
    cfg.bank = bank;
    cfg.d_in = D_IN;
    cfg.d_out = D_OUT;
    cfg.hidden = HID;
    cfg.gate_cfg.n_experts = 5;
    ccr_arena *a;
    ccr_cond *c = make_cond(&cfg, &a, 8);
    fixed_state *f = fixed_last;
    float x[B * D_IN], y[B * D_OUT], dy[B * D_OUT], dx[B * D_IN];
    ccr_test_fill_uniform(rng, x, B * D_IN, -1, 1);
    ccr_test_fill_uniform(rng, dy, B * D_OUT, -1, 1);
    ccr_gate_stats st;
    for (size_t p = 0; p < B * 3; p++) {
        f->ids[p] = (int32_t)gsl_rng_uniform_int(rng, 6) - 1;   /* -1..4 */
        f->w[p] = (float)(gsl_rng_uniform(rng) * 2 - 0.5);
    }
    f->ids[0] = f->ids[1] = 2;   /* a duplicate: each copy must contribute */
    f->ids[2] = -1;
    CCR_CK_OK(ctx, ccr_cond_forward(c, x, B, false, rng, y, &st));
    double worst = 0.0;
    for (size_t b = 0; b < B; b++) {
        double want[D_OUT] = {0}, o[D_OUT];
        for (size_t s = 0; s < 3; s++) {
            int32_t id = f->ids[b * 3 + s];
            if (id < 0)
                continue;
            brute_matrix(a, bank, (size_t)id, x + b * D_IN, o);
            for (size_t j = 0; j < D_OUT; j++)
                want[j] += f->w[b * 3 + s] * o[j];
        }
        for (size_t j = 0; j < D_OUT; j++) {
            double e = fabs(want[j] - y[b * D_OUT + j]);
            worst = e > worst ? e : worst;
        }
    }
    ck_assert_msg(worst < 1e-5, "routed matmul differs from brute force by %g", worst);
    /* dL/dw for L = sum y . dy is <dy_b, M(x_b)>; dropped slots get 0. */
    CCR_CK_OK(ctx, ccr_cond_backward(c, dy, dx));
    for (size_t p = 0; p < B * 3; p++) {
        double want = 0.0, o[D_OUT];
        if (f->ids[p] >= 0) {
            brute_matrix(a, bank, (size_t)f->ids[p], x + (p / 3) * D_IN, o);
            for (size_t j = 0; j < D_OUT; j++)
                want += o[j] * dy[(p / 3) * D_OUT + j];
        }
        ck_assert_msg(fabs(want - f->dweights[p]) < 1e-5, "dweight[%zu] %g want %g", p,
                      (double)f->dweights[p], want);
    }
    ccr_cond_free(c);
    ccr_arena_free(a);
}
END_TEST

/* ---- the residual connection -------------------------------------------------- */

/* With cfg.residual the layer is y = x + routed(x): the same layer without
 * it (same parameters, same noise) plus x, bit for bit; an example the gate
 * drops comes out as x itself; parameter gradients are unchanged bit for
 * bit and dx gains dy; FLOPs gain d_out forward (analytic and counted) and
 * d_in backward. */
START_TEST(test_residual)
{
    const ccr_gate_type *t = ccr_gate_types()[_i];
    enum { D = D_IN };
    float x[B * D], dy[B * D], y0[B * D], y1[B * D], dx0[B * D], dx1[B * D];
    ccr_cond *c[2];
    ccr_arena *a[2];
    for (int res = 0; res < 2; res++) {
        ccr_cond_config cfg = config_for(t, CCR_BANK_FFN);
        cfg.d_out = D;
        cfg.gate_cfg.capacity_factor = 0.5;  /* switch: capacity 1, drops */
        cfg.gate_cfg.eval_capacity_factor = 0.5;  /* in evaluation too */
        cfg.residual = res;
        c[res] = make_cond(&cfg, &a[res], 33);
    }
    gsl_rng_set(rng, 5);
    ccr_test_fill_uniform(rng, x, B * D, -1, 1);
    ccr_test_fill_uniform(rng, dy, B * D, -1, 1);
    for (int train = 0; train < 2; train++) {
        ccr_gate_stats st0, st1;
        gsl_rng_set(rng, 77);
        CCR_CK_OK(ctx, ccr_cond_forward(c[0], x, B, train, rng, y0, &st0));
        gsl_rng_set(rng, 77);
        CCR_CK_OK(ctx, ccr_cond_forward(c[1], x, B, train, rng, y1, &st1));
        for (size_t i = 0; i < B * D; i++) {
            float want = y0[i] + x[i];
            ck_assert_msg(memcmp(&y1[i], &want, sizeof want) == 0, "%s: y[%zu] %g != %g + %g",
                          t->name, i, y1[i], y0[i], x[i]);
        }
        /* Rows routed nowhere (dropped) pass through unchanged. */
        const ccr_route *r = ccr_cond_route(c[1]);
        size_t passed = 0;
        for (size_t b = 0; b < B; b++) {
            bool any = false;
            for (size_t s = 0; s < r->slots; s++)
                any = any || r->ids[b * r->slots + s] >= 0;
            if (!any) {
                ck_assert_mem_eq(y1 + b * D, x + b * D, D * sizeof *x);
                passed++;
            }
        }
        if (strcmp(t->name, "switch") == 0)
            ck_assert_int_gt((int)passed, 0);  /* capacity 1 of 8 experts, B = 12 */
        ck_assert_int_eq((int)st1.dropped, (int)st0.dropped);
        ck_assert_double_eq_tol(st1.flops_counted - st0.flops_counted, D, 1e-9);
        ck_assert_double_eq_tol(ccr_cond_flops(c[1], train) - ccr_cond_flops(c[0], train), D,
                                1e-9);
        for (int res = 0; res < 2; res++)
            CCR_CK_OK(ctx, ccr_arena_zero_grad(a[res]));
        CCR_CK_OK(ctx, ccr_cond_backward(c[0], dy, dx0));
        CCR_CK_OK(ctx, ccr_cond_backward(c[1], dy, dx1));
        for (size_t ti = 0; ti < ccr_arena_count(a[0]); ti++)
            ck_assert_mem_eq(ccr_arena_grad(a[0], ti), ccr_arena_grad(a[1], ti),
                             ccr_arena_size(a[0], ti) * sizeof(float));
        for (size_t i = 0; i < B * D; i++)
            ck_assert_msg(fabsf(dx1[i] - (dx0[i] + dy[i])) <= 1e-6f * (1 + fabsf(dx1[i])),
                          "%s: dx[%zu] %g != %g + %g", t->name, i, dx1[i], dx0[i], dy[i]);
    }
    ck_assert_double_eq_tol(ccr_cond_flops_bwd(c[1], true) - ccr_cond_flops_bwd(c[0], true), D,
                            1e-9);
    ck_assert_double_eq(ccr_cond_flops_bwd(c[1], false), ccr_cond_flops_bwd(c[0], false));
    for (int res = 0; res < 2; res++) {
        ccr_cond_free(c[res]);
        ccr_arena_free(a[res]);
    }
}
END_TEST

/* ---- finite differences through the conditional layer --------------------- */

/* L = sum(y . r) + aux_loss, with the gate's noise reset to one seed. */
static double layer_loss(ccr_cond *c, const float *x, const float *r, bool train,
                         int32_t *ids_out)
{
    float y[B * D_OUT];
    ccr_gate_stats st;
    gsl_rng_set(rng, 1234);
    ccr_status s = ccr_cond_forward(c, x, B, train, rng, y, &st);
    ck_assert_int_eq(s, CCR_OK);
    double L = st.aux_loss;
    for (size_t i = 0; i < B * D_OUT; i++)
        L += (double)y[i] * r[i];
    const ccr_route *rt = ccr_cond_route(c);
    if (ids_out != NULL)
        memcpy(ids_out, rt->ids, B * rt->slots * sizeof(int32_t));
    return L;
}

/* A ReLU kink (or a routing change) between x-h and x+h shows as one-sided
 * differences that disagree; a wrong gradient does not. */
static bool kink(double lp, double l0, double lm, double h)
{
    double fwd = (lp - l0) / h, bwd = (l0 - lm) / h;
    return fabs(fwd - bwd) > 2e-3 + 0.05 * fabs(fwd + bwd) / 2;
}

static bool same_ids(const int32_t *a, const int32_t *b, size_t n)
{
    return memcmp(a, b, n * sizeof *a) == 0;
}

/* One finite-difference probe of coordinate *v of the layer's loss.
 * Returns false (skipped) when the routing or a ReLU kink lies within +-h;
 * otherwise asserts the analytic derivative `ana` and returns true. */
typedef struct fd_case {
    ccr_cond *c;
    const float *x, *r;
    bool train;
    const int32_t *ids0;
    int32_t *ids1;
    size_t n_ids;
    double l0;
    const char *label;
} fd_case;

static bool fd_coord(const fd_case *f, float *v, float ana, const char *what, size_t i)
{
    /* Small enough that few ReLU kinks of the FFN experts are crossed,
     * large enough that float rounding stays below the tolerance. */
    const float h = 2e-3f;
    float keep = *v;
    *v = keep + h;
    double lp = layer_loss(f->c, f->x, f->r, f->train, f->ids1);
    bool ok = same_ids(f->ids0, f->ids1, f->n_ids);
    *v = keep - h;
    double lm = layer_loss(f->c, f->x, f->r, f->train, f->ids1);
    ok = ok && same_ids(f->ids0, f->ids1, f->n_ids);
    *v = keep;
    if (!ok || kink(lp, f->l0, lm, h))
        return false;
    double num = (lp - lm) / (2.0 * h);
    ck_assert_msg(fabs(num - ana) <= 3e-3 + 3e-2 * fabs(num),
                  "%s train=%d: d/d%s[%zu] analytic %.6g numeric %.6g", f->label, f->train,
                  what, i, ana, num);
    return true;
}

START_TEST(test_layer_fd)
{
    const ccr_gate_type *t = ccr_gate_types()[_i / 2];
    ccr_bank_kind bank = (ccr_bank_kind)(_i % 2);
    ccr_cond_config cfg = config_for(t, bank);
    cfg.gate_cfg.z_loss = 0.01;
    /* The straight-through gradient is not the loss's derivative (which is 0
     * for the bits): test_gate_signtree checks it against its definition. */
    cfg.gate_cfg.grad_mode = CCR_GRAD_NONE;
    ccr_arena *a;
    ccr_cond *c = make_cond(&cfg, &a, 21);
    size_t slots = ccr_gate_slots(ccr_cond_gate(c));
    int32_t *ids0 = malloc(B * slots * sizeof *ids0), *ids1 = malloc(B * slots * sizeof *ids1);
    float x[B * D_IN], r[B * D_OUT], dx[B * D_IN];
    char label[64];
    snprintf(label, sizeof label, "%s/%s", t->name, bank ? "linear" : "ffn");
    ccr_test_fill_uniform(rng, x, B * D_IN, -1, 1);
    ccr_test_fill_uniform(rng, r, B * D_OUT, -1, 1);
    for (int train = 0; train < 2; train++) {
        CCR_CK_OK(ctx, ccr_arena_zero_grad(a));
        fd_case f = {c, x, r, train, ids0, ids1, B * slots, 0.0, label};
        f.l0 = layer_loss(c, x, r, train, ids0);
        CCR_CK_OK(ctx, ccr_cond_backward(c, r, dx));
        size_t checked = 0, skipped = 0;
        for (size_t ti = 0; ti < ccr_arena_count(a); ti++) {
            float *v = ccr_arena_value(a, ti), *g = ccr_arena_grad(a, ti);
            size_t n = ccr_arena_size(a, ti), step = n > 40 ? n / 40 : 1;
            for (size_t i = 0; i < n; i += step) {
                bool done = fd_coord(&f, &v[i], g[i], ccr_arena_name(a, ti), i);
                checked += done;
                skipped += !done;
            }
        }
        for (size_t i = 0; i < B * D_IN; i++) {
            bool done = fd_coord(&f, &x[i], dx[i], "x", i);
            checked += done;
            skipped += !done;
        }
        ck_assert_msg(skipped * 5 < checked, "%s: %zu of %zu coordinates changed the routing",
                      t->name, skipped, checked + skipped);
    }
    free(ids0);
    free(ids1);
    ccr_cond_free(c);
    ccr_arena_free(a);
}
END_TEST

/* ---- a network with a conditional layer trains ----------------------------- */

START_TEST(test_net_trains)
{
    const ccr_gate_type *t = ccr_gate_types()[_i];
    const size_t n = 600, d = 8;
    float *x = malloc(n * d * sizeof *x);
    int32_t *y = malloc(n * sizeof *y);
    ccr_test_fill_uniform(rng, x, n * d, -1, 1);
    for (size_t i = 0; i < n; i++)
        y[i] = (x[i * d] > 0) + 2 * (x[i * d + 1] > 0);
    ccr_net *net;
    CCR_CK_OK(ctx, ccr_net_init(be, d, 50, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 16));
    CCR_CK_OK(ctx, ccr_net_add_act(net, CCR_ACT_RELU));
    ccr_cond_config cc = config_for(t, strcmp(t->name, "signtree") == 0 ? CCR_BANK_LINEAR
                                                                        : CCR_BANK_FFN);
    cc.d_out = 16;
    cc.hidden = 16;
    cc.gate_cfg.randomize = false;   /* each gate's default initialisation */
    CCR_CK_OK(ctx, ccr_net_add_cond(net, &cc));
    CCR_CK_OK(ctx, ccr_net_add_act(net, CCR_ACT_RELU));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 4));
    CCR_CK_OK(ctx, ccr_net_finalize(net, rng));
    ccr_layer_info info;
    CCR_CK_OK(ctx, ccr_net_layer_info(net, 2, &info));
    ck_assert_str_eq(info.kind, t->name);
    ccr_cond *cond;
    CCR_CK_OK(ctx, ccr_net_cond(net, 2, &cond, NULL));
    ck_assert_int_eq((int)info.n_params, (int)ccr_cond_n_params(cond));
    CCR_CK_STATUS(ctx, ccr_net_cond(net, 1, &cond, NULL), CCR_EINVAL);
    ccr_optim *o;
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    oc.lr = 0.01f;
    CCR_CK_OK(ctx, ccr_optim_init(ccr_net_params(net), &oc, &o));
    ccr_step_stats st, first = {0};
    for (int epoch = 0; epoch < 15; epoch++) {
        for (size_t i0 = 0; i0 < 500; i0 += 50) {
            CCR_CK_OK(ctx, ccr_train_step(net, o, rng, x + i0 * d, y + i0, 50, &st));
            ck_assert_msg(isfinite(st.loss) && isfinite(st.aux_loss), "%s: NaN", t->name);
            if (epoch == 0 && i0 == 0)
                first = st;
        }
    }
    ccr_step_stats test;
    CCR_CK_OK(ctx, ccr_net_eval(net, x + 500 * d, y + 500, 100, &test));
    ck_assert_msg(test.loss < first.loss * 0.7, "%s: loss %g -> %g", t->name, first.loss,
                  test.loss);
    ck_assert_msg(test.correct > 60, "%s: %zu/100 correct", t->name, test.correct);
    /* The default initialisation routes examples to more than one matrix
     * (zeros would tie Switch's logits and the tree's sign bits). */
    ccr_gate_stats gs;
    CCR_CK_OK(ctx, ccr_net_cond(net, 2, NULL, &gs));
    if (strcmp(t->name, "none") != 0)
        ck_assert_msg(gs.distinct > 1, "%s: every example on one matrix", t->name);
    ccr_optim_free(o);
    ccr_net_free(net);
    free(x);
    free(y);
}
END_TEST

static Suite *gates_suite(void)
{
    Suite *s = suite_create("gates");
    TCase *tc = tcase_create("conformance");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    int n = (int)n_types();
    tcase_add_test(tc, test_registry);
    tcase_add_loop_test(tc, test_conformance, 0, n);
    tcase_add_loop_test(tc, test_bad_configs, 0, n);
    tcase_add_loop_test(tc, test_forward_errors, 0, n);
    tcase_add_loop_test(tc, test_residual, 0, n);
    tcase_add_loop_test(tc, test_routed_matmul_brute_force, 0, 2);
    tcase_add_loop_test(tc, test_layer_fd, 0, 2 * n);
    tcase_add_loop_test(tc, test_net_trains, 0, n);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return ccr_test_run(gates_suite()); }
