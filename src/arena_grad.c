/*
 * arena_grad.c - whole-block gradient utilities: the global L2 norm and
 * global-norm clipping (PyTorch's clip_grad_norm_), for custom training
 * loops built on ccr_net_loss_grad_mode.
 *
 * The gradient block lives on the arena's backend, so it is walked in
 * chunks staged through a stack buffer with ccr_backend_get/set: no
 * allocation, any backend, and the same summation order (block order,
 * double accumulator) everywhere, so the norm is deterministic.
 */
#include <math.h>

#include "arena_impl.h"    // provides: ccr_arena_backend
#include "internal.h"      // provides: CCR_FAIL, CCR_TRY

enum { GRAD_CHUNK = 1024 };

static ccr_status grad_check(const ccr_arena *a)
{
    if (ccr_arena_grads(a) == NULL)
        CCR_FAIL(ccr_backend_ctx(ccr_arena_backend(a)), CCR_EINVAL, "arena not finalized");
    return CCR_OK;
}

ccr_status ccr_arena_grad_norm(const ccr_arena *a, double *norm)
{
    if (a == NULL)
        return CCR_EINVAL;
    ccr_backend *be = ccr_arena_backend(a);
    CCR_CHECK_NULL(ccr_backend_ctx(be), norm);
    CCR_TRY(grad_check(a));
    const float *g = ccr_arena_grads(a);
    size_t n = ccr_arena_block_len(a);
    float buf[GRAD_CHUNK];
    double s = 0.0;
    for (size_t i0 = 0; i0 < n; i0 += GRAD_CHUNK) {
        size_t m = n - i0 < GRAD_CHUNK ? n - i0 : GRAD_CHUNK;
        CCR_TRY(ccr_backend_get(be, buf, g + i0, m * sizeof(float)));
        for (size_t i = 0; i < m; i++)
            s += (double)buf[i] * buf[i];
    }
    *norm = sqrt(s);
    return CCR_OK;
}

ccr_status ccr_arena_clip_grad_norm(ccr_arena *a, double max_norm, double *norm)
{
    if (a == NULL)
        return CCR_EINVAL;
    ccr_backend *be = ccr_arena_backend(a);
    if (!(max_norm > 0.0) || !isfinite(max_norm))
        CCR_FAIL(ccr_backend_ctx(be), CCR_EINVAL, "max_norm %g must be finite and > 0", max_norm);
    double nrm;
    CCR_TRY(ccr_arena_grad_norm(a, &nrm));
    if (norm != NULL)
        *norm = nrm;
    if (!isfinite(nrm))
        CCR_FAIL(ccr_backend_ctx(be), CCR_EDOM, "gradient norm is %g", nrm);
    if (nrm <= max_norm)
        return CCR_OK;
    float k = (float)(max_norm / nrm);
    float *g = ccr_arena_grads(a);
    size_t n = ccr_arena_block_len(a);
    float buf[GRAD_CHUNK];
    for (size_t i0 = 0; i0 < n; i0 += GRAD_CHUNK) {
        size_t m = n - i0 < GRAD_CHUNK ? n - i0 : GRAD_CHUNK;
        CCR_TRY(ccr_backend_get(be, buf, g + i0, m * sizeof(float)));
        for (size_t i = 0; i < m; i++)
            buf[i] *= k;
        CCR_TRY(ccr_backend_set(be, g + i0, buf, m * sizeof(float)));
    }
    return CCR_OK;
}
