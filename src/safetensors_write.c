/*
 * safetensors_write.c - writing named F32/I32 tensors in the safetensors
 * format (ccr_safetensors_write in ccr_safetensors.h).  The arguments are
 * checked first (names, UTF-8, dtypes, ranks, sizes within 2^53, duplicate
 * names and metadata keys).  The JSON header is built with cJSON (integers
 * are emitted as exact decimal text, never as doubles) and padded with spaces
 * to a multiple of 8 bytes; header and little-endian data go to a temporary
 * file beside the target (tmpfile.h) which is fsynced and renamed into place
 * only when everything was written, and removed on any failure.
 */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cJSON.h>

#include "ccr/ccr_safetensors.h"
#include "internal.h"          // provides: CCR_FAIL, CCR_CHECK_NULL, ccr_mul_ok, ccr_utf8_valid
#include "tmpfile.h"          // provides: ccr_tmp_create, ccr_tmp_write, ccr_tmp_commit
#include "safetensors_impl.h"  // provides: ST_* limits, BAIL, LE helpers, ccr_st_sorted_duplicate

/* Checks the arguments; fills nbytes[i] with tensor i's data size. */
static ccr_status check_write_args(ccr_ctx *ctx, const ccr_st_tensor *tensors, size_t n,
                                   const char *const *meta, size_t n_meta, size_t *nbytes)
{
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        const ccr_st_tensor *t = &tensors[i];
        if (t->name == NULL)
            CCR_FAIL(ctx, CCR_EINVAL, "tensor %zu has a NULL name", i);
        if (t->name[0] == '\0')
            CCR_FAIL(ctx, CCR_EINVAL, "tensor %zu has an empty name", i);
        if (strcmp(t->name, ST_META_KEY) == 0)
            CCR_FAIL(ctx, CCR_EINVAL, "tensor %zu is named \"" ST_META_KEY "\", which is reserved", i);
        if (!ccr_utf8_valid(t->name, strlen(t->name)))
            CCR_FAIL(ctx, CCR_EINVAL, "tensor %zu: name is not valid UTF-8", i);
        if (t->dtype != CCR_DTYPE_F32 && t->dtype != CCR_DTYPE_I32)
            CCR_FAIL(ctx, CCR_EINVAL, "tensor '%.80s': unknown dtype %d", t->name, (int)t->dtype);
        if (t->rank > CCR_ST_MAX_RANK)
            CCR_FAIL(ctx, CCR_EINVAL, "tensor '%.80s': rank %zu exceeds %d", t->name, t->rank,
                     CCR_ST_MAX_RANK);
        for (size_t d = 0; d < t->rank; d++)
            if ((double)t->shape[d] > ST_MAX_INT)
                CCR_FAIL(ctx, CCR_EINVAL, "tensor '%.80s': dimension %zu is too large", t->name, d);
        size_t numel = ccr_st_tensor_numel(t), bytes;   /* SIZE_MAX on overflow */
        if (!ccr_mul_ok(numel, ST_ELEM_SIZE, &bytes) || (double)bytes > ST_MAX_INT)
            CCR_FAIL(ctx, CCR_EINVAL, "tensor '%.80s': its byte size exceeds 2^53", t->name);
        if (bytes > 0 && t->data == NULL)
            CCR_FAIL(ctx, CCR_EINVAL, "tensor '%.80s': data is NULL for %zu elements", t->name,
                     numel);
        total += bytes;
        if ((double)total > ST_MAX_INT)
            CCR_FAIL(ctx, CCR_EINVAL, "tensors total more than 2^53 bytes");
        nbytes[i] = bytes;
    }
    for (size_t i = 0; i < 2 * n_meta; i++) {
        if (meta[i] == NULL)
            CCR_FAIL(ctx, CCR_EINVAL, "metadata %s %zu is NULL", i % 2 ? "value" : "key", i / 2);
        if (!ccr_utf8_valid(meta[i], strlen(meta[i])))
            CCR_FAIL(ctx, CCR_EINVAL, "metadata %s %zu is not valid UTF-8",
                     i % 2 ? "value" : "key", i / 2);
    }

    /* Duplicates: one scratch array serves tensor names, then metadata keys. */
    size_t cap = n > n_meta ? n : n_meta;
    if (cap < 2)
        return CCR_OK;
    ccr_status s = CCR_OK;
    const char **names = ccr_mallocn(cap, sizeof *names), *dup;
    if (names == NULL)
        BAIL(CCR_ENOMEM, "cannot allocate %zu name pointers", cap);
    for (size_t i = 0; i < n; i++)
        names[i] = tensors[i].name;
    if ((dup = ccr_st_sorted_duplicate(names, n)) != NULL)
        BAIL(CCR_EINVAL, "duplicate tensor name '%.80s'", dup);
    for (size_t i = 0; i < n_meta; i++)
        names[i] = meta[2 * i];
    if ((dup = ccr_st_sorted_duplicate(names, n_meta)) != NULL)
        BAIL(CCR_EINVAL, "duplicate metadata key '%.80s'", dup);
done:
    free(names);
    return s;
}

/* Appends an unsigned integer as exact decimal text. */
static bool add_uint(cJSON *arr, uint64_t v)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%" PRIu64, v);
    cJSON *item = cJSON_CreateRaw(buf);
    if (item == NULL)
        return false;
    if (!cJSON_AddItemToArray(arr, item)) {
        cJSON_Delete(item);
        return false;
    }
    return true;
}

/* Builds the header JSON; the caller releases *out with cJSON_free. */
static ccr_status build_header(ccr_ctx *ctx, const ccr_st_tensor *tensors, size_t n,
                               const char *const *meta, size_t n_meta, const size_t *nbytes,
                               char **out, size_t *out_len)
{
    bool ok = true;
    cJSON *root = cJSON_CreateObject();
    if (root == NULL)
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate the header");
    /* Every item is attached to root as soon as it is created, so deleting
     * root releases everything on any failure. */
    if (n_meta > 0) {
        cJSON *m = cJSON_AddObjectToObject(root, ST_META_KEY);
        ok = m != NULL;
        for (size_t i = 0; ok && i < n_meta; i++)
            ok = cJSON_AddStringToObject(m, meta[2 * i], meta[2 * i + 1]) != NULL;
    }
    uint64_t offset = 0;
    for (size_t i = 0; ok && i < n; i++) {
        const ccr_st_tensor *t = &tensors[i];
        cJSON *e = cJSON_AddObjectToObject(root, t->name);
        ok = e != NULL && cJSON_AddStringToObject(e, "dtype", t->dtype == CCR_DTYPE_F32
                                                                  ? "F32" : "I32") != NULL;
        cJSON *shape = ok ? cJSON_AddArrayToObject(e, "shape") : NULL;
        ok = shape != NULL;
        for (size_t d = 0; ok && d < t->rank; d++)
            ok = add_uint(shape, t->shape[d]);
        cJSON *offs = ok ? cJSON_AddArrayToObject(e, "data_offsets") : NULL;
        ok = offs != NULL && add_uint(offs, offset) && add_uint(offs, offset + nbytes[i]);
        offset += nbytes[i];
    }
    *out = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    if (*out == NULL)
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot build the header");
    *out_len = strlen(*out);
    return CCR_OK;
}

/* Writes n little-endian 32-bit words. */
static ccr_status write_le32(ccr_ctx *ctx, ccr_tmp *t, const void *data, size_t words)
{
    if (words == 0 || host_is_le())
        return ccr_tmp_write(ctx, t, data, words * ST_ELEM_SIZE);
    unsigned char buf[4096];
    const unsigned char *p = data;
    while (words > 0) {
        size_t k = words < sizeof buf / 4 ? words : sizeof buf / 4;
        memcpy(buf, p, k * 4);
        swap32(buf, k);
        CCR_TRY(ccr_tmp_write(ctx, t, buf, k * 4));
        p += k * 4;
        words -= k;
    }
    return CCR_OK;
}

ccr_status ccr_safetensors_write(ccr_ctx *ctx, const char *path,
                                 const ccr_st_tensor *tensors, size_t n,
                                 const char *const *meta, size_t n_meta)
{
    CCR_CHECK_NULL(ctx, path);
    if (path[0] == '\0')
        CCR_FAIL(ctx, CCR_EINVAL, "path is empty");
    if (tensors == NULL && n > 0)
        CCR_FAIL(ctx, CCR_EINVAL, "tensors is NULL but n = %zu", n);
    if (meta == NULL && n_meta > 0)
        CCR_FAIL(ctx, CCR_EINVAL, "meta is NULL but n_meta = %zu", n_meta);

    ccr_status s = CCR_OK;
    char *json = NULL;
    unsigned char *head = NULL;
    ccr_tmp t = {.fd = -1};
    size_t json_len = 0, *nbytes = ccr_mallocn(n, sizeof *nbytes);
    if (nbytes == NULL)
        BAIL(CCR_ENOMEM, "cannot allocate %zu sizes", n);
    if ((s = check_write_args(ctx, tensors, n, meta, n_meta, nbytes)) != CCR_OK ||
        (s = build_header(ctx, tensors, n, meta, n_meta, nbytes, &json, &json_len)) != CCR_OK)
        goto done;
    /* The header is padded with spaces so the data starts 8-byte aligned. */
    size_t hlen = (json_len + 7u) / 8u * 8u;
    unsigned char lenbuf[8];
    store_u64_le(lenbuf, hlen);

    /* Length, JSON and padding go out in one buffer. */
    if ((head = malloc(8 + hlen)) == NULL)
        BAIL(CCR_ENOMEM, "cannot allocate the %zu-byte header", hlen);
    memcpy(head, lenbuf, 8);
    memcpy(head + 8, json, json_len);
    memset(head + 8 + json_len, ' ', hlen - json_len);
    if ((s = ccr_tmp_create(ctx, path, &t)) != CCR_OK ||
        (s = ccr_tmp_write(ctx, &t, head, 8 + hlen)) != CCR_OK)
        goto done;
    for (size_t i = 0; i < n; i++)
        if ((s = write_le32(ctx, &t, tensors[i].data, nbytes[i] / ST_ELEM_SIZE)) != CCR_OK)
            goto done;
    s = ccr_tmp_commit(ctx, &t, NULL);
done:
    ccr_tmp_release(&t);   /* removes the temporary unless committed */
    free(head);
    cJSON_free(json);
    free(nbytes);
    return s;
}
