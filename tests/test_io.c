/*
 * test_io.c - tests of the file formats: safetensors (round trips, the exact
 * byte layout, strict rejection of malformed files, writer argument checks
 * and failure cleanup) and the JSON Lines results writer (field order,
 * replacement, exact numbers, null for non-finite values, escaping, append).
 */
#define _POSIX_C_SOURCE 200809L

#include <float.h>
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

static ccr_ctx *new_ctx(void)
{
    ccr_ctx *ctx = NULL;
    ck_assert_int_eq(ccr_ctx_init(&ctx), CCR_OK);
    return ctx;
}

static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    size_t cap = 1 << 12, n = 0;
    unsigned char *buf = malloc(cap);
    ck_assert_ptr_nonnull(buf);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            ck_assert_ptr_nonnull(buf);
        }
    }
    fclose(f);
    *len = n;
    return buf;
}

static bool exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* The temporary name the writer uses first for path. */
static const char *tmp_name(const char *path)
{
    static char buf[600];
    snprintf(buf, sizeof buf, "%s.tmp.%ld.0", path, (long)getpid());
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
    ccr_ctx *ctx = new_ctx();
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
    ccr_ctx *ctx = new_ctx();
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
    ck_assert(!exists(tmp_name(path)));

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
    ccr_ctx *ctx = new_ctx();
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
    unsigned char *buf = slurp(path, &len);
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
    buf = slurp(path, &len);
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
    ccr_ctx *ctx = new_ctx();
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
    ccr_ctx *ctx = new_ctx();
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
    unsigned char *buf = slurp(path, &len);
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
    ccr_ctx *ctx = new_ctx();
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
    ccr_ctx *ctx = new_ctx();
    float x[4] = {1, 2, 3, 4};
    const char *path = ccr_test_path("werr.safetensors");
    ccr_st_tensor good = {.name = "x", .dtype = CCR_DTYPE_F32, .rank = 1, .shape = {4},
                          .data = x};
    CCR_CK_OK(ctx, ccr_safetensors_write(ctx, path, &good, 1, NULL, 0));
    size_t len0;
    unsigned char *before = slurp(path, &len0);

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
    unsigned char *after = slurp(path, &len1);
    ck_assert_uint_eq(len0, len1);
    ck_assert_int_eq(memcmp(before, after, len0), 0);
    ck_assert(!exists(tmp_name(path)));
    free(before);
    free(after);

    /* Unwritable places: CCR_EIO, nothing left behind. */
    const char *nodir = "/nonexistent-dir/x.safetensors";
    CCR_CK_STATUS(ctx, ccr_safetensors_write(ctx, nodir, &good, 1, NULL, 0), CCR_EIO);
    ck_assert(!exists(nodir));
    ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "cannot create"));
    /* The target is a directory: the temporary is written, the rename fails
     * and the temporary is removed. */
    const char *dir = ccr_test_path("wdir.safetensors");
    ck_assert_int_eq(mkdir(dir, 0700), 0);
    CCR_CK_STATUS(ctx, ccr_safetensors_write(ctx, dir, &good, 1, NULL, 0), CCR_EIO);
    ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "rename"));
    ck_assert(!exists(tmp_name(dir)));
    ck_assert_int_eq(rmdir(dir), 0);

    /* NULL data is fine when there are no elements; NULL ctx is tolerated. */
    ccr_st_tensor empty = {.name = "e", .rank = 2, .shape = {5, 0}, .data = NULL};
    CCR_CK_OK(ctx, ccr_safetensors_write(ctx, path, &empty, 1, NULL, 0));
    ck_assert_int_eq(ccr_safetensors_write(NULL, NULL, NULL, 0, NULL, 0), CCR_EINVAL);
    remove(path);
    ccr_ctx_free(ctx);
}
END_TEST

/* ---- JSONL ---- */

static char *to_string(ccr_ctx *ctx, const ccr_record *r)
{
    char *s = NULL;
    CCR_CK_OK(ctx, ccr_record_to_string(r, &s));
    ck_assert_ptr_nonnull(s);
    return s;
}

static void expect_record(ccr_ctx *ctx, const ccr_record *r, const char *want)
{
    char *s = to_string(ctx, r);
    ck_assert_str_eq(s, want);
    free(s);
}

START_TEST(test_record_fields)
{
    ccr_ctx *ctx = new_ctx();
    ccr_record *r = NULL;
    CCR_CK_OK(ctx, ccr_record_init(ctx, &r));
    expect_record(ctx, r, "{}");
    double v[4] = {1.0, NAN, 2.5, -INFINITY};
    CCR_CK_OK(ctx, ccr_record_add_str(r, "gate", "topk"));
    CCR_CK_OK(ctx, ccr_record_add_int(r, "epoch", 3));
    CCR_CK_OK(ctx, ccr_record_add_double(r, "loss", 0.4321));
    CCR_CK_OK(ctx, ccr_record_add_bool(r, "ok", true));
    CCR_CK_OK(ctx, ccr_record_add_doubles(r, "v", v, 4));
    CCR_CK_OK(ctx, ccr_record_add_doubles(r, "none", NULL, 0));
    CCR_CK_OK(ctx, ccr_record_add_double(r, "nan", NAN));
    CCR_CK_OK(ctx, ccr_record_add_double(r, "inf", INFINITY));
    CCR_CK_OK(ctx, ccr_record_add_bool(r, "no", false));
    expect_record(ctx, r,
                  "{\"gate\":\"topk\",\"epoch\":3,\"loss\":0.4321,\"ok\":true,"
                  "\"v\":[1,null,2.5,null],\"none\":[],\"nan\":null,\"inf\":null,\"no\":false}");

    /* Replacing keeps the position, whatever the new type. */
    CCR_CK_OK(ctx, ccr_record_add_str(r, "epoch", "x"));
    CCR_CK_OK(ctx, ccr_record_add_int(r, "gate", -7));
    CCR_CK_OK(ctx, ccr_record_add_doubles(r, "no", v, 1));
    CCR_CK_OK(ctx, ccr_record_add_bool(r, "v", false));
    expect_record(ctx, r,
                  "{\"gate\":-7,\"epoch\":\"x\",\"loss\":0.4321,\"ok\":true,"
                  "\"v\":false,\"none\":[],\"nan\":null,\"inf\":null,\"no\":[1]}");
    /* Keys are case-sensitive. */
    CCR_CK_OK(ctx, ccr_record_add_int(r, "Gate", 1));

    /* Errors leave the record as it was. */
    char *before = to_string(ctx, r);
    CCR_CK_STATUS(ctx, ccr_record_add_int(r, NULL, 1), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_record_add_int(r, "", 1), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_record_add_str(r, "gate", NULL), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_record_add_str(r, "gate", "bad \xff utf8"), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_record_add_str(r, "gate", "cut \xe6\xbc"), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_record_add_str(r, "gate", "overlong \xc0\xaf"), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_record_add_str(r, "surrogate \xed\xa0\x80", "x"), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_record_add_doubles(r, "gate", NULL, 2), CCR_EINVAL);
    ck_assert(ccr_ctx_errmsg(ctx)[0] != '\0');
    char *after = to_string(ctx, r);
    ck_assert_str_eq(before, after);
    free(before);
    free(after);
    ck_assert_int_eq(ccr_record_add_int(NULL, "k", 1), CCR_EINVAL);
    ck_assert_int_eq(ccr_record_to_string(NULL, &before), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_record_to_string(r, NULL), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_record_init(ctx, NULL), CCR_EINVAL);

    ccr_record_clear(r);
    expect_record(ctx, r, "{}");
    CCR_CK_OK(ctx, ccr_record_add_int(r, "gate", 1));
    expect_record(ctx, r, "{\"gate\":1}");
    ccr_record_free(r);
    ccr_record_free(NULL);
    ccr_record_clear(NULL);
    ccr_ctx_free(ctx);
}
END_TEST

START_TEST(test_record_numbers)
{
    ccr_ctx *ctx = new_ctx();
    ccr_record *r = NULL;
    CCR_CK_OK(ctx, ccr_record_init(ctx, &r));
    CCR_CK_OK(ctx, ccr_record_add_int(r, "a", INT64_C(9007199254740993)));
    CCR_CK_OK(ctx, ccr_record_add_int(r, "b", INT64_MAX));
    CCR_CK_OK(ctx, ccr_record_add_int(r, "c", INT64_MIN));
    CCR_CK_OK(ctx, ccr_record_add_int(r, "d", 0));
    expect_record(ctx, r, "{\"a\":9007199254740993,\"b\":9223372036854775807,"
                          "\"c\":-9223372036854775808,\"d\":0}");
    ccr_record_clear(r);

    /* Doubles read back exactly, including ones %.15g would round. */
    double fixed[] = {0.1 + 0.2, 1.0 / 3.0, 1e-300, DBL_MAX, DBL_MIN, 5e-324, -0.0,
                      123456789012345678.0, 1e15, 2.5e-7, -1.0};
    size_t nf = sizeof fixed / sizeof fixed[0];
    enum { NRAND = 2000 };
    double *all = malloc((nf + NRAND) * sizeof *all);
    ck_assert_ptr_nonnull(all);
    memcpy(all, fixed, sizeof fixed);
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, 12345);
    for (size_t i = nf; i < nf + NRAND; i++) {
        uint64_t bits;
        do {
            bits = ((uint64_t)gsl_rng_get(rng) << 32) ^ (uint64_t)gsl_rng_get(rng);
            memcpy(&all[i], &bits, sizeof bits);
        } while (!isfinite(all[i]));
    }
    gsl_rng_free(rng);
    CCR_CK_OK(ctx, ccr_record_add_doubles(r, "v", all, nf + NRAND));
    CCR_CK_OK(ctx, ccr_record_add_double(r, "x", 0.1 + 0.2));
    char *s = to_string(ctx, r);
    cJSON *j = cJSON_Parse(s);
    ck_assert_ptr_nonnull(j);
    cJSON *arr = cJSON_GetObjectItemCaseSensitive(j, "v");
    ck_assert_int_eq(cJSON_GetArraySize(arr), (int)(nf + NRAND));
    size_t i = 0;
    cJSON *c;
    cJSON_ArrayForEach(c, arr) {
        ck_assert(cJSON_IsNumber(c));
        ck_assert_msg(c->valuedouble == all[i], "entry %zu: %.17g != %.17g", i,
                      c->valuedouble, all[i]);
        i++;
    }
    ck_assert(cJSON_GetObjectItemCaseSensitive(j, "x")->valuedouble == 0.1 + 0.2);
    ck_assert_ptr_nonnull(strstr(s, "\"x\":0.30000000000000004"));
    cJSON_Delete(j);
    free(s);
    free(all);
    ccr_record_free(r);
    ccr_ctx_free(ctx);
}
END_TEST

static const char *tricky = "say \"hi\"\\ \n\ttab \x01 \x7f caf\xc3\xa9 \xe6\xbc\xa2\xe5\xad\x97 "
                            "\xf0\x9f\x98\x80 </script>";

START_TEST(test_jsonl_file)
{
    ccr_ctx *ctx = new_ctx();
    const char *path = ccr_test_path("out.jsonl");
    ccr_jsonl *w = NULL;
    ccr_record *r = NULL;
    CCR_CK_OK(ctx, ccr_jsonl_open(ctx, path, false, &w));
    CCR_CK_OK(ctx, ccr_record_init(ctx, &r));
    for (int i = 0; i < 3; i++) {
        double v[2] = {i * 0.5, i == 1 ? NAN : -1.0};
        ccr_record_clear(r);
        CCR_CK_OK(ctx, ccr_record_add_int(r, "i", i));
        CCR_CK_OK(ctx, ccr_record_add_str(r, "s", tricky));
        CCR_CK_OK(ctx, ccr_record_add_double(r, "d", i == 2 ? NAN : 1.0 / (i + 1)));
        CCR_CK_OK(ctx, ccr_record_add_bool(r, "b", i % 2 == 0));
        CCR_CK_OK(ctx, ccr_record_add_doubles(r, "v", v, 2));
        CCR_CK_OK(ctx, ccr_jsonl_write(w, r));
        /* Flushed: the line is in the file before close. */
        size_t len;
        unsigned char *buf = slurp(path, &len);
        size_t lines = 0;
        for (size_t k = 0; k < len; k++)
            lines += buf[k] == '\n';
        ck_assert_uint_eq(lines, (size_t)i + 1);
        ck_assert_int_eq(buf[len - 1], '\n');
        free(buf);
    }
    CCR_CK_OK(ctx, ccr_jsonl_close(w));

    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    char line[4096];
    int n = 0;
    while (fgets(line, sizeof line, f) != NULL) {
        size_t len = strlen(line);
        ck_assert_int_eq(line[len - 1], '\n');
        line[len - 1] = '\0';
        ck_assert_ptr_null(strchr(line, '\n'));
        cJSON *j = cJSON_Parse(line);
        ck_assert_msg(j != NULL, "line %d does not parse: %s", n, line);
        ck_assert_int_eq(cJSON_GetObjectItemCaseSensitive(j, "i")->valueint, n);
        ck_assert_str_eq(cJSON_GetObjectItemCaseSensitive(j, "s")->valuestring, tricky);
        cJSON *d = cJSON_GetObjectItemCaseSensitive(j, "d");
        if (n == 2)
            ck_assert(cJSON_IsNull(d));
        else
            ck_assert(d->valuedouble == 1.0 / (n + 1));
        ck_assert(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "b")) == (n % 2 == 0));
        cJSON *v = cJSON_GetObjectItemCaseSensitive(j, "v");
        ck_assert(cJSON_GetArrayItem(v, 0)->valuedouble == n * 0.5);
        ck_assert(n == 1 ? cJSON_IsNull(cJSON_GetArrayItem(v, 1))
                         : cJSON_GetArrayItem(v, 1)->valuedouble == -1.0);
        cJSON_Delete(j);
        n++;
    }
    fclose(f);
    ck_assert_int_eq(n, 3);

    /* Append adds a line; truncating mode starts over. */
    CCR_CK_OK(ctx, ccr_jsonl_open(ctx, path, true, &w));
    ccr_record_clear(r);
    CCR_CK_OK(ctx, ccr_record_add_str(r, "tail", "yes"));
    CCR_CK_OK(ctx, ccr_jsonl_write(w, r));
    CCR_CK_OK(ctx, ccr_jsonl_close(w));
    size_t len;
    unsigned char *buf = slurp(path, &len);
    const char *last = "{\"tail\":\"yes\"}\n";
    ck_assert_uint_gt(len, strlen(last));
    ck_assert_int_eq(memcmp(buf + len - strlen(last), last, strlen(last)), 0);
    ck_assert_int_eq(memcmp(buf, "{\"i\":0,", 7), 0);
    free(buf);
    CCR_CK_OK(ctx, ccr_jsonl_open(ctx, path, false, &w));
    CCR_CK_OK(ctx, ccr_jsonl_write(w, r));
    CCR_CK_STATUS(ctx, ccr_jsonl_write(w, NULL), CCR_EINVAL);
    CCR_CK_OK(ctx, ccr_jsonl_close(w));
    buf = slurp(path, &len);
    ck_assert_uint_eq(len, strlen(last));
    ck_assert_int_eq(memcmp(buf, last, len), 0);
    free(buf);

    /* Unopenable paths. */
    ccr_jsonl *sentinel = (ccr_jsonl *)&ctx, *out = sentinel;
    CCR_CK_STATUS(ctx, ccr_jsonl_open(ctx, "/nonexistent-dir/x.jsonl", false, &out), CCR_EIO);
    ck_assert_ptr_eq(out, sentinel);
    ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "nonexistent-dir"));
    CCR_CK_STATUS(ctx, ccr_jsonl_open(ctx, "/nonexistent-dir/x.jsonl", true, &out), CCR_EIO);
    CCR_CK_STATUS(ctx, ccr_jsonl_open(ctx, NULL, true, &out), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_jsonl_open(ctx, path, true, NULL), CCR_EINVAL);
    ck_assert_ptr_eq(out, sentinel);
    ck_assert_int_eq(ccr_jsonl_close(NULL), CCR_OK);
    ck_assert_int_eq(ccr_jsonl_write(NULL, r), CCR_EINVAL);

    /* A write error (a full device) is reported. */
    if (exists("/dev/full")) {
        CCR_CK_OK(ctx, ccr_jsonl_open(ctx, "/dev/full", false, &w));
        ccr_status s = ccr_jsonl_write(w, r);
        ccr_jsonl_close(w);   /* may fail too: the data never left the buffer */
        ck_assert_int_eq(s, CCR_EIO);
    }
    ccr_record_free(r);
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
    TCase *jl = tcase_create("jsonl");
    tcase_set_timeout(jl, 30);
    tcase_add_test(jl, test_record_fields);
    tcase_add_test(jl, test_record_numbers);
    tcase_add_test(jl, test_jsonl_file);
    suite_add_tcase(s, jl);
    return s;
}

int main(void)
{
    return ccr_test_run(io_suite());
}
