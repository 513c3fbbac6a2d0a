/*
 * layer_linear.c - the fully connected layer y = x W + b.
 *
 * W is [d_in, d_out] (row-vector convention, as in Shazeer et al.), b is
 * [d_out].  Backward: dW += x^T dy, db += sum_rows dy, dx = dy W^T.
 * FLOPs per example: forward 2 d_in d_out + d_out; backward 2 d_in d_out
 * (dW) + d_out (db) + 2 d_in d_out when dx is needed.
 */
#include <math.h>
#include <stdio.h>

#include "backend_impl.h"  // provides: struct ccr_backend (kernel table)
#include "internal.h"      // provides: CCR_TRY
#include "layer_impl.h"    // provides: ccr_layer, ccr_layer_ops

static ccr_status linear_declare(ccr_layer *l, ccr_arena *a, size_t index)
{
    char name[CCR_ARENA_MAX_NAME];
    size_t shape_w[2] = {l->d_in, l->d_out}, shape_b[1] = {l->d_out};
    snprintf(name, sizeof name, "layers.%zu.w", index);
    CCR_TRY(ccr_arena_add(a, name, 2, shape_w, &l->p_w));
    snprintf(name, sizeof name, "layers.%zu.b", index);
    return ccr_arena_add(a, name, 1, shape_b, &l->p_b);
}

/* PyTorch's nn.Linear default: W and b from U(-1/sqrt(d_in), 1/sqrt(d_in)). */
static ccr_status linear_init(ccr_layer *l, ccr_arena *a, gsl_rng *rng, float *scratch)
{
    double bound = 1.0 / sqrt((double)l->d_in);
    size_t idx[2] = {l->p_w, l->p_b};
    for (int t = 0; t < 2; t++) {
        size_t n = ccr_arena_size(a, idx[t]);
        for (size_t i = 0; i < n; i++)
            scratch[i] = (float)((2.0 * gsl_rng_uniform(rng) - 1.0) * bound);
        CCR_TRY(ccr_arena_set(a, idx[t], scratch));
    }
    return CCR_OK;
}

static ccr_status linear_forward(ccr_layer *l, ccr_backend *be, const ccr_arena *a,
                                 const float *x, float *y, size_t batch)
{
    CCR_TRY(be->k->gemm(be, false, false, batch, l->d_out, l->d_in, 1.0f, x, l->d_in,
                        ccr_arena_value(a, l->p_w), l->d_out, 0.0f, y, l->d_out));
    return be->k->bias_add(be, y, ccr_arena_value(a, l->p_b), batch, l->d_out);
}

static ccr_status linear_backward(ccr_layer *l, ccr_backend *be, const ccr_arena *a,
                                  const float *x, const float *y, const float *dy, float *dx,
                                  size_t batch)
{
    CCR_UNUSED(y);
    CCR_TRY(be->k->gemm(be, true, false, l->d_in, l->d_out, batch, 1.0f, x, l->d_in, dy,
                        l->d_out, 1.0f, ccr_arena_grad(a, l->p_w), l->d_out));
    CCR_TRY(be->k->bias_grad(be, ccr_arena_grad(a, l->p_b), dy, batch, l->d_out));
    if (dx == NULL)
        return CCR_OK;
    return be->k->gemm(be, false, true, batch, l->d_in, l->d_out, 1.0f, dy, l->d_out,
                       ccr_arena_value(a, l->p_w), l->d_out, 0.0f, dx, l->d_in);
}

/* SIZE_MAX if the count overflows (declare then fails with the message). */
static size_t linear_n_params(const ccr_layer *l)
{
    size_t n;
    if (!ccr_mul_ok(l->d_in, l->d_out, &n) || !ccr_add_ok(n, l->d_out, &n))
        return SIZE_MAX;
    return n;
}

static double linear_flops_fwd(const ccr_layer *l)
{
    return 2.0 * (double)l->d_in * (double)l->d_out + (double)l->d_out;
}

static double linear_flops_bwd(const ccr_layer *l, bool need_dx)
{
    double mm = 2.0 * (double)l->d_in * (double)l->d_out;
    return mm + (double)l->d_out + (need_dx ? mm : 0.0);
}

const ccr_layer_ops ccr_layer_linear_ops = {
    .kind = "linear",
    .declare = linear_declare,
    .init_params = linear_init,
    .forward = linear_forward,
    .backward = linear_backward,
    .n_params = linear_n_params,
    .flops_fwd = linear_flops_fwd,
    .flops_bwd = linear_flops_bwd,
};
