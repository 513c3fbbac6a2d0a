/*
 * safetensors_read.c - reading safetensors files (ccr_safetensors_read,
 * ccr_safetensors_free and the accessors in ccr_safetensors.h), plus
 * ccr_st_tensor_numel.  The reader loads the whole file, copies the data
 * section into its own malloc'd (hence aligned) buffer and validates the
 * header strictly: lengths, UTF-8, JSON syntax, dtypes, shapes, offsets
 * (exact sizes, no overlap, no gap, full coverage), duplicate names and
 * string-only metadata.  Anything malformed is CCR_EFORMAT with a message
 * naming the offending entry.
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

#include <cJSON.h>

#include "ccr/ccr_safetensors.h"
#include "internal.h"          // provides: CCR_FAIL, CCR_CHECK_NULL, ccr_mul_ok, ccr_utf8_valid
#include "safetensors_impl.h"  // provides: ST_* limits, BAIL, LE helpers

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

/* ---- shared helpers and ccr_st_tensor_numel ---- */

static int cmp_str_ptr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Declared in safetensors_impl.h; the writer uses it too. */
const char *ccr_st_sorted_duplicate(const char **names, size_t n)
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
    f->meta = ccr_malloc3(2, n, sizeof *f->meta);
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
    const char **keys = ccr_mallocn(n, sizeof *keys), *dup;
    if (keys == NULL)
        BAIL(CCR_ENOMEM, "cannot allocate %zu key pointers", n);
    for (size_t i = 0; i < n; i++)
        keys[i] = f->meta[2 * i];
    if ((dup = ccr_st_sorted_duplicate(keys, n)) != NULL)
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
    if (!ccr_utf8_valid(hdr, hlen))
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
