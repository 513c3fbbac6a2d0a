/*
 * gate_dev.h - the device (CUDA) half of a gate type.
 *
 * A gate's CPU code is src/gate_<name>.c (its ccr_gate_type); its CUDA code
 * is cuda/gate_<name>.cu, which defines one ccr_gate_dev_type with the same
 * parameters, the same routing table and the same auxiliary losses, computed
 * on device memory.  The host gate (ccr_gate) stays the owner of the
 * configuration, the parameter declarations (names, shapes: checkpoints are
 * the same on both backends) and the initial values; the device half binds
 * to the declared tensors by name and does the per-batch work:
 *
 *   - logits through the backend's cuBLAS GEMM (be->k->gemm), per-row math
 *     (softmax, top-k, normal CDF, capacity positions, sign bits) in kernels
 *     that follow the CPU code's arithmetic (double where it uses double);
 *   - the noise of a training forward drawn on the host from the caller's RNG
 *     with gate_noise_fill, in the CPU gate's order, and uploaded: CPU and GPU
 *     see the same N(0, 1) floats;
 *   - per-expert vectors (Importance, Load, counts) summed over the batch on
 *     the device in a fixed order (no float atomics), downloaded (E values),
 *     and turned into the auxiliary losses and their gradients on the host
 *     with the same functions as the CPU gate (ccr_cv_squared, ...).
 *
 * Every pointer a device gate receives or returns is device memory of the
 * backend it was created on: x, the routing table (ids, weights), and every
 * array of ccr_gate_bwd_args (x, dweights, dx, dy; eval_dots's mat, row, x,
 * dy and out).  Ties in top-k and argmax go to the lower index, as on the
 * CPU.  A type without device code (a user's own gate) has no entry:
 * ccr_gate_dev_find returns NULL and the layer refuses it with CCR_EUNSUP.
 *
 * No CUDA type appears here: cond.c (C) calls through this table.
 */
#ifndef CCR_GATE_DEV_H
#define CCR_GATE_DEV_H

#include <stdbool.h>
#include <stddef.h>

#include <gsl/gsl_rng.h>

#include "ccr/ccr_arena.h"
#include "ccr/ccr_backend.h"
#include "ccr/ccr_common.h"
#include "ccr/ccr_gate.h"

CCR_BEGIN_DECLS

typedef struct ccr_gate_dev_type {
    const ccr_gate_type *host; /* the CPU gate type it mirrors */
    size_t state_size;         /* bytes of private state, zeroed before init */
    /* Allocates the device buffers for max_batch examples of the host gate g
     * (read its configuration and sizes with the ccr_gate_* getters).  On
     * failure nothing stays allocated (free is not called). */
    ccr_status (*init)(void *state, ccr_backend *be, const ccr_gate *g, size_t max_batch);
    void (*free)(void *state);
    /* Finds the gate's tensors in the finalized device arena: the host gate
     * declared them under prefix (ccr_arena_find(a, prefix + name)). */
    ccr_status (*bind)(void *state, ccr_arena *a, const char *prefix);
    /* Routes batch examples x [batch, d_in] (device): fills route (ids and
     * weights in device memory owned by the state, valid until the next
     * forward; batch, slots and n_matrices as on the CPU) and every field of
     * stats the CPU gate fills except `distinct` and `flops_counted` (the
     * layer sets them).  rng is used only when train is true (the noise).
     * CCR_EDOM for non-finite routing weights, as on the CPU. */
    ccr_status (*forward)(void *state, const float *x, size_t batch, bool train,
                          gsl_rng *rng, ccr_route *route, ccr_gate_stats *stats);
    /* Backward of the last forward: gradients of the task loss through the
     * weights (a->dweights) plus the auxiliary losses into the arena's
     * gradients, and into a->dx when not NULL (accumulated). */
    ccr_status (*backward)(void *state, const ccr_gate_bwd_args *a);
} ccr_gate_dev_type;

/* The device half of host gate type t, or NULL when it has none (or ccr was
 * built without CUDA). */
const ccr_gate_dev_type *ccr_gate_dev_find(const ccr_gate_type *t);

/* One per gate, in cuda/gate_<name>.cu. */
extern const ccr_gate_dev_type ccr_gate_dev_none;
extern const ccr_gate_dev_type ccr_gate_dev_dense;
extern const ccr_gate_dev_type ccr_gate_dev_topk;
extern const ccr_gate_dev_type ccr_gate_dev_hmoe;
extern const ccr_gate_dev_type ccr_gate_dev_switch;
extern const ccr_gate_dev_type ccr_gate_dev_signtree;

CCR_END_DECLS

#endif /* CCR_GATE_DEV_H */
