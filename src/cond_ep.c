/*
 * cond_ep.c - the conditional layer spread over the ranks of a
 * communicator: expert parallelism (Shazeer et al. 2017, section 3.1;
 * issue 12; ccr_cond_set_comm in ccr_cond.h).
 *
 * Rank r owns the bank matrices [m0, m1) (contiguous blocks, the first
 * n % P ranks one more); the gate is replicated.  The sign-bit tree in path
 * mode is laid out as Cho & Bengio's tree suggests instead: its top `level`
 * levels (2^level - 1 nodes, level the least with 2^level >= P, at most the
 * depth) are replicated - every rank holds them and computes them for its
 * own examples, their gradients summed over the ranks in the backward - and
 * the subtrees below are sharded by their prefix at that level (contiguous
 * blocks of the 2^level prefixes), so an example's deeper rows all go to
 * one rank and no rank computes every example's root.  Each matrix has an
 * owner (this rank for a replicated one) and a row there; the sort runs on
 * keys in (owner, id) order, so the groups of one destination stay
 * contiguous.  A forward on rank r's examples:
 *   1. the global batch's layout (every rank's batch size, one all-reduce),
 *      and in training the gate noise of the examples of lower ranks drawn
 *      and discarded, so that each rank draws its examples' noise as one
 *      process would (and afterwards the higher ranks' too);
 *   2. the gate and cond.c's stable counting sort of the used pairs by id:
 *      groups in ascending id, hence in ascending owner;
 *   3. the rows gathered in sorted order and sent, each group to the owner
 *      of its matrix, with one (local id, rows) descriptor per group
 *      (all-to-all of counts, of descriptors, of rows);
 *   4. the owner orders what it received by (matrix, source rank, source
 *      order) - the order of the pairs of one process with the global batch,
 *      whose examples are the ranks' in rank order - applies each matrix to
 *      its group with cond.c's own ccr_condi_apply (the same GEMMs on the
 *      same group as one process), and returns every output row to its
 *      source in the order it came;
 *   5. the source combines in slot order, as cond.c does.
 * The backward sends w dy per pair to the owners, which accumulate the
 * bank's gradients group by group exactly as cond.c's backward (output-bias
 * sums in row order, the same GEMMs) and return the rows of dL/dx; dL/dw
 * (the gate's input) is computed at the source, where dy and the outputs
 * are.  The gate's own backward runs on each rank's examples.
 *
 * The owner's buffers hold the rows it receives, which a batch bounds only
 * by P x max_batch x slots: they grow when a batch needs more (amortised:
 * doubling) and are otherwise reused.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena_impl.h"  // provides: ccr_arena_touch_row
#include "cond_impl.h"   // provides: struct ccr_cond, ccr_condi_*
#include "gate_util.h"   // provides: gate_noise_fill
#include "internal.h"    // provides: CCR_FAIL, CCR_TRY, ccr_mallocn, ccr_mul_ok

struct cond_ep {
    int P, rank;
    size_t n_own;              /* bank rows held here (replicated ones included) */
    /* The layout: every matrix's owner (this rank for a replicated one), its
     * row there, and the sort's keys in (owner, id) order with their
     * inverse - [n_mat] each, one block; lrow [n_mat] is c->lrow's storage. */
    int32_t *owner, *olid, *key, *kinv, *lrow;
    bool keyed;                /* the keys are not the ids (the tree's layout) */
    int32_t *kids;             /* [max_batch slots] the route's ids as keys */
    size_t n_rep;              /* replicated matrices: rows [0, n_rep) everywhere */
    double *rep_cnt;           /* [n_rep] rows per replicated matrix, this step */
    float *rep_save;           /* [n_rep row floats] their gradients before a backward */
    size_t cap_save;
    size_t dpe;                /* N(0, 1) draws per example of a training forward */
    float *noise;              /* [dpe] the discarded draws */
    double *bsz;               /* [P] every rank's batch this step */
    /* [P] each: groups, descriptor ints and rows sent / received, and the
     * element counts and offsets of one all-to-all */
    size_t *g_to, *g_from, *gfirst, *rows_to, *rows_to_off, *rows_from, *rows_from_off;
    size_t *sc, *sd, *rc, *rd;
    int32_t *desc;             /* [2 G_max] (local id, rows) of the groups sent */
    int32_t *desc_in;          /* [2 cap_desc] those received */
    size_t cap_desc;
    size_t *own_off, *own_next;/* [n_own + 1], [n_own]: the owner's groups */
    /* owner, for R received rows (capacity cap_rows) */
    size_t R, cap_rows;
    void *rows_work;
    size_t *perm;              /* [R] owner position -> received row */
    float *rx, *ox, *hid, *out, *ret, *rg, *ghid;
    double *acc;               /* [max(h, d_out)] */
    bool ready;                /* a forward's exchange is in place for backward */
    /* eval_dots across ranks (the sign-bit tree's straight-through backward):
     * one growable block, cap_dots pairs sent and received */
    void *dots_work;
    size_t cap_dots;
    size_t *d_to, *d_from, *d_to_off, *d_from_off;  /* [P] each, in dots_idx */
    size_t *dots_idx;          /* [4 P + n] the counters above, then pair order by owner */
    size_t cap_idx;
};

/* Matrices [*m0, *m1) of rank r of P over n: blocks of n / P, the first
 * n % P ranks one more. */
static void ep_block(size_t n, size_t P, size_t r, size_t *m0, size_t *m1)
{
    size_t q = n / P, rem = n % P;
    *m0 = r * q + (r < rem ? r : rem);
    *m1 = *m0 + q + (r < rem ? 1 : 0);
}

/* N(0, 1) draws per example of a training forward (gate_topk.c: one per
 * expert; gate_hmoe.c: the primary's a, then bs per selected group); 0 for
 * the gates that draw none. */
static size_t ep_draws_per_example(const ccr_cond *c)
{
    const ccr_gate_config *g = &c->cfg.gate_cfg;
    if (strcmp(c->cfg.gate->name, "topk") == 0)
        return g->n_experts;
    if (strcmp(c->cfg.gate->name, "hmoe") == 0 && g->n_groups > 0)
        return g->n_groups + g->k_groups * (g->n_experts / g->n_groups);
    return 0;
}

void ccr_condi_ep_free(ccr_cond *c)
{
    cond_ep *e = c->ep;
    if (e == NULL)
        return;
    free(e->rows_work);
    free(e->dots_work);
    free(e->dots_idx);
    free(e->desc_in);
    free(e->own_off);
    free(e->desc);
    free(e->bsz);
    free(e->g_to);
    free(e->noise);
    free(e->acc);
    free(e->owner);
    free(e->kids);
    free(e->rep_cnt);
    free(e->rep_save);
    free(e);
    c->ep = NULL;
    c->lrow = NULL;
}

/* The owner of matrix m (ep_block's inverse). */
static size_t ep_owner(size_t n, size_t P, size_t m)
{
    size_t q = n / P, rem = n % P, big = rem * (q + 1);
    return m < big ? m / (q + 1) : rem + (m - big) / q;
}

/* Every matrix's owner and row there, this rank's rows, and the keys (see
 * the top of the file); cnt is [P] scratch.  Blocks of matrices, or the
 * sign-bit path tree's replicated top and prefix-sharded subtrees. */
static void ep_layout(ccr_cond *c, cond_ep *e, size_t P, size_t r, size_t *cnt)
{
    const size_t n = c->n_mat;
    for (size_t p = 0; p < P; p++)
        cnt[p] = 0;
    if (c->tree && c->slots > 1) {
        size_t depth = c->slots - 1, lv = 0;
        while (((size_t)1 << lv) < P && lv < depth)
            lv++;
        const size_t npre = (size_t)1 << lv;
        e->n_rep = npre - 1;
        for (size_t m = 0, L = 0; m < n; m++) {
            if (m + 1 >= ((size_t)2 << L))
                L++;  /* m's level: 2^L - 1 <= m < 2^(L+1) - 1 */
            if (L < lv) {
                e->owner[m] = (int32_t)r;
                e->olid[m] = (int32_t)m;
            } else {
                size_t prefix = (m + 1 - ((size_t)1 << L)) >> (L - lv);
                size_t p = ep_owner(npre, P, prefix);
                e->owner[m] = (int32_t)p;
                e->olid[m] = (int32_t)(e->n_rep + cnt[p]++);
            }
        }
        e->n_own = e->n_rep + cnt[r];
    } else {
        for (size_t m = 0; m < n; m++) {
            size_t p = ep_owner(n, P, m), b0, b1;
            ep_block(n, P, p, &b0, &b1);
            e->owner[m] = (int32_t)p;
            e->olid[m] = (int32_t)(m - b0);
        }
    }
    /* Keys: matrices by (owner, id). */
    for (size_t p = 0; p < P; p++)
        cnt[p] = 0;
    for (size_t m = 0; m < n; m++)
        cnt[e->owner[m]]++;
    for (size_t p = 0, o = 0; p < P; p++) {
        size_t k = cnt[p];
        cnt[p] = o;
        o += k;
    }
    e->keyed = false;
    for (size_t m = 0; m < n; m++) {
        size_t k = cnt[e->owner[m]]++;
        e->key[m] = (int32_t)k;
        e->kinv[k] = (int32_t)m;
        e->keyed = e->keyed || k != m;
        e->lrow[m] = (size_t)e->owner[m] == r ? e->olid[m] : -1;
    }
}

ccr_status ccr_cond_set_comm(ccr_cond *c, ccr_comm *comm)
{
    if (c == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(c->ctx, comm);
    if (c->arena != NULL)
        CCR_FAIL(c->ctx, CCR_EINVAL, "set the communicator before ccr_cond_declare");
    if (c->comm != NULL)
        CCR_FAIL(c->ctx, CCR_EINVAL, "the layer already has a communicator");
    if (c->dev != NULL)
        CCR_FAIL(c->ctx, CCR_EUNSUP, "expert parallelism runs on the CPU backend");
    if (strcmp(ccr_comm_name(comm), "nccl") == 0)
        CCR_FAIL(c->ctx, CCR_EUNSUP, "expert parallelism moves host memory: comm self or mpi");
    const size_t P = (size_t)ccr_comm_size(comm), r = (size_t)ccr_comm_rank(comm);
    size_t m0, m1;
    ep_block(c->n_mat, P, r, &m0, &m1);
    cond_ep *e = calloc(1, sizeof *e);
    if (e == NULL)
        CCR_FAIL(c->ctx, CCR_ENOMEM, "cannot allocate the expert-parallel state");
    c->ep = e;
    e->P = (int)P;
    e->rank = (int)r;
    e->n_own = m1 - m0;
    e->dpe = ep_draws_per_example(c);
    size_t G = c->max_batch * c->slots < c->n_mat ? c->max_batch * c->slots : c->n_mat;
    size_t accn = c->h > c->cfg.d_out ? c->h : c->cfg.d_out;
    e->bsz = ccr_mallocn(P, sizeof *e->bsz);
    e->g_to = ccr_malloc3(P, 11, sizeof(size_t));
    e->desc = ccr_malloc3(G > 0 ? G : 1, 2, sizeof *e->desc);
    e->noise = ccr_mallocn(e->dpe > 0 ? e->dpe : 1, sizeof *e->noise);
    e->acc = ccr_mallocn(accn, sizeof *e->acc);
    e->owner = ccr_malloc3(c->n_mat, 5, sizeof *e->owner);
    if (!e->bsz || !e->g_to || !e->desc || !e->noise || !e->acc || !e->owner) {
        ccr_condi_ep_free(c);
        CCR_FAIL(c->ctx, CCR_ENOMEM, "cannot allocate the expert-parallel state (%zu ranks)", P);
    }
    e->olid = e->owner + c->n_mat, e->key = e->olid + c->n_mat;
    e->kinv = e->key + c->n_mat, e->lrow = e->kinv + c->n_mat;
    ep_layout(c, e, P, r, e->g_to);
    e->own_off = ccr_malloc3(e->n_own + 1, 2, sizeof *e->own_off);
    e->kids = e->keyed ? ccr_malloc3(c->max_batch, c->slots, sizeof *e->kids) : NULL;
    e->rep_cnt = ccr_mallocn(e->n_rep > 0 ? e->n_rep : 1, sizeof *e->rep_cnt);
    if (!e->own_off || (e->keyed && !e->kids) || !e->rep_cnt) {
        ccr_condi_ep_free(c);
        CCR_FAIL(c->ctx, CCR_ENOMEM, "cannot allocate the expert-parallel state (%zu ranks)", P);
    }
    size_t *z = e->g_to;
    e->g_from = z + P, e->gfirst = z + 2 * P, e->rows_to = z + 3 * P;
    e->rows_to_off = z + 4 * P, e->rows_from = z + 5 * P, e->rows_from_off = z + 6 * P;
    e->sc = z + 7 * P, e->sd = z + 8 * P, e->rc = z + 9 * P, e->rd = z + 10 * P;
    e->own_next = e->own_off + e->n_own + 1;
    /* Global statistics where the gate type can (every built-in gate). */
    if (c->cfg.gate->set_comm != NULL) {
        ccr_status s = ccr_gate_set_comm(c->gate, comm);
        if (s != CCR_OK) {
            ccr_condi_ep_free(c);
            return s;
        }
    }
    c->comm = comm;
    c->m0 = m0;
    c->m1 = m1;
    if (e->keyed || e->n_rep > 0) {  /* the tree's layout: rows by lrow */
        c->lrow = e->lrow;
        c->n_local = e->n_own;
        c->n_rep = e->n_rep;
        c->m0 = c->m1 = 0;
    }
    return CCR_OK;
}

ccr_status ccr_cond_owned(const ccr_cond *c, size_t *first, size_t *end)
{
    if (c == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(c->ctx, first);
    CCR_CHECK_NULL(c->ctx, end);
    if (c->lrow != NULL)
        CCR_FAIL(c->ctx, CCR_EUNSUP, "the sign-bit path tree's rows here are not one block "
                 "of matrices (ccr_cond_held lists them)");
    *first = c->m0;
    *end = c->m1;
    return CCR_OK;
}

ccr_status ccr_cond_held(const ccr_cond *c, size_t *ids, size_t cap, size_t *n,
                         size_t *n_replicated)
{
    if (c == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(c->ctx, n);
    CCR_CHECK_NULL(c->ctx, n_replicated);
    *n = c->lrow != NULL ? c->n_local : c->m1 - c->m0;
    *n_replicated = c->lrow != NULL ? c->n_rep : 0;
    if (ids == NULL)
        return CCR_OK;
    if (cap < *n)
        CCR_FAIL(c->ctx, CCR_EINVAL, "room for %zu ids, %zu rows held", cap, *n);
    for (size_t m = 0; m < c->n_mat; m++) {
        bool mine = c->lrow != NULL ? c->lrow[m] >= 0 : m >= c->m0 && m < c->m1;
        if (mine)
            ids[c->lrow != NULL ? (size_t)c->lrow[m] : m - c->m0] = m;
    }
    return CCR_OK;
}

/* Room for R received rows on the owner (and the descriptors of nd groups). */
static ccr_status ep_reserve(ccr_cond *c, size_t R, size_t nd)
{
    cond_ep *e = c->ep;
    if (nd > e->cap_desc) {
        size_t cap = nd > 2 * e->cap_desc ? nd : 2 * e->cap_desc;
        int32_t *d = ccr_malloc3(cap, 2, sizeof *d);
        if (d == NULL)
            CCR_FAIL(c->ctx, CCR_ENOMEM, "expert parallelism: %zu group descriptors", cap);
        free(e->desc_in);
        e->desc_in = d;
        e->cap_desc = cap;
    }
    if (R <= e->cap_rows)
        return CCR_OK;
    size_t cap = R > 2 * e->cap_rows ? R : 2 * e->cap_rows;
    size_t d_in = c->cfg.d_in, d_out = c->cfg.d_out, h = c->h;
    size_t dmax = d_in > d_out ? d_in : d_out, per = 0;
    /* floats per row: rx, ox [d_in]; hid, ghid [h]; out, rg [d_out]; ret [dmax] */
    bool ok = ccr_add_ok(2 * d_in, 2 * h, &per) && ccr_add_ok(per, 2 * d_out + dmax, &per);
    size_t fl = 0, bytes = 0;
    ok = ok && ccr_mul_ok(cap, per, &fl) && ccr_mul_ok(fl, sizeof(float), &bytes) &&
         ccr_add_ok(bytes, cap * sizeof(size_t) + 64, &bytes);
    if (!ok)
        CCR_FAIL(c->ctx, CCR_ENOMEM, "expert parallelism: %zu received rows overflow", cap);
    CCR_TRY(ccr_mem_check(c->ctx, bytes, "expert-parallel rows"));
    void *w = malloc(bytes);
    if (w == NULL)
        CCR_FAIL(c->ctx, CCR_ENOMEM, "expert parallelism: cannot allocate %zu bytes", bytes);
    free(e->rows_work);
    e->rows_work = w;
    e->cap_rows = cap;
    e->perm = w;
    float *f = (float *)(e->perm + cap);
    e->rx = f, f += cap * d_in;
    e->ox = f, f += cap * d_in;
    e->hid = f, f += cap * h;
    e->ghid = f, f += cap * h;
    e->out = f, f += cap * d_out;
    e->rg = f, f += cap * d_out;
    e->ret = f;
    return CCR_OK;
}

/* Element counts and offsets of one all-to-all: per rank, rows x width. */
static void ep_elems(const size_t *rows, const size_t *off, size_t P, size_t width, size_t *cnt,
                     size_t *disp)
{
    for (size_t p = 0; p < P; p++)
        cnt[p] = rows[p] * width, disp[p] = off[p] * width;
}

/* rows [src_rows] of width w in received layout -> owner order, or back. */
static void ep_permute(const size_t *perm, size_t R, size_t w, const float *src, float *dst,
                       bool to_owner)
{
    for (size_t o = 0; o < R; o++) {
        if (to_owner)
            memcpy(dst + o * w, src + perm[o] * w, w * sizeof *dst);
        else
            memcpy(dst + perm[o] * w, src + o * w, w * sizeof *dst);
    }
}

/* Draws and discards the gate noise of n examples. */
static void ep_skip_noise(cond_ep *e, size_t n, gsl_rng *rng)
{
    for (size_t b = 0; b < n; b++)
        gate_noise_fill(e->noise, e->dpe, rng);
}

ccr_status ccr_condi_ep_forward(ccr_cond *c, const float *x, size_t batch, bool train,
                                gsl_rng *rng, float *y, ccr_gate_stats *stats)
{
    CCR_CHECK_NULL(c->ctx, x);
    if (batch == 0 || batch > c->max_batch)
        CCR_FAIL(c->ctx, CCR_EBADLEN, "batch %zu not in 1..%zu", batch, c->max_batch);
    cond_ep *e = c->ep;
    ccr_comm *comm = c->comm;
    const size_t P = (size_t)e->P, r = (size_t)e->rank, S = c->slots;
    const size_t d_in = c->cfg.d_in, d_out = c->cfg.d_out, h = c->h;
    e->ready = false;
    c->batch = 0;

    /* 1. The global batch: every rank's size; the noise of the others. */
    for (size_t p = 0; p < P; p++)
        e->bsz[p] = 0.0;
    e->bsz[r] = (double)batch;
    CCR_TRY(ccr_comm_allreduce_sum_f64(comm, e->bsz, P));
    size_t before = 0, total = 0;
    for (size_t p = 0; p < P; p++) {
        before += p < r ? (size_t)e->bsz[p] : 0;
        total += (size_t)e->bsz[p];
    }
    if (train && e->dpe > 0)
        ep_skip_noise(e, before, rng);
    ccr_route rt;
    ccr_gate_stats st;
    CCR_TRY(ccr_gate_forward(c->gate, x, batch, train, rng, &rt, &st));
    if (train && e->dpe > 0)
        ep_skip_noise(e, total - before - batch, rng);

    /* 2. Sort the used pairs by id; 3. gather the rows in sorted order. */
    memcpy(c->xin, x, batch * d_in * sizeof *x);
    if (e->keyed) {  /* sort by (owner, id): the ids as keys, then back */
        ccr_route rk = rt;
        for (size_t q = 0; q < batch * S; q++) {
            int32_t id = rt.ids[q];
            e->kids[q] = id >= 0 && (size_t)id < c->n_mat ? e->key[id] : id;
        }
        rk.ids = e->kids;
        CCR_TRY(ccr_condi_sort(c, &rk, batch * S));
        for (size_t q = 0; q < c->n_groups; q++)
            c->gid[q] = e->kinv[c->gid[q]];
    } else {
        CCR_TRY(ccr_condi_sort(c, &rt, batch * S));
    }
    for (size_t q = 0; q < c->n_pairs; q++)
        memcpy(c->xg + q * d_in, x + ((size_t)c->src[q] / S) * d_in, d_in * sizeof *x);
    /* Groups per owner (the keys' order is ascending owner). */
    size_t g = 0;
    for (size_t p = 0; p < P; p++) {
        e->gfirst[p] = g;
        e->rows_to_off[p] = g < c->n_groups ? c->goff[g] : c->n_pairs;
        e->g_to[p] = e->rows_to[p] = 0;
        while (g < c->n_groups && (size_t)e->owner[c->gid[g]] == p) {
            size_t rows = c->goff[g + 1] - c->goff[g];
            e->desc[2 * g] = e->olid[c->gid[g]];
            e->desc[2 * g + 1] = (int32_t)rows;
            e->g_to[p]++;
            e->rows_to[p] += rows;
            g++;
        }
    }
    CCR_TRY(ccr_comm_alltoall_counts(comm, e->g_to, e->g_from));
    size_t nd = 0;
    for (size_t p = 0; p < P; p++) {
        e->sc[p] = 2 * e->g_to[p], e->sd[p] = 2 * e->gfirst[p];
        e->rc[p] = 2 * e->g_from[p], e->rd[p] = 2 * nd;
        nd += e->g_from[p];
    }
    CCR_TRY(ep_reserve(c, 0, nd));
    CCR_TRY(ccr_comm_alltoallv_i32(comm, e->desc, e->sc, e->sd, e->desc_in, e->rc, e->rd));

    /* 4. The owner: rows per source, its groups in (matrix, source) order. */
    size_t R = 0, k = 0;
    for (size_t i = 0; i < e->n_own; i++)
        e->own_off[i + 1] = 0;
    for (size_t p = 0; p < P; p++) {
        e->rows_from_off[p] = R;
        e->rows_from[p] = 0;
        for (size_t j = 0; j < e->g_from[p]; j++, k++) {
            int32_t lid = e->desc_in[2 * k], n = e->desc_in[2 * k + 1];
            if (lid < 0 || (size_t)lid >= e->n_own || n <= 0)
                CCR_FAIL(c->ctx, CCR_ECOMM, "rank %zu sent group (%d, %d) to rank %zu, which "
                         "owns %zu matrices", p, (int)lid, (int)n, r, e->n_own);
            e->own_off[lid + 1] += (size_t)n;
            e->rows_from[p] += (size_t)n;
        }
        R += e->rows_from[p];
    }
    for (size_t i = 0; i < e->n_rep; i++)  /* replicated: this rank's own rows only */
        e->rep_cnt[i] = (double)e->own_off[i + 1];
    CCR_TRY(ep_reserve(c, R, nd));
    e->R = R;
    e->own_off[0] = 0;
    for (size_t i = 0; i < e->n_own; i++) {
        e->own_off[i + 1] += e->own_off[i];
        e->own_next[i] = e->own_off[i];
    }
    k = 0;
    for (size_t p = 0; p < P; p++) {
        size_t row = e->rows_from_off[p];
        for (size_t j = 0; j < e->g_from[p]; j++, k++) {
            size_t lid = (size_t)e->desc_in[2 * k], n = (size_t)e->desc_in[2 * k + 1];
            for (size_t i = 0; i < n; i++)
                e->perm[e->own_next[lid]++] = row++;
        }
    }
    ep_elems(e->rows_to, e->rows_to_off, P, d_in, e->sc, e->sd);
    ep_elems(e->rows_from, e->rows_from_off, P, d_in, e->rc, e->rd);
    CCR_TRY(ccr_comm_alltoallv(comm, c->xg, e->sc, e->sd, e->rx, e->rc, e->rd));
    ep_permute(e->perm, R, d_in, e->rx, e->ox, true);
    for (size_t i = 0; i < e->n_own; i++) {
        size_t o0 = e->own_off[i], n = e->own_off[i + 1] - o0;
        if (n > 0)
            CCR_TRY(ccr_condi_apply(c, i, e->ox + o0 * d_in, e->hid + o0 * h,
                                    e->out + o0 * d_out, n));
    }
    ep_permute(e->perm, R, d_out, e->out, e->ret, false);
    ep_elems(e->rows_from, e->rows_from_off, P, d_out, e->sc, e->sd);
    ep_elems(e->rows_to, e->rows_to_off, P, d_out, e->rc, e->rd);
    CCR_TRY(ccr_comm_alltoallv(comm, e->ret, e->sc, e->sd, c->out, e->rc, e->rd));

    /* 5. Combine in slot order. */
    c->route = rt;
    c->batch = batch;
    c->job_x = x;
    c->job_y = y;
    ccr_pool_run(c->pool, ccr_condi_combine_job, c);
    e->ready = true;
    st.flops_counted = ccr_gate_flops(c->gate, train) +
                       (double)c->n_pairs / (double)batch * ccr_cond_matrix_flops(c) +
                       (c->cfg.residual ? (double)d_out : 0.0);
    *stats = st;
    return CCR_OK;
}

/* Grows *buf to at least `bytes` (doubling); CCR_ENOMEM on failure. */
static ccr_status ep_grow(ccr_cond *c, void **buf, size_t *cap, size_t bytes)
{
    if (bytes <= *cap)
        return CCR_OK;
    size_t want = bytes > 2 * *cap ? bytes : 2 * *cap;
    CCR_TRY(ccr_mem_check(c->ctx, want, "expert-parallel evaluations"));
    void *p = malloc(want);
    if (p == NULL)
        CCR_FAIL(c->ctx, CCR_ENOMEM, "expert parallelism: cannot allocate %zu bytes", want);
    free(*buf);
    *buf = p;
    *cap = want;
    return CCR_OK;
}

/* eval_dots across ranks: out[i] = dy[row[i]] . M_mat[i](x[row[i]]) for
 * matrices anywhere.  Each pair's rows (x | dy) go to the owner of its
 * matrix (all-to-all of counts, int32 local ids, rows); the owner groups
 * what it received by matrix (stable), applies ccr_condi_apply per group
 * and returns each dot (a double as two int32) in the order received.
 * Every rank calls it once per backward (the gate does). */
static ccr_status ep_eval_dots(void *bank, size_t n, const size_t *mat, const size_t *row,
                               const float *x, const float *dy, double *out)
{
    ccr_cond *c = bank;
    cond_ep *e = c->ep;
    ccr_comm *comm = c->comm;
    const size_t P = (size_t)e->P, d_in = c->cfg.d_in, d_out = c->cfg.d_out, h = c->h;
    const size_t w = d_in + d_out;
    /* Pairs by owner, stable. */
    size_t need = 4 * P + n, bytes;
    if (!ccr_mul_ok(need, sizeof(size_t), &bytes))
        CCR_FAIL(c->ctx, CCR_ENOMEM, "expert parallelism: %zu pairs", n);
    CCR_TRY(ep_grow(c, (void **)&e->dots_idx, &e->cap_idx, bytes));
    size_t *to = e->dots_idx, *from = to + P, *to_off = from + P, *from_off = to_off + P;
    size_t *order = from_off + P;
    for (size_t p = 0; p < P; p++)
        to[p] = 0;
    for (size_t i = 0; i < n; i++)
        to[e->owner[mat[i]]]++;
    for (size_t p = 0, o = 0; p < P; o += to[p], p++)
        to_off[p] = o;
    CCR_TRY(ccr_comm_alltoall_counts(comm, to, from));
    size_t R = 0;
    for (size_t p = 0; p < P; p++)
        from_off[p] = R, R += from[p];
    /* One block: sent ids [n], rows [n, w], results back [n] doubles;
     * received ids [R], rows [R, w], their order [R], gathered x [R, d_in],
     * hid [R, h], outputs [R, d_out], results [R] doubles. */
    size_t fl = 0, b2 = 0;
    bool ok = ccr_mul_ok(n + R, w, &fl) && ccr_add_ok(fl, R * (d_in + h + d_out), &fl) &&
              ccr_mul_ok(fl, sizeof(float), &b2) &&
              ccr_add_ok(b2, (n + R) * (sizeof(int32_t) + sizeof(double) + sizeof(size_t)) + 64,
                         &b2);
    if (!ok)
        CCR_FAIL(c->ctx, CCR_ENOMEM, "expert parallelism: %zu + %zu evaluations", n, R);
    CCR_TRY(ep_grow(c, &e->dots_work, &e->cap_dots, b2));
    double *res_back = e->dots_work, *res = res_back + n;
    size_t *rorder = (size_t *)(res + R);
    int32_t *ids = (int32_t *)(rorder + R), *rids = ids + n;
    float *rows = (float *)(rids + R), *rrows = rows + n * w, *xg = rrows + R * w;
    float *hid = xg + R * d_in, *ob = hid + R * h;
    /* Sources: ids and (x | dy) rows in owner order (to_off as the cursor). */
    for (size_t i = 0; i < n; i++) {
        size_t p = (size_t)e->owner[mat[i]], k = to_off[p]++;
        order[k] = i;
        ids[k] = e->olid[mat[i]];
        memcpy(rows + k * w, x + row[i] * d_in, d_in * sizeof *rows);
        memcpy(rows + k * w + d_in, dy + row[i] * d_out, d_out * sizeof *rows);
    }
    for (size_t p = 0; p < P; p++)
        to_off[p] -= to[p];  /* back to the starts */
    CCR_TRY(ccr_comm_alltoallv_i32(comm, ids, to, to_off, rids, from, from_off));
    ep_elems(to, to_off, P, w, e->sc, e->sd);
    ep_elems(from, from_off, P, w, e->rc, e->rd);
    CCR_TRY(ccr_comm_alltoallv(comm, rows, e->sc, e->sd, rrows, e->rc, e->rd));
    /* Owner: stable counting sort of the received pairs by local matrix. */
    size_t *ooff = e->own_off, *onext = e->own_next;
    for (size_t i = 0; i <= e->n_own; i++)
        ooff[i] = 0;
    for (size_t j = 0; j < R; j++) {
        if (rids[j] < 0 || (size_t)rids[j] >= e->n_own)
            CCR_FAIL(c->ctx, CCR_ECOMM, "an evaluation names matrix %d of %zu here",
                     (int)rids[j], e->n_own);
        ooff[rids[j] + 1]++;
    }
    for (size_t i = 0; i < e->n_own; i++)
        ooff[i + 1] += ooff[i], onext[i] = ooff[i];
    for (size_t j = 0; j < R; j++)
        rorder[onext[rids[j]]++] = j;
    for (size_t o = 0; o < R; o++)
        memcpy(xg + o * d_in, rrows + rorder[o] * w, d_in * sizeof *xg);
    for (size_t i = 0; i < e->n_own; i++) {
        size_t o0 = ooff[i], k = ooff[i + 1] - o0;
        if (k == 0)
            continue;
        CCR_TRY(ccr_condi_apply(c, i, xg + o0 * d_in, hid + o0 * h, ob + o0 * d_out, k));
        for (size_t o = o0; o < o0 + k; o++)
            res[rorder[o]] = ccr_condi_dot(rrows + rorder[o] * w + d_in, ob + o * d_out, d_out);
    }
    /* The dots back, a double as two int32, in the order each source sent. */
    for (size_t p = 0; p < P; p++) {
        e->sc[p] = 2 * from[p], e->sd[p] = 2 * from_off[p];
        e->rc[p] = 2 * to[p], e->rd[p] = 2 * to_off[p];
    }
    CCR_TRY(ccr_comm_alltoallv_i32(comm, (const int32_t *)res, e->sc, e->sd,
                                   (int32_t *)res_back, e->rc, e->rd));
    for (size_t k = 0; k < n; k++)
        out[order[k]] = res_back[k];
    return CCR_OK;
}

/* The replicated matrices' gradients (rows [0, n_rep) of every bank
 * tensor).  Before the backward (done false): set aside what they hold and
 * zero them, so that the all-reduce sums only this step's contributions.
 * After it (done true): sum them and the rows each matrix received over the
 * ranks, add back what was set aside, and touch the rows any rank used (as
 * one process touches the matrices its batch used), on every rank. */
static ccr_status ep_replicated_grads(ccr_cond *c, bool done)
{
    cond_ep *e = c->ep;
    ccr_arena *a = c->arena;
    size_t idx[4] = {c->p_w1, c->p_b1, cond_ffn(c) ? c->p_w2 : SIZE_MAX,
                     cond_ffn(c) ? c->p_b2 : SIZE_MAX};
    size_t total = 0, len[4] = {0, 0, 0, 0};
    for (size_t t = 0; t < 4; t++)
        if (idx[t] != SIZE_MAX) {
            len[t] = ccr_arena_size(a, idx[t]) / ccr_arena_shape(a, idx[t])[0] * e->n_rep;
            total += len[t];
        }
    if (!done) {
        size_t bytes;
        if (!ccr_mul_ok(total, sizeof(float), &bytes))
            CCR_FAIL(c->ctx, CCR_ENOMEM, "replicated gradients of %zu floats", total);
        CCR_TRY(ep_grow(c, (void **)&e->rep_save, &e->cap_save, bytes));
    }
    float *save = e->rep_save;
    for (size_t t = 0; t < 4; t++) {
        if (idx[t] == SIZE_MAX)
            continue;
        float *g = ccr_arena_grad(a, idx[t]);
        if (!done) {
            memcpy(save, g, len[t] * sizeof *g);
            memset(g, 0, len[t] * sizeof *g);
        } else {
            CCR_TRY(ccr_comm_allreduce_sum(c->comm, g, len[t]));
            for (size_t i = 0; i < len[t]; i++)
                g[i] += save[i];
        }
        save += len[t];
    }
    if (!done)
        return CCR_OK;
    CCR_TRY(ccr_comm_allreduce_sum_f64(c->comm, e->rep_cnt, e->n_rep));
    for (size_t i = 0; i < e->n_rep; i++)
        if (e->rep_cnt[i] > 0.0)
            for (size_t t = 0; t < 4; t++)
                if (idx[t] != SIZE_MAX)
                    ccr_arena_touch_row(a, idx[t], i);
    return CCR_OK;
}

ccr_status ccr_condi_ep_backward(ccr_cond *c, const float *dy, float *dx)
{
    cond_ep *e = c->ep;
    if (!e->ready)
        CCR_FAIL(c->ctx, CCR_EINVAL, "backward without a forward pass");
    ccr_comm *comm = c->comm;
    const size_t P = (size_t)e->P, S = c->slots, R = e->R;
    const size_t d_in = c->cfg.d_in, d_out = c->cfg.d_out, h = c->h, batch = c->batch;

    /* The source: dL/d(out) = w dy and dL/dw = <dy, out> per pair. */
    memset(c->dweights, 0, batch * S * sizeof *c->dweights);
    ccr_condi_gout(c, 0, c->n_pairs, dy);
    ep_elems(e->rows_to, e->rows_to_off, P, d_out, e->sc, e->sd);
    ep_elems(e->rows_from, e->rows_from_off, P, d_out, e->rc, e->rd);
    CCR_TRY(ccr_comm_alltoallv(comm, c->g_out, e->sc, e->sd, e->rg, e->rc, e->rd));

    /* The owner: its groups' gradients as cond.c's backward computes them. */
    float *og = e->out;  /* the forward's outputs are not needed any more */
    ep_permute(e->perm, R, d_out, e->rg, og, true);
    float *gx = e->rx;   /* nor its received rows */
    ccr_arena *a = c->arena;
    if (e->n_rep > 0)
        CCR_TRY(ep_replicated_grads(c, false));
    for (size_t i = 0; i < e->n_own; i++) {
        size_t o0 = e->own_off[i], n = e->own_off[i + 1] - o0;
        if (n == 0)
            continue;
        if (i >= e->n_rep) {  /* replicated rows: touched below, where any rank used them */
            ccr_arena_touch_row(a, c->p_w1, i);
            ccr_arena_touch_row(a, c->p_b1, i);
            if (cond_ffn(c)) {
                ccr_arena_touch_row(a, c->p_w2, i);
                ccr_arena_touch_row(a, c->p_b2, i);
            }
        }
        CCR_TRY(ccr_condi_bank_bwd(c, i, n, e->ox + o0 * d_in, e->hid + o0 * h,
                                   og + o0 * d_out, e->ghid + o0 * h,
                                   dx != NULL ? gx + o0 * d_in : NULL, e->acc));
    }
    if (e->n_rep > 0)
        CCR_TRY(ep_replicated_grads(c, true));
    /* dL/dx rows back to their sources, then the gather per example. */
    if (dx != NULL) {
        ep_permute(e->perm, R, d_in, gx, e->ret, false);
        ep_elems(e->rows_from, e->rows_from_off, P, d_in, e->sc, e->sd);
        ep_elems(e->rows_to, e->rows_to_off, P, d_in, e->rc, e->rd);
        CCR_TRY(ccr_comm_alltoallv(comm, e->ret, e->sc, e->sd, c->g_x, e->rc, e->rd));
        c->job_dy = dy;
        c->job_y = dx;
        ccr_pool_run(c->pool, ccr_condi_dx_job, c);
    }
    ccr_gate_bwd_args ga = {.x = c->xin, .batch = batch, .dweights = c->dweights, .dx = dx,
                            .dy = dy, .d_out = d_out, .eval_matrix = NULL, .bank = c,
                            .scratch = c->eval_out, .eval_dots = ep_eval_dots};
    return ccr_gate_backward(c->gate, &ga);
}

/* ---- checkpoints: the bank as one process holds it ------------------------ */

void ccr_condi_bank_layout(const ccr_cond *c, ccr_bank_full *b)
{
    static const char *const ffn[4] = {"w1", "b1", "w2", "b2"}, *const lin[2] = {"w", "b"};
    const size_t n = c->n_mat, d_in = c->cfg.d_in, d_out = c->cfg.d_out, h = c->h;
    memset(b, 0, sizeof *b);
    b->n = cond_ffn(c) ? 4 : 2;
    const size_t sh[4][2] = {{d_in, cond_ffn(c) ? h : d_out}, {cond_ffn(c) ? h : d_out, 0},
                             {h, d_out}, {d_out, 0}};
    const size_t idx[4] = {c->p_w1, c->p_b1, c->p_w2, c->p_b2};
    for (size_t t = 0; t < b->n; t++) {
        snprintf(b->name[t], sizeof b->name[t], "%s%s", c->bank_prefix,
                 cond_ffn(c) ? ffn[t] : lin[t]);
        b->rank[t] = sh[t][1] ? 3 : 2;
        b->shape[t][0] = n, b->shape[t][1] = sh[t][0], b->shape[t][2] = sh[t][1];
        b->row[t] = sh[t][0] * (sh[t][1] ? sh[t][1] : 1);
        b->idx[t] = idx[t];
    }
}

/* Whether every rank may go on: *s becomes an error on every rank if it is
 * one on any (no rank may wait in a collective the others skip). */
static void ep_agree(ccr_cond *c, ccr_status *s, const char *what)
{
    double fail = *s == CCR_OK ? 0.0 : 1.0;
    ccr_status as = ccr_comm_allreduce_sum_f64(c->comm, &fail, 1);
    if (*s == CCR_OK && (as != CCR_OK || fail != 0.0))
        *s = as != CCR_OK ? as : CCR_FAIL_EXPR(c->ctx, CCR_ECOMM, "another rank failed: %s", what);
}

ccr_status ccr_condi_ep_gather_bank(ccr_cond *c, ccr_bank_full *b)
{
    ccr_condi_bank_layout(c, b);
    ccr_comm *comm = c->comm;
    const size_t P = (size_t)ccr_comm_size(comm), r = (size_t)ccr_comm_rank(comm);
    size_t n_held, n_rep, total = 0, rows_in = 0;
    CCR_TRY(ccr_cond_held(c, NULL, 0, &n_held, &n_rep));
    const size_t first = r == 0 ? 0 : n_rep, n_send = n_held - first;  /* replicas: rank 0's */
    for (size_t t = 0; t < b->n; t++)
        total += b->row[t];
    /* Per rank: rows sent and received, send displacements (0: only rank
     * 0 receives), received row offsets, and one tensor's element counts
     * and displacements. */
    size_t *z = ccr_malloc3(P, 7, sizeof *z);
    size_t *held = ccr_mallocn(n_held + 1, sizeof *held);
    int32_t *ids = ccr_mallocn(n_held + 1, sizeof *ids);
    ccr_status s = z && held && ids ? CCR_OK : CCR_FAIL_EXPR(c->ctx, CCR_ENOMEM, "bank gather");
    size_t *to = z, *from = z + P, *sd = z + 2 * P, *rd = z + 3 * P, *sc = z + 4 * P,
           *rc = z + 5 * P, *re = z + 6 * P;
    if (s == CCR_OK) s = ccr_cond_held(c, held, n_held, &n_held, &n_rep);
    ep_agree(c, &s, "bank gather tables");
    for (size_t p = 0; s == CCR_OK && p < P; p++)
        to[p] = p == 0 ? n_send : 0, sd[p] = 0;
    if (s == CCR_OK) s = ccr_comm_alltoall_counts(comm, to, from);
    for (size_t p = 0; s == CCR_OK && p < P; p++)
        rd[p] = rows_in, rows_in += from[p];
    int32_t *rid = NULL;
    float *stage = NULL, *rows = NULL;
    size_t fl = 0;
    if (s == CCR_OK && r == 0) {
        /* the whole bank, then the received rows of one tensor at a time */
        size_t big = 0;
        bool ok = ccr_mul_ok(c->n_mat, total, &fl);
        for (size_t t = 0; t < b->n; t++)
            big = b->row[t] > big ? b->row[t] : big;
        size_t stage_fl = 0;
        ok = ok && ccr_mul_ok(rows_in, big, &stage_fl);
        if (ok) s = ccr_mem_check(c->ctx, (fl + stage_fl) * sizeof(float), "checkpoint bank"); /* bounded: products checked */
        else s = CCR_FAIL_EXPR(c->ctx, CCR_ENOMEM, "bank of %zu matrices too large", c->n_mat);
        if (s == CCR_OK) {
            b->data[0] = ccr_mallocn(fl + stage_fl + 1, sizeof(float));
            rid = ccr_mallocn(rows_in + 1, sizeof *rid);
            if (b->data[0] == NULL || rid == NULL)
                s = CCR_FAIL_EXPR(c->ctx, CCR_ENOMEM, "checkpoint bank of %zu floats", fl);
        }
        if (s == CCR_OK) {
            for (size_t t = 1; t < b->n; t++)
                b->data[t] = b->data[t - 1] + c->n_mat * b->row[t - 1];
            stage = b->data[0] + fl;
        }
    }
    ep_agree(c, &s, "rank 0 holding the whole bank");
    for (size_t k = 0; s == CCR_OK && k < n_send; k++)
        ids[k] = (int32_t)held[first + k];
    if (s == CCR_OK) s = ccr_comm_alltoallv_i32(comm, ids, to, sd, rid, from, rd);
    for (size_t t = 0; s == CCR_OK && t < b->n; t++) {
        const float *v = b->idx[t] != SIZE_MAX ? ccr_arena_value(c->arena, b->idx[t]) : NULL;
        rows = v != NULL ? (float *)v + first * b->row[t] : NULL;
        for (size_t p = 0; p < P; p++)
            sc[p] = to[p] * b->row[t], rc[p] = from[p] * b->row[t], re[p] = rd[p] * b->row[t];
        s = ccr_comm_alltoallv(comm, rows, sc, sd, stage, rc, re);
        for (size_t k = 0; s == CCR_OK && r == 0 && k < rows_in; k++) {
            if (rid[k] < 0 || (size_t)rid[k] >= c->n_mat) {
                s = CCR_FAIL_EXPR(c->ctx, CCR_ECOMM, "a rank sent bank row %d of %zu", (int)rid[k],
                                  c->n_mat);
                break;
            }
            memcpy(b->data[t] + (size_t)rid[k] * b->row[t], stage + k * b->row[t],
                   b->row[t] * sizeof(float));
        }
    }
    free(z), free(held), free(ids), free(rid);
    if (s != CCR_OK) {
        free(b->data[0]);
        memset(b->data, 0, sizeof b->data);
    }
    return s;
}

ccr_status ccr_condi_load_bank(ccr_cond *c, const ccr_safetensors *f, const char *path,
                               bool write)
{
    ccr_bank_full b;
    ccr_condi_bank_layout(c, &b);
    size_t n_held, n_rep;
    CCR_TRY(ccr_cond_held(c, NULL, 0, &n_held, &n_rep));
    size_t *held = ccr_mallocn(n_held + 1, sizeof *held);
    if (held == NULL)
        CCR_FAIL(c->ctx, CCR_ENOMEM, "bank rows");
    ccr_status s = ccr_cond_held(c, held, n_held, &n_held, &n_rep);
    for (size_t t = 0; s == CCR_OK && t < b.n; t++) {
        char name[CCR_ARENA_MAX_NAME + 16];
        snprintf(name, sizeof name, "param.%s", b.name[t]);
        const ccr_st_tensor *st = ccr_safetensors_find(f, name);
        bool same = st != NULL && st->dtype == CCR_DTYPE_F32 && st->rank == b.rank[t];
        for (size_t d = 0; same && d < b.rank[t]; d++)
            same = st->shape[d] == b.shape[t][d];
        if (!same) {
            s = CCR_FAIL_EXPR(c->ctx, CCR_EFORMAT, "%s: tensor '%s' %s", path, name,
                              st == NULL ? "missing" : "is not the whole bank in F32");
            break;
        }
        const float *src = st->data;
        float *dst = b.idx[t] != SIZE_MAX ? ccr_arena_value(c->arena, b.idx[t]) : NULL;
        for (size_t k = 0; s == CCR_OK && k < n_held; k++) {
            const float *row = src + held[k] * b.row[t];
            for (size_t i = 0; !write && i < b.row[t]; i++)
                if (!isfinite(row[i]))
                    s = CCR_FAIL_EXPR(c->ctx, CCR_EDOM, "%s: tensor '%s': matrix %zu holds "
                                      "NaN or infinity", path, name, held[k]);
            if (write && dst != NULL)
                memcpy(dst + k * b.row[t], row, b.row[t] * sizeof *dst);
        }
    }
    free(held);
    return s;
}
