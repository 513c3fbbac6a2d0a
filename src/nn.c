/*
 * nn.c - ccr_net: a stack of layers on one backend.
 *
 * Build phases: ccr_net_init, ccr_net_add_*, ccr_net_finalize.  Finalize
 * makes one parameter arena and one backend block holding, for max_batch
 * examples, the staged input, every layer's output and output gradient, the
 * staged labels and the per-example loss and correctness (llm.c's
 * "activations" block).  Nothing is allocated after finalize.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena_impl.h"    // provides: ccr_arena_load_from
#include "backend_impl.h"  // provides: struct ccr_backend (kernel table)
#include "cond_impl.h"     // provides: ccr_bank_full, ccr_condi_ep_gather_bank, gate_first
#include "ccr/ccr_safetensors.h"
#include "internal.h"      // provides: CCR_FAIL, CCR_TRY
#include "layer_impl.h"    // provides: ccr_layer, layer ops
#include "nn_impl.h"       // provides: struct ccr_net

ccr_status ccr_net_init(ccr_backend *be, size_t d_in, size_t max_batch, ccr_net **out)
{
    if (be == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(be->ctx, out);
    if (d_in == 0 || max_batch == 0)
        CCR_FAIL(be->ctx, CCR_EINVAL, "d_in=%zu and max_batch=%zu must be > 0", d_in, max_batch);
    /* The staged input alone must fit. */
    size_t in_bytes;
    CCR_TRY(ccr_mem_check(be->ctx,
                          ccr_mul3_ok(max_batch, d_in, sizeof(float), &in_bytes) ? in_bytes
                                                                                : SIZE_MAX,
                          "network input batch"));
    ccr_net *net = calloc(1, sizeof *net);
    if (net == NULL)
        CCR_FAIL(be->ctx, CCR_ENOMEM, "cannot allocate network");
    net->be = be;
    net->ctx = be->ctx;
    net->d_in = d_in;
    net->max_batch = max_batch;
    *out = net;
    return CCR_OK;
}

void ccr_net_free(ccr_net *net)
{
    if (net == NULL)
        return;
    for (size_t i = 0; i < net->n; i++)
        ccr_cond_free(net->layers[i].cond);
    ccr_arena_free(net->params);
    ccr_backend_free_buffer(net->be, net->block);
    free(net->layers);
    free(net->host);
    free(net->comm_buf);
    free(net);
}

ccr_status ccr_net_set_comm(ccr_net *net, ccr_comm *comm)
{
    if (net == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(net->ctx, comm);
    if (net->params != NULL)
        CCR_FAIL(net->ctx, CCR_EINVAL, "set the communicator before ccr_net_finalize");
    if (net->comm != NULL)
        CCR_FAIL(net->ctx, CCR_EINVAL, "the network already has a communicator");
    size_t P = (size_t)ccr_comm_size(comm);
    net->comm_buf = ccr_mallocn(P + 3, sizeof *net->comm_buf);
    if (net->comm_buf == NULL)
        CCR_FAIL(net->ctx, CCR_ENOMEM, "cannot allocate the communicator's buffer");
    for (size_t i = 0; i < net->n; i++)
        if (net->layers[i].cond != NULL)
            CCR_TRY(ccr_cond_set_comm(net->layers[i].cond, comm));
    net->comm = comm;
    return CCR_OK;
}

static ccr_status net_push(ccr_net *net, const ccr_layer_ops *ops, size_t d_out, ccr_act act)
{
    if (net->params != NULL)
        CCR_FAIL(net->ctx, CCR_EINVAL, "network already finalized");
    if (net->n == net->cap) {
        size_t cap = net->cap ? 2 * net->cap : 8;
        ccr_layer *l = ccr_reallocn(net->layers, cap, sizeof *l);
        if (l == NULL)
            CCR_FAIL(net->ctx, CCR_ENOMEM, "cannot grow layer table");
        net->layers = l;
        net->cap = cap;
    }
    ccr_layer *l = &net->layers[net->n];
    memset(l, 0, sizeof *l);
    l->ops = ops;
    l->d_in = ccr_net_d_out(net);
    l->d_out = d_out;
    l->act = act;
    net->n++;
    return CCR_OK;
}

ccr_status ccr_net_add_linear(ccr_net *net, size_t d_out)
{
    if (net == NULL)
        return CCR_EINVAL;
    if (d_out == 0)
        CCR_FAIL(net->ctx, CCR_EINVAL, "linear layer with d_out = 0");
    return net_push(net, &ccr_layer_linear_ops, d_out, CCR_ACT_IDENTITY);
}

ccr_status ccr_net_add_act(ccr_net *net, ccr_act act)
{
    if (net == NULL)
        return CCR_EINVAL;
    if (ccr_act_name(act) == NULL)
        CCR_FAIL(net->ctx, CCR_EINVAL, "unknown activation %d", (int)act);
    return net_push(net, &ccr_layer_act_ops, ccr_net_d_out(net), act);
}

ccr_status ccr_net_add_cond(ccr_net *net, const ccr_cond_config *cfg)
{
    if (net == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(net->ctx, cfg);
    if (net->params != NULL)
        CCR_FAIL(net->ctx, CCR_EINVAL, "network already finalized");
    ccr_cond_config c = *cfg;
    c.d_in = ccr_net_d_out(net);
    ccr_cond *cond;
    CCR_TRY(ccr_cond_alloc(net->be, &c, net->max_batch, &cond));
    ccr_status s = net->comm ? ccr_cond_set_comm(cond, net->comm) : CCR_OK;
    if (s == CCR_OK)
        s = net_push(net, &ccr_layer_cond_ops, c.d_out, CCR_ACT_IDENTITY);
    if (s != CCR_OK) {
        ccr_cond_free(cond);
        return s;
    }
    net->layers[net->n - 1].cond = cond;
    return CCR_OK;
}

ccr_status ccr_net_cond(const ccr_net *net, size_t i, ccr_cond **cond, ccr_gate_stats *stats)
{
    if (net == NULL)
        return CCR_EINVAL;
    if (i >= net->n || net->layers[i].cond == NULL)
        CCR_FAIL(net->ctx, CCR_EINVAL, "layer %zu is not a conditional layer", i);
    if (cond != NULL)
        *cond = net->layers[i].cond;
    if (stats != NULL)
        *stats = net->layers[i].stats;
    return CCR_OK;
}

/* Carves the activation block: input, per-layer out/dout, labels, loss,
 * correctness.  With block == NULL it only counts floats.  Returns SIZE_MAX
 * if the size overflows (max_batch x width is checked for every part). */
static size_t net_carve(ccr_net *net, float *block)
{
    size_t B = net->max_batch, off = 0, cnt;
    bool ok = true;
#define CARVE(ptr, type, width)                                               \
    do {                                                                      \
        if (block != NULL)                                                    \
            (ptr) = (type *)(void *)(block + off);                            \
        ok = ok && ccr_mul_ok(B, (width), &cnt) && ccr_add_ok(cnt, 15, &cnt) && \
             ccr_add_ok(off, cnt / 16 * 16, &off);                            \
    } while (0)
    CARVE(net->x_dev, float, net->d_in);
    for (size_t i = 0; i < net->n; i++) {
        CARVE(net->layers[i].out, float, net->layers[i].d_out);
        CARVE(net->layers[i].dout, float, net->layers[i].d_out);
    }
    CARVE(net->labels_dev, int32_t, 1);
    CARVE(net->loss_dev, float, 1);
    CARVE(net->correct_dev, int32_t, 1);
#undef CARVE
    return ok ? off : SIZE_MAX;
}

/* Parameters the layers will declare (an estimate before finalize: the
 * exact arena block after). */
static size_t net_param_floats(const ccr_net *net)
{
    if (net->params != NULL)
        return ccr_arena_block_len(net->params);
    size_t total = 0;
    for (size_t i = 0; i < net->n; i++) {
        size_t np = net->layers[i].ops->n_params(&net->layers[i]);
        if (!ccr_add_ok(total, np, &total))
            return SIZE_MAX;
    }
    return total;
}

/* Bytes the network holds once finalized; SIZE_MAX on overflow. */
static size_t net_bytes(const ccr_net *net)
{
    size_t floats = net_carve((ccr_net *)net, NULL), params = net_param_floats(net), b, t;
    if (floats == SIZE_MAX || params == SIZE_MAX)
        return SIZE_MAX;
    bool ok = ccr_mul_ok(params, 2 * sizeof(float), &b) &&    /* values + gradients */
              ccr_mul_ok(floats, sizeof(float), &t) && ccr_add_ok(b, t, &b) &&
              ccr_mul3_ok(2, net->max_batch, sizeof(float), &t) && ccr_add_ok(b, t, &b);
    for (size_t i = 0; ok && i < net->n; i++)
        ok = ccr_add_ok(b, ccr_cond_memory_bytes(net->layers[i].cond), &b);
    return ok ? b : SIZE_MAX;
}

ccr_status ccr_net_memory_bytes(const ccr_net *net, size_t *bytes)
{
    if (net == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(net->ctx, bytes);
    size_t b = net_bytes(net);
    if (b == SIZE_MAX)
        CCR_FAIL(net->ctx, CCR_ENOMEM, "network size overflows (max_batch %zu)",
                 net->max_batch);
    *bytes = b;
    return CCR_OK;
}

ccr_status ccr_net_finalize(ccr_net *net, gsl_rng *rng)
{
    if (net == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(net->ctx, rng);
    if (net->params != NULL)
        CCR_FAIL(net->ctx, CCR_EINVAL, "network already finalized");
    if (net->n == 0)
        CCR_FAIL(net->ctx, CCR_EINVAL, "network has no layers");
    /* Refuse up front what cannot fit, before any allocation. */
    CCR_TRY(ccr_mem_check(net->ctx, net_bytes(net), "network"));

    ccr_arena *a = NULL;
    float *block = NULL, *scratch = NULL;
    ccr_status s = ccr_arena_init(net->be, &a);
    size_t largest = 0;
    for (size_t i = 0; i < net->n && s == CCR_OK; i++) {
        ccr_layer *l = &net->layers[i];
        if (l->ops->declare != NULL)
            s = l->ops->declare(l, a, i);
    }
    if (s == CCR_OK && ccr_arena_count(a) == 0)
        s = CCR_FAIL_EXPR(net->ctx, CCR_EINVAL, "network has no parameters");
    if (s == CCR_OK)
        s = ccr_arena_finalize(a);
    for (size_t i = 0; s == CCR_OK && i < ccr_arena_count(a); i++)
        if (ccr_arena_size(a, i) > largest)
            largest = ccr_arena_size(a, i);
    if (s == CCR_OK && (scratch = ccr_mallocn(largest, sizeof *scratch)) == NULL)
        s = CCR_FAIL_EXPR(net->ctx, CCR_ENOMEM, "cannot allocate init scratch");
    /* Initialise layer by layer, in order: the draws are a fixed function of
     * the seed. */
    for (size_t i = 0; i < net->n && s == CCR_OK; i++) {
        ccr_layer *l = &net->layers[i];
        if (l->ops->init_params != NULL)
            s = l->ops->init_params(l, a, rng, scratch);
    }
    size_t n_block = net_carve(net, NULL);
    if (s == CCR_OK)
        s = ccr_backend_alloc(net->be, n_block * sizeof(float), (void **)&block); /* bounded: net_bytes */
    /* Host staging of per-example loss and correctness. */
    if (s == CCR_OK && (net->host = ccr_malloc3(2, net->max_batch, sizeof(float))) == NULL)
        s = CCR_FAIL_EXPR(net->ctx, CCR_ENOMEM, "cannot allocate host staging");
    free(scratch);
    if (s != CCR_OK) {
        ccr_arena_free(a);
        ccr_backend_free_buffer(net->be, block);
        free(net->host);
        net->host = NULL;
        return s;
    }
    net_carve(net, block);
    net->block = block;
    net->params = a;
    return CCR_OK;
}

/* Getters: 0 / NULL for a NULL network (the NULL-handle rule, ccr.h). */
size_t ccr_net_d_in(const ccr_net *net) { return net ? net->d_in : 0; }
size_t ccr_net_d_out(const ccr_net *net)
{
    if (net == NULL)
        return 0;
    return net->n ? net->layers[net->n - 1].d_out : net->d_in;
}
size_t ccr_net_max_batch(const ccr_net *net) { return net ? net->max_batch : 0; }
size_t ccr_net_n_layers(const ccr_net *net) { return net ? net->n : 0; }
ccr_arena *ccr_net_params(const ccr_net *net) { return net ? net->params : NULL; }
ccr_backend *ccr_net_backend(const ccr_net *net) { return net ? net->be : NULL; }

ccr_status ccr_net_layer_info(const ccr_net *net, size_t i, ccr_layer_info *info)
{
    if (net == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(net->ctx, info);
    if (i >= net->n)
        CCR_FAIL(net->ctx, CCR_EINVAL, "layer %zu >= %zu layers", i, net->n);
    const ccr_layer *l = &net->layers[i];
    info->kind = l->ops == &ccr_layer_act_ops ? ccr_act_name(l->act) : l->ops->kind;
    if (l->cond != NULL)
        info->kind = ccr_gate_get_type(ccr_cond_gate(l->cond))->name;
    info->d_in = l->d_in;
    info->d_out = l->d_out;
    info->n_params = l->ops->n_params(l);
    info->flops_fwd = l->ops->flops_fwd(l);
    info->flops_bwd = l->ops->flops_bwd(l, i > 0);
    return CCR_OK;
}

ccr_flops ccr_net_flops(const ccr_net *net)
{
    ccr_flops f = {0.0, 0.0};
    for (size_t i = 0; net != NULL && i < net->n; i++) {
        f.fwd += net->layers[i].ops->flops_fwd(&net->layers[i]);
        f.bwd += net->layers[i].ops->flops_bwd(&net->layers[i], i > 0);
    }
    return f;
}

size_t ccr_net_n_params(const ccr_net *net)
{
    size_t n = 0;
    for (size_t i = 0; net != NULL && i < net->n; i++)
        n += net->layers[i].ops->n_params(&net->layers[i]);
    return n;
}

static ccr_status net_check_input(ccr_net *net, const float *x, size_t batch)
{
    CCR_CHECK_NULL(net->ctx, x);
    if (net->params == NULL)
        CCR_FAIL(net->ctx, CCR_EINVAL, "network not finalized");
    if (batch == 0 || batch > net->max_batch)
        CCR_FAIL(net->ctx, CCR_EBADLEN, "batch %zu not in 1..%zu", batch, net->max_batch);
    bool finite;
    if (net->input == CCR_INPUT_BACKEND) {
        /* A sum of squares in double is finite exactly when every float is
         * (FLT_MAX^2 times any size_t count stays below DBL_MAX). */
        double ss;
        CCR_TRY(net->be->k->sum_squares(net->be, x, batch * net->d_in, &ss));
        finite = isfinite(ss);
    } else {
        finite = ccr_all_finite(x, batch * net->d_in);
    }
    if (!finite)
        CCR_FAIL(net->ctx, CCR_EDOM, "input holds NaN or infinity");
    return CCR_OK;
}

ccr_status ccr_net_set_input_memory(ccr_net *net, ccr_input_memory where)
{
    if (net == NULL)
        return CCR_EINVAL;
    if (where != CCR_INPUT_HOST && where != CCR_INPUT_BACKEND)
        CCR_FAIL(net->ctx, CCR_EINVAL, "unknown input memory %d (host 0, backend 1)", (int)where);
    net->input = where;
    net->last_batch = 0;   /* a backward must follow a forward of this kind */
    return CCR_OK;
}

/* Forward over already-validated input, in training (gate noise from rng)
 * or evaluation mode. */
static ccr_status net_forward(ccr_net *net, const float *x, size_t batch, bool train,
                              gsl_rng *rng)
{
    const float *in = x;
    if (net->input == CCR_INPUT_HOST) {
        CCR_TRY(ccr_backend_set(net->be, net->x_dev, x, batch * net->d_in * sizeof(float)));
        in = net->x_dev;
    }
    net->x_last = in;
    for (size_t i = 0; i < net->n; i++) {
        ccr_layer *l = &net->layers[i];
        l->train = train;
        l->rng = rng;
        CCR_TRY(l->ops->forward(l, net->be, net->params, in, l->out, batch));
        in = l->out;
    }
    net->last_batch = batch;
    return CCR_OK;
}

static ccr_status net_check_mode(const ccr_net *net, ccr_mode mode)
{
    if (mode != CCR_MODE_EVAL && mode != CCR_MODE_TRAIN)
        CCR_FAIL(net->ctx, CCR_EINVAL, "unknown mode %d", (int)mode);
    return CCR_OK;
}

ccr_status ccr_net_forward_mode(ccr_net *net, const float *x, size_t batch, ccr_mode mode,
                                gsl_rng *rng, const float **out)
{
    if (net == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(net->ctx, out);
    CCR_TRY(net_check_mode(net, mode));
    CCR_TRY(net_check_input(net, x, batch));
    CCR_TRY(net_forward(net, x, batch, mode == CCR_MODE_TRAIN, rng));
    *out = net->layers[net->n - 1].out;
    return CCR_OK;
}

ccr_status ccr_net_forward(ccr_net *net, const float *x, size_t batch, const float **out)
{
    return ccr_net_forward_mode(net, x, batch, CCR_MODE_EVAL, NULL, out);
}

ccr_status ccr_net_backward(ccr_net *net, const float *dout)
{
    if (net == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(net->ctx, dout);
    if (net->last_batch == 0)
        CCR_FAIL(net->ctx, CCR_EINVAL, "backward without a forward pass");
    size_t batch = net->last_batch;
    const float *dy = dout;
    for (size_t i = net->n; i-- > 0;) {
        ccr_layer *l = &net->layers[i];
        const float *x = i > 0 ? net->layers[i - 1].out : net->x_last;
        float *dx = i > 0 ? net->layers[i - 1].dout : NULL;
        CCR_TRY(l->ops->backward(l, net->be, net->params, x, l->out, dy, dx, batch));
        dy = dx;
    }
    return CCR_OK;
}

static ccr_status net_check_labels(ccr_net *net, const int32_t *labels, size_t n)
{
    CCR_CHECK_NULL(net->ctx, labels);
    size_t classes = ccr_net_d_out(net);
    for (size_t i = 0; i < n; i++)
        if (labels[i] < 0 || (size_t)labels[i] >= classes)
            CCR_FAIL(net->ctx, CCR_EINVAL, "label[%zu] = %d not in 0..%zu", i, (int)labels[i],
                     classes - 1);
    return CCR_OK;
}

/* Loss of the last forward against staged labels; with_grad writes
 * dlogits = (softmax - onehot) / batch into the top layer's dout.  Sums the
 * per-example losses in order, in double. */
/* The global batch of this pass: the sum over the communicator's ranks
 * (this rank's batch without one). */
static ccr_status net_global(ccr_net *net, size_t batch, size_t *global)
{
    *global = batch;
    if (net->comm == NULL)
        return CCR_OK;
    net->comm_buf[0] = (double)batch;
    CCR_TRY(ccr_comm_allreduce_sum_f64(net->comm, net->comm_buf, 1));
    *global = (size_t)net->comm_buf[0];
    return CCR_OK;
}

/* Sums loss and correct over the ranks (no-op without a communicator). */
static ccr_status net_sum_stats(ccr_net *net, double *loss_sum, size_t *correct)
{
    if (net->comm == NULL)
        return CCR_OK;
    net->comm_buf[0] = *loss_sum, net->comm_buf[1] = (double)*correct;
    CCR_TRY(ccr_comm_allreduce_sum_f64(net->comm, net->comm_buf, 2));
    *loss_sum = net->comm_buf[0];
    *correct = (size_t)net->comm_buf[1];
    return CCR_OK;
}

static ccr_status net_loss(ccr_net *net, const int32_t *labels, size_t batch, bool with_grad,
                           double *loss_sum, size_t *correct)
{
    ccr_layer *top = &net->layers[net->n - 1];
    size_t global;  /* the mean is over the global batch under a communicator */
    CCR_TRY(net_global(net, batch, &global));
    CCR_TRY(ccr_backend_set(net->be, net->labels_dev, labels, batch * sizeof(int32_t)));
    CCR_TRY(net->be->k->softmax_xent(net->be, top->out, net->labels_dev, batch, top->d_out,
                                     1.0f / (float)global, net->loss_dev, net->correct_dev,
                                     with_grad ? top->dout : NULL));
    float *loss_h = net->host;
    int32_t *corr_h = (int32_t *)(void *)(net->host + net->max_batch);
    CCR_TRY(ccr_backend_get(net->be, loss_h, net->loss_dev, batch * sizeof(float)));
    CCR_TRY(ccr_backend_get(net->be, corr_h, net->correct_dev, batch * sizeof(int32_t)));
    double sum = 0.0;
    size_t c = 0;
    for (size_t i = 0; i < batch; i++) {
        sum += loss_h[i];
        c += corr_h[i] != 0;
    }
    if (!isfinite(sum)) {
        size_t bad = 0;
        while (bad < batch && isfinite(loss_h[bad]))
            bad++;
        CCR_FAIL(net->ctx, CCR_EDOM,
                 "loss is not finite (example %zu of the batch: %g); the parameters or "
                 "activations hold NaN or infinity", bad, bad < batch ? (double)loss_h[bad] : sum);
    }
    *loss_sum = sum;
    *correct = c;
    return CCR_OK;
}

/* Sum of the conditional layers' auxiliary losses of the last forward. */
double ccr_net_aux_loss(const ccr_net *net)
{
    double aux = 0.0;
    if (net == NULL || net->last_batch == 0)
        return 0.0;
    for (size_t i = 0; i < net->n; i++)
        if (net->layers[i].cond != NULL)
            aux += net->layers[i].stats.aux_loss;
    return aux;
}

/* The replicated parameters' gradients summed over the ranks, tensor by
 * tensor in arena order: every tensor but the banks' (row-sparse, rank-
 * dependent sizes; a rank may hold none), so every rank makes the same
 * calls with the same sizes. */
static ccr_status net_allreduce_grads(ccr_net *net)
{
    ccr_arena *a = net->params;
    for (size_t i = 0; i < ccr_arena_count(a); i++)
        if (ccr_arena_sparse_of(a, i) == NULL)
            CCR_TRY(ccr_comm_allreduce_sum(net->comm, ccr_arena_grad(a, i),
                                           ccr_arena_size(a, i)));
    return CCR_OK;
}

ccr_status ccr_net_loss_grad_mode(ccr_net *net, const float *x, const int32_t *labels,
                                  size_t batch, ccr_mode mode, gsl_rng *rng,
                                  ccr_step_stats *stats)
{
    if (net == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(net->ctx, stats);
    CCR_TRY(net_check_mode(net, mode));
    CCR_TRY(net_check_input(net, x, batch));
    CCR_TRY(net_check_labels(net, labels, batch));
    CCR_TRY(net_forward(net, x, batch, mode == CCR_MODE_TRAIN, rng));
    double sum = 0.0;
    size_t correct = 0;
    CCR_TRY(net_loss(net, labels, batch, true, &sum, &correct));
    CCR_TRY(ccr_net_backward(net, net->layers[net->n - 1].dout));
    size_t global = batch;
    if (net->comm != NULL) {
        CCR_TRY(net_sum_stats(net, &sum, &correct));
        CCR_TRY(net_global(net, batch, &global));
        CCR_TRY(net_allreduce_grads(net));
    }
    stats->loss = sum / (double)global;
    stats->aux_loss = ccr_net_aux_loss(net);
    stats->correct = correct;
    stats->batch = global;
    return CCR_OK;
}

ccr_status ccr_net_loss_grad(ccr_net *net, const float *x, const int32_t *labels,
                             size_t batch, ccr_step_stats *stats)
{
    return ccr_net_loss_grad_mode(net, x, labels, batch, CCR_MODE_EVAL, NULL, stats);
}

ccr_status ccr_net_eval(ccr_net *net, const float *x, const int32_t *labels, size_t n,
                        ccr_step_stats *stats)
{
    if (net == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(net->ctx, stats);
    CCR_CHECK_NULL(net->ctx, x);
    if (n == 0)
        CCR_FAIL(net->ctx, CCR_EBADLEN, "evaluation over zero examples");
    CCR_TRY(net_check_labels(net, labels, n));
    /* Chunks of at most max_batch; under a communicator every rank runs the
     * same number of them, the most any rank needs (its share split evenly),
     * as its conditional layers' collectives require. */
    size_t chunks = (n + net->max_batch - 1) / net->max_batch;
    if (net->comm != NULL) {
        const size_t P = (size_t)ccr_comm_size(net->comm);
        for (size_t p = 0; p < P; p++)
            net->comm_buf[p] = 0.0;
        net->comm_buf[ccr_comm_rank(net->comm)] = (double)chunks;
        CCR_TRY(ccr_comm_allreduce_sum_f64(net->comm, net->comm_buf, P));
        for (size_t p = 0; p < P; p++)
            chunks = (size_t)net->comm_buf[p] > chunks ? (size_t)net->comm_buf[p] : chunks;
        if (n < chunks)
            CCR_FAIL(net->ctx, CCR_EBADLEN, "this rank evaluates %zu examples, fewer than the "
                     "%zu chunks another rank's share needs", n, chunks);
    }
    double total = 0.0, aux = 0.0;
    size_t correct = 0;
    for (size_t ci = 0; ci < chunks; ci++) {
        size_t i0 = net->comm ? n * ci / chunks : ci * net->max_batch;
        size_t i1 = net->comm ? n * (ci + 1) / chunks
                              : (n - i0 < net->max_batch ? n : i0 + net->max_batch);
        size_t b = i1 - i0;
        const float *xb = x + i0 * net->d_in;
        CCR_TRY(net_check_input(net, xb, b));
        CCR_TRY(net_forward(net, xb, b, false, NULL));
        aux += ccr_net_aux_loss(net) * (double)b;
        double sum = 0.0;
        size_t c = 0;
        CCR_TRY(net_loss(net, labels + i0, b, false, &sum, &c));
        total += sum;
        correct += c;
    }
    size_t n_all = n;
    if (net->comm != NULL) {
        double *v = net->comm_buf;
        v[0] = total, v[1] = (double)correct, v[2] = aux, v[3] = (double)n;
        CCR_TRY(ccr_comm_allreduce_sum_f64(net->comm, v, 4));
        total = v[0], correct = (size_t)v[1], aux = v[2], n_all = (size_t)v[3];
    }
    stats->loss = total / (double)n_all;
    stats->aux_loss = aux / (double)n_all;   /* chunk-size-weighted mean */
    stats->correct = correct;
    stats->batch = n_all;
    return CCR_OK;
}

/* The structural options of a conditional layer's gate, in the order the
 * architecture string lists them (those the gate uses only). */
static int net_describe_gate(char *buf, size_t len, const ccr_gate *g)
{
    static const ccr_gate_option opts[] = {
        CCR_GATE_OPT_N_EXPERTS, CCR_GATE_OPT_K, CCR_GATE_OPT_N_GROUPS, CCR_GATE_OPT_K_GROUPS,
        CCR_GATE_OPT_K2, CCR_GATE_OPT_DEPTH, CCR_GATE_OPT_COMBINE, CCR_GATE_OPT_BITS_FROM,
    };
    const ccr_gate_type *t = ccr_gate_get_type(g);
    const ccr_gate_config *gc = ccr_gate_get_config(g);
    int w = 0;
    for (size_t i = 0; i < sizeof opts / sizeof opts[0] && w >= 0 && (size_t)w < len; i++) {
        if (!ccr_gate_type_uses(t, opts[i]))
            continue;
        const char *name = ccr_gate_option_name(opts[i]);
        switch (opts[i]) {
        case CCR_GATE_OPT_COMBINE:
            w += snprintf(buf + w, len - (size_t)w, ":%s=%s", name,
                          gc->combine == CCR_COMBINE_LEAF ? "leaf" : "path");
            break;
        case CCR_GATE_OPT_BITS_FROM:
            w += snprintf(buf + w, len - (size_t)w, ":%s=%s", name,
                          gc->bits_from == CCR_BITS_INPUT ? "input" : "projection");
            break;
        default: {
            size_t v = opts[i] == CCR_GATE_OPT_N_EXPERTS ? gc->n_experts
                       : opts[i] == CCR_GATE_OPT_K       ? gc->k
                       : opts[i] == CCR_GATE_OPT_N_GROUPS ? gc->n_groups
                       : opts[i] == CCR_GATE_OPT_K_GROUPS ? gc->k_groups
                       : opts[i] == CCR_GATE_OPT_K2      ? gc->k2
                                                          : gc->depth;
            w += snprintf(buf + w, len - (size_t)w, ":%s=%zu", name, v);
        }
        }
    }
    if (w >= 0 && (size_t)w < len)
        w += snprintf(buf + w, len - (size_t)w, ":matrices=%zu", ccr_gate_n_matrices(g));
    return w;
}

/* "784;linear:256;relu;linear:10": the architecture, stored in checkpoints
 * (format in docs/DESIGN.md).  A conditional layer is
 * "cond:GATE:D_OUT" followed by ":option=value" for each structural option
 * its gate uses and ":matrices=N", e.g.
 * "cond:hmoe:128:n_experts=8:n_groups=2:k_groups=2:k2=2:matrices=8". */
static void net_describe(const ccr_net *net, char *buf, size_t len)
{
    int w = snprintf(buf, len, "%zu", net->d_in);
    for (size_t i = 0; i < net->n && w >= 0 && (size_t)w < len; i++) {
        const ccr_layer *l = &net->layers[i];
        if (l->ops == &ccr_layer_act_ops) {
            w += snprintf(buf + w, len - (size_t)w, ";%s", ccr_act_name(l->act));
        } else if (l->cond != NULL) {
            const ccr_gate *g = ccr_cond_gate(l->cond);
            w += snprintf(buf + w, len - (size_t)w, ";cond:%s:%zu", ccr_gate_get_type(g)->name,
                          l->d_out);
            if (w >= 0 && (size_t)w < len)
                w += net_describe_gate(buf + w, len - (size_t)w, g);
        } else
            w += snprintf(buf + w, len - (size_t)w, ";%s:%zu", l->ops->kind, l->d_out);
    }
}

/* Under a communicator of P > 1 ranks: every conditional layer's bank
 * gathered to rank 0, which writes the file one process would - the same
 * tensors in the same order, the banks whole - and its status reaches every
 * rank. */
static ccr_status net_save_ranks(const ccr_net *net, const char *path, const char *const *meta,
                                 size_t n_meta)
{
    const ccr_arena *a = net->params;
    const size_t n_t = ccr_arena_count(a), r = (size_t)ccr_comm_rank(net->comm);
    ccr_bank_full *banks = calloc(net->n + 1, sizeof *banks);
    const size_t n_max = n_t + 4 * net->n + 1;  /* tensors and layers: small counts */
    ccr_st_tensor *t = calloc(n_max, sizeof *t);
    char (*names)[CCR_ARENA_MAX_NAME + 16] = calloc(n_max, sizeof *names);
    ccr_status s = banks && t && names ? CCR_OK
                                       : CCR_FAIL_EXPR(net->ctx, CCR_ENOMEM, "checkpoint tables");
    double ok = s == CCR_OK ? 0.0 : 1.0;  /* every rank gathers, or none */
    if (ccr_comm_allreduce_sum_f64(net->comm, &ok, 1) != CCR_OK || ok != 0.0)
        s = s != CCR_OK ? s : CCR_FAIL_EXPR(net->ctx, CCR_ECOMM, "a rank cannot save");
    for (size_t i = 0; s == CCR_OK && i < net->n; i++)
        if (net->layers[i].cond != NULL)
            s = ccr_condi_ep_gather_bank(net->layers[i].cond, &banks[i]);
    size_t n = 0;
    /* Rank 0: the arena's tensors in order, each bank whole just before its
     * gate's first tensor (where one process declared it), the rows held
     * here skipped. */
    for (size_t k = 0; s == CCR_OK && r == 0 && k <= n_t; k++) {
        for (size_t i = 0; i < net->n; i++) {
            const ccr_cond *c = net->layers[i].cond;
            if (c == NULL || c->gate_first != k)
                continue;
            for (size_t b = 0; b < banks[i].n; b++, n++) {
                snprintf(names[n], sizeof names[n], "param.%s", banks[i].name[b]);
                t[n] = (ccr_st_tensor){.name = names[n], .dtype = CCR_DTYPE_F32,
                                       .rank = banks[i].rank[b], .data = banks[i].data[b]};
                memcpy(t[n].shape, banks[i].shape[b], sizeof banks[i].shape[b]);
            }
        }
        if (k == n_t || ccr_arena_sparse_of(a, k) != NULL)
            continue;
        snprintf(names[n], sizeof names[n], "param.%s", ccr_arena_name(a, k));
        t[n] = (ccr_st_tensor){.name = names[n], .dtype = CCR_DTYPE_F32,
                               .rank = ccr_arena_rank(a, k), .data = ccr_arena_value(a, k)};
        memcpy(t[n].shape, ccr_arena_shape(a, k), ccr_arena_rank(a, k) * sizeof(size_t));
        n++;
    }
    if (s == CCR_OK && r == 0)
        s = ccr_safetensors_write(net->ctx, path, t, n, meta, n_meta);
    /* Rank 0's outcome on every rank. */
    double code = r == 0 ? (double)s : 0.0;
    ccr_status cs = ccr_comm_allreduce_sum_f64(net->comm, &code, 1);
    if (r != 0 && s == CCR_OK && (cs != CCR_OK || code != 0.0))
        s = cs != CCR_OK ? cs
                         : CCR_FAIL_EXPR(net->ctx, (ccr_status)(int)code, "rank 0 could not write %s",
                                         path);
    for (size_t i = 0; banks != NULL && i < net->n; i++)
        free(banks[i].data[0]);
    free(banks), free(t), free(names);
    return s;
}

ccr_status ccr_net_save(const ccr_net *net, const char *path)
{
    if (net == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(net->ctx, path);
    if (net->params == NULL)
        CCR_FAIL(net->ctx, CCR_EINVAL, "network not finalized");
    char arch[1024];
    net_describe(net, arch, sizeof arch);
    const char *meta[] = {"format", "ccr.net", "ccr_version", CCR_VERSION, "architecture", arch};
    if (net->comm != NULL && ccr_comm_size(net->comm) > 1)
        return net_save_ranks(net, path, meta, 3);
    return ccr_arena_save(net->params, path, 0, meta, 3);
}

/* Under a communicator of P > 1 ranks: this rank's part of a whole
 * network's file - every replicated tensor, each bank's rows held here -
 * the banks checked first, so that nothing is written from a bad file. */
static ccr_status net_load_ranks(ccr_net *net, const ccr_safetensors *f, const char *path)
{
    for (size_t i = 0; i < net->n; i++)
        if (net->layers[i].cond != NULL)
            CCR_TRY(ccr_condi_load_bank(net->layers[i].cond, f, path, false));
    CCR_TRY(ccr_arena_load_from(net->params, f, path, true));
    for (size_t i = 0; i < net->n; i++)
        if (net->layers[i].cond != NULL)
            CCR_TRY(ccr_condi_load_bank(net->layers[i].cond, f, path, true));
    return CCR_OK;
}

ccr_status ccr_net_load(ccr_net *net, const char *path)
{
    if (net == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(net->ctx, path);
    if (net->params == NULL)
        CCR_FAIL(net->ctx, CCR_EINVAL, "network not finalized");
    ccr_safetensors *f;
    CCR_TRY(ccr_safetensors_read(net->ctx, path, &f));
    char arch[1024];
    net_describe(net, arch, sizeof arch);
    const char *theirs = ccr_safetensors_meta(f, "architecture");
    ccr_status s = CCR_OK;
    if (theirs == NULL || strcmp(theirs, arch) != 0)
        s = CCR_FAIL_EXPR(net->ctx, CCR_EFORMAT, "%s: architecture '%s' differs from '%s'",
                          path, theirs ? theirs : "(none)", arch);
    if (s == CCR_OK && net->comm != NULL && ccr_comm_size(net->comm) > 1)
        s = net_load_ranks(net, f, path);
    else if (s == CCR_OK)
        s = ccr_arena_load_from(net->params, f, path, false);
    ccr_safetensors_free(f);
    return s;
}
