/*
 * gate_router.cu - the device half of the softmax router of the dense and
 * switch gates; mirrors src/gate_router.c (gate_router_forward,
 * gate_router_grad_begin, gate_router_grad_end) and the per-row helpers of
 * src/gate_util.c it calls (gate_softmax, gate_logsumexp):
 *
 *     p_b = softmax(x_b W_g),  lse_b = log sum_j exp(logits_{b,j}),
 *     L_z = z * (1/B) sum_b lse_b^2,  dL_z/dlogits_{b,j} = z (2/B) lse_b p_{b,j}.
 *
 * The row kernels run one thread per example and loop over the row in index
 * order with the CPU's float/double choices, so p and lse equal the CPU's
 * up to the last bit of exp (given the same logits; cuBLAS and OpenBLAS
 * round the logits differently).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gate_router.cuh"

#define GRT_BLOCK 128

/* gate_softmax and gate_logsumexp of each row: the max in float, the sum of
 * exp in double in index order, p rounded to float; lse = m + log(sum) when
 * lse is not NULL. */
static __global__ void grt_softmax_kernel(const float *logits, size_t batch, size_t n,
                                          float *probs, double *lse)
{
    for (size_t b = blockIdx.x * (size_t)blockDim.x + threadIdx.x; b < batch;
         b += (size_t)gridDim.x * blockDim.x) {
        const float *z = logits + b * n;
        float *p = probs + b * n;
        float m = z[0];
        for (size_t i = 1; i < n; i++)
            m = z[i] > m ? z[i] : m;
        double s = 0.0;
        for (size_t i = 0; i < n; i++)
            s += exp((double)z[i] - (double)m);
        for (size_t i = 0; i < n; i++)
            p[i] = (float)(exp((double)z[i] - (double)m) / s);
        /* gate_logsumexp takes the max in double; it is the same value (the
         * comparisons see the same floats), and the sum is the same sum. */
        if (lse != NULL)
            lse[b] = (double)m + log(s);
    }
}

/* The z-loss term of gate_router_grad_end: dz[b, j] += (float)(c lse_b p_{b,j}),
 * c = 2 z / B (g = c lse_b first, as on the CPU). */
static __global__ void grt_zloss_grad_kernel(const float *probs, const double *lse,
                                             size_t batch, size_t n, double c, float *dz)
{
    const size_t total = batch * n;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total;
         k += (size_t)gridDim.x * blockDim.x) {
        const double g = c * lse[k / n];
        dz[k] += (float)(g * (double)probs[k]);
    }
}

ccr_status gdev_router_init(gdev_router *r, ccr_backend *be, const char *gate, size_t d_in,
                            size_t n, double z_loss, size_t max_batch)
{
    memset(r, 0, sizeof *r);
    r->be = be;
    r->gate = gate;
    r->d_in = d_in;
    r->n = n;
    r->max_batch = max_batch;
    r->z_loss = z_loss;
    size_t bn;
    if (!ccr_mul_ok(max_batch, n, &bn))
        CCR_FAIL(be->ctx, CCR_EINVAL, "gate %s: max_batch %zu x n_experts %zu overflows", gate,
                 max_batch, n);
    ccr_status st;
    if ((st = gdev_alloc(be, bn, sizeof(float), (void **)&r->logits)) != CCR_OK ||
        (st = gdev_alloc(be, bn, sizeof(float), (void **)&r->probs)) != CCR_OK ||
        (st = gdev_alloc(be, bn, sizeof(float), (void **)&r->dz)) != CCR_OK ||
        (st = gdev_alloc(be, max_batch, sizeof(double), (void **)&r->lse)) != CCR_OK ||
        (st = gdev_alloc(be, 1, sizeof(int), (void **)&r->flag)) != CCR_OK ||
        (st = gdev_host_alloc(be, max_batch, sizeof(double), (void **)&r->lse_host)) != CCR_OK) {
        gdev_router_free(r);
        return st;
    }
    return CCR_OK;
}

void gdev_router_free(gdev_router *r)
{
    if (r->be != NULL) {
        ccr_backend_free_buffer(r->be, r->logits);
        ccr_backend_free_buffer(r->be, r->probs);
        ccr_backend_free_buffer(r->be, r->dz);
        ccr_backend_free_buffer(r->be, r->lse);
        ccr_backend_free_buffer(r->be, r->flag);
    }
    free(r->lse_host);
    r->logits = r->probs = r->dz = NULL;
    r->lse = r->lse_host = NULL;
    r->flag = NULL;
}

ccr_status gdev_router_bind(gdev_router *r, ccr_arena *a, const char *prefix)
{
    size_t idx;
    CCR_TRY(gdev_find(a, r->be->ctx, prefix, "w_g", &idx));
    const size_t *shape = ccr_arena_shape(a, idx);
    if (ccr_arena_rank(a, idx) != 2 || shape == NULL || shape[0] != r->d_in ||
        shape[1] != r->n)
        CCR_FAIL(r->be->ctx, CCR_EINVAL, "gate %s: %sw_g is not [%zu, %zu]", r->gate,
                 prefix ? prefix : "", r->d_in, r->n);
    r->arena = a;
    r->w_idx = idx;
    return CCR_OK;
}

/* The device pointer to W_g, or NULL (with a message) before bind/finalize,
 * as router_weights of the CPU router. */
static float *grt_weights(gdev_router *r)
{
    float *w = r->arena ? ccr_arena_value(r->arena, r->w_idx) : NULL;
    if (w == NULL)
        (void)CCR_FAIL_EXPR(r->be->ctx, CCR_EINVAL,
                            "gate %s: parameters not bound or arena not finalized", r->gate);
    return w;
}

ccr_status gdev_router_forward(gdev_router *r, const float *x, size_t batch)
{
    const float *w = grt_weights(r);
    if (w == NULL)
        return CCR_EINVAL;
    ccr_backend *be = r->be;
    const size_t n = r->n;
    /* logits[B, n] = x[B, d_in] W_g[d_in, n], as gate_matmul. */
    CCR_TRY(be->k->gemm(be, false, false, batch, n, r->d_in, 1.0f, x, r->d_in, w, n, 0.0f,
                        r->logits, n));
    grt_softmax_kernel<<<ccr_grid(batch, GRT_BLOCK), GRT_BLOCK, 0, gdev_stream(be)>>>(
        r->logits, batch, n, r->probs, r->z_loss > 0.0 ? r->lse : NULL);
    CCR_CUDA_LAUNCHED(be);
    return CCR_OK;
}

ccr_status gdev_router_loss_z(gdev_router *r, size_t batch, double *loss_z)
{
    *loss_z = 0.0;
    if (!(r->z_loss > 0.0))
        return CCR_OK;
    CCR_TRY(ccr_backend_get(r->be, r->lse_host, r->lse, batch * sizeof(double)));
    double zsum = 0.0;
    for (size_t b = 0; b < batch; b++)
        zsum += r->lse_host[b] * r->lse_host[b];
    *loss_z = r->z_loss * zsum / (double)batch;
    return CCR_OK;
}

ccr_status gdev_router_check_weights(gdev_router *r, const float *weights, size_t count,
                                     size_t slots)
{
    size_t bad;
    CCR_TRY(gdev_find_nonfinite(r->be, weights, count, r->flag, &bad));
    if (bad == 0)
        return CCR_OK;
    const size_t k = bad - 1;
    float v = 0.0f;
    CCR_TRY(ccr_backend_get(r->be, &v, weights + k, sizeof v));
    CCR_FAIL(r->be->ctx, CCR_EDOM,
             "gate %s: routing weight of example %zu slot %zu is %g (NaN or infinite gate "
             "parameters?)", r->gate, k / slots, k % slots, (double)v);
}

ccr_status gdev_router_grad_begin(gdev_router *r, size_t batch, float **dz)
{
    CCR_TRY(ccr_backend_memset(r->be, r->dz, 0, batch * r->n * sizeof(float)));
    *dz = r->dz;
    return CCR_OK;
}

ccr_status gdev_router_grad_end(gdev_router *r, const float *x, size_t batch, float *dx)
{
    const float *w = grt_weights(r);
    float *dw = r->arena ? ccr_arena_grad(r->arena, r->w_idx) : NULL;
    if (w == NULL)
        return CCR_EINVAL;
    if (dw == NULL)
        CCR_FAIL(r->be->ctx, CCR_EINVAL, "gate %s: arena has no gradients", r->gate);
    ccr_backend *be = r->be;
    const size_t n = r->n, d = r->d_in;
    if (r->z_loss > 0.0) {
        const double c = 2.0 * r->z_loss / (double)batch;
        grt_zloss_grad_kernel<<<ccr_grid(batch * n, 256), 256, 0, gdev_stream(be)>>>(
            r->probs, r->lse, batch, n, c, r->dz);
        CCR_CUDA_LAUNCHED(be);
    }
    /* gate_matmul_backward: dW[d, n] += x^T dz; dx[B, d] += dz W^T. */
    CCR_TRY(be->k->gemm(be, true, false, d, n, batch, 1.0f, x, d, r->dz, n, 1.0f, dw, n));
    if (dx != NULL)
        CCR_TRY(be->k->gemm(be, false, true, batch, d, n, 1.0f, r->dz, n, w, n, 1.0f, dx, d));
    return CCR_OK;
}
