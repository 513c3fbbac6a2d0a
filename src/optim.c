/*
 * optim.c - optimisers over a parameter arena.
 *
 * One update runs over the arena's whole value block with the backend's
 * sgd_step or adam_step kernel (the padding between tensors is zero in values
 * and gradients and stays zero).  Moment buffers are allocated once, at init.
 *
 * Sparse mode (ccr_optim_config.sparse, issue 10): the dense ranges of the
 * block are updated as above, and of each row-sparse tensor (a conditional
 * layer's bank) only the rows the last batches touched, each with the same
 * kernel and its own step count t_row (lazy Adam: a matrix's moments decay
 * and its bias correction advances only when it gets a gradient; PyTorch's
 * SparseAdam, TF's LazyAdam).  Untouched rows keep values, moments and count.
 * A tensor's touched rows go to the backend in one call (sgd_ranges /
 * adam_ranges: one launch on a device, not one per matrix).
 */
#include <math.h>
#include <stdlib.h>

#include "arena_impl.h"    // provides: ccr_arena_backend
#include "backend_impl.h"  // provides: struct ccr_backend (kernel table)
#include "internal.h"      // provides: CCR_FAIL, CCR_TRY

struct ccr_optim {
    ccr_arena *params;
    ccr_backend *be;
    ccr_optim_config cfg;
    float *m, *v;     /* moments: SGD uses m as the momentum buffer */
    uint64_t t;       /* steps taken */
    uint64_t *t_row;  /* sparse mode: steps taken by each row-sparse row */
    uint64_t *t_batch; /* sparse mode: the step counts of one ranges call */
    size_t updated;   /* parameters (block floats) updated by the last step */
};

/* FLOPs per updated parameter of the kernels (optim_ref.c, cpu_kernels.c):
 * SGD w -= lr g (2), momentum v = mu v + g (2); Adam's two moments (3 + 4)
 * and the update (sqrt, 2 mul, add, div, sub: 6); L2 weight decay 2. */
static double optim_flops_per_param(const ccr_optim_config *c)
{
    double wd = c->weight_decay != 0.0f ? 2.0 : 0.0;
    if (c->kind == CCR_OPTIM_ADAM)
        return 13.0 + wd;
    return 2.0 + (c->momentum != 0.0f ? 2.0 : 0.0) + wd;
}

ccr_optim_config ccr_optim_defaults(ccr_optim_kind kind)
{
    ccr_optim_config c = {.kind = kind, .lr = 0.1f, .momentum = 0.9f, .beta1 = 0.9f,
                          .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.0f};
    if (kind == CCR_OPTIM_ADAM)
        c.lr = 1e-3f;
    return c;
}

static ccr_status optim_check(ccr_ctx *ctx, const ccr_optim_config *c)
{
    if (c->kind != CCR_OPTIM_SGD && c->kind != CCR_OPTIM_ADAM)
        CCR_FAIL(ctx, CCR_EINVAL, "unknown optimiser kind %d", (int)c->kind);
    if (!(c->lr > 0.0f) || !isfinite(c->lr))
        CCR_FAIL(ctx, CCR_EINVAL, "learning rate %g must be finite and > 0", (double)c->lr);
    if (!(c->weight_decay >= 0.0f) || !isfinite(c->weight_decay))
        CCR_FAIL(ctx, CCR_EINVAL, "weight decay %g must be >= 0", (double)c->weight_decay);
    if (c->kind == CCR_OPTIM_SGD && !(c->momentum >= 0.0f && c->momentum < 1.0f))
        CCR_FAIL(ctx, CCR_EINVAL, "momentum %g not in [0, 1)", (double)c->momentum);
    if (c->kind == CCR_OPTIM_ADAM) {
        if (!(c->beta1 >= 0.0f && c->beta1 < 1.0f) || !(c->beta2 >= 0.0f && c->beta2 < 1.0f))
            CCR_FAIL(ctx, CCR_EINVAL, "Adam betas %g, %g not in [0, 1)", (double)c->beta1,
                     (double)c->beta2);
        if (!(c->eps > 0.0f))
            CCR_FAIL(ctx, CCR_EINVAL, "Adam eps %g must be > 0", (double)c->eps);
    }
    return CCR_OK;
}

ccr_status ccr_optim_init(ccr_arena *params, const ccr_optim_config *cfg, ccr_optim **out)
{
    if (params == NULL)
        return CCR_EINVAL;
    ccr_backend *be = ccr_arena_backend(params);
    CCR_CHECK_NULL(be->ctx, cfg);
    CCR_CHECK_NULL(be->ctx, out);
    if (ccr_arena_values(params) == NULL)
        CCR_FAIL(be->ctx, CCR_EINVAL, "arena not finalized");
    CCR_TRY(optim_check(be->ctx, cfg));
    size_t block = ccr_arena_block_len(params) * sizeof(float); /* checked by finalize */
    CCR_TRY(ccr_mem_check(be->ctx, block <= SIZE_MAX / 2 ? 2 * block : SIZE_MAX,
                          "optimiser moments"));
    ccr_optim *o = calloc(1, sizeof *o);
    if (o == NULL)
        CCR_FAIL(be->ctx, CCR_ENOMEM, "cannot allocate optimiser");
    o->params = params;
    o->be = be;
    o->cfg = *cfg;
    size_t bytes = ccr_arena_block_len(params) * sizeof(float);
    ccr_status s = CCR_OK;
    bool need_m = cfg->kind == CCR_OPTIM_ADAM || cfg->momentum != 0.0f;
    if (need_m)
        s = ccr_backend_alloc(be, bytes, (void **)&o->m);
    if (s == CCR_OK && cfg->kind == CCR_OPTIM_ADAM)
        s = ccr_backend_alloc(be, bytes, (void **)&o->v);
    size_t rows = ccr_arena_sparse_rows(params);
    if (s == CCR_OK && cfg->sparse && rows > 0) {
        o->t_row = calloc(rows, sizeof *o->t_row);
        o->t_batch = calloc(rows, sizeof *o->t_batch);
        if (o->t_row == NULL || o->t_batch == NULL)
            s = CCR_FAIL_EXPR(be->ctx, CCR_ENOMEM, "cannot allocate per-matrix step counts");
    }
    if (s != CCR_OK) {
        ccr_optim_free(o);
        return s;
    }
    *out = o;
    return CCR_OK;
}

void ccr_optim_free(ccr_optim *o)
{
    if (o == NULL)
        return;
    ccr_backend_free_buffer(o->be, o->m);
    ccr_backend_free_buffer(o->be, o->v);
    free(o->t_row);
    free(o->t_batch);
    free(o);
}

ccr_status ccr_optim_set_lr(ccr_optim *o, float lr)
{
    if (o == NULL)
        return CCR_EINVAL;
    if (!(lr > 0.0f) || !isfinite(lr))
        CCR_FAIL(o->be->ctx, CCR_EINVAL, "learning rate %g must be finite and > 0", (double)lr);
    o->cfg.lr = lr;
    return CCR_OK;
}

/* One kernel call over [off, off + len) of the block, with step count t. */
static ccr_status optim_range_t(ccr_optim *o, size_t off, size_t len, uint64_t t)
{
    float *w = ccr_arena_values(o->params) + off;
    const float *g = ccr_arena_grads(o->params) + off;
    float *m = o->m ? o->m + off : NULL, *v = o->v ? o->v + off : NULL;
    const ccr_optim_config *c = &o->cfg;
    o->updated += len;
    if (c->kind == CCR_OPTIM_SGD)
        return o->be->k->sgd_step(o->be, w, g, m, len, c->lr, c->momentum, c->weight_decay);
    return o->be->k->adam_step(o->be, w, g, m, v, len, c->lr, c->beta1, c->beta2, c->eps,
                               c->weight_decay, t);
}

/* ccr_arena_for_written_rows callback of the dense ranges: the global count. */
static ccr_status optim_dense(void *u, size_t off, size_t len, size_t row)
{
    CCR_UNUSED(row);
    ccr_optim *o = u;
    return optim_range_t(o, off, len, o->t);
}

/* ccr_arena_for_written_rows callback: one tensor's touched rows, each at
 * its own advanced count, in one ranges call. */
static ccr_status optim_rows(void *u, const size_t *off, const size_t *ids, size_t n,
                             size_t len)
{
    ccr_optim *o = u;
    const ccr_optim_config *c = &o->cfg;
    float *w = ccr_arena_values(o->params);
    const float *g = ccr_arena_grads(o->params);
    o->updated += n * len;  /* <= the block length */
    if (c->kind == CCR_OPTIM_SGD) {
        for (size_t r = 0; r < n; r++)
            ++o->t_row[ids[r]];
        return o->be->k->sgd_ranges(o->be, w, g, o->m, off, n, len, c->lr, c->momentum,
                                    c->weight_decay);
    }
    for (size_t r = 0; r < n; r++)
        o->t_batch[r] = ++o->t_row[ids[r]];
    return o->be->k->adam_ranges(o->be, w, g, o->m, o->v, off, o->t_batch, n, len, c->lr,
                                 c->beta1, c->beta2, c->eps, c->weight_decay);
}

ccr_status ccr_optim_step(ccr_optim *o)
{
    if (o == NULL)
        return CCR_EINVAL;
    o->t++;
    o->updated = 0;
    if (o->t_row != NULL)
        return ccr_arena_for_written_rows(o->params, optim_dense, optim_rows, o);
    return optim_range_t(o, 0, ccr_arena_block_len(o->params), o->t);
}

size_t ccr_optim_last_updated(const ccr_optim *o) { return o ? o->updated : 0; }

double ccr_optim_flops(const ccr_optim *o)
{
    return o ? (double)o->updated * optim_flops_per_param(&o->cfg) : 0.0;
}
