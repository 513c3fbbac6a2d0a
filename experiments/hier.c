/*
 * ccr-hier - flat vs hierarchical mixture of experts (Shazeer et al. 2017,
 * eqs. 3-11 vs 12-14) at equal experts and equal experts per example.
 *
 * For each number of experts E the driver trains, from the same seed, the
 * same network 784 -> [conditional layer: E FFN experts d_in-h_e-H] -> ReLU
 * -> linear 10 on Fashion-MNIST twice: once with the flat noisy top-k gate
 * (k_flat = k_groups * k2 experts per example) and once with the hierarchical gate
 * (a groups of E/a experts; k_groups groups, then k2 experts in each).  Both use
 * the same experts per example and the same expert size, so the bank FLOPs
 * are equal; the gate FLOPs differ (flat 2 d_in E, hierarchical
 * 2 d_in a + k 2 d_in E/a in evaluation; twice that in training, where the
 * noise projections run too).  One JSONL record per epoch: test loss and
 * accuracy, the balance diagnostics (CV of Importance, CV of the smooth Load
 * and of the true counts, max/mean of both; means over the epoch's training
 * batches, and over the test chunks where loads are counts), FLOPs per
 * example analytic and counted from the executed routing tables, seconds.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "outputs.h"
#include "fit.h"

#define PROG "ccr-hier"
#define MAX_E 16

typedef struct options {
    const char *data, *out;
    size_t experts[MAX_E], n_experts, groups;   /* groups 0: auto */
    size_t k, k2, hidden, epochs, batch, max_train;
    double lr;
    ccr_cond_config cc;                         /* gate options shared by both */
    unsigned long seed;
} options;

static void usage(void)
{
    printf(
        "usage: ccr-hier [options]\n"
        "Flat noisy top-k MoE vs hierarchical MoE (Shazeer et al. 2017) at equal E and\n"
        "equal experts per example (flat k = k-groups * k2) on Fashion-MNIST: quality, load\n"
        "balance, FLOPs and time.  One JSONL record per epoch and gate.\n\n"
        "  --data DIR          Fashion-MNIST IDX files [/usr/share/datasets/fashion-mnist]\n"
        "  --experts LIST      numbers of experts E, comma-separated [16,64]\n"
        "  --groups N          hmoe groups a, must divide every E [auto: the largest\n"
        "                      divisor of E not above sqrt(E)]\n"
        "  --k-groups N        hmoe groups per example [2]\n"
        "  --k2 N              hmoe experts per selected group [2]; flat k = k-groups * k2\n"
        "  --expert-hidden N   hidden width of each FFN expert [64]\n"
        "  --hidden N          output width H of the conditional layer [128]\n"
        "  --w-importance X    importance loss weight (both gates) [0.1]\n"
        "  --w-load X          load loss weight (both gates) [0.1]\n"
        "  --noise-eps X       noise epsilon [0.01]\n"
        "  --z-loss X          router z-loss, 0 = off [0]\n"
        "  --epochs N          epochs [5]\n"
        "  --batch N           mini-batch size [128]\n"
        "  --max-train N       training examples, 0 = all 60000 [0]\n"
        "  --lr X              Adam learning rate, cosine-annealed per epoch [1e-3]\n"
        "  --seed N            GSL seed: init, shuffles, gate noise [1]\n"
        "  --out FILE          JSONL results file [none]\n"
        "  --quick             smoke run: E = 8, 1 epoch, 2000 examples\n"
        "  --help              this text\n");
}

static void parse(int argc, char **argv, options *o)
{
    *o = (options){.data = "/usr/share/datasets/fashion-mnist", .experts = {16, 64},
                   .n_experts = 2, .k = 2, .k2 = 2, .hidden = 128, .epochs = 5,
                   .batch = 128, .lr = 1e-3, .seed = 1};
    o->cc = ccr_cond_config_default();
    o->cc.hidden = 64;
    bool used;
    if (drv_quick_requested(argc, argv))   /* smaller defaults; explicit options still win */
        o->n_experts = 1, o->experts[0] = 8, o->epochs = 1, o->max_train = 2000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (drv_parse_common(PROG, a, usage)) {
            continue;   /* --quick: applied before the loop */
        } else if (strcmp(a, "--w-importance") == 0 || strcmp(a, "--w-load") == 0 ||
                   strcmp(a, "--noise-eps") == 0 || strcmp(a, "--z-loss") == 0 ||
                   strcmp(a, "--expert-hidden") == 0) {
            drv_parse_gate_option(PROG, a, v, &o->cc, &used);
            i += used;
            continue;
        }
        i++;
        if (strcmp(a, "--data") == 0 && v) o->data = v;
        else if (strcmp(a, "--out") == 0 && v) o->out = v;
        else if (strcmp(a, "--experts") == 0)
            o->n_experts = drv_parse_size_list(PROG, a, v, o->experts, MAX_E);
        else if (strcmp(a, "--groups") == 0) o->groups = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--k-groups") == 0) o->k = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--k2") == 0) o->k2 = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--hidden") == 0) o->hidden = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--epochs") == 0) o->epochs = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--batch") == 0) o->batch = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--max-train") == 0) o->max_train = drv_parse_size(PROG, a, v, 0);
        else if (strcmp(a, "--lr") == 0) o->lr = drv_parse_double(PROG, a, v, 1e-9, 10);
        else if (strcmp(a, "--seed") == 0) o->seed = drv_parse_seed(PROG, a, v);
        else drv_bad_option(PROG, a, v);
    }
}

/* hmoe groups for E experts: --groups, or the largest divisor <= sqrt(E). */
static size_t groups_for(const options *o, size_t E)
{
    if (o->groups != 0)
        return o->groups;
    size_t a = 1;
    for (size_t g = 1; g * g <= E; g++)
        if (E % g == 0)
            a = g;
    return a;
}

/* The conditional layer's configuration for one gate and E. */
static ccr_cond_config cond_for(const options *o, bool hier, size_t E)
{
    ccr_cond_config cc = o->cc;
    cc.gate = hier ? &ccr_gate_hmoe : &ccr_gate_topk;
    cc.bank = CCR_BANK_FFN;
    cc.d_out = o->hidden;
    cc.gate_cfg.n_experts = E;
    cc.gate_cfg.n_groups = hier ? groups_for(o, E) : 1;
    if (hier)
        cc.gate_cfg.k_groups = o->k;     /* groups per example */
    else
        cc.gate_cfg.k = o->k * o->k2;    /* experts per example */
    cc.gate_cfg.k2 = hier ? o->k2 : 1;
    return cc;
}

/* Checks every configuration before anything is written (exit 2 on error). */
static void validate(ccr_ctx *ctx, const options *o)
{
    for (size_t i = 0; i < o->n_experts; i++)
        for (int h = 0; h < 2; h++) {
            ccr_cond_config cc = cond_for(o, h, o->experts[i]);
            cc.gate_cfg.d_in = 784;
            ccr_gate *g;
            if (ccr_gate_alloc(ctx, cc.gate, &cc.gate_cfg, 1, &g) != CCR_OK)
                drv_usage_error(PROG, "E=%zu %s: %s", o->experts[i], cc.gate->name,
                                ccr_ctx_errmsg(ctx));
            ccr_gate_free(g);
        }
}

typedef struct env {
    ccr_ctx *ctx;
    ccr_backend *be;
    ccr_jsonl *out;
    ccr_record *rec;
    const options *o;
    size_t run, n_runs;
} env;

static void run_one(env *w, const ccr_dataset *train, size_t n_train, const ccr_dataset *test,
                    const ccr_cond_config *cc)
{
    const options *o = w->o;
    gsl_rng *rng = drv_rng(PROG, w->ctx, o->seed);
    ccr_net *net;
    ccr_optim *opt;
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    oc.lr = (float)o->lr;
    size_t classes = train->n_classes;
    ccr_status s = ccr_net_init(w->be, train->dim, o->batch, &net);
    if (s == CCR_OK) s = ccr_net_add_cond(net, cc);
    if (s == CCR_OK) s = ccr_net_add_act(net, CCR_ACT_RELU);
    if (s == CCR_OK) s = ccr_net_add_linear(net, classes);
    if (s == CCR_OK) s = ccr_net_finalize(net, rng);
    if (s == CCR_OK) s = ccr_optim_init(ccr_net_params(net), &oc, &opt);
    if (s != CCR_OK)
        drv_fail(PROG, w->ctx, s, "network");
    ccr_cond *cond;
    if ((s = ccr_net_cond(net, 0, &cond, NULL)) != CCR_OK)
        drv_fail(PROG, w->ctx, s, "network");
    const ccr_gate_config *g = &cc->gate_cfg;
    double gate_eval = ccr_gate_flops(ccr_cond_gate(cond), false);
    double gate_train = ccr_gate_flops(ccr_cond_gate(cond), true);
    fit_buffers buf;
    if ((s = fit_buffers_alloc(&buf, train->n, o->batch, train->dim)) != CCR_OK)
        drv_fail(PROG, w->ctx, s, "buffers");
    char label[96];
    snprintf(label, sizeof label, "[%zu/%zu] %s E=%zu step", ++w->run, w->n_runs,
             cc->gate->name, g->n_experts);
    size_t steps = (n_train + o->batch - 1) / o->batch;
    fit_progress pr = {label, 0, steps * o->epochs, drv_now()};
    double t0 = drv_now();
    for (size_t e = 1; e <= o->epochs; e++) {
        fit_result last, te;
        if ((s = ccr_optim_set_lr(opt, fit_cosine_lr(oc.lr, e, o->epochs))) != CCR_OK ||
            (s = fit_epoch(net, opt, rng, train, n_train, &buf, &pr, &last)) != CCR_OK)
            drv_fail(PROG, w->ctx, s, "train");
        if ((s = fit_eval(net, test, &te)) != CCR_OK)
            drv_fail(PROG, w->ctx, s, "evaluation");
        drv_progress_end();
        double nb = last.gate.batches;
        fprintf(stderr, "%s E=%zu epoch %zu: train loss %.4f acc %.4f | test loss %.4f acc "
                "%.4f | CV imp %.3f load %.3f | max/mean count %.2f | %.1fs\n",
                cc->gate->name, g->n_experts, e, last.loss, last.acc, te.loss, te.acc,
                last.gate.cv_importance / nb, last.gate.cv_load / nb,
                last.gate.mm_count / nb, last.seconds);
        ccr_record *r = w->rec;
        ccr_record_clear(r);
        s = drv_record_base(r, PROG, w->be, o->seed);
        if (s == CCR_OK) s = ccr_record_add_str(r, "dataset", "fashion-mnist");
        if (s == CCR_OK) s = drv_record_gate(r, cc);
        if (s == CCR_OK) s = ccr_record_add_int(r, "experts_per_example",
                                                 (int64_t)(g->k * g->k2));
        if (s == CCR_OK) s = ccr_record_add_int(r, "hidden", (int64_t)o->hidden);
        if (s == CCR_OK) s = ccr_record_add_int(r, "n_train", (int64_t)n_train);
        if (s == CCR_OK) s = ccr_record_add_int(r, "n_test", (int64_t)test->n);
        if (s == CCR_OK) s = ccr_record_add_int(r, "epoch", (int64_t)e);
        if (s == CCR_OK) s = ccr_record_add_int(r, "epochs", (int64_t)o->epochs);
        if (s == CCR_OK) s = ccr_record_add_int(r, "batch", (int64_t)o->batch);
        if (s == CCR_OK) s = ccr_record_add_str(r, "optim", "adam");
        if (s == CCR_OK) s = ccr_record_add_double(r, "lr", o->lr);
        if (s == CCR_OK) s = ccr_record_add_str(r, "schedule", "cosine");
        /* train_loss/acc: running means over the epoch (training mode). */
        if (s == CCR_OK) s = fit_record_metrics(r, net, &last, &last, &te);
        if (s == CCR_OK) s = ccr_record_add_double(r, "gate_flops", gate_eval);
        if (s == CCR_OK) s = ccr_record_add_double(r, "gate_flops_train", gate_train);
        if (s == CCR_OK) s = ccr_record_add_double(r, "expert_flops",
                                                    ccr_cond_matrix_flops(cond));
        if (s == CCR_OK) s = ccr_record_add_double(r, "epoch_seconds", last.seconds);
        if (s == CCR_OK) s = ccr_record_add_double(r, "eval_seconds", te.seconds);
        if (s == CCR_OK) s = ccr_record_add_double(r, "seconds", drv_now() - t0);
        drv_write_record(PROG, w->ctx, s, w->out, r);
    }
    fit_buffers_free(&buf);
    ccr_optim_free(opt);
    ccr_net_free(net);
    gsl_rng_free(rng);
}

int main(int argc, char **argv)
{
    options o;
    parse(argc, argv, &o);
    drv_io_input_fmnist("--data", o.data);
    drv_io_output("--out", o.out);
    drv_io_check(PROG);
    ccr_ctx *ctx;
    ccr_backend *be;
    drv_one_process(PROG);
    drv_setup(PROG, false, o.seed, &ctx, &be, NULL);
    validate(ctx, &o);
    ccr_dataset *train, *test;
    ccr_status ls;
    if ((ls = fit_load_fmnist(ctx, o.data, false, &train)) != CCR_OK ||
        (ls = fit_load_fmnist(ctx, o.data, true, &test)) != CCR_OK)
        drv_input_error(PROG, ctx, ls, "cannot load Fashion-MNIST from %s", o.data);
    if (o.max_train > train->n)
        drv_usage_error(PROG, "--max-train %zu is above the %zu training examples",
                        o.max_train, train->n);
    size_t n_train = o.max_train ? o.max_train : train->n;
    size_t c = train->n_classes > test->n_classes ? train->n_classes : test->n_classes;
    train->n_classes = test->n_classes = c;

    env w = {.ctx = ctx, .be = be, .o = &o, .n_runs = 2 * o.n_experts};
    drv_open_out(PROG, ctx, o.out, &w.rec, &w.out);
    fprintf(stderr, "%s: %zu runs x %zu epochs, %zu train / %zu test; %s; %s\n", PROG,
            w.n_runs, o.epochs, n_train, test->n, ccr_backend_describe(be), drv_machine());
    for (size_t i = 0; i < o.n_experts; i++)
        for (int h = 0; h < 2; h++) {
            ccr_cond_config cc = cond_for(&o, h, o.experts[i]);
            run_one(&w, train, n_train, test, &cc);
        }
    ccr_dataset_free(train);
    ccr_dataset_free(test);
    drv_teardown(PROG, ctx, be, NULL, w.out, w.rec);
    return 0;
}
