/*
 * gate_hmoe.c - hierarchical mixture of experts (Shazeer et al. 2017,
 * App. B).  A noisy top-k primary gate picks k = k_groups of a groups
 * (its own option: topk's k counts experts, hmoe's k_groups groups); for
 * each picked group i a secondary noisy top-k gate G_i picks k2 of its b
 * experts, and the route weight of expert (i, j) is
 * G_primary(x)_i * G_i(x)_j (eq. 12).
 * The losses are w_importance * CV(Importance_H)^2 with Importance_H(X)_ij =
 * sum_x G_primary(x)_i G_i(x)_j (eq. 13) and w_load * CV(Load_H)^2 with
 * Load_H(X)_ij = Load_primary(X)_i Load_i(X^(i))_j / |X^(i)| (eq. 14),
 * where |X^(i)| is the primary's true count plus 1e-10 (t2t), plus the
 * optional ST-MoE z-loss over every evaluated gate.  Each gate is the
 * shared noisy top-k row of gate_topk_core.c (eqs. 3-10); exact semantics
 * in docs/GATES.md, "hmoe".
 * The secondary gates run batched: a pass per example draws every random
 * number in the documented order (the draws do not depend on the secondary
 * logits), then each group's logits are one GEMM over the rows routed to
 * it (and so are its weight gradients and dx in backward).  The exports
 * noise.secondary, importance and load are built on request.
 */
#include <stdlib.h>
#include <string.h>

#include "gate_topk_core.h"
#include "gate_util.h"
#include "internal.h"

typedef struct hmoe_state {
    ccr_ctx *ctx;
    ccr_gate_config cfg;
    size_t d, e, a, bs, k, k2, max_batch, batch;
    bool train;                     /* mode of the last forward */
    ccr_arena *arena;
    size_t i_pg, i_pn, i_sg, i_sn;  /* primary / secondary w_g, w_noise */
    tk_core prim;                   /* rows = max_batch, width a, top k */
    tk_core sec;                    /* rows = max_batch * k (row b k + p), width bs, top k2 */
    int32_t *ids;                   /* [max_batch, k k2] */
    float *weights;                 /* [max_batch, k k2] */
    /* The secondary rows batched per group: rows r = b k + p sorted by
     * group (a counting sort in example order), row_of[pos] = r,
     * pos_of[r] = pos, group i owns positions off[i] .. off[i+1]. */
    size_t *row_of, *pos_of, *off;  /* [max_batch k], [max_batch k], [a + 1] */
    float *xg;                      /* [max_batch k, d] gathered inputs */
    float *y;                       /* [max_batch k, 2 bs] logits (clean | raw) or their
                                       gradients, sorted; [.., bs] clean only in eval */
    float *wcat, *dwcat;            /* [a, d, 2 bs]: w_g[i] | w_noise[i] side by side, and
                                       their gradients: one GEMM per group for both */
    float *dxg;                     /* [max_batch k, d] dx contributions, sorted */
    /* The export noise.secondary [batch, a, bs], built on request from the
     * secondary rows' draws (get_export); NULL until first asked for. */
    float *noise_sec;
    unsigned long fwd_seq, noise_sec_seq;   /* forwards done; the one noise_sec shows */
    double *imp, *load, *counts;    /* [a bs]: eq. 13, eq. 14, true counts */
    double *dimp, *dload, *ls, *dls;/* [a bs]; ls = Load_i(X^(i))_j */
    double *lp, *cnt, *dlp;         /* [a]: Load_primary, |X^(i)|, dL/dLoad_primary */
    float *imp_f, *load_f;          /* [a bs] exported copies, filled on request */
    unsigned char *seen;            /* [E] */
    float *dgp, *dgs;               /* [k], [k2] */
    double gbatch;                  /* the last forward's (global) batch */
    ccr_comm *comm;                 /* expert parallelism: statistics over its ranks */
    double *red;                    /* [3 e + 2 a + 2]: imp, counts, ls, lp, cnt, zsum, batch */
} hmoe_state;

static void hmoe_free(void *state)
{
    hmoe_state *s = state;
    tk_core_free(&s->prim);
    tk_core_free(&s->sec);
    void *bufs[] = {s->ids, s->weights, s->row_of, s->pos_of, s->off, s->xg, s->y, s->wcat,
                    s->dwcat, s->dxg, s->noise_sec, s->imp, s->load, s->counts, s->dimp,
                    s->dload, s->ls, s->dls, s->lp, s->cnt, s->dlp, s->imp_f, s->load_f,
                    s->seen, s->dgp, s->dgs, s->red};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        free(bufs[i]);
    memset(s, 0, sizeof *s);
}

static ccr_status hmoe_check(ccr_ctx *ctx, const ccr_gate_config *cfg)
{
    if (cfg->n_experts == 0)
        CCR_FAIL(ctx, CCR_EINVAL, "hmoe: n_experts is 0");
    if (cfg->n_experts > (size_t)INT32_MAX)
        CCR_FAIL(ctx, CCR_EINVAL, "hmoe: n_experts = %zu is too large", cfg->n_experts);
    if (cfg->n_groups == 0 || cfg->n_experts % cfg->n_groups != 0)
        CCR_FAIL(ctx, CCR_EINVAL, "hmoe: n_groups = %zu does not divide n_experts = %zu",
                 cfg->n_groups, cfg->n_experts);
    if (cfg->k_groups == 0 || cfg->k_groups > cfg->n_groups)
        CCR_FAIL(ctx, CCR_EINVAL, "hmoe: k_groups = %zu not in 1..n_groups (%zu)", cfg->k_groups,
                 cfg->n_groups);
    size_t bs = cfg->n_experts / cfg->n_groups;
    if (cfg->k2 == 0 || cfg->k2 > bs)
        CCR_FAIL(ctx, CCR_EINVAL, "hmoe: k2 = %zu not in 1..n_experts/n_groups (%zu)", cfg->k2,
                 bs);
    return tk_check_common(ctx, cfg);
}

static ccr_status hmoe_init(void *state, ccr_ctx *ctx, const ccr_gate_config *cfg,
                            size_t max_batch)
{
    hmoe_state *s = state;
    CCR_TRY(hmoe_check(ctx, cfg));
    size_t rows, slots, de, nsec;
    if (!ccr_mul_ok(max_batch, cfg->k_groups, &rows) || !ccr_mul_ok(rows, cfg->k2, &slots) ||
        !ccr_mul_ok(cfg->d_in, cfg->n_experts, &de) ||
        !ccr_mul_ok(max_batch, cfg->n_experts, &nsec))
        CCR_FAIL(ctx, CCR_EINVAL, "hmoe: sizes overflow (d_in %zu, n_experts %zu, batch %zu)",
                 cfg->d_in, cfg->n_experts, max_batch);
    s->ctx = ctx;
    s->cfg = *cfg;
    s->d = cfg->d_in;
    s->e = cfg->n_experts;
    s->a = cfg->n_groups;
    s->bs = cfg->n_experts / cfg->n_groups;
    s->k = cfg->k_groups;
    s->k2 = cfg->k2;
    s->max_batch = max_batch;
    CCR_TRY(tk_core_init(&s->prim, ctx, max_batch, s->a, s->k, cfg->noise_eps));
    ccr_status st = tk_core_init(&s->sec, ctx, rows, s->bs, s->k2, cfg->noise_eps);
    if (st != CCR_OK) {
        tk_core_free(&s->prim);
        return st;
    }
    s->prim.want_lse = s->sec.want_lse = cfg->z_loss > 0.0; /* lse: z-loss only */
    const size_t e = s->e, a = s->a;
    s->ids = calloc(slots, sizeof(int32_t));
    s->weights = calloc(slots, sizeof(float));
    s->row_of = calloc(rows, sizeof(size_t));
    s->pos_of = calloc(rows, sizeof(size_t));
    s->off = calloc(a + 1, sizeof(size_t));
    s->xg = ccr_calloc3(rows, s->d, sizeof(float));
    s->y = ccr_calloc3(rows, 2 * s->bs, sizeof(float)); /* bounded: 2 bs <= 2 E */
    s->wcat = ccr_calloc3(de, 2, sizeof(float));
    s->dwcat = ccr_calloc3(de, 2, sizeof(float));
    s->dxg = ccr_calloc3(rows, s->d, sizeof(float));
    s->imp = calloc(e, sizeof(double));
    s->load = calloc(e, sizeof(double));
    s->counts = calloc(e, sizeof(double));
    s->dimp = calloc(e, sizeof(double));
    s->dload = calloc(e, sizeof(double));
    s->ls = calloc(e, sizeof(double));
    s->dls = calloc(e, sizeof(double));
    s->lp = calloc(a, sizeof(double));
    s->cnt = calloc(a, sizeof(double));
    s->dlp = calloc(a, sizeof(double));
    s->imp_f = calloc(e, sizeof(float));
    s->load_f = calloc(e, sizeof(float));
    s->seen = calloc(e, 1);
    s->dgp = calloc(s->k, sizeof(float));
    s->dgs = calloc(s->k2, sizeof(float));
    if (!s->ids || !s->weights || !s->row_of || !s->pos_of || !s->off || !s->xg || !s->y ||
        !s->wcat || !s->dwcat || !s->dxg || !s->imp || !s->load || !s->counts ||
        !s->dimp || !s->dload || !s->ls || !s->dls || !s->lp || !s->cnt || !s->dlp ||
        !s->imp_f || !s->load_f || !s->seen || !s->dgp || !s->dgs) {
        hmoe_free(s);
        CCR_FAIL(ctx, CCR_ENOMEM, "hmoe: cannot allocate buffers for batch %zu", max_batch);
    }
    return CCR_OK;
}

static size_t hmoe_n_matrices(const void *state) { return ((const hmoe_state *)state)->e; }

static size_t hmoe_slots(const void *state)
{
    const hmoe_state *s = state;
    return s->k * s->k2;
}

static ccr_status hmoe_declare(void *state, ccr_arena *a, const char *prefix)
{
    hmoe_state *s = state;
    size_t sp[2] = {s->d, s->a}, ss[3] = {s->a, s->d, s->bs};
    CCR_TRY(gate_declare(a, prefix, "primary.w_g", 2, sp, &s->i_pg));
    CCR_TRY(gate_declare(a, prefix, "primary.w_noise", 2, sp, &s->i_pn));
    CCR_TRY(gate_declare(a, prefix, "secondary.w_g", 3, ss, &s->i_sg));
    CCR_TRY(gate_declare(a, prefix, "secondary.w_noise", 3, ss, &s->i_sn));
    s->arena = a;
    return CCR_OK;
}

/* The four weight matrices (values or gradients); false before finalize. */
static bool hmoe_params(const hmoe_state *s, bool grad, float *w[4])
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

static ccr_status hmoe_init_params(void *state, gsl_rng *rng)
{
    hmoe_state *s = state;
    float *w[4];
    if (!hmoe_params(s, false, w))
        CCR_FAIL(s->ctx, CCR_EINVAL, "hmoe: parameters not declared in a finalized arena");
    gate_init_weights(w[0], s->d * s->a, s->d, s->cfg.randomize, rng);
    gate_init_weights(w[1], s->d * s->a, s->d, s->cfg.randomize, rng);
    gate_init_weights(w[2], s->a * s->d * s->bs, s->d, s->cfg.randomize, rng);
    gate_init_weights(w[3], s->a * s->d * s->bs, s->d, s->cfg.randomize, rng);
    return CCR_OK;
}

/* The secondary weights of the GEMMs: in train w_g[i] | w_noise[i] packed
 * side by side into wcat [a, d, 2 bs] (one GEMM per group gives both
 * logits), in eval w_g itself.  Returns the matrices and sets *nc, the
 * columns per group. */
static const float *hmoe_sec_weights(hmoe_state *s, float *const w[4], bool train, size_t *nc)
{
    const size_t d = s->d, bs = s->bs;
    if (!train) {
        *nc = bs;
        return w[2];
    }
    *nc = 2 * bs;
    for (size_t i = 0; i < s->a; i++)
        for (size_t t = 0; t < d; t++) {
            float *dst = s->wcat + (i * d + t) * 2 * bs;
            memcpy(dst, w[2] + (i * d + t) * bs, bs * sizeof(float));
            memcpy(dst + bs, w[3] + (i * d + t) * bs, bs * sizeof(float));
        }
    return s->wcat;
}

static ccr_status hmoe_forward(void *state, const float *x, size_t batch, bool train,
                               gsl_rng *rng, ccr_route *route, ccr_gate_stats *st)
{
    hmoe_state *s = state;
    float *w[4];
    if (!hmoe_params(s, false, w))
        CCR_FAIL(s->ctx, CCR_EINVAL, "hmoe: parameters not declared in a finalized arena");
    if (train && rng == NULL)
        CCR_FAIL(s->ctx, CCR_EINVAL, "hmoe: rng is NULL in train mode");
    const size_t d = s->d, a = s->a, bs = s->bs, k = s->k, k2 = s->k2, e = s->e;
    tk_core *pc = &s->prim, *sc = &s->sec;
    const bool smooth_p = tk_core_smooth(pc, train), smooth_s = tk_core_smooth(sc, train);
    gate_matmul(x, w[0], batch, d, a, pc->clean, false);
    if (train)
        gate_matmul(x, w[1], batch, d, a, pc->raw, false);
    for (size_t i = 0; i <= a; i++)
        s->off[i] = 0;
    /* Pass 1, per example, every draw in the documented order: the
     * primary's a draws, then the bs draws of each selected group in top
     * order (into the secondary row, used once its logits exist). */
    for (size_t b = 0; b < batch; b++) {
        tk_core_row_forward(pc, b, train, rng);
        const int32_t *topp = pc->top + b * pc->ntop;
        for (size_t p = 0; p < k; p++) {
            s->off[(size_t)topp[p] + 1]++;
            if (train)
                gate_noise_fill(sc->noise + (b * k + p) * bs, bs, rng);
        }
    }
    /* Counting sort of the rows b k + p by group, example order kept. */
    for (size_t i = 0; i < a; i++)
        s->off[i + 1] += s->off[i];
    for (size_t b = 0; b < batch; b++) {
        const int32_t *topp = pc->top + b * pc->ntop;
        for (size_t p = 0; p < k; p++) {
            const size_t r = b * k + p, pos = s->off[topp[p]]++;
            s->row_of[pos] = r;
            s->pos_of[r] = pos;
            memcpy(s->xg + pos * d, x + b * d, d * sizeof(float));
        }
    }
    for (size_t i = a; i > 0; i--) /* back to the group starts */
        s->off[i] = s->off[i - 1];
    s->off[0] = 0;
    /* Pass 2: per group, one GEMM over its rows (clean and, in train, raw
     * logits together); the logits go to the rows. */
    size_t nc;
    const float *ws = hmoe_sec_weights(s, w, train, &nc);
    for (size_t i = 0; i < a; i++) {
        const size_t lo = s->off[i], n = s->off[i + 1] - lo;
        if (n > 0)
            gate_matmul(s->xg + lo * d, ws + i * d * nc, n, d, nc, s->y + lo * nc, false);
    }
    const size_t rows = batch * k;
    for (size_t pos = 0; pos < rows; pos++) {
        const size_t r = s->row_of[pos];
        memcpy(sc->clean + r * bs, s->y + pos * nc, bs * sizeof(float));
        if (train)
            memcpy(sc->raw + r * bs, s->y + pos * nc + bs, bs * sizeof(float));
        tk_core_row_forward_drawn(sc, r, train);
    }
    /* Pass 3, per example: routes and the sums of eqs. 13-14, in the order
     * of the per-example formulation (sums in double, index order). */
    for (size_t i = 0; i < e; i++)
        s->imp[i] = s->counts[i] = s->ls[i] = 0.0;
    for (size_t i = 0; i < a; i++)
        s->lp[i] = s->cnt[i] = 0.0;
    double zsum = 0.0;
    for (size_t b = 0; b < batch; b++) {
        const int32_t *topp = pc->top + b * pc->ntop;
        const float *gp = pc->gates + b * k;
        zsum += pc->lse[b] * pc->lse[b];
        if (smooth_p)
            for (size_t i = 0; i < a; i++)
                s->lp[i] += pc->p[b * a + i];
        for (size_t p = 0; p < k; p++) {
            const size_t i = (size_t)topp[p], r = b * k + p;
            s->cnt[i] += 1.0;
            zsum += sc->lse[r] * sc->lse[r];
            const int32_t *tops = sc->top + r * sc->ntop;
            const float *gs = sc->gates + r * k2;
            for (size_t q = 0; q < k2; q++) {
                const size_t id = i * bs + (size_t)tops[q], slot = b * k * k2 + p * k2 + q;
                s->ids[slot] = (int32_t)id;
                s->weights[slot] = (float)((double)gp[p] * (double)gs[q]);
                s->imp[id] += (double)s->weights[slot];
                s->counts[id] += 1.0;
            }
            if (smooth_s)
                for (size_t j = 0; j < bs; j++)
                    s->ls[i * bs + j] += sc->p[r * bs + j];
        }
    }
    double gb = (double)batch;  /* the global batch under expert parallelism */
    if (s->comm != NULL) {
        double *red = s->red;
        double *const parts[5] = {s->imp, s->counts, s->ls, s->lp, s->cnt};
        const size_t len[5] = {e, e, e, a, a};
        size_t o = 0;
        for (int t = 0; t < 5; o += len[t], t++)
            memcpy(red + o, parts[t], len[t] * sizeof *red);
        red[o] = zsum, red[o + 1] = gb;
        CCR_TRY(ccr_comm_allreduce_sum_f64(s->comm, red, o + 2));
        o = 0;
        for (int t = 0; t < 5; o += len[t], t++)
            memcpy(parts[t], red + o, len[t] * sizeof *red);
        zsum = red[o], gb = red[o + 1];
    }
    s->gbatch = gb;
    if (!smooth_p)
        memcpy(s->lp, s->cnt, a * sizeof(double));
    if (!smooth_s)
        memcpy(s->ls, s->counts, e * sizeof(double));
    for (size_t i = 0; i < a; i++)
        for (size_t j = 0; j < bs; j++)
            s->load[i * bs + j] = s->lp[i] * s->ls[i * bs + j] / (s->cnt[i] + 1e-10);
    double loss_z = s->cfg.z_loss > 0.0 ? s->cfg.z_loss * zsum / gb : 0.0;
    tk_fill_stats(st, &s->cfg, s->imp, s->load, s->counts, e, loss_z);
    st->distinct = gate_count_distinct(s->ids, batch * k * k2, e, s->seen);
    s->batch = batch;
    s->train = train;
    s->fwd_seq++;
    route->batch = batch;
    route->slots = k * k2;
    route->n_matrices = e;
    route->ids = s->ids;
    route->weights = s->weights;
    return CCR_OK;
}

static ccr_status hmoe_set_comm(void *state, ccr_comm *comm)
{
    hmoe_state *s = state;
    size_t n;
    if (!ccr_mul_ok(3, s->e, &n) || !ccr_add_ok(n, 2 * s->a + 2, &n))
        return CCR_ENOMEM;
    free(s->red);
    s->red = ccr_mallocn(n, sizeof *s->red);
    if (s->red == NULL)
        return CCR_ENOMEM;
    s->comm = comm;
    return CCR_OK;
}

static ccr_status hmoe_backward(void *state, const ccr_gate_bwd_args *ar)
{
    hmoe_state *s = state;
    float *w[4], *dw[4];
    if (!hmoe_params(s, false, w) || !hmoe_params(s, true, dw))
        CCR_FAIL(s->ctx, CCR_EINVAL, "hmoe: parameters not declared in a finalized arena");
    const size_t d = s->d, a = s->a, bs = s->bs, k = s->k, k2 = s->k2, e = s->e;
    const size_t batch = ar->batch;
    const bool train = s->train;
    tk_core *pc = &s->prim, *sc = &s->sec;
    const bool smooth_p = tk_core_smooth(pc, train), smooth_s = tk_core_smooth(sc, train);
    tk_cv2_grad(s->imp, e, s->cfg.w_importance, s->dimp);
    tk_cv2_grad(s->load, e, smooth_p || smooth_s ? s->cfg.w_load : 0.0, s->dload);
    /* Load_H_ij = lp_i ls_ij / (cnt_i + 1e-10); cnt_i is a constant. */
    for (size_t i = 0; i < a; i++) {
        const double den = s->cnt[i] + 1e-10;
        double acc = 0.0;
        for (size_t j = 0; j < bs; j++) {
            acc += s->dload[i * bs + j] * s->ls[i * bs + j] / den;
            s->dls[i * bs + j] = s->dload[i * bs + j] * s->lp[i] / den;
#ifdef CCR_MUTANT_HMOE_LOADH_SECONDARY  /* mutants: tests/gradcheck_mutants.sh */
            s->dls[i * bs + j] = 0.0;
#endif
        }
        s->dlp[i] = acc;
#ifdef CCR_MUTANT_HMOE_LOADH_PRIMARY
        s->dlp[i] = 0.0;
#endif
    }
    const double zcoef = s->cfg.z_loss > 0.0 ? s->cfg.z_loss / s->gbatch : 0.0;
    /* Per example: the rows' gate gradients (the weight matrices come
     * after, batched per group). */
    for (size_t b = 0; b < batch; b++) {
        const int32_t *topp = pc->top + b * pc->ntop;
        const float *gp = pc->gates + b * k;
        for (size_t p = 0; p < k; p++) {
            const size_t i = (size_t)topp[p], r = b * k + p;
            const float *gs = sc->gates + r * k2;
            double dgp = 0.0;
            /* weight = gp gs and Importance_H sums the weights, so the
             * importance gradient joins dweights before the product rule. */
            for (size_t q = 0; q < k2; q++) {
                const size_t slot = b * k * k2 + p * k2 + q;
                const double dwe = (double)ar->dweights[slot]
#ifndef CCR_MUTANT_HMOE_IMPORTANCE
                                   + s->dimp[s->ids[slot]]
#endif
                    ;
                dgp += dwe * (double)gs[q];
                s->dgs[q] = (float)(dwe * (double)gp[p]);
            }
            s->dgp[p] = (float)dgp;
            tk_core_row_backward(sc, r, train, s->dgs, smooth_s ? s->dls + i * bs : NULL,
                                 zcoef);
        }
        tk_core_row_backward(pc, b, train, s->dgp, smooth_p ? s->dlp : NULL, zcoef);
    }
    /* Per group, in the forward's sorted order: dW_i += X_i^T dlogits_i
     * and the rows' dx contributions dlogits_i W_i^T, one GEMM each for
     * w_g and w_noise together (train: packed as in the forward, the
     * packed gradient added to dw after). */
    const size_t rows = batch * k;
    size_t nc;
    const float *ws = hmoe_sec_weights(s, w, train, &nc);
    for (size_t pos = 0; pos < rows; pos++) {
        const size_t r = s->row_of[pos], b = r / k;
        memcpy(s->xg + pos * d, ar->x + b * d, d * sizeof(float));
        memcpy(s->y + pos * nc, sc->dclean + r * bs, bs * sizeof(float));
        if (train)
            memcpy(s->y + pos * nc + bs, sc->draw + r * bs, bs * sizeof(float));
    }
    if (ar->dx != NULL)
        memset(s->dxg, 0, rows * d * sizeof(float));
    if (train)
        memset(s->dwcat, 0, a * d * nc * sizeof(float));
    float *dxg = ar->dx != NULL ? s->dxg : NULL, *dws = train ? s->dwcat : dw[2];
    for (size_t i = 0; i < a; i++) {
        const size_t lo = s->off[i], n = s->off[i + 1] - lo;
        if (n > 0)
            gate_matmul_backward(s->xg + lo * d, ws + i * d * nc, s->y + lo * nc, n, d, nc,
                                 dws + i * d * nc, dxg ? dxg + lo * d : NULL);
    }
    if (train)
        for (size_t i = 0; i < a; i++)
            for (size_t t = 0; t < d; t++) {
                const float *src = s->dwcat + (i * d + t) * nc;
                float *g2 = dw[2] + (i * d + t) * bs, *g3 = dw[3] + (i * d + t) * bs;
                for (size_t j = 0; j < bs; j++) {
                    g2[j] += src[j];
                    g3[j] += src[bs + j];
                }
            }
    /* dx, per example in top order: a fixed order whatever the groups. */
    if (ar->dx != NULL)
        for (size_t b = 0; b < batch; b++) {
            float *dxb = ar->dx + b * d;
            for (size_t p = 0; p < k; p++) {
                const float *src = s->dxg + s->pos_of[b * k + p] * d;
                for (size_t j = 0; j < d; j++)
                    dxb[j] += src[j];
            }
        }
    gate_matmul_backward(ar->x, w[0], pc->dclean, batch, d, a, dw[0], ar->dx);
    if (train)
        gate_matmul_backward(ar->x, w[1], pc->draw, batch, d, a, dw[1], ar->dx);
    return CCR_OK;
}

static double hmoe_flops(const void *state, bool train)
{
    const hmoe_state *s = state;
    double f = 2.0 * (double)s->d * ((double)s->a + (double)s->k * (double)s->bs);
    return train ? 2.0 * f : f;
}

static double hmoe_matrices(const void *state)
{
    const hmoe_state *s = state;
    return (double)(s->k * s->k2);
}

static size_t hmoe_n_exports(const void *state)
{
    CCR_UNUSED(state);
    return 4;
}

/* noise.secondary [batch, a, bs] of the last forward, from the secondary
 * rows' draws: row b k + p is group top_p of example b, every other entry
 * 0.  Built on the first request after each forward (and the buffer on
 * the first request at all), so that a forward does not write B E floats
 * nobody reads. */
static ccr_status hmoe_noise_sec(hmoe_state *s)
{
    if (s->noise_sec != NULL && s->noise_sec_seq == s->fwd_seq)
        return CCR_OK;
    const size_t a = s->a, bs = s->bs, k = s->k, batch = s->batch;
    if (s->noise_sec == NULL) {
        s->noise_sec = ccr_calloc3(s->max_batch, s->e, sizeof(float));
        if (s->noise_sec == NULL)
            CCR_FAIL(s->ctx, CCR_ENOMEM, "hmoe: cannot allocate noise.secondary (%zu x %zu)",
                     s->max_batch, s->e);
    } else {
        memset(s->noise_sec, 0, batch * s->e * sizeof(float));
    }
    for (size_t b = 0; b < batch; b++) {
        const int32_t *topp = s->prim.top + b * s->prim.ntop;
        for (size_t p = 0; p < k; p++)
            memcpy(s->noise_sec + (b * a + (size_t)topp[p]) * bs,
                   s->sec.noise + (b * k + p) * bs, bs * sizeof(float));
    }
    s->noise_sec_seq = s->fwd_seq;
    return CCR_OK;
}

static ccr_status hmoe_get_export(const void *state, size_t i, const char **name, size_t *rank,
                                  size_t shape[4], const float **data)
{
    /* The gate allocated its state (ccr_gate_alloc), so it is not const:
     * the exports below are caches of the last forward, built on request,
     * and building them changes nothing else the gate shows. */
    hmoe_state *s = (hmoe_state *)(uintptr_t)state;
    static const char *const names[4] = {"noise.primary", "noise.secondary", "importance",
                                         "load"};
    memset(shape, 0, 4 * sizeof(size_t));
    *name = names[i];
    switch (i) {
    case 0:
        *rank = 2;
        shape[0] = s->batch;
        shape[1] = s->a;
        *data = s->prim.noise;
        break;
    case 1:
        CCR_TRY(hmoe_noise_sec(s));
        *rank = 3;
        shape[0] = s->batch;
        shape[1] = s->a;
        shape[2] = s->bs;
        *data = s->noise_sec;
        break;
    default:
        *rank = 2;
        shape[0] = s->a;
        shape[1] = s->bs;
        if (i == 2)
            for (size_t j = 0; j < s->e; j++)
                s->imp_f[j] = (float)s->imp[j];
        else
            for (size_t j = 0; j < s->e; j++)
                s->load_f[j] = (float)s->load[j];
        *data = i == 2 ? s->imp_f : s->load_f;
        break;
    }
    return CCR_OK;
}

const ccr_gate_type ccr_gate_hmoe = {
    .name = "hmoe",
    .paper = "Shazeer et al. 2017, hierarchical MoE, eqs. 12-14",
    .param_group = "gate.",
    .state_size = sizeof(hmoe_state),
    .init = hmoe_init,
    .free = hmoe_free,
    .n_matrices = hmoe_n_matrices,
    .slots = hmoe_slots,
    .declare = hmoe_declare,
    .init_params = hmoe_init_params,
    .forward = hmoe_forward,
    .backward = hmoe_backward,
    .flops = hmoe_flops,
    .matrices_per_example = hmoe_matrices,
    .n_exports = hmoe_n_exports,
    .get_export = hmoe_get_export,
    .options = CCR_GATE_OPT_N_EXPERTS | CCR_GATE_OPT_N_GROUPS | CCR_GATE_OPT_K_GROUPS |
               CCR_GATE_OPT_K2 | CCR_GATE_OPT_W_IMPORTANCE | CCR_GATE_OPT_W_LOAD |
               CCR_GATE_OPT_Z_LOSS | CCR_GATE_OPT_NOISE_EPS | CCR_GATE_OPT_RANDOMIZE,
    .set_comm = hmoe_set_comm,
};
