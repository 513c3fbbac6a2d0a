/*
 * blas.c - what ccr reads from the linked OpenBLAS: its core and threads.
 *
 * Debian's OpenBLAS 0.3.21 picks its Haswell kernels on Zen 5 unless
 * OPENBLAS_CORETYPE says otherwise, which halves sgemm speed; every
 * benchmark record therefore names the core (docs/RESULTS.md).
 */
#include <cblas.h>

#include "ccr/ccr_backend.h"

const char *ccr_blas_corename(void)
{
    const char *name = openblas_get_corename();
    return name ? name : "unknown";
}

int ccr_blas_num_threads(void) { return openblas_get_num_threads(); }
