/*
 * lm_model.c - Shazeer's LSTM language model (embedding, LSTM / conditional
 * / deep blocks with dropout and residuals, full softmax) with its backward
 * pass, and the Tables 7-8 ops/params accounting.  Every buffer is sized
 * for batch x unroll rows in lm_model_alloc; forward and backward allocate
 * nothing.  Matrix products go through ccr_backend_gemm on a CPU backend
 * (OpenBLAS); element-wise loops run in a fixed order, so a run is
 * bitwise reproducible for a fixed seed and thread count.  LSTM gate
 * layout in the 4d columns: input, forget, candidate, output.
 */
#include "lm_model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

typedef struct block {
    lm_block_kind kind;
    float *out, *f, *mask;           /* [N, d] output, f(x) before dropout, mask */
    size_t p_wx, p_wh, p_b;          /* LSTM parameters */
    float *g, *c, *h, *tc, *hs, *cs; /* LSTM: gates [N,4d], c/h [(T+1)B,d], tanh c, state */
    ccr_cond *cond;
    size_t p_deep[2 * 16 + 2];       /* DEEP: w_0, b_0, ..., w_L, b_L */
    float *acts;                     /* DEEP: L x [N, h] */
} block;

struct lm_model {
    lm_config cfg;
    ccr_backend *be;
    ccr_ctx *ctx;
    ccr_arena *arena;
    size_t N, p_emb, p_ow, p_ob;
    block b[LM_MAX_BLOCKS];
    float *mem;                      /* one block for every buffer below */
    float *x0, *mask0, *prob, *gbuf, *df, *din, *dz, *dhn, *dcn, *da1, *da2;
    int32_t *in, *tgt;
    size_t n_scored;
    bool fwd_done, drop_active;
};

lm_config lm_config_default(void)
{
    lm_config c = {.vocab = 10000, .d = 64, .batch = 32, .unroll = 20, .n_blocks = 3,
                   .blocks = {LM_BLOCK_LSTM, LM_BLOCK_COND, LM_BLOCK_LSTM},
                   .deep_hidden = 128, .deep_layers = 4, .dropout = 0.1, .moe_sigmoid = true,
                   .forget_bias = 1.0f};
    c.cond = ccr_cond_config_default();
    c.cond.hidden = 128;
    return c;
}

static ccr_status gemm(lm_model *m, bool ta, bool tb, size_t M, size_t n, size_t k,
                       const float *a, size_t lda, const float *b, size_t ldb, float beta,
                       float *c, size_t ldc)
{
    return ccr_backend_gemm(m->be, ta, tb, M, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
}

static ccr_status add(ccr_arena *a, const char *name, size_t rows, size_t cols, size_t *idx)
{
    size_t shape[2] = {rows, cols};
    return ccr_arena_add(a, name, rows ? 2 : 1, rows ? shape : shape + 1, idx);
}

static ccr_status declare(lm_model *m)
{
    const lm_config *c = &m->cfg;
    size_t d = c->d, h = c->deep_hidden;
    char name[64];
    ccr_status s = add(m->arena, "emb.w", c->vocab, d, &m->p_emb);
    for (size_t i = 0; i < c->n_blocks && s == CCR_OK; i++) {
        block *bl = &m->b[i];
        if (bl->kind == LM_BLOCK_LSTM) {
            snprintf(name, sizeof name, "lstm.%zu.wx", i);
            s = add(m->arena, name, d, 4 * d, &bl->p_wx);
            snprintf(name, sizeof name, "lstm.%zu.wh", i);
            if (s == CCR_OK) s = add(m->arena, name, d, 4 * d, &bl->p_wh);
            snprintf(name, sizeof name, "lstm.%zu.b", i);
            if (s == CCR_OK) s = add(m->arena, name, 0, 4 * d, &bl->p_b);
        } else if (bl->kind == LM_BLOCK_COND) {
            snprintf(name, sizeof name, "moe.%zu.", i);
            s = ccr_cond_declare(bl->cond, m->arena, name);
        } else {
            for (size_t l = 0; l <= c->deep_layers && s == CCR_OK; l++) {
                size_t din = l == 0 ? d : h, dout = l == c->deep_layers ? d : h;
                snprintf(name, sizeof name, "deep.%zu.w%zu", i, l);
                s = add(m->arena, name, din, dout, &bl->p_deep[2 * l]);
                snprintf(name, sizeof name, "deep.%zu.b%zu", i, l);
                if (s == CCR_OK) s = add(m->arena, name, 0, dout, &bl->p_deep[2 * l + 1]);
            }
        }
    }
    if (s == CCR_OK) s = add(m->arena, "out.w", d, c->vocab, &m->p_ow);
    if (s == CCR_OK) s = add(m->arena, "out.b", 0, c->vocab, &m->p_ob);
    return s;
}

/* Bytes of the activation buffers (the `total + N` floats carved below), in
 * double precision so that no size product can wrap; SIZE_MAX if they exceed
 * a quarter of the address space, which also makes every size_t product
 * below exact. */
static size_t lm_activation_bytes(const lm_config *cfg, bool deep)
{
    double d = (double)cfg->d, B = (double)cfg->batch, N = B * (double)cfg->unroll;
    double V = (double)cfg->vocab, h = deep ? (double)cfg->deep_hidden : 1.0;
    double total = 2 * N * d + N * V + 7 * N * d + 2 * B * d + 2 * N * h + 2 * N;
    double lstm = 5 * N * d + 2 * (N + B) * d + 2 * B * d;
    for (size_t i = 0; i < cfg->n_blocks; i++)
        total += 3 * N * d + (cfg->blocks[i] == LM_BLOCK_LSTM ? lstm : 0.0) +
                 (cfg->blocks[i] == LM_BLOCK_DEEP ? (double)cfg->deep_layers * N * h : 0.0);
    double bytes = total * (double)sizeof(float);
    return bytes < (double)(SIZE_MAX / 4) ? (size_t)bytes : SIZE_MAX;
}

ccr_status lm_model_alloc(ccr_backend *be, const lm_config *cfg, lm_model **out)
{
    if (be == NULL || cfg == NULL || out == NULL)
        return CCR_EINVAL;
    ccr_ctx *ctx = ccr_backend_ctx(be);
    if (strncmp(ccr_backend_name(be), "cpu", 3) != 0)
        CCR_FAIL(ctx, CCR_EUNSUP, "the language model runs on a CPU backend");
    if (cfg->vocab < 2 || cfg->d == 0 || cfg->batch == 0 || cfg->unroll == 0 ||
        cfg->n_blocks > LM_MAX_BLOCKS)
        CCR_FAIL(ctx, CCR_EINVAL, "vocab >= 2, d, batch, unroll > 0, blocks <= %d required",
                 LM_MAX_BLOCKS);
    if (!(cfg->dropout >= 0.0 && cfg->dropout < 1.0))
        CCR_FAIL(ctx, CCR_EINVAL, "dropout must be in [0, 1), got %g", cfg->dropout);
    bool deep = false;
    for (size_t i = 0; i < cfg->n_blocks; i++) {
        if (cfg->blocks[i] == LM_BLOCK_COND && cfg->cond.gate == NULL)
            CCR_FAIL(ctx, CCR_EINVAL, "a conditional block needs a gate");
        deep = deep || cfg->blocks[i] == LM_BLOCK_DEEP;
    }
    if (deep && (cfg->deep_layers == 0 || cfg->deep_layers > 16 || cfg->deep_hidden == 0))
        CCR_FAIL(ctx, CCR_EINVAL, "deep block: 1..16 layers of hidden > 0 required");
    CCR_TRY(ccr_mem_check(ctx, lm_activation_bytes(cfg, deep), "language model activations"));
    lm_model *m = calloc(1, sizeof *m);
    if (m == NULL)
        CCR_FAIL(ctx, CCR_ENOMEM, "model");
    m->cfg = *cfg;
    m->be = be;
    m->ctx = ctx;
    size_t d = cfg->d, B = cfg->batch, N = B * cfg->unroll, V = cfg->vocab;
    size_t h = deep ? cfg->deep_hidden : 1;
    m->N = N;
    ccr_status s = ccr_arena_init(be, &m->arena);
    for (size_t i = 0; i < cfg->n_blocks && s == CCR_OK; i++) {
        m->b[i].kind = cfg->blocks[i];
        if (cfg->blocks[i] == LM_BLOCK_COND) {
            ccr_cond_config cc = cfg->cond;
            cc.d_in = cc.d_out = d;
            s = ccr_cond_alloc(be, &cc, N, &m->b[i].cond);
        }
    }
    if (s == CCR_OK) s = declare(m);
    if (s == CCR_OK) s = ccr_arena_finalize(m->arena);
    if (s != CCR_OK) {
        lm_model_free(m);
        return s;
    }
    /* Buffer sizes (floats), then one allocation carved in order. */
    size_t per_block = 3 * N * d, lstm_extra = 4 * N * d + 2 * (N + B) * d + N * d + 2 * B * d;
    size_t total = 2 * N * d + N * V + 3 * N * d + 4 * N * d + 2 * B * d + 2 * N * h + N;
    for (size_t i = 0; i < cfg->n_blocks; i++)
        total += per_block + (cfg->blocks[i] == LM_BLOCK_LSTM ? lstm_extra : 0) +
                 (cfg->blocks[i] == LM_BLOCK_DEEP ? cfg->deep_layers * N * h : 0);
    m->mem = calloc(total + N, sizeof(float)); /* bounded: lm_activation_bytes checked it */
    if (m->mem == NULL) {
        lm_model_free(m);
        CCR_FAIL(ctx, CCR_ENOMEM, "%zu floats of activations", total);
    }
    float *p = m->mem;
#define CARVE(ptr, n) ((ptr) = p, p += (n))
    CARVE(m->x0, N * d); CARVE(m->mask0, N * d); CARVE(m->prob, N * V);
    CARVE(m->gbuf, N * d); CARVE(m->df, N * d); CARVE(m->din, N * d);
    CARVE(m->dz, 4 * N * d); CARVE(m->dhn, B * d); CARVE(m->dcn, B * d);
    CARVE(m->da1, N * h); CARVE(m->da2, N * h);
    m->in = (int32_t *)p, p += N;
    m->tgt = (int32_t *)p, p += N;
    for (size_t i = 0; i < cfg->n_blocks; i++) {
        block *bl = &m->b[i];
        CARVE(bl->out, N * d); CARVE(bl->f, N * d); CARVE(bl->mask, N * d);
        if (bl->kind == LM_BLOCK_LSTM) {
            CARVE(bl->g, 4 * N * d); CARVE(bl->c, (N + B) * d); CARVE(bl->h, (N + B) * d);
            CARVE(bl->tc, N * d); CARVE(bl->hs, B * d); CARVE(bl->cs, B * d);
        } else if (bl->kind == LM_BLOCK_DEEP) {
            CARVE(bl->acts, cfg->deep_layers * N * h);
        }
    }
#undef CARVE
    *out = m;
    return CCR_OK;
}

void lm_model_free(lm_model *m)
{
    if (m == NULL)
        return;
    for (size_t i = 0; i < LM_MAX_BLOCKS; i++)
        ccr_cond_free(m->b[i].cond);
    ccr_arena_free(m->arena);
    free(m->mem);
    free(m);
}

static void uniform(gsl_rng *rng, float *v, size_t n, double r)
{
    for (size_t i = 0; i < n; i++)
        v[i] = (float)(r * (2.0 * gsl_rng_uniform(rng) - 1.0));
}

ccr_status lm_model_init_params(lm_model *m, gsl_rng *rng)
{
    if (m == NULL || rng == NULL)
        return CCR_EINVAL;
    const lm_config *c = &m->cfg;
    ccr_arena *a = m->arena;
    size_t d = c->d;
    uniform(rng, ccr_arena_value(a, m->p_emb), c->vocab * d, 0.1);
    for (size_t i = 0; i < c->n_blocks; i++) {
        block *bl = &m->b[i];
        double r = 1.0 / sqrt((double)d);
        if (bl->kind == LM_BLOCK_LSTM) {
            uniform(rng, ccr_arena_value(a, bl->p_wx), 4 * d * d, r);
            uniform(rng, ccr_arena_value(a, bl->p_wh), 4 * d * d, r);
            float *b = ccr_arena_value(a, bl->p_b);
            uniform(rng, b, 4 * d, r);
            for (size_t j = 0; j < d; j++)
                b[d + j] += c->forget_bias;
        } else if (bl->kind == LM_BLOCK_COND) {
            CCR_TRY(ccr_cond_init_params(bl->cond, rng));
        } else {
            for (size_t l = 0; l <= c->deep_layers; l++) {
                r = 1.0 / sqrt((double)(l == 0 ? d : c->deep_hidden));
                for (size_t q = 0; q < 2; q++)
                    uniform(rng, ccr_arena_value(a, bl->p_deep[2 * l + q]),
                            ccr_arena_size(a, bl->p_deep[2 * l + q]), r);
            }
        }
    }
    uniform(rng, ccr_arena_value(a, m->p_ow), d * c->vocab, 1.0 / sqrt((double)d));
    memset(ccr_arena_value(a, m->p_ob), 0, c->vocab * sizeof(float));
    lm_model_reset_state(m);
    return CCR_OK;
}

ccr_arena *lm_model_arena(const lm_model *m) { return m->arena; }
const lm_config *lm_model_config(const lm_model *m) { return &m->cfg; }

ccr_cond *lm_model_cond(const lm_model *m)
{
    for (size_t i = 0; i < m->cfg.n_blocks; i++)
        if (m->b[i].kind == LM_BLOCK_COND)
            return m->b[i].cond;
    return NULL;
}

void lm_model_reset_state(lm_model *m)
{
    size_t n = m->cfg.batch * m->cfg.d;
    for (size_t i = 0; i < m->cfg.n_blocks; i++)
        if (m->b[i].kind == LM_BLOCK_LSTM) {
            memset(m->b[i].hs, 0, n * sizeof(float));
            memset(m->b[i].cs, 0, n * sizeof(float));
        }
}

size_t lm_model_state_len(const lm_model *m)
{
    size_t n = 0;
    for (size_t i = 0; i < m->cfg.n_blocks; i++)
        n += m->b[i].kind == LM_BLOCK_LSTM ? 2 * m->cfg.batch * m->cfg.d : 0;
    return n;
}

static void state_copy(lm_model *m, float *buf, bool out)
{
    size_t n = m->cfg.batch * m->cfg.d;
    for (size_t i = 0; i < m->cfg.n_blocks; i++) {
        if (m->b[i].kind != LM_BLOCK_LSTM)
            continue;
        float *st[2] = {m->b[i].hs, m->b[i].cs};
        for (size_t q = 0; q < 2; q++, buf += n)
            memcpy(out ? buf : st[q], out ? st[q] : buf, n * sizeof(float));
    }
}

void lm_model_state_get(const lm_model *m, float *out) { state_copy((lm_model *)m, out, true); }
void lm_model_state_set(lm_model *m, const float *in) { state_copy(m, (float *)in, false); }

static float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }

/* y[r] += bias for n rows of width w. */
static void bias_rows(float *y, const float *bias, size_t n, size_t w)
{
    for (size_t r = 0; r < n; r++)
        for (size_t j = 0; j < w; j++)
            y[r * w + j] += bias[j];
}

/* g[j] += sum over n rows of dy. */
static void colsum(float *g, const float *dy, size_t n, size_t w)
{
    for (size_t r = 0; r < n; r++)
        for (size_t j = 0; j < w; j++)
            g[j] += dy[r * w + j];
}

static ccr_status lstm_forward(lm_model *m, block *bl, const float *x, double *fl)
{
    size_t d = m->cfg.d, B = m->cfg.batch, T = m->cfg.unroll, N = m->N, G = 4 * d;
    const ccr_arena *a = m->arena;
    memcpy(bl->h, bl->hs, B * d * sizeof(float));
    memcpy(bl->c, bl->cs, B * d * sizeof(float));
    CCR_TRY(gemm(m, false, false, N, G, d, x, d, ccr_arena_value(a, bl->p_wx), G, 0.0f, bl->g, G));
    bias_rows(bl->g, ccr_arena_value(a, bl->p_b), N, G);
    for (size_t t = 0; t < T; t++) {
        float *g = bl->g + t * B * G, *cp = bl->c + t * B * d, *hp = bl->h + t * B * d;
        CCR_TRY(gemm(m, false, false, B, G, d, hp, d, ccr_arena_value(a, bl->p_wh), G, 1.0f, g, G));
        for (size_t b = 0; b < B; b++)
            for (size_t j = 0; j < d; j++) {
                float *z = g + b * G;
                float i = sigm(z[j]), f = sigm(z[d + j]), gg = tanhf(z[2 * d + j]);
                float o = sigm(z[3 * d + j]);
                z[j] = i, z[d + j] = f, z[2 * d + j] = gg, z[3 * d + j] = o;
                float c = f * cp[b * d + j] + i * gg, tc = tanhf(c);
                cp[(B + b) * d + j] = c;
                bl->tc[(t * B + b) * d + j] = tc;
                hp[(B + b) * d + j] = o * tc;
            }
    }
    memcpy(bl->hs, bl->h + N * d, B * d * sizeof(float));
    memcpy(bl->cs, bl->c + N * d, B * d * sizeof(float));
    memcpy(bl->f, bl->h + B * d, N * d * sizeof(float));
    *fl += (double)N * (4.0 * d * G + G);
    return CCR_OK;
}

/* dF = dL/dh_t for t = 1..T; parameter gradients into the arena, dIn = dL/dx. */
static ccr_status lstm_backward(lm_model *m, block *bl, const float *x, const float *dF,
                                float *dIn)
{
    size_t d = m->cfg.d, B = m->cfg.batch, T = m->cfg.unroll, N = m->N, G = 4 * d;
    const ccr_arena *a = m->arena;
    memset(m->dhn, 0, B * d * sizeof(float));
    memset(m->dcn, 0, B * d * sizeof(float));
    for (size_t t = T; t-- > 0;) {
        for (size_t b = 0; b < B; b++)
            for (size_t j = 0; j < d; j++) {
                size_t r = t * B + b, q = b * d + j;
                const float *z = bl->g + r * G;
                float i = z[j], f = z[d + j], gg = z[2 * d + j], o = z[3 * d + j];
                float tc = bl->tc[r * d + j], dh = dF[r * d + j] + m->dhn[q];
                float dc = m->dcn[q] + dh * o * (1.0f - tc * tc);
                float *dz = m->dz + r * G;
                dz[j] = dc * gg * i * (1.0f - i);
                dz[d + j] = dc * bl->c[r * d + j] * f * (1.0f - f);
                dz[2 * d + j] = dc * i * (1.0f - gg * gg);
                dz[3 * d + j] = dh * tc * o * (1.0f - o);
                m->dcn[q] = dc * f;
            }
        if (t > 0)
            CCR_TRY(gemm(m, false, true, B, d, G, m->dz + t * B * G, G,
                         ccr_arena_value(a, bl->p_wh), G, 0.0f, m->dhn, d));
    }
    CCR_TRY(gemm(m, true, false, d, G, N, x, d, m->dz, G, 1.0f, ccr_arena_grad(a, bl->p_wx), G));
    CCR_TRY(gemm(m, true, false, d, G, N, bl->h, d, m->dz, G, 1.0f,
                 ccr_arena_grad(a, bl->p_wh), G));
    colsum(ccr_arena_grad(a, bl->p_b), m->dz, N, G);
    return gemm(m, false, true, N, d, G, m->dz, G, ccr_arena_value(a, bl->p_wx), G, 0.0f, dIn, d);
}

static ccr_status deep_forward(lm_model *m, block *bl, const float *x, double *fl)
{
    size_t d = m->cfg.d, h = m->cfg.deep_hidden, L = m->cfg.deep_layers, N = m->N;
    for (size_t l = 0; l <= L; l++) {
        size_t din = l == 0 ? d : h, dout = l == L ? d : h;
        const float *xin = l == 0 ? x : bl->acts + (l - 1) * N * h;
        float *y = l == L ? bl->f : bl->acts + l * N * h;
        CCR_TRY(gemm(m, false, false, N, dout, din, xin, din,
                     ccr_arena_value(m->arena, bl->p_deep[2 * l]), dout, 0.0f, y, dout));
        bias_rows(y, ccr_arena_value(m->arena, bl->p_deep[2 * l + 1]), N, dout);
        if (l < L)
            for (size_t i = 0; i < N * dout; i++)
                y[i] = y[i] > 0.0f ? y[i] : 0.0f;
        *fl += (double)N * (2.0 * din * dout + dout);
    }
    return CCR_OK;
}

static ccr_status deep_backward(lm_model *m, block *bl, const float *x, const float *dF,
                                float *dIn)
{
    size_t d = m->cfg.d, h = m->cfg.deep_hidden, L = m->cfg.deep_layers, N = m->N;
    const float *dy = dF;
    float *bufs[2] = {m->da1, m->da2};
    for (size_t l = L + 1; l-- > 0;) {
        size_t din = l == 0 ? d : h, dout = l == L ? d : h;
        const float *xin = l == 0 ? x : bl->acts + (l - 1) * N * h;
        CCR_TRY(gemm(m, true, false, din, dout, N, xin, din, dy, dout, 1.0f,
                     ccr_arena_grad(m->arena, bl->p_deep[2 * l]), dout));
        colsum(ccr_arena_grad(m->arena, bl->p_deep[2 * l + 1]), dy, N, dout);
        float *dx = l == 0 ? dIn : bufs[l % 2];
        CCR_TRY(gemm(m, false, true, N, din, dout, dy, dout,
                     ccr_arena_value(m->arena, bl->p_deep[2 * l]), dout, 0.0f, dx, din));
        if (l > 0)
            for (size_t i = 0; i < N * h; i++)
                dx[i] = xin[i] > 0.0f ? dx[i] : 0.0f;
        dy = dx;
    }
    return CCR_OK;
}

static void dropout(lm_model *m, gsl_rng *rng, float *mask, float *y)
{
    if (!m->drop_active)
        return;
    size_t n = m->N * m->cfg.d;
    float keep = (float)(1.0 / (1.0 - m->cfg.dropout));
    for (size_t i = 0; i < n; i++) {
        mask[i] = gsl_rng_uniform(rng) < m->cfg.dropout ? 0.0f : keep;
        y[i] *= mask[i];
    }
}

/* exp(x) for x <= 0 as plain arithmetic the compiler vectorises: x = n ln 2
 * + r with |r| <= ln2/2 (two-part ln 2), e^r by Cephes expf's degree-6
 * polynomial, 2^n put into the exponent bits.  Relative error about 2e-7
 * (tested against exp in double); x below ln(2^-126) is clamped there, so no
 * subnormal result can slow the loops that follow (see RESULTS, "Subnormal
 * numbers slowed training").  NaN stays NaN. */
static inline float exp_nonpos(float x)
{
    const float lo = -87.33654f, log2e = 1.44269504089f, shifter = 12582912.0f;  /* 1.5*2^23 */
    x = x < lo ? lo : x;
    float n = (x * log2e + shifter) - shifter;  /* round to nearest, |n| <= 126 */
    float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  /* NaN stays in r */
    n = n == n ? n : 0.0f;  /* no float-to-int conversion of a NaN */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n = {.i = ((int32_t)n + 127) << 23};
    return p * two_n.f;
}

double lm_softmax_row(float *z, size_t n)
{
    /* Fixed lanes and blocks: the same sums in the same order on every call,
     * and loops simple enough for the compiler to vectorise. */
    enum { L = 8, BLOCK = 512 };
    size_t nv = n - n % L;
    float mx8[L];
    for (size_t l = 0; l < L; l++)
        mx8[l] = z[0];
    for (size_t j = 0; j < nv; j += L)
        for (size_t l = 0; l < L; l++)
            mx8[l] = z[j + l] > mx8[l] ? z[j + l] : mx8[l];
    float mx = z[0];
    for (size_t l = 0; l < L; l++)
        mx = mx8[l] > mx ? mx8[l] : mx;
    for (size_t j = nv; j < n; j++)
        mx = z[j] > mx ? z[j] : mx;
    for (size_t j = 0; j < n; j++)
        z[j] = exp_nonpos(z[j] - mx);
    double sum = 0.0;  /* float lanes within a block, double across blocks */
    for (size_t j0 = 0; j0 < n; j0 += BLOCK) {
        size_t j1 = n - j0 < BLOCK ? n : j0 + BLOCK, jv = j1 - (j1 - j0) % L;
        float s8[L] = {0.0f};
        for (size_t j = j0; j < jv; j += L)
            for (size_t l = 0; l < L; l++)
                s8[l] += z[j + l];
        float bs = 0.0f;
        for (size_t l = 0; l < L; l++)
            bs += s8[l];
        for (size_t j = jv; j < j1; j++)
            bs += z[j];
        sum += (double)bs;
    }
    float inv = (float)(1.0 / sum);
    for (size_t j = 0; j < n; j++)
        z[j] *= inv;
    return log(sum) + (double)mx;
}

ccr_status lm_model_forward(lm_model *m, const int32_t *in, const int32_t *tgt, bool train,
                            gsl_rng *rng, lm_fwd_stats *st)
{
    if (m == NULL || in == NULL || tgt == NULL || st == NULL || (train && rng == NULL))
        return CCR_EINVAL;
    const lm_config *c = &m->cfg;
    size_t N = m->N, d = c->d, V = c->vocab;
    for (size_t r = 0; r < N; r++)
        if (in[r] < 0 || (size_t)in[r] >= V || tgt[r] < -1 || tgt[r] >= (int32_t)V)
            CCR_FAIL(m->ctx, CCR_EINVAL, "row %zu: input %d / target %d out of range (vocab %zu)",
                     r, in[r], tgt[r], V);
    memset(st, 0, sizeof *st);
    m->fwd_done = false;
    m->drop_active = train && c->dropout > 0.0;
    memcpy(m->in, in, N * sizeof *in);
    memcpy(m->tgt, tgt, N * sizeof *tgt);
    const float *emb = ccr_arena_value(m->arena, m->p_emb);
    for (size_t r = 0; r < N; r++)
        memcpy(m->x0 + r * d, emb + (size_t)in[r] * d, d * sizeof(float));
    dropout(m, rng, m->mask0, m->x0);
    const float *x = m->x0;
    bool first_cond = true;
    for (size_t i = 0; i < c->n_blocks; i++) {
        block *bl = &m->b[i];
        if (bl->kind == LM_BLOCK_LSTM) {
            CCR_TRY(lstm_forward(m, bl, x, &st->flops_counted));
        } else if (bl->kind == LM_BLOCK_DEEP) {
            CCR_TRY(deep_forward(m, bl, x, &st->flops_counted));
        } else {
            ccr_gate_stats gs;
            CCR_TRY(ccr_cond_forward(bl->cond, x, N, train, rng, bl->f, &gs));
            st->aux_loss += gs.aux_loss;
            st->flops_counted += gs.flops_counted * (double)N;
            if (first_cond)
                st->gate = gs;
            first_cond = false;
            if (c->moe_sigmoid)
                for (size_t q = 0; q < N * d; q++)
                    bl->f[q] = sigm(bl->f[q]);
        }
        memcpy(bl->out, bl->f, N * d * sizeof(float));
        dropout(m, rng, bl->mask, bl->out);
        for (size_t q = 0; q < N * d; q++)
            bl->out[q] += x[q];
        x = bl->out;
    }
    /* Full softmax; prob keeps the probabilities for the backward pass. */
    CCR_TRY(gemm(m, false, false, N, V, d, x, d, ccr_arena_value(m->arena, m->p_ow), V, 0.0f,
                 m->prob, V));
    bias_rows(m->prob, ccr_arena_value(m->arena, m->p_ob), N, V);
    st->flops_counted += (double)N * (2.0 * d * V + V);
    for (size_t r = 0; r < N; r++) {
        float *z = m->prob + r * V;
        double zt = tgt[r] >= 0 ? (double)z[tgt[r]] : 0.0;
        double lse = lm_softmax_row(z, V);
        if (tgt[r] >= 0) {
            st->nll_sum += lse - zt;
            st->n_scored++;
        }
    }
    m->n_scored = st->n_scored;
    m->fwd_done = true;
    return CCR_OK;
}

ccr_status lm_model_backward(lm_model *m)
{
    if (m == NULL)
        return CCR_EINVAL;
    if (!m->fwd_done)
        CCR_FAIL(m->ctx, CCR_EINVAL, "backward needs a forward pass first");
    const lm_config *c = &m->cfg;
    size_t N = m->N, d = c->d, V = c->vocab;
    float scale = m->n_scored ? 1.0f / (float)m->n_scored : 0.0f;
    for (size_t r = 0; r < N; r++) {
        float *z = m->prob + r * V;
        if (m->tgt[r] < 0) {
            memset(z, 0, V * sizeof(float));
            continue;
        }
        z[m->tgt[r]] -= 1.0f;
        for (size_t j = 0; j < V; j++)
            z[j] *= scale;
    }
    m->fwd_done = false;  /* prob now holds dL/dlogits */
    const float *xl = c->n_blocks ? m->b[c->n_blocks - 1].out : m->x0;
    CCR_TRY(gemm(m, true, false, d, V, N, xl, d, m->prob, V, 1.0f,
                 ccr_arena_grad(m->arena, m->p_ow), V));
    colsum(ccr_arena_grad(m->arena, m->p_ob), m->prob, N, V);
    CCR_TRY(gemm(m, false, true, N, d, V, m->prob, V, ccr_arena_value(m->arena, m->p_ow), V,
                 0.0f, m->gbuf, d));
    for (size_t i = c->n_blocks; i-- > 0;) {
        block *bl = &m->b[i];
        const float *x = i == 0 ? m->x0 : m->b[i - 1].out;
        for (size_t q = 0; q < N * d; q++) {
            float g = m->drop_active ? m->gbuf[q] * bl->mask[q] : m->gbuf[q];
            if (bl->kind == LM_BLOCK_COND && c->moe_sigmoid)
                g *= bl->f[q] * (1.0f - bl->f[q]);
            m->df[q] = g;
        }
        if (bl->kind == LM_BLOCK_LSTM)
            CCR_TRY(lstm_backward(m, bl, x, m->df, m->din));
        else if (bl->kind == LM_BLOCK_DEEP)
            CCR_TRY(deep_backward(m, bl, x, m->df, m->din));
        else
            CCR_TRY(ccr_cond_backward(bl->cond, m->df, m->din));
        for (size_t q = 0; q < N * d; q++)
            m->gbuf[q] += m->din[q];
    }
    /* Sparse embedding gradient: only the rows looked up receive one. */
    float *ge = ccr_arena_grad(m->arena, m->p_emb);
    for (size_t r = 0; r < N; r++)
        for (size_t j = 0; j < d; j++) {
            size_t q = r * d + j;
            ge[(size_t)m->in[r] * d + j] += m->drop_active ? m->gbuf[q] * m->mask0[q] : m->gbuf[q];
        }
    return CCR_OK;
}

size_t lm_model_n_params(const lm_model *m, bool exclude_emb_softmax)
{
    size_t n = ccr_arena_n_params(m->arena);
    if (exclude_emb_softmax)
        n -= ccr_arena_size(m->arena, m->p_emb) + ccr_arena_size(m->arena, m->p_ow) +
             ccr_arena_size(m->arena, m->p_ob);
    return n;
}

double lm_model_flops_fwd(const lm_model *m)
{
    const lm_config *c = &m->cfg;
    double d = (double)c->d, h = (double)c->deep_hidden, V = (double)c->vocab;
    double f = 2.0 * d * V + V;
    for (size_t i = 0; i < c->n_blocks; i++) {
        if (m->b[i].kind == LM_BLOCK_LSTM)
            f += 2.0 * (2.0 * d) * (4.0 * d) + 4.0 * d;
        else if (m->b[i].kind == LM_BLOCK_COND)
            f += ccr_cond_flops(m->b[i].cond, true);
        else
            f += 2.0 * d * h + h + (double)(c->deep_layers - 1) * (2.0 * h * h + h) +
                 2.0 * h * d + d;
    }
    return f;
}

ccr_status lm_grad_clip(ccr_arena *a, double max_norm, double *norm)
{
    if (a == NULL || norm == NULL || !(max_norm > 0.0))
        return CCR_EINVAL;
    return ccr_arena_clip_grad_norm(a, max_norm, norm);
}
