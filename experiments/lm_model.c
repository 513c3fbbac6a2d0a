/*
 * lm_model.c - Shazeer's LSTM language model (embedding, LSTM / conditional
 * / deep blocks with dropout and residuals, full softmax) with its backward
 * pass, and the Tables 7-8 ops/params accounting.  Every buffer is sized
 * for batch x unroll rows in lm_model_alloc; forward and backward allocate
 * nothing.  The model runs on any backend with the sequence ops of
 * src/ops.h (the CPU and CUDA backends): activations live in backend memory
 * (device memory on CUDA), matrix products go through ccr_backend_gemm and
 * every other step through one kernel-table op, so the CPU and the GPU run
 * the same sequence of ops.  The host keeps the batch's ids, draws the
 * dropout masks (uploaded, so both backends see the same masks), sums the
 * per-row NLLs in row order and lists each id's rows for the embedding
 * gradient.  On the CPU, element-wise loops run in a fixed order, so a run is
 * bitwise reproducible for a fixed seed and thread count.  LSTM gate layout
 * in the 4d columns: input, forget, candidate, output.
 */
#include "lm_model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena_impl.h" // provides: ccr_arena_sparse_of (the bank tensors)
#include "internal.h"  // provides: CCR_FAIL, CCR_TRY, ccr_mallocn, ccr_mem_check
#include "ops.h"       // provides: ccr_op_* (the sequence ops on the backend)
#include "ref/ref.h"   // provides: ccr_ref_softmax_row

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
    float *mem;                      /* backend memory: every buffer below and the blocks' */
    float *x0, *mask0, *prob, *gbuf, *df, *din, *dz, *dhn, *dcn, *da1, *da2;
    double *nll;                     /* [N] per-row NLL of the last forward */
    int32_t *in, *tgt;               /* [N] the batch */
    int32_t *seg;                    /* embedding-gradient segments: rows [N], start [N+1], dst [N] */
    int32_t *perm, *inv;             /* [N] stream-major row -> time-major row, and back */
    float *tmp;                      /* [N, d] a conditional block's rows, stream-major */
    ccr_comm *comm;                  /* NULL in one process */
    size_t B_glob, b0;               /* the global batch's streams, this rank's first */
    size_t n_params, n_params_core;  /* over all ranks: every parameter, without emb/softmax */
    double *comm_buf;                /* [P + 2] host scratch of the all-reduces */
    size_t *rep_rows;                /* [tensors] leading bank rows every rank holds (the
                                        path tree's replicated top), NULL without comm */
    /* host */
    int32_t *h_in, *h_tgt, *h_seg, *h_count; /* batch, segments, per-id counts [vocab + 1] */
    double *h_nll;                   /* [N] */
    float *h_mask;                   /* [N, d] one dropout mask (NULL without dropout) */
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

/* Floats of backend memory (the `total` carved below) and host bytes, in
 * double precision so that no size product can wrap; the sum as bytes, or
 * SIZE_MAX if it exceeds a quarter of the address space, which also makes
 * every size_t product below exact. */
static double lm_backend_floats(const lm_config *cfg, bool deep)
{
    double d = (double)cfg->d, B = (double)cfg->batch, N = B * (double)cfg->unroll;
    double V = (double)cfg->vocab, h = deep ? (double)cfg->deep_hidden : 1.0;
    double total = 2 * N * d + N * V + 8 * N * d + 2 * B * d + 2 * N * h + 9 * N + 1;
    double lstm = 5 * N * d + 2 * (N + B) * d + 2 * B * d;
    for (size_t i = 0; i < cfg->n_blocks; i++)
        total += 3 * N * d + (cfg->blocks[i] == LM_BLOCK_LSTM ? lstm : 0.0) +
                 (cfg->blocks[i] == LM_BLOCK_DEEP ? (double)cfg->deep_layers * N * h : 0.0);
    return total;
}

static size_t lm_activation_bytes(const lm_config *cfg, bool deep)
{
    double N = (double)cfg->batch * (double)cfg->unroll, V = (double)cfg->vocab;
    double host = 4 * (7 * N + V + 2) + 8 * N + (cfg->dropout > 0.0 ? 4 * N * (double)cfg->d : 0);
    double bytes = lm_backend_floats(cfg, deep) * (double)sizeof(float) + host;
    return bytes < (double)(SIZE_MAX / 4) ? (size_t)bytes : SIZE_MAX;
}

/* Under a communicator: every rank's stream count, summed into the global
 * batch, and this rank's first stream (the ranks in order). */
static ccr_status lm_streams_agree(lm_model *m)
{
    size_t P = (size_t)ccr_comm_size(m->comm), r = (size_t)ccr_comm_rank(m->comm);
    m->comm_buf = ccr_mallocn(P + 2, sizeof *m->comm_buf);
    if (m->comm_buf == NULL)
        CCR_FAIL(m->ctx, CCR_ENOMEM, "communicator scratch");
    for (size_t q = 0; q < P; q++)
        m->comm_buf[q] = q == r ? (double)m->cfg.batch : 0.0;
    CCR_TRY(ccr_comm_allreduce_sum_f64(m->comm, m->comm_buf, P));
    m->B_glob = 0;
    for (size_t q = 0; q < P; q++) {
        m->b0 += q < r ? (size_t)m->comm_buf[q] : 0;
        m->B_glob += (size_t)m->comm_buf[q];
    }
    return CCR_OK;
}

/* Rows of bank tensor i that every rank holds (a conditional block's
 * replicated matrices: ccr_cond_held), found by the block's name prefix. */
static ccr_status lm_replicated_rows(lm_model *m)
{
    const ccr_arena *a = m->arena;
    m->rep_rows = calloc(ccr_arena_count(a) + 1, sizeof *m->rep_rows);
    if (m->rep_rows == NULL)
        CCR_FAIL(m->ctx, CCR_ENOMEM, "replicated-row table");
    for (size_t b = 0; b < m->cfg.n_blocks; b++) {
        if (m->b[b].kind != LM_BLOCK_COND)
            continue;
        size_t n_held, n_rep;
        CCR_TRY(ccr_cond_held(m->b[b].cond, NULL, 0, &n_held, &n_rep));
        char prefix[32];
        int len = snprintf(prefix, sizeof prefix, "moe.%zu.", b);
        for (size_t i = 0; i < ccr_arena_count(a); i++)
            if (ccr_arena_sparse_of(a, i) != NULL &&
                strncmp(ccr_arena_name(a, i), prefix, (size_t)len) == 0)
                m->rep_rows[i] = n_rep;
    }
    return CCR_OK;
}

/* Whether row `row` of bank tensor i counts on this rank in a sum over the
 * ranks: replicated rows on rank 0 only. */
static bool lm_row_counts(const lm_model *m, size_t i, size_t row)
{
    return m->rep_rows == NULL || row >= m->rep_rows[i] || ccr_comm_rank(m->comm) == 0;
}

/* The parameter counts over all ranks: the banks are split (their
 * replicated rows counted once), the rest is replicated. */
static ccr_status lm_count_params(lm_model *m)
{
    const ccr_arena *a = m->arena;
    double c[2] = {0.0, 0.0};  /* replicated, this rank's banks */
    if (m->comm != NULL)
        CCR_TRY(lm_replicated_rows(m));
    for (size_t i = 0; i < ccr_arena_count(a); i++) {
        const ccr_arena_sparse *sp = ccr_arena_sparse_of(a, i);
        size_t skip = sp != NULL && !lm_row_counts(m, i, 0) ? m->rep_rows[i] * sp->row_len : 0;
        c[sp != NULL] += (double)(ccr_arena_size(a, i) - skip);
    }
    if (m->comm != NULL) {
        m->comm_buf[0] = c[1];
        CCR_TRY(ccr_comm_allreduce_sum_f64(m->comm, m->comm_buf, 1));
        c[1] = m->comm_buf[0];
    }
    m->n_params = (size_t)(c[0] + c[1]);
    m->n_params_core = m->n_params - ccr_arena_size(a, m->p_emb) - ccr_arena_size(a, m->p_ow) -
                       ccr_arena_size(a, m->p_ob);
    return CCR_OK;
}

ccr_status lm_model_alloc(ccr_backend *be, const lm_config *cfg, lm_model **out)
{
    if (be == NULL || cfg == NULL || out == NULL)
        return CCR_EINVAL;
    ccr_ctx *ctx = ccr_backend_ctx(be);
    CCR_TRY(ccr_ops_check(be));
    if (cfg->vocab < 2 || cfg->vocab > INT32_MAX || cfg->d == 0 || cfg->batch == 0 ||
        cfg->unroll == 0 || cfg->n_blocks > LM_MAX_BLOCKS)
        CCR_FAIL(ctx, CCR_EINVAL, "2 <= vocab < 2^31, d, batch, unroll > 0, blocks <= %d required",
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
    if ((double)cfg->batch * (double)cfg->unroll >= (double)INT32_MAX)
        CCR_FAIL(ctx, CCR_EINVAL, "batch x unroll must be below 2^31");
    lm_model *m = calloc(1, sizeof *m);
    if (m == NULL)
        CCR_FAIL(ctx, CCR_ENOMEM, "model");
    m->cfg = *cfg;
    m->be = be;
    m->ctx = ctx;
    size_t d = cfg->d, B = cfg->batch, N = B * cfg->unroll, V = cfg->vocab;
    size_t h = deep ? cfg->deep_hidden : 1;
    m->N = N;
    m->comm = cfg->comm;
    m->B_glob = B;
    ccr_status s = ccr_arena_init(be, &m->arena);
    if (s == CCR_OK && m->comm != NULL)
        s = lm_streams_agree(m);
    for (size_t i = 0; i < cfg->n_blocks && s == CCR_OK; i++) {
        m->b[i].kind = cfg->blocks[i];
        if (cfg->blocks[i] == LM_BLOCK_COND) {
            ccr_cond_config cc = cfg->cond;
            cc.d_in = cc.d_out = d;
            s = ccr_cond_alloc(be, &cc, N, &m->b[i].cond);
            if (s == CCR_OK && m->comm != NULL)
                s = ccr_cond_set_comm(m->b[i].cond, m->comm);
        }
    }
    if (s == CCR_OK) s = declare(m);
    if (s == CCR_OK) s = ccr_arena_finalize(m->arena);
    if (s == CCR_OK) s = lm_count_params(m);
    /* Host: the batch, segments, permutations and counts (int32), the NLLs,
     * one mask. */
    m->h_in = ccr_mallocn(7 * N + V + 2, sizeof *m->h_in); /* bounded: lm_activation_bytes */
    m->h_nll = ccr_mallocn(N, sizeof *m->h_nll);
    m->h_mask = cfg->dropout > 0.0 ? ccr_mallocn(N * d, sizeof *m->h_mask) : NULL; /* bounded: as above */
    if (s == CCR_OK && (m->h_in == NULL || m->h_nll == NULL || (cfg->dropout > 0.0 && m->h_mask == NULL)))
        s = CCR_FAIL_EXPR(ctx, CCR_ENOMEM, "host buffers of %zu rows", N);
    /* Backend memory: one block, carved in order (the doubles first). */
    size_t total = (size_t)lm_backend_floats(cfg, deep);
    if (s == CCR_OK) s = ccr_backend_alloc(be, total * sizeof(float), (void **)&m->mem); /* bounded: as above */
    if (s != CCR_OK) {
        lm_model_free(m);
        return s;
    }
    m->h_tgt = m->h_in + N;
    m->h_seg = m->h_tgt + N;
    m->h_count = m->h_seg + 3 * N + 1 + 2 * N;
    float *p = m->mem;
#define CARVE(ptr, n) ((ptr) = p, p += (n))
    m->nll = (double *)p, p += 2 * N;
    CARVE(m->x0, N * d); CARVE(m->mask0, N * d); CARVE(m->prob, N * V);
    CARVE(m->gbuf, N * d); CARVE(m->df, N * d); CARVE(m->din, N * d); CARVE(m->tmp, N * d);
    CARVE(m->dz, 4 * N * d); CARVE(m->dhn, B * d); CARVE(m->dcn, B * d);
    CARVE(m->da1, N * h); CARVE(m->da2, N * h);
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
    m->in = (int32_t *)p, p += N;
    m->tgt = (int32_t *)p, p += N;
    m->perm = (int32_t *)p, p += N;
    m->inv = (int32_t *)p, p += N;
    m->seg = (int32_t *)p;
    /* The conditional blocks' stream-major order: row b * T + t holds
     * timestep t of stream b (time-major row t * B + b). */
    size_t T = cfg->unroll;
    int32_t *hp = m->h_seg + 3 * N + 1, *hi = hp + N;
    for (size_t b = 0; b < B; b++)
        for (size_t t = 0; t < T; t++) {
            hp[b * T + t] = (int32_t)(t * B + b);
            hi[t * B + b] = (int32_t)(b * T + t);
        }
    s = ccr_backend_set(be, m->perm, hp, 2 * N * sizeof *hp);
    if (s != CCR_OK) {
        lm_model_free(m);
        return s;
    }
    *out = m;
    return CCR_OK;
}

void lm_model_free(lm_model *m)
{
    if (m == NULL)
        return;
    for (size_t i = 0; i < LM_MAX_BLOCKS; i++)
        ccr_cond_free(m->b[i].cond);
    ccr_backend_free_buffer(m->be, m->mem);
    ccr_arena_free(m->arena);
    free(m->h_in);
    free(m->h_nll);
    free(m->h_mask);
    free(m->comm_buf);
    free(m->rep_rows);
    free(m);
}

static void uniform(gsl_rng *rng, float *v, size_t n, double r)
{
    for (size_t i = 0; i < n; i++)
        v[i] = (float)(r * (2.0 * gsl_rng_uniform(rng) - 1.0));
}

/* Draws tensor i from U(-r, r) into the host buffer and stores it. */
static ccr_status init_tensor(lm_model *m, gsl_rng *rng, float *host, size_t i, double r)
{
    uniform(rng, host, ccr_arena_size(m->arena, i), r);
    return ccr_arena_set(m->arena, i, host);
}

ccr_status lm_model_init_params(lm_model *m, gsl_rng *rng)
{
    if (m == NULL || rng == NULL)
        return CCR_EINVAL;
    const lm_config *c = &m->cfg;
    ccr_arena *a = m->arena;
    size_t d = c->d, most = 0;
    for (size_t i = 0; i < ccr_arena_count(a); i++)
        most = ccr_arena_size(a, i) > most ? ccr_arena_size(a, i) : most;
    float *host = ccr_mallocn(most, sizeof *host);
    if (host == NULL)
        CCR_FAIL(m->ctx, CCR_ENOMEM, "%zu floats of initial values", most);
    ccr_status s = init_tensor(m, rng, host, m->p_emb, 0.1);
    for (size_t i = 0; i < c->n_blocks && s == CCR_OK; i++) {
        block *bl = &m->b[i];
        double r = 1.0 / sqrt((double)d);
        if (bl->kind == LM_BLOCK_LSTM) {
            s = init_tensor(m, rng, host, bl->p_wx, r);
            if (s == CCR_OK) s = init_tensor(m, rng, host, bl->p_wh, r);
            if (s == CCR_OK) {
                uniform(rng, host, 4 * d, r);
                for (size_t j = 0; j < d; j++)
                    host[d + j] += c->forget_bias;
                s = ccr_arena_set(a, bl->p_b, host);
            }
        } else if (bl->kind == LM_BLOCK_COND) {
            s = ccr_cond_init_params(bl->cond, rng);
        } else {
            for (size_t l = 0; l <= c->deep_layers && s == CCR_OK; l++) {
                r = 1.0 / sqrt((double)(l == 0 ? d : c->deep_hidden));
                for (size_t q = 0; q < 2 && s == CCR_OK; q++)
                    s = init_tensor(m, rng, host, bl->p_deep[2 * l + q], r);
            }
        }
    }
    if (s == CCR_OK) s = init_tensor(m, rng, host, m->p_ow, 1.0 / sqrt((double)d));
    if (s == CCR_OK) {
        memset(host, 0, c->vocab * sizeof *host);
        s = ccr_arena_set(a, m->p_ob, host);
    }
    free(host);
    return s == CCR_OK ? lm_model_reset_state(m) : s;
}

ccr_arena *lm_model_arena(const lm_model *m) { return m->arena; }

void lm_model_streams(const lm_model *m, size_t *global, size_t *first)
{
    *global = m->B_glob;
    *first = m->b0;
}

void lm_model_slice(const lm_model *m, const int32_t *global, int32_t *local)
{
    size_t B = m->cfg.batch;
    for (size_t t = 0; t < m->cfg.unroll; t++)
        memcpy(local + t * B, global + t * m->B_glob + m->b0, B * sizeof *local);
}

/* Adds the squares of n floats in order. */
static double sum_sq(const float *g, size_t n)
{
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += (double)g[i] * (double)g[i];
    return s;
}

ccr_status lm_model_clip_grad(lm_model *m, double max_norm, double *norm)
{
    if (m == NULL || norm == NULL)
        return CCR_EINVAL;
    if (m->comm == NULL)
        return lm_grad_clip(m->arena, max_norm, norm);
    if (!(max_norm > 0.0) || !isfinite(max_norm))
        CCR_FAIL(m->ctx, CCR_EINVAL, "max_norm %g must be finite and > 0", max_norm);
    /* Host gradients (a communicator implies the CPU backend): the
     * replicated tensors are equal on every rank after the backward's
     * all-reduce; each rank's bank blocks (their touched rows) add theirs. */
    const ccr_arena *a = m->arena;
    double rep = 0.0, own = 0.0;
    for (size_t i = 0; i < ccr_arena_count(a); i++) {
        const ccr_arena_sparse *sp = ccr_arena_sparse_of(a, i);
        const float *g = ccr_arena_grad(a, i);
        if (sp == NULL)
            rep += sum_sq(g, ccr_arena_size(a, i));
        else
            for (size_t q = 0; q < sp->n_touched; q++)
                if (lm_row_counts(m, i, sp->list[q]))  /* replicated rows: once */
                    own += sum_sq(g + sp->list[q] * sp->row_len, sp->row_len);
    }
    m->comm_buf[0] = own;
    CCR_TRY(ccr_comm_allreduce_sum_f64(m->comm, m->comm_buf, 1));
    *norm = sqrt(rep + m->comm_buf[0]);
    if (!isfinite(*norm))
        CCR_FAIL(m->ctx, CCR_EDOM, "gradient norm is %g", *norm);
    if (*norm <= max_norm)
        return CCR_OK;
    float k = (float)(max_norm / *norm);
    for (size_t i = 0; i < ccr_arena_count(a); i++) {
        const ccr_arena_sparse *sp = ccr_arena_sparse_of(a, i);
        float *g = ccr_arena_grad(a, i);
        if (sp == NULL)
            ccr_ref_scale(g, ccr_arena_size(a, i), k);
        else
            for (size_t q = 0; q < sp->n_touched; q++)
                ccr_ref_scale(g + sp->list[q] * sp->row_len, sp->row_len, k);
    }
    return CCR_OK;
}
const lm_config *lm_model_config(const lm_model *m) { return &m->cfg; }

ccr_cond *lm_model_cond(const lm_model *m)
{
    for (size_t i = 0; i < m->cfg.n_blocks; i++)
        if (m->b[i].kind == LM_BLOCK_COND)
            return m->b[i].cond;
    return NULL;
}

ccr_status lm_model_reset_state(lm_model *m)
{
    size_t bytes = m->cfg.batch * m->cfg.d * sizeof(float);
    for (size_t i = 0; i < m->cfg.n_blocks; i++)
        if (m->b[i].kind == LM_BLOCK_LSTM) {
            CCR_TRY(ccr_backend_memset(m->be, m->b[i].hs, 0, bytes));
            CCR_TRY(ccr_backend_memset(m->be, m->b[i].cs, 0, bytes));
        }
    return CCR_OK;
}

size_t lm_model_state_len(const lm_model *m)
{
    size_t n = 0;
    for (size_t i = 0; i < m->cfg.n_blocks; i++)
        n += m->b[i].kind == LM_BLOCK_LSTM ? 2 * m->cfg.batch * m->cfg.d : 0;
    return n;
}

/* Host buf <-> the blocks' h and c states, in block order. */
static ccr_status state_copy(lm_model *m, float *buf, bool out)
{
    size_t n = m->cfg.batch * m->cfg.d;
    for (size_t i = 0; i < m->cfg.n_blocks; i++) {
        if (m->b[i].kind != LM_BLOCK_LSTM)
            continue;
        float *st[2] = {m->b[i].hs, m->b[i].cs};
        for (size_t q = 0; q < 2; q++, buf += n)
            CCR_TRY(out ? ccr_backend_get(m->be, buf, st[q], n * sizeof(float))
                        : ccr_backend_set(m->be, st[q], buf, n * sizeof(float)));
    }
    return CCR_OK;
}

ccr_status lm_model_state_get(const lm_model *m, float *out)
{
    if (m == NULL || out == NULL)
        return CCR_EINVAL;
    return state_copy((lm_model *)m, out, true);
}

ccr_status lm_model_state_set(lm_model *m, const float *in)
{
    if (m == NULL || in == NULL)
        return CCR_EINVAL;
    return state_copy(m, (float *)in, false);
}

static ccr_status lstm_forward(lm_model *m, block *bl, const float *x, double *fl)
{
    size_t d = m->cfg.d, B = m->cfg.batch, T = m->cfg.unroll, N = m->N, G = 4 * d;
    const ccr_arena *a = m->arena;
    ccr_backend *be = m->be;
    CCR_TRY(ccr_op_copy(be, bl->h, bl->hs, B * d));
    CCR_TRY(ccr_op_copy(be, bl->c, bl->cs, B * d));
    CCR_TRY(gemm(m, false, false, N, G, d, x, d, ccr_arena_value(a, bl->p_wx), G, 0.0f, bl->g, G));
    CCR_TRY(ccr_op_bias_add(be, bl->g, ccr_arena_value(a, bl->p_b), N, G));
    for (size_t t = 0; t < T; t++) {
        float *g = bl->g + t * B * G, *cp = bl->c + t * B * d, *hp = bl->h + t * B * d;
        CCR_TRY(gemm(m, false, false, B, G, d, hp, d, ccr_arena_value(a, bl->p_wh), G, 1.0f, g, G));
        CCR_TRY(ccr_op_lstm_fwd(be, g, cp, cp + B * d, bl->tc + t * B * d, hp + B * d, B, d));
    }
    CCR_TRY(ccr_op_copy(be, bl->hs, bl->h + N * d, B * d));
    CCR_TRY(ccr_op_copy(be, bl->cs, bl->c + N * d, B * d));
    CCR_TRY(ccr_op_copy(be, bl->f, bl->h + B * d, N * d));
    *fl += (double)N * (4.0 * d * G + G);
    return CCR_OK;
}

/* dF = dL/dh_t for t = 1..T; parameter gradients into the arena, dIn = dL/dx. */
static ccr_status lstm_backward(lm_model *m, block *bl, const float *x, const float *dF,
                                float *dIn)
{
    size_t d = m->cfg.d, B = m->cfg.batch, T = m->cfg.unroll, N = m->N, G = 4 * d;
    const ccr_arena *a = m->arena;
    ccr_backend *be = m->be;
    CCR_TRY(ccr_backend_memset(be, m->dhn, 0, B * d * sizeof(float)));
    CCR_TRY(ccr_backend_memset(be, m->dcn, 0, B * d * sizeof(float)));
    for (size_t t = T; t-- > 0;) {
        size_t r = t * B;
        CCR_TRY(ccr_op_lstm_bwd(be, bl->g + r * G, bl->c + r * d, bl->tc + r * d, dF + r * d,
                                m->dhn, m->dcn, m->dz + r * G, B, d));
        if (t > 0)
            CCR_TRY(gemm(m, false, true, B, d, G, m->dz + r * G, G,
                         ccr_arena_value(a, bl->p_wh), G, 0.0f, m->dhn, d));
    }
    CCR_TRY(gemm(m, true, false, d, G, N, x, d, m->dz, G, 1.0f, ccr_arena_grad(a, bl->p_wx), G));
    CCR_TRY(gemm(m, true, false, d, G, N, bl->h, d, m->dz, G, 1.0f,
                 ccr_arena_grad(a, bl->p_wh), G));
    CCR_TRY(ccr_op_bias_grad(be, ccr_arena_grad(a, bl->p_b), m->dz, N, G));
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
        CCR_TRY(ccr_op_bias_add(m->be, y, ccr_arena_value(m->arena, bl->p_deep[2 * l + 1]), N,
                                dout));
        if (l < L)
            CCR_TRY(ccr_op_act_fwd(m->be, CCR_ACT_RELU, y, y, N * dout));
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
        CCR_TRY(ccr_op_bias_grad(m->be, ccr_arena_grad(m->arena, bl->p_deep[2 * l + 1]), dy, N,
                                 dout));
        float *dx = l == 0 ? dIn : bufs[l % 2];
        CCR_TRY(gemm(m, false, true, N, din, dout, dy, dout,
                     ccr_arena_value(m->arena, bl->p_deep[2 * l]), dout, 0.0f, dx, din));
        if (l > 0)  /* xin is a ReLU output: > 0 exactly where the pre-activation was */
            CCR_TRY(ccr_op_act_bwd(m->be, CCR_ACT_RELU, xin, dx, dx, N * h));
        dy = dx;
    }
    return CCR_OK;
}

/* Inverted dropout of y [N, d] in training: the mask drawn on the host from
 * rng (one uniform per element, in order), kept in backend memory for the
 * backward pass. */
static ccr_status dropout(lm_model *m, gsl_rng *rng, float *mask, float *y)
{
    if (!m->drop_active)
        return CCR_OK;
    size_t n = m->N * m->cfg.d, d = m->cfg.d, B = m->cfg.batch, b1 = m->b0 + B;
    float keep = (float)(1.0 / (1.0 - m->cfg.dropout));
    float *h = m->h_mask;
    /* The global batch's mask, time-major; this rank keeps its streams'. */
    for (size_t t = 0; t < m->cfg.unroll; t++)
        for (size_t b = 0; b < m->B_glob; b++) {
            bool mine = b >= m->b0 && b < b1;
            for (size_t j = 0; j < d; j++) {
                float v = gsl_rng_uniform(rng) < m->cfg.dropout ? 0.0f : keep;
                if (mine)
                    *h++ = v;
            }
        }
    CCR_TRY(ccr_backend_set(m->be, mask, m->h_mask, n * sizeof(float)));
    return ccr_op_mul(m->be, y, mask, y, n);
}

double lm_softmax_row(float *z, size_t n) { return ccr_ref_softmax_row(z, n); }

ccr_status lm_model_forward(lm_model *m, const int32_t *in, const int32_t *tgt, bool train,
                            gsl_rng *rng, lm_fwd_stats *st)
{
    if (m == NULL || in == NULL || tgt == NULL || st == NULL || (train && rng == NULL))
        return CCR_EINVAL;
    const lm_config *c = &m->cfg;
    size_t N = m->N, d = c->d, V = c->vocab;
    ccr_backend *be = m->be;
    for (size_t r = 0; r < N; r++)
        if (in[r] < 0 || (size_t)in[r] >= V || tgt[r] < -1 || tgt[r] >= (int32_t)V)
            CCR_FAIL(m->ctx, CCR_EINVAL, "row %zu: input %d / target %d out of range (vocab %zu)",
                     r, in[r], tgt[r], V);
    memset(st, 0, sizeof *st);
    m->fwd_done = false;
    m->drop_active = train && c->dropout > 0.0;
    memcpy(m->h_in, in, N * sizeof *in);
    memcpy(m->h_tgt, tgt, N * sizeof *tgt);
    CCR_TRY(ccr_backend_set(be, m->in, in, N * sizeof *in));
    CCR_TRY(ccr_backend_set(be, m->tgt, tgt, N * sizeof *tgt));
    CCR_TRY(ccr_op_gather_rows(be, ccr_arena_value(m->arena, m->p_emb), d, m->in, N, m->x0));
    CCR_TRY(dropout(m, rng, m->mask0, m->x0));
    const float *x = m->x0;
    bool first_cond = true;
    for (size_t i = 0; i < c->n_blocks; i++) {
        block *bl = &m->b[i];
        if (bl->kind == LM_BLOCK_LSTM) {
            CCR_TRY(lstm_forward(m, bl, x, &st->flops_counted));
        } else if (bl->kind == LM_BLOCK_DEEP) {
            CCR_TRY(deep_forward(m, bl, x, &st->flops_counted));
        } else {
            ccr_gate_stats gs;  /* rows stream-major in the layer: m->tmp in, m->din out */
            CCR_TRY(ccr_op_gather_rows(be, x, d, m->perm, N, m->tmp));
            CCR_TRY(ccr_cond_forward(bl->cond, m->tmp, N, train, rng, m->din, &gs));
            CCR_TRY(ccr_op_gather_rows(be, m->din, d, m->inv, N, bl->f));
            st->aux_loss += gs.aux_loss;
            st->flops_counted += gs.flops_counted * (double)N;
            if (first_cond)
                st->gate = gs;
            first_cond = false;
            if (c->moe_sigmoid)
                CCR_TRY(ccr_op_act_fwd(be, CCR_ACT_SIGMOID, bl->f, bl->f, N * d));
        }
        CCR_TRY(ccr_op_copy(be, bl->out, bl->f, N * d));
        CCR_TRY(dropout(m, rng, bl->mask, bl->out));
        CCR_TRY(ccr_op_add(be, bl->out, x, bl->out, N * d));
        x = bl->out;
    }
    /* Full softmax; prob keeps the probabilities for the backward pass. */
    CCR_TRY(gemm(m, false, false, N, V, d, x, d, ccr_arena_value(m->arena, m->p_ow), V, 0.0f,
                 m->prob, V));
    CCR_TRY(ccr_op_bias_add(be, m->prob, ccr_arena_value(m->arena, m->p_ob), N, V));
    CCR_TRY(ccr_op_softmax_nll(be, m->prob, m->tgt, N, V, m->nll));
    CCR_TRY(ccr_backend_get(be, m->h_nll, m->nll, N * sizeof *m->h_nll));
    st->flops_counted += (double)N * (2.0 * d * V + V);
    for (size_t r = 0; r < N; r++)
        if (tgt[r] >= 0) {
            st->nll_sum += m->h_nll[r];
            st->n_scored++;
        }
    if (m->comm != NULL) {  /* the global batch's */
        m->comm_buf[0] = st->nll_sum, m->comm_buf[1] = (double)st->n_scored;
        CCR_TRY(ccr_comm_allreduce_sum_f64(m->comm, m->comm_buf, 2));
        st->nll_sum = m->comm_buf[0], st->n_scored = (size_t)m->comm_buf[1];
    }
    m->n_scored = st->n_scored;
    m->fwd_done = true;
    return CCR_OK;
}

/* The embedding gradient's segments from the batch's ids (a counting sort
 * by id, rows in increasing order within an id): h_seg = rows [N], start
 * [n_seg + 1], dst [n_seg], uploaded packed; returns n_seg. */
static ccr_status embedding_segments(lm_model *m, size_t *n_seg)
{
    size_t N = m->N, V = m->cfg.vocab, n = 0;
    int32_t *rows = m->h_seg, *start = rows + N, *cnt = m->h_count;
    memset(cnt, 0, (V + 1) * sizeof *cnt);
    for (size_t r = 0; r < N; r++)
        cnt[m->h_in[r] + 1]++;
    for (size_t v = 0; v < V; v++) {
        if (cnt[v + 1] > 0)
            n++;
        cnt[v + 1] += cnt[v];  /* cnt[v] = first slot of id v */
    }
    int32_t *dst = start + n + 1;
    for (size_t r = 0; r < N; r++)
        rows[cnt[m->h_in[r]]++] = (int32_t)r;  /* cnt[v] ends at the next id's first slot */
    size_t s = 0;
    start[0] = 0;
    for (size_t v = 0, prev = 0; v < V; v++) {
        if ((size_t)cnt[v] == prev)
            continue;
        dst[s] = (int32_t)v;
        start[++s] = cnt[v];
        prev = (size_t)cnt[v];
    }
    *n_seg = n;
    return ccr_backend_set(m->be, m->seg, m->h_seg, (N + 2 * n + 1) * sizeof *m->h_seg);
}

/* A conditional block's backward in its stream-major order: dL/df (m->df,
 * time-major) -> m->tmp -> the layer -> m->df -> dL/dx in m->din. */
static ccr_status cond_backward(lm_model *m, block *bl)
{
    size_t N = m->N, d = m->cfg.d;
    CCR_TRY(ccr_op_gather_rows(m->be, m->df, d, m->perm, N, m->tmp));
    CCR_TRY(ccr_cond_backward(bl->cond, m->tmp, m->df));
    return ccr_op_gather_rows(m->be, m->df, d, m->inv, N, m->din);
}

ccr_status lm_model_backward(lm_model *m)
{
    if (m == NULL)
        return CCR_EINVAL;
    if (!m->fwd_done)
        CCR_FAIL(m->ctx, CCR_EINVAL, "backward needs a forward pass first");
    const lm_config *c = &m->cfg;
    size_t N = m->N, d = c->d, V = c->vocab;
    ccr_backend *be = m->be;
    float scale = m->n_scored ? 1.0f / (float)m->n_scored : 0.0f;
    m->fwd_done = false;  /* prob now becomes dL/dlogits */
    CCR_TRY(ccr_op_softmax_nll_bwd(be, m->prob, m->tgt, N, V, scale));
    const float *xl = c->n_blocks ? m->b[c->n_blocks - 1].out : m->x0;
    CCR_TRY(gemm(m, true, false, d, V, N, xl, d, m->prob, V, 1.0f,
                 ccr_arena_grad(m->arena, m->p_ow), V));
    CCR_TRY(ccr_op_bias_grad(be, ccr_arena_grad(m->arena, m->p_ob), m->prob, N, V));
    CCR_TRY(gemm(m, false, true, N, d, V, m->prob, V, ccr_arena_value(m->arena, m->p_ow), V,
                 0.0f, m->gbuf, d));
    for (size_t i = c->n_blocks; i-- > 0;) {
        block *bl = &m->b[i];
        const float *x = i == 0 ? m->x0 : m->b[i - 1].out;
        if (m->drop_active)
            CCR_TRY(ccr_op_mul(be, m->gbuf, bl->mask, m->df, N * d));
        else
            CCR_TRY(ccr_op_copy(be, m->df, m->gbuf, N * d));
        if (bl->kind == LM_BLOCK_COND && c->moe_sigmoid)
            CCR_TRY(ccr_op_act_bwd(be, CCR_ACT_SIGMOID, bl->f, m->df, m->df, N * d));
        if (bl->kind == LM_BLOCK_LSTM)
            CCR_TRY(lstm_backward(m, bl, x, m->df, m->din));
        else if (bl->kind == LM_BLOCK_DEEP)
            CCR_TRY(deep_backward(m, bl, x, m->df, m->din));
        else
            CCR_TRY(cond_backward(m, bl));
        CCR_TRY(ccr_op_add(be, m->gbuf, m->din, m->gbuf, N * d));
    }
    /* Sparse embedding gradient: only the rows looked up receive one. */
    const float *src = m->gbuf;
    if (m->drop_active) {
        CCR_TRY(ccr_op_mul(be, m->gbuf, m->mask0, m->df, N * d));
        src = m->df;
    }
    size_t n_seg;
    CCR_TRY(embedding_segments(m, &n_seg));
    CCR_TRY(ccr_op_segment_add_rows(be, ccr_arena_grad(m->arena, m->p_emb), d, src, m->seg,
                                    m->seg + N, m->seg + N + n_seg + 1, n_seg));
    /* Replicated gradients summed over the ranks, tensor by tensor in arena
     * order (every tensor but the banks', whose sizes are the rank's). */
    const ccr_arena *a = m->arena;
    for (size_t i = 0; m->comm != NULL && i < ccr_arena_count(a); i++)
        if (ccr_arena_sparse_of(a, i) == NULL)
            CCR_TRY(ccr_comm_allreduce_sum(m->comm, ccr_arena_grad(a, i), ccr_arena_size(a, i)));
    return CCR_OK;
}

size_t lm_model_n_params(const lm_model *m, bool exclude_emb_softmax)
{
    return exclude_emb_softmax ? m->n_params_core : m->n_params;
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
