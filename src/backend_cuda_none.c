/*
 * backend_cuda_none.c - the CUDA entry points in a build without CUDA.
 *
 * The functions exist in every build so callers need no #ifdef; here they
 * honestly report that CUDA support was not compiled in.  (Without a CUDA
 * backend no layer is ever on one, so the conditional layer's device half
 * below is never reached; it still answers.)
 */
#include "ccr/ccr_backend.h"
#include "cond_dev.h"
#include "gate_dev.h"
#include "internal.h"  // provides: CCR_FAIL

ccr_status ccr_backend_cuda_init(ccr_ctx *ctx, int device, ccr_backend **out)
{
    CCR_UNUSED(out);
    CCR_FAIL(ctx, CCR_EUNSUP, "ccr was built without CUDA (meson -Dcuda=enabled needs nvcc "
                              "and cuBLAS); device %d unavailable", device);
}

const ccr_gate_dev_type *ccr_gate_dev_find(const ccr_gate_type *t)
{
    CCR_UNUSED(t);
    return NULL;
}

ccr_status ccr_cond_dev_alloc(ccr_backend *be, ccr_gate *g, const ccr_cond_dev_shape *sh,
                              ccr_cond_dev **out)
{
    CCR_UNUSED(g);
    CCR_UNUSED(sh);
    CCR_UNUSED(out);
    CCR_FAIL(ccr_backend_ctx(be), CCR_EUNSUP, "ccr was built without CUDA");
}

void ccr_cond_dev_free(ccr_cond_dev *d) { CCR_UNUSED(d); }

size_t ccr_cond_dev_memory_bytes(const ccr_cond_dev *d)
{
    CCR_UNUSED(d);
    return 0;
}

ccr_status ccr_cond_dev_bind(ccr_cond_dev *d, ccr_arena *a, const size_t p[4],
                             const char *gate_prefix)
{
    CCR_UNUSED(d);
    CCR_UNUSED(p);
    CCR_UNUSED(gate_prefix);
    return a == NULL ? CCR_EINVAL : CCR_EUNSUP;
}

ccr_status ccr_cond_dev_forward(ccr_cond_dev *d, const float *x, size_t batch, bool train,
                                gsl_rng *rng, float *y, ccr_route *route,
                                ccr_gate_stats *stats, size_t *n_pairs)
{
    CCR_UNUSED(d), CCR_UNUSED(x), CCR_UNUSED(batch), CCR_UNUSED(train), CCR_UNUSED(rng);
    CCR_UNUSED(y), CCR_UNUSED(route), CCR_UNUSED(stats), CCR_UNUSED(n_pairs);
    return CCR_EUNSUP;
}

ccr_status ccr_cond_dev_backward(ccr_cond_dev *d, const float *dy, float *dx)
{
    CCR_UNUSED(d), CCR_UNUSED(dy), CCR_UNUSED(dx);
    return CCR_EUNSUP;
}
