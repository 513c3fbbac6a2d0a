/*
 * test_data.c - tests of the data loaders: IDX files (plain and gzip, every
 * element type, malformed headers and payloads) and labelled data sets
 * (loading, allocation, seeded splits, gathering, permutations).  Text
 * corpora are tested in test_corpus.c.  Every file is written by the test
 * itself under ccr_test_path and removed afterwards; the real Fashion-MNIST
 * test set is checked only when CCR_FMNIST_DIR names a directory that holds
 * it.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ccr_test.h"

/* ---- helpers ---------------------------------------------------------------- */

/* Builds an IDX file image in buf (magic, big-endian dims, payload). */
static size_t idx_image(unsigned char *buf, unsigned type, unsigned ndim, const uint32_t *dims,
                        const void *payload, size_t payload_len)
{
    size_t k = 0;
    buf[k++] = 0;
    buf[k++] = 0;
    buf[k++] = (unsigned char)type;
    buf[k++] = (unsigned char)ndim;
    for (unsigned d = 0; d < ndim; d++) {
        buf[k++] = (unsigned char)(dims[d] >> 24);
        buf[k++] = (unsigned char)(dims[d] >> 16);
        buf[k++] = (unsigned char)(dims[d] >> 8);
        buf[k++] = (unsigned char)dims[d];
    }
    if (payload_len > 0)
        memcpy(buf + k, payload, payload_len);
    return k + payload_len;
}

static void put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* ---- IDX ---------------------------------------------------------------------- */

START_TEST(test_idx_u8_plain_and_gzip)
{
    ccr_ctx *ctx = ccr_test_ctx();
    uint32_t dims[3] = {2, 3, 4};
    unsigned char payload[24], buf[64];
    for (int i = 0; i < 24; i++)
        payload[i] = (unsigned char)(i * 11 % 256);
    payload[23] = 255;
    size_t len = idx_image(buf, CCR_IDX_U8, 3, dims, payload, 24);
    ccr_test_tpath plain = ccr_test_tmp_path("u8.idx"), gz = ccr_test_tmp_path("u8.idx.gz");
    ck_assert_int_eq(ccr_test_write_file(plain.s, buf, len), 0);
    ck_assert_int_eq(ccr_test_write_gz(gz.s, buf, len), 0);

    ccr_idx *a = NULL, *b = NULL;
    CCR_CK_OK(ctx, ccr_idx_load(ctx, plain.s, &a));
    CCR_CK_OK(ctx, ccr_idx_load(ctx, gz.s, &b));
    ck_assert_int_eq(a->type, CCR_IDX_U8);
    ck_assert_uint_eq(a->ndim, 3);
    ck_assert_uint_eq(a->dims[0], 2);
    ck_assert_uint_eq(a->dims[1], 3);
    ck_assert_uint_eq(a->dims[2], 4);
    ck_assert_uint_eq(a->numel, 24);
    for (int i = 0; i < 24; i++)
        ck_assert_float_eq(a->data[i], (float)payload[i]);
    ck_assert_float_eq(a->data[23], 255.0f);
    ck_assert_int_eq(b->type, a->type);
    ck_assert_uint_eq(b->ndim, a->ndim);
    ck_assert_mem_eq(b->dims, a->dims, sizeof a->dims[0] * 3);
    ck_assert_uint_eq(b->numel, a->numel);
    ck_assert_mem_eq(b->data, a->data, 24 * sizeof(float));
    ccr_idx_free(a);
    ccr_idx_free(b);
    ccr_idx_free(NULL);
    remove(plain.s);
    remove(gz.s);
    ccr_ctx_free(ctx);
}
END_TEST

/* Writes an IDX of n elements of the given type and loads it. */
static ccr_idx *load_typed(ccr_ctx *ctx, unsigned type, const unsigned char *payload,
                           size_t esize, uint32_t n)
{
    unsigned char buf[256];
    size_t len = idx_image(buf, type, 1, &n, payload, esize * n);
    ccr_test_tpath p = ccr_test_tmp_path("typed.idx");
    ck_assert_int_eq(ccr_test_write_file(p.s, buf, len), 0);
    ccr_idx *idx = NULL;
    CCR_CK_OK(ctx, ccr_idx_load(ctx, p.s, &idx));
    remove(p.s);
    ck_assert_int_eq(idx->type, (int)type);
    ck_assert_uint_eq(idx->ndim, 1);
    ck_assert_uint_eq(idx->numel, n);
    return idx;
}

START_TEST(test_idx_big_endian_types)
{
    ccr_ctx *ctx = ccr_test_ctx();
    unsigned char p[64];

    const int32_t i32[5] = {-1, 0, 123456, -16777216, INT32_MIN};
    for (int i = 0; i < 5; i++)
        put_be32(p + 4 * i, (uint32_t)i32[i]);
    ccr_idx *idx = load_typed(ctx, CCR_IDX_I32, p, 4, 5);
    for (int i = 0; i < 5; i++)
        ck_assert_float_eq(idx->data[i], (float)i32[i]);
    ccr_idx_free(idx);

    const float f32[5] = {1.5f, -0.0f, 3.14159274f, 1e-30f, -65504.25f};
    for (int i = 0; i < 5; i++) {
        uint32_t bits;
        memcpy(&bits, &f32[i], 4);
        put_be32(p + 4 * i, bits);
    }
    idx = load_typed(ctx, CCR_IDX_F32, p, 4, 5);
    ck_assert_mem_eq(idx->data, f32, sizeof f32);  /* bit-exact, sign of -0 included */
    ccr_idx_free(idx);

    const unsigned char i16[6] = {0x80, 0x00, 0x7F, 0xFF, 0xFF, 0xFE};  /* -32768 32767 -2 */
    idx = load_typed(ctx, CCR_IDX_I16, i16, 2, 3);
    ck_assert_float_eq(idx->data[0], -32768.0f);
    ck_assert_float_eq(idx->data[1], 32767.0f);
    ck_assert_float_eq(idx->data[2], -2.0f);
    ccr_idx_free(idx);

    const unsigned char i8[3] = {0x80, 0x7F, 0xFF};
    idx = load_typed(ctx, CCR_IDX_I8, i8, 1, 3);
    ck_assert_float_eq(idx->data[0], -128.0f);
    ck_assert_float_eq(idx->data[1], 127.0f);
    ck_assert_float_eq(idx->data[2], -1.0f);
    ccr_idx_free(idx);

    const double f64[2] = {0.1, -2.5e10};
    for (int i = 0; i < 2; i++) {
        uint64_t bits;
        memcpy(&bits, &f64[i], 8);
        put_be32(p + 8 * i, (uint32_t)(bits >> 32));
        put_be32(p + 8 * i + 4, (uint32_t)bits);
    }
    idx = load_typed(ctx, CCR_IDX_F64, p, 8, 2);
    ck_assert_float_eq(idx->data[0], (float)0.1);
    ck_assert_float_eq(idx->data[1], (float)-2.5e10);
    ccr_idx_free(idx);
    ccr_ctx_free(ctx);
}
END_TEST

/* Loads path expecting `want`; *out must stay untouched and a message set. */
static void expect_idx_fail(ccr_ctx *ctx, const char *path, ccr_status want, const char *what)
{
    ccr_idx *sentinel = (ccr_idx *)(uintptr_t)0x1234;
    ccr_idx *out = sentinel;
    ccr_ctx_clear_error(ctx);
    ccr_status s = ccr_idx_load(ctx, path, &out);
    ck_assert_msg(s == want, "%s: got %s (%s), want %s", what, ccr_strerror(s),
                  ccr_ctx_errmsg(ctx), ccr_strerror(want));
    ck_assert_msg(out == sentinel, "%s: *out changed on failure", what);
    ck_assert_msg(strlen(ccr_ctx_errmsg(ctx)) > 0, "%s: no message", what);
    ck_assert_int_eq(ccr_ctx_last_status(ctx), want);
}

static void expect_idx_bytes_fail(ccr_ctx *ctx, const unsigned char *buf, size_t len,
                                  const char *what)
{
    ccr_test_tpath p = ccr_test_tmp_path("bad.idx");
    ck_assert_int_eq(ccr_test_write_file(p.s, buf, len), 0);
    expect_idx_fail(ctx, p.s, CCR_EFORMAT, what);
    remove(p.s);
}

START_TEST(test_idx_malformed)
{
    ccr_ctx *ctx = ccr_test_ctx();
    unsigned char buf[128], payload[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    uint32_t dims[2] = {3, 4};
    size_t len = idx_image(buf, CCR_IDX_U8, 2, dims, payload, 12);

    /* The well-formed original loads: the failures below are due to the edits. */
    ccr_test_tpath good = ccr_test_tmp_path("good.idx");
    ck_assert_int_eq(ccr_test_write_file(good.s, buf, len), 0);
    ccr_idx *idx = NULL;
    CCR_CK_OK(ctx, ccr_idx_load(ctx, good.s, &idx));
    ccr_idx_free(idx);
    remove(good.s);

    unsigned char bad[128];
    memcpy(bad, buf, len);
    bad[0] = 1;
    expect_idx_bytes_fail(ctx, bad, len, "bad magic byte 0");
    memcpy(bad, buf, len);
    bad[1] = 8;
    expect_idx_bytes_fail(ctx, bad, len, "bad magic byte 1");
    memcpy(bad, buf, len);
    bad[2] = 0x0A;
    expect_idx_bytes_fail(ctx, bad, len, "unknown type 0x0A");
    memcpy(bad, buf, len);
    bad[2] = 0x07;
    expect_idx_bytes_fail(ctx, bad, len, "unknown type 0x07");
    memcpy(bad, buf, len);
    bad[3] = 0;
    expect_idx_bytes_fail(ctx, bad, len, "ndim 0");
    memcpy(bad, buf, len);
    bad[3] = CCR_IDX_MAX_DIMS + 1;
    expect_idx_bytes_fail(ctx, bad, len, "ndim too large");
    memcpy(bad, buf, len);
    put_be32(bad + 8, 0);
    expect_idx_bytes_fail(ctx, bad, len, "zero dimension");
    expect_idx_bytes_fail(ctx, buf, len - 1, "truncated data");
    expect_idx_bytes_fail(ctx, buf, 10, "truncated dims");
    expect_idx_bytes_fail(ctx, buf, 2, "truncated magic");
    expect_idx_bytes_fail(ctx, buf, 0, "empty file");
    memcpy(bad, buf, len);
    bad[len] = 0;
    expect_idx_bytes_fail(ctx, bad, len + 1, "one trailing byte");

    /* 65536 x 65536 x 2 bytes = 8 GiB: refused before any allocation. */
    uint32_t huge[3] = {65536, 65536, 2};
    size_t hl = idx_image(bad, CCR_IDX_U8, 3, huge, payload, 12);
    expect_idx_bytes_fail(ctx, bad, hl, "implausible size");
    /* Eight dimensions of 2^32-1 overflow 64 bits. */
    uint32_t over[8];
    for (int d = 0; d < 8; d++)
        over[d] = UINT32_MAX;
    hl = idx_image(bad, CCR_IDX_F64, 8, over, payload, 12);
    expect_idx_bytes_fail(ctx, bad, hl, "size overflow");

    /* A gzip stream cut short is a truncated file as well. */
    ccr_test_tpath gz = ccr_test_tmp_path("cut.idx.gz");
    unsigned char big[4 + 4 + 4000];
    unsigned char body[4000];
    for (int i = 0; i < 4000; i++)
        body[i] = (unsigned char)((i * 7919) >> 3);
    uint32_t n = 4000;
    size_t bl = idx_image(big, CCR_IDX_U8, 1, &n, body, 4000);
    ck_assert_int_eq(ccr_test_write_gz(gz.s, big, bl), 0);
    FILE *f = fopen(gz.s, "rb");
    ck_assert_ptr_nonnull(f);
    unsigned char comp[8192];
    size_t cl = fread(comp, 1, sizeof comp, f);
    fclose(f);
    ck_assert_uint_gt(cl, 100);
    ck_assert_int_eq(ccr_test_write_file(gz.s, comp, cl / 2), 0);
    expect_idx_fail(ctx, gz.s, CCR_EFORMAT, "truncated gzip");
    remove(gz.s);

    expect_idx_fail(ctx, ccr_test_tmp_path("does-not-exist.idx").s, CCR_EIO, "missing file");
    ccr_idx *out = NULL;
    CCR_CK_STATUS(ctx, ccr_idx_load(ctx, NULL, &out), CCR_EINVAL);
    ccr_ctx_free(ctx);
}
END_TEST

/* ---- data sets ------------------------------------------------------------------ */

/* Writes a gzip image file (n_img x 2 x 2 u8) and a plain u8 label file. */
static void write_pair(const char *img_path, const char *lab_path, unsigned n_img,
                       unsigned n_lab, const unsigned char *labels)
{
    unsigned char buf[256], px[64];
    uint32_t idims[3] = {n_img, 2, 2};
    for (unsigned i = 0; i < 4 * n_img; i++)
        px[i] = (unsigned char)(i * 17 % 256);
    px[0] = 255;
    size_t len = idx_image(buf, CCR_IDX_U8, 3, idims, px, 4 * n_img);
    ck_assert_int_eq(ccr_test_write_gz(img_path, buf, len), 0);
    uint32_t ldims[1] = {n_lab};
    len = idx_image(buf, CCR_IDX_U8, 1, ldims, labels, n_lab);
    ck_assert_int_eq(ccr_test_write_file(lab_path, buf, len), 0);
}

START_TEST(test_dataset_load)
{
    ccr_ctx *ctx = ccr_test_ctx();
    ccr_test_tpath img = ccr_test_tmp_path("img.idx.gz"), lab = ccr_test_tmp_path("lab.idx");
    const unsigned char labels[3] = {2, 0, 4};
    write_pair(img.s, lab.s, 3, 3, labels);
    ccr_dataset *ds = NULL;
    CCR_CK_OK(ctx, ccr_dataset_load_idx(ctx, img.s, lab.s, &ds));
    ck_assert_uint_eq(ds->n, 3);
    ck_assert_uint_eq(ds->dim, 4);
    ck_assert_uint_eq(ds->n_classes, 5);
    for (unsigned i = 0; i < 12; i++) {
        float want = (i == 0 ? 255.0f : (float)(i * 17 % 256)) / 255.0f;
        ck_assert_float_eq_tol(ds->x[i], want, 1e-7f);
        ck_assert(ds->x[i] >= 0.0f && ds->x[i] <= 1.0f);
    }
    ck_assert_float_eq(ds->x[0], 1.0f);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(ds->y[i], labels[i]);
    ccr_dataset_free(ds);

    /* Count mismatch, then an image file of rank 1 and an image as labels. */
    ccr_dataset *sentinel = (ccr_dataset *)(uintptr_t)0x99, *out = sentinel;
    write_pair(img.s, lab.s, 3, 2, labels);
    CCR_CK_STATUS(ctx, ccr_dataset_load_idx(ctx, img.s, lab.s, &out), CCR_EFORMAT);
    ck_assert_ptr_eq(out, sentinel);
    CCR_CK_STATUS(ctx, ccr_dataset_load_idx(ctx, lab.s, lab.s, &out), CCR_EFORMAT);
    CCR_CK_STATUS(ctx, ccr_dataset_load_idx(ctx, img.s, img.s, &out), CCR_EFORMAT);
    ck_assert_ptr_eq(out, sentinel);

    /* Labels must be non-negative integers. */
    unsigned char buf[64], p[12];
    uint32_t n3 = 3;
    write_pair(img.s, lab.s, 3, 3, labels);
    const unsigned char neg[3] = {1, 0xFF, 0};  /* i8: 1 -1 0 */
    size_t len = idx_image(buf, CCR_IDX_I8, 1, &n3, neg, 3);
    ck_assert_int_eq(ccr_test_write_file(lab.s, buf, len), 0);
    CCR_CK_STATUS(ctx, ccr_dataset_load_idx(ctx, img.s, lab.s, &out), CCR_EFORMAT);
    const float fl[3] = {1.0f, 1.5f, 0.0f};
    for (int i = 0; i < 3; i++) {
        uint32_t bits;
        memcpy(&bits, &fl[i], 4);
        put_be32(p + 4 * i, bits);
    }
    len = idx_image(buf, CCR_IDX_F32, 1, &n3, p, 12);
    ck_assert_int_eq(ccr_test_write_file(lab.s, buf, len), 0);
    CCR_CK_STATUS(ctx, ccr_dataset_load_idx(ctx, img.s, lab.s, &out), CCR_EFORMAT);
    ck_assert_ptr_eq(out, sentinel);
    /* i32 labels that are integers are accepted. */
    for (int i = 0; i < 3; i++)
        put_be32(p + 4 * i, (uint32_t)(7 - i));
    len = idx_image(buf, CCR_IDX_I32, 1, &n3, p, 12);
    ck_assert_int_eq(ccr_test_write_file(lab.s, buf, len), 0);
    CCR_CK_OK(ctx, ccr_dataset_load_idx(ctx, img.s, lab.s, &ds));
    ck_assert_uint_eq(ds->n_classes, 8);
    ck_assert_int_eq(ds->y[2], 5);
    ccr_dataset_free(ds);

    remove(lab.s);
    CCR_CK_STATUS(ctx, ccr_dataset_load_idx(ctx, img.s, lab.s, &out), CCR_EIO);
    ck_assert_ptr_eq(out, sentinel);
    remove(img.s);
    ccr_ctx_free(ctx);
}
END_TEST

/* Found by fuzz_idx: a NaN or Inf feature (F32), or an F64 value beyond float
 * range, is refused at load with CCR_EFORMAT naming the example. */
START_TEST(test_dataset_non_finite)
{
    ccr_ctx *ctx = ccr_test_ctx();
    ccr_test_tpath img = ccr_test_tmp_path("nf_img.idx"), lab = ccr_test_tmp_path("nf_lab.idx");
    unsigned char buf[64], labels[2] = {0, 1};
    uint32_t dims[2] = {2, 2}, ldims[1] = {2};
    ck_assert_int_eq(ccr_test_write_file(lab.s, buf, idx_image(buf, CCR_IDX_U8, 1, ldims,
                                                                 labels, 2)), 0);
    /* Big-endian F32 payloads: 1, 2, 3, then NaN, +Inf or -Inf; F64 1e300. */
    static const uint32_t bad_f32[] = {0x7FC00000u, 0x7F800000u, 0xFF800000u};
    for (int k = 0; k < 4; k++) {
        unsigned char payload[32];
        size_t plen;
        unsigned type;
        if (k < 3) {
            put_be32(payload, 0x3F800000u);
            put_be32(payload + 4, 0x40000000u);
            put_be32(payload + 8, 0x40400000u);
            put_be32(payload + 12, bad_f32[k]);
            plen = 16;
            type = CCR_IDX_F32;
        } else {
            memset(payload, 0, 32);
            put_be32(payload + 24, 0x7E37E43Cu);   /* 1e300 = 0x7E37E43C8800759C */
            put_be32(payload + 28, 0x8800759Cu);
            plen = 32;
            type = CCR_IDX_F64;
        }
        ck_assert_int_eq(ccr_test_write_file(img.s, buf, idx_image(buf, type, 2, dims, payload,
                                                                     plen)), 0);
        ccr_dataset *ds = NULL;
        CCR_CK_STATUS(ctx, ccr_dataset_load_idx(ctx, img.s, lab.s, &ds), CCR_EFORMAT);
        ck_assert_ptr_null(ds);
        ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "example 1, feature 1"));
    }
    remove(img.s);
    remove(lab.s);
    ccr_ctx_free(ctx);
}
END_TEST

START_TEST(test_dataset_alloc_gather)
{
    ccr_ctx *ctx = ccr_test_ctx();
    ccr_dataset *ds = NULL;
    CCR_CK_OK(ctx, ccr_dataset_alloc(ctx, 5, 3, 4, &ds));
    ck_assert_uint_eq(ds->n, 5);
    ck_assert_uint_eq(ds->dim, 3);
    ck_assert_uint_eq(ds->n_classes, 4);
    for (int i = 0; i < 15; i++)
        ck_assert_float_eq(ds->x[i], 0.0f);
    for (int i = 0; i < 5; i++) {
        ck_assert_int_eq(ds->y[i], 0);
        ds->y[i] = i % 4;
        for (int k = 0; k < 3; k++)
            ds->x[i * 3 + k] = (float)(10 * i + k);
    }
    size_t idx[3] = {4, 0, 4};
    float x[9];
    int32_t y[3];
    ccr_dataset_gather(ds, idx, 3, x, y);
    const float wx[9] = {40, 41, 42, 0, 1, 2, 40, 41, 42};
    ck_assert_mem_eq(x, wx, sizeof wx);
    ck_assert_int_eq(y[0], 0);
    ck_assert_int_eq(y[1], 0);
    ck_assert_int_eq(y[2], 0);
    ccr_dataset_free(ds);
    ccr_dataset_free(NULL);

    ccr_dataset *sentinel = (ccr_dataset *)(uintptr_t)0x77, *out = sentinel;
    CCR_CK_STATUS(ctx, ccr_dataset_alloc(ctx, 5, 0, 4, &out), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_dataset_alloc(ctx, 5, 3, 0, &out), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_dataset_alloc(ctx, SIZE_MAX / 2, 3, 2, &out), CCR_ENOMEM);  /* size overflows: refused as too large */
    ck_assert_ptr_eq(out, sentinel);
    ccr_ctx_free(ctx);
}
END_TEST

/* Which original example each row of a split came from (x row = id, y = id % 7). */
static void split_ids(const ccr_dataset *d, size_t *ids)
{
    for (size_t i = 0; i < d->n; i++) {
        float v = d->x[i * d->dim];
        ck_assert(v >= 0.0f && v < 100.0f && floorf(v) == v);
        ids[i] = (size_t)v;
        for (size_t k = 1; k < d->dim; k++)
            ck_assert_float_eq(d->x[i * d->dim + k], v);
        ck_assert_int_eq(d->y[i], (int32_t)(ids[i] % 7));
    }
}

START_TEST(test_dataset_split)
{
    ccr_ctx *ctx = ccr_test_ctx();
    ccr_dataset *ds = NULL;
    CCR_CK_OK(ctx, ccr_dataset_alloc(ctx, 100, 3, 7, &ds));
    for (int i = 0; i < 100; i++) {
        ds->y[i] = i % 7;
        for (int k = 0; k < 3; k++)
            ds->x[i * 3 + k] = (float)i;
    }
    float x_before[300];
    memcpy(x_before, ds->x, sizeof x_before);

    gsl_rng *rng = ccr_test_rng(1);
    ccr_dataset *a = NULL, *b = NULL;
    CCR_CK_OK(ctx, ccr_dataset_split(ctx, ds, rng, 30, &a, &b));
    ck_assert_uint_eq(a->n, 70);
    ck_assert_uint_eq(b->n, 30);
    ck_assert_uint_eq(a->dim, 3);
    ck_assert_uint_eq(b->n_classes, 7);
    ck_assert_mem_eq(ds->x, x_before, sizeof x_before);  /* ds unchanged */
    size_t ids[100];
    int seen[100] = {0};
    split_ids(b, ids);
    split_ids(a, ids + 30);
    for (int i = 0; i < 100; i++)
        seen[ids[i]]++;
    for (int i = 0; i < 100; i++)
        ck_assert_int_eq(seen[i], 1);  /* disjoint, union = everything */
    /* Follows the permutation: second = perm[0..30), first = perm[30..100). */
    size_t perm[100];
    gsl_rng_set(rng, 1);
    ccr_permutation(rng, perm, 100);
    ck_assert_mem_eq(ids, perm, sizeof perm);
    int in_order = 1;
    for (int i = 1; i < 100; i++)
        in_order &= ids[i] == (size_t)i;
    ck_assert(!in_order);

    /* Same seed -> same split; different seed -> a different one. */
    ccr_dataset *a2 = NULL, *b2 = NULL, *a3 = NULL, *b3 = NULL;
    gsl_rng_set(rng, 1);
    CCR_CK_OK(ctx, ccr_dataset_split(ctx, ds, rng, 30, &a2, &b2));
    ck_assert_mem_eq(a2->x, a->x, 70 * 3 * sizeof(float));
    ck_assert_mem_eq(b2->y, b->y, 30 * sizeof(int32_t));
    gsl_rng_set(rng, 2);
    CCR_CK_OK(ctx, ccr_dataset_split(ctx, ds, rng, 30, &a3, &b3));
    ck_assert(memcmp(b3->x, b->x, 30 * 3 * sizeof(float)) != 0);

    /* Edge sizes and errors. */
    ccr_dataset *e1 = NULL, *e2 = NULL;
    CCR_CK_OK(ctx, ccr_dataset_split(ctx, ds, rng, 100, &e1, &e2));
    ck_assert_uint_eq(e1->n, 0);
    ck_assert_uint_eq(e2->n, 100);
    ccr_dataset_free(e1);
    ccr_dataset_free(e2);
    ccr_dataset *sentinel = (ccr_dataset *)(uintptr_t)0x55, *f1 = sentinel, *f2 = sentinel;
    CCR_CK_STATUS(ctx, ccr_dataset_split(ctx, ds, rng, 101, &f1, &f2), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_dataset_split(ctx, ds, NULL, 10, &f1, &f2), CCR_EINVAL);
    ck_assert_ptr_eq(f1, sentinel);
    ck_assert_ptr_eq(f2, sentinel);

    ccr_dataset_free(a);
    ccr_dataset_free(b);
    ccr_dataset_free(a2);
    ccr_dataset_free(b2);
    ccr_dataset_free(a3);
    ccr_dataset_free(b3);
    ccr_dataset_free(ds);
    gsl_rng_free(rng);
    ccr_ctx_free(ctx);
}
END_TEST

START_TEST(test_permutation)
{
    enum { N = 1000 };
    static size_t p1[N], p2[N], p3[N];
    gsl_rng *rng = ccr_test_rng(7);
    ccr_permutation(rng, p1, N);
    int count[N] = {0};
    for (int i = 0; i < N; i++) {
        ck_assert_uint_lt(p1[i], N);
        count[p1[i]]++;
    }
    int fixed = 0;
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(count[i], 1);
        fixed += p1[i] == (size_t)i;
    }
    ck_assert_int_lt(fixed, 20);  /* expected 1 fixed point; identity would be 1000 */
    gsl_rng_set(rng, 7);
    ccr_permutation(rng, p2, N);
    ck_assert_mem_eq(p1, p2, sizeof p1);
    gsl_rng_set(rng, 8);
    ccr_permutation(rng, p3, N);
    ck_assert(memcmp(p1, p3, sizeof p1) != 0);

    size_t untouched = 42;
    ccr_permutation(rng, &untouched, 0);
    ck_assert_uint_eq(untouched, 42);
    size_t one = 9;
    ccr_permutation(rng, &one, 1);
    ck_assert_uint_eq(one, 0);
    gsl_rng_free(rng);
}
END_TEST

START_TEST(test_fashion_mnist)
{
    const char *dir = getenv("CCR_FMNIST_DIR");
    char img[1024], lab[1024];
    if (dir == NULL || dir[0] == '\0') {
        printf("test_fashion_mnist: CCR_FMNIST_DIR not set, skipped\n");
        return;
    }
    snprintf(img, sizeof img, "%s/t10k-images-idx3-ubyte.gz", dir);
    snprintf(lab, sizeof lab, "%s/t10k-labels-idx1-ubyte.gz", dir);
    FILE *fi = fopen(img, "rb"), *fl = fopen(lab, "rb");
    if (fi != NULL)
        fclose(fi);
    if (fl != NULL)
        fclose(fl);
    if (fi == NULL || fl == NULL) {
        printf("test_fashion_mnist: %s not found, skipped\n", dir);
        return;
    }
    ccr_ctx *ctx = ccr_test_ctx();
    ccr_dataset *ds = NULL;
    CCR_CK_OK(ctx, ccr_dataset_load_idx(ctx, img, lab, &ds));
    ck_assert_uint_eq(ds->n, 10000);
    ck_assert_uint_eq(ds->dim, 784);
    ck_assert_uint_eq(ds->n_classes, 10);
    float lo = 1.0f, hi = 0.0f;
    for (size_t i = 0; i < ds->n * ds->dim; i++) {
        lo = fminf(lo, ds->x[i]);
        hi = fmaxf(hi, ds->x[i]);
    }
    ck_assert_float_eq(lo, 0.0f);
    ck_assert_float_eq(hi, 1.0f);
    int count[10] = {0};
    for (size_t i = 0; i < ds->n; i++) {
        ck_assert(ds->y[i] >= 0 && ds->y[i] < 10);
        count[ds->y[i]]++;
    }
    for (int c = 0; c < 10; c++)
        ck_assert_int_eq(count[c], 1000);
    ccr_dataset_free(ds);
    ccr_ctx_free(ctx);
}
END_TEST

static Suite *data_suite(void)
{
    Suite *s = suite_create("data");
    TCase *tc = tcase_create("idx");
    tcase_add_test(tc, test_idx_u8_plain_and_gzip);
    tcase_add_test(tc, test_idx_big_endian_types);
    tcase_add_test(tc, test_idx_malformed);
    suite_add_tcase(s, tc);
    tc = tcase_create("dataset");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_dataset_load);
    tcase_add_test(tc, test_dataset_non_finite);
    tcase_add_test(tc, test_dataset_alloc_gather);
    tcase_add_test(tc, test_dataset_split);
    tcase_add_test(tc, test_permutation);
    tcase_add_test(tc, test_fashion_mnist);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return ccr_test_run(data_suite());
}
