/*
 * ccr_gate.h - interchangeable gating modules and the routing table.
 *
 * A gate looks at each example and decides which matrices of a bank it uses
 * and with what weights.  Its decision is a *routing table* (ccr_route): per
 * example, `slots` pairs (matrix id, weight); id -1 marks an empty or dropped
 * slot.  One routed matmul (ccr_cond.h) executes every gate's table, so
 * gates are interchangeable: a driver swaps them by name alone.
 *
 * Gates are const type objects with a compile-time registry, as GSL's RNG
 * types are:
 *
 *     const ccr_gate_type *t;
 *     ccr_gate_type_lookup(ctx, "topk", &t);    // unknown: an error naming it
 *     ccr_gate_config cfg = ccr_gate_config_default();  // valid for every gate
 *     cfg.d_in = 64; cfg.n_experts = 16;
 *     ccr_gate *g;
 *     ccr_gate_alloc(ctx, t, &cfg, max_batch, &g);            // validates cfg
 *     ccr_gate_declare(g, arena, "gate.");                    // its parameters
 *     ... ccr_arena_finalize(arena); ccr_gate_init_params(g, rng);
 *     ccr_route r;  ccr_gate_stats st;
 *     ccr_gate_forward(g, x, batch, true, rng, &r, &st);      // r points into g
 *     ... ccr_gate_backward(g, &bwd_args);                    // grads into arena
 *     ccr_gate_free(g);
 *
 *     for (const ccr_gate_type *const *p = ccr_gate_types(); *p; p++)
 *         printf("%s\n", (*p)->name);
 *
 * The gates ("--gate" values):
 *   none      one dense FFN expert, every example, weight 1 (no gating)
 *   dense     softmax over all E experts, every expert runs (Shazeer eq. 2),
 *             with the importance loss (eqs. 6-7)
 *   topk      noisy top-k gating (Shazeer et al. 2017, eqs. 3-5) with the
 *             importance and smooth load losses (eqs. 6-11)
 *   hmoe      hierarchical two-level MoE (Shazeer et al. 2017, eqs. 12-14):
 *             k_groups of n_groups groups, k2 experts in each
 *   switch    top-1 on the full softmax with capacity and drops (Fedus et al.);
 *             evaluation has its own capacity factor, no limit by default
 *   signtree  sign-bit tree (ccr's reading of Cho & Bengio 2014)
 * Gates with logits (dense, topk, hmoe, switch) take the ST-MoE router z-loss
 * as an option.  All gates run on the CPU (host memory).
 */
#ifndef CCR_GATE_H
#define CCR_GATE_H

#include <stdbool.h>
#include <stdint.h>

#include <gsl/gsl_rng.h>

#include "ccr_arena.h"
#include "ccr_comm.h"
#include "ccr_common.h"
#include "ccr_ctx.h"
#include "ccr_status.h"

CCR_BEGIN_DECLS

/* ---- configuration --------------------------------------------------------- */

typedef enum ccr_combine {
    CCR_COMBINE_PATH = 0, /* signtree: sum of the d+1 node matrices on the path */
    CCR_COMBINE_LEAF = 1  /* signtree: only the leaf matrix (flat 2^d version) */
} ccr_combine;

typedef enum ccr_bits_from {
    CCR_BITS_PROJECTION = 0, /* signtree: bits from a = x W_bits + c */
    CCR_BITS_INPUT = 1       /* signtree: bits from the first d input units */
} ccr_bits_from;

typedef enum ccr_grad_mode {
    CCR_GRAD_NONE = 0, /* no gradient through the sign bits */
    CCR_GRAD_STE = 1   /* straight-through estimator (docs/GATES.md) */
} ccr_grad_mode;

/* Every option of every gate; each gate reads the fields it needs (the
 * options it uses, see ccr_gate_type_uses) and ignores the rest, so one
 * configuration serves every gate: swapping gates by name needs nothing
 * else changed.  Start from ccr_gate_config_default(). */
typedef struct ccr_gate_config {
    size_t d_in;            /* gate input width (the layer's input) */
    size_t n_experts;       /* E experts (hmoe: n_groups * group size; none ignores it) */
    size_t k;               /* topk: experts per example */
    size_t n_groups;        /* hmoe: a, the number of groups (must divide E) */
    size_t k_groups;        /* hmoe: groups per example (Shazeer's k of the primary gate) */
    size_t k2;              /* hmoe: experts per selected group */
    size_t depth;           /* signtree: d sign bits */
    ccr_combine combine;    /* signtree */
    ccr_bits_from bits_from;/* signtree */
    ccr_grad_mode grad_mode;/* signtree */
    double capacity_factor; /* switch, training: capacity = ceil(cf * batch / E), > 0 */
    double eval_capacity_factor; /* switch, evaluation: the same with this factor;
                                    0 = no limit (nothing dropped), the default */
    double w_importance;    /* dense, topk, hmoe: weight of CV(Importance)^2 */
    double w_load;          /* topk, hmoe: weight of CV(Load)^2 */
    double aux_alpha;       /* switch: alpha of alpha * E * sum f_i P_i */
    double z_loss;          /* router z-loss coefficient (0 = off) */
    double noise_eps;       /* topk, hmoe: added to softplus(x W_noise) */
    bool randomize;         /* gate weights from N(0, 1/d_in) instead of zeros */
} ccr_gate_config;

/* The defaults, the same as the drivers' (defined in one place): E = 8,
 * k = 2, n_groups = 2, k_groups = 2, k2 = 2, depth 4, path, projection,
 * straight-through sign bits (grad_mode ste: the best-supported reading of
 * ccr-tree --readings, docs/GATES.md "signtree"), capacity_factor 1.25, eval_capacity_factor 0 (no limit),
 * w_importance = w_load = 0.1 (Shazeer's LM experiments), aux_alpha 0.01,
 * z_loss 0, noise_eps 0.01, zero init.  Valid for every gate as they are. */
ccr_gate_config ccr_gate_config_default(void);

/* ---- routing table --------------------------------------------------------- */

/* Per example b and slot s: ids[b * slots + s] is a matrix id in
 * [0, n_matrices) or -1 (empty/dropped), weights[...] its weight.  The table
 * belongs to the gate that produced it and is valid until its next forward. */
typedef struct ccr_route {
    size_t batch;
    size_t slots;
    size_t n_matrices;
    const int32_t *ids;
    const float *weights;
} ccr_route;

/* Checks a table: sizes non-zero, ids in range or -1, weights finite.
 * Returns CCR_EINVAL naming the first bad entry. */
ccr_status ccr_route_validate(ccr_ctx *ctx, const ccr_route *r);

/* Per-matrix load of a routing table, read the same way for every gate:
 * counts[m] = the number of (example, slot) pairs routed to bank matrix m
 * (empty or dropped slots, id -1, count nowhere); n must be r->n_matrices.
 * For the sign-bit tree's path every node on the path counts; for hmoe
 * matrix i*b + j is expert j of group i.  *routed (if not NULL) gets the
 * sum.  CCR_EINVAL for NULL arguments, n != r->n_matrices or a bad id
 * (counts then unspecified).  With a layer: ccr_route_counts(ctx,
 * ccr_cond_route(c), counts, n) after ccr_cond_forward. */
ccr_status ccr_route_counts(ccr_ctx *ctx, const ccr_route *r, size_t *counts, size_t n,
                            size_t *routed);

/* ---- per-batch diagnostics ------------------------------------------------- */

typedef struct ccr_gate_stats {
    double aux_loss;          /* total auxiliary loss added to the model loss */
    double loss_importance;   /* w_importance * CV(Importance)^2 */
    double loss_load;         /* w_load * CV(Load)^2 */
    double loss_switch;       /* alpha * E * sum f_i P_i */
    double loss_z;            /* z_loss * mean logsumexp^2 */
    double cv_importance;     /* CV of Importance (population std / mean) */
    double cv_load;           /* CV of the smooth Load estimate */
    double cv_load_count;     /* CV of the true per-expert counts */
    double max_mean_load;     /* max / mean of the smooth Load */
    double max_mean_count;    /* max / mean of the true counts */
    size_t dropped;           /* slots dropped for capacity (switch) */
    size_t distinct;          /* distinct matrices used by the batch */
    double flops_counted;     /* gate + bank FLOPs per example actually executed
                                 (filled by the layer, see ccr_cond.h) */
} ccr_gate_stats;

/* ---- options ---------------------------------------------------------------- */

/* One bit per field of ccr_gate_config that some gate reads (d_in, the
 * layer's width, is used by all and has no bit).  A gate type's `options`
 * holds the bits of the fields it uses; the drivers refuse an option given
 * explicitly that the chosen gate does not use.
 *
 *   option                none dense topk hmoe switch signtree
 *   n_experts              .    x     x    x     x      .
 *   k                      .    .     x    .     .      .
 *   n_groups, k_groups, k2 .    .     .    x     .      .
 *   depth, combine,
 *   bits_from, grad_mode   .    .     .    .     .      x
 *   capacity_factor,
 *   eval_capacity_factor,
 *   aux_alpha              .    .     .    .     x      .
 *   w_importance           .    x     x    x     .      .
 *   w_load, noise_eps      .    .     x    x     .      .
 *   z_loss                 .    x     x    x     x      .
 *   randomize              .    x     x    x     x      x            */
typedef enum ccr_gate_option {
    CCR_GATE_OPT_N_EXPERTS = 1u << 0,
    CCR_GATE_OPT_K = 1u << 1,
    CCR_GATE_OPT_N_GROUPS = 1u << 2,
    CCR_GATE_OPT_K_GROUPS = 1u << 3,
    CCR_GATE_OPT_K2 = 1u << 4,
    CCR_GATE_OPT_DEPTH = 1u << 5,
    CCR_GATE_OPT_COMBINE = 1u << 6,
    CCR_GATE_OPT_BITS_FROM = 1u << 7,
    CCR_GATE_OPT_GRAD_MODE = 1u << 8,
    CCR_GATE_OPT_CAPACITY_FACTOR = 1u << 9,
    CCR_GATE_OPT_EVAL_CAPACITY_FACTOR = 1u << 10,
    CCR_GATE_OPT_W_IMPORTANCE = 1u << 11,
    CCR_GATE_OPT_W_LOAD = 1u << 12,
    CCR_GATE_OPT_AUX_ALPHA = 1u << 13,
    CCR_GATE_OPT_Z_LOSS = 1u << 14,
    CCR_GATE_OPT_NOISE_EPS = 1u << 15,
    CCR_GATE_OPT_RANDOMIZE = 1u << 16
} ccr_gate_option;

/* Number of options (bits 0 .. CCR_GATE_N_OPTIONS - 1). */
#define CCR_GATE_N_OPTIONS 17

/* ---- the gate type (GSL-style vtable) -------------------------------------- */

typedef struct ccr_gate ccr_gate;

/* Arguments of a backward pass.  The gate adds its parameter gradients into
 * the arena it declared in and, if dx is not NULL, the gradient with respect
 * to its input into dx. */
typedef struct ccr_gate_bwd_args {
    const float *x;          /* [batch, d_in] the forward's input */
    size_t batch;
    const float *dweights;   /* [batch, slots] dL/d(route weight) */
    float *dx;               /* [batch, d_in] accumulated, or NULL */
    /* For gates whose gradient needs matrices they did not route to (the
     * sign-bit tree's straight-through mode): dy = dL/dy [batch, d_out] and
     * a callback evaluating bank matrix m on one input row:
     * out[d_out] = x_row M_m (+ bias).  May be NULL for other gates. */
    const float *dy;
    size_t d_out;
    ccr_status (*eval_matrix)(void *bank, size_t m, const float *x_row, float *out);
    void *bank;
    float *scratch;          /* d_out floats the gate may overwrite (the output
                                row of eval_matrix), or NULL with eval_matrix */
    /* The batched form of eval_matrix, or NULL (the gate then falls back to
     * eval_matrix): for the n pairs i = 0 .. n-1,
     *   out[i] = dy[row[i]] . M_mat[i](x[row[i]])   (bias included),
     * x = [rows, d_in] and dy = [rows, d_out] row-major, each dot summed in
     * double.  The result of pair i depends on the pairs given only through
     * float rounding inside the bank's GEMM; a call with the same arguments
     * gives bitwise the same out.  The conditional layer sets it only for
     * gates it sized a workspace for (a straight-through grad_mode over
     * `depth` levels: batch x depth pairs per GEMM pass; a larger n is
     * worked through in chunks of that size). */
    ccr_status (*eval_dots)(void *bank, size_t n, const size_t *mat, const size_t *row,
                            const float *x, const float *dy, double *out);
} ccr_gate_bwd_args;

typedef struct ccr_gate_type {
    const char *name;       /* "--gate" value */
    const char *paper;      /* one line: paper and equations */
    const char *param_group;/* name prefix of its parameters in a layer: "gate." or
                               "tree." (the bank is then named "tree." too) */
    size_t state_size;      /* bytes of private state, zeroed before init */
    /* Validates cfg and allocates every buffer for max_batch examples.
     * Returns CCR_EINVAL (message names the option) for a bad config. */
    ccr_status (*init)(void *state, ccr_ctx *ctx, const ccr_gate_config *cfg,
                       size_t max_batch);
    void (*free)(void *state);
    size_t (*n_matrices)(const void *state); /* size of the bank it routes to */
    size_t (*slots)(const void *state);      /* slots per example */
    /* Declares the gate's parameters (names prefixed with prefix). */
    ccr_status (*declare)(void *state, ccr_arena *a, const char *prefix);
    /* Initial values (zeros, or random with cfg->randomize). */
    ccr_status (*init_params)(void *state, gsl_rng *rng);
    /* Routes batch examples; fills the table and stats (aux losses, CVs,
     * dropped, distinct).  rng is used only when train is true. */
    ccr_status (*forward)(void *state, const float *x, size_t batch, bool train,
                          gsl_rng *rng, ccr_route *route, ccr_gate_stats *stats);
    /* Gradients of (task loss through the weights) + aux loss. */
    ccr_status (*backward)(void *state, const ccr_gate_bwd_args *a);
    /* Forward FLOPs per example of the gate itself (logits, bit projection;
     * multiply-add = 2), in train or eval mode. */
    double (*flops)(const void *state, bool train);
    /* Number of expected bank matrices used per example (for the analytic
     * FLOP count): k for topk, d+1 for signtree path, ... */
    double (*matrices_per_example)(const void *state);
    /* Named host arrays of the last forward, for probes and diagnostics
     * (noise draws, Importance, Load, ...; the table above
     * ccr_gate_get_export).  NULL if none. */
    size_t (*n_exports)(const void *state);
    ccr_status (*get_export)(const void *state, size_t i, const char **name, size_t *rank,
                             size_t shape[4], const float **data);
    unsigned options;       /* the ccr_gate_option bits of the fields it reads */
    bool linear_bank;       /* the bank its layer gets by default (CCR_BANK_DEFAULT in
                               ccr_cond.h): linear nodes if true, FFN experts if false */
    /* Optional (expert parallelism, ccr_gate_set_comm): from now on each
     * forward sums its batch statistics over comm's ranks, whose batches in
     * rank order form the global batch - the auxiliary losses' inputs and
     * normalisers, Switch's capacity positions, the diagnostics - so that
     * losses, routing and gradients are those of the global batch.  NULL:
     * statistics of each rank's own batch. */
    ccr_status (*set_comm)(void *state, ccr_comm *comm);
} ccr_gate_type;

/* The registry: a NULL-terminated, compile-time table of every gate type. */
const ccr_gate_type *const *ccr_gate_types(void);

/* The type with this name, or NULL. */
const ccr_gate_type *ccr_gate_type_find(const char *name);

/* Comma-separated names of all gate types ("none, dense, topk, ..."). */
const char *ccr_gate_type_names(void);

/* The type with this name in *out; CCR_EINVAL with a message naming it and
 * listing the valid names if there is none ("unknown gate 'x' (none, dense,
 * ...)"); *out is set only on success. */
ccr_status ccr_gate_type_lookup(ccr_ctx *ctx, const char *name, const ccr_gate_type **out);

/* Whether gates of type t read option opt (false for a NULL type). */
bool ccr_gate_type_uses(const ccr_gate_type *t, ccr_gate_option opt);

/* The config field name of opt ("n_experts", "k_groups", ...), or NULL if
 * opt is not exactly one option bit. */
const char *ccr_gate_option_name(ccr_gate_option opt);

/* ---- instances ------------------------------------------------------------- */

/* Allocates a gate of `type` for batches up to max_batch.  Returns
 * CCR_EINVAL for a NULL type (the message lists the valid names), zero
 * max_batch or a bad configuration of an option the gate uses (topk k = 0
 * or k > E, groups not dividing E, capacity factor <= 0, depth too large,
 * ...; options it does not use are not checked), CCR_ENOMEM.  *out is set
 * only on success. */
ccr_status ccr_gate_alloc(ccr_ctx *ctx, const ccr_gate_type *type, const ccr_gate_config *cfg,
                          size_t max_batch, ccr_gate **out);
void ccr_gate_free(ccr_gate *g);

const ccr_gate_type *ccr_gate_get_type(const ccr_gate *g);
const ccr_gate_config *ccr_gate_get_config(const ccr_gate *g);
size_t ccr_gate_n_matrices(const ccr_gate *g);
size_t ccr_gate_slots(const ccr_gate *g);
size_t ccr_gate_max_batch(const ccr_gate *g);

/* Declares the gate's parameters in a not-yet-finalized arena. */
ccr_status ccr_gate_declare(ccr_gate *g, ccr_arena *a, const char *prefix);

/* Sets initial parameter values (after the arena is finalized). */
ccr_status ccr_gate_init_params(ccr_gate *g, gsl_rng *rng);

/* Expert parallelism: g's batch statistics become global over comm's ranks
 * (ccr_gate_type.set_comm; ccr_cond_set_comm calls it).  Every rank calls
 * every forward, in the same order.  CCR_EUNSUP for a gate type without
 * set_comm; CCR_EINVAL for NULL arguments. */
ccr_status ccr_gate_set_comm(ccr_gate *g, ccr_comm *comm);

/* Routes batch (1..max_batch) examples x [batch, d_in] (host).  Returns
 * CCR_EBADLEN for a bad batch, CCR_EDOM for non-finite x or non-finite
 * routing weights (the gate's parameters diverged), CCR_EINVAL for a
 * NULL rng in train mode when the gate draws noise.  route and stats are
 * written only on success. */
ccr_status ccr_gate_forward(ccr_gate *g, const float *x, size_t batch, bool train,
                            gsl_rng *rng, ccr_route *route, ccr_gate_stats *stats);

/* Backward of the last forward (same x and batch). */
ccr_status ccr_gate_backward(ccr_gate *g, const ccr_gate_bwd_args *a);

/* Gate FLOPs per example (see the type's flops hook). */
double ccr_gate_flops(const ccr_gate *g, bool train);
double ccr_gate_matrices_per_example(const ccr_gate *g);

/* Exported arrays of the last forward (float, row-major; valid until the
 * next forward).  B is the batch of the last forward, E = n_experts,
 * a = n_groups, b = E / a, d = depth:
 *
 *   gate      i  name             shape      contents
 *   none      0  importance       [1]        B (every example, weight 1)
 *             1  load             [1]        B
 *   dense     0  importance       [E]        sum_b p_{b,i} (eq. 6)
 *             1  load             [E]        B (every expert runs)
 *   topk      0  noise            [B, E]     the N(0,1) draws (0 in eval)
 *             1  importance       [E]        sum_b G_{b,i} (eq. 6)
 *             2  load             [E]        smooth Load (eq. 10) in train with
 *                                            k < E, else the counts
 *   hmoe      0  noise.primary    [B, a]     draws of the primary gate
 *             1  noise.secondary  [B, a, b]  draws of the selected groups (else 0)
 *             2  importance       [a, b]     Importance_H (eq. 13)
 *             3  load             [a, b]     Load_H (eq. 14)
 *   switch    0  importance       [E]        sum_b p_{b,i}
 *             1  load             [E]        examples kept per expert (after drops)
 *             2  choice           [E]        examples whose argmax is i (before drops)
 *   signtree  0  importance       [2^d]      examples per leaf
 *             1  load             [2^d]      the same
 *             2  leaf_counts      [2^d]      the same, by leaf index
 *             3  bits             [B, d]     the sign bits, 0/1 (only when d > 0)
 *             4  a                [B, d]     their pre-activations (only when d > 0)
 *
 * "importance" and "load" exist for every gate, but their index space
 * differs (signtree: leaves, not the 2^(d+1) - 1 path nodes); the load per
 * bank matrix, the same for every gate, is ccr_route_counts.  A gate may
 * build an export only when asked (hmoe's noise.secondary, importance and
 * load): the pointer stays valid until the gate's next forward. */
size_t ccr_gate_n_exports(const ccr_gate *g);
ccr_status ccr_gate_get_export(const ccr_gate *g, size_t i, const char **name, size_t *rank,
                               size_t shape[4], const float **data);

/* The gate types, for drivers' tables and tests. */
extern const ccr_gate_type ccr_gate_none;
extern const ccr_gate_type ccr_gate_dense;
extern const ccr_gate_type ccr_gate_topk;
extern const ccr_gate_type ccr_gate_hmoe;
extern const ccr_gate_type ccr_gate_switch;
extern const ccr_gate_type ccr_gate_signtree;

/* ---- shared math (exposed for tests and custom gates) ---------------------- */

/* CV^2 of v[n] with t2t's CVSquared semantics: population variance,
 * var / (mean^2 + 1e-10); 0 for n <= 1.  CV = sqrt(CV^2) in stats. */
double ccr_cv_squared(const double *v, size_t n);

/* The Switch gate's expert capacity ceil(cf * batch / n_experts) clamped to
 * [1, batch], computed so that a product that is an integer in decimal
 * gives that integer (cf = 1.1, batch = 100, E = 10: 11, not the 12 that
 * ceil of the double product gives).  cf == 0 means no limit (returns
 * batch); batch or n_experts 0, or cf negative or not finite, give 0. */
size_t ccr_switch_capacity(double cf, size_t batch, size_t n_experts);

/* Standard normal CDF (GSL's gsl_cdf_ugaussian_P). */
double ccr_normal_cdf(double z);

CCR_END_DECLS

#endif /* CCR_GATE_H */
