/*
 * gate_none.cu - the device half of gate "none" (src/gate_none.c): no
 * gating, every example uses bank matrix 0 with weight 1.  The table is
 * constant, written once in init (ids 0, weights 1) as on the CPU; no
 * parameters, no aux loss, no gradient (dx is left untouched).
 */
#include <stdint.h>
#include <string.h>

#include "gate_dev_util.cuh"  // provides: gdev_alloc, gdev_stream, ccr_gate_dev_type

typedef struct gnone_state {
    ccr_backend *be;
    size_t max_batch;
    int32_t *ids;     /* device [max_batch] all 0 (gdev_alloc zero-fills) */
    float *weights;   /* device [max_batch] all 1 */
} gnone_state;

static __global__ void gnone_fill_kernel(float *w, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        w[i] = 1.0f;
}

static void gnone_free(void *state)
{
    gnone_state *s = (gnone_state *)state;
    if (s->be != NULL) {
        ccr_backend_free_buffer(s->be, s->ids);
        ccr_backend_free_buffer(s->be, s->weights);
    }
    s->ids = NULL;
    s->weights = NULL;
}

static ccr_status gnone_init(void *state, ccr_backend *be, const ccr_gate *g, size_t max_batch)
{
    gnone_state *s = (gnone_state *)state;
    CCR_UNUSED(g);
    s->be = be;
    s->max_batch = max_batch;
    ccr_status st;
    if ((st = gdev_alloc(be, max_batch, sizeof *s->ids, (void **)&s->ids)) != CCR_OK ||
        (st = gdev_alloc(be, max_batch, sizeof *s->weights, (void **)&s->weights)) != CCR_OK) {
        gnone_free(s);
        return st;
    }
    /* Ordered after gdev_alloc's zero fill: both are on the backend's stream. */
    gnone_fill_kernel<<<ccr_grid(max_batch, 256), 256, 0, gdev_stream(be)>>>(s->weights,
                                                                              max_batch);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        gnone_free(s);
        CCR_FAIL(be->ctx, CCR_ECUDA, "gate none: fill kernel: %s", cudaGetErrorString(e));
    }
    return CCR_OK;
}

static ccr_status gnone_bind(void *state, ccr_arena *a, const char *prefix)
{
    CCR_UNUSED(state);
    CCR_UNUSED(a);
    CCR_UNUSED(prefix);
    return CCR_OK;
}

static ccr_status gnone_forward(void *state, const float *x, size_t batch, bool train,
                                gsl_rng *rng, ccr_route *route, ccr_gate_stats *stats)
{
    gnone_state *s = (gnone_state *)state;
    CCR_UNUSED(x);
    CCR_UNUSED(train);
    CCR_UNUSED(rng);
    if (batch == 0 || batch > s->max_batch)
        CCR_FAIL(s->be->ctx, CCR_EBADLEN, "gate none: batch %zu not in 1..%zu", batch,
                 s->max_batch);
    *route = (ccr_route){
        .batch = batch, .slots = 1, .n_matrices = 1, .ids = s->ids, .weights = s->weights,
    };
    /* One expert: CV of a single entry is 0, max/mean is 1 (none_forward);
     * `distinct` is the layer's. */
    ccr_gate_stats st;
    memset(&st, 0, sizeof st); /* aux loss, CVs and dropped: 0 */
    st.max_mean_load = 1.0;
    st.max_mean_count = 1.0;
    *stats = st;
    return CCR_OK;
}

static ccr_status gnone_backward(void *state, const ccr_gate_bwd_args *a)
{
    CCR_UNUSED(state);
    CCR_UNUSED(a);
    return CCR_OK;
}

const ccr_gate_dev_type ccr_gate_dev_none = {
    .host = &ccr_gate_none,
    .state_size = sizeof(gnone_state),
    .init = gnone_init,
    .free = gnone_free,
    .bind = gnone_bind,
    .forward = gnone_forward,
    .backward = gnone_backward,
};
