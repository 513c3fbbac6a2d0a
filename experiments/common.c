/*
 * common.c - shared driver helpers: argument parsing, timing, progress,
 * machine description and the base fields of every results record.
 */
#define _POSIX_C_SOURCE 200809L
#include "common.h"

#include <errno.h>
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
