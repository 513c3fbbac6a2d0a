/* nn_impl.h - the layout of struct ccr_net (private; see nn.c). */
#ifndef CCR_NN_IMPL_H
#define CCR_NN_IMPL_H

#include "ccr/ccr_nn.h"
#include "layer_impl.h"  // provides: ccr_layer

struct ccr_net {
    ccr_backend *be;
    ccr_ctx *ctx;
    size_t d_in, max_batch;
    ccr_layer *layers;
    size_t n, cap;
    ccr_arena *params;        /* NULL until finalize */
    float *block;             /* the activation block (backend memory) */
    float *x_dev;             /* [max_batch, d_in] staged input */
    ccr_input_memory input;   /* where callers' x lives (ccr_net_set_input_memory) */
    const float *x_last;      /* the last forward's input on the backend: x_dev or x */
    int32_t *labels_dev;      /* [max_batch] staged labels */
    float *loss_dev;          /* [max_batch] per-example loss */
    int32_t *correct_dev;     /* [max_batch] per-example correctness */
    float *host;              /* [2 max_batch] host staging of loss, correct */
    size_t last_batch;        /* batch of the last forward, 0 if none */
    ccr_comm *comm;           /* data and expert parallelism (ccr_net_set_comm), or NULL */
    double *comm_buf;         /* [size + 3] its small all-reduces */
};

#endif /* CCR_NN_IMPL_H */
