/*
 * cond.c - the conditional layer: gate + matrix bank + the routed matmul.
 *
 *     y_b = sum_s w_{b,s} M_{id_{b,s}}(x_b)        (Shazeer et al. 2017, eq. 1)
 *
 * The routed matmul is the one op that executes every gate's routing table
 * (the analogue of ggml's mul_mat_id and of t2t's SparseDispatcher):
 *   1. a stable counting sort of the (example, slot) pairs with id >= 0 by
 *      id: groups of equal id in ascending id order, pairs in pair order
 *      within a group;
 *   2. per group: gather its inputs, one GEMM per bank layer, the bias and
 *      the ReLU in one pass after the GEMM;
 *   3. combine: y_b = sum over slots in slot order of w * out, a gather per
 *      example.
 * Every step has a fixed order and every group writes only its own rows, so
 * the result is bitwise reproducible and does not depend on which thread ran
 * which group.  The groups run one at a time with OpenBLAS's threads, or
 * side by side on the layer's pool (pool.h) with single-threaded GEMMs
 * (ccr_cond_parallel in ccr_cond.h; cond_use_experts picks).  The backward
 * pass mirrors it (dx a gather per example in slot order) and also yields
 * dL/dw_{b,s} = <dy_b, M(x_b)>, from which the gate computes its own
 * gradients.  All buffers are sized for max_batch at allocation; forward
 * and backward allocate nothing.
 */
#define _POSIX_C_SOURCE 200809L  // clock_gettime for the optional timing
#include <cblas.h>   // provides: openblas_set_num_threads, openblas_get_num_threads
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "arena_impl.h"    // provides: ccr_arena_set_row_sparse, ccr_arena_touch_row
#include "backend_impl.h"  // provides: struct ccr_backend (kernel table)
#include "ccr/ccr_cond.h"
#include "cond_impl.h"     // provides: struct ccr_cond, the ccr_condi_* helpers
#include "cond_dev.h"      // provides: ccr_cond_dev (the CUDA half)
#include "gate_dev.h"      // provides: ccr_gate_dev_find
#include "internal.h"      // provides: CCR_FAIL, CCR_TRY, ccr_mul_ok
#include "pool.h"          // provides: ccr_pool (the layer's threads)
#include "ref/ref.h"       // provides: ccr_ref_act_fwd (ReLU)

/* Largest bank, in floats per block (2^34 floats = 64 GiB). */
#define COND_MAX_BANK ((size_t)1 << 34)


static ccr_status cond_dots_alloc(ccr_cond *c);
static ccr_status cond_eval_dots(void *bank, size_t n, const size_t *mat, const size_t *row,
                                 const float *x, const float *dy, double *out);

/* *tot += a * b, false on overflow. */
static bool cond_mac(size_t *tot, size_t a, size_t b)
{
    size_t t;
    return ccr_mul_ok(a, b, &t) && ccr_add_ok(*tot, t, tot);
}

/* Doubles per worker of the column sums: max(h, d_out). */
static size_t cond_acc_n(size_t d_out, size_t h) { return h > d_out ? h : d_out; }

/* Bytes of the workspace for max_batch examples of `slots` pairs (P = max_batch
 * x slots, returned in *pairs), a bank of n_mat matrices and T workers;
 * SIZE_MAX if a product overflows.  Every float buffer starts on 64 bytes. */
static size_t cond_work_bytes(size_t max_batch, size_t slots, size_t n_mat, size_t T,
                              size_t d_in, size_t d_out, size_t h, size_t *pairs)
{
    size_t P = 0, G, bytes = 64 * 16;  /* alignment slack */
    bool ok = ccr_mul_ok(max_batch, slots, &P);
    G = P < n_mat ? P : n_mat;
    /* floats: xg, g_x [P, d_in]; hid, g_hid [P, h]; out, g_out [P, d_out];
     * dweights [P]; xin [max_batch, d_in]; eval_hid [h], eval_out [d_out] */
    size_t floats = 0;
    ok = ok && cond_mac(&floats, P, 2 * d_in) && cond_mac(&floats, P, 2 * h) &&
         cond_mac(&floats, P, 2 * d_out) && cond_mac(&floats, P, 1) &&
         cond_mac(&floats, max_batch, d_in) && cond_mac(&floats, 1, h) &&
         cond_mac(&floats, 1, d_out) && cond_mac(&bytes, floats, sizeof(float)) &&
         /* cnt [n_mat], gid [G], goff [G + 1], src and pos [P] */
         cond_mac(&bytes, n_mat, sizeof(uint32_t)) && cond_mac(&bytes, G, 2 * sizeof(int32_t)) &&
         cond_mac(&bytes, 1, sizeof(uint32_t)) && cond_mac(&bytes, P, 2 * sizeof(int32_t)) &&
         cond_mac(&bytes, G, sizeof(uint64_t)) &&
         cond_mac(&bytes, T, cond_acc_n(d_out, h) * sizeof(double));
    *pairs = ok ? P : 0;
    return ok ? bytes : SIZE_MAX;
}

/* p rounded up to 64 bytes. */
static void *cond_align(void *p)
{
    return (void *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
}

size_t ccr_cond_memory_bytes(const ccr_cond *c)
{
    if (c == NULL)
        return 0;
    return c->dev ? ccr_cond_dev_memory_bytes(c->dev) : c->work_bytes;
}

ccr_cond_config ccr_cond_config_default(void)
{
    ccr_cond_config c = {.gate = NULL, .gate_name = NULL,
                         .gate_cfg = ccr_gate_config_default(), .bank = CCR_BANK_DEFAULT,
                         .d_in = 0, .d_out = 0, .hidden = 64, .residual = false,
                         .parallel = CCR_COND_PAR_AUTO};
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
    if (!be->is_cpu && ccr_gate_dev_find(gate) == NULL)
        CCR_FAIL(ctx, CCR_EUNSUP, "gate %s has no %s code: its layer runs on the CPU backend",
                 gate->name, be->iface->name);
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
    if (cfg->parallel != CCR_COND_PAR_AUTO && cfg->parallel != CCR_COND_PAR_BLAS &&
        cfg->parallel != CCR_COND_PAR_EXPERTS)
        CCR_FAIL(ctx, CCR_EINVAL, "unknown parallel mode %d (auto 0, blas 1, experts 2)",
                 (int)cfg->parallel);
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
    ccr_status s = ccr_mem_check(ctx, cond_work_bytes(max_batch, 1, 0, 1, cfg->d_in, cfg->d_out,
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
    c->m1 = c->n_mat;  /* one process owns every matrix (ccr_cond_set_comm) */
    size_t bank;
    if (!ccr_mul_ok(c->n_mat, cond_matrix_size(&c->cfg), &bank) || bank > COND_MAX_BANK) {
        size_t n_mat = c->n_mat, per = cond_matrix_size(&c->cfg);
        ccr_cond_free(c);
        CCR_FAIL(ctx, CCR_ENOMEM, "bank of %zu matrices of %zu floats is too large "
                 "(limit %zu floats)", n_mat, per, COND_MAX_BANK);
    }
    if (!be->is_cpu) {
        ccr_cond_dev_shape sh = {.d_in = cfg->d_in, .d_out = cfg->d_out, .h = c->h,
                                 .slots = c->slots, .n_mat = c->n_mat,
                                 .max_batch = max_batch, .residual = cfg->residual};
        ccr_status ds = ccr_cond_dev_alloc(be, c->gate, &sh, &c->dev);
        if (ds != CCR_OK) {
            ccr_cond_free(c);
            return ds;
        }
        *out = c;
        return CCR_OK;
    }
    int nt = ccr_blas_num_threads();
    c->T = nt > 1 ? (size_t)nt : 1;
    /* Workspace: P pairs. */
    size_t P = 0, d_in = cfg->d_in, d_out = cfg->d_out, h = c->h;
    size_t bytes = cond_work_bytes(max_batch, c->slots, c->n_mat, c->T, d_in, d_out, h, &P);
    ccr_status ms = ccr_mem_check(ctx, bytes, "conditional layer workspace");
    if (ms != CCR_OK) {
        ccr_cond_free(c);
        return ms;
    }
    if (P > (size_t)INT32_MAX) {
        ccr_cond_free(c);
        CCR_FAIL(ctx, CCR_ENOMEM, "%zu routing slots (max_batch x slots) exceed 2^31 - 1", P);
    }
    c->work_bytes = bytes;
    c->work = malloc(bytes);
    if (c->work == NULL) {
        ccr_cond_free(c);
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate %zu bytes of workspace", bytes);
    }
    size_t G = P < c->n_mat ? P : c->n_mat;
    c->acc_n = cond_acc_n(d_out, h);
    c->acc = cond_align(c->work);
    c->gsched = (uint64_t *)(c->acc + c->T * c->acc_n);
    c->cnt = (uint32_t *)(c->gsched + G);
    c->gid = (int32_t *)(c->cnt + c->n_mat);
    c->goff = (uint32_t *)(c->gid + G);
    c->src = (int32_t *)(c->goff + G + 1);
    c->pos = c->src + P;
    float *f = cond_align(c->pos + P);
    c->xin = f, f = cond_align(f + max_batch * d_in);
    c->xg = f, f = cond_align(f + P * d_in);
    c->g_x = f, f = cond_align(f + P * d_in);
    c->hid = f, f = cond_align(f + P * h);
    c->g_hid = f, f = cond_align(f + P * h);
    c->out = f, f = cond_align(f + P * d_out);
    c->g_out = f, f = cond_align(f + P * d_out);
    c->dweights = f, f = cond_align(f + P);
    c->eval_hid = f, f = cond_align(f + h);
    c->eval_out = f;
    memset(c->cnt, 0, c->n_mat * sizeof *c->cnt);
    ms = ccr_pool_create(ctx, c->T, &c->pool);
    if (ms != CCR_OK) {
        ccr_cond_free(c);
        return ms;
    }
    ms = cond_dots_alloc(c);
    if (ms != CCR_OK) {
        ccr_cond_free(c);
        return ms;
    }
    *out = c;
    return CCR_OK;
}

void ccr_cond_free(ccr_cond *c)
{
    if (c == NULL)
        return;
    ccr_condi_ep_free(c);
    ccr_cond_dev_free(c->dev);
    ccr_pool_free(c->pool);
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
    /* This rank's matrices (all of them in one process); a rank that owns
     * none declares no bank tensors (p_* stay SIZE_MAX). */
    size_t E = c->lrow != NULL ? c->n_local : c->m1 - c->m0;
    size_t d_in = c->cfg.d_in, d_out = c->cfg.d_out, h = c->h;
    c->p_w1 = c->p_b1 = c->p_w2 = c->p_b2 = SIZE_MAX;
    if (E == 0) {
        /* nothing of the bank here */
    } else if (cond_ffn(c)) {
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
    if (E > 0) {
        CCR_TRY(ccr_arena_set_row_sparse(a, c->p_w1));
        CCR_TRY(ccr_arena_set_row_sparse(a, c->p_b1));
    }
    if (E > 0 && cond_ffn(c)) {
        CCR_TRY(ccr_arena_set_row_sparse(a, c->p_w2));
        CCR_TRY(ccr_arena_set_row_sparse(a, c->p_b2));
    }
    snprintf(c->bank_prefix, sizeof c->bank_prefix, "%s%s", prefix, c->tree ? "tree." : "experts.");
    char *gp = c->gate_prefix;
    snprintf(gp, sizeof c->gate_prefix, "%s%s", prefix, c->cfg.gate->param_group);
    c->gate_first = ccr_arena_count(a);
    CCR_TRY(ccr_gate_declare(c->gate, a, gp));
    c->gate_end = ccr_arena_count(a);
    c->arena = a;
    return CCR_OK;
}

/* Fills a bank tensor (row_len floats per matrix) with U(-bound, bound):
 * the draws of all n_mat matrices in order, this rank's [m0, m1) kept (all
 * of them in one process; the rows of lrow in the tree's layout), so every
 * rank advances the RNG alike. */
static void cond_uniform(ccr_cond *c, size_t idx, size_t row_len, double bound, gsl_rng *rng)
{
    float *v = idx != SIZE_MAX ? ccr_arena_value(c->arena, idx) : NULL;
    for (size_t m = 0; m < c->n_mat; m++) {
        bool mine = v != NULL && (c->lrow != NULL ? c->lrow[m] >= 0 : m >= c->m0 && m < c->m1);
        float *row = !mine ? NULL
                     : c->lrow != NULL ? v + (size_t)c->lrow[m] * row_len
                                       : v + (m - c->m0) * row_len;
        for (size_t i = 0; i < row_len; i++) {
            float u = (float)((2.0 * gsl_rng_uniform(rng) - 1.0) * bound);
            if (mine)
                row[i] = u;
        }
    }
}

/* The initial values, written through host pointers (cond_uniform, the
 * gate's init_params): the arena's memory on the CPU, a host staging of the
 * layer's tensors otherwise (uploaded by the caller). */
static ccr_status cond_init_host(ccr_cond *c, gsl_rng *rng)
{
    /* nn.Linear's default per bank layer.  The sign-bit tree sums the d+1
     * node matrices of a path with weight 1, so each node starts at
     * 1/sqrt(d+1) of that scale and the effective matrix has the usual one. */
    double path = c->tree ? sqrt(ccr_gate_matrices_per_example(c->gate)) : 1.0;
    double b_in = 1.0 / sqrt((double)c->cfg.d_in) / path;
    size_t d_in = c->cfg.d_in, d_out = c->cfg.d_out, h = c->h;
    if (cond_ffn(c)) {
        double b_h = 1.0 / sqrt((double)h);
        cond_uniform(c, c->p_w1, d_in * h, b_in, rng);
        cond_uniform(c, c->p_b1, h, b_in, rng);
        cond_uniform(c, c->p_w2, h * d_out, b_h, rng);
        cond_uniform(c, c->p_b2, d_out, b_h, rng);
    } else {
        cond_uniform(c, c->p_w1, d_in * d_out, b_in, rng);
        cond_uniform(c, c->p_b1, d_out, b_in, rng);
    }
    return ccr_gate_init_params(c->gate, rng);
}

ccr_status ccr_cond_init_params(ccr_cond *c, gsl_rng *rng)
{
    if (c == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(c->ctx, rng);
    if (c->arena == NULL || ccr_arena_values(c->arena) == NULL)
        CCR_FAIL(c->ctx, CCR_EINVAL, "declare the layer and finalize its arena first");
    if (c->dev == NULL)
        return cond_init_host(c, rng);
    /* The same draws as on the CPU, into host copies, then uploaded: the
     * layer's tensors were declared in one run, [p_w1, gate_end). */
    CCR_TRY(ccr_arena_stage(c->arena, c->p_w1, c->gate_end));
    ccr_status s = cond_init_host(c, rng);
    ccr_status u = ccr_arena_unstage(c->arena, s == CCR_OK);
    return s != CCR_OK ? s : u;
}

/* Binds the device half to the arena on first use after finalize. */
static ccr_status cond_dev_ready(ccr_cond *c)
{
    size_t p[4] = {c->p_w1, c->p_b1, c->p_w2, c->p_b2};
    return ccr_cond_dev_bind(c->dev, c->arena, p, c->gate_prefix);
}

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* y[r, :] += bias, then ReLU if relu: one pass over [n, cols] (the
 * references' bias_add and act_fwd, fused; the same float operations). */
static void cond_bias_act(float *y, const float *bias, size_t n, size_t cols, bool relu)
{
    for (size_t r = 0; r < n; r++) {
        float *row = y + r * cols;
        if (relu) {
            for (size_t j = 0; j < cols; j++) {
                float v = row[j] + bias[j];
                row[j] = v > 0.0f ? v : 0.0f;
            }
        } else {
            for (size_t j = 0; j < cols; j++)
                row[j] += bias[j];
        }
    }
}

/* g = hid > 0 ? g : 0 over [n, cols] and db += its column sums, in one pass
 * (the references' act_bwd and bias_grad, fused: each column summed over
 * rows in order in double, as ccr_ref_bias_grad does).  acc: cols doubles. */
void ccr_condi_relu_bwd_bias(float *g, const float *hid, size_t n, size_t cols, double *acc,
                               float *db)
{
    for (size_t j = 0; j < cols; j++)
        acc[j] = 0.0;
    for (size_t r = 0; r < n; r++) {
        float *gr = g + r * cols;
        const float *hr = hid + r * cols;
        for (size_t j = 0; j < cols; j++) {
            float v = hr[j] > 0.0f ? gr[j] : 0.0f;
            gr[j] = v;
            acc[j] += v;
        }
    }
    for (size_t j = 0; j < cols; j++)
        db[j] += (float)acc[j];
}

/* Applies bank matrix m to n gathered rows: out = M_m(xg), hid kept. */
ccr_status ccr_condi_apply(ccr_cond *c, size_t m, const float *xg, float *hid, float *out,
                             size_t n)
{
    ccr_backend *be = c->be;
    const ccr_arena *a = c->arena;
    size_t d_in = c->cfg.d_in, d_out = c->cfg.d_out, h = c->h;
    if (cond_ffn(c)) {
        CCR_TRY(be->k->gemm(be, false, false, n, h, d_in, 1.0f, xg, d_in,
                            ccr_arena_value(a, c->p_w1) + m * d_in * h, h, 0.0f, hid, h));
        cond_bias_act(hid, ccr_arena_value(a, c->p_b1) + m * h, n, h, true);
        CCR_TRY(be->k->gemm(be, false, false, n, d_out, h, 1.0f, hid, h,
                            ccr_arena_value(a, c->p_w2) + m * h * d_out, d_out, 0.0f, out,
                            d_out));
        cond_bias_act(out, ccr_arena_value(a, c->p_b2) + m * d_out, n, d_out, false);
        return CCR_OK;
    }
    CCR_TRY(be->k->gemm(be, false, false, n, d_out, d_in, 1.0f, xg, d_in,
                        ccr_arena_value(a, c->p_w1) + m * d_in * d_out, d_out, 0.0f, out,
                        d_out));
    cond_bias_act(out, ccr_arena_value(a, c->p_b1) + m * d_out, n, d_out, false);
    return CCR_OK;
}

/* Stable counting sort of the used pairs of r by id: gid/goff (groups in
 * ascending id), src/pos.  The counters of the ids seen are reset before
 * returning, so only the ids a batch uses are touched - except that with
 * n_mat <= P the groups are found by a scan of the counters, cheaper than
 * sorting the distinct ids. */
ccr_status ccr_condi_sort(ccr_cond *c, const ccr_route *r, size_t P)
{
    uint32_t *cnt = c->cnt;
    size_t n = 0, G = 0, n_mat = c->n_mat;
    for (size_t p = 0; p < P; p++) {
        int32_t id = r->ids[p];
        c->pos[p] = -1;
        if (id < 0)
            continue;
        if ((size_t)id >= n_mat) {
            for (size_t g = 0; g < G; g++)
                cnt[c->gid[g]] = 0;
            CCR_FAIL(c->ctx, CCR_EINVAL, "routing table names matrix %d of %zu", (int)id,
                     n_mat);
        }
        if (cnt[id]++ == 0)
            c->gid[G++] = id;
        n++;
    }
    if (n_mat <= P) {
        G = 0;
        for (size_t m = 0; m < n_mat; m++)
            if (cnt[m] != 0)
                c->gid[G++] = (int32_t)m;
    } else {
        qsort(c->gid, G, sizeof *c->gid, cmp_i32);
    }
    uint32_t off = 0;
    for (size_t g = 0; g < G; g++) {
        uint32_t k = cnt[c->gid[g]];
        c->goff[g] = off;
        cnt[c->gid[g]] = off;  /* now the group's next free position */
        off += k;
    }
    c->goff[G] = off;
    for (size_t p = 0; p < P; p++) {
        int32_t id = r->ids[p];
        if (id < 0)
            continue;
        uint32_t q = cnt[id]++;
        c->src[q] = (int32_t)p;
        c->pos[p] = (int32_t)q;
    }
    for (size_t g = 0; g < G; g++)
        cnt[c->gid[g]] = 0;
    c->n_pairs = n;
    c->n_groups = G;
    return CCR_OK;
}

/* Whether the groups of the last sort run on the pool (see ccr_cond_parallel):
 * AUTO picks it with at least T groups none of which holds more than 1/T of
 * the pairs - a function of the group sizes and T only. */
static bool cond_use_experts(const ccr_cond *c)
{
    if (c->cfg.parallel == CCR_COND_PAR_EXPERTS)
        return true;
    if (c->cfg.parallel == CCR_COND_PAR_BLAS || c->T < 2 || c->n_groups < c->T)
        return false;
    size_t rows_max = 0;
    for (size_t g = 0; g < c->n_groups; g++) {
        size_t k = c->goff[g + 1] - c->goff[g];
        rows_max = k > rows_max ? k : rows_max;
    }
    return rows_max * c->T <= c->n_pairs;
}

/* The pool's order of the groups: largest first, then by group index. */
static void cond_schedule(ccr_cond *c)
{
    for (size_t g = 0; g < c->n_groups; g++) {
        uint64_t k = c->goff[g + 1] - c->goff[g];
        c->gsched[g] = ((uint64_t)(UINT32_MAX - k) << 32) | (uint64_t)g;
    }
    qsort(c->gsched, c->n_groups, sizeof *c->gsched, cmp_u64);
}

static void cond_job_fail(ccr_cond *c, ccr_status s)
{
    int expected = CCR_OK;
    if (s != CCR_OK)
        atomic_compare_exchange_strong(&c->job_err, &expected, (int)s);
}

/* Seconds on a monotonic clock (the optional timing only). */
static double cond_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Forward of group g: gather its inputs, apply its matrix. */
static ccr_status cond_group_fwd(ccr_cond *c, size_t g)
{
    size_t d_in = c->cfg.d_in, S = c->slots, q0 = c->goff[g], q1 = c->goff[g + 1];
    size_t m = (size_t)c->gid[g];
    double t0 = c->tsec ? cond_now() : 0.0;
    for (size_t q = q0; q < q1; q++)
        memcpy(c->xg + q * d_in, c->job_x + ((size_t)c->src[q] / S) * d_in,
               d_in * sizeof *c->xg);
    ccr_status s = ccr_condi_apply(c, m, c->xg + q0 * d_in, c->hid + q0 * c->h,
                              c->out + q0 * c->cfg.d_out, q1 - q0);
    if (c->tsec)  /* each matrix is one group, run by one thread: no race */
        c->tsec[m] += cond_now() - t0;
    return s;
}

static void cond_fwd_job(void *arg, size_t w)
{
    ccr_cond *c = arg;
    (void)w;
    for (;;) {
        size_t i = atomic_fetch_add(&c->job_next, 1);
        if (i >= c->n_groups)
            break;
        cond_job_fail(c, cond_group_fwd(c, (size_t)(c->gsched[i] & 0xffffffffu)));
    }
}

/* Worker w's share [*b0, *b1) of the batch's examples. */
static void cond_rows(const ccr_cond *c, size_t w, size_t *b0, size_t *b1)
{
    *b0 = c->batch * w / c->T;
    *b1 = c->batch * (w + 1) / c->T;
}

/* Rows [b0, b1) of a gather per example, shared by combine and dx:
 * dst_b = sum over slots in slot order of (weight *) src[pos] (+ add_b).
 * weights NULL: plain sums; add NULL: nothing added. */
static void cond_gather(const ccr_cond *c, size_t b0, size_t b1, const float *src, size_t n,
                        const float *weights, const float *add, float *dst)
{
    const size_t S = c->slots;
    for (size_t b = b0; b < b1; b++) {
        float *y = dst + b * n;
        memset(y, 0, n * sizeof *y);
        for (size_t s = 0; s < S; s++) {
            int32_t q = c->pos[b * S + s];
            if (q < 0)
                continue;
            const float *o = src + (size_t)q * n;
            if (weights != NULL) {
                float wt = weights[b * S + s];
                for (size_t j = 0; j < n; j++)
                    y[j] += wt * o[j];
            } else {
                for (size_t j = 0; j < n; j++)
                    y[j] += o[j];
            }
        }
        if (add != NULL) {
            const float *x = add + b * n;
            for (size_t j = 0; j < n; j++)
                y[j] += x[j];
        }
    }
}

/* Combine: y_b = sum over slots of w * out (+ x_b with residual, d_in == d_out). */
void ccr_condi_combine_job(void *arg, size_t w)
{
    ccr_cond *c = arg;
    size_t b0, b1;
    cond_rows(c, w, &b0, &b1);
    cond_gather(c, b0, b1, c->out, c->cfg.d_out, c->route.weights,
                c->cfg.residual ? c->job_x : NULL, c->job_y);
}

/* Runs the job fn on the pool, its workers taking entries by job_next,
 * with OpenBLAS single-threaded for the duration; the first failing status. */
static ccr_status cond_pool_jobs(ccr_cond *c, ccr_pool_fn fn)
{
    atomic_store(&c->job_err, CCR_OK);
    atomic_store(&c->job_next, 0);
    int prev = openblas_get_num_threads();
    if (prev != 1)
        openblas_set_num_threads(1);
    ccr_pool_run(c->pool, fn, c);
    if (prev != 1)
        openblas_set_num_threads(prev);
    return (ccr_status)atomic_load(&c->job_err);
}

/* Runs fn on the pool with OpenBLAS single-threaded for the duration (the
 * EXPERTS mode), or on the caller alone. */
static ccr_status cond_run_groups(ccr_cond *c, ccr_pool_fn fn, ccr_status (*one)(ccr_cond *,
                                                                                 size_t))
{
    if (!c->experts) {
        for (size_t g = 0; g < c->n_groups; g++)
            CCR_TRY(one(c, g));
        return CCR_OK;
    }
    return cond_pool_jobs(c, fn);
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
    if (c->comm != NULL)
        return ccr_condi_ep_forward(c, x, batch, train, rng, y, stats);
    if (c->dev != NULL) {
        CCR_CHECK_NULL(c->ctx, x);
        if (batch == 0 || batch > c->max_batch)
            CCR_FAIL(c->ctx, CCR_EBADLEN, "batch %zu not in 1..%zu", batch, c->max_batch);
        c->batch = 0;
        CCR_TRY(cond_dev_ready(c));
        size_t n;
        CCR_TRY(ccr_cond_dev_forward(c->dev, x, batch, train, rng, y, &r, &st, &n));
        c->route = r;
        c->batch = batch;
        c->n_pairs = n;
        c->n_groups = st.distinct;
        st.flops_counted = ccr_gate_flops(c->gate, train) +
                           (double)n / (double)batch * ccr_cond_matrix_flops(c) +
                           (c->cfg.residual ? (double)c->cfg.d_out : 0.0);
        *stats = st;
        return CCR_OK;
    }
    CCR_TRY(ccr_gate_forward(c->gate, x, batch, train, rng, &r, &st));
    c->batch = 0;  /* the sort below overwrites the last forward's state */
    size_t d_in = c->cfg.d_in, d_out = c->cfg.d_out;
    memcpy(c->xin, x, batch * d_in * sizeof *x);

    /* 1. Sort the used pairs by id (stable). */
    CCR_TRY(ccr_condi_sort(c, &r, batch * c->slots));
    c->experts = cond_use_experts(c);
    if (c->experts)
        cond_schedule(c);
    /* 2. Per group: gather, GEMMs, bias and ReLU. */
    c->job_x = x;
    CCR_TRY(cond_run_groups(c, cond_fwd_job, cond_group_fwd));
    /* 3. Combine in slot order. */
    c->route = r;
    c->batch = batch;
    c->job_y = y;
    ccr_pool_run(c->pool, ccr_condi_combine_job, c);
    size_t n = c->n_pairs;
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
    return ccr_condi_apply(c, m, x_row, c->eval_hid, out, 1);
}

/* <a, b> in double, as four interleaved partial sums added in a fixed order
 * (vectorisable, unlike one running sum). */
double ccr_condi_dot(const float *a, const float *b, size_t n)
{
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    size_t j = 0;
    for (; j + 4 <= n; j += 4) {
        s0 += (double)a[j] * (double)b[j];
        s1 += (double)a[j + 1] * (double)b[j + 1];
        s2 += (double)a[j + 2] * (double)b[j + 2];
        s3 += (double)a[j + 3] * (double)b[j + 3];
    }
    for (; j < n; j++)
        s0 += (double)a[j] * (double)b[j];
    return (s0 + s1) + (s2 + s3);
}

/* The bank's backward on n gathered rows of matrix m (local index): from
 * gout [n, d_out] (dL/d(out)) and the forward's xg and hid, the output
 * bias's gradient (column sums in row order, in double), dW2, the ReLU and
 * b1 (FFN), dW1, and gx = dL/d(xg) when gx is not NULL; ghid is [n, h]
 * scratch, acc max(h, d_out) doubles. */
ccr_status ccr_condi_bank_bwd(ccr_cond *c, size_t m, size_t n, const float *xg,
                              const float *hid, const float *gout, float *ghid, float *gx,
                              double *acc)
{
    ccr_backend *be = c->be;
    const ccr_arena *a = c->arena;
    size_t d_in = c->cfg.d_in, d_out = c->cfg.d_out, h = c->h;
    for (size_t j = 0; j < d_out; j++)
        acc[j] = 0.0;
    for (size_t q = 0; q < n; q++)
        for (size_t j = 0; j < d_out; j++)
            acc[j] += gout[q * d_out + j];
    float *db_out = ccr_arena_grad(a, cond_ffn(c) ? c->p_b2 : c->p_b1) + m * d_out;
    for (size_t j = 0; j < d_out; j++)
        db_out[j] += (float)acc[j];
    if (cond_ffn(c)) {
        float *w1 = ccr_arena_value(a, c->p_w1) + m * d_in * h;
        float *w2 = ccr_arena_value(a, c->p_w2) + m * h * d_out;
        CCR_TRY(be->k->gemm(be, true, false, h, d_out, n, 1.0f, hid, h, gout, d_out, 1.0f,
                            ccr_arena_grad(a, c->p_w2) + m * h * d_out, d_out));
        CCR_TRY(be->k->gemm(be, false, true, n, h, d_out, 1.0f, gout, d_out, w2, d_out, 0.0f,
                            ghid, h));
        ccr_condi_relu_bwd_bias(ghid, hid, n, h, acc, ccr_arena_grad(a, c->p_b1) + m * h);
        CCR_TRY(be->k->gemm(be, true, false, d_in, h, n, 1.0f, xg, d_in, ghid, h, 1.0f,
                            ccr_arena_grad(a, c->p_w1) + m * d_in * h, h));
        if (gx != NULL)
            CCR_TRY(be->k->gemm(be, false, true, n, d_in, h, 1.0f, ghid, h, w1, h, 0.0f, gx,
                                d_in));
    } else {
        float *wm = ccr_arena_value(a, c->p_w1) + m * d_in * d_out;
        CCR_TRY(be->k->gemm(be, true, false, d_in, d_out, n, 1.0f, xg, d_in, gout, d_out,
                            1.0f, ccr_arena_grad(a, c->p_w1) + m * d_in * d_out, d_out));
        if (gx != NULL)
            CCR_TRY(be->k->gemm(be, false, true, n, d_in, d_out, 1.0f, gout, d_out, wm,
                                d_out, 0.0f, gx, d_in));
    }
    return CCR_OK;
}

/* Backward of group g on worker w: dL/d(out) = w dy_b and dL/dw = <dy_b, out>
 * per pair, then the bank's gradients and the gathered input gradient. */
void ccr_condi_gout(ccr_cond *c, size_t q0, size_t q1, const float *dy)
{
    const size_t d_out = c->cfg.d_out, S = c->slots;
    const float *wts = c->route.weights;
    for (size_t q = q0; q < q1; q++) {
        size_t p = (size_t)c->src[q];
        const float *d = dy + (p / S) * d_out, *o = c->out + q * d_out;
        float *go = c->g_out + q * d_out, wt = wts[p];
        for (size_t j = 0; j < d_out; j++)
            go[j] = wt * d[j];
        c->dweights[p] = (float)ccr_condi_dot(d, o, d_out);
    }
}

static ccr_status cond_group_bwd(ccr_cond *c, size_t g, size_t w)
{
    size_t d_in = c->cfg.d_in, d_out = c->cfg.d_out, h = c->h;
    size_t q0 = c->goff[g], q1 = c->goff[g + 1], m = (size_t)c->gid[g];
    ccr_condi_gout(c, q0, q1, c->job_dy);
    return ccr_condi_bank_bwd(c, m, q1 - q0, c->xg + q0 * d_in, c->hid + q0 * h,
                              c->g_out + q0 * d_out, c->g_hid + q0 * h,
                              c->job_dx ? c->g_x + q0 * d_in : NULL, c->acc + w * c->acc_n);
}

/* ---- eval_dots: the batched eval_matrix (sign-bit tree, grad_mode ste) ------
 * The straight-through backward needs dy_b . M_m(x_b) for batch x depth
 * (matrix, example) pairs the table did not route.  Per chunk of at most
 * dots_cap pairs: a stable counting sort by matrix (order (matrix, pair
 * index)); then for each non-empty matrix, in blocks of at most dots_blk
 * rows that stay in cache: gather the rows of x and dy (their indices
 * sorted alongside, the rows prefetched a few pairs ahead), cond_apply (GEMMs,
 * bias, ReLU as in the forward), and each dot in double (cond_dot: four partial
 * sums added in a fixed order).  The matrices run one after another with
 * OpenBLAS's threads, or side by side on the layer's pool, one matrix per
 * worker with single-threaded GEMMs, by the forward's rule applied to the
 * chunk's groups (at least T, none above 1/T of the pairs); each dot is
 * computed by one worker from fixed blocks, so the result does not depend
 * on which worker ran it.  The workspace (order, counts, the matrix list,
 * one block per worker) is allocated here once; a call allocates nothing. */

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
    size_t cap, row, blk, t, bytes, n_cnt, n_mats;
    bool ok = ccr_mul_ok(c->max_batch, g->depth, &cap) &&
              ccr_add_ok(c->cfg.d_in, c->h, &row) && ccr_add_ok(row, c->cfg.d_out, &row) &&
              ccr_add_ok(row, c->cfg.d_out, &row);
    blk = ok ? COND_DOTS_BLOCK_FLOATS / row : 0;
    blk = blk < COND_DOTS_MIN_ROWS ? COND_DOTS_MIN_ROWS : blk;
    n_mats = c->n_mat < cap ? c->n_mat : cap;
    ok = ok && ccr_add_ok(c->n_mat, 1, &n_cnt) && ccr_add_ok(n_cnt, cap, &t) &&
         ccr_add_ok(t, cap, &t) && ccr_add_ok(t, n_mats, &t) &&
         ccr_mul_ok(t, sizeof(size_t), &bytes) &&
         ccr_mul3_ok(c->T, blk, row, &t) && ccr_mul_ok(t, sizeof(float), &t) &&
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
    c->dots_mats = c->dots_row + cap;
    c->dots_blocks = (float *)(c->dots_mats + n_mats);
    return CCR_OK;
}

/* Matrix m's pairs of the running chunk (sorted positions [q_start, cnt[m])),
 * in blocks of dots_blk rows, on worker w's block buffers. */
static ccr_status cond_dots_matrix(ccr_cond *c, size_t m, size_t w)
{
    const size_t d_in = c->cfg.d_in, d_out = c->cfg.d_out, blk = c->dots_blk;
    const size_t *cnt = c->dots_cnt, *ord = c->dots_ord, *srow = c->dots_row;
    const float *x = c->dots_xin, *dy = c->dots_dyin;
    float *bx = c->dots_blocks + w * blk * (d_in + c->h + 2 * d_out);
    float *bh = bx + blk * d_in, *by = bh + blk * c->h, *bdy = by + blk * d_out;
    const size_t end = cnt[m];
    double t0 = c->tsec ? cond_now() : 0.0;
    for (size_t q0 = m > 0 ? cnt[m - 1] : 0; q0 < end;) {
        size_t q1 = end - q0 < blk ? end : q0 + blk;
        for (size_t q = q0; q < q1; q++) {
            size_t r = srow[q];
#if defined(__GNUC__)  /* the rows are scattered: ask for a later pair's now */
            if (q + COND_DOTS_PREFETCH < end) {
                size_t rp = srow[q + COND_DOTS_PREFETCH];
                for (size_t o = 0; o < d_in; o += 16)
                    __builtin_prefetch(x + rp * d_in + o);
                for (size_t o = 0; o < d_out; o += 16)
                    __builtin_prefetch(dy + rp * d_out + o);
            }
#endif
            memcpy(bx + (q - q0) * d_in, x + r * d_in, d_in * sizeof *x);
            memcpy(bdy + (q - q0) * d_out, dy + r * d_out, d_out * sizeof *dy);
        }
        CCR_TRY(ccr_condi_apply(c, m, bx, bh, by, q1 - q0));
        for (size_t q = q0; q < q1; q++)
            c->dots_out[c->dots_p0 + ord[q]] =
                ccr_condi_dot(bdy + (q - q0) * d_out, by + (q - q0) * d_out, d_out);
        q0 = q1;
    }
    if (c->tsec)  /* one worker per matrix: no race */
        c->tsec[2 * c->n_mat + m] += cond_now() - t0;
    return CCR_OK;
}

static void cond_dots_job(void *arg, size_t w)
{
    ccr_cond *c = arg;
    for (;;) {
        size_t i = atomic_fetch_add(&c->job_next, 1);
        if (i >= c->dots_n_mats)
            break;
        cond_job_fail(c, cond_dots_matrix(c, c->dots_mats[i], w));
    }
}

/* out[i] = dy[row[i]] . M_mat[i](x[row[i]]): the gate's eval_dots callback. */
static ccr_status cond_eval_dots(void *bank, size_t n, const size_t *mat, const size_t *row,
                                 const float *x, const float *dy, double *out)
{
    ccr_cond *c = bank;
    size_t n_mat = c->n_mat;
    if (c->dots_cap == 0)
        CCR_FAIL(c->ctx, CCR_EINVAL, "eval_dots: no workspace (not a straight-through gate)");
    for (size_t i = 0; i < n; i++)
        if (mat[i] >= n_mat)
            CCR_FAIL(c->ctx, CCR_EINVAL, "eval_dots: matrix %zu >= %zu", mat[i], n_mat);
    size_t *cnt = c->dots_cnt, *ord = c->dots_ord, *srow = c->dots_row;
    c->dots_xin = x, c->dots_dyin = dy, c->dots_out = out;
    for (size_t p0 = 0; p0 < n; p0 += c->dots_cap) {
        size_t k = n - p0 < c->dots_cap ? n - p0 : c->dots_cap;
        const size_t *mk = mat + p0, *rk = row + p0;
        /* cnt[m] = start of matrix m's group, then its end after placing */
        memset(cnt, 0, (n_mat + 1) * sizeof *cnt);
        for (size_t i = 0; i < k; i++)
            cnt[mk[i] + 1]++;
        size_t nm = 0, big = 0;
        for (size_t m = 0; m < n_mat; m++) {
            if (cnt[m + 1] > 0)
                c->dots_mats[nm++] = m;  /* ascending id: the tree's shallow, large first */
            big = cnt[m + 1] > big ? cnt[m + 1] : big;
            cnt[m + 1] += cnt[m];
        }
        for (size_t i = 0; i < k; i++) {
            size_t q = cnt[mk[i]]++;
            ord[q] = i;
            srow[q] = rk[i];
        }
        /* now cnt[m] = end of m's group, cnt[m - 1] its start */
        c->dots_n_mats = nm, c->dots_p0 = p0;
        /* Side by side, one matrix per worker with single-threaded GEMMs,
         * by the forward's rule (cond_use_experts) on these groups: at
         * least T of them, none above 1/T of the pairs. */
        bool side = c->cfg.parallel == CCR_COND_PAR_EXPERTS ||
                    (c->cfg.parallel == CCR_COND_PAR_AUTO && c->T > 1 && nm >= c->T &&
                     big * c->T <= k);
        if (!side) {
            for (size_t i = 0; i < nm; i++)
                CCR_TRY(cond_dots_matrix(c, c->dots_mats[i], 0));
            continue;
        }
        CCR_TRY(cond_pool_jobs(c, cond_dots_job));
    }
    return CCR_OK;
}

static ccr_status cond_group_bwd_timed(ccr_cond *c, size_t g, size_t w)
{
    if (c->tsec == NULL)
        return cond_group_bwd(c, g, w);
    double t0 = cond_now();
    ccr_status s = cond_group_bwd(c, g, w);
    c->tsec[c->n_mat + (size_t)c->gid[g]] += cond_now() - t0;
    return s;
}

static ccr_status cond_group_bwd0(ccr_cond *c, size_t g) { return cond_group_bwd_timed(c, g, 0); }

static void cond_bwd_job(void *arg, size_t w)
{
    ccr_cond *c = arg;
    for (;;) {
        size_t i = atomic_fetch_add(&c->job_next, 1);
        if (i >= c->n_groups)
            break;
        cond_job_fail(c, cond_group_bwd_timed(c, (size_t)(c->gsched[i] & 0xffffffffu), w));
    }
}

/* dx: dx_b = sum over slots of the pair's input gradient (+ dy_b with residual). */
void ccr_condi_dx_job(void *arg, size_t w)
{
    ccr_cond *c = arg;
    size_t b0, b1;
    cond_rows(c, w, &b0, &b1);
    cond_gather(c, b0, b1, c->g_x, c->cfg.d_in, NULL, c->cfg.residual ? c->job_dy : NULL,
                c->job_y);
}

ccr_status ccr_cond_backward(ccr_cond *c, const float *dy, float *dx)
{
    if (c == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(c->ctx, dy);
    if (c->batch == 0)
        CCR_FAIL(c->ctx, CCR_EINVAL, "backward without a forward pass");
    size_t d_out = c->cfg.d_out, batch = c->batch;
    if (c->comm != NULL)
        return ccr_condi_ep_backward(c, dy, dx);
    if (c->dev != NULL)
        return ccr_cond_dev_backward(c->dev, dy, dx);

    /* The touched bank rows, in ascending id (the arena's list is serial). */
    ccr_arena *aw = c->arena;
    for (size_t g = 0; g < c->n_groups; g++) {
        size_t m = (size_t)c->gid[g];
        ccr_arena_touch_row(aw, c->p_w1, m);
        ccr_arena_touch_row(aw, c->p_b1, m);
        if (cond_ffn(c)) {
            ccr_arena_touch_row(aw, c->p_w2, m);
            ccr_arena_touch_row(aw, c->p_b2, m);
        }
    }
    /* dL/dw is 0 for the empty slots; each group writes its own pairs. */
    memset(c->dweights, 0, batch * c->slots * sizeof *c->dweights);
    c->job_dy = dy;
    c->job_dx = dx != NULL;
    CCR_TRY(cond_run_groups(c, cond_bwd_job, cond_group_bwd0));
    if (dx != NULL) {
        c->job_y = dx;
        ccr_pool_run(c->pool, ccr_condi_dx_job, c);
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

ccr_status ccr_cond_set_timing(ccr_cond *c, double *sec)
{
    if (c == NULL)
        return CCR_EINVAL;
    c->tsec = sec;
    return CCR_OK;
}

size_t ccr_cond_group_threads(const ccr_cond *c)
{
    if (c == NULL || c->n_groups == 0)
        return 0;
    return c->experts && c->dev == NULL ? c->T : 1;
}

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
