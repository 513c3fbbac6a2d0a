/*
 * common.c - shared driver helpers: argument parsing, timing, progress,
 * machine description and the base fields of every results record.
 */
#define _POSIX_C_SOURCE 200809L
#include "ccr_config.h"  // provides: CCR_HAVE_MPI
#include "common.h"
#include "outputs.h"
#include "internal.h"  // provides: ccr_mul_ok, ccr_mem_check

#include <errno.h>
#if CCR_HAVE_MPI
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>
#endif
#include <gsl/gsl_errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
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
    if (s == CCR_EDOM)  /* a NaN or infinite loss, gradient or routing weight */
        fprintf(stderr, "%s: stopped at the first non-finite value (NaN or infinity): "
                "the run diverged\n", prog);
    fprintf(stderr, "%s: %s: %s: %s\n", prog, what, ccr_strerror(s), ccr_ctx_errmsg(ctx));
    exit(1);
}

void drv_input_error(const char *prog, ccr_ctx *ctx, ccr_status s, const char *fmt, ...)
{
    bool memory = s == CCR_ENOMEM || s == CCR_EDEVMEM;
    va_list ap;
    fprintf(stderr, "%s: ", prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, ": %s%s\n", ccr_ctx_errmsg(ctx), memory ? " (out of memory)" : " (try --help)");
    exit(memory ? 1 : 2);
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

static int drv_env_int(const char *const *names, int fallback)
{
    for (size_t i = 0; names[i] != NULL; i++) {
        const char *v = getenv(names[i]);
        char *end;
        long x = v ? strtol(v, &end, 10) : -1;
        if (v != NULL && end != v && *end == '\0' && x >= 0 && x < 1 << 30)
            return (int)x;
    }
    return fallback;
}

int drv_launcher_rank(void)
{
    static const char *const names[] = {"OMPI_COMM_WORLD_RANK", "PMI_RANK", NULL};
    return drv_env_int(names, 0);
}

int drv_launcher_size(void)
{
    static const char *const names[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", NULL};
    int n = drv_env_int(names, 1);
    return n > 0 ? n : 1;
}

ccr_comm *drv_comm_start(const char *prog, ccr_ctx *ctx)
{
    if (drv_launcher_size() < 2)
        return NULL;
#if CCR_HAVE_MPI
    if (MPI_Init(NULL, NULL) != MPI_SUCCESS) {
        fprintf(stderr, "%s: MPI: MPI_Init failed\n", prog);
        exit(1);
    }
    ccr_comm *comm;
    ccr_status s = ccr_comm_mpi_init(ctx, &comm);
    if (s != CCR_OK)
        drv_fail(prog, ctx, s, "MPI");
    return comm;
#else
    CCR_UNUSED(ctx);
    drv_usage_error(prog, "started on %d processes, but ccr was built without MPI "
                    "(meson -Dmpi=enabled needs libopenmpi-dev)", drv_launcher_size());
#endif
}

void drv_one_process(const char *prog)
{
    if (drv_launcher_size() > 1)
        drv_usage_error(prog, "runs in one process; started on %d (ccr-train, ccr-capacity "
                        "and ccr-bench run under mpirun)", drv_launcher_size());
}

void drv_comm_end(ccr_comm *comm)
{
    if (comm == NULL)
        return;
    ccr_comm_free(comm);
#if CCR_HAVE_MPI
    MPI_Finalize();
#endif
}

bool drv_parse_backend(const char *prog, const char *a, const char *v, bool *cuda)
{
    if (strcmp(a, "--backend") != 0)
        return false;
    if (v != NULL && strcmp(v, "cpu") == 0)
        *cuda = false;
    else if (v != NULL && strcmp(v, "cuda") == 0)
        *cuda = true;
    else
        drv_usage_error(prog, "--backend must be cpu or cuda");
    return true;
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

float *drv_backend_floats(const char *prog, ccr_ctx *ctx, ccr_backend *be, size_t n,
                          const float *host)
{
    size_t bytes = 0;
    void *p = NULL;
    ccr_status s = ccr_mul_ok(n > 0 ? n : 1, sizeof(float), &bytes)
                       ? ccr_backend_alloc(be, bytes, &p)
                       : ccr_mem_check(ctx, SIZE_MAX, "buffers");
    if (s == CCR_OK && host != NULL && n > 0)
        s = ccr_backend_set(be, p, host, bytes);
    if (s != CCR_OK)
        drv_fail(prog, ctx, s, "buffers");
    return p;
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
    drv_io_watch(prog, *out);   /* a failed run leaves <path>.partial */
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
    ccr_status s = drv_io_close(out);
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

/* ---- Option values: non-exiting scanners, then the exiting wrappers ---- */

static bool scan_fail(drv_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static bool scan_fail(drv_err *e, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    return false;
}

/* Decimal digits only, the whole span: no space, sign, "0x" or exponent. */
static bool scan_digits(const char *p, size_t len, size_t *out, bool *overflow)
{
    size_t x = 0;
    *overflow = false;
    if (len == 0)
        return false;
    for (size_t i = 0; i < len; i++) {
        if (p[i] < '0' || p[i] > '9')
            return false;
        size_t d = (size_t)(p[i] - '0');
        if (x > (SIZE_MAX - d) / 10)
            *overflow = true;
        else
            x = 10 * x + d;
    }
    *out = x;
    return true;
}

static bool scan_size_span(const char *flag, const char *p, size_t len, size_t min,
                           size_t *out, drv_err *e)
{
    bool overflow;
    size_t x;
    if (!scan_digits(p, len, &x, &overflow))
        return scan_fail(e, "%s must be a non-negative integer (digits only), got '%.*s'", flag,
                         (int)len, p);
    if (overflow)
        return scan_fail(e, "%s: '%.*s' is out of range (at most %zu)", flag, (int)len, p,
                         (size_t)SIZE_MAX);
    if (x < min)
        return scan_fail(e, "%s must be >= %zu, got %zu", flag, min, x);
    *out = x;
    return true;
}

bool drv_scan_size(const char *flag, const char *v, size_t min, size_t *out, drv_err *e)
{
    if (v == NULL)
        return scan_fail(e, "%s needs a value", flag);
    return scan_size_span(flag, v, strlen(v), min, out, e);
}

bool drv_scan_seed(const char *flag, const char *v, unsigned long *out, drv_err *e)
{
    size_t x;
    if (!drv_scan_size(flag, v, 0, &x, e))
        return false;
    /* GSL's MT19937 keeps the low 32 bits of the seed and replaces 0 with its
     * default 4357: any other value would silently alias another seed. */
    if (x < 1 || x > DRV_SEED_MAX)
        return scan_fail(e, "%s must be in [1, %lu], got %zu", flag, DRV_SEED_MAX, x);
    *out = (unsigned long)x;
    return true;
}

/* [-]digits[.digits] | [-].digits, then optionally [eE][+-]digits. */
static bool plain_decimal(const char *v)
{
    const char *p = v;
    size_t n_int = 0, n_frac = 0, n_exp = 0;
    if (*p == '-')
        p++;
    while (*p >= '0' && *p <= '9')
        p++, n_int++;
    if (*p == '.') {
        p++;
        while (*p >= '0' && *p <= '9')
            p++, n_frac++;
    }
    if (n_int + n_frac == 0)
        return false;
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '+' || *p == '-')
            p++;
        while (*p >= '0' && *p <= '9')
            p++, n_exp++;
        if (n_exp == 0)
            return false;
    }
    return *p == '\0';
}

bool drv_scan_double(const char *flag, const char *v, double min, double max, double *out,
                     drv_err *e)
{
    if (v == NULL)
        return scan_fail(e, "%s needs a value", flag);
    if (!plain_decimal(v) || (v[0] == '-' && min >= 0))
        return scan_fail(e, "%s must be a %snumber like 0.5 or 1e-3, got '%s'", flag,
                         min >= 0 ? "non-negative " : "", v);
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    /* ERANGE: too large for a double, or so small that it lost precision. */
    if (errno != 0 || *end != '\0' || !isfinite(x))
        return scan_fail(e, "%s: '%s' is out of a double's range", flag, v);
    if (x < min || x > max)
        return scan_fail(e, "%s must be in [%g, %g], got %g", flag, min, max, x);
    *out = x;
    return true;
}

bool drv_scan_list(const char *flag, const char *v, drv_span *items, size_t cap, size_t *n,
                   drv_err *e)
{
    if (v == NULL || v[0] == '\0')
        return scan_fail(e, "%s needs a comma-separated list", flag);
    *n = 0;
    for (const char *p = v;; p++) {
        size_t len = strcspn(p, ",");
        if (len == 0)
            return scan_fail(e, "%s: empty item in list '%s'", flag, v);
        if (*n == cap)
            return scan_fail(e, "%s: at most %zu values in '%s'", flag, cap, v);
        items[(*n)++] = (drv_span){p, len};
        p += len;
        if (*p == '\0')
            return true;
    }
}

bool drv_span_is(drv_span s, const char *name)
{
    return strlen(name) == s.len && strncmp(s.p, name, s.len) == 0;
}

bool drv_scan_size_list(const char *flag, const char *v, size_t min, size_t *out, size_t cap,
                        size_t *n, drv_err *e)
{
    drv_span items[DRV_LIST_MAX];
    if (cap > DRV_LIST_MAX)
        cap = DRV_LIST_MAX;
    if (!drv_scan_list(flag, v, items, cap, n, e))
        return false;
    for (size_t i = 0; i < *n; i++)
        if (!scan_size_span(flag, items[i].p, items[i].len, min, &out[i], e))
            return false;
    return true;
}

/* The exiting wrappers: exit 2 with the scanner's message when it failed. */
static void exit_unless(bool ok, const char *prog, const drv_err *e)
{
    if (!ok)
        drv_usage_error(prog, "%s", e->msg);
}

size_t drv_parse_size(const char *prog, const char *flag, const char *v, size_t min)
{
    drv_err e;
    size_t x = 0;
    exit_unless(drv_scan_size(flag, v, min, &x, &e), prog, &e);
    return x;
}

double drv_parse_double(const char *prog, const char *flag, const char *v, double min,
                        double max)
{
    drv_err e;
    double x = 0;
    exit_unless(drv_scan_double(flag, v, min, max, &x, &e), prog, &e);
    return x;
}

unsigned long drv_parse_seed(const char *prog, const char *flag, const char *v)
{
    drv_err e;
    unsigned long x = 0;
    exit_unless(drv_scan_seed(flag, v, &x, &e), prog, &e);
    return x;
}

size_t drv_parse_size_list(const char *prog, const char *flag, const char *v, size_t *out,
                           size_t cap)
{
    drv_err e;
    size_t n = 0;
    exit_unless(drv_scan_size_list(flag, v, 1, out, cap, &n, &e), prog, &e);
    return n;
}

size_t drv_parse_list(const char *prog, const char *flag, const char *v, drv_span *items,
                      size_t cap)
{
    drv_err e;
    size_t n = 0;
    exit_unless(drv_scan_list(flag, v, items, cap, &n, &e), prog, &e);
    return n;
}

double drv_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int drv_cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double drv_median(double *v, size_t n)
{
    if (n == 0)
        return NAN;
    qsort(v, n, sizeof *v, drv_cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double drv_load_avg(void)
{
    double v = NAN;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f != NULL) {
        if (fscanf(f, "%lf", &v) != 1)
            v = NAN;
        fclose(f);
    }
    return v;
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
    if (s == CCR_OK) s = ccr_record_add_str(r, "blas_core_source", ccr_blas_core_source());
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
    "  --grad-mode NAME     signtree: none | ste [ste]\n"
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

/* One of two names: *out = 0 for a, 1 for b. */
static bool scan_choice(const char *flag, const char *v, const char *a, const char *b, int *out,
                        drv_err *e)
{
    if (v != NULL && strcmp(v, a) == 0)
        *out = 0;
    else if (v != NULL && strcmp(v, b) == 0)
        *out = 1;
    else
        return scan_fail(e, "%s must be %s or %s", flag, a, b);
    return true;
}

drv_opt drv_scan_gate_option(const char *flag, const char *v, ccr_cond_config *cfg,
                             bool *used_value, drv_err *e)
{
    ccr_gate_config *g = &cfg->gate_cfg;
    static const struct {
        const char *flag;
        size_t min;
    } sizes[] = {{"--experts", 1}, {"--k", 1}, {"--groups", 1}, {"--k-groups", 1}, {"--k2", 1},
                 {"--depth", 0}, {"--expert-hidden", 1}};
    size_t *size_field[] = {&g->n_experts, &g->k,  &g->n_groups, &g->k_groups,
                            &g->k2,        &g->depth, &cfg->hidden};
    static const struct {
        const char *flag;
        double min, max;
    } reals[] = {{"--capacity-factor", 1e-9, 1e9}, {"--eval-capacity-factor", 0, 1e9},
                 {"--w-importance", 0, 1e6}, {"--w-load", 0, 1e6}, {"--aux-alpha", 0, 1e6},
                 {"--z-loss", 0, 1e6}, {"--noise-eps", 0, 1e6}};
    double *real_field[] = {&g->capacity_factor, &g->eval_capacity_factor, &g->w_importance,
                            &g->w_load, &g->aux_alpha, &g->z_loss, &g->noise_eps};
    static const struct {
        const char *flag, *a, *b;
    } choices[] = {{"--combine", "path", "leaf"}, {"--bits-from", "projection", "input"},
                   {"--grad-mode", "none", "ste"}, {"--bank", "ffn", "linear"}};
    int c = 0;

    *used_value = true;
    if (strcmp(flag, "--randomize") == 0) {
        g->randomize = true;
        *used_value = false;
        return DRV_OPT_OK;
    }
    if (strcmp(flag, "--gate") == 0) {
        const ccr_gate_type *t = v ? ccr_gate_type_find(v) : NULL;
        if (t == NULL)
            return scan_fail(e, "--gate: unknown gate '%s'; valid: %s", v ? v : "",
                             ccr_gate_type_names()), DRV_OPT_BAD;
        cfg->gate = t;
        return DRV_OPT_OK;
    }
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if (strcmp(flag, sizes[i].flag) == 0)
            return drv_scan_size(flag, v, sizes[i].min, size_field[i], e) ? DRV_OPT_OK
                                                                          : DRV_OPT_BAD;
    for (size_t i = 0; i < sizeof reals / sizeof reals[0]; i++)
        if (strcmp(flag, reals[i].flag) == 0)
            return drv_scan_double(flag, v, reals[i].min, reals[i].max, real_field[i], e)
                       ? DRV_OPT_OK
                       : DRV_OPT_BAD;
    for (size_t i = 0; i < sizeof choices / sizeof choices[0]; i++) {
        if (strcmp(flag, choices[i].flag) != 0)
            continue;
        if (!scan_choice(flag, v, choices[i].a, choices[i].b, &c, e))
            return DRV_OPT_BAD;
        if (i == 0) g->combine = c ? CCR_COMBINE_LEAF : CCR_COMBINE_PATH;
        else if (i == 1) g->bits_from = c ? CCR_BITS_INPUT : CCR_BITS_PROJECTION;
        else if (i == 2) g->grad_mode = c ? CCR_GRAD_STE : CCR_GRAD_NONE;
        else cfg->bank = c ? CCR_BANK_LINEAR : CCR_BANK_FFN;
        return DRV_OPT_OK;
    }
    *used_value = false;
    return DRV_OPT_NONE;
}

static bool gate_option(const char *prog, const char *flag, const char *v,
                        ccr_cond_config *cfg, bool *used_value)
{
    drv_err e;
    drv_opt r = drv_scan_gate_option(flag, v, cfg, used_value, &e);
    if (r == DRV_OPT_BAD)
        drv_usage_error(prog, "%s", e.msg);
    return r == DRV_OPT_OK;
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
