/*
 * test_drv_args.c - the drivers' option-value grammar (experiments/common.c):
 * sizes, seeds, doubles, lists and gate options accept plain numbers only,
 * the non-exiting drv_scan_* cores report why, and the exiting drv_parse_*
 * wrappers exit 2 on every rejected value.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ccr_test.h"
#include "common.h"

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

/* ---- sizes ---- */

static const char *const bad_sizes[] = {
    "",    " 1",  "1 ",   " -1", "-1",   "+1",  "1e3", "0x10", "1.0", "1,2", "abc",
    "1\n", "\t2", "-0",   "1k",  "0b1",  "١",   "18446744073709551616",
    "99999999999999999999999",
};

START_TEST(test_size_bad)
{
    drv_err e = {{0}};
    size_t x = 42;
    ck_assert_msg(!drv_scan_size("--batch", bad_sizes[_i], 0, &x, &e), "accepted '%s'",
                  bad_sizes[_i]);
    ck_assert_uint_eq(x, 42);
    ck_assert_ptr_nonnull(strstr(e.msg, "--batch"));
}
END_TEST

START_TEST(test_size_good)
{
    static const struct {
        const char *v;
        size_t want;
    } good[] = {{"0", 0}, {"1", 1}, {"007", 7}, {"128", 128},
                {"18446744073709551615", SIZE_MAX}};
    drv_err e;
    for (size_t i = 0; i < N_OF(good); i++) {
        size_t x = 0;
        ck_assert_msg(drv_scan_size("--n", good[i].v, 0, &x, &e), "%s: %s", good[i].v, e.msg);
        ck_assert_uint_eq(x, good[i].want);
    }
    size_t x = 0;
    ck_assert(!drv_scan_size("--n", "0", 1, &x, &e));
    ck_assert_ptr_nonnull(strstr(e.msg, ">= 1"));
    ck_assert(!drv_scan_size("--n", NULL, 0, &x, &e));
    ck_assert_ptr_nonnull(strstr(e.msg, "needs a value"));
}
END_TEST

/* ---- seeds: GSL's MT19937 keeps 32 bits and maps 0 to 4357 ---- */

START_TEST(test_seed)
{
    drv_err e;
    unsigned long s = 0;
    ck_assert(drv_scan_seed("--seed", "1", &s, &e) && s == 1);
    ck_assert(drv_scan_seed("--seed", "4294967295", &s, &e) && s == 4294967295UL);
    static const char *const bad[] = {"0", "4294967296", "18446744073709551615", "-1", " 7",
                                      "7 ", "1e3", ""};
    for (size_t i = 0; i < N_OF(bad); i++)
        ck_assert_msg(!drv_scan_seed("--seed", bad[i], &s, &e), "accepted '%s'", bad[i]);
}
END_TEST

/* ---- doubles ---- */

static const char *const bad_doubles[] = {
    "",     "nan",  "NaN",   "-nan", "inf",   "-inf", "infinity", " 0.5", "0.5 ", "+0.5",
    "0x1p-3", "1e", "1e+",  ".",    "-",     "e3",   "1.2.3",    "1e400", "-1e400", "1e-400",
    "0,5",  "1f",   "--1",  "- 1",  "1e3.5",
};

START_TEST(test_double_bad)
{
    drv_err e = {{0}};
    double x = 42;
    ck_assert_msg(!drv_scan_double("--lr", bad_doubles[_i], -1e9, 1e9, &x, &e),
                  "accepted '%s'", bad_doubles[_i]);
    ck_assert(x == 42);
    ck_assert_ptr_nonnull(strstr(e.msg, "--lr"));
}
END_TEST

START_TEST(test_double_good)
{
    static const struct {
        const char *v;
        double want;
    } good[] = {{"0", 0}, {"0.5", 0.5}, {".5", 0.5}, {"5.", 5}, {"1e-3", 1e-3},
                {"1E2", 100}, {"2.5e+1", 25}, {"-2.5", -2.5}, {"-.25", -0.25}};
    drv_err e;
    for (size_t i = 0; i < N_OF(good); i++) {
        double x = -99;
        ck_assert_msg(drv_scan_double("--x", good[i].v, -10, 1e3, &x, &e), "%s: %s",
                      good[i].v, e.msg);
        ck_assert(x == good[i].want);
    }
    double x;
    /* No sign where the range is non-negative, not even "-0". */
    ck_assert(!drv_scan_double("--x", "-0", 0, 1, &x, &e));
    ck_assert(!drv_scan_double("--x", "-0.0", 0, 1, &x, &e));
    ck_assert(!drv_scan_double("--x", "1.5", 0, 1, &x, &e));
    ck_assert_ptr_nonnull(strstr(e.msg, "[0, 1]"));
    ck_assert(!drv_scan_double("--x", NULL, 0, 1, &x, &e));
}
END_TEST

/* ---- lists ---- */

START_TEST(test_lists)
{
    drv_err e;
    size_t out[4], n = 0;
    ck_assert(drv_scan_size_list("--d", "1,2,3", 1, out, 4, &n, &e));
    ck_assert_uint_eq(n, 3);
    ck_assert_uint_eq(out[2], 3);
    ck_assert(drv_scan_size_list("--d", "0", 0, out, 4, &n, &e) && n == 1 && out[0] == 0);
    static const char *const bad[] = {"",   ",",   "1,",    ",1",  "1,,2", "1, 2",
                                      "1 ,2", "1,-2", "1,2e1", "1,2,3,4,5", "0,1"};
    for (size_t i = 0; i < N_OF(bad); i++)
        ck_assert_msg(!drv_scan_size_list("--d", bad[i], 1, out, 4, &n, &e), "accepted '%s'",
                      bad[i]);
    ck_assert(!drv_scan_size_list("--d", NULL, 1, out, 4, &n, &e));

    drv_span it[3];
    ck_assert(drv_scan_list("--m", "a,bc", it, 3, &n, &e) && n == 2);
    ck_assert(drv_span_is(it[1], "bc") && !drv_span_is(it[1], "b") && !drv_span_is(it[1], "bcd"));
    static const char *const bad_names[] = {"", ",", "a,", ",a", "a,,b", "a,b,c,d"};
    for (size_t i = 0; i < N_OF(bad_names); i++)
        ck_assert_msg(!drv_scan_list("--m", bad_names[i], it, 3, &n, &e), "accepted '%s'",
                      bad_names[i]);
}
END_TEST

/* ---- gate options ---- */

/* Field by field: a struct's padding bytes are not values (memcmp would read
 * them, and valgrind rightly objects). */
static bool same_config(const ccr_cond_config *a, const ccr_cond_config *b)
{
    const ccr_gate_config *g = &a->gate_cfg, *h = &b->gate_cfg;
    return a->gate == b->gate && a->bank == b->bank && a->hidden == b->hidden &&
           g->n_experts == h->n_experts && g->k == h->k && g->n_groups == h->n_groups &&
           g->k_groups == h->k_groups && g->k2 == h->k2 && g->depth == h->depth &&
           g->combine == h->combine && g->bits_from == h->bits_from &&
           g->grad_mode == h->grad_mode && g->capacity_factor == h->capacity_factor &&
           g->eval_capacity_factor == h->eval_capacity_factor &&
           g->w_importance == h->w_importance && g->w_load == h->w_load &&
           g->aux_alpha == h->aux_alpha && g->z_loss == h->z_loss &&
           g->noise_eps == h->noise_eps && g->randomize == h->randomize;
}

START_TEST(test_gate_options)
{
    drv_err e;
    bool used;
    ccr_cond_config c = drv_gate_defaults();
    ck_assert_int_eq(drv_scan_gate_option("--experts", "16", &c, &used, &e), DRV_OPT_OK);
    ck_assert(used && c.gate_cfg.n_experts == 16);
    ck_assert_int_eq(drv_scan_gate_option("--randomize", NULL, &c, &used, &e), DRV_OPT_OK);
    ck_assert(!used && c.gate_cfg.randomize);
    ck_assert_int_eq(drv_scan_gate_option("--combine", "leaf", &c, &used, &e), DRV_OPT_OK);
    ck_assert_int_eq(c.gate_cfg.combine, CCR_COMBINE_LEAF);
    ck_assert_int_eq(drv_scan_gate_option("--noise-eps", "1e-3", &c, &used, &e), DRV_OPT_OK);
    ck_assert(c.gate_cfg.noise_eps == 1e-3);
    ck_assert_int_eq(drv_scan_gate_option("--gate", "switch", &c, &used, &e), DRV_OPT_OK);
    ck_assert_str_eq(c.gate->name, "switch");
    ck_assert_int_eq(drv_scan_gate_option("--lr", "1", &c, &used, &e), DRV_OPT_NONE);
    ck_assert(!used);

    static const char *const bad[][2] = {
        {"--experts", "1e3"}, {"--experts", " 8"},  {"--experts", "0"},  {"--k", "-1"},
        {"--depth", "4x"},    {"--k2", NULL},       {"--gate", "moe"},   {"--gate", NULL},
        {"--noise-eps", "nan"}, {"--w-load", "-0.1"}, {"--capacity-factor", "inf"},
        {"--combine", "Leaf"}, {"--bank", ""},       {"--expert-hidden", "18446744073709551616"},
        {"--k-groups", "0"},  {"--eval-capacity-factor", "-1"}, {"--eval-capacity-factor", "nan"},
    };
    ccr_cond_config before = c;
    for (size_t i = 0; i < N_OF(bad); i++) {
        e.msg[0] = '\0';
        ck_assert_msg(drv_scan_gate_option(bad[i][0], bad[i][1], &c, &used, &e) == DRV_OPT_BAD,
                      "accepted %s '%s'", bad[i][0], bad[i][1] ? bad[i][1] : "(null)");
        ck_assert_ptr_nonnull(strstr(e.msg, bad[i][0]));
    }
    ck_assert(same_config(&before, &c));
}
END_TEST

/* ---- the exiting wrappers exit 2 (these also run against the old parser) ---- */

START_TEST(test_parse_size_exits)
{
    drv_parse_size("test", "--batch", bad_sizes[_i], 0);
}
END_TEST

START_TEST(test_parse_double_exits)
{
    drv_parse_double("test", "--lr", bad_doubles[_i], -1e9, 1e9);
}
END_TEST

static const char *const bad_seeds[] = {"0", "4294967296", " -1", "1e3"};

START_TEST(test_parse_seed_exits)
{
    drv_parse_seed("test", "--seed", bad_seeds[_i]);
}
END_TEST

static const char *const bad_lists[] = {"1,", ",1", "1,,2", "1, 2", "1,-1"};

START_TEST(test_parse_list_exits)
{
    size_t out[8];
    drv_parse_size_list("test", "--hidden", bad_lists[_i], out, 8);
}
END_TEST

static Suite *drv_args_suite(void)
{
    Suite *s = suite_create("drv_args");
    TCase *tc = tcase_create("scan");
    tcase_add_loop_test(tc, test_size_bad, 0, (int)N_OF(bad_sizes));
    tcase_add_test(tc, test_size_good);
    tcase_add_test(tc, test_seed);
    tcase_add_loop_test(tc, test_double_bad, 0, (int)N_OF(bad_doubles));
    tcase_add_test(tc, test_double_good);
    tcase_add_test(tc, test_lists);
    tcase_add_test(tc, test_gate_options);
    suite_add_tcase(s, tc);
    tc = tcase_create("exit");
    tcase_add_loop_exit_test(tc, test_parse_size_exits, 2, 0, (int)N_OF(bad_sizes));
    tcase_add_loop_exit_test(tc, test_parse_double_exits, 2, 0, (int)N_OF(bad_doubles));
    tcase_add_loop_exit_test(tc, test_parse_seed_exits, 2, 0, (int)N_OF(bad_seeds));
    tcase_add_loop_exit_test(tc, test_parse_list_exits, 2, 0, (int)N_OF(bad_lists));
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return ccr_test_run(drv_args_suite()); }
