/*
 * arena_grad.c - whole-block gradient utilities: the global L2 norm and
 * global-norm clipping (PyTorch's clip_grad_norm_), for custom training
 * loops built on ccr_net_loss_grad_mode.
 *
 * On the CPU the gradient block is walked in chunks staged through a stack
 * buffer (block order, one double accumulator: deterministic).  On a device
 * each written range is reduced and scaled where it lives, by the kernel
 * table's sum_squares (a fixed tree: deterministic too) and scale, instead
 * of a round trip per 1024 floats.
 */
#include <math.h>

#include "arena_impl.h"    // provides: ccr_arena_backend
#include "backend_impl.h"  // provides: struct ccr_backend (is_cpu, the kernel table)
#include "internal.h"      // provides: CCR_FAIL, CCR_TRY

enum { GRAD_CHUNK = 1024 };

static ccr_status grad_check(const ccr_arena *a)
{
    if (ccr_arena_grads(a) == NULL)
        CCR_FAIL(ccr_backend_ctx(ccr_arena_backend(a)), CCR_EINVAL, "arena not finalized");
    return CCR_OK;
}

typedef struct grad_walk {
    ccr_backend *be;
    float *g;
    double s;     /* norm: the sum of squares */
    float k;      /* clip: the scale */
} grad_walk;

static ccr_status norm_range(void *u, size_t off, size_t n, size_t row)
{
    CCR_UNUSED(row);
    grad_walk *w = u;
    if (!w->be->is_cpu && w->be->k->sum_squares != NULL) {
        double s;
        CCR_TRY(w->be->k->sum_squares(w->be, w->g + off, n, &s));
        w->s += s;
        return CCR_OK;
    }
    float buf[GRAD_CHUNK];
    for (size_t i0 = 0; i0 < n; i0 += GRAD_CHUNK) {
        size_t m = n - i0 < GRAD_CHUNK ? n - i0 : GRAD_CHUNK;
        CCR_TRY(ccr_backend_get(w->be, buf, w->g + off + i0, m * sizeof(float)));
        for (size_t i = 0; i < m; i++)
            w->s += (double)buf[i] * buf[i];
    }
    return CCR_OK;
}

static ccr_status scale_range(void *u, size_t off, size_t n, size_t row)
{
    CCR_UNUSED(row);
    grad_walk *w = u;
    if (!w->be->is_cpu && w->be->k->scale != NULL)
        return w->be->k->scale(w->be, w->g + off, n, w->k);
    float buf[GRAD_CHUNK];
    for (size_t i0 = 0; i0 < n; i0 += GRAD_CHUNK) {
        size_t m = n - i0 < GRAD_CHUNK ? n - i0 : GRAD_CHUNK;
        CCR_TRY(ccr_backend_get(w->be, buf, w->g + off + i0, m * sizeof(float)));
        for (size_t i = 0; i < m; i++)
            buf[i] *= w->k;
        CCR_TRY(ccr_backend_set(w->be, w->g + off + i0, buf, m * sizeof(float)));
    }
    return CCR_OK;
}

/* Only the ranges that may be non-zero are read (ccr_arena_for_written, in
 * block order): the sum is the whole block's, bit for bit, since the rest
 * adds exact zeros; scaling them would leave them zero. */
ccr_status ccr_arena_grad_norm(const ccr_arena *a, double *norm)
{
    if (a == NULL)
        return CCR_EINVAL;
    ccr_backend *be = ccr_arena_backend(a);
    CCR_CHECK_NULL(ccr_backend_ctx(be), norm);
    CCR_TRY(grad_check(a));
    grad_walk w = {.be = be, .g = ccr_arena_grads(a), .s = 0.0};
    CCR_TRY(ccr_arena_for_written(a, norm_range, &w));
    *norm = sqrt(w.s);
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
    grad_walk w = {.be = be, .g = ccr_arena_grads(a), .k = (float)(max_norm / nrm)};
    return ccr_arena_for_written(a, scale_range, &w);
}
