/*
 * fit.c - training and evaluation helpers shared by ccr-tree and ccr-hier.
 *
 * The drivers own their sweeps; this file owns the pieces each measurement
 * repeats: data preparation, one epoch of ccr_train_step over a seeded
 * permutation, an evaluation pass that counts forward FLOPs from the
 * routing tables actually executed, and the metric fields of a record.
 * Counted FLOPs per example = the analytic FLOPs of the dense layers (they
 * always run) + each conditional layer's stats.flops_counted (gate FLOPs +
 * filled slots x matrix FLOPs), averaged over chunks weighted by their size.
 */
#define _POSIX_C_SOURCE 200809L
#include "fit.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "internal.h"  // provides: ccr_mallocn, ccr_malloc3, ccr_mul_ok

ccr_status fit_load_fmnist(ccr_ctx *ctx, const char *dir, bool test, ccr_dataset **out)
{
    const char *img = test ? "t10k-images-idx3-ubyte" : "train-images-idx3-ubyte";
    const char *lab = test ? "t10k-labels-idx1-ubyte" : "train-labels-idx1-ubyte";
    char pi[1024], pl[1024];
    snprintf(pi, sizeof pi, "%s/%s.gz", dir, img);
    snprintf(pl, sizeof pl, "%s/%s.gz", dir, lab);
    if (access(pi, R_OK) != 0)
        snprintf(pi, sizeof pi, "%s/%s", dir, img);
    if (access(pl, R_OK) != 0)
        snprintf(pl, sizeof pl, "%s/%s", dir, lab);
    return ccr_dataset_load_idx(ctx, pi, pl, out);
}

ccr_status fit_pool(ccr_ctx *ctx, ccr_dataset **ds, size_t side, size_t pool)
{
    ccr_dataset *in = *ds, *o;
    if (pool <= 1)
        return CCR_OK;
    if (in->dim != side * side || side % pool != 0)
        return CCR_EINVAL;
    size_t s2 = side / pool;
    ccr_status s = ccr_dataset_alloc(ctx, in->n, s2 * s2, in->n_classes, &o); /* bounded: s2 * s2 <= dim */
    if (s != CCR_OK)
        return s;
    double inv = 1.0 / (double)(pool * pool);
    for (size_t e = 0; e < in->n; e++) {
        const float *x = in->x + e * in->dim;
        for (size_t r = 0; r < s2; r++)
            for (size_t c = 0; c < s2; c++) {
                double acc = 0.0;
                for (size_t i = 0; i < pool; i++)
                    for (size_t j = 0; j < pool; j++)
                        acc += x[(r * pool + i) * side + c * pool + j];
                o->x[e * o->dim + r * s2 + c] = (float)(acc * inv);
            }
        o->y[e] = in->y[e];
    }
    ccr_dataset_free(in);
    *ds = o;
    return CCR_OK;
}

void fit_standardize(ccr_dataset *train, ccr_dataset *test)
{
    size_t d = train->dim;
    double *mean = calloc(d, sizeof *mean);
    if (mean == NULL || train->n == 0) {
        free(mean);
        return;
    }
    for (size_t e = 0; e < train->n; e++)
        for (size_t j = 0; j < d; j++)
            mean[j] += train->x[e * d + j];
    for (size_t j = 0; j < d; j++)
        mean[j] /= (double)train->n;
    double var = 0.0;
    for (size_t e = 0; e < train->n; e++)
        for (size_t j = 0; j < d; j++) {
            double v = train->x[e * d + j] - mean[j];
            var += v * v;
        }
    double sd = sqrt(var / (double)(train->n * d));
    double inv = sd > 0 ? 1.0 / sd : 1.0;
    ccr_dataset *sets[2] = {train, test};
    for (int k = 0; k < 2; k++)
        for (size_t e = 0; e < sets[k]->n; e++)
            for (size_t j = 0; j < d; j++)
                sets[k]->x[e * d + j] = (float)((sets[k]->x[e * d + j] - mean[j]) * inv);
    free(mean);
}

ccr_status fit_buffers_alloc(fit_buffers *b, size_t n, size_t max_batch, size_t dim)
{
    b->perm = ccr_mallocn(n, sizeof *b->perm);
    b->x = ccr_malloc3(max_batch, dim, sizeof *b->x);
    b->y = ccr_mallocn(max_batch, sizeof *b->y);
    if (b->perm == NULL || b->x == NULL || b->y == NULL) {
        fit_buffers_free(b);
        return CCR_ENOMEM;
    }
    return CCR_OK;
}

void fit_buffers_free(fit_buffers *b)
{
    free(b->perm);
    free(b->x);
    free(b->y);
    b->perm = NULL;
    b->x = NULL;
    b->y = NULL;
}

long fit_first_cond(const ccr_net *net)
{
    for (size_t i = 0; i < ccr_net_n_layers(net); i++) {
        ccr_layer_info li;
        if (ccr_net_layer_info(net, i, &li) != CCR_OK)
            continue;
        if (strcmp(li.kind, "linear") != 0 && strcmp(li.kind, "relu") != 0 &&
            strcmp(li.kind, "tanh") != 0 && strcmp(li.kind, "sigmoid") != 0 &&
            strcmp(li.kind, "identity") != 0)
            return (long)i;
    }
    return -1;
}

/* Adds the last pass's diagnostics (first conditional layer) and the counted
 * FLOPs of every layer, for a batch of b examples. */
static void accumulate(const ccr_net *net, long first, size_t b, fit_gate_acc *a)
{
    double flops = 0.0, w = (double)b;
    for (size_t i = 0; i < ccr_net_n_layers(net); i++) {
        ccr_gate_stats gs;
        ccr_layer_info li;
        bool cond = first >= 0 && (long)i >= first && ccr_net_cond(net, i, NULL, &gs) == CCR_OK;
        if (cond) {
            flops += gs.flops_counted;
            if ((long)i == first) {
                a->aux += gs.aux_loss;
                a->cv_importance += gs.cv_importance;
                a->cv_load += gs.cv_load;
                a->cv_count += gs.cv_load_count;
                a->mm_load += gs.max_mean_load;
                a->mm_count += gs.max_mean_count;
                a->distinct += (double)gs.distinct;
                a->dropped += (double)gs.dropped;
            }
        } else if (ccr_net_layer_info(net, i, &li) == CCR_OK) {
            flops += li.flops_fwd;
        }
    }
    a->flops += flops * w;
    a->weight += w;
    a->batches += 1.0;
}

ccr_status fit_epoch(ccr_net *net, ccr_optim *opt, gsl_rng *rng, const ccr_dataset *ds,
                     size_t n, fit_buffers *buf, fit_progress *pr, fit_result *res)
{
    size_t mb = ccr_net_max_batch(net), steps = (n + mb - 1) / mb, correct = 0, seen = 0;
    long first = fit_first_cond(net);
    double t0 = drv_now(), loss = 0.0;
    memset(res, 0, sizeof *res);
    ccr_permutation(rng, buf->perm, ds->n);
    for (size_t step = 0; step < steps; step++) {
        size_t b = n - step * mb < mb ? n - step * mb : mb;
        ccr_dataset_gather(ds, buf->perm + step * mb, b, buf->x, buf->y);
        ccr_step_stats st;
        ccr_status s = ccr_train_step(net, opt, rng, buf->x, buf->y, b, &st);
        if (s != CCR_OK)
            return s;
        loss += st.loss * (double)b;
        correct += st.correct;
        seen += b;
        accumulate(net, first, b, &res->gate);
        if (pr != NULL) {
            pr->done++;
            if (pr->done % 25 == 0 || pr->done == pr->total) {
                char extra[64];
                snprintf(extra, sizeof extra, "loss %.4f acc %.4f", loss / (double)seen,
                         (double)correct / (double)seen);
                drv_progress(pr->label, pr->done, pr->total, pr->t_start, extra);
            }
        }
    }
    res->loss = loss / (double)seen;
    res->acc = (double)correct / (double)seen;
    res->seconds = drv_now() - t0;
    return CCR_OK;
}

ccr_status fit_eval(ccr_net *net, const ccr_dataset *ds, fit_result *res)
{
    size_t mb = ccr_net_max_batch(net), correct = 0;
    long first = fit_first_cond(net);
    double t0 = drv_now(), loss = 0.0;
    memset(res, 0, sizeof *res);
    for (size_t off = 0; off < ds->n; off += mb) {
        size_t b = ds->n - off < mb ? ds->n - off : mb;
        ccr_step_stats st;
        ccr_status s = ccr_net_eval(net, ds->x + off * ds->dim, ds->y + off, b, &st);
        if (s != CCR_OK)
            return s;
        loss += st.loss * (double)b;
        correct += st.correct;
        accumulate(net, first, b, &res->gate);
    }
    res->loss = loss / (double)ds->n;
    res->acc = (double)correct / (double)ds->n;
    res->seconds = drv_now() - t0;
    return CCR_OK;
}

float fit_cosine_lr(float lr, size_t epoch, size_t epochs)
{
    return (float)(0.5 * lr * (1.0 + cos(3.14159265358979323846 * (double)(epoch - 1) /
                                          (double)epochs)));
}

/* Forward FLOPs per example in training mode (gates with noise evaluate
 * their noise projection too). */
static double flops_fwd_train(const ccr_net *net)
{
    double f = 0.0;
    for (size_t i = 0; i < ccr_net_n_layers(net); i++) {
        ccr_cond *c;
        ccr_layer_info li;
        if (ccr_net_cond(net, i, &c, NULL) == CCR_OK)
            f += ccr_cond_flops(c, true);
        else if (ccr_net_layer_info(net, i, &li) == CCR_OK)
            f += li.flops_fwd;
    }
    return f;
}

static ccr_status add_gate(ccr_record *r, const char *pre, const fit_gate_acc *a)
{
    static const char *names[] = {"aux_loss", "cv_importance", "cv_load", "cv_load_count",
                                  "max_mean_load", "max_mean_count", "distinct"};
    double v[7] = {a->aux, a->cv_importance, a->cv_load, a->cv_count, a->mm_load,
                   a->mm_count, a->distinct};
    double n = a->batches > 0 ? a->batches : 1.0;
    ccr_status s = CCR_OK;
    char key[64];
    for (int i = 0; i < 7 && s == CCR_OK; i++) {
        snprintf(key, sizeof key, "%s%s", pre, names[i]);
        s = ccr_record_add_double(r, key, v[i] / n);
    }
    return s;
}

ccr_status fit_record_metrics(ccr_record *r, const ccr_net *net, const fit_result *train_last,
                              const fit_result *train_eval, const fit_result *test)
{
    ccr_flops fl = ccr_net_flops(net);
    bool cond = fit_first_cond(net) >= 0;
    ccr_status s = ccr_record_add_int(r, "params", (int64_t)ccr_net_n_params(net));
    if (s == CCR_OK) s = ccr_record_add_double(r, "flops_analytic", fl.fwd);
    if (s == CCR_OK) s = ccr_record_add_double(r, "flops_counted",
                                              test->gate.flops / test->gate.weight);
    if (s == CCR_OK) s = ccr_record_add_double(r, "flops_train_analytic", flops_fwd_train(net));
    if (s == CCR_OK) s = ccr_record_add_double(r, "flops_train_counted",
                                              train_last->gate.flops / train_last->gate.weight);
    if (s == CCR_OK) s = ccr_record_add_double(r, "flops_bwd_analytic", fl.bwd);
    if (s == CCR_OK) s = ccr_record_add_double(r, "train_loss", train_eval->loss);
    if (s == CCR_OK) s = ccr_record_add_double(r, "train_acc", train_eval->acc);
    if (s == CCR_OK) s = ccr_record_add_double(r, "train_running_loss", train_last->loss);
    if (s == CCR_OK) s = ccr_record_add_double(r, "train_running_acc", train_last->acc);
    if (s == CCR_OK) s = ccr_record_add_double(r, "test_loss", test->loss);
    if (s == CCR_OK) s = ccr_record_add_double(r, "test_acc", test->acc);
    if (s == CCR_OK) s = ccr_record_add_double(r, "gap_acc", train_eval->acc - test->acc);
    if (s == CCR_OK && cond) s = add_gate(r, "train_", &train_last->gate);
    if (s == CCR_OK && cond) s = add_gate(r, "test_", &test->gate);
    return s;
}
