/*
 * test_api.c - the NULL-handle rule (include/ccr/ccr.h, docs/DESIGN.md)
 * over the whole public API: every declared function is called here with a
 * NULL handle, NULL arguments and out-of-range indices.  Getters return
 * their neutral value (0, 0.0, NULL, -1 for ccr_corpus_lookup); fallible
 * functions return CCR_EINVAL (CCR_EUNSUP/CCR_ENODEV where the build has no
 * CUDA); frees and clears accept NULL; a NULL context is accepted wherever a
 * function takes one.  tests/api_coverage.sh fails if a function declared
 * in include/ccr/ is not called in this file.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ccr_test.h"

static ccr_ctx *ctx;
static ccr_backend *be;
static gsl_rng *rng;

static void setup(void)
{
    ck_assert_int_eq(ccr_ctx_init(&ctx), CCR_OK);
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, 5);
}

static void teardown(void)
{
    gsl_rng_free(rng);
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
}

#define EINVAL_(expr) CCR_CK_STATUS(ctx, expr, CCR_EINVAL)

START_TEST(test_core)
{
    ck_assert_ptr_nonnull(ccr_version());
    ck_assert_ptr_nonnull(ccr_strerror(CCR_STATUS_COUNT));
    ck_assert_ptr_nonnull(ccr_strerror((ccr_status)-1));
    EINVAL_(ccr_ctx_init(NULL));
    ccr_ctx_free(NULL);
    ck_assert_str_eq(ccr_ctx_errmsg(NULL), "");
    ck_assert_int_eq(ccr_ctx_last_status(NULL), CCR_OK);
    ccr_ctx_clear_error(NULL);
}
END_TEST

START_TEST(test_backend)
{
    ccr_backend *b = NULL;
    EINVAL_(ccr_backend_cpu_init(ctx, NULL));
    /* A NULL context is accepted: errors are then reported by status only. */
    ck_assert_int_eq(ccr_backend_cpu_init(NULL, &b), CCR_OK);
    void *q = NULL;
    ck_assert_int_eq(ccr_backend_alloc(b, 0, &q), CCR_EINVAL);
    ck_assert_ptr_null(ccr_backend_ctx(b));
    /* The CPU computes in FP32 only: TF32 is refused, a bogus mode too. */
    ck_assert_int_eq(ccr_backend_set_math(b, CCR_MATH_FP32), CCR_OK);
    ck_assert_int_eq(ccr_backend_set_math(b, CCR_MATH_TF32), CCR_EUNSUP);
    ck_assert_int_eq(ccr_backend_set_math(b, CCR_MATH_BF16), CCR_EUNSUP);
    ck_assert_int_eq(ccr_backend_set_math(b, (ccr_math)7), CCR_EINVAL);
    ccr_backend_free(b);
    b = NULL;
    EINVAL_(ccr_backend_cpu_set_use_ref(NULL, true));
    EINVAL_(ccr_backend_set_math(NULL, CCR_MATH_FP32));
    ccr_status s = ccr_backend_cuda_init(ctx, 0, NULL);
    ck_assert(s == CCR_EINVAL || s == CCR_EUNSUP);
    s = ccr_backend_cuda_init(NULL, 0, &b);
    ck_assert(s == CCR_EINVAL || s == CCR_EUNSUP || s == CCR_ENODEV);
    ck_assert_ptr_null(b);
    s = ccr_backend_cuda_init(ctx, -1, &b);
    ck_assert(s == CCR_EINVAL || s == CCR_EUNSUP || s == CCR_ENODEV);
    ccr_backend_free(NULL);
    /* Strings meant for printing are never NULL: "" for a NULL handle. */
    ck_assert_str_eq(ccr_backend_name(NULL), "");
    ck_assert_str_eq(ccr_backend_describe(NULL), "");
    ck_assert_ptr_null(ccr_backend_ctx(NULL));
    void *p = NULL;
    EINVAL_(ccr_backend_alloc(NULL, 16, &p));
    EINVAL_(ccr_backend_alloc(be, 16, NULL));
    EINVAL_(ccr_backend_alloc(be, 0, &p));
    ccr_backend_free_buffer(NULL, NULL);
    ccr_backend_free_buffer(be, NULL);
    float buf[4] = {0};
    EINVAL_(ccr_backend_set(NULL, buf, buf, sizeof buf));
    EINVAL_(ccr_backend_set(be, NULL, buf, sizeof buf));
    EINVAL_(ccr_backend_get(NULL, buf, buf, sizeof buf));
    EINVAL_(ccr_backend_get(be, buf, NULL, sizeof buf));
    EINVAL_(ccr_backend_memset(NULL, buf, 0, sizeof buf));
    EINVAL_(ccr_backend_memset(be, NULL, 0, sizeof buf));
    EINVAL_(ccr_backend_synchronize(NULL));
    EINVAL_(ccr_backend_gemm(NULL, false, false, 1, 1, 1, 1.0f, buf, 1, buf, 1, 0.0f, buf, 1));
    EINVAL_(ccr_backend_gemm(be, false, false, 1, 1, 1, 1.0f, NULL, 1, buf, 1, 0.0f, buf, 1));
    ccr_mat m = ccr_mat_make(buf, 2, 2), z = ccr_mat_make(NULL, 2, 2);
    (void)ccr_mat_rows(m, 0, 1);
    EINVAL_(ccr_mat_gemm(NULL, false, false, 1.0f, m, m, 0.0f, m));
    EINVAL_(ccr_mat_gemm(be, false, false, 1.0f, z, m, 0.0f, m));
    ck_assert_ptr_nonnull(ccr_blas_corename());
    ck_assert_ptr_nonnull(ccr_blas_core_source());
    ck_assert_int_ge(ccr_blas_num_threads(), 0);
}
END_TEST

START_TEST(test_arena)
{
    ccr_arena *a = NULL;
    EINVAL_(ccr_arena_init(NULL, &a));
    EINVAL_(ccr_arena_init(be, NULL));
    ccr_arena_free(NULL);
    size_t shape[1] = {3}, idx = 0;
    EINVAL_(ccr_arena_add(NULL, "w", 1, shape, &idx));
    EINVAL_(ccr_arena_finalize(NULL));
    ck_assert_uint_eq(ccr_arena_count(NULL), 0);
    ck_assert_uint_eq(ccr_arena_n_params(NULL), 0);
    ck_assert_uint_eq(ccr_arena_block_len(NULL), 0);
    ck_assert_ptr_null(ccr_arena_values(NULL));
    ck_assert_ptr_null(ccr_arena_grads(NULL));
    CCR_CK_OK(ctx, ccr_arena_init(be, &a));
    EINVAL_(ccr_arena_add(a, NULL, 1, shape, &idx));
    EINVAL_(ccr_arena_add(a, "w", 1, NULL, &idx));
    CCR_CK_OK(ctx, ccr_arena_add(a, "w", 1, shape, &idx));
    /* Before finalize: per-tensor pointers NULL, facts known. */
    ck_assert_ptr_null(ccr_arena_value(a, 0));
    ck_assert_ptr_null(ccr_arena_grad(a, 0));
    CCR_CK_OK(ctx, ccr_arena_finalize(a));
    for (size_t i = 1; i <= 2; i++) {  /* out of range, and NULL arena */
        const ccr_arena *h = i == 1 ? a : NULL;
        ck_assert_ptr_null(ccr_arena_name(h, i));
        ck_assert_uint_eq(ccr_arena_rank(h, i), 0);
        ck_assert_ptr_null(ccr_arena_shape(h, i));
        ck_assert_uint_eq(ccr_arena_size(h, i), 0);
        ck_assert_ptr_null(ccr_arena_value(h, i));
        ck_assert_ptr_null(ccr_arena_grad(h, i));
    }
    ck_assert_str_eq(ccr_arena_name(a, 0), "w");
    float host[3] = {0};
    EINVAL_(ccr_arena_set(NULL, 0, host));
    EINVAL_(ccr_arena_set(a, 1, host));
    EINVAL_(ccr_arena_set(a, 0, NULL));
    EINVAL_(ccr_arena_get(NULL, 0, host));
    EINVAL_(ccr_arena_get(a, 1, host));
    EINVAL_(ccr_arena_get(a, 0, NULL));
    EINVAL_(ccr_arena_get_grad(NULL, 0, host));
    EINVAL_(ccr_arena_get_grad(a, 1, host));
    EINVAL_(ccr_arena_find(NULL, "w", &idx));
    EINVAL_(ccr_arena_find(a, NULL, &idx));
    EINVAL_(ccr_arena_find(a, "w", NULL));
    EINVAL_(ccr_arena_zero_grad(NULL));
    EINVAL_(ccr_arena_save(NULL, ccr_test_path("api.st"), 0, NULL, 0));
    EINVAL_(ccr_arena_save(a, NULL, 0, NULL, 0));
    EINVAL_(ccr_arena_load(NULL, ccr_test_path("api.st")));
    EINVAL_(ccr_arena_load(a, NULL));
    ccr_arena_free(a);
}
END_TEST

START_TEST(test_safetensors_jsonl)
{
    ccr_safetensors *f = NULL;
    float v[2] = {1, 2};
    ccr_st_tensor t = {.name = "t", .dtype = CCR_DTYPE_F32, .rank = 1, .shape = {2}, .data = v};
    const char *path = ccr_test_path("api.safetensors");
    EINVAL_(ccr_safetensors_write(ctx, NULL, &t, 1, NULL, 0));
    EINVAL_(ccr_safetensors_write(ctx, path, NULL, 1, NULL, 0));
    /* A NULL context is accepted: the call works, messages are dropped. */
    ck_assert_int_eq(ccr_safetensors_write(NULL, path, &t, 1, NULL, 0), CCR_OK);
    ck_assert_int_eq(ccr_safetensors_read(NULL, NULL, &f), CCR_EINVAL);
    EINVAL_(ccr_safetensors_read(ctx, path, NULL));
    ck_assert_int_eq(ccr_safetensors_read(NULL, path, &f), CCR_OK);
    ck_assert_ptr_null(ccr_safetensors_at(f, 1));
    ck_assert_ptr_null(ccr_safetensors_find(f, NULL));
    ck_assert_ptr_null(ccr_safetensors_meta(f, NULL));
    ck_assert_ptr_null(ccr_safetensors_meta_key(f, 0));
    ccr_safetensors_free(f);
    ccr_safetensors_free(NULL);
    ck_assert_uint_eq(ccr_safetensors_count(NULL), 0);
    ck_assert_ptr_null(ccr_safetensors_at(NULL, 0));
    ck_assert_ptr_null(ccr_safetensors_find(NULL, "t"));
    ck_assert_ptr_null(ccr_safetensors_meta(NULL, "k"));
    ck_assert_uint_eq(ccr_safetensors_meta_count(NULL), 0);
    ck_assert_ptr_null(ccr_safetensors_meta_key(NULL, 0));
    ck_assert_uint_eq(ccr_st_tensor_numel(NULL), 0);

    ccr_record *r = NULL;
    EINVAL_(ccr_record_init(ctx, NULL));
    ck_assert_int_eq(ccr_record_init(NULL, &r), CCR_OK);
    ccr_record_free(r);
    ccr_record_free(NULL);
    ccr_record_clear(NULL);
    EINVAL_(ccr_record_add_str(NULL, "k", "v"));
    EINVAL_(ccr_record_add_int(NULL, "k", 1));
    EINVAL_(ccr_record_add_double(NULL, "k", 1.0));
    EINVAL_(ccr_record_add_bool(NULL, "k", true));
    EINVAL_(ccr_record_add_doubles(NULL, "k", NULL, 0));
    char *str = NULL;
    EINVAL_(ccr_record_to_string(NULL, &str));
    ck_assert_ptr_null(str);
    ccr_jsonl *w = NULL;
    EINVAL_(ccr_jsonl_open(ctx, NULL, false, &w));
    EINVAL_(ccr_jsonl_open(ctx, ccr_test_path("api.jsonl"), false, NULL));
    EINVAL_(ccr_jsonl_write(NULL, NULL));
    CCR_CK_OK(ctx, ccr_jsonl_close(NULL));
    CCR_CK_OK(ctx, ccr_jsonl_abort(NULL));
    ck_assert_ptr_null(ccr_jsonl_temp_path(NULL));
    ck_assert_ptr_null(ccr_jsonl_partial_path(NULL));
    ck_assert_uint_eq(ccr_jsonl_lines(NULL), 0);
}
END_TEST

START_TEST(test_data)
{
    ccr_idx *idx = NULL;
    ck_assert_int_eq(ccr_idx_load(NULL, NULL, &idx), CCR_EINVAL);
    EINVAL_(ccr_idx_load(ctx, ccr_test_path("none.idx"), NULL));
    ck_assert_int_eq(ccr_idx_load(NULL, ccr_test_path("none.idx"), &idx), CCR_EIO);
    ck_assert_ptr_null(idx);
    ccr_idx_free(NULL);
    ccr_dataset *ds = NULL, *d2 = NULL;
    EINVAL_(ccr_dataset_load_idx(ctx, NULL, NULL, &ds));
    EINVAL_(ccr_dataset_alloc(ctx, 2, 3, 2, NULL));
    ck_assert_int_eq(ccr_dataset_alloc(NULL, 2, 0, 2, &ds), CCR_EINVAL);
    ck_assert_int_eq(ccr_dataset_alloc(NULL, 2, 3, 2, &ds), CCR_OK);
    EINVAL_(ccr_dataset_split(ctx, NULL, rng, 1, &ds, &d2));
    EINVAL_(ccr_dataset_split(ctx, ds, NULL, 1, &d2, &d2));
    EINVAL_(ccr_dataset_split(ctx, ds, rng, 3, &d2, &d2));  /* n_second > n */
    float x[3];
    int32_t y[1];
    size_t at[1] = {0};
    ccr_dataset_gather(NULL, at, 1, x, y);
    ccr_dataset_gather(ds, NULL, 1, x, y);
    ccr_dataset_free(ds);
    ccr_dataset_free(NULL);
    ccr_permutation(NULL, at, 1);
    ccr_permutation(rng, NULL, 1);
    ccr_corpus *c = NULL;
    ccr_corpus_config cc = {.level = CCR_CORPUS_CHAR};
    EINVAL_(ccr_corpus_load(ctx, NULL, &cc, &c));
    EINVAL_(ccr_corpus_load(ctx, "x", NULL, &c));
    EINVAL_(ccr_corpus_load(ctx, "x", &cc, NULL));
    EINVAL_(ccr_corpus_split(ctx, NULL, rng, 0.1, 0.1));
    ccr_corpus_free(NULL);
    ck_assert_int_eq(ccr_corpus_lookup(NULL, "a"), -1);
}
END_TEST

static ccr_net *make_net(bool finalize)
{
    ccr_net *net;
    CCR_CK_OK(ctx, ccr_net_init(be, 3, 4, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 2));
    if (finalize)
        CCR_CK_OK(ctx, ccr_net_finalize(net, rng));
    return net;
}

START_TEST(test_nn)
{
    ccr_act act = CCR_ACT_RELU;
    ck_assert_ptr_null(ccr_act_name((ccr_act)99));
    EINVAL_(ccr_act_from_name(NULL, &act));
    EINVAL_(ccr_act_from_name("relu", NULL));
    ccr_net *net = NULL;
    EINVAL_(ccr_net_init(NULL, 3, 4, &net));
    EINVAL_(ccr_net_init(be, 3, 4, NULL));
    ccr_net_free(NULL);
    EINVAL_(ccr_net_add_linear(NULL, 2));
    EINVAL_(ccr_net_add_act(NULL, CCR_ACT_RELU));
    EINVAL_(ccr_net_set_input_memory(NULL, CCR_INPUT_BACKEND));
    /* Communicators (ccr_comm.h). */
    EINVAL_(ccr_comm_self_init(ctx, NULL));
    EINVAL_(ccr_comm_mpi_init(ctx, NULL));
    EINVAL_(ccr_comm_nccl_init(ctx, NULL, NULL));
    ccr_comm_free(NULL);
    ck_assert_int_eq(ccr_comm_rank(NULL), 0);
    ck_assert_int_eq(ccr_comm_size(NULL), 0);
    ck_assert_str_eq(ccr_comm_name(NULL), "");
    EINVAL_(ccr_comm_set_timeout(NULL, 1.0));
    size_t cnt[1] = {0};
    EINVAL_(ccr_comm_alltoallv(NULL, NULL, cnt, cnt, NULL, cnt, cnt));
    EINVAL_(ccr_comm_alltoall_counts(NULL, cnt, cnt));
    EINVAL_(ccr_comm_alltoallv_i32(NULL, NULL, cnt, cnt, NULL, cnt, cnt));
    EINVAL_(ccr_cond_set_comm(NULL, NULL));
    EINVAL_(ccr_gate_set_comm(NULL, NULL));
    EINVAL_(ccr_net_set_comm(NULL, NULL));
    size_t own0, own1;
    EINVAL_(ccr_cond_owned(NULL, &own0, &own1));
    EINVAL_(ccr_cond_held(NULL, NULL, 0, &own0, &own1));
    EINVAL_(ccr_comm_allreduce_sum(NULL, NULL, 0));
    EINVAL_(ccr_comm_allreduce_sum_f64(NULL, NULL, 0));
    EINVAL_(ccr_comm_barrier(NULL));
    ccr_comm_stats cst;
    EINVAL_(ccr_comm_stats_get(NULL, &cst));
    ccr_comm_stats_reset(NULL);
    ccr_cond_config cfg = ccr_cond_config_default();
    EINVAL_(ccr_net_add_cond(NULL, &cfg));
    ccr_cond *cond = NULL;
    ccr_gate_stats st;
    EINVAL_(ccr_net_cond(NULL, 0, &cond, &st));
    EINVAL_(ccr_net_finalize(NULL, rng));
    size_t bytes = 0;
    EINVAL_(ccr_net_memory_bytes(NULL, &bytes));
    ck_assert_uint_eq(ccr_net_d_in(NULL), 0);
    ck_assert_uint_eq(ccr_net_d_out(NULL), 0);
    ck_assert_uint_eq(ccr_net_max_batch(NULL), 0);
    ck_assert_uint_eq(ccr_net_n_layers(NULL), 0);
    ck_assert_ptr_null(ccr_net_params(NULL));
    ck_assert_ptr_null(ccr_net_backend(NULL));
    ccr_layer_info info;
    EINVAL_(ccr_net_layer_info(NULL, 0, &info));
    ccr_flops fl = ccr_net_flops(NULL);
    ck_assert(fl.fwd == 0.0 && fl.bwd == 0.0);
    ck_assert_uint_eq(ccr_net_n_params(NULL), 0);
    const float *out = NULL;
    float x[12] = {0};
    int32_t lab[4] = {0};
    ccr_step_stats ss;
    EINVAL_(ccr_net_forward(NULL, x, 1, &out));
    EINVAL_(ccr_net_backward(NULL, x));
    EINVAL_(ccr_net_loss_grad(NULL, x, lab, 1, &ss));
    EINVAL_(ccr_net_eval(NULL, x, lab, 1, &ss));
    EINVAL_(ccr_net_save(NULL, ccr_test_path("api.net")));
    EINVAL_(ccr_net_load(NULL, ccr_test_path("api.net")));

    net = make_net(false);
    EINVAL_(ccr_net_add_cond(net, NULL));
    EINVAL_(ccr_net_finalize(net, NULL));
    EINVAL_(ccr_net_memory_bytes(net, NULL));
    ccr_net_free(net);
    net = make_net(true);
    EINVAL_(ccr_net_cond(net, 0, &cond, &st));   /* not a conditional layer */
    EINVAL_(ccr_net_cond(net, 7, &cond, &st));   /* out of range */
    EINVAL_(ccr_net_layer_info(net, 1, &info));  /* out of range */
    EINVAL_(ccr_net_layer_info(net, 0, NULL));
    EINVAL_(ccr_net_forward(net, NULL, 1, &out));
    EINVAL_(ccr_net_forward(net, x, 1, NULL));
    EINVAL_(ccr_net_backward(net, NULL));
    EINVAL_(ccr_net_loss_grad(net, NULL, lab, 1, &ss));
    EINVAL_(ccr_net_loss_grad(net, x, NULL, 1, &ss));
    EINVAL_(ccr_net_eval(net, NULL, lab, 1, &ss));
    EINVAL_(ccr_net_eval(net, x, NULL, 1, &ss));
    EINVAL_(ccr_net_save(net, NULL));
    EINVAL_(ccr_net_load(net, NULL));
    EINVAL_(ccr_net_forward_mode(NULL, x, 1, CCR_MODE_EVAL, NULL, &out));
    EINVAL_(ccr_net_forward_mode(net, x, 1, (ccr_mode)99, NULL, &out));
    EINVAL_(ccr_net_forward_mode(net, x, 1, CCR_MODE_EVAL, NULL, NULL));
    EINVAL_(ccr_net_loss_grad_mode(NULL, x, lab, 1, CCR_MODE_TRAIN, rng, &ss));
    EINVAL_(ccr_net_loss_grad_mode(net, x, lab, 1, (ccr_mode)99, rng, &ss));
    EINVAL_(ccr_net_loss_grad_mode(net, x, lab, 1, CCR_MODE_EVAL, NULL, NULL));
    ck_assert(ccr_net_aux_loss(NULL) == 0.0);
    ck_assert(ccr_net_aux_loss(net) == 0.0);   /* no forward yet */
    double norm = -1.0;
    EINVAL_(ccr_arena_grad_norm(NULL, &norm));
    EINVAL_(ccr_arena_grad_norm(ccr_net_params(net), NULL));
    EINVAL_(ccr_arena_clip_grad_norm(NULL, 1.0, &norm));
    EINVAL_(ccr_arena_clip_grad_norm(ccr_net_params(net), 0.0, &norm));
    EINVAL_(ccr_arena_clip_grad_norm(ccr_net_params(net), NAN, &norm));
    CCR_CK_OK(ctx, ccr_arena_grad_norm(ccr_net_params(net), &norm));
    ck_assert(norm == 0.0);

    ccr_optim_config oc = ccr_optim_defaults((ccr_optim_kind)99);  /* SGD defaults */
    ck_assert(oc.lr > 0.0f);
    oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    ccr_optim *opt = NULL;
    EINVAL_(ccr_optim_init(NULL, &oc, &opt));
    EINVAL_(ccr_optim_init(ccr_net_params(net), NULL, &opt));
    EINVAL_(ccr_optim_init(ccr_net_params(net), &oc, NULL));
    ccr_optim_free(NULL);
    EINVAL_(ccr_optim_step(NULL));
    EINVAL_(ccr_optim_set_lr(NULL, 0.1f));
    ck_assert(ccr_optim_last_updated(NULL) == 0);
    ck_assert(ccr_optim_flops(NULL) == 0.0);
    CCR_CK_OK(ctx, ccr_optim_init(ccr_net_params(net), &oc, &opt));
    ck_assert(ccr_optim_last_updated(opt) == 0);   /* no step yet */
    ck_assert(ccr_optim_flops(opt) == 0.0);
    EINVAL_(ccr_train_step(NULL, opt, rng, x, lab, 1, &ss));
    EINVAL_(ccr_train_step(net, NULL, rng, x, lab, 1, &ss));
    EINVAL_(ccr_train_step(net, opt, rng, NULL, lab, 1, &ss));
    EINVAL_(ccr_train_step(net, opt, rng, x, NULL, 1, &ss));
    ccr_optim_free(opt);
    ccr_net_free(net);
}
END_TEST

START_TEST(test_gates_cond)
{
    /* Gate selection, options, route counts and the Switch capacity. */
    const ccr_gate_type *gt = NULL;
    EINVAL_(ccr_gate_type_lookup(ctx, NULL, &gt));
    EINVAL_(ccr_gate_type_lookup(ctx, "topk", NULL));
    EINVAL_(ccr_gate_type_lookup(NULL, "no-such-gate", &gt));
    ck_assert_ptr_null(gt);
    ck_assert(!ccr_gate_type_uses(NULL, CCR_GATE_OPT_N_EXPERTS));
    ck_assert_ptr_null(ccr_gate_option_name((ccr_gate_option)0));
    ck_assert_ptr_null(ccr_gate_option_name((ccr_gate_option)3));   /* two bits */
    size_t cnt[2] = {0, 0};
    EINVAL_(ccr_route_counts(ctx, NULL, cnt, 2, NULL));
    ck_assert_uint_eq(ccr_switch_capacity(1.25, 0, 8), 0);
    ck_assert_uint_eq(ccr_switch_capacity(NAN, 16, 8), 0);
    ck_assert_uint_eq(ccr_switch_capacity(1.25, 16, 0), 0);
    ck_assert_int_eq(ccr_cond_config_bank(NULL), CCR_BANK_FFN);
    ck_assert_int_eq(ccr_cond_bank(NULL), CCR_BANK_FFN);
    ck_assert_ptr_nonnull(ccr_gate_types());
    ck_assert_ptr_null(ccr_gate_type_find(NULL));
    ck_assert_ptr_null(ccr_gate_type_find("no-such-gate"));
    ck_assert_ptr_nonnull(ccr_gate_type_names());
    ccr_gate_config gc = ccr_gate_config_default();
    EINVAL_(ccr_route_validate(ctx, NULL));
    ck_assert_int_eq(ccr_route_validate(NULL, NULL), CCR_EINVAL);
    ccr_gate *g = NULL;
    EINVAL_(ccr_gate_alloc(ctx, NULL, &gc, 4, &g));
    EINVAL_(ccr_gate_alloc(ctx, &ccr_gate_topk, NULL, 4, &g));
    EINVAL_(ccr_gate_alloc(ctx, &ccr_gate_topk, &gc, 4, NULL));
    ck_assert_ptr_null(g);
    ccr_gate_free(NULL);
    ck_assert_ptr_null(ccr_gate_get_type(NULL));
    ck_assert_ptr_null(ccr_gate_get_config(NULL));
    ck_assert_uint_eq(ccr_gate_n_matrices(NULL), 0);
    ck_assert_uint_eq(ccr_gate_slots(NULL), 0);
    ck_assert_uint_eq(ccr_gate_max_batch(NULL), 0);
    EINVAL_(ccr_gate_declare(NULL, NULL, ""));
    EINVAL_(ccr_gate_init_params(NULL, rng));
    ccr_route route;
    ccr_gate_stats st;
    float x[8] = {0};
    EINVAL_(ccr_gate_forward(NULL, x, 1, false, rng, &route, &st));
    EINVAL_(ccr_gate_backward(NULL, NULL));
    ck_assert(ccr_gate_flops(NULL, true) == 0.0);
    ck_assert(ccr_gate_matrices_per_example(NULL) == 0.0);
    ck_assert_uint_eq(ccr_gate_n_exports(NULL), 0);
    const char *name;
    size_t rank, shape[4];
    const float *data;
    EINVAL_(ccr_gate_get_export(NULL, 0, &name, &rank, shape, &data));
    ck_assert(ccr_cv_squared(NULL, 4) == 0.0);
    ck_assert(ccr_normal_cdf(0.0) == 0.5);
    /* A real gate: out-of-range export, NULL outputs. */
    gc.d_in = 2;
    gc.n_experts = 2;
    gc.k = 1;
    CCR_CK_OK(ctx, ccr_gate_alloc(NULL, &ccr_gate_topk, &gc, 4, &g));  /* NULL ctx */
    ck_assert_uint_eq(ccr_gate_max_batch(g), 4);
    ck_assert_int_eq(ccr_gate_get_export(g, 99, &name, &rank, shape, &data), CCR_EINVAL);
    ck_assert_int_eq(ccr_gate_forward(g, x, 1, false, rng, NULL, &st), CCR_EINVAL);
    ck_assert_int_eq(ccr_gate_forward(g, x, 1, false, rng, &route, NULL), CCR_EINVAL);
    ck_assert_int_eq(ccr_gate_declare(g, NULL, ""), CCR_EINVAL);
    ccr_gate_free(g);

    ccr_cond_config cfg = ccr_cond_config_default();
    ccr_cond *c = NULL;
    EINVAL_(ccr_cond_alloc(NULL, &cfg, 4, &c));
    EINVAL_(ccr_cond_alloc(be, NULL, 4, &c));
    EINVAL_(ccr_cond_alloc(be, &cfg, 4, NULL));
    EINVAL_(ccr_cond_alloc(be, &cfg, 4, &c));  /* no gate */
    ck_assert_ptr_null(c);
    ccr_cond_free(NULL);
    EINVAL_(ccr_cond_declare(NULL, NULL, ""));
    EINVAL_(ccr_cond_init_params(NULL, rng));
    float y[8];
    EINVAL_(ccr_cond_forward(NULL, x, 1, false, rng, y, &st));
    EINVAL_(ccr_cond_backward(NULL, x, NULL));
    ck_assert_ptr_null(ccr_cond_route(NULL));
    ck_assert_ptr_null(ccr_cond_gate(NULL));
    ck_assert_uint_eq(ccr_cond_d_in(NULL), 0);
    ck_assert_uint_eq(ccr_cond_d_out(NULL), 0);
    ck_assert_uint_eq(ccr_cond_n_params(NULL), 0);
    ck_assert_uint_eq(ccr_cond_memory_bytes(NULL), 0);
    EINVAL_(ccr_cond_set_timing(NULL, NULL));
    ck_assert_uint_eq(ccr_cond_group_threads(NULL), 0);
    ck_assert(ccr_cond_matrix_flops(NULL) == 0.0);
    ck_assert(ccr_cond_flops(NULL, false) == 0.0);
    ck_assert(ccr_cond_flops_bwd(NULL, true) == 0.0);
    /* A real layer with NULL arguments. */
    cfg.gate = &ccr_gate_topk;
    cfg.gate_cfg = gc;
    cfg.d_in = cfg.d_out = 2;
    cfg.hidden = 2;
    CCR_CK_OK(ctx, ccr_cond_alloc(be, &cfg, 4, &c));
    EINVAL_(ccr_cond_declare(c, NULL, ""));
    EINVAL_(ccr_cond_forward(c, NULL, 1, false, rng, y, &st));
    EINVAL_(ccr_cond_forward(c, x, 1, false, rng, NULL, &st));
    EINVAL_(ccr_cond_backward(c, NULL, NULL));
    ccr_cond_free(c);
}
END_TEST

static Suite *api_suite(void)
{
    Suite *s = suite_create("api");
    TCase *tc = tcase_create("null-handles");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_core);
    tcase_add_test(tc, test_backend);
    tcase_add_test(tc, test_arena);
    tcase_add_test(tc, test_safetensors_jsonl);
    tcase_add_test(tc, test_data);
    tcase_add_test(tc, test_nn);
    tcase_add_test(tc, test_gates_cond);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return ccr_test_run(api_suite()); }
