/*
 * dataset.c - labelled data sets: loading an image/label IDX pair, allocating
 * empty sets, seeded random splits, batch gathering and permutations.
 *
 * A data set is n rows of dim floats plus one int32 label per row.  Loading
 * pairs an image IDX file (n x rows x cols or n x dim; any rank >= 2, the
 * trailing dimensions flattened) with a rank-1 label file of the same n,
 * scales u8 pixels by 1/255 (other element types are kept as they are) and
 * checks that every label is a non-negative integer; n_classes is then the
 * largest label plus one.  All randomness comes from the caller's gsl_rng
 * through gsl_ran_shuffle, and split allocates everything before it draws,
 * so a failing call consumes no random numbers.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <gsl/gsl_randist.h>

#include "ccr/ccr_data.h"
#include "internal.h"

ccr_status ccr_dataset_alloc(ccr_ctx *ctx, size_t n, size_t dim, size_t n_classes,
                             ccr_dataset **out)
{
    CCR_CHECK_NULL(ctx, out);
    if (dim == 0)
        CCR_FAIL(ctx, CCR_EINVAL, "dim is 0");
    if (n_classes == 0)
        CCR_FAIL(ctx, CCR_EINVAL, "n_classes is 0");
    size_t nx = 0, xbytes = 0, ybytes = 0;
    size_t total = SIZE_MAX;
    if (ccr_mul_ok(n, dim, &nx) && ccr_mul_ok(nx, sizeof(float), &xbytes) &&
        ccr_mul_ok(n, sizeof(int32_t), &ybytes) && !ccr_add_ok(xbytes, ybytes, &total))
        total = SIZE_MAX;
    CCR_TRY(ccr_mem_check(ctx, total, "data set"));
    ccr_dataset *ds = calloc(1, sizeof *ds);
    /* At least one element each, so x and y are valid pointers even when n is 0. */
    float *x = calloc(nx > 0 ? nx : 1, sizeof *x);
    int32_t *y = calloc(n > 0 ? n : 1, sizeof *y);
    if (ds == NULL || x == NULL || y == NULL) {
        free(ds);
        free(x);
        free(y);
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate a data set of %zu x %zu", n, dim);
    }
    ds->n = n;
    ds->dim = dim;
    ds->n_classes = n_classes;
    ds->x = x;
    ds->y = y;
    *out = ds;
    return CCR_OK;
}

void ccr_dataset_free(ccr_dataset *ds)
{
    if (ds == NULL)
        return;
    free(ds->x);
    free(ds->y);
    free(ds);
}

/* Checks the label file and converts it to int32; *max_label is the largest. */
static ccr_status check_labels(ccr_ctx *ctx, const ccr_idx *lab, const char *path,
                               int32_t *y, int32_t *max_label)
{
    int32_t mx = 0;
    for (size_t i = 0; i < lab->numel; i++) {
        float v = lab->data[i];
        /* 2147483648.0f is the first float past INT32_MAX. */
        if (!(v >= 0.0f) || !(v < 2147483648.0f) || floorf(v) != v)
            CCR_FAIL(ctx, CCR_EFORMAT, "'%s': label %zu is %g (want a non-negative integer)",
                     path, i, (double)v);
        y[i] = (int32_t)v;
        if (y[i] > mx)
            mx = y[i];
    }
    if (mx == INT32_MAX)
        CCR_FAIL(ctx, CCR_EFORMAT, "'%s': label %d is too large", path, (int)mx);
    *max_label = mx;
    return CCR_OK;
}

ccr_status ccr_dataset_load_idx(ccr_ctx *ctx, const char *images, const char *labels,
                                ccr_dataset **out)
{
    CCR_CHECK_NULL(ctx, images);
    CCR_CHECK_NULL(ctx, labels);
    CCR_CHECK_NULL(ctx, out);

    ccr_idx *img = NULL, *lab = NULL;
    int32_t *y = NULL;
    ccr_dataset *ds = NULL;
    ccr_status s = ccr_idx_load(ctx, images, &img);
    if (s != CCR_OK)
        return s;
    s = ccr_idx_load(ctx, labels, &lab);
    if (s != CCR_OK)
        goto done;

    if (img->ndim < 2) {
        s = CCR_FAIL_EXPR(ctx, CCR_EFORMAT,
                          "'%s': image file has rank 1 (want n x dim or n x rows x cols)",
                          images);
        goto done;
    }
    if (lab->ndim != 1) {
        s = CCR_FAIL_EXPR(ctx, CCR_EFORMAT, "'%s': label file has rank %zu (want 1)", labels,
                          lab->ndim);
        goto done;
    }
    size_t n = img->dims[0];
    if (lab->dims[0] != n) {
        s = CCR_FAIL_EXPR(ctx, CCR_EFORMAT, "'%s' has %zu examples but '%s' has %zu labels",
                          images, n, labels, lab->dims[0]);
        goto done;
    }
    size_t dim = img->numel / n;

    y = ccr_mallocn(n, sizeof *y);
    ds = calloc(1, sizeof *ds);
    if (y == NULL || ds == NULL) {
        s = CCR_FAIL_EXPR(ctx, CCR_ENOMEM, "cannot allocate %zu labels", n);
        goto done;
    }
    int32_t max_label = 0;
    s = check_labels(ctx, lab, labels, y, &max_label);
    if (s != CCR_OK)
        goto done;

    /* A non-finite feature (NaN or Inf in an F32 file, an F64 value beyond
     * float range) is refused here, naming it, not at the first step. */
    for (size_t i = 0; i < img->numel; i++) {
        if (!isfinite(img->data[i])) {
            s = CCR_FAIL_EXPR(ctx, CCR_EFORMAT,
                              "'%s': example %zu, feature %zu is %g (want a finite number)",
                              images, i / dim, i % dim, (double)img->data[i]);
            goto done;
        }
    }

    /* Take the image floats over instead of copying them. */
    float *x = img->data;
    img->data = NULL;
    if (img->type == CCR_IDX_U8) {
        for (size_t i = 0; i < img->numel; i++)  /* divide: 255 maps to exactly 1 */
            x[i] /= 255.0f;
    }
    ds->n = n;
    ds->dim = dim;
    ds->n_classes = (size_t)max_label + 1;
    ds->x = x;
    ds->y = y;
    *out = ds;
    y = NULL;
    ds = NULL;

done:
    free(y);
    free(ds);
    ccr_idx_free(img);
    ccr_idx_free(lab);
    return s;
}

void ccr_dataset_gather(const ccr_dataset *ds, const size_t *idx, size_t batch, float *x,
                        int32_t *y)
{
    if (ds == NULL || idx == NULL)
        return;
    for (size_t b = 0; b < batch; b++) {
        size_t i = idx[b];
        if (x != NULL)
            memcpy(x + b * ds->dim, ds->x + i * ds->dim, ds->dim * sizeof *x);
        if (y != NULL)
            y[b] = ds->y[i];
    }
}

void ccr_permutation(gsl_rng *rng, size_t *perm, size_t n)
{
    if (rng == NULL || perm == NULL || n == 0)
        return;
    for (size_t i = 0; i < n; i++)
        perm[i] = i;
    gsl_ran_shuffle(rng, perm, n, sizeof *perm);
}

ccr_status ccr_dataset_split(ccr_ctx *ctx, const ccr_dataset *ds, gsl_rng *rng,
                             size_t n_second, ccr_dataset **first, ccr_dataset **second)
{
    CCR_CHECK_NULL(ctx, ds);
    CCR_CHECK_NULL(ctx, rng);
    CCR_CHECK_NULL(ctx, first);
    CCR_CHECK_NULL(ctx, second);
    if (n_second > ds->n)
        CCR_FAIL(ctx, CCR_EINVAL, "n_second %zu > n %zu", n_second, ds->n);
    if (ds->n > 0 && (ds->x == NULL || ds->y == NULL))
        CCR_FAIL(ctx, CCR_EINVAL, "data set has NULL x or y");

    size_t pbytes = 0;
    if (!ccr_mul_ok(ds->n, sizeof(size_t), &pbytes))
        CCR_FAIL(ctx, CCR_EINVAL, "n %zu overflows size_t", ds->n);
    ccr_dataset *a = NULL, *b = NULL;
    size_t *perm = malloc(pbytes > 0 ? pbytes : 1);
    if (perm == NULL)
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate a permutation of %zu", ds->n);
    ccr_status s = ccr_dataset_alloc(ctx, ds->n - n_second, ds->dim, ds->n_classes, &a);
    if (s == CCR_OK)
        s = ccr_dataset_alloc(ctx, n_second, ds->dim, ds->n_classes, &b);
    if (s != CCR_OK) {
        ccr_dataset_free(a);
        free(perm);
        return s;
    }
    ccr_permutation(rng, perm, ds->n);
    ccr_dataset_gather(ds, perm, n_second, b->x, b->y);
    ccr_dataset_gather(ds, perm + n_second, ds->n - n_second, a->x, a->y);
    free(perm);
    *first = a;
    *second = b;
    return CCR_OK;
}
