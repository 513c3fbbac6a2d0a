/*
 * ccr-lm - Shazeer et al.'s (2017) language-model series scaled to a small
 * machine: embedding -> LSTM -> conditional layer -> LSTM -> softmax, word
 * level, on Debian's GCIDE dictionary (any text file with --corpus).  The
 * default run trains the Table 7 series at one ops/timestep budget (MoE-4,
 * -32, -256 flat, -256-h, -1024-h and the MoE-1-Wide, MoE-1-Deep and
 * 4xLSTM baselines) and writes one JSONL record per model: test perplexity,
 * parameters excluding embedding and softmax, ops/timestep by the paper's
 * rules, forward FLOPs per token counted from the executed routing tables
 * and analytic, wall time.  --accounting-only prints the parameter and ops
 * accounting without training, for our models or (--paper NAME) for a
 * Table 7/8 model at paper scale.
 *
 * Under mpirun (-np P > 1, MPI build): the --batch streams are split over
 * the ranks in rank order (rank r takes its contiguous share; at least one
 * each), the conditional layer is expert-parallel and the rest
 * data-parallel (lm_model's cfg.comm), so training gives the perplexities
 * of one process with the whole batch (to float rounding).  Rank 0 alone
 * prints and writes --out, with ranks = P and rank 0's communication per
 * training step (alltoall/allreduce bytes, seconds in each); the other
 * ranks write nothing.  --backend cuda is refused with P > 1;
 * --accounting-only prints on rank 0.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "outputs.h"
#include "lm_model.h"

#define PROG "ccr-lm"
#define MAX_MODELS 16

static void usage(void)
{
    printf(
        "usage: ccr-lm [options]\n"
        "Trains Shazeer's LSTM-MoE-LSTM language models (Table 7 series, scaled);\n"
        "one JSONL record per model.\n\n"
        "  --corpus FILE        text file, gzip or plain [/usr/share/dictd/gcide.dict.dz]\n"
        "  --vocab N            vocabulary incl. <eos>, <unk> [10000]\n"
        "  --max-tokens N       tokens read from the corpus, 0 = all [300000]\n"
        "  --valid-frac X       sentences held out for validation [0.02]\n"
        "  --test-frac X        sentences held out for test [0.05]\n"
        "  --split-seed N       seed of the sentence split [1]\n"
        "  --models LIST        comma-separated, from: moe-4 moe-32 moe-256 moe-256-h\n"
        "                       moe-1024-h moe-4096-h moe-1-wide moe-1-deep 4xlstm 2xlstm\n"
        "                       [moe-4,moe-32,moe-256,moe-256-h,moe-1024-h,moe-1-wide,\n"
        "                        moe-1-deep,4xlstm]\n"
        "  --d N                embedding/LSTM/MoE width [64]\n"
        "  --expert-hidden N    expert hidden width h (wide: 4h; deep: 4 layers of h) [128]\n"
        "  --branching N        first-level groups of the -h models [16]\n"
        "  --batch N            streams per batch [32]\n"
        "  --unroll N           BPTT steps [20]\n"
        "  --epochs N           passes over the training split [1]\n"
        "  --lr X               Adam learning rate after warm-up [0.004]\n"
        "  --warmup N           linear warm-up steps, then lr*sqrt(warmup/step) [200]\n"
        "  --clip X             global gradient-norm clip, 0 = off [1]\n"
        "  --optim-sparse       lazy Adam: only the experts a batch used are updated,\n"
        "                       each with its own step count (docs/GATES.md) [dense]\n"
        "  --dropout X          drop probability on every layer output [0.1]\n"
        "  --no-sigmoid         no sigmoid on the MoE output\n"
        "  --w-importance X --w-load X --noise-eps X --z-loss X   gate losses [0.1 0.1 0.01 0]\n"
        "  --gate NAME [gate options]  train one model with this conditional layer\n"
        "                       instead of the series; gate options:\n%s"
        "  --seed N             GSL RNG seed (init, dropout, noise) [1]\n"
        "  --backend NAME       cpu | cuda (device 0: parameters and activations on the\n"
        "                       GPU; dropout masks and gate noise still drawn on the host) [cpu]\n"
        "  --out FILE           JSONL results [none]\n"
        "  --quick              seconds-long smoke run (small model, 30k tokens;\n"
        "                       options given explicitly still apply)\n"
        "  --accounting-only    print params and ops/timestep (JSON per model), no training\n"
        "  --paper NAME|list    with --accounting-only: a Table 7/8 model at paper scale:\n"
        "                       moe-4 moe-32 moe-256 moe-256-h moe-1024-h moe-4096-h\n"
        "                       moe-256-h-100b moe-1024-h-100b moe-4096-h-100b\n"
        "                       moe-16384-h-100b moe-65536-h-100b moe-131072-h-100b\n"
        "                       moe-1-wide moe-1-deep 4xlstm-512 lstm-{512,1024,2048}-512\n"
        "  --help               this text\n\n"
        "Accounting JSON: params and ops_per_timestep are exact counts (units);\n"
        "params_M and ops_per_timestep_M the same in millions.  Paper rules: multiply-\n"
        "adds per timestep, forward, excluding embedding and softmax, no biases.\n",
        drv_gate_usage);
}

typedef struct options {
    const char *corpus, *out, *paper, *models[MAX_MODELS];
    size_t n_models, vocab, max_tokens, d, hidden, branching, batch, unroll, epochs, warmup;
    double valid_frac, test_frac, lr, clip, dropout;
    unsigned long seed, split_seed;
    bool sigmoid, accounting, gate_set, optim_sparse, cuda;
    ccr_cond_config cond;
} options;

static const char *const known[] = {"moe-4", "moe-32", "moe-256", "moe-256-h", "moe-1024-h",
                                    "moe-4096-h", "moe-1-wide", "moe-1-deep", "4xlstm",
                                    "2xlstm", NULL};

static void parse_models(options *o, const char *v)
{
    drv_span item[MAX_MODELS];
    o->n_models = drv_parse_list(PROG, "--models", v, item, MAX_MODELS);
    for (size_t j = 0; j < o->n_models; j++) {
        size_t i = 0;
        while (known[i] != NULL && !drv_span_is(item[j], known[i]))
            i++;
        if (known[i] == NULL)
            drv_usage_error(PROG, "unknown model '%.*s' in --models", (int)item[j].len,
                            item[j].p);
        o->models[j] = known[i];
    }
}

static void parse(int argc, char **argv, options *o)
{
    *o = (options){.corpus = "/usr/share/dictd/gcide.dict.dz", .vocab = 10000,
                   .max_tokens = 300000, .d = 64, .hidden = 128, .branching = 16,
                   .batch = 32, .unroll = 20, .epochs = 1, .warmup = 200, .valid_frac = 0.02,
                   .test_frac = 0.05, .lr = 0.004, .clip = 1.0, .dropout = 0.1, .seed = 1,
                   .split_seed = 1, .sigmoid = true};
    parse_models(o, "moe-4,moe-32,moe-256,moe-256-h,moe-1024-h,moe-1-wide,moe-1-deep,4xlstm");
    o->cond = drv_gate_defaults();
    bool bank_set = false, used, hidden_set = false;
    if (drv_quick_requested(argc, argv)) {   /* smaller defaults; explicit options still win */
        o->vocab = 2000, o->max_tokens = 30000, o->d = 32, o->hidden = 64, o->batch = 16;
        o->unroll = 10, o->epochs = 1, o->warmup = 20, o->test_frac = 0.1, o->branching = 4;
        parse_models(o, "moe-32,moe-256-h,moe-1-wide,moe-1-deep,4xlstm");
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (drv_parse_gate_option(PROG, a, v, &o->cond, &used)) {
            bank_set = bank_set || strcmp(a, "--bank") == 0;
            o->gate_set = o->gate_set || strcmp(a, "--gate") == 0;
            hidden_set = hidden_set || strcmp(a, "--expert-hidden") == 0;
            i += used;
            continue;
        }
        if (drv_parse_common(PROG, a, usage)) {
            continue;   /* --quick: applied before the loop */
        } else if (strcmp(a, "--accounting-only") == 0) {
            o->accounting = true;
            continue;
        } else if (strcmp(a, "--no-sigmoid") == 0) {
            o->sigmoid = false;
            continue;
        } else if (strcmp(a, "--optim-sparse") == 0) {
            o->optim_sparse = true;
            continue;
        }
        i++;
        if (strcmp(a, "--corpus") == 0 && v) o->corpus = v;
        else if (strcmp(a, "--out") == 0 && v) o->out = v;
        else if (strcmp(a, "--paper") == 0 && v) o->paper = v;
        else if (strcmp(a, "--models") == 0) parse_models(o, v);
        else if (drv_parse_backend(PROG, a, v, &o->cuda)) { /* o->cuda set */ }
        else if (strcmp(a, "--vocab") == 0) o->vocab = drv_parse_size(PROG, a, v, 3);
        else if (strcmp(a, "--max-tokens") == 0) o->max_tokens = drv_parse_size(PROG, a, v, 0);
        else if (strcmp(a, "--d") == 0) o->d = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--branching") == 0) o->branching = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--batch") == 0) o->batch = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--unroll") == 0) o->unroll = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--epochs") == 0) o->epochs = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--warmup") == 0) o->warmup = drv_parse_size(PROG, a, v, 0);
        else if (strcmp(a, "--seed") == 0) o->seed = drv_parse_seed(PROG, a, v);
        else if (strcmp(a, "--split-seed") == 0) o->split_seed = drv_parse_seed(PROG, a, v);
        else if (strcmp(a, "--valid-frac") == 0) o->valid_frac = drv_parse_double(PROG, a, v, 0, 0.5);
        else if (strcmp(a, "--test-frac") == 0) o->test_frac = drv_parse_double(PROG, a, v, 1e-6, 0.5);
        else if (strcmp(a, "--lr") == 0) o->lr = drv_parse_double(PROG, a, v, 1e-9, 10);
        else if (strcmp(a, "--clip") == 0) o->clip = drv_parse_double(PROG, a, v, 0, 1e9);
        else if (strcmp(a, "--dropout") == 0) o->dropout = drv_parse_double(PROG, a, v, 0, 0.95);
        else drv_bad_option(PROG, a, v);
    }
    drv_gate_finish(PROG, &o->cond, bank_set);
    if (!o->gate_set) {
        /* The named models fix E, k, groups, k2 and the FFN bank; their gates
         * (topk, hmoe, none) read only these options. */
        drv_gate_refuse_given(PROG, CCR_GATE_OPT_W_IMPORTANCE | CCR_GATE_OPT_W_LOAD |
                                        CCR_GATE_OPT_Z_LOSS | CCR_GATE_OPT_NOISE_EPS |
                                        CCR_GATE_OPT_RANDOMIZE,
                              "the --models fix it or do not use it (choose a layer with --gate)");
        if (bank_set)
            drv_usage_error(PROG, "--bank: the --models use FFN experts (choose a layer with --gate)");
    }
    if (hidden_set)
        o->hidden = o->cond.hidden;
    if (o->paper != NULL && !o->accounting)
        drv_usage_error(PROG, "--paper needs --accounting-only");
    if (o->max_tokens == 1)
        drv_usage_error(PROG, "--max-tokens must be 0 or >= 2");
}

/* The configuration of a named model at our scale. */
static lm_config model_config(const options *o, const char *name)
{
    lm_config c = lm_config_default();
    c.vocab = o->vocab, c.d = o->d, c.batch = o->batch, c.unroll = o->unroll;
    c.dropout = o->dropout, c.moe_sigmoid = o->sigmoid;
    c.deep_hidden = o->hidden, c.deep_layers = 4;
    c.cond = o->cond;
    c.cond.bank = CCR_BANK_FFN;
    c.cond.hidden = o->hidden;
    ccr_gate_config *g = &c.cond.gate_cfg;
    if (name == NULL) {            /* --gate: the configured layer as given */
        c.cond = o->cond;
        c.cond.hidden = o->hidden;   /* --expert-hidden, else the driver's width */
    } else if (strncmp(name, "moe-1-", 6) == 0 || strstr(name, "lstm") != NULL) {
        c.cond.gate = ccr_gate_type_find("none");
        g->n_experts = 1;
        c.cond.hidden = 4 * o->hidden;
        if (strcmp(name, "moe-1-deep") == 0)
            c.blocks[1] = LM_BLOCK_DEEP;
        if (strcmp(name, "4xlstm") == 0) {
            c.n_blocks = 4;
            c.blocks[1] = c.blocks[2] = LM_BLOCK_LSTM;
            c.blocks[3] = LM_BLOCK_LSTM;
        }
        if (strcmp(name, "2xlstm") == 0) {
            c.n_blocks = 2;
            c.blocks[1] = LM_BLOCK_LSTM;
        }
    } else {
        size_t E = strtoul(name + 4, NULL, 10);
        bool hier = name[strlen(name) - 1] == 'h';
        c.cond.gate = ccr_gate_type_find(hier ? "hmoe" : "topk");
        g->n_experts = E;
        if (hier)
            g->k_groups = 2;   /* groups per example, 2 experts in each */
        else
            g->k = 4;
        g->k2 = 2;
        g->n_groups = o->branching;
    }
    return c;
}

static void print_arch(const char *key, const lm_arch *a, const lm_model *m, ccr_ctx *ctx)
{
    double p, ops;
    lm_accounting(a, &p, &ops);
    ccr_record *r;
    char *line;
    if (ccr_record_init(ctx, &r) != CCR_OK)
        exit(1);
    ccr_status s = ccr_record_add_str(r, key, a->name);
    if (s == CCR_OK && m == NULL) s = ccr_record_add_str(r, "table", a->table);
    if (s == CCR_OK && m != NULL)
        s = ccr_record_add_int(r, "params_exact", (int64_t)lm_model_n_params(m, true));
    if (s == CCR_OK) s = ccr_record_add_int(r, "params", (int64_t)llround(p));
    if (s == CCR_OK) s = ccr_record_add_int(r, "ops_per_timestep", (int64_t)llround(ops));
    if (s == CCR_OK) s = ccr_record_add_double(r, "params_M", p / 1e6);
    if (s == CCR_OK) s = ccr_record_add_double(r, "ops_per_timestep_M", ops / 1e6);
    if (s == CCR_OK && m == NULL) s = ccr_record_add_double(r, "table_params_M", a->table_params_m);
    if (s == CCR_OK && m == NULL) s = ccr_record_add_double(r, "table_ops_M", a->table_ops_m);
    if (s == CCR_OK && m != NULL) s = ccr_record_add_double(r, "flops_analytic", lm_model_flops_fwd(m));
    if (s != CCR_OK || ccr_record_to_string(r, &line) != CCR_OK)
        exit(1);
    printf("%s\n", line);
    free(line);
    ccr_record_free(r);
}

static lm_model *alloc_model(ccr_backend *be, const lm_config *c, const char *name)
{
    lm_model *m;
    ccr_status s = lm_model_alloc(be, c, &m);
    if (s == CCR_EINVAL)
        drv_usage_error(PROG, "model %s: %s", name, ccr_ctx_errmsg(ccr_backend_ctx(be)));
    if (s != CCR_OK)
        drv_fail(PROG, ccr_backend_ctx(be), s, "model");
    return m;
}

static int accounting(const options *o, ccr_backend *be)
{
    ccr_ctx *ctx = ccr_backend_ctx(be);
    if (o->paper != NULL && strcmp(o->paper, "list") == 0) {
        for (const lm_arch *a = lm_paper_archs(); a->name != NULL; a++)
            print_arch("paper", a, NULL, ctx);
    } else if (o->paper != NULL) {
        const lm_arch *a = lm_paper_find(o->paper);
        if (a == NULL)
            drv_usage_error(PROG, "unknown --paper model '%s' (see --paper list)", o->paper);
        print_arch("paper", a, NULL, ctx);
    } else {
        for (size_t i = 0; i < (o->gate_set ? 1 : o->n_models); i++) {
            const char *name = o->gate_set ? NULL : o->models[i];
            lm_config c = model_config(o, name);
            lm_model *m = alloc_model(be, &c, name ? name : o->cond.gate->name);
            lm_arch a = lm_config_arch(&c);
            a.name = name ? name : o->cond.gate->name;
            print_arch("model", &a, m, ctx);
            lm_model_free(m);
        }
    }
    return 0;
}

typedef struct progress_ud {
    const char *name;
    bool lead;                  /* rank 0 (or one process): prints */
    double t0, nll, n, eval_s;  /* eval_s: time in epoch_end, not training */
    double valid_nll;           /* mean validation NLL after the last pass (NaN: none) */
    const ccr_corpus *cp;
    size_t epochs;
    double *train_ppl, *valid_ppl;  /* [epochs], filled by epoch_end */
} progress_ud;

/* After every pass: the pass's training perplexity and the validation
 * perplexity (NaN without a validation split), for the learning curve. */
static ccr_status epoch_end(void *ud, lm_model *m, size_t epoch, double train_nll)
{
    progress_ud *p = ud;
    double vn = 0.0, t = drv_now();
    size_t vc = 0;
    if (p->cp->n_valid > 0) {
        ccr_status s = lm_evaluate(m, p->cp->valid, p->cp->n_valid, &vn, &vc);
        if (s != CCR_OK)
            return s;
    }
    p->train_ppl[epoch] = exp(train_nll);
    p->valid_nll = vc ? vn / (double)vc : NAN;
    p->valid_ppl[epoch] = exp(p->valid_nll);
    p->eval_s += drv_now() - t;
    if (!p->lead)
        return CCR_OK;
    drv_progress_end();
    fprintf(stderr, "%s: %s epoch %zu/%zu: train ppl %.2f valid ppl %.2f (%.0fs)\n", PROG, p->name,
            epoch + 1, p->epochs, p->train_ppl[epoch], p->valid_ppl[epoch], drv_now() - p->t0);
    return CCR_OK;
}

static void progress(void *ud, size_t step, size_t total, const lm_fwd_stats *st)
{
    progress_ud *p = ud;
    p->nll += st->nll_sum;
    p->n += (double)st->n_scored;
    if (p->lead && (step % 10 == 0 || step == total)) {
        char label[64], extra[64];
        snprintf(label, sizeof label, "%s step", p->name);
        snprintf(extra, sizeof extra, "train ppl %.1f", exp(p->nll / (p->n > 0 ? p->n : 1)));
        drv_progress(label, step, total, p->t0, extra);
        p->nll = p->n = 0.0;
    }
}

static void record(ccr_record *r, const options *o, const ccr_backend *be, const char *name,
                   const lm_config *c, const lm_model *m, const ccr_corpus *cp,
                   const lm_train_summary *ts, const progress_ud *pu, double valid_nll,
                   double test_nll, double test_n, double train_s, double wall_s, int ranks,
                   const ccr_comm_stats *cs)
{
    double p, ops;
    lm_arch arch = lm_config_arch(c);
    lm_accounting(&arch, &p, &ops);
    ccr_ctx *ctx = ccr_backend_ctx(be);
    ccr_record_clear(r);
    ccr_status s = drv_record_base(r, PROG, be, o->seed);
    if (s == CCR_OK) s = ccr_record_add_str(r, "model", name);
    if (s == CCR_OK && lm_model_cond(m) != NULL) s = drv_record_gate(r, &c->cond);
    if (s == CCR_OK) s = ccr_record_add_str(r, "corpus", o->corpus);
    if (s == CCR_OK) s = ccr_record_add_int(r, "vocab", (int64_t)c->vocab);
    if (s == CCR_OK) s = ccr_record_add_int(r, "n_train", (int64_t)cp->n_train);
    if (s == CCR_OK) s = ccr_record_add_int(r, "n_valid", (int64_t)cp->n_valid);
    if (s == CCR_OK) s = ccr_record_add_int(r, "n_test", (int64_t)cp->n_test);
    if (s == CCR_OK) s = ccr_record_add_int(r, "n_unk", (int64_t)cp->n_unk);
    if (s == CCR_OK) s = ccr_record_add_int(r, "d", (int64_t)c->d);
    if (s == CCR_OK) s = ccr_record_add_int(r, "hidden", (int64_t)o->hidden);
    if (s == CCR_OK) s = ccr_record_add_int(r, "batch", (int64_t)o->batch);  /* global */
    if (s == CCR_OK) s = ccr_record_add_int(r, "unroll", (int64_t)c->unroll);
    if (s == CCR_OK) s = ccr_record_add_int(r, "epochs", (int64_t)o->epochs);
    if (s == CCR_OK) s = ccr_record_add_int(r, "steps", (int64_t)ts->steps);
    if (s == CCR_OK) s = ccr_record_add_double(r, "lr", o->lr);
    if (s == CCR_OK) s = ccr_record_add_int(r, "warmup", (int64_t)o->warmup);
    if (s == CCR_OK) s = ccr_record_add_double(r, "clip", o->clip);
    if (s == CCR_OK) s = ccr_record_add_bool(r, "optim_sparse", o->optim_sparse);
    if (s == CCR_OK) s = ccr_record_add_double(r, "dropout", c->dropout);
    if (s == CCR_OK) s = ccr_record_add_bool(r, "moe_sigmoid", c->moe_sigmoid);
    if (s == CCR_OK) s = ccr_record_add_int(r, "params", (int64_t)lm_model_n_params(m, true));
    if (s == CCR_OK) s = ccr_record_add_int(r, "params_total", (int64_t)lm_model_n_params(m, false));
    if (s == CCR_OK) s = ccr_record_add_int(r, "params_paper_rule", (int64_t)llround(p));
    if (s == CCR_OK) s = ccr_record_add_int(r, "ops_per_timestep", (int64_t)llround(ops));
    if (s == CCR_OK) s = ccr_record_add_double(r, "flops_per_example", lm_model_flops_fwd(m));
    if (s == CCR_OK) s = ccr_record_add_double(r, "flops_analytic", lm_model_flops_fwd(m));
    if (s == CCR_OK) s = ccr_record_add_double(r, "flops_counted", ts->flops_counted);
    if (s == CCR_OK) s = ccr_record_add_double(r, "train_ppl", exp(ts->train_nll));
    if (s == CCR_OK) s = ccr_record_add_double(r, "valid_ppl", exp(valid_nll));
    if (s == CCR_OK) s = ccr_record_add_doubles(r, "train_ppl_epochs", pu->train_ppl, pu->epochs);
    if (s == CCR_OK) s = ccr_record_add_doubles(r, "valid_ppl_epochs", pu->valid_ppl, pu->epochs);
    if (s == CCR_OK) s = ccr_record_add_double(r, "test_ppl", exp(test_nll));
    if (s == CCR_OK) s = ccr_record_add_double(r, "test_nll", test_nll);
    if (s == CCR_OK) s = ccr_record_add_int(r, "test_tokens", (int64_t)test_n);
    if (s == CCR_OK) s = ccr_record_add_double(r, "aux_loss", ts->aux_loss);
    if (s == CCR_OK) s = ccr_record_add_double(r, "cv_importance", ts->cv_importance);
    if (s == CCR_OK) s = ccr_record_add_double(r, "cv_load", ts->cv_load);
    if (s == CCR_OK) s = ccr_record_add_double(r, "cv_load_count", ts->cv_load_count);
    if (s == CCR_OK) s = ccr_record_add_double(r, "max_mean_load", ts->max_mean_load);
    if (s == CCR_OK) s = ccr_record_add_double(r, "max_mean_count", ts->max_mean_count);
    if (s == CCR_OK) s = ccr_record_add_double(r, "grad_norm", ts->grad_norm);
    if (s == CCR_OK) s = ccr_record_add_double(r, "train_seconds", train_s);
    if (s == CCR_OK) s = ccr_record_add_double(r, "seconds", wall_s);
    /* Processes and rank 0's communication during training (zeros in one
     * process). */
    const double ns = ts->steps > 0 ? (double)ts->steps : 1.0;
    if (s == CCR_OK) s = ccr_record_add_int(r, "ranks", ranks);
    if (s == CCR_OK)
        s = ccr_record_add_double(r, "alltoall_bytes_per_step", cs->alltoall_bytes / ns);
    if (s == CCR_OK)
        s = ccr_record_add_double(r, "allreduce_bytes_per_step", cs->allreduce_bytes / ns);
    if (s == CCR_OK) s = ccr_record_add_double(r, "seconds_alltoall", cs->alltoall_seconds);
    if (s == CCR_OK) s = ccr_record_add_double(r, "seconds_allreduce", cs->allreduce_seconds);
    if (s == CCR_OK)
        s = ccr_record_add_double(r, "seconds_compute",
                                  train_s - cs->alltoall_seconds - cs->allreduce_seconds);
    if (s != CCR_OK)
        drv_fail(PROG, ctx, s, "record");
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
    const int P = drv_launcher_size(), rank = drv_launcher_rank();
    const bool lead = rank == 0;
    if (P > 1 && o.cuda)
        drv_usage_error(PROG, "--backend cuda under mpirun is not supported yet (%d processes)", P);
    if (P > 1 && !o.accounting && (size_t)P > o.batch)
        drv_usage_error(PROG, "--batch %zu is smaller than the %d processes", o.batch, P);
    if (!lead)
        o.out = NULL;  /* rank 0 writes */
    drv_setup(PROG, o.cuda, o.split_seed, &ctx, &be, &rng);   /* seeded for the split */
    if (o.accounting) {
        int rc = lead ? accounting(&o, be) : 0;
        drv_teardown(PROG, ctx, be, rng, NULL, NULL);
        return rc;
    }
    ccr_comm *comm = drv_comm_start(PROG, ctx);  /* NULL in one process */
    /* This rank's streams [b_lo, b_hi) of the global batch. */
    const size_t b_lo = o.batch * (size_t)rank / (size_t)P;
    const size_t b_hi = o.batch * (size_t)(rank + 1) / (size_t)P;
    ccr_status s;

    /* Corpus and every model configuration are checked before --out exists. */
    if (access(o.corpus, R_OK) != 0)
        drv_usage_error(PROG, "cannot read --corpus %s", o.corpus);
    ccr_corpus_config cc = {.level = CCR_CORPUS_WORD, .vocab_size = o.vocab,
                            .max_tokens = o.max_tokens};
    ccr_corpus *cp;
    double t_load = drv_now();
    if ((s = ccr_corpus_load(ctx, o.corpus, &cc, &cp)) != CCR_OK)
        drv_input_error(PROG, ctx, s, "cannot load --corpus %s", o.corpus);
    if ((s = ccr_corpus_split(ctx, cp, rng, o.valid_frac, o.test_frac)) != CCR_OK)
        drv_input_error(PROG, ctx, s, "split");
    if (cp->n_train < 2 || cp->n_test < 1)
        drv_usage_error(PROG, "corpus too small: %zu train, %zu test tokens", cp->n_train,
                        cp->n_test);
    size_t n_models = o.gate_set ? 1 : o.n_models;
    for (size_t i = 0; i < n_models; i++) {
        lm_config c = model_config(&o, o.gate_set ? NULL : o.models[i]);
        c.vocab = cp->vocab_size;
        c.batch = b_hi - b_lo, c.comm = comm;
        lm_model_free(alloc_model(be, &c, o.gate_set ? o.cond.gate->name : o.models[i]));
    }
    if (lead)
        fprintf(stderr, "%s: %s: %zu tokens (train %zu, valid %zu, test %zu), vocab %zu, "
            "<unk> %.2f%%, %.1fs; %s; %s\n", PROG, o.corpus, cp->n_tokens, cp->n_train,
            cp->n_valid, cp->n_test, cp->vocab_size,
            cp->n_tokens ? 100.0 * (double)cp->n_unk / (double)cp->n_tokens : 0.0,
            drv_now() - t_load, ccr_backend_describe(be), drv_machine());
    if (lead && P > 1)
        fprintf(stderr, "%s: %d processes, %zu streams each (or one more)\n", PROG, P,
                o.batch / (size_t)P);
    ccr_jsonl *out;
    ccr_record *rec;
    drv_open_out(PROG, ctx, o.out, &rec, &out);

    for (size_t i = 0; i < n_models; i++) {
        const char *name = o.gate_set ? o.cond.gate->name : o.models[i];
        lm_config c = model_config(&o, o.gate_set ? NULL : o.models[i]);
        c.vocab = cp->vocab_size;
        c.batch = b_hi - b_lo, c.comm = comm;
        double t0 = drv_now();
        gsl_rng_set(rng, o.seed);
        lm_model *m = alloc_model(be, &c, name);
        ccr_optim *opt;
        ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
        oc.lr = (float)o.lr;
        oc.sparse = o.optim_sparse;
        if ((s = lm_model_init_params(m, rng)) != CCR_OK ||
            (s = ccr_optim_init(lm_model_arena(m), &oc, &opt)) != CCR_OK)
            drv_fail(PROG, ctx, s, "init");
        progress_ud pu = {.name = name, .lead = lead, .t0 = drv_now(), .cp = cp, .epochs = o.epochs,
                          .train_ppl = calloc(o.epochs, sizeof(double[2]))};
        if (pu.train_ppl == NULL)
            drv_fail(PROG, ctx, CCR_ENOMEM, "per-epoch perplexities");
        pu.valid_ppl = pu.train_ppl + o.epochs;
        lm_train_args ta = {.tok = cp->train, .n = cp->n_train, .epochs = o.epochs,
                            .lr = o.lr, .clip = o.clip, .warmup = o.warmup,
                            .progress = progress, .epoch_end = epoch_end, .ud = &pu};
        lm_stream st;
        lm_stream_init(&st, cp->train, cp->n_train, o.batch, c.unroll);
        ta.avg_last = st.steps;  /* diagnostics: the last epoch */
        lm_train_summary ts;
        ccr_comm_stats_reset(comm);
        if ((s = lm_train_run(m, opt, rng, &ta, &ts)) != CCR_OK)
            drv_fail(PROG, ctx, s, "training");
        double train_s = drv_now() - pu.t0 - pu.eval_s;
        ccr_comm_stats cs = {0};  /* training's, validation passes included */
        if (comm != NULL)
            ccr_comm_stats_get(comm, &cs);
        if (lead)
            drv_progress_end();
        double tn = 0;
        size_t tc = 0;
        if ((s = lm_evaluate(m, cp->test, cp->n_test, &tn, &tc)) != CCR_OK)
            drv_fail(PROG, ctx, s, "test");
        double vnll = pu.valid_nll, tnll = tn / (double)tc;  /* validation: the last epoch_end */
        lm_arch arch = lm_config_arch(&c);
        double pp, ops;
        lm_accounting(&arch, &pp, &ops);
        if (lead)
            fprintf(stderr, "%s: %s params %zu (excl. emb/softmax), ops/timestep %.0f, train ppl "
                "%.2f valid ppl %.2f test ppl %.2f, %.1fs train, %.0f tok/s\n", PROG, name,
                lm_model_n_params(m, true), ops, exp(ts.train_nll),
                exp(vnll), exp(tnll), train_s,
                (double)(ts.steps * o.batch * c.unroll) / train_s);
        record(rec, &o, be, name, &c, m, cp, &ts, &pu, vnll, tnll, (double)tc, train_s,
               drv_now() - t0, P, &cs);
        drv_write_record(PROG, ctx, CCR_OK, out, rec);
        free(pu.train_ppl);
        ccr_optim_free(opt);
        lm_model_free(m);
    }
    ccr_corpus_free(cp);
    drv_comm_end(comm);
    drv_teardown(PROG, ctx, be, rng, out, rec);
    return 0;
}
