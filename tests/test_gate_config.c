/*
 * test_gate_config.c - swapping gates by name (issue 9, class 5): the
 * library's defaults are the drivers', per gate; the options each gate
 * uses; an unknown gate named in the error; the route-count helper.
 *
 * The drivers' configuration path is the real one: drv_gate_defaults,
 * drv_parse_gate_option("--gate", NAME) and drv_gate_finish from
 * experiments/common.c (linked from the ccr_drv library).
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "../experiments/common.h"
#include "ccr_test.h"

enum { D_IN = 6, D_OUT = 5, B = 12 };

static ccr_ctx *ctx;
static ccr_backend *be;
static gsl_rng *rng;

static void setup(void)
{
    ck_assert_int_eq(ccr_ctx_init(&ctx), CCR_OK);
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    rng = ccr_test_rng(7);
}

static void teardown(void)
{
    gsl_rng_free(rng);
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
}

/* A net d_in -> cond(cfg) -> D_OUT, finalized from seed. */
static ccr_net *net_with(const ccr_cond_config *cfg, unsigned long seed)
{
    ccr_net *net;
    CCR_CK_OK(ctx, ccr_net_init(be, D_IN, B, &net));
    CCR_CK_OK(ctx, ccr_net_add_cond(net, cfg));
    gsl_rng_set(rng, seed);
    CCR_CK_OK(ctx, ccr_net_finalize(net, rng));
    return net;
}

/* A standalone layer of cfg in an arena of its own, initialised from rng. */
static ccr_cond *layer_with(const ccr_cond_config *cfg, ccr_arena **ar)
{
    ccr_cond *l;
    CCR_CK_OK(ctx, ccr_cond_alloc(be, cfg, B, &l));
    CCR_CK_OK(ctx, ccr_arena_init(be, ar));
    CCR_CK_OK(ctx, ccr_cond_declare(l, *ar, ""));
    CCR_CK_OK(ctx, ccr_arena_finalize(*ar));
    CCR_CK_OK(ctx, ccr_cond_init_params(l, rng));
    return l;
}

static ccr_cond *cond_of(ccr_net *net)
{
    ccr_cond *c;
    CCR_CK_OK(ctx, ccr_net_cond(net, 0, &c, NULL));
    return c;
}

/* ---- every gate by name alone gets what the drivers give it --------------- */

START_TEST(test_swap_by_name)
{
    const ccr_gate_type *t = ccr_gate_types()[_i];
    /* A program: the library's defaults, only the name changed. */
    ccr_cond_config lib = ccr_cond_config_default();
    lib.gate_name = t->name;
    lib.d_out = D_OUT;
    /* A driver: --gate NAME and nothing else. */
    ccr_cond_config drv = drv_gate_defaults();
    bool used;
    ck_assert(drv_parse_gate_option("test", "--gate", t->name, &drv, &used));
    ck_assert(used);
    drv_gate_finish("test", &drv, false);
    drv.d_out = D_OUT;
    ck_assert_ptr_eq(drv.gate, t);

    ccr_net *a = net_with(&lib, 3), *b = net_with(&drv, 3);
    ccr_cond *ca = cond_of(a), *cb = cond_of(b);
    ck_assert_ptr_eq(ccr_gate_get_type(ccr_cond_gate(ca)), t);
    ck_assert_int_eq(ccr_cond_bank(ca), ccr_cond_bank(cb));
    ck_assert_int_eq(ccr_cond_bank(ca), ccr_cond_config_bank(&drv));
    /* The sign-bit tree gets Cho & Bengio's linear nodes, the others FFN experts. */
    ck_assert_int_eq(ccr_cond_bank(ca), t->linear_bank ? CCR_BANK_LINEAR : CCR_BANK_FFN);
    ck_assert_int_eq(ccr_cond_bank(ca), strcmp(t->name, "signtree") == 0 ? CCR_BANK_LINEAR
                                                                        : CCR_BANK_FFN);
    ck_assert_uint_eq(ccr_net_n_params(a), ccr_net_n_params(b));
    ck_assert_uint_eq(ccr_cond_n_params(ca), ccr_cond_n_params(cb));
    ck_assert_uint_eq(ccr_gate_n_matrices(ccr_cond_gate(ca)),
                      ccr_gate_n_matrices(ccr_cond_gate(cb)));
    ck_assert_uint_eq(ccr_gate_slots(ccr_cond_gate(ca)), ccr_gate_slots(ccr_cond_gate(cb)));
    for (int train = 0; train < 2; train++)
        ck_assert(ccr_cond_flops(ca, train) == ccr_cond_flops(cb, train));
    ck_assert(ccr_cond_matrix_flops(ca) == ccr_cond_matrix_flops(cb));
    /* Same checkpoint: the driver's file loads into the program's net (the
     * architecture strings agree) and gives the same outputs. */
    char path[256];
    snprintf(path, sizeof path, "%s", ccr_test_path("swap.safetensors"));
    CCR_CK_OK(ctx, ccr_net_save(b, path));
    CCR_CK_OK(ctx, ccr_net_load(a, path));
    remove(path);
    float x[B * D_IN];
    ccr_test_fill_uniform(rng, x, B * D_IN, -1, 1);
    const float *ya, *yb;
    CCR_CK_OK(ctx, ccr_net_forward(a, x, B, &ya));
    CCR_CK_OK(ctx, ccr_net_forward(b, x, B, &yb));
    ck_assert_mem_eq(ya, yb, B * D_OUT * sizeof *ya);
    ccr_net_free(a);
    ccr_net_free(b);
}
END_TEST

START_TEST(test_defaults_one_place)
{
    /* The drivers' usage states these; the library is where they live. */
    ccr_gate_config g = ccr_gate_config_default();
    ck_assert_uint_eq(g.n_experts, 8);
    ck_assert_uint_eq(g.k, 2);
    ck_assert_uint_eq(g.n_groups, 2);
    ck_assert_uint_eq(g.k_groups, 2);
    ck_assert_uint_eq(g.k2, 2);
    ck_assert_uint_eq(g.depth, 4);
    ck_assert(g.capacity_factor == 1.25 && g.eval_capacity_factor == 0.0);
    ccr_cond_config c = ccr_cond_config_default();
    ck_assert_int_eq(c.bank, CCR_BANK_DEFAULT);
    ck_assert_uint_eq(c.hidden, 64);
    ccr_cond_config d = drv_gate_defaults();
    const ccr_gate_config *x = &d.gate_cfg, *y = &c.gate_cfg;
    ck_assert(x->n_experts == y->n_experts && x->k == y->k && x->n_groups == y->n_groups &&
              x->k_groups == y->k_groups && x->k2 == y->k2 && x->depth == y->depth &&
              x->combine == y->combine && x->bits_from == y->bits_from &&
              x->grad_mode == y->grad_mode && x->capacity_factor == y->capacity_factor &&
              x->eval_capacity_factor == y->eval_capacity_factor &&
              x->w_importance == y->w_importance && x->w_load == y->w_load &&
              x->aux_alpha == y->aux_alpha && x->z_loss == y->z_loss &&
              x->noise_eps == y->noise_eps && x->randomize == y->randomize);
    ck_assert_int_eq(d.bank, c.bank);
    ck_assert_uint_eq(d.hidden, c.hidden);
    /* Every gate accepts the defaults as they are (none ignores n_experts). */
    for (const ccr_gate_type *const *t = ccr_gate_types(); *t; t++) {
        ccr_gate_config gc = ccr_gate_config_default();
        gc.d_in = D_IN;
        ccr_gate *gate;
        CCR_CK_OK(ctx, ccr_gate_alloc(ctx, *t, &gc, B, &gate));
        ccr_gate_free(gate);
    }
    /* k means experts for topk only; hmoe's groups per example is k_groups. */
    ccr_gate_config h = ccr_gate_config_default();
    h.d_in = D_IN;
    h.k = 99; /* not read by hmoe */
    h.k_groups = 1;
    ccr_gate *gate;
    CCR_CK_OK(ctx, ccr_gate_alloc(ctx, &ccr_gate_hmoe, &h, B, &gate));
    ck_assert_uint_eq(ccr_gate_slots(gate), 1 * h.k2);
    ccr_gate_free(gate);
}
END_TEST

/* ---- the options each gate uses ------------------------------------------- */

START_TEST(test_options_mask)
{
    const char *seen[CCR_GATE_N_OPTIONS];
    for (unsigned i = 0; i < CCR_GATE_N_OPTIONS; i++) {
        seen[i] = ccr_gate_option_name((ccr_gate_option)(1u << i));
        ck_assert_ptr_nonnull(seen[i]);
        for (unsigned j = 0; j < i; j++)
            ck_assert_str_ne(seen[i], seen[j]);
    }
    ck_assert_ptr_null(ccr_gate_option_name((ccr_gate_option)0));
    ck_assert_ptr_null(ccr_gate_option_name((ccr_gate_option)3));
    ck_assert_ptr_null(ccr_gate_option_name((ccr_gate_option)(1u << CCR_GATE_N_OPTIONS)));
    ck_assert_str_eq(ccr_gate_option_name(CCR_GATE_OPT_K_GROUPS), "k_groups");
    ck_assert(!ccr_gate_type_uses(NULL, CCR_GATE_OPT_K));
    ck_assert_uint_eq(ccr_gate_none.options, 0);
    ck_assert(ccr_gate_type_uses(&ccr_gate_topk, CCR_GATE_OPT_K));
    ck_assert(!ccr_gate_type_uses(&ccr_gate_hmoe, CCR_GATE_OPT_K));
    ck_assert(ccr_gate_type_uses(&ccr_gate_hmoe, CCR_GATE_OPT_K_GROUPS));
    ck_assert(ccr_gate_type_uses(&ccr_gate_dense, CCR_GATE_OPT_W_IMPORTANCE));
    ck_assert(!ccr_gate_type_uses(&ccr_gate_dense, CCR_GATE_OPT_W_LOAD));
    ck_assert(ccr_gate_type_uses(&ccr_gate_switch, CCR_GATE_OPT_EVAL_CAPACITY_FACTOR));
    ck_assert(!ccr_gate_type_uses(&ccr_gate_signtree, CCR_GATE_OPT_N_EXPERTS));
    ck_assert(ccr_gate_type_uses(&ccr_gate_signtree, CCR_GATE_OPT_DEPTH));
    ck_assert(!ccr_gate_type_uses(&ccr_gate_switch, CCR_GATE_OPT_W_IMPORTANCE));
    for (const ccr_gate_type *const *t = ccr_gate_types(); *t; t++)
        ck_assert_uint_eq((*t)->options >> CCR_GATE_N_OPTIONS, 0);
}
END_TEST

/* A mask that lies is caught: changing an option the gate says it ignores
 * must change nothing (n_matrices, slots, FLOPs, the routing of one batch). */
START_TEST(test_options_mask_honest)
{
    const ccr_gate_type *t = ccr_gate_types()[_i];
    float x[B * D_IN];
    ccr_test_fill_uniform(rng, x, B * D_IN, -2, 2);
    for (unsigned i = 0; i < CCR_GATE_N_OPTIONS; i++) {
        ccr_gate_option o = (ccr_gate_option)(1u << i);
        if (ccr_gate_type_uses(t, o))
            continue;
        ccr_cond_config c[2];
        ccr_cond *l[2];
        ccr_arena *ar[2];
        int32_t ids[2][2][B * 64];
        float y[2][2][B * D_OUT];
        double aux[2][2];
        for (int v = 0; v < 2; v++) {
            c[v] = ccr_cond_config_default();
            c[v].gate = t;
            c[v].d_in = D_IN;
            c[v].d_out = D_OUT;
            c[v].gate_cfg.randomize = true;
            if (v == 1) { /* other valid values of every unused field */
                ccr_gate_config *g = &c[v].gate_cfg;
                switch (o) {
                case CCR_GATE_OPT_N_EXPERTS: g->n_experts = 4; break;
                case CCR_GATE_OPT_K: g->k = 1; break;
                case CCR_GATE_OPT_N_GROUPS: g->n_groups = 4; break;
                case CCR_GATE_OPT_K_GROUPS: g->k_groups = 1; break;
                case CCR_GATE_OPT_K2: g->k2 = 1; break;
                case CCR_GATE_OPT_DEPTH: g->depth = 2; break;
                case CCR_GATE_OPT_COMBINE: g->combine = CCR_COMBINE_LEAF; break;
                case CCR_GATE_OPT_BITS_FROM: g->bits_from = CCR_BITS_INPUT; break;
                case CCR_GATE_OPT_GRAD_MODE: g->grad_mode = CCR_GRAD_STE; break;
                case CCR_GATE_OPT_CAPACITY_FACTOR: g->capacity_factor = 0.1; break;
                case CCR_GATE_OPT_EVAL_CAPACITY_FACTOR: g->eval_capacity_factor = 0.1; break;
                case CCR_GATE_OPT_W_IMPORTANCE: g->w_importance = 3.0; break;
                case CCR_GATE_OPT_W_LOAD: g->w_load = 3.0; break;
                case CCR_GATE_OPT_AUX_ALPHA: g->aux_alpha = 3.0; break;
                case CCR_GATE_OPT_Z_LOSS: g->z_loss = 3.0; break;
                case CCR_GATE_OPT_NOISE_EPS: g->noise_eps = 3.0; break;
                case CCR_GATE_OPT_RANDOMIZE: g->randomize = false; break;
                }
            }
            gsl_rng_set(rng, 21);
            l[v] = layer_with(&c[v], &ar[v]);
            for (int train = 0; train < 2; train++) { /* both capacities */
                ccr_gate_stats st;
                gsl_rng_set(rng, 22);
                CCR_CK_OK(ctx, ccr_cond_forward(l[v], x, B, train, rng, y[v][train], &st));
                const ccr_route *r = ccr_cond_route(l[v]);
                ck_assert_uint_le(r->slots, 64);
                memcpy(ids[v][train], r->ids, B * r->slots * sizeof(int32_t));
                aux[v][train] = st.aux_loss;
            }
        }
        const ccr_route *r0 = ccr_cond_route(l[0]), *r1 = ccr_cond_route(l[1]);
        ck_assert_msg(r0->slots == r1->slots && r0->n_matrices == r1->n_matrices,
                      "%s: %s changes the table's shape", t->name, ccr_gate_option_name(o));
        for (int train = 0; train < 2; train++)
            ck_assert_msg(memcmp(ids[0][train], ids[1][train], B * r0->slots * 4) == 0 &&
                              memcmp(y[0][train], y[1][train], sizeof y[0][0]) == 0 &&
                              aux[0][train] == aux[1][train],
                          "%s: %s changes the routing, output or aux loss, but the gate "
                          "says it does not use it", t->name, ccr_gate_option_name(o));
        ck_assert(ccr_cond_flops(l[0], true) == ccr_cond_flops(l[1], true));
        for (int v = 0; v < 2; v++) {
            ccr_cond_free(l[v]);
            ccr_arena_free(ar[v]);
        }
    }
}
END_TEST

/* ---- an unknown gate is named ----------------------------------------------- */

START_TEST(test_unknown_gate_named)
{
    const ccr_gate_type *t = &ccr_gate_none;
    CCR_CK_STATUS(ctx, ccr_gate_type_lookup(ctx, "sparse-moe", &t), CCR_EINVAL);
    ck_assert_ptr_eq(t, &ccr_gate_none);
    ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "'sparse-moe'"));
    ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), ccr_gate_type_names()));
    CCR_CK_OK(ctx, ccr_gate_type_lookup(ctx, "hmoe", &t));
    ck_assert_ptr_eq(t, &ccr_gate_hmoe);

    ccr_cond_config c = ccr_cond_config_default();
    c.d_in = D_IN;
    c.d_out = D_OUT;
    c.gate_name = "topK";
    ccr_cond *l = NULL;
    CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &c, B, &l), CCR_EINVAL);
    ck_assert_ptr_null(l);
    ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "'topK'"));
    ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "signtree"));
    c.gate_name = NULL;
    CCR_CK_STATUS(ctx, ccr_cond_alloc(be, &c, B, &l), CCR_EINVAL);
    ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "switch"));
    ccr_gate_config g = ccr_gate_config_default();
    g.d_in = D_IN;
    ccr_gate *gate = NULL;
    CCR_CK_STATUS(ctx, ccr_gate_alloc(ctx, ccr_gate_type_find("nosuch"), &g, B, &gate),
                  CCR_EINVAL);
    ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), ccr_gate_type_names()));
}
END_TEST

/* ---- per-matrix load, the same way for every gate --------------------------- */

START_TEST(test_route_counts)
{
    const ccr_gate_type *t = ccr_gate_types()[_i];
    ccr_cond_config c = ccr_cond_config_default();
    c.gate = t;
    c.d_in = D_IN;
    c.d_out = D_OUT;
    c.gate_cfg.randomize = true;
    c.gate_cfg.capacity_factor = 0.5; /* switch drops in training */
    ccr_arena *ar;
    ccr_cond *l = layer_with(&c, &ar);
    float x[B * D_IN], y[B * D_OUT];
    ccr_test_fill_uniform(rng, x, B * D_IN, -1, 1);
    ccr_gate_stats st;
    CCR_CK_OK(ctx, ccr_cond_forward(l, x, B, true, rng, y, &st));
    const ccr_route *r = ccr_cond_route(l);
    size_t n = ccr_gate_n_matrices(ccr_cond_gate(l)), counts[64], want[64] = {0}, routed = 0;
    ck_assert_uint_le(n, 64);
    size_t used = 0;
    for (size_t p = 0; p < r->batch * r->slots; p++)
        if (r->ids[p] >= 0) {
            want[r->ids[p]]++;
            used++;
        }
    CCR_CK_OK(ctx, ccr_route_counts(ctx, r, counts, n, &routed));
    ck_assert_mem_eq(counts, want, n * sizeof *counts);
    ck_assert_uint_eq(routed, used);
    /* Every example's slots, less the drops. */
    ck_assert_double_eq_tol((double)routed,
                            B * ccr_gate_matrices_per_example(ccr_cond_gate(l)) -
                                (double)st.dropped, 1e-9);
    if (t == &ccr_gate_switch) {
        /* The kept counts are the "load" export. */
        const char *name;
        size_t rank, shape[4];
        const float *data;
        CCR_CK_OK(ctx, ccr_gate_get_export(ccr_cond_gate(l), 1, &name, &rank, shape, &data));
        ck_assert_str_eq(name, "load");
        for (size_t m = 0; m < n; m++)
            ck_assert(data[m] == (float)counts[m]);
        ck_assert_uint_gt(st.dropped, 0);
    }
    CCR_CK_STATUS(ctx, ccr_route_counts(ctx, r, counts, n + 1, NULL), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_route_counts(ctx, NULL, counts, n, NULL), CCR_EINVAL);
    ccr_cond_free(l);
    ccr_arena_free(ar);
}
END_TEST

/* The exports table in ccr_gate.h: names and ranks of every gate. */
START_TEST(test_exports_table)
{
    static const struct {
        const char *gate, *names;
    } table[] = {
        {"none", "importance:1,load:1"},
        {"dense", "importance:1,load:1"},
        {"topk", "noise:2,importance:1,load:1"},
        {"hmoe", "noise.primary:2,noise.secondary:3,importance:2,load:2"},
        {"switch", "importance:1,load:1,choice:1"},
        {"signtree", "importance:1,load:1,leaf_counts:1,bits:2,a:2"},
    };
    ck_assert_uint_eq(sizeof table / sizeof table[0], 6);
    for (size_t i = 0; i < 6; i++) {
        const ccr_gate_type *t = ccr_gate_type_find(table[i].gate);
        ck_assert_ptr_nonnull(t);
        ccr_gate_config g = ccr_gate_config_default();
        g.d_in = D_IN;
        ccr_gate *gate;
        CCR_CK_OK(ctx, ccr_gate_alloc(ctx, t, &g, B, &gate));
        char got[256] = "";
        for (size_t e = 0; e < ccr_gate_n_exports(gate); e++) {
            const char *name;
            size_t rank, shape[4];
            const float *data;
            CCR_CK_OK(ctx, ccr_gate_get_export(gate, e, &name, &rank, shape, &data));
            char item[64];
            snprintf(item, sizeof item, "%s%s:%zu", e ? "," : "", name, rank);
            strncat(got, item, sizeof got - strlen(got) - 1);
        }
        ck_assert_str_eq(got, table[i].names);
        ccr_gate_free(gate);
    }
}
END_TEST

static Suite *suite(void)
{
    size_t n = 0;
    while (ccr_gate_types()[n] != NULL)
        n++;
    Suite *s = suite_create("gate_config");
    TCase *tc = tcase_create("config");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_swap_by_name, 0, (int)n);
    tcase_add_test(tc, test_defaults_one_place);
    tcase_add_test(tc, test_options_mask);
    tcase_add_loop_test(tc, test_options_mask_honest, 0, (int)n);
    tcase_add_test(tc, test_unknown_gate_named);
    tcase_add_loop_test(tc, test_route_counts, 0, (int)n);
    tcase_add_test(tc, test_exports_table);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return ccr_test_run(suite()); }
