/*
 * backend_cuda_none.c - ccr_backend_cuda_init in a build without CUDA.
 *
 * The function exists in every build so callers need no #ifdef; here it
 * honestly reports that CUDA support was not compiled in.
 */
#include "ccr/ccr_backend.h"
#include "internal.h"  // provides: CCR_FAIL

ccr_status ccr_backend_cuda_init(ccr_ctx *ctx, int device, ccr_backend **out)
{
    CCR_UNUSED(out);
    CCR_FAIL(ctx, CCR_EUNSUP, "ccr was built without CUDA (meson -Dcuda=enabled needs nvcc "
                              "and cuBLAS); device %d unavailable", device);
}
