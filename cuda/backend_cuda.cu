/*
 * backend_cuda.cu - the CUDA backend: device buffers, one stream, one cuBLAS
 * handle (both owned by the backend, never global), and the kernel table of
 * cuda/nn.cu.
 *
 * ccr_backend_cuda_init returns CCR_ENODEV when the device ordinal does not
 * exist (or no driver/GPU is present), so GPU tests can skip with exit 77.
 * Copies are ordered on the backend's stream; ccr_backend_get waits for the
 * copy, so host data is valid when it returns.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_common.cuh"  // provides: CCR_CUDA_TRY, ccr_cuda_state

static void cuda_free(ccr_backend *be)
{
    ccr_cuda_state *st = ccr_cuda(be);
    if (st != NULL) {
        if (st->cublas)
            cublasDestroy(st->cublas);
        if (st->partials)
            cudaFree(st->partials);
        if (st->ranges)
            cudaFree(st->ranges);
        free(st->h_ranges);
        if (st->stream)
            cudaStreamDestroy(st->stream);
        free(st);
    }
    free(be);
}

static ccr_status cuda_alloc(ccr_backend *be, size_t bytes, void **out)
{
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
        cudaGetLastError(); /* clear the sticky-free error state */
        CCR_FAIL(be->ctx, CCR_EDEVMEM, "cudaMalloc(%zu): %s", bytes, cudaGetErrorString(e));
    }
    e = cudaMemsetAsync(p, 0, bytes, ccr_cuda(be)->stream);
    if (e != cudaSuccess) {
        cudaFree(p);
        CCR_FAIL(be->ctx, CCR_ECUDA, "cudaMemsetAsync: %s", cudaGetErrorString(e));
    }
    *out = p;
    return CCR_OK;
}

static void cuda_free_buffer(ccr_backend *be, void *buf)
{
    /* cudaFree synchronises the device; buffers are freed only at teardown. */
    CCR_UNUSED(be);
    cudaFree(buf);
}

static ccr_status cuda_set(ccr_backend *be, void *dst, const void *src, size_t bytes)
{
    cudaStream_t s = ccr_cuda(be)->stream;
    CCR_CUDA_TRY(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s));
    /* The caller may reuse src as soon as we return. */
    CCR_CUDA_TRY(be, cudaStreamSynchronize(s));
    return CCR_OK;
}

static ccr_status cuda_get(ccr_backend *be, void *dst, const void *src, size_t bytes)
{
    cudaStream_t s = ccr_cuda(be)->stream;
    CCR_CUDA_TRY(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s));
    CCR_CUDA_TRY(be, cudaStreamSynchronize(s));
    return CCR_OK;
}

static ccr_status cuda_memset(ccr_backend *be, void *dst, int value, size_t bytes)
{
    CCR_CUDA_TRY(be, cudaMemsetAsync(dst, value, bytes, ccr_cuda(be)->stream));
    return CCR_OK;
}

static ccr_status cuda_copy(ccr_backend *be, void *dst, const void *src, size_t bytes)
{
    CCR_CUDA_TRY(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice,
                                     ccr_cuda(be)->stream));
    return CCR_OK;
}

static ccr_status cuda_synchronize(ccr_backend *be)
{
    CCR_CUDA_TRY(be, cudaStreamSynchronize(ccr_cuda(be)->stream));
    return CCR_OK;
}

/* The compute type every GEMM passes to cuBLAS (cu_gemm, cond.cu's grouped
 * GEMMs); the handle's math mode stays the default. */
static ccr_status cuda_set_math(ccr_backend *be, ccr_math math)
{
    ccr_cuda(be)->compute = math == CCR_MATH_TF32   ? CUBLAS_COMPUTE_32F_FAST_TF32
                            : math == CCR_MATH_BF16 ? CUBLAS_COMPUTE_32F_FAST_16BF
                                                    : CUBLAS_COMPUTE_32F;
    return CCR_OK;
}

static const ccr_backend_i cuda_iface = {
    "cuda",           /* name */
    cuda_free,        /* free */
    cuda_alloc,       /* alloc */
    cuda_free_buffer, /* free_buffer */
    cuda_set,         /* set */
    cuda_get,         /* get */
    cuda_memset,      /* memset */
    cuda_copy,        /* copy */
    cuda_synchronize, /* synchronize */
    cuda_set_math,    /* set_math */
};

extern "C" ccr_status ccr_backend_cuda_init(ccr_ctx *ctx, int device, ccr_backend **out)
{
    CCR_CHECK_NULL(ctx, out);
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        cudaGetLastError();
        CCR_FAIL(ctx, CCR_ENODEV, "no CUDA device (%s)",
                 e != cudaSuccess ? cudaGetErrorString(e) : "count is 0");
    }
    if (device < 0 || device >= count)
        CCR_FAIL(ctx, CCR_ENODEV, "device %d not in 0..%d", device, count - 1);
    ccr_backend *be = (ccr_backend *)calloc(1, sizeof *be);
    ccr_cuda_state *st = (ccr_cuda_state *)calloc(1, sizeof *st);
    if (be == NULL || st == NULL) {
        free(be);
        free(st);
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate the CUDA backend");
    }
    be->iface = &cuda_iface;
    be->ctx = ctx;
    be->impl = st;
    st->device = device;
    ccr_cuda_fill_kernels(&st->kernels);
    be->k = &st->kernels;
    ccr_status s = CCR_OK;
    cudaDeviceProp prop;
    if ((e = cudaSetDevice(device)) != cudaSuccess ||
        (e = cudaGetDeviceProperties(&prop, device)) != cudaSuccess ||
        (e = cudaStreamCreateWithFlags(&st->stream, cudaStreamNonBlocking)) != cudaSuccess ||
        (e = cudaMalloc((void **)&st->partials,
                        (CCR_CUDA_PARTIALS + 1) * sizeof(double))) != cudaSuccess ||
        (e = cudaMalloc((void **)&st->ranges,
                        sizeof(ccr_cuda_range[CCR_CUDA_RANGES]))) != cudaSuccess) {
        s = ccr_fail(ctx, CCR_ECUDA, __func__, __FILE__, __LINE__, "device %d: %s", device,
                     cudaGetErrorString(e));
    } else if ((st->h_ranges = (ccr_cuda_range *)malloc(
                    sizeof(ccr_cuda_range[CCR_CUDA_RANGES]))) == NULL) {
        s = ccr_fail(ctx, CCR_ENOMEM, __func__, __FILE__, __LINE__,
                     "cannot allocate the ranges staging");
    } else {
        cublasStatus_t b = cublasCreate(&st->cublas);
        if (b == CUBLAS_STATUS_SUCCESS)
            b = cublasSetStream(st->cublas, st->stream);
        /* Plain FP32 (no TF32): results comparable with the CPU reference;
         * ccr_backend_set_math changes the compute type of later GEMMs. */
        if (b == CUBLAS_STATUS_SUCCESS)
            b = cublasSetMathMode(st->cublas, CUBLAS_DEFAULT_MATH);
        st->compute = CUBLAS_COMPUTE_32F;
        if (b != CUBLAS_STATUS_SUCCESS)
            s = ccr_fail(ctx, CCR_ECUBLAS, __func__, __FILE__, __LINE__, "cuBLAS init: %s",
                         cublasGetStatusString(b));
    }
    if (s != CCR_OK) {
        cuda_free(be);
        return s;
    }
    int rt = 0;
    cudaRuntimeGetVersion(&rt);
    snprintf(be->describe, sizeof be->describe, "%.80s (sm_%d%d, %.0f GiB) CUDA runtime %d.%d",
             prop.name, prop.major, prop.minor,
             (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0), rt / 1000,
             (rt % 1000) / 10);
    *out = be;
    return CCR_OK;
}
