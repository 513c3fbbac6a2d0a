/*
 * lm_model.h - the word-level language model of Shazeer et al. (2017, App. C)
 * at a configurable scale, shared by ccr-lm and ccr-balance.
 *
 *     embedding -> block_1 -> ... -> block_n -> softmax over the vocabulary
 *
 * Blocks are LSTM layers, a conditional layer (a ccr_cond: gate + FFN
 * experts, applied to all batch x unroll timesteps at once, Shazeer 3.1) or a
 * dense "deep" FFN (the MoE-1-Deep baseline).  Every width is d.  Dropout
 * (inverted scaling, masks from the caller's GSL RNG) on the output of the
 * embedding and of every block; after dropout a block adds its input (the
 * residual of Shazeer App. C.1); the MoE output optionally goes through a
 * sigmoid before dropout.  The LSTM runs full backpropagation through time
 * over the unroll, with its state carried across batches (truncated BPTT).
 * All parameters live in one ccr_arena (the conditional layer's under
 * "moe.<i>."), so ccr_optim and gradient clipping see one block.  On a
 * CUDA backend the parameters and activations stay on the device; the
 * caller's ids, targets and state buffers are host memory on every backend.
 *
 * Activations are time-major: row t * batch + b holds timestep t of stream b.
 * Target -1 marks a padded position: it is computed but not scored.
 *
 *     lm_config cfg = lm_config_default();          // emb-LSTM-MoE-LSTM-softmax
 *     cfg.cond.gate = ccr_gate_type_find("topk"); ...
 *     lm_model *m;   lm_model_alloc(be, &cfg, &m);  lm_model_init_params(m, rng);
 *     lm_fwd_stats st;
 *     lm_model_forward(m, in, tgt, true, rng, &st); // in, tgt [unroll * batch]
 *     ccr_arena_zero_grad(...) before, lm_model_backward(m) after, then
 *     lm_grad_clip(lm_model_arena(m), 1.0, &norm);  ccr_optim_step(opt);
 *
 * Also here: the parameter and ops accounting of Shazeer's Tables 7 and 8
 * (PAPERS.md 2.6), used by `ccr-lm --accounting-only` and for the scaled
 * models' ops/timestep.
 */
#ifndef CCR_LM_MODEL_H
#define CCR_LM_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <gsl/gsl_rng.h>

#include "ccr/ccr.h"

#define LM_MAX_BLOCKS 6

typedef enum lm_block_kind {
    LM_BLOCK_LSTM = 0, /* LSTM, d -> d */
    LM_BLOCK_COND = 1, /* conditional layer (cfg.cond), d -> d */
    LM_BLOCK_DEEP = 2  /* relu(x W_1) ... relu(. W_L) W_out, d -> h -> ... -> d */
} lm_block_kind;

typedef struct lm_config {
    size_t vocab;                        /* softmax classes (>= 2) */
    size_t d;                            /* embedding, LSTM and block width */
    size_t batch, unroll;                /* streams per batch, BPTT length */
    size_t n_blocks;
    lm_block_kind blocks[LM_MAX_BLOCKS];
    ccr_cond_config cond;                /* COND blocks; d_in = d_out = d are set */
    size_t deep_hidden, deep_layers;     /* DEEP blocks: hidden width, hidden layers */
    double dropout;                      /* drop probability in [0, 1) */
    bool moe_sigmoid;                    /* sigmoid on the COND output */
    float forget_bias;                   /* added to the LSTM forget-gate bias */
    ccr_comm *comm;                      /* NULL: one process; else see below */
} lm_config;

/* Expert and data parallelism (cfg.comm, CPU backend): every rank allocates
 * the same configuration but for its own streams (cfg.batch), the ranks'
 * streams in rank order forming the global batch.  Conditional blocks are
 * expert-parallel (ccr_cond_set_comm: each rank holds its block of every
 * bank); the rest is replicated.  Each rank passes its streams' ids
 * (lm_model_streams, lm_model_slice), draws every dropout mask of the
 * global batch and keeps its rows; the conditional blocks see their rows
 * stream-major (row b * unroll + t; time-major elsewhere), so the ranks'
 * rows are contiguous in the global batch.  Forward statistics (NLL,
 * scored positions) are the global batch's on every rank, the loss's
 * gradient is the global mean's, lm_model_backward sums the replicated
 * parameters' gradients over the ranks and lm_model_clip_grad clips by the
 * global norm, so identical optimiser steps keep the replicas identical and
 * training equals one process with the whole batch (to float rounding).
 * All ranks call every function together. */

/* emb -> LSTM -> COND -> LSTM -> softmax, vocab 10000, d 64, batch 32,
 * unroll 20, no gate chosen yet (cond.gate NULL), FFN experts of hidden
 * 128, dropout 0.1, sigmoid on, forget bias 1. */
lm_config lm_config_default(void);

typedef struct lm_model lm_model;

/* Per forward pass. */
typedef struct lm_fwd_stats {
    double nll_sum;        /* sum of -log p(target) over scored positions */
    size_t n_scored;       /* positions with target >= 0 */
    double aux_loss;       /* sum of the COND blocks' auxiliary losses */
    ccr_gate_stats gate;   /* diagnostics of the first COND block */
    double flops_counted;  /* forward FLOPs executed, all rows (multiply-add = 2) */
} lm_fwd_stats;

/* Validates cfg, declares every parameter in one arena on `be` (the CPU or
 * the CUDA backend: any with the ops of src/ops.h) and allocates every
 * buffer for batch x unroll rows, in backend memory.  Returns CCR_EINVAL
 * (zero sizes, COND block without a gate, bad dropout, the gate's
 * configuration errors), CCR_EUNSUP (a backend without those ops),
 * CCR_ENOMEM / CCR_EDEVMEM. */
ccr_status lm_model_alloc(ccr_backend *be, const lm_config *cfg, lm_model **out);
void lm_model_free(lm_model *m);

/* Embedding U(-0.1, 0.1); LSTM and linear layers U(-1/sqrt(fan_in), ..)
 * (+ forget_bias on the forget gate); output bias 0; COND blocks as
 * ccr_cond_init_params; drawn in declaration order from rng.  Resets the
 * recurrent state. */
ccr_status lm_model_init_params(lm_model *m, gsl_rng *rng);

ccr_arena *lm_model_arena(const lm_model *m);
/* The global batch's streams and the index of this rank's first (cfg.batch
 * and 0 without a communicator). */
void lm_model_streams(const lm_model *m, size_t *global, size_t *first);
/* This rank's rows [unroll * batch] of a global batch [unroll * global]
 * (time-major both): the columns first .. first + batch - 1 of every
 * timestep. */
void lm_model_slice(const lm_model *m, const int32_t *global, int32_t *local);
/* Global-norm gradient clipping (lm_grad_clip without a communicator; with
 * one, the norm over the replicated gradients and every rank's bank
 * blocks). */
ccr_status lm_model_clip_grad(lm_model *m, double max_norm, double *norm);
const lm_config *lm_model_config(const lm_model *m);
/* The first COND block's layer, or NULL. */
ccr_cond *lm_model_cond(const lm_model *m);

/* Recurrent state (h and c of every LSTM block): zero it, or copy it out /
 * back (lm_model_state_len floats of host memory), e.g. to repeat a batch
 * exactly.  Errors: the backend's (a failed device copy). */
ccr_status lm_model_reset_state(lm_model *m);
size_t lm_model_state_len(const lm_model *m);
ccr_status lm_model_state_get(const lm_model *m, float *out);
ccr_status lm_model_state_set(lm_model *m, const float *in);

/* In-place softmax of one row of n >= 1 logits (vectorised exp, see
 * lm_model.c); returns log(sum(exp(z))) of the input in double. */
double lm_softmax_row(float *z, size_t n);

/* One batch: in[t * batch + b] are input ids, tgt the targets (-1 = not
 * scored).  train draws dropout masks and gate noise from rng.  The final
 * LSTM state becomes the next batch's initial state.  Returns CCR_EINVAL
 * for ids out of range (nothing computed) and the gate's errors. */
ccr_status lm_model_forward(lm_model *m, const int32_t *in, const int32_t *tgt, bool train,
                            gsl_rng *rng, lm_fwd_stats *st);

/* Gradients of mean NLL (over the scored positions) + aux losses of the last
 * forward, *added* to the arena (zero it first).  No gradient flows into the
 * carried state.  Returns CCR_EINVAL without a preceding forward. */
ccr_status lm_model_backward(lm_model *m);

/* Exact parameter count; with exclude_emb_softmax, without the embedding
 * table and the output layer (the "params excl. embedding & softmax" of
 * Shazeer's tables). */
size_t lm_model_n_params(const lm_model *m, bool exclude_emb_softmax);

/* Analytic forward FLOPs per row (multiply-add = 2, bias add = 1), training
 * mode (gates evaluate their noise matrices): what lm_fwd_stats.flops_counted
 * sums to over batch x unroll rows. */
double lm_model_flops_fwd(const lm_model *m);

/* Scales the whole gradient block so its L2 norm is at most max_norm
 * (> 0); *norm receives the norm before clipping.  ccr_arena_clip_grad_norm
 * (CCR_EDOM, nothing scaled, for a non-finite norm). */
ccr_status lm_grad_clip(ccr_arena *a, double max_norm, double *norm);

/* ---- Shazeer Tables 7-8 accounting (PAPERS.md 2.6) ------------------------- */

typedef enum lm_mid { LM_MID_NONE = 0, LM_MID_MOE = 1, LM_MID_DEEP = 2 } lm_mid;

/* A model of the tables: n_lstm LSTMs of `cells` cells on width d (with a
 * cells -> d projection if proj) and one middle block.  MOE: flat
 * (groups 0, k experts) or hierarchical (groups a, k groups x k2 experts),
 * experts FFN d -> hidden -> d; `gated` false for a single ungated expert
 * (MoE-1-Wide).  DEEP: deep_layers hidden layers of `hidden`. */
typedef struct lm_arch {
    const char *name;
    const char *table;          /* "7" (1B Word), "8" (100B Google News), "7,8" */
    size_t d, cells, n_lstm;
    bool proj;                  /* LSTM output projected cells -> d */
    lm_mid mid;
    bool gated;
    size_t experts, groups, k, k2, hidden, deep_layers;
    double table_ops_m, table_params_m; /* the printed values (M), for display */
} lm_arch;

/* Counting rules of PAPERS.md 2.6: multiply-adds of one timestep's forward
 * pass excluding embedding and softmax, biases not counted.  LSTM
 * 4 (in + d) cells (+ cells d projection); expert 2 d h; flat gate W_g and
 * W_noise 2 d E (ops and params); hierarchical 2 d a + k 2 d b ops,
 * 2 d a + a 2 d b params. */
void lm_accounting(const lm_arch *a, double *params, double *ops);

/* The Table 7/8 models (NULL-name terminated) and lookup by name. */
const lm_arch *lm_paper_archs(void);
const lm_arch *lm_paper_find(const char *name);

/* The arch of a configured model (for its ops/timestep by the same rules). */
lm_arch lm_config_arch(const lm_config *cfg);

/* ---- running it (lm_run.c) ------------------------------------------------- */

/* A token stream cut into `batch` contiguous streams of len = ceil(n/batch)
 * tokens, read `unroll` positions per step (Zaremba-style batching; the
 * state carries from step to step).  Every one of the n tokens is a target
 * exactly once; the input before token q is token q-1 (<eos> before the
 * first, which starts a sentence).  Positions past the end get target -1. */
typedef struct lm_stream {
    const int32_t *tok;
    size_t n, batch, unroll, len, steps;
} lm_stream;

void lm_stream_init(lm_stream *s, const int32_t *tok, size_t n, size_t batch, size_t unroll);
/* in, tgt [unroll * batch], time-major, for step 0..steps-1. */
void lm_stream_batch(const lm_stream *s, size_t step, int32_t *in, int32_t *tgt);

/* Shazeer's schedule: linear warm-up over `warmup` steps, then
 * base * sqrt(warmup / step). */
double lm_lr(double base, size_t warmup, size_t step);

/* Zero gradients, forward (training mode), backward, clip to global norm
 * `clip` (0 = off; *norm = the norm before clipping), optimiser step. */
ccr_status lm_train_step(lm_model *m, ccr_optim *opt, const int32_t *in, const int32_t *tgt,
                         gsl_rng *rng, double clip, lm_fwd_stats *st, double *norm);

/* Sum of -log p over every token of tok[0..n) (evaluation mode, state reset
 * before and after); *count = n.  Perplexity = exp(nll / count). */
ccr_status lm_evaluate(lm_model *m, const int32_t *tok, size_t n, double *nll, size_t *count);

/* A training run: `epochs` passes over tok[0..n) with the schedule above;
 * the state is reset at the start of each pass.  progress (may be NULL) is
 * called after every step; epoch_end (may be NULL) after every pass with
 * the pass's number (from 0) and its mean training NLL per token, and may
 * evaluate the model (its error stops the run). */
typedef struct lm_train_args {
    const int32_t *tok;
    size_t n, epochs;
    double lr, clip;
    size_t warmup;
    size_t avg_last;   /* average the diagnostics over the last avg_last steps */
    void (*progress)(void *ud, size_t step, size_t total, const lm_fwd_stats *st);
    ccr_status (*epoch_end)(void *ud, lm_model *m, size_t epoch, double train_nll);
    void *ud;
} lm_train_args;

typedef struct lm_train_summary {
    size_t steps, averaged;   /* steps run; steps in the averages */
    double train_nll;         /* mean NLL per token over the averaged steps */
    double aux_loss, cv_importance, cv_load, cv_load_count, max_mean_load,
        max_mean_count;       /* first conditional block, averaged */
    double flops_counted;     /* forward FLOPs per row executed, mean over all steps */
    double grad_norm;         /* mean gradient norm before clipping */
} lm_train_summary;

/* Returns the model's errors, CCR_EDOM if the loss stops being finite. */
ccr_status lm_train_run(lm_model *m, ccr_optim *opt, gsl_rng *rng, const lm_train_args *a,
                        lm_train_summary *out);

#endif /* CCR_LM_MODEL_H */
