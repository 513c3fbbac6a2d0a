/*
 * ccr-blas-core - which OpenBLAS core ccr runs on, and what the choice is
 * worth: a square sgemm timed on OpenBLAS's own choice, on ccr's choice and
 * on any cores named, switched in this one process and timed alternately
 * (docs/DESIGN.md, "BLAS core"; docs/RESULTS.md, "BLAS core selection").
 * One JSON line per core on stdout.  Switching needs OPENBLAS_CORETYPE and
 * OPENBLAS_L2_SIZE unset (a preset always wins): with one set, only the core
 * in use is timed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cblas.h>

#include "blas_core.h"
#include "common.h"
#include "internal.h"  // provides: ccr_malloc3

#define PROG "ccr-blas-core"
#define MAXC 8

static void usage(void)
{
    printf("usage: ccr-blas-core [--n 2048] [--repeat 5] [--cores Haswell,SkylakeX]\n"
           "Times cblas_sgemm n x n x n (median of --repeat, rounds alternating over the\n"
           "cores) on OpenBLAS's own core choice, on ccr's, and on the --cores named.\n");
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    size_t n = 2048, repeat = 5, ncores = 0;
    const char *cores[MAXC];
    char names[MAXC][32], ccr_core[32];
    snprintf(ccr_core, sizeof ccr_core, "%s", ccr_blas_corename()); /* before any switch */
    cores[ncores++] = ccr_blas_openblas_choice();
    cores[ncores++] = ccr_core;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--n") == 0 && v) {
            n = drv_parse_size(PROG, a, v, 1);
            i++;
        } else if (strcmp(a, "--repeat") == 0 && v) {
            repeat = drv_parse_size(PROG, a, v, 1);
            i++;
        } else if (strcmp(a, "--cores") == 0 && v) {
            drv_span items[MAXC];
            const size_t k = drv_parse_list(PROG, a, v, items, MAXC - 2);
            for (size_t j = 0; j < k; j++) {
                snprintf(names[j], sizeof names[j], "%.*s", (int)items[j].len, items[j].p);
                if (ccr_blas_core_class(names[j]) < 0)
                    drv_usage_error(PROG, "--cores: unknown OpenBLAS x86 core '%s'", names[j]);
                cores[ncores++] = names[j];
            }
            i++;
        } else if (!drv_parse_common(PROG, a, usage)) {
            drv_bad_option(PROG, a, v);
        }
    }
    if (n > 16384 || repeat > 1000) drv_usage_error(PROG, "--n at most 16384, --repeat at most 1000");
    const int preset = getenv("OPENBLAS_CORETYPE") != NULL || getenv("OPENBLAS_L2_SIZE") != NULL;
    if (preset) ncores = 1, cores[0] = ccr_core;
    /* Distinct cores only (case-insensitive), OpenBLAS's own first. */
    size_t m = 0;
    for (size_t i = 0; i < ncores; i++) {
        size_t j = 0;
        while (j < m && strcasecmp(cores[j], cores[i]) != 0) j++;
        if (j == m) cores[m++] = cores[i];
    }
    ncores = m;
    float *a = ccr_malloc3(n, n, sizeof(float)), *b = ccr_malloc3(n, n, sizeof(float));
    float *c = ccr_malloc3(n, n, sizeof(float));
    double *t = ccr_malloc3(MAXC, repeat, sizeof(double));
    if (!a || !b || !c || !t) {
        fprintf(stderr, PROG ": out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < n * n; i++) {
        a[i] = (float)((i % 13) - 6) * 0.1f;
        b[i] = (float)((i % 7) - 3) * 0.1f;
    }
    const int in = (int)n;
    for (size_t r = 0; r <= repeat; r++) /* round 0: warm-up */
        for (size_t k = 0; k < ncores; k++) {
            if (!preset && !ccr_blas_use_core(cores[k])) {
                fprintf(stderr, PROG ": cannot switch OpenBLAS to core %s\n", cores[k]);
                return 1;
            }
            const double t0 = drv_now();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, in, in, in, 1.0f, a, in, b,
                        in, 0.0f, c, in);
            if (r > 0) t[k * repeat + r - 1] = drv_now() - t0;
        }
    const double flop = 2.0 * (double)n * (double)n * (double)n;
    for (size_t k = 0; k < ncores; k++) {
        qsort(t + k * repeat, repeat, sizeof(double), cmp_double);
        const double med = t[k * repeat + repeat / 2];
        printf("{\"driver\": \"%s\", \"machine\": \"%s\", \"core\": \"%s\", \"openblas_choice\": "
               "%s, \"ccr_choice\": %s, \"blas_core_source\": \"%s\", \"n\": %zu, \"repeat\": "
               "%zu, \"threads\": %d, \"seconds\": %.6f, \"gflops\": %.1f}\n",
               PROG, drv_machine(), cores[k],
               strcasecmp(cores[k], ccr_blas_openblas_choice()) == 0 ? "true" : "false",
               strcasecmp(cores[k], ccr_core) == 0 ? "true" : "false",
               ccr_blas_core_source(), n, repeat, ccr_blas_num_threads(), med, flop / med / 1e9);
    }
    free(a);
    free(b);
    free(c);
    free(t);
    return 0;
}
