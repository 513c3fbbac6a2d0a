/*
 * test_cuda_cond.c - conditional layers on the CUDA backend against the CPU
 * (issue 11, "Tests"): every gate over awkward shapes, forward, backward, a
 * whole training step and a whole network, through the public API only.
 *
 * The contract checked:
 *   - ccr_cond_alloc works on a CUDA backend for every gate; forward and
 *     backward take device pointers (x, y, dy, dx from ccr_backend_alloc);
 *     ccr_cond_route returns a table in host memory on both backends;
 *   - ccr_cond_init_params with the same seed gives bitwise the same
 *     parameters on both backends;
 *   - (a) routing ids equal exactly, weights to ~1e-5 relative; (b) y, (c)
 *     after backward with the same dy, dx and every parameter gradient, by
 *     normalised error ||gpu - cpu|| / max(||cpu||, tiny); the statistics
 *     (ccr_gate_stats) alike; (d) a training step (sparse SGD and sparse
 *     Adam), then another forward, the parameters compared; train mode draws
 *     its noise from a gsl_rng seeded alike on both sides (host draws in the
 *     CPU gate's order: the routing must match with noise too, and both
 *     layers must consume the same number of draws);
 *   - a ccr_net holding a conditional layer trains alike on both backends;
 *   - NaN or infinity in x on the CUDA layer gives CCR_EDOM (as on the CPU),
 *     as do routing weights that overflow; bad batch sizes CCR_EBADLEN.
 *
 * Exactness.  Inputs and parameters are dyadic (small integers times powers
 * of two: x = i/8, parameters j/16, |i|, |j| <= 8), so every logit, sign-bit
 * pre-activation and bank output is exact in float whatever the summation
 * order (and in TF32): routing ids are then a function of exact values,
 * ties included, and ties go to the lower index (docs/GATES.md), a zero
 * sign-bit pre-activation to bit 0.  Shapes: batch 1, primes, widths that
 * are not multiples of 32, more experts than examples (empty experts), every
 * example on one expert (zero gate weights, or all rows equal), hmoe groups,
 * signtree depth 0/1/3/5 with both gradient modes, both combines and both
 * bit sources, switch capacities that drop in training and in evaluation,
 * residual layers, a batch below max_batch.
 *
 * Every failure message names the case (gate and shape), the pass and the
 * field.  Exits 77 (skipped) when ccr has no CUDA or no GPU is found.  Runs
 * with CK_FORK=no (a forked child must not use CUDA).
 *
 * Without a GPU the comparison machinery can be exercised with a second CPU
 * backend in the GPU's place: "cpu" (bitwise the same), or "cpu-ref" (the
 * reference GEMM in the bank: another summation order):
 *     CCR_TEST_COND_PEER=cpu-ref build/tests/test_cuda_cond
 * (both pass; about 3 s, 75 s under valgrind).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ccr_test.h"

enum { CPU = 0, GPU = 1 };

#define TOL_VALUE 1e-5   /* normalised error of y, dx, gradients, parameters */
#define TOL_WEIGHT 1e-5  /* relative error of a routing weight */
#define TINY 1e-12       /* floor of the normalisation */

static ccr_ctx *ctx;
static ccr_backend *be[2];
static const char *peer_name = "cuda";

/* ---- cases ----------------------------------------------------------------- */

enum { IN_DYADIC = 0, IN_SAME_ROWS = 1 };

typedef struct pcase {
    char name[240];
    ccr_cond_config cc;
    size_t batch, max_batch;
    int inputs;         /* IN_DYADIC or IN_SAME_ROWS (every example alike) */
    bool zero_gate;     /* the gate's parameters all zero */
} pcase;

#define MAX_CASES 64
static pcase cases[MAX_CASES];
static size_t n_cases;

static pcase *add_case(const char *gate, size_t batch, size_t d_in, size_t d_out, size_t hidden)
{
    if (n_cases == MAX_CASES) {
        fprintf(stderr, "test_cuda_cond: more than %d cases\n", MAX_CASES);
        exit(1);
    }
    pcase *p = &cases[n_cases++];
    memset(p, 0, sizeof *p);
    p->cc = ccr_cond_config_default();
    p->cc.gate = ccr_gate_type_find(gate);
    if (p->cc.gate == NULL) {
        fprintf(stderr, "test_cuda_cond: no gate %s\n", gate);
        exit(1);
    }
    p->cc.d_in = d_in;
    p->cc.d_out = d_out;
    p->cc.hidden = hidden;
    p->cc.gate_cfg.randomize = n_cases % 2 == 0;  /* both initialisations */
    p->batch = p->max_batch = batch;
    return p;
}

static void set_experts(pcase *p, size_t E, size_t k)
{
    p->cc.gate_cfg.n_experts = E;
    p->cc.gate_cfg.k = k;
}

static void set_hmoe(pcase *p, size_t E, size_t groups, size_t k_groups, size_t k2)
{
    p->cc.gate_cfg.n_experts = E;
    p->cc.gate_cfg.n_groups = groups;
    p->cc.gate_cfg.k_groups = k_groups;
    p->cc.gate_cfg.k2 = k2;
}

static void set_switch(pcase *p, size_t E, double cf, double ecf)
{
    p->cc.gate_cfg.n_experts = E;
    p->cc.gate_cfg.capacity_factor = cf;
    p->cc.gate_cfg.eval_capacity_factor = ecf;
}

static void set_tree(pcase *p, size_t depth, ccr_combine comb, ccr_bits_from bits,
                     ccr_grad_mode gm)
{
    p->cc.gate_cfg.depth = depth;
    p->cc.gate_cfg.combine = comb;
    p->cc.gate_cfg.bits_from = bits;
    p->cc.gate_cfg.grad_mode = gm;
}

/* "topk [B=13/16 d_in=31 d_out=17 h=9 bank=ffn E=64 k=4 ...]" */
static void name_case(pcase *p)
{
    const ccr_gate_config *g = &p->cc.gate_cfg;
    const char *gn = p->cc.gate->name;
    char opt[96] = "";
    if (strcmp(gn, "dense") == 0)
        snprintf(opt, sizeof opt, " E=%zu", g->n_experts);
    else if (strcmp(gn, "topk") == 0)
        snprintf(opt, sizeof opt, " E=%zu k=%zu", g->n_experts, g->k);
    else if (strcmp(gn, "hmoe") == 0)
        snprintf(opt, sizeof opt, " E=%zu groups=%zu k_groups=%zu k2=%zu", g->n_experts,
                 g->n_groups, g->k_groups, g->k2);
    else if (strcmp(gn, "switch") == 0)
        snprintf(opt, sizeof opt, " E=%zu cf=%g eval_cf=%g", g->n_experts, g->capacity_factor,
                 g->eval_capacity_factor);
    else if (strcmp(gn, "signtree") == 0)
        snprintf(opt, sizeof opt, " depth=%zu %s bits=%s grad=%s", g->depth,
                 g->combine == CCR_COMBINE_PATH ? "path" : "leaf",
                 g->bits_from == CCR_BITS_PROJECTION ? "projection" : "input",
                 g->grad_mode == CCR_GRAD_STE ? "ste" : "none");
    snprintf(p->name, sizeof p->name, "%s [B=%zu/%zu d_in=%zu d_out=%zu h=%zu bank=%s%s%s%s%s%s%s]",
             gn, p->batch, p->max_batch, p->cc.d_in, p->cc.d_out, p->cc.hidden,
             ccr_cond_config_bank(&p->cc) == CCR_BANK_LINEAR ? "linear" : "ffn", opt,
             g->z_loss > 0 ? " z_loss" : "", p->cc.residual ? " residual" : "",
             p->zero_gate ? " zero-gate" : "", p->inputs == IN_SAME_ROWS ? " same-rows" : "",
             g->randomize ? " randomize" : "");
}

static void build_cases(void)
{
    pcase *p;
    /* none: one expert, whatever the shape */
    add_case("none", 1, 7, 5, 3);
    p = add_case("none", 13, 33, 17, 37);
    p->max_batch = 16;
    p = add_case("none", 7, 19, 19, 5);
    p->cc.residual = true;

    /* dense: every expert runs */
    p = add_case("dense", 1, 7, 5, 3);
    set_experts(p, 1, 1);
    p = add_case("dense", 7, 13, 31, 37);
    set_experts(p, 5, 1);
    p->cc.gate_cfg.z_loss = 0.01;
    p = add_case("dense", 13, 31, 17, 9);
    set_experts(p, 6, 1);
    p->zero_gate = true;

    /* topk */
    p = add_case("topk", 1, 7, 5, 3);
    set_experts(p, 3, 2);
    p = add_case("topk", 7, 13, 31, 37);
    set_experts(p, 5, 2);
    p = add_case("topk", 13, 31, 17, 9);      /* E >> B: empty experts */
    set_experts(p, 64, 4);
    p->max_batch = 16;
    p = add_case("topk", 31, 33, 65, 63);
    set_experts(p, 16, 1);
    p->cc.gate_cfg.z_loss = 0.01;
    p = add_case("topk", 29, 13, 11, 6);      /* eval: every example on experts 0, 1 */
    set_experts(p, 7, 2);
    p->zero_gate = true;
    p = add_case("topk", 17, 10, 10, 8);      /* every example alike */
    set_experts(p, 8, 3);
    p->inputs = IN_SAME_ROWS;
    p->cc.residual = true;
    p = add_case("topk", 11, 9, 4, 5);        /* k == E: no smooth load */
    set_experts(p, 3, 3);
    p->cc.bank = CCR_BANK_LINEAR;
    p = add_case("topk", 67, 40, 24, 48);
    set_experts(p, 16, 2);

    /* hmoe */
    p = add_case("hmoe", 1, 7, 5, 3);
    set_hmoe(p, 4, 2, 1, 1);
    p = add_case("hmoe", 7, 13, 31, 37);
    set_hmoe(p, 12, 3, 2, 2);
    p = add_case("hmoe", 5, 31, 17, 9);       /* empty groups and experts */
    set_hmoe(p, 64, 8, 2, 2);
    p = add_case("hmoe", 19, 13, 11, 6);
    set_hmoe(p, 16, 4, 1, 3);
    p->zero_gate = true;
    p = add_case("hmoe", 23, 17, 9, 7);       /* every group, every expert */
    set_hmoe(p, 9, 3, 3, 3);
    p->cc.gate_cfg.z_loss = 0.01;

    /* switch */
    p = add_case("switch", 1, 7, 5, 3);
    set_switch(p, 4, 1.25, 0);
    p = add_case("switch", 13, 13, 31, 37);
    set_switch(p, 5, 1.25, 0);
    p = add_case("switch", 31, 33, 65, 63);   /* drops in training and evaluation */
    set_switch(p, 7, 0.5, 0.5);
    p = add_case("switch", 29, 13, 13, 6);    /* all on expert 0: capacity drops */
    set_switch(p, 4, 1.0, 1.0);
    p->zero_gate = true;
    p->cc.residual = true;
    p = add_case("switch", 9, 31, 17, 9);
    set_switch(p, 64, 1.25, 0);
    p->cc.gate_cfg.z_loss = 0.01;
    p = add_case("switch", 16, 10, 6, 4);     /* every example alike */
    set_switch(p, 8, 2.0, 0);
    p->inputs = IN_SAME_ROWS;

    /* signtree */
    p = add_case("signtree", 7, 13, 31, 37);
    set_tree(p, 0, CCR_COMBINE_PATH, CCR_BITS_PROJECTION, CCR_GRAD_STE);
    p = add_case("signtree", 1, 7, 5, 3);
    set_tree(p, 1, CCR_COMBINE_PATH, CCR_BITS_PROJECTION, CCR_GRAD_STE);
    p = add_case("signtree", 13, 31, 17, 9);
    set_tree(p, 3, CCR_COMBINE_PATH, CCR_BITS_PROJECTION, CCR_GRAD_STE);
    p = add_case("signtree", 29, 13, 11, 6);
    set_tree(p, 3, CCR_COMBINE_LEAF, CCR_BITS_PROJECTION, CCR_GRAD_STE);
    p = add_case("signtree", 11, 33, 9, 4);
    set_tree(p, 3, CCR_COMBINE_PATH, CCR_BITS_PROJECTION, CCR_GRAD_NONE);
    p = add_case("signtree", 17, 10, 6, 4);
    set_tree(p, 3, CCR_COMBINE_LEAF, CCR_BITS_INPUT, CCR_GRAD_NONE);
    p = add_case("signtree", 19, 5, 7, 4);
    set_tree(p, 3, CCR_COMBINE_PATH, CCR_BITS_INPUT, CCR_GRAD_STE);
    p = add_case("signtree", 9, 6, 6, 4);     /* zero projection: the leftmost path */
    set_tree(p, 1, CCR_COMBINE_PATH, CCR_BITS_PROJECTION, CCR_GRAD_STE);
    p->zero_gate = true;
    p->cc.residual = true;
    p = add_case("signtree", 7, 9, 5, 6);
    set_tree(p, 3, CCR_COMBINE_PATH, CCR_BITS_PROJECTION, CCR_GRAD_STE);
    p->cc.bank = CCR_BANK_FFN;
    p = add_case("signtree", 3, 8, 8, 4);     /* 63 nodes, 3 examples */
    set_tree(p, 5, CCR_COMBINE_PATH, CCR_BITS_PROJECTION, CCR_GRAD_STE);
    p->max_batch = 5;

    for (size_t i = 0; i < n_cases; i++)
        name_case(&cases[i]);
}

/* ---- helpers --------------------------------------------------------------- */

/* Asserts a call returned CCR_OK, naming the case. */
#define CK_OK(label, expr)                                                           \
    do {                                                                             \
        ccr_status ck_s_ = (expr);                                                   \
        ck_assert_msg(ck_s_ == CCR_OK, "%s: %s -> %s: %s", (label), #expr,             \
                      ccr_strerror(ck_s_), ccr_ctx_errmsg(ctx));                     \
    } while (0)

static void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes > 0 ? bytes : 1);
    ck_assert_msg(p != NULL, "out of host memory (%zu bytes)", bytes);
    return p;
}

/* v[i] = j * 2^-shift with j uniform in [-range, range]: exact in float. */
static void fill_dyadic(gsl_rng *r, float *v, size_t n, int range, int shift)
{
    for (size_t i = 0; i < n; i++) {
        long j = (long)gsl_rng_uniform_int(r, (unsigned long)(2 * range + 1)) - range;
        v[i] = (float)ldexp((double)j, -shift);
    }
}

/* v[i] = (2 j + 1) / 256 with j uniform in [-64, 63]: odd multiples of
 * 2^-8, exact in float, and never 0 plus a sum of multiples of 2^-7. */
static void fill_odd(gsl_rng *r, float *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        long j = (long)gsl_rng_uniform_int(r, 128) - 64;
        v[i] = (float)ldexp((double)(2 * j + 1), -8);
    }
}

/* ||got - ref|| / max(||ref||, TINY), in double; INFINITY if got holds a
 * non-finite value.  *worst gets the index of the largest difference. */
static double norm_err(const float *got, const float *ref, size_t n, size_t *worst)
{
    double num = 0.0, den = 0.0, big = -1.0;
    *worst = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]) && isfinite(ref[i])) {
            *worst = i;
            return INFINITY;
        }
        double d = (double)got[i] - (double)ref[i];
        num += d * d;
        den += (double)ref[i] * (double)ref[i];
        if (fabs(d) > big)
            big = fabs(d), *worst = i;
    }
    return sqrt(num) / fmax(sqrt(den), TINY);
}

/* Asserts the normalised error of got against ref is at most tol. */
static void expect_near(const char *label, const char *field, const float *got, const float *ref,
                        size_t n, double tol)
{
    size_t w;
    double e = norm_err(got, ref, n, &w);
    ck_assert_msg(e <= tol,
                  "%s: %s: normalised error %.3g > %.1g (%zu values; largest difference at "
                  "[%zu]: %s %.9g, cpu %.9g)",
                  label, field, e, tol, n, w, peer_name, n ? (double)got[w] : 0.0,
                  n ? (double)ref[w] : 0.0);
}

/* Asserts |got - ref| <= rtol max(|got|, |ref|) + atol. */
static void expect_scalar(const char *label, const char *field, double got, double ref,
                          double rtol, double atol)
{
    double d = fabs(got - ref);
    ck_assert_msg(d <= rtol * fmax(fabs(got), fabs(ref)) + atol || (got == ref),
                  "%s: %s: %s %.12g, cpu %.12g (difference %.3g)", label, field, peer_name,
                  got, ref, d);
}

/* The two layers of a case, with their arenas and buffers in backend memory. */
typedef struct side {
    ccr_backend *be;
    ccr_cond *c;
    ccr_arena *a;
    float *x, *y, *dy, *dx;
} side;

static float *dev_alloc(const char *label, ccr_backend *b, size_t n)
{
    float *d = NULL;
    CK_OK(label, ccr_backend_alloc(b, n * sizeof *d, (void **)&d));
    return d;
}

static void sides_open(const pcase *p, side s[2])
{
    for (int i = 0; i < 2; i++) {
        side *t = &s[i];
        memset(t, 0, sizeof *t);
        t->be = be[i];
        CK_OK(p->name, ccr_cond_alloc(t->be, &p->cc, p->max_batch, &t->c));
        CK_OK(p->name, ccr_arena_init(t->be, &t->a));
        CK_OK(p->name, ccr_cond_declare(t->c, t->a, ""));
        CK_OK(p->name, ccr_arena_finalize(t->a));
        t->x = dev_alloc(p->name, t->be, p->max_batch * p->cc.d_in);
        t->dx = dev_alloc(p->name, t->be, p->max_batch * p->cc.d_in);
        t->y = dev_alloc(p->name, t->be, p->max_batch * p->cc.d_out);
        t->dy = dev_alloc(p->name, t->be, p->max_batch * p->cc.d_out);
    }
    /* The same layer on both sides. */
    ck_assert_msg(ccr_cond_n_params(s[GPU].c) == ccr_cond_n_params(s[CPU].c),
                  "%s: n_params %zu, cpu %zu", p->name, ccr_cond_n_params(s[GPU].c),
                  ccr_cond_n_params(s[CPU].c));
    ck_assert_msg(ccr_cond_bank(s[GPU].c) == ccr_cond_bank(s[CPU].c), "%s: bank kind", p->name);
    ck_assert_msg(ccr_cond_d_in(s[GPU].c) == p->cc.d_in && ccr_cond_d_out(s[GPU].c) == p->cc.d_out,
                  "%s: d_in/d_out", p->name);
    expect_scalar(p->name, "ccr_cond_flops(eval)", ccr_cond_flops(s[GPU].c, false),
                  ccr_cond_flops(s[CPU].c, false), 0, 0);
    expect_scalar(p->name, "ccr_cond_flops(train)", ccr_cond_flops(s[GPU].c, true),
                  ccr_cond_flops(s[CPU].c, true), 0, 0);
    expect_scalar(p->name, "ccr_cond_flops_bwd", ccr_cond_flops_bwd(s[GPU].c, true),
                  ccr_cond_flops_bwd(s[CPU].c, true), 0, 0);
    ck_assert_msg(ccr_gate_n_matrices(ccr_cond_gate(s[GPU].c)) ==
                      ccr_gate_n_matrices(ccr_cond_gate(s[CPU].c)) &&
                  ccr_gate_slots(ccr_cond_gate(s[GPU].c)) == ccr_gate_slots(ccr_cond_gate(s[CPU].c)),
                  "%s: the gates' matrices or slots differ", p->name);
    ck_assert_msg(ccr_arena_count(s[GPU].a) == ccr_arena_count(s[CPU].a),
                  "%s: %zu tensors, cpu %zu", p->name, ccr_arena_count(s[GPU].a),
                  ccr_arena_count(s[CPU].a));
    for (size_t t = 0; t < ccr_arena_count(s[CPU].a); t++) {
        ck_assert_msg(strcmp(ccr_arena_name(s[GPU].a, t), ccr_arena_name(s[CPU].a, t)) == 0 &&
                          ccr_arena_size(s[GPU].a, t) == ccr_arena_size(s[CPU].a, t),
                      "%s: tensor %zu: %s [%zu], cpu %s [%zu]", p->name, t,
                      ccr_arena_name(s[GPU].a, t), ccr_arena_size(s[GPU].a, t),
                      ccr_arena_name(s[CPU].a, t), ccr_arena_size(s[CPU].a, t));
    }
}

static void sides_close(side s[2])
{
    for (int i = 0; i < 2; i++) {
        ccr_backend_free_buffer(s[i].be, s[i].x);
        ccr_backend_free_buffer(s[i].be, s[i].y);
        ccr_backend_free_buffer(s[i].be, s[i].dy);
        ccr_backend_free_buffer(s[i].be, s[i].dx);
        ccr_cond_free(s[i].c);
        ccr_arena_free(s[i].a);
    }
}

/* Compares two arenas tensor by tensor (values, or gradients with grads):
 * bitwise, or by normalised error tol. */
static void compare_arenas(const char *label, const char *when, const ccr_arena *gpu,
                           const ccr_arena *cpu, bool grads, bool bitwise, double tol)
{
    ck_assert_msg(ccr_arena_count(gpu) == ccr_arena_count(cpu), "%s: %s: tensor counts differ",
                  label, when);
    for (size_t t = 0; t < ccr_arena_count(cpu); t++) {
        size_t n = ccr_arena_size(cpu, t);
        float *g = xmalloc(n * sizeof *g), *c = xmalloc(n * sizeof *c);
        if (grads) {
            CK_OK(label, ccr_arena_get_grad(gpu, t, g));
            CK_OK(label, ccr_arena_get_grad(cpu, t, c));
        } else {
            CK_OK(label, ccr_arena_get(gpu, t, g));
            CK_OK(label, ccr_arena_get(cpu, t, c));
        }
        char field[160];
        snprintf(field, sizeof field, "%s: %s of %s", when, grads ? "gradient" : "value",
                 ccr_arena_name(cpu, t));
        if (bitwise) {
            for (size_t i = 0; i < n; i++) {
                uint32_t ug, uc;
                memcpy(&ug, &g[i], 4);
                memcpy(&uc, &c[i], 4);
                ck_assert_msg(ug == uc, "%s: %s: not bitwise equal at [%zu]: %s %.9g, cpu %.9g",
                              label, field, i, peer_name, (double)g[i], (double)c[i]);
            }
        } else {
            expect_near(label, field, g, c, n, tol);
        }
        free(g);
        free(c);
    }
}

static bool is_gate_tensor(const char *name)
{
    return strstr(name, "gate.") != NULL || strstr(name, "w_bits") != NULL ||
           strstr(name, "c_bits") != NULL;
}

static bool ends_with(const char *s, const char *tail)
{
    size_t n = strlen(s), t = strlen(tail);
    return n >= t && strcmp(s + n - t, tail) == 0;
}

/* Dyadic parameters, the same on both sides: j/16, |j| <= 8 (zeros for the
 * gate's with zero_gate), except the biases in front of a ReLU or of the
 * output (".b1", ".b"): odd multiples of 1/256.  A pre-activation x W + b
 * (x = i/8, W = j/16: a multiple of 1/128) is then never exactly 0, so no
 * ReLU sits on its kink - where, once an update has scaled the weights, the
 * sign of a rounding-level value would depend on the summation order.
 * Sign bits and logits keep their exact ties (the rules under test). */
static void set_dyadic_params(const char *label, ccr_arena *const a[2], bool zero_gate,
                              unsigned long seed)
{
    gsl_rng *r = ccr_test_rng(seed);
    for (size_t t = 0; t < ccr_arena_count(a[CPU]); t++) {
        size_t n = ccr_arena_size(a[CPU], t);
        float *v = xmalloc(n * sizeof *v);
        const char *nm = ccr_arena_name(a[CPU], t);
        if (zero_gate && is_gate_tensor(nm))
            memset(v, 0, n * sizeof *v);
        else if (!is_gate_tensor(nm) && (ends_with(nm, ".b1") || ends_with(nm, ".b")))
            fill_odd(r, v, n);
        else
            fill_dyadic(r, v, n, 8, 4);
        for (int i = 0; i < 2; i++)
            CK_OK(label, ccr_arena_set(a[i], t, v));
        free(v);
    }
    gsl_rng_free(r);
}

static void set_params(const pcase *p, side s[2], unsigned long seed)
{
    ccr_arena *a[2] = {s[CPU].a, s[GPU].a};
    set_dyadic_params(p->name, a, p->zero_gate, seed);
}

/* x [batch, d_in] dyadic j/8, |j| <= 8 (all rows equal to row 0 for
 * IN_SAME_ROWS). */
static float *make_x(const pcase *p, size_t batch, unsigned long seed)
{
    size_t d = p->cc.d_in;
    float *x = xmalloc(batch * d * sizeof *x);
    gsl_rng *r = ccr_test_rng(seed);
    fill_dyadic(r, x, batch * d, 8, 3);
    gsl_rng_free(r);
    if (p->inputs == IN_SAME_ROWS)
        for (size_t b = 1; b < batch; b++)
            memcpy(x + b * d, x, d * sizeof *x);
    return x;
}

static float *make_dy(const pcase *p, size_t batch, unsigned long seed)
{
    float *dy = xmalloc(batch * p->cc.d_out * sizeof *dy);
    gsl_rng *r = ccr_test_rng(seed);
    fill_dyadic(r, dy, batch * p->cc.d_out, 8, 4);
    gsl_rng_free(r);
    return dy;
}

static void put(const char *label, const side *s, float *dst, const float *src, size_t n)
{
    CK_OK(label, ccr_backend_set(s->be, dst, src, n * sizeof *src));
}

static float *get(const char *label, const side *s, const float *src, size_t n)
{
    float *h = xmalloc(n * sizeof *h);
    CK_OK(label, ccr_backend_get(s->be, h, src, n * sizeof *h));
    return h;
}

/* Routing tables: the same sizes, ids exactly, weights to TOL_WEIGHT
 * relative; both valid host tables with the same per-matrix counts. */
static void expect_route(const char *label, const char *when, const ccr_route *g,
                         const ccr_route *c)
{
    ck_assert_msg(g != NULL && c != NULL, "%s: %s: no routing table (%s %p, cpu %p)", label,
                  when, peer_name, (const void *)g, (const void *)c);
    ck_assert_msg(g->batch == c->batch && g->slots == c->slots && g->n_matrices == c->n_matrices,
                  "%s: %s: route sizes batch %zu slots %zu matrices %zu, cpu %zu %zu %zu", label,
                  when, g->batch, g->slots, g->n_matrices, c->batch, c->slots, c->n_matrices);
    /* Host memory: read directly. */
    for (size_t b = 0; b < c->batch; b++) {
        for (size_t s = 0; s < c->slots; s++) {
            size_t q = b * c->slots + s;
            ck_assert_msg(g->ids[q] == c->ids[q],
                          "%s: %s: route id of example %zu slot %zu: %s %d, cpu %d", label, when,
                          b, s, peer_name, (int)g->ids[q], (int)c->ids[q]);
            double wg = g->weights[q], wc = c->weights[q];
            ck_assert_msg(fabs(wg - wc) <= TOL_WEIGHT * fmax(fabs(wg), fabs(wc)) || wg == wc,
                          "%s: %s: route weight of example %zu slot %zu (id %d): %s %.9g, "
                          "cpu %.9g",
                          label, when, b, s, (int)c->ids[q], peer_name, wg, wc);
        }
    }
    CK_OK(label, ccr_route_validate(ctx, g));
    size_t n = c->n_matrices, rg, rc;
    size_t *cg = xmalloc(n * sizeof *cg), *cc = xmalloc(n * sizeof *cc);
    CK_OK(label, ccr_route_counts(ctx, g, cg, n, &rg));
    CK_OK(label, ccr_route_counts(ctx, c, cc, n, &rc));
    ck_assert_msg(rg == rc, "%s: %s: %zu routed pairs, cpu %zu", label, when, rg, rc);
    ck_assert_msg(memcmp(cg, cc, n * sizeof *cg) == 0, "%s: %s: per-matrix counts differ", label,
                  when);
    free(cg);
    free(cc);
}

/* ccr_gate_stats field by field: losses and CVs close, counts exact. */
static void expect_stats(const char *label, const char *when, const ccr_gate_stats *g,
                         const ccr_gate_stats *c)
{
    char f[160];
#define STAT(name, rtol, atol)                                                      \
    do {                                                                            \
        snprintf(f, sizeof f, "%s: stats.%s", when, #name);                         \
        expect_scalar(label, f, g->name, c->name, rtol, atol);                      \
    } while (0)
    STAT(aux_loss, 1e-5, 1e-7);
    STAT(loss_importance, 1e-5, 1e-7);
    STAT(loss_load, 1e-5, 1e-7);
    STAT(loss_switch, 1e-5, 1e-7);
    STAT(loss_z, 1e-5, 1e-7);
    STAT(cv_importance, 1e-5, 1e-6);
    STAT(cv_load, 1e-5, 1e-6);
    STAT(cv_load_count, 1e-9, 1e-9);
    STAT(max_mean_load, 1e-5, 1e-6);
    STAT(max_mean_count, 1e-9, 1e-9);
    STAT(flops_counted, 1e-12, 0);
#undef STAT
    ck_assert_msg(g->dropped == c->dropped, "%s: %s: stats.dropped %zu, cpu %zu", label, when,
                  g->dropped, c->dropped);
    ck_assert_msg(g->distinct == c->distinct, "%s: %s: stats.distinct %zu, cpu %zu", label, when,
                  g->distinct, c->distinct);
}

/* Forward on both sides of x (host) and comparison of route, y and stats.
 * Train mode: each side draws from its own generator seeded with seed, and
 * both must have drawn the same number of values. */
static void forward_both(const pcase *p, side s[2], const float *xh, size_t batch, bool train,
                         unsigned long seed, const char *when)
{
    ccr_gate_stats st[2];
    gsl_rng *r[2];
    for (int i = 0; i < 2; i++) {
        r[i] = ccr_test_rng(seed);
        put(p->name, &s[i], s[i].x, xh, batch * p->cc.d_in);
        memset(&st[i], 0xff, sizeof st[i]);
        CK_OK(p->name, ccr_cond_forward(s[i].c, s[i].x, batch, train, r[i], s[i].y, &st[i]));
    }
    if (train) {
        unsigned long ng = gsl_rng_get(r[GPU]), nc = gsl_rng_get(r[CPU]);
        ck_assert_msg(ng == nc, "%s: %s: the %s layer drew a different number of random values "
                      "than the cpu layer (next draw %lu, cpu %lu)", p->name, when, peer_name,
                      ng, nc);
    }
    gsl_rng_free(r[0]);
    gsl_rng_free(r[1]);
    expect_route(p->name, when, ccr_cond_route(s[GPU].c), ccr_cond_route(s[CPU].c));
    float *yg = get(p->name, &s[GPU], s[GPU].y, batch * p->cc.d_out);
    float *yc = get(p->name, &s[CPU], s[CPU].y, batch * p->cc.d_out);
    char f[96];
    snprintf(f, sizeof f, "%s: y", when);
    expect_near(p->name, f, yg, yc, batch * p->cc.d_out, TOL_VALUE);
    expect_stats(p->name, when, &st[GPU], &st[CPU]);
    free(yg);
    free(yc);
}

/* Backward of the last forward on both sides with the same dy, gradients
 * zeroed first; dx (if with_dx) and every gradient compared. */
static void backward_both(const pcase *p, side s[2], const float *dyh, size_t batch, bool with_dx,
                          const char *when)
{
    for (int i = 0; i < 2; i++) {
        CK_OK(p->name, ccr_arena_zero_grad(s[i].a));
        put(p->name, &s[i], s[i].dy, dyh, batch * p->cc.d_out);
        CK_OK(p->name, ccr_cond_backward(s[i].c, s[i].dy, with_dx ? s[i].dx : NULL));
    }
    char f[96];
    if (with_dx) {
        float *g = get(p->name, &s[GPU], s[GPU].dx, batch * p->cc.d_in);
        float *c = get(p->name, &s[CPU], s[CPU].dx, batch * p->cc.d_in);
        snprintf(f, sizeof f, "%s: dx", when);
        expect_near(p->name, f, g, c, batch * p->cc.d_in, TOL_VALUE);
        free(g);
        free(c);
    }
    snprintf(f, sizeof f, "%s%s", when, with_dx ? "" : " (dx NULL)");
    compare_arenas(p->name, f, s[GPU].a, s[CPU].a, true, false, TOL_VALUE);
}

/* ---- tests ----------------------------------------------------------------- */

/* The same seed gives bitwise the same initial parameters. */
START_TEST(test_init_params)
{
    const pcase *p = &cases[_i];
    side s[2];
    sides_open(p, s);
    for (int i = 0; i < 2; i++) {
        gsl_rng *r = ccr_test_rng(11 + (unsigned long)_i);
        CK_OK(p->name, ccr_cond_init_params(s[i].c, r));
        gsl_rng_free(r);
    }
    compare_arenas(p->name, "ccr_cond_init_params", s[GPU].a, s[CPU].a, false, true, 0);
    ck_assert_msg(ccr_cond_memory_bytes(s[GPU].c) > 0, "%s: ccr_cond_memory_bytes is 0", p->name);
    sides_close(s);
}
END_TEST

/* Evaluation forward (full batch, then a smaller one on the same layer) and
 * backward with dx; training forward with noise and backward without and
 * with dx. */
START_TEST(test_layer_parity)
{
    const pcase *p = &cases[_i];
    side s[2];
    sides_open(p, s);
    set_params(p, s, 1000 + (unsigned long)_i);
    size_t B = p->batch;
    float *x = make_x(p, B, 2000 + (unsigned long)_i);
    float *dy = make_dy(p, B, 3000 + (unsigned long)_i);

    forward_both(p, s, x, B, false, 0, "eval forward");
    backward_both(p, s, dy, B, true, "eval backward");

    if (B > 1) {
        size_t b2 = (B + 1) / 2;
        float *x2 = make_x(p, b2, 4000 + (unsigned long)_i);
        forward_both(p, s, x2, b2, false, 0, "eval forward, half batch");
        backward_both(p, s, dy, b2, true, "eval backward, half batch");
        free(x2);
    }

    forward_both(p, s, x, B, true, 5000 + (unsigned long)_i, "train forward");
    backward_both(p, s, dy, B, false, "train backward");
    backward_both(p, s, dy, B, true, "train backward");

    /* A second training forward: the generators move on alike. */
    forward_both(p, s, x, B, true, 6000 + (unsigned long)_i, "second train forward");
    backward_both(p, s, dy, B, true, "second train backward");
    free(x);
    free(dy);
    sides_close(s);
}
END_TEST

/* Two training steps (zero_grad, train forward, backward, sparse optimiser
 * step) then an evaluation forward; parameters compared after each step.
 * _i = 2 * case + (0: SGD with momentum and weight decay, 1: Adam). */
START_TEST(test_step_parity)
{
    const pcase *p = &cases[_i / 2];
    bool adam = _i % 2 == 1;
    pcase q = *p;   /* the messages name the optimiser too */
    snprintf(q.name, sizeof q.name, "%.200s, %s sparse", p->name, adam ? "adam" : "sgd");
    const char *label = q.name;
    /* Random gate parameters even for a zero-gate case: zero gate weights
     * give experts whose columns get equal updates, hence logits equal in
     * exact arithmetic after the step, which each backend's rounding could
     * order differently (the zero-gate ties are test_layer_parity's). */
    q.zero_gate = false;
    side s[2];
    sides_open(p, s);
    set_params(&q, s, 7000 + (unsigned long)_i);
    ccr_optim_config oc = ccr_optim_defaults(adam ? CCR_OPTIM_ADAM : CCR_OPTIM_SGD);
    oc.sparse = true;
    if (adam) {
        /* Without weight decay a parameter with a zero gradient stays
         * exactly as it is (m = v = 0); eps 1e-4: a gradient at rounding
         * level moves nothing (no sign flips of lr-sized steps). */
        oc.lr = 1e-2f;
        oc.eps = 1e-4f;
    } else {
        /* Powers of two: a parameter with a zero gradient is scaled by
         * exactly 1 - 2^-8 per step, so exact ties of the dyadic start
         * (logits, sign bits) stay exact ties on both sides. */
        oc.lr = 0.0625f;
        oc.weight_decay = 0.0625f;
        oc.momentum = 0.5f;
    }
    ccr_optim *o[2];
    for (int i = 0; i < 2; i++)
        CK_OK(label, ccr_optim_init(s[i].a, &oc, &o[i]));
    size_t B = p->batch;
    for (int step = 0; step < 2; step++) {
        float *x = make_x(p, B, 8000 + 10 * (unsigned long)_i + (unsigned long)step);
        float *dy = make_dy(p, B, 9000 + 10 * (unsigned long)_i + (unsigned long)step);
        char when[64];
        snprintf(when, sizeof when, "step %d train forward", step);
        forward_both(&q, s, x, B, true, 100 + (unsigned long)step, when);
        snprintf(when, sizeof when, "step %d backward", step);
        backward_both(&q, s, dy, B, true, when);
        for (int i = 0; i < 2; i++)
            CK_OK(label, ccr_optim_step(o[i]));
        ck_assert_msg(ccr_optim_last_updated(o[GPU]) == ccr_optim_last_updated(o[CPU]),
                      "%s: step %d: ccr_optim_last_updated %zu, cpu %zu", label, step,
                      ccr_optim_last_updated(o[GPU]), ccr_optim_last_updated(o[CPU]));
        snprintf(when, sizeof when, "after step %d", step);
        compare_arenas(label, when, s[GPU].a, s[CPU].a, false, false, TOL_VALUE);
        free(x);
        free(dy);
    }
    float *x = make_x(p, B, 8999 + (unsigned long)_i);
    forward_both(&q, s, x, B, false, 0, "eval forward after two steps");
    free(x);
    for (int i = 0; i < 2; i++)
        ccr_optim_free(o[i]);
    sides_close(s);
}
END_TEST

/* A network  linear -> relu -> cond(gate) -> linear  trained three steps on
 * both backends (ccr_train_step, sparse SGD with momentum): losses, aux
 * losses, the conditional layer's statistics and routing, then every
 * parameter and an evaluation.  _i indexes the gate registry. */
START_TEST(test_net_parity)
{
    const ccr_gate_type *gt = ccr_gate_types()[_i];
    enum { D_IN = 12, D_H = 24, D_C = 16, CLASSES = 5, B = 19, STEPS = 3, COND = 2 };
    char label[128];
    snprintf(label, sizeof label, "net with %s [B=%d %d->%d->cond %d->%d]", gt->name, B, D_IN,
             D_H, D_C, CLASSES);
    ccr_cond_config cc = ccr_cond_config_default();
    cc.gate = gt;
    cc.d_out = D_C;
    cc.hidden = 20;
    cc.gate_cfg.n_experts = 6;
    cc.gate_cfg.k = 2;
    cc.gate_cfg.n_groups = 2;
    cc.gate_cfg.k_groups = 1;
    cc.gate_cfg.k2 = 2;
    cc.gate_cfg.depth = 2;
    cc.gate_cfg.capacity_factor = 1.25;
    cc.gate_cfg.randomize = true;
    ccr_net *net[2];
    ccr_optim *opt[2];
    for (int i = 0; i < 2; i++) {
        CK_OK(label, ccr_net_init(be[i], D_IN, B, &net[i]));
        CK_OK(label, ccr_net_add_linear(net[i], D_H));
        CK_OK(label, ccr_net_add_act(net[i], CCR_ACT_RELU));   /* exact on dyadic values */
        CK_OK(label, ccr_net_add_cond(net[i], &cc));
        CK_OK(label, ccr_net_add_linear(net[i], CLASSES));
        gsl_rng *r = ccr_test_rng(99);
        CK_OK(label, ccr_net_finalize(net[i], r));
        gsl_rng_free(r);
    }
    ccr_arena *a[2] = {ccr_net_params(net[CPU]), ccr_net_params(net[GPU])};
    compare_arenas(label, "ccr_net_finalize", a[GPU], a[CPU], false, true, 0);
    set_dyadic_params(label, a, false, 123 + (unsigned long)_i);
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_SGD);
    oc.sparse = true;
    oc.lr = 0.05f;
    for (int i = 0; i < 2; i++)
        CK_OK(label, ccr_optim_init(a[i], &oc, &opt[i]));
    float x[B * D_IN];
    int32_t y[B];
    gsl_rng *data = ccr_test_rng(55);
    for (int step = 0; step < STEPS; step++) {
        fill_dyadic(data, x, B * D_IN, 8, 3);
        for (int e = 0; e < B; e++)
            y[e] = (int32_t)gsl_rng_uniform_int(data, CLASSES);
        ccr_step_stats st[2];
        ccr_gate_stats gs[2];
        ccr_cond *c[2];
        for (int i = 0; i < 2; i++) {
            gsl_rng *r = ccr_test_rng(700 + (unsigned long)step);
            CK_OK(label, ccr_train_step(net[i], opt[i], r, x, y, B, &st[i]));
            gsl_rng_free(r);
            CK_OK(label, ccr_net_cond(net[i], COND, &c[i], &gs[i]));
        }
        char when[64];
        snprintf(when, sizeof when, "step %d", step);
        expect_route(label, when, ccr_cond_route(c[GPU]), ccr_cond_route(c[CPU]));
        expect_stats(label, when, &gs[GPU], &gs[CPU]);
        snprintf(when, sizeof when, "step %d loss", step);
        expect_scalar(label, when, st[GPU].loss, st[CPU].loss, 1e-5, 1e-7);
        snprintf(when, sizeof when, "step %d aux_loss", step);
        expect_scalar(label, when, st[GPU].aux_loss, st[CPU].aux_loss, 1e-5, 1e-7);
        ck_assert_msg(st[GPU].correct == st[CPU].correct && st[GPU].batch == st[CPU].batch,
                      "%s: step %d: correct %zu of %zu, cpu %zu of %zu", label, step,
                      st[GPU].correct, st[GPU].batch, st[CPU].correct, st[CPU].batch);
        snprintf(when, sizeof when, "after step %d", step);
        compare_arenas(label, when, a[GPU], a[CPU], false, false, TOL_VALUE);
    }
    /* Evaluation: outputs of one forward, then loss over 2.5 batches. */
    fill_dyadic(data, x, B * D_IN, 8, 3);
    const float *out[2];
    float *host[2];
    for (int i = 0; i < 2; i++) {
        CK_OK(label, ccr_net_forward(net[i], x, B, &out[i]));
        host[i] = xmalloc(B * CLASSES * sizeof(float));
        CK_OK(label, ccr_backend_get(be[i], host[i], out[i], B * CLASSES * sizeof(float)));
    }
    expect_near(label, "eval forward: output", host[GPU], host[CPU], B * CLASSES, TOL_VALUE);
    free(host[0]);
    free(host[1]);
    enum { NE = 2 * B + B / 2 };
    float xe[NE * D_IN];
    int32_t ye[NE];
    fill_dyadic(data, xe, NE * D_IN, 8, 3);
    for (int e = 0; e < NE; e++)
        ye[e] = (int32_t)gsl_rng_uniform_int(data, CLASSES);
    ccr_step_stats ev[2];
    for (int i = 0; i < 2; i++)
        CK_OK(label, ccr_net_eval(net[i], xe, ye, NE, &ev[i]));
    expect_scalar(label, "ccr_net_eval loss", ev[GPU].loss, ev[CPU].loss, 1e-5, 1e-7);
    ck_assert_msg(ev[GPU].correct == ev[CPU].correct, "%s: ccr_net_eval correct %zu, cpu %zu",
                  label, ev[GPU].correct, ev[CPU].correct);
    gsl_rng_free(data);
    for (int i = 0; i < 2; i++) {
        ccr_optim_free(opt[i]);
        ccr_net_free(net[i]);
    }
}
END_TEST

/* Errors, on the first case of each gate: backward before any forward gives
 * CCR_EINVAL, NaN and infinity in x CCR_EDOM (eval and train), batch 0 and
 * max_batch + 1 CCR_EBADLEN, a NULL y CCR_EINVAL, on both backends alike;
 * the layer then still runs and matches.  _i indexes the gate registry. */
START_TEST(test_errors)
{
    const ccr_gate_type *gt = ccr_gate_types()[_i];
    const pcase *p = NULL;
    for (size_t j = 0; j < n_cases && p == NULL; j++)
        if (cases[j].cc.gate == gt && cases[j].batch > 1)
            p = &cases[j];
    ck_assert_msg(p != NULL, "no case for gate %s", gt->name);
    side s[2];
    sides_open(p, s);
    set_params(p, s, 42);
    for (int i = 0; i < 2; i++)   /* no forward yet */
        CCR_CK_STATUS(ctx, ccr_cond_backward(s[i].c, s[i].dy, s[i].dx), CCR_EINVAL);
    size_t B = p->batch, n = B * p->cc.d_in;
    float *x = make_x(p, B, 43);
    const float bad[2] = {NAN, INFINITY};
    for (int k = 0; k < 2; k++) {
        float *xb = xmalloc(n * sizeof *xb);
        memcpy(xb, x, n * sizeof *xb);
        xb[n - 1 - (size_t)k] = k == 0 ? bad[0] : -bad[1];
        for (int i = 0; i < 2; i++) {
            ccr_gate_stats st;
            put(p->name, &s[i], s[i].x, xb, n);
            for (int train = 0; train < 2; train++) {
                gsl_rng *r = ccr_test_rng(1);
                ccr_status got = ccr_cond_forward(s[i].c, s[i].x, B, train, r, s[i].y, &st);
                gsl_rng_free(r);
                ck_assert_msg(got == CCR_EDOM, "%s: %s in x (%s forward) on %s: %s, want %s",
                              p->name, k == 0 ? "NaN" : "-infinity", train ? "train" : "eval",
                              i == GPU ? peer_name : "cpu", ccr_strerror(got),
                              ccr_strerror(CCR_EDOM));
            }
        }
        free(xb);
    }
    for (int i = 0; i < 2; i++) {
        ccr_gate_stats st;
        CCR_CK_STATUS(ctx, ccr_cond_forward(s[i].c, s[i].x, 0, false, NULL, s[i].y, &st),
                      CCR_EBADLEN);
        CCR_CK_STATUS(ctx, ccr_cond_forward(s[i].c, s[i].x, p->max_batch + 1, false, NULL,
                                            s[i].y, &st), CCR_EBADLEN);
        CCR_CK_STATUS(ctx, ccr_cond_forward(s[i].c, s[i].x, B, false, NULL, NULL, &st),
                      CCR_EINVAL);
    }
    /* Still usable, and still the same. */
    float *dy = make_dy(p, B, 44);
    forward_both(p, s, x, B, false, 0, "eval forward after errors");
    backward_both(p, s, dy, B, true, "eval backward after errors");
    free(x);
    free(dy);
    sides_close(s);
}
END_TEST

/* Routing weights that overflow (gate logits of +-infinity from huge gate
 * weights) are refused with CCR_EDOM on both backends, for the gates with
 * logits.  _i indexes the gate registry. */
START_TEST(test_overflow)
{
    const ccr_gate_type *gt = ccr_gate_types()[_i];
    if (strcmp(gt->name, "dense") != 0 && strcmp(gt->name, "topk") != 0 &&
        strcmp(gt->name, "hmoe") != 0 && strcmp(gt->name, "switch") != 0)
        return;
    const pcase *p = NULL;
    for (size_t j = 0; j < n_cases && p == NULL; j++)
        if (cases[j].cc.gate == gt && cases[j].batch > 1 && !cases[j].zero_gate)
            p = &cases[j];
    ck_assert_msg(p != NULL, "no case for gate %s", gt->name);
    side s[2];
    sides_open(p, s);
    set_params(p, s, 45);
    /* Gate weights 3e38, x all ones (d_in >= 2): every logit overflows to
     * infinity, and the routing weights are NaN. */
    for (size_t t = 0; t < ccr_arena_count(s[CPU].a); t++) {
        const char *nm = ccr_arena_name(s[CPU].a, t);
        if (!is_gate_tensor(nm))
            continue;
        size_t n = ccr_arena_size(s[CPU].a, t);
        float *v = xmalloc(n * sizeof *v);
        for (size_t j = 0; j < n; j++)
            v[j] = 3e38f;
        for (int i = 0; i < 2; i++)
            CK_OK(p->name, ccr_arena_set(s[i].a, t, v));
        free(v);
    }
    size_t B = p->batch, n = B * p->cc.d_in;
    float *x = xmalloc(n * sizeof *x);
    for (size_t j = 0; j < n; j++)
        x[j] = 1.0f;
    ccr_status got[2];
    for (int i = 0; i < 2; i++) {
        ccr_gate_stats st;
        put(p->name, &s[i], s[i].x, x, n);
        got[i] = ccr_cond_forward(s[i].c, s[i].x, B, false, NULL, s[i].y, &st);
    }
    ck_assert_msg(got[GPU] == got[CPU] && got[CPU] == CCR_EDOM,
                  "%s: overflowing gate weights: %s %s, cpu %s (want %s)", p->name, peer_name,
                  ccr_strerror(got[GPU]), ccr_strerror(got[CPU]), ccr_strerror(CCR_EDOM));
    free(x);
    sides_close(s);
}
END_TEST

static size_t n_gate_types(void)
{
    size_t n = 0;
    while (ccr_gate_types()[n] != NULL)
        n++;
    return n;
}

int main(void)
{
    if (ccr_ctx_init(&ctx) != CCR_OK)
        return 1;
    ccr_status s = ccr_test_peer_init(ctx, "CCR_TEST_COND_PEER", &be[GPU], &peer_name);
    if (s == CCR_EUNSUP || s == CCR_ENODEV) {
        printf("test_cuda_cond: skipped: %s\n", ccr_ctx_errmsg(ctx));
        ccr_ctx_free(ctx);
        return 77;
    }
    if (s != CCR_OK) {
        fprintf(stderr, "test_cuda_cond: %s init failed: %s\n", peer_name, ccr_ctx_errmsg(ctx));
        return 1;
    }
    if (ccr_backend_cpu_init(ctx, &be[CPU]) != CCR_OK) {
        fprintf(stderr, "test_cuda_cond: CPU init failed: %s\n", ccr_ctx_errmsg(ctx));
        return 1;
    }
    printf("test_cuda_cond: %s against %s\n", ccr_backend_describe(be[GPU]),
           ccr_backend_describe(be[CPU]));
    build_cases();
    int n = (int)n_cases, ng = (int)n_gate_types();
    Suite *su = suite_create("cuda_cond");
    TCase *tc = tcase_create("parity");
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, test_init_params, 0, n);
    tcase_add_loop_test(tc, test_layer_parity, 0, n);
    tcase_add_loop_test(tc, test_step_parity, 0, 2 * n);
    tcase_add_loop_test(tc, test_net_parity, 0, ng);
    tcase_add_loop_test(tc, test_errors, 0, ng);
    tcase_add_loop_test(tc, test_overflow, 0, ng);
    suite_add_tcase(su, tc);
    SRunner *sr = srunner_create(su);
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    ccr_backend_free(be[CPU]);
    ccr_backend_free(be[GPU]);
    ccr_ctx_free(ctx);
    return failed == 0 ? 0 : 1;
}
