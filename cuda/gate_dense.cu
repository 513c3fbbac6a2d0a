/*
 * gate_dense.cu - the device half of gate "dense" (src/gate_dense.c):
 * softmax over all E experts, Shazeer et al. 2017 eq. 2, every expert runs
 * (slot s = expert s, weight p_s).  Aux losses: w_importance CV(Importance)^2
 * (eqs. 6-7) and the router z-loss (cuda/gate_router.cu).
 *
 * Forward: the router's logits and softmax on the device, Importance =
 * sum_b p as a fixed-order column sum (gdev_colsum), downloaded; the losses
 * and statistics are computed on the host by the CPU gate's functions
 * (ccr_cv_squared, gate_cv, gate_max_over_mean), and the importance loss's
 * gradient tk_cv2_grad(Importance) is computed there too and uploaded for
 * the backward (the CPU computes the same vector at the start of its
 * backward from the same Importance).  Backward: one thread per example,
 * dp_i = dweights[b, i] + dimp_i, the softmax backward of gate_util.c, then
 * the router's z-loss term and GEMMs.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gate_router.cuh"    // provides: gdev_router
#include "gate_topk_core.h"    // provides: tk_cv2_grad
#include "gate_util.h"         // provides: gate_cv, gate_max_over_mean

#define GDENSE_BLOCK 128

typedef struct gdense_state {
    gdev_router r;
    size_t n;            /* E */
    double w_importance;
    int32_t *ids;        /* device [max_batch, E] row b = 0, 1, ..., E-1 (constant) */
    double *imp_dev;     /* device [E] Importance of the last forward */
    double *dimp_dev;    /* device [E] w_importance dCV^2/dImportance of the last forward */
    double *imp;         /* host [E] Importance */
    double *load;        /* host [E] counts (= batch) */
    double *dimp;        /* host [E] the gradient before upload */
} gdense_state;

static __global__ void gdense_ids_kernel(int32_t *ids, size_t total, size_t n)
{
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total;
         k += (size_t)gridDim.x * blockDim.x)
        ids[k] = (int32_t)(k % n);
}

/* dense_backward's loop per example b: dp_i = (float)(dweights[b, i] + dimp_i),
 * then gate_softmax_backward: dot = sum_j p_j dp_j in double in index order
 * (unfused multiply and add, as the CPU build computes it), dz_i +=
 * (float)(p_i (dp_i - dot)).  dp is recomputed in the second loop instead of
 * stored: the same expression gives the same float. */
static __global__ void gdense_bwd_kernel(const float *probs, const float *dweights,
                                         const double *dimp, size_t batch, size_t n, float *dz)
{
    for (size_t b = blockIdx.x * (size_t)blockDim.x + threadIdx.x; b < batch;
         b += (size_t)gridDim.x * blockDim.x) {
        const float *p = probs + b * n;
        const float *dw = dweights + b * n;
        float *g = dz + b * n;
        double dot = 0.0;
        for (size_t i = 0; i < n; i++) {
            const float dp = (float)((double)dw[i] + dimp[i]);
            dot = __dadd_rn(dot, __dmul_rn((double)p[i], (double)dp));
        }
        for (size_t i = 0; i < n; i++) {
            const float dp = (float)((double)dw[i] + dimp[i]);
            g[i] += (float)((double)p[i] * ((double)dp - dot));
        }
    }
}

static void gdense_free(void *state)
{
    gdense_state *s = (gdense_state *)state;
    ccr_backend *be = s->r.be;
    gdev_router_free(&s->r);
    if (be != NULL) {
        ccr_backend_free_buffer(be, s->ids);
        ccr_backend_free_buffer(be, s->imp_dev);
        ccr_backend_free_buffer(be, s->dimp_dev);
    }
    free(s->imp);
    free(s->load);
    free(s->dimp);
    s->ids = NULL;
    s->imp_dev = s->dimp_dev = NULL;
    s->imp = s->load = s->dimp = NULL;
}

static ccr_status gdense_init(void *state, ccr_backend *be, const ccr_gate *g, size_t max_batch)
{
    gdense_state *s = (gdense_state *)state;
    const ccr_gate_config *cfg = ccr_gate_get_config(g);
    const size_t n = ccr_gate_n_matrices(g);
    /* The host gate validated the configuration; the router re-checks sizes. */
    CCR_TRY(gdev_router_init(&s->r, be, "dense", cfg->d_in, n, cfg->z_loss, max_batch));
    s->n = n;
    s->w_importance = cfg->w_importance;
    size_t bn = max_batch * n; /* checked by gdev_router_init */
    ccr_status st;
    if ((st = gdev_alloc(be, bn, sizeof *s->ids, (void **)&s->ids)) != CCR_OK ||
        (st = gdev_alloc(be, n, sizeof *s->imp_dev, (void **)&s->imp_dev)) != CCR_OK ||
        (st = gdev_alloc(be, n, sizeof *s->dimp_dev, (void **)&s->dimp_dev)) != CCR_OK ||
        (st = gdev_host_alloc(be, n, sizeof *s->imp, (void **)&s->imp)) != CCR_OK ||
        (st = gdev_host_alloc(be, n, sizeof *s->load, (void **)&s->load)) != CCR_OK ||
        (st = gdev_host_alloc(be, n, sizeof *s->dimp, (void **)&s->dimp)) != CCR_OK) {
        gdense_free(s);
        return st;
    }
    gdense_ids_kernel<<<ccr_grid(bn, 256), 256, 0, gdev_stream(be)>>>(s->ids, bn, n);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        gdense_free(s);
        CCR_FAIL(be->ctx, CCR_ECUDA, "gate dense: ids kernel: %s", cudaGetErrorString(e));
    }
    return CCR_OK;
}

static ccr_status gdense_bind(void *state, ccr_arena *a, const char *prefix)
{
    gdense_state *s = (gdense_state *)state;
    return gdev_router_bind(&s->r, a, prefix);
}

static ccr_status gdense_forward(void *state, const float *x, size_t batch, bool train,
                                 gsl_rng *rng, ccr_route *route, ccr_gate_stats *stats)
{
    gdense_state *s = (gdense_state *)state;
    CCR_UNUSED(train);
    CCR_UNUSED(rng);
    ccr_backend *be = s->r.be;
    const size_t n = s->n;
    if (batch == 0 || batch > s->r.max_batch)
        CCR_FAIL(be->ctx, CCR_EBADLEN, "gate dense: batch %zu not in 1..%zu", batch,
                 s->r.max_batch);
    CCR_TRY(gdev_router_forward(&s->r, x, batch));
    /* Importance_i = sum_b p_{b,i} (dense_forward's loop, in gdev_colsum's
     * fixed order). */
    CCR_TRY(gdev_colsum(be, s->r.probs, batch, n, n, s->imp_dev, false));
    /* Every slot is used: all batch x E weights are checked. */
    CCR_TRY(gdev_router_check_weights(&s->r, s->r.probs, batch * n, n));
    CCR_TRY(ccr_backend_get(be, s->imp, s->imp_dev, n * sizeof *s->imp));
    double loss_z;
    CCR_TRY(gdev_router_loss_z(&s->r, batch, &loss_z));
    for (size_t i = 0; i < n; i++)
        s->load[i] = (double)batch;
    /* The backward's dL/dImportance (dense_backward's tk_cv2_grad), uploaded
     * now, behind the forward's work on the stream, so that the backward
     * does not wait for a copy. */
    tk_cv2_grad(s->imp, n, s->w_importance, s->dimp);
    CCR_CUDA_TRY(be, cudaMemcpyAsync(s->dimp_dev, s->dimp, n * sizeof *s->dimp,
                                     cudaMemcpyHostToDevice, gdev_stream(be)));
    *route = (ccr_route){
        .batch = batch, .slots = n, .n_matrices = n, .ids = s->ids, .weights = s->r.probs,
    };
    const double cv_load = gate_cv(s->load, n), mm_load = gate_max_over_mean(s->load, n);
    const double loss_imp = s->w_importance * ccr_cv_squared(s->imp, n);
    ccr_gate_stats st;
    memset(&st, 0, sizeof st);
    st.aux_loss = loss_imp + loss_z;
    st.loss_importance = loss_imp;
    st.loss_z = loss_z;
    st.cv_importance = gate_cv(s->imp, n);
    st.cv_load = cv_load;
    st.cv_load_count = cv_load;
    st.max_mean_load = mm_load;
    st.max_mean_count = mm_load;
    st.dropped = 0;
    *stats = st; /* `distinct` (= E) is the layer's */
    return CCR_OK;
}

static ccr_status gdense_backward(void *state, const ccr_gate_bwd_args *a)
{
    gdense_state *s = (gdense_state *)state;
    ccr_backend *be = s->r.be;
    float *dz;
    CCR_TRY(gdev_router_grad_begin(&s->r, a->batch, &dz));
    gdense_bwd_kernel<<<ccr_grid(a->batch, GDENSE_BLOCK), GDENSE_BLOCK, 0, gdev_stream(be)>>>(
        s->r.probs, a->dweights, s->dimp_dev, a->batch, s->n, dz);
    CCR_CUDA_LAUNCHED(be);
    return gdev_router_grad_end(&s->r, a->x, a->batch, a->dx);
}

const ccr_gate_dev_type ccr_gate_dev_dense = {
    .host = &ccr_gate_dense,
    .state_size = sizeof(gdense_state),
    .init = gdense_init,
    .free = gdense_free,
    .bind = gdense_bind,
    .forward = gdense_forward,
    .backward = gdense_backward,
};
