/*
 * gate_router.cuh - the device half of the softmax router shared by the
 * dense and switch gates (src/gate_router.h, src/gate_router.c).
 *
 * One parameter `<prefix>w_g [d_in, n]` (declared by the host gate); forward
 * computes the clean logits x W_g with the backend's GEMM, their row softmax
 * p and, when the z-loss is on, logsumexp per row and the ST-MoE z-loss
 * z * (1/B) sum_b lse_b^2.  Backward: the gate adds dL/dlogits into dz
 * (between grad_begin and grad_end), grad_end adds the z-loss term and
 * pushes dz into dW_g and dx.  Every buffer is device memory sized for
 * max_batch in init, except lse_host (the z-loss sum runs on the host, in
 * example order, as on the CPU).
 */
#ifndef CCR_GATE_ROUTER_CUH
#define CCR_GATE_ROUTER_CUH

#include <stddef.h>

#include "gate_dev_util.cuh"  // provides: gdev_alloc, gdev_stream, ccr_backend

typedef struct gdev_router {
    ccr_backend *be;
    const char *gate;  /* gate name, for messages */
    size_t d_in;
    size_t n;          /* router outputs (experts) */
    size_t max_batch;
    double z_loss;     /* z-loss coefficient (0 = off) */
    ccr_arena *arena;  /* where w_g lives (NULL before bind) */
    size_t w_idx;      /* arena index of w_g */
    float *logits;     /* device [max_batch, n] x W_g of the last forward */
    float *probs;      /* device [max_batch, n] row softmax of logits */
    float *dz;         /* device [max_batch, n] backward scratch, dL/dlogits */
    double *lse;       /* device [max_batch] logsumexp per row (z-loss on only) */
    double *lse_host;  /* host [max_batch] its copy, summed for the loss */
    int *flag;         /* device int, scratch of gdev_find_nonfinite */
} gdev_router;

/* Allocates the buffers (the host gate validated n, z_loss and the sizes;
 * the products are checked again).  On failure nothing stays allocated. */
ccr_status gdev_router_init(gdev_router *r, ccr_backend *be, const char *gate, size_t d_in,
                            size_t n, double z_loss, size_t max_batch);
void gdev_router_free(gdev_router *r);

/* Finds `<prefix>w_g` in the finalized device arena and checks its shape. */
ccr_status gdev_router_bind(gdev_router *r, ccr_arena *a, const char *prefix);

/* Launches logits, probs (and lse when z_loss > 0) for x [batch, d_in]
 * (device); asynchronous.  CCR_EINVAL before bind. */
ccr_status gdev_router_forward(gdev_router *r, const float *x, size_t batch);

/* *loss_z = z_loss * mean_b lse_b^2 of the last forward (0 when off):
 * downloads lse (synchronises) and sums it in example order. */
ccr_status gdev_router_loss_z(gdev_router *r, size_t batch, double *loss_z);

/* CCR_EDOM naming the first non-finite weight among weights[count]
 * (device, `slots` per example), as ccr_gate_forward does on the CPU.
 * Synchronises. */
ccr_status gdev_router_check_weights(gdev_router *r, const float *weights, size_t count,
                                     size_t slots);

/* Zeroes dz[batch, n] (asynchronously) and returns it in *dz: the gate adds
 * dL/dlogits into it. */
ccr_status gdev_router_grad_begin(gdev_router *r, size_t batch, float **dz);

/* Adds the z-loss gradient to dz, then dW_g += x^T dz and, if dx is not
 * NULL, dx += dz W_g^T (x, dx device). */
ccr_status gdev_router_grad_end(gdev_router *r, const float *x, size_t batch, float *dx);

#endif /* CCR_GATE_ROUTER_CUH */
