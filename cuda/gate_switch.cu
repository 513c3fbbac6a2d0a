/*
 * gate_switch.cu - the device half of gate "switch" (src/gate_switch.c):
 * Switch Transformer routing, top-1 on the softmax over all E experts with
 * an expert capacity, the load-balancing loss alpha E sum_i f_i P_i and the
 * router z-loss (cuda/gate_router.cu).
 *
 * Forward, mirroring switch_forward:
 *   1. the router's logits and softmax p (device);
 *   2. gsw_argmax_kernel: i*_b = argmax p_b, ties to the lower index (the
 *      gate_topk(p, n, 1) of the CPU), one thread per example;
 *   3. gsw_assign_kernel: the capacity C = ccr_switch_capacity (host, the
 *      same function) and the positions.  Example b's position within its
 *      expert e is the number of earlier examples whose argmax is e; it is
 *      kept (id e, weight p_{b,e}) when that position is < C, else dropped
 *      (id -1, weight 0).  That is the CPU's sequential rule: kept[e] only
 *      grows while it is < C, so the first C examples choosing e are kept.
 *      The positions come from a deterministic block scan (below), not from
 *      atomics; the kernel also writes chosen[e], the pre-capacity count;
 *   4. Importance sum_b p as a fixed-order column sum (gdev_colsum).
 * chosen and Importance (E values each) are downloaded, and the aux loss,
 * dropped count and statistics are computed on the host in the CPU's
 * order and with its functions (gate_cv, gate_max_over_mean); kept =
 * min(chosen, C), which is what the CPU's counter ends at.
 *
 * Backward, mirroring switch_backward, one thread per example:
 * dp_i = (float)(alpha E / B^2 * chosen_i), plus dweights[b] at the kept
 * expert, then the softmax backward of gate_util.c, then the router's
 * z-loss term and GEMMs.
 *
 * The scan: one block per expert e walks the examples in tiles of
 * GSW_TILE, in example order; in a tile each thread tests one example, a
 * warp ballot gives each thread the number of matches before it in its
 * warp, per-warp totals in shared memory give the matches in earlier warps,
 * and a running count carries the earlier tiles.  Integer counts only: the
 * result does not depend on scheduling.  The work is O(B E) tests but they
 * are coalesced reads spread over E blocks, and the dependency chain is
 * B / GSW_TILE tiles; a CUB radix sort by expert would do O(B) work but
 * needs temporary storage and several launches, which is not worth it at
 * the E of a Switch layer (a few hundred at most).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gate_router.cuh"  // provides: gdev_router
#include "gate_util.h"      // provides: gate_cv, gate_max_over_mean

#define GSW_BLOCK 128
#define GSW_TILE 256              /* threads of the assign kernel: 8 warps */
#define GSW_WARPS (GSW_TILE / 32)

typedef struct gswitch_state {
    gdev_router r;
    size_t n;                    /* E */
    double capacity_factor;
    double eval_capacity_factor; /* 0: no limit in evaluation */
    double aux_alpha;
    int32_t *choice;             /* device [max_batch] i* before the capacity mask */
    int32_t *ids;                /* device [max_batch] expert or -1 (dropped) */
    float *weights;              /* device [max_batch] p_{i*}, 0 when dropped */
    size_t *chosen_dev;          /* device [E] #examples whose argmax is i (before drops) */
    double *imp_dev;             /* device [E] Importance sum_b p_{b,i} */
    size_t *chosen;              /* host [E] copy of chosen_dev */
    double *imp;                 /* host [E] copy of imp_dev */
    double *cnt;                 /* host [E] kept examples per expert, as doubles */
} gswitch_state;

/* gate_topk(p, n, 1): the first index of the largest p (a later entry wins
 * only when strictly larger, so ties go to the lower index; a NaN never
 * wins, as on the CPU). */
static __global__ void gsw_argmax_kernel(const float *probs, size_t batch, size_t n,
                                         int32_t *choice)
{
    for (size_t b = blockIdx.x * (size_t)blockDim.x + threadIdx.x; b < batch;
         b += (size_t)gridDim.x * blockDim.x) {
        const float *p = probs + b * n;
        size_t best = 0;
        for (size_t i = 1; i < n; i++)
            if (p[i] > p[best])
                best = i;
        choice[b] = (int32_t)best;
    }
}

/* Block e (gridDim.x = E, blockDim.x = GSW_TILE): the examples choosing e, in
 * example order, get positions 0, 1, ...; position < cap keeps the example.
 * Every thread runs the same number of tiles (the loop bound does not
 * depend on the thread), so the full-mask ballot and __syncthreads are
 * reached by all. */
static __global__ void gsw_assign_kernel(const int32_t *choice, const float *probs,
                                         size_t batch, size_t n, size_t cap, int32_t *ids,
                                         float *weights, size_t *chosen)
{
    __shared__ unsigned warp_count[GSW_WARPS];
    const int32_t e = (int32_t)blockIdx.x;
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned lanes_before = (1u << lane) - 1u; /* lane 0: none */
    size_t base = 0; /* examples choosing e in the earlier tiles */
    for (size_t t0 = 0; t0 < batch; t0 += GSW_TILE) {
        const size_t b = t0 + threadIdx.x;
        const bool mine = b < batch && choice[b] == e;
        const unsigned ballot = __ballot_sync(0xffffffffu, mine);
        if (lane == 0)
            warp_count[warp] = (unsigned)__popc(ballot);
        __syncthreads();
        size_t pos = base + (size_t)__popc(ballot & lanes_before), tile = 0;
        for (unsigned w = 0; w < GSW_WARPS; w++) {
            if (w < warp)
                pos += warp_count[w];
            tile += warp_count[w];
        }
        if (mine) {
            if (pos < cap) {
                ids[b] = e;
                weights[b] = probs[b * n + (size_t)e];
            } else {
                ids[b] = -1;
                weights[b] = 0.0f;
            }
        }
        base += tile;
        __syncthreads(); /* warp_count is rewritten by the next tile */
    }
    if (threadIdx.x == 0)
        chosen[e] = base;
}

/* switch_backward's loop per example b: dp_i = (float)(coef chosen_i), then
 * dp[ids[b]] += dweights[b] (float) for a kept example; then
 * gate_softmax_backward (dot in double in index order, unfused multiply and
 * add as the CPU build computes it; dp recomputed, the same floats). */
static __global__ void gsw_bwd_kernel(const float *probs, const int32_t *ids,
                                      const float *dweights, const size_t *chosen, double coef,
                                      size_t batch, size_t n, float *dz)
{
    for (size_t b = blockIdx.x * (size_t)blockDim.x + threadIdx.x; b < batch;
         b += (size_t)gridDim.x * blockDim.x) {
        const float *p = probs + b * n;
        float *g = dz + b * n;
        const int32_t id = ids[b];
        const float dwb = dweights[b];
        double dot = 0.0;
        for (size_t i = 0; i < n; i++) {
            float dp = (float)(coef * (double)chosen[i]);
            if (id >= 0 && (size_t)id == i)
                dp += dwb;
            dot = __dadd_rn(dot, __dmul_rn((double)p[i], (double)dp));
        }
        for (size_t i = 0; i < n; i++) {
            float dp = (float)(coef * (double)chosen[i]);
            if (id >= 0 && (size_t)id == i)
                dp += dwb;
            g[i] += (float)((double)p[i] * ((double)dp - dot));
        }
    }
}

static void gswitch_free(void *state)
{
    gswitch_state *s = (gswitch_state *)state;
    ccr_backend *be = s->r.be;
    gdev_router_free(&s->r);
    if (be != NULL) {
        ccr_backend_free_buffer(be, s->choice);
        ccr_backend_free_buffer(be, s->ids);
        ccr_backend_free_buffer(be, s->weights);
        ccr_backend_free_buffer(be, s->chosen_dev);
        ccr_backend_free_buffer(be, s->imp_dev);
    }
    free(s->chosen);
    free(s->imp);
    free(s->cnt);
    s->choice = s->ids = NULL;
    s->weights = NULL;
    s->chosen_dev = s->chosen = NULL;
    s->imp_dev = s->imp = s->cnt = NULL;
}

static ccr_status gswitch_init(void *state, ccr_backend *be, const ccr_gate *g,
                               size_t max_batch)
{
    gswitch_state *s = (gswitch_state *)state;
    const ccr_gate_config *cfg = ccr_gate_get_config(g);
    const size_t n = ccr_gate_n_matrices(g);
    /* The host gate validated the configuration (n <= INT32_MAX, so n fits
     * the grid of the assign kernel); the router re-checks sizes. */
    CCR_TRY(gdev_router_init(&s->r, be, "switch", cfg->d_in, n, cfg->z_loss, max_batch));
    s->n = n;
    s->capacity_factor = cfg->capacity_factor;
    s->eval_capacity_factor = cfg->eval_capacity_factor;
    s->aux_alpha = cfg->aux_alpha;
    ccr_status st;
    if ((st = gdev_alloc(be, max_batch, sizeof *s->choice, (void **)&s->choice)) != CCR_OK ||
        (st = gdev_alloc(be, max_batch, sizeof *s->ids, (void **)&s->ids)) != CCR_OK ||
        (st = gdev_alloc(be, max_batch, sizeof *s->weights, (void **)&s->weights)) != CCR_OK ||
        (st = gdev_alloc(be, n, sizeof *s->chosen_dev, (void **)&s->chosen_dev)) != CCR_OK ||
        (st = gdev_alloc(be, n, sizeof *s->imp_dev, (void **)&s->imp_dev)) != CCR_OK ||
        (st = gdev_host_alloc(be, n, sizeof *s->chosen, (void **)&s->chosen)) != CCR_OK ||
        (st = gdev_host_alloc(be, n, sizeof *s->imp, (void **)&s->imp)) != CCR_OK ||
        (st = gdev_host_alloc(be, n, sizeof *s->cnt, (void **)&s->cnt)) != CCR_OK) {
        gswitch_free(s);
        return st;
    }
    return CCR_OK;
}

static ccr_status gswitch_bind(void *state, ccr_arena *a, const char *prefix)
{
    gswitch_state *s = (gswitch_state *)state;
    return gdev_router_bind(&s->r, a, prefix);
}

static ccr_status gswitch_forward(void *state, const float *x, size_t batch, bool train,
                                  gsl_rng *rng, ccr_route *route, ccr_gate_stats *stats)
{
    gswitch_state *s = (gswitch_state *)state;
    CCR_UNUSED(rng);
    ccr_backend *be = s->r.be;
    cudaStream_t stream = gdev_stream(be);
    const size_t n = s->n;
    if (batch == 0 || batch > s->r.max_batch)
        CCR_FAIL(be->ctx, CCR_EBADLEN, "gate switch: batch %zu not in 1..%zu", batch,
                 s->r.max_batch);
    CCR_TRY(gdev_router_forward(&s->r, x, batch));
    const size_t cap = ccr_switch_capacity(train ? s->capacity_factor : s->eval_capacity_factor,
                                           batch, n);
    gsw_argmax_kernel<<<ccr_grid(batch, GSW_BLOCK), GSW_BLOCK, 0, stream>>>(s->r.probs, batch,
                                                                           n, s->choice);
    CCR_CUDA_LAUNCHED(be);
    gsw_assign_kernel<<<(unsigned)n, GSW_TILE, 0, stream>>>(s->choice, s->r.probs, batch, n,
                                                            cap, s->ids, s->weights,
                                                            s->chosen_dev);
    CCR_CUDA_LAUNCHED(be);
    /* Importance over every example, dropped or not (switch_forward's imp). */
    CCR_TRY(gdev_colsum(be, s->r.probs, batch, n, n, s->imp_dev, false));
    /* A dropped slot's weight is 0, so checking all weights checks the kept
     * ones, as ccr_gate_forward does. */
    CCR_TRY(gdev_router_check_weights(&s->r, s->weights, batch, 1));
    CCR_CUDA_TRY(be, cudaMemcpyAsync(s->chosen, s->chosen_dev, n * sizeof *s->chosen,
                                     cudaMemcpyDeviceToHost, stream));
    CCR_CUDA_TRY(be, cudaMemcpyAsync(s->imp, s->imp_dev, n * sizeof *s->imp,
                                     cudaMemcpyDeviceToHost, stream));
    CCR_CUDA_TRY(be, cudaStreamSynchronize(stream));
    double loss_z;
    CCR_TRY(gdev_router_loss_z(&s->r, batch, &loss_z));
    /* loss_switch = alpha E sum_i f_i P_i, f_i = chosen_i / B, P_i = imp_i / B. */
    size_t dropped = 0;
    double fp = 0.0;
    for (size_t i = 0; i < n; i++) {
        const size_t kept = s->chosen[i] < cap ? s->chosen[i] : cap;
        dropped += s->chosen[i] - kept;
        fp += ((double)s->chosen[i] / (double)batch) * (s->imp[i] / (double)batch);
        s->cnt[i] = (double)kept;
    }
    const double loss_switch = s->aux_alpha * (double)n * fp;
    *route = (ccr_route){
        .batch = batch, .slots = 1, .n_matrices = n, .ids = s->ids, .weights = s->weights,
    };
    const double cv_cnt = gate_cv(s->cnt, n), mm_cnt = gate_max_over_mean(s->cnt, n);
    ccr_gate_stats st;
    memset(&st, 0, sizeof st);
    st.aux_loss = loss_switch + loss_z;
    st.loss_switch = loss_switch;
    st.loss_z = loss_z;
    st.cv_importance = gate_cv(s->imp, n);
    st.cv_load = cv_cnt;
    st.cv_load_count = cv_cnt;
    st.max_mean_load = mm_cnt;
    st.max_mean_count = mm_cnt;
    st.dropped = dropped;
    *stats = st; /* `distinct` is the layer's */
    return CCR_OK;
}

static ccr_status gswitch_backward(void *state, const ccr_gate_bwd_args *a)
{
    gswitch_state *s = (gswitch_state *)state;
    ccr_backend *be = s->r.be;
    const size_t n = s->n, batch = a->batch;
    float *dz;
    CCR_TRY(gdev_router_grad_begin(&s->r, batch, &dz));
    /* d loss_switch / dp_{b,i} = alpha E f_i / B = alpha E chosen_i / B^2. */
    const double coef = s->aux_alpha * (double)n / ((double)batch * (double)batch);
    gsw_bwd_kernel<<<ccr_grid(batch, GSW_BLOCK), GSW_BLOCK, 0, gdev_stream(be)>>>(
        s->r.probs, s->ids, a->dweights, s->chosen_dev, coef, batch, n, dz);
    CCR_CUDA_LAUNCHED(be);
    return gdev_router_grad_end(&s->r, a->x, batch, a->dx);
}

const ccr_gate_dev_type ccr_gate_dev_switch = {
    .host = &ccr_gate_switch,
    .state_size = sizeof(gswitch_state),
    .init = gswitch_init,
    .free = gswitch_free,
    .bind = gswitch_bind,
    .forward = gswitch_forward,
    .backward = gswitch_backward,
};
