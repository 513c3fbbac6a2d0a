/*
 * fuzz_args.c - the drivers' option-value parser (experiments/common.c) on
 * arbitrary strings.  The input is a list of NUL-separated arguments; each is
 * scanned as a size, a seed, a double, a list and a size list, and each
 * (flag, value) pair as a gate option.  Besides not crashing, what a scanner
 * accepts must be exactly the documented grammar (docs/DESIGN.md, "Driver
 * options"): a size prints back as the same digits, a double is finite, in
 * range and has no sign where none is allowed, a list joins back to its
 * input, and a rejection comes with a message that names the flag.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_err(const drv_err *e, const char *flag)
{
    FUZZ_ASSERT(memchr(e->msg, '\0', sizeof e->msg) != NULL, "message not terminated");
    FUZZ_ASSERT(strncmp(e->msg, flag, strlen(flag)) == 0 || strstr(e->msg, flag) != NULL,
                "message does not name the flag");
}

static bool all_digits(const char *v)
{
    if (*v == '\0')
        return false;
    for (; *v; v++)
        if (*v < '0' || *v > '9')
            return false;
    return true;
}

static void scan_one(const char *v)
{
    drv_err e;
    size_t x;
    if (drv_scan_size("--n", v, 0, &x, &e)) {
        char buf[32];
        snprintf(buf, sizeof buf, "%zu", x);
        const char *p = v;
        while (p[0] == '0' && p[1] != '\0')
            p++;
        FUZZ_ASSERT(strcmp(buf, p) == 0, "size does not print back as its digits");
    } else {
        check_err(&e, "--n");
        FUZZ_ASSERT(!all_digits(v) || strlen(v) >= 20, "digits rejected");
    }

    unsigned long seed;
    if (drv_scan_seed("--seed", v, &seed, &e))
        FUZZ_ASSERT(seed >= 1 && seed <= DRV_SEED_MAX && all_digits(v), "seed range");
    else
        check_err(&e, "--seed");

    double d;
    if (drv_scan_double("--x", v, -1e300, 1e300, &d, &e)) {
        FUZZ_ASSERT(isfinite(d) && d >= -1e300 && d <= 1e300, "double range");
        FUZZ_ASSERT(strspn(v, "0123456789.-+eE") == strlen(v) && v[0] != '+', "double grammar");
    } else {
        check_err(&e, "--x");
    }
    if (drv_scan_double("--y", v, 0, 1, &d, &e))
        FUZZ_ASSERT(v[0] != '-' && d >= 0 && d <= 1, "non-negative double");
    else
        check_err(&e, "--y");

    drv_span it[8];
    size_t n;
    if (drv_scan_list("--m", v, it, 8, &n, &e)) {
        FUZZ_ASSERT(n >= 1 && n <= 8, "list count");
        size_t len = 0;
        for (size_t i = 0; i < n; i++) {
            FUZZ_ASSERT(it[i].len > 0 && it[i].p == v + len, "list item");
            FUZZ_ASSERT(memchr(it[i].p, ',', it[i].len) == NULL, "comma in item");
            len += it[i].len + (i + 1 < n);
        }
        FUZZ_ASSERT(len == strlen(v), "list does not cover its input");
    } else {
        check_err(&e, "--m");
    }

    size_t sz[8];
    if (drv_scan_size_list("--l", v, 1, sz, 8, &n, &e)) {
        for (size_t i = 0; i < n; i++)
            FUZZ_ASSERT(sz[i] >= 1, "size list min");
        FUZZ_ASSERT(strpbrk(v, " -+eExX") == NULL, "size list grammar");
    } else {
        check_err(&e, "--l");
    }
}

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

static const char *const gate_flags[] = {
    "--gate",     "--experts",   "--k",         "--groups",   "--k2",     "--depth",
    "--k-groups", "--eval-capacity-factor",
    "--combine",  "--bits-from", "--grad-mode", "--capacity-factor", "--w-importance",
    "--w-load",   "--aux-alpha", "--z-loss",    "--noise-eps", "--randomize", "--bank",
    "--expert-hidden", "--lr",
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 4096)
        return 0;
    char *buf = malloc(size + 1);
    if (buf == NULL)
        return 0;
    memcpy(buf, data, size);
    buf[size] = '\0';
    const char *args[64];
    size_t n = 0;
    for (size_t i = 0; i <= size && n < 64; i += strlen(buf + i) + 1)
        args[n++] = buf + i;

    ccr_cond_config cfg = drv_gate_defaults();
    for (size_t i = 0; i < n; i++) {
        scan_one(args[i]);
        /* The argument's first byte picks a gate flag; the next is its value. */
        const char *flag = gate_flags[(unsigned char)args[i][0] % (sizeof gate_flags /
                                                                   sizeof gate_flags[0])];
        const char *v = i + 1 < n ? args[i + 1] : NULL;
        ccr_cond_config before = cfg;
        drv_err e;
        bool used;
        drv_opt r = drv_scan_gate_option(flag, v, &cfg, &used, &e);
        if (r == DRV_OPT_BAD) {
            check_err(&e, flag);
            FUZZ_ASSERT(same_config(&before, &cfg), "config changed on error");
        } else if (r == DRV_OPT_NONE) {
            FUZZ_ASSERT(strcmp(flag, "--lr") == 0 && !used, "gate flag not recognised");
        } else if (used) {
            FUZZ_ASSERT(v != NULL, "value used but absent");
        }
    }
    free(buf);
    return 0;
}
