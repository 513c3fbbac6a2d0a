/*
 * gate_signtree.c - the sign-bit tree gate: ccr's reading of Cho & Bengio
 * 2014 ("Exponentially Increasing the Capacity-to-Computation Ratio for
 * Conditional Computation in Deep Learning", arXiv 1406.7362).
 *
 * Only the paper's abstract could be verified (docs/REFERENCES.md
 * §1.1-1.2): weight matrices are switched on by bit patterns of hidden-unit
 * activations, and a tree whose nodes are prefixes of a sequence of sign
 * bits controls overfitting.  Everything below - where the bits come from,
 * how node matrices combine, the tie rule and the gradient modes - is
 * **ccr's reading** (PAPERS.md §1.3, docs/GATES.md "signtree"), not the
 * paper's equations.
 *
 * For each example, d pre-activations a (a = x W_bits + c, or the first d
 * input units) give the bits b_l = 1[a_l > 0], l = 1..d; a zero goes to bit
 * 0, the left child (PAPERS.md §5 item 9: "right iff score > 0", as a sign
 * bit with sign(0) -> 0).  Nodes use heap numbering: root 0, children 2n+1
 * (bit 0) and 2n+2 (bit 1).
 *   combine = path  d+1 slots, slot l = the path node at depth l, weight 1;
 *                   the bank holds 2^(d+1) - 1 node matrices and the layer
 *                   output is the sum of the node matrices on the path.
 *   combine = leaf  one slot, id = the bits as a binary number with b_1 most
 *                   significant, weight 1; the bank holds the 2^d leaves
 *                   (the flat version, the overfitting ablation).
 *
 * Gradients (grad_mode):
 *   none  the route weights are constants; W_bits, c_bits and x get nothing.
 *   ste   straight-through: level l mixes its two children with the bit,
 *         y_l = b_l M_right(x) + (1 - b_l) M_left(x), db_l/da_l = 1, so
 *         da_l = dy . (M_right(x) - M_left(x)).  The chosen child's term
 *         dy . M_chosen(x) is dweights[b, slot] (the layer's
 *         dL/d(route weight), slot l on the path, the only slot for a leaf);
 *         the siblings of all (example, level) pairs of the batch go
 *         through one call of the layer's batched eval_dots callback (one
 *         GEMM per bank matrix), or, without it, eval_matrix row by row.
 *         For leaf, level l's children are the chosen leaf and the leaf
 *         with bit l flipped.  Then dW_bits += x^T da, dc += sum_b da,
 *         dx += da W_bits^T (projection) or dx_j += da_j (input).
 *
 * No aux loss.  Importance = Load = counts of examples per leaf (leaf index
 * = the bit string; for path, the last slot's node minus 2^d - 1).  Exports
 * "importance", "load" and "leaf_counts" (the same [2^d] counts), and for
 * d > 0 "bits" [B, d] (0/1) and "a" [B, d] of the last forward.
 *
 * Memory: every buffer is allocated in init (with ste: the pairs' matrix,
 * example and dot, max_batch x d each); the d_out floats of a sibling's
 * output under eval_matrix are the caller's scratch row
 * (ccr_gate_bwd_args.scratch).
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "ccr/ccr_comm.h"
#include "ccr/ccr_gate.h"
#include "gate_util.h"
#include "internal.h"

#define ST_MAX_FLOATS ((uint64_t)1 << 34)   /* gate parameters */

typedef struct st_state {
    ccr_ctx *ctx;
    ccr_gate_config cfg;
    size_t d;          /* depth: number of sign bits */
    size_t n_leaves;   /* 2^d */
    size_t n_mat;      /* bank matrices: 2^(d+1) - 1 (path) or 2^d (leaf) */
    size_t slots;      /* d + 1 (path) or 1 (leaf) */
    size_t max_batch;
    size_t batch;      /* batch of the last forward (0: none yet) */
    bool has_params;   /* projection with d > 0 */
    ccr_arena *arena;  /* where w_bits, c_bits were declared */
    size_t i_w, i_c;
    float *a;          /* [max_batch, d] pre-activations */
    float *bits;       /* [max_batch, d] 0/1 */
    float *da;         /* [max_batch, d] ste gradient */
    int32_t *ids;      /* [max_batch, slots] */
    float *weights;    /* [max_batch, slots] all 1 */
    double *counts;    /* [2^d] examples per leaf (the global batch's under comm) */
    ccr_comm *comm;    /* expert parallelism: leaf counts over its ranks (or NULL) */
    float *counts_f;   /* [2^d] the same, exported */
    unsigned char *seen; /* [n_mat] scratch of gate_count_distinct */
    /* ste only: the backward's (sibling, example) pairs, b-major then level */
    size_t *pair_mat;  /* [max_batch, d] sibling matrix */
    size_t *pair_row;  /* [max_batch, d] example */
    double *pair_dot;  /* [max_batch, d] dy . M_sibling(x) */
} st_state;

static void st_free(void *state)
{
    st_state *s = state;
    free(s->a);
    free(s->bits);
    free(s->da);
    free(s->ids);
    free(s->weights);
    free(s->counts);
    free(s->counts_f);
    free(s->seen);
    free(s->pair_mat);
    free(s->pair_row);
    free(s->pair_dot);
    memset(s, 0, sizeof *s);
}

/* calloc of n elements (at least one, so that d = 0 still gets a pointer);
 * calloc checks n * size for overflow. */
static void *st_calloc(size_t n, size_t size) { return calloc(n ? n : 1, size); }

static ccr_status st_init(void *state, ccr_ctx *ctx, const ccr_gate_config *cfg,
                          size_t max_batch)
{
    st_state *s = state;
    s->ctx = ctx;
    s->cfg = *cfg;
    if (cfg->combine != CCR_COMBINE_PATH && cfg->combine != CCR_COMBINE_LEAF)
        CCR_FAIL(ctx, CCR_EINVAL, "signtree: combine %d is not path or leaf", (int)cfg->combine);
    if (cfg->bits_from != CCR_BITS_PROJECTION && cfg->bits_from != CCR_BITS_INPUT)
        CCR_FAIL(ctx, CCR_EINVAL, "signtree: bits_from %d is not projection or input",
                 (int)cfg->bits_from);
    if (cfg->grad_mode != CCR_GRAD_NONE && cfg->grad_mode != CCR_GRAD_STE)
        CCR_FAIL(ctx, CCR_EINVAL, "signtree: grad_mode %d is not none or ste",
                 (int)cfg->grad_mode);
    size_t d = cfg->depth;
    bool path = cfg->combine == CCR_COMBINE_PATH;
    /* Bank matrices: 2^(d+1) - 1 nodes (path) or 2^d leaves, at most 2^31
     * (ids are int32).  Test the exponent before shifting. */
    if (d > 31 || (path && d > 30))
        CCR_FAIL(ctx, CCR_EINVAL,
                 "signtree: depth %zu too large (%s above 2^31 bank matrices)", d,
                 path ? "2^(depth+1) - 1 nodes" : "2^depth leaves");
    uint64_t leaves = (uint64_t)1 << d;
    uint64_t n_mat = path ? 2 * leaves - 1 : leaves; /* <= 2^31 */
    if (cfg->bits_from == CCR_BITS_INPUT && d > cfg->d_in)
        CCR_FAIL(ctx, CCR_EINVAL, "signtree: depth %zu above d_in %zu with bits_from = input",
                 d, cfg->d_in);
    s->has_params = cfg->bits_from == CCR_BITS_PROJECTION && d > 0;
    if (s->has_params) {
        size_t n_w;
        if (!ccr_mul_ok(cfg->d_in, d, &n_w) || n_w > SIZE_MAX - d ||
            (uint64_t)(n_w + d) > ST_MAX_FLOATS)
            CCR_FAIL(ctx, CCR_EINVAL,
                     "signtree: depth %zu too large (d_in %zu x depth bit parameters above "
                     "2^34 floats)", d, cfg->d_in);
        if (cfg->d_in > INT_MAX || max_batch > INT_MAX) /* cblas takes int sizes */
            CCR_FAIL(ctx, CCR_EINVAL, "signtree: d_in %zu or max_batch %zu above INT_MAX",
                     cfg->d_in, max_batch);
    }
    s->d = d;
    s->n_leaves = (size_t)leaves;
    s->n_mat = (size_t)n_mat;
    s->slots = path ? d + 1 : 1;
    s->max_batch = max_batch;
    size_t n_bd, n_bs;
    if (!ccr_mul_ok(max_batch, d, &n_bd) || !ccr_mul_ok(max_batch, s->slots, &n_bs))
        CCR_FAIL(ctx, CCR_EINVAL, "signtree: max_batch %zu x depth %zu overflows", max_batch, d);
    s->a = st_calloc(n_bd, sizeof *s->a);
    s->bits = st_calloc(n_bd, sizeof *s->bits);
    s->da = st_calloc(n_bd, sizeof *s->da);
    s->ids = st_calloc(n_bs, sizeof *s->ids);
    s->weights = st_calloc(n_bs, sizeof *s->weights);
    s->counts = st_calloc(s->n_leaves, sizeof *s->counts);
    s->counts_f = st_calloc(s->n_leaves, sizeof *s->counts_f);
    s->seen = st_calloc(s->n_mat, 1);
    bool ste = cfg->grad_mode == CCR_GRAD_STE;
    s->pair_mat = ste ? st_calloc(n_bd, sizeof *s->pair_mat) : NULL;
    s->pair_row = ste ? st_calloc(n_bd, sizeof *s->pair_row) : NULL;
    s->pair_dot = ste ? st_calloc(n_bd, sizeof *s->pair_dot) : NULL;
    if (!s->a || !s->bits || !s->da || !s->ids || !s->weights || !s->counts ||
        !s->counts_f || !s->seen ||
        (ste && (!s->pair_mat || !s->pair_row || !s->pair_dot))) {
        st_free(s);
        CCR_FAIL(ctx, CCR_ENOMEM, "signtree: cannot allocate buffers (depth %zu, batch %zu)",
                 d, max_batch);
    }
    for (size_t i = 0; i < n_bs; i++)
        s->weights[i] = 1.0f;
    return CCR_OK;
}

static size_t st_n_matrices(const void *state) { return ((const st_state *)state)->n_mat; }
static size_t st_slots(const void *state) { return ((const st_state *)state)->slots; }

static ccr_status st_declare(void *state, ccr_arena *a, const char *prefix)
{
    st_state *s = state;
    if (!s->has_params)
        return CCR_OK;
    size_t shape_w[2] = {s->cfg.d_in, s->d}, shape_c[1] = {s->d};
    CCR_TRY(gate_declare(a, prefix, "w_bits", 2, shape_w, &s->i_w));
    CCR_TRY(gate_declare(a, prefix, "c_bits", 1, shape_c, &s->i_c));
    s->arena = a;
    return CCR_OK;
}

/* The bit parameters' values (and gradients if g is not NULL). */
static ccr_status st_params(st_state *s, float **w, float **c, float **gw, float **gc)
{
    if (s->arena == NULL)
        CCR_FAIL(s->ctx, CCR_EINVAL, "signtree: parameters not declared (ccr_gate_declare)");
    *w = ccr_arena_value(s->arena, s->i_w);
    *c = ccr_arena_value(s->arena, s->i_c);
    if (gw != NULL) {
        *gw = ccr_arena_grad(s->arena, s->i_w);
        *gc = ccr_arena_grad(s->arena, s->i_c);
    }
    if (*w == NULL || *c == NULL || (gw != NULL && (*gw == NULL || *gc == NULL)))
        CCR_FAIL(s->ctx, CCR_EINVAL, "signtree: parameter arena not finalized");
    return CCR_OK;
}

static ccr_status st_init_params(void *state, gsl_rng *rng)
{
    st_state *s = state;
    if (!s->has_params)
        return CCR_OK;
    float *w = NULL, *c = NULL;
    CCR_TRY(st_params(s, &w, &c, NULL, NULL));
    /* Declaration order, row-major: w_bits then c_bits. */
    /* W_bits is always random, N(0, 1/d_in): a zero projection makes every
     * bit 0 and routes every example down the leftmost path.  c_bits starts
     * at 0 (random with randomize). */
    gate_init_weights(w, s->cfg.d_in * s->d, s->cfg.d_in, true, rng);
    gate_init_weights(c, s->d, s->cfg.d_in, s->cfg.randomize, rng);
    return CCR_OK;
}

static ccr_status st_forward(void *state, const float *x, size_t batch, bool train,
                             gsl_rng *rng, ccr_route *route, ccr_gate_stats *stats)
{
    CCR_UNUSED(train);
    CCR_UNUSED(rng);
    st_state *s = state;
    size_t d = s->d, d_in = s->cfg.d_in, slots = s->slots;
    bool path = s->cfg.combine == CCR_COMBINE_PATH;
    if (d > 0) {
        if (s->has_params) {
            float *w = NULL, *c = NULL;
            CCR_TRY(st_params(s, &w, &c, NULL, NULL));
            gate_matmul(x, w, batch, d_in, d, s->a, false);
            for (size_t b = 0; b < batch; b++)
                for (size_t j = 0; j < d; j++)
                    s->a[b * d + j] += c[j];
        } else {
            for (size_t b = 0; b < batch; b++)
                memcpy(s->a + b * d, x + b * d_in, d * sizeof *s->a);
        }
    }
    memset(s->counts, 0, s->n_leaves * sizeof *s->counts);
    for (size_t b = 0; b < batch; b++) {
        const float *ab = s->a + b * d;
        float *bb = s->bits + b * d;
        int32_t *id = s->ids + b * slots;
        size_t node = 0, leaf = 0;
        if (path)
            id[0] = 0;
        for (size_t l = 1; l <= d; l++) {
            size_t bit = ab[l - 1] > 0.0f ? 1 : 0; /* a zero goes left */
            bb[l - 1] = (float)bit;
            node = 2 * node + 1 + bit;
            leaf = 2 * leaf + bit;
            if (path)
                id[l] = (int32_t)node;
        }
        if (!path)
            id[0] = (int32_t)leaf;
        s->counts[leaf] += 1.0;
    }
    if (s->comm != NULL)  /* statistics and exports of the global batch */
        CCR_TRY(ccr_comm_allreduce_sum_f64(s->comm, s->counts, s->n_leaves));
    for (size_t i = 0; i < s->n_leaves; i++)
        s->counts_f[i] = (float)s->counts[i];

    ccr_gate_stats st;
    memset(&st, 0, sizeof st);
    double cv = gate_cv(s->counts, s->n_leaves);
    double mm = gate_max_over_mean(s->counts, s->n_leaves);
    st.cv_importance = cv;
    st.cv_load = cv;
    st.cv_load_count = cv;
    st.max_mean_load = mm;
    st.max_mean_count = mm;
    st.distinct = gate_count_distinct(s->ids, batch * slots, s->n_mat, s->seen);
    s->batch = batch;
    *stats = st;
    *route = (ccr_route){
        .batch = batch, .slots = slots, .n_matrices = s->n_mat,
        .ids = s->ids, .weights = s->weights,
    };
    return CCR_OK;
}

/* dy . M_m(x_row) through the layer's per-row callback, summed in double. */
static ccr_status st_eval_dot(const ccr_gate_bwd_args *a, size_t m, const float *x_row,
                              const float *dy_row, double *out)
{
    CCR_TRY(a->eval_matrix(a->bank, m, x_row, a->scratch));
    double acc = 0.0;
    for (size_t o = 0; o < a->d_out; o++)
        acc += (double)dy_row[o] * (double)a->scratch[o];
    *out = acc;
    return CCR_OK;
}

static ccr_status st_set_comm(void *state, ccr_comm *comm)
{
    ((st_state *)state)->comm = comm;
    return CCR_OK;
}

static ccr_status st_backward(void *state, const ccr_gate_bwd_args *a)
{
    st_state *s = state;
    size_t d = s->d, d_in = s->cfg.d_in, slots = s->slots, batch = a->batch;
    if (s->cfg.grad_mode == CCR_GRAD_NONE || d == 0)
        return CCR_OK;
    if (a->dy == NULL || a->d_out == 0 ||
        (a->eval_dots == NULL && (a->eval_matrix == NULL || a->scratch == NULL)))
        CCR_FAIL(s->ctx, CCR_EINVAL,
                 "signtree: grad_mode ste needs dy, d_out and eval_dots, or eval_matrix and "
                 "scratch, in the backward arguments");
    if (batch != s->batch)
        CCR_FAIL(s->ctx, CCR_EINVAL, "signtree: backward batch %zu, last forward %zu", batch,
                 s->batch);
    float *w = NULL, *c = NULL, *gw = NULL, *gc = NULL;
    if (s->has_params)
        CCR_TRY(st_params(s, &w, &c, &gw, &gc));
    bool path = s->cfg.combine == CCR_COMBINE_PATH;
    /* 1. The sibling of every (example, level): pair b d + l - 1. */
    for (size_t b = 0; b < batch; b++) {
        const float *bb = s->bits + b * d;
        const int32_t *id = s->ids + b * slots;
        size_t *pm = s->pair_mat + b * d, *pr = s->pair_row + b * d;
        for (size_t l = 1; l <= d; l++) {
            if (path)
                pm[l - 1] = bb[l - 1] != 0.0f ? (size_t)id[l] - 1 : (size_t)id[l] + 1;
            else
                pm[l - 1] = (size_t)id[0] ^ ((size_t)1 << (d - l));
            pr[l - 1] = b;
        }
    }
    /* 2. dy . M_sibling(x): one batched call, or one row at a time. */
    size_t n = batch * d; /* <= max_batch x d, checked in init */
    if (a->eval_dots != NULL) {
        CCR_TRY(a->eval_dots(a->bank, n, s->pair_mat, s->pair_row, a->x, a->dy, s->pair_dot));
    } else {
        for (size_t i = 0; i < n; i++) {
            size_t b = s->pair_row[i];
            CCR_TRY(st_eval_dot(a, s->pair_mat[i], a->x + b * d_in, a->dy + b * a->d_out,
                                s->pair_dot + i));
        }
    }
    /* 3. da_l = dy . (M_right - M_left); the chosen child's term is dweights. */
    for (size_t b = 0; b < batch; b++) {
        const float *bb = s->bits + b * d;
        for (size_t l = 1; l <= d; l++) {
            bool right = bb[l - 1] != 0.0f;
            double dw_chosen = a->dweights[b * slots + (path ? l : 0)];
            double dw_sibling = s->pair_dot[b * d + l - 1];
#ifdef CCR_MUTANT_SIGNTREE_SIBLING  /* tests/gradcheck_mutants.sh */
            dw_sibling = 0.0;
#endif
            s->da[b * d + l - 1] =
                (float)(right ? dw_chosen - dw_sibling : dw_sibling - dw_chosen);
        }
    }
    if (s->has_params) {
        gate_matmul_backward(a->x, w, s->da, batch, d_in, d, gw, a->dx);
        for (size_t j = 0; j < d; j++) {
            double acc = 0.0;
            for (size_t b = 0; b < batch; b++)
                acc += s->da[b * d + j];
            gc[j] += (float)acc;
        }
    } else if (a->dx != NULL) {
        for (size_t b = 0; b < batch; b++)
            for (size_t j = 0; j < d; j++)
                a->dx[b * d_in + j] += s->da[b * d + j];
    }
    return CCR_OK;
}

static double st_flops(const void *state, bool train)
{
    CCR_UNUSED(train);
    const st_state *s = state;
    return s->has_params ? 2.0 * (double)s->cfg.d_in * (double)s->d : 0.0;
}

static double st_matrices_per_example(const void *state)
{
    return (double)((const st_state *)state)->slots;
}

static size_t st_n_exports(const void *state)
{
    return ((const st_state *)state)->d > 0 ? 5 : 3;
}

static ccr_status st_get_export(const void *state, size_t i, const char **name, size_t *rank,
                                size_t shape[4], const float **data)
{
    const st_state *s = state;
    static const char *const names[] = {"importance", "load", "leaf_counts", "bits", "a"};
    if (i >= st_n_exports(state))
        CCR_FAIL(s->ctx, CCR_EINVAL, "signtree: no export %zu", i);
    *name = names[i];
    if (i < 3) {
        *rank = 1;
        shape[0] = s->n_leaves;
        *data = s->counts_f;
    } else {
        *rank = 2;
        shape[0] = s->batch; /* rows of the last forward (0 before any) */
        shape[1] = s->d;
        *data = i == 3 ? s->bits : s->a;
    }
    return CCR_OK;
}

const ccr_gate_type ccr_gate_signtree = {
    .name = "signtree",
    .paper = "Cho & Bengio 2014, sign-bit tree (ccr's reading)",
    .param_group = "tree.",
    .state_size = sizeof(st_state),
    .init = st_init,
    .free = st_free,
    .n_matrices = st_n_matrices,
    .slots = st_slots,
    .declare = st_declare,
    .init_params = st_init_params,
    .forward = st_forward,
    .backward = st_backward,
    .flops = st_flops,
    .matrices_per_example = st_matrices_per_example,
    .n_exports = st_n_exports,
    .get_export = st_get_export,
    .set_comm = st_set_comm,
    .options = CCR_GATE_OPT_DEPTH | CCR_GATE_OPT_COMBINE | CCR_GATE_OPT_BITS_FROM |
               CCR_GATE_OPT_GRAD_MODE | CCR_GATE_OPT_RANDOMIZE,
    .linear_bank = true,
};
