/*
 * blas.c - the OpenBLAS core ccr runs on, chosen once per process, and what
 * ccr reads from the linked OpenBLAS (docs/DESIGN.md, "BLAS core").
 *
 * Debian's OpenBLAS 0.3.21 (DYNAMIC_ARCH) picks its Haswell kernels on Zen 5
 * and Prescott on AVX-512 Xeons it does not know, 2-5x slower than its
 * SkylakeX kernels there.  OpenBLAS reads OPENBLAS_CORETYPE once, in its
 * load-time constructor, before main.  ccr therefore switches the core after
 * that constructor, in its own (a constructor of the program that links
 * libccr.a, which runs after those of the shared libraries it needs), through
 * OpenBLAS's exported gotoblas_dynamic_quit/gotoblas_dynamic_init, with
 * OPENBLAS_CORETYPE set only around that call.  Those symbols are weak
 * references: an OpenBLAS without them (not DYNAMIC_ARCH) keeps its own
 * choice.  With a static libopenblas.a our constructor may run before
 * OpenBLAS's; we call its idempotent gotoblas_init first.
 *
 * Global state, unavoidable: the core itself is process-wide in OpenBLAS;
 * ccr keeps only a pthread_once flag, who chose the core and the name of
 * OpenBLAS's own choice, all written once.
 */
#define _POSIX_C_SOURCE 200809L

#include <cblas.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "blas_core.h"
#include "ccr/ccr_backend.h"

extern void gotoblas_dynamic_init(void) __attribute__((weak));
extern void gotoblas_dynamic_quit(void) __attribute__((weak));
extern void gotoblas_init(void) __attribute__((weak));

static pthread_once_t blas_once = PTHREAD_ONCE_INIT;
static ccr_blas_src blas_src = CCR_BLAS_SRC_OPENBLAS;
static char blas_openblas_choice[32] = "unknown";

static const char *corename_now(void)
{
    const char *name = openblas_get_corename();
    return name ? name : "unknown";
}

/* C = A B (row-major, m x k times k x n) with small integers: every sum is
 * exact in float, so the kernels must agree with the loop bit for bit.
 * Transposed operands and beta = 1 go through other kernel paths. */
static int check_shape(int m, int n, int k, float *a, float *b, float *c, double *da,
                       double *db, double *dc)
{
    for (int i = 0; i < m * k; i++) da[i] = a[i] = (float)((i * 7 + 3) % 9 - 4);
    for (int i = 0; i < k * n; i++) db[i] = b[i] = (float)((i * 5 + 1) % 7 - 3);
    for (int i = 0; i < m * n; i++) dc[i] = c[i] = (float)(i % 3);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a, k, b, n, 1.0f, c,
                n);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0, da, k, db, n, 1.0, dc,
                n);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = (double)((i * n + j) % 3);
            for (int p = 0; p < k; p++) s += (double)a[i * k + p] * b[p * n + j];
            if ((double)c[i * n + j] != s || dc[i * n + j] != s) return 0;
        }
    /* A^T B^T: a read as k x m, b as n x k. */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasTrans, m, n, k, 1.0f, a, m, b, k, 0.0f, c, n);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = 0.0;
            for (int p = 0; p < k; p++) s += (double)a[p * m + i] * b[j * k + p];
            if ((double)c[i * n + j] != s) return 0;
        }
    return 1;
}

int ccr_blas_selfcheck(void)
{
    enum { MAXD = 96 };
    static const int shapes[][3] = {{1, 1, 1}, {7, 5, 3}, {37, 29, 53}, {96, 80, 64}};
    float *f = malloc(sizeof(float) * 3 * MAXD * MAXD);   /* bounded: constants */
    double *d = malloc(sizeof(double) * 3 * MAXD * MAXD); /* bounded: constants */
    int ok = f != NULL && d != NULL;
    for (size_t s = 0; ok && s < sizeof shapes / sizeof shapes[0]; s++)
        ok = check_shape(shapes[s][0], shapes[s][1], shapes[s][2], f, f + MAXD * MAXD,
                         f + 2 * MAXD * MAXD, d, d + MAXD * MAXD, d + 2 * MAXD * MAXD);
    free(f);
    free(d);
    return ok;
}

/* Makes OpenBLAS pick `core` anew; the environment is as before afterwards. */
static void reinit_core(const char *core)
{
    setenv("OPENBLAS_CORETYPE", core, 1);
    gotoblas_dynamic_quit();
    gotoblas_dynamic_init();
    unsetenv("OPENBLAS_CORETYPE");
}

int ccr_blas_use_core(const char *core)
{
    if (gotoblas_dynamic_init == NULL || gotoblas_dynamic_quit == NULL || core == NULL)
        return 0;
    if (getenv("OPENBLAS_CORETYPE") != NULL || ccr_blas_core_class(core) < 0) return 0;
    char before[32];
    snprintf(before, sizeof before, "%s", corename_now());
    if (strcasecmp(before, core) == 0) return ccr_blas_selfcheck();
    if (ccr_blas_core_class(before) < 0) return 0;
    reinit_core(core);
    if (strcasecmp(corename_now(), core) == 0 && ccr_blas_selfcheck()) return 1;
    reinit_core(before);
    return 0;
}

static void blas_select_once(void)
{
    /* OpenBLAS's own constructor, a no-op once it has run.  With a static
     * libopenblas.a, ours may run first (link order): then this makes
     * OpenBLAS choose now, and its constructor later returns at once. */
    if (gotoblas_init != NULL) gotoblas_init();
    snprintf(blas_openblas_choice, sizeof blas_openblas_choice, "%s", corename_now());
    ccr_blas_src src;
    const char *core = ccr_blas_choose(ccr_cpu_features(), getenv("OPENBLAS_CORETYPE"),
                                       getenv("OPENBLAS_L2_SIZE"), blas_openblas_choice, &src);
    if (core != NULL && !ccr_blas_use_core(core)) src = CCR_BLAS_SRC_OPENBLAS;
    blas_src = src;
}

void ccr_blas_select(void) { pthread_once(&blas_once, blas_select_once); }

/* Before main, while the program has one thread: no BLAS call can be in
 * flight while the core changes. */
__attribute__((constructor)) static void blas_select_at_start(void) { ccr_blas_select(); }

const char *ccr_blas_openblas_choice(void)
{
    ccr_blas_select();
    return blas_openblas_choice;
}

const char *ccr_blas_corename(void)
{
    ccr_blas_select();
    return corename_now();
}

const char *ccr_blas_core_source(void)
{
    ccr_blas_select();
    switch (blas_src) {
    case CCR_BLAS_SRC_USER: return "user";
    case CCR_BLAS_SRC_CCR: return "ccr";
    default: return "openblas";
    }
}

int ccr_blas_num_threads(void) { return openblas_get_num_threads(); }
