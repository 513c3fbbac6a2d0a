/*
 * gate_router.h - the softmax router shared by the dense and switch gates.
 *
 * One parameter `<prefix>w_g [d_in, n]`; forward computes the clean logits
 * x W_g, their row softmax p and, when the z-loss is on, the ST-MoE router
 * z-loss z * (1/B) sum_b logsumexp(logits_b)^2.  Backward takes dL/dlogits
 * accumulated by the gate (its softmax backward), adds the z-loss term and
 * pushes the result into dW_g and dx.  Every buffer is sized for max_batch
 * in gate_router_init; forward and backward allocate nothing.
 */
#ifndef CCR_GATE_ROUTER_H
#define CCR_GATE_ROUTER_H

#include <stdbool.h>
#include <stddef.h>

#include <gsl/gsl_rng.h>

#include "ccr/ccr_arena.h"
#include "ccr/ccr_common.h"
#include "ccr/ccr_ctx.h"
#include "ccr/ccr_status.h"

CCR_BEGIN_DECLS

typedef struct gate_router {
    ccr_ctx *ctx;
    const char *gate;  /* gate name, for messages */
    size_t d_in;
    size_t n;          /* router outputs (experts) */
    size_t max_batch;
    double z_loss;     /* z-loss coefficient (0 = off) */
    ccr_arena *arena;  /* where w_g lives (NULL before declare) */
    size_t w_idx;      /* arena index of w_g */
    float *logits;     /* [max_batch, n] x W_g of the last forward */
    float *probs;      /* [max_batch, n] row softmax of logits */
    float *dz;         /* [max_batch, n] backward scratch, dL/dlogits */
    double *lse;       /* [max_batch] logsumexp of each logits row */
    double zbatch;     /* the z-loss's batch (the global one under expert parallelism),
                          set by the gate after its forward; grad_end divides by it */
} gate_router;

/* Validates n (E != 0), z_loss (finite, >= 0) and the sizes, and allocates
 * the buffers.  CCR_EINVAL names the option; CCR_ENOMEM.  On failure
 * nothing stays allocated. */
ccr_status gate_router_init(gate_router *r, ccr_ctx *ctx, const char *gate, size_t d_in,
                            size_t n, double z_loss, size_t max_batch);
void gate_router_free(gate_router *r);

/* Declares `<prefix>w_g [d_in, n]`. */
ccr_status gate_router_declare(gate_router *r, ccr_arena *a, const char *prefix);

/* Zeros, or N(0, 1/d_in) draws with randomize (row-major). */
/* W_g from N(0, sd^2), or zeros when sd == 0. */
ccr_status gate_router_init_params(gate_router *r, double sd, gsl_rng *rng);

/* logits, probs (and lse when z_loss > 0) for x [batch, d_in];
 * *zsum = sum_b lse_b^2 (0 when off).  CCR_EINVAL when the parameters are
 * not declared or the arena is not finalized. */
ccr_status gate_router_forward(gate_router *r, const float *x, size_t batch, double *zsum);

/* The z-loss z_loss * zsum / batch of a forward whose (possibly global,
 * summed over ranks) Σ lse^2 is zsum over `batch` examples; remembers batch
 * for grad_end's normaliser. */
double gate_router_zloss(gate_router *r, double zsum, size_t batch);

/* Zeroes dz[batch, n] and returns it: the gate adds dL/dlogits into it. */
float *gate_router_grad_begin(gate_router *r, size_t batch);

/* Adds the z-loss gradient to dz, then dW_g += x^T dz and, if dx is not
 * NULL, dx += dz W_g^T. */
ccr_status gate_router_grad_end(gate_router *r, const float *x, size_t batch, float *dx);

CCR_END_DECLS

#endif /* CCR_GATE_ROUTER_H */
