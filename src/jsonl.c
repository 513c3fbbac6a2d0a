/*
 * jsonl.c - JSON Lines results writer (ccr_jsonl.h).  A record is a cJSON
 * object whose fields keep insertion order; adding an existing key replaces
 * the value in place.  Numbers are stored as raw JSON text formatted here
 * rather than by cJSON: int64 values print exactly (cJSON holds numbers as
 * doubles, inexact beyond 2^53) and doubles print with the fewest of 15 or 17
 * significant digits that reads back to the same double, independent of the
 * C locale's decimal point.  Non-finite doubles become null.  Strings must be
 * valid UTF-8 so every line is valid JSON.  ccr_jsonl_write writes one line
 * and flushes it.
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cJSON.h>

#include "ccr/ccr_jsonl.h"
#include "internal.h"  // provides: CCR_FAIL, ccr_fail, ccr_utf8_valid

struct ccr_record {
    ccr_ctx *ctx;
    cJSON *obj;
};

struct ccr_jsonl {
    ccr_ctx *ctx;
    FILE *f;
};

ccr_status ccr_record_init(ccr_ctx *ctx, ccr_record **out)
{
    CCR_CHECK_NULL(ctx, out);
    ccr_record *r = malloc(sizeof *r);
    cJSON *obj = cJSON_CreateObject();
    if (r == NULL || obj == NULL) {
        free(r);
        cJSON_Delete(obj);
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate a record");
    }
    r->ctx = ctx;
    r->obj = obj;
    *out = r;
    return CCR_OK;
}

void ccr_record_free(ccr_record *r)
{
    if (r == NULL)
        return;
    cJSON_Delete(r->obj);
    free(r);
}

void ccr_record_clear(ccr_record *r)
{
    if (r == NULL)
        return;
    cJSON *c = r->obj->child;
    while (c != NULL) {
        cJSON *next = c->next;
        cJSON_Delete(cJSON_DetachItemViaPointer(r->obj, c));
        c = next;
    }
}

/* Checks the key, then stores item under it (replacing an existing field in
 * place).  Takes ownership of item: it is deleted on failure.  A NULL item
 * means its creation failed. */
static ccr_status put(ccr_record *r, const char *key, cJSON *item, const char *func)
{
    ccr_status s = CCR_OK;
    if (r == NULL) {
        s = CCR_EINVAL;   /* no context to record the message on */
    } else if (key == NULL || key[0] == '\0') {
        s = ccr_fail(r->ctx, CCR_EINVAL, func, __FILE__, __LINE__, "key is %s",
                     key == NULL ? "NULL" : "empty");
    } else if (!ccr_utf8_valid(key, strlen(key))) {
        s = ccr_fail(r->ctx, CCR_EINVAL, func, __FILE__, __LINE__,
                     "key is not valid UTF-8");
    } else if (item == NULL) {
        s = ccr_fail(r->ctx, CCR_ENOMEM, func, __FILE__, __LINE__,
                     "cannot allocate the value of '%.80s'", key);
    } else {
        cJSON *old = cJSON_GetObjectItemCaseSensitive(r->obj, key);
        if (old != NULL) {
            /* The replacement takes over the old node's key string, so
             * nothing is allocated and the position is kept. */
            item->string = old->string;
            item->type |= old->type & cJSON_StringIsConst;
            old->string = NULL;
            cJSON_ReplaceItemViaPointer(r->obj, old, item);
            return CCR_OK;
        }
        if (cJSON_AddItemToObject(r->obj, key, item))
            return CCR_OK;
        s = ccr_fail(r->ctx, CCR_ENOMEM, func, __FILE__, __LINE__,
                     "cannot add the field '%.80s'", key);
    }
    cJSON_Delete(item);
    return s;
}

/* A double as raw JSON: null if non-finite, else the shortest of %.15g and
 * %.17g that reads back exactly, with '.' as the decimal point whatever the
 * locale. */
static cJSON *make_double(double v)
{
    if (!isfinite(v))
        return cJSON_CreateNull();
    char buf[64], out[64];
    snprintf(buf, sizeof buf, "%.15g", v);
    if (strtod(buf, NULL) != v)
        snprintf(buf, sizeof buf, "%.17g", v);
    size_t j = 0;
    bool in_point = false;
    for (const char *p = buf; *p != '\0' && j + 1 < sizeof out; p++) {
        bool plain = (*p >= '0' && *p <= '9') || *p == '-' || *p == '+' || *p == 'e' ||
                     *p == 'E';
        if (plain)
            out[j++] = *p;
        else if (!in_point)
            out[j++] = '.';
        in_point = !plain;
    }
    out[j] = '\0';
    return cJSON_CreateRaw(out);
}

ccr_status ccr_record_add_str(ccr_record *r, const char *key, const char *value)
{
    if (r != NULL && value == NULL)
        CCR_FAIL(r->ctx, CCR_EINVAL, "value of '%.80s' is NULL", key ? key : "(null)");
    if (r != NULL && !ccr_utf8_valid(value, strlen(value)))
        CCR_FAIL(r->ctx, CCR_EINVAL, "value of '%.80s' is not valid UTF-8",
                 key ? key : "(null)");
    return put(r, key, value ? cJSON_CreateString(value) : NULL, __func__);
}

ccr_status ccr_record_add_int(ccr_record *r, const char *key, int64_t value)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%" PRId64, value);
    return put(r, key, cJSON_CreateRaw(buf), __func__);
}

ccr_status ccr_record_add_double(ccr_record *r, const char *key, double value)
{
    return put(r, key, make_double(value), __func__);
}

ccr_status ccr_record_add_bool(ccr_record *r, const char *key, bool value)
{
    return put(r, key, cJSON_CreateBool(value), __func__);
}

ccr_status ccr_record_add_doubles(ccr_record *r, const char *key, const double *v, size_t n)
{
    if (r != NULL && v == NULL && n > 0)
        CCR_FAIL(r->ctx, CCR_EINVAL, "v is NULL but n = %zu", n);
    cJSON *arr = cJSON_CreateArray();
    for (size_t i = 0; arr != NULL && i < n; i++) {
        cJSON *item = make_double(v[i]);
        if (item == NULL || !cJSON_AddItemToArray(arr, item)) {
            cJSON_Delete(item);
            cJSON_Delete(arr);
            arr = NULL;
        }
    }
    return put(r, key, arr, __func__);
}

ccr_status ccr_record_to_string(const ccr_record *r, char **out)
{
    if (r == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(r->ctx, out);
    /* Copied so the caller can use free() whatever cJSON's hooks are. */
    char *json = cJSON_PrintUnformatted(r->obj);
    char *copy = NULL;
    if (json != NULL) {
        size_t len = strlen(json) + 1;
        copy = malloc(len);
        if (copy != NULL)
            memcpy(copy, json, len);
        cJSON_free(json);
    }
    if (copy == NULL)
        CCR_FAIL(r->ctx, CCR_ENOMEM, "cannot print the record");
    *out = copy;
    return CCR_OK;
}

ccr_status ccr_jsonl_open(ccr_ctx *ctx, const char *path, bool append, ccr_jsonl **out)
{
    CCR_CHECK_NULL(ctx, path);
    CCR_CHECK_NULL(ctx, out);
    ccr_jsonl *w = malloc(sizeof *w);
    if (w == NULL)
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate the writer");
    w->ctx = ctx;
    w->f = fopen(path, append ? "ab" : "wb");
    if (w->f == NULL) {
        free(w);
        CCR_FAIL(ctx, CCR_EIO, "cannot open '%.200s' for %s", path,
                 append ? "appending" : "writing");
    }
    *out = w;
    return CCR_OK;
}

ccr_status ccr_jsonl_write(ccr_jsonl *w, const ccr_record *r)
{
    if (w == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(w->ctx, r);
    char *line = cJSON_PrintUnformatted(r->obj);
    if (line == NULL)
        CCR_FAIL(w->ctx, CCR_ENOMEM, "cannot print the record");
    size_t len = strlen(line);
    bool ok = fwrite(line, 1, len, w->f) == len && fputc('\n', w->f) != EOF &&
              fflush(w->f) == 0;
    cJSON_free(line);
    if (!ok)
        CCR_FAIL(w->ctx, CCR_EIO, "cannot write a line");
    return CCR_OK;
}

ccr_status ccr_jsonl_close(ccr_jsonl *w)
{
    if (w == NULL)
        return CCR_OK;
    ccr_ctx *ctx = w->ctx;
    int rc = fclose(w->f);
    free(w);
    if (rc != 0)
        CCR_FAIL(ctx, CCR_EIO, "closing the file failed");
    return CCR_OK;
}
