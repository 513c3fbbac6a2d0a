/*
 * test_unit.c - status codes, contexts, the CPU backend (buffers, GEMM against
 * the scalar reference), matrix views and parameter arenas.
 */
#define _GNU_SOURCE /* dladdr */
#include <dlfcn.h>
#include <gsl/gsl_blas.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "arena_impl.h"  // provides: ccr_arena_stage (host staging)
#include "ccr_test.h"

static ccr_ctx *ctx;
static ccr_backend *be;
static gsl_rng *rng;

static void setup(void)
{
    ck_assert_int_eq(ccr_ctx_init(&ctx), CCR_OK);
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, 42);
}

static void teardown(void)
{
    gsl_rng_free(rng);
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
}

START_TEST(test_strerror_distinct)
{
    for (int a = 0; a < CCR_STATUS_COUNT; a++) {
        const char *sa = ccr_strerror((ccr_status)a);
        ck_assert_ptr_nonnull(sa);
        ck_assert_int_gt((int)strlen(sa), 3);
        ck_assert_str_ne(sa, "unknown status");
        for (int b = a + 1; b < CCR_STATUS_COUNT; b++)
            ck_assert_str_ne(sa, ccr_strerror((ccr_status)b));
    }
    ck_assert_str_eq(ccr_strerror((ccr_status)999), "unknown status");
    ck_assert_str_eq(ccr_version(), CCR_VERSION);
}
END_TEST

START_TEST(test_ctx_message)
{
    ck_assert_str_eq(ccr_ctx_errmsg(ctx), "");
    ck_assert_int_eq(ccr_ctx_last_status(ctx), CCR_OK);
    void *p = NULL;
    ck_assert_int_eq(ccr_backend_alloc(be, 0, &p), CCR_EINVAL);
    ck_assert_ptr_null(p);
    ck_assert_int_eq(ccr_ctx_last_status(ctx), CCR_EINVAL);
    const char *m = ccr_ctx_errmsg(ctx);
    ck_assert_msg(strstr(m, "ccr_backend_alloc") != NULL, "no function in '%s'", m);
    ck_assert_msg(strstr(m, "backend.c:") != NULL, "no file:line in '%s'", m);
    ccr_ctx_clear_error(ctx);
    ck_assert_str_eq(ccr_ctx_errmsg(ctx), "");
    ck_assert_str_eq(ccr_ctx_errmsg(NULL), "");
    ck_assert_int_eq(ccr_ctx_init(NULL), CCR_EINVAL);
}
END_TEST

START_TEST(test_backend_buffers)
{
    ck_assert_str_eq(ccr_backend_name(be), "cpu");
    ck_assert_ptr_eq(ccr_backend_ctx(be), ctx);
    const char *d = ccr_backend_describe(be);
    ck_assert_msg(strstr(d, "core=") != NULL && strstr(d, ccr_blas_corename()) != NULL,
                  "describe '%s' lacks the OpenBLAS core", d);
    ck_assert_int_ge(ccr_blas_num_threads(), 1);
    unsigned char *buf;
    CCR_CK_OK(ctx, ccr_backend_alloc(be, 1000, (void **)&buf));
    ck_assert_int_eq((int)((uintptr_t)buf % 64), 0);
    for (int i = 0; i < 1000; i++)
        ck_assert_int_eq(buf[i], 0);
    unsigned char src[1000], dst[1000];
    for (int i = 0; i < 1000; i++)
        src[i] = (unsigned char)(i * 7);
    CCR_CK_OK(ctx, ccr_backend_set(be, buf, src, sizeof src));
    CCR_CK_OK(ctx, ccr_backend_get(be, dst, buf, sizeof dst));
    ck_assert_mem_eq(src, dst, sizeof src);
    CCR_CK_OK(ctx, ccr_backend_memset(be, buf, 0xAB, 10));
    CCR_CK_OK(ctx, ccr_backend_get(be, dst, buf, 10));
    ck_assert_int_eq(dst[9], 0xAB);
    CCR_CK_OK(ctx, ccr_backend_synchronize(be));
    ccr_backend_free_buffer(be, buf);
    CCR_CK_OK(ctx, ccr_backend_cpu_set_use_ref(be, true));
    ck_assert_str_eq(ccr_backend_name(be), "cpu-ref");
}
END_TEST

/* cblas sgemm against the double-accumulating reference for every
 * transpose combination, awkward sizes and padded strides. */
START_TEST(test_gemm_vs_ref)
{
    const size_t dims[][3] = {{1, 1, 1}, {7, 5, 3}, {33, 17, 65}, {128, 1, 31}, {3, 129, 2}};
    ccr_backend *ref;
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &ref));
    CCR_CK_OK(ctx, ccr_backend_cpu_set_use_ref(ref, true));
    for (size_t t = 0; t < sizeof dims / sizeof dims[0]; t++) {
        for (int ta = 0; ta < 2; ta++) {
            for (int tb = 0; tb < 2; tb++) {
                size_t m = dims[t][0], n = dims[t][1], k = dims[t][2];
                size_t lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 1, ldc = n + 2;
                size_t na = (ta ? k : m) * lda, nb = (tb ? n : k) * ldb, nc = m * ldc;
                float *a = malloc(na * 4), *b = malloc(nb * 4), *c1 = malloc(nc * 4),
                      *c2 = malloc(nc * 4);
                ccr_test_fill_uniform(rng, a, na, -1, 1);
                ccr_test_fill_uniform(rng, b, nb, -1, 1);
                ccr_test_fill_uniform(rng, c1, nc, -1, 1);
                memcpy(c2, c1, nc * 4);
                CCR_CK_OK(ctx, ccr_backend_gemm(be, ta, tb, m, n, k, 0.7f, a, lda, b, ldb,
                                                0.3f, c1, ldc));
                CCR_CK_OK(ctx, ccr_backend_gemm(ref, ta, tb, m, n, k, 0.7f, a, lda, b, ldb,
                                                0.3f, c2, ldc));
                ccr_test_assert_nmse(c1, c2, nc, 1e-11, "gemm");
                /* The padding columns of C are never written. */
                for (size_t i = 0; i < m; i++)
                    ck_assert_float_eq(c1[i * ldc + n], c2[i * ldc + n]);
                free(a), free(b), free(c1), free(c2);
            }
        }
    }
    ccr_backend_free(ref);
}
END_TEST

/* The reference GEMM on a hand-computed case; beta = 0 ignores NaN in C. */
START_TEST(test_gemm_known)
{
    float a[] = {1, 2, 3, 4, 5, 6};         /* 2x3 */
    float b[] = {7, 8, 9, 10, 11, 12};      /* 3x2 */
    float c[] = {NAN, NAN, NAN, NAN};
    CCR_CK_OK(ctx, ccr_backend_cpu_set_use_ref(be, true));
    ccr_mat A = ccr_mat_make(a, 2, 3), B = ccr_mat_make(b, 3, 2), C = ccr_mat_make(c, 2, 2);
    CCR_CK_OK(ctx, ccr_mat_gemm(be, false, false, 1.0f, A, B, 0.0f, C));
    const float want[] = {58, 64, 139, 154};
    for (int i = 0; i < 4; i++)
        ck_assert_float_eq(c[i], want[i]);
    /* A^T A (3x3): uses a transposed view. */
    float d[9];
    ccr_mat D = ccr_mat_make(d, 3, 3);
    CCR_CK_OK(ctx, ccr_mat_gemm(be, true, false, 1.0f, A, A, 0.0f, D));
    ck_assert_float_eq(d[0], 17);   /* 1*1 + 4*4 */
    ck_assert_float_eq(d[5], 36);   /* column 1 . column 2 = 2*3 + 5*6 */
    /* Row views. */
    ccr_mat r = ccr_mat_rows(A, 1, 1);
    ck_assert_float_eq(r.data[0], 4);
    ck_assert_int_eq((int)r.rows, 1);
}
END_TEST

START_TEST(test_arena_layout)
{
    ccr_arena *a;
    CCR_CK_OK(ctx, ccr_arena_init(be, &a));
    size_t s1[2] = {3, 5}, s2[1] = {7}, s3[3] = {2, 2, 2}, i1, i2, i3;
    CCR_CK_OK(ctx, ccr_arena_add(a, "w", 2, s1, &i1));
    CCR_CK_OK(ctx, ccr_arena_add(a, "b", 1, s2, &i2));
    CCR_CK_OK(ctx, ccr_arena_add(a, "t", 3, s3, &i3));
    ck_assert_ptr_null(ccr_arena_values(a));
    CCR_CK_OK(ctx, ccr_arena_finalize(a));
    ck_assert_int_eq((int)ccr_arena_count(a), 3);
    ck_assert_int_eq((int)ccr_arena_n_params(a), 15 + 7 + 8);
    ck_assert_int_eq((int)ccr_arena_block_len(a), 16 * 3);
    for (size_t i = 0; i < 3; i++) {
        ck_assert_int_eq((int)((uintptr_t)ccr_arena_value(a, i) % 64), 0);
        ck_assert_int_eq((int)(ccr_arena_grad(a, i) - ccr_arena_grads(a)),
                         (int)(ccr_arena_value(a, i) - ccr_arena_values(a)));
    }
    ck_assert_int_eq((int)ccr_arena_size(a, i3), 8);
    ck_assert_int_eq((int)ccr_arena_shape(a, i1)[1], 5);
    ck_assert_str_eq(ccr_arena_name(a, i2), "b");
    size_t found;
    CCR_CK_OK(ctx, ccr_arena_find(a, "t", &found));
    ck_assert_int_eq((int)found, (int)i3);
    ck_assert_int_eq(ccr_arena_find(a, "nope", &found), CCR_EINVAL);
    /* zero_grad clears the whole block. */
    float *g = ccr_arena_grads(a);
    for (size_t i = 0; i < ccr_arena_block_len(a); i++)
        g[i] = 1.0f;
    CCR_CK_OK(ctx, ccr_arena_zero_grad(a));
    for (size_t i = 0; i < ccr_arena_block_len(a); i++)
        ck_assert_float_eq(g[i], 0.0f);
    ccr_arena_free(a);
}
END_TEST

/* Host staging (how a device layer's initialisers write through host
 * pointers): values of the staged range point into a copy that unstage
 * uploads, or drops; the other tensors are untouched; bad ranges and a
 * second staging are refused. */
START_TEST(test_arena_stage)
{
    ccr_arena *a;
    CCR_CK_OK(ctx, ccr_arena_init(be, &a));
    size_t s1[1] = {5}, idx[3];
    const char *names[3] = {"a", "b", "c"};
    for (size_t i = 0; i < 3; i++)
        CCR_CK_OK(ctx, ccr_arena_add(a, names[i], 1, s1, &idx[i]));
    ck_assert_int_eq(ccr_arena_stage(a, 0, 1), CCR_EINVAL);  /* not finalized */
    CCR_CK_OK(ctx, ccr_arena_finalize(a));
    float *block0 = ccr_arena_value(a, idx[1]);
    ck_assert_int_eq(ccr_arena_stage(a, 2, 1), CCR_EINVAL);
    ck_assert_int_eq(ccr_arena_stage(a, 0, 4), CCR_EINVAL);
    for (int upload = 0; upload < 2; upload++) {
        CCR_CK_OK(ctx, ccr_arena_stage(a, 1, 3));
        ck_assert_int_eq(ccr_arena_stage(a, 1, 3), CCR_EINVAL);  /* already staged */
        ck_assert_ptr_eq(ccr_arena_value(a, idx[0]), ccr_arena_values(a));
        float *st = ccr_arena_value(a, idx[1]);
        ck_assert_ptr_ne(st, block0);
        for (size_t i = 1; i < 3; i++)
            for (size_t j = 0; j < 5; j++)
                ccr_arena_value(a, idx[i])[j] = (float)(10 * upload + i + j);
        CCR_CK_OK(ctx, ccr_arena_unstage(a, upload != 0));
        ck_assert_ptr_eq(ccr_arena_value(a, idx[1]), block0);
        for (size_t i = 1; i < 3; i++)
            for (size_t j = 0; j < 5; j++)
                ck_assert_float_eq(ccr_arena_value(a, idx[i])[j],
                                   upload ? (float)(10 + i + j) : 0.0f);
        ck_assert_float_eq(ccr_arena_value(a, idx[0])[0], 0.0f);
    }
    CCR_CK_OK(ctx, ccr_arena_unstage(a, true));  /* nothing staged: a no-op */
    CCR_CK_OK(ctx, ccr_arena_stage(a, 0, 3));
    ccr_arena_free(a);                            /* frees an open staging */
}
END_TEST

START_TEST(test_arena_save_load)
{
    ccr_arena *a, *b;
    size_t s1[2] = {4, 3}, s2[1] = {5}, i;
    CCR_CK_OK(ctx, ccr_arena_init(be, &a));
    CCR_CK_OK(ctx, ccr_arena_add(a, "w", 2, s1, NULL));
    CCR_CK_OK(ctx, ccr_arena_add(a, "b", 1, s2, NULL));
    CCR_CK_OK(ctx, ccr_arena_finalize(a));
    CCR_CK_OK(ctx, ccr_arena_init(be, &b));
    CCR_CK_OK(ctx, ccr_arena_add(b, "w", 2, s1, NULL));
    CCR_CK_OK(ctx, ccr_arena_add(b, "b", 1, s2, NULL));
    CCR_CK_OK(ctx, ccr_arena_finalize(b));
    for (i = 0; i < 2; i++) {
        float v[12], gr[12];
        ccr_test_fill_uniform(rng, v, ccr_arena_size(a, i), -3, 3);
        ccr_test_fill_uniform(rng, gr, ccr_arena_size(a, i), -3, 3);
        CCR_CK_OK(ctx, ccr_arena_set(a, i, v));
        memcpy(ccr_arena_grad(a, i), gr, ccr_arena_size(a, i) * 4);
    }
    const char *path = ccr_test_path("arena.safetensors");
    const char *meta[] = {"who", "test"};
    CCR_CK_OK(ctx, ccr_arena_save(a, path, 1, meta, 1));
    CCR_CK_OK(ctx, ccr_arena_load(b, path));
    for (i = 0; i < 2; i++) {
        float va[12], vb[12];
        CCR_CK_OK(ctx, ccr_arena_get(a, i, va));
        CCR_CK_OK(ctx, ccr_arena_get(b, i, vb));
        ck_assert_mem_eq(va, vb, ccr_arena_size(a, i) * 4);
    }
    /* The file holds grad.* too, readable with the safetensors API. */
    ccr_safetensors *f;
    CCR_CK_OK(ctx, ccr_safetensors_read(ctx, path, &f));
    const ccr_st_tensor *t = ccr_safetensors_find(f, "grad.w");
    ck_assert_ptr_nonnull(t);
    ck_assert_mem_eq(t->data, ccr_arena_grad(a, 0), 12 * 4);
    ck_assert_str_eq(ccr_safetensors_meta(f, "who"), "test");
    ccr_safetensors_free(f);
    unlink(path);
    ccr_arena_free(a);
    ccr_arena_free(b);
}
END_TEST

/* Debian's libgsl.so carries a NEEDED entry for libgslcblas, GSL's slow
 * reference cblas.  ccr links OpenBLAS directly and never -lgslcblas, so
 * every cblas_* symbol (ours and GSL's own gsl_blas_* calls) must bind to
 * OpenBLAS. */
START_TEST(test_cblas_is_openblas)
{
    const char *names[] = {"cblas_sgemm", "cblas_sdot", "cblas_dgemm"};
    for (int i = 0; i < 3; i++) {
        Dl_info info;
        void *sym = dlsym(RTLD_DEFAULT, names[i]);
        ck_assert_ptr_nonnull(sym);
        ck_assert_int_ne(dladdr(sym, &info), 0);
        ck_assert_msg(strstr(info.dli_fname, "openblas") != NULL, "%s comes from %s, not OpenBLAS",
                      names[i], info.dli_fname);
    }
    /* GSL's BLAS wrapper computes through it correctly. */
    float xv[3] = {1, 2, 3};
    gsl_vector_float_view x = gsl_vector_float_view_array(xv, 3);
    float r;
    ck_assert_int_eq(gsl_blas_sdot(&x.vector, &x.vector, &r), 0);
    ck_assert_float_eq(r, 14.0f);
}
END_TEST

static Suite *unit_suite(void)
{
    Suite *s = suite_create("unit");
    TCase *tc = tcase_create("core");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_strerror_distinct);
    tcase_add_test(tc, test_ctx_message);
    tcase_add_test(tc, test_backend_buffers);
    tcase_add_test(tc, test_gemm_vs_ref);
    tcase_add_test(tc, test_gemm_known);
    tcase_add_test(tc, test_arena_layout);
    tcase_add_test(tc, test_arena_stage);
    tcase_add_test(tc, test_arena_save_load);
    tcase_add_test(tc, test_cblas_is_openblas);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return ccr_test_run(unit_suite()); }
