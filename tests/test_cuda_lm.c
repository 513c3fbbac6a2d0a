/*
 * test_cuda_lm.c - the language model of experiments/lm_model.c on the CUDA
 * backend against the CPU (issue 11: ccr-lm --backend cuda), op by op and
 * whole model.
 *
 * Ops (src/ops.h, each against its reference in src/ref/seq_ref.c on host
 * copies): scale, mul, add and copy bit for bit; gather_rows and
 * segment_add_rows bit for bit (one thread adds a segment's rows in the
 * listed order, as the reference does); one LSTM timestep forward and
 * backward, and the softmax with its NLL and backward, by normalised error
 * (expf/tanhf against the host's, another summation order), over awkward
 * shapes: 1, primes, widths that are not multiples of 32, ids repeated,
 * targets -1 (not scored), a row whose logits span more than exp's range.
 *
 * Model: the same configuration allocated on both backends and initialised
 * from one seed (bitwise the same parameters); two training batches (the
 * second from the carried state) with dropout masks and gate noise from
 * generators seeded alike, so both sides see the same masks and noise, and
 * must consume the same draws; the NLL and aux loss (relative 1e-5), the
 * carried state, every gradient tensor (normalised error), the first
 * conditional block's routing ids exactly, then a clipped Adam step and an
 * evaluation pass, the parameters and the NLL compared again.  Blocks: an
 * LSTM alone, every gate as the first block after the embedding (its input
 * is then bitwise the same on both sides), the deep block, and Shazeer's
 * LSTM-MoE-LSTM stack.  Errors: ids out of range give CCR_EINVAL on both.
 *
 * Exits 77 (skipped) when ccr has no CUDA or no GPU is found; runs with
 * CK_FORK=no.  Without a GPU the machinery runs with a second CPU backend in
 * the GPU's place (bitwise the same: "cpu"; the reference GEMM: "cpu-ref"):
 *     CCR_TEST_LM_PEER=cpu build/tests/test_cuda_lm
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ccr_test.h"
#include "ops.h"      // provides: ccr_op_* (the ops under test)
#include "ref/ref.h"  // provides: ccr_ref_* (their specification)
#include "../experiments/lm_model.h"

enum { CPU = 0, GPU = 1 };

#define TOL_OP 1e-12    /* nmse of an element-wise op with transcendental functions */
#define TOL_GRAD 1e-9   /* nmse of a gradient tensor, a state, parameters after a step */
#define TOL_LOSS 1e-5   /* relative error of an NLL or aux loss */

static ccr_ctx *ctx;
static ccr_backend *be[2];
static const char *peer_name = "cuda";
static gsl_rng *rng;

/* ---- peer buffers ---------------------------------------------------------- */

static void *up(const void *h, size_t bytes)
{
    void *d;
    CCR_CK_OK(ctx, ccr_backend_alloc(be[GPU], bytes, &d));
    if (h != NULL)
        CCR_CK_OK(ctx, ccr_backend_set(be[GPU], d, h, bytes));
    return d;
}

static void down(void *h, const void *d, size_t bytes)
{
    CCR_CK_OK(ctx, ccr_backend_get(be[GPU], h, d, bytes));
}

static float *rnd(size_t n, float lo, float hi)
{
    float *v = malloc((n ? n : 1) * sizeof *v);
    ccr_test_fill_uniform(rng, v, n, lo, hi);
    return v;
}

static void free_dev(void *d) { ccr_backend_free_buffer(be[GPU], d); }

/* ---- ops --------------------------------------------------------------------- */

START_TEST(test_ops_elementwise)
{
    const size_t sizes[] = {1, 31, 1000, 65537};
    for (size_t t = 0; t < 4; t++) {
        size_t n = sizes[t], bytes = n * sizeof(float);
        float *a = rnd(n, -3, 3), *b = rnd(n, -3, 3), *want = malloc(bytes), *got = malloc(bytes);
        float *da = up(a, bytes), *db = up(b, bytes), *dy = up(NULL, bytes);
        CCR_CK_OK(ctx, ccr_op_mul(be[GPU], da, db, dy, n));
        ccr_ref_mul(a, b, want, n);
        down(got, dy, bytes);
        ck_assert_msg(memcmp(got, want, bytes) == 0, "mul n=%zu differs", n);
        CCR_CK_OK(ctx, ccr_op_add(be[GPU], da, db, dy, n));
        ccr_ref_add(a, b, want, n);
        down(got, dy, bytes);
        ck_assert_msg(memcmp(got, want, bytes) == 0, "add n=%zu differs", n);
        CCR_CK_OK(ctx, ccr_op_add(be[GPU], da, db, da, n));  /* aliased output */
        down(got, da, bytes);
        ck_assert_msg(memcmp(got, want, bytes) == 0, "add in place n=%zu differs", n);
        CCR_CK_OK(ctx, ccr_op_scale(be[GPU], da, n, -0.375f));
        ccr_ref_scale(want, n, -0.375f);
        down(got, da, bytes);
        ck_assert_msg(memcmp(got, want, bytes) == 0, "scale n=%zu differs", n);
        CCR_CK_OK(ctx, ccr_op_copy(be[GPU], dy, da, n));
        down(got, dy, bytes);
        ck_assert_msg(memcmp(got, want, bytes) == 0, "copy n=%zu differs", n);
        free(a), free(b), free(want), free(got);
        free_dev(da), free_dev(db), free_dev(dy);
    }
    /* Empty ops do nothing and succeed. */
    CCR_CK_OK(ctx, ccr_op_mul(be[GPU], NULL, NULL, NULL, 0));
    CCR_CK_OK(ctx, ccr_op_copy(be[GPU], NULL, NULL, 0));
}
END_TEST

/* Segments of ids[n] over V ids as the language model builds them: rows
 * sorted by id (stable), start[n_seg + 1], dst[n_seg]; returns n_seg. */
static size_t segments(const int32_t *ids, size_t n, size_t V, int32_t *rows, int32_t *start,
                       int32_t *dst)
{
    size_t s = 0, p = 0;
    start[0] = 0;
    for (size_t v = 0; v < V; v++) {
        size_t before = p;
        for (size_t r = 0; r < n; r++)
            if ((size_t)ids[r] == v)
                rows[p++] = (int32_t)r;
        if (p > before) {
            dst[s] = (int32_t)v;
            start[++s] = (int32_t)p;
        }
    }
    return s;
}

START_TEST(test_ops_rows)
{
    const size_t widths[] = {1, 13, 130, 300}, counts[] = {1, 7, 640}, V = 50;
    for (size_t wi = 0; wi < 4; wi++)
        for (size_t ci = 0; ci < 3; ci++) {
            size_t d = widths[wi], n = counts[ci];
            float *table = rnd(V * d, -1, 1), *src = rnd(n * d, -1, 1);
            float *seq = malloc(V * d * sizeof *seq);
            memcpy(seq, table, V * d * sizeof *seq);
            size_t most = n > V ? n : V;
            float *want = malloc(n * d * sizeof *want), *got = malloc(most * d * sizeof *got);
            int32_t *ids = malloc(n * sizeof *ids), *seg = malloc((3 * n + 1) * sizeof *seg);
            for (size_t r = 0; r < n; r++)  /* few ids: every one repeats */
                ids[r] = (int32_t)gsl_rng_uniform_int(rng, n < 10 ? V : 9);
            float *dt = up(table, V * d * sizeof(float)), *ds = up(src, n * d * sizeof(float));
            float *dout = up(NULL, n * d * sizeof(float));
            int32_t *did = up(ids, n * sizeof *ids);
            CCR_CK_OK(ctx, ccr_op_gather_rows(be[GPU], dt, d, did, n, dout));
            ccr_ref_gather_rows(table, d, ids, n, want);
            down(got, dout, n * d * sizeof(float));
            ck_assert_msg(memcmp(got, want, n * d * sizeof(float)) == 0,
                          "gather_rows d=%zu n=%zu differs", d, n);
            size_t ns = segments(ids, n, V, seg, seg + n, seg + 2 * n + 1);
            int32_t *dseg = up(seg, (3 * n + 1) * sizeof *seg);
            CCR_CK_OK(ctx, ccr_op_segment_add_rows(be[GPU], dt, d, ds, dseg, dseg + n,
                                                   dseg + 2 * n + 1, ns));
            ccr_ref_segment_add_rows(table, d, src, seg, seg + n, seg + 2 * n + 1, ns);
            down(got, dt, V * d * sizeof(float));
            ck_assert_msg(memcmp(got, table, V * d * sizeof(float)) == 0,
                          "segment_add_rows d=%zu n=%zu (%zu segments) differs", d, n, ns);
            /* And the reference equals adding every row to its id in row order. */
            for (size_t r = 0; r < n; r++)
                for (size_t j = 0; j < d; j++)
                    seq[(size_t)ids[r] * d + j] += src[r * d + j];
            ck_assert_msg(memcmp(seq, table, V * d * sizeof(float)) == 0,
                          "segments d=%zu n=%zu: not the row-order sum", d, n);
            free(table), free(src), free(want), free(got), free(ids), free(seg), free(seq);
            free_dev(dt), free_dev(ds), free_dev(dout), free_dev(did), free_dev(dseg);
        }
}
END_TEST

START_TEST(test_ops_lstm)
{
    const size_t batches[] = {1, 3, 33}, widths[] = {1, 13, 64};
    for (size_t bi = 0; bi < 3; bi++)
        for (size_t wi = 0; wi < 3; wi++) {
            size_t B = batches[bi], d = widths[wi], n = B * d, nz = 4 * n;
            float *z = rnd(nz, -4, 4), *cp = rnd(n, -2, 2), *dho = rnd(n, -1, 1);
            float *dhr = rnd(n, -1, 1), *dc = rnd(n, -1, 1);
            float *c = malloc(n * 4), *tc = malloc(n * 4), *h = malloc(n * 4), *dz = malloc(nz * 4);
            float *g = malloc(nz * 4);
            float *dzz = up(z, nz * 4), *dcp = up(cp, n * 4), *dcc = up(NULL, n * 4);
            float *dtc = up(NULL, n * 4), *dh = up(NULL, n * 4);
            CCR_CK_OK(ctx, ccr_op_lstm_fwd(be[GPU], dzz, dcp, dcc, dtc, dh, B, d));
            ccr_ref_lstm_fwd(z, cp, c, tc, h, B, d);
            char label[96];
            float *outs[4] = {z, c, tc, h}, *douts[4] = {dzz, dcc, dtc, dh};
            const char *names[4] = {"gates", "c", "tanh c", "h"};
            for (size_t q = 0; q < 4; q++) {
                size_t len = q == 0 ? nz : n;
                down(g, douts[q], len * 4);
                snprintf(label, sizeof label, "lstm_fwd B=%zu d=%zu %s", B, d, names[q]);
                ccr_test_assert_nmse(g, outs[q], len, TOL_OP, label);
            }
            /* Backward from the reference's activations on both sides. */
            CCR_CK_OK(ctx, ccr_backend_set(be[GPU], dzz, z, nz * 4));
            CCR_CK_OK(ctx, ccr_backend_set(be[GPU], dtc, tc, n * 4));
            float *ddho = up(dho, n * 4), *ddhr = up(dhr, n * 4), *ddc = up(dc, n * 4);
            float *ddz = up(NULL, nz * 4);
            CCR_CK_OK(ctx, ccr_op_lstm_bwd(be[GPU], dzz, dcp, dtc, ddho, ddhr, ddc, ddz, B, d));
            ccr_ref_lstm_bwd(z, cp, tc, dho, dhr, dc, dz, B, d);
            down(g, ddz, nz * 4);
            snprintf(label, sizeof label, "lstm_bwd B=%zu d=%zu dz", B, d);
            ccr_test_assert_nmse(g, dz, nz, TOL_OP, label);
            down(g, ddc, n * 4);
            snprintf(label, sizeof label, "lstm_bwd B=%zu d=%zu dc", B, d);
            ccr_test_assert_nmse(g, dc, n, TOL_OP, label);
            free(z), free(cp), free(dho), free(dhr), free(dc), free(c), free(tc), free(h);
            free(dz), free(g);
            free_dev(dzz), free_dev(dcp), free_dev(dcc), free_dev(dtc), free_dev(dh);
            free_dev(ddho), free_dev(ddhr), free_dev(ddc), free_dev(ddz);
        }
}
END_TEST

START_TEST(test_ops_softmax)
{
    const size_t shapes[][2] = {{1, 2}, {5, 37}, {130, 1000}, {3, 10007}};
    for (size_t t = 0; t < 4; t++) {
        size_t rows = shapes[t][0], cols = shapes[t][1], n = rows * cols;
        float *z = rnd(n, -8, 8), *g = malloc(n * 4);
        if (rows > 1)
            z[cols + 1] = 150.0f;  /* row 1 spans more than exp's range: clamped terms */
        int32_t *tgt = malloc(rows * sizeof *tgt);
        for (size_t r = 0; r < rows; r++)
            tgt[r] = r % 4 == 2 ? -1 : (int32_t)gsl_rng_uniform_int(rng, cols);
        double *nll = malloc(rows * sizeof *nll), *gn = malloc(rows * sizeof *gn);
        float *dz = up(z, n * 4);
        int32_t *dt = up(tgt, rows * sizeof *tgt);
        double *dn = up(NULL, rows * sizeof *dn);
        CCR_CK_OK(ctx, ccr_op_softmax_nll(be[GPU], dz, dt, rows, cols, dn));
        ccr_ref_softmax_nll(z, tgt, rows, cols, nll);
        down(g, dz, n * 4);
        down(gn, dn, rows * sizeof *gn);
        char label[96];
        snprintf(label, sizeof label, "softmax %zux%zu probabilities", rows, cols);
        ccr_test_assert_nmse(g, z, n, TOL_OP, label);
        for (size_t r = 0; r < rows; r++)
            ck_assert_msg(fabs(gn[r] - nll[r]) <= TOL_LOSS * fmax(1.0, fabs(nll[r])) &&
                              (tgt[r] >= 0 || gn[r] == 0.0),
                          "softmax %zux%zu row %zu: nll %s %.9g, cpu %.9g", rows, cols, r,
                          peer_name, gn[r], nll[r]);
        /* Backward from the reference's probabilities on both sides. */
        CCR_CK_OK(ctx, ccr_backend_set(be[GPU], dz, z, n * 4));
        CCR_CK_OK(ctx, ccr_op_softmax_nll_bwd(be[GPU], dz, dt, rows, cols, 0.25f));
        ccr_ref_softmax_nll_bwd(z, tgt, rows, cols, 0.25f);
        down(g, dz, n * 4);
        ck_assert_msg(memcmp(g, z, n * 4) == 0, "softmax_nll_bwd %zux%zu differs", rows, cols);
        free(z), free(g), free(tgt), free(nll), free(gn);
        free_dev(dz), free_dev(dt), free_dev(dn);
    }
}
END_TEST

/* ---- whole model -------------------------------------------------------------- */

typedef struct lm_case {
    const char *name, *gate;
    size_t vocab, d, batch, unroll, n_blocks;
    lm_block_kind blocks[3];
    double dropout;
} lm_case;

static const lm_case cases[] = {
    {"lstm", NULL, 37, 13, 3, 5, 1, {LM_BLOCK_LSTM}, 0.2},
    {"topk", "topk", 101, 16, 4, 6, 2, {LM_BLOCK_COND, LM_BLOCK_LSTM}, 0.1},
    {"hmoe", "hmoe", 53, 12, 3, 4, 2, {LM_BLOCK_COND, LM_BLOCK_LSTM}, 0.1},
    {"switch", "switch", 53, 12, 5, 3, 2, {LM_BLOCK_COND, LM_BLOCK_LSTM}, 0.0},
    {"dense", "dense", 29, 7, 2, 3, 2, {LM_BLOCK_COND, LM_BLOCK_LSTM}, 0.1},
    {"signtree", "signtree", 29, 9, 3, 3, 2, {LM_BLOCK_COND, LM_BLOCK_LSTM}, 0.1},
    {"none", "none", 29, 9, 3, 3, 2, {LM_BLOCK_COND, LM_BLOCK_LSTM}, 0.1},
    {"deep", NULL, 1000, 33, 2, 4, 2, {LM_BLOCK_DEEP, LM_BLOCK_LSTM}, 0.0},
    {"lstm-topk-lstm", "topk", 211, 32, 4, 5, 3, {LM_BLOCK_LSTM, LM_BLOCK_COND, LM_BLOCK_LSTM},
     0.1},
};
#define N_CASES (sizeof cases / sizeof cases[0])

static lm_config case_config(const lm_case *c)
{
    lm_config cfg = lm_config_default();
    cfg.vocab = c->vocab;
    cfg.d = c->d;
    cfg.batch = c->batch;
    cfg.unroll = c->unroll;
    cfg.n_blocks = c->n_blocks;
    for (size_t i = 0; i < c->n_blocks; i++)
        cfg.blocks[i] = c->blocks[i];
    cfg.dropout = c->dropout;
    cfg.deep_hidden = 19;
    cfg.deep_layers = 2;
    cfg.cond.hidden = 11;
    if (c->gate != NULL) {
        cfg.cond.gate = ccr_gate_type_find(c->gate);
        ck_assert_ptr_nonnull(cfg.cond.gate);
        ccr_gate_config *g = &cfg.cond.gate_cfg;
        g->n_experts = 4;
        g->k = 2;
        if (strcmp(c->gate, "hmoe") == 0) {
            g->n_experts = 8, g->n_groups = 2, g->k_groups = 2, g->k2 = 2;
        } else if (strcmp(c->gate, "dense") == 0) {
            g->n_experts = 3;
        } else if (strcmp(c->gate, "signtree") == 0) {
            g->depth = 2;
        }
    }
    return cfg;
}

static void assert_close(double got, double want, const char *label, const char *field)
{
    ck_assert_msg(fabs(got - want) <= TOL_LOSS * fmax(1.0, fabs(want)),
                  "%s: %s %s %.12g, cpu %.12g", label, field, peer_name, got, want);
}

/* Every tensor's values (grads: gradients) on both sides, by nmse. */
static void compare_arenas(lm_model *m[2], bool grads, const char *label, const char *when)
{
    ccr_arena *a[2] = {lm_model_arena(m[CPU]), lm_model_arena(m[GPU])};
    for (size_t i = 0; i < ccr_arena_count(a[CPU]); i++) {
        size_t n = ccr_arena_size(a[CPU], i);
        float *h[2] = {malloc(n * 4), malloc(n * 4)};
        for (size_t s = 0; s < 2; s++)
            CCR_CK_OK(ctx, grads ? ccr_arena_get_grad(a[s], i, h[s]) : ccr_arena_get(a[s], i, h[s]));
        char lab[200];
        snprintf(lab, sizeof lab, "%s: %s: %s %s", label, when, ccr_arena_name(a[CPU], i),
                 grads ? "gradient" : "values");
        ccr_test_assert_nmse(h[GPU], h[CPU], n, TOL_GRAD, lab);
        free(h[0]), free(h[1]);
    }
}

START_TEST(test_model_parity)
{
    const lm_case *c = &cases[_i];
    lm_config cfg = case_config(c);
    size_t N = cfg.batch * cfg.unroll;
    lm_model *m[2];
    gsl_rng *r[2];
    for (size_t s = 0; s < 2; s++) {
        CCR_CK_OK(ctx, lm_model_alloc(be[s], &cfg, &m[s]));
        r[s] = ccr_test_rng(40 + _i);
        CCR_CK_OK(ctx, lm_model_init_params(m[s], r[s]));
    }
    /* Bitwise the same initial values. */
    ccr_arena *a[2] = {lm_model_arena(m[CPU]), lm_model_arena(m[GPU])};
    for (size_t i = 0; i < ccr_arena_count(a[CPU]); i++) {
        size_t n = ccr_arena_size(a[CPU], i);
        float *h[2] = {malloc(n * 4), malloc(n * 4)};
        CCR_CK_OK(ctx, ccr_arena_get(a[CPU], i, h[CPU]));
        CCR_CK_OK(ctx, ccr_arena_get(a[GPU], i, h[GPU]));
        ck_assert_msg(memcmp(h[0], h[1], n * 4) == 0, "%s: initial %s differs", c->name,
                      ccr_arena_name(a[CPU], i));
        free(h[0]), free(h[1]);
    }
    int32_t *in = malloc(2 * N * sizeof *in), *tgt = in + N;
    ccr_optim *opt[2];
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    oc.lr = 0.01f;
    for (size_t s = 0; s < 2; s++)
        CCR_CK_OK(ctx, ccr_optim_init(a[s], &oc, &opt[s]));
    size_t sl = lm_model_state_len(m[CPU]);
    float *st[2] = {malloc((sl + 1) * 4), malloc((sl + 1) * 4)};
    for (size_t batch = 0; batch < 2; batch++) {
        for (size_t q = 0; q < N; q++) {
            in[q] = (int32_t)gsl_rng_uniform_int(rng, cfg.vocab);
            tgt[q] = q % 5 == 3 ? -1 : (int32_t)gsl_rng_uniform_int(rng, cfg.vocab);
        }
        lm_fwd_stats fs[2];
        double norm[2];
        for (size_t s = 0; s < 2; s++) {
            CCR_CK_OK(ctx, ccr_arena_zero_grad(a[s]));
            CCR_CK_OK(ctx, lm_model_forward(m[s], in, tgt, true, r[s], &fs[s]));
        }
        char label[120];
        snprintf(label, sizeof label, "%s batch %zu", c->name, batch);
        assert_close(fs[GPU].nll_sum, fs[CPU].nll_sum, label, "nll");
        ck_assert_uint_eq(fs[GPU].n_scored, fs[CPU].n_scored);
        assert_close(fs[GPU].aux_loss, fs[CPU].aux_loss, label, "aux loss");
        ck_assert_msg(fs[GPU].flops_counted == fs[CPU].flops_counted, "%s: flops", label);
        ccr_cond *cc[2] = {lm_model_cond(m[CPU]), lm_model_cond(m[GPU])};
        if (cc[CPU] != NULL) {
            const ccr_route *rc = ccr_cond_route(cc[CPU]), *rg = ccr_cond_route(cc[GPU]);
            ck_assert_msg(rc->batch == rg->batch && rc->slots == rg->slots &&
                              memcmp(rc->ids, rg->ids, rc->batch * rc->slots * sizeof *rc->ids) == 0,
                          "%s: routing ids differ", label);
        }
        for (size_t s = 0; s < 2; s++)
            CCR_CK_OK(ctx, lm_model_state_get(m[s], st[s]));
        ccr_test_assert_nmse(st[GPU], st[CPU], sl, TOL_GRAD, "carried state");
        for (size_t s = 0; s < 2; s++)
            CCR_CK_OK(ctx, lm_model_backward(m[s]));
        compare_arenas(m, true, label, "after backward");
        for (size_t s = 0; s < 2; s++) {
            CCR_CK_OK(ctx, lm_grad_clip(a[s], 0.5, &norm[s]));
            CCR_CK_OK(ctx, ccr_optim_step(opt[s]));
        }
        assert_close(norm[GPU], norm[CPU], label, "gradient norm");
        compare_arenas(m, false, label, "after a clipped Adam step");
        ck_assert_msg(gsl_rng_get(r[GPU]) == gsl_rng_get(r[CPU]),
                      "%s: the two sides consumed different numbers of draws", label);
    }
    lm_fwd_stats fs[2];
    for (size_t s = 0; s < 2; s++)
        CCR_CK_OK(ctx, lm_model_forward(m[s], in, tgt, false, NULL, &fs[s]));
    assert_close(fs[GPU].nll_sum, fs[CPU].nll_sum, c->name, "evaluation nll");
    /* Ids out of range: refused on both, nothing computed. */
    in[N - 1] = (int32_t)cfg.vocab;
    for (size_t s = 0; s < 2; s++)
        CCR_CK_STATUS(ctx, lm_model_forward(m[s], in, tgt, false, NULL, &fs[s]), CCR_EINVAL);
    for (size_t s = 0; s < 2; s++) {
        ccr_optim_free(opt[s]);
        lm_model_free(m[s]);
        gsl_rng_free(r[s]);
        free(st[s]);
    }
    free(in);
}
END_TEST

int main(void)
{
    if (ccr_ctx_init(&ctx) != CCR_OK)
        return 1;
    ccr_status s = ccr_test_peer_init(ctx, "CCR_TEST_LM_PEER", &be[GPU], &peer_name);
    if (s == CCR_EUNSUP || s == CCR_ENODEV) {
        printf("test_cuda_lm: skipped: %s\n", ccr_ctx_errmsg(ctx));
        ccr_ctx_free(ctx);
        return 77;
    }
    if (s != CCR_OK || ccr_backend_cpu_init(ctx, &be[CPU]) != CCR_OK) {
        fprintf(stderr, "test_cuda_lm: backend init failed: %s\n", ccr_ctx_errmsg(ctx));
        return 1;
    }
    printf("test_cuda_lm: %s against %s\n", ccr_backend_describe(be[GPU]),
           ccr_backend_describe(be[CPU]));
    rng = gsl_rng_alloc(gsl_rng_mt19937);
    if (rng == NULL)
        return 1;
    gsl_rng_set(rng, 2026);
    Suite *su = suite_create("cuda_lm");
    TCase *tc = tcase_create("parity");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_ops_elementwise);
    tcase_add_test(tc, test_ops_rows);
    tcase_add_test(tc, test_ops_lstm);
    tcase_add_test(tc, test_ops_softmax);
    tcase_add_loop_test(tc, test_model_parity, 0, (int)N_CASES);
    suite_add_tcase(su, tc);
    SRunner *sr = srunner_create(su);
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    gsl_rng_free(rng);
    ccr_backend_free(be[CPU]);
    ccr_backend_free(be[GPU]);
    ccr_ctx_free(ctx);
    return failed == 0 ? 0 : 1;
}
