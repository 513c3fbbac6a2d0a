/*
 * test_io.c - tests of the safetensors format: round trips, the exact byte
 * layout, strict rejection of malformed files, writer argument checks and
 * failure cleanup.  The JSON Lines writer is tested in test_jsonl.c.
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cJSON.h>

#include "ccr_test.h"

/* ---- helpers ---- */

/* The temporary name the writer uses first for path. */
static const char *tmp_name(const char *path)
{
    static char buf[600];
    snprintf(buf, sizeof buf, "%s.ccr-tmp.%ld.0", path, (long)getpid());
    return buf;
}

static uint64_t le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* Writes <8-byte LE hlen><hdr><data_len zero bytes>; hlen 0 means strlen(hdr). */
static const char *make_st(const char *hdr, size_t data_len, uint64_t hlen)
{
    const char *path = ccr_test_path("bad.safetensors");
    size_t h = strlen(hdr);
    unsigned char *buf = calloc(1, 8 + h + data_len);
    ck_assert_ptr_nonnull(buf);
    if (hlen == 0)
        hlen = h;
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)(hlen >> (8 * i));
    memcpy(buf + 8, hdr, h);
    ck_assert_int_eq(ccr_test_write_file(path, buf, 8 + h + data_len), 0);
    free(buf);
    return path;
}

/* Reading path fails with want, leaves *out alone and explains why; the
 * message contains needle if given. */
static void expect_read_fails(const char *path, ccr_status want, const char *needle,
                              const char *label)
{
    ccr_ctx *ctx = ccr_test_ctx();
    ccr_safetensors *sentinel = (ccr_safetensors *)&ctx;
    ccr_safetensors *out = sentinel;
    ccr_status s = ccr_safetensors_read(ctx, path, &out);
    ck_assert_msg(s == want, "%s: got %s, want %s (%s)", label, ccr_strerror(s),
                  ccr_strerror(want), ccr_ctx_errmsg(ctx));
    ck_assert_msg(out == sentinel, "%s: *out was modified", label);
    ck_assert_msg(ccr_ctx_errmsg(ctx)[0] != '\0', "%s: no message", label);
    if (needle != NULL)
        ck_assert_msg(strstr(ccr_ctx_errmsg(ctx), needle) != NULL,
                      "%s: message '%s' lacks '%s'", label, ccr_ctx_errmsg(ctx), needle);
    ccr_ctx_free(ctx);
}

/* ---- safetensors: round trip and layout ---- */

START_TEST(test_st_roundtrip)
{
    ccr_ctx *ctx = ccr_test_ctx();
    float w[12], t4[12], scalar = -3.25f;
    int32_t ids[5] = {7, -1, INT32_MAX, INT32_MIN, 0};
    for (int i = 0; i < 12; i++) {
        w[i] = (float)i * 0.5f - 2.0f;
        t4[i] = 1.0f / (float)(i + 1);
    }
    w[3] = NAN;   /* raw bits survive, NaN included */
    ccr_st_tensor t[6] = {
        {.name = "layer.w", .dtype = CCR_DTYPE_F32, .rank = 2, .shape = {3, 4}, .data = w},
        {.name = "ids", .dtype = CCR_DTYPE_I32, .rank = 1, .shape = {5}, .data = ids},
        {.name = "scalar", .dtype = CCR_DTYPE_F32, .rank = 0, .data = &scalar},
        {.name = "t4", .dtype = CCR_DTYPE_F32, .rank = 4, .shape = {2, 1, 3, 2}, .data = t4},
        {.name = "empty", .dtype = CCR_DTYPE_F32, .rank = 2, .shape = {0, 3}, .data = NULL},
        {.name = "caf\xc3\xa9 \"q\"", .dtype = CCR_DTYPE_I32, .rank = 1, .shape = {0}, .data = NULL},
    };
    const char *meta[] = {"gate", "topk", "note", "line1\n\"quoted\" \xe6\xbc\xa2"};
    const char *path = ccr_test_path("rt.safetensors");
    CCR_CK_OK(ctx, ccr_safetensors_write(ctx, path, t, 6, meta, 2));
    ck_assert(!ccr_test_exists(tmp_name(path)));

    ccr_safetensors *f = NULL;
    CCR_CK_OK(ctx, ccr_safetensors_read(ctx, path, &f));
    ck_assert_uint_eq(ccr_safetensors_count(f), 6);
    for (size_t i = 0; i < 6; i++) {
        const ccr_st_tensor *g = ccr_safetensors_at(f, i);
        ck_assert_ptr_nonnull(g);
        ck_assert_str_eq(g->name, t[i].name);
        ck_assert_ptr_ne(g->name, t[i].name);
        ck_assert_ptr_eq(ccr_safetensors_find(f, t[i].name), g);
        ck_assert_int_eq(g->dtype, t[i].dtype);
        ck_assert_uint_eq(g->rank, t[i].rank);
        for (size_t d = 0; d < g->rank; d++)
            ck_assert_uint_eq(g->shape[d], t[i].shape[d]);
        size_t numel = ccr_st_tensor_numel(g);
        ck_assert_uint_eq(numel, ccr_st_tensor_numel(&t[i]));
        ck_assert_ptr_nonnull(g->data);
        ck_assert_uint_eq((uintptr_t)g->data % 4, 0);
        if (numel > 0)
            ck_assert_int_eq(memcmp(g->data, t[i].data, numel * 4), 0);
    }
    ck_assert_uint_eq(ccr_st_tensor_numel(ccr_safetensors_at(f, 2)), 1);
    ck_assert_uint_eq(ccr_st_tensor_numel(ccr_safetensors_at(f, 4)), 0);
    ck_assert_ptr_null(ccr_safetensors_at(f, 6));
    ck_assert_ptr_null(ccr_safetensors_find(f, "nope"));
    ck_assert_ptr_null(ccr_safetensors_find(f, "layer"));
    ck_assert_uint_eq(ccr_safetensors_meta_count(f), 2);
    ck_assert_str_eq(ccr_safetensors_meta_key(f, 0), "gate");
    ck_assert_str_eq(ccr_safetensors_meta_key(f, 1), "note");
    ck_assert_ptr_null(ccr_safetensors_meta_key(f, 2));
    ck_assert_str_eq(ccr_safetensors_meta(f, "gate"), "topk");
    ck_assert_str_eq(ccr_safetensors_meta(f, "note"), meta[3]);
    ck_assert_ptr_null(ccr_safetensors_meta(f, "topk"));
    ccr_safetensors_free(f);

    /* Writing again replaces the file. */
    CCR_CK_OK(ctx, ccr_safetensors_write(ctx, path, &t[1], 1, NULL, 0));
    CCR_CK_OK(ctx, ccr_safetensors_read(ctx, path, &f));
    ck_assert_uint_eq(ccr_safetensors_count(f), 1);
    ck_assert_uint_eq(ccr_safetensors_meta_count(f), 0);
    ck_assert_ptr_null(ccr_safetensors_find(f, "layer.w"));
    ck_assert_int_eq(memcmp(ccr_safetensors_find(f, "ids")->data, ids, sizeof ids), 0);
    ccr_safetensors_free(f);
    ccr_safetensors_free(NULL);
    ck_assert_uint_eq(ccr_safetensors_count(NULL), 0);
    ck_assert_ptr_null(ccr_safetensors_find(NULL, "x"));
    remove(path);
    ccr_ctx_free(ctx);
}
END_TEST

START_TEST(test_st_layout)
{
    ccr_ctx *ctx = ccr_test_ctx();
    float a[2] = {1.0f, -2.0f};
    int32_t b[3] = {1, 2, -1};
    ccr_st_tensor t[2] = {
        {.name = "a", .dtype = CCR_DTYPE_F32, .rank = 1, .shape = {2}, .data = a},
        {.name = "b", .dtype = CCR_DTYPE_I32, .rank = 2, .shape = {3, 1}, .data = b},
    };
    const char *meta[] = {"k", "v"};
    const char *path = ccr_test_path("layout.safetensors");
    CCR_CK_OK(ctx, ccr_safetensors_write(ctx, path, t, 2, meta, 1));
    size_t len;
    unsigned char *buf = ccr_test_read_file(path, &len);
    ck_assert_uint_ge(len, 8);
    uint64_t n = le64(buf);
    ck_assert_uint_eq(n % 8, 0);
    ck_assert_uint_eq(len, 8 + n + 20);
    ck_assert_int_eq(buf[8], '{');

    const char *end = NULL;
    cJSON *h = cJSON_ParseWithLengthOpts((const char *)buf + 8, (size_t)n, &end, false);
    ck_assert_ptr_nonnull(h);
    for (const char *p = end; p < (const char *)buf + 8 + n; p++)
        ck_assert_int_eq(*p, ' ');
    ck_assert_uint_lt((size_t)(end - (const char *)buf - 8), (size_t)n + 1);
    ck_assert_uint_gt((size_t)(end - (const char *)buf - 8) + 8, (size_t)n);
    ck_assert_int_eq(cJSON_GetArraySize(h), 3);
    cJSON *m = cJSON_GetObjectItemCaseSensitive(h, "__metadata__");
    ck_assert_str_eq(cJSON_GetObjectItemCaseSensitive(m, "k")->valuestring, "v");
    const char *names[2] = {"a", "b"};
    const char *dtypes[2] = {"F32", "I32"};
    int offs[2][2] = {{0, 8}, {8, 20}};
    for (int i = 0; i < 2; i++) {
        cJSON *e = cJSON_GetObjectItemCaseSensitive(h, names[i]);
        ck_assert_ptr_nonnull(e);
        ck_assert_str_eq(cJSON_GetObjectItemCaseSensitive(e, "dtype")->valuestring, dtypes[i]);
        cJSON *o = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
        ck_assert_int_eq(cJSON_GetArraySize(o), 2);
        ck_assert_int_eq(cJSON_GetArrayItem(o, 0)->valueint, offs[i][0]);
        ck_assert_int_eq(cJSON_GetArrayItem(o, 1)->valueint, offs[i][1]);
        cJSON *s = cJSON_GetObjectItemCaseSensitive(e, "shape");
        ck_assert_int_eq(cJSON_GetArraySize(s), (int)t[i].rank);
        for (int d = 0; d < (int)t[i].rank; d++)
            ck_assert_int_eq(cJSON_GetArrayItem(s, d)->valueint, (int)t[i].shape[d]);
    }
    cJSON_Delete(h);
    /* Little-endian data, tensors contiguous in the given order. */
    const unsigned char want[20] = {0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0,
                                    1, 0, 0, 0, 2, 0, 0, 0, 0xff, 0xff, 0xff, 0xff};
    ck_assert_int_eq(memcmp(buf + 8 + n, want, 20), 0);
    free(buf);

    /* No tensors and no metadata: "{}" padded to 8 bytes, no data. */
    CCR_CK_OK(ctx, ccr_safetensors_write(ctx, path, NULL, 0, NULL, 0));
    buf = ccr_test_read_file(path, &len);
    ck_assert_uint_eq(len, 16);
    ck_assert_uint_eq(le64(buf), 8);
    ck_assert_int_eq(memcmp(buf + 8, "{}      ", 8), 0);
    free(buf);
    ccr_safetensors *f = NULL;
    CCR_CK_OK(ctx, ccr_safetensors_read(ctx, path, &f));
    ck_assert_uint_eq(ccr_safetensors_count(f), 0);
    ck_assert_ptr_null(ccr_safetensors_find(f, "a"));
    ccr_safetensors_free(f);
    remove(path);
    ccr_ctx_free(ctx);
}
END_TEST

/* Files other writers may produce: unpadded headers, offsets in a different
 * order from the keys, whitespace, zero-size tensors. */
static const struct { const char *hdr; size_t data_len; } good_files[] = {
    {"{}", 0},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8},
    {"{\"b\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[4,8]},"
     "\"a\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}", 8},
    {"{ \"__metadata__\" : {\"x\":\"y\"},\n\"z\":{\"shape\":[0,5],\"dtype\":\"F32\","
     "\"data_offsets\":[0,0]} }\n\t ", 0},
    {"{\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]},"
     "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4},
};

START_TEST(test_st_read_foreign)
{
    ccr_ctx *ctx = ccr_test_ctx();
    const char *path = make_st(good_files[_i].hdr, good_files[_i].data_len, 0);
    ccr_safetensors *f = NULL;
    CCR_CK_OK(ctx, ccr_safetensors_read(ctx, path, &f));
    for (size_t i = 0; i < ccr_safetensors_count(f); i++)
        ck_assert_uint_eq((uintptr_t)ccr_safetensors_at(f, i)->data % 4, 0);
    if (_i == 2) {
        ck_assert_str_eq(ccr_safetensors_at(f, 0)->name, "b");
        ck_assert_uint_eq(ccr_safetensors_find(f, "a")->rank, 0);
    }
    ccr_safetensors_free(f);
    remove(path);
    ccr_ctx_free(ctx);
}
END_TEST

/* ---- safetensors: malformed files ---- */

#define E_(a) "\"" #a "\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}"
static const struct {
    const char *hdr;
    size_t data_len;
    const char *needle;
} bad_files[] = {
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}", 8, "beyond"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, "< begin"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, "shape needs"},
    {"{\"a\":{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[0,8]}}", 8, "'F16'"},
    {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,8]}}", 8, "F32 and I32"},
    {"{\"a\":{\"dtype\":32,\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "dtype"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, "shape[0]"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,8]}}", 8, "shape[0]"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2,NaN],\"data_offsets\":[0,8]}}", 8, "JSON"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1e400],\"data_offsets\":[0,8]}}", 8, "shape[0]"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}", 8, "shape[0]"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}", 8, "not an array"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
     "dimensions"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],"
     "\"data_offsets\":[0,8]}}", 8, "overflow"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", 8, "data_offsets"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8,8]}}", 8, "data_offsets"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[\"0\",8]}}", 8, "data_offsets"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0.5,8.5]}}", 8, "data_offsets"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,9007199254740994]}}", 8,
     "data_offsets"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":{\"b\":0}}}", 8, "data_offsets"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
     "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "overlap"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
     "\"b\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[8,12]}}", 12, "no tensor"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "no tensor"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8, "no tensor"},
    {"{}", 4, "no tensor"},
    {"{\"__metadata__\":{\"k\":1}," E_(a) "}", 8, "must be strings"},
    {"{\"__metadata__\":{\"k\":null}," E_(a) "}", 8, "must be strings"},
    {"{\"__metadata__\":\"x\"," E_(a) "}", 8, "not an object"},
    {"{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}," E_(a) "}", 8, "duplicate metadata"},
    {"{\"__metadata__\":{},\"__metadata__\":{}," E_(a) "}", 8, "twice"},
    {"{" E_(a) "," E_(a) "}", 8, "duplicate tensor"},
    {"{\"a\":5}", 0, "not an object"},
    {"{\"a\":[0,8]}", 8, "not an object"},
    {"[1,2]", 0, "start with"},
    {"[{" E_(a) "}]", 8, "start with"},
    {" {}", 0, "start with"},
    {"", 0, "start with"},
    {"{nope}", 0, "not valid JSON"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}", 8, "not valid JSON"},
    {"{} x", 0, "after the header"},
    {"{}{}", 0, "after the header"},
    {"{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "missing field 'dtype'"},
    {"{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8, "missing field 'shape'"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, "missing field 'data_offsets'"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":1}}", 8, "unknown"},
    {"{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
     "twice"},
    {"{\"\xff\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "UTF-8"},
    {"{\"\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "empty name"},
};

START_TEST(test_st_bad_header)
{
    const char *path = make_st(bad_files[_i].hdr, bad_files[_i].data_len, 0);
    char label[64];
    snprintf(label, sizeof label, "bad_files[%d]", _i);
    expect_read_fails(path, CCR_EFORMAT, bad_files[_i].needle, label);
    remove(path);
}
END_TEST

START_TEST(test_st_bad_length)
{
    const char *hdr = "{" E_(a) "}";
    uint64_t h = strlen(hdr);
    /* Header length beyond the limit, beyond the file, and absurd. */
    expect_read_fails(make_st(hdr, 8, (uint64_t)CCR_ST_MAX_HEADER + 1), CCR_EFORMAT, "limit",
                      "limit+1");
    expect_read_fails(make_st(hdr, 8, UINT64_MAX), CCR_EFORMAT, "limit", "2^64-1");
    expect_read_fails(make_st(hdr, 8, h + 9), CCR_EFORMAT, "follow", "past end");
    expect_read_fails(make_st(hdr, 8, h - 1), CCR_EFORMAT, "JSON", "one short");
    expect_read_fails(make_st(hdr, 8, h + 1), CCR_EFORMAT, "after the header", "one long");
    remove(ccr_test_path("bad.safetensors"));
    /* Files shorter than the length field. */
    const char *path = ccr_test_path("short.safetensors");
    for (size_t len = 0; len < 8; len++) {
        ck_assert_int_eq(ccr_test_write_file(path, "\x08\0\0\0\0\0\0\0", len), 0);
        expect_read_fails(path, CCR_EFORMAT, "8-byte", "short file");
    }
    remove(path);
}
END_TEST

/* Every strict prefix of a valid file, and the file plus one byte, are
 * rejected. */
START_TEST(test_st_truncated)
{
    ccr_ctx *ctx = ccr_test_ctx();
    float a[3] = {1, 2, 3};
    int32_t b[2] = {4, 5};
    ccr_st_tensor t[2] = {
        {.name = "a", .dtype = CCR_DTYPE_F32, .rank = 1, .shape = {3}, .data = a},
        {.name = "b", .dtype = CCR_DTYPE_I32, .rank = 1, .shape = {2}, .data = b},
    };
    const char *meta[] = {"k", "v"};
    const char *path = ccr_test_path("full.safetensors");
    const char *cut = ccr_test_path("cut.safetensors");
    CCR_CK_OK(ctx, ccr_safetensors_write(ctx, path, t, 2, meta, 1));
    size_t len;
    unsigned char *buf = ccr_test_read_file(path, &len);
    for (size_t n = 0; n < len; n++) {
        char label[64];
        snprintf(label, sizeof label, "cut at %zu of %zu", n, len);
        ck_assert_int_eq(ccr_test_write_file(cut, buf, n), 0);
        expect_read_fails(cut, CCR_EFORMAT, NULL, label);
    }
    unsigned char *longer = malloc(len + 4);
    ck_assert_ptr_nonnull(longer);
    memcpy(longer, buf, len);
    memset(longer + len, 0, 4);
    ck_assert_int_eq(ccr_test_write_file(cut, longer, len + 4), 0);
    expect_read_fails(cut, CCR_EFORMAT, "no tensor", "4 extra bytes");
    ck_assert_int_eq(ccr_test_write_file(cut, buf, len), 0);
    ccr_safetensors *f = NULL;
    CCR_CK_OK(ctx, ccr_safetensors_read(ctx, cut, &f));
    ccr_safetensors_free(f);
    free(longer);
    free(buf);
    remove(path);
    remove(cut);
    ccr_ctx_free(ctx);
}
END_TEST

START_TEST(test_st_read_io)
{
    expect_read_fails("/nonexistent-dir/x.safetensors", CCR_EIO, "cannot open", "missing");
    expect_read_fails(ccr_test_path("never-written.safetensors"), CCR_EIO, NULL, "missing");
    const char *dir = ccr_test_path("dir.safetensors");
    ck_assert_int_eq(mkdir(dir, 0700), 0);
    expect_read_fails(dir, CCR_EIO, NULL, "directory");
    rmdir(dir);
    ccr_ctx *ctx = ccr_test_ctx();
    ccr_safetensors *f = NULL;
    CCR_CK_STATUS(ctx, ccr_safetensors_read(ctx, NULL, &f), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_safetensors_read(ctx, "x", NULL), CCR_EINVAL);
    ck_assert_ptr_null(f);
    ccr_ctx_free(ctx);
}
END_TEST

/* ---- safetensors: writer errors ---- */

START_TEST(test_st_write_errors)
{
    ccr_ctx *ctx = ccr_test_ctx();
    float x[4] = {1, 2, 3, 4};
    const char *path = ccr_test_path("werr.safetensors");
    ccr_st_tensor good = {.name = "x", .dtype = CCR_DTYPE_F32, .rank = 1, .shape = {4},
                          .data = x};
    CCR_CK_OK(ctx, ccr_safetensors_write(ctx, path, &good, 1, NULL, 0));
    size_t len0;
    unsigned char *before = ccr_test_read_file(path, &len0);

    struct { ccr_st_tensor t[2]; size_t n; const char *needle; } bad[] = {
        {{{.name = NULL, .rank = 1, .shape = {4}, .data = x}}, 1, "NULL name"},
        {{{.name = "", .rank = 1, .shape = {4}, .data = x}}, 1, "empty name"},
        {{{.name = "__metadata__", .rank = 1, .shape = {4}, .data = x}}, 1, "reserved"},
        {{{.name = "\xc3(", .rank = 1, .shape = {4}, .data = x}}, 1, "UTF-8"},
        {{{.name = "y", .rank = 9, .shape = {4}, .data = x}}, 1, "rank"},
        {{{.name = "y", .dtype = (ccr_dtype)7, .rank = 1, .shape = {4}, .data = x}}, 1, "dtype"},
        {{{.name = "y", .rank = 1, .shape = {4}, .data = NULL}}, 1, "NULL"},
        {{{.name = "y", .rank = 1, .shape = {SIZE_MAX / 2}, .data = x}}, 1, "too large"},
        {{{.name = "y", .rank = 4, .shape = {1 << 20, 1 << 20, 1 << 20, 1 << 20}, .data = x}}, 1,
         "exceeds 2^53"},
        {{{.name = "y", .rank = 2, .shape = {1 << 26, 1 << 26}, .data = x}}, 1,
         "exceeds 2^53"},
        {{{.name = "y", .rank = 1, .shape = {4}, .data = x},
          {.name = "y", .rank = 1, .shape = {4}, .data = x}}, 2, "duplicate tensor name 'y'"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ccr_ctx_clear_error(ctx);
        CCR_CK_STATUS(ctx, ccr_safetensors_write(ctx, path, bad[i].t, bad[i].n, NULL, 0),
                      CCR_EINVAL);
        ck_assert_msg(strstr(ccr_ctx_errmsg(ctx), bad[i].needle) != NULL, "case %zu: '%s'",
                      i, ccr_ctx_errmsg(ctx));
    }
    const char *dup_meta[] = {"k", "1", "k", "2"};
    CCR_CK_STATUS(ctx, ccr_safetensors_write(ctx, path, &good, 1, dup_meta, 2), CCR_EINVAL);
    ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "duplicate metadata key 'k'"));
    const char *null_meta[] = {"k", NULL};
    CCR_CK_STATUS(ctx, ccr_safetensors_write(ctx, path, &good, 1, null_meta, 1), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_safetensors_write(ctx, path, &good, 1, NULL, 1), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_safetensors_write(ctx, path, NULL, 1, NULL, 0), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_safetensors_write(ctx, NULL, &good, 1, NULL, 0), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_safetensors_write(ctx, "", &good, 1, NULL, 0), CCR_EINVAL);

    /* The failed writes left the earlier file as it was, and no temporary. */
    size_t len1;
    unsigned char *after = ccr_test_read_file(path, &len1);
    ck_assert_uint_eq(len0, len1);
    ck_assert_int_eq(memcmp(before, after, len0), 0);
    ck_assert(!ccr_test_exists(tmp_name(path)));
    free(before);
    free(after);

    /* Unwritable places: CCR_EIO, nothing left behind. */
    const char *nodir = "/nonexistent-dir/x.safetensors";
    CCR_CK_STATUS(ctx, ccr_safetensors_write(ctx, nodir, &good, 1, NULL, 0), CCR_EIO);
    ck_assert(!ccr_test_exists(nodir));
    ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "cannot create"));
    /* The target is a directory: the temporary is written, the rename fails
     * and the temporary is removed. */
    const char *dir = ccr_test_path("wdir.safetensors");
    ck_assert_int_eq(mkdir(dir, 0700), 0);
    CCR_CK_STATUS(ctx, ccr_safetensors_write(ctx, dir, &good, 1, NULL, 0), CCR_EIO);
    ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "rename"));
    ck_assert(!ccr_test_exists(tmp_name(dir)));
    ck_assert_int_eq(rmdir(dir), 0);

    /* NULL data is fine when there are no elements; NULL ctx is tolerated. */
    ccr_st_tensor empty = {.name = "e", .rank = 2, .shape = {5, 0}, .data = NULL};
    CCR_CK_OK(ctx, ccr_safetensors_write(ctx, path, &empty, 1, NULL, 0));
    ck_assert_int_eq(ccr_safetensors_write(NULL, NULL, NULL, 0, NULL, 0), CCR_EINVAL);
    remove(path);
    ccr_ctx_free(ctx);
}
END_TEST

static Suite *io_suite(void)
{
    Suite *s = suite_create("io");
    TCase *st = tcase_create("safetensors");
    tcase_set_timeout(st, 30);
    tcase_add_test(st, test_st_roundtrip);
    tcase_add_test(st, test_st_layout);
    tcase_add_loop_test(st, test_st_read_foreign, 0,
                        (int)(sizeof good_files / sizeof good_files[0]));
    tcase_add_loop_test(st, test_st_bad_header, 0, (int)(sizeof bad_files / sizeof bad_files[0]));
    tcase_add_test(st, test_st_bad_length);
    tcase_add_test(st, test_st_truncated);
    tcase_add_test(st, test_st_read_io);
    tcase_add_test(st, test_st_write_errors);
    suite_add_tcase(s, st);
    return s;
}

int main(void)
{
    return ccr_test_run(io_suite());
}
