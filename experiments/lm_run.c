/*
 * lm_run.c - what the language-model drivers share besides the model: the
 * Shazeer Tables 7-8 ops/params accounting (PAPERS.md 2.6) and the scaled
 * models' place in it, token streams cut into batch x unroll windows with
 * padding, the learning-rate schedule, one training step (zero gradients,
 * forward, backward, clip, Adam) and the perplexity evaluation.
 */
#include "lm_model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* ---- Tables 7-8 accounting ------------------------------------------------- */

void lm_accounting(const lm_arch *a, double *params, double *ops)
{
    double d = (double)a->d, n = (double)a->cells, rec = a->proj ? d : n;
    double lstm = (double)a->n_lstm * (4.0 * (d + rec) * n + (a->proj ? n * d : 0.0));
    double p = lstm, o = lstm, h = (double)a->hidden;
    if (a->mid == LM_MID_MOE) {
        double expert = 2.0 * d * h, E = (double)a->experts, k = (double)a->k;
        if (!a->gated) {
            o += expert;
            p += E * expert;
        } else if (a->groups == 0) {
            o += k * expert + 2.0 * d * E;
            p += E * expert + 2.0 * d * E;
        } else {
            double ga = (double)a->groups, gb = E / ga;
            o += k * (double)a->k2 * expert + 2.0 * d * ga + k * 2.0 * d * gb;
            p += E * expert + 2.0 * d * ga + ga * 2.0 * d * gb;
        }
    } else if (a->mid == LM_MID_DEEP) {
        double deep = 2.0 * d * h + (double)(a->deep_layers - 1) * h * h;
        o += deep;
        p += deep;
    }
    *params = p;
    *ops = o;
}

#define FLAT(nm, tb, E, po, pp) {nm, tb, 512, 512, 2, false, LM_MID_MOE, true, E, 0, 4, 1, 1024, 0, po, pp}
#define HIER(nm, tb, E, a, po, pp) {nm, tb, 512, 512, 2, false, LM_MID_MOE, true, E, a, 2, 2, 1024, 0, po, pp}
#define LSTM1(nm, cells, po) {nm, "7", 512, cells, 1, true, LM_MID_NONE, false, 0, 0, 0, 0, 0, 0, po, po}
static const lm_arch paper_archs[] = {
    FLAT("moe-4", "7", 4, 8.4, 8.4),
    FLAT("moe-32", "7,8", 32, 8.4, 37.8),
    FLAT("moe-256", "7", 256, 8.6, 272.9),
    HIER("moe-256-h", "7", 256, 16, 8.4, 272.9),
    HIER("moe-1024-h", "7", 1024, 16, 8.5, 1079.0),
    HIER("moe-4096-h", "7", 4096, 16, 8.9, 4303.4),
    HIER("moe-256-h-100b", "8", 256, 32, 8.4, 272.9),
    HIER("moe-1024-h-100b", "8", 1024, 32, 8.5, 1079.0),
    HIER("moe-4096-h-100b", "8", 4096, 64, 8.6, 4303.4),
    HIER("moe-16384-h-100b", "8", 16384, 128, 8.8, 17201.0),
    HIER("moe-65536-h-100b", "8", 65536, 256, 9.2, 68791.0),
    HIER("moe-131072-h-100b", "8", 131072, 256, 9.7, 137577.6),
    {"moe-1-wide", "7", 512, 512, 2, false, LM_MID_MOE, false, 1, 0, 1, 1, 4096, 0, 8.4, 8.4},
    {"moe-1-deep", "7", 512, 512, 2, false, LM_MID_DEEP, false, 0, 0, 0, 0, 1024, 4, 8.4, 8.4},
    {"4xlstm-512", "7,8", 512, 512, 4, false, LM_MID_NONE, false, 0, 0, 0, 0, 0, 0, 8.4, 8.4},
    LSTM1("lstm-512-512", 512, 2.4),
    LSTM1("lstm-1024-512", 1024, 4.7),
    LSTM1("lstm-2048-512", 2048, 9.4),
    {NULL, NULL, 0, 0, 0, false, LM_MID_NONE, false, 0, 0, 0, 0, 0, 0, 0, 0},
};

const lm_arch *lm_paper_archs(void) { return paper_archs; }

const lm_arch *lm_paper_find(const char *name)
{
    for (const lm_arch *a = paper_archs; name != NULL && a->name != NULL; a++)
        if (strcmp(a->name, name) == 0)
            return a;
    return NULL;
}

lm_arch lm_config_arch(const lm_config *cfg)
{
    lm_arch a = {.name = "config", .table = "", .d = cfg->d, .cells = cfg->d};
    const ccr_gate_config *g = &cfg->cond.gate_cfg;
    for (size_t i = 0; i < cfg->n_blocks; i++) {
        if (cfg->blocks[i] == LM_BLOCK_LSTM) {
            a.n_lstm++;
        } else if (cfg->blocks[i] == LM_BLOCK_DEEP) {
            a.mid = LM_MID_DEEP;
            a.hidden = cfg->deep_hidden;
            a.deep_layers = cfg->deep_layers;
        } else {
            const char *gn = cfg->cond.gate ? cfg->cond.gate->name : "none";
            a.mid = LM_MID_MOE;
            a.hidden = cfg->cond.hidden;
            a.gated = strcmp(gn, "none") != 0;
            a.experts = a.gated ? g->n_experts : 1;
            a.k = strcmp(gn, "dense") == 0 ? g->n_experts : strcmp(gn, "switch") == 0 ? 1 : g->k;
            a.groups = strcmp(gn, "hmoe") == 0 ? g->n_groups : 0;
            a.k2 = g->k2;
        }
    }
    return a;
}

/* ---- token streams, schedule, training step, evaluation -------------------- */

void lm_stream_init(lm_stream *s, const int32_t *tok, size_t n, size_t batch, size_t unroll)
{
    s->tok = tok;
    s->n = n;
    s->batch = batch;
    s->unroll = unroll;
    s->len = (n + batch - 1) / batch;
    s->steps = (s->len + unroll - 1) / unroll;
}

void lm_stream_batch(const lm_stream *s, size_t step, int32_t *in, int32_t *tgt)
{
    for (size_t t = 0; t < s->unroll; t++)
        for (size_t b = 0; b < s->batch; b++) {
            size_t p = step * s->unroll + t, q = b * s->len + p, r = t * s->batch + b;
            bool ok = p < s->len && q < s->n;
            tgt[r] = ok ? s->tok[q] : -1;
            in[r] = ok && q > 0 ? s->tok[q - 1] : CCR_TOKEN_EOS;
        }
}

double lm_lr(double base, size_t warmup, size_t step)
{
    double s = (double)step + 1.0, w = (double)(warmup ? warmup : 1);
    return s < w ? base * s / w : base * sqrt(w / s);
}

ccr_status lm_train_step(lm_model *m, ccr_optim *opt, const int32_t *in, const int32_t *tgt,
                         gsl_rng *rng, double clip, lm_fwd_stats *st, double *norm)
{
    ccr_arena *a = lm_model_arena(m);
    CCR_TRY(ccr_arena_zero_grad(a));
    CCR_TRY(lm_model_forward(m, in, tgt, true, rng, st));
    CCR_TRY(lm_model_backward(m));
    *norm = 0.0;
    if (clip > 0.0)
        CCR_TRY(lm_model_clip_grad(m, clip, norm));
    return ccr_optim_step(opt);
}

/* Batch buffers: the global batch's ids and targets, then this rank's
 * (without a communicator, one batch twice: the slice is a copy). */
typedef struct lm_batch {
    int32_t *buf, *g_in, *g_tgt, *in, *tgt;
} lm_batch;

static ccr_status lm_batch_alloc(const lm_model *m, const int32_t *tok, size_t n, lm_batch *b,
                                 lm_stream *s)
{
    const lm_config *c = lm_model_config(m);
    size_t G, first, N = c->batch * c->unroll;
    lm_model_streams(m, &G, &first);
    size_t NG = G * c->unroll;
    b->buf = ccr_mallocn(2 * (NG + N), sizeof *b->buf); /* bounded: the model's buffers hold more */
    if (b->buf == NULL)
        return CCR_ENOMEM;
    b->g_in = b->buf, b->g_tgt = b->g_in + NG, b->in = b->g_tgt + NG, b->tgt = b->in + N;
    lm_stream_init(s, tok, n, G, c->unroll);
    return CCR_OK;
}

/* Step k's global batch, and this rank's columns of it. */
static void lm_batch_fill(const lm_model *m, const lm_stream *s, size_t k, lm_batch *b)
{
    lm_stream_batch(s, k, b->g_in, b->g_tgt);
    lm_model_slice(m, b->g_in, b->in);
    lm_model_slice(m, b->g_tgt, b->tgt);
}

ccr_status lm_evaluate(lm_model *m, const int32_t *tok, size_t n, double *nll, size_t *count)
{
    lm_batch bb;
    lm_stream s;
    if (lm_batch_alloc(m, tok, n, &bb, &s) != CCR_OK)
        return CCR_ENOMEM;
    *nll = 0.0;
    *count = 0;
    ccr_status st = lm_model_reset_state(m);
    for (size_t k = 0; k < s.steps && st == CCR_OK; k++) {
        lm_fwd_stats fs;
        lm_batch_fill(m, &s, k, &bb);
        st = lm_model_forward(m, bb.in, bb.tgt, false, NULL, &fs);
        *nll += fs.nll_sum;
        *count += fs.n_scored;
    }
    free(bb.buf);
    ccr_status r = lm_model_reset_state(m);
    return st != CCR_OK ? st : r;
}

ccr_status lm_train_run(lm_model *m, ccr_optim *opt, gsl_rng *rng, const lm_train_args *a,
                        lm_train_summary *out)
{
    const lm_config *c = lm_model_config(m);
    size_t N = c->batch * c->unroll;
    lm_batch bb;
    lm_stream s;
    if (lm_batch_alloc(m, a->tok, a->n, &bb, &s) != CCR_OK)
        return CCR_ENOMEM;
    size_t total = s.steps * a->epochs, from = total > a->avg_last ? total - a->avg_last : 0;
    lm_train_summary sum = {.steps = total};
    double nll = 0.0, scored = 0.0, ep_nll = 0.0, ep_scored = 0.0;
    ccr_status st = lm_model_reset_state(m);
    for (size_t k = 0; k < total && st == CCR_OK; k++) {
        lm_fwd_stats fs;
        double norm;
        if (k % s.steps == 0 && (st = lm_model_reset_state(m)) != CCR_OK)
            break;
        lm_batch_fill(m, &s, k % s.steps, &bb);
        st = ccr_optim_set_lr(opt, (float)lm_lr(a->lr, a->warmup, k));
        if (st == CCR_OK)
            st = lm_train_step(m, opt, bb.in, bb.tgt, rng, a->clip, &fs, &norm);
        if (st != CCR_OK)
            break;
        if (!isfinite(fs.nll_sum) || !isfinite(fs.aux_loss)) {
            st = CCR_EDOM;
            break;
        }
        sum.flops_counted += fs.flops_counted / (double)N / (double)total;
        sum.grad_norm += norm / (double)total;
        if (k >= from) {
            const ccr_gate_stats *g = &fs.gate;
            nll += fs.nll_sum;
            scored += (double)fs.n_scored;
            sum.aux_loss += fs.aux_loss;
            sum.cv_importance += g->cv_importance;
            sum.cv_load += g->cv_load;
            sum.cv_load_count += g->cv_load_count;
            sum.max_mean_load += g->max_mean_load;
            sum.max_mean_count += g->max_mean_count;
            sum.averaged++;
        }
        ep_nll += fs.nll_sum;
        ep_scored += (double)fs.n_scored;
        if (a->progress != NULL)
            a->progress(a->ud, k + 1, total, &fs);
        if ((k + 1) % s.steps == 0 && a->epoch_end != NULL) {
            st = a->epoch_end(a->ud, m, k / s.steps, ep_scored > 0 ? ep_nll / ep_scored : 0.0);
            ep_nll = ep_scored = 0.0;
        }
    }
    free(bb.buf);
    ccr_status r = lm_model_reset_state(m);
    if (st != CCR_OK || r != CCR_OK)
        return st != CCR_OK ? st : r;
    double n = sum.averaged ? (double)sum.averaged : 1.0;
    sum.train_nll = scored > 0 ? nll / scored : 0.0;
    sum.aux_loss /= n;
    sum.cv_importance /= n;
    sum.cv_load /= n;
    sum.cv_load_count /= n;
    sum.max_mean_load /= n;
    sum.max_mean_count /= n;
    *out = sum;
    return CCR_OK;
}
