/*
 * test_cond_ep.c - expert parallelism (ccr_cond_set_comm) against one
 * process with the global batch.
 *
 * On every rank: the reference layer (no communicator) runs the whole
 * global batch; the expert-parallel layer, built from the same seed, runs
 * this rank's slice of it (uneven slices in rank order).  For every gate
 * (FFN and linear banks, eval and training mode, the noisy gates' noise
 * included) the test checks, bit for bit: the initial values of this
 * rank's matrices and of the gate; the outputs and dL/dx of the slice; the
 * gradients of this rank's matrices; the RNG's state after the forward
 * (each rank discards the other ranks' noise as one process draws it).  The
 * replicated gate's gradients, summed over the ranks, equal the
 * reference's to float rounding (normalised error below 1e-10: the sum's
 * order differs).  First with the auxiliary losses off and a Switch
 * capacity that holds every example; then, for the gates whose statistics
 * are global (dense, topk, hmoe, switch), with the losses on and Switch dropping
 * examples: the same outputs bit for bit, the losses and CVs to 1e-12, the
 * same drops, dx to float rounding.  Configurations with fewer matrices
 * than ranks leave ranks owning none.
 *
 * Plain: one process through the self communicator; under mpirun
 * (tests/mpi_run.sh, meson tests cond_ep_np1 .. np4): MPI.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ccr_config.h"  // provides: CCR_HAVE_MPI
#include "ccr_test.h"
#if CCR_HAVE_MPI
#include <mpi.h>
#endif

static ccr_ctx *ctx;
static ccr_backend *be;
static ccr_comm *comm;

typedef struct ep_case {
    const char *gate;
    size_t E, k, groups, k_groups, k2, depth;
    ccr_bank_kind bank;
    bool residual;
    bool ste, leaf;   /* signtree: straight-through backward, leaf combine */
} ep_case;

static const ep_case cases[] = {
    {"none", 1, 1, 0, 0, 0, 0, CCR_BANK_FFN, false, false, false},
    {"dense", 5, 5, 0, 0, 0, 0, CCR_BANK_FFN, true, false, false},
    {"topk", 7, 2, 0, 0, 0, 0, CCR_BANK_FFN, false, false, false},
    {"topk", 3, 1, 0, 0, 0, 0, CCR_BANK_LINEAR, true, false, false},  /* E < P: idle ranks */
    {"hmoe", 12, 0, 4, 2, 2, 0, CCR_BANK_FFN, false, false, false},
    {"switch", 6, 1, 0, 0, 0, 0, CCR_BANK_FFN, false, false, false},
    {"signtree", 0, 0, 0, 0, 0, 3, CCR_BANK_LINEAR, false, false, false},
    {"signtree", 0, 0, 0, 0, 0, 3, CCR_BANK_LINEAR, false, true, false},
    {"signtree", 0, 0, 0, 0, 0, 4, CCR_BANK_FFN, false, true, true},
};
enum { N_CASES = sizeof cases / sizeof cases[0] };

static ccr_cond_config make_config(const ep_case *t)
{
    ccr_cond_config cc = ccr_cond_config_default();
    cc.gate_name = t->gate;
    cc.d_in = 9, cc.d_out = 9, cc.hidden = 11;
    cc.bank = t->bank;
    cc.residual = t->residual;
    ccr_gate_config *g = &cc.gate_cfg;
    g->randomize = true;
    if (t->E)
        g->n_experts = t->E;
    if (t->k)
        g->k = t->k;
    if (t->groups)
        g->n_groups = t->groups, g->k_groups = t->k_groups, g->k2 = t->k2;
    if (t->depth) {
        g->depth = t->depth;
        g->grad_mode = t->ste ? CCR_GRAD_STE : CCR_GRAD_NONE;
        g->combine = t->leaf ? CCR_COMBINE_LEAF : CCR_COMBINE_PATH;
    }
    g->w_importance = g->w_load = g->aux_alpha = g->z_loss = 0.0;
    g->capacity_factor = 64.0;  /* every example fits: no drops, as in one process */
    g->eval_capacity_factor = 0.0;
    return cc;
}

/* A layer with its own arena, initialised from seed; comm NULL: reference. */
static void build(const ccr_cond_config *cc, size_t max_batch, ccr_comm *cm, unsigned long seed,
                  ccr_cond **c, ccr_arena **a)
{
    CCR_CK_OK(ctx, ccr_cond_alloc(be, cc, max_batch, c));
    if (cm != NULL)
        CCR_CK_OK(ctx, ccr_cond_set_comm(*c, cm));
    CCR_CK_OK(ctx, ccr_arena_init(be, a));
    /* A tensor of the rest of the network: a rank that owns no matrix of a
     * gate without parameters (none) would otherwise have an empty arena. */
    size_t one = 1, idx;
    CCR_CK_OK(ctx, ccr_arena_add(*a, "other", 1, &one, &idx));
    CCR_CK_OK(ctx, ccr_cond_declare(*c, *a, "moe."));
    CCR_CK_OK(ctx, ccr_arena_finalize(*a));
    gsl_rng *g = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(g, seed);
    CCR_CK_OK(ctx, ccr_cond_init_params(*c, g));
    gsl_rng_free(g);
}

/* The bank's tensors (cond.c's names under "moe."), not the gate's. */
static bool is_bank(const char *name)
{
    static const char *const bank[] = {"moe.experts.w1", "moe.experts.b1", "moe.experts.w2",
                                       "moe.experts.b2", "moe.experts.w", "moe.experts.b",
                                       "moe.tree.w1", "moe.tree.b1", "moe.tree.w2",
                                       "moe.tree.b2", "moe.tree.w", "moe.tree.b"};
    for (size_t i = 0; i < sizeof bank / sizeof bank[0]; i++)
        if (strcmp(name, bank[i]) == 0)
            return true;
    return false;
}

/* One comparison; aux: the auxiliary losses on (gates with global
 * statistics), Switch at capacity factor 1 (examples dropped). */
static void ep_check(const ep_case *t, bool train, bool aux)
{
    const int P = ccr_comm_size(comm), r = ccr_comm_rank(comm);
    const size_t B = 23, d = 9;
    const size_t b0 = B * (size_t)r / (size_t)P, b1 = B * (size_t)(r + 1) / (size_t)P;
    ccr_cond_config cc = make_config(t);
    if (aux) {
        ccr_gate_config *gc = &cc.gate_cfg;
        gc->w_importance = 0.1, gc->w_load = 0.1, gc->aux_alpha = 0.01, gc->z_loss = 1e-3;
        gc->capacity_factor = 1.0;
    }
    ccr_cond *ref, *ep;
    ccr_arena *aref, *aep;
    build(&cc, B, NULL, 17, &ref, &aref);
    build(&cc, b1 - b0, comm, 17, &ep, &aep);
    /* The rows held here: a block of matrices, or the path tree's replicated
     * top levels and prefix subtrees; every matrix somewhere. */
    size_t n_held, n_rep;
    CCR_CK_OK(ctx, ccr_cond_held(ep, NULL, 0, &n_held, &n_rep));
    size_t *held = malloc((n_held + 1) * sizeof *held);
    CCR_CK_OK(ctx, ccr_cond_held(ep, held, n_held, &n_held, &n_rep));
    if (n_held > 0)  /* too little room: refused */
        CCR_CK_STATUS(ctx, ccr_cond_held(ep, held, n_held - 1, &n_held, &n_rep), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_cond_held(ep, NULL, 0, NULL, &n_rep), CCR_EINVAL);
    const bool path_tree = t->depth > 0 && !t->leaf;
    size_t want_rep = 0;
    while (path_tree && ((size_t)1 << want_rep) < (size_t)P && want_rep < t->depth)
        want_rep++;
    ck_assert_uint_eq(n_rep, ((size_t)1 << want_rep) - 1);
    double own = (double)(n_held - n_rep);
    CCR_CK_OK(ctx, ccr_comm_allreduce_sum_f64(comm, &own, 1));
    ck_assert_uint_eq((size_t)own + n_rep, ccr_gate_n_matrices(ccr_cond_gate(ref)));
    if (n_rep == 0) {
        size_t m0, m1;
        CCR_CK_OK(ctx, ccr_cond_owned(ep, &m0, &m1));
        ck_assert_uint_eq(m1 - m0, n_held);
        for (size_t k = 0; k < n_held; k++)
            ck_assert_uint_eq(held[k], m0 + k);
    } else {
        size_t m0, m1;
        CCR_CK_STATUS(ctx, ccr_cond_owned(ep, &m0, &m1), CCR_EUNSUP);
    }
    /* Replicated matrices run on each rank's own rows: outputs and dx to
     * float rounding; everything else bit for bit. */
    const bool exact = n_rep == 0;

    float x[23 * 9], dy[23 * 9], y_ref[23 * 9], dx_ref[23 * 9], y[23 * 9], dx[23 * 9];
    gsl_rng *g = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(g, 5);
    ccr_test_fill_uniform(g, x, B * d, -1.5f, 1.5f);
    ccr_test_fill_uniform(g, dy, B * d, -1, 1);
    gsl_rng *n_ref = gsl_rng_alloc(gsl_rng_mt19937), *n_ep = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(n_ref, 99);
    gsl_rng_set(n_ep, 99);
    ccr_gate_stats st, st_ref;
    CCR_CK_OK(ctx, ccr_cond_forward(ref, x, B, train, n_ref, y_ref, &st_ref));
    CCR_CK_OK(ctx, ccr_cond_backward(ref, dy, dx_ref));
    CCR_CK_OK(ctx, ccr_cond_forward(ep, x + b0 * d, b1 - b0, train, n_ep, y, &st));
    CCR_CK_OK(ctx, ccr_cond_backward(ep, dy + b0 * d, dx));
    if (exact)
        ck_assert_msg(memcmp(y, y_ref + b0 * d, (b1 - b0) * d * sizeof *y) == 0,
                      "%s train=%d rank %d: outputs differ", t->gate, train, r);
    else
        ccr_test_assert_nmse(y, y_ref + b0 * d, (b1 - b0) * d, 1e-12, "y (replicated top)");
    if (!exact && !aux) {
        ccr_test_assert_nmse(dx, dx_ref + b0 * d, (b1 - b0) * d, 1e-12, "dx (replicated top)");
    } else if (!aux && !(t->ste && train)) {
        ck_assert_msg(memcmp(dx, dx_ref + b0 * d, (b1 - b0) * d * sizeof *dx) == 0,
                      "%s train=%d rank %d: dx differs", t->gate, train, r);
    } else if (!aux) {
        /* The straight-through dots are evaluated on the owners, in other
         * GEMM groupings than one process's: dx to float rounding. */
        ccr_test_assert_nmse(dx, dx_ref + b0 * d, (b1 - b0) * d, 1e-12, "dx (ste)");
    } else {
        /* Global sums of the statistics: the losses to double rounding, dx
         * (through the aux losses' gradients) to float rounding. */
        ccr_test_assert_nmse(dx, dx_ref + b0 * d, (b1 - b0) * d, 1e-12, "dx (aux)");
        ck_assert_msg(fabs(st.aux_loss - st_ref.aux_loss) <= 1e-12 * fabs(st_ref.aux_loss),
                      "%s: aux loss %.17g vs %.17g", t->gate, st.aux_loss, st_ref.aux_loss);
        ck_assert(fabs(st.cv_importance - st_ref.cv_importance) <=
                  1e-12 * fabs(st_ref.cv_importance) + 1e-15);
        ck_assert_uint_eq(st.dropped, st_ref.dropped);
    }
    /* Every gate's load statistics are the global batch's on every rank. */
    ck_assert_msg(fabs(st.cv_load_count - st_ref.cv_load_count) <=
                          1e-12 * fabs(st_ref.cv_load_count) + 1e-15 &&
                      fabs(st.max_mean_count - st_ref.max_mean_count) <=
                          1e-12 * fabs(st_ref.max_mean_count) + 1e-15,
                  "%s train=%d rank %d: statistics %.17g %.17g, one process %.17g %.17g",
                  t->gate, train, r, st.cv_load_count, st.max_mean_count,
                  st_ref.cv_load_count, st_ref.max_mean_count);
    ck_assert_msg(gsl_rng_get(n_ref) == gsl_rng_get(n_ep), "%s: the RNGs diverged", t->gate);

    /* Parameters and gradients, tensor by tensor. */
    for (size_t i = 0; i < ccr_arena_count(aep); i++) {
        const char *name = ccr_arena_name(aep, i);
        size_t j, n = ccr_arena_size(aep, i);
        CCR_CK_OK(ctx, ccr_arena_find(aref, name, &j));
        const float *v = ccr_arena_value(aep, i), *gr = ccr_arena_grad(aep, i);
        const float *vr = ccr_arena_value(aref, j), *gref = ccr_arena_grad(aref, j);
        if (is_bank(name)) {
            size_t row = ccr_arena_size(aref, j) / ccr_arena_shape(aref, j)[0];
            ck_assert_uint_eq(n, n_held * row);
            for (size_t k = 0; k < n_held; k++) {
                const float *vk = v + k * row, *gk = gr + k * row;
                const float *vrk = vr + held[k] * row, *grk = gref + held[k] * row;
                ck_assert_msg(memcmp(vk, vrk, row * sizeof *v) == 0, "%s: values", name);
                if (k < n_rep)  /* summed over the ranks */
                    ccr_test_assert_nmse(gk, grk, row, 1e-12, "replicated bank gradient");
                else
                    ck_assert_msg(memcmp(gk, grk, row * sizeof *gr) == 0,
                                  "%s train=%d rank %d: bank gradient of matrix %zu differs",
                                  name, train, r, held[k]);
            }
        } else {
            ck_assert_uint_eq(n, ccr_arena_size(aref, j));
            ck_assert_msg(memcmp(v, vr, n * sizeof *v) == 0, "%s: values", name);
            float *sum = malloc(n * sizeof *sum);
            memcpy(sum, gr, n * sizeof *sum);
            CCR_CK_OK(ctx, ccr_comm_allreduce_sum(comm, sum, n));
            ccr_test_assert_nmse(sum, gref, n, 1e-10, name);
            free(sum);
        }
    }
    free(held);
    gsl_rng_free(g), gsl_rng_free(n_ref), gsl_rng_free(n_ep);
    ccr_cond_free(ref), ccr_cond_free(ep);
    ccr_arena_free(aref), ccr_arena_free(aep);
}

START_TEST(test_ep_parity)
{
    ep_check(&cases[_i / 2], _i % 2 == 1, false);
}
END_TEST

/* The gates whose statistics are global (dense, topk, hmoe, switch) with their
 * auxiliary losses on, in both modes; Switch drops examples. */
START_TEST(test_ep_parity_aux)
{
    static const size_t with_comm[] = {1, 2, 3, 4, 5};  /* dense, topk x2, hmoe, switch */
    ep_check(&cases[with_comm[_i / 2]], _i % 2 == 1, true);
}
END_TEST

#if CCR_HAVE_MPI
/* A whole network trained with ccr_train_step (Adam, three steps) and then
 * evaluated: the expert-parallel replicas (ccr_net_set_comm, each rank its
 * slice of every batch) against one process with the global batch.  Losses
 * and accuracy are global on every rank; the parameters stay equal to the
 * single process's to float rounding (replicated ones everywhere, the
 * bank's rows on their owners), and the replicas stay bit-identical. */
/* 9 -> linear 8 -> relu -> conditional 8 (variant 0: topk E = 7, k = 2
 * with its losses; 1: the path tree of depth 3) -> linear 3, on comm's
 * ranks or (cm NULL) in one process. */
static ccr_net *ep_net_build(ccr_comm *cm, size_t max_batch, int variant)
{
    ccr_net *net;
    gsl_rng *g = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(g, 3);
    CCR_CK_OK(ctx, ccr_net_init(be, 9, max_batch, &net));
    if (cm != NULL)
        CCR_CK_OK(ctx, ccr_net_set_comm(net, cm));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 8));
    CCR_CK_OK(ctx, ccr_net_add_act(net, CCR_ACT_RELU));
    ccr_cond_config cc = make_config(&cases[variant == 0 ? 2 : 6]);
    if (variant == 0)
        cc.gate_cfg.w_importance = cc.gate_cfg.w_load = 0.1;
    cc.d_out = 8;
    CCR_CK_OK(ctx, ccr_net_add_cond(net, &cc));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 3));
    CCR_CK_OK(ctx, ccr_net_finalize(net, g));
    gsl_rng_free(g);
    return net;
}

/* Checkpoints under a communicator: the expert-parallel network `ep` saved
 * (collective; rank 0 writes the file one process would) loads into one
 * process's network, whose tensors equal `one`'s to float rounding and the
 * rows held here bit for bit, and back into an expert-parallel network bit
 * for bit. */
static void ep_checkpoint(ccr_net *ep, const ccr_net *one, int variant, size_t B, size_t share)
{
    char path[512];
    if (ccr_comm_rank(comm) == 0)
        snprintf(path, sizeof path, "%s", ccr_test_path("ep_net.safetensors"));
    MPI_Bcast(path, sizeof path, MPI_CHAR, 0, MPI_COMM_WORLD);
    CCR_CK_OK(ctx, ccr_net_save(ep, path));
    /* A file rank 0 cannot write: the same error on every rank. */
    int bad = (int)ccr_net_save(ep, "/nonexistent-ccr-dir/ep.safetensors"), bad0 = bad;
    MPI_Bcast(&bad0, 1, MPI_INT, 0, MPI_COMM_WORLD);
    ck_assert_int_ne(bad, CCR_OK);
    ck_assert_int_eq(bad, bad0);
    ccr_net *whole = ep_net_build(NULL, B, variant), *back = ep_net_build(comm, share, variant);
    CCR_CK_OK(ctx, ccr_net_load(whole, path));
    CCR_CK_OK(ctx, ccr_net_load(back, path));
    const ccr_arena *a_ep = ccr_net_params(ep), *a_back = ccr_net_params(back);
    const ccr_arena *a_one = ccr_net_params(one), *a_whole = ccr_net_params(whole);
    ck_assert_uint_eq(ccr_arena_count(a_back), ccr_arena_count(a_ep));
    for (size_t i = 0; i < ccr_arena_count(a_ep); i++) {
        size_t n = ccr_arena_size(a_ep, i);
        ck_assert_uint_eq(ccr_arena_size(a_back, i), n);
        ck_assert_msg(memcmp(ccr_arena_value(a_back, i), ccr_arena_value(a_ep, i),
                             n * sizeof(float)) == 0, "%s: not restored", ccr_arena_name(a_ep, i));
    }
    ck_assert_uint_eq(ccr_arena_count(a_whole), ccr_arena_count(a_one));
    for (size_t j = 0; j < ccr_arena_count(a_one); j++) {
        const char *name = ccr_arena_name(a_one, j);
        ck_assert_str_eq(ccr_arena_name(a_whole, j), name);
        ccr_test_assert_nmse(ccr_arena_value(a_whole, j), ccr_arena_value(a_one, j),
                             ccr_arena_size(a_one, j), 1e-10, name);
    }
    ccr_cond *c;
    CCR_CK_OK(ctx, ccr_net_cond(ep, 2, &c, NULL));
    size_t held[16], n_held, n_rep, j, row;
    CCR_CK_OK(ctx, ccr_cond_held(c, held, 16, &n_held, &n_rep));
    for (size_t i = 0; i < ccr_arena_count(a_ep) && n_held > 0; i++) {
        const char *name = ccr_arena_name(a_ep, i);
        CCR_CK_OK(ctx, ccr_arena_find(a_whole, name, &j));
        if (ccr_arena_size(a_whole, j) == ccr_arena_size(a_ep, i))
            continue;  /* not a bank */
        row = ccr_arena_size(a_whole, j) / ccr_arena_shape(a_whole, j)[0];
        for (size_t k = 0; k < n_held; k++)
            ck_assert_msg(memcmp(ccr_arena_value(a_whole, j) + held[k] * row,
                                 ccr_arena_value(a_ep, i) + k * row, row * sizeof(float)) == 0,
                          "%s: matrix %zu in the file differs", name, held[k]);
    }
    ccr_net_free(whole);
    ccr_net_free(back);
    MPI_Barrier(MPI_COMM_WORLD);
    if (ccr_comm_rank(comm) == 0)
        remove(path);
}

START_TEST(test_ep_net)
{
    const int P = ccr_comm_size(comm), r = ccr_comm_rank(comm);
    const size_t B = 23, d = 9, classes = 3;
    const size_t b0 = B * (size_t)r / (size_t)P, b1 = B * (size_t)(r + 1) / (size_t)P;
    ccr_net *nets[2];
    ccr_optim *opts[2];
    for (int k = 0; k < 2; k++) {
        nets[k] = ep_net_build(k == 1 ? comm : NULL, k == 0 ? B : b1 - b0, _i);
        ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
        oc.lr = 1e-2f;
        CCR_CK_OK(ctx, ccr_optim_init(ccr_net_params(nets[k]), &oc, &opts[k]));
    }
    float x[23 * 9];
    int32_t y[23];
    gsl_rng *g = gsl_rng_alloc(gsl_rng_mt19937), *n0 = gsl_rng_alloc(gsl_rng_mt19937),
            *n1 = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(n0, 8), gsl_rng_set(n1, 8);
    for (int step = 0; step < 3; step++) {
        gsl_rng_set(g, 40 + (unsigned long)step);
        ccr_test_fill_uniform(g, x, B * d, -2, 2);
        for (size_t i = 0; i < B; i++)
            y[i] = (int32_t)(gsl_rng_get(g) % classes);
        ccr_step_stats s0, s1;
        CCR_CK_OK(ctx, ccr_train_step(nets[0], opts[0], n0, x, y, B, &s0));
        CCR_CK_OK(ctx, ccr_train_step(nets[1], opts[1], n1, x + b0 * d, y + b0, b1 - b0, &s1));
        ck_assert_uint_eq(s1.batch, B);
        ck_assert_uint_eq(s1.correct, s0.correct);
        ck_assert_msg(fabs(s1.loss - s0.loss) <= 1e-6 * fabs(s0.loss), "step %d: loss %.9g "
                      "vs %.9g", step, s1.loss, s0.loss);
        ck_assert_msg(fabs(s1.aux_loss - s0.aux_loss) <= 1e-6 * fabs(s0.aux_loss) + 1e-12,
                      "step %d: aux %.9g vs %.9g", step, s1.aux_loss, s0.aux_loss);
    }
    const ccr_arena *a0 = ccr_net_params(nets[0]), *a1 = ccr_net_params(nets[1]);
    for (size_t i = 0; i < ccr_arena_count(a1); i++) {
        const char *name = ccr_arena_name(a1, i);
        size_t j, n = ccr_arena_size(a1, i);
        CCR_CK_OK(ctx, ccr_arena_find(a0, name, &j));
        const char *tail = strrchr(name, '.');
        bool bank = strstr(name, "experts.") != NULL ||
                    (strstr(name, ".tree.") != NULL && tail != NULL &&
                     (tail[1] == 'w' || tail[1] == 'b') &&
                     (tail[2] == '\0' || tail[2] == '1' || tail[2] == '2'));  /* w, b1, ... */
        if (bank) {
            /* The bank's rows held here against one process's rows; the
             * replicated ones (the tree's top) the same bits everywhere. */
            ccr_cond *c;
            CCR_CK_OK(ctx, ccr_net_cond(nets[1], 2, &c, NULL));
            size_t held[16], n_held, n_rep;
            CCR_CK_OK(ctx, ccr_cond_held(c, held, 16, &n_held, &n_rep));
            size_t row = ccr_arena_size(a0, j) / ccr_arena_shape(a0, j)[0];
            for (size_t k = 0; k < n_held; k++)
                ccr_test_assert_nmse(ccr_arena_value(a1, i) + k * row,
                                     ccr_arena_value(a0, j) + held[k] * row, row, 1e-10, name);
            float *v = malloc((n_rep * row + 1) * sizeof *v);
            memcpy(v, ccr_arena_value(a1, i), n_rep * row * sizeof *v);
            MPI_Bcast(v, (int)(n_rep * row), MPI_FLOAT, 0, MPI_COMM_WORLD);
            ck_assert_msg(memcmp(v, ccr_arena_value(a1, i), n_rep * row * sizeof *v) == 0,
                          "%s: replicated rows differ between ranks", name);
            free(v);
            continue;
        } else {
            /* replicated: the same bits on every rank */
            float *v = malloc(n * sizeof *v);
            memcpy(v, ccr_arena_value(a1, i), n * sizeof *v);
            MPI_Bcast(v, (int)n, MPI_FLOAT, 0, MPI_COMM_WORLD);
            ck_assert_msg(memcmp(v, ccr_arena_value(a1, i), n * sizeof *v) == 0,
                          "%s: replicas differ", name);
            free(v);
        }
        ccr_test_assert_nmse(ccr_arena_value(a1, i), ccr_arena_value(a0, j), n, 1e-10, name);
    }
    ccr_step_stats e0, e1;
    CCR_CK_OK(ctx, ccr_net_eval(nets[0], x, y, B, &e0));
    CCR_CK_OK(ctx, ccr_net_eval(nets[1], x + b0 * d, y + b0, b1 - b0, &e1));
    ck_assert_uint_eq(e1.batch, B);
    ck_assert_uint_eq(e1.correct, e0.correct);
    ck_assert(fabs(e1.loss - e0.loss) <= 1e-6 * fabs(e0.loss));
    ep_checkpoint(nets[1], nets[0], _i, B, b1 - b0);
    gsl_rng_free(g), gsl_rng_free(n0), gsl_rng_free(n1);
    for (int k = 0; k < 2; k++) {
        ccr_optim_free(opts[k]);
        ccr_net_free(nets[k]);
    }
}
END_TEST
#endif

/* What expert parallelism refuses: a layer's communicator after declare or
 * twice, a gate type without set_comm, a network's after finalize or twice;
 * and the owned range of a plain layer is everything. */
START_TEST(test_ep_errors)
{
    ccr_cond_config cc = make_config(&cases[2]);
    ccr_cond *c;
    ccr_arena *a;
    build(&cc, 4, NULL, 1, &c, &a);
    size_t m0, m1;
    CCR_CK_OK(ctx, ccr_cond_owned(c, &m0, &m1));
    ck_assert(m0 == 0 && m1 == 7);
    CCR_CK_STATUS(ctx, ccr_cond_set_comm(c, comm), CCR_EINVAL);  /* after declare */
    ccr_cond_free(c);
    ccr_arena_free(a);
    CCR_CK_OK(ctx, ccr_cond_alloc(be, &cc, 4, &c));
    CCR_CK_OK(ctx, ccr_cond_set_comm(c, comm));
    CCR_CK_STATUS(ctx, ccr_cond_set_comm(c, comm), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_cond_set_comm(c, NULL), CCR_EINVAL);
    ccr_cond_free(c);
    /* A gate type without set_comm (a user's; every built-in gate has one)
     * would keep per-rank statistics: refused alone. */
    ccr_gate_config gc = ccr_gate_config_default();
    gc.d_in = 4;
    ccr_gate *g;
    ccr_gate_type plain = *ccr_gate_type_find("none");
    plain.set_comm = NULL;
    CCR_CK_OK(ctx, ccr_gate_alloc(ctx, &plain, &gc, 4, &g));
    CCR_CK_STATUS(ctx, ccr_gate_set_comm(g, comm), CCR_EUNSUP);
    ccr_gate_free(g);
    /* A network: the communicator before finalize, once. */
    ccr_net *net;
    gsl_rng *rg = gsl_rng_alloc(gsl_rng_mt19937);
    CCR_CK_OK(ctx, ccr_net_init(be, 4, 4, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 3));
    CCR_CK_OK(ctx, ccr_net_set_comm(net, comm));
    CCR_CK_STATUS(ctx, ccr_net_set_comm(net, comm), CCR_EINVAL);
    ccr_net_free(net);
    CCR_CK_OK(ctx, ccr_net_init(be, 4, 4, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, 3));
    CCR_CK_OK(ctx, ccr_net_finalize(net, rg));
    CCR_CK_STATUS(ctx, ccr_net_set_comm(net, comm), CCR_EINVAL);
    ccr_net_free(net);
    gsl_rng_free(rg);
}
END_TEST

int main(int argc, char **argv)
{
    (void)argc, (void)argv;
    bool under_mpirun = getenv("OMPI_COMM_WORLD_SIZE") != NULL;
#if CCR_HAVE_MPI
    if (under_mpirun && MPI_Init(&argc, &argv) != MPI_SUCCESS)
        return 1;
#else
    if (under_mpirun) {
        printf("test_cond_ep: skipped: built without MPI\n");
        return 77;
    }
#endif
    setvbuf(stdout, NULL, _IONBF, 0);  /* each rank's report before any abort */
    if (ccr_ctx_init(&ctx) != CCR_OK || ccr_backend_cpu_init(ctx, &be) != CCR_OK)
        return 1;
    ccr_status s = under_mpirun ? ccr_comm_mpi_init(ctx, &comm) : ccr_comm_self_init(ctx, &comm);
    if (s != CCR_OK) {
        fprintf(stderr, "test_cond_ep: %s\n", ccr_ctx_errmsg(ctx));
        return 1;
    }
    ccr_comm_set_timeout(comm, 60.0);
    Suite *su = suite_create("cond_ep");
    TCase *tc = tcase_create("cond_ep");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_ep_parity, 0, 2 * N_CASES);
    tcase_add_loop_test(tc, test_ep_parity_aux, 0, 10);
    tcase_add_test(tc, test_ep_errors);
#if CCR_HAVE_MPI
    if (under_mpirun)
        tcase_add_loop_test(tc, test_ep_net, 0, 2);
#endif
    suite_add_tcase(su, tc);
    SRunner *sr = srunner_create(su);
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    ccr_comm_free(comm);
#if CCR_HAVE_MPI
    if (under_mpirun)
        MPI_Finalize();
#endif
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
    return failed == 0 ? 0 : 1;
}
