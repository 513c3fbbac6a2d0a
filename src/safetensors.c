/*
 * safetensors.c - reading and writing named F32/I32 tensors in the
 * safetensors format (ccr_safetensors.h).  The writer builds the JSON header
 * with cJSON (integers are emitted as exact decimal text, never as doubles),
 * pads it with spaces to a multiple of 8 bytes, and writes header and
 * little-endian data to a temporary file beside the target which is renamed
 * into place only when everything was written.  The reader loads the whole
 * file, copies the data section into its own malloc'd (hence aligned) buffer
 * and validates the header strictly: lengths, UTF-8, JSON syntax, dtypes,
 * shapes, offsets (exact sizes, no overlap, no gap, full coverage), duplicate
 * names and string-only metadata.  Anything malformed is CCR_EFORMAT with a
 * message naming the offending entry.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include <cJSON.h>

#include "ccr/ccr_safetensors.h"
#include "internal.h"

#define ST_ELEM_SIZE 4u                  /* bytes per element, F32 and I32 */
#define ST_MAX_INT 9007199254740992.0    /* 2^53: larger JSON numbers are inexact */
#define ST_META_KEY "__metadata__"

/* Records the failure in s and jumps to the function's cleanup. */
#define BAIL(code, ...) \
    do { s = CCR_FAIL_EXPR(ctx, (code), __VA_ARGS__); goto done; } while (0)

struct ccr_safetensors {
    size_t n;                       /* tensors, file order */
    ccr_st_tensor *tensors;         /* names point into names */
    char *names;                    /* every tensor name, NUL-separated */
    const ccr_st_tensor **by_name;  /* the same tensors sorted by name */
    size_t n_meta;
    char **meta;                    /* 2 * n_meta strings: key, value, ... */
    char *meta_text;                /* where they are stored */
    unsigned char *data;            /* the data section (owned) */
};

/* ---- byte order and small helpers ---- */

static bool host_is_le(void)
{
    const uint32_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

static void swap32(unsigned char *p, size_t words)
{
    for (unsigned char *end = p + 4 * words, t; p < end; p += 4) {
        t = p[0], p[0] = p[3], p[3] = t;
        t = p[1], p[1] = p[2], p[2] = t;
    }
}

static uint64_t load_u64_le(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void store_u64_le(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++, v >>= 8)
        p[i] = (unsigned char)(v & 0xffu);
}

/* Whether s[0..len) is well-formed UTF-8 (no overlongs, no surrogates). */
static bool utf8_valid(const unsigned char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        unsigned c = s[i];
        size_t k;
        uint32_t cp, min;
        if (c < 0x80) { i++; continue; }
        if ((c & 0xe0) == 0xc0) { k = 1; cp = c & 0x1f; min = 0x80; }
        else if ((c & 0xf0) == 0xe0) { k = 2; cp = c & 0x0f; min = 0x800; }
        else if ((c & 0xf8) == 0xf0) { k = 3; cp = c & 0x07; min = 0x10000; }
        else return false;
        if (len - i <= k)
            return false;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + j] & 0x3fu);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += k + 1;
    }
    return true;
}

static int cmp_str_ptr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Sorts the n pointers in place and returns the first repeated string. */
static const char *sorted_duplicate(const char **names, size_t n)
{
    if (n < 2)
        return NULL;
    qsort(names, n, sizeof *names, cmp_str_ptr);
    for (size_t i = 1; i < n; i++)
        if (strcmp(names[i - 1], names[i]) == 0)
            return names[i];
    return NULL;
}

static int cmp_tensor_name(const void *a, const void *b)
{
    return strcmp((*(const ccr_st_tensor *const *)a)->name,
                  (*(const ccr_st_tensor *const *)b)->name);
}

static int cmp_key_tensor(const void *key, const void *elem)
{
    return strcmp((const char *)key, (*(const ccr_st_tensor *const *)elem)->name);
}

size_t ccr_st_tensor_numel(const ccr_st_tensor *t)
{
    if (t == NULL)
        return 0;
    size_t rank = t->rank <= CCR_ST_MAX_RANK ? t->rank : CCR_ST_MAX_RANK;
    for (size_t i = 0; i < rank; i++)
        if (t->shape[i] == 0)
            return 0;
    size_t n = 1;
    for (size_t i = 0; i < rank; i++)
        if (!ccr_mul_ok(n, t->shape[i], &n))
            return SIZE_MAX;
    return n;
}

/* ---- writer ---- */

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
        if (!utf8_valid((const unsigned char *)t->name, strlen(t->name)))
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
        if (!utf8_valid((const unsigned char *)meta[i], strlen(meta[i])))
            CCR_FAIL(ctx, CCR_EINVAL, "metadata %s %zu is not valid UTF-8",
                     i % 2 ? "value" : "key", i / 2);
    }

    /* Duplicates: one scratch array serves tensor names, then metadata keys. */
    size_t cap = n > n_meta ? n : n_meta;
    if (cap < 2)
        return CCR_OK;
    ccr_status s = CCR_OK;
    const char **names = malloc(cap * sizeof *names), *dup;
    if (names == NULL)
        BAIL(CCR_ENOMEM, "cannot allocate %zu name pointers", cap);
    for (size_t i = 0; i < n; i++)
        names[i] = tensors[i].name;
    if ((dup = sorted_duplicate(names, n)) != NULL)
        BAIL(CCR_EINVAL, "duplicate tensor name '%.80s'", dup);
    for (size_t i = 0; i < n_meta; i++)
        names[i] = meta[2 * i];
    if ((dup = sorted_duplicate(names, n_meta)) != NULL)
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
static bool write_le32(FILE *f, const void *data, size_t words)
{
    if (words == 0)
        return true;
    if (host_is_le())
        return fwrite(data, ST_ELEM_SIZE, words, f) == words;
    unsigned char buf[4096];
    const unsigned char *p = data;
    while (words > 0) {
        size_t k = words < sizeof buf / 4 ? words : sizeof buf / 4;
        memcpy(buf, p, k * 4);
        swap32(buf, k);
        if (fwrite(buf, 4, k, f) != k)
            return false;
        p += k * 4;
        words -= k;
    }
    return true;
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
    char *json = NULL, *tmp = NULL;
    size_t json_len = 0, *nbytes = malloc((n > 0 ? n : 1) * sizeof *nbytes);
    if (nbytes == NULL)
        BAIL(CCR_ENOMEM, "cannot allocate %zu sizes", n);
    if ((s = check_write_args(ctx, tensors, n, meta, n_meta, nbytes)) != CCR_OK ||
        (s = build_header(ctx, tensors, n, meta, n_meta, nbytes, &json, &json_len)) != CCR_OK)
        goto done;
    /* The header is padded with spaces so the data starts 8-byte aligned. */
    size_t hlen = (json_len + 7u) / 8u * 8u;
    unsigned char lenbuf[8];
    store_u64_le(lenbuf, hlen);

    size_t tmp_cap = strlen(path) + 48;
    if ((tmp = malloc(tmp_cap)) == NULL)
        BAIL(CCR_ENOMEM, "cannot allocate the temporary name");
    /* "x" (C11) creates exclusively, so concurrent writers never share a file. */
    FILE *f = NULL;
    int err = 0;
    for (unsigned k = 0; k < 100 && f == NULL && (k == 0 || err == EEXIST); k++) {
        snprintf(tmp, tmp_cap, "%s.tmp.%ld.%u", path, (long)getpid(), k);
        errno = 0;
        f = fopen(tmp, "wbx");
        err = errno;
    }
    if (f == NULL)
        BAIL(CCR_EIO, "cannot create '%.200s': %s", tmp, err ? strerror(err) : "unknown error");
    bool ok = fwrite(lenbuf, 1, 8, f) == 8 && fwrite(json, 1, json_len, f) == json_len;
    for (size_t i = json_len; ok && i < hlen; i++)
        ok = fputc(' ', f) != EOF;
    for (size_t i = 0; ok && i < n; i++)
        ok = write_le32(f, tensors[i].data, nbytes[i] / ST_ELEM_SIZE);
    ok = ok && fflush(f) == 0 && !ferror(f);
    err = ok ? 0 : errno;
    if (fclose(f) != 0 && ok) {
        ok = false;
        err = errno;
    }
    if (!ok) {
        remove(tmp);
        BAIL(CCR_EIO, "cannot write '%.200s': %s", tmp, err ? strerror(err) : "write error");
    }
    if (rename(tmp, path) != 0) {
        err = errno;
        remove(tmp);
        BAIL(CCR_EIO, "cannot rename the temporary file to '%.200s': %s", path, strerror(err));
    }
done:
    free(tmp);
    cJSON_free(json);
    free(nbytes);
    return s;
}

/* ---- reader ---- */

#define ST_BAD(...) CCR_FAIL(ctx, CCR_EFORMAT, __VA_ARGS__)

/* A JSON number that is an exact integer in [0, 2^53]. */
static bool json_uint(const cJSON *item, uint64_t *out)
{
    if (!cJSON_IsNumber(item))
        return false;
    double v = item->valuedouble;
    if (!isfinite(v) || v < 0.0 || v > ST_MAX_INT || floor(v) != v)
        return false;
    *out = (uint64_t)v;
    return true;
}

static const char *json_kind(const cJSON *item)
{
    if (cJSON_IsNumber(item)) return "a number";
    if (cJSON_IsString(item)) return "a string";
    if (cJSON_IsArray(item)) return "an array";
    if (cJSON_IsObject(item)) return "an object";
    if (cJSON_IsBool(item)) return "a boolean";
    if (cJSON_IsNull(item)) return "null";
    return "an invalid value";
}

typedef struct st_span {
    uint64_t begin, end;
    const char *name;
} st_span;

static int cmp_span(const void *a, const void *b)
{
    const st_span *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return 0;
}

/* Validates one tensor entry; fills t (name borrowed from the JSON) and span. */
static ccr_status parse_entry(ccr_ctx *ctx, const cJSON *e, uint64_t data_len,
                              ccr_st_tensor *t, st_span *span)
{
    const char *name = e->string;
    if (name[0] == '\0')
        ST_BAD("a tensor has an empty name");
    if (!cJSON_IsObject(e))
        ST_BAD("entry '%.80s' is %s, not an object", name, json_kind(e));
    const cJSON *dtype = NULL, *shape = NULL, *offs = NULL, *c;
    cJSON_ArrayForEach(c, e) {
        const cJSON **slot = strcmp(c->string, "dtype") == 0 ? &dtype
                             : strcmp(c->string, "shape") == 0 ? &shape
                             : strcmp(c->string, "data_offsets") == 0 ? &offs : NULL;
        if (slot == NULL)
            ST_BAD("tensor '%.80s': unknown field '%.40s'", name, c->string);
        if (*slot != NULL)
            ST_BAD("tensor '%.80s': field '%s' appears twice", name, c->string);
        *slot = c;
    }
    if (dtype == NULL || shape == NULL || offs == NULL)
        ST_BAD("tensor '%.80s': missing field '%s'", name,
               dtype == NULL ? "dtype" : shape == NULL ? "shape" : "data_offsets");

    if (!cJSON_IsString(dtype))
        ST_BAD("tensor '%.80s': dtype is %s, not a string", name, json_kind(dtype));
    if (strcmp(dtype->valuestring, "F32") == 0)
        t->dtype = CCR_DTYPE_F32;
    else if (strcmp(dtype->valuestring, "I32") == 0)
        t->dtype = CCR_DTYPE_I32;
    else
        ST_BAD("tensor '%.80s' has dtype '%.16s'; ccr reads only F32 and I32", name,
               dtype->valuestring);

    if (!cJSON_IsArray(shape))
        ST_BAD("tensor '%.80s': shape is %s, not an array", name, json_kind(shape));
    size_t rank = 0;
    uint64_t numel = 1;
    bool overflow = false;
    cJSON_ArrayForEach(c, shape) {
        uint64_t dim;
        if (rank == CCR_ST_MAX_RANK)
            ST_BAD("tensor '%.80s': shape has more than %d dimensions", name, CCR_ST_MAX_RANK);
        if (!json_uint(c, &dim) || dim > SIZE_MAX)
            ST_BAD("tensor '%.80s': shape[%zu] is not a non-negative integer", name, rank);
        if (dim != 0 && numel > UINT64_MAX / dim)
            overflow = true;
        else
            numel *= dim;
        t->shape[rank++] = (size_t)dim;
    }
    for (size_t d = 0; d < rank; d++)
        if (t->shape[d] == 0)
            numel = 0, overflow = false;
    if (overflow || numel > UINT64_MAX / ST_ELEM_SIZE)
        ST_BAD("tensor '%.80s': shape size overflows", name);
    t->rank = rank;
    t->name = name;

    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 ||
        !json_uint(offs->child, &span->begin) || !json_uint(offs->child->next, &span->end))
        ST_BAD("tensor '%.80s': data_offsets is not [begin, end] with non-negative integers",
               name);
    if (span->end < span->begin)
        ST_BAD("tensor '%.80s': data_offsets end %" PRIu64 " < begin %" PRIu64, name,
               span->end, span->begin);
    if (span->end > data_len)
        ST_BAD("tensor '%.80s': data_offsets end %" PRIu64 " is beyond the %" PRIu64
               "-byte data section", name, span->end, data_len);
    if (span->end - span->begin != numel * ST_ELEM_SIZE)
        ST_BAD("tensor '%.80s': data_offsets span %" PRIu64 " bytes but the shape needs %"
               PRIu64, name, span->end - span->begin, numel * ST_ELEM_SIZE);
    span->name = name;
    return CCR_OK;
}

/* Validates metadata: an object of string values with distinct keys. */
static ccr_status parse_meta(ccr_ctx *ctx, const cJSON *m, ccr_safetensors *f)
{
    if (!cJSON_IsObject(m))
        ST_BAD("\"" ST_META_KEY "\" is %s, not an object", json_kind(m));
    size_t n = 0, len = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, m) {
        if (!cJSON_IsString(c))
            ST_BAD("metadata '%.80s' is %s; values must be strings", c->string, json_kind(c));
        n++;
        len += strlen(c->string) + strlen(c->valuestring) + 2;
    }
    if (n == 0)
        return CCR_OK;
    f->meta = malloc(2 * n * sizeof *f->meta);
    f->meta_text = malloc(len);
    if (f->meta == NULL || f->meta_text == NULL)
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate %zu metadata entries", n);
    char *p = f->meta_text;
    cJSON_ArrayForEach(c, m) {
        for (int k = 0; k < 2; k++) {   /* owned copies of key and value */
            const char *str = k == 0 ? c->string : c->valuestring;
            size_t sl = strlen(str) + 1;
            memcpy(p, str, sl);
            f->meta[2 * f->n_meta + (size_t)k] = p;
            p += sl;
        }
        f->n_meta++;
    }
    ccr_status s = CCR_OK;
    const char **keys = malloc(n * sizeof *keys), *dup;
    if (keys == NULL)
        BAIL(CCR_ENOMEM, "cannot allocate %zu key pointers", n);
    for (size_t i = 0; i < n; i++)
        keys[i] = f->meta[2 * i];
    if ((dup = sorted_duplicate(keys, n)) != NULL)
        BAIL(CCR_EFORMAT, "duplicate metadata key '%.80s'", dup);
done:
    free(keys);
    return s;
}

/* Checks the offsets tile the data section exactly (spans sorted in place). */
static ccr_status check_coverage(ccr_ctx *ctx, st_span *spans, size_t n, uint64_t data_len)
{
    qsort(spans, n, sizeof *spans, cmp_span);
    uint64_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        if (spans[i].begin < pos)
            ST_BAD("tensors '%.80s' and '%.80s' overlap", spans[i - 1].name, spans[i].name);
        if (spans[i].begin > pos)
            ST_BAD("data bytes %" PRIu64 "..%" PRIu64 " belong to no tensor", pos,
                   spans[i].begin);
        pos = spans[i].end;
    }
    if (pos != data_len)
        ST_BAD("data bytes %" PRIu64 "..%" PRIu64 " belong to no tensor", pos, data_len);
    return CCR_OK;
}

/* Parses and validates the header; on success f holds tensors and metadata
 * whose data point into data (data_len bytes). */
static ccr_status parse_header(ccr_ctx *ctx, const char *hdr, size_t hlen, unsigned char *data,
                               uint64_t data_len, ccr_safetensors *f)
{
    if (hlen == 0 || hdr[0] != '{')
        ST_BAD("header does not start with '{'");
    if (!utf8_valid((const unsigned char *)hdr, hlen))
        ST_BAD("header is not valid UTF-8");
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(hdr, hlen, &end, false);
    if (root == NULL) {
        ptrdiff_t at = end != NULL ? end - hdr : 0;
        ST_BAD("header is not valid JSON (error near byte %td of %zu)", at, hlen);
    }
    ccr_status s = CCR_OK;
    st_span *spans = NULL;
    for (const char *p = end; p < hdr + hlen; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r')
            BAIL(CCR_EFORMAT, "non-space bytes after the header JSON (at %td)", p - hdr);
    if (!cJSON_IsObject(root))
        BAIL(CCR_EFORMAT, "header is %s, not an object", json_kind(root));
    size_t n = 0, names_len = 0;
    const cJSON *meta = NULL, *c;
    cJSON_ArrayForEach(c, root) {
        if (strcmp(c->string, ST_META_KEY) != 0) {
            n++;
            names_len += strlen(c->string) + 1;
        } else if (meta != NULL) {
            BAIL(CCR_EFORMAT, "\"" ST_META_KEY "\" appears twice");
        } else {
            meta = c;
        }
    }
    if (meta != NULL && (s = parse_meta(ctx, meta, f)) != CCR_OK)
        goto done;

    f->tensors = calloc(n > 0 ? n : 1, sizeof *f->tensors);
    f->by_name = calloc(n > 0 ? n : 1, sizeof *f->by_name);
    f->names = malloc(names_len > 0 ? names_len : 1);
    spans = calloc(n > 0 ? n : 1, sizeof *spans);
    if (f->tensors == NULL || f->by_name == NULL || f->names == NULL || spans == NULL)
        BAIL(CCR_ENOMEM, "cannot allocate %zu tensor entries", n);
    char *name = f->names;
    cJSON_ArrayForEach(c, root) {
        if (c == meta)
            continue;
        ccr_st_tensor *t = &f->tensors[f->n];
        if ((s = parse_entry(ctx, c, data_len, t, &spans[f->n])) != CCR_OK)
            goto done;
        size_t len = strlen(c->string) + 1;   /* owned copy of the name */
        memcpy(name, c->string, len);
        t->name = name;
        name += len;
        t->data = data + spans[f->n].begin;
        f->by_name[f->n++] = t;
    }
    qsort(f->by_name, n, sizeof *f->by_name, cmp_tensor_name);
    for (size_t i = 1; i < n; i++)
        if (strcmp(f->by_name[i - 1]->name, f->by_name[i]->name) == 0)
            BAIL(CCR_EFORMAT, "duplicate tensor name '%.80s'", f->by_name[i]->name);
    s = check_coverage(ctx, spans, n, data_len);
done:
    free(spans);
    cJSON_Delete(root);
    return s;
}

void ccr_safetensors_free(ccr_safetensors *f)
{
    if (f == NULL)
        return;
    free(f->names);
    free(f->meta_text);
    free(f->meta);
    free(f->tensors);
    free(f->by_name);
    free(f->data);
    free(f);
}

/* Reads exactly len bytes. */
static bool read_all(FILE *fp, void *buf, size_t len)
{
    return len == 0 || fread(buf, 1, len, fp) == len;
}

ccr_status ccr_safetensors_read(ccr_ctx *ctx, const char *path, ccr_safetensors **out)
{
    CCR_CHECK_NULL(ctx, path);
    CCR_CHECK_NULL(ctx, out);
    errno = 0;
    FILE *fp = fopen(path, "rb");
    if (fp == NULL)
        CCR_FAIL(ctx, CCR_EIO, "cannot open '%.200s': %s", path,
                 errno ? strerror(errno) : "unknown error");

    ccr_status s = CCR_OK;
    char *hdr = NULL;
    ccr_safetensors *f = NULL;
    /* Reading first classifies directories and unreadable files as CCR_EIO. */
    unsigned char lenbuf[8];
    errno = 0;
    size_t got = fread(lenbuf, 1, 8, fp);
    if (ferror(fp))
        BAIL(CCR_EIO, "cannot read '%.200s': %s", path, errno ? strerror(errno) : "read error");
    if (got < 8)
        BAIL(CCR_EFORMAT, "'%.200s' has %zu bytes, fewer than the 8-byte header length", path,
             got);
    off_t size = -1;
    if (fseeko(fp, 0, SEEK_END) == 0)
        size = ftello(fp);
    if (size < 8 || fseeko(fp, 8, SEEK_SET) != 0)
        BAIL(CCR_EIO, "cannot determine the size of '%.200s'", path);
    uint64_t hlen = load_u64_le(lenbuf), rest = (uint64_t)size - 8;
    if (hlen > CCR_ST_MAX_HEADER)
        BAIL(CCR_EFORMAT, "header length %" PRIu64 " exceeds the limit %u", hlen,
             CCR_ST_MAX_HEADER);
    if (hlen > rest)
        BAIL(CCR_EFORMAT, "header length %" PRIu64 " exceeds the %" PRIu64
             " bytes that follow it", hlen, rest);
    uint64_t data_len = rest - hlen;
    if (data_len > SIZE_MAX - 1)
        BAIL(CCR_ENOMEM, "data section of %" PRIu64 " bytes is too large", data_len);
    hdr = malloc((size_t)hlen + 1);
    f = calloc(1, sizeof *f);
    if (f != NULL)
        f->data = malloc(data_len > 0 ? (size_t)data_len : 1);
    if (hdr == NULL || f == NULL || f->data == NULL)
        BAIL(CCR_ENOMEM, "cannot allocate %" PRIu64 " bytes for '%.200s'", hlen + data_len,
             path);
    if (!read_all(fp, hdr, (size_t)hlen) || !read_all(fp, f->data, (size_t)data_len))
        BAIL(CCR_EIO, "cannot read '%.200s' (%s)", path,
             feof(fp) ? "file shrank while reading" : "read error");
    hdr[hlen] = '\0';
    s = parse_header(ctx, hdr, (size_t)hlen, f->data, data_len, f);
    if (s == CCR_OK && !host_is_le())
        swap32(f->data, (size_t)data_len / ST_ELEM_SIZE);
done:
    fclose(fp);
    free(hdr);
    if (s == CCR_OK)
        *out = f;
    else
        ccr_safetensors_free(f);
    return s;
}

size_t ccr_safetensors_count(const ccr_safetensors *f) { return f ? f->n : 0; }

const ccr_st_tensor *ccr_safetensors_at(const ccr_safetensors *f, size_t i)
{
    return (f != NULL && i < f->n) ? &f->tensors[i] : NULL;
}

const ccr_st_tensor *ccr_safetensors_find(const ccr_safetensors *f, const char *name)
{
    if (f == NULL || name == NULL || f->n == 0)
        return NULL;
    const ccr_st_tensor *const *hit =
        bsearch(name, f->by_name, f->n, sizeof *f->by_name, cmp_key_tensor);
    return hit ? *hit : NULL;
}

const char *ccr_safetensors_meta(const ccr_safetensors *f, const char *key)
{
    if (f == NULL || key == NULL)
        return NULL;
    for (size_t i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta[2 * i], key) == 0)
            return f->meta[2 * i + 1];
    return NULL;
}

size_t ccr_safetensors_meta_count(const ccr_safetensors *f) { return f ? f->n_meta : 0; }

const char *ccr_safetensors_meta_key(const ccr_safetensors *f, size_t i)
{
    return (f != NULL && i < f->n_meta) ? f->meta[2 * i] : NULL;
}
