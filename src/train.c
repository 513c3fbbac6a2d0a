/*
 * train.c - one training step (GSL's ITERATE): zero the gradients, forward,
 * loss, backward, update.  The driver owns the loop, the schedule and the
 * logging.
 */
#include <math.h>

#include "arena_impl.h"    // provides: ccr_arena_for_written
#include "backend_impl.h"  // provides: struct ccr_backend (is_cpu)
#include "ccr/ccr_nn.h"
#include "internal.h"  // provides: CCR_TRY
#include "nn_impl.h"   // provides: struct ccr_net

typedef struct norm_walk {
    const float *g;
    double s;
} norm_walk;

static ccr_status norm_range(void *u, size_t off, size_t len, size_t row)
{
    CCR_UNUSED(row);
    norm_walk *w = u;
    for (size_t i = 0; i < len; i++)
        w->s += (double)w->g[off + i] * (double)w->g[off + i];
    return CCR_OK;
}

/* Squared L2 norm of every gradient that may be non-zero (double
 * accumulation).  On the CPU the ranges that may be non-zero are read in
 * place (the untouched rows of a bank are zero and skipped); on a device
 * the whole block is reduced there (the backend's sum_squares: one
 * download of a double, no host copy of the gradients). */
static ccr_status net_grad_norm2(ccr_net *net, double *out)
{
    ccr_arena *a = net->params;
    if (!net->be->is_cpu)
        return net->be->k->sum_squares(net->be, ccr_arena_grads(a), ccr_arena_block_len(a),
                                       out);
    norm_walk w = {.g = ccr_arena_grads(a), .s = 0.0};
    CCR_TRY(ccr_arena_for_written(a, norm_range, &w));
    *out = w.s;
    return CCR_OK;
}

ccr_status ccr_train_step(ccr_net *net, ccr_optim *opt, gsl_rng *rng, const float *x,
                          const int32_t *labels, size_t batch, ccr_step_stats *stats)
{
    if (net == NULL || opt == NULL)
        return CCR_EINVAL;
    ccr_arena *params = ccr_net_params(net);
    if (params == NULL)
        return ccr_net_loss_grad(net, x, labels, batch, stats); /* reports "not finalized" */
    CCR_TRY(ccr_arena_zero_grad(params));
    CCR_CHECK_NULL(net->ctx, stats);
    ccr_step_stats st;
    CCR_TRY(ccr_net_loss_grad_mode(net, x, labels, batch, CCR_MODE_TRAIN, rng, &st));
    /* No update from a non-finite gradient: the parameters stay as they were. */
    double norm2;
    CCR_TRY(net_grad_norm2(net, &norm2));
    if (!isfinite(norm2))
        CCR_FAIL(net->ctx, CCR_EDOM,
                 "gradient norm is not finite (loss %g); no update was made", st.loss);
    CCR_TRY(ccr_optim_step(opt));
    *stats = st;
    return CCR_OK;
}
