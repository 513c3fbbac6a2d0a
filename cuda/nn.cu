/*
 * nn.cu - CUDA kernels of the dense layers, the loss and the optimisers, and
 * the cuBLAS GEMM: the CUDA entries of the kernel table.  Each mirrors the
 * reference in src/ref/ and is checked against it in tests/test_cuda.c.
 *
 * Row-major GEMM through column-major cuBLAS: C = op(A) op(B) in row-major is
 * C^T = op(B)^T op(A)^T in column-major, i.e. cublasSgemm with the operands
 * swapped and the same transpose flags.
 */
#include <float.h>
#include <math.h>

#include "cuda_common.cuh"  // provides: CCR_CUDA_TRY, ccr_cuda, ccr_grid

// ---------------------------------------------------------------------------
// kernels

__global__ void bias_add_kernel(float *y, const float *bias, size_t rows, size_t cols)
{
    size_t n = rows * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] += bias[i % cols];
}

/* Column sums: a block of 32 x BG_ROWS threads covers 32 adjacent columns
 * (coalesced reads); its BG_ROWS row groups stride over the rows, then the
 * partial sums are added in shared memory, all in double.  The order differs
 * from the reference's sequential sum; the parity test bounds the
 * difference. */
#define BG_ROWS 8
__global__ void bias_grad_kernel(float *db, const float *dy, size_t rows, size_t cols)
{
    __shared__ double part[BG_ROWS][32];
    size_t c = blockIdx.x * (size_t)32 + threadIdx.x;
    double acc = 0.0;
    if (c < cols)
        for (size_t r = threadIdx.y; r < rows; r += BG_ROWS)
            acc += dy[r * cols + c];
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        for (int i = 1; i < BG_ROWS; i++)
            acc += part[i][threadIdx.x];
        db[c] += (float)acc;
    }
}

__global__ void act_fwd_kernel(int act, const float *x, float *y, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = x[i];
        switch (act) {
        case CCR_ACT_RELU: v = v > 0.0f ? v : 0.0f; break;
        case CCR_ACT_TANH: v = tanhf(v); break;
        case CCR_ACT_SIGMOID:
            if (v >= 0.0f) {
                v = 1.0f / (1.0f + expf(-v));
            } else {
                float e = expf(v);
                v = e / (1.0f + e);
            }
            break;
        default: break;
        }
        y[i] = v;
    }
}

__global__ void act_bwd_kernel(int act, const float *y, const float *dy, float *dx, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float g = dy[i], v = y[i];
        switch (act) {
        case CCR_ACT_RELU: g = v > 0.0f ? g : 0.0f; break;
        case CCR_ACT_TANH: g = g * (1.0f - v * v); break;
        case CCR_ACT_SIGMOID: g = g * v * (1.0f - v); break;
        default: break;
        }
        dx[i] = g;
    }
}

/* One warp per row: max, sum of exp in double, loss, first argmax, gradient. */
__global__ void softmax_xent_kernel(const float *logits, const int *labels, size_t rows,
                                    size_t cols, float scale, float *loss, int *correct,
                                    float *dlogits)
{
    size_t r = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32;
    unsigned lane = threadIdx.x % 32;
    if (r >= rows)
        return;
    const float *z = logits + r * cols;
    float zmax = -INFINITY;
    size_t arg = cols;
    for (size_t c = lane; c < cols; c += 32) {
        if (z[c] > zmax) {
            zmax = z[c];
            arg = c;
        }
    }
    /* Reduce to the maximum, ties to the lowest index (the first argmax). */
    for (int off = 16; off > 0; off /= 2) {
        float om = __shfl_xor_sync(0xffffffffu, zmax, off);
        size_t oa = __shfl_xor_sync(0xffffffffu, (unsigned long long)arg, off);
        if (om > zmax || (om == zmax && oa < arg)) {
            zmax = om;
            arg = oa;
        }
    }
    bool finite = true;
    for (size_t c = lane; c < cols; c += 32)
        finite = finite && isfinite(z[c]);
    finite = __all_sync(0xffffffffu, finite);
    double sum = 0.0;
    for (size_t c = lane; c < cols; c += 32)
        sum += exp((double)z[c] - (double)zmax);
    for (int off = 16; off > 0; off /= 2)
        sum += __shfl_xor_sync(0xffffffffu, sum, off);
    size_t y = (size_t)labels[r];
    double lse = (double)zmax + log(sum);
    float zy = z[y];
    __syncwarp();
    if (lane == 0) {
        loss[r] = (float)(lse - (double)zy);
        /* A row with NaN or infinity predicts nothing (as src/ref/nn_ref.c). */
        correct[r] = arg == y && finite;
    }
    if (dlogits != NULL) {
        float *d = dlogits + r * cols;
        for (size_t c = lane; c < cols; c += 32) {
            double p = exp((double)z[c] - lse);
            float g = (float)((double)scale * (p - (c == y ? 1.0 : 0.0)));
            d[c] = fabsf(g) < FLT_MIN ? 0.0f : g; /* as src/ref/nn_ref.c */
        }
    }
}

/* One element of an SGD update (as src/ref/optim_ref.c): sgd_kernel and
 * sgd_ranges_kernel share it, so a range updates as the whole block does. */
__device__ __forceinline__ void sgd_elem(float *w, const float *g, float *v, size_t i,
                                         float lr, float mu, float wd)
{
    float gi = g[i] + wd * w[i];
    if (mu != 0.0f) {
        float vi = mu * v[i] + gi;
        v[i] = fabsf(vi) < FLT_MIN ? 0.0f : vi; /* as src/ref/optim_ref.c */
        gi = v[i];
    }
    w[i] -= lr * gi;
}

__global__ void sgd_kernel(float *w, const float *g, float *v, size_t n, float lr, float mu,
                           float wd)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        sgd_elem(w, g, v, i, lr, mu, wd);
}

/* The ranges kernels: range blockIdx.y of rg, its len floats over the
 * x-blocks. */
__global__ void sgd_ranges_kernel(float *w, const float *g, float *v, const ccr_cuda_range *rg,
                                  size_t len, float lr, float mu, float wd)
{
    const size_t o = rg[blockIdx.y].off;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x)
        sgd_elem(w + o, g + o, v ? v + o : NULL, i, lr, mu, wd);
}

__global__ void zero_ranges_kernel(float *x, const ccr_cuda_range *rg, size_t len)
{
    float *p = x + rg[blockIdx.y].off;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x)
        p[i] = 0.0f;
}

/* One element of an Adam update (as src/ref/optim_ref.c), shared by
 * adam_kernel and adam_ranges_kernel. */
__device__ __forceinline__ void adam_elem(float *w, const float *g, float *m, float *v, size_t i,
                                          float lr, float b1, float b2, float eps, float wd,
                                          double c1, double c2)
{
    float gi = g[i] + wd * w[i];
    float mi = b1 * m[i] + (1.0f - b1) * gi, vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    m[i] = fabsf(mi) < FLT_MIN ? 0.0f : mi; /* as src/ref/optim_ref.c */
    v[i] = vi < FLT_MIN ? 0.0f : vi;
    double mhat = m[i] / c1, vhat = v[i] / c2;
    w[i] -= (float)((double)lr * mhat / (sqrt(vhat) + (double)eps));
}

__global__ void adam_kernel(float *w, const float *g, float *m, float *v, size_t n, float lr,
                            float b1, float b2, float eps, float wd, double c1, double c2)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        adam_elem(w, g, m, v, i, lr, b1, b2, eps, wd, c1, c2);
}

__global__ void adam_ranges_kernel(float *w, const float *g, float *m, float *v,
                                   const ccr_cuda_range *rg, size_t len, float lr, float b1,
                                   float b2, float eps, float wd)
{
    const ccr_cuda_range r = rg[blockIdx.y];
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x)
        adam_elem(w + r.off, g + r.off, m + r.off, v + r.off, i, lr, b1, b2, eps, wd, r.c1,
                  r.c2);
}

// ---------------------------------------------------------------------------
// launchers

static ccr_status cu_gemm(ccr_backend *be, bool ta, bool tb, size_t m, size_t n, size_t k,
                          float alpha, const float *a, size_t lda, const float *b, size_t ldb,
                          float beta, float *c, size_t ldc)
{
    const size_t lim = 2147483647;
    if (m > lim || n > lim || k > lim || lda > lim || ldb > lim || ldc > lim)
        CCR_FAIL(be->ctx, CCR_EUNSUP, "cuBLAS sizes are int: m=%zu n=%zu k=%zu", m, n, k);
    CCR_CUBLAS_TRY(be, cublasGemmEx(ccr_cuda(be)->cublas, tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                                    ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)n, (int)m, (int)k,
                                    &alpha, b, CUDA_R_32F, (int)ldb, a, CUDA_R_32F, (int)lda,
                                    &beta, c, CUDA_R_32F, (int)ldc, ccr_cuda(be)->compute,
                                    CUBLAS_GEMM_DEFAULT));
    return CCR_OK;
}

static ccr_status cu_bias_add(ccr_backend *be, float *y, const float *bias, size_t rows,
                              size_t cols)
{
    bias_add_kernel<<<ccr_grid(rows * cols, 256), 256, 0, ccr_cuda(be)->stream>>>(y, bias, rows,
                                                                                 cols);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

static ccr_status cu_bias_grad(ccr_backend *be, float *db, const float *dy, size_t rows,
                               size_t cols)
{
    bias_grad_kernel<<<ccr_ceil_div(cols, 32), dim3(32, BG_ROWS), 0, ccr_cuda(be)->stream>>>(
        db, dy, rows, cols);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

static ccr_status cu_act_fwd(ccr_backend *be, ccr_act act, const float *x, float *y, size_t n)
{
    act_fwd_kernel<<<ccr_grid(n, 256), 256, 0, ccr_cuda(be)->stream>>>((int)act, x, y, n);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

static ccr_status cu_act_bwd(ccr_backend *be, ccr_act act, const float *y, const float *dy,
                             float *dx, size_t n)
{
    act_bwd_kernel<<<ccr_grid(n, 256), 256, 0, ccr_cuda(be)->stream>>>((int)act, y, dy, dx, n);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

static ccr_status cu_softmax_xent(ccr_backend *be, const float *logits, const int32_t *labels,
                                  size_t rows, size_t cols, float scale, float *loss,
                                  int32_t *correct, float *dlogits)
{
    const unsigned warps = 4;
    softmax_xent_kernel<<<ccr_ceil_div(rows, warps), warps * 32, 0, ccr_cuda(be)->stream>>>(
        logits, (const int *)labels, rows, cols, scale, loss, (int *)correct, dlogits);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

static ccr_status cu_sgd_step(ccr_backend *be, float *w, const float *g, float *v, size_t n,
                              float lr, float mu, float wd)
{
    sgd_kernel<<<ccr_grid(n, 256), 256, 0, ccr_cuda(be)->stream>>>(w, g, v, n, lr, mu, wd);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

static ccr_status cu_adam_step(ccr_backend *be, float *w, const float *g, float *m, float *v,
                               size_t n, float lr, float b1, float b2, float eps, float wd,
                               uint64_t t)
{
    double c1 = 1.0 - pow((double)b1, (double)t), c2 = 1.0 - pow((double)b2, (double)t);
    adam_kernel<<<ccr_grid(n, 256), 256, 0, ccr_cuda(be)->stream>>>(w, g, m, v, n, lr, b1, b2,
                                                                     eps, wd, c1, c2);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

/* The ranges ops, CCR_CUDA_RANGES ranges per launch: the offsets (and
 * Adam's corrections, with adam_step's host pow) staged on the host and
 * uploaded (ccr_backend_set returns once copied, and the copy waits on the
 * stream for the previous launch, so the staging is reused safely); x-blocks
 * over a range's floats, at most 1024 per range. */
static dim3 ranges_grid(size_t len, size_t nr)
{
    size_t bx = ccr_ceil_div(len, 256);
    return dim3((unsigned)(bx < 1 ? 1 : bx > 1024 ? 1024 : bx), (unsigned)nr);
}

static ccr_status cu_ranges_stage(ccr_backend *be, const size_t *off, const uint64_t *t,
                                  size_t nr, float b1, float b2)
{
    ccr_cuda_state *st = ccr_cuda(be);
    for (size_t r = 0; r < nr; r++) {
        st->h_ranges[r].off = off[r];
        st->h_ranges[r].c1 = t ? 1.0 - pow((double)b1, (double)t[r]) : 0.0;
        st->h_ranges[r].c2 = t ? 1.0 - pow((double)b2, (double)t[r]) : 0.0;
    }
    return ccr_backend_set(be, st->ranges, st->h_ranges, nr * sizeof *st->h_ranges);
}

static ccr_status cu_sgd_ranges(ccr_backend *be, float *w, const float *g, float *v,
                                const size_t *off, size_t n, size_t len, float lr, float mu,
                                float wd)
{
    ccr_cuda_state *st = ccr_cuda(be);
    for (size_t r0 = 0; r0 < n && len > 0; r0 += CCR_CUDA_RANGES) {
        size_t nr = n - r0 < CCR_CUDA_RANGES ? n - r0 : CCR_CUDA_RANGES;
        CCR_TRY(cu_ranges_stage(be, off + r0, NULL, nr, 0.0f, 0.0f));
        sgd_ranges_kernel<<<ranges_grid(len, nr), 256, 0, st->stream>>>(w, g, v, st->ranges, len,
                                                                        lr, mu, wd);
        CCR_CUDA_LAUNCHED(be);
    }
    return CCR_OK;
}

static ccr_status cu_adam_ranges(ccr_backend *be, float *w, const float *g, float *m, float *v,
                                 const size_t *off, const uint64_t *t, size_t n, size_t len,
                                 float lr, float b1, float b2, float eps, float wd)
{
    ccr_cuda_state *st = ccr_cuda(be);
    for (size_t r0 = 0; r0 < n && len > 0; r0 += CCR_CUDA_RANGES) {
        size_t nr = n - r0 < CCR_CUDA_RANGES ? n - r0 : CCR_CUDA_RANGES;
        CCR_TRY(cu_ranges_stage(be, off + r0, t + r0, nr, b1, b2));
        adam_ranges_kernel<<<ranges_grid(len, nr), 256, 0, st->stream>>>(
            w, g, m, v, st->ranges, len, lr, b1, b2, eps, wd);
        CCR_CUDA_LAUNCHED(be);
    }
    return CCR_OK;
}

static ccr_status cu_zero_ranges(ccr_backend *be, float *x, const size_t *off, size_t n,
                                 size_t len)
{
    ccr_cuda_state *st = ccr_cuda(be);
    for (size_t r0 = 0; r0 < n && len > 0; r0 += CCR_CUDA_RANGES) {
        size_t nr = n - r0 < CCR_CUDA_RANGES ? n - r0 : CCR_CUDA_RANGES;
        CCR_TRY(cu_ranges_stage(be, off + r0, NULL, nr, 0.0f, 0.0f));
        zero_ranges_kernel<<<ranges_grid(len, nr), 256, 0, st->stream>>>(x, st->ranges, len);
        CCR_CUDA_LAUNCHED(be);
    }
    return CCR_OK;
}

/* Stage 1: block i's threads sum x^2 over i + j * blocks strided chunks in
 * double, then a fixed tree in shared memory; stage 2 (one block) adds the
 * partials the same way.  The grid is CCR_CUDA_PARTIALS blocks whatever n,
 * so the result is the same every run. */
#define SUMSQ_THREADS 256
__device__ double sumsq_block(double v, double *sh)
{
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = SUMSQ_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s)
            sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    return sh[0];
}

__global__ void sumsq_kernel(const float *x, size_t n, double *partials)
{
    __shared__ double sh[SUMSQ_THREADS];
    double acc = 0.0;
    for (size_t i = blockIdx.x * (size_t)SUMSQ_THREADS + threadIdx.x; i < n;
         i += (size_t)CCR_CUDA_PARTIALS * SUMSQ_THREADS)
        acc += (double)x[i] * (double)x[i];
    double s = sumsq_block(acc, sh);
    if (threadIdx.x == 0)
        partials[blockIdx.x] = s;
}

__global__ void sumsq_final_kernel(double *partials)
{
    __shared__ double sh[SUMSQ_THREADS];
    double acc = 0.0;
    for (unsigned i = threadIdx.x; i < CCR_CUDA_PARTIALS; i += SUMSQ_THREADS)
        acc += partials[i];
    double s = sumsq_block(acc, sh);
    if (threadIdx.x == 0)
        partials[CCR_CUDA_PARTIALS] = s;
}

static ccr_status cu_sum_squares(ccr_backend *be, const float *x, size_t n, double *out)
{
    ccr_cuda_state *st = ccr_cuda(be);
    sumsq_kernel<<<CCR_CUDA_PARTIALS, SUMSQ_THREADS, 0, st->stream>>>(x, n, st->partials);
    CCR_CUDA_LAUNCHED(be);
    sumsq_final_kernel<<<1, SUMSQ_THREADS, 0, st->stream>>>(st->partials);
    CCR_CUDA_LAUNCHED(be);
    CCR_CUDA_TRY(be, cudaMemcpyAsync(out, st->partials + CCR_CUDA_PARTIALS, sizeof *out,
                                     cudaMemcpyDeviceToHost, st->stream));
    CCR_CUDA_TRY(be, cudaStreamSynchronize(st->stream));
    return CCR_OK;
}

void ccr_cuda_fill_kernels(ccr_kernels *k)
{
    memset(k, 0, sizeof *k);
    k->gemm = cu_gemm;
    k->bias_add = cu_bias_add;
    k->bias_grad = cu_bias_grad;
    k->act_fwd = cu_act_fwd;
    k->act_bwd = cu_act_bwd;
    k->softmax_xent = cu_softmax_xent;
    k->sgd_step = cu_sgd_step;
    k->adam_step = cu_adam_step;
    k->sgd_ranges = cu_sgd_ranges;
    k->adam_ranges = cu_adam_ranges;
    k->zero_ranges = cu_zero_ranges;
    k->sum_squares = cu_sum_squares;
    ccr_cuda_fill_seq_kernels(k);
}
