/*
 * layer_act.c - element-wise activation layers (ReLU, tanh, sigmoid,
 * identity).  No parameters; their FLOPs are not counted (see ccr_nn.h).
 */
#include <string.h>

#include "backend_impl.h"  // provides: struct ccr_backend (kernel table)
#include "internal.h"      // provides: CCR_UNUSED
#include "layer_impl.h"    // provides: ccr_layer, ccr_layer_ops

static ccr_status act_forward(ccr_layer *l, ccr_backend *be, const ccr_arena *a,
                              const float *x, float *y, size_t batch)
{
    CCR_UNUSED(a);
    return be->k->act_fwd(be, l->act, x, y, batch * l->d_out);
}

static ccr_status act_backward(ccr_layer *l, ccr_backend *be, const ccr_arena *a,
                               const float *x, const float *y, const float *dy, float *dx,
                               size_t batch)
{
    CCR_UNUSED(a);
    CCR_UNUSED(x);
    if (dx == NULL)
        return CCR_OK;
    return be->k->act_bwd(be, l->act, y, dy, dx, batch * l->d_out);
}

static size_t act_n_params(const ccr_layer *l)
{
    CCR_UNUSED(l);
    return 0;
}

static double act_flops_fwd(const ccr_layer *l)
{
    CCR_UNUSED(l);
    return 0.0;
}

static double act_flops_bwd(const ccr_layer *l, bool need_dx)
{
    CCR_UNUSED(l);
    CCR_UNUSED(need_dx);
    return 0.0;
}

const ccr_layer_ops ccr_layer_act_ops = {
    .kind = "activation",
    .declare = NULL,
    .init_params = NULL,
    .forward = act_forward,
    .backward = act_backward,
    .n_params = act_n_params,
    .flops_fwd = act_flops_fwd,
    .flops_bwd = act_flops_bwd,
};

const char *ccr_act_name(ccr_act act)
{
    switch (act) {
    case CCR_ACT_IDENTITY: return "identity";
    case CCR_ACT_RELU: return "relu";
    case CCR_ACT_TANH: return "tanh";
    case CCR_ACT_SIGMOID: return "sigmoid";
    }
    return NULL;
}

ccr_status ccr_act_from_name(const char *name, ccr_act *act)
{
    if (name == NULL || act == NULL)
        return CCR_EINVAL;
    for (int a = CCR_ACT_IDENTITY; a <= CCR_ACT_SIGMOID; a++) {
        if (strcmp(name, ccr_act_name((ccr_act)a)) == 0) {
            *act = (ccr_act)a;
            return CCR_OK;
        }
    }
    return CCR_EINVAL;
}
