/*
 * cond.c - the conditional layer: gate + matrix bank + the routed matmul.
 *
 *     y_b = sum_s w_{b,s} M_{id_{b,s}}(x_b)        (Shazeer et al. 2017, eq. 1)
 *
 * The routed matmul is the one op that executes every gate's routing table
 * (the analogue of ggml's mul_mat_id and of t2t's SparseDispatcher):
 *   1. sort the (example, slot) pairs with id >= 0 by (id, pair index);
 *   2. gather their inputs in that order;
 *   3. one GEMM per bank layer per non-empty group of equal id;
 *   4. combine: y_b = sum over slots in slot order of w * out.
 * Every step has a fixed order, so the result is bitwise reproducible.  The
 * backward pass mirrors it and also yields dL/dw_{b,s} = <dy_b, M(x_b)>,
 * from which the gate computes its own gradients.  All buffers are sized
 * for max_batch at allocation; forward and backward allocate nothing.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena_impl.h"    // provides: ccr_arena_set_row_sparse, ccr_arena_touch_row
#include "backend_impl.h"  // provides: struct ccr_backend (kernel table)
#include "ccr/ccr_cond.h"
#include "internal.h"      // provides: CCR_FAIL, CCR_TRY, ccr_mul_ok
#include "ref/ref.h"       // provides: ccr_ref_act_fwd (ReLU)

/* Largest bank, in floats per block (2^34 floats = 64 GiB). */
#define COND_MAX_BANK ((size_t)1 << 34)

struct ccr_cond {
    ccr_backend *be;
    ccr_ctx *ctx;
    ccr_cond_config cfg;
    ccr_gate *gate;
    size_t max_batch, slots, n_mat, h;
    bool tree;                 /* the bank is named "tree." */
    ccr_arena *arena;          /* where the bank lives (set by declare) */
    size_t p_w1, p_b1, p_w2, p_b2;  /* FFN: w1 b1 w2 b2; linear: w1 b1 only */
    size_t gate_first, gate_end;    /* the gate's tensors in the arena */
    /* workspace, one allocation */
    void *work;
    size_t work_bytes;
    uint64_t *keys;            /* [P] (id << 32 | pair) sorted */
    int32_t *pos;              /* [P] pair -> sorted position, -1 if empty */
    float *xin;                /* [max_batch, d_in] copy of the forward input */
    float *xg, *hid, *out;     /* [P, d_in], [P, h], [P, d_out] in sorted order */
    float *g_out, *g_hid, *g_x;/* their gradients */
    float *dweights;           /* [P] dL/dw in pair order */
    float *eval_hid;           /* [h] scratch of eval_matrix */
    float *eval_out;           /* [d_out] the gate's scratch row */
    /* last forward */
    ccr_route route;
    size_t batch, n_pairs;     /* examples, used pairs */
    /* eval_dots workspace (cond_dots_alloc), its own allocation */
    void *dots_work;
    size_t dots_cap;           /* pairs per chunk; 0: no eval_dots */
    size_t dots_blk;           /* rows per GEMM block */
    size_t *dots_cnt;          /* [n_mat + 1] counting sort by matrix */
    size_t *dots_ord;          /* [cap] chunk pairs in (matrix, pair) order */
    size_t *dots_row;          /* [cap] their rows, in the same order */
    float *dots_x, *dots_h, *dots_y, *dots_dy; /* one block: [blk, d_in], [blk, h],
                                                  [blk, d_out], [blk, d_out] */
};

static ccr_status cond_dots_alloc(ccr_cond *c);
static ccr_status cond_eval_dots(void *bank, size_t n, const size_t *mat, const size_t *row,
                                 const float *x, const float *dy, double *out);

/* Bytes of the workspace for max_batch examples of `slots` pairs (P = max_batch
 * x slots, returned in *pairs); SIZE_MAX if a product overflows. */
static size_t cond_work_bytes(size_t max_batch, size_t slots, size_t d_in, size_t d_out,
                              size_t h, size_t *pairs)
{
    size_t P, per_pair, t, floats, bytes, pb;
    bool ok = ccr_mul_ok(max_batch, slots, &P) &&
              ccr_mul_ok(2, d_in, &per_pair) && ccr_mul_ok(2, h, &t) &&
              ccr_add_ok(per_pair, t, &per_pair) && ccr_mul_ok(2, d_out, &t) &&
              ccr_add_ok(per_pair, t, &per_pair) && ccr_add_ok(per_pair, 1, &per_pair) &&
              ccr_mul_ok(P, per_pair, &floats) && ccr_mul_ok(max_batch, d_in, &t) &&
              ccr_add_ok(floats, t, &floats) && ccr_add_ok(h, d_out, &t) &&
              ccr_add_ok(floats, t, &floats) && ccr_add_ok(floats, 64, &floats) &&
              ccr_mul_ok(floats, sizeof(float), &bytes) &&
              ccr_mul_ok(P, sizeof(uint64_t) + sizeof(int32_t), &pb) &&
              ccr_add_ok(bytes, pb, &bytes) && ccr_add_ok(bytes, 64, &bytes);
    *pairs = ok ? P : 0;
    return ok ? bytes : SIZE_MAX;
}

size_t ccr_cond_memory_bytes(const ccr_cond *c)
{
    return c == NULL ? 0 : c->work_bytes;
}

ccr_cond_config ccr_cond_config_default(void)
{
    ccr_cond_config c = {.gate = NULL, .gate_name = NULL,
                         .gate_cfg = ccr_gate_config_default(), .bank = CCR_BANK_DEFAULT,
                         .d_in = 0, .d_out = 0, .hidden = 64, .residual = false};
    return c;
}

ccr_bank_kind ccr_cond_config_bank(const ccr_cond_config *cfg)
{
    if (cfg == NULL)
        return CCR_BANK_FFN;
    if (cfg->bank != CCR_BANK_DEFAULT)
        return cfg->bank;
    const ccr_gate_type *t = cfg->gate ? cfg->gate : ccr_gate_type_find(cfg->gate_name);
    return t != NULL && t->linear_bank ? CCR_BANK_LINEAR : CCR_BANK_FFN;
}

ccr_bank_kind ccr_cond_bank(const ccr_cond *c) { return c ? c->cfg.bank : CCR_BANK_FFN; }

static bool cond_ffn(const ccr_cond *c) { return c->cfg.bank == CCR_BANK_FFN; }

/* Floats per bank matrix (weights and biases). */
static size_t cond_matrix_size(const ccr_cond_config *cfg)
{
    if (cfg->bank == CCR_BANK_FFN)
        return cfg->d_in * cfg->hidden + cfg->hidden + cfg->hidden * cfg->d_out + cfg->d_out;
    return cfg->d_in * cfg->d_out + cfg->d_out;
}

ccr_status ccr_cond_alloc(ccr_backend *be, const ccr_cond_config *cfg, size_t max_batch,
                          ccr_cond **out)
{
    if (be == NULL)
        return CCR_EINVAL;
    ccr_ctx *ctx = be->ctx;
    CCR_CHECK_NULL(ctx, cfg);
    CCR_CHECK_NULL(ctx, out);
    const ccr_gate_type *gate = cfg->gate;
    if (gate == NULL && cfg->gate_name == NULL)
        CCR_FAIL(ctx, CCR_EINVAL, "no gate: set gate or gate_name (%s)", ccr_gate_type_names());
    if (gate == NULL)
        CCR_TRY(ccr_gate_type_lookup(ctx, cfg->gate_name, &gate));
    const ccr_bank_kind bank_kind = ccr_cond_config_bank(cfg);
    if (!be->is_cpu)
        CCR_FAIL(ctx, CCR_EUNSUP, "conditional layers run on the CPU backend, not %s",
                 be->iface->name);
    if (cfg->d_in == 0 || cfg->d_out == 0 || max_batch == 0)
        CCR_FAIL(ctx, CCR_EINVAL, "d_in=%zu, d_out=%zu and max_batch=%zu must be > 0",
                 cfg->d_in, cfg->d_out, max_batch);
    if (bank_kind != CCR_BANK_FFN && bank_kind != CCR_BANK_LINEAR)
        CCR_FAIL(ctx, CCR_EINVAL, "unknown bank kind %d", (int)cfg->bank);
    if (bank_kind == CCR_BANK_FFN && cfg->hidden == 0)
        CCR_FAIL(ctx, CCR_EINVAL, "FFN bank needs hidden > 0");
    if (cfg->residual && cfg->d_in != cfg->d_out)
        CCR_FAIL(ctx, CCR_EINVAL, "a residual conditional layer needs d_in == d_out (%zu != %zu)",
                 cfg->d_in, cfg->d_out);
    ccr_cond *c = calloc(1, sizeof *c);
    if (c == NULL)
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate conditional layer");
    c->be = be;
    c->ctx = ctx;
    c->cfg = *cfg;
    c->cfg.gate = gate;
    c->cfg.gate_name = gate->name;
    c->cfg.bank = bank_kind;
    c->cfg.gate_cfg.d_in = cfg->d_in;
    c->max_batch = max_batch;
    c->h = bank_kind == CCR_BANK_FFN ? cfg->hidden : 0;
    c->tree = strcmp(gate->param_group, "tree.") == 0;
    /* Refuse up front what cannot fit: the workspace with one slot per
     * example is a lower bound of what this layer will hold. */
    size_t P1;
    ccr_status s = ccr_mem_check(ctx, cond_work_bytes(max_batch, 1, cfg->d_in, cfg->d_out,
                                                       c->h, &P1),
                                 "conditional layer workspace");
    if (s != CCR_OK) {
        free(c);
        return s;
    }
    s = ccr_gate_alloc(ctx, gate, &c->cfg.gate_cfg, max_batch, &c->gate);
    if (s != CCR_OK) {
        free(c);
        return s;
    }
    c->slots = ccr_gate_slots(c->gate);
    c->n_mat = ccr_gate_n_matrices(c->gate);
    size_t bank;
    if (!ccr_mul_ok(c->n_mat, cond_matrix_size(&c->cfg), &bank) || bank > COND_MAX_BANK) {
        size_t n_mat = c->n_mat, per = cond_matrix_size(&c->cfg);
        ccr_cond_free(c);
        CCR_FAIL(ctx, CCR_ENOMEM, "bank of %zu matrices of %zu floats is too large "
                 "(limit %zu floats)", n_mat, per, COND_MAX_BANK);
    }
    /* Workspace: P pairs. */
    size_t P = 0, d_in = cfg->d_in, d_out = cfg->d_out, h = c->h;
    size_t bytes = cond_work_bytes(max_batch, c->slots, d_in, d_out, h, &P);
    ccr_status ms = ccr_mem_check(ctx, bytes, "conditional layer workspace");
    if (ms != CCR_OK) {
        ccr_cond_free(c);
        return ms;
    }
    c->work_bytes = bytes;
    c->work = malloc(bytes);
    if (c->work == NULL) {
        ccr_cond_free(c);
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate %zu bytes of workspace", bytes);
    }
    c->keys = c->work;
    c->pos = (int32_t *)(c->keys + P);
    float *f = (float *)(c->pos + P);
    c->xin = f, f += max_batch * d_in;
    c->xg = f, f += P * d_in;
    c->g_x = f, f += P * d_in;
    c->hid = f, f += P * h;
    c->g_hid = f, f += P * h;
    c->out = f, f += P * d_out;
    c->g_out = f, f += P * d_out;
    c->dweights = f, f += P;
    c->eval_hid = f, f += h;
    c->eval_out = f;
    ccr_status ds = cond_dots_alloc(c);
    if (ds != CCR_OK) {
        ccr_cond_free(c);
        return ds;
    }
    *out = c;
    return CCR_OK;
}

void ccr_cond_free(ccr_cond *c)
{
    if (c == NULL)
        return;
    ccr_gate_free(c->gate);
    free(c->work);
    free(c->dots_work);
    free(c);
}

static ccr_status cond_add(ccr_cond *c, ccr_arena *a, const char *prefix, const char *name,
                           size_t rank, size_t d0, size_t d1, size_t d2, size_t *idx)
{
    char full[CCR_ARENA_MAX_NAME];
    size_t shape[3] = {d0, d1, d2};
    snprintf(full, sizeof full, "%s%s%s", prefix, c->tree ? "tree." : "experts.", name);
    return ccr_arena_add(a, full, rank, shape, idx);
}

ccr_status ccr_cond_declare(ccr_cond *c, ccr_arena *a, const char *prefix)
{
    if (c == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(c->ctx, a);
    prefix = prefix ? prefix : "";
    size_t E = c->n_mat, d_in = c->cfg.d_in, d_out = c->cfg.d_out, h = c->h;
    if (cond_ffn(c)) {
        CCR_TRY(cond_add(c, a, prefix, "w1", 3, E, d_in, h, &c->p_w1));
        CCR_TRY(cond_add(c, a, prefix, "b1", 2, E, h, 0, &c->p_b1));
        CCR_TRY(cond_add(c, a, prefix, "w2", 3, E, h, d_out, &c->p_w2));
        CCR_TRY(cond_add(c, a, prefix, "b2", 2, E, d_out, 0, &c->p_b2));
    } else {
        CCR_TRY(cond_add(c, a, prefix, "w", 3, E, d_in, d_out, &c->p_w1));
        CCR_TRY(cond_add(c, a, prefix, "b", 2, E, d_out, 0, &c->p_b1));
    }
    /* Bank gradients are row-sparse: backward touches only the matrices
     * the batch routed to (zeroing and sparse optimisers follow). */
    CCR_TRY(ccr_arena_set_row_sparse(a, c->p_w1));
    CCR_TRY(ccr_arena_set_row_sparse(a, c->p_b1));
    if (cond_ffn(c)) {
        CCR_TRY(ccr_arena_set_row_sparse(a, c->p_w2));
        CCR_TRY(ccr_arena_set_row_sparse(a, c->p_b2));
    }
    char gp[CCR_ARENA_MAX_NAME];
    snprintf(gp, sizeof gp, "%s%s", prefix, c->cfg.gate->param_group);
    c->gate_first = ccr_arena_count(a);
    CCR_TRY(ccr_gate_declare(c->gate, a, gp));
    c->gate_end = ccr_arena_count(a);
    c->arena = a;
    return CCR_OK;
}

/* Fills n floats of the arena tensor idx with U(-bound, bound). */
static void cond_uniform(ccr_cond *c, size_t idx, double bound, gsl_rng *rng)
{
    float *v = ccr_arena_value(c->arena, idx);
    size_t n = ccr_arena_size(c->arena, idx);
    for (size_t i = 0; i < n; i++)
        v[i] = (float)((2.0 * gsl_rng_uniform(rng) - 1.0) * bound);
}

ccr_status ccr_cond_init_params(ccr_cond *c, gsl_rng *rng)
{
    if (c == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(c->ctx, rng);
    if (c->arena == NULL || ccr_arena_values(c->arena) == NULL)
        CCR_FAIL(c->ctx, CCR_EINVAL, "declare the layer and finalize its arena first");
    /* nn.Linear's default per bank layer.  The sign-bit tree sums the d+1
     * node matrices of a path with weight 1, so each node starts at
     * 1/sqrt(d+1) of that scale and the effective matrix has the usual one. */
    double path = c->tree ? sqrt(ccr_gate_matrices_per_example(c->gate)) : 1.0;
    double b_in = 1.0 / sqrt((double)c->cfg.d_in) / path;
    cond_uniform(c, c->p_w1, b_in, rng);
    cond_uniform(c, c->p_b1, b_in, rng);
    if (cond_ffn(c)) {
        double b_h = 1.0 / sqrt((double)c->h);
        cond_uniform(c, c->p_w2, b_h, rng);
        cond_uniform(c, c->p_b2, b_h, rng);
    }
    return ccr_gate_init_params(c->gate, rng);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Applies bank matrix m to n gathered rows: out = M_m(xg), hid kept. */
static ccr_status cond_apply(ccr_cond *c, size_t m, const float *xg, float *hid, float *out,
                             size_t n)
{
    ccr_backend *be = c->be;
    const ccr_arena *a = c->arena;
    size_t d_in = c->cfg.d_in, d_out = c->cfg.d_out, h = c->h;
    if (cond_ffn(c)) {
        CCR_TRY(be->k->gemm(be, false, false, n, h, d_in, 1.0f, xg, d_in,
                            ccr_arena_value(a, c->p_w1) + m * d_in * h, h, 0.0f, hid, h));
        CCR_TRY(be->k->bias_add(be, hid, ccr_arena_value(a, c->p_b1) + m * h, n, h));
        CCR_TRY(be->k->act_fwd(be, CCR_ACT_RELU, hid, hid, n * h));
        CCR_TRY(be->k->gemm(be, false, false, n, d_out, h, 1.0f, hid, h,
                            ccr_arena_value(a, c->p_w2) + m * h * d_out, d_out, 0.0f, out,
                            d_out));
        return be->k->bias_add(be, out, ccr_arena_value(a, c->p_b2) + m * d_out, n, d_out);
    }
    CCR_TRY(be->k->gemm(be, false, false, n, d_out, d_in, 1.0f, xg, d_in,
                        ccr_arena_value(a, c->p_w1) + m * d_in * d_out, d_out, 0.0f, out,
                        d_out));
    return be->k->bias_add(be, out, ccr_arena_value(a, c->p_b1) + m * d_out, n, d_out);
}

ccr_status ccr_cond_forward(ccr_cond *c, const float *x, size_t batch, bool train,
                            gsl_rng *rng, float *y, ccr_gate_stats *stats)
{
    if (c == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(c->ctx, y);
    CCR_CHECK_NULL(c->ctx, stats);
    if (c->arena == NULL || ccr_arena_values(c->arena) == NULL)
        CCR_FAIL(c->ctx, CCR_EINVAL, "declare the layer and finalize its arena first");
    ccr_route r;
    ccr_gate_stats st;
    CCR_TRY(ccr_gate_forward(c->gate, x, batch, train, rng, &r, &st));
    size_t d_in = c->cfg.d_in, d_out = c->cfg.d_out, h = c->h, S = c->slots;
    memcpy(c->xin, x, batch * d_in * sizeof *x);

    /* 1. Sort the used pairs by (id, pair index). */
    size_t P = batch * S, n = 0;
    for (size_t p = 0; p < P; p++) {
        c->pos[p] = -1;
        if (r.ids[p] >= 0)
            c->keys[n++] = ((uint64_t)(uint32_t)r.ids[p] << 32) | (uint64_t)p;
    }
    qsort(c->keys, n, sizeof *c->keys, cmp_u64);
    /* 2. Gather. */
    for (size_t q = 0; q < n; q++) {
        size_t p = (size_t)(c->keys[q] & 0xffffffffu);
        c->pos[p] = (int32_t)q;
        memcpy(c->xg + q * d_in, x + (p / S) * d_in, d_in * sizeof *x);
    }
    /* 3. One pass of GEMMs per group of equal id. */
    for (size_t q0 = 0; q0 < n;) {
        size_t m = (size_t)(c->keys[q0] >> 32), q1 = q0 + 1;
        while (q1 < n && (size_t)(c->keys[q1] >> 32) == m)
            q1++;
        CCR_TRY(cond_apply(c, m, c->xg + q0 * d_in, c->hid + q0 * h, c->out + q0 * d_out,
                           q1 - q0));
        q0 = q1;
    }
    /* 4. Combine in slot order. */
    memset(y, 0, batch * d_out * sizeof *y);
    for (size_t b = 0; b < batch; b++) {
        for (size_t s = 0; s < S; s++) {
            int32_t q = c->pos[b * S + s];
            if (q < 0)
                continue;
            float w = r.weights[b * S + s];
            const float *o = c->out + (size_t)q * d_out;
            for (size_t j = 0; j < d_out; j++)
                y[b * d_out + j] += w * o[j];
        }
    }
    if (c->cfg.residual)  /* d_in == d_out */
        for (size_t i = 0; i < batch * d_out; i++)
            y[i] += x[i];
    c->route = r;
    c->batch = batch;
    c->n_pairs = n;
    st.flops_counted = ccr_gate_flops(c->gate, train) +
                       (double)n / (double)batch * ccr_cond_matrix_flops(c) +
                       (c->cfg.residual ? (double)d_out : 0.0);
    *stats = st;
    return CCR_OK;
}

/* out[d_out] = M_m(x_row): the gate's eval_matrix callback. */
static ccr_status cond_eval_matrix(void *bank, size_t m, const float *x_row, float *out)
{
    ccr_cond *c = bank;
    if (m >= c->n_mat)
        CCR_FAIL(c->ctx, CCR_EINVAL, "matrix %zu >= %zu", m, c->n_mat);
    return cond_apply(c, m, x_row, c->eval_hid, out, 1);
}

/* ---- eval_dots: the batched eval_matrix (sign-bit tree, grad_mode ste) ------
 * The straight-through backward needs dy_b . M_m(x_b) for batch x depth
 * (matrix, example) pairs the table did not route.  Per chunk of at most
 * dots_cap pairs: a stable counting sort by matrix (order (matrix, pair
 * index)); then for each non-empty matrix, in blocks of at most dots_blk
 * rows that stay in cache: gather the rows of x and dy (their indices
 * sorted alongside, the rows prefetched a few pairs ahead), cond_apply (GEMMs,
 * bias, ReLU as in the forward), and each dot in double with eight partial
 * sums added in a fixed order.  The workspace (order, counts, one block) is
 * allocated here once; a call allocates nothing. */

/* Floats of one block (d_in + h + 2 d_out per row), and its least rows. */
#define COND_DOTS_BLOCK_FLOATS ((size_t)1 << 16)
#define COND_DOTS_MIN_ROWS 16
#define COND_DOTS_PREFETCH 8   /* pairs ahead whose rows the gather prefetches */

/* Sizes and allocates the workspace when the gate has a straight-through
 * mode over `depth` levels and uses it; otherwise eval_dots stays off. */
static ccr_status cond_dots_alloc(ccr_cond *c)
{
    const ccr_gate_config *g = &c->cfg.gate_cfg;
    unsigned need = CCR_GATE_OPT_DEPTH | CCR_GATE_OPT_GRAD_MODE;
    if ((c->cfg.gate->options & need) != need || g->grad_mode != CCR_GRAD_STE || g->depth == 0)
        return CCR_OK;
    size_t cap, row, blk, t, bytes, n_cnt;
    bool ok = ccr_mul_ok(c->max_batch, g->depth, &cap) &&
              ccr_add_ok(c->cfg.d_in, c->h, &row) && ccr_add_ok(row, c->cfg.d_out, &row) &&
              ccr_add_ok(row, c->cfg.d_out, &row);
    blk = ok ? COND_DOTS_BLOCK_FLOATS / row : 0;
    blk = blk < COND_DOTS_MIN_ROWS ? COND_DOTS_MIN_ROWS : blk;
    ok = ok && ccr_add_ok(c->n_mat, 1, &n_cnt) && ccr_add_ok(n_cnt, cap, &t) &&
         ccr_add_ok(t, cap, &t) && ccr_mul_ok(t, sizeof(size_t), &bytes) &&
         ccr_mul_ok(blk, row, &t) && ccr_mul_ok(t, sizeof(float), &t) &&
         ccr_add_ok(bytes, t, &bytes) &&
         c->work_bytes <= SIZE_MAX - bytes;
    if (!ok)
        CCR_FAIL(c->ctx, CCR_ENOMEM, "straight-through workspace: max_batch %zu x depth %zu "
                 "pairs overflow", c->max_batch, g->depth);
    CCR_TRY(ccr_mem_check(c->ctx, bytes, "straight-through workspace"));
    c->dots_work = malloc(bytes);
    if (c->dots_work == NULL)
        CCR_FAIL(c->ctx, CCR_ENOMEM, "cannot allocate %zu bytes of straight-through workspace",
                 bytes);
    c->work_bytes += bytes;
    c->dots_cap = cap;
    c->dots_blk = blk;
    c->dots_cnt = c->dots_work;
    c->dots_ord = c->dots_cnt + n_cnt;
    c->dots_row = c->dots_ord + cap;
    c->dots_x = (float *)(c->dots_row + cap);
    c->dots_h = c->dots_x + blk * c->cfg.d_in;
    c->dots_y = c->dots_h + blk * c->h;
    c->dots_dy = c->dots_y + blk * c->cfg.d_out;
    return CCR_OK;
}

/* dy . y in double: eight partial sums (vectorisable), added in a fixed order. */
static double cond_dot8(const float *dy, const float *y, size_t n)
{
    double p[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    size_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (size_t k = 0; k < 8; k++)
            p[k] += (double)dy[j + k] * (double)y[j + k];
    for (; j < n; j++)
        p[0] += (double)dy[j] * (double)y[j];
    return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

/* out[i] = dy[row[i]] . M_mat[i](x[row[i]]): the gate's eval_dots callback. */
static ccr_status cond_eval_dots(void *bank, size_t n, const size_t *mat, const size_t *row,
                                 const float *x, const float *dy, double *out)
{
    ccr_cond *c = bank;
    size_t d_in = c->cfg.d_in, d_out = c->cfg.d_out, n_mat = c->n_mat;
    if (c->dots_cap == 0)
        CCR_FAIL(c->ctx, CCR_EINVAL, "eval_dots: no workspace (not a straight-through gate)");
    for (size_t i = 0; i < n; i++)
        if (mat[i] >= n_mat)
            CCR_FAIL(c->ctx, CCR_EINVAL, "eval_dots: matrix %zu >= %zu", mat[i], n_mat);
    size_t *cnt = c->dots_cnt, *ord = c->dots_ord, *srow = c->dots_row;
    for (size_t p0 = 0; p0 < n; p0 += c->dots_cap) {
        size_t k = n - p0 < c->dots_cap ? n - p0 : c->dots_cap;
        const size_t *mk = mat + p0, *rk = row + p0;
        /* cnt[m] = start of matrix m's group, then its end after placing */
        memset(cnt, 0, (n_mat + 1) * sizeof *cnt);
        for (size_t i = 0; i < k; i++)
            cnt[mk[i] + 1]++;
        for (size_t m = 0; m < n_mat; m++)
            cnt[m + 1] += cnt[m];
        for (size_t i = 0; i < k; i++) {
            size_t q = cnt[mk[i]]++;
            ord[q] = i;
            srow[q] = rk[i];
        }
        for (size_t q0 = 0; q0 < k;) {
            size_t m = mk[ord[q0]], end = cnt[m];
            size_t q1 = end - q0 < c->dots_blk ? end : q0 + c->dots_blk;
            for (size_t q = q0; q < q1; q++) {
                size_t r = srow[q];
#if defined(__GNUC__)  /* the rows are scattered: ask for a later pair's now */
                if (q + COND_DOTS_PREFETCH < k) {
                    size_t rp = srow[q + COND_DOTS_PREFETCH];
                    for (size_t o = 0; o < d_in; o += 16)
                        __builtin_prefetch(x + rp * d_in + o);
                    for (size_t o = 0; o < d_out; o += 16)
                        __builtin_prefetch(dy + rp * d_out + o);
                }
#endif
                memcpy(c->dots_x + (q - q0) * d_in, x + r * d_in, d_in * sizeof *x);
                memcpy(c->dots_dy + (q - q0) * d_out, dy + r * d_out, d_out * sizeof *dy);
            }
            CCR_TRY(cond_apply(c, m, c->dots_x, c->dots_h, c->dots_y, q1 - q0));
            for (size_t q = q0; q < q1; q++)
                out[p0 + ord[q]] = cond_dot8(c->dots_dy + (q - q0) * d_out,
                                             c->dots_y + (q - q0) * d_out, d_out);
            q0 = q1;
        }
    }
    return CCR_OK;
}

ccr_status ccr_cond_backward(ccr_cond *c, const float *dy, float *dx)
{
    if (c == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(c->ctx, dy);
    if (c->batch == 0)
        CCR_FAIL(c->ctx, CCR_EINVAL, "backward without a forward pass");
    ccr_backend *be = c->be;
    const ccr_arena *a = c->arena;
    size_t d_in = c->cfg.d_in, d_out = c->cfg.d_out, h = c->h, S = c->slots;
    size_t batch = c->batch, n = c->n_pairs;
    const ccr_route *r = &c->route;

    /* dL/d(out) = w dy_b; dL/dw = <dy_b, out>. */
    for (size_t p = 0; p < batch * S; p++) {
        int32_t q = c->pos[p];
        c->dweights[p] = 0.0f;
        if (q < 0)
            continue;
        const float *d = dy + (p / S) * d_out, *o = c->out + (size_t)q * d_out;
        float *g = c->g_out + (size_t)q * d_out, w = r->weights[p];
        double dot = 0.0;
        for (size_t j = 0; j < d_out; j++) {
            g[j] = w * d[j];
            dot += (double)d[j] * (double)o[j];
        }
        c->dweights[p] = (float)dot;
    }
    /* Per group: bank gradients and the gathered input gradient. */
    for (size_t q0 = 0; q0 < n;) {
        size_t m = (size_t)(c->keys[q0] >> 32), q1 = q0 + 1;
        while (q1 < n && (size_t)(c->keys[q1] >> 32) == m)
            q1++;
        size_t cnt = q1 - q0;
        ccr_arena *aw = c->arena;
        ccr_arena_touch_row(aw, c->p_w1, m);
        ccr_arena_touch_row(aw, c->p_b1, m);
        if (cond_ffn(c)) {
            ccr_arena_touch_row(aw, c->p_w2, m);
            ccr_arena_touch_row(aw, c->p_b2, m);
        }
        const float *xg = c->xg + q0 * d_in;
        float *gout = c->g_out + q0 * d_out, *gx = c->g_x + q0 * d_in;
        if (cond_ffn(c)) {
            float *hid = c->hid + q0 * h, *ghid = c->g_hid + q0 * h;
            float *w1 = ccr_arena_value(a, c->p_w1) + m * d_in * h;
            float *w2 = ccr_arena_value(a, c->p_w2) + m * h * d_out;
            CCR_TRY(be->k->gemm(be, true, false, h, d_out, cnt, 1.0f, hid, h, gout, d_out, 1.0f,
                                ccr_arena_grad(a, c->p_w2) + m * h * d_out, d_out));
            CCR_TRY(be->k->bias_grad(be, ccr_arena_grad(a, c->p_b2) + m * d_out, gout, cnt,
                                     d_out));
            CCR_TRY(be->k->gemm(be, false, true, cnt, h, d_out, 1.0f, gout, d_out, w2, d_out,
                                0.0f, ghid, h));
            CCR_TRY(be->k->act_bwd(be, CCR_ACT_RELU, hid, ghid, ghid, cnt * h));
            CCR_TRY(be->k->gemm(be, true, false, d_in, h, cnt, 1.0f, xg, d_in, ghid, h, 1.0f,
                                ccr_arena_grad(a, c->p_w1) + m * d_in * h, h));
            CCR_TRY(be->k->bias_grad(be, ccr_arena_grad(a, c->p_b1) + m * h, ghid, cnt, h));
            if (dx != NULL)
                CCR_TRY(be->k->gemm(be, false, true, cnt, d_in, h, 1.0f, ghid, h, w1, h, 0.0f,
                                    gx, d_in));
        } else {
            float *w = ccr_arena_value(a, c->p_w1) + m * d_in * d_out;
            CCR_TRY(be->k->gemm(be, true, false, d_in, d_out, cnt, 1.0f, xg, d_in, gout, d_out,
                                1.0f, ccr_arena_grad(a, c->p_w1) + m * d_in * d_out, d_out));
            CCR_TRY(be->k->bias_grad(be, ccr_arena_grad(a, c->p_b1) + m * d_out, gout, cnt,
                                     d_out));
            if (dx != NULL)
                CCR_TRY(be->k->gemm(be, false, true, cnt, d_in, d_out, 1.0f, gout, d_out, w,
                                    d_out, 0.0f, gx, d_in));
        }
        q0 = q1;
    }
    /* Scatter-add the input gradient in sorted order (deterministic). */
    if (dx != NULL) {
        memset(dx, 0, batch * d_in * sizeof *dx);
        for (size_t q = 0; q < n; q++) {
            size_t b = (size_t)(c->keys[q] & 0xffffffffu) / S;
            const float *g = c->g_x + q * d_in;
            for (size_t j = 0; j < d_in; j++)
                dx[b * d_in + j] += g[j];
        }
        if (c->cfg.residual)  /* d_in == d_out */
            for (size_t i = 0; i < batch * d_in; i++)
                dx[i] += dy[i];
    }
    ccr_gate_bwd_args ga = {.x = c->xin, .batch = batch, .dweights = c->dweights, .dx = dx,
                            .dy = dy, .d_out = d_out, .eval_matrix = cond_eval_matrix,
                            .bank = c, .scratch = c->eval_out,
                            .eval_dots = c->dots_cap ? cond_eval_dots : NULL};
    return ccr_gate_backward(c->gate, &ga);
}

/* Getters: NULL / 0 for a NULL layer (the NULL-handle rule, ccr.h). */
const ccr_route *ccr_cond_route(const ccr_cond *c) { return c ? &c->route : NULL; }
ccr_gate *ccr_cond_gate(const ccr_cond *c) { return c ? c->gate : NULL; }
size_t ccr_cond_d_in(const ccr_cond *c) { return c ? c->cfg.d_in : 0; }
size_t ccr_cond_d_out(const ccr_cond *c) { return c ? c->cfg.d_out : 0; }

size_t ccr_cond_n_params(const ccr_cond *c)
{
    if (c == NULL)
        return 0;
    size_t n = c->n_mat * cond_matrix_size(&c->cfg);
    for (size_t i = c->gate_first; i < c->gate_end; i++)
        n += ccr_arena_size(c->arena, i);
    return n;
}

double ccr_cond_matrix_flops(const ccr_cond *c)
{
    if (c == NULL)
        return 0.0;
    double d_in = (double)c->cfg.d_in, d_out = (double)c->cfg.d_out, h = (double)c->h;
    double m = cond_ffn(c) ? 2 * d_in * h + h + 2 * h * d_out + d_out : 2 * d_in * d_out + d_out;
    return m + 2 * d_out;
}

double ccr_cond_flops(const ccr_cond *c, bool train)
{
    if (c == NULL)
        return 0.0;
    return ccr_gate_flops(c->gate, train) +
           ccr_gate_matrices_per_example(c->gate) * ccr_cond_matrix_flops(c) +
           (c->cfg.residual ? (double)c->cfg.d_out : 0.0);
}

double ccr_cond_flops_bwd(const ccr_cond *c, bool need_dx)
{
    if (c == NULL)
        return 0.0;
    double d_in = (double)c->cfg.d_in, d_out = (double)c->cfg.d_out, h = (double)c->h, m;
    if (cond_ffn(c))
        m = 4 * h * d_out + d_out + 2 * d_in * h + h + (need_dx ? 2 * d_in * h : 0);
    else
        m = 2 * d_in * d_out + d_out + (need_dx ? 2 * d_in * d_out : 0);
    return ccr_gate_matrices_per_example(c->gate) * (m + 3 * d_out) +
           2 * ccr_gate_flops(c->gate, true) + (c->cfg.residual && need_dx ? d_in : 0.0);
}
