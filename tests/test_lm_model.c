/*
 * test_lm_model.c - the language model of experiments/lm_model.c: central
 * finite differences (float parameters, h = 1e-2, loss in double) for the
 * embedding, the LSTM (full BPTT, carried state), the softmax, the residual
 * and dropout wiring, the sigmoid on a conditional block and the deep block,
 * with dropout off and on (the masks are redrawn from one seed); the sparse
 * embedding gradient; gradient clipping; counted = analytic FLOPs; the
 * Shazeer Tables 7-8 accounting against the printed values (+-0.1 M);
 * determinism; argument errors; a model that learns a periodic text; and
 * the token streams (every token scored once) and the schedule; the
 * vectorised softmax row against one computed with exp in double.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ccr_test.h"
#include "../experiments/lm_model.h"

#define V 11
#define D 6
#define BB 3
#define TT 5
#define NN (BB * TT)

static ccr_ctx *ctx;
static ccr_backend *be;
static gsl_rng *rng;

static void setup(void)
{
    ck_assert_int_eq(ccr_ctx_init(&ctx), CCR_OK);
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    rng = ccr_test_rng(17);
}

static void teardown(void)
{
    gsl_rng_free(rng);
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
}

static lm_config small_config(void)
{
    lm_config c = lm_config_default();
    c.vocab = V;
    c.d = D;
    c.batch = BB;
    c.unroll = TT;
    c.cond.hidden = 5;
    c.deep_hidden = 7;
    c.deep_layers = 2;
    c.dropout = 0.0;
    return c;
}

static lm_model *make(const lm_config *c, unsigned long seed)
{
    lm_model *m;
    CCR_CK_OK(ctx, lm_model_alloc(be, c, &m));
    gsl_rng_set(rng, seed);
    CCR_CK_OK(ctx, lm_model_init_params(m, rng));
    return m;
}

typedef struct fd_case {
    lm_model *m;
    int32_t in[NN], tgt[NN];
    float *state;
    bool train;
    int32_t ids[NN * 16];
} fd_case;

/* Mean NLL + aux loss of one batch from the saved state, noise and dropout
 * masks from one seed; the routing table of the first conditional block is
 * copied to ids. */
static double loss(fd_case *f, int32_t *ids)
{
    lm_fwd_stats st;
    CCR_CK_OK(ctx, lm_model_state_set(f->m, f->state));
    gsl_rng_set(rng, 99);
    CCR_CK_OK(ctx, lm_model_forward(f->m, f->in, f->tgt, f->train, rng, &st));
    ccr_cond *c = lm_model_cond(f->m);
    if (c != NULL && ids != NULL) {
        const ccr_route *r = ccr_cond_route(c);
        memcpy(ids, r->ids, r->batch * r->slots * sizeof *ids);
    }
    return st.nll_sum / (double)st.n_scored + st.aux_loss;
}

static size_t route_len(fd_case *f)
{
    ccr_cond *c = lm_model_cond(f->m);
    return c ? NN * ccr_gate_slots(ccr_cond_gate(c)) : 0;
}

/* Checks sampled coordinates of every tensor; skips those whose +-h changes
 * the routing or crosses a ReLU kink (one-sided slopes disagree). */
static void check_fd(lm_config *cfg, bool train, const char *label)
{
    fd_case f = {.train = train};
    f.m = make(cfg, 3);
    for (size_t r = 0; r < NN; r++) {
        f.in[r] = (int32_t)gsl_rng_uniform_int(rng, V);
        f.tgt[r] = r % 7 == 4 ? -1 : (int32_t)gsl_rng_uniform_int(rng, V);
    }
    /* A first batch gives a non-zero carried state (not differentiated). */
    lm_fwd_stats st;
    CCR_CK_OK(ctx, lm_model_forward(f.m, f.in, f.in, false, NULL, &st));
    f.state = malloc((lm_model_state_len(f.m) + 1) * sizeof(float));
    CCR_CK_OK(ctx, lm_model_state_get(f.m, f.state));
    ccr_arena *a = lm_model_arena(f.m);
    CCR_CK_OK(ctx, ccr_arena_zero_grad(a));
    int32_t ids1[NN * 16];
    size_t rl = route_len(&f);
    double l0 = loss(&f, f.ids);
    CCR_CK_OK(ctx, lm_model_backward(f.m));
    const float h = 1e-2f;
    size_t checked = 0, skipped = 0;
    for (size_t ti = 0; ti < ccr_arena_count(a); ti++) {
        float *v = ccr_arena_value(a, ti), *g = ccr_arena_grad(a, ti);
        size_t n = ccr_arena_size(a, ti), step = n > 30 ? n / 30 : 1;
        for (size_t i = gsl_rng_uniform_int(rng, step); i < n; i += step) {
            float keep = v[i];
            v[i] = keep + h;
            double lp = loss(&f, ids1);
            bool same = memcmp(ids1, f.ids, rl * sizeof *ids1) == 0;
            v[i] = keep - h;
            double lm = loss(&f, ids1);
            same = same && memcmp(ids1, f.ids, rl * sizeof *ids1) == 0;
            v[i] = keep;
            double fwd = (lp - l0) / h, bwd = (l0 - lm) / h, num = (lp - lm) / (2.0 * h);
            if (!same || fabs(fwd - bwd) > 2e-3 + 0.05 * fabs(num)) {
                skipped++;
                continue;
            }
            checked++;
            ck_assert_msg(fabs(num - g[i]) <= 2e-3 + 2e-2 * fabs(num),
                          "%s: d/d%s[%zu] analytic %.6g numeric %.6g", label,
                          ccr_arena_name(a, ti), i, (double)g[i], num);
        }
    }
    ck_assert_msg(checked > 100 && skipped * 5 < checked, "%s: checked %zu skipped %zu", label,
                  checked, skipped);
    free(f.state);
    lm_model_free(f.m);
}

START_TEST(test_fd_lstm)
{
    lm_config c = small_config();
    c.n_blocks = 2;
    c.blocks[0] = c.blocks[1] = LM_BLOCK_LSTM;
    c.dropout = _i ? 0.3 : 0.0;
    check_fd(&c, _i == 1, _i ? "lstm dropout" : "lstm");
}
END_TEST

START_TEST(test_fd_cond)
{
    static const char *gates[] = {"dense", "topk", "hmoe"};
    lm_config c = small_config();
    c.cond.gate = ccr_gate_type_find(gates[_i % 3]);
    c.cond.gate_cfg.n_experts = 4;
    c.cond.gate_cfg.k = 2;
    c.cond.gate_cfg.n_groups = 2;
    c.cond.gate_cfg.k2 = 1;
    c.cond.gate_cfg.randomize = true;
    c.moe_sigmoid = _i < 3;
    c.dropout = _i >= 3 ? 0.25 : 0.0;
    check_fd(&c, _i >= 3, gates[_i % 3]);
}
END_TEST

START_TEST(test_fd_deep)
{
    lm_config c = small_config();
    c.blocks[1] = LM_BLOCK_DEEP;
    c.dropout = _i ? 0.2 : 0.0;
    check_fd(&c, _i == 1, "deep");
}
END_TEST

static void random_batch(int32_t *in, int32_t *tgt)
{
    for (size_t r = 0; r < NN; r++) {
        in[r] = (int32_t)gsl_rng_uniform_int(rng, V - 3);  /* ids V-3.. never input */
        tgt[r] = (int32_t)gsl_rng_uniform_int(rng, V);
    }
}

START_TEST(test_sparse_embedding_and_flops)
{
    lm_config c = small_config();
    c.cond.gate = ccr_gate_type_find("topk");
    c.cond.gate_cfg.n_experts = 4;
    c.cond.gate_cfg.k = 2;
    c.dropout = 0.1;
    lm_model *m = make(&c, 4);
    int32_t in[NN], tgt[NN];
    random_batch(in, tgt);
    lm_fwd_stats st;
    CCR_CK_OK(ctx, ccr_arena_zero_grad(lm_model_arena(m)));
    CCR_CK_OK(ctx, lm_model_forward(m, in, tgt, true, rng, &st));
    CCR_CK_OK(ctx, lm_model_backward(m));
    size_t ie;
    CCR_CK_OK(ctx, ccr_arena_find(lm_model_arena(m), "emb.w", &ie));
    const float *ge = ccr_arena_grad(lm_model_arena(m), ie);
    for (size_t row = V - 3; row < V; row++)
        for (size_t j = 0; j < D; j++)
            ck_assert_msg(ge[row * D + j] == 0.0f, "unused embedding row %zu has a gradient", row);
    double want = lm_model_flops_fwd(m) * NN;
    ck_assert_msg(fabs(st.flops_counted - want) <= 1e-9 * want, "counted %.17g analytic %.17g",
                  st.flops_counted, want);
    /* analytic by hand: 2 LSTMs 2(2d)(4d)+4d, softmax 2dV+V, topk gate 4dE
     * (train), 2 experts of 2dh+h+2hd+d plus 2d for the combine. */
    double hand = 2 * (16.0 * D * D + 4 * D) + 2.0 * D * V + V + 4.0 * D * 4 +
                  2 * (2.0 * D * 5 + 5 + 2.0 * 5 * D + D + 2.0 * D);
    ck_assert_msg(fabs(lm_model_flops_fwd(m) - hand) < 1e-9, "flops %.17g want %.17g",
                  lm_model_flops_fwd(m), hand);
    ck_assert_uint_eq(lm_model_n_params(m, false) - lm_model_n_params(m, true),
                      V * D + D * V + V);
    lm_model_free(m);
}
END_TEST

START_TEST(test_clip)
{
    lm_config c = small_config();
    c.n_blocks = 1;
    c.blocks[0] = LM_BLOCK_LSTM;
    lm_model *m = make(&c, 5);
    ccr_arena *a = lm_model_arena(m);
    size_t n = ccr_arena_block_len(a);
    float *g = ccr_arena_grads(a), *keep = malloc(n * sizeof *keep);
    ccr_test_fill_uniform(rng, g, n, -1, 1);
    memcpy(keep, g, n * sizeof *keep);
    double norm, norm2;
    CCR_CK_OK(ctx, lm_grad_clip(a, 1e6, &norm));
    ck_assert(memcmp(keep, g, n * sizeof *g) == 0);
    CCR_CK_OK(ctx, lm_grad_clip(a, 0.5, &norm));
    CCR_CK_OK(ctx, lm_grad_clip(a, 1e6, &norm2));
    ck_assert_msg(fabs(norm2 - 0.5) < 1e-5, "clipped norm %g", norm2);
    for (size_t i = 0; i < n; i++)
        ck_assert(fabs(g[i] - keep[i] * 0.5 / norm) <= 1e-6);
    CCR_CK_STATUS(ctx, lm_grad_clip(a, 0.0, &norm), CCR_EINVAL);
    free(keep);
    lm_model_free(m);
}
END_TEST

/* Table 7/8 printed values (M), copied from PAPERS.md 2.5 independently of
 * the driver's table. */
static const struct { const char *name; double ops, params; } printed[] = {
    {"moe-4", 8.4, 8.4}, {"moe-32", 8.4, 37.8}, {"moe-256", 8.6, 272.9},
    {"moe-256-h", 8.4, 272.9}, {"moe-1024-h", 8.5, 1079.0}, {"moe-4096-h", 8.9, 4303.4},
    {"moe-256-h-100b", 8.4, 272.9}, {"moe-1024-h-100b", 8.5, 1079.0},
    {"moe-4096-h-100b", 8.6, 4303.4}, {"moe-16384-h-100b", 8.8, 17201.0},
    {"moe-65536-h-100b", 9.2, 68791.0}, {"moe-131072-h-100b", 9.7, 137577.6},
    {"moe-1-wide", 8.4, 8.4}, {"moe-1-deep", 8.4, 8.4}, {"4xlstm-512", 8.4, 8.4},
    {"lstm-512-512", 2.4, 2.4}, {"lstm-1024-512", 4.7, 4.7}, {"lstm-2048-512", 9.4, 9.4},
};

START_TEST(test_paper_accounting)
{
    size_t n = sizeof printed / sizeof printed[0], listed = 0;
    for (const lm_arch *a = lm_paper_archs(); a->name != NULL; a++)
        listed++;
    ck_assert_uint_eq(listed, n);
    for (size_t i = 0; i < n; i++) {
        const lm_arch *a = lm_paper_find(printed[i].name);
        ck_assert_msg(a != NULL, "%s missing", printed[i].name);
        double p, o;
        lm_accounting(a, &p, &o);
        ck_assert_msg(fabs(o / 1e6 - printed[i].ops) <= 0.1 + 1e-9, "%s ops %.3f M, table %.1f",
                      a->name, o / 1e6, printed[i].ops);
        ck_assert_msg(fabs(p / 1e6 - printed[i].params) <= 0.1 + 1e-9,
                      "%s params %.3f M, table %.1f", a->name, p / 1e6, printed[i].params);
    }
    /* Exact derived values (PAPERS.md 2.6). */
    double p, o;
    lm_accounting(lm_paper_find("moe-256"), &p, &o);
    ck_assert(p == 272891904.0 && o == 8650752.0);
    lm_accounting(lm_paper_find("moe-131072-h-100b"), &p, &o);
    ck_assert_msg(fabs(p / 1e6 - 137577.628) < 5e-4 && fabs(o / 1e6 - 9.699) < 5e-4,
                  "%.4f %.4f", p / 1e6, o / 1e6);
    ck_assert(lm_paper_find("moe-7") == NULL);
}
END_TEST

START_TEST(test_determinism)
{
    lm_config c = small_config();
    c.cond.gate = ccr_gate_type_find("topk");
    c.cond.gate_cfg.n_experts = 4;
    c.cond.gate_cfg.k = 2;
    c.dropout = 0.2;
    float *vals[2];
    size_t n = 0;
    for (int run = 0; run < 2; run++) {
        lm_model *m = make(&c, 8);
        ccr_optim *o;
        ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
        CCR_CK_OK(ctx, ccr_optim_init(lm_model_arena(m), &oc, &o));
        gsl_rng_set(rng, 21);
        for (int step = 0; step < 4; step++) {
            int32_t in[NN], tgt[NN];
            random_batch(in, tgt);
            lm_fwd_stats st;
            double norm;
            CCR_CK_OK(ctx, ccr_arena_zero_grad(lm_model_arena(m)));
            CCR_CK_OK(ctx, lm_model_forward(m, in, tgt, true, rng, &st));
            CCR_CK_OK(ctx, lm_model_backward(m));
            CCR_CK_OK(ctx, lm_grad_clip(lm_model_arena(m), 1.0, &norm));
            CCR_CK_OK(ctx, ccr_optim_step(o));
        }
        n = ccr_arena_block_len(lm_model_arena(m));
        vals[run] = malloc(n * sizeof(float));
        memcpy(vals[run], ccr_arena_values(lm_model_arena(m)), n * sizeof(float));
        ccr_optim_free(o);
        lm_model_free(m);
    }
    ck_assert(memcmp(vals[0], vals[1], n * sizeof(float)) == 0);
    free(vals[0]);
    free(vals[1]);
}
END_TEST

START_TEST(test_errors)
{
    lm_config c = small_config();
    lm_model *m = NULL;
    c.dropout = 1.0;
    CCR_CK_STATUS(ctx, lm_model_alloc(be, &c, &m), CCR_EINVAL);
    c = small_config();
    c.cond.gate = NULL;
    CCR_CK_STATUS(ctx, lm_model_alloc(be, &c, &m), CCR_EINVAL);
    c.vocab = 1;
    c.blocks[1] = LM_BLOCK_LSTM;
    CCR_CK_STATUS(ctx, lm_model_alloc(be, &c, &m), CCR_EINVAL);
    ck_assert_ptr_null(m);
    c = small_config();
    c.blocks[1] = LM_BLOCK_LSTM;
    m = make(&c, 1);
    CCR_CK_STATUS(ctx, lm_model_backward(m), CCR_EINVAL);
    int32_t in[NN], tgt[NN];
    random_batch(in, tgt);
    in[3] = V;
    lm_fwd_stats st;
    CCR_CK_STATUS(ctx, lm_model_forward(m, in, tgt, false, NULL, &st), CCR_EINVAL);
    in[3] = 0;
    tgt[2] = -2;
    CCR_CK_STATUS(ctx, lm_model_forward(m, in, tgt, false, NULL, &st), CCR_EINVAL);
    CCR_CK_STATUS(ctx, lm_model_forward(m, in, tgt, true, NULL, &st), CCR_EINVAL);
    lm_model_free(m);
}
END_TEST

/* A periodic text (period 7, unroll 5): the state must carry across batches
 * to predict it; the loss falls from log V to near zero. */
START_TEST(test_learns_periodic_text)
{
    lm_config c = small_config();
    c.d = 16;
    c.cond.gate = ccr_gate_type_find("topk");
    c.cond.gate_cfg.n_experts = 4;
    c.cond.gate_cfg.k = 2;
    lm_model *m = make(&c, 2);
    ccr_optim *o;
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    oc.lr = 0.01f;
    CCR_CK_OK(ctx, ccr_optim_init(lm_model_arena(m), &oc, &o));
    double first = 0, last = 0;
    for (size_t step = 0; step < 150; step++) {
        int32_t in[NN], tgt[NN];
        for (size_t t = 0; t < TT; t++)
            for (size_t b = 0; b < BB; b++) {
                size_t pos = step * TT + t + 3 * b;
                in[t * BB + b] = (int32_t)(pos % 7);
                tgt[t * BB + b] = (int32_t)((pos + 1) % 7);
            }
        lm_fwd_stats st;
        double norm;
        CCR_CK_OK(ctx, ccr_arena_zero_grad(lm_model_arena(m)));
        CCR_CK_OK(ctx, lm_model_forward(m, in, tgt, true, rng, &st));
        CCR_CK_OK(ctx, lm_model_backward(m));
        CCR_CK_OK(ctx, lm_grad_clip(lm_model_arena(m), 5.0, &norm));
        CCR_CK_OK(ctx, ccr_optim_step(o));
        double l = st.nll_sum / (double)st.n_scored;
        ck_assert(isfinite(l) && isfinite(st.aux_loss));
        if (step == 0)
            first = l;
        last = l;
    }
    ck_assert_msg(first > 2.0 && last < 0.3, "loss %g -> %g", first, last);
    ccr_optim_free(o);
    lm_model_free(m);
}
END_TEST

/* lm_softmax_row against softmax and log-sum-exp in double: row lengths
 * around the 8 lanes and the LM's vocabulary, logits spread wide enough
 * that most probabilities underflow float (the clamp must not leave them
 * larger than float's smallest normal number times a few). */
START_TEST(test_softmax_row)
{
    static const size_t lens[] = {1, 7, 8, 9, 17, 10000};
    float *z = malloc(10000 * sizeof *z);
    double *ref = malloc(10000 * sizeof *ref), *x = malloc(10000 * sizeof *x);
    ck_assert(z != NULL && ref != NULL && x != NULL);
    for (size_t t = 0; t < sizeof lens / sizeof lens[0]; t++)
        for (int spread = 0; spread < 3; spread++) {
            size_t n = lens[t];
            double scale = spread == 0 ? 1.0 : spread == 1 ? 20.0 : 200.0, mx = -INFINITY;
            for (size_t j = 0; j < n; j++) {
                z[j] = (float)(scale * (2.0 * gsl_rng_uniform(rng) - 1.0));
                x[j] = z[j];
                mx = fmax(mx, x[j]);
            }
            double sum = 0.0;
            for (size_t j = 0; j < n; j++)
                sum += exp((double)z[j] - mx);
            for (size_t j = 0; j < n; j++)
                ref[j] = exp((double)z[j] - mx) / sum;
            double lse = lm_softmax_row(z, n), total = 0.0;
            ck_assert_msg(fabs(lse - (log(sum) + mx)) <= 1e-6 * fmax(1.0, fabs(lse)),
                          "n %zu spread %g: lse %.9g want %.9g", n, scale, lse, log(sum) + mx);
            /* float's z - max alone is off by up to |z - max| 2^-24 */
            for (size_t j = 0; j < n; j++) {
                double tol = (1e-6 + 6e-8 * (mx - x[j])) * ref[j] + 1e-37;
                ck_assert_msg(fabs(z[j] - ref[j]) <= tol, "n %zu j %zu: %.9g want %.9g",
                              n, j, (double)z[j], ref[j]);
                total += z[j];
            }
            ck_assert_msg(fabs(total - 1.0) < 1e-5, "n %zu: probabilities sum to %.9g", n, total);
        }
    z[0] = NAN;
    z[1] = 0.0f;
    ck_assert(isnan(lm_softmax_row(z, 2)));
    free(z);
    free(ref);
    free(x);
}
END_TEST

/* Every token is a target exactly once, its input is the token before it. */
START_TEST(test_stream)
{
    int32_t tok[23], in[4 * 3], tgt[4 * 3];
    unsigned seen[23] = {0};
    for (size_t i = 0; i < 23; i++)
        tok[i] = (int32_t)(100 + i);
    lm_stream s;
    lm_stream_init(&s, tok, 23, 4, 3);   /* 4 streams of 6, 2 steps of 3 */
    ck_assert_uint_eq(s.len, 6);
    ck_assert_uint_eq(s.steps, 2);
    for (size_t k = 0; k < s.steps; k++) {
        lm_stream_batch(&s, k, in, tgt);
        for (size_t r = 0; r < 12; r++) {
            if (tgt[r] < 0)
                continue;
            size_t q = (size_t)(tgt[r] - 100);
            seen[q]++;
            ck_assert_int_eq(in[r], q ? tok[q - 1] : CCR_TOKEN_EOS);
        }
    }
    for (size_t i = 0; i < 23; i++)
        ck_assert_uint_eq(seen[i], 1);
    ck_assert(fabs(lm_lr(1.0, 10, 4) - 0.5) < 1e-12 && fabs(lm_lr(1.0, 10, 39) - 0.5) < 1e-12);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("lm_model");
    TCase *tc = tcase_create("lm");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_fd_lstm, 0, 2);
    tcase_add_loop_test(tc, test_fd_cond, 0, 6);
    tcase_add_loop_test(tc, test_fd_deep, 0, 2);
    tcase_add_test(tc, test_sparse_embedding_and_flops);
    tcase_add_test(tc, test_clip);
    tcase_add_test(tc, test_paper_accounting);
    tcase_add_test(tc, test_determinism);
    tcase_add_test(tc, test_errors);
    tcase_add_test(tc, test_learns_periodic_text);
    tcase_add_test(tc, test_stream);
    tcase_add_test(tc, test_softmax_row);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return ccr_test_run(suite()); }
