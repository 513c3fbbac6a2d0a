/*
 * fit.h - training and evaluation helpers shared by the experiment drivers
 * (ccr-tree, ccr-hier; not part of libccr).
 *
 * Loading Fashion-MNIST (gzip or plain IDX), optional average pooling and
 * standardisation; one training epoch over a seeded permutation with the
 * gate diagnostics of every conditional layer averaged over the steps; an
 * evaluation pass in chunks of the network's max_batch that also *counts*
 * forward FLOPs per example from the routing tables the conditional layers
 * executed (dense layers always run in full, so theirs are their analytic
 * figures); and the record fields every driver writes for one measurement.
 */
#ifndef CCR_DRV_FIT_H
#define CCR_DRV_FIT_H

#include <stdbool.h>
#include <stddef.h>

#include "ccr/ccr.h"

/* Loads "<dir>/train-*" (test = false) or "<dir>/t10k-*" (test = true),
 * trying the ".gz" name first. */
ccr_status fit_load_fmnist(ccr_ctx *ctx, const char *dir, bool test, ccr_dataset **out);

/* Replaces ds (side x side images) by its pool x pool average pooling
 * ((side / pool)^2 features); pool must divide side.  pool 1 does nothing. */
ccr_status fit_pool(ccr_ctx *ctx, ccr_dataset **ds, size_t side, size_t pool);

/* Subtracts the per-feature mean of train from train and test and divides
 * both by train's overall standard deviation (one scalar). */
void fit_standardize(ccr_dataset *train, ccr_dataset *test);

/* Gate diagnostics summed over batches (weights: examples); see fit_gate_mean. */
typedef struct fit_gate_acc {
    double aux, cv_importance, cv_load, cv_count, mm_load, mm_count, distinct;
    double dropped;
    double flops;       /* counted forward FLOPs per example of the whole net */
    double weight;      /* examples accumulated */
    double batches;
} fit_gate_acc;

/* Reusable buffers for training (sized for n examples, max_batch rows). */
typedef struct fit_buffers {
    size_t *perm;
    float *x;
    int32_t *y;
} fit_buffers;
ccr_status fit_buffers_alloc(fit_buffers *b, size_t n, size_t max_batch, size_t dim);
void fit_buffers_free(fit_buffers *b);

/* Result of one epoch (train) or one pass (eval). */
typedef struct fit_result {
    double loss, acc;   /* mean task loss and accuracy over the examples */
    double seconds;
    fit_gate_acc gate;  /* per-batch diagnostics of the first conditional layer;
                           gate.flops covers every layer */
} fit_result;

/* Progress display for fit_epoch: label and the run's step counter. */
typedef struct fit_progress {
    const char *label;
    size_t done, total;
    double t_start;
} fit_progress;

/* One epoch: permutation of ds drawn from rng, the first n examples
 * (n <= ds->n) in batches of at most ccr_net_max_batch(net). */
ccr_status fit_epoch(ccr_net *net, ccr_optim *opt, gsl_rng *rng, const ccr_dataset *ds,
                     size_t n, fit_buffers *buf, fit_progress *pr, fit_result *res);

/* Evaluation (no noise, no update) of all of ds, in chunks of max_batch. */
ccr_status fit_eval(ccr_net *net, const ccr_dataset *ds, fit_result *res);

/* The index of the first conditional layer, or -1. */
long fit_first_cond(const ccr_net *net);

/* Cosine annealing per epoch: lr/2 (1 + cos(pi (e-1)/epochs)), e = 1.. */
float fit_cosine_lr(float lr, size_t epoch, size_t epochs);

/* Adds params, FLOPs (flops_analytic = forward per example in evaluation
 * mode, flops_counted from the test pass, flops_fwd_train and flops_bwd
 * analytic), the train and test metrics, and for a conditional net the
 * gate diagnostics of both passes ("train_" means over the last training
 * epoch with noise, "test_" means over the evaluation chunks). */
ccr_status fit_record_metrics(ccr_record *r, const ccr_net *net, const fit_result *train_last,
                              const fit_result *train_eval, const fit_result *test);

#endif /* CCR_DRV_FIT_H */
