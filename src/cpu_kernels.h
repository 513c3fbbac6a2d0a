/* cpu_kernels.h - optimised CPU kernels (see cpu_kernels.c). */
#ifndef CCR_CPU_KERNELS_H
#define CCR_CPU_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "ccr/ccr_common.h"

CCR_BEGIN_DECLS

/* Adam, the same update as ccr_ref_adam_step computed in float (PyTorch's
 * arrangement of the bias corrections); arrays must not overlap. */
void ccr_cpu_adam_step(float *w, const float *g, float *m, float *v, size_t n, float lr,
                       float b1, float b2, float eps, float wd, uint64_t t);

CCR_END_DECLS

#endif /* CCR_CPU_KERNELS_H */
