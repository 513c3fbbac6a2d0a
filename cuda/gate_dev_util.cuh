/*
 * gate_dev_util.cuh - building blocks shared by the device gates
 * (cuda/gate_<name>.cu) and the conditional layer (cuda/cond.cu): device
 * buffers, host <-> device copies, deterministic column sums, the finite
 * check and the host-drawn noise.  Each mirrors a host function of
 * src/gate_util.h; reductions run in double in a fixed order (no float
 * atomics), so a result does not depend on the launch.
 */
#ifndef CCR_GATE_DEV_UTIL_CUH
#define CCR_GATE_DEV_UTIL_CUH

#include <stdint.h>

#include <gsl/gsl_rng.h>

#include "cuda_common.cuh"  // provides: CCR_CUDA_TRY, ccr_cuda, ccr_grid
#include "gate_dev.h"       // provides: ccr_gate_dev_type

/* Device buffer of n elements of `size` bytes (zero-filled), the product
 * overflow-checked; CCR_ENOMEM for an overflow, CCR_EDEVMEM for cudaMalloc. */
ccr_status gdev_alloc(ccr_backend *be, size_t n, size_t size, void **out);

/* Host buffer of n elements of `size` bytes (pinned memory is not used:
 * the copies are small), the product overflow-checked. */
ccr_status gdev_host_alloc(ccr_backend *be, size_t n, size_t size, void **out);

/* dst[j] = sum over rows r of (double)src[r * ld + j], j < cols (device, dst
 * double; accumulate adds to dst instead).  Fixed order: eight partial sums
 * per column (rows r = i mod 8), then added 0..7; the same every run. */
ccr_status gdev_colsum(ccr_backend *be, const float *src, size_t rows, size_t cols, size_t ld,
                       double *dst, bool accumulate);

/* *bad = index + 1 of some non-finite float among p[n] (device), 0 if all are
 * finite; flag is one device int of scratch.  Synchronises. */
ccr_status gdev_find_nonfinite(ccr_backend *be, const float *p, size_t n, int *flag,
                               size_t *bad);

/* The noise of a training forward: n N(0, 1) floats drawn on the host into
 * host[n] with gate_noise_fill (the CPU gate's draws, in its order), then
 * copied to dev[n]. */
ccr_status gdev_noise(ccr_backend *be, gsl_rng *rng, float *host, float *dev, size_t n);

/* The stream of the backend (kernels of a gate launch on it). */
static inline cudaStream_t gdev_stream(ccr_backend *be) { return ccr_cuda(be)->stream; }

/* The tensor prefix + name of a finalized arena, its index in *idx. */
ccr_status gdev_find(ccr_arena *a, ccr_ctx *ctx, const char *prefix, const char *name,
                     size_t *idx);

/* Device math shared by the gates' kernels (the host versions in
 * src/gate_util.c compute the same in double). */
__device__ __forceinline__ double gdev_softplus(double x)
{
    return x > 0.0 ? x + log1p(exp(-x)) : log1p(exp(x));
}

__device__ __forceinline__ double gdev_sigmoid(double x)
{
    if (x >= 0.0)
        return 1.0 / (1.0 + exp(-x));
    double e = exp(x);
    return e / (1.0 + e);
}

/* Standard normal CDF, 0.5 erfc(-z / sqrt 2) (GSL's gsl_cdf_ugaussian_P on the
 * host agrees to double rounding). */
__device__ __forceinline__ double gdev_normal_cdf(double z)
{
    return 0.5 * erfc(-z * 0.70710678118654752440);
}

#endif /* CCR_GATE_DEV_UTIL_CUH */
