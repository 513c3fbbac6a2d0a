/*
 * test_blas_core.c - the OpenBLAS core choice (docs/DESIGN.md, "BLAS core"):
 * the selection rule as a pure function (a preset always wins), the CPU
 * features against the compiler's own detection, the choice this process
 * made, and every core this CPU supports computing sgemm correctly after ccr
 * switches to it.
 */
#define _POSIX_C_SOURCE 200809L
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "blas_core.h"
#include "ccr_test.h"

static const unsigned F512 = CCR_CPU_AVX | CCR_CPU_AVX2FMA | CCR_CPU_AVX512;
static const unsigned F2 = CCR_CPU_AVX | CCR_CPU_AVX2FMA;
static const unsigned F1 = CCR_CPU_AVX;

START_TEST(test_rule)
{
    static const struct {
        unsigned feat;
        const char *coretype, *l2, *current, *want;
        ccr_blas_src src;
    } cases[] = {
        /* A preset always wins, whatever it says and whatever the CPU has. */
        {F512, "Haswell", NULL, "Haswell", NULL, CCR_BLAS_SRC_USER},
        {F512, "Prescott", NULL, "Prescott", NULL, CCR_BLAS_SRC_USER},
        {F512, "", NULL, "Prescott", NULL, CCR_BLAS_SRC_USER},
        {F512, NULL, "512", "Prescott", NULL, CCR_BLAS_SRC_USER},
        {F512, NULL, "", "Haswell", NULL, CCR_BLAS_SRC_USER},
        /* The cases: an AVX-512 Xeon on Prescott, Zen 5 on Haswell. */
        {F512, NULL, NULL, "Prescott", "SkylakeX", CCR_BLAS_SRC_CCR},
        {F512, NULL, NULL, "Haswell", "SkylakeX", CCR_BLAS_SRC_CCR},
        {F512, NULL, NULL, "zen", "SkylakeX", CCR_BLAS_SRC_CCR},
        {F512, NULL, NULL, "Sandybridge", "SkylakeX", CCR_BLAS_SRC_CCR},
        /* OpenBLAS's own choice kept when it is of the best class already. */
        {F512, NULL, NULL, "SkylakeX", NULL, CCR_BLAS_SRC_OPENBLAS},
        {F512, NULL, NULL, "Cooperlake", NULL, CCR_BLAS_SRC_OPENBLAS},
        {F512, NULL, NULL, "SAPPHIRERAPIDS", NULL, CCR_BLAS_SRC_OPENBLAS},
        {F2, NULL, NULL, "Prescott", "Haswell", CCR_BLAS_SRC_CCR},
        {F2, NULL, NULL, "Zen", NULL, CCR_BLAS_SRC_OPENBLAS},
        {F2, NULL, NULL, "Haswell", NULL, CCR_BLAS_SRC_OPENBLAS},
        {F1, NULL, NULL, "Nehalem", "Sandybridge", CCR_BLAS_SRC_CCR},
        {F1, NULL, NULL, "Bulldozer", NULL, CCR_BLAS_SRC_OPENBLAS},
        {0, NULL, NULL, "Prescott", NULL, CCR_BLAS_SRC_OPENBLAS},
        /* Never a core the CPU lacks, never over a name ccr does not know. */
        {F2, NULL, NULL, "SkylakeX", NULL, CCR_BLAS_SRC_OPENBLAS},
        {F512, NULL, NULL, "armv8", NULL, CCR_BLAS_SRC_OPENBLAS},
        {F512, NULL, NULL, "unknown", NULL, CCR_BLAS_SRC_OPENBLAS},
        {F512, NULL, NULL, NULL, NULL, CCR_BLAS_SRC_OPENBLAS},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ccr_blas_src src = (ccr_blas_src)99;
        const char *got = ccr_blas_choose(cases[i].feat, cases[i].coretype, cases[i].l2,
                                          cases[i].current, &src);
        ck_assert_msg((got == NULL && cases[i].want == NULL) ||
                          (got != NULL && cases[i].want != NULL &&
                           strcmp(got, cases[i].want) == 0),
                      "case %zu: got %s, want %s", i, got ? got : "(keep)",
                      cases[i].want ? cases[i].want : "(keep)");
        ck_assert_msg(src == cases[i].src, "case %zu: source %d, want %d", i, (int)src,
                      (int)cases[i].src);
    }
}
END_TEST

START_TEST(test_features)
{
    const unsigned f = ccr_cpu_features();
    /* Each class implies the ones below it. */
    if (f & CCR_CPU_AVX512) ck_assert(f & CCR_CPU_AVX2FMA);
    if (f & CCR_CPU_AVX2FMA) ck_assert(f & CCR_CPU_AVX);
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    const int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") &&
                       __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512cd");
    const int avx2fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    ck_assert_int_eq(!!(f & CCR_CPU_AVX), !!__builtin_cpu_supports("avx"));
    ck_assert_int_eq(!!(f & CCR_CPU_AVX2FMA), avx2fma);
    ck_assert_int_eq(!!(f & CCR_CPU_AVX512), avx512 && avx2fma);
#endif
}
END_TEST

static int best_class(unsigned f)
{
    return (f & CCR_CPU_AVX512) ? 4 : (f & CCR_CPU_AVX2FMA) ? 3 : (f & CCR_CPU_AVX) ? 2 : 0;
}

/* The choice made before main: what the environment of this run implies. */
START_TEST(test_this_process)
{
    const char *core = ccr_blas_corename(), *src = ccr_blas_core_source();
    const char *env_core = getenv("OPENBLAS_CORETYPE"), *env_l2 = getenv("OPENBLAS_L2_SIZE");
    if (env_core != NULL || env_l2 != NULL) {
        ck_assert_str_eq(src, "user");
        ck_assert_str_eq(core, ccr_blas_openblas_choice());
        return;
    }
    const int own = ccr_blas_core_class(ccr_blas_openblas_choice());
    if (own < 0) {
        ck_assert_str_eq(src, "openblas");
        return;
    }
    const int best = best_class(ccr_cpu_features());
    ck_assert_int_eq(ccr_blas_core_class(core), own > best ? own : best);
    ck_assert_str_eq(src, own >= best ? "openblas" : "ccr");
}
END_TEST

/* A 160 x 120 x 140 sgemm (both layouts) against a double loop. */
static void check_sgemm(const char *core)
{
    enum { M = 160, N = 120, K = 140 };
    float *a = malloc(sizeof(float) * M * K), *b = malloc(sizeof(float) * K * N); /* bounded */
    float *c = malloc(sizeof(float) * M * N);                                     /* bounded */
    ck_assert(a && b && c);
    for (int i = 0; i < M * K; i++) a[i] = sinf((float)i * 0.37f);
    for (int i = 0; i < K * N; i++) b[i] = cosf((float)i * 0.11f);
    for (int t = 0; t < 2; t++) {
        const CBLAS_TRANSPOSE tb = t ? CblasTrans : CblasNoTrans;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, tb, M, N, K, 1.0f, a, K, b, t ? K : N, 0.0f,
                    c, N);
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                double s = 0.0, mag = 0.0;
                for (int p = 0; p < K; p++) {
                    const double v = (double)a[i * K + p] * (t ? b[j * K + p] : b[p * N + j]);
                    s += v;
                    mag += fabs(v);
                }
                ck_assert_msg(fabs(c[i * N + j] - s) <= 1e-5 * mag + 1e-6,
                              "core %s: c[%d,%d] = %g, want %g", core, i, j, c[i * N + j], s);
            }
    }
    free(a);
    free(b);
    free(c);
}

/* Every core this CPU supports, switched to the way the library does it,
 * names itself and computes correctly; then back to OpenBLAS's own. */
START_TEST(test_switch_numerics)
{
    unsetenv("OPENBLAS_CORETYPE"); /* this forked test only; a preset refuses any switch */
    unsetenv("OPENBLAS_L2_SIZE");
    const char *own = ccr_blas_openblas_choice();
    if (ccr_blas_core_class(own) < 0) return; /* not an x86 DYNAMIC_ARCH OpenBLAS */
    const int best = best_class(ccr_cpu_features());
    static const char *cores[] = {"Sandybridge", "Haswell", "SkylakeX"};
    for (int i = 0; i < 3; i++) {
        if (ccr_blas_core_class(cores[i]) > best) continue;
        ck_assert_msg(ccr_blas_use_core(cores[i]) == 1, "switch to %s", cores[i]);
        ck_assert_str_eq(ccr_blas_corename(), cores[i]);
        ck_assert(getenv("OPENBLAS_CORETYPE") == NULL);
        check_sgemm(cores[i]);
    }
    ck_assert_int_eq(ccr_blas_use_core(own), 1);
    ck_assert_str_eq(ccr_blas_corename(), own);
    /* A preset refuses any switch. */
    setenv("OPENBLAS_CORETYPE", own, 1);
    ck_assert_int_eq(ccr_blas_use_core("Sandybridge"), 0);
    ck_assert_str_eq(ccr_blas_corename(), own);
}
END_TEST

static Suite *blas_core_suite(void)
{
    Suite *s = suite_create("blas_core");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_rule);
    tcase_add_test(tc, test_features);
    tcase_add_test(tc, test_this_process);
    tcase_add_test(tc, test_switch_numerics);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return ccr_test_run(blas_core_suite()); }
