/*
 * ccr_nn.h - layers, networks, the softmax cross-entropy loss, training steps.
 *
 * A network is a stack of layers on one backend, built in three phases:
 * declare the layers, finalize (one parameter arena, one block of activation
 * buffers sized for max_batch, parameters initialised from the caller's RNG),
 * then run.  Training follows GSL's INITIALIZE / ITERATE / TEST shape: the
 * library offers one step, the driver owns the loop and the logging.
 *
 *     ccr_net *net;
 *     ccr_net_init(be, 784, 128, &net);             // d_in, max_batch
 *     ccr_net_add_linear(net, 256);
 *     ccr_net_add_act(net, CCR_ACT_RELU);
 *     ccr_net_add_linear(net, 10);
 *     ccr_net_finalize(net, rng);                   // PyTorch-default init
 *     ccr_optim *opt;
 *     ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
 *     ccr_optim_init(ccr_net_params(net), &oc, &opt);
 *     for (each batch) {                            // ITERATE
 *         ccr_step_stats st;
 *         ccr_train_step(net, opt, rng, x, y, batch, &st);
 *     }
 *     ccr_net_eval(net, xtest, ytest, n, &st);     // TEST (chunks of max_batch)
 *
 * FLOP accounting is exact for the work ccr executes: a multiply-add counts
 * 2 FLOPs (as Shazeer et al. 2017 count ops), a bias addition 1; element-wise
 * nonlinearities and the loss are not counted (they are O(width), not
 * O(parameters)).  The optimiser's FLOPs per step, which are O(parameters
 * updated), are counted separately by ccr_optim_flops.  Backward counts what is executed: the input
 * gradient of the first layer is never computed, so it is not counted.
 */
#ifndef CCR_NN_H
#define CCR_NN_H

#include <stdbool.h>
#include <stdint.h>

#include <gsl/gsl_rng.h>

#include "ccr_arena.h"
#include "ccr_backend.h"
#include "ccr_comm.h"
#include "ccr_cond.h"
#include "ccr_common.h"
#include "ccr_status.h"

CCR_BEGIN_DECLS

typedef enum ccr_act {
    CCR_ACT_IDENTITY = 0,
    CCR_ACT_RELU = 1,
    CCR_ACT_TANH = 2,
    CCR_ACT_SIGMOID = 3
} ccr_act;

/* "identity", "relu", "tanh", "sigmoid" (NULL for an unknown value), and the
 * reverse lookup (CCR_EINVAL for an unknown name; *act untouched). */
const char *ccr_act_name(ccr_act act);
ccr_status ccr_act_from_name(const char *name, ccr_act *act);

typedef struct ccr_net ccr_net;

/* Starts a network taking d_in inputs per example, for batches of at most
 * max_batch examples.  Returns CCR_EINVAL for zero sizes or NULL. */
ccr_status ccr_net_init(ccr_backend *be, size_t d_in, size_t max_batch, ccr_net **out);

/* Releases the network, its arena and buffers.  NULL is accepted. */
void ccr_net_free(ccr_net *net);

/* Appends y = x W + b, W [d_prev, d_out] named "layers.<i>.w", b [d_out]
 * named "layers.<i>.b" (i = layer index).  Returns CCR_EINVAL for d_out == 0
 * or after finalize. */
ccr_status ccr_net_add_linear(ccr_net *net, size_t d_out);

/* Appends an element-wise activation.  Returns CCR_EINVAL for an unknown
 * activation or after finalize. */
ccr_status ccr_net_add_act(ccr_net *net, ccr_act act);

/* Appends a conditional layer (gate + bank, ccr_cond.h) taking the current
 * width as its d_in (cfg->d_in is ignored) and producing cfg->d_out.  Its
 * parameters are named "layers.<i>.experts.*" and "layers.<i>.gate.*" (or
 * "layers.<i>.tree.*" for the sign-bit tree); its auxiliary loss is added to
 * the training loss.  Returns the gate's configuration errors, CCR_EUNSUP
 * as ccr_cond_alloc does (on CUDA, a gate type with no CUDA code), CCR_EINVAL
 * after finalize. */
ccr_status ccr_net_add_cond(ccr_net *net, const ccr_cond_config *cfg);

/* The conditional layer at layer index i and its diagnostics from the last
 * forward pass (CCR_EINVAL if layer i is not conditional). */
ccr_status ccr_net_cond(const ccr_net *net, size_t i, ccr_cond **cond, ccr_gate_stats *stats);

/* Data and expert parallelism over comm's ranks (Shazeer et al. 2017,
 * section 3.1): call it on every rank before ccr_net_finalize, the same
 * network everywhere and the same seed for finalize.  Conditional layers
 * (added before or after) become expert-parallel (ccr_cond_set_comm: each
 * rank holds its block of every bank); the rest is replicated.  Each rank
 * then passes its own examples - the ranks' batches in rank order form the
 * global batch - to every pass, all ranks together.  ccr_net_loss_grad*,
 * ccr_train_step and ccr_net_eval report global statistics (loss mean and
 * accuracy over the global batch, batch = its size) on every rank; the
 * loss's gradient is the global mean's, and ccr_net_loss_grad* sums the
 * replicated parameters' gradients over the ranks, so identical optimiser
 * steps keep the replicas identical.  ccr_net_eval splits each rank's
 * share into as many chunks as the largest share needs (CCR_EBADLEN if a
 * rank has fewer examples than chunks).  CCR_EINVAL after finalize or for a
 * second communicator. */
ccr_status ccr_net_set_comm(ccr_net *net, ccr_comm *comm);

/* Allocates parameters (one arena) and activations (one block) and draws
 * every linear layer's W and b from U(-1/sqrt(d_in), 1/sqrt(d_in)) (the
 * PyTorch default) using rng, layer by layer.  Returns CCR_EINVAL for an
 * empty network, a network without parameters, or a second call. */
ccr_status ccr_net_finalize(ccr_net *net, gsl_rng *rng);

/* Sizes and parts. */
size_t ccr_net_d_in(const ccr_net *net);
size_t ccr_net_d_out(const ccr_net *net);
size_t ccr_net_max_batch(const ccr_net *net);
size_t ccr_net_n_layers(const ccr_net *net);
ccr_arena *ccr_net_params(const ccr_net *net);   /* NULL before finalize */
ccr_backend *ccr_net_backend(const ccr_net *net);

/* Facts about layer i (< ccr_net_n_layers). */
typedef struct ccr_layer_info {
    const char *kind;    /* "linear", "relu", "tanh", "sigmoid", "identity", or the
                            gate name of a conditional layer ("topk", ...) */
    size_t d_in, d_out;
    size_t n_params;
    double flops_fwd;    /* per example (conditional layers: evaluation mode) */
    double flops_bwd;    /* per example, as executed (no dx for layer 0) */
} ccr_layer_info;
ccr_status ccr_net_layer_info(const ccr_net *net, size_t i, ccr_layer_info *info);

/* Bytes of memory the network holds once finalized: parameters and
 * gradients, the activation block for max_batch examples, host staging and
 * the conditional layers' workspaces (gate buffers and optimiser moments are
 * not counted).  Valid before finalize (an estimate from the layers added so
 * far; ccr_net_finalize refuses with CCR_ENOMEM, "needs X GiB, this machine
 * has Y GiB", a network larger than physical memory) and after.  CCR_EINVAL
 * for NULL arguments, CCR_ENOMEM if the size overflows. */
ccr_status ccr_net_memory_bytes(const ccr_net *net, size_t *bytes);

/* Totals over the layers (per example). */
typedef struct ccr_flops {
    double fwd;          /* forward FLOPs per example */
    double bwd;          /* backward FLOPs per example */
} ccr_flops;
ccr_flops ccr_net_flops(const ccr_net *net);
size_t ccr_net_n_params(const ccr_net *net);

/* The mode of a pass through the network.  Only conditional layers differ:
 *   CCR_MODE_EVAL   no gate noise, count-based Load, Switch's evaluation
 *                   capacity (docs/GATES.md); the aux losses are still
 *                   computed (and, after a backward, differentiated) on
 *                   the batch.
 *   CCR_MODE_TRAIN  what ccr_train_step runs: noisy gates (topk, hmoe) draw
 *                   their noise from the caller's rng, the smooth Load
 *                   estimate replaces the count-based one, the sign-bit
 *                   tree's straight-through pass is taken.
 * Plain linear/activation networks give the same result in both modes. */
typedef enum ccr_mode { CCR_MODE_EVAL = 0, CCR_MODE_TRAIN = 1 } ccr_mode;

/* Where the x of ccr_net_forward*, ccr_net_loss_grad*, ccr_net_eval and
 * ccr_train_step lives:
 *   CCR_INPUT_HOST     host memory (the default): each pass checks it for
 *                      NaN and infinity on the host and copies it to the
 *                      backend's staging buffer.
 *   CCR_INPUT_BACKEND  the backend's memory (ccr_backend_alloc; device
 *                      memory on CUDA): no copy - a training loop that
 *                      uploads its data once avoids a host round trip per
 *                      step.  The check for NaN and infinity runs on the
 *                      backend (one pass, sum_squares; a synchronisation on
 *                      CUDA), and x must stay unchanged until the backward
 *                      of the pass that read it.
 * Labels are host memory in both.  CCR_EINVAL for an unknown value. */
typedef enum ccr_input_memory {
    CCR_INPUT_HOST = 0,
    CCR_INPUT_BACKEND = 1
} ccr_input_memory;
ccr_status ccr_net_set_input_memory(ccr_net *net, ccr_input_memory where);

/* Forward pass of `batch` (1..max_batch) examples x (batch x d_in; host
 * memory unless ccr_net_set_input_memory says otherwise) in `mode`; rng supplies the gate noise in CCR_MODE_TRAIN
 * (it may be NULL when no layer draws noise, and is unused in
 * CCR_MODE_EVAL).  *out receives the network output on the backend
 * (batch x d_out, valid until the next call); the auxiliary losses of the
 * pass are then readable with ccr_net_aux_loss.  Returns CCR_EBADLEN for a
 * bad batch, CCR_EDOM if x holds NaN or infinity, CCR_EINVAL before
 * finalize, for an unknown mode, or for a NULL rng where a gate needs one. */
ccr_status ccr_net_forward_mode(ccr_net *net, const float *x, size_t batch, ccr_mode mode,
                                gsl_rng *rng, const float **out);

/* ccr_net_forward_mode(net, x, batch, CCR_MODE_EVAL, NULL, out). */
ccr_status ccr_net_forward(ccr_net *net, const float *x, size_t batch, const float **out);

/* Backward pass for the last forward: dout (backend memory, batch x d_out)
 * is the gradient of the loss with respect to the output; parameter
 * gradients are *added* to the arena's gradient block.  The gradients of
 * the conditional layers' auxiliary losses (coefficient 1, as configured
 * in each gate) are always added too, so after
 *     forward_mode -> dout = dL/dout of your loss -> backward
 * the arena holds the gradient of  L + ccr_net_aux_loss(net). */
ccr_status ccr_net_backward(ccr_net *net, const float *dout);

/* Sum over the conditional layers of the auxiliary losses (importance,
 * load, Switch, z-loss; ccr_gate_stats.aux_loss) of the last forward pass,
 * with the coefficients of each gate's configuration.  0 for a NULL
 * network, before any forward, or without conditional layers. */
double ccr_net_aux_loss(const ccr_net *net);

/* Per-batch results. */
typedef struct ccr_step_stats {
    double loss;         /* mean softmax cross-entropy over the batch */
    double aux_loss;     /* sum of the conditional layers' auxiliary losses
                            (trained on, not included in loss) */
    size_t correct;      /* examples whose argmax equals the label */
    size_t batch;        /* examples seen */
} ccr_step_stats;

/* Forward in `mode` (see ccr_mode; rng as for ccr_net_forward_mode) + mean
 * softmax cross-entropy against labels (host, batch values in [0, d_out))
 * + auxiliary losses + backward, gradients *accumulated* into the arena
 * (zero them first with ccr_arena_zero_grad); no parameter update.  This
 * is ccr_train_step without the zeroing and the update, so a custom loop
 *     ccr_arena_zero_grad(p);
 *     ccr_net_loss_grad_mode(net, x, y, b, CCR_MODE_TRAIN, rng, &st);
 *     ccr_arena_clip_grad_norm(p, 1.0, &norm);      // optional
 *     ccr_optim_step(opt);
 * reproduces ccr_train_step bit for bit when nothing is clipped.  Returns
 * CCR_EINVAL for a label out of range (nothing computed) or an unknown mode,
 * CCR_EDOM if the loss is not finite (stats untouched). */
ccr_status ccr_net_loss_grad_mode(ccr_net *net, const float *x, const int32_t *labels,
                                  size_t batch, ccr_mode mode, gsl_rng *rng,
                                  ccr_step_stats *stats);

/* ccr_net_loss_grad_mode in CCR_MODE_EVAL (no rng). */
ccr_status ccr_net_loss_grad(ccr_net *net, const float *x, const int32_t *labels,
                             size_t batch, ccr_step_stats *stats);

/* Loss and accuracy over n examples (any n >= 1; processed in chunks of
 * max_batch), no gradients.  stats->loss is the mean over all n.  CCR_EDOM
 * if the loss of a chunk is not finite.  An output row holding NaN or
 * infinity never counts as correct (in every backend's loss kernel). */
ccr_status ccr_net_eval(ccr_net *net, const float *x, const int32_t *labels, size_t n,
                        ccr_step_stats *stats);

/* Writes the parameters to a safetensors checkpoint ("param.layers.0.w" ...)
 * with the architecture in __metadata__ (keys "format" = "ccr.net",
 * "ccr_version", "architecture"; the architecture string's grammar is in
 * docs/DESIGN.md, "Checkpoints"); reads them back into a network of the
 * same architecture (CCR_EFORMAT if it differs; values untouched).
 * Under a communicator of several ranks (ccr_net_set_comm) both are
 * collective with the same path everywhere: save gathers every bank to
 * rank 0, which writes the file one process would (the banks whole, the
 * same tensors in the same order) and whose status every rank returns;
 * load reads that file on every rank, each keeping its rows of the banks,
 * so a checkpoint moves between any numbers of processes. */
ccr_status ccr_net_save(const ccr_net *net, const char *path);
ccr_status ccr_net_load(ccr_net *net, const char *path);

/* ---- optimisers ---------------------------------------------------------- */

typedef enum ccr_optim_kind { CCR_OPTIM_SGD = 0, CCR_OPTIM_ADAM = 1 } ccr_optim_kind;

typedef struct ccr_optim_config {
    ccr_optim_kind kind;
    float lr;            /* learning rate, > 0 */
    float momentum;      /* SGD momentum in [0, 1) */
    float beta1, beta2;  /* Adam, in [0, 1) */
    float eps;           /* Adam, > 0 */
    float weight_decay;  /* L2 added to the gradient, >= 0 */
    bool sparse;         /* update only the bank matrices the batch used (below) */
} ccr_optim_config;

/* Defaults: SGD lr 0.1 momentum 0.9; Adam lr 1e-3, betas 0.9/0.999, eps 1e-8;
 * no weight decay; sparse off (dense updates).
 *
 * Sparse updates (sparse = true; docs/GATES.md, "Sparse training step"): the
 * gradient of a conditional layer's bank is written only for the matrices
 * its batch routed to (ccr_arena_zero_grad clears only those; this holds in
 * both modes).  A sparse optimiser updates every other parameter as the
 * dense one does, and of the bank only the matrices touched since the last
 * ccr_arena_zero_grad, each with its own step count: a matrix's parameters,
 * moments and weight decay move only on the steps it gets a gradient, and
 * Adam's bias correction uses that matrix's count (lazy Adam, as PyTorch's
 * SparseAdam and TF's LazyAdam).  SGD without momentum and weight decay is
 * bitwise identical in both modes; with momentum, weight decay or Adam the
 * sparse rule differs from the dense one for matrices a batch skips.  Off by
 * default: it is a different optimiser, and dense results stay reproducible. */
ccr_optim_config ccr_optim_defaults(ccr_optim_kind kind);

typedef struct ccr_optim ccr_optim;

/* Creates an optimiser over a finalized arena, allocating its moment
 * buffers once.  Returns CCR_EINVAL for a bad configuration. */
ccr_status ccr_optim_init(ccr_arena *params, const ccr_optim_config *cfg, ccr_optim **out);
void ccr_optim_free(ccr_optim *opt);

/* One update of every parameter from the accumulated gradients (sparse
 * mode: of the touched bank matrices and every non-bank parameter). */
ccr_status ccr_optim_step(ccr_optim *opt);

/* Parameters the last ccr_optim_step updated (block floats, padding
 * included), and its FLOPs: that count times the kernel's FLOPs per
 * parameter (SGD 2, +2 with momentum; Adam 13; +2 with weight decay).
 * 0 before the first step or for NULL. */
size_t ccr_optim_last_updated(const ccr_optim *opt);
double ccr_optim_flops(const ccr_optim *opt);

/* Changes the learning rate (schedules); CCR_EINVAL unless lr > 0. */
ccr_status ccr_optim_set_lr(ccr_optim *opt, float lr);

/* One training step: ccr_arena_zero_grad, ccr_net_loss_grad_mode in
 * CCR_MODE_TRAIN (gates draw their noise from rng, which may be NULL only
 * if no layer draws noise), ccr_optim_step.  Returns CCR_EDOM, without
 * updating, if the loss or the gradient norm is not finite (or a gate's
 * routing weights are not).  Parameters are unchanged if the step fails
 * before the update. */
ccr_status ccr_train_step(ccr_net *net, ccr_optim *opt, gsl_rng *rng, const float *x,
                          const int32_t *labels, size_t batch, ccr_step_stats *stats);

CCR_END_DECLS

#endif /* CCR_NN_H */
