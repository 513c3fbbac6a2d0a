/*
 * cond.cu - the conditional layer's device half (src/cond_dev.h): the gate's
 * device code, then the routed matmul on device memory.
 *
 * The steps and their CPU twins in src/cond.c:
 *   sort      cd_sort          = cond_sort (the same host code path: the ids
 *                                are downloaded, batch x slots int32)
 *   gather    cd_gather_kernel = cond_group_fwd's memcpy
 *   GEMMs     cd_gemm_groups   = cond_apply's gemm per group: one
 *                                cublasGemmGroupedBatchedEx call for all groups
 *                                of at least CD_TINY_ROWS rows, and
 *                                cd_tiny_kernel (one block per group, one
 *                                thread per output column, the matrix read once)
 *                                for the groups below: deep tree levels and
 *                                E >> batch make many one- or two-row groups,
 *                                which a GEMM call per group would spend its
 *                                time launching
 *   bias/ReLU cd_bias_act_kernel = cond_bias_act, all sorted rows in one launch
 *   combine   cd_combine_kernel  = cond_gather with weights (slot order)
 *   backward  cd_gout_kernel (g_out, dL/dw as a double dot), cd_colsum_kernel
 *             (bias gradients: rows of a group in order, in double), grouped
 *             GEMMs for dW and g_x, cd_relu_bwd_kernel, cd_combine_kernel for dx
 *   eval_dots cd_eval_dots = cond_eval_dots: counting sort by matrix on the
 *             host, gather, cd_apply_groups, cd_dot_kernel
 * No float atomics anywhere; every sum has a fixed order.  Float products and
 * sums outside the GEMMs use __fmul_rn/__fadd_rn, so the compiler does not
 * fuse them into FMAs the CPU code does not use.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "arena_impl.h"       // provides: ccr_arena_touch_row
#include "cond_dev.h"
#include "cuda_common.cuh"    // provides: CCR_CUDA_TRY, ccr_cuda, ccr_grid
#include "gate_dev_util.cuh"  // provides: gdev_alloc, gdev_find_nonfinite, gdev_stream

/* Groups with fewer rows go to cd_tiny_kernel. */
#define CD_TINY_ROWS 4
#define CD_BLOCK 256

struct ccr_cond_dev {
    ccr_backend *be;
    ccr_ctx *ctx;
    const ccr_gate_dev_type *gt;
    void *gstate;              /* the gate's device state (gt->state_size bytes) */
    bool gate_inited;
    ccr_cond_dev_shape sh;
    size_t P;                  /* max_batch x slots */
    size_t bytes;              /* device + host workspace */
    /* the bank in the arena */
    ccr_arena *arena;
    const float *bound_values; /* the arena's value block at bind (a new block rebinds) */
    size_t p[4];
    /* device buffers */
    float *xin;                /* [max_batch, d_in] the forward's input */
    float *xg, *hid, *out;     /* [P, d_in], [P, h], [P, d_out] in sorted order */
    float *g_out, *g_hid, *g_x;
    float *dweights;           /* [P] in pair order */
    int32_t *src, *pos, *qmat; /* [P] sorted -> pair, pair -> sorted, sorted -> matrix */
    int32_t *tiny;             /* [2 P] (first sorted row, rows) of the tiny groups */
    const float **ptrs;        /* [3 P] pointer arrays of the grouped GEMM */
    double *dots;              /* [P] eval_dots's results of one chunk */
    int *flag;                 /* one int: gdev_find_nonfinite */
    /* host mirrors and the sort */
    int32_t *h_ids;            /* [P] the route, copied */
    float *h_w;                /* [P] */
    uint32_t *h_cnt;           /* [n_mat] counting-sort counters, 0 between calls */
    int32_t *h_gid;            /* [G_max] group -> matrix, ascending */
    uint32_t *h_goff;          /* [G_max + 1] */
    int32_t *h_src, *h_pos, *h_qmat, *h_tiny; /* as their device twins */
    const float **h_ptrs;      /* [3 P] */
    int *h_m, *h_n, *h_k, *h_lda, *h_ldb, *h_ldc, *h_one; /* [P] grouped GEMM shapes */
    float *h_alpha, *h_beta;   /* [P] */
    cublasOperation_t *h_ta, *h_tb; /* [P] */
    size_t *h_dmat, *h_drow;   /* [P] eval_dots: the chunk's pairs */
    /* last forward */
    ccr_route route;           /* device table of the gate */
    size_t batch, n_pairs, n_groups;
};

/* ---- kernels ----------------------------------------------------------------- */

/* xg[q] = x[src[q] / S]: the sorted rows' inputs. */
__global__ void cd_gather_kernel(const float *x, const int32_t *src, size_t S, size_t n,
                                 size_t d, float *xg)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n * d;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t q = i / d, j = i % d;
        xg[i] = x[((size_t)src[q] / S) * d + j];
    }
}

/* The same for eval_dots: rows named directly. */
__global__ void cd_gather_rows_kernel(const float *x, const int32_t *row, size_t n, size_t d,
                                      float *xg)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n * d;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t q = i / d, j = i % d;
        xg[i] = x[(size_t)row[q] * d + j];
    }
}

/* y[q, :] += bias[qmat[q], :], then ReLU: cond_bias_act over all sorted rows. */
__global__ void cd_bias_act_kernel(float *y, const float *bias, const int32_t *qmat, size_t n,
                                   size_t cols, bool relu)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n * cols;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t q = i / cols, j = i % cols;
        float v = __fadd_rn(y[i], bias[(size_t)qmat[q] * cols + j]);
        y[i] = relu ? (v > 0.0f ? v : 0.0f) : v;
    }
}

/* C[r, j] (+)= sum_k A[r, k] B[k, j] for the rows r of one tiny group per block
 * (blockIdx.x = its index in tiny[]), B its matrix; a thread per column j reads
 * B's row k coalesced, the group's rows (< CD_TINY_ROWS) kept in registers. */
__global__ void cd_tiny_kernel(const int32_t *tiny, const int32_t *qmat, const float *a,
                               size_t lda, const float *b, size_t b_stride, size_t ldb,
                               float *c, size_t ldc, size_t n, size_t k, float beta)
{
    const size_t q0 = (size_t)tiny[2 * blockIdx.x];
    const int rows = tiny[2 * blockIdx.x + 1];
    const float *bm = b + (size_t)qmat[q0] * b_stride;
    for (size_t j = blockIdx.y * (size_t)blockDim.x + threadIdx.x; j < n;
         j += (size_t)gridDim.y * blockDim.x) {
        float acc[CD_TINY_ROWS] = {0.0f};
        for (size_t kk = 0; kk < k; kk++) {
            float bv = bm[kk * ldb + j];
            for (int r = 0; r < rows; r++)
                acc[r] = fmaf(a[(q0 + r) * lda + kk], bv, acc[r]);
        }
        for (int r = 0; r < rows; r++) {
            float *cp = c + (q0 + r) * ldc + j;
            *cp = beta == 0.0f ? acc[r] : __fadd_rn(__fmul_rn(beta, *cp), acc[r]);
        }
    }
}

/* Fixed-order block reduction of one double per thread (blockDim.x = CD_BLOCK):
 * a tree over shared memory, the same additions every launch. */
__device__ double cd_block_sum(double v, double *sh)
{
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = CD_BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s)
            sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    double r = sh[0];
    __syncthreads();
    return r;
}

/* One block per sorted row q of pair p = src[q], example b = p / S:
 * g_out[q] = w_p dy_b and dweights[p] = <dy_b, out[q]> in double. */
__global__ void cd_gout_kernel(const float *dy, const float *out, const float *weights,
                               const int32_t *src, size_t S, size_t d_out, float *g_out,
                               float *dweights)
{
    __shared__ double sh[CD_BLOCK];
    const size_t q = blockIdx.x, p = (size_t)src[q], b = p / S;
    const float wt = weights[p];
    const float *d = dy + b * d_out, *o = out + q * d_out;
    double acc = 0.0;
    for (size_t j = threadIdx.x; j < d_out; j += CD_BLOCK) {
        g_out[q * d_out + j] = __fmul_rn(wt, d[j]);
        acc += (double)d[j] * (double)o[j];
    }
    double s = cd_block_sum(acc, sh);
    if (threadIdx.x == 0)
        dweights[p] = (float)s;
}

/* out[ord[q]] = <dy[row[q]], y[q]> in double, a block per row (eval_dots). */
__global__ void cd_dot_kernel(const float *dy, const float *y, const int32_t *row,
                              const int32_t *ord, size_t d_out, double *out)
{
    __shared__ double sh[CD_BLOCK];
    const size_t q = blockIdx.x;
    const float *d = dy + (size_t)row[q] * d_out, *o = y + q * d_out;
    double acc = 0.0;
    for (size_t j = threadIdx.x; j < d_out; j += CD_BLOCK)
        acc += (double)d[j] * (double)o[j];
    double s = cd_block_sum(acc, sh);
    if (threadIdx.x == 0)
        out[ord[q]] = s;
}

/* db[gid[g], j] += sum over the group's rows in order of g[q, j] (double): one
 * thread per (group, column), the bias gradient of cond_relu_bwd_bias and
 * cond_group_bwd in the CPU's order.  Groups g = blockIdx.y, + gridDim.y, ...
 * of the G in tiny[] (start, rows). */
__global__ void cd_colsum_kernel(const float *g, const int32_t *qmat, const int32_t *tiny,
                                 size_t G, size_t cols, float *db)
{
    for (size_t gi = blockIdx.y; gi < G; gi += gridDim.y) {
        const size_t q0 = (size_t)tiny[2 * gi], rows = (size_t)tiny[2 * gi + 1];
        for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < cols;
             j += (size_t)gridDim.x * blockDim.x) {
            double acc = 0.0;
            for (size_t r = 0; r < rows; r++)
                acc += (double)g[(q0 + r) * cols + j];
            float *dst = db + (size_t)qmat[q0] * cols + j;
            *dst = __fadd_rn(*dst, (float)acc);
        }
    }
}

/* The grid of cd_colsum_kernel: columns in x, groups in y (at most 65535). */
static dim3 cd_colsum_grid(size_t cols, size_t G)
{
    return dim3(ccr_ceil_div(cols, CD_BLOCK), (unsigned)(G < 65535 ? G : 65535));
}

/* g = hid > 0 ? g : 0 (the ReLU's backward). */
__global__ void cd_relu_bwd_kernel(float *g, const float *hid, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        g[i] = hid[i] > 0.0f ? g[i] : 0.0f;
}

/* dst_b = sum over slots in slot order of (w *) src[pos] (+ add_b): cond_gather
 * (combine with weights, dx without).  One thread per (example, column). */
__global__ void cd_combine_kernel(const float *src, const int32_t *pos, const float *weights,
                                  const float *add, size_t batch, size_t S, size_t n, float *dst)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < batch * n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t b = i / n, j = i % n;
        float y = 0.0f;
        for (size_t s = 0; s < S; s++) {
            int32_t q = pos[b * S + s];
            if (q < 0)
                continue;
            float o = src[(size_t)q * n + j];
            y = __fadd_rn(y, weights ? __fmul_rn(weights[b * S + s], o) : o);
        }
        if (add != NULL)
            y = __fadd_rn(y, add[i]);
        dst[i] = y;
    }
}

/* ---- allocation -------------------------------------------------------------- */

extern "C" void ccr_cond_dev_free(ccr_cond_dev *d)
{
    if (d == NULL)
        return;
    if (d->gate_inited)
        d->gt->free(d->gstate);
    free(d->gstate);
    ccr_backend *be = d->be;
    float *fbufs[] = {d->xin, d->xg, d->hid, d->out, d->g_out, d->g_hid, d->g_x, d->dweights};
    for (size_t i = 0; i < sizeof fbufs / sizeof *fbufs; i++)
        ccr_backend_free_buffer(be, fbufs[i]);
    int32_t *ibufs[] = {d->src, d->pos, d->qmat, d->tiny};
    for (size_t i = 0; i < sizeof ibufs / sizeof *ibufs; i++)
        ccr_backend_free_buffer(be, ibufs[i]);
    ccr_backend_free_buffer(be, (void *)d->ptrs);
    ccr_backend_free_buffer(be, d->dots);
    ccr_backend_free_buffer(be, d->flag);
    void *hbufs[] = {d->h_ids, d->h_w, d->h_cnt, d->h_gid, d->h_goff, d->h_src, d->h_pos,
                     d->h_qmat, d->h_tiny, (void *)d->h_ptrs, d->h_m, d->h_n, d->h_k,
                     d->h_lda, d->h_ldb, d->h_ldc, d->h_one, d->h_alpha, d->h_beta, d->h_ta,
                     d->h_tb, d->h_dmat, d->h_drow};
    for (size_t i = 0; i < sizeof hbufs / sizeof *hbufs; i++)
        free(hbufs[i]);
    free(d);
}

/* Device buffer of n x size bytes, added to the workspace count. */
static ccr_status cd_dev(ccr_cond_dev *d, size_t n, size_t size, void **out)
{
    CCR_TRY(gdev_alloc(d->be, n, size, out));
    d->bytes += (n ? n : 1) * size; /* bounded: gdev_alloc checked the product */
    return CCR_OK;
}

static ccr_status cd_host(ccr_cond_dev *d, size_t n, size_t size, void **out)
{
    CCR_TRY(gdev_host_alloc(d->be, n, size, out));
    d->bytes += (n ? n : 1) * size; /* bounded: gdev_host_alloc checked the product */
    return CCR_OK;
}

static ccr_status cd_alloc_all(ccr_cond_dev *d)
{
    const ccr_cond_dev_shape *sh = &d->sh;
    size_t P = d->P, G = P < sh->n_mat ? P : sh->n_mat, P2, P3, BD;
    if (!ccr_mul_ok(P, 2, &P2) || !ccr_mul_ok(P, 3, &P3) ||
        !ccr_mul_ok(sh->max_batch, sh->d_in, &BD))
        CCR_FAIL(d->ctx, CCR_ENOMEM, "conditional layer: %zu routing slots overflow", P);
    size_t hh = sh->h ? sh->h : 1;
    CCR_TRY(cd_dev(d, BD, sizeof(float), (void **)&d->xin));
    CCR_TRY(cd_dev(d, P, sh->d_in * sizeof(float), (void **)&d->xg));
    CCR_TRY(cd_dev(d, P, sh->d_in * sizeof(float), (void **)&d->g_x));
    CCR_TRY(cd_dev(d, P, hh * sizeof(float), (void **)&d->hid));
    CCR_TRY(cd_dev(d, P, hh * sizeof(float), (void **)&d->g_hid));
    CCR_TRY(cd_dev(d, P, sh->d_out * sizeof(float), (void **)&d->out));
    CCR_TRY(cd_dev(d, P, sh->d_out * sizeof(float), (void **)&d->g_out));
    CCR_TRY(cd_dev(d, P, sizeof(float), (void **)&d->dweights));
    CCR_TRY(cd_dev(d, P, sizeof(int32_t), (void **)&d->src));
    CCR_TRY(cd_dev(d, P, sizeof(int32_t), (void **)&d->pos));
    CCR_TRY(cd_dev(d, P, sizeof(int32_t), (void **)&d->qmat));
    CCR_TRY(cd_dev(d, P2, sizeof(int32_t), (void **)&d->tiny));
    CCR_TRY(cd_dev(d, P3, sizeof(float *), (void **)&d->ptrs));
    CCR_TRY(cd_dev(d, P, sizeof(double), (void **)&d->dots));
    CCR_TRY(cd_dev(d, 1, sizeof(int), (void **)&d->flag));
    CCR_TRY(cd_host(d, P, sizeof(int32_t), (void **)&d->h_ids));
    CCR_TRY(cd_host(d, P, sizeof(float), (void **)&d->h_w));
    CCR_TRY(cd_host(d, sh->n_mat, sizeof(uint32_t), (void **)&d->h_cnt));
    memset(d->h_cnt, 0, sh->n_mat * sizeof *d->h_cnt);
    CCR_TRY(cd_host(d, G, sizeof(int32_t), (void **)&d->h_gid));
    CCR_TRY(cd_host(d, G + 1, sizeof(uint32_t), (void **)&d->h_goff));
    CCR_TRY(cd_host(d, P, sizeof(int32_t), (void **)&d->h_src));
    CCR_TRY(cd_host(d, P, sizeof(int32_t), (void **)&d->h_pos));
    CCR_TRY(cd_host(d, P, sizeof(int32_t), (void **)&d->h_qmat));
    CCR_TRY(cd_host(d, P2, sizeof(int32_t), (void **)&d->h_tiny));
    CCR_TRY(cd_host(d, P3, sizeof(float *), (void **)&d->h_ptrs));
    int **ints[] = {&d->h_m, &d->h_n, &d->h_k, &d->h_lda, &d->h_ldb, &d->h_ldc, &d->h_one};
    for (size_t i = 0; i < sizeof ints / sizeof *ints; i++)
        CCR_TRY(cd_host(d, P, sizeof(int), (void **)ints[i]));
    CCR_TRY(cd_host(d, P, sizeof(float), (void **)&d->h_alpha));
    CCR_TRY(cd_host(d, P, sizeof(float), (void **)&d->h_beta));
    CCR_TRY(cd_host(d, P, sizeof(cublasOperation_t), (void **)&d->h_ta));
    CCR_TRY(cd_host(d, P, sizeof(cublasOperation_t), (void **)&d->h_tb));
    CCR_TRY(cd_host(d, P, sizeof(size_t), (void **)&d->h_dmat));
    CCR_TRY(cd_host(d, P, sizeof(size_t), (void **)&d->h_drow));
    for (size_t i = 0; i < P; i++)
        d->h_one[i] = 1;
    return CCR_OK;
}

extern "C" ccr_status ccr_cond_dev_alloc(ccr_backend *be, ccr_gate *g,
                                         const ccr_cond_dev_shape *sh, ccr_cond_dev **out)
{
    const ccr_gate_dev_type *gt = ccr_gate_dev_find(ccr_gate_get_type(g));
    if (gt == NULL)
        CCR_FAIL(be->ctx, CCR_EUNSUP, "gate %s has no CUDA code",
                 ccr_gate_get_type(g) ? ccr_gate_get_type(g)->name : "(none)");
    const size_t lim = 2147483647;
    if (sh->d_in > lim || sh->d_out > lim || sh->h > lim)
        CCR_FAIL(be->ctx, CCR_EUNSUP, "cuBLAS sizes are int: d_in %zu, d_out %zu, hidden %zu",
                 sh->d_in, sh->d_out, sh->h);
    ccr_cond_dev *d = (ccr_cond_dev *)calloc(1, sizeof *d);
    if (d == NULL)
        CCR_FAIL(be->ctx, CCR_ENOMEM, "cannot allocate the layer's device half");
    d->be = be;
    d->ctx = be->ctx;
    d->gt = gt;
    d->sh = *sh;
    ccr_status s = CCR_OK;
    if (!ccr_mul_ok(sh->max_batch, sh->slots, &d->P) || d->P > (size_t)INT32_MAX)
        s = CCR_FAIL_EXPR(be->ctx, CCR_ENOMEM, "%zu x %zu routing slots exceed 2^31 - 1",
                          sh->max_batch, sh->slots);
    if (s == CCR_OK) {
        d->gstate = calloc(1, gt->state_size ? gt->state_size : 1);
        if (d->gstate == NULL)
            s = CCR_FAIL_EXPR(be->ctx, CCR_ENOMEM, "cannot allocate the gate's device state");
    }
    if (s == CCR_OK)
        s = cd_alloc_all(d);
    if (s == CCR_OK) {
        s = gt->init(d->gstate, be, g, sh->max_batch);
        d->gate_inited = s == CCR_OK;
    }
    if (s != CCR_OK) {
        ccr_cond_dev_free(d);
        return s;
    }
    *out = d;
    return CCR_OK;
}

extern "C" size_t ccr_cond_dev_memory_bytes(const ccr_cond_dev *d) { return d ? d->bytes : 0; }

extern "C" ccr_status ccr_cond_dev_bind(ccr_cond_dev *d, ccr_arena *a, const size_t p[4],
                                        const char *gate_prefix)
{
    if (d->arena == a && d->bound_values == ccr_arena_values(a))
        return CCR_OK;
    CCR_TRY(d->gt->bind(d->gstate, a, gate_prefix));
    d->arena = a;
    d->bound_values = ccr_arena_values(a);
    memcpy(d->p, p, sizeof d->p);
    return CCR_OK;
}

/* ---- the routed matmul --------------------------------------------------------- */

/* ids[0..G) in ascending order (insertion sort: the distinct ids of one
 * batch, found in pair order, are few and mostly in order already). */
static void cd_sort_ids(int32_t *ids, size_t G)
{
    for (size_t i = 1; i < G; i++) {
        int32_t v = ids[i];
        size_t j = i;
        for (; j > 0 && ids[j - 1] > v; j--)
            ids[j] = ids[j - 1];
        ids[j] = v;
    }
}

/* Stable counting sort of the used pairs of the host table h_ids[P] by id
 * (cond_sort): h_gid/h_goff, h_src/h_pos, h_qmat; the tiny groups' list. */
static ccr_status cd_sort(ccr_cond_dev *d, size_t P)
{
    uint32_t *cnt = d->h_cnt;
    const int32_t *ids = d->h_ids;
    size_t n = 0, G = 0, n_mat = d->sh.n_mat;
    for (size_t p = 0; p < P; p++) {
        int32_t id = ids[p];
        d->h_pos[p] = -1;
        if (id < 0)
            continue;
        if ((size_t)id >= n_mat) {
            for (size_t g = 0; g < G; g++)
                cnt[d->h_gid[g]] = 0;
            CCR_FAIL(d->ctx, CCR_EINVAL, "routing table names matrix %d of %zu", (int)id,
                     n_mat);
        }
        if (cnt[id]++ == 0)
            d->h_gid[G++] = id;
        n++;
    }
    /* Groups in ascending id: a scan of the counters when n_mat <= P, else
     * an insertion of the ids seen (G <= P stays small next to n_mat). */
    if (n_mat <= P) {
        G = 0;
        for (size_t m = 0; m < n_mat; m++)
            if (cnt[m] != 0)
                d->h_gid[G++] = (int32_t)m;
    } else {
        cd_sort_ids(d->h_gid, G);
    }
    uint32_t off = 0;
    for (size_t g = 0; g < G; g++) {
        uint32_t k = cnt[d->h_gid[g]];
        d->h_goff[g] = off;
        d->h_tiny[2 * g] = (int32_t)off;
        d->h_tiny[2 * g + 1] = (int32_t)k;
        cnt[d->h_gid[g]] = off;
        for (uint32_t q = off; q < off + k; q++)
            d->h_qmat[q] = d->h_gid[g];
        off += k;
    }
    d->h_goff[G] = off;
    for (size_t p = 0; p < P; p++) {
        int32_t id = ids[p];
        if (id < 0)
            continue;
        uint32_t q = cnt[id]++;
        d->h_src[q] = (int32_t)p;
        d->h_pos[p] = (int32_t)q;
    }
    for (size_t g = 0; g < G; g++)
        cnt[d->h_gid[g]] = 0;
    d->n_pairs = n;
    d->n_groups = G;
    return CCR_OK;
}

/* Uploads the sort: src, qmat and the (start, rows) list of every group
 * (n rows, G groups), and pos when npos > 0. */
static ccr_status cd_upload_sort(ccr_cond_dev *d, size_t n, size_t G, size_t npos)
{
    ccr_backend *be = d->be;
    if (n > 0) {
        CCR_TRY(ccr_backend_set(be, d->src, d->h_src, n * sizeof(int32_t)));
        CCR_TRY(ccr_backend_set(be, d->qmat, d->h_qmat, n * sizeof(int32_t)));
        CCR_TRY(ccr_backend_set(be, d->tiny, d->h_tiny, 2 * G * sizeof(int32_t)));
    }
    if (npos > 0)
        CCR_TRY(ccr_backend_set(be, d->pos, d->h_pos, npos * sizeof(int32_t)));
    return CCR_OK;
}

/* One operand of a per-group GEMM: the group's rows of a sorted buffer
 * (mat_stride 0: base + first row x ld) or its bank matrix (base + id x
 * mat_stride). */
typedef struct cd_opnd {
    const float *base;
    size_t ld, mat_stride;
} cd_opnd;

static const float *cd_at(const cd_opnd *o, size_t q0, int32_t id)
{
    return o->mat_stride ? o->base + (size_t)id * o->mat_stride : o->base + q0 * o->ld;
}

/* For every group g of G (first sorted row goff[g], rows cnt_g, matrix gid[g]):
 * C_g = op(A_g) op(B_g) + beta C_g, row-major, where the group's row count is
 * m (count_dim 0) or k (count_dim 2) and the other two sizes are fixed.
 * Groups of at least CD_TINY_ROWS rows (all of them when tiny_ok is false) go
 * to one cublasGemmGroupedBatchedEx call; the others, when tiny_ok (m counts,
 * no transposes, B a bank matrix), to cd_tiny_kernel. */
static ccr_status cd_gemm_groups(ccr_cond_dev *d, size_t G, bool ta, bool tb, int count_dim,
                                 size_t m, size_t n, size_t k, cd_opnd a, cd_opnd b, cd_opnd c,
                                 float beta, bool tiny_ok)
{
    ccr_backend *be = d->be;
    cudaStream_t st = gdev_stream(be);
    /* The host arrays below may still be read by the last call's launch. */
    CCR_CUDA_TRY(be, cudaStreamSynchronize(st));
    size_t nb = 0, nt = 0;
    for (size_t g = 0; g < G; g++) {
        size_t q0 = d->h_goff[g], rows = d->h_goff[g + 1] - q0;
        int32_t id = d->h_gid[g];
        if (tiny_ok && rows < CD_TINY_ROWS) {
            d->h_tiny[2 * nt] = (int32_t)q0;
            d->h_tiny[2 * nt + 1] = (int32_t)rows;
            nt++;
            continue;
        }
        size_t gm = count_dim == 0 ? rows : m, gk = count_dim == 2 ? rows : k;
        /* Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T. */
        d->h_ta[nb] = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
        d->h_tb[nb] = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
        d->h_m[nb] = (int)n;
        d->h_n[nb] = (int)gm;
        d->h_k[nb] = (int)gk;
        d->h_lda[nb] = (int)b.ld;
        d->h_ldb[nb] = (int)a.ld;
        d->h_ldc[nb] = (int)c.ld;
        d->h_alpha[nb] = 1.0f;
        d->h_beta[nb] = beta;
        d->h_ptrs[nb] = cd_at(&b, q0, id);
        d->h_ptrs[G + nb] = cd_at(&a, q0, id);
        d->h_ptrs[2 * G + nb] = cd_at(&c, q0, id);
        nb++;
    }
    if (nb > 0) {
        /* The pointer arrays: three runs of G entries (the first nb used). */
        CCR_TRY(ccr_backend_set(be, (void *)d->ptrs, d->h_ptrs, 3 * G * sizeof(float *)));
        CCR_CUBLAS_TRY(be, cublasGemmGroupedBatchedEx(
                               ccr_cuda(be)->cublas, d->h_ta, d->h_tb, d->h_m, d->h_n, d->h_k,
                               d->h_alpha, (const void *const *)d->ptrs, CUDA_R_32F, d->h_lda,
                               (const void *const *)(d->ptrs + G), CUDA_R_32F, d->h_ldb,
                               d->h_beta, (void *const *)(d->ptrs + 2 * G), CUDA_R_32F,
                               d->h_ldc, (int)nb, d->h_one, ccr_cuda(be)->compute));
    }
    if (nt > 0) {
        /* The tiny list overwrites the groups' (start, rows) list on the device;
         * callers needing it again re-upload (cd_upload_groups). */
        CCR_TRY(ccr_backend_set(be, d->tiny, d->h_tiny, 2 * nt * sizeof(int32_t)));
        dim3 grid((unsigned)nt, ccr_ceil_div(n, CD_BLOCK) < 64 ? ccr_ceil_div(n, CD_BLOCK) : 64);
        cd_tiny_kernel<<<grid, CD_BLOCK, 0, st>>>(d->tiny, d->qmat, a.base, a.ld, b.base,
                                                  b.mat_stride, b.ld, (float *)c.base, c.ld, n, k,
                                                  beta);
        CCR_CUDA_LAUNCHED(be);
    }
    return CCR_OK;
}

/* The (start, rows) list of all G groups, rebuilt on host and device. */
static ccr_status cd_upload_groups(ccr_cond_dev *d, size_t G)
{
    for (size_t g = 0; g < G; g++) {
        d->h_tiny[2 * g] = (int32_t)d->h_goff[g];
        d->h_tiny[2 * g + 1] = (int32_t)(d->h_goff[g + 1] - d->h_goff[g]);
    }
    return G ? ccr_backend_set(d->be, d->tiny, d->h_tiny, 2 * G * sizeof(int32_t)) : CCR_OK;
}

static bool cd_ffn(const ccr_cond_dev *d) { return d->sh.h > 0; }

/* out = M(xg) over the n sorted rows of the G groups (cond_apply): GEMMs, bias,
 * ReLU; hid kept for the backward. */
static ccr_status cd_apply_groups(ccr_cond_dev *d, size_t G, size_t n, const float *xg,
                                  float *hid, float *out)
{
    ccr_backend *be = d->be;
    cudaStream_t st = gdev_stream(be);
    const size_t d_in = d->sh.d_in, d_out = d->sh.d_out, h = d->sh.h;
    const ccr_arena *a = d->arena;
    if (cd_ffn(d)) {
        cd_opnd x = {xg, d_in, 0}, w1 = {ccr_arena_value(a, d->p[0]), h, d_in * h};
        cd_opnd hd = {hid, h, 0}, w2 = {ccr_arena_value(a, d->p[2]), d_out, h * d_out};
        cd_opnd o = {out, d_out, 0};
        CCR_TRY(cd_gemm_groups(d, G, false, false, 0, 0, h, d_in, x, w1, hd, 0.0f, true));
        cd_bias_act_kernel<<<ccr_grid(n * h, CD_BLOCK), CD_BLOCK, 0, st>>>(
            hid, ccr_arena_value(a, d->p[1]), d->qmat, n, h, true);
        CCR_CUDA_LAUNCHED(be);
        CCR_TRY(cd_gemm_groups(d, G, false, false, 0, 0, d_out, h, hd, w2, o, 0.0f, true));
        cd_bias_act_kernel<<<ccr_grid(n * d_out, CD_BLOCK), CD_BLOCK, 0, st>>>(
            out, ccr_arena_value(a, d->p[3]), d->qmat, n, d_out, false);
        CCR_CUDA_LAUNCHED(be);
        return CCR_OK;
    }
    cd_opnd x = {xg, d_in, 0}, w = {ccr_arena_value(a, d->p[0]), d_out, d_in * d_out};
    cd_opnd o = {out, d_out, 0};
    CCR_TRY(cd_gemm_groups(d, G, false, false, 0, 0, d_out, d_in, x, w, o, 0.0f, true));
    cd_bias_act_kernel<<<ccr_grid(n * d_out, CD_BLOCK), CD_BLOCK, 0, st>>>(
        out, ccr_arena_value(a, d->p[1]), d->qmat, n, d_out, false);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

extern "C" ccr_status ccr_cond_dev_forward(ccr_cond_dev *d, const float *x, size_t batch,
                                           bool train, gsl_rng *rng, float *y,
                                           ccr_route *route, ccr_gate_stats *stats,
                                           size_t *n_pairs)
{
    ccr_backend *be = d->be;
    cudaStream_t st = gdev_stream(be);
    const size_t d_in = d->sh.d_in, d_out = d->sh.d_out, S = d->sh.slots;
    d->batch = 0;
    size_t bad;
    CCR_TRY(gdev_find_nonfinite(be, x, batch * d_in, d->flag, &bad));
    if (bad != 0)
        CCR_FAIL(d->ctx, CCR_EDOM, "gate input holds NaN or infinity (element %zu)", bad - 1);
    CCR_CUDA_TRY(be, cudaMemcpyAsync(d->xin, x, batch * d_in * sizeof(float),
                                     cudaMemcpyDeviceToDevice, st));
    ccr_route r;
    ccr_gate_stats gs;
    memset(&gs, 0, sizeof gs);
    CCR_TRY(d->gt->forward(d->gstate, d->xin, batch, train, rng, &r, &gs));
    const size_t P = batch * S; /* <= max_batch x slots, checked at alloc */
    CCR_TRY(ccr_backend_get(be, d->h_ids, r.ids, P * sizeof(int32_t)));
    CCR_TRY(ccr_backend_get(be, d->h_w, r.weights, P * sizeof(float)));
    for (size_t k = 0; k < P; k++)
        if (d->h_ids[k] >= 0 && !isfinite(d->h_w[k]))
            CCR_FAIL(d->ctx, CCR_EDOM,
                     "gate %s: routing weight of example %zu slot %zu is %g (NaN or infinite "
                     "gate parameters?)", d->gt->host->name, k / S, k % S, (double)d->h_w[k]);

    /* 1. Sort the used pairs by id (stable), on the host. */
    CCR_TRY(cd_sort(d, P));
    const size_t n = d->n_pairs, G = d->n_groups;
    CCR_TRY(cd_upload_sort(d, n, G, P));
    /* 2. Gather, GEMMs, bias and ReLU. */
    if (n > 0) {
        cd_gather_kernel<<<ccr_grid(n * d_in, CD_BLOCK), CD_BLOCK, 0, st>>>(d->xin, d->src, S,
                                                                            n, d_in, d->xg);
        CCR_CUDA_LAUNCHED(be);
        CCR_TRY(cd_apply_groups(d, G, n, d->xg, d->hid, d->out));
    }
    /* 3. Combine in slot order (+ the residual). */
    cd_combine_kernel<<<ccr_grid(batch * d_out, CD_BLOCK), CD_BLOCK, 0, st>>>(
        d->out, d->pos, r.weights, d->sh.residual ? d->xin : NULL, batch, S, d_out, y);
    CCR_CUDA_LAUNCHED(be);
    d->route = r;
    d->batch = batch;
    route->batch = batch;
    route->slots = S;
    route->n_matrices = d->sh.n_mat;
    route->ids = d->h_ids;
    route->weights = d->h_w;
    gs.distinct = G;
    *stats = gs;
    *n_pairs = n;
    return CCR_OK;
}

/* ---- backward ------------------------------------------------------------------ */

/* out[i] = dy[row[i]] . M_mat[i](x[row[i]]) for n pairs, all device memory: the
 * device eval_dots (cond_eval_dots).  The pairs are downloaded, counting-sorted
 * by matrix on the host in chunks of P, and run through the forward's buffers
 * (free once the bank's backward is done). */
static ccr_status cd_eval_dots(void *bank, size_t n, const size_t *mat, const size_t *row,
                               const float *x, const float *dy, double *out)
{
    ccr_cond_dev *d = (ccr_cond_dev *)bank;
    ccr_backend *be = d->be;
    cudaStream_t st = gdev_stream(be);
    const size_t n_mat = d->sh.n_mat, cap = d->P;
    uint32_t *cnt = d->h_cnt;
    for (size_t p0 = 0; p0 < n; p0 += cap) {
        size_t k = n - p0 < cap ? n - p0 : cap;
        CCR_TRY(ccr_backend_get(be, d->h_dmat, mat + p0, k * sizeof(size_t)));
        CCR_TRY(ccr_backend_get(be, d->h_drow, row + p0, k * sizeof(size_t)));
        size_t G = 0;
        for (size_t i = 0; i < k; i++) {
            size_t m = d->h_dmat[i];
            if (m >= n_mat) {
                for (size_t g = 0; g < G; g++)
                    cnt[d->h_gid[g]] = 0;
                CCR_FAIL(d->ctx, CCR_EINVAL, "eval_dots: matrix %zu >= %zu", m, n_mat);
            }
            if (cnt[m]++ == 0)
                d->h_gid[G++] = (int32_t)m;
        }
        cd_sort_ids(d->h_gid, G); /* ascending id */
        uint32_t off = 0;
        for (size_t g = 0; g < G; g++) {
            uint32_t c = cnt[d->h_gid[g]];
            d->h_goff[g] = off;
            cnt[d->h_gid[g]] = off;
            for (uint32_t q = off; q < off + c; q++)
                d->h_qmat[q] = d->h_gid[g];
            off += c;
        }
        d->h_goff[G] = off;
        /* h_src: sorted -> pair index i within the chunk; h_pos: its row. */
        for (size_t i = 0; i < k; i++) {
            uint32_t q = cnt[d->h_dmat[i]]++;
            d->h_src[q] = (int32_t)i;
            d->h_pos[q] = (int32_t)d->h_drow[i];
        }
        for (size_t g = 0; g < G; g++)
            cnt[d->h_gid[g]] = 0;
        CCR_TRY(ccr_backend_set(be, d->src, d->h_src, k * sizeof(int32_t)));
        CCR_TRY(ccr_backend_set(be, d->pos, d->h_pos, k * sizeof(int32_t)));
        CCR_TRY(ccr_backend_set(be, d->qmat, d->h_qmat, k * sizeof(int32_t)));
        cd_gather_rows_kernel<<<ccr_grid(k * d->sh.d_in, CD_BLOCK), CD_BLOCK, 0, st>>>(
            x, d->pos, k, d->sh.d_in, d->xg);
        CCR_CUDA_LAUNCHED(be);
        CCR_TRY(cd_apply_groups(d, G, k, d->xg, d->hid, d->out));
        cd_dot_kernel<<<(unsigned)k, CD_BLOCK, 0, st>>>(dy, d->out, d->pos, d->src, d->sh.d_out,
                                                        out + p0);
        CCR_CUDA_LAUNCHED(be);
    }
    return CCR_OK;
}

extern "C" ccr_status ccr_cond_dev_backward(ccr_cond_dev *d, const float *dy, float *dx)
{
    ccr_backend *be = d->be;
    cudaStream_t st = gdev_stream(be);
    const ccr_arena *a = d->arena;
    const size_t d_in = d->sh.d_in, d_out = d->sh.d_out, h = d->sh.h, S = d->sh.slots;
    const size_t batch = d->batch, n = d->n_pairs, G = d->n_groups;
    /* The touched bank rows, in ascending id. */
    for (size_t g = 0; g < G; g++) {
        size_t m = (size_t)d->h_gid[g];
        for (size_t t = 0; t < (cd_ffn(d) ? 4u : 2u); t++)
            ccr_arena_touch_row(d->arena, d->p[t], m);
    }
    CCR_CUDA_TRY(be, cudaMemsetAsync(d->dweights, 0, batch * S * sizeof(float), st));
    if (n > 0) {
        /* The group list on the device (the forward's tiny path replaced it). */
        CCR_TRY(cd_upload_groups(d, G));
        cd_gout_kernel<<<(unsigned)n, CD_BLOCK, 0, st>>>(dy, d->out, d->route.weights, d->src,
                                                         S, d_out, d->g_out, d->dweights);
        CCR_CUDA_LAUNCHED(be);
        cd_colsum_kernel<<<cd_colsum_grid(d_out, G), CD_BLOCK, 0, st>>>(d->g_out, d->qmat,
                                                                         d->tiny, G, d_out,
                                                  ccr_arena_grad(a, cd_ffn(d) ? d->p[3]
                                                                              : d->p[1]));
        CCR_CUDA_LAUNCHED(be);
        cd_opnd xg = {d->xg, d_in, 0}, go = {d->g_out, d_out, 0}, gx = {d->g_x, d_in, 0};
        if (cd_ffn(d)) {
            cd_opnd hid = {d->hid, h, 0}, ghid = {d->g_hid, h, 0};
            cd_opnd w1 = {ccr_arena_value(a, d->p[0]), h, d_in * h};
            cd_opnd w2 = {ccr_arena_value(a, d->p[2]), d_out, h * d_out};
            cd_opnd dw1 = {ccr_arena_grad(a, d->p[0]), h, d_in * h};
            cd_opnd dw2 = {ccr_arena_grad(a, d->p[2]), d_out, h * d_out};
            /* dW2 += hid^T g_out; g_hid = g_out W2^T; ReLU'; db1; dW1 += xg^T g_hid;
             * g_x = g_hid W1^T (cond_group_bwd's order). */
            CCR_TRY(cd_gemm_groups(d, G, true, false, 2, h, d_out, 0, hid, go, dw2, 1.0f,
                                   false));
            CCR_TRY(cd_gemm_groups(d, G, false, true, 0, 0, h, d_out, go, w2, ghid, 0.0f,
                                   false));
            cd_relu_bwd_kernel<<<ccr_grid(n * h, CD_BLOCK), CD_BLOCK, 0, st>>>(d->g_hid,
                                                                              d->hid, n * h);
            CCR_CUDA_LAUNCHED(be);
            cd_colsum_kernel<<<cd_colsum_grid(h, G), CD_BLOCK, 0, st>>>(
                d->g_hid, d->qmat, d->tiny, G, h, ccr_arena_grad(a, d->p[1]));
            CCR_CUDA_LAUNCHED(be);
            CCR_TRY(cd_gemm_groups(d, G, true, false, 2, d_in, h, 0, xg, ghid, dw1, 1.0f,
                                   false));
            if (dx != NULL)
                CCR_TRY(cd_gemm_groups(d, G, false, true, 0, 0, d_in, h, ghid, w1, gx, 0.0f,
                                       false));
        } else {
            cd_opnd w = {ccr_arena_value(a, d->p[0]), d_out, d_in * d_out};
            cd_opnd dw = {ccr_arena_grad(a, d->p[0]), d_out, d_in * d_out};
            CCR_TRY(cd_gemm_groups(d, G, true, false, 2, d_in, d_out, 0, xg, go, dw, 1.0f,
                                   false));
            if (dx != NULL)
                CCR_TRY(cd_gemm_groups(d, G, false, true, 0, 0, d_in, d_out, go, w, gx, 0.0f,
                                       false));
        }
    }
    if (dx != NULL) {
        cd_combine_kernel<<<ccr_grid(batch * d_in, CD_BLOCK), CD_BLOCK, 0, st>>>(
            d->g_x, d->pos, NULL, d->sh.residual ? dy : NULL, batch, S, d_in, dx);
        CCR_CUDA_LAUNCHED(be);
    }
    ccr_gate_bwd_args ga;
    memset(&ga, 0, sizeof ga);
    ga.x = d->xin;
    ga.batch = batch;
    ga.dweights = d->dweights;
    ga.dx = dx;
    ga.dy = dy;
    ga.d_out = d_out;
    ga.bank = d;
    ga.eval_dots = cd_eval_dots;
    return d->gt->backward(d->gstate, &ga);
}
