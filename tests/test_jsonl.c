/*
 * test_jsonl.c - tests of the JSON Lines results writer: field order,
 * replacement in place, exact numbers, null for non-finite values, UTF-8
 * checks, escaping, flushing, append and truncate modes, and I/O errors;
 * the file-safety rules (tmpfile.h): the previous file stays until close, a
 * failed run's lines go to "<path>.partial", a full disk never leaves a half
 * line, and stale temporaries of dead processes are swept.
 */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <signal.h>
#include <unistd.h>

#include <cJSON.h>

#include "ccr_test.h"
#include "tmpfile.h"

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

/* ---- file safety ---- */

/* A fresh empty directory; path in a held buffer. */
static ccr_test_tpath fresh_dir(const char *name)
{
    ccr_test_tpath d = ccr_test_tmp_path(name);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", d.s);
    ck_assert_int_eq(system(cmd), 0);
    ck_assert_int_eq(mkdir(d.s, 0700), 0);
    return d;
}

static void rm_dir(const ccr_test_tpath *d)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", d->s);
    ck_assert_int_eq(system(cmd), 0);
}

/* How many entries of dir contain CCR_TMP_INFIX. */
static size_t count_temps(const char *dir)
{
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        n += strstr(e->d_name, CCR_TMP_INFIX) != NULL;
    closedir(d);
    return n;
}

static void expect_file(const char *path, const char *want)
{
    size_t len;
    unsigned char *buf = ccr_test_read_file(path, &len);
    ck_assert_msg(len == strlen(want) && memcmp(buf, want, len) == 0,
                  "%s holds '%.*s', want '%s'", path, (int)len, (const char *)buf, want);
    free(buf);
}

static void write_line(ccr_ctx *ctx, ccr_jsonl *w, ccr_record *r, int i)
{
    ccr_record_clear(r);
    CCR_CK_OK(ctx, ccr_record_add_int(r, "i", i));
    CCR_CK_OK(ctx, ccr_jsonl_write(w, r));
}

START_TEST(test_jsonl_keeps_previous)
{
    ccr_ctx *ctx = ccr_test_ctx();
    ccr_test_tpath dir = fresh_dir("keep");
    char path[600], partial[620];
    snprintf(path, sizeof path, "%s/r.jsonl", dir.s);
    snprintf(partial, sizeof partial, "%s.partial", path);
    const char *old = "{\"old\":1}\n";
    ck_assert_int_eq(ccr_test_write_file(path, old, strlen(old)), 0);
    ccr_record *r = NULL;
    CCR_CK_OK(ctx, ccr_record_init(ctx, &r));

    /* While the run writes, the previous file is untouched; an aborted run
     * leaves its lines under <path>.partial and no temporary. */
    ccr_jsonl *w = NULL;
    CCR_CK_OK(ctx, ccr_jsonl_open(ctx, path, false, &w));
    ck_assert_ptr_nonnull(strstr(ccr_jsonl_temp_path(w), "/r.jsonl" CCR_TMP_INFIX));
    ck_assert_str_eq(ccr_jsonl_partial_path(w), partial);
    write_line(ctx, w, r, 0);
    write_line(ctx, w, r, 1);
    expect_file(path, old);
    expect_file(ccr_jsonl_temp_path(w), "{\"i\":0}\n{\"i\":1}\n");
    CCR_CK_OK(ctx, ccr_jsonl_abort(w));
    expect_file(path, old);
    expect_file(partial, "{\"i\":0}\n{\"i\":1}\n");
    ck_assert_uint_eq(count_temps(dir.s), 0);

    /* A run that fails before its first line keeps nothing: no .partial
     * (the older one stays as it was), no temporary. */
    CCR_CK_OK(ctx, ccr_jsonl_open(ctx, path, false, &w));
    ck_assert_uint_eq(ccr_jsonl_lines(w), 0);
    CCR_CK_OK(ctx, ccr_jsonl_abort(w));
    expect_file(path, old);
    expect_file(partial, "{\"i\":0}\n{\"i\":1}\n");
    ck_assert_uint_eq(count_temps(dir.s), 0);

    /* Append mode also works on a copy: abort keeps the file as it was. */
    CCR_CK_OK(ctx, ccr_jsonl_open(ctx, path, true, &w));
    write_line(ctx, w, r, 2);
    ck_assert_uint_eq(ccr_jsonl_lines(w), 1);   /* the copied line is not this run's */
    expect_file(path, old);
    CCR_CK_OK(ctx, ccr_jsonl_abort(w));
    expect_file(path, old);
    expect_file(partial, "{\"old\":1}\n{\"i\":2}\n");

    /* Close commits all at once; the file keeps its permission bits. */
    ck_assert_int_eq(chmod(path, 0640), 0);
    CCR_CK_OK(ctx, ccr_jsonl_open(ctx, path, true, &w));
    write_line(ctx, w, r, 3);
    CCR_CK_OK(ctx, ccr_jsonl_close(w));
    expect_file(path, "{\"old\":1}\n{\"i\":3}\n");
    struct stat st;
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert_int_eq(st.st_mode & 0777, 0640);
    ck_assert_uint_eq(count_temps(dir.s), 0);

    /* A close that cannot rename (the target became a directory) keeps
     * the lines in .partial and says so. */
    char sub[640];
    snprintf(sub, sizeof sub, "%s/d.jsonl", dir.s);
    CCR_CK_OK(ctx, ccr_jsonl_open(ctx, sub, false, &w));
    write_line(ctx, w, r, 4);
    ck_assert_int_eq(mkdir(sub, 0700), 0);
    CCR_CK_STATUS(ctx, ccr_jsonl_close(w), CCR_EIO);
    ck_assert_ptr_nonnull(strstr(ccr_ctx_errmsg(ctx), "d.jsonl.partial"));
    snprintf(sub, sizeof sub, "%s/d.jsonl.partial", dir.s);
    expect_file(sub, "{\"i\":4}\n");
    ck_assert_uint_eq(count_temps(dir.s), 0);
    ck_assert_int_eq(ccr_jsonl_abort(NULL), CCR_OK);
    ck_assert_ptr_null(ccr_jsonl_temp_path(NULL));
    ck_assert_ptr_null(ccr_jsonl_partial_path(NULL));

    ccr_record_free(r);
    rm_dir(&dir);
    ccr_ctx_free(ctx);
}
END_TEST

/* Child of test_jsonl_full_disk: with files limited to `limit` bytes,
 * writes lines until one fails, writes once more (still failing), then
 * closes.  Exit status: 0 ok, else the step that went wrong. */
static int full_disk_child(const char *path, rlim_t limit)
{
    signal(SIGXFSZ, SIG_IGN);   /* EFBIG instead of the signal */
    struct rlimit rl = {limit, limit};
    if (setrlimit(RLIMIT_FSIZE, &rl) != 0)
        return 10;
    ccr_ctx *ctx = NULL;
    ccr_record *r = NULL;
    ccr_jsonl *w = NULL;
    if (ccr_ctx_init(&ctx) != CCR_OK || ccr_record_init(ctx, &r) != CCR_OK ||
        ccr_jsonl_open(ctx, path, false, &w) != CCR_OK)
        return 11;
    int ok_lines = 0;
    ccr_status s = CCR_OK;
    for (; ok_lines < 1000; ok_lines++) {
        ccr_record_clear(r);
        ccr_record_add_int(r, "i", ok_lines);
        ccr_record_add_str(r, "pad", "0123456789012345678901234567890123456789");
        if ((s = ccr_jsonl_write(w, r)) != CCR_OK)
            break;
    }
    if (s != CCR_EIO || ok_lines == 0 || ok_lines == 1000)
        return 12;
    if (strstr(ccr_ctx_errmsg(ctx), "large") == NULL)   /* "File too large" */
        return 13;
    if (ccr_jsonl_write(w, r) != CCR_EIO)
        return 14;
    if (ccr_jsonl_close(w) != CCR_OK)
        return 15;
    ccr_record_free(r);
    ccr_ctx_free(ctx);
    return 0;
}

START_TEST(test_jsonl_full_disk)
{
    /* A write that runs out of room is cut back to the last full line, so
     * the file a user keeps never ends in half a line. */
    ccr_test_tpath dir = fresh_dir("full");
    char path[600];
    snprintf(path, sizeof path, "%s/r.jsonl", dir.s);
    const rlim_t limit = 300;
    fflush(NULL);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0)
        _exit(full_disk_child(path, limit));
    int st = 0;
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child failed at step %d",
                  WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    size_t len;
    unsigned char *buf = ccr_test_read_file(path, &len);
    ck_assert_uint_gt(len, 0);
    ck_assert_uint_le(len, (size_t)limit);
    ck_assert_int_eq(buf[len - 1], '\n');
    /* Every line parses and they count up from 0. */
    size_t start = 0;
    int n = 0;
    for (size_t k = 0; k < len; k++) {
        if (buf[k] != '\n')
            continue;
        buf[k] = '\0';
        cJSON *j = cJSON_Parse((const char *)buf + start);
        ck_assert_msg(j != NULL, "line %d does not parse", n);
        ck_assert_int_eq(cJSON_GetObjectItemCaseSensitive(j, "i")->valueint, n);
        cJSON_Delete(j);
        n++;
        start = k + 1;
    }
    ck_assert_int_gt(n, 0);
    free(buf);
    ck_assert_uint_eq(count_temps(dir.s), 0);
    rm_dir(&dir);
}
END_TEST

/* A process id that no longer exists (a child that has been reaped). */
static pid_t dead_pid(void)
{
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0)
        _exit(0);
    ck_assert_int_eq(waitpid(pid, NULL, 0), pid);
    return pid;
}

static void count_kept(void *arg, const char *dir, const char *tmp, const char *partial)
{
    (void)dir;
    (void)tmp;
    (void)partial;
    (*(size_t *)arg)++;
}

/* Sets path's modification time to `ago` seconds before now. */
static void age(const char *path, long ago)
{
    struct timespec ts[2];
    ck_assert_int_eq(clock_gettime(CLOCK_REALTIME, &ts[0]), 0);
    ts[0].tv_sec -= ago;
    ts[1] = ts[0];
    ck_assert_int_eq(utimensat(AT_FDCWD, path, ts, 0), 0);
}

/* A killed run's results temporary is kept: cut back to its last full line
 * and moved to <out>.partial (or <out>.partial.<pid> beside a newer
 * .partial); a checkpoint's or a lineless temporary is removed. */
START_TEST(test_tmp_sweep_keeps_results)
{
    ccr_ctx *ctx = ccr_test_ctx();
    ccr_test_tpath dir = fresh_dir("sweep_keep");
    long pid = (long)dead_pid();
    char target[620], res[700], res_part[700], ck[700], half[700], newer[700], newer_part[700],
        newer_pid[720], older[700], older_part[700];
    snprintf(target, sizeof target, "%s/x", dir.s);
    snprintf(res, sizeof res, "%s/r.jsonl" CCR_TMP_INFIX "%ld.0", dir.s, pid);
    snprintf(res_part, sizeof res_part, "%s/r.jsonl.partial", dir.s);
    snprintf(ck, sizeof ck, "%s/m.safetensors" CCR_TMP_INFIX "%ld.1", dir.s, pid);
    snprintf(half, sizeof half, "%s/h.jsonl" CCR_TMP_INFIX "%ld.2", dir.s, pid);
    snprintf(newer, sizeof newer, "%s/n.jsonl" CCR_TMP_INFIX "%ld.3", dir.s, pid);
    snprintf(newer_part, sizeof newer_part, "%s/n.jsonl.partial", dir.s);
    snprintf(newer_pid, sizeof newer_pid, "%s/n.jsonl.partial.%ld", dir.s, pid);
    snprintf(older, sizeof older, "%s/o.jsonl" CCR_TMP_INFIX "%ld.4", dir.s, pid);
    snprintf(older_part, sizeof older_part, "%s/o.jsonl.partial", dir.s);
    const char *lines = "{\"a\":1}\n{\"b\":2}\n";
    ck_assert_int_eq(ccr_test_write_file(res, "{\"a\":1}\n{\"b\":2}\n{\"c\":", 21), 0);
    /* A safetensors file: 8-byte header length, then '{'. */
    ck_assert_int_eq(ccr_test_write_file(ck, "\x7b\0\0\0\0\0\0\0{\"__metadata__\"", 24), 0);
    ck_assert_int_eq(ccr_test_write_file(half, "{\"a\":", 5), 0);
    ck_assert_int_eq(ccr_test_write_file(newer, lines, strlen(lines)), 0);
    ck_assert_int_eq(ccr_test_write_file(newer_part, "{\"new\":1}\n", 10), 0);
    age(newer, 60);
    ck_assert_int_eq(ccr_test_write_file(older, lines, strlen(lines)), 0);
    ck_assert_int_eq(ccr_test_write_file(older_part, "{\"old\":1}\n", 10), 0);
    age(older_part, 60);
    size_t removed = 99, kept = 0;
    CCR_CK_OK(ctx, ccr_tmp_sweep(ctx, target, &removed, count_kept, &kept));
    ck_assert_uint_eq(kept, 3);
    ck_assert_uint_eq(removed, 2);
    ck_assert(!ccr_test_exists(res) && !ccr_test_exists(ck) && !ccr_test_exists(half));
    expect_file(res_part, lines);                  /* cut back to the last full line */
    expect_file(newer_part, "{\"new\":1}\n");      /* a newer .partial stays */
    expect_file(newer_pid, lines);
    expect_file(older_part, lines);                /* an older one is replaced */
    ck_assert_uint_eq(count_temps(dir.s), 0);
    rm_dir(&dir);
    ccr_ctx_free(ctx);
}
END_TEST

START_TEST(test_tmp_sweep)
{
    ccr_ctx *ctx = ccr_test_ctx();
    long pid = 0;
    ck_assert(ccr_tmp_parse_name("a.jsonl.ccr-tmp.123.0", &pid));
    ck_assert_int_eq(pid, 123);
    ck_assert(ccr_tmp_parse_name("x.ccr-tmp.ccr-tmp.7.12", &pid));
    ck_assert_int_eq(pid, 7);
    ck_assert(!ccr_tmp_parse_name(".ccr-tmp.5.0", NULL));
    ck_assert(!ccr_tmp_parse_name("a.ccr-tmp.5", NULL));
    ck_assert(!ccr_tmp_parse_name("a.ccr-tmp.5.", NULL));
    ck_assert(!ccr_tmp_parse_name("a.ccr-tmp.x.0", NULL));
    ck_assert(!ccr_tmp_parse_name("a.ccr-tmp.5.0~", NULL));
    ck_assert(!ccr_tmp_parse_name("a.tmp.5.0", NULL));

    ccr_test_tpath dir = fresh_dir("sweep");
    char dead[700], live[700], other[700], target[620];
    snprintf(target, sizeof target, "%s/ck.safetensors", dir.s);
    snprintf(dead, sizeof dead, "%s/old.jsonl" CCR_TMP_INFIX "%ld.0", dir.s, (long)dead_pid());
    snprintf(live, sizeof live, "%s/ck.safetensors" CCR_TMP_INFIX "%ld.3", dir.s,
             (long)getppid());
    snprintf(other, sizeof other, "%s/notes" CCR_TMP_INFIX "txt", dir.s);
    ck_assert_int_eq(ccr_test_write_file(dead, "x", 1), 0);
    ck_assert_int_eq(ccr_test_write_file(live, "x", 1), 0);
    ck_assert_int_eq(ccr_test_write_file(other, "x", 1), 0);
    size_t removed = 99;
    CCR_CK_OK(ctx, ccr_tmp_sweep(ctx, target, &removed, NULL, NULL));
    ck_assert_uint_eq(removed, 1);
    ck_assert(!ccr_test_exists(dead));
    ck_assert(ccr_test_exists(live));     /* its process is running */
    ck_assert(ccr_test_exists(other));    /* not a ccr temporary */
    CCR_CK_STATUS(ctx, ccr_tmp_sweep(ctx, "/nonexistent-dir/x", NULL, NULL, NULL), CCR_EIO);

    /* A temporary is removed on every failure path: a rename onto a
     * directory fails and leaves nothing behind. */
    ccr_tmp t;
    char sub[640];
    snprintf(sub, sizeof sub, "%s/sub", dir.s);
    ck_assert_int_eq(mkdir(sub, 0700), 0);
    CCR_CK_OK(ctx, ccr_tmp_create(ctx, sub, &t));
    CCR_CK_OK(ctx, ccr_tmp_write(ctx, &t, "abc", 3));
    CCR_CK_STATUS(ctx, ccr_tmp_commit(ctx, &t, NULL), CCR_EIO);
    ccr_tmp_release(&t);
    ck_assert_uint_eq(count_temps(dir.s), 2);   /* live and other */
    CCR_CK_STATUS(ctx, ccr_tmp_create(ctx, "", &t), CCR_EINVAL);
    ccr_tmp_release(&t);
    rm_dir(&dir);
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
    TCase *fs = tcase_create("file safety");
    tcase_set_timeout(fs, 30);
    tcase_add_test(fs, test_jsonl_keeps_previous);
    tcase_add_test(fs, test_jsonl_full_disk);
    tcase_add_test(fs, test_tmp_sweep);
    tcase_add_test(fs, test_tmp_sweep_keeps_results);
    suite_add_tcase(s, fs);
    return s;
}

int main(void)
{
    return ccr_test_run(jsonl_suite());
}
