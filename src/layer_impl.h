/*
 * layer_impl.h - the private layer vtable behind ccr_net.
 *
 * Each layer kind is one file exporting one const ccr_layer_ops (GSL's
 * "type" pattern); the network only calls through the table.  Issue 4's
 * conditional layer (gate + expert bank) is another kind.
 */
#ifndef CCR_LAYER_IMPL_H
#define CCR_LAYER_IMPL_H

#include <gsl/gsl_rng.h>

#include "ccr/ccr_arena.h"
#include "ccr/ccr_backend.h"
#include "ccr/ccr_cond.h"
#include "ccr/ccr_nn.h"

typedef struct ccr_layer ccr_layer;

typedef struct ccr_layer_ops {
    const char *kind;   /* "linear", or the activation's name */
    /* Declares the layer's parameters in the arena (index = layer index, for
     * names).  NULL when the layer has none. */
    ccr_status (*declare)(ccr_layer *l, ccr_arena *a, size_t index);
    /* Draws initial parameter values from rng; host scratch holds at least
     * the largest parameter tensor.  NULL when the layer has none. */
    ccr_status (*init_params)(ccr_layer *l, ccr_arena *a, gsl_rng *rng, float *scratch);
    /* y [batch, d_out] = f(x [batch, d_in]). */
    ccr_status (*forward)(ccr_layer *l, ccr_backend *be, const ccr_arena *a, const float *x,
                          float *y, size_t batch);
    /* Given x, y of the forward and dy, adds parameter gradients into the
     * arena and writes dx (skipped when dx is NULL). */
    ccr_status (*backward)(ccr_layer *l, ccr_backend *be, const ccr_arena *a, const float *x,
                           const float *y, const float *dy, float *dx, size_t batch);
    size_t (*n_params)(const ccr_layer *l);
    double (*flops_fwd)(const ccr_layer *l);
    double (*flops_bwd)(const ccr_layer *l, bool need_dx);
} ccr_layer_ops;

struct ccr_layer {
    const ccr_layer_ops *ops;
    size_t d_in, d_out;
    ccr_act act;          /* activation layers */
    size_t p_w, p_b;      /* arena indices of W and b (linear) */
    float *out, *dout;    /* [max_batch, d_out] on the backend */
    /* The mode of the current pass, set by the network before forward:
     * training (noise on) or evaluation, and the RNG for noise. */
    bool train;
    gsl_rng *rng;
    ccr_cond *cond;       /* conditional layers: gate + bank */
    ccr_gate_stats stats; /* conditional layers: diagnostics of the last forward */
};

extern const ccr_layer_ops ccr_layer_linear_ops;
extern const ccr_layer_ops ccr_layer_act_ops;
extern const ccr_layer_ops ccr_layer_cond_ops;

#endif /* CCR_LAYER_IMPL_H */
