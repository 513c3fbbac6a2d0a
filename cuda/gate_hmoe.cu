/*
 * gate_hmoe.cu - the device half of gate "hmoe" (src/gate_hmoe.c): the
 * hierarchical mixture of experts of Shazeer et al. 2017, App. B (eqs.
 * 12-14).  A noisy top-k primary gate picks k = k_groups of a groups; for
 * each picked group i a secondary noisy top-k gate picks k2 of its bs
 * experts; the route weight of expert (i, j) is G_primary_i G_i_j.
 *
 * The same steps as hmoe_forward / hmoe_backward, on the device:
 *   - two cores of cuda/gate_topk_core.cu: the primary (rows = batch, width
 *     a, top k) and the secondary (rows = batch k, row b k + p the group
 *     top_p of example b, width bs, top k2);
 *   - the draws: per example, a for the primary then bs for each of its k
 *     secondary rows, the CPU's pass 1 order; that order and count (batch
 *     (a + k bs)) do not depend on the routing, so they are drawn in one
 *     gdev_noise call into a staging buffer and split on the device;
 *   - the secondary logits batched per group as on the CPU: the primary's
 *     top is downloaded, the counting sort (row_of, pos_of, off) runs on the
 *     host in the CPU's code, the inputs are gathered by row on the device,
 *     and each group's logits are GEMMs over its rows (w_g and w_noise as two
 *     GEMMs into the halves of one [rows, 2 bs] block instead of the CPU's
 *     packed copy of the weights: the same products);
 *   - the sums of eqs. 13-14 (Importance_H, counts, the primary's and the
 *     secondaries' smooth loads) per expert on the device in the CPU's
 *     example order, downloaded; Load_H, the losses and, in backward, the
 *     CV^2 gradients and their split between the two levels on the host
 *     with the CPU's code.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gate_topk_core.cuh"  // provides: tkd_core
#include "gate_topk_core.h"    // provides: tk_cv2_grad, tk_fill_stats

#define GHMOE_BLOCK 256

typedef struct ghmoe_state {
    ccr_backend *be;
    ccr_gate_config cfg;
    size_t d, e, a, bs, k, k2, max_batch;
    size_t nm;                      /* draws per example: a + k bs */
    size_t batch, rows;             /* of the last forward; rows = batch k */
    bool train;                     /* mode of the last forward */
    ccr_arena *arena;               /* NULL until bind */
    size_t i_pg, i_pn, i_sg, i_sn;  /* primary / secondary w_g, w_noise */
    tkd_core prim;                  /* rows = max_batch, width a, top k */
    tkd_core sec;                   /* rows = max_batch k (row b k + p), width bs, top k2 */
    /* device */
    int32_t *ids;                   /* [max_batch, k k2] */
    float *weights;                 /* [max_batch, k k2] */
    int32_t *grp;                   /* [max_batch k] the group of secondary row r */
    size_t *perm;                   /* [2 max_batch k]: row_of [rows] then pos_of [rows] */
    float *xg;                      /* [max_batch k, d] inputs gathered in sorted order */
    float *y;                       /* [max_batch k, 2 bs] logits (clean | raw) or their
                                       gradients, sorted; [.., bs] clean only in eval */
    float *dxg;                     /* [max_batch k, d] dx contributions, sorted */
    float *noise;                   /* [max_batch, a + k bs] the draws, CPU order */
    float *dgp, *dgs;               /* [max_batch k], [max_batch k k2] gate-value gradients */
    double *sums;                   /* [3E + a]: Importance_H | counts | ls | lp */
    double *dvec;                   /* [2E + a]: dImportance | dls | dlp */
    int *flag;                      /* for gdev_find_nonfinite */
    /* host */
    float *noise_h;                 /* [max_batch, a + k bs] */
    int32_t *topp_h;                /* [max_batch, prim.ntop] the primary's top */
    size_t *perm_h;                 /* [2 max_batch k] as perm */
    size_t *off;                    /* [a + 1] group i owns positions off[i] .. off[i+1] */
    double *sums_h;                 /* [3E + a] as sums, ls and lp replaced by the counts and
                                       cnt when not smooth (hmoe_forward's memcpys) */
    double *load_h;                 /* [E] Load_H (eq. 14) */
    double *cnt_h;                  /* [a] |X^(i)|: the primary's true counts */
    double *dvec_h;                 /* [2E + a] as dvec */
    double *dload_h;                /* [E] dL/dLoad_H */
    double *lse_h;                  /* [max_batch + max_batch k] primary | secondary lse */
} ghmoe_state;

/* The draws of example b, [a primary | k bs secondary], to their rows: the
 * secondary rows b k .. b k + k - 1 are contiguous, so draw a + p bs + q is
 * entry q of row b k + p. */
static __global__ void ghmoe_split_noise_kernel(const float *src, size_t total, size_t nm,
                                                size_t a, size_t kbs, float *pn, float *sn)
{
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t b = t / nm, j = t % nm;
        if (j < a)
            pn[b * a + j] = src[t];
        else
            sn[b * kbs + (j - a)] = src[t];
    }
}

/* xg[pos] = x[b], b the example of the row at sorted position pos
 * (row_of[pos] / k), as the CPU's memcpys. */
static __global__ void ghmoe_gather_x_kernel(const float *x, const size_t *row_of, size_t k,
                                             size_t d, size_t total, float *xg)
{
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t pos = t / d, j = t % d;
        xg[t] = x[(row_of[pos] / k) * d + j];
    }
}

/* The group GEMMs' logits to the secondary rows: clean[r] = y[pos_of[r], 0 .. bs),
 * raw[r] = y[pos_of[r], bs .. 2 bs) in train. */
static __global__ void ghmoe_scatter_kernel(const float *y, const size_t *pos_of, size_t nc,
                                            size_t bs, size_t total, float *clean, float *raw,
                                            bool train)
{
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t r = t / bs, j = t % bs;
        const float *src = y + pos_of[r] * nc;
        clean[t] = src[j];
        if (train)
            raw[t] = src[bs + j];
    }
}

/* The reverse for backward: y[pos_of[r]] = dclean[r] | draw[r]. */
static __global__ void ghmoe_gather_grad_kernel(const float *dclean, const float *draw,
                                                const size_t *pos_of, size_t nc, size_t bs,
                                                size_t total, float *y, bool train)
{
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t r = t / bs, j = t % bs;
        float *dst = y + pos_of[r] * nc;
        dst[j] = dclean[t];
        if (train)
            dst[bs + j] = draw[t];
    }
}

/* hmoe_forward's pass 3 routes, slot t = b k k2 + p k2 + q = r k2 + q with
 * r = b k + p: id = i bs + tops[q] (i = topp[p]), weight =
 * (float)((double)gp[p] (double)gs[q]); grp[r] = i for the backward's dls. */
static __global__ void ghmoe_route_kernel(const int32_t *topp, size_t ntop_p, const float *gp,
                                          const int32_t *tops, size_t ntop_s, const float *gs,
                                          size_t k, size_t k2, size_t bs, size_t total,
                                          int32_t *ids, float *weights, int32_t *grp)
{
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t r = t / k2, q = t % k2, b = r / k, p = r % k;
        const int32_t i = topp[b * ntop_p + p];
        ids[t] = (int32_t)((size_t)i * bs + (size_t)tops[r * ntop_s + q]);
        weights[t] = (float)((double)gp[r] * (double)gs[r * k2 + q]); /* gp[b k + p] */
        if (q == 0)
            grp[r] = i;
    }
}

/* ls[i bs + j] = sum over b, then p in order, of the secondary P of row
 * b k + p at j when topp[p] == i (pass 3's `ls[i bs + j] += p[r bs + j]`);
 * one thread per expert. */
static __global__ void ghmoe_ls_kernel(const int32_t *topp, size_t ntop_p, const double *sp,
                                       size_t batch, size_t k, size_t bs, size_t e, double *ls)
{
    for (size_t id = blockIdx.x * (size_t)blockDim.x + threadIdx.x; id < e;
         id += (size_t)gridDim.x * blockDim.x) {
        const size_t i = id / bs, j = id % bs;
        double acc = 0.0;
        for (size_t b = 0; b < batch; b++)
            for (size_t p = 0; p < k; p++)
                if ((size_t)topp[b * ntop_p + p] == i)
                    acc += sp[(b * k + p) * bs + j];
        ls[id] = acc;
    }
}

/* hmoe_backward's per-row gate gradients, row r = b k + p: dwe = dweights +
 * dImportance per slot, dgs[q] = (float)(dwe gp[p]) and dgp[p] =
 * (float)(sum_q dwe gs[q]) in q order (unfused, as the CPU build). */
static __global__ void ghmoe_dg_kernel(const float *dweights, const double *dimp,
                                       const int32_t *ids, const float *gp, const float *gs,
                                       size_t k2, size_t rows, float *dgp, float *dgs)
{
    for (size_t r = blockIdx.x * (size_t)blockDim.x + threadIdx.x; r < rows;
         r += (size_t)gridDim.x * blockDim.x) {
        double acc = 0.0;
        for (size_t q = 0; q < k2; q++) {
            const size_t slot = r * k2 + q;
            const double dwe = (double)dweights[slot] + dimp[ids[slot]];
            acc = __dadd_rn(acc, __dmul_rn(dwe, (double)gs[slot]));
            dgs[slot] = (float)(dwe * (double)gp[r]);
        }
        dgp[r] = (float)acc;
    }
}

/* dx[b] += the sorted contributions of rows b k + p, p in order (float adds
 * in the CPU's order, whatever the groups). */
static __global__ void ghmoe_dx_kernel(const float *dxg, const size_t *pos_of, size_t k,
                                       size_t d, size_t total, float *dx)
{
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t b = t / d, j = t % d;
        float acc = dx[t];
        for (size_t p = 0; p < k; p++)
            acc += dxg[pos_of[b * k + p] * d + j];
        dx[t] = acc;
    }
}

static void ghmoe_free(void *state)
{
    ghmoe_state *s = (ghmoe_state *)state;
    ccr_backend *be = s->be;
    tkd_core_free(&s->prim);
    tkd_core_free(&s->sec);
    if (be != NULL) {
        void *dev[] = {s->ids, s->weights, s->grp, s->perm, s->xg,   s->y,
                       s->dxg, s->noise,   s->dgp, s->dgs,  s->sums, s->dvec, s->flag};
        for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
            ccr_backend_free_buffer(be, dev[i]);
    }
    void *host[] = {s->noise_h, s->topp_h, s->perm_h, s->off,     s->sums_h, s->load_h,
                    s->cnt_h,   s->dvec_h, s->dload_h, s->lse_h};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++)
        free(host[i]);
    memset(s, 0, sizeof *s);
}

static ccr_status ghmoe_init(void *state, ccr_backend *be, const ccr_gate *g, size_t max_batch)
{
    ghmoe_state *s = (ghmoe_state *)state;
    const ccr_gate_config *cfg = ccr_gate_get_config(g);
    if (cfg == NULL)
        CCR_FAIL(be->ctx, CCR_EINVAL, "gate hmoe: no host gate");
    /* The host gate validated the configuration (hmoe_check); re-checked
     * here only where a bad value would index out of bounds. */
    const size_t e = cfg->n_experts, a = cfg->n_groups, k = cfg->k_groups, k2 = cfg->k2;
    if (e == 0 || a == 0 || e % a != 0 || k == 0 || k > a || k2 == 0 || k2 > e / a ||
        e > (size_t)INT32_MAX || ccr_gate_n_matrices(g) != e || ccr_gate_slots(g) != k * k2)
        CCR_FAIL(be->ctx, CCR_EINVAL,
                 "gate hmoe: n_experts %zu, n_groups %zu, k_groups %zu, k2 %zu", e, a, k, k2);
    const size_t bs = e / a, d = cfg->d_in;
    size_t rows, slots, nm, noise_n, xd, yn, ntp, np, s3, s2, nl;
    /* k bs <= a bs = E and k <= a: the sums below cannot overflow before the
     * products are checked. */
    nm = a + k * bs;
    if (!ccr_mul_ok(max_batch, k, &rows) || !ccr_mul_ok(rows, k2, &slots) ||
        !ccr_mul_ok(max_batch, nm, &noise_n) || !ccr_mul_ok(rows, d, &xd) ||
        !ccr_mul3_ok(rows, 2, bs, &yn) || !ccr_mul_ok(max_batch, k + 1, &ntp) ||
        !ccr_mul_ok(rows, 2, &np) || !ccr_mul_ok(e, 3, &s3) || !ccr_add_ok(s3, a, &s3) ||
        !ccr_mul_ok(e, 2, &s2) || !ccr_add_ok(s2, a, &s2) || !ccr_add_ok(max_batch, rows, &nl))
        CCR_FAIL(be->ctx, CCR_EINVAL, "gate hmoe: sizes overflow (d_in %zu, n_experts %zu, "
                 "batch %zu)", d, e, max_batch);
    s->be = be;
    s->cfg = *cfg;
    s->d = d;
    s->e = e;
    s->a = a;
    s->bs = bs;
    s->k = k;
    s->k2 = k2;
    s->max_batch = max_batch;
    s->nm = nm;
    CCR_TRY(tkd_core_init(&s->prim, be, max_batch, a, k, cfg->noise_eps));
    ccr_status st = tkd_core_init(&s->sec, be, rows, bs, k2, cfg->noise_eps);
    if (st != CCR_OK) {
        tkd_core_free(&s->prim);
        return st;
    }
    s->prim.want_lse = s->sec.want_lse = cfg->z_loss > 0.0; /* lse: z-loss only */
    s->ids = (int32_t *)tkd_dev_buf(&st, be, slots, sizeof(int32_t));
    s->weights = (float *)tkd_dev_buf(&st, be, slots, sizeof(float));
    s->grp = (int32_t *)tkd_dev_buf(&st, be, rows, sizeof(int32_t));
    s->perm = (size_t *)tkd_dev_buf(&st, be, np, sizeof(size_t));
    s->xg = (float *)tkd_dev_buf(&st, be, xd, sizeof(float));
    s->y = (float *)tkd_dev_buf(&st, be, yn, sizeof(float));
    s->dxg = (float *)tkd_dev_buf(&st, be, xd, sizeof(float));
    s->noise = (float *)tkd_dev_buf(&st, be, noise_n, sizeof(float));
    s->dgp = (float *)tkd_dev_buf(&st, be, rows, sizeof(float));
    s->dgs = (float *)tkd_dev_buf(&st, be, slots, sizeof(float));
    s->sums = (double *)tkd_dev_buf(&st, be, s3, sizeof(double));
    s->dvec = (double *)tkd_dev_buf(&st, be, s2, sizeof(double));
    s->flag = (int *)tkd_dev_buf(&st, be, 1, sizeof(int));
    s->noise_h = (float *)tkd_host_buf(&st, be, noise_n, sizeof(float));
    s->topp_h = (int32_t *)tkd_host_buf(&st, be, ntp, sizeof(int32_t)); /* ntop <= k + 1 */
    s->perm_h = (size_t *)tkd_host_buf(&st, be, np, sizeof(size_t));
    s->off = (size_t *)tkd_host_buf(&st, be, a + 1, sizeof(size_t));
    s->sums_h = (double *)tkd_host_buf(&st, be, s3, sizeof(double));
    s->load_h = (double *)tkd_host_buf(&st, be, e, sizeof(double));
    s->cnt_h = (double *)tkd_host_buf(&st, be, a, sizeof(double));
    s->dvec_h = (double *)tkd_host_buf(&st, be, s2, sizeof(double));
    s->dload_h = (double *)tkd_host_buf(&st, be, e, sizeof(double));
    s->lse_h = (double *)tkd_host_buf(&st, be, nl, sizeof(double));
    if (st != CCR_OK) {
        ghmoe_free(s);
        return st;
    }
    return CCR_OK;
}

static ccr_status ghmoe_bind(void *state, ccr_arena *a, const char *prefix)
{
    ghmoe_state *s = (ghmoe_state *)state;
    ccr_ctx *ctx = s->be->ctx;
    CCR_TRY(gdev_find(a, ctx, prefix, "primary.w_g", &s->i_pg));
    CCR_TRY(gdev_find(a, ctx, prefix, "primary.w_noise", &s->i_pn));
    CCR_TRY(gdev_find(a, ctx, prefix, "secondary.w_g", &s->i_sg));
    CCR_TRY(gdev_find(a, ctx, prefix, "secondary.w_noise", &s->i_sn));
    s->arena = a;
    return CCR_OK;
}

/* The four weight matrices (values or gradients, device); false before bind
 * or finalize (hmoe_params). */
static bool ghmoe_params(const ghmoe_state *s, bool grad, float *w[4])
{
    if (s->arena == NULL)
        return false;
    const size_t idx[4] = {s->i_pg, s->i_pn, s->i_sg, s->i_sn};
    for (size_t i = 0; i < 4; i++) {
        w[i] = grad ? ccr_arena_grad(s->arena, idx[i]) : ccr_arena_value(s->arena, idx[i]);
        if (w[i] == NULL)
            return false;
    }
    return true;
}

/* hmoe_forward's counting sort of the rows b k + p by group (example order
 * kept), from the primary's top on the host: row_of[pos] = r, pos_of[r] =
 * pos, off[i] the start of group i, off[a] = rows; cnt[i] the group sizes
 * (pass 3's cnt[i] += 1.0, the same integers). */
static void ghmoe_sort(ghmoe_state *s, size_t batch)
{
    const size_t a = s->a, k = s->k, ntop = s->prim.ntop, rows = batch * k;
    size_t *off = s->off, *row_of = s->perm_h, *pos_of = s->perm_h + rows;
    for (size_t i = 0; i <= a; i++)
        off[i] = 0;
    for (size_t b = 0; b < batch; b++)
        for (size_t p = 0; p < k; p++)
            off[(size_t)s->topp_h[b * ntop + p] + 1]++;
    for (size_t i = 0; i < a; i++)
        off[i + 1] += off[i];
    for (size_t b = 0; b < batch; b++)
        for (size_t p = 0; p < k; p++) {
            const size_t r = b * k + p, pos = off[s->topp_h[b * ntop + p]]++;
            row_of[pos] = r;
            pos_of[r] = pos;
        }
    for (size_t i = a; i > 0; i--) /* back to the group starts */
        off[i] = off[i - 1];
    off[0] = 0;
    for (size_t i = 0; i < a; i++)
        s->cnt_h[i] = (double)(off[i + 1] - off[i]);
}

static ccr_status ghmoe_forward(void *state, const float *x, size_t batch, bool train,
                                gsl_rng *rng, ccr_route *route, ccr_gate_stats *stats)
{
    ghmoe_state *s = (ghmoe_state *)state;
    ccr_backend *be = s->be;
    cudaStream_t cs = gdev_stream(be);
    float *w[4];
    if (!ghmoe_params(s, false, w))
        CCR_FAIL(be->ctx, CCR_EINVAL, "gate hmoe: parameters not bound to a finalized arena");
    if (batch == 0 || batch > s->max_batch)
        CCR_FAIL(be->ctx, CCR_EBADLEN, "gate hmoe: batch %zu not in 1..%zu", batch,
                 s->max_batch);
    if (train && rng == NULL)
        CCR_FAIL(be->ctx, CCR_EINVAL, "hmoe: rng is NULL in train mode");
    const size_t d = s->d, a = s->a, bs = s->bs, k = s->k, k2 = s->k2, e = s->e;
    const size_t rows = batch * k, slots = rows * k2; /* <= the sizes of init */
    tkd_core *pc = &s->prim, *sc = &s->sec;
    const bool smooth_p = tkd_core_smooth(pc, train), smooth_s = tkd_core_smooth(sc, train);
    CCR_TRY(be->k->gemm(be, false, false, batch, a, d, 1.0f, x, d, w[0], a, 0.0f, pc->clean, a));
    if (train) {
        CCR_TRY(be->k->gemm(be, false, false, batch, a, d, 1.0f, x, d, w[1], a, 0.0f, pc->raw,
                            a));
        /* Pass 1's draws, per example: the primary's a, then bs per selected
         * group in top order. */
        const size_t total = batch * s->nm;
        CCR_TRY(gdev_noise(be, rng, s->noise_h, s->noise, total));
        ghmoe_split_noise_kernel<<<ccr_grid(total, GHMOE_BLOCK), GHMOE_BLOCK, 0, cs>>>(
            s->noise, total, s->nm, a, k * bs, pc->noise, sc->noise);
        CCR_CUDA_LAUNCHED(be);
    }
    CCR_TRY(tkd_core_forward(pc, batch, train));
    CCR_TRY(ccr_backend_get(be, s->topp_h, pc->top, batch * pc->ntop * sizeof(int32_t)));
    ghmoe_sort(s, batch);
    CCR_TRY(ccr_backend_set(be, s->perm, s->perm_h, 2 * rows * sizeof(size_t)));
    const size_t *row_of = s->perm, *pos_of = s->perm + rows;
    ghmoe_gather_x_kernel<<<ccr_grid(rows * d, GHMOE_BLOCK), GHMOE_BLOCK, 0, cs>>>(
        x, row_of, k, d, rows * d, s->xg);
    CCR_CUDA_LAUNCHED(be);
    /* Pass 2: per group, the logits of its rows (clean, and raw in train). */
    const size_t nc = train ? 2 * bs : bs;
    for (size_t i = 0; i < a; i++) {
        const size_t lo = s->off[i], n = s->off[i + 1] - lo;
        if (n == 0)
            continue;
        CCR_TRY(be->k->gemm(be, false, false, n, bs, d, 1.0f, s->xg + lo * d, d,
                            w[2] + i * d * bs, bs, 0.0f, s->y + lo * nc, nc));
        if (train)
            CCR_TRY(be->k->gemm(be, false, false, n, bs, d, 1.0f, s->xg + lo * d, d,
                                w[3] + i * d * bs, bs, 0.0f, s->y + lo * nc + bs, nc));
    }
    ghmoe_scatter_kernel<<<ccr_grid(rows * bs, GHMOE_BLOCK), GHMOE_BLOCK, 0, cs>>>(
        s->y, pos_of, nc, bs, rows * bs, sc->clean, sc->raw, train);
    CCR_CUDA_LAUNCHED(be);
    CCR_TRY(tkd_core_forward(sc, rows, train));
    /* Pass 3: routes, then the sums of eqs. 13-14 in example order. */
    ghmoe_route_kernel<<<ccr_grid(slots, GHMOE_BLOCK), GHMOE_BLOCK, 0, cs>>>(
        pc->top, pc->ntop, pc->gates, sc->top, sc->ntop, sc->gates, k, k2, bs, slots, s->ids,
        s->weights, s->grp);
    CCR_CUDA_LAUNCHED(be);
    CCR_TRY(tkd_check_weights(be, "hmoe", s->weights, batch, k * k2, s->flag));
    CCR_TRY(tkd_route_sums(be, s->ids, s->weights, batch, k * k2, e, s->sums, s->sums + e));
    if (smooth_s) {
        ghmoe_ls_kernel<<<ccr_grid(e, 128), 128, 0, cs>>>(pc->top, pc->ntop, sc->p, batch, k, bs,
                                                           e, s->sums + 2 * e);
        CCR_CUDA_LAUNCHED(be);
    }
    if (smooth_p)
        CCR_TRY(tkd_colsum_d(be, pc->p, batch, a, a, s->sums + 3 * e));
    CCR_TRY(ccr_backend_get(be, s->sums_h, s->sums, (3 * e + a) * sizeof(double)));
    double *imp = s->sums_h, *counts = s->sums_h + e, *ls = s->sums_h + 2 * e;
    double *lp = s->sums_h + 3 * e;
    if (!smooth_p)
        memcpy(lp, s->cnt_h, a * sizeof(double));
    if (!smooth_s)
        memcpy(ls, counts, e * sizeof(double));
    for (size_t i = 0; i < a; i++)
        for (size_t j = 0; j < bs; j++)
            s->load_h[i * bs + j] = lp[i] * ls[i * bs + j] / (s->cnt_h[i] + 1e-10);
    double zsum = 0.0;
    if (s->cfg.z_loss > 0.0) { /* else every lse is 0 on the CPU and loss_z is 0 */
        double *lp_lse = s->lse_h, *ls_lse = s->lse_h + batch;
        CCR_TRY(ccr_backend_get(be, lp_lse, pc->lse, batch * sizeof(double)));
        CCR_TRY(ccr_backend_get(be, ls_lse, sc->lse, rows * sizeof(double)));
        for (size_t b = 0; b < batch; b++) {
            zsum += lp_lse[b] * lp_lse[b];
            for (size_t p = 0; p < k; p++)
                zsum += ls_lse[b * k + p] * ls_lse[b * k + p];
        }
    }
    double loss_z = s->cfg.z_loss > 0.0 ? s->cfg.z_loss * zsum / (double)batch : 0.0;
    tk_fill_stats(stats, &s->cfg, imp, s->load_h, counts, e, loss_z);
    s->batch = batch;
    s->rows = rows;
    s->train = train;
    route->batch = batch;
    route->slots = k * k2;
    route->n_matrices = e;
    route->ids = s->ids;
    route->weights = s->weights;
    return CCR_OK;
}

static ccr_status ghmoe_backward(void *state, const ccr_gate_bwd_args *ar)
{
    ghmoe_state *s = (ghmoe_state *)state;
    ccr_backend *be = s->be;
    cudaStream_t cs = gdev_stream(be);
    float *w[4], *dw[4];
    if (!ghmoe_params(s, false, w) || !ghmoe_params(s, true, dw))
        CCR_FAIL(be->ctx, CCR_EINVAL, "gate hmoe: parameters not bound to a finalized arena");
    const size_t d = s->d, a = s->a, bs = s->bs, k = s->k, k2 = s->k2, e = s->e;
    const size_t batch = ar->batch;
    if (s->batch == 0 || batch != s->batch)
        CCR_FAIL(be->ctx, CCR_EINVAL, "gate hmoe: backward batch %zu, last forward %zu", batch,
                 s->batch);
    const size_t rows = s->rows;
    const bool train = s->train;
    tkd_core *pc = &s->prim, *sc = &s->sec;
    const bool smooth_p = tkd_core_smooth(pc, train), smooth_s = tkd_core_smooth(sc, train);
    const double *imp = s->sums_h, *ls = s->sums_h + 2 * e, *lp = s->sums_h + 3 * e;
    double *dimp = s->dvec_h, *dls = s->dvec_h + e, *dlp = s->dvec_h + 2 * e;
    tk_cv2_grad(imp, e, s->cfg.w_importance, dimp);
    tk_cv2_grad(s->load_h, e, smooth_p || smooth_s ? s->cfg.w_load : 0.0, s->dload_h);
    /* Load_H_ij = lp_i ls_ij / (cnt_i + 1e-10); cnt_i is a constant. */
    for (size_t i = 0; i < a; i++) {
        const double den = s->cnt_h[i] + 1e-10;
        double acc = 0.0;
        for (size_t j = 0; j < bs; j++) {
            acc += s->dload_h[i * bs + j] * ls[i * bs + j] / den;
            dls[i * bs + j] = s->dload_h[i * bs + j] * lp[i] / den;
        }
        dlp[i] = acc;
    }
    CCR_TRY(ccr_backend_set(be, s->dvec, s->dvec_h, (2 * e + a) * sizeof(double)));
    const double zcoef = s->cfg.z_loss > 0.0 ? s->cfg.z_loss / (double)batch : 0.0;
    /* The rows' gate gradients; Importance_H sums the weights, so its
     * gradient joins dweights before the product rule. */
    ghmoe_dg_kernel<<<ccr_grid(rows, 128), 128, 0, cs>>>(ar->dweights, s->dvec, s->ids,
                                                         pc->gates, sc->gates, k2, rows, s->dgp,
                                                         s->dgs);
    CCR_CUDA_LAUNCHED(be);
    CCR_TRY(tkd_core_backward(sc, rows, train, s->dgs, smooth_s ? s->dvec + e : NULL, s->grp,
                              zcoef));
    CCR_TRY(tkd_core_backward(pc, batch, train, s->dgp, smooth_p ? s->dvec + 2 * e : NULL, NULL,
                              zcoef));
    /* Per group, in the forward's sorted order: dW_i += X_i^T dlogits_i and
     * the rows' dx contributions dlogits_i W_i^T (w_g, then w_noise). */
    const size_t nc = train ? 2 * bs : bs;
    const size_t *row_of = s->perm, *pos_of = s->perm + rows;
    ghmoe_gather_x_kernel<<<ccr_grid(rows * d, GHMOE_BLOCK), GHMOE_BLOCK, 0, cs>>>(
        ar->x, row_of, k, d, rows * d, s->xg);
    CCR_CUDA_LAUNCHED(be);
    ghmoe_gather_grad_kernel<<<ccr_grid(rows * bs, GHMOE_BLOCK), GHMOE_BLOCK, 0, cs>>>(
        sc->dclean, sc->draw, pos_of, nc, bs, rows * bs, s->y, train);
    CCR_CUDA_LAUNCHED(be);
    for (size_t i = 0; i < a; i++) {
        const size_t lo = s->off[i], n = s->off[i + 1] - lo;
        if (n == 0)
            continue;
        const float *xi = s->xg + lo * d, *yi = s->y + lo * nc;
        const size_t wo = i * d * bs;
        CCR_TRY(be->k->gemm(be, true, false, d, bs, n, 1.0f, xi, d, yi, nc, 1.0f, dw[2] + wo,
                            bs));
        if (train)
            CCR_TRY(be->k->gemm(be, true, false, d, bs, n, 1.0f, xi, d, yi + bs, nc, 1.0f,
                                dw[3] + wo, bs));
        if (ar->dx != NULL) {
            CCR_TRY(be->k->gemm(be, false, true, n, d, bs, 1.0f, yi, nc, w[2] + wo, bs, 0.0f,
                                s->dxg + lo * d, d));
            if (train)
                CCR_TRY(be->k->gemm(be, false, true, n, d, bs, 1.0f, yi + bs, nc, w[3] + wo, bs,
                                    1.0f, s->dxg + lo * d, d));
        }
    }
    if (ar->dx != NULL) {
        ghmoe_dx_kernel<<<ccr_grid(batch * d, GHMOE_BLOCK), GHMOE_BLOCK, 0, cs>>>(
            s->dxg, pos_of, k, d, batch * d, ar->dx);
        CCR_CUDA_LAUNCHED(be);
    }
    /* The primary: gate_matmul_backward with w_g, then w_noise. */
    CCR_TRY(be->k->gemm(be, true, false, d, a, batch, 1.0f, ar->x, d, pc->dclean, a, 1.0f, dw[0],
                        a));
    if (ar->dx != NULL)
        CCR_TRY(be->k->gemm(be, false, true, batch, d, a, 1.0f, pc->dclean, a, w[0], a, 1.0f,
                            ar->dx, d));
    if (train) {
        CCR_TRY(be->k->gemm(be, true, false, d, a, batch, 1.0f, ar->x, d, pc->draw, a, 1.0f,
                            dw[1], a));
        if (ar->dx != NULL)
            CCR_TRY(be->k->gemm(be, false, true, batch, d, a, 1.0f, pc->draw, a, w[1], a, 1.0f,
                                ar->dx, d));
    }
    return CCR_OK;
}

const ccr_gate_dev_type ccr_gate_dev_hmoe = {
    .host = &ccr_gate_hmoe,
    .state_size = sizeof(ghmoe_state),
    .init = ghmoe_init,
    .free = ghmoe_free,
    .bind = ghmoe_bind,
    .forward = ghmoe_forward,
    .backward = ghmoe_backward,
};
