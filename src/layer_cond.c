/*
 * layer_cond.c - the conditional layer (ccr_cond.h) as a kind of ccr_net
 * layer.  Its parameters are named "layers.<i>.experts.*" and
 * "layers.<i>.gate.*" (or "layers.<i>.tree.*"); its auxiliary loss is added
 * to the network's loss by nn.c and its gradient flows in the backward pass.
 */
#include <stdio.h>

#include "internal.h"     // provides: CCR_UNUSED
#include "layer_impl.h"   // provides: ccr_layer, ccr_layer_ops

static ccr_status cond_declare(ccr_layer *l, ccr_arena *a, size_t index)
{
    char prefix[32];
    snprintf(prefix, sizeof prefix, "layers.%zu.", index);
    return ccr_cond_declare(l->cond, a, prefix);
}

static ccr_status cond_init(ccr_layer *l, ccr_arena *a, gsl_rng *rng, float *scratch)
{
    CCR_UNUSED(a);
    CCR_UNUSED(scratch);
    return ccr_cond_init_params(l->cond, rng);
}

static ccr_status cond_forward(ccr_layer *l, ccr_backend *be, const ccr_arena *a,
                               const float *x, float *y, size_t batch)
{
    CCR_UNUSED(be);
    CCR_UNUSED(a);
    return ccr_cond_forward(l->cond, x, batch, l->train, l->rng, y, &l->stats);
}

static ccr_status cond_backward(ccr_layer *l, ccr_backend *be, const ccr_arena *a,
                                const float *x, const float *y, const float *dy, float *dx,
                                size_t batch)
{
    CCR_UNUSED(be);
    CCR_UNUSED(a);
    CCR_UNUSED(x);
    CCR_UNUSED(y);
    CCR_UNUSED(batch);
    return ccr_cond_backward(l->cond, dy, dx);
}

static size_t cond_n_params(const ccr_layer *l) { return ccr_cond_n_params(l->cond); }

static double cond_flops_fwd(const ccr_layer *l) { return ccr_cond_flops(l->cond, false); }

static double cond_flops_bwd(const ccr_layer *l, bool need_dx)
{
    return ccr_cond_flops_bwd(l->cond, need_dx);
}

const ccr_layer_ops ccr_layer_cond_ops = {
    .kind = "cond",
    .declare = cond_declare,
    .init_params = cond_init,
    .forward = cond_forward,
    .backward = cond_backward,
    .n_params = cond_n_params,
    .flops_fwd = cond_flops_fwd,
    .flops_bwd = cond_flops_bwd,
};
