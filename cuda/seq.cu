/*
 * seq.cu - CUDA kernels of the sequence models' ops (src/ref/seq_ref.c is
 * the specification; tests/test_cuda.c checks each against it): scaling,
 * element-wise product and sum, row gather, segmented row sums, one LSTM timestep forward
 * and backward, and the full softmax with its NLL.
 *
 * Determinism: no float atomics.  segment_add_rows gives each (segment,
 * column) to one thread, which adds the segment's rows in their listed
 * order, exactly as the reference does (bitwise equal).  The softmax takes
 * one block per row and reduces in a fixed tree (the same result every run;
 * equal to the reference to float rounding: expf instead of the reference's
 * polynomial, a different summation order).
 */
#include <math.h>

#include "cuda_common.cuh"  // provides: CCR_CUDA_LAUNCHED, ccr_cuda, ccr_grid

#define GRID_STRIDE(i, n)                                                      \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); \
         i += (size_t)gridDim.x * blockDim.x)

__global__ void scale_kernel(float *x, size_t n, float k)
{
    GRID_STRIDE(i, n) x[i] *= k;
}

__global__ void mul_kernel(const float *a, const float *b, float *y, size_t n)
{
    GRID_STRIDE(i, n) y[i] = a[i] * b[i];
}

__global__ void add_kernel(const float *a, const float *b, float *y, size_t n)
{
    GRID_STRIDE(i, n) y[i] = a[i] + b[i];
}

__global__ void gather_rows_kernel(const float *table, size_t d, const int *ids, size_t n,
                                   float *out)
{
    GRID_STRIDE(i, n * d) out[i] = table[(size_t)ids[i / d] * d + i % d];
}

/* blockIdx.x: the segment; the columns over blockIdx.y * blockDim.x + x. */
__global__ void segment_add_rows_kernel(float *dst, size_t d, const float *src, const int *rows,
                                        const int *start, const int *seg_dst)
{
    size_t s = blockIdx.x, j = blockIdx.y * (size_t)blockDim.x + threadIdx.x;
    if (j >= d)
        return;
    float *o = dst + (size_t)seg_dst[s] * d + j;
    float acc = *o;
    for (int p = start[s]; p < start[s + 1]; p++)
        acc += src[(size_t)rows[p] * d + j];
    *o = acc;
}

__device__ static float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }

__global__ void lstm_fwd_kernel(float *z, const float *c_prev, float *c, float *tc, float *h,
                                size_t batch, size_t d)
{
    GRID_STRIDE(q, batch * d) {
        size_t b = q / d, j = q % d;
        float *zb = z + b * 4 * d;
        float i = sigm(zb[j]), f = sigm(zb[d + j]), g = tanhf(zb[2 * d + j]);
        float o = sigm(zb[3 * d + j]);
        zb[j] = i, zb[d + j] = f, zb[2 * d + j] = g, zb[3 * d + j] = o;
        float cv = f * c_prev[q] + i * g, t = tanhf(cv);
        c[q] = cv;
        tc[q] = t;
        h[q] = o * t;
    }
}

__global__ void lstm_bwd_kernel(const float *z, const float *c_prev, const float *tc,
                                const float *dh_out, const float *dh_rec, float *dc, float *dz,
                                size_t batch, size_t d)
{
    GRID_STRIDE(q, batch * d) {
        size_t b = q / d, j = q % d;
        const float *zb = z + b * 4 * d;
        float *db = dz + b * 4 * d;
        float i = zb[j], f = zb[d + j], g = zb[2 * d + j], o = zb[3 * d + j];
        float t = tc[q], dh = dh_out[q] + dh_rec[q];
        float dcv = dc[q] + dh * o * (1.0f - t * t);
        db[j] = dcv * g * i * (1.0f - i);
        db[d + j] = dcv * c_prev[q] * f * (1.0f - f);
        db[2 * d + j] = dcv * i * (1.0f - g * g);
        db[3 * d + j] = dh * t * o * (1.0f - o);
        dc[q] = dcv * f;
    }
}

/* One block of SM_THREADS per row: the maximum, then exp and the sum in
 * double, each by a fixed tree in shared memory.  exp's argument is clamped
 * at ln(2^-126) as in the reference (no subnormal probability); a NaN
 * logit stays NaN (comparisons, not fmaxf, which would drop it). */
#define SM_THREADS 256
__global__ void softmax_nll_kernel(float *z, const int *tgt, size_t cols, double *nll)
{
    __shared__ float smax[SM_THREADS];
    __shared__ double ssum[SM_THREADS];
    float *zr = z + blockIdx.x * cols;
    int t = tgt[blockIdx.x];
    float zt = t >= 0 ? zr[t] : 0.0f;  /* read before any thread writes the row */
    float m = zr[0];
    for (size_t j = threadIdx.x; j < cols; j += SM_THREADS)
        m = zr[j] > m ? zr[j] : m;
    smax[threadIdx.x] = m;
    __syncthreads();
    for (unsigned s = SM_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s && smax[threadIdx.x + s] > smax[threadIdx.x])
            smax[threadIdx.x] = smax[threadIdx.x + s];
        __syncthreads();
    }
    float mx = smax[0];
    double acc = 0.0;
    for (size_t j = threadIdx.x; j < cols; j += SM_THREADS) {
        float x = zr[j] - mx;
        x = x < -87.33654f ? -87.33654f : x;
        float e = expf(x);
        zr[j] = e;
        acc += (double)e;
    }
    ssum[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned s = SM_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s)
            ssum[threadIdx.x] += ssum[threadIdx.x + s];
        __syncthreads();
    }
    double sum = ssum[0];
    float inv = (float)(1.0 / sum);
    for (size_t j = threadIdx.x; j < cols; j += SM_THREADS)
        zr[j] *= inv;
    if (threadIdx.x == 0)
        nll[blockIdx.x] = t >= 0 ? log(sum) + (double)mx - (double)zt : 0.0;
}

__global__ void softmax_nll_bwd_kernel(float *z, const int *tgt, size_t rows, size_t cols,
                                       float scale)
{
    GRID_STRIDE(i, rows * cols) {
        int t = tgt[i / cols];
        size_t j = i % cols;
        z[i] = t < 0 ? 0.0f : (j == (size_t)t ? z[i] - 1.0f : z[i]) * scale;
    }
}

// ---------------------------------------------------------------------------
// launchers

static ccr_status cu_scale(ccr_backend *be, float *x, size_t n, float k)
{
    scale_kernel<<<ccr_grid(n, 256), 256, 0, ccr_cuda(be)->stream>>>(x, n, k);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

static ccr_status cu_mul(ccr_backend *be, const float *a, const float *b, float *y, size_t n)
{
    mul_kernel<<<ccr_grid(n, 256), 256, 0, ccr_cuda(be)->stream>>>(a, b, y, n);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

static ccr_status cu_add(ccr_backend *be, const float *a, const float *b, float *y, size_t n)
{
    add_kernel<<<ccr_grid(n, 256), 256, 0, ccr_cuda(be)->stream>>>(a, b, y, n);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

static ccr_status cu_gather_rows(ccr_backend *be, const float *table, size_t d,
                                 const int32_t *ids, size_t n, float *out)
{
    gather_rows_kernel<<<ccr_grid(n * d, 256), 256, 0, ccr_cuda(be)->stream>>>(
        table, d, (const int *)ids, n, out);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

static ccr_status cu_segment_add_rows(ccr_backend *be, float *dst, size_t d, const float *src,
                                      const int32_t *rows, const int32_t *start,
                                      const int32_t *seg_dst, size_t n_seg)
{
    const unsigned threads = 128;
    size_t ny = (d + threads - 1) / threads;
    if (n_seg > 2147483647u || ny > 65535)
        CCR_FAIL(be->ctx, CCR_EINVAL, "%zu segments of width %zu exceed one launch", n_seg, d);
    segment_add_rows_kernel<<<dim3((unsigned)n_seg, (unsigned)ny), threads, 0,
                              ccr_cuda(be)->stream>>>(dst, d, src, (const int *)rows,
                                                      (const int *)start, (const int *)seg_dst);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

static ccr_status cu_lstm_fwd(ccr_backend *be, float *z, const float *c_prev, float *c, float *tc,
                              float *h, size_t batch, size_t d)
{
    lstm_fwd_kernel<<<ccr_grid(batch * d, 256), 256, 0, ccr_cuda(be)->stream>>>(
        z, c_prev, c, tc, h, batch, d);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

static ccr_status cu_lstm_bwd(ccr_backend *be, const float *z, const float *c_prev,
                              const float *tc, const float *dh_out, const float *dh_rec,
                              float *dc, float *dz, size_t batch, size_t d)
{
    lstm_bwd_kernel<<<ccr_grid(batch * d, 256), 256, 0, ccr_cuda(be)->stream>>>(
        z, c_prev, tc, dh_out, dh_rec, dc, dz, batch, d);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

static ccr_status cu_softmax_nll(ccr_backend *be, float *z, const int32_t *tgt, size_t rows,
                                 size_t cols, double *nll)
{
    if (rows > 2147483647u)
        CCR_FAIL(be->ctx, CCR_EINVAL, "%zu rows exceed one launch", rows);
    softmax_nll_kernel<<<(unsigned)rows, SM_THREADS, 0, ccr_cuda(be)->stream>>>(
        z, (const int *)tgt, cols, nll);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

static ccr_status cu_softmax_nll_bwd(ccr_backend *be, float *z, const int32_t *tgt, size_t rows,
                                     size_t cols, float scale)
{
    softmax_nll_bwd_kernel<<<ccr_grid(rows * cols, 256), 256, 0, ccr_cuda(be)->stream>>>(
        z, (const int *)tgt, rows, cols, scale);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

void ccr_cuda_fill_seq_kernels(ccr_kernels *k)
{
    k->scale = cu_scale;
    k->mul = cu_mul;
    k->add = cu_add;
    k->gather_rows = cu_gather_rows;
    k->segment_add_rows = cu_segment_add_rows;
    k->lstm_fwd = cu_lstm_fwd;
    k->lstm_bwd = cu_lstm_bwd;
    k->softmax_nll = cu_softmax_nll;
    k->softmax_nll_bwd = cu_softmax_nll_bwd;
}
