/*
 * ccr-tree - the sign-bit tree study (ccr's reading of Cho & Bengio 2014).
 *
 * Does the tree (sum of the d+1 node matrices on the root-to-leaf path
 * picked by d sign bits) control the overfitting of the flat version (one
 * of 2^d leaf matrices)?  For each data set and each depth d the driver
 * trains, from the same seed, a single-layer classifier x -> logits whose
 * layer is one of:
 *   path          signtree, combine=path, linear node matrices d_in x classes
 *   leaf          signtree, combine=leaf (the flat 2^d version), at its OWN
 *                 FLOPs: bits + one matvec, about 1/(d+1) of the path's
 *   dense-flops   MLP d_in-h-classes (ReLU), h chosen so that its forward
 *                 FLOPs per example match the path's (nearest integer h)
 *   topk-flops    noisy top-k MoE (Shazeer) over E linear experts of the
 *                 node's size, k = 2 (k = 1 when the budget leaves E < 3),
 *                 E the largest that keeps gate + k experts within the
 *                 path's evaluation FLOPs
 *   dense-params  MLP d_in-h-classes with h chosen to match the path's
 *                 parameters (capped by --max-width; the record says so)
 * plus one plain linear layer (d = 0).  Data sets: Fashion-MNIST (average
 * pooled, standardised, a small training subset) and a synthetic task from
 * a random piecewise-linear teacher: x ~ U(-1,1)^D, R random hyperplanes
 * give 2^R regions, region g labels by argmax x (A0 + A_g) + b_g, all
 * drawn from the seed.  The sign bits come from a random projection (gate
 * weights N(0, 1/d_in)), trained straight-through (the library default,
 * --grad-mode ste) or frozen (--grad-mode none).  One JSONL
 * record per trained model: final train and test loss/accuracy (evaluation
 * mode, whole sets), params, FLOPs analytic and counted, seconds.
 *
 * --readings LIST compares how the sign bits are obtained instead (issue 9;
 * docs/GATES.md "signtree", readings): for each depth, each tree model of
 * --models (path, leaf) is trained once per reading,
 *   frozen       bits from the gate's random projection, no gradient
 *   ste          the same projection trained straight-through
 *   hidden       a trained linear layer d_in -> H below the tree, bits from
 *                its first d units (bits_from = input, Cho & Bengio's
 *                "bits of hidden-unit activations"); the units learn through
 *                the tree's dx only (grad_mode none)
 *   hidden-ste   the same with the bits' straight-through gradient
 *   hidden-proj  the control: the same linear layer, bits from the gate's
 *                frozen projection of it
 * H = max(d_in, d); the record has "reading" and "bits_width" (H or 0).
 */
#define _POSIX_C_SOURCE 200809L
#include <gsl/gsl_randist.h>
#include <gsl/gsl_rng.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "internal.h"  // provides: ccr_mallocn, ccr_malloc3, ccr_mul_ok
#include "outputs.h"
#include "fit.h"

#define PROG "ccr-tree"
#define MAX_DEPTHS 32
#define MAX_DEPTH 16

enum { M_LINEAR, M_PATH, M_LEAF, M_DENSE_FLOPS, M_TOPK_FLOPS, M_DENSE_PARAMS, M_COUNT };
static const char *model_names[M_COUNT] = {"linear", "path", "leaf", "dense-flops",
                                           "topk-flops", "dense-params"};

/* How the sign bits are obtained (--readings); R_NONE: the plain study. */
enum { R_FROZEN, R_STE, R_HIDDEN, R_HIDDEN_STE, R_HIDDEN_PROJ, R_COUNT, R_NONE = R_COUNT };
static const char *reading_names[R_COUNT] = {"frozen", "ste", "hidden", "hidden-ste",
                                             "hidden-proj"};

typedef struct options {
    const char *data, *out;
    bool fmnist, synthetic;
    size_t depths[MAX_DEPTHS], n_depths;
    bool models[M_COUNT];
    size_t n_train, pool;                 /* Fashion-MNIST */
    size_t syn_dim, syn_classes, syn_bits, syn_train, syn_test;
    double syn_local;
    size_t epochs, batch, max_width;
    double lr;
    ccr_grad_mode grad_mode;
    bool readings[R_COUNT], any_reading, grad_mode_set;
    unsigned long seed;
} options;

static void usage(void)
{
    printf(
        "usage: ccr-tree [options]\n"
        "Sign-bit tree (ccr's reading of Cho & Bengio 2014) vs flat leaves, dense and\n"
        "top-k MoE at equal FLOPs, and a dense layer at equal parameters; train and\n"
        "test loss/accuracy vs depth.  One JSONL record per trained model.\n\n"
        "  --datasets LIST    fmnist,synthetic (either or both) [fmnist,synthetic]\n"
        "  --depths LIST      tree depths d, each 1..%d [1,2,3,4,5,6,7,8,9,10,11,12]\n"
        "  --models LIST      linear,path,leaf,dense-flops,topk-flops,dense-params [all]\n"
        "  --data DIR         Fashion-MNIST IDX files [/usr/share/datasets/fashion-mnist]\n"
        "  --n-train N        Fashion-MNIST training examples (subset) [10000]\n"
        "  --pool P           Fashion-MNIST P x P average pooling (1,2,4,7,14) [4]\n"
        "  --syn-dim D        synthetic input dimension [4]\n"
        "  --syn-classes C    synthetic classes [4]\n"
        "  --syn-bits R       teacher hyperplanes (up to 2^R regions) [6]\n"
        "  --syn-local X      scale of the per-region maps vs the shared one [1]\n"
        "  --syn-train N      synthetic training examples [4000]\n"
        "  --syn-test N       synthetic test examples [20000]\n"
        "  --epochs N         epochs per model [10]\n"
        "  --batch N          mini-batch size [128]\n"
        "  --lr X             Adam learning rate, cosine-annealed per epoch [3e-3]\n"
        "  --grad-mode NAME   sign bits: none | ste (straight-through) [ste]\n"
        "  --readings LIST    compare how the bits are obtained instead: tree models of\n"
        "                     --models (path, leaf) once per reading of frozen, ste,\n"
        "                     hidden, hidden-ste, hidden-proj (docs/GATES.md) [off]\n"
        "  --max-width N      cap on the dense-params hidden width [16384]\n"
        "  --seed N           GSL seed: teacher, split, init, shuffles [1]\n"
        "  --out FILE         JSONL results file [none]\n"
        "  --quick            smoke run: depths 1,3, 1 epoch, small sets\n"
        "  --help             this text\n", MAX_DEPTH);
}

static void parse_models(const char *v, bool *m)
{
    drv_span item[M_COUNT];
    size_t n = drv_parse_list(PROG, "--models", v, item, M_COUNT);
    memset(m, 0, M_COUNT * sizeof *m);
    for (size_t j = 0; j < n; j++) {
        int k = 0;
        while (k < M_COUNT && !drv_span_is(item[j], model_names[k]))
            k++;
        if (k == M_COUNT)
            drv_usage_error(PROG, "--models: unknown model '%.*s'", (int)item[j].len, item[j].p);
        m[k] = true;
    }
}

static void parse_readings(const char *v, options *o)
{
    if (v == NULL || *v == '\0')
        drv_usage_error(PROG, "--readings needs a list");
    memset(o->readings, 0, sizeof o->readings);
    char buf[256];
    snprintf(buf, sizeof buf, "%s", v);
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        int k = 0;
        while (k < R_COUNT && strcmp(t, reading_names[k]) != 0)
            k++;
        if (k == R_COUNT)
            drv_usage_error(PROG, "--readings: unknown reading '%s'", t);
        o->readings[k] = true;
    }
    o->any_reading = true;
}

static void parse(int argc, char **argv, options *o)
{
    *o = (options){.data = "/usr/share/datasets/fashion-mnist", .fmnist = true,
                   .synthetic = true, .n_depths = 12, .n_train = 10000, .pool = 4,
                   .syn_dim = 4, .syn_classes = 4, .syn_bits = 6, .syn_train = 4000,
                   .syn_test = 20000, .syn_local = 1.0, .epochs = 10, .batch = 128,
                   .max_width = 16384, .lr = 3e-3, .seed = 1,
                   .grad_mode = ccr_gate_config_default().grad_mode};
    for (size_t i = 0; i < 12; i++)
        o->depths[i] = i + 1;
    for (int k = 0; k < M_COUNT; k++)
        o->models[k] = true;
    if (drv_quick_requested(argc, argv)) {   /* smaller defaults; explicit options still win */
        o->n_depths = 2, o->depths[0] = 1, o->depths[1] = 3;
        o->n_train = 1000, o->syn_train = 500, o->syn_test = 2000;
        o->max_width = 1024, o->epochs = 1;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (drv_parse_common(PROG, a, usage))
            continue;   /* --quick: applied before the loop */
        i++;
        if (strcmp(a, "--data") == 0 && v) o->data = v;
        else if (strcmp(a, "--out") == 0 && v) o->out = v;
        else if (strcmp(a, "--datasets") == 0) {
            if (v == NULL) drv_usage_error(PROG, "--datasets needs a list");
            if (strcmp(v, "fmnist") == 0) o->fmnist = true, o->synthetic = false;
            else if (strcmp(v, "synthetic") == 0) o->fmnist = false, o->synthetic = true;
            else if (strcmp(v, "fmnist,synthetic") == 0 || strcmp(v, "synthetic,fmnist") == 0)
                o->fmnist = o->synthetic = true;
            else drv_usage_error(PROG, "--datasets must be fmnist, synthetic or both");
        } else if (strcmp(a, "--depths") == 0)
            o->n_depths = drv_parse_size_list(PROG, a, v, o->depths, MAX_DEPTHS);
        else if (strcmp(a, "--models") == 0) parse_models(v, o->models);
        else if (strcmp(a, "--readings") == 0) parse_readings(v, o);
        else if (strcmp(a, "--n-train") == 0) o->n_train = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--pool") == 0) o->pool = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--syn-dim") == 0) o->syn_dim = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--syn-classes") == 0) o->syn_classes = drv_parse_size(PROG, a, v, 2);
        else if (strcmp(a, "--syn-bits") == 0) o->syn_bits = drv_parse_size(PROG, a, v, 0);
        else if (strcmp(a, "--syn-local") == 0) o->syn_local = drv_parse_double(PROG, a, v, 0, 1e3);
        else if (strcmp(a, "--syn-train") == 0) o->syn_train = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--syn-test") == 0) o->syn_test = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--epochs") == 0) o->epochs = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--batch") == 0) o->batch = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--max-width") == 0) o->max_width = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--lr") == 0) o->lr = drv_parse_double(PROG, a, v, 1e-9, 10);
        else if (strcmp(a, "--seed") == 0) o->seed = drv_parse_seed(PROG, a, v);
        else if (strcmp(a, "--grad-mode") == 0) {
            o->grad_mode_set = true;
            if (v && strcmp(v, "none") == 0) o->grad_mode = CCR_GRAD_NONE;
            else if (v && strcmp(v, "ste") == 0) o->grad_mode = CCR_GRAD_STE;
            else drv_usage_error(PROG, "--grad-mode must be none or ste");
        } else drv_bad_option(PROG, a, v);
    }
    for (size_t i = 0; i < o->n_depths; i++)
        if (o->depths[i] > MAX_DEPTH)
            drv_usage_error(PROG, "--depths: %zu is above %d", o->depths[i], MAX_DEPTH);
    if (28 % o->pool != 0)
        drv_usage_error(PROG, "--pool must divide 28 (1, 2, 4, 7, 14, 28), got %zu", o->pool);
    if (o->syn_bits > 24)
        drv_usage_error(PROG, "--syn-bits must be <= 24, got %zu", o->syn_bits);
    if (o->any_reading && o->grad_mode_set)
        drv_usage_error(PROG, "--grad-mode is set by each reading; drop it with --readings");
    if (o->any_reading && !o->models[M_PATH] && !o->models[M_LEAF])
        drv_usage_error(PROG, "--readings compares tree models: --models needs path or leaf");
}

/* The synthetic task: x ~ U(-1,1)^D; R hyperplanes (unit normals, offsets
 * U(-0.3,0.3)) give the region g; label = argmax_c x (A0 + s A_g) + b_g with
 * A0, A_g, b_g ~ N(0,1) entries, s = --syn-local. */
static ccr_status make_teacher_data(ccr_ctx *ctx, const options *o, gsl_rng *r,
                                    ccr_dataset **train, ccr_dataset **test)
{
    size_t D = o->syn_dim, C = o->syn_classes, R = o->syn_bits, G = (size_t)1 << R;
    double *u = ccr_malloc3(R ? R : 1, D, sizeof *u), *off = ccr_mallocn(R ? R : 1, sizeof *off);
    double *A0 = ccr_malloc3(D, C, sizeof *A0), *logit = ccr_mallocn(C, sizeof *logit);
    double *bias = ccr_malloc3(G, C, sizeof *bias), *A = NULL;
    size_t gd;
    if (ccr_mul_ok(G, D, &gd))
        A = ccr_malloc3(gd, C, sizeof *A);
    ccr_status s = CCR_ENOMEM;
    if (!u || !off || !A0 || !A || !bias || !logit)
        goto done;
    for (size_t j = 0; j < R; j++) {
        double nrm = 0.0;
        for (size_t i = 0; i < D; i++) {
            u[j * D + i] = gsl_ran_gaussian(r, 1.0);
            nrm += u[j * D + i] * u[j * D + i];
        }
        for (size_t i = 0; i < D; i++)
            u[j * D + i] /= sqrt(nrm);
        off[j] = gsl_ran_flat(r, -0.3, 0.3);
    }
    for (size_t i = 0; i < D * C; i++)
        A0[i] = gsl_ran_gaussian(r, 1.0);
    for (size_t i = 0; i < G * D * C; i++)
        A[i] = o->syn_local * gsl_ran_gaussian(r, 1.0);
    for (size_t i = 0; i < G * C; i++)
        bias[i] = gsl_ran_gaussian(r, 1.0);
    s = ccr_dataset_alloc(ctx, o->syn_train, D, C, train);
    if (s == CCR_OK && (s = ccr_dataset_alloc(ctx, o->syn_test, D, C, test)) != CCR_OK)
        ccr_dataset_free(*train);
    if (s != CCR_OK)
        goto done;
    ccr_dataset *sets[2] = {*train, *test};
    for (int k = 0; k < 2; k++)
        for (size_t e = 0; e < sets[k]->n; e++) {
            float *x = sets[k]->x + e * D;
            for (size_t i = 0; i < D; i++)
                x[i] = (float)gsl_ran_flat(r, -1.0, 1.0);
            size_t g = 0;
            for (size_t j = 0; j < R; j++) {
                double a = off[j];
                for (size_t i = 0; i < D; i++)
                    a += u[j * D + i] * x[i];
                g = 2 * g + (a > 0);
            }
            size_t best = 0;
            for (size_t c = 0; c < C; c++) {
                logit[c] = bias[g * C + c];
                for (size_t i = 0; i < D; i++)
                    logit[c] += x[i] * (A0[i * C + c] + A[(g * D + i) * C + c]);
                if (logit[c] > logit[best])
                    best = c;
            }
            sets[k]->y[e] = (int32_t)best;
        }
    (*train)->n_classes = (*test)->n_classes = C;
done:
    free(u), free(off), free(A0), free(A), free(bias), free(logit);
    return s;
}

/* One model to train: kind, depth and the sizes derived from the budget. */
typedef struct spec {
    int kind, reading;    /* reading: R_NONE outside --readings */
    size_t depth, hidden, experts, k;
    size_t bits_width;    /* hidden readings: the linear layer below the tree */
    bool capped;
    double flops_target, params_target;
    ccr_cond_config cc;   /* cc.gate NULL for dense models */
} spec;

/* Analytic budget of the path tree of depth d on D -> C (ccr_cond_flops in
 * evaluation mode; ccr_cond_n_params): bits 2 D d, node 2 D C + C, combine
 * 2 C per node; parameters (2^(d+1) - 1)(D C + C) + D d + d. */
static double path_flops(size_t D, size_t C, size_t d)
{
    return 2.0 * (double)(D * d) + (double)(d + 1) * (double)(2 * D * C + 3 * C);
}
static double path_params(size_t D, size_t C, size_t d)
{
    return (double)(((size_t)2 << d) - 1) * (double)(D * C + C) + (double)(D * d + d);
}

static spec make_spec(int kind, size_t d, size_t D, size_t C, const options *o)
{
    spec p = {.kind = kind, .reading = R_NONE, .depth = d, .cc = ccr_cond_config_default()};
    p.flops_target = path_flops(D, C, d);
    p.params_target = path_params(D, C, d);
    p.cc.d_out = C;
    p.cc.bank = CCR_BANK_LINEAR;
    if (kind == M_PATH || kind == M_LEAF) {
        p.cc.gate = &ccr_gate_signtree;
        p.cc.gate_cfg.depth = d;
        p.cc.gate_cfg.combine = kind == M_PATH ? CCR_COMBINE_PATH : CCR_COMBINE_LEAF;
        p.cc.gate_cfg.grad_mode = o->grad_mode;
        p.cc.gate_cfg.randomize = true;   /* random hyperplanes for the bits */
    } else if (kind == M_DENSE_FLOPS || kind == M_DENSE_PARAMS) {
        /* MLP: forward 2 D h + h + 2 h C + C, params D h + h + h C + C. */
        double per = kind == M_DENSE_FLOPS ? (double)(2 * D + 1 + 2 * C) : (double)(D + 1 + C);
        double target = kind == M_DENSE_FLOPS ? p.flops_target : p.params_target;
        double h = floor((target - (double)C) / per + 0.5);
        p.hidden = h < 1 ? 1 : (size_t)h;
        if (kind == M_DENSE_PARAMS && p.hidden > o->max_width) {
            p.hidden = o->max_width;
            p.capped = true;
        }
    } else if (kind == M_TOPK_FLOPS) {
        /* Gate 2 D E (evaluation) + k (2 D C + 3 C) <= path FLOPs. */
        double m = (double)(2 * D * C + 3 * C);
        size_t k = 2;
        double e = floor((p.flops_target - (double)k * m) / (double)(2 * D));
        if (e < 3) {
            k = 1;
            e = floor((p.flops_target - m) / (double)(2 * D));
        }
        p.k = k;
        p.experts = e < 2 ? 2 : (size_t)e;
        p.cc.gate = &ccr_gate_topk;
        p.cc.gate_cfg.n_experts = p.experts;
        p.cc.gate_cfg.k = k;
    }
    return p;
}

/* A tree model under reading r (--readings). */
static spec make_reading_spec(int kind, int r, size_t d, size_t D, size_t C, const options *o)
{
    spec p = make_spec(kind, d, D, C, o);
    p.reading = r;
    ccr_gate_config *g = &p.cc.gate_cfg;
    g->grad_mode = r == R_STE || r == R_HIDDEN_STE ? CCR_GRAD_STE : CCR_GRAD_NONE;
    g->bits_from = r == R_HIDDEN || r == R_HIDDEN_STE ? CCR_BITS_INPUT : CCR_BITS_PROJECTION;
    if (r == R_HIDDEN || r == R_HIDDEN_STE || r == R_HIDDEN_PROJ)
        p.bits_width = D > d ? D : d;
    return p;
}

static ccr_status build(ccr_backend *be, const spec *p, size_t D, size_t C, size_t batch,
                        gsl_rng *rng, ccr_net **out)
{
    ccr_net *net;
    ccr_status s = ccr_net_init(be, D, batch, &net);
    if (s != CCR_OK)
        return s;
    if (p->bits_width > 0 &&   /* the trained layer whose units give the bits */
        (s = ccr_net_add_linear(net, p->bits_width)) != CCR_OK) {
        ccr_net_free(net);
        return s;
    }
    if (p->cc.gate != NULL) {
        s = ccr_net_add_cond(net, &p->cc);
    } else if (p->kind == M_LINEAR) {
        s = ccr_net_add_linear(net, C);
    } else {
        s = ccr_net_add_linear(net, p->hidden);
        if (s == CCR_OK) s = ccr_net_add_act(net, CCR_ACT_RELU);
        if (s == CCR_OK) s = ccr_net_add_linear(net, C);
    }
    if (s == CCR_OK) s = ccr_net_finalize(net, rng);
    if (s != CCR_OK) {
        ccr_net_free(net);
        return s;
    }
    *out = net;
    return CCR_OK;
}

typedef struct sweep {
    ccr_ctx *ctx;
    ccr_backend *be;
    ccr_jsonl *out;
    ccr_record *rec;
    const options *o;
    size_t run, n_runs;
} sweep;

/* Trains one model from a fresh RNG seeded with --seed and writes its record. */
static void run_one(sweep *w, const char *dsname, const ccr_dataset *train,
                    const ccr_dataset *test, const spec *p)
{
    const options *o = w->o;
    size_t D = train->dim, C = train->n_classes;
    gsl_rng *rng = drv_rng(PROG, w->ctx, o->seed);
    ccr_net *net;
    ccr_optim *opt;
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    oc.lr = (float)o->lr;
    ccr_status s = build(w->be, p, D, C, o->batch, rng, &net);
    if (s != CCR_OK)
        drv_fail(PROG, w->ctx, s, "network");
    if ((s = ccr_optim_init(ccr_net_params(net), &oc, &opt)) != CCR_OK)
        drv_fail(PROG, w->ctx, s, "optimiser");
    fit_buffers buf;
    if ((s = fit_buffers_alloc(&buf, train->n, o->batch, D)) != CCR_OK)
        drv_fail(PROG, w->ctx, s, "buffers");
    char label[96];
    const char *rname = p->reading == R_NONE ? "" : reading_names[p->reading];
    snprintf(label, sizeof label, "[%zu/%zu] %s %s%s%s d=%zu step", ++w->run, w->n_runs, dsname,
             model_names[p->kind], *rname ? " " : "", rname, p->depth);
    size_t steps = (train->n + o->batch - 1) / o->batch;
    fit_progress pr = {label, 0, steps * o->epochs, drv_now()};
    fit_result last, tr, te;
    double t0 = drv_now();
    for (size_t e = 1; e <= o->epochs; e++) {
        if ((s = ccr_optim_set_lr(opt, fit_cosine_lr(oc.lr, e, o->epochs))) != CCR_OK ||
            (s = fit_epoch(net, opt, rng, train, train->n, &buf, &pr, &last)) != CCR_OK)
            drv_fail(PROG, w->ctx, s, "train");
    }
    double train_s = drv_now() - t0;
    if ((s = fit_eval(net, train, &tr)) != CCR_OK || (s = fit_eval(net, test, &te)) != CCR_OK)
        drv_fail(PROG, w->ctx, s, "evaluation");
    drv_progress_end();
    fprintf(stderr, "%s %-12s %s d=%-2zu params %9zu flops %8.0f | train loss %.4f acc %.4f | "
            "test loss %.4f acc %.4f | %.1fs\n", dsname, model_names[p->kind], rname, p->depth,
            ccr_net_n_params(net), ccr_net_flops(net).fwd, tr.loss, tr.acc, te.loss, te.acc,
            train_s);
    ccr_record *r = w->rec;
    ccr_record_clear(r);
    s = drv_record_base(r, PROG, w->be, o->seed);
    if (s == CCR_OK) s = drv_record_gate(r, &p->cc);   /* first: it writes a "depth" too */
    if (s == CCR_OK) s = ccr_record_add_str(r, "dataset", dsname);
    if (s == CCR_OK) s = ccr_record_add_str(r, "model", model_names[p->kind]);
    if (s == CCR_OK && p->reading != R_NONE) {
        s = ccr_record_add_str(r, "reading", reading_names[p->reading]);
        if (s == CCR_OK) s = ccr_record_add_int(r, "bits_width", (int64_t)p->bits_width);
    }
    if (s == CCR_OK) s = ccr_record_add_int(r, "depth", (int64_t)p->depth);
    if (s == CCR_OK) s = ccr_record_add_str(r, "matched",
        p->kind == M_DENSE_PARAMS ? "params" : p->kind == M_DENSE_FLOPS ||
        p->kind == M_TOPK_FLOPS ? "flops" : "own");
    if (s == CCR_OK) s = ccr_record_add_int(r, "hidden", (int64_t)p->hidden);
    if (s == CCR_OK) s = ccr_record_add_bool(r, "width_capped", p->capped);
    if (s == CCR_OK) s = ccr_record_add_double(r, "flops_target", p->flops_target);
    if (s == CCR_OK) s = ccr_record_add_double(r, "params_target", p->params_target);
    if (s == CCR_OK) s = ccr_record_add_int(r, "d_in", (int64_t)D);
    if (s == CCR_OK) s = ccr_record_add_int(r, "classes", (int64_t)C);
    if (s == CCR_OK && strcmp(dsname, "synthetic") == 0) {
        s = ccr_record_add_int(r, "syn_bits", (int64_t)o->syn_bits);
        if (s == CCR_OK) s = ccr_record_add_double(r, "syn_local", o->syn_local);
    }
    if (s == CCR_OK && strcmp(dsname, "fashion-mnist") == 0)
        s = ccr_record_add_int(r, "pool", (int64_t)o->pool);
    if (s == CCR_OK) s = ccr_record_add_int(r, "n_train", (int64_t)train->n);
    if (s == CCR_OK) s = ccr_record_add_int(r, "n_test", (int64_t)test->n);
    if (s == CCR_OK) s = ccr_record_add_int(r, "epochs", (int64_t)o->epochs);
    if (s == CCR_OK) s = ccr_record_add_int(r, "batch", (int64_t)o->batch);
    if (s == CCR_OK) s = ccr_record_add_str(r, "optim", "adam");
    if (s == CCR_OK) s = ccr_record_add_double(r, "lr", o->lr);
    if (s == CCR_OK) s = ccr_record_add_str(r, "schedule", "cosine");
    if (s == CCR_OK) s = fit_record_metrics(r, net, &last, &tr, &te);
    if (s == CCR_OK) s = ccr_record_add_double(r, "epoch_seconds", train_s / (double)o->epochs);
    if (s == CCR_OK) s = ccr_record_add_double(r, "seconds", train_s);
    drv_write_record(PROG, w->ctx, s, w->out, r);
    fit_buffers_free(&buf);
    ccr_optim_free(opt);
    ccr_net_free(net);
    gsl_rng_free(rng);
}

static void run_dataset(sweep *w, const char *dsname, const ccr_dataset *train,
                        const ccr_dataset *test)
{
    const options *o = w->o;
    size_t D = train->dim, C = train->n_classes;
    if (o->any_reading) {
        for (size_t i = 0; i < o->n_depths; i++)
            for (int k = M_PATH; k <= M_LEAF; k++)
                for (int r = 0; r < R_COUNT; r++)
                    if (o->models[k] && o->readings[r]) {
                        spec p = make_reading_spec(k, r, o->depths[i], D, C, o);
                        run_one(w, dsname, train, test, &p);
                    }
        return;
    }
    if (o->models[M_LINEAR]) {
        spec p = make_spec(M_LINEAR, 0, D, C, o);
        run_one(w, dsname, train, test, &p);
    }
    for (size_t i = 0; i < o->n_depths; i++)
        for (int k = M_PATH; k < M_COUNT; k++)
            if (o->models[k]) {
                spec p = make_spec(k, o->depths[i], D, C, o);
                run_one(w, dsname, train, test, &p);
            }
}

int main(int argc, char **argv)
{
    options o;
    parse(argc, argv, &o);
    if (o.fmnist)
        drv_io_input_fmnist("--data", o.data);
    drv_io_output("--out", o.out);
    drv_io_check(PROG);
    ccr_ctx *ctx;
    ccr_backend *be;
    gsl_rng *drng;
    drv_one_process(PROG);
    drv_setup(PROG, false, o.seed, &ctx, &be, &drng);
    ccr_status s;

    /* Data first (a missing file is a usage error, before any output). */
    ccr_dataset *ftrain = NULL, *ftest = NULL, *strain = NULL, *stest = NULL;
    if (o.fmnist) {
        ccr_dataset *full, *rest;
        if ((s = fit_load_fmnist(ctx, o.data, false, &full)) != CCR_OK ||
            (s = fit_load_fmnist(ctx, o.data, true, &ftest)) != CCR_OK)
            drv_input_error(PROG, ctx, s, "cannot load Fashion-MNIST from %s", o.data);
        if (o.n_train > full->n)
            drv_usage_error(PROG, "--n-train %zu is above the %zu training examples", o.n_train,
                            full->n);
        if (full->dim != 28 * 28)
            drv_usage_error(PROG, "%s: images are not 28x28", o.data);
        if ((s = ccr_dataset_split(ctx, full, drng, o.n_train, &rest, &ftrain)) != CCR_OK ||
            (s = fit_pool(ctx, &ftrain, 28, o.pool)) != CCR_OK ||
            (s = fit_pool(ctx, &ftest, 28, o.pool)) != CCR_OK)
            drv_fail(PROG, ctx, s, "prepare Fashion-MNIST");
        ccr_dataset_free(full);
        ccr_dataset_free(rest);
        fit_standardize(ftrain, ftest);
        size_t c = ftrain->n_classes > ftest->n_classes ? ftrain->n_classes : ftest->n_classes;
        ftrain->n_classes = ftest->n_classes = c;
    }
    if (o.synthetic && (s = make_teacher_data(ctx, &o, drng, &strain, &stest)) != CCR_OK)
        drv_fail(PROG, ctx, s, "synthetic data");

    sweep w = {.ctx = ctx, .be = be, .o = &o};
    size_t per = (size_t)o.models[M_LINEAR], n_models = 0;
    for (int k = M_PATH; k < M_COUNT; k++)
        n_models += o.models[k];
    per += n_models * o.n_depths;
    if (o.any_reading) {
        size_t n_read = 0;
        for (int r = 0; r < R_COUNT; r++)
            n_read += o.readings[r];
        per = ((size_t)o.models[M_PATH] + (size_t)o.models[M_LEAF]) * n_read * o.n_depths;
    }
    w.n_runs = per * ((size_t)o.fmnist + (size_t)o.synthetic);
    if (w.n_runs == 0)
        drv_usage_error(PROG, "nothing to run");
    drv_open_out(PROG, ctx, o.out, &w.rec, &w.out);
    fprintf(stderr, "%s: %zu models; %s; %s (core %s, %d threads)\n", PROG, w.n_runs,
            ccr_backend_describe(be), drv_machine(), ccr_blas_corename(),
            ccr_blas_num_threads());
    if (o.fmnist)
        run_dataset(&w, "fashion-mnist", ftrain, ftest);
    if (o.synthetic)
        run_dataset(&w, "synthetic", strain, stest);
    ccr_dataset_free(ftrain);
    ccr_dataset_free(ftest);
    ccr_dataset_free(strain);
    ccr_dataset_free(stest);
    drv_teardown(PROG, ctx, be, drng, w.out, w.rec);
    return 0;
}
