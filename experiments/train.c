/*
 * ccr-train - trains an MLP classifier on Fashion-MNIST (or any IDX pair).
 *
 * The dense baseline of ccr: d_in -> hidden... -> classes with the chosen
 * activation, softmax cross-entropy, SGD+momentum or Adam.  The driver owns
 * the loop (INITIALIZE / ITERATE / TEST): it shuffles the training split each
 * epoch with the seeded GSL RNG, calls ccr_train_step per mini-batch, and
 * after each epoch evaluates on the validation and test sets and writes one
 * JSONL record (loss, accuracy, params, FLOPs per example, seconds).
 *
 * With --backend cuda the data live on the device: the validation and test
 * sets are uploaded once, the training split once per epoch in that epoch's
 * shuffled order (one copy, inside the epoch's time), and every step reads
 * its batch in place (ccr_net_set_input_memory, CCR_INPUT_BACKEND): no host
 * copy per step.
 *
 * Under mpirun (-np P > 1, MPI build): every rank loads the data and draws
 * the same permutations; each global batch of --batch examples is split in
 * rank order, rank r taking its contiguous share; conditional layers are
 * expert-parallel and the rest data-parallel (ccr_net_set_comm), so the
 * run is that of one process to float rounding.  Validation and test sets
 * are split alike.  A final global batch smaller than P is skipped (no
 * rank may have an empty share; counted in steps_skipped).  Rank 0 alone
 * prints and writes --out, with ranks = P and the communication per step
 * (bytes sent by rank 0, seconds in all-to-alls and all-reduces); the
 * other ranks write nothing.  --save gathers every bank to rank 0, which
 * writes the file one process would (ccr_net_save under a communicator).
 * --backend cuda is refused with P > 1.
 */
#include <gsl/gsl_math.h>
#include <gsl/gsl_rng.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "internal.h"  // provides: ccr_mallocn, ccr_malloc3, ccr_mul_ok
#include "outputs.h"
#include "fit.h"

#define PROG "ccr-train"
#define MAX_HIDDEN 16

static void usage(void)
{
    printf(
        "usage: ccr-train [options]\n"
        "Trains an MLP on Fashion-MNIST; one JSONL record per epoch.\n\n"
        "  --data DIR         IDX files (train-images-idx3-ubyte[.gz] ...)\n"
        "                     [/usr/share/datasets/fashion-mnist]\n"
        "  --hidden LIST      hidden layer widths, comma-separated [512,256]\n"
        "  --act NAME         relu | tanh | sigmoid [relu]\n"
        "  --optim NAME       adam | sgd [adam]\n"
        "  --lr X             learning rate [1e-3 adam, 0.05 sgd]\n"
        "  --momentum X       SGD momentum [0.9]\n"
        "  --weight-decay X   L2 weight decay [0]\n"
        "  --optim-sparse     update only the bank matrices a batch used, each with its\n"
        "                     own step count (lazy Adam; docs/GATES.md) [dense]\n"
        "  --schedule NAME    cosine | constant learning rate over epochs [cosine]\n"
        "  --batch N          mini-batch size [128]\n"
        "  --epochs N         epochs [10]\n"
        "  --valid N          examples held out of train for validation [5000]\n"
        "  --max-train N      use at most N training examples (0 = all) [0]\n"
        "  --seed N           GSL RNG seed (init, split, shuffles) [1]\n"
        "  --backend NAME     cpu | cuda (device 0) [cpu]\n"
        "  --out FILE         JSONL results file [none]\n"
        "  --save FILE        write the final parameters (safetensors) [none]; a run\n"
        "                     that diverges keeps its last ones in FILE.partial\n"
        "  --quick            smoke run: 1 epoch on 6000 examples\n"
        "  --help             this text\n\n"
        "Conditional hidden layers (each hidden layer becomes gate + bank; CPU):\n"
        "%s"
        "  --cond-layers LIST   which hidden layers (1-based) are conditional; the\n"
        "                       others stay linear [all]\n"
        "  --residual           conditional layers compute x + layer(x), so examples\n"
        "                       the gate drops pass through (needs equal widths in\n"
        "                       and out, e.g. --hidden 256,256 --cond-layers 2)\n\n"
        "OpenBLAS threads follow OPENBLAS_NUM_THREADS; the core in use is printed\n"
        "and recorded (set OPENBLAS_CORETYPE=SkylakeX for AVX-512 kernels).\n",
        drv_gate_usage);
}

typedef struct options {
    const char *data, *out, *save;
    bool cuda;
    size_t hidden[MAX_HIDDEN], n_hidden;
    ccr_act act;
    ccr_optim_config oc;
    bool lr_set;
    bool cosine;
    ccr_cond_config cond;   /* cond.gate == NULL: plain linear hidden layers */
    bool is_cond[MAX_HIDDEN];  /* which hidden layers get cond (with a gate) */
    size_t batch, epochs, valid, max_train;
    unsigned long seed;
} options;

static void parse(int argc, char **argv, options *o)
{
    *o = (options){.data = "/usr/share/datasets/fashion-mnist", .hidden = {512, 256},
                   .n_hidden = 2, .act = CCR_ACT_RELU,
                   .oc = ccr_optim_defaults(CCR_OPTIM_ADAM), .batch = 128, .epochs = 10,
                   .valid = 5000, .seed = 1, .cosine = true};
    float momentum = 0.9f, wd = 0.0f, lr = 0.0f;
    bool sparse = false;
    bool bank_set = false, used, cond_layers_set = false;
    size_t cond_layers[MAX_HIDDEN], n_cond_layers = 0;
    o->cond = drv_gate_defaults();   /* the library's defaults (expert hidden 64) */
    if (drv_quick_requested(argc, argv))   /* smaller defaults; explicit options still win */
        o->epochs = 1, o->max_train = 6000, o->valid = 1000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (drv_parse_gate_option(PROG, a, v, &o->cond, &used)) {
            bank_set = bank_set || strcmp(a, "--bank") == 0;
            i += used;
            continue;
        }
        if (drv_parse_common(PROG, a, usage))
            continue;   /* --quick: applied before the loop */
        i++;
        if (strcmp(a, "--data") == 0 && v) o->data = v;
        else if (strcmp(a, "--out") == 0 && v) o->out = v;
        else if (strcmp(a, "--save") == 0 && v) o->save = v;
        else if (strcmp(a, "--hidden") == 0)
            o->n_hidden = drv_parse_size_list(PROG, a, v, o->hidden, MAX_HIDDEN);
        else if (strcmp(a, "--cond-layers") == 0) {
            n_cond_layers = drv_parse_size_list(PROG, a, v, cond_layers, MAX_HIDDEN);
            cond_layers_set = true;
        } else if (strcmp(a, "--residual") == 0) {
            o->cond.residual = true;
            i--;
        } else if (strcmp(a, "--optim-sparse") == 0) {
            sparse = true;
            i--;
        } else if (strcmp(a, "--act") == 0) {
            if (v == NULL || ccr_act_from_name(v, &o->act) != CCR_OK || o->act == CCR_ACT_IDENTITY)
                drv_usage_error(PROG, "--act must be relu, tanh or sigmoid");
        } else if (strcmp(a, "--optim") == 0) {
            if (v && strcmp(v, "adam") == 0) o->oc.kind = CCR_OPTIM_ADAM;
            else if (v && strcmp(v, "sgd") == 0) o->oc.kind = CCR_OPTIM_SGD;
            else drv_usage_error(PROG, "--optim must be adam or sgd");
        } else if (strcmp(a, "--lr") == 0) {
            lr = (float)drv_parse_double(PROG, a, v, 1e-12, 100.0);
            o->lr_set = true;
        } else if (strcmp(a, "--momentum") == 0) momentum = (float)drv_parse_double(PROG, a, v, 0, 0.999999);
        else if (strcmp(a, "--weight-decay") == 0) wd = (float)drv_parse_double(PROG, a, v, 0, 1);
        else if (drv_parse_backend(PROG, a, v, &o->cuda)) {
            /* o->cuda set */
        } else if (strcmp(a, "--schedule") == 0) {
            if (v && strcmp(v, "cosine") == 0) o->cosine = true;
            else if (v && strcmp(v, "constant") == 0) o->cosine = false;
            else drv_usage_error(PROG, "--schedule must be cosine or constant");
        } else if (strcmp(a, "--batch") == 0) o->batch = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--epochs") == 0) o->epochs = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--valid") == 0) o->valid = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--max-train") == 0) o->max_train = drv_parse_size(PROG, a, v, 0);
        else if (strcmp(a, "--seed") == 0) o->seed = drv_parse_seed(PROG, a, v);
        else drv_bad_option(PROG, a, v);
    }
    drv_gate_finish(PROG, &o->cond, bank_set);
    if ((cond_layers_set || o->cond.residual) && o->cond.gate == NULL)
        drv_usage_error(PROG, "--cond-layers and --residual need --gate");
    if (o->cond.gate == NULL && drv_gate_option_given() != NULL)
        drv_usage_error(PROG, "%s needs --gate", drv_gate_option_given());
    for (size_t i = 0; i < o->n_hidden; i++)
        o->is_cond[i] = o->cond.gate != NULL && !cond_layers_set;
    for (size_t j = 0; j < n_cond_layers; j++) {
        if (cond_layers[j] > o->n_hidden)
            drv_usage_error(PROG, "--cond-layers: hidden layer %zu does not exist (%zu hidden)",
                            cond_layers[j], o->n_hidden);
        o->is_cond[cond_layers[j] - 1] = true;
    }
    ccr_optim_config base = ccr_optim_defaults(o->oc.kind);
    o->oc = base;
    o->oc.lr = o->lr_set ? lr : (o->oc.kind == CCR_OPTIM_SGD ? 0.05f : base.lr);
    o->oc.momentum = momentum;
    o->oc.weight_decay = wd;
    o->oc.sparse = sparse;
}

/* A diverged run (CCR_EDOM from a training step, which then made no
 * update, or from an evaluation) still holds the parameters of its last
 * update: keep them in <save>.partial, the name saying the run did not
 * finish (--save itself stays untouched), then fail as drv_fail does
 * (exit 1; the results so far go to <out>.partial). */
static void diverged(ccr_net *net, ccr_ctx *ctx, const char *save, const char *what)
{
    char msg[512], path[4096];
    snprintf(msg, sizeof msg, "%s", ccr_ctx_errmsg(ctx));
    fprintf(stderr, "%s: stopped at the first non-finite value (NaN or infinity): "
            "the run diverged\n%s: %s: %s: %s\n", PROG, PROG, what,
            ccr_strerror(CCR_EDOM), msg);
    int n = snprintf(path, sizeof path, "%s.partial", save);
    ccr_status s = n > 0 && (size_t)n < sizeof path ? ccr_net_save(net, path) : CCR_EINVAL;
    if (s == CCR_OK)
        fprintf(stderr, "%s: the parameters of the last update are in %s\n", PROG, path);
    else
        fprintf(stderr, "%s: could not keep the last good parameters: %s\n", PROG,
                ccr_ctx_errmsg(ctx));
    exit(1);
}

int main(int argc, char **argv)
{
    options o;
    parse(argc, argv, &o);
    const int P = drv_launcher_size(), rank = drv_launcher_rank();
    const bool lead = rank == 0;
    if (P > 1 && o.cuda)
        drv_usage_error(PROG, "--backend cuda under mpirun is not supported yet (%d processes)",
                        P);
    if ((size_t)P > o.batch)
        drv_usage_error(PROG, "--batch %zu is smaller than the %d processes", o.batch, P);
    if (!lead)
        o.out = NULL;  /* rank 0 writes; --save is collective (rank 0 writes the file) */
    drv_io_input_fmnist("--data", o.data);
    drv_io_output("--out", o.out);
    drv_io_output("--save", lead ? o.save : NULL);
    drv_io_check(PROG);
    ccr_ctx *ctx;
    ccr_backend *be;
    gsl_rng *rng;
    drv_setup(PROG, o.cuda, o.seed, &ctx, &be, &rng);
    ccr_comm *comm = drv_comm_start(PROG, ctx);  /* NULL in one process */
    ccr_status s;

    ccr_dataset *full, *test, *train, *valid;
    if ((s = fit_load_fmnist(ctx, o.data, false, &full)) != CCR_OK)
        drv_input_error(PROG, ctx, s, "cannot load training data from %s", o.data);
    if ((s = fit_load_fmnist(ctx, o.data, true, &test)) != CCR_OK)
        drv_input_error(PROG, ctx, s, "cannot load test data from %s", o.data);
    if (o.valid >= full->n)
        drv_usage_error(PROG, "--valid %zu leaves no training examples (%zu in all)", o.valid, full->n);
    if ((s = ccr_dataset_split(ctx, full, rng, o.valid, &train, &valid)) != CCR_OK)
        drv_fail(PROG, ctx, s, "split");
    ccr_dataset_free(full);
    size_t n_train = o.max_train && o.max_train < train->n ? o.max_train : train->n;
    size_t classes = train->n_classes > test->n_classes ? train->n_classes : test->n_classes;

    /* INITIALIZE */
    ccr_net *net;
    ccr_optim *opt;
    const size_t share_max = (o.batch + (size_t)P - 1) / (size_t)P;  /* this rank's batch */
    if ((s = ccr_net_init(be, train->dim, share_max, &net)) != CCR_OK)
        drv_fail(PROG, ctx, s, "network");
    if (comm != NULL && (s = ccr_net_set_comm(net, comm)) != CCR_OK)
        drv_fail(PROG, ctx, s, "network");
    size_t first_cond = SIZE_MAX;  /* net layer index of the first conditional layer */
    for (size_t i = 0; i < o.n_hidden && s == CCR_OK; i++) {
        if (o.is_cond[i]) {
            size_t width = i == 0 ? train->dim : o.hidden[i - 1];
            if (o.cond.residual && width != o.hidden[i])
                drv_usage_error(PROG, "--residual: conditional hidden layer %zu maps %zu to %zu "
                                "values; a residual layer needs equal widths", i + 1, width,
                                o.hidden[i]);
            if (first_cond == SIZE_MAX)
                first_cond = ccr_net_n_layers(net);
            ccr_cond_config cc = o.cond;
            cc.d_out = o.hidden[i];
            s = ccr_net_add_cond(net, &cc);
            if (s == CCR_EINVAL)  /* a bad gate option: a usage error */
                drv_usage_error(PROG, "%s", ccr_ctx_errmsg(ctx));
        } else {
            s = ccr_net_add_linear(net, o.hidden[i]);
        }
        if (s == CCR_OK)
            s = ccr_net_add_act(net, o.act);
    }
    if (s == CCR_OK) s = ccr_net_add_linear(net, classes);
    if (s == CCR_OK) s = ccr_net_finalize(net, rng);
    if (s == CCR_OK) s = ccr_optim_init(ccr_net_params(net), &o.oc, &opt);
    if (s != CCR_OK)
        drv_fail(PROG, ctx, s, "network");
    ccr_flops fl = ccr_net_flops(net);

    char arch[256];
    int w = snprintf(arch, sizeof arch, "%zu", train->dim);
    for (size_t i = 0; i < o.n_hidden; i++)  /* "-switch256+": residual */
        w += snprintf(arch + w, sizeof arch - (size_t)w, "-%s%zu%s",
                      o.is_cond[i] ? o.cond.gate->name : "", o.hidden[i],
                      o.is_cond[i] && o.cond.residual ? "+" : "");
    snprintf(arch + w, sizeof arch - (size_t)w, "-%zu", classes);
    if (lead)
        fprintf(stderr, "%s: %s %s (%s), %zu params, %.0f fwd + %.0f bwd FLOPs/example; "
                "train %zu valid %zu test %zu; %s; %s; %d process%s\n", PROG,
                o.cond.gate ? "net" : "mlp", arch, ccr_act_name(o.act), ccr_net_n_params(net),
                fl.fwd, fl.bwd, n_train, valid->n, test->n, ccr_backend_describe(be),
                drv_machine(), P, P > 1 ? "es" : "");
    /* This rank's share of the evaluation sets (all of them in one process). */
    const size_t va0 = valid->n * (size_t)rank / (size_t)P;
    const size_t va1 = valid->n * (size_t)(rank + 1) / (size_t)P;
    const size_t te0 = test->n * (size_t)rank / (size_t)P;
    const size_t te1 = test->n * (size_t)(rank + 1) / (size_t)P;

    ccr_jsonl *out;
    ccr_record *rec;
    drv_open_out(PROG, ctx, o.out, &rec, &out);

    size_t *perm = ccr_mallocn(train->n, sizeof *perm);
    float *xb = ccr_malloc3(o.batch, train->dim, sizeof *xb);
    int32_t *yb = ccr_mallocn(o.batch, sizeof *yb);
    if (!perm || !xb || !yb)
        drv_fail(PROG, ctx, CCR_ENOMEM, "batch buffers");
    /* CUDA: device copies of the data (see the header). */
    float *ex = NULL, *d_train = NULL, *d_valid = NULL, *d_test = NULL;
    int32_t *ey = NULL;
    if (o.cuda) {
        ex = ccr_malloc3(n_train, train->dim, sizeof *ex);
        ey = ccr_mallocn(n_train, sizeof *ey);
        if (!ex || !ey)
            drv_fail(PROG, ctx, CCR_ENOMEM, "epoch buffers");
        d_train = drv_backend_floats(PROG, ctx, be, n_train * train->dim, NULL);
        d_valid = drv_backend_floats(PROG, ctx, be, valid->n * valid->dim, valid->x);
        d_test = drv_backend_floats(PROG, ctx, be, test->n * test->dim, test->x);
        if ((s = ccr_net_set_input_memory(net, CCR_INPUT_BACKEND)) != CCR_OK)
            drv_fail(PROG, ctx, s, "input memory");
    }
    size_t steps_per_epoch = (n_train + o.batch - 1) / o.batch;
    double t0 = drv_now();
    for (size_t epoch = 1; epoch <= o.epochs; epoch++) {
        /* ITERATE.  Cosine annealing (Loshchilov & Hutter 2017) per epoch:
         * lr_e = lr / 2 * (1 + cos(pi (e - 1) / epochs)). */
        float lr_e = o.oc.lr;
        if (o.cosine)
            lr_e = (float)(0.5 * o.oc.lr * (1.0 + cos(M_PI * (double)(epoch - 1) / (double)o.epochs)));
        if ((s = ccr_optim_set_lr(opt, lr_e)) != CCR_OK)
            drv_fail(PROG, ctx, s, "schedule");
        double te = drv_now(), loss_sum = 0.0, aux_sum = 0.0, flops_sum = 0.0;
        double cv_imp = 0.0, cv_load = 0.0, cv_count = 0.0, mm_count = 0.0;
        size_t correct = 0, seen = 0, dropped = 0, steps = 0, skipped = 0;
        ccr_permutation(rng, perm, train->n);
        ccr_comm_stats_reset(comm);
        if (o.cuda) {  /* the epoch's batches in order, one upload */
            ccr_dataset_gather(train, perm, n_train, ex, ey);
            if ((s = ccr_backend_set(be, d_train, ex, n_train * train->dim * sizeof *ex)) != CCR_OK)
                drv_fail(PROG, ctx, s, "upload");
        }
        for (size_t step = 0; step < steps_per_epoch; step++) {
            size_t b = n_train - step * o.batch < o.batch ? n_train - step * o.batch : o.batch;
            if (b < (size_t)P) {  /* a share would be empty */
                skipped++;
                continue;
            }
            /* This rank's share [lo, hi) of the global batch. */
            const size_t lo = b * (size_t)rank / (size_t)P, hi = b * (size_t)(rank + 1) / (size_t)P;
            const float *bx = xb;
            const int32_t *by = yb;
            if (o.cuda)
                bx = d_train + step * o.batch * train->dim, by = ey + step * o.batch;
            else
                ccr_dataset_gather(train, perm + step * o.batch + lo, hi - lo, xb, yb);
            b = hi - lo;
            ccr_step_stats st;
            if ((s = ccr_train_step(net, opt, rng, bx, by, b, &st)) != CCR_OK) {
                if (s == CCR_EDOM && o.save != NULL)
                    diverged(net, ctx, o.save, "train step");
                drv_fail(PROG, ctx, s, "train step");
            }
            loss_sum += st.loss * (double)st.batch;  /* global: every rank's examples */
            aux_sum += st.aux_loss;
            correct += st.correct;
            seen += st.batch;
            steps++;
            /* Diagnostics of the first conditional layer. */
            ccr_gate_stats gs;
            if (first_cond != SIZE_MAX && ccr_net_cond(net, first_cond, NULL, &gs) == CCR_OK) {
                cv_imp += gs.cv_importance;
                cv_load += gs.cv_load;
                cv_count += gs.cv_load_count;
                mm_count += gs.max_mean_count;
                dropped += gs.dropped;
                flops_sum += gs.flops_counted;
            }
            if (lead && (step % 20 == 0 || step + 1 == steps_per_epoch)) {
                char extra[96], label[48];
                snprintf(label, sizeof label, "epoch %zu/%zu step", epoch, o.epochs);
                snprintf(extra, sizeof extra, "loss %.4f acc %.4f", loss_sum / (double)seen,
                         (double)correct / (double)seen);
                drv_progress(label, step + 1, steps_per_epoch, te, extra);
            }
        }
        double train_s = drv_now() - te;
        ccr_comm_stats cs = {0};
        if (comm != NULL)
            ccr_comm_stats_get(comm, &cs);
        /* TEST */
        ccr_step_stats sv, stt;
        const size_t dim = train->dim;
        if ((s = ccr_net_eval(net, o.cuda ? d_valid : valid->x + va0 * dim, valid->y + va0,
                              va1 - va0, &sv)) != CCR_OK ||
            (s = ccr_net_eval(net, o.cuda ? d_test : test->x + te0 * dim, test->y + te0,
                              te1 - te0, &stt)) != CCR_OK) {
            if (s == CCR_EDOM && o.save != NULL)
                diverged(net, ctx, o.save, "evaluation");
            drv_fail(PROG, ctx, s, "evaluation");
        }
        if (lead)
            drv_progress_end();
        double tr_loss = loss_sum / (double)seen, tr_acc = (double)correct / (double)seen;
        double va_acc = (double)sv.correct / (double)sv.batch;
        double te_acc = (double)stt.correct / (double)stt.batch;
        if (lead)
            fprintf(stderr, "epoch %zu: train loss %.4f acc %.4f | valid loss %.4f acc %.4f | "
                    "test loss %.4f acc %.4f | %.1fs (%.0f ex/s)\n", epoch, tr_loss, tr_acc,
                    sv.loss, va_acc, stt.loss, te_acc, train_s, (double)seen / train_s);
        ccr_record_clear(rec);
        s = drv_record_base(rec, PROG, be, o.seed);
        if (s == CCR_OK) s = ccr_record_add_str(rec, "model", o.cond.gate ? "cond-mlp" : "mlp");
        if (s == CCR_OK) s = drv_record_gate(rec, &o.cond);
        if (s == CCR_OK && o.cond.gate != NULL) {
            double n = (double)steps;
            s = ccr_record_add_bool(rec, "residual", o.cond.residual);
            if (s == CCR_OK) s = ccr_record_add_double(rec, "train_aux_loss", aux_sum / n);
            if (s == CCR_OK) s = ccr_record_add_double(rec, "cv_importance", cv_imp / n);
            if (s == CCR_OK) s = ccr_record_add_double(rec, "cv_load", cv_load / n);
            if (s == CCR_OK) s = ccr_record_add_double(rec, "cv_load_count", cv_count / n);
            if (s == CCR_OK) s = ccr_record_add_double(rec, "max_mean_count", mm_count / n);
            if (s == CCR_OK) s = ccr_record_add_int(rec, "dropped", (int64_t)dropped);
            if (s == CCR_OK)
                s = ccr_record_add_double(rec, "cond_flops_counted_train", flops_sum / n);
        }
        if (s == CCR_OK) s = ccr_record_add_str(rec, "arch", arch);
        if (s == CCR_OK) s = ccr_record_add_str(rec, "act", ccr_act_name(o.act));
        if (s == CCR_OK) s = ccr_record_add_str(rec, "optim", o.oc.kind == CCR_OPTIM_ADAM ? "adam" : "sgd");
        if (s == CCR_OK) s = ccr_record_add_double(rec, "lr", o.oc.lr);
        if (s == CCR_OK) s = ccr_record_add_bool(rec, "optim_sparse", o.oc.sparse);
        if (s == CCR_OK) s = ccr_record_add_str(rec, "schedule", o.cosine ? "cosine" : "constant");
        if (s == CCR_OK) s = ccr_record_add_double(rec, "epoch_lr", lr_e);
        if (s == CCR_OK) s = ccr_record_add_int(rec, "batch", (int64_t)o.batch);
        if (s == CCR_OK) s = ccr_record_add_int(rec, "epoch", (int64_t)epoch);
        if (s == CCR_OK) s = ccr_record_add_int(rec, "n_train", (int64_t)n_train);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "train_loss", tr_loss);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "train_acc", tr_acc);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "valid_loss", sv.loss);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "valid_acc", va_acc);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "test_loss", stt.loss);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "test_acc", te_acc);
        if (s == CCR_OK) s = ccr_record_add_int(rec, "params", (int64_t)ccr_net_n_params(net));
        if (s == CCR_OK) s = ccr_record_add_double(rec, "flops_fwd_per_example", fl.fwd);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "flops_bwd_per_example", fl.bwd);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "epoch_seconds", train_s);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "seconds", drv_now() - t0);
        /* Processes and rank 0's communication during the epoch's training. */
        const double ns = steps > 0 ? (double)steps : 1.0;
        if (s == CCR_OK) s = ccr_record_add_int(rec, "ranks", P);
        if (s == CCR_OK) s = ccr_record_add_int(rec, "steps_skipped", (int64_t)skipped);
        if (s == CCR_OK)
            s = ccr_record_add_double(rec, "alltoall_bytes_per_step", cs.alltoall_bytes / ns);
        if (s == CCR_OK)
            s = ccr_record_add_double(rec, "allreduce_bytes_per_step", cs.allreduce_bytes / ns);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "seconds_alltoall", cs.alltoall_seconds);
        if (s == CCR_OK) s = ccr_record_add_double(rec, "seconds_allreduce", cs.allreduce_seconds);
        if (s == CCR_OK)
            s = ccr_record_add_double(rec, "seconds_compute",
                                      train_s - cs.alltoall_seconds - cs.allreduce_seconds);
        drv_write_record(PROG, ctx, s, out, rec);
    }
    if (o.save && (s = ccr_net_save(net, o.save)) != CCR_OK)
        drv_fail(PROG, ctx, s, "save");
    free(perm);
    free(xb);
    free(ex);
    free(ey);
    ccr_backend_free_buffer(be, d_train);
    ccr_backend_free_buffer(be, d_valid);
    ccr_backend_free_buffer(be, d_test);
    free(yb);
    ccr_optim_free(opt);
    ccr_net_free(net);
    ccr_dataset_free(train);
    ccr_dataset_free(valid);
    ccr_dataset_free(test);
    drv_comm_end(comm);
    drv_teardown(PROG, ctx, be, rng, out, rec);
    return 0;
}
