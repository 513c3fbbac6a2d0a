/*
 * test_jsonl.c - tests of the JSON Lines results writer: field order,
 * replacement in place, exact numbers, null for non-finite values, UTF-8
 * checks, escaping, flushing, append and truncate modes, and I/O errors.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cJSON.h>

#include "ccr_test.h"

/* ---- helpers ---- */

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
    ccr_ctx *ctx = ccr_test_ctx();
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
    ccr_ctx *ctx = ccr_test_ctx();
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
    ccr_ctx *ctx = ccr_test_ctx();
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
        /* Written at once to the temporary; the file itself appears at close. */
        ck_assert(!ccr_test_exists(path));
        size_t len;
        unsigned char *buf = ccr_test_read_file(ccr_jsonl_temp_path(w), &len);
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
    unsigned char *buf = ccr_test_read_file(path, &len);
    const char *last = "{\"tail\":\"yes\"}\n";
    ck_assert_uint_gt(len, strlen(last));
    ck_assert_int_eq(memcmp(buf + len - strlen(last), last, strlen(last)), 0);
    ck_assert_int_eq(memcmp(buf, "{\"i\":0,", 7), 0);
    free(buf);
    CCR_CK_OK(ctx, ccr_jsonl_open(ctx, path, false, &w));
    CCR_CK_OK(ctx, ccr_jsonl_write(w, r));
    CCR_CK_STATUS(ctx, ccr_jsonl_write(w, NULL), CCR_EINVAL);
    CCR_CK_OK(ctx, ccr_jsonl_close(w));
    buf = ccr_test_read_file(path, &len);
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
    if (ccr_test_exists("/dev/full")) {
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

static Suite *jsonl_suite(void)
{
    Suite *s = suite_create("jsonl");
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
    return ccr_test_run(jsonl_suite());
}
