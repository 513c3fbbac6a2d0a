/*
 * ccr_test.h - helpers shared by the Check test programs.
 */
#ifndef CCR_TEST_H
#define CCR_TEST_H

#include <check.h>
#include <stdbool.h>
#include <stddef.h>

#include <gsl/gsl_rng.h>

#include "ccr/ccr.h"

/* Asserts a ccr call returned CCR_OK, printing the context's message if not. */
#define CCR_CK_OK(ctx, expr)                                                        \
    do {                                                                            \
        ccr_status ck_s_ = (expr);                                                  \
        ck_assert_msg(ck_s_ == CCR_OK, "%s -> %s: %s", #expr, ccr_strerror(ck_s_),  \
                      ccr_ctx_errmsg(ctx));                                         \
    } while (0)

/* Asserts a call returned the given status. */
#define CCR_CK_STATUS(ctx, expr, want)                                              \
    do {                                                                            \
        ccr_status ck_s_ = (expr);                                                  \
        ck_assert_msg(ck_s_ == (want), "%s -> %s (want %s): %s", #expr,              \
                      ccr_strerror(ck_s_), ccr_strerror(want), ccr_ctx_errmsg(ctx)); \
    } while (0)

/* Normalised mean squared error sum (a-b)^2 / sum b^2 (0 when both are zero). */
double ccr_test_nmse(const float *a, const float *b, size_t n);

/* Asserts nmse(a, ref) <= tol, printing the first mismatching entries. */
void ccr_test_assert_nmse(const float *a, const float *ref, size_t n, double tol,
                          const char *label);

/* The backend a CUDA parity test compares with the CPU: CUDA device 0, or,
 * when the environment variable env is "cpu" or "cpu-ref", a second CPU
 * backend (with the reference kernels for "cpu-ref") standing in for the GPU
 * - a development aid on machines without one.  *name gets "cuda", "cpu"
 * or "cpu-ref".  Returns ccr_backend_cuda_init's or the CPU's status
 * (CCR_EUNSUP / CCR_ENODEV: no CUDA, skip the test). */
ccr_status ccr_test_peer_init(ccr_ctx *ctx, const char *env, ccr_backend **out,
                              const char **name);

/* Fills v with U(lo, hi) draws from rng. */
void ccr_test_fill_uniform(gsl_rng *rng, float *v, size_t n, float lo, float hi);

/* A fresh path under the test's temporary directory (TMPDIR or /tmp),
 * unique per process: <tmp>/ccr-test-<pid>-<name>.  Returns a static buffer
 * slot (up to 8 live at once). */
const char *ccr_test_path(const char *name);

/* Writes bytes to a file (for malformed-file tests); returns 0 on success. */
int ccr_test_write_file(const char *path, const void *data, size_t len);

/* Writes bytes as a gzip file; returns 0 on success. */
int ccr_test_write_gz(const char *path, const void *data, size_t len);

/* A path that stays valid while other ccr_test_path slots are used. */
typedef struct ccr_test_tpath {
    char s[512];
} ccr_test_tpath;

/* ccr_test_path(name), copied into a value the caller holds. */
ccr_test_tpath ccr_test_tmp_path(const char *name);

/* The whole file as a malloc'd buffer (asserts it can be read); *len gets its size. */
unsigned char *ccr_test_read_file(const char *path, size_t *len);

/* Whether path exists (stat succeeds). */
bool ccr_test_exists(const char *path);

/* A fresh context (asserts ccr_ctx_init succeeds). */
ccr_ctx *ccr_test_ctx(void);

/* A fresh MT19937 generator seeded with seed (asserts the allocation). */
gsl_rng *ccr_test_rng(unsigned long seed);

/* Runs a suite and returns EXIT_SUCCESS only if no test failed. */
int ccr_test_run(Suite *s);

#endif /* CCR_TEST_H */
