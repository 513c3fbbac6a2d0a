/*
 * ccr-balance - Shazeer et al. (2017) App. A, Table 6: the six
 * (w_importance, w_load) settings of the balancing losses on one flat
 * noisy top-k MoE (k = 4) inside the LSTM language model of ccr-lm.  For
 * each setting it trains the same model from the same seed and writes one
 * JSONL record: test perplexity and the gate's CV(Importance), CV(Load) and
 * max/mean load, from the smooth estimator and from the true counts,
 * averaged over the training batches of the last epoch (the last quarter of
 * the steps when there is one epoch).  The paper's reading to check: no
 * loss gives CV >> 1 and a worse perplexity; any loss gives a small CV.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "outputs.h"
#include "lm_model.h"

#define PROG "ccr-balance"

/* Table 6's settings and the paper's row for each (perplexity, CV(Imp),
 * CV(Load), max/mean Load). */
static const double settings[6][6] = {
    {0.0, 0.0, 39.8, 3.04, 3.01, 17.80}, {0.2, 0.0, 35.6, 0.06, 0.17, 1.47},
    {0.0, 0.2, 35.7, 0.22, 0.04, 1.15},  {0.1, 0.1, 35.6, 0.06, 0.05, 1.14},
    {0.01, 0.01, 35.7, 0.48, 0.11, 1.37}, {1.0, 1.0, 35.7, 0.03, 0.02, 1.07},
};

static void usage(void)
{
    printf(
        "usage: ccr-balance [options]\n"
        "Shazeer Table 6: the six (w_importance, w_load) settings on a flat top-4 MoE\n"
        "language model; one JSONL record per setting.\n\n"
        "  --corpus FILE        text file, gzip or plain [/usr/share/dictd/gcide.dict.dz]\n"
        "  --vocab N            vocabulary incl. <eos>, <unk> [10000]\n"
        "  --max-tokens N       tokens read from the corpus, 0 = all [300000]\n"
        "  --test-frac X        sentences held out for test [0.05]\n"
        "  --split-seed N       seed of the sentence split [1]\n"
        "  --settings LIST      which of the six settings, 1-based [1,2,3,4,5,6]\n"
        "  --experts N          experts E [32]\n"
        "  --k N                experts per example [4]\n"
        "  --noise-eps X        noise epsilon [0.01]\n"
        "  --d N                embedding/LSTM/MoE width [64]\n"
        "  --expert-hidden N    expert hidden width [128]\n"
        "  --batch N --unroll N streams per batch, BPTT steps [32 20]\n"
        "  --epochs N           passes over the training split [1]\n"
        "  --lr X --warmup N    Adam learning rate and warm-up [0.004 200]\n"
        "  --clip X             gradient-norm clip, 0 = off [1]\n"
        "  --dropout X          drop probability [0.1]\n"
        "  --gate NAME          topk (the only gate with both losses; others are refused)\n"
        "  --seed N             GSL RNG seed [1]\n"
        "  --out FILE           JSONL results [none]\n"
        "  --quick              seconds-long smoke run\n"
        "  --help               this text\n");
}

typedef struct options {
    const char *corpus, *out;
    size_t vocab, max_tokens, experts, k, d, hidden, batch, unroll, epochs, warmup;
    size_t which[6], n_which;
    double test_frac, noise_eps, lr, clip, dropout;
    unsigned long seed, split_seed;
} options;

static void parse(int argc, char **argv, options *o)
{
    *o = (options){.corpus = "/usr/share/dictd/gcide.dict.dz", .vocab = 10000,
                   .max_tokens = 300000, .experts = 32, .k = 4, .d = 64, .hidden = 128,
                   .batch = 32, .unroll = 20, .epochs = 1, .warmup = 200,
                   .which = {1, 2, 3, 4, 5, 6}, .n_which = 6, .test_frac = 0.05,
                   .noise_eps = 0.01, .lr = 0.004, .clip = 1.0, .dropout = 0.1, .seed = 1,
                   .split_seed = 1};
    if (drv_quick_requested(argc, argv)) {   /* smaller defaults; explicit options still win */
        o->vocab = 2000, o->max_tokens = 30000, o->d = 32, o->hidden = 64, o->batch = 16;
        o->unroll = 10, o->warmup = 20, o->test_frac = 0.1, o->experts = 16;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (drv_parse_common(PROG, a, usage))
            continue;   /* --quick: applied before the loop */
        i++;
        if (strcmp(a, "--corpus") == 0 && v) o->corpus = v;
        else if (strcmp(a, "--out") == 0 && v) o->out = v;
        else if (strcmp(a, "--gate") == 0) {
            if (v == NULL || ccr_gate_type_find(v) == NULL)
                drv_usage_error(PROG, "--gate must be one of: %s", ccr_gate_type_names());
            if (strcmp(v, "topk") != 0)
                drv_usage_error(PROG, "--gate %s: Table 6 needs topk (importance and load losses)", v);
        } else if (strcmp(a, "--settings") == 0) {
            o->n_which = drv_parse_size_list(PROG, a, v, o->which, 6);
            for (size_t j = 0; j < o->n_which; j++)
                if (o->which[j] > 6)
                    drv_usage_error(PROG, "--settings: values are 1..6");
        } else if (strcmp(a, "--vocab") == 0) o->vocab = drv_parse_size(PROG, a, v, 3);
        else if (strcmp(a, "--max-tokens") == 0) o->max_tokens = drv_parse_size(PROG, a, v, 0);
        else if (strcmp(a, "--experts") == 0) o->experts = drv_parse_size(PROG, a, v, 2);
        else if (strcmp(a, "--k") == 0) o->k = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--d") == 0) o->d = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--expert-hidden") == 0) o->hidden = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--batch") == 0) o->batch = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--unroll") == 0) o->unroll = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--epochs") == 0) o->epochs = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--warmup") == 0) o->warmup = drv_parse_size(PROG, a, v, 0);
        else if (strcmp(a, "--seed") == 0) o->seed = drv_parse_seed(PROG, a, v);
        else if (strcmp(a, "--split-seed") == 0) o->split_seed = drv_parse_seed(PROG, a, v);
        else if (strcmp(a, "--test-frac") == 0) o->test_frac = drv_parse_double(PROG, a, v, 1e-6, 0.5);
        else if (strcmp(a, "--noise-eps") == 0) o->noise_eps = drv_parse_double(PROG, a, v, 0, 1e6);
        else if (strcmp(a, "--lr") == 0) o->lr = drv_parse_double(PROG, a, v, 1e-9, 10);
        else if (strcmp(a, "--clip") == 0) o->clip = drv_parse_double(PROG, a, v, 0, 1e9);
        else if (strcmp(a, "--dropout") == 0) o->dropout = drv_parse_double(PROG, a, v, 0, 0.95);
        else drv_bad_option(PROG, a, v);
    }
    if (o->k > o->experts)
        drv_usage_error(PROG, "--k %zu exceeds --experts %zu", o->k, o->experts);
    if (o->max_tokens == 1)
        drv_usage_error(PROG, "--max-tokens must be 0 or >= 2");
}

static void progress(void *ud, size_t step, size_t total, const lm_fwd_stats *st)
{
    if (step % 10 == 0 || step == total) {
        char extra[96];
        snprintf(extra, sizeof extra, "ppl %.1f CV(imp) %.2f CV(load) %.2f",
                 exp(st->nll_sum / (double)(st->n_scored ? st->n_scored : 1)),
                 st->gate.cv_importance, st->gate.cv_load);
        drv_progress((const char *)((void **)ud)[0], step, total, *(double *)((void **)ud)[1],
                     extra);
    }
}

int main(int argc, char **argv)
{
    options o;
    parse(argc, argv, &o);
    drv_io_input("--corpus", o.corpus);
    drv_io_output("--out", o.out);
    drv_io_check(PROG);
    ccr_ctx *ctx;
    ccr_backend *be;
    gsl_rng *rng;
    drv_one_process(PROG);
    drv_setup(PROG, false, o.split_seed, &ctx, &be, &rng);   /* seeded for the split */
    ccr_status s;
    if (access(o.corpus, R_OK) != 0)
        drv_usage_error(PROG, "cannot read --corpus %s", o.corpus);
    ccr_corpus_config cc = {.level = CCR_CORPUS_WORD, .vocab_size = o.vocab,
                            .max_tokens = o.max_tokens};
    ccr_corpus *cp;
    if ((s = ccr_corpus_load(ctx, o.corpus, &cc, &cp)) != CCR_OK)
        drv_input_error(PROG, ctx, s, "cannot load --corpus %s", o.corpus);
    if ((s = ccr_corpus_split(ctx, cp, rng, 0.0, o.test_frac)) != CCR_OK)
        drv_input_error(PROG, ctx, s, "split");
    if (cp->n_train < 2 || cp->n_test < 1)
        drv_usage_error(PROG, "corpus too small: %zu train, %zu test tokens", cp->n_train,
                        cp->n_test);
    lm_config c = lm_config_default();
    c.vocab = cp->vocab_size, c.d = o.d, c.batch = o.batch, c.unroll = o.unroll;
    c.dropout = o.dropout;
    c.cond.gate = ccr_gate_type_find("topk");
    c.cond.hidden = o.hidden;
    c.cond.gate_cfg.n_experts = o.experts;
    c.cond.gate_cfg.k = o.k;
    c.cond.gate_cfg.noise_eps = o.noise_eps;
    lm_model *m;
    if ((s = lm_model_alloc(be, &c, &m)) == CCR_EINVAL)  /* a bad option: usage error */
        drv_usage_error(PROG, "model: %s", ccr_ctx_errmsg(ctx));
    if (s != CCR_OK)  /* out of memory: a runtime failure, as in every driver */
        drv_fail(PROG, ctx, s, "model");
    lm_model_free(m);
    fprintf(stderr, "%s: %s: %zu tokens (train %zu, test %zu), vocab %zu; topk E=%zu k=%zu; "
            "%s; %s\n", PROG, o.corpus, cp->n_tokens, cp->n_train, cp->n_test, cp->vocab_size,
            o.experts, o.k, ccr_backend_describe(be), drv_machine());
    ccr_jsonl *out;
    ccr_record *r;
    drv_open_out(PROG, ctx, o.out, &r, &out);

    for (size_t w = 0; w < o.n_which; w++) {
        const double *set = settings[o.which[w] - 1];
        c.cond.gate_cfg.w_importance = set[0];
        c.cond.gate_cfg.w_load = set[1];
        double t0 = drv_now();
        gsl_rng_set(rng, o.seed);
        ccr_optim *opt;
        ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
        oc.lr = (float)o.lr;
        if ((s = lm_model_alloc(be, &c, &m)) != CCR_OK || (s = lm_model_init_params(m, rng)) != CCR_OK ||
            (s = ccr_optim_init(lm_model_arena(m), &oc, &opt)) != CCR_OK)
            drv_fail(PROG, ctx, s, "model");
        char label[64];
        snprintf(label, sizeof label, "w_imp %g w_load %g step", set[0], set[1]);
        double tp = drv_now();
        void *ud[2] = {label, &tp};
        lm_stream st;
        lm_stream_init(&st, cp->train, cp->n_train, c.batch, c.unroll);
        lm_train_args ta = {.tok = cp->train, .n = cp->n_train, .epochs = o.epochs, .lr = o.lr,
                            .clip = o.clip, .warmup = o.warmup, .progress = progress, .ud = ud,
                            .avg_last = o.epochs > 1 ? st.steps : (st.steps + 3) / 4};
        lm_train_summary ts;
        if ((s = lm_train_run(m, opt, rng, &ta, &ts)) != CCR_OK)
            drv_fail(PROG, ctx, s, "training");
        double train_s = drv_now() - tp;
        drv_progress_end();
        double tn;
        size_t tc;
        if ((s = lm_evaluate(m, cp->test, cp->n_test, &tn, &tc)) != CCR_OK)
            drv_fail(PROG, ctx, s, "test");
        double ppl = exp(tn / (double)tc);
        fprintf(stderr, "%s: w_importance %g w_load %g: test ppl %.2f | CV(imp) %.3f CV(load) "
                "%.3f CV(count) %.3f max/mean load %.2f count %.2f | paper %.1f %.2f %.2f %.2f\n",
                PROG, set[0], set[1], ppl, ts.cv_importance, ts.cv_load, ts.cv_load_count,
                ts.max_mean_load, ts.max_mean_count, set[2], set[3], set[4], set[5]);
        ccr_record_clear(r);
        s = drv_record_base(r, PROG, be, o.seed);
        if (s == CCR_OK) s = ccr_record_add_str(r, "model", "lstm-topk-lstm");
        if (s == CCR_OK) s = drv_record_gate(r, &c.cond);
        if (s == CCR_OK) s = ccr_record_add_int(r, "setting", (int64_t)o.which[w]);
        if (s == CCR_OK) s = ccr_record_add_str(r, "corpus", o.corpus);
        if (s == CCR_OK) s = ccr_record_add_int(r, "vocab", (int64_t)c.vocab);
        if (s == CCR_OK) s = ccr_record_add_int(r, "n_train", (int64_t)cp->n_train);
        if (s == CCR_OK) s = ccr_record_add_int(r, "n_test", (int64_t)cp->n_test);
        if (s == CCR_OK) s = ccr_record_add_int(r, "d", (int64_t)c.d);
        if (s == CCR_OK) s = ccr_record_add_int(r, "batch", (int64_t)c.batch);
        if (s == CCR_OK) s = ccr_record_add_int(r, "unroll", (int64_t)c.unroll);
        if (s == CCR_OK) s = ccr_record_add_int(r, "epochs", (int64_t)o.epochs);
        if (s == CCR_OK) s = ccr_record_add_int(r, "steps", (int64_t)ts.steps);
        if (s == CCR_OK) s = ccr_record_add_int(r, "steps_averaged", (int64_t)ts.averaged);
        if (s == CCR_OK) s = ccr_record_add_double(r, "lr", o.lr);
        if (s == CCR_OK) s = ccr_record_add_double(r, "dropout", c.dropout);
        if (s == CCR_OK) s = ccr_record_add_int(r, "params", (int64_t)lm_model_n_params(m, true));
        if (s == CCR_OK) s = ccr_record_add_int(r, "params_total", (int64_t)lm_model_n_params(m, false));
        if (s == CCR_OK) s = ccr_record_add_double(r, "flops_per_example", lm_model_flops_fwd(m));
        if (s == CCR_OK) s = ccr_record_add_double(r, "flops_analytic", lm_model_flops_fwd(m));
        if (s == CCR_OK) s = ccr_record_add_double(r, "flops_counted", ts.flops_counted);
        if (s == CCR_OK) s = ccr_record_add_double(r, "test_ppl", ppl);
        if (s == CCR_OK) s = ccr_record_add_double(r, "train_ppl", exp(ts.train_nll));
        if (s == CCR_OK) s = ccr_record_add_double(r, "aux_loss", ts.aux_loss);
        if (s == CCR_OK) s = ccr_record_add_double(r, "cv_importance", ts.cv_importance);
        if (s == CCR_OK) s = ccr_record_add_double(r, "cv_load", ts.cv_load);
        if (s == CCR_OK) s = ccr_record_add_double(r, "cv_load_count", ts.cv_load_count);
        if (s == CCR_OK) s = ccr_record_add_double(r, "max_mean_load", ts.max_mean_load);
        if (s == CCR_OK) s = ccr_record_add_double(r, "max_mean_count", ts.max_mean_count);
        if (s == CCR_OK) s = ccr_record_add_double(r, "paper_test_ppl", set[2]);
        if (s == CCR_OK) s = ccr_record_add_double(r, "paper_cv_importance", set[3]);
        if (s == CCR_OK) s = ccr_record_add_double(r, "paper_cv_load", set[4]);
        if (s == CCR_OK) s = ccr_record_add_double(r, "paper_max_mean_load", set[5]);
        if (s == CCR_OK) s = ccr_record_add_double(r, "train_seconds", train_s);
        if (s == CCR_OK) s = ccr_record_add_double(r, "seconds", drv_now() - t0);
        drv_write_record(PROG, ctx, s, out, r);
        ccr_optim_free(opt);
        lm_model_free(m);
    }
    ccr_corpus_free(cp);
    drv_teardown(PROG, ctx, be, rng, out, r);
    return 0;
}
