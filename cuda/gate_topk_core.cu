/*
 * gate_topk_core.cu - the device half of src/gate_topk_core.c: noisy top-k
 * gating of many rows at once (Shazeer et al. 2017, eqs. 4-9, t2t's
 * thresholds), shared by the topk and hmoe device gates.
 *
 * Each kernel mirrors a part of tk_core_row_forward_drawn or
 * tk_core_row_backward and keeps its arithmetic: the same double/float
 * conversions, the same formulas (softplus and sigmoid from one exp,
 * P = erfc(-u / sqrt 2) / 2 through gdev_normal_cdf), and the CPU's
 * unfused a + b c where it feeds the routing or a sequential sum (the CPU
 * build is ISO C without FMA contraction; nvcc would fuse).  Sums the CPU
 * does in index order are done in index order by one thread.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gate_topk_core.cuh"

#define TKD_BLOCK 256
#define TKD_ROW_BLOCK 64   /* one thread per row (small blocks: more SMs for few rows) */
#define TKD_WARPS 4        /* warps per block of the warp-per-row kernels */

/* 1/sqrt(2 pi), the standard normal density at 0 (TK_INV_SQRT_2PI). */
#define TKD_INV_SQRT_2PI 0.39894228040143267794

/* ---- kernels: forward ---------------------------------------------------- */

/* The first loop of tk_core_row_forward_drawn over every entry of the rows:
 * train: std = max(x, 0) + log1p(e) + eps and sig = (x >= 0 ? 1 : e) /
 * (1 + e), e = exp(-|x|), x = raw; H = clean + noise std from the float std.
 * Eval: std = noise = 0, H = clean.  Clears in_top when the forward is
 * smooth (tk_mark_top's memset; the row kernel marks after). */
static __global__ void tkd_noisy_kernel(const float *clean, const float *raw, float *std,
                                        double *sig, float *noise, float *h,
                                        unsigned char *in_top, size_t total, double eps,
                                        bool train, bool smooth)
{
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        if (train) {
            const double x = (double)raw[t];
            const double e = exp(-fabs(x));
            const float sd = (float)((x > 0.0 ? x : 0.0) + log1p(e) + eps);
            std[t] = sd;
            sig[t] = (x >= 0.0 ? 1.0 : e) / (1.0 + e);
            /* Unfused: a fused multiply-add could round H differently from
             * the CPU and change the top k. */
            h[t] = (float)__dadd_rn((double)clean[t], __dmul_rn((double)noise[t], (double)sd));
        } else {
            std[t] = 0.0f;
            noise[t] = 0.0f;
            h[t] = clean[t];
        }
        if (smooth)
            in_top[t] = 0;
    }
}

/* gate_topk on one row, the same insertion: for i in order, an entry enters
 * only if strictly greater than the current last, and moves up only past
 * strictly smaller entries, so ties keep the lower index first (and a NaN is
 * handled exactly as on the CPU).  thr caches v[idx[k - 1]] once k are held. */
static __device__ void tkd_topk_row(const float *v, size_t n, size_t k, int32_t *idx)
{
    size_t have = 0;
    float thr = 0.0f;
    for (size_t i = 0; i < n; i++) {
        const float vi = v[i];
        if (have == k && !(vi > thr))
            continue;
        size_t pos = have < k ? have : k - 1;
        while (pos > 0 && vi > v[idx[pos - 1]]) {
            idx[pos] = idx[pos - 1];
            pos--;
        }
        idx[pos] = (int32_t)i;
        if (have < k)
            have++;
        if (have == k)
            thr = v[idx[k - 1]];
    }
}

/* One thread per row: top (gate_topk over ntop), the gates (gate_softmax
 * over H[top[0..k)]: float max, double sum of exp(z - m), p = exp(z - m) /
 * sum) and, when smooth, the marks of the top k in in_top (tk_mark_top). */
static __global__ void tkd_row_kernel(const float *h, int32_t *tops, float *gates,
                                      unsigned char *in_top, size_t rows, size_t n, size_t k,
                                      size_t ntop, bool smooth)
{
    for (size_t r = blockIdx.x * (size_t)blockDim.x + threadIdx.x; r < rows;
         r += (size_t)gridDim.x * blockDim.x) {
        const float *hr = h + r * n;
        int32_t *top = tops + r * ntop;
        tkd_topk_row(hr, n, ntop, top);
        float m = hr[top[0]];
        for (size_t s = 1; s < k; s++)
            m = hr[top[s]] > m ? hr[top[s]] : m;
        double sum = 0.0;
        for (size_t s = 0; s < k; s++)
            sum += exp((double)hr[top[s]] - (double)m);
        float *g = gates + r * k;
        for (size_t s = 0; s < k; s++)
            g[s] = (float)(exp((double)hr[top[s]] - (double)m) / sum);
        if (smooth)
            for (size_t s = 0; s < k; s++)
                in_top[r * n + (size_t)top[s]] = 1;
    }
}

/* One warp per row: lse = m + log(sum exp(z - m)) over the row's clean
 * logits (gate_logsumexp).  The max is exact in any order; the sum runs per
 * lane over i = lane, lane + 32, ... in order, then through a fixed xor
 * tree: the same every run, the CPU's sequential sum to double rounding.
 * The row index is the same for the whole warp, so the shuffles see every
 * lane. */
static __global__ void tkd_lse_kernel(const float *clean, double *lse, size_t rows, size_t n)
{
    const unsigned lane = threadIdx.x % 32;
    const size_t warp = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32;
    const size_t nwarps = (size_t)gridDim.x * blockDim.x / 32;
    for (size_t r = warp; r < rows; r += nwarps) {
        const float *z = clean + r * n;
        double m = -INFINITY;
        for (size_t i = lane; i < n; i += 32)
            m = (double)z[i] > m ? (double)z[i] : m;
        for (int o = 16; o > 0; o /= 2) {
            const double mo = __shfl_xor_sync(0xffffffffu, m, o);
            m = mo > m ? mo : m;
        }
        double s = 0.0;
        for (size_t i = lane; i < n; i += 32)
            s += exp((double)z[i] - m);
        for (int o = 16; o > 0; o /= 2)
            s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0)
            lse[r] = m + log(s);
    }
}

/* The threshold entry of entry i (tk_thr_index, eq. 9): the (k+1)-th
 * largest H if i is in the top k, else the k-th. */
static __device__ __forceinline__ size_t tkd_thr_index(const int32_t *top,
                                                       const unsigned char *in_top_row,
                                                       size_t k, size_t i)
{
    return (size_t)(in_top_row[i] ? top[k] : top[k - 1]);
}

/* The smooth load of every entry (the last loop of
 * tk_core_row_forward_drawn): P = Phi((clean - thr) / std), or a step when
 * std is 0. */
static __global__ void tkd_load_kernel(const float *clean, const float *std, const float *h,
                                       const int32_t *tops, const unsigned char *in_top,
                                       double *p, size_t total, size_t n, size_t k, size_t ntop)
{
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t r = t / n, i = t % n;
        const int32_t *top = tops + r * ntop;
        const double thr = (double)h[r * n + tkd_thr_index(top, in_top + r * n, k, i)];
        const double diff = (double)clean[t] - thr;
        if (std[t] > 0.0f)
            p[t] = gdev_normal_cdf(diff / (double)std[t]);
        else /* noise scale underflowed (noise_eps = 0): a step, no gradient */
            p[t] = diff > 0.0 ? 1.0 : (diff < 0.0 ? 0.0 : 0.5);
    }
}

/* ---- kernels: backward --------------------------------------------------- */

/* Whether entry i of a row takes a load gradient (tk_core_row_backward's
 * `if (dload[i] == 0.0 || !(std[i] > 0.0f)) continue;`). */
static __device__ __forceinline__ bool tkd_load_used(double dl, float sd)
{
    return !(dl == 0.0 || !(sd > 0.0f));
}

/* Per entry: dh = 0 (the row's memset) and, when the load gradient is on,
 * tload = t = dload (phi(u) / std), u = (clean - H_thr) / std, the term
 * the CPU adds to dclean and subtracts from dh[thr] (0 where it skips). */
static __global__ void tkd_bwd_load_kernel(const float *clean, const float *std, const float *h,
                                           const int32_t *tops, const unsigned char *in_top,
                                           const double *dload, const int32_t *sel,
                                           float *dh, double *tload, size_t total, size_t n,
                                           size_t k, size_t ntop, bool use_load)
{
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        dh[t] = 0.0f;
        if (!use_load)
            continue;
        const size_t r = t / n, i = t % n;
        const double *dl = dload + (sel != NULL ? (size_t)sel[r] * n : 0);
        double tt = 0.0;
        if (tkd_load_used(dl[i], std[t])) {
            const size_t j = tkd_thr_index(tops + r * ntop, in_top + r * n, k, i);
            const double s = (double)std[t];
            const double u = ((double)clean[t] - (double)h[r * n + j]) / s;
            tt = dl[i] * (TKD_INV_SQRT_2PI * exp(-0.5 * u * u)) / s;
        }
        tload[t] = tt;
    }
}

/* One thread per row, the sequential float updates of dh in the CPU's
 * order: the softmax backward over the kept k (gate_softmax_backward into
 * the zeroed c->dg, then dh[top[s]] += dg[s]), then, for i in index order,
 * dh[thr(i)] -= (float)t_i (the threshold entries collect many terms, so
 * the order matters to float rounding). */
static __global__ void tkd_bwd_row_kernel(const float *gates, const float *dg,
                                          const int32_t *tops, const unsigned char *in_top,
                                          const float *std, const double *dload,
                                          const int32_t *sel, const double *tload, float *dh,
                                          size_t rows, size_t n, size_t k, size_t ntop,
                                          bool use_load)
{
    for (size_t r = blockIdx.x * (size_t)blockDim.x + threadIdx.x; r < rows;
         r += (size_t)gridDim.x * blockDim.x) {
        const int32_t *top = tops + r * ntop;
        float *dhr = dh + r * n;
        if (dg != NULL) {
            const float *p = gates + r * k, *dp = dg + r * k;
            double dot = 0.0;
            for (size_t s = 0; s < k; s++)
                dot = __dadd_rn(dot, __dmul_rn((double)p[s], (double)dp[s]));
            for (size_t s = 0; s < k; s++) {
                float dz = 0.0f;
                dz += (float)((double)p[s] * ((double)dp[s] - dot));
                dhr[top[s]] += dz;
            }
        }
        if (use_load) {
            const double *dl = dload + (sel != NULL ? (size_t)sel[r] * n : 0);
            const float *sd = std + r * n;
            const unsigned char *it = in_top + r * n;
            const double *tl = tload + r * n;
            for (size_t i = 0; i < n; i++)
                if (tkd_load_used(dl[i], sd[i]))
                    dhr[tkd_thr_index(top, it, k, i)] -= (float)tl[i];
        }
    }
}

/* Per entry, the rest of tk_core_row_backward in its order:
 * dclean = ((0 + (float)t) + (float)(z-loss term)) + dh, and in train
 * draw = (float)((0 - t u + dh noise) sig). */
static __global__ void tkd_bwd_out_kernel(const float *clean, const float *std, const float *h,
                                          const float *noise, const double *sig,
                                          const int32_t *tops, const unsigned char *in_top,
                                          const double *dload, const int32_t *sel,
                                          const double *tload, const double *lse,
                                          const float *dh, float *dclean, float *draw,
                                          size_t total, size_t n, size_t k, size_t ntop,
                                          bool use_load, double zcoef, bool train)
{
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t r = t / n, i = t % n;
        float dc = 0.0f;
        bool used = false;
        double tt = 0.0, u = 0.0;
        if (use_load) {
            const double *dl = dload + (sel != NULL ? (size_t)sel[r] * n : 0);
            if (tkd_load_used(dl[i], std[t])) {
                used = true;
                const size_t j = tkd_thr_index(tops + r * ntop, in_top + r * n, k, i);
                /* u as the first pass computed it (the same expression) */
                u = ((double)clean[t] - (double)h[r * n + j]) / (double)std[t];
                tt = tload[t];
                dc += (float)tt;
            }
        }
        if (zcoef != 0.0) {
            const double g = 2.0 * zcoef * lse[r];
            dc += (float)(g * exp((double)clean[t] - lse[r]));
        }
        dc += dh[t];
        dclean[t] = dc;
        if (train) {
            double dstd = 0.0;
            if (used)
                dstd = __dsub_rn(dstd, __dmul_rn(tt, u));
            dstd = __dadd_rn(dstd, __dmul_rn((double)dh[t], (double)noise[t]));
            draw[t] = (float)(dstd * sig[t]);
        }
    }
}

/* ---- kernels: batch sums ------------------------------------------------- */

static __global__ void tkd_colsum_d_kernel(const double *src, size_t rows, size_t cols,
                                           size_t ld, double *dst)
{
    for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < cols;
         j += (size_t)gridDim.x * blockDim.x) {
        double acc = 0.0;
        for (size_t r = 0; r < rows; r++)
            acc += src[r * ld + j];
        dst[j] = acc;
    }
}

/* One thread per matrix; every thread of a warp reads the same table entry
 * at the same time (a broadcast). */
static __global__ void tkd_route_sums_kernel(const int32_t *ids, const float *weights,
                                             size_t n_entries, size_t n_matrices, double *imp,
                                             double *counts)
{
    for (size_t m = blockIdx.x * (size_t)blockDim.x + threadIdx.x; m < n_matrices;
         m += (size_t)gridDim.x * blockDim.x) {
        double acc = 0.0, cnt = 0.0;
        for (size_t e = 0; e < n_entries; e++)
            if (ids[e] >= 0 && (size_t)ids[e] == m) {
                acc += (double)weights[e];
                cnt += 1.0;
            }
        imp[m] = acc;
        counts[m] = cnt;
    }
}

/* ---- host side ------------------------------------------------------------ */

ccr_status tkd_core_init(tkd_core *c, ccr_backend *be, size_t rows, size_t n, size_t k,
                         double noise_eps)
{
    memset(c, 0, sizeof *c);
    size_t rn, rk, rt;
    if (k == 0 || k > n)
        CCR_FAIL(be->ctx, CCR_EINVAL, "gate: k = %zu not in 1..%zu", k, n);
    const size_t ntop = k < n ? k + 1 : k;
    if (!ccr_mul_ok(rows, n, &rn) || !ccr_mul_ok(rn, sizeof(double), &rt) ||
        !ccr_mul_ok(rows, ntop, &rk) || n > (size_t)INT32_MAX)
        CCR_FAIL(be->ctx, CCR_EINVAL, "gate buffers of %zu x %zu entries overflow", rows, n);
    c->be = be;
    c->rows = rows;
    c->n = n;
    c->k = k;
    c->ntop = ntop;
    c->noise_eps = noise_eps;
    c->want_lse = true;
    ccr_status st = CCR_OK;
    c->clean = (float *)tkd_dev_buf(&st, be, rn, sizeof(float));
    c->raw = (float *)tkd_dev_buf(&st, be, rn, sizeof(float));
    c->std = (float *)tkd_dev_buf(&st, be, rn, sizeof(float));
    c->sig = (double *)tkd_dev_buf(&st, be, rn, sizeof(double));
    c->noise = (float *)tkd_dev_buf(&st, be, rn, sizeof(float));
    c->h = (float *)tkd_dev_buf(&st, be, rn, sizeof(float));
    c->top = (int32_t *)tkd_dev_buf(&st, be, rk, sizeof(int32_t));
    c->gates = (float *)tkd_dev_buf(&st, be, rows, k * sizeof(float)); /* k <= n: no overflow */
    c->p = (double *)tkd_dev_buf(&st, be, rn, sizeof(double));
    c->lse = (double *)tkd_dev_buf(&st, be, rows, sizeof(double));
    c->in_top = (unsigned char *)tkd_dev_buf(&st, be, rn, 1);
    c->dclean = (float *)tkd_dev_buf(&st, be, rn, sizeof(float));
    c->draw = (float *)tkd_dev_buf(&st, be, rn, sizeof(float));
    c->dh = (float *)tkd_dev_buf(&st, be, rn, sizeof(float));
    c->tload = (double *)tkd_dev_buf(&st, be, rn, sizeof(double));
    if (st != CCR_OK) {
        tkd_core_free(c);
        return st;
    }
    return CCR_OK;
}

void tkd_core_free(tkd_core *c)
{
    ccr_backend *be = c->be;
    if (be != NULL) {
        void *bufs[] = {c->clean, c->raw,   c->std,    c->sig,    c->noise,
                        c->h,     c->top,   c->gates,  c->p,      c->lse,
                        c->in_top, c->dclean, c->draw, c->dh,     c->tload};
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
            ccr_backend_free_buffer(be, bufs[i]);
    }
    memset(c, 0, sizeof *c);
}

ccr_status tkd_core_forward(tkd_core *c, size_t nrows, bool train)
{
    ccr_backend *be = c->be;
    cudaStream_t st = gdev_stream(be);
    const size_t n = c->n, k = c->k, total = nrows * n; /* nrows <= rows: allocated */
    const bool smooth = tkd_core_smooth(c, train);
    if (nrows == 0)
        return CCR_OK;
    tkd_noisy_kernel<<<ccr_grid(total, TKD_BLOCK), TKD_BLOCK, 0, st>>>(
        c->clean, c->raw, c->std, c->sig, c->noise, c->h, c->in_top, total, c->noise_eps, train,
        smooth);
    CCR_CUDA_LAUNCHED(be);
    tkd_row_kernel<<<ccr_grid(nrows, TKD_ROW_BLOCK), TKD_ROW_BLOCK, 0, st>>>(
        c->h, c->top, c->gates, c->in_top, nrows, n, k, c->ntop, smooth);
    CCR_CUDA_LAUNCHED(be);
    if (c->want_lse) {
        tkd_lse_kernel<<<ccr_grid(nrows, TKD_WARPS), 32 * TKD_WARPS, 0, st>>>(c->clean, c->lse,
                                                                             nrows, n);
        CCR_CUDA_LAUNCHED(be);
    } else {
        CCR_CUDA_TRY(be, cudaMemsetAsync(c->lse, 0, nrows * sizeof(double), st));
    }
    if (smooth) {
        tkd_load_kernel<<<ccr_grid(total, TKD_BLOCK), TKD_BLOCK, 0, st>>>(
            c->clean, c->std, c->h, c->top, c->in_top, c->p, total, n, k, c->ntop);
        CCR_CUDA_LAUNCHED(be);
    }
    return CCR_OK;
}

ccr_status tkd_core_backward(tkd_core *c, size_t nrows, bool train, const float *dg,
                             const double *dload, const int32_t *sel, double zcoef)
{
    ccr_backend *be = c->be;
    cudaStream_t st = gdev_stream(be);
    const size_t n = c->n, k = c->k, ntop = c->ntop, total = nrows * n;
    const bool use_load = dload != NULL && tkd_core_smooth(c, train);
    if (nrows == 0)
        return CCR_OK;
    tkd_bwd_load_kernel<<<ccr_grid(total, TKD_BLOCK), TKD_BLOCK, 0, st>>>(
        c->clean, c->std, c->h, c->top, c->in_top, dload, sel, c->dh, c->tload, total, n, k,
        ntop, use_load);
    CCR_CUDA_LAUNCHED(be);
    if (dg != NULL || use_load) {
        tkd_bwd_row_kernel<<<ccr_grid(nrows, TKD_ROW_BLOCK), TKD_ROW_BLOCK, 0, st>>>(
            c->gates, dg, c->top, c->in_top, c->std, dload, sel, c->tload, c->dh, nrows, n, k,
            ntop, use_load);
        CCR_CUDA_LAUNCHED(be);
    }
    tkd_bwd_out_kernel<<<ccr_grid(total, TKD_BLOCK), TKD_BLOCK, 0, st>>>(
        c->clean, c->std, c->h, c->noise, c->sig, c->top, c->in_top, dload, sel, c->tload,
        c->lse, c->dh, c->dclean, c->draw, total, n, k, ntop, use_load, zcoef, train);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

ccr_status tkd_colsum_d(ccr_backend *be, const double *src, size_t rows, size_t cols, size_t ld,
                        double *dst)
{
    if (cols == 0)
        return CCR_OK;
    tkd_colsum_d_kernel<<<ccr_grid(cols, TKD_ROW_BLOCK), TKD_ROW_BLOCK, 0, gdev_stream(be)>>>(
        src, rows, cols, ld, dst);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

ccr_status tkd_route_sums(ccr_backend *be, const int32_t *ids, const float *weights,
                          size_t batch, size_t slots, size_t n_matrices, double *imp,
                          double *counts)
{
    if (n_matrices == 0)
        return CCR_OK;
    tkd_route_sums_kernel<<<ccr_grid(n_matrices, TKD_ROW_BLOCK), TKD_ROW_BLOCK, 0,
                            gdev_stream(be)>>>(ids, weights, batch * slots, n_matrices, imp,
                                               counts);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

ccr_status tkd_check_weights(ccr_backend *be, const char *gate, const float *weights,
                             size_t batch, size_t slots, int *flag)
{
    size_t bad;
    CCR_TRY(gdev_find_nonfinite(be, weights, batch * slots, flag, &bad));
    if (bad == 0)
        return CCR_OK;
    const size_t at = bad - 1;
    float w = 0.0f;
    CCR_TRY(ccr_backend_get(be, &w, weights + at, sizeof w));
    CCR_FAIL(be->ctx, CCR_EDOM,
             "gate %s: routing weight of example %zu slot %zu is %g (NaN or infinite gate "
             "parameters?)", gate, at / slots, at % slots, (double)w);
}
