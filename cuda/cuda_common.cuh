/*
 * cuda_common.cuh - error checking and small helpers for ccr's CUDA code.
 *
 * CCR_CUDA_TRY / CCR_CUBLAS_TRY turn a failing runtime or cuBLAS call into a
 * ccr status with the statement text, function, file and line recorded on
 * the backend's context (ggml's CUDA_CHECK_GEN, but returning instead of
 * aborting).  Every launcher ends with CCR_CUDA_LAUNCHED, which checks
 * cudaGetLastError as llm.c does.
 */
#ifndef CCR_CUDA_COMMON_CUH
#define CCR_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "backend_impl.h"  // provides: struct ccr_backend
#include "internal.h"      // provides: ccr_fail

#define CCR_CUDA_TRY(be, expr)                                                          \
    do {                                                                                \
        cudaError_t ccr_e_ = (expr);                                                    \
        if (ccr_e_ != cudaSuccess)                                                      \
            return ccr_fail((be)->ctx, ccr_e_ == cudaErrorMemoryAllocation ? CCR_EDEVMEM \
                                                                          : CCR_ECUDA,  \
                            __func__, __FILE__, __LINE__, "%s: %s", #expr,              \
                            cudaGetErrorString(ccr_e_));                                \
    } while (0)

#define CCR_CUBLAS_TRY(be, expr)                                                        \
    do {                                                                                \
        cublasStatus_t ccr_b_ = (expr);                                                 \
        if (ccr_b_ != CUBLAS_STATUS_SUCCESS)                                            \
            return ccr_fail((be)->ctx, CCR_ECUBLAS, __func__, __FILE__, __LINE__,       \
                            "%s: %s", #expr, cublasGetStatusString(ccr_b_));            \
    } while (0)

#define CCR_CUDA_LAUNCHED(be) CCR_CUDA_TRY(be, cudaGetLastError())

/* One range of the ranges ops (sgd/adam/zero_ranges): its float offset and
 * Adam's bias corrections 1 - b1^t, 1 - b2^t, computed on the host with
 * the same pow as adam_step's. */
typedef struct ccr_cuda_range {
    size_t off;
    double c1, c2;
} ccr_cuda_range;

/* Ranges per launch of the ranges ops (gridDim.y <= 65535). */
#define CCR_CUDA_RANGES 32768

/* Backend-private CUDA state (be->impl). */
typedef struct ccr_cuda_state {
    int device;
    cudaStream_t stream;
    cublasHandle_t cublas;
    cublasComputeType_t compute; /* of every GEMM: ccr_backend_set_math */
    ccr_kernels kernels;   /* the table be->k points to */
    double *partials;      /* [CCR_CUDA_PARTIALS + 1] device scratch of reductions */
    ccr_cuda_range *ranges, *h_ranges; /* [CCR_CUDA_RANGES] device / host */
} ccr_cuda_state;

/* Blocks of a two-stage reduction (sum_squares): fixed, so the order of the
 * additions depends on n only. */
#define CCR_CUDA_PARTIALS 1024

static inline ccr_cuda_state *ccr_cuda(ccr_backend *be) { return (ccr_cuda_state *)be->impl; }

static inline unsigned ccr_ceil_div(size_t a, size_t b) { return (unsigned)((a + b - 1) / b); }

/* Grid size for an element-wise kernel over n elements (grid-stride loops
 * cover the rest). */
static inline unsigned ccr_grid(size_t n, unsigned block)
{
    size_t g = (n + block - 1) / block;
    return (unsigned)(g < 65535 * 8 ? (g ? g : 1) : 65535 * 8);
}

/* Fills the kernel table with the CUDA launchers of cuda/nn.cu, then those
 * of cuda/seq.cu (ccr_cuda_fill_seq_kernels: the sequence models' ops). */
void ccr_cuda_fill_kernels(ccr_kernels *k);
void ccr_cuda_fill_seq_kernels(ccr_kernels *k);

#endif /* CCR_CUDA_COMMON_CUH */
