/*
 * test_train_api.c - the network-level training API (ccr_nn.h: ccr_mode,
 * ccr_net_forward_mode, ccr_net_loss_grad_mode, ccr_net_aux_loss;
 * ccr_arena.h: ccr_arena_grad_norm, ccr_arena_clip_grad_norm):
 *   - a hand-written loop (zero, loss_grad_mode, clip, optimiser step)
 *     reproduces ccr_train_step bit for bit from the same seeds;
 *   - training mode differs from evaluation mode when a gate draws noise,
 *     and not for a plain MLP;
 *   - the auxiliary loss's gradient, taken through ccr_net_backward with a
 *     zero task gradient, matches central finite differences of
 *     ccr_net_aux_loss over the gate's and the preceding layer's parameters;
 *   - clipping scales to the requested norm, and refuses bad arguments and
 *     non-finite gradients without touching them.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ccr_test.h"

#define D_IN 6
#define D_H 8
#define D_OUT 3
#define BATCH 16
#define STEPS 12

static ccr_ctx *ctx;
static ccr_backend *be;
static float xs[STEPS][BATCH * D_IN];
static int32_t ys[STEPS][BATCH];

static void setup(void)
{
    ck_assert_int_eq(ccr_ctx_init(&ctx), CCR_OK);
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    gsl_rng *r = ccr_test_rng(1234);
    for (size_t s = 0; s < STEPS; s++) {
        ccr_test_fill_uniform(r, xs[s], BATCH * D_IN, -1, 1);
        for (size_t b = 0; b < BATCH; b++)
            ys[s][b] = (int32_t)((xs[s][b * D_IN] > 0) + (xs[s][b * D_IN + 1] > 0.3f));
    }
    gsl_rng_free(r);
}

static void teardown(void)
{
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
}

/* D_IN -> linear D_H -> tanh -> cond(gate) -> D_OUT, or a plain MLP when gate is
 * NULL; parameters drawn from seed. */
static ccr_net *build(const char *gate, unsigned long seed)
{
    ccr_net *net;
    CCR_CK_OK(ctx, ccr_net_init(be, D_IN, BATCH, &net));
    CCR_CK_OK(ctx, ccr_net_add_linear(net, D_H));
    CCR_CK_OK(ctx, ccr_net_add_act(net, CCR_ACT_TANH));
    if (gate != NULL) {
        ccr_cond_config c = ccr_cond_config_default();
        c.gate = ccr_gate_type_find(gate);
        ck_assert_ptr_nonnull(c.gate);
        c.gate_cfg.n_experts = 4;
        c.gate_cfg.k = 2;
        if (strcmp(gate, "hmoe") == 0) {  /* 2 groups of 2; 1 group, 1 expert each */
            c.gate_cfg.n_groups = 2;
            c.gate_cfg.k = 1;
            c.gate_cfg.k2 = 1;
        }
        c.gate_cfg.randomize = true;
        c.gate_cfg.w_importance = 0.5;
        c.gate_cfg.w_load = 0.5;
        c.gate_cfg.aux_alpha = 0.1;
        c.gate_cfg.z_loss = 0.05;
        c.gate_cfg.capacity_factor = 2.0;
        c.hidden = 5;
        c.d_out = D_OUT;
        CCR_CK_OK(ctx, ccr_net_add_cond(net, &c));
    } else {
        CCR_CK_OK(ctx, ccr_net_add_linear(net, D_OUT));
    }
    gsl_rng *r = ccr_test_rng(seed);
    CCR_CK_OK(ctx, ccr_net_finalize(net, r));
    gsl_rng_free(r);
    return net;
}

/* Trains STEPS steps with ccr_train_step (manual == false) or with the
 * hand-written loop, clipping at clip (0: no clipping call at all); returns
 * a copy of the final parameter block, losses in loss[]. */
static float *train(const char *gate, bool manual, double clip, double *loss, double *norms)
{
    ccr_net *net = build(gate, 7);
    ccr_arena *p = ccr_net_params(net);
    ccr_optim *o;
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    oc.lr = 0.01f;
    CCR_CK_OK(ctx, ccr_optim_init(p, &oc, &o));
    gsl_rng *r = ccr_test_rng(99);
    for (size_t s = 0; s < STEPS; s++) {
        ccr_step_stats st;
        if (!manual) {
            CCR_CK_OK(ctx, ccr_train_step(net, o, r, xs[s], ys[s], BATCH, &st));
        } else {
            CCR_CK_OK(ctx, ccr_arena_zero_grad(p));
            CCR_CK_OK(ctx, ccr_net_loss_grad_mode(net, xs[s], ys[s], BATCH, CCR_MODE_TRAIN, r,
                                                  &st));
            ck_assert_double_eq(st.aux_loss, ccr_net_aux_loss(net));
            if (clip > 0.0) {
                double before, after;
                CCR_CK_OK(ctx, ccr_arena_clip_grad_norm(p, clip, &before));
                CCR_CK_OK(ctx, ccr_arena_grad_norm(p, &after));
                if (norms != NULL)
                    norms[s] = before;
                ck_assert_msg(after <= fmin(before, clip) * (1 + 1e-6),
                              "norm %g -> %g, clip %g", before, after, clip);
                if (before > clip)
                    ck_assert_msg(fabs(after - clip) <= 1e-5 * clip, "clipped to %g", after);
                else
                    ck_assert_double_eq(after, before);
            }
            CCR_CK_OK(ctx, ccr_optim_step(o));
        }
        loss[s] = st.loss + st.aux_loss;
    }
    size_t n = ccr_arena_block_len(p);
    float *v = malloc(n * sizeof *v);
    memcpy(v, ccr_arena_values(p), n * sizeof *v);
    gsl_rng_free(r);
    ccr_optim_free(o);
    ccr_net_free(net);
    return v;
}

static const char *const gates[] = {"topk", "switch", "hmoe", NULL};

START_TEST(manual_loop_is_train_step)
{
    const char *gate = gates[_i];
    double la[STEPS], lb[STEPS], lc[STEPS], norms[STEPS];
    float *a = train(gate, false, 0.0, la, NULL);
    float *b = train(gate, true, 0.0, lb, NULL);
    /* A clip far above every norm runs the clipping code without scaling. */
    float *c = train(gate, true, 1e30, lc, norms);
    ccr_net *shape = build(gate, 7);
    size_t n = ccr_arena_block_len(ccr_net_params(shape));
    ccr_net_free(shape);
    ck_assert_msg(memcmp(la, lb, sizeof la) == 0, "%s: losses differ", gate);
    ck_assert_msg(memcmp(la, lc, sizeof la) == 0, "%s: losses differ (clip)", gate);
    ck_assert_msg(memcmp(a, b, n * sizeof *a) == 0, "%s: parameters differ", gate);
    ck_assert_msg(memcmp(a, c, n * sizeof *a) == 0, "%s: parameters differ (clip)", gate);
    for (size_t s = 0; s < STEPS; s++)
        ck_assert(norms[s] > 0.0 && isfinite(norms[s]));
    free(a);
    free(b);
    free(c);
    /* A clip below the norms changes the trajectory (the check is live). */
    double ld[STEPS];
    float *d = train(gate, true, 0.05, ld, NULL);
    float *e = train(gate, false, 0.0, la, NULL);
    ck_assert_msg(memcmp(d, e, n * sizeof *d) != 0, "%s: clipping had no effect", gate);
    free(d);
    free(e);
}
END_TEST

START_TEST(train_mode_differs_with_noise)
{
    ccr_net *net = build("topk", 7);
    const float *y;
    float ev[BATCH * D_OUT], ev2[BATCH * D_OUT], tr[BATCH * D_OUT];
    CCR_CK_OK(ctx, ccr_net_forward_mode(net, xs[0], BATCH, CCR_MODE_EVAL, NULL, &y));
    memcpy(ev, y, sizeof ev);
    double aux_eval = ccr_net_aux_loss(net);
    CCR_CK_OK(ctx, ccr_net_forward(net, xs[0], BATCH, &y));
    memcpy(ev2, y, sizeof ev2);
    ck_assert(memcmp(ev, ev2, sizeof ev) == 0);   /* forward == forward_mode(EVAL) */
    gsl_rng *r = ccr_test_rng(5);
    CCR_CK_OK(ctx, ccr_net_forward_mode(net, xs[0], BATCH, CCR_MODE_TRAIN, r, &y));
    memcpy(tr, y, sizeof tr);
    ck_assert_msg(memcmp(ev, tr, sizeof ev) != 0, "train mode gave the eval output");
    ck_assert(ccr_net_aux_loss(net) != aux_eval);
    /* The aux loss is the sum of the layers' stats. */
    ccr_gate_stats gs;
    CCR_CK_OK(ctx, ccr_net_cond(net, 2, NULL, &gs));
    ck_assert_double_eq(ccr_net_aux_loss(net), gs.aux_loss);
    /* Train mode needs the rng for a noisy gate; unknown modes are refused. */
    CCR_CK_STATUS(ctx, ccr_net_forward_mode(net, xs[0], BATCH, CCR_MODE_TRAIN, NULL, &y),
                  CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_net_forward_mode(net, xs[0], BATCH, (ccr_mode)7, r, &y), CCR_EINVAL);
    ccr_step_stats st;
    CCR_CK_STATUS(ctx, ccr_net_loss_grad_mode(net, xs[0], ys[0], BATCH, (ccr_mode)-1, r, &st),
                  CCR_EINVAL);
    ccr_net_free(net);
    /* A plain MLP: both modes agree, and no rng is needed. */
    net = build(NULL, 7);
    CCR_CK_OK(ctx, ccr_net_forward_mode(net, xs[0], BATCH, CCR_MODE_EVAL, NULL, &y));
    memcpy(ev, y, sizeof ev);
    CCR_CK_OK(ctx, ccr_net_forward_mode(net, xs[0], BATCH, CCR_MODE_TRAIN, NULL, &y));
    ck_assert(memcmp(ev, y, sizeof ev) == 0);
    ck_assert(ccr_net_aux_loss(net) == 0.0);
    ck_assert(ccr_net_aux_loss(NULL) == 0.0);
    ccr_net_free(net);
    gsl_rng_free(r);
}
END_TEST

/* aux loss of a training-mode forward with the noise of seed 11, and whether
 * the routing equals ids (NULL: store it into ids). */
static double aux_at(ccr_net *net, int32_t *ids, bool *same)
{
    gsl_rng *r = ccr_test_rng(11);
    const float *y;
    CCR_CK_OK(ctx, ccr_net_forward_mode(net, xs[1], BATCH, CCR_MODE_TRAIN, r, &y));
    gsl_rng_free(r);
    ccr_cond *c;
    CCR_CK_OK(ctx, ccr_net_cond(net, 2, &c, NULL));
    const ccr_route *rt = ccr_cond_route(c);
    size_t n = rt->batch * rt->slots;
    if (same != NULL)
        *same = memcmp(ids, rt->ids, n * sizeof *ids) == 0;
    else
        memcpy(ids, rt->ids, n * sizeof *ids);
    return ccr_net_aux_loss(net);
}

START_TEST(aux_loss_gradient)
{
    const char *gate = gates[_i];
    ccr_net *net = build(gate, 7);
    ccr_arena *p = ccr_net_params(net);
    int32_t ids[BATCH * 8];
    double aux0 = aux_at(net, ids, NULL);
    ck_assert_msg(aux0 > 0.0, "%s: aux loss %g", gate, aux0);
    /* Zero task gradient: backward leaves d(aux)/d(params) in the arena. */
    float zero[BATCH * D_OUT] = {0};
    CCR_CK_OK(ctx, ccr_arena_zero_grad(p));
    CCR_CK_OK(ctx, ccr_net_backward(net, zero));
    const float h = 2e-3f;
    size_t checked = 0, skipped = 0;
    double worst = 0.0, gmax = 0.0;
    for (size_t t = 0; t < ccr_arena_count(p); t++) {
        const char *name = ccr_arena_name(p, t);
        if (strncmp(name, "layers.0.", 9) != 0 && strstr(name, ".gate.") == NULL)
            continue;
        float *v = ccr_arena_value(p, t);
        const float *g = ccr_arena_grad(p, t);
        for (size_t j = 0; j < ccr_arena_size(p, t); j++) {
            float v0 = v[j];
            bool s1, s2;
            v[j] = v0 + h;
            double up = aux_at(net, ids, &s1);
            v[j] = v0 - h;
            double dn = aux_at(net, ids, &s2);
            v[j] = v0;
            /* Skip where the routing flipped, or where the one-sided slopes
             * disagree (a kink the table does not show: the noisy top-k
             * threshold entry swapping). */
            double fd = (up - dn) / (2.0 * (double)h), err = fabs(fd - g[j]);
            double kink = fabs((up - aux0) - (aux0 - dn)) / (double)h;
            if (!s1 || !s2 || kink > 1e-3 + 0.05 * fabs(fd)) {
                skipped++;
                continue;
            }
            ck_assert_msg(err <= 2e-5 + 1e-3 * fabs(fd), "%s: %s[%zu] grad %.8g fd %.8g",
                          gate, name, j, (double)g[j], fd);
            worst = fmax(worst, err);
            gmax = fmax(gmax, fabs(g[j]));
            checked++;
        }
    }
    ck_assert_msg(checked >= 10 * (skipped + 1), "%s: %zu checked, %zu skipped", gate,
                  checked, skipped);
    ck_assert_msg(gmax > 1e-3, "%s: aux gradient is (near) zero: %g", gate, gmax);
    fprintf(stderr, "%s: %zu coordinates, %zu skipped, worst |fd - g| %.3g, max |g| %.3g\n",
            gate, checked, skipped, worst, gmax);
    ccr_net_free(net);
}
END_TEST

START_TEST(clip_errors)
{
    ccr_net *net = build(NULL, 7);
    ccr_arena *p = ccr_net_params(net);
    double nrm = -1;
    CCR_CK_OK(ctx, ccr_arena_zero_grad(p));
    CCR_CK_OK(ctx, ccr_arena_grad_norm(p, &nrm));
    ck_assert(nrm == 0.0);
    CCR_CK_OK(ctx, ccr_arena_clip_grad_norm(p, 1.0, NULL)); /* zero norm: nothing to do */
    CCR_CK_STATUS(ctx, ccr_arena_clip_grad_norm(p, 0.0, &nrm), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_arena_clip_grad_norm(p, NAN, &nrm), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_arena_grad_norm(p, NULL), CCR_EINVAL);
    ck_assert_int_eq(ccr_arena_grad_norm(NULL, &nrm), CCR_EINVAL);
    ck_assert_int_eq(ccr_arena_clip_grad_norm(NULL, 1.0, &nrm), CCR_EINVAL);
    /* Known values: gradients 3 and 4 in two tensors give norm 5. */
    float *g = ccr_arena_grads(p);
    g[0] = 3.0f;
    g[ccr_arena_block_len(p) - 1] = 0.0f;
    ccr_arena_grad(p, 1)[0] = 4.0f;
    CCR_CK_OK(ctx, ccr_arena_grad_norm(p, &nrm));
    ck_assert_double_eq(nrm, 5.0);
    CCR_CK_OK(ctx, ccr_arena_clip_grad_norm(p, 1.0, &nrm));
    ck_assert_double_eq(nrm, 5.0);
    ck_assert_float_eq(g[0], 3.0f * (float)(1.0 / 5.0));
    ck_assert_float_eq(ccr_arena_grad(p, 1)[0], 4.0f * (float)(1.0 / 5.0));
    /* Non-finite gradients: CCR_EDOM, the norm reported, nothing scaled. */
    ccr_arena_grad(p, 1)[0] = INFINITY;
    CCR_CK_STATUS(ctx, ccr_arena_clip_grad_norm(p, 1.0, &nrm), CCR_EDOM);
    ck_assert(isinf(nrm));
    ck_assert_float_eq(g[0], 3.0f * (float)(1.0 / 5.0));
    ccr_net_free(net);
    /* Before finalize. */
    ccr_arena *a;
    CCR_CK_OK(ctx, ccr_arena_init(be, &a));
    CCR_CK_STATUS(ctx, ccr_arena_grad_norm(a, &nrm), CCR_EINVAL);
    CCR_CK_STATUS(ctx, ccr_arena_clip_grad_norm(a, 1.0, &nrm), CCR_EINVAL);
    ccr_arena_free(a);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("train_api");
    TCase *t = tcase_create("api");
    tcase_add_checked_fixture(t, setup, teardown);
    tcase_set_timeout(t, 120);
    tcase_add_loop_test(t, manual_loop_is_train_step, 0, 3);
    tcase_add_test(t, train_mode_differs_with_noise);
    tcase_add_loop_test(t, aux_loss_gradient, 0, 3);
    tcase_add_test(t, clip_errors);
    suite_add_tcase(s, t);
    return s;
}

int main(void) { return ccr_test_run(suite()); }
