/*
 * blas_core.h - internal: choosing the OpenBLAS core (docs/DESIGN.md,
 * "BLAS core").  The rule is a pure function of the CPU's features, the
 * preset environment and OpenBLAS's own choice, so tests check it on any
 * machine; src/blas.c applies it once per process.
 */
#ifndef CCR_BLAS_CORE_H
#define CCR_BLAS_CORE_H

/* CPU features that decide which OpenBLAS kernels run, each counted only
 * when the OS saves the registers it needs (XCR0 via xgetbv). */
enum {
    CCR_CPU_AVX = 1u << 0,     /* AVX, OS saves YMM */
    CCR_CPU_AVX2FMA = 1u << 1, /* AVX2 and FMA3, OS saves YMM */
    CCR_CPU_AVX512 = 1u << 2,  /* AVX-512 F, CD, BW, DQ, VL; OS saves ZMM and k */
};

/* Who chose the core in use. */
typedef enum {
    CCR_BLAS_SRC_OPENBLAS = 0, /* OpenBLAS's own choice, kept */
    CCR_BLAS_SRC_USER,         /* OPENBLAS_CORETYPE or OPENBLAS_L2_SIZE was preset */
    CCR_BLAS_SRC_CCR,          /* ccr switched to a faster core */
} ccr_blas_src;

/* This CPU's features (0 on non-x86 machines). */
unsigned ccr_cpu_features(void);

/* The speed class of an OpenBLAS core name (case-insensitive): 4 AVX-512
 * kernels, 3 AVX2/FMA, 2 AVX, 1 SSE-era x86 cores, -1 a name ccr does not
 * know (another architecture, a newer OpenBLAS): ccr then keeps it. */
int ccr_blas_core_class(const char *core);

/* The selection rule.  Returns the core ccr switches to (an OpenBLAS
 * OPENBLAS_CORETYPE name) or NULL to keep `current`, and sets *src.  A preset
 * env_coretype or env_l2 (NULL when unset) always wins: NULL, USER.
 * Otherwise the best core the features allow is returned only when it is of
 * a higher class than `current` (OpenBLAS's own choice). */
const char *ccr_blas_choose(unsigned features, const char *env_coretype, const char *env_l2,
                            const char *current, ccr_blas_src *src);

/* Switches the running OpenBLAS to `core` (DYNAMIC_ARCH builds only), then
 * checks a few exact sgemm/dgemm products; on any failure it goes back to the
 * core that was in use.  Returns 1 when `core` is in use and correct, 0 when
 * nothing changed.  Not thread-safe: no BLAS call may run meanwhile.  Refuses
 * (0) when OPENBLAS_CORETYPE is set.  For src/blas.c and the measurement in
 * experiments/blas_core.c. */
int ccr_blas_use_core(const char *core);

/* Applies the rule to this process, once (pthread_once); runs before main
 * from a constructor, and from ccr_backend_cpu_init. */
void ccr_blas_select(void);

/* The core OpenBLAS chose itself at load time (before any switch). */
const char *ccr_blas_openblas_choice(void);

/* Exact products on the core in use: 1 when all agree with the naive loop. */
int ccr_blas_selfcheck(void);

#endif
