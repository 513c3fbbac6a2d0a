/*
 * cpu_kernels.c - optimised CPU kernels that override references in the CPU
 * backend's table (BLIS's "reference first, then override").
 *
 * The optimiser updates run over every parameter each step, so their
 * reference form (double arithmetic per element, for clarity) costs more than
 * the GEMMs of a small batch.  These versions compute the same update in
 * float with the constants hoisted, in the form PyTorch uses for Adam
 * (step = lr / (1 - b1^t), denominator sqrt(v) / sqrt(1 - b2^t) + eps), so
 * the compiler vectorises them.  tests/test_grad.c checks them against the
 * references.
 */
#include <float.h>
#include <math.h>

#include "cpu_kernels.h"  // provides: the declarations below

void ccr_cpu_adam_step(float *restrict w, const float *restrict g, float *restrict m,
                       float *restrict v, size_t n, float lr, float b1, float b2, float eps,
                       float wd, uint64_t t)
{
    const float step = (float)((double)lr / (1.0 - pow((double)b1, (double)t)));
    const float inv_sqrt_c2 = (float)(1.0 / sqrt(1.0 - pow((double)b2, (double)t)));
    const float a1 = 1.0f - b1, a2 = 1.0f - b2;
    for (size_t i = 0; i < n; i++) {
        float gi = g[i] + wd * w[i];
        float mi = b1 * m[i] + a1 * gi;
        float vi = b2 * v[i] + a2 * gi * gi;
        /* Flush subnormal moments (see ccr_ref_adam_step). */
        mi = fabsf(mi) < FLT_MIN ? 0.0f : mi;
        vi = vi < FLT_MIN ? 0.0f : vi;
        m[i] = mi;
        v[i] = vi;
        w[i] -= step * mi / (sqrtf(vi) * inv_sqrt_c2 + eps);
    }
}
