/*
 * jsonl.c - JSON Lines results writer (ccr_jsonl.h).  A record is a cJSON
 * object whose fields keep insertion order; adding an existing key replaces
 * the value in place.  Numbers are stored as raw JSON text formatted here
 * rather than by cJSON: int64 values print exactly (cJSON holds numbers as
 * doubles, inexact beyond 2^53) and doubles print with the fewest of 15 or 17
 * significant digits that reads back to the same double, independent of the
 * C locale's decimal point.  Non-finite doubles become null.  Strings must be
 * valid UTF-8 so every line is valid JSON.
 *
 * The lines go to a temporary beside the file (tmpfile.h), each with one
 * write(2); a failed write (a full disk) is cut back to the last full line.
 * ccr_jsonl_close renames the temporary over the file, ccr_jsonl_abort to
 * "<path>.partial", so the file a user keeps is either the previous one or a
 * complete new one.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include <cJSON.h>

#include "ccr/ccr_jsonl.h"
#include "internal.h"  // provides: CCR_FAIL, ccr_fail, ccr_utf8_valid
#include "tmpfile.h"   // provides: ccr_tmp_create, ccr_tmp_write, ccr_tmp_commit

struct ccr_record {
    ccr_ctx *ctx;
    cJSON *obj;
};

struct ccr_jsonl {
    ccr_ctx *ctx;
    ccr_tmp t;        /* the temporary the lines go to (tmpfile.h) */
    char *partial;    /* "<path>.partial" */
    off_t committed;  /* bytes of full lines written */
    off_t last_nl;    /* append mode: end of the previous file's last line */
    size_t lines;     /* lines this writer wrote */
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

/* Copies the previous file's bytes into the temporary (append mode), up to
 * and including its last newline: a half line left by an older writer is
 * not carried on. */
static ccr_status copy_previous(ccr_jsonl *w, const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return errno == ENOENT ? CCR_OK
                               : CCR_FAIL_EXPR(w->ctx, CCR_EIO, "cannot read '%.200s': %s",
                                               path, strerror(errno));
    ccr_status s = CCR_OK;
    char buf[65536];
    size_t got;
    while (s == CCR_OK && (got = fread(buf, 1, sizeof buf, f)) > 0) {
        s = ccr_tmp_write(w->ctx, &w->t, buf, got);
        for (size_t i = got; i > 0; i--)
            if (buf[i - 1] == '\n') {
                w->last_nl = w->committed + (off_t)i;
                break;
            }
        w->committed += (off_t)got;
    }
    if (s == CCR_OK && ferror(f))
        s = CCR_FAIL_EXPR(w->ctx, CCR_EIO, "cannot read '%.200s'", path);
    fclose(f);
    if (s == CCR_OK && w->last_nl != w->committed) {
        w->committed = w->last_nl;
        if (ftruncate(w->t.fd, w->committed) != 0 || lseek(w->t.fd, w->committed, SEEK_SET) < 0)
            s = CCR_FAIL_EXPR(w->ctx, CCR_EIO, "cannot truncate '%.200s': %s", w->t.tmp,
                              strerror(errno));
    }
    return s;
}

/* The context's message, copied (formatting it into itself would overlap). */
static void saved_msg(ccr_ctx *ctx, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s", ccr_ctx_errmsg(ctx));
}

static char *with_suffix(const char *path, const char *suffix)
{
    size_t a = strlen(path), b = strlen(suffix);
    char *p = malloc(a + b + 1);
    if (p != NULL) {
        memcpy(p, path, a);
        memcpy(p + a, suffix, b + 1);
    }
    return p;
}

ccr_status ccr_jsonl_open(ccr_ctx *ctx, const char *path, bool append, ccr_jsonl **out)
{
    CCR_CHECK_NULL(ctx, path);
    CCR_CHECK_NULL(ctx, out);
    ccr_jsonl *w = calloc(1, sizeof *w);
    char *partial = with_suffix(path, CCR_JSONL_PARTIAL_SUFFIX);
    if (w == NULL || partial == NULL) {
        free(w);
        free(partial);
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate the writer");
    }
    w->ctx = ctx;
    w->partial = partial;
    ccr_status s = ccr_tmp_create(ctx, path, &w->t);
    if (s == CCR_OK && append && !w->t.direct)
        s = copy_previous(w, path);
    if (s != CCR_OK) {
        ccr_tmp_release(&w->t);
        free(w->partial);
        free(w);
        char msg[512];
        saved_msg(ctx, msg, sizeof msg);
        return ccr_fail(ctx, s, __func__, __FILE__, __LINE__, "cannot open '%.200s' for %s: %s",
                        path, append ? "appending" : "writing", msg);
    }
    *out = w;
    return CCR_OK;
}

ccr_status ccr_jsonl_write(ccr_jsonl *w, const ccr_record *r)
{
    if (w == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(w->ctx, r);
    if (w->t.fd < 0)
        CCR_FAIL(w->ctx, CCR_EINVAL, "the writer is closed");
    char *json = cJSON_PrintUnformatted(r->obj);
    size_t len = json != NULL ? strlen(json) : 0;
    char *line = json != NULL ? malloc(len + 1) : NULL;
    if (line == NULL) {
        cJSON_free(json);
        CCR_FAIL(w->ctx, CCR_ENOMEM, "cannot print the record");
    }
    memcpy(line, json, len);
    line[len] = '\n';
    cJSON_free(json);
    /* One write(2) of the whole line (ccr_tmp_write retries only a short
     * write); on failure the file is cut back to its last full line. */
    ccr_status s = ccr_tmp_write(w->ctx, &w->t, line, len + 1);
    free(line);
    if (s == CCR_OK) {
        w->committed += (off_t)(len + 1);
        w->lines++;
        return CCR_OK;
    }
    if (!w->t.direct &&
        (ftruncate(w->t.fd, w->committed) != 0 || lseek(w->t.fd, w->committed, SEEK_SET) < 0)) {
        int err = errno;
        char msg[512];
        saved_msg(w->ctx, msg, sizeof msg);
        CCR_FAIL(w->ctx, CCR_EIO, "%s; cutting back to the last full line failed: %s", msg,
                 strerror(err));
    }
    return s;
}

static void free_writer(ccr_jsonl *w)
{
    ccr_tmp_release(&w->t);
    free(w->partial);
    free(w);
}

ccr_status ccr_jsonl_close(ccr_jsonl *w)
{
    if (w == NULL)
        return CCR_OK;
    ccr_ctx *ctx = w->ctx;
    ccr_status s = ccr_tmp_commit(ctx, &w->t, NULL);
    if (s != CCR_OK && w->t.live) {
        /* The message of the first failure stays; the results are kept. */
        char msg[512];
        saved_msg(ctx, msg, sizeof msg);
        if (ccr_tmp_commit(ctx, &w->t, w->partial) == CCR_OK)
            s = ccr_fail(ctx, s, __func__, __FILE__, __LINE__, "%s; the results are in '%.200s'",
                         msg, w->partial);
        else
            s = ccr_fail(ctx, s, __func__, __FILE__, __LINE__, "%s", msg);
    }
    free_writer(w);
    return s;
}

ccr_status ccr_jsonl_abort(ccr_jsonl *w)
{
    if (w == NULL)
        return CCR_OK;
    ccr_ctx *ctx = w->ctx;
    ccr_status s = CCR_OK;
    if (w->t.direct)
        s = ccr_tmp_commit(ctx, &w->t, NULL);
    else if (w->lines > 0)
        s = ccr_tmp_commit(ctx, &w->t, w->partial);
    /* else: nothing of this run to keep; free_writer removes the temporary */
    free_writer(w);
    return s;
}

size_t ccr_jsonl_lines(const ccr_jsonl *w) { return w == NULL ? 0 : w->lines; }

const char *ccr_jsonl_temp_path(const ccr_jsonl *w)
{
    return w == NULL || w->t.direct ? NULL : w->t.tmp;
}

const char *ccr_jsonl_partial_path(const ccr_jsonl *w)
{
    return w == NULL || w->t.direct ? NULL : w->partial;
}
