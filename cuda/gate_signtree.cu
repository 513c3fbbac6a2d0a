/*
 * gate_signtree.cu - the device half of the sign-bit tree gate; mirrors
 * src/gate_signtree.c (st_forward, st_backward) line by line on device
 * memory.  See that file for the reading of Cho & Bengio 2014.
 *
 * Forward: a = x W_bits (+ c_bits, a float add after the GEMM, as the CPU
 * does) through the backend's cuBLAS GEMM, or the first d input units; then
 * one thread per example walks its d levels in order: bit l = 1[a_l > 0]
 * (a zero or a NaN goes left), heap node 2n+1+bit, leaf 2 leaf + bit, the
 * path's ids (slot l = the node at depth l) or the leaf id.  The routing
 * weights are the constant 1 written at init.  The per-leaf counts are
 * integer atomics (exact, so the result does not depend on the order),
 * converted to double and downloaded; CV and max/mean are computed on the
 * host with the CPU gate's gate_cv / gate_max_over_mean.
 *
 * Backward (grad_mode ste, d > 0): the (sibling, example) pairs in the CPU's
 * order (pair b d + l - 1), one call of the layer's device eval_dots, then
 * da = +-(dweights[chosen] - dot[sibling]) in double rounded to float, and
 * the same GEMMs as gate_matmul_backward (dW_bits += x^T da, dx += da
 * W_bits^T) or dx_j += da_j (bits from the input); dc_bits += the column
 * sums of da (gdev_colsum, double, fixed order).  eval_matrix does not exist
 * on the device: without eval_dots the backward is refused.
 *
 * Results agree with the CPU to float rounding: the GEMMs and the layer's
 * eval_dots sum in another order than OpenBLAS, so a pre-activation within
 * rounding of 0 can take the other bit; given the same a, ids are equal.
 */
#include <stdlib.h>
#include <string.h>

#include "gate_dev_util.cuh"  // provides: gdev_alloc, gdev_colsum, gdev_stream, gdev_find
#include "gate_util.h"        // provides: gate_cv, gate_max_over_mean

#define STD_BLOCK 256

typedef struct std_state {
    ccr_backend *be;
    ccr_ctx *ctx;
    ccr_gate_config cfg;
    size_t d;           /* depth: number of sign bits */
    size_t n_leaves;    /* 2^d */
    size_t n_mat;       /* bank matrices: 2^(d+1) - 1 (path) or 2^d (leaf) */
    size_t slots;       /* d + 1 (path) or 1 (leaf) */
    size_t max_batch;
    size_t batch;       /* batch of the last forward (0: none yet) */
    bool path;          /* combine = path */
    bool has_params;    /* projection with d > 0 */
    bool ste;           /* grad_mode = ste */
    ccr_arena *arena;   /* the bound device arena (has_params only) */
    size_t i_w, i_c;    /* w_bits [d_in, d], c_bits [d] */
    /* device buffers */
    float *a;           /* [max_batch, d] pre-activations (projection; else 1 float) */
    float *bits;        /* [max_batch, d] 0/1 */
    int32_t *ids;       /* [max_batch, slots] */
    float *weights;     /* [max_batch, slots] all 1 */
    unsigned long long *counts_u; /* [2^d] examples per leaf, then their doubles' bits */
    /* ste only (device) */
    float *da;          /* [max_batch, d] straight-through gradient */
    double *dc;         /* [d] column sums of da */
    size_t *pair_mat;   /* [max_batch, d] sibling matrix, b-major then level */
    size_t *pair_row;   /* [max_batch, d] example */
    double *pair_dot;   /* [max_batch, d] dy . M_sibling(x) */
    /* host */
    double *counts_h;   /* [2^d] downloaded counts */
} std_state;

/* ---- kernels ------------------------------------------------------------- */

static __global__ void std_fill_kernel(float *p, size_t n, float v)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        p[i] = v;
}

/* st_forward's per-example loop.  src [batch, ld] holds the pre-activations
 * (the GEMM output a, ld = d, when c is not NULL: a_l + c_l is written back
 * to a as on the CPU) or the input (ld = d_in, c NULL). */
static __global__ void std_route_kernel(const float *src, size_t ld, const float *c,
                                        size_t batch, size_t d, size_t slots, bool path,
                                        float *a, float *bits, int32_t *ids,
                                        unsigned long long *counts)
{
    for (size_t b = blockIdx.x * (size_t)blockDim.x + threadIdx.x; b < batch;
         b += (size_t)gridDim.x * blockDim.x) {
        float *bb = bits + b * d;
        int32_t *id = ids + b * slots;
        size_t node = 0, leaf = 0;
        if (path)
            id[0] = 0;
        for (size_t l = 1; l <= d; l++) {
            float v = src[b * ld + l - 1];
            if (c != NULL) {
                v = v + c[l - 1];
                a[b * d + l - 1] = v;
            }
            size_t bit = v > 0.0f ? 1 : 0; /* a zero goes left */
            bb[l - 1] = (float)bit;
            node = 2 * node + 1 + bit;
            leaf = 2 * leaf + bit;
            if (path)
                id[l] = (int32_t)node;
        }
        if (!path)
            id[0] = (int32_t)leaf;
        /* integer adds: the count is exact whatever the order */
        atomicAdd(&counts[leaf], 1ull);
    }
}

/* The counts to double in place (each thread rewrites its own element, so
 * the buffer is downloaded as doubles; the next forward zeroes it again). */
static __global__ void std_count_kernel(unsigned long long *u, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        u[i] = (unsigned long long)__double_as_longlong((double)u[i]);
}

/* st_backward step 1: the sibling of pair i = b d + l - 1. */
static __global__ void std_pairs_kernel(const float *bits, const int32_t *ids, size_t batch,
                                        size_t d, size_t slots, bool path, size_t *pair_mat,
                                        size_t *pair_row)
{
    size_t n = batch * d;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t b = i / d, l = i % d + 1;
        const int32_t *id = ids + b * slots;
        if (path)
            pair_mat[i] = bits[i] != 0.0f ? (size_t)id[l] - 1 : (size_t)id[l] + 1;
        else
            pair_mat[i] = (size_t)id[0] ^ ((size_t)1 << (d - l));
        pair_row[i] = b;
    }
}

/* st_backward step 3: da_l = dy . (M_right - M_left), in double, rounded. */
static __global__ void std_da_kernel(const float *bits, const float *dweights,
                                     const double *pair_dot, size_t batch, size_t d,
                                     size_t slots, bool path, float *da)
{
    size_t n = batch * d;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t b = i / d, l = i % d + 1;
        bool right = bits[i] != 0.0f;
        double dw_chosen = dweights[b * slots + (path ? l : 0)];
        double dw_sibling = pair_dot[i];
        da[i] = (float)(right ? dw_chosen - dw_sibling : dw_sibling - dw_chosen);
    }
}

/* gc[j] += (float)sum_b da[b, j] (the sums from gdev_colsum). */
static __global__ void std_add_sum_kernel(float *gc, const double *sum, size_t d)
{
    for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < d;
         j += (size_t)gridDim.x * blockDim.x)
        gc[j] += (float)sum[j];
}

/* bits from the input: dx[b, j] += da[b, j], j < d. */
static __global__ void std_dx_input_kernel(float *dx, const float *da, size_t batch, size_t d,
                                           size_t d_in)
{
    size_t n = batch * d;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dx[(i / d) * d_in + i % d] += da[i];
}

/* ---- the table's functions ----------------------------------------------- */

static void std_free(void *state)
{
    std_state *s = (std_state *)state;
    ccr_backend *be = s->be;
    if (be != NULL) {
        ccr_backend_free_buffer(be, s->a);
        ccr_backend_free_buffer(be, s->bits);
        ccr_backend_free_buffer(be, s->ids);
        ccr_backend_free_buffer(be, s->weights);
        ccr_backend_free_buffer(be, s->counts_u);
        ccr_backend_free_buffer(be, s->da);
        ccr_backend_free_buffer(be, s->dc);
        ccr_backend_free_buffer(be, s->pair_mat);
        ccr_backend_free_buffer(be, s->pair_row);
        ccr_backend_free_buffer(be, s->pair_dot);
    }
    free(s->counts_h);
    memset(s, 0, sizeof *s);
}

static ccr_status std_alloc_all(std_state *s, size_t n_bd, size_t n_bs)
{
    ccr_backend *be = s->be;
    /* a is the GEMM's output: only the projection needs it */
    CCR_TRY(gdev_alloc(be, s->has_params ? n_bd : 0, sizeof(float), (void **)&s->a));
    CCR_TRY(gdev_alloc(be, n_bd, sizeof(float), (void **)&s->bits));
    CCR_TRY(gdev_alloc(be, n_bs, sizeof(int32_t), (void **)&s->ids));
    CCR_TRY(gdev_alloc(be, n_bs, sizeof(float), (void **)&s->weights));
    CCR_TRY(gdev_alloc(be, s->n_leaves, sizeof(unsigned long long), (void **)&s->counts_u));
    CCR_TRY(gdev_host_alloc(be, s->n_leaves, sizeof(double), (void **)&s->counts_h));
    if (s->ste) {
        CCR_TRY(gdev_alloc(be, n_bd, sizeof(float), (void **)&s->da));
        CCR_TRY(gdev_alloc(be, s->d, sizeof(double), (void **)&s->dc));
        CCR_TRY(gdev_alloc(be, n_bd, sizeof(size_t), (void **)&s->pair_mat));
        CCR_TRY(gdev_alloc(be, n_bd, sizeof(size_t), (void **)&s->pair_row));
        CCR_TRY(gdev_alloc(be, n_bd, sizeof(double), (void **)&s->pair_dot));
    }
    /* The weights never change: every slot of every example, weight 1. */
    std_fill_kernel<<<ccr_grid(n_bs, STD_BLOCK), STD_BLOCK, 0, gdev_stream(be)>>>(
        s->weights, n_bs, 1.0f);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

static ccr_status std_init(void *state, ccr_backend *be, const ccr_gate *g, size_t max_batch)
{
    std_state *s = (std_state *)state;
    const ccr_gate_config *cfg = ccr_gate_get_config(g);
    s->be = be;
    s->ctx = be->ctx;
    if (cfg == NULL)
        CCR_FAIL(s->ctx, CCR_EINVAL, "signtree (device): no host gate");
    s->cfg = *cfg;
    /* The host gate validated the configuration (st_init); what follows
     * only re-derives its sizes and checks that they agree. */
    size_t d = cfg->depth;
    s->path = cfg->combine == CCR_COMBINE_PATH;
    s->ste = cfg->grad_mode == CCR_GRAD_STE;
    s->has_params = cfg->bits_from == CCR_BITS_PROJECTION && d > 0;
    if (d > 31 || (s->path && d > 30))
        CCR_FAIL(s->ctx, CCR_EINVAL, "signtree (device): depth %zu too large", d);
    s->d = d;
    s->n_leaves = (size_t)1 << d;
    s->n_mat = s->path ? 2 * s->n_leaves - 1 : s->n_leaves;
    s->slots = s->path ? d + 1 : 1;
    s->max_batch = max_batch;
    if (ccr_gate_n_matrices(g) != s->n_mat || ccr_gate_slots(g) != s->slots)
        CCR_FAIL(s->ctx, CCR_EINVAL,
                 "signtree (device): host gate has %zu matrices and %zu slots, expected %zu "
                 "and %zu", ccr_gate_n_matrices(g), ccr_gate_slots(g), s->n_mat, s->slots);
    size_t n_bd, n_bs;
    if (!ccr_mul_ok(max_batch, d, &n_bd) || !ccr_mul_ok(max_batch, s->slots, &n_bs))
        CCR_FAIL(s->ctx, CCR_EINVAL, "signtree (device): max_batch %zu x depth %zu overflows",
                 max_batch, d);
    ccr_status st = std_alloc_all(s, n_bd, n_bs);
    if (st != CCR_OK)
        std_free(s);
    return st;
}

static ccr_status std_bind(void *state, ccr_arena *a, const char *prefix)
{
    std_state *s = (std_state *)state;
    if (!s->has_params)
        return CCR_OK; /* st_declare declares nothing */
    size_t i_w, i_c;
    CCR_TRY(gdev_find(a, s->ctx, prefix, "w_bits", &i_w));
    CCR_TRY(gdev_find(a, s->ctx, prefix, "c_bits", &i_c));
    if (ccr_arena_size(a, i_w) != s->cfg.d_in * s->d || ccr_arena_size(a, i_c) != s->d)
        CCR_FAIL(s->ctx, CCR_EINVAL,
                 "signtree (device): w_bits / c_bits hold %zu / %zu floats, expected %zu / %zu",
                 ccr_arena_size(a, i_w), ccr_arena_size(a, i_c), s->cfg.d_in * s->d, s->d);
    s->i_w = i_w;
    s->i_c = i_c;
    s->arena = a;
    return CCR_OK;
}

/* st_params on the device arena. */
static ccr_status std_params(std_state *s, float **w, float **c, float **gw, float **gc)
{
    if (s->arena == NULL)
        CCR_FAIL(s->ctx, CCR_EINVAL, "signtree (device): parameters not bound");
    *w = ccr_arena_value(s->arena, s->i_w);
    *c = ccr_arena_value(s->arena, s->i_c);
    if (gw != NULL) {
        *gw = ccr_arena_grad(s->arena, s->i_w);
        *gc = ccr_arena_grad(s->arena, s->i_c);
    }
    if (*w == NULL || *c == NULL || (gw != NULL && (*gw == NULL || *gc == NULL)))
        CCR_FAIL(s->ctx, CCR_EINVAL, "signtree (device): parameter arena not finalized");
    return CCR_OK;
}

static ccr_status std_forward(void *state, const float *x, size_t batch, bool train,
                              gsl_rng *rng, ccr_route *route, ccr_gate_stats *stats)
{
    CCR_UNUSED(train); /* no noise: the CPU gate draws nothing */
    CCR_UNUSED(rng);
    std_state *s = (std_state *)state;
    ccr_backend *be = s->be;
    cudaStream_t stream = gdev_stream(be);
    size_t d = s->d, d_in = s->cfg.d_in, slots = s->slots;
    if (batch == 0 || batch > s->max_batch)
        CCR_FAIL(s->ctx, CCR_EBADLEN, "signtree (device): batch %zu not in 1..%zu", batch,
                 s->max_batch);
    const float *src = x, *c = NULL;
    size_t ld = d_in;
    if (s->has_params) {
        float *w = NULL, *cv = NULL;
        CCR_TRY(std_params(s, &w, &cv, NULL, NULL));
        /* gate_matmul: a[B, d] = x[B, d_in] W[d_in, d] */
        CCR_TRY(be->k->gemm(be, false, false, batch, d, d_in, 1.0f, x, d_in, w, d, 0.0f, s->a,
                            d));
        src = s->a;
        ld = d;
        c = cv;
    }
    CCR_CUDA_TRY(be, cudaMemsetAsync(s->counts_u, 0, s->n_leaves * sizeof *s->counts_u,
                                     stream));
    std_route_kernel<<<ccr_grid(batch, STD_BLOCK), STD_BLOCK, 0, stream>>>(
        src, ld, c, batch, d, slots, s->path, s->a, s->bits, s->ids, s->counts_u);
    CCR_CUDA_LAUNCHED(be);
    std_count_kernel<<<ccr_grid(s->n_leaves, STD_BLOCK), STD_BLOCK, 0, stream>>>(
        s->counts_u, s->n_leaves);
    CCR_CUDA_LAUNCHED(be);
    CCR_TRY(ccr_backend_get(be, s->counts_h, s->counts_u, s->n_leaves * sizeof *s->counts_h));

    /* No non-finite check of the weights: they are the constant 1 written
     * at init (the CPU check can never fire for this gate either). */
    ccr_gate_stats st;
    memset(&st, 0, sizeof st);
    double cv = gate_cv(s->counts_h, s->n_leaves);
    double mm = gate_max_over_mean(s->counts_h, s->n_leaves);
    st.cv_importance = cv;
    st.cv_load = cv;
    st.cv_load_count = cv;
    st.max_mean_load = mm;
    st.max_mean_count = mm;
    s->batch = batch;
    *stats = st;
    route->batch = batch;
    route->slots = slots;
    route->n_matrices = s->n_mat;
    route->ids = s->ids;
    route->weights = s->weights;
    return CCR_OK;
}

static ccr_status std_backward(void *state, const ccr_gate_bwd_args *a)
{
    std_state *s = (std_state *)state;
    ccr_backend *be = s->be;
    cudaStream_t stream = gdev_stream(be);
    size_t d = s->d, d_in = s->cfg.d_in, slots = s->slots, batch = a->batch;
    CCR_CHECK_NULL(s->ctx, a->x);
    CCR_CHECK_NULL(s->ctx, a->dweights);
    if (!s->ste || d == 0)
        return CCR_OK;
    if (a->dy == NULL || a->d_out == 0 || a->eval_dots == NULL)
        CCR_FAIL(s->ctx, CCR_EINVAL,
                 "signtree (device): grad_mode ste needs dy, d_out and eval_dots in the backward "
                 "arguments (eval_matrix is not available on the device)");
    if (batch != s->batch || batch == 0)
        CCR_FAIL(s->ctx, CCR_EINVAL, "signtree (device): backward batch %zu, last forward %zu",
                 batch, s->batch);
    float *w = NULL, *c = NULL, *gw = NULL, *gc = NULL;
    if (s->has_params)
        CCR_TRY(std_params(s, &w, &c, &gw, &gc));
    size_t n = batch * d; /* <= max_batch x d, checked in init */
    /* 1. The sibling of every (example, level). */
    std_pairs_kernel<<<ccr_grid(n, STD_BLOCK), STD_BLOCK, 0, stream>>>(
        s->bits, s->ids, batch, d, slots, s->path, s->pair_mat, s->pair_row);
    CCR_CUDA_LAUNCHED(be);
    /* 2. dy . M_sibling(x): one batched call (device pairs, device out). */
    CCR_TRY(a->eval_dots(a->bank, n, s->pair_mat, s->pair_row, a->x, a->dy, s->pair_dot));
    /* 3. da_l = dy . (M_right - M_left); the chosen child's term is dweights. */
    std_da_kernel<<<ccr_grid(n, STD_BLOCK), STD_BLOCK, 0, stream>>>(
        s->bits, a->dweights, s->pair_dot, batch, d, slots, s->path, s->da);
    CCR_CUDA_LAUNCHED(be);
    if (s->has_params) {
        /* gate_matmul_backward: dW[d_in, d] += x^T da; dx[B, d_in] += da W^T */
        CCR_TRY(be->k->gemm(be, true, false, d_in, d, batch, 1.0f, a->x, d_in, s->da, d, 1.0f,
                            gw, d));
        if (a->dx != NULL)
            CCR_TRY(be->k->gemm(be, false, true, batch, d_in, d, 1.0f, s->da, d, w, d, 1.0f,
                                a->dx, d_in));
        /* dc += sum_b da (double, fixed order) */
        CCR_TRY(gdev_colsum(be, s->da, batch, d, d, s->dc, false));
        std_add_sum_kernel<<<ccr_grid(d, STD_BLOCK), STD_BLOCK, 0, stream>>>(gc, s->dc, d);
        CCR_CUDA_LAUNCHED(be);
    } else if (a->dx != NULL) {
        std_dx_input_kernel<<<ccr_grid(n, STD_BLOCK), STD_BLOCK, 0, stream>>>(a->dx, s->da,
                                                                             batch, d, d_in);
        CCR_CUDA_LAUNCHED(be);
    }
    return CCR_OK;
}

const ccr_gate_dev_type ccr_gate_dev_signtree = {
    .host = &ccr_gate_signtree,
    .state_size = sizeof(std_state),
    .init = std_init,
    .free = std_free,
    .bind = std_bind,
    .forward = std_forward,
    .backward = std_backward,
};
