/*
 * ccr_test.c - helper implementations for the test programs.
 */
#define _POSIX_C_SOURCE 200809L

#include "ccr_test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zlib.h>

double ccr_test_nmse(const float *a, const float *b, size_t n)
{
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    if (den == 0.0)
        return num == 0.0 ? 0.0 : INFINITY;
    return num / den;
}

void ccr_test_assert_nmse(const float *a, const float *ref, size_t n, double tol,
                          const char *label)
{
    double e = ccr_test_nmse(a, ref, n);
    if (!(e <= tol)) {
        int shown = 0;
        for (size_t i = 0; i < n && shown < 5; i++) {
            if (fabsf(a[i] - ref[i]) > 1e-6f * (1.0f + fabsf(ref[i]))) {
                fprintf(stderr, "%s: [%zu] got %.9g want %.9g\n", label, i, a[i], ref[i]);
                shown++;
            }
        }
    }
    ck_assert_msg(e <= tol, "%s: nmse %.3g > %.3g", label, e, tol);
}

void ccr_test_fill_uniform(gsl_rng *rng, float *v, size_t n, float lo, float hi)
{
    for (size_t i = 0; i < n; i++)
        v[i] = lo + (hi - lo) * (float)gsl_rng_uniform(rng);
}

const char *ccr_test_path(const char *name)
{
    static char bufs[8][512];
    static int next;
    const char *tmp = getenv("TMPDIR");
    if (tmp == NULL || tmp[0] == '\0')
        tmp = "/tmp";
    char *b = bufs[next];
    next = (next + 1) % 8;
    snprintf(b, sizeof bufs[0], "%s/ccr-test-%ld-%s", tmp, (long)getpid(), name);
    return b;
}

int ccr_test_write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (f == NULL)
        return -1;
    size_t w = fwrite(data, 1, len, f);
    int rc = fclose(f);
    return (w == len && rc == 0) ? 0 : -1;
}

int ccr_test_write_gz(const char *path, const void *data, size_t len)
{
    gzFile f = gzopen(path, "wb");
    if (f == NULL)
        return -1;
    int w = len > 0 ? gzwrite(f, data, (unsigned)len) : 0;
    int rc = gzclose(f);
    return (w == (int)len && rc == Z_OK) ? 0 : -1;
}

ccr_test_tpath ccr_test_tmp_path(const char *name)
{
    ccr_test_tpath p;
    snprintf(p.s, sizeof p.s, "%s", ccr_test_path(name));
    return p;
}

unsigned char *ccr_test_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    size_t cap = 1 << 12, n = 0;
    unsigned char *buf = malloc(cap);
    ck_assert_ptr_nonnull(buf);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            ck_assert_ptr_nonnull(buf);
        }
    }
    fclose(f);
    *len = n;
    return buf;
}

bool ccr_test_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

ccr_ctx *ccr_test_ctx(void)
{
    ccr_ctx *ctx = NULL;
    ck_assert_int_eq(ccr_ctx_init(&ctx), CCR_OK);
    return ctx;
}

gsl_rng *ccr_test_rng(unsigned long seed)
{
    gsl_rng *r = gsl_rng_alloc(gsl_rng_mt19937);
    ck_assert_ptr_nonnull(r);
    gsl_rng_set(r, seed);
    return r;
}

ccr_status ccr_test_peer_init(ccr_ctx *ctx, const char *env, ccr_backend **out,
                              const char **name)
{
    const char *peer = getenv(env);
    if (peer != NULL && (strcmp(peer, "cpu-ref") == 0 || strcmp(peer, "cpu") == 0)) {
        *name = peer;
        ccr_status s = ccr_backend_cpu_init(ctx, out);
        if (s == CCR_OK)
            s = ccr_backend_cpu_set_use_ref(*out, strcmp(peer, "cpu-ref") == 0);
        return s;
    }
    *name = "cuda";
    return ccr_backend_cuda_init(ctx, 0, out);
}

int ccr_test_run(Suite *s)
{
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
