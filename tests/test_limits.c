/*
 * test_limits.c - sizes and memory limits (issue 9, class 1): the overflow
 * helpers, and requests that cannot fit refused up front with CCR_ENOMEM
 * and a message saying how much they need (ccr_mem_check), before anything
 * is allocated: absurd max_batch, absurd widths, size products that wrap.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "ccr_test.h"
#include "internal.h"  // provides: ccr_add_ok, ccr_mul3_ok, ccr_mallocn, ccr_mem_physical

static ccr_ctx *ctx;
static ccr_backend *be;
static gsl_rng *rng;

static void setup(void)
{
    ck_assert_int_eq(ccr_ctx_init(&ctx), CCR_OK);
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, 3);
}

static void teardown(void)
{
    gsl_rng_free(rng);
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
}

/* Asserts CCR_ENOMEM and a message that says what the request needs. */
#define EXPECT_TOO_BIG(expr)                                                         \
    do {                                                                             \
        ccr_ctx_clear_error(ctx);                                                    \
        CCR_CK_STATUS(ctx, expr, CCR_ENOMEM);                                        \
        ck_assert_msg(strstr(ccr_ctx_errmsg(ctx), "needs") != NULL &&                \
                          strstr(ccr_ctx_errmsg(ctx), "this machine has") != NULL,   \
                      "%s: message '%s' does not say what it needs", #expr,          \
                      ccr_ctx_errmsg(ctx));                                          \
    } while (0)

START_TEST(test_size_helpers)
{
    size_t r = 7;
    ck_assert(ccr_add_ok(3, 4, &r) && r == 7);
    ck_assert(!ccr_add_ok(SIZE_MAX, 1, &r));
    ck_assert(ccr_mul3_ok(2, 3, 4, &r) && r == 24);
    ck_assert(!ccr_mul3_ok(SIZE_MAX / 2, 2, 2, &r));
    ck_assert(!ccr_mul3_ok((size_t)1 << 32, (size_t)1 << 32, 1, &r));
    ck_assert(ccr_mul3_ok(0, SIZE_MAX, SIZE_MAX, &r) && r == 0);
    /* The checked allocators return NULL for a wrapping product (a wrapped
     * product would be small and succeed). */
    ck_assert_ptr_null(ccr_mallocn(SIZE_MAX / 2 + 2, 2));
    ck_assert_ptr_null(ccr_malloc3((size_t)1 << 33, (size_t)1 << 33, 4));
    ck_assert_ptr_null(ccr_calloc3((size_t)1 << 33, (size_t)1 << 33, 4));
    void *p = ccr_mallocn(4, 4);
    ck_assert_ptr_nonnull(p);
    ck_assert_ptr_null(ccr_reallocn(p, SIZE_MAX / 4 + 2, 4));  /* p still valid */
    free(p);
    void *z = ccr_mallocn(0, 4);  /* at least one byte */
    ck_assert_ptr_nonnull(z);
    free(z);
    ck_assert_uint_gt(ccr_mem_physical(), 0);
    CCR_CK_OK(ctx, ccr_mem_check(ctx, 1024, "a kilobyte"));
    EXPECT_TOO_BIG(ccr_mem_check(ctx, SIZE_MAX, "everything"));
}
END_TEST

/* The reported bug: a huge max_batch made the activation block's size
 * (max_batch x width) wrap, and training wrote past the buffer. */
START_TEST(test_net_huge_batch)
{
    ccr_net *net = NULL;
    /* max_batch x d_in x 4 overflows size_t. */
    EXPECT_TOO_BIG(ccr_net_init(be, 784, SIZE_MAX / 64, &net));
    ck_assert_ptr_null(net);
    /* No overflow, but far more than any machine: 2^40 x 784 floats. */
    EXPECT_TOO_BIG(ccr_net_init(be, 784, (size_t)1 << 40, &net));
    ck_assert_ptr_null(net);
    /* The input fits, the layers do not: finalize refuses before allocating. */
    size_t phys = ccr_mem_physical(), batch = phys / 4096 + 1, bytes = 0;
    CCR_CK_OK(ctx, ccr_net_init(be, 1, batch, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 1024));
    CCR_CK_OK(ctx, ccr_net_add_act(net, CCR_ACT_RELU));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 10));
    CCR_CK_OK(ctx, ccr_net_memory_bytes(net, &bytes));
    ck_assert_uint_gt(bytes, phys);
    EXPECT_TOO_BIG(ccr_net_finalize(net, rng));
    ck_assert_ptr_null(ccr_net_params(net));
    ccr_net_free(net);
}
END_TEST

START_TEST(test_net_huge_width)
{
    ccr_net *net = NULL;
    size_t bytes = 0;
    /* Widths whose weight count d_in x d_out wraps size_t. */
    CCR_CK_OK(ctx, ccr_net_init(be, 4, 8, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, (size_t)1 << 40));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, (size_t)1 << 40));
    ccr_ctx_clear_error(ctx);
    CCR_CK_STATUS(ctx, ccr_net_memory_bytes(net, &bytes), CCR_ENOMEM);
    ck_assert_uint_eq(bytes, 0);  /* untouched */
    EXPECT_TOO_BIG(ccr_net_finalize(net, rng));
    ccr_net_free(net);
    /* No wrap, but 2^36 parameters: refused, not attempted. */
    CCR_CK_OK(ctx, ccr_net_init(be, (size_t)1 << 18, 8, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, (size_t)1 << 18));
    CCR_CK_OK(ctx, ccr_net_memory_bytes(net, &bytes));
    ck_assert_uint_ge(bytes, ((size_t)1 << 36) * 8);
    EXPECT_TOO_BIG(ccr_net_finalize(net, rng));
    ccr_net_free(net);
}
END_TEST

/* ccr_net_memory_bytes on a small net: at least the parameters, their
 * gradients and the activations, and stable across finalize. */
START_TEST(test_net_memory_bytes)
{
    ccr_net *net;
    size_t before = 0, after = 0;
    CCR_CK_OK(ctx, ccr_net_init(be, 4, 16, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 8));
    CCR_CK_OK(ctx, ccr_net_add_act(net, CCR_ACT_TANH));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 3));
    CCR_CK_OK(ctx, ccr_net_memory_bytes(net, &before));
    size_t params = 4 * 8 + 8 + 8 * 3 + 3, acts = 16 * (4 + 2 * (8 + 8 + 3) + 3);
    ck_assert_uint_ge(before, 2 * params * sizeof(float) + acts * sizeof(float));
    ck_assert_uint_lt(before, 1u << 20);
    CCR_CK_OK(ctx, ccr_net_finalize(net, rng));
    CCR_CK_OK(ctx, ccr_net_memory_bytes(net, &after));
    ck_assert_uint_ge(after, before);  /* the arena pads each tensor */
    ck_assert_uint_lt(after, 1u << 20);
    ccr_net_free(net);
}
END_TEST

START_TEST(test_cond_huge_batch)
{
    ccr_cond_config cfg = ccr_cond_config_default();
    cfg.gate = ccr_gate_type_find("topk");
    cfg.gate_cfg.n_experts = 4;
    cfg.gate_cfg.k = 2;
    cfg.d_in = cfg.d_out = 16;
    cfg.hidden = 8;
    ccr_cond *c = NULL;
    EXPECT_TOO_BIG(ccr_cond_alloc(be, &cfg, (size_t)1 << 40, &c));
    ck_assert_ptr_null(c);
    EXPECT_TOO_BIG(ccr_cond_alloc(be, &cfg, SIZE_MAX / 8, &c));
    ck_assert_ptr_null(c);
    /* A network whose conditional layer cannot fit stops at add_cond. */
    ccr_net *net;
    CCR_CK_OK(ctx, ccr_net_init(be, 16, ccr_mem_physical() / (16 * 4 * 4), &net));
    EXPECT_TOO_BIG(ccr_net_add_cond(net, &cfg));
    ccr_net_free(net);
    /* A small one reports its workspace. */
    CCR_CK_OK(ctx, ccr_cond_alloc(be, &cfg, 32, &c));
    ck_assert_uint_ge(ccr_cond_memory_bytes(c), 32 * 2 * (2 * 16 + 2 * 8 + 2 * 16) * 4);
    ccr_cond_free(c);
}
END_TEST

/* Data sets: an absurd n x dim is refused, not attempted. */
START_TEST(test_dataset_huge)
{
    ccr_dataset *ds = NULL;
    ccr_ctx_clear_error(ctx);
    ccr_status s = ccr_dataset_alloc(ctx, (size_t)1 << 40, 784, 10, &ds);
    ck_assert_msg(s == CCR_ENOMEM || s == CCR_EINVAL, "got %s", ccr_strerror(s));
    ck_assert_ptr_null(ds);
    EXPECT_TOO_BIG(ccr_dataset_alloc(ctx, (size_t)1 << 36, 784, 10, &ds));
    ck_assert_ptr_null(ds);
}
END_TEST

/* Caps this (forked) test's address space at 1 GiB more than the test uses
 * so far, so an allocation of what a header merely claims fails.  Not under
 * AddressSanitizer, which reserves terabytes of address space. */
#if defined(__SANITIZE_ADDRESS__)
#define LIMITS_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LIMITS_ASAN 1
#endif
#endif
static void cap_address_space(void)
{
#ifndef LIMITS_ASAN
    if (getenv("CK_FORK") != NULL && strcmp(getenv("CK_FORK"), "no") == 0)
        return;  /* not forked: leave the runner alone */
    struct rlimit rl;
    rl.rlim_cur = rl.rlim_max = (rlim_t)3 << 30;
    ck_assert_int_eq(setrlimit(RLIMIT_AS, &rl), 0);
#endif
}

/* An IDX file cannot make the loader allocate what it does not hold: an
 * 8-byte plain file claiming 3 GiB of bytes (12 GiB of floats) fails as
 * malformed before any allocation, and a gzip file claiming 1 Gi elements
 * with 8 bytes of payload fails as truncated (the array grows as data
 * arrives).  The old loader allocated the claimed size first (ENOMEM under
 * the cap). */
START_TEST(test_idx_claims_more_than_file)
{
    cap_address_space();
    const unsigned char plain[] = {0, 0, 0x08, 1, 0xB2, 0xD0, 0x5E, 0x00};  /* 3e9 u8 */
    ccr_test_tpath p = ccr_test_tmp_path("claims.idx");
    ck_assert_int_eq(ccr_test_write_file(p.s, plain, sizeof plain), 0);
    ccr_idx *idx = NULL;
    ccr_ctx_clear_error(ctx);
    CCR_CK_STATUS(ctx, ccr_idx_load(ctx, p.s, &idx), CCR_EFORMAT);
    ck_assert_msg(strstr(ccr_ctx_errmsg(ctx), "claims") != NULL, "%s", ccr_ctx_errmsg(ctx));
    ck_assert_ptr_null(idx);
    /* Same header with its payload in gzip: 2^30 u8 elements claimed. */
    unsigned char gz[16] = {0, 0, 0x08, 1, 0x40, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8};
    ccr_test_tpath q = ccr_test_tmp_path("claims.idx.gz");
    ck_assert_int_eq(ccr_test_write_gz(q.s, gz, sizeof gz), 0);
    ccr_ctx_clear_error(ctx);
    CCR_CK_STATUS(ctx, ccr_idx_load(ctx, q.s, &idx), CCR_EFORMAT);
    ck_assert_msg(strstr(ccr_ctx_errmsg(ctx), "truncated") != NULL, "%s", ccr_ctx_errmsg(ctx));
    ck_assert_ptr_null(idx);
    /* A plain file with a byte too many or too few is refused the same way;
     * the exact one loads. */
    unsigned char ok[12] = {0, 0, 0x08, 1, 0, 0, 0, 3, 7, 8, 9, 10};
    ck_assert_int_eq(ccr_test_write_file(p.s, ok, 10), 0);
    CCR_CK_STATUS(ctx, ccr_idx_load(ctx, p.s, &idx), CCR_EFORMAT);
    ck_assert_int_eq(ccr_test_write_file(p.s, ok, 12), 0);
    CCR_CK_STATUS(ctx, ccr_idx_load(ctx, p.s, &idx), CCR_EFORMAT);
    ok[7] = 4;
    ck_assert_int_eq(ccr_test_write_file(p.s, ok, 12), 0);
    CCR_CK_OK(ctx, ccr_idx_load(ctx, p.s, &idx));
    ck_assert_uint_eq(idx->numel, 4);
    ck_assert(idx->data[3] == 10.0f);
    ccr_idx_free(idx);
    /* A gzip file larger than the first capacity grows to its full size. */
    size_t n = ((size_t)1 << 20) * 3 + 5;
    unsigned char *big = malloc(8 + n);
    ck_assert_ptr_nonnull(big);
    big[0] = big[1] = 0;
    big[2] = 0x08;
    big[3] = 1;
    big[4] = (unsigned char)(n >> 24);
    big[5] = (unsigned char)(n >> 16);
    big[6] = (unsigned char)(n >> 8);
    big[7] = (unsigned char)n;
    for (size_t i = 0; i < n; i++)
        big[8 + i] = (unsigned char)(i * 7);
    ck_assert_int_eq(ccr_test_write_gz(q.s, big, 8 + n), 0);
    free(big);
    CCR_CK_OK(ctx, ccr_idx_load(ctx, q.s, &idx));
    ck_assert_uint_eq(idx->numel, n);
    for (size_t i = 0; i < n; i += 4099)
        ck_assert(idx->data[i] == (float)(unsigned char)(i * 7));
    ck_assert(idx->data[n - 1] == (float)(unsigned char)((n - 1) * 7));
    ccr_idx_free(idx);
}
END_TEST

static Suite *limits_suite(void)
{
    Suite *s = suite_create("limits");
    TCase *tc = tcase_create("limits");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_size_helpers);
    tcase_add_test(tc, test_net_huge_batch);
    tcase_add_test(tc, test_net_huge_width);
    tcase_add_test(tc, test_net_memory_bytes);
    tcase_add_test(tc, test_cond_huge_batch);
    tcase_add_test(tc, test_dataset_huge);
    tcase_add_test(tc, test_idx_claims_more_than_file);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return ccr_test_run(limits_suite()); }
