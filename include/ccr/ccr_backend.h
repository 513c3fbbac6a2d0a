/*
 * ccr_backend.h - compute backends (CPU now, CUDA behind the build option).
 *
 * A backend owns the memory that tensors live in and the kernel table that
 * operates on it.  The caller never branches on the device: every layer calls
 * through the backend it was created on (ggml's backend vtable; BLIS's
 * "reference kernels first, then override").  Buffers are reached only through
 * ccr_backend_alloc/free/set/get/memset, so the same code runs on host or
 * device memory.
 *
 *     ccr_backend *be;
 *     ccr_backend_cpu_init(ctx, &be);               // cblas (OpenBLAS) kernels
 *     float *buf;
 *     ccr_backend_alloc(be, n * sizeof(float), (void **)&buf);
 *     ccr_backend_set(be, buf, host, n * sizeof(float));
 *     ...
 *     ccr_backend_free_buffer(be, buf);
 *     ccr_backend_free(be);
 *
 * The CUDA backend, ccr_backend_cuda_init, exists in every build: without CUDA
 * support compiled in it returns CCR_EUNSUP, and with CUDA but no device it
 * returns CCR_ENODEV.  No CUDA type appears in this header.
 */
#ifndef CCR_BACKEND_H
#define CCR_BACKEND_H

#include <stdbool.h>

#include "ccr_common.h"
#include "ccr_ctx.h"
#include "ccr_status.h"

CCR_BEGIN_DECLS

typedef struct ccr_backend ccr_backend;

/* Creates the CPU backend on ctx.  Its GEMM is OpenBLAS's cblas_sgemm; the
 * other kernels are ccr's scalar reference kernels (plain loops, double
 * accumulation in a fixed order; docs/DESIGN.md, "Backends").  Returns CCR_EINVAL
 * for NULL arguments, CCR_ENOMEM on allocation failure. */
ccr_status ccr_backend_cpu_init(ccr_ctx *ctx, ccr_backend **out);

/* Selects the pure reference kernels (scalar GEMM included) on a CPU backend
 * when use_ref is true, the optimised ones otherwise.  Tests use it to check
 * the fast kernels against the specification.  Returns CCR_EUNSUP on a
 * non-CPU backend. */
ccr_status ccr_backend_cpu_set_use_ref(ccr_backend *be, bool use_ref);

/* Creates a CUDA backend on the given device ordinal.  Returns CCR_EUNSUP
 * when ccr was built without CUDA, CCR_ENODEV when no such device exists,
 * CCR_ECUDA/CCR_ECUBLAS when the runtime or cuBLAS cannot be initialised. */
ccr_status ccr_backend_cuda_init(ccr_ctx *ctx, int device, ccr_backend **out);

/* Releases a backend (its buffers must have been freed).  NULL is accepted. */
void ccr_backend_free(ccr_backend *be);

/* "cpu", "cpu-ref" or "cuda". */
const char *ccr_backend_name(const ccr_backend *be);

/* One line describing the machine the backend computes on, for results
 * files: for the CPU, the OpenBLAS core and thread count, e.g.
 * "OpenBLAS 0.3.21 core=Haswell threads=2"; for CUDA, the device name. */
const char *ccr_backend_describe(const ccr_backend *be);

/* The context the backend reports errors on. */
ccr_ctx *ccr_backend_ctx(const ccr_backend *be);

/* Allocates `bytes` (> 0) of backend memory, 64-byte aligned on the CPU,
 * zero-filled.  Returns CCR_EINVAL for bytes == 0 or NULL out, CCR_ENOMEM /
 * CCR_EDEVMEM on failure; *out is set only on success. */
ccr_status ccr_backend_alloc(ccr_backend *be, size_t bytes, void **out);

/* Frees memory from ccr_backend_alloc.  NULL is accepted. */
void ccr_backend_free_buffer(ccr_backend *be, void *buf);

/* Copies host memory into a backend buffer / a backend buffer to host
 * memory / fills bytes with value.  Return CCR_EINVAL for NULL pointers and
 * CCR_ECUDA on a device error. */
ccr_status ccr_backend_set(ccr_backend *be, void *dst, const void *src, size_t bytes);
ccr_status ccr_backend_get(ccr_backend *be, void *dst, const void *src, size_t bytes);
ccr_status ccr_backend_memset(ccr_backend *be, void *dst, int value, size_t bytes);

/* Waits until all queued work on the backend has finished (no-op on CPU). */
ccr_status ccr_backend_synchronize(ccr_backend *be);

/* The arithmetic of a backend's GEMMs (storage stays float throughout).
 * FP32 (the default) computes in float as the CPU does; TF32 lets a CUDA
 * backend's cuBLAS use tensor cores with inputs rounded to TF32 (10-bit
 * mantissa, float accumulation), errors ~1e-3 relative; BF16 lets it round
 * inputs to bfloat16 (7-bit mantissa, float accumulation), errors ~1e-2
 * relative.  Faster, so never in parity tests. */
typedef enum ccr_math {
    CCR_MATH_FP32 = 0,
    CCR_MATH_TF32 = 1,
    CCR_MATH_BF16 = 2
} ccr_math;

/* Selects the GEMM arithmetic of every later GEMM on the backend (the
 * conditional layers' grouped GEMMs included).  FP32 is accepted by every
 * backend; TF32 and BF16 only by CUDA (CCR_EUNSUP elsewhere).  CCR_EINVAL
 * for an unknown mode. */
ccr_status ccr_backend_set_math(ccr_backend *be, ccr_math math);

/* C = alpha * op(A) * op(B) + beta * C on backend memory, row-major.
 * op(A) is M x K, op(B) is K x N, C is M x N; lda/ldb/ldc are row strides of
 * the matrices as stored.  Returns CCR_EINVAL for zero sizes, NULL pointers
 * or strides smaller than the stored row length. */
ccr_status ccr_backend_gemm(ccr_backend *be, bool trans_a, bool trans_b,
                            size_t m, size_t n, size_t k, float alpha,
                            const float *a, size_t lda, const float *b, size_t ldb,
                            float beta, float *c, size_t ldc);

/* The OpenBLAS core in use (openblas_get_corename), e.g. "SkylakeX", and the
 * number of OpenBLAS threads: process-wide facts of the linked OpenBLAS.
 *
 * The core is chosen once per process, before main, with no call needed
 * (docs/DESIGN.md, "BLAS core"): when OpenBLAS's own choice is of a slower
 * class than the best its kernels offer for this CPU (AVX-512: SkylakeX,
 * AVX2+FMA: Haswell, AVX: Sandybridge) and an exact sgemm/dgemm self-check
 * passes on it, ccr switches to it.  A preset OPENBLAS_CORETYPE or
 * OPENBLAS_L2_SIZE always wins: ccr then changes nothing.
 * ccr_blas_core_source says who chose: "user" (those variables), "ccr" (the
 * switch) or "openblas" (OpenBLAS's own choice, kept).  Never NULL. */
const char *ccr_blas_corename(void);
const char *ccr_blas_core_source(void);
int ccr_blas_num_threads(void);

CCR_END_DECLS

#endif /* CCR_BACKEND_H */
