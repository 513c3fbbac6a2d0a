/*
 * arena.c - parameter and gradient arenas (llm.c's one-allocation pattern).
 *
 * Tensors are declared first (name, shape); finalize computes offsets, each
 * rounded up to 16 floats (64 bytes) so vector kernels see aligned tensors,
 * and makes exactly one backend allocation for the values and one for the
 * gradients.  Save and load go through safetensors (ccr_safetensors.h).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena_impl.h"    // provides: ccr_arena_backend
#include "backend_impl.h"  // provides: struct ccr_backend
#include "ccr/ccr_arena.h"
#include "ccr/ccr_safetensors.h"
#include "internal.h"      // provides: CCR_FAIL, ccr_mul_ok

typedef struct arena_tensor {
    char name[CCR_ARENA_MAX_NAME];
    size_t rank;
    size_t shape[CCR_ARENA_MAX_RANK];
    size_t size;     /* product of shape */
    size_t offset;   /* in floats from the block start */
    bool row_sparse; /* gradient rows (dim 0) written only after ccr_arena_touch_row */
} arena_tensor;

struct ccr_arena {
    ccr_backend *be;
    arena_tensor *t;
    size_t n, cap;
    size_t n_params;   /* sum of sizes */
    size_t block_len;  /* floats in each block, padding included */
    float *values, *grads;
    /* Row-sparse tensors (issue 10): one record each, in block order; the
     * flags and touched lists of all of them in one allocation (finalize),
     * with the offsets and ids scratch of ccr_arena_for_written_rows. */
    ccr_arena_sparse *sp;
    size_t n_sp, sp_rows;
    void *sp_work;
    size_t *sp_off, *sp_ids;
    /* Host staging of tensors [stage_first, stage_end) (ccr_arena_stage):
     * their values at stage + (offset - stage_off), NULL when none. */
    float *stage;
    size_t stage_first, stage_end, stage_off, stage_len;
};

#define ARENA_ALIGN 16

ccr_status ccr_arena_init(ccr_backend *be, ccr_arena **out)
{
    if (be == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(be->ctx, out);
    ccr_arena *a = calloc(1, sizeof *a);
    if (a == NULL)
        CCR_FAIL(be->ctx, CCR_ENOMEM, "cannot allocate arena");
    a->be = be;
    *out = a;
    return CCR_OK;
}

void ccr_arena_free(ccr_arena *a)
{
    if (a == NULL)
        return;
    free(a->stage);
    ccr_backend_free_buffer(a->be, a->values);
    ccr_backend_free_buffer(a->be, a->grads);
    free(a->sp);
    free(a->sp_work);
    free(a->t);
    free(a);
}

ccr_status ccr_arena_add(ccr_arena *a, const char *name, size_t rank, const size_t *shape,
                         size_t *index)
{
    if (a == NULL)
        return CCR_EINVAL;
    ccr_ctx *ctx = a->be->ctx;
    CCR_CHECK_NULL(ctx, name);
    CCR_CHECK_NULL(ctx, shape);
    if (a->values != NULL)
        CCR_FAIL(ctx, CCR_EINVAL, "arena already finalized; cannot add '%s'", name);
    size_t len = strlen(name);
    if (len == 0 || len >= CCR_ARENA_MAX_NAME)
        CCR_FAIL(ctx, CCR_EINVAL, "tensor name length %zu not in 1..%d", len,
                 CCR_ARENA_MAX_NAME - 1);
    if (rank == 0 || rank > CCR_ARENA_MAX_RANK)
        CCR_FAIL(ctx, CCR_EINVAL, "tensor '%s': rank %zu not in 1..%d", name, rank,
                 CCR_ARENA_MAX_RANK);
    size_t size = 1;
    for (size_t d = 0; d < rank; d++) {
        if (shape[d] == 0)
            CCR_FAIL(ctx, CCR_EINVAL, "tensor '%s': extent %zu is zero", name, d);
        if (!ccr_mul_ok(size, shape[d], &size))
            CCR_FAIL(ctx, CCR_EINVAL, "tensor '%s': size overflows", name);
    }
    for (size_t i = 0; i < a->n; i++)
        if (strcmp(a->t[i].name, name) == 0)
            CCR_FAIL(ctx, CCR_EINVAL, "duplicate tensor name '%s'", name);
    size_t padded = (size + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN;
    if (padded < size || a->block_len + padded < a->block_len)
        CCR_FAIL(ctx, CCR_EINVAL, "tensor '%s': arena size overflows", name);
    if (a->n == a->cap) {
        size_t cap = a->cap ? 2 * a->cap : 16;
        arena_tensor *t = ccr_reallocn(a->t, cap, sizeof *t);
        if (t == NULL)
            CCR_FAIL(ctx, CCR_ENOMEM, "cannot grow arena table");
        a->t = t;
        a->cap = cap;
    }
    arena_tensor *t = &a->t[a->n];
    memset(t, 0, sizeof *t);
    memcpy(t->name, name, len + 1);
    t->rank = rank;
    memcpy(t->shape, shape, rank * sizeof *shape);
    t->size = size;
    t->offset = a->block_len;
    a->block_len += padded;
    a->n_params += size;
    if (index != NULL)
        *index = a->n;
    a->n++;
    return CCR_OK;
}

ccr_status ccr_arena_set_row_sparse(ccr_arena *a, size_t i)
{
    if (a == NULL)
        return CCR_EINVAL;
    if (a->values != NULL)
        CCR_FAIL(a->be->ctx, CCR_EINVAL, "arena already finalized");
    if (i >= a->n)
        CCR_FAIL(a->be->ctx, CCR_EINVAL, "tensor index %zu >= %zu", i, a->n);
    if (!a->t[i].row_sparse) {
        a->t[i].row_sparse = true;
        a->n_sp++;
        a->sp_rows += a->t[i].shape[0];
    }
    return CCR_OK;
}

/* The records, flags and touched lists of the row-sparse tensors. */
static ccr_status arena_sparse_alloc(ccr_arena *a)
{
    if (a->n_sp == 0)
        return CCR_OK;
    a->sp = calloc(a->n_sp, sizeof *a->sp);
    a->sp_work = ccr_malloc3(a->sp_rows, 3 * sizeof(size_t) + 1, 1); /* bounded: 25 bytes a row */
    if (a->sp == NULL || a->sp_work == NULL) {
        free(a->sp);
        free(a->sp_work);
        a->sp = NULL;
        a->sp_work = NULL;
        CCR_FAIL(a->be->ctx, CCR_ENOMEM, "cannot allocate sparse-gradient bookkeeping");
    }
    size_t *list = a->sp_work;
    a->sp_off = list + a->sp_rows;
    a->sp_ids = a->sp_off + a->sp_rows;
    unsigned char *flag = (unsigned char *)(a->sp_ids + a->sp_rows);
    memset(flag, 0, a->sp_rows);
    size_t k = 0, base = 0;
    for (size_t i = 0; i < a->n; i++) {
        if (!a->t[i].row_sparse)
            continue;
        ccr_arena_sparse *r = &a->sp[k++];
        r->tensor = i;
        r->rows = a->t[i].shape[0];
        r->row_len = a->t[i].size / r->rows;
        r->base = base;
        r->flag = flag + base;
        r->list = list + base;
        r->n_touched = 0;
        base += r->rows;
    }
    return CCR_OK;
}

ccr_status ccr_arena_finalize(ccr_arena *a)
{
    if (a == NULL)
        return CCR_EINVAL;
    ccr_ctx *ctx = a->be->ctx;
    if (a->values != NULL)
        CCR_FAIL(ctx, CCR_EINVAL, "arena already finalized");
    if (a->n == 0)
        CCR_FAIL(ctx, CCR_EINVAL, "arena has no tensors");
    size_t bytes;
    if (!ccr_mul_ok(a->block_len, sizeof(float), &bytes))
        CCR_FAIL(ctx, CCR_ENOMEM, "arena of %zu floats overflows", a->block_len);
    CCR_TRY(ccr_mem_check(ctx, bytes <= SIZE_MAX / 2 ? 2 * bytes : SIZE_MAX,
                          "parameters and gradients"));
    void *v = NULL, *g = NULL;
    CCR_TRY(ccr_backend_alloc(a->be, bytes, &v));
    ccr_status s = ccr_backend_alloc(a->be, bytes, &g);
    if (s != CCR_OK) {
        ccr_backend_free_buffer(a->be, v);
        return s;
    }
    a->values = v;
    a->grads = g;
    s = arena_sparse_alloc(a);
    if (s != CCR_OK) {
        ccr_backend_free_buffer(a->be, v);
        ccr_backend_free_buffer(a->be, g);
        a->values = a->grads = NULL;
    }
    return s;
}

size_t ccr_arena_count(const ccr_arena *a) { return a ? a->n : 0; }
size_t ccr_arena_n_params(const ccr_arena *a) { return a ? a->n_params : 0; }
size_t ccr_arena_block_len(const ccr_arena *a) { return a ? a->block_len : 0; }
float *ccr_arena_values(const ccr_arena *a) { return a ? a->values : NULL; }
float *ccr_arena_grads(const ccr_arena *a) { return a ? a->grads : NULL; }

/* Per-tensor getters: NULL / 0 for a NULL arena or an index out of range
 * (the NULL-handle rule, ccr.h). */
#define ARENA_HAS(a, i) ((a) != NULL && (i) < (a)->n)

const char *ccr_arena_name(const ccr_arena *a, size_t i)
{
    return ARENA_HAS(a, i) ? a->t[i].name : NULL;
}
size_t ccr_arena_rank(const ccr_arena *a, size_t i) { return ARENA_HAS(a, i) ? a->t[i].rank : 0; }
const size_t *ccr_arena_shape(const ccr_arena *a, size_t i)
{
    return ARENA_HAS(a, i) ? a->t[i].shape : NULL;
}
size_t ccr_arena_size(const ccr_arena *a, size_t i) { return ARENA_HAS(a, i) ? a->t[i].size : 0; }

float *ccr_arena_value(const ccr_arena *a, size_t i)
{
    if (!ARENA_HAS(a, i) || a->values == NULL)
        return NULL;
    if (a->stage != NULL && i >= a->stage_first && i < a->stage_end)
        return a->stage + (a->t[i].offset - a->stage_off);
    return a->values + a->t[i].offset;
}

ccr_status ccr_arena_stage(ccr_arena *a, size_t first, size_t end)
{
    if (a == NULL)
        return CCR_EINVAL;
    ccr_ctx *ctx = a->be->ctx;
    if (a->values == NULL)
        CCR_FAIL(ctx, CCR_EINVAL, "arena not finalized");
    if (a->stage != NULL)
        CCR_FAIL(ctx, CCR_EINVAL, "arena tensors already staged");
    if (first >= end || end > a->n)
        CCR_FAIL(ctx, CCR_EINVAL, "staging range [%zu, %zu) of %zu tensors", first, end, a->n);
    size_t off = a->t[first].offset, len = a->t[end - 1].offset + a->t[end - 1].size - off;
    float *h = ccr_mallocn(len, sizeof *h);
    if (h == NULL)
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate %zu floats of staging", len);
    ccr_status s = ccr_backend_get(a->be, h, a->values + off, len * sizeof *h); /* bounded: len <= block_len */
    if (s != CCR_OK) {
        free(h);
        return s;
    }
    a->stage = h;
    a->stage_first = first, a->stage_end = end, a->stage_off = off, a->stage_len = len;
    return CCR_OK;
}

ccr_status ccr_arena_unstage(ccr_arena *a, bool upload)
{
    if (a == NULL || a->stage == NULL)
        return CCR_OK;
    ccr_status s = CCR_OK;
    if (upload)
        s = ccr_backend_set(a->be, a->values + a->stage_off, a->stage,
                            a->stage_len * sizeof *a->stage); /* bounded: as staged */
    free(a->stage);
    a->stage = NULL;
    return s;
}

float *ccr_arena_grad(const ccr_arena *a, size_t i)
{
    return ARENA_HAS(a, i) && a->grads ? a->grads + a->t[i].offset : NULL;
}

static ccr_status arena_check_index(const ccr_arena *a, size_t i, const void *host)
{
    if (a == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(a->be->ctx, host);
    if (a->values == NULL)
        CCR_FAIL(a->be->ctx, CCR_EINVAL, "arena not finalized");
    if (i >= a->n)
        CCR_FAIL(a->be->ctx, CCR_EINVAL, "tensor index %zu >= %zu", i, a->n);
    return CCR_OK;
}

/* Index of the first non-finite float of data[0..n) (any alignment), or n. */
static size_t arena_first_nonfinite(const void *data, size_t n)
{
    const unsigned char *p = data;
    for (size_t k = 0; k < n; k++) {
        float v;
        memcpy(&v, p + k * sizeof v, sizeof v);
        if (!isfinite(v))
            return k;
    }
    return n;
}

ccr_status ccr_arena_set(ccr_arena *a, size_t i, const float *host)
{
    CCR_TRY(arena_check_index(a, i, host));
    size_t bad = arena_first_nonfinite(host, a->t[i].size);
    if (bad < a->t[i].size)
        CCR_FAIL(a->be->ctx, CCR_EDOM, "tensor '%s': element %zu is NaN or infinite",
                 a->t[i].name, bad);
    return ccr_backend_set(a->be, a->values + a->t[i].offset, host,
                           a->t[i].size * sizeof(float));
}

ccr_status ccr_arena_get(const ccr_arena *a, size_t i, float *host)
{
    CCR_TRY(arena_check_index(a, i, host));
    return ccr_backend_get(a->be, host, a->values + a->t[i].offset,
                           a->t[i].size * sizeof(float));
}

ccr_status ccr_arena_get_grad(const ccr_arena *a, size_t i, float *host)
{
    CCR_TRY(arena_check_index(a, i, host));
    return ccr_backend_get(a->be, host, a->grads + a->t[i].offset,
                           a->t[i].size * sizeof(float));
}

ccr_status ccr_arena_find(const ccr_arena *a, const char *name, size_t *index)
{
    if (a == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(a->be->ctx, name);
    CCR_CHECK_NULL(a->be->ctx, index);
    for (size_t i = 0; i < a->n; i++) {
        if (strcmp(a->t[i].name, name) == 0) {
            *index = i;
            return CCR_OK;
        }
    }
    CCR_FAIL(a->be->ctx, CCR_EINVAL, "no tensor named '%s'", name);
}

static ccr_status arena_zero_range(void *u, size_t off, size_t len, size_t row)
{
    CCR_UNUSED(row);
    ccr_arena *a = u;
    return ccr_backend_memset(a->be, a->grads + off, 0, len * sizeof(float));
}

static ccr_status arena_zero_rows(void *u, const size_t *off, const size_t *ids, size_t n,
                                  size_t row_len)
{
    CCR_UNUSED(ids);
    ccr_arena *a = u;
    return a->be->k->zero_ranges(a->be, a->grads, off, n, row_len);
}

ccr_status ccr_arena_zero_grad(ccr_arena *a)
{
    if (a == NULL)
        return CCR_EINVAL;
    if (a->grads == NULL)
        CCR_FAIL(a->be->ctx, CCR_EINVAL, "arena not finalized");
    CCR_TRY(ccr_arena_for_written_rows(a, arena_zero_range, arena_zero_rows, a));
    for (size_t k = 0; k < a->n_sp; k++) {
        ccr_arena_sparse *r = &a->sp[k];
        for (size_t j = 0; j < r->n_touched; j++)
            r->flag[r->list[j]] = 0;
        r->n_touched = 0;
    }
    return CCR_OK;
}

ccr_status ccr_arena_for_written(const ccr_arena *a, ccr_arena_range_fn fn, void *u)
{
    size_t cur = 0;
    for (size_t k = 0; k < a->n_sp; k++) {
        const ccr_arena_sparse *r = &a->sp[k];
        const arena_tensor *t = &a->t[r->tensor];
        if (t->offset > cur)
            CCR_TRY(fn(u, cur, t->offset - cur, SIZE_MAX));
        /* Rows in block order (a scan of E flags), so that sums over the
         * ranges add in the order of the whole block. */
        for (size_t row = 0; row < r->rows && r->n_touched > 0; row++)
            if (r->flag[row])
                CCR_TRY(fn(u, t->offset + row * r->row_len, r->row_len, r->base + row));
        cur = t->offset + t->size;
    }
    return cur < a->block_len ? fn(u, cur, a->block_len - cur, SIZE_MAX) : CCR_OK;
}

ccr_status ccr_arena_for_written_rows(const ccr_arena *a, ccr_arena_range_fn dense,
                                      ccr_arena_rows_fn rows, void *u)
{
    size_t cur = 0;
    for (size_t k = 0; k < a->n_sp; k++) {
        const ccr_arena_sparse *r = &a->sp[k];
        const arena_tensor *t = &a->t[r->tensor];
        if (t->offset > cur)
            CCR_TRY(dense(u, cur, t->offset - cur, SIZE_MAX));
        size_t n = 0;
        for (size_t row = 0; row < r->rows && n < r->n_touched; row++)
            if (r->flag[row]) {
                a->sp_off[n] = t->offset + row * r->row_len;
                a->sp_ids[n++] = r->base + row;
            }
        if (n > 0)
            CCR_TRY(rows(u, a->sp_off, a->sp_ids, n, r->row_len));
        cur = t->offset + t->size;
    }
    return cur < a->block_len ? dense(u, cur, a->block_len - cur, SIZE_MAX) : CCR_OK;
}

void ccr_arena_touch_row(ccr_arena *a, size_t i, size_t row)
{
    if (a == NULL || i >= a->n || !a->t[i].row_sparse || a->sp == NULL ||
        row >= a->t[i].shape[0])
        return;
    ccr_arena_sparse *r = ccr_arena_sparse_of(a, i);
    if (!r->flag[row]) {
        r->flag[row] = 1;
        r->list[r->n_touched++] = row;
    }
}

size_t ccr_arena_n_sparse(const ccr_arena *a) { return a && a->sp ? a->n_sp : 0; }
size_t ccr_arena_sparse_rows(const ccr_arena *a) { return a && a->sp ? a->sp_rows : 0; }

ccr_arena_sparse *ccr_arena_sparse_at(const ccr_arena *a, size_t k)
{
    return a && a->sp && k < a->n_sp ? &a->sp[k] : NULL;
}

ccr_arena_sparse *ccr_arena_sparse_of(const ccr_arena *a, size_t i)
{
    for (size_t k = 0; a && a->sp && k < a->n_sp; k++)
        if (a->sp[k].tensor == i)
            return &a->sp[k];
    return NULL;
}

ccr_status ccr_arena_save(const ccr_arena *a, const char *path, int with_grads,
                          const char *const *meta, size_t n_meta)
{
    if (a == NULL)
        return CCR_EINVAL;
    ccr_ctx *ctx = a->be->ctx;
    CCR_CHECK_NULL(ctx, path);
    if (a->values == NULL)
        CCR_FAIL(ctx, CCR_EINVAL, "arena not finalized");
    size_t n_t = with_grads ? 2 * a->n : a->n;
    ccr_st_tensor *t = calloc(n_t, sizeof *t);
    char (*names)[CCR_ARENA_MAX_NAME + 8] = calloc(n_t, sizeof *names);
    float *host = ccr_malloc3(a->block_len, sizeof(float), with_grads ? 2 : 1);
    ccr_status s = CCR_OK;
    if (t == NULL || names == NULL || host == NULL) {
        s = CCR_FAIL_EXPR(ctx, CCR_ENOMEM, "cannot allocate checkpoint staging");
        goto done;
    }
    /* Stage device blocks on the host (a plain copy on the CPU backend). */
    s = ccr_backend_get(a->be, host, a->values, a->block_len * sizeof(float));
    if (s == CCR_OK && with_grads)
        s = ccr_backend_get(a->be, host + a->block_len, a->grads,
                            a->block_len * sizeof(float));
    if (s != CCR_OK)
        goto done;
    for (size_t j = 0; j < n_t; j++) {
        size_t i = j % a->n;
        bool grad = j >= a->n;
        snprintf(names[j], sizeof names[j], "%s.%s", grad ? "grad" : "param", a->t[i].name);
        t[j].name = names[j];
        t[j].dtype = CCR_DTYPE_F32;
        t[j].rank = a->t[i].rank;
        memcpy(t[j].shape, a->t[i].shape, a->t[i].rank * sizeof(size_t));
        t[j].data = host + (grad ? a->block_len : 0) + a->t[i].offset;
    }
    s = ccr_safetensors_write(ctx, path, t, n_t, meta, n_meta);
done:
    free(host);
    free(names);
    free(t);
    return s;
}

ccr_status ccr_arena_load_from(ccr_arena *a, const ccr_safetensors *f, const char *path,
                               bool skip_sparse)
{
    ccr_ctx *ctx = a->be->ctx;
    if (a->values == NULL)
        CCR_FAIL(ctx, CCR_EINVAL, "arena not finalized");
    /* Validate every tensor before writing any, so a bad file loses nothing. */
    for (size_t i = 0; i < a->n; i++) {
        if (skip_sparse && a->t[i].row_sparse)
            continue;
        char name[CCR_ARENA_MAX_NAME + 8];
        snprintf(name, sizeof name, "param.%s", a->t[i].name);
        const ccr_st_tensor *st = ccr_safetensors_find(f, name);
        if (st == NULL)
            CCR_FAIL(ctx, CCR_EFORMAT, "%s: tensor '%s' missing", path, name);
        if (st->dtype != CCR_DTYPE_F32)
            CCR_FAIL(ctx, CCR_EFORMAT, "%s: tensor '%s' is not F32", path, name);
        bool same = st->rank == a->t[i].rank;
        for (size_t d = 0; same && d < st->rank; d++)
            same = st->shape[d] == a->t[i].shape[d];
        if (!same)
            CCR_FAIL(ctx, CCR_EFORMAT, "%s: tensor '%s' has another shape", path, name);
        size_t bad = arena_first_nonfinite(st->data, a->t[i].size);
        if (bad < a->t[i].size)
            CCR_FAIL(ctx, CCR_EDOM, "%s: tensor '%s': element %zu is NaN or infinite", path,
                     name, bad);
    }
    for (size_t i = 0; i < a->n; i++) {
        if (skip_sparse && a->t[i].row_sparse)
            continue;
        char name[CCR_ARENA_MAX_NAME + 8];
        snprintf(name, sizeof name, "param.%s", a->t[i].name);
        const ccr_st_tensor *st = ccr_safetensors_find(f, name);
        CCR_TRY(ccr_backend_set(a->be, a->values + a->t[i].offset, st->data,
                                a->t[i].size * sizeof(float)));
    }
    return CCR_OK;
}

ccr_status ccr_arena_load(ccr_arena *a, const char *path)
{
    if (a == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(a->be->ctx, path);
    if (a->values == NULL)
        CCR_FAIL(a->be->ctx, CCR_EINVAL, "arena not finalized");
    ccr_safetensors *f;
    CCR_TRY(ccr_safetensors_read(a->be->ctx, path, &f));
    ccr_status s = ccr_arena_load_from(a, f, path, false);
    ccr_safetensors_free(f);
    return s;
}

ccr_backend *ccr_arena_backend(const ccr_arena *a) { return a->be; }
