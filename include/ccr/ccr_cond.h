/*
 * ccr_cond.h - the conditional layer: a gate, a bank of matrices, and the
 * routed matmul that executes the gate's routing table.
 *
 *     y_b = sum over slots s with id >= 0 of  w_{b,s} * M_{id_{b,s}}(x_b)
 *           (+ x_b with cfg.residual, d_in == d_out)
 *
 * Two bank kinds:
 *   FFN experts    M_m(x) = relu(x W1_m + b1_m) W2_m + b2_m   (Shazeer's experts)
 *   linear nodes   M_m(x) = x W_m + b_m                       (the sign-bit tree's W_p)
 * Parameter names (under the layer's prefix): FFN "experts.w1" [E,d_in,h],
 * "experts.b1" [E,h], "experts.w2" [E,h,d_out], "experts.b2" [E,d_out];
 * linear "experts.w" [E,d_in,d_out], "experts.b" [E,d_out] - except that the
 * signtree gate's bank is named "tree." ("tree.w", "tree.b") and its gate
 * parameters too ("tree.w_bits", "tree.c_bits"); other gates' parameters are
 * "gate.*".
 *
 * The routed matmul sorts the (example, slot) pairs by matrix id with a
 * stable counting sort, runs one GEMM (per layer of the matrix) per non-empty
 * group, and combines with a weighted sum in slot order (dx likewise, a
 * gather per example): the result is bitwise reproducible for a given
 * OpenBLAS thread count.  The groups run either one after another, each
 * GEMM with OpenBLAS's own threads, or side by side on the layer's thread
 * pool, one single-threaded GEMM per group (ccr_cond_parallel).  Backward gives the bank's parameter gradients, dx,
 * and dL/d(route weight), which the gate turns into its own gradients.
 * Runs on the CPU backend (host memory) and on CUDA (device memory: x, y,
 * dy and dx are device pointers; the routing table of ccr_cond_route is a
 * host copy; docs/DESIGN.md, "On CUDA").  A gate type with no CUDA code (a
 * user's own) gets CCR_EUNSUP on CUDA.
 *
 *     ccr_cond_config cc = ccr_cond_config_default();
 *     cc.gate_name = "topk";            // or cc.gate = &ccr_gate_topk
 *     cc.gate_cfg.n_experts = 16;       // the rest: the drivers' defaults
 *     cc.d_in = 64; cc.d_out = 64; cc.hidden = 128;
 *     ccr_cond *c;
 *     ccr_cond_alloc(be, &cc, max_batch, &c);
 *     ccr_cond_declare(c, arena, "");     ... finalize ...  ccr_cond_init_params(c, rng);
 *     ccr_cond_forward(c, x, batch, true, rng, y, &stats);   // stats.aux_loss
 *     ccr_cond_backward(c, dy, dx);                          // grads into the arena
 */
#ifndef CCR_COND_H
#define CCR_COND_H

#include <stdbool.h>

#include <gsl/gsl_rng.h>

#include "ccr_arena.h"
#include "ccr_backend.h"
#include "ccr_comm.h"
#include "ccr_common.h"
#include "ccr_gate.h"
#include "ccr_status.h"

CCR_BEGIN_DECLS

typedef enum ccr_bank_kind {
    CCR_BANK_FFN = 0,    /* d_in -> hidden (ReLU) -> d_out */
    CCR_BANK_LINEAR = 1, /* d_in -> d_out */
    CCR_BANK_DEFAULT = 2 /* the gate's own: linear for signtree (Cho & Bengio's W_p),
                            FFN otherwise (ccr_gate_type.linear_bank) */
} ccr_bank_kind;

/* How the routed matmul uses the CPU's threads.  The layer owns a pool of
 * T = ccr_blas_num_threads() workers (the caller included; read at
 * ccr_cond_alloc).
 *   BLAS     one group at a time, each GEMM threaded by OpenBLAS;
 *   EXPERTS  the groups shared among the pool's workers, every GEMM
 *            single-threaded: for the duration the layer sets OpenBLAS's
 *            process-wide thread count to 1 (openblas_set_num_threads, the
 *            only control OpenBLAS 0.3 has) and restores the previous value
 *            after, so nothing else in the process should run OpenBLAS
 *            concurrently with a layer's forward or backward;
 *   AUTO     EXPERTS when there are at least T groups and the largest
 *            holds at most 1/T of the pairs, else BLAS - a function of the
 *            routing table's group sizes and T only, so a given seed and
 *            thread count give bitwise-identical results. */
typedef enum ccr_cond_parallel {
    CCR_COND_PAR_AUTO = 0,
    CCR_COND_PAR_BLAS = 1,
    CCR_COND_PAR_EXPERTS = 2
} ccr_cond_parallel;

typedef struct ccr_cond_config {
    const ccr_gate_type *gate;  /* the gate; if NULL, gate_name is looked up */
    const char *gate_name;      /* used only when gate is NULL: "topk", ... (an
                                   unknown name fails, naming it and the valid ones) */
    ccr_gate_config gate_cfg;   /* d_in is overwritten with the layer's d_in */
    ccr_bank_kind bank;
    size_t d_in, d_out;
    size_t hidden;              /* FFN bank only */
    bool residual;              /* y = x + routed(x), as in the Switch Transformer's
                                   blocks: an example the gate drops (or routes to
                                   nothing) passes through unchanged.  Needs
                                   d_in == d_out.  Costs d_out FLOPs per example
                                   forward (and d_in backward when dx is wanted). */
    ccr_cond_parallel parallel; /* CCR_COND_PAR_AUTO by default (see above) */
} ccr_cond_config;

/* Defaults, the drivers' (one place): gate NULL (set gate or gate_name),
 * ccr_gate_config_default(), bank CCR_BANK_DEFAULT (the gate's own),
 * hidden 64, d_in = d_out = 0 (to set), no residual, parallel
 * CCR_COND_PAR_AUTO.  With only the gate
 * (or its name) changed, every gate gets what the drivers give it. */
ccr_cond_config ccr_cond_config_default(void);

/* The bank kind a layer of cfg gets: cfg->bank, or the gate's own for
 * CCR_BANK_DEFAULT (FFN if the gate is unknown; CCR_BANK_FFN, the enum's 0,
 * for NULL). */
ccr_bank_kind ccr_cond_config_bank(const ccr_cond_config *cfg);

typedef struct ccr_cond ccr_cond;

/* Allocates the layer and its gate with every workspace for max_batch.
 * Starts the layer's thread pool (T - 1 threads, joined by ccr_cond_free;
 * on CUDA no pool, device buffers instead).
 * Returns CCR_EINVAL (no gate, an unknown gate_name, zero sizes, bad gate
 * config, an unknown parallel mode), CCR_EUNSUP on CUDA for a gate type
 * with no CUDA code (a user's own) or sizes above cuBLAS's int range,
 * CCR_ENOMEM (memory, more than 2^31 - 1 routing slots, or a thread that
 * cannot be started). */
ccr_status ccr_cond_alloc(ccr_backend *be, const ccr_cond_config *cfg, size_t max_batch,
                          ccr_cond **out);
void ccr_cond_free(ccr_cond *c);

/* Declares bank and gate parameters under prefix ("" or "layers.2."). */
ccr_status ccr_cond_declare(ccr_cond *c, ccr_arena *a, const char *prefix);

/* Initialises the bank like nn.Linear (U(-1/sqrt(fan_in), 1/sqrt(fan_in)))
 * and then the gate, drawing from rng in that order. */
ccr_status ccr_cond_init_params(ccr_cond *c, gsl_rng *rng);

/* y [batch, d_out] (host) from x [batch, d_in].  stats receives the gate's
 * diagnostics with flops_counted filled in.  Returns the gate's errors. */
ccr_status ccr_cond_forward(ccr_cond *c, const float *x, size_t batch, bool train,
                            gsl_rng *rng, float *y, ccr_gate_stats *stats);

/* Backward of the last forward: adds bank and gate gradients (the aux loss
 * included, with coefficient 1) into the arena; dx [batch, d_in] is
 * overwritten with dL/dx if not NULL. */
ccr_status ccr_cond_backward(ccr_cond *c, const float *dy, float *dx);

/* The bank kind the layer uses (never CCR_BANK_DEFAULT; CCR_BANK_FFN, the
 * enum's 0, for NULL). */
ccr_bank_kind ccr_cond_bank(const ccr_cond *c);

/* The last routing table, the gate, sizes. */
const ccr_route *ccr_cond_route(const ccr_cond *c);
ccr_gate *ccr_cond_gate(const ccr_cond *c);
size_t ccr_cond_d_in(const ccr_cond *c);
size_t ccr_cond_d_out(const ccr_cond *c);

/* Bytes of the layer's workspace (host memory allocated for max_batch by
 * ccr_cond_alloc; the gate's own buffers are not counted).  0 for NULL. */
size_t ccr_cond_memory_bytes(const ccr_cond *c);

/* Parameters of the bank and gate (exact). */
size_t ccr_cond_n_params(const ccr_cond *c);

/* Per-matrix timing, a diagnostic for benchmarks (ccr-bench's per-level
 * figures).  While sec is set, with n = the bank's matrices:
 *   sec[m]          += each forward's time on matrix m: the gather of its
 *                      rows, its GEMMs, bias and activation;
 *   sec[n + m]      += each backward's: its gradient GEMMs, bias gradients
 *                      and input-gradient GEMM;
 *   sec[2 n + m]    += a straight-through gate's evaluations of m in its
 *                      backward (eval_dots).
 * Seconds on the thread that ran the matrix's group: when the groups ran
 * side by side (ccr_cond_group_threads > 1) they are thread-seconds of that
 * many threads at once (the straight-through evaluations choose their mode
 * by the same rule on their own groups, which for the sign-bit tree gives
 * the forward's).  The
 * caller owns and zeroes sec (3 n doubles); NULL turns timing off (the
 * default).  Two clock reads per group when on, none when off.  CPU
 * backend only: a layer on CUDA leaves sec untouched. */
ccr_status ccr_cond_set_timing(ccr_cond *c, double *sec);

/* Expert parallelism (Shazeer et al. 2017, section 3.1): the layer becomes
 * one rank's part of a layer spread over comm's ranks.  Call it on every
 * rank after ccr_cond_alloc and before ccr_cond_declare, with the same
 * configuration everywhere.  The bank's n matrices are split in contiguous
 * blocks (rank r owns n/P of them, the first n % P ranks one more; a rank
 * may own none); the gate is replicated.  ccr_cond_declare then declares
 * only this rank's matrices (the same names, n_own rows), and
 * ccr_cond_init_params gives them the values a single process would (the
 * RNG advances over the whole bank on every rank).  Each rank passes its
 * own examples to forward and backward, the ranks' batches in rank order
 * forming the global batch: every routed row travels to the owner of its
 * matrix (all-to-all), is computed there, and comes back; the backward
 * mirrors it.  Outputs, dx and the bank gradients equal those of one
 * process with the global batch bit for bit (the same GEMMs on the same
 * groups), and a training pass advances the RNG as one process would (each
 * rank draws and discards the other ranks' gate noise).  The replicated
 * gate's gradients are this rank's share: sum them over the ranks
 * (ccr_comm_allreduce_sum) before an optimiser step.  The gates with
 * ccr_gate_type.set_comm (every built-in one) sum their statistics over
 * the ranks - auxiliary losses, CVs, the tree's leaf counts, Switch's
 * capacity and positions - so these are the global batch's (to double
 * rounding; dx and the gate's gradients then to float rounding); a gate
 * type without it keeps per-rank diagnostics.  All ranks call forward and backward
 * together, all with dx or all without.  CPU backend, host memory (comm
 * "self" or "mpi").
 * The sign-bit tree in path mode is laid out by levels instead: its top
 * levels (2^l - 1 nodes, l the least with 2^l >= P, at most the depth) are
 * replicated - each rank holds them and computes them for its own
 * examples; their gradients are summed over the ranks inside the backward -
 * and the subtrees below level l are sharded by their prefix (ccr_cond_held
 * lists a rank's rows); outputs, dx and the replicated rows' gradients then
 * agree with one process to float rounding, the sharded rows' gradients bit
 * for bit.  Its straight-through backward evaluates sibling matrices on
 * their owners (dx and its gradients then to float rounding).
 * CCR_EINVAL after declare or for a second communicator; CCR_EUNSUP on a
 * non-CPU backend or with an NCCL communicator. */
ccr_status ccr_cond_set_comm(ccr_cond *c, ccr_comm *comm);

/* This rank's bank matrices [*first, *end) (all of them without a
 * communicator).  CCR_EINVAL for NULL arguments; CCR_EUNSUP for the
 * sign-bit tree in path mode on several ranks, whose rows are not one block
 * (ccr_cond_held). */
ccr_status ccr_cond_owned(const ccr_cond *c, size_t *first, size_t *end);

/* The matrix ids of this rank's bank rows, in row order: *n of them, the
 * first *n_replicated held by every rank (the sign-bit path tree's top
 * levels under a communicator; 0 otherwise).  ids NULL: the counts only;
 * else ids has room for cap (CCR_EINVAL if fewer than *n). */
ccr_status ccr_cond_held(const ccr_cond *c, size_t *ids, size_t cap, size_t *n,
                         size_t *n_replicated);

/* Threads that ran the last forward's groups side by side: the layer's
 * pool size in CCR_COND_PAR_EXPERTS mode, else 1; 0 before a forward and
 * for NULL. */
size_t ccr_cond_group_threads(const ccr_cond *c);

/* FLOPs of one use of one bank matrix on one example: FFN 2 d_in h + h +
 * 2 h d_out + d_out, linear 2 d_in d_out + d_out, plus 2 d_out for the
 * weighted combine. */
double ccr_cond_matrix_flops(const ccr_cond *c);

/* Analytic forward FLOPs per example: gate FLOPs + matrices per example x
 * matrix FLOPs.  The counted figure (stats.flops_counted) uses the slots the
 * routing table actually filled; they agree unless tokens are dropped. */
double ccr_cond_flops(const ccr_cond *c, bool train);

/* Analytic backward FLOPs per example: per used matrix, the products of the
 * bank's backward (dW and, if need_dx, dx: FFN 2 h d_out + 2 h d_out +
 * 2 d_in h [+ 2 d_in h], linear 2 d_in d_out [+ 2 d_in d_out]) plus the bias
 * gradients and 3 d_out for the weighted output and dL/dw; plus twice the
 * gate's forward FLOPs (its weight gradient and its input gradient). */
double ccr_cond_flops_bwd(const ccr_cond *c, bool need_dx);

CCR_END_DECLS

#endif /* CCR_COND_H */
