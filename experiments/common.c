/*
 * common.c - shared driver helpers: argument parsing, timing, progress,
 * machine description and the base fields of every results record.
 */
#define _POSIX_C_SOURCE 200809L
#include "common.h"

#include <errno.h>
#include <gsl/gsl_errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ccr_git.h"  // provides: CCR_GIT_REVISION

void drv_usage_error(const char *prog, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s: ", prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, " (try --help)\n");
    exit(2);
}

void drv_fail(const char *prog, ccr_ctx *ctx, ccr_status s, const char *what)
{
    fprintf(stderr, "%s: %s: %s: %s\n", prog, what, ccr_strerror(s), ccr_ctx_errmsg(ctx));
    exit(1);
}

bool drv_parse_common(const char *prog, const char *a, void (*usage)(void))
{
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
        usage();
        exit(0);
    }
    if (strcmp(a, "--quick") == 0)
        return true;
    if (strncmp(a, "--", 2) != 0)
        drv_usage_error(prog, "unexpected argument '%s'", a);
    return false;
}

bool drv_quick_requested(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--quick") == 0)
            return true;
    return false;
}

void drv_bad_option(const char *prog, const char *a, const char *v)
{
    if (v == NULL)
        drv_usage_error(prog, "%s needs a value", a);
    drv_usage_error(prog, "unknown option '%s'", a);
}

void drv_setup(const char *prog, bool cuda, unsigned long seed, ccr_ctx **ctx,
               ccr_backend **be, gsl_rng **rng)
{
    gsl_set_error_handler_off();
    if (ccr_ctx_init(ctx) != CCR_OK)
        exit(1);
    ccr_status s = cuda ? ccr_backend_cuda_init(*ctx, 0, be) : ccr_backend_cpu_init(*ctx, be);
    if (s != CCR_OK)
        drv_fail(prog, *ctx, s, "backend");
    if (rng == NULL)
        return;
    *rng = gsl_rng_alloc(gsl_rng_mt19937);
    if (*rng == NULL)
        exit(1);
    gsl_rng_set(*rng, seed);
}

gsl_rng *drv_rng(const char *prog, ccr_ctx *ctx, unsigned long seed)
{
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    if (rng == NULL)
        drv_fail(prog, ctx, CCR_ENOMEM, "rng");
    gsl_rng_set(rng, seed);
    return rng;
}

void drv_open_out(const char *prog, ccr_ctx *ctx, const char *path, ccr_record **rec,
                  ccr_jsonl **out)
{
    ccr_status s = ccr_record_init(ctx, rec);
    if (s != CCR_OK)
        drv_fail(prog, ctx, s, "record");
    *out = NULL;
    if (path && ccr_jsonl_open(ctx, path, false, out) != CCR_OK)
        drv_usage_error(prog, "cannot open --out %s: %s", path, ccr_ctx_errmsg(ctx));
}

void drv_write_record(const char *prog, ccr_ctx *ctx, ccr_status s, ccr_jsonl *out,
                      const ccr_record *rec)
{
    if (s != CCR_OK)
        drv_fail(prog, ctx, s, "record");
    if (out && (s = ccr_jsonl_write(out, rec)) != CCR_OK)
        drv_fail(prog, ctx, s, "write results");
}

void drv_teardown(const char *prog, ccr_ctx *ctx, ccr_backend *be, gsl_rng *rng,
                  ccr_jsonl *out, ccr_record *rec)
{
    ccr_status s = ccr_jsonl_close(out);
    if (s != CCR_OK)
        drv_fail(prog, ctx, s, "close results");
    if (rec)
        ccr_record_free(rec);
    if (rng)
        gsl_rng_free(rng);
    if (be)
        ccr_backend_free(be);
    if (ctx)
        ccr_ctx_free(ctx);
}

size_t drv_parse_size(const char *prog, const char *flag, const char *v, size_t min)
{
    if (v == NULL)
        drv_usage_error(prog, "%s needs a value", flag);
    char *end;
    errno = 0;
    if (v[0] == '-')
        drv_usage_error(prog, "%s must be a non-negative integer, got '%s'", flag, v);
    unsigned long long x = strtoull(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0')
        drv_usage_error(prog, "%s must be a non-negative integer, got '%s'", flag, v);
    if (x < min)
        drv_usage_error(prog, "%s must be >= %zu, got %llu", flag, min, x);
    return (size_t)x;
}

double drv_parse_double(const char *prog, const char *flag, const char *v, double min,
                        double max)
{
    if (v == NULL)
        drv_usage_error(prog, "%s needs a value", flag);
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno != 0 || end == v || *end != '\0' || !isfinite(x))
        drv_usage_error(prog, "%s must be a number, got '%s'", flag, v);
    if (x < min || x > max)
        drv_usage_error(prog, "%s must be in [%g, %g], got %g", flag, min, max, x);
    return x;
}

unsigned long drv_parse_seed(const char *prog, const char *flag, const char *v)
{
    return (unsigned long)drv_parse_size(prog, flag, v, 0);
}

size_t drv_parse_size_list(const char *prog, const char *flag, const char *v, size_t *out,
                           size_t cap)
{
    if (v == NULL || v[0] == '\0')
        drv_usage_error(prog, "%s needs a comma-separated list", flag);
    size_t n = 0;
    const char *p = v;
    while (*p != '\0') {
        char item[32];
        size_t len = strcspn(p, ",");
        if (len == 0 || len >= sizeof item)
            drv_usage_error(prog, "%s: bad list '%s'", flag, v);
        if (n == cap)
            drv_usage_error(prog, "%s: at most %zu values", flag, cap);
        memcpy(item, p, len);
        item[len] = '\0';
        out[n++] = drv_parse_size(prog, flag, item, 1);
        p += len;
        if (*p == ',')
            p++;
    }
    return n;
}

double drv_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void drv_progress(const char *label, size_t done, size_t total, double t_start,
                  const char *extra)
{
    double el = drv_now() - t_start;
    double rate = el > 0 ? (double)done / el : 0.0;
    double eta = rate > 0 ? (double)(total - done) / rate : 0.0;
    fprintf(stderr, "\r%s %zu/%zu  %.1f/s  ETA %.0fs  %s\033[K", label, done, total, rate, eta,
            extra ? extra : "");
    fflush(stderr);
}

void drv_progress_end(void) { fputc('\n', stderr); }

const char *drv_machine(void)
{
    static char buf[256];
    char model[200] = "unknown CPU";
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f != NULL) {
        char line[512];
        while (fgets(line, sizeof line, f)) {
            if (strncmp(line, "model name", 10) == 0) {
                char *c = strchr(line, ':');
                if (c != NULL) {
                    c += 2;
                    c[strcspn(c, "\n")] = '\0';
                    snprintf(model, sizeof model, "%s", c);
                }
                break;
            }
        }
        fclose(f);
    }
    snprintf(buf, sizeof buf, "%s (%ld cores)", model, sysconf(_SC_NPROCESSORS_ONLN));
    return buf;
}

ccr_status drv_record_base(ccr_record *r, const char *driver, const ccr_backend *be,
                           unsigned long seed)
{
    ccr_status s = ccr_record_add_str(r, "driver", driver);
    if (s == CCR_OK) s = ccr_record_add_str(r, "ccr_version", ccr_version());
    if (s == CCR_OK) s = ccr_record_add_str(r, "git", CCR_GIT_REVISION);
    if (s == CCR_OK) s = ccr_record_add_str(r, "machine", drv_machine());
    if (s == CCR_OK) s = ccr_record_add_str(r, "blas_core", ccr_blas_corename());
    if (s == CCR_OK) s = ccr_record_add_int(r, "blas_threads", ccr_blas_num_threads());
    if (s == CCR_OK) s = ccr_record_add_str(r, "backend", ccr_backend_name(be));
    if (s == CCR_OK) s = ccr_record_add_int(r, "seed", (int64_t)seed);
    return s;
}

/* The gate options, their flags and the ccr_gate_option each sets (0: a
 * layer option).  Which were given explicitly, for drv_gate_finish. */
static const struct {
    const char *flag;
    unsigned opt;
} drv_gate_flags[] = {
    {"--experts", CCR_GATE_OPT_N_EXPERTS},
    {"--k", CCR_GATE_OPT_K},
    {"--groups", CCR_GATE_OPT_N_GROUPS},
    {"--k-groups", CCR_GATE_OPT_K_GROUPS},
    {"--k2", CCR_GATE_OPT_K2},
    {"--depth", CCR_GATE_OPT_DEPTH},
    {"--combine", CCR_GATE_OPT_COMBINE},
    {"--bits-from", CCR_GATE_OPT_BITS_FROM},
    {"--grad-mode", CCR_GATE_OPT_GRAD_MODE},
    {"--capacity-factor", CCR_GATE_OPT_CAPACITY_FACTOR},
    {"--eval-capacity-factor", CCR_GATE_OPT_EVAL_CAPACITY_FACTOR},
    {"--w-importance", CCR_GATE_OPT_W_IMPORTANCE},
    {"--w-load", CCR_GATE_OPT_W_LOAD},
    {"--aux-alpha", CCR_GATE_OPT_AUX_ALPHA},
    {"--z-loss", CCR_GATE_OPT_Z_LOSS},
    {"--noise-eps", CCR_GATE_OPT_NOISE_EPS},
    {"--randomize", CCR_GATE_OPT_RANDOMIZE},
    {"--expert-hidden", 0},
};
#define DRV_N_GATE_FLAGS (sizeof drv_gate_flags / sizeof drv_gate_flags[0])
static bool drv_gate_given[DRV_N_GATE_FLAGS];

ccr_cond_config drv_gate_defaults(void)
{
    for (size_t i = 0; i < DRV_N_GATE_FLAGS; i++)
        drv_gate_given[i] = false;
    return ccr_cond_config_default();   /* one place: the library's defaults */
}

const char drv_gate_usage[] =
    "  --gate NAME          none | dense | topk | hmoe | switch | signtree\n"
    "  --experts N          experts E [8]; hmoe: all groups together\n"
    "  --k N                topk: experts per example [2]\n"
    "  --groups N           hmoe: groups a (must divide E) [2]\n"
    "  --k-groups N         hmoe: groups per example [2]\n"
    "  --k2 N               hmoe: experts per selected group [2]\n"
    "  --depth N            signtree: sign bits d [4]\n"
    "  --combine NAME       signtree: path | leaf [path]\n"
    "  --bits-from NAME     signtree: projection | input [projection]\n"
    "  --grad-mode NAME     signtree: none | ste [none]\n"
    "  --capacity-factor X  switch, training: capacity = ceil(X * batch / E) [1.25]\n"
    "  --eval-capacity-factor X  switch, evaluation: the same, 0 = no limit [0]\n"
    "  --w-importance X     dense/topk/hmoe importance loss weight [0.1]\n"
    "  --w-load X           topk/hmoe load loss weight [0.1]\n"
    "  --aux-alpha X        switch load-balancing loss alpha [0.01]\n"
    "  --z-loss X           dense/topk/hmoe/switch router z-loss, 0 = off [0]\n"
    "  --noise-eps X        topk/hmoe noise epsilon [0.01]\n"
    "  --randomize          gate weights from N(0, 1/d_in) instead of zeros (not none)\n"
    "  --bank NAME          ffn | linear [linear for signtree, ffn otherwise]\n"
    "  --expert-hidden N    hidden width of FFN experts [64]\n"
    "  An option the chosen gate does not use is an error (exit 2).\n";

static size_t gate_size(const char *prog, const char *flag, const char *v, size_t min)
{
    return drv_parse_size(prog, flag, v, min);
}

static bool gate_option(const char *prog, const char *flag, const char *v,
                        ccr_cond_config *cfg, bool *used_value)
{
    ccr_gate_config *g = &cfg->gate_cfg;
    *used_value = true;
    if (strcmp(flag, "--randomize") == 0) {
        g->randomize = true;
        *used_value = false;
    } else if (strcmp(flag, "--gate") == 0) {
        cfg->gate = v ? ccr_gate_type_find(v) : NULL;
        if (cfg->gate == NULL)
            drv_usage_error(prog, "--gate: unknown gate '%s'; valid: %s", v ? v : "",
                            ccr_gate_type_names());
    } else if (strcmp(flag, "--experts") == 0) g->n_experts = gate_size(prog, flag, v, 1);
    else if (strcmp(flag, "--k") == 0) g->k = gate_size(prog, flag, v, 1);
    else if (strcmp(flag, "--groups") == 0) g->n_groups = gate_size(prog, flag, v, 1);
    else if (strcmp(flag, "--k-groups") == 0) g->k_groups = gate_size(prog, flag, v, 1);
    else if (strcmp(flag, "--k2") == 0) g->k2 = gate_size(prog, flag, v, 1);
    else if (strcmp(flag, "--depth") == 0) g->depth = gate_size(prog, flag, v, 0);
    else if (strcmp(flag, "--expert-hidden") == 0) cfg->hidden = gate_size(prog, flag, v, 1);
    else if (strcmp(flag, "--combine") == 0) {
        if (v && strcmp(v, "path") == 0) g->combine = CCR_COMBINE_PATH;
        else if (v && strcmp(v, "leaf") == 0) g->combine = CCR_COMBINE_LEAF;
        else drv_usage_error(prog, "--combine must be path or leaf");
    } else if (strcmp(flag, "--bits-from") == 0) {
        if (v && strcmp(v, "projection") == 0) g->bits_from = CCR_BITS_PROJECTION;
        else if (v && strcmp(v, "input") == 0) g->bits_from = CCR_BITS_INPUT;
        else drv_usage_error(prog, "--bits-from must be projection or input");
    } else if (strcmp(flag, "--grad-mode") == 0) {
        if (v && strcmp(v, "none") == 0) g->grad_mode = CCR_GRAD_NONE;
        else if (v && strcmp(v, "ste") == 0) g->grad_mode = CCR_GRAD_STE;
        else drv_usage_error(prog, "--grad-mode must be none or ste");
    } else if (strcmp(flag, "--bank") == 0) {
        if (v && strcmp(v, "ffn") == 0) cfg->bank = CCR_BANK_FFN;
        else if (v && strcmp(v, "linear") == 0) cfg->bank = CCR_BANK_LINEAR;
        else drv_usage_error(prog, "--bank must be ffn or linear");
    } else if (strcmp(flag, "--capacity-factor") == 0)
        g->capacity_factor = drv_parse_double(prog, flag, v, 1e-9, 1e9);
    else if (strcmp(flag, "--eval-capacity-factor") == 0)
        g->eval_capacity_factor = drv_parse_double(prog, flag, v, 0, 1e9);
    else if (strcmp(flag, "--w-importance") == 0)
        g->w_importance = drv_parse_double(prog, flag, v, 0, 1e6);
    else if (strcmp(flag, "--w-load") == 0) g->w_load = drv_parse_double(prog, flag, v, 0, 1e6);
    else if (strcmp(flag, "--aux-alpha") == 0)
        g->aux_alpha = drv_parse_double(prog, flag, v, 0, 1e6);
    else if (strcmp(flag, "--z-loss") == 0) g->z_loss = drv_parse_double(prog, flag, v, 0, 1e6);
    else if (strcmp(flag, "--noise-eps") == 0)
        g->noise_eps = drv_parse_double(prog, flag, v, 0, 1e6);
    else {
        *used_value = false;
        return false;
    }
    return true;
}

bool drv_parse_gate_option(const char *prog, const char *flag, const char *v,
                           ccr_cond_config *cfg, bool *used_value)
{
    if (!gate_option(prog, flag, v, cfg, used_value))
        return false;
    for (size_t i = 0; i < DRV_N_GATE_FLAGS; i++)
        if (strcmp(flag, drv_gate_flags[i].flag) == 0)
            drv_gate_given[i] = true;
    return true;
}

void drv_gate_refuse_given(const char *prog, unsigned uses, const char *why)
{
    for (size_t i = 0; i < DRV_N_GATE_FLAGS; i++)
        if (drv_gate_given[i] && drv_gate_flags[i].opt != 0 &&
            (drv_gate_flags[i].opt & uses) == 0)
            drv_usage_error(prog, "%s: %s", drv_gate_flags[i].flag, why);
}

const char *drv_gate_option_given(void)
{
    for (size_t i = 0; i < DRV_N_GATE_FLAGS; i++)
        if (drv_gate_given[i])
            return drv_gate_flags[i].flag;
    return NULL;
}

void drv_gate_finish(const char *prog, ccr_cond_config *cfg, bool bank_set)
{
    if (cfg->gate == NULL)
        return;
    if (!bank_set)
        cfg->bank = ccr_cond_config_bank(cfg);   /* the gate's own, as the library does */
    for (size_t i = 0; i < DRV_N_GATE_FLAGS; i++) {
        if (!drv_gate_given[i])
            continue;
        unsigned opt = drv_gate_flags[i].opt;
        if (opt != 0 && !ccr_gate_type_uses(cfg->gate, (ccr_gate_option)opt))
            drv_usage_error(prog, "%s: gate %s does not use %s", drv_gate_flags[i].flag,
                            cfg->gate->name, ccr_gate_option_name((ccr_gate_option)opt));
        if (opt == 0 && cfg->bank == CCR_BANK_LINEAR)
            drv_usage_error(prog, "%s: a linear bank (gate %s) has no hidden layer",
                            drv_gate_flags[i].flag, cfg->gate->name);
    }
}

ccr_status drv_record_gate(ccr_record *r, const ccr_cond_config *cfg)
{
    const ccr_gate_config *g = &cfg->gate_cfg;
    static const char *combine[] = {"path", "leaf"}, *bits[] = {"projection", "input"},
                      *grad[] = {"none", "ste"}, *bank[] = {"ffn", "linear"};
    ccr_status s = ccr_record_add_str(r, "gate", cfg->gate ? cfg->gate->name : "dense-mlp");
    if (cfg->gate == NULL)
        return s;
    if (s == CCR_OK) s = ccr_record_add_str(r, "bank", bank[ccr_cond_config_bank(cfg)]);
    if (s == CCR_OK) s = ccr_record_add_int(r, "expert_hidden", (int64_t)cfg->hidden);
    if (s == CCR_OK) s = ccr_record_add_int(r, "experts", (int64_t)g->n_experts);
    if (s == CCR_OK) s = ccr_record_add_int(r, "k", (int64_t)g->k);
    if (s == CCR_OK) s = ccr_record_add_int(r, "groups", (int64_t)g->n_groups);
    if (s == CCR_OK) s = ccr_record_add_int(r, "k_groups", (int64_t)g->k_groups);
    if (s == CCR_OK) s = ccr_record_add_int(r, "k2", (int64_t)g->k2);
    if (s == CCR_OK) s = ccr_record_add_int(r, "depth", (int64_t)g->depth);
    if (s == CCR_OK) s = ccr_record_add_str(r, "combine", combine[g->combine]);
    if (s == CCR_OK) s = ccr_record_add_str(r, "bits_from", bits[g->bits_from]);
    if (s == CCR_OK) s = ccr_record_add_str(r, "grad_mode", grad[g->grad_mode]);
    if (s == CCR_OK) s = ccr_record_add_double(r, "capacity_factor", g->capacity_factor);
    if (s == CCR_OK)
        s = ccr_record_add_double(r, "eval_capacity_factor", g->eval_capacity_factor);
    if (s == CCR_OK) s = ccr_record_add_double(r, "w_importance", g->w_importance);
    if (s == CCR_OK) s = ccr_record_add_double(r, "w_load", g->w_load);
    if (s == CCR_OK) s = ccr_record_add_double(r, "aux_alpha", g->aux_alpha);
    if (s == CCR_OK) s = ccr_record_add_double(r, "z_loss", g->z_loss);
    if (s == CCR_OK) s = ccr_record_add_double(r, "noise_eps", g->noise_eps);
    if (s == CCR_OK) s = ccr_record_add_bool(r, "randomize", g->randomize);
    return s;
}
