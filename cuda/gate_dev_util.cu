/*
 * gate_dev_util.cu - the shared device-gate helpers of gate_dev_util.cuh and
 * the registry of device gates (ccr_gate_dev_find).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gate_dev_util.cuh"
#include "gate_util.h"  // provides: gate_noise_fill

static const ccr_gate_dev_type *const gate_dev_registry[] = {
    &ccr_gate_dev_none, &ccr_gate_dev_dense, &ccr_gate_dev_topk, &ccr_gate_dev_hmoe,
    &ccr_gate_dev_switch, &ccr_gate_dev_signtree, NULL,
};

extern "C" const ccr_gate_dev_type *ccr_gate_dev_find(const ccr_gate_type *t)
{
    for (const ccr_gate_dev_type *const *d = gate_dev_registry; t != NULL && *d != NULL; d++)
        if ((*d)->host == t)
            return *d;
    return NULL;
}

ccr_status gdev_alloc(ccr_backend *be, size_t n, size_t size, void **out)
{
    size_t bytes;
    if (!ccr_mul_ok(n ? n : 1, size, &bytes))
        CCR_FAIL(be->ctx, CCR_ENOMEM, "device buffer of %zu x %zu bytes overflows", n, size);
    return ccr_backend_alloc(be, bytes, out);
}

ccr_status gdev_host_alloc(ccr_backend *be, size_t n, size_t size, void **out)
{
    void *p = ccr_mallocn(n ? n : 1, size);
    if (p == NULL)
        CCR_FAIL(be->ctx, CCR_ENOMEM, "cannot allocate %zu x %zu host bytes", n, size);
    *out = p;
    return CCR_OK;
}

#define COLSUM_ROWS 8
__global__ void gdev_colsum_kernel(const float *src, size_t rows, size_t cols, size_t ld,
                                   double *dst, bool accumulate)
{
    __shared__ double part[COLSUM_ROWS][32];
    size_t c = blockIdx.x * (size_t)32 + threadIdx.x;
    double acc = 0.0;
    if (c < cols)
        for (size_t r = threadIdx.y; r < rows; r += COLSUM_ROWS)
            acc += (double)src[r * ld + c];
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        double s = part[0][threadIdx.x];
        for (int i = 1; i < COLSUM_ROWS; i++)
            s += part[i][threadIdx.x];
        dst[c] = accumulate ? dst[c] + s : s;
    }
}

ccr_status gdev_colsum(ccr_backend *be, const float *src, size_t rows, size_t cols, size_t ld,
                       double *dst, bool accumulate)
{
    if (cols == 0)
        return CCR_OK;
    dim3 block(32, COLSUM_ROWS);
    gdev_colsum_kernel<<<ccr_ceil_div(cols, 32), block, 0, gdev_stream(be)>>>(
        src, rows, cols, ld, dst, accumulate);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

/* flag = the smallest index + 1 of a non-finite entry (atomicMin on an int
 * flag is order-independent: the result is the same every run). */
__global__ void gdev_nonfinite_kernel(const float *p, size_t n, int *flag)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        if (!isfinite(p[i]))
            atomicMin(flag, (int)(i < 0x7ffffffe ? i + 1 : 0x7ffffffe));
}

ccr_status gdev_find_nonfinite(ccr_backend *be, const float *p, size_t n, int *flag,
                               size_t *bad)
{
    int h = 0x7fffffff;
    cudaStream_t s = gdev_stream(be);
    CCR_CUDA_TRY(be, cudaMemcpyAsync(flag, &h, sizeof h, cudaMemcpyHostToDevice, s));
    if (n > 0) {
        gdev_nonfinite_kernel<<<ccr_grid(n, 256), 256, 0, s>>>(p, n, flag);
        CCR_CUDA_LAUNCHED(be);
    }
    CCR_CUDA_TRY(be, cudaMemcpyAsync(&h, flag, sizeof h, cudaMemcpyDeviceToHost, s));
    CCR_CUDA_TRY(be, cudaStreamSynchronize(s));
    *bad = h == 0x7fffffff ? 0 : (size_t)h;
    return CCR_OK;
}

ccr_status gdev_noise(ccr_backend *be, gsl_rng *rng, float *host, float *dev, size_t n)
{
    if (n == 0)
        return CCR_OK;
    gate_noise_fill(host, n, rng);
    return ccr_backend_set(be, dev, host, n * sizeof *host); /* bounded: n <= max_batch x E */
}

ccr_status gdev_find(ccr_arena *a, ccr_ctx *ctx, const char *prefix, const char *name,
                     size_t *idx)
{
    char full[CCR_ARENA_MAX_NAME];
    int w = snprintf(full, sizeof full, "%s%s", prefix ? prefix : "", name);
    if (w < 0 || (size_t)w >= sizeof full)
        CCR_FAIL(ctx, CCR_EINVAL, "tensor name %s%s too long", prefix ? prefix : "", name);
    return ccr_arena_find(a, full, idx);
}
