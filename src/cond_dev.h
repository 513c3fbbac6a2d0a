/*
 * cond_dev.h - the conditional layer's device (CUDA) half, cuda/cond.cu.
 *
 * On a CUDA backend, ccr_cond (cond.c) keeps what is host business - the
 * configuration, the host gate that declares and initialises the
 * parameters, the checks, the FLOP counts, the touched-row bookkeeping of
 * the arena - and hands each forward and backward to this half, which runs
 * the gate's device half (gate_dev.h) and the routed matmul on device
 * memory:
 *   1. the routing table's ids are downloaded (batch x slots int32) and
 *      sorted on the host with the same stable counting sort as on the CPU
 *      (groups of equal id in ascending id, pairs in pair order): the group
 *      sizes are the GEMM shapes the host hands cuBLAS anyway;
 *   2. gather, one grouped GEMM per bank layer (cublasGemmGroupedBatchedEx,
 *      CUDA 12.5 or later, in the backend's math mode) for the groups of 4
 *      rows or more, a one-block-per-group kernel for the smaller ones,
 *      bias and ReLU fused in one kernel over all sorted rows;
 *   3. combine per example in slot order (no atomics), plus the residual.
 * The backward mirrors cond.c: g_out and dL/dw (double dots) per pair, bias
 * gradients as column sums per group in row order, dW and g_x by grouped
 * GEMMs, dx a gather per example in slot order, then the gate's backward
 * with a device eval_dots.  Every reduction has a fixed order: results do
 * not depend on the launch, and CPU and GPU agree to float rounding (the
 * GEMMs' summation order differs).
 *
 * In a build without CUDA these functions return CCR_EUNSUP
 * (backend_cuda_none.c).  No CUDA type appears here.
 */
#ifndef CCR_COND_DEV_H
#define CCR_COND_DEV_H

#include <stdbool.h>
#include <stddef.h>

#include <gsl/gsl_rng.h>

#include "ccr/ccr_arena.h"
#include "ccr/ccr_backend.h"
#include "ccr/ccr_gate.h"

CCR_BEGIN_DECLS

typedef struct ccr_cond_dev ccr_cond_dev;

/* What the device half needs to know of its layer. */
typedef struct ccr_cond_dev_shape {
    size_t d_in, d_out;
    size_t h;                  /* hidden width of an FFN bank; 0: linear bank */
    size_t slots, n_mat, max_batch;
    bool residual;
} ccr_cond_dev_shape;

/* Allocates every device and host buffer for max_batch examples of gate g
 * (whose device half must exist: CCR_EUNSUP otherwise).  The host gate g
 * stays the caller's. */
ccr_status ccr_cond_dev_alloc(ccr_backend *be, ccr_gate *g, const ccr_cond_dev_shape *sh,
                              ccr_cond_dev **out);
void ccr_cond_dev_free(ccr_cond_dev *d);

/* Bytes of device and host workspace held. */
size_t ccr_cond_dev_memory_bytes(const ccr_cond_dev *d);

/* Binds to the finalized arena: bank tensors p[0..3] = w1 b1 w2 b2 (linear:
 * w b, p[2], p[3] unused) and the gate's tensors under gate_prefix. */
ccr_status ccr_cond_dev_bind(ccr_cond_dev *d, ccr_arena *a, const size_t p[4],
                             const char *gate_prefix);

/* y = layer(x) for batch examples; x, y device memory.  *route receives the
 * routing table copied to host memory (valid until the next forward), stats
 * the gate's statistics with `distinct` set (flops_counted is the caller's),
 * *n_pairs the number of used (example, slot) pairs. */
ccr_status ccr_cond_dev_forward(ccr_cond_dev *d, const float *x, size_t batch, bool train,
                                gsl_rng *rng, float *y, ccr_route *route,
                                ccr_gate_stats *stats, size_t *n_pairs);

/* Backward of the last forward: parameter gradients accumulated into the
 * arena (the bank's touched rows marked), dx [batch, d_in] overwritten with
 * dL/dx as on the CPU (NULL: skipped); dy, dx device memory. */
ccr_status ccr_cond_dev_backward(ccr_cond_dev *d, const float *dy, float *dx);

CCR_END_DECLS

#endif /* CCR_COND_DEV_H */
