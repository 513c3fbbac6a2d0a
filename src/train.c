/*
 * train.c - one training step (GSL's ITERATE): zero the gradients, forward,
 * loss, backward, update.  The driver owns the loop, the schedule and the
 * logging.
 */
#include "ccr/ccr_nn.h"
#include "internal.h"  // provides: CCR_TRY

ccr_status ccr_train_step(ccr_net *net, ccr_optim *opt, gsl_rng *rng, const float *x,
                          const int32_t *labels, size_t batch, ccr_step_stats *stats)
{
    if (net == NULL || opt == NULL)
        return CCR_EINVAL;
    ccr_arena *params = ccr_net_params(net);
    if (params == NULL)
        return ccr_net_loss_grad(net, x, labels, batch, stats); /* reports "not finalized" */
    CCR_TRY(ccr_arena_zero_grad(params));
    CCR_TRY(ccr_net_loss_grad_mode(net, x, labels, batch, CCR_MODE_TRAIN, rng, stats));
    return ccr_optim_step(opt);
}
