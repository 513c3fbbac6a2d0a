/*
 * ccr-probe - builds one conditional layer (ccr_cond.h) from command-line
 * options, runs one forward and backward pass and writes everything needed
 * to recompute it independently (analysis/torch_check.py does, in PyTorch).
 *
 * The loss is L = sum(y * dy) + aux_loss for a random batch x ~ U(-1, 1)
 * [batch, d_in] and a random dy ~ U(-1, 1) [batch, d_out], both drawn from
 * the seeded GSL RNG (mt19937) after the parameters are initialised; the
 * forward's noise draws come from the same generator afterwards.
 *
 * The safetensors file holds (all float32 but route.ids):
 *   x, dy, y, aux_loss [1], aux_parts [4] (importance, load, switch and
 *   z-loss parts), route.ids (int32) [B, slots], route.weights [B, slots],
 *   grad.x, every gate export under its own name (noise, noise.primary,
 *   noise.secondary, importance, load, ...), and param.<name>, grad.<name>
 *   for every parameter of the layer.  __metadata__ holds every option under
 *   its flag name with dashes as underscores, plus ccr_version and driver.
 *
 * Bad arguments (unknown gate, bad sizes, a configuration the gate rejects)
 * print one line on stderr and exit 2 without writing the file: the layer is
 * allocated, which validates the configuration, before anything is written.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "internal.h"  // provides: ccr_mallocn, ccr_malloc3, ccr_mul_ok
#include "outputs.h"

#define PROG "ccr-probe"
#define MAX_META 64
#define MAX_TENSORS 64

static void usage(void)
{
    printf("usage: ccr-probe --gate NAME --out FILE [options]\n"
           "Runs forward and backward of L = sum(y * dy) + aux_loss for one conditional\n"
           "layer on a random batch and writes inputs, outputs, route, noise draws,\n"
           "parameters and gradients to a safetensors file (check it with\n"
           "analysis/torch_check.py).\n\n"
           "  --out FILE           safetensors file to write (required)\n"
           "  --d-in N             layer input width [8]\n"
           "  --d-out N            layer output width [6]\n"
           "  --hidden N           hidden width of FFN experts (= --expert-hidden) [10]\n"
           "  --batch N            examples [16]\n"
           "  --seed N             GSL RNG seed (init, then x, dy, noise) [1]\n"
           "  --train              training mode (noise on)\n"
           "  --residual           y = x + layer(x) (needs --d-in = --d-out)\n"
           "  --help               this text\n"
           "Gate options (gates: %s):\n%s",
           ccr_gate_type_names(), drv_gate_usage);
}

typedef struct options {
    const char *out;
    ccr_cond_config cc;
    size_t batch;
    unsigned long seed;
    bool train;
} options;

static void parse(int argc, char **argv, options *o)
{
    *o = (options){.batch = 16, .seed = 1};
    o->cc = drv_gate_defaults();
    o->cc.d_in = 8;
    o->cc.d_out = 6;
    o->cc.hidden = 10;
    bool bank_set = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool used_value;
        if (drv_parse_common(PROG, a, usage)) {
            drv_bad_option(PROG, a, v);   /* no --quick here */
        } else if (strcmp(a, "--train") == 0) {
            o->train = true;
            continue;
        } else if (strcmp(a, "--residual") == 0) {
            o->cc.residual = true;
            continue;
        } else if (drv_parse_gate_option(PROG, a, v, &o->cc, &used_value)) {
            if (strcmp(a, "--bank") == 0)
                bank_set = true;
            i += used_value;
            continue;
        }
        i++;
        if (strcmp(a, "--out") == 0) {
            if (v == NULL || v[0] == '\0')
                drv_usage_error(PROG, "--out needs a file name");
            o->out = v;
        } else if (strcmp(a, "--d-in") == 0) o->cc.d_in = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--d-out") == 0) o->cc.d_out = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--hidden") == 0) o->cc.hidden = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--batch") == 0) o->batch = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--seed") == 0) o->seed = drv_parse_seed(PROG, a, v);
        else drv_bad_option(PROG, a, v);
    }
    if (o->cc.gate == NULL)
        drv_usage_error(PROG, "--gate is required (%s)", ccr_gate_type_names());
    if (o->out == NULL)
        drv_usage_error(PROG, "--out FILE is required");
    drv_gate_finish(PROG, &o->cc, bank_set);
    o->cc.gate_cfg.d_in = o->cc.d_in;
}

/* Metadata pairs; values are formatted into owned buffers. */
typedef struct meta {
    const char *kv[2 * MAX_META];
    char buf[MAX_META][64];
    size_t n;
} meta;

static void meta_str(meta *m, const char *key, const char *value)
{
    if (m->n == MAX_META)
        abort();
    m->kv[2 * m->n] = key;
    m->kv[2 * m->n + 1] = value;
    m->n++;
}

static void meta_size(meta *m, const char *key, size_t v)
{
    snprintf(m->buf[m->n], sizeof m->buf[0], "%zu", v);
    meta_str(m, key, m->buf[m->n]);
}

/* The shortest %g form that reads back as exactly v. */
static void meta_double(meta *m, const char *key, double v)
{
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(m->buf[m->n], sizeof m->buf[0], "%.*g", prec, v);
        if (strtod(m->buf[m->n], NULL) == v)
            break;
    }
    meta_str(m, key, m->buf[m->n]);
}

typedef struct tensors {
    ccr_st_tensor t[MAX_TENSORS];
    bool owned[MAX_TENSORS]; /* data is a copy to free */
    size_t n;
} tensors;

static void add_tensor(tensors *ts, const char *name, ccr_dtype dt, size_t rank,
                       const size_t *shape, const void *data, bool owned)
{
    if (ts->n == MAX_TENSORS) {
        fprintf(stderr, "%s: too many tensors\n", PROG);
        exit(1);
    }
    ccr_st_tensor *t = &ts->t[ts->n++];
    memset(t, 0, sizeof *t);
    t->name = name;
    t->dtype = dt;
    t->rank = rank;
    for (size_t i = 0; i < rank; i++)
        t->shape[i] = shape[i];
    t->data = data;
    ts->owned[ts->n - 1] = owned;
}

/* a x b elements of `size` bytes; exits 1 on overflow or exhaustion. */
static void *xmalloc(size_t a, size_t b, size_t size)
{
    void *p = ccr_malloc3(a, b, size);
    if (p == NULL) {
        fprintf(stderr, "%s: out of memory\n", PROG);
        exit(1);
    }
    return p;
}

int main(int argc, char **argv)
{
    options o;
    parse(argc, argv, &o);
    drv_io_output("--out", o.out);
    drv_io_check(PROG);   /* a directory we cannot write to is a usage error */
    ccr_ctx *ctx;
    ccr_backend *be;
    gsl_rng *rng;
    drv_one_process(PROG);
    drv_setup(PROG, false, o.seed, &ctx, &be, &rng);

    /* Allocating the layer validates the whole configuration: a bad one is
     * a usage error, reported before any file is touched. */
    ccr_cond *c;
    ccr_status s = ccr_cond_alloc(be, &o.cc, o.batch, &c);
    if (s == CCR_EINVAL)
        drv_usage_error(PROG, "bad configuration: %s", ccr_ctx_errmsg(ctx));
    if (s != CCR_OK)
        drv_fail(PROG, ctx, s, "layer");

    ccr_arena *arena;
    if ((s = ccr_arena_init(be, &arena)) != CCR_OK)
        drv_fail(PROG, ctx, s, "arena");
    if ((s = ccr_cond_declare(c, arena, "")) != CCR_OK ||
        (s = ccr_arena_finalize(arena)) != CCR_OK ||
        (s = ccr_cond_init_params(c, rng)) != CCR_OK)
        drv_fail(PROG, ctx, s, "parameters");

    size_t B = o.batch, din = o.cc.d_in, dout = o.cc.d_out;
    float *x = xmalloc(B, din, sizeof *x);
    float *dy = xmalloc(B, dout, sizeof *dy);
    float *y = xmalloc(B, dout, sizeof *y);
    float *dx = xmalloc(B, din, sizeof *dx);
    for (size_t i = 0; i < B * din; i++)
        x[i] = (float)(2.0 * gsl_rng_uniform(rng) - 1.0);
    for (size_t i = 0; i < B * dout; i++)
        dy[i] = (float)(2.0 * gsl_rng_uniform(rng) - 1.0);

    ccr_gate_stats st;
    if ((s = ccr_cond_forward(c, x, B, o.train, rng, y, &st)) != CCR_OK)
        drv_fail(PROG, ctx, s, "forward");
    /* The route points into the gate: copy it before anything else runs. */
    const ccr_route *r = ccr_cond_route(c);
    if (r == NULL || r->batch != B) {
        fprintf(stderr, "%s: forward left no routing table for %zu examples\n", PROG, B);
        return 1;
    }
    size_t slots = r->slots;
    int32_t *ids = xmalloc(B, slots, sizeof *ids);
    float *weights = xmalloc(B, slots, sizeof *weights);
    memcpy(ids, r->ids, B * slots * sizeof *ids);
    memcpy(weights, r->weights, B * slots * sizeof *weights);

    if ((s = ccr_arena_zero_grad(arena)) != CCR_OK ||
        (s = ccr_cond_backward(c, dy, dx)) != CCR_OK)
        drv_fail(PROG, ctx, s, "backward");

    float aux = (float)st.aux_loss;
    float parts[4] = {(float)st.loss_importance, (float)st.loss_load, (float)st.loss_switch,
                      (float)st.loss_z};

    tensors ts = {.n = 0};
    size_t sh[4];
    sh[0] = B; sh[1] = din;
    add_tensor(&ts, "x", CCR_DTYPE_F32, 2, sh, x, false);
    sh[1] = dout;
    add_tensor(&ts, "dy", CCR_DTYPE_F32, 2, sh, dy, false);
    add_tensor(&ts, "y", CCR_DTYPE_F32, 2, sh, y, false);
    sh[0] = 1;
    add_tensor(&ts, "aux_loss", CCR_DTYPE_F32, 1, sh, &aux, false);
    sh[0] = 4;
    add_tensor(&ts, "aux_parts", CCR_DTYPE_F32, 1, sh, parts, false);
    sh[0] = B; sh[1] = slots;
    add_tensor(&ts, "route.ids", CCR_DTYPE_I32, 2, sh, ids, false);
    add_tensor(&ts, "route.weights", CCR_DTYPE_F32, 2, sh, weights, false);
    sh[1] = din;
    add_tensor(&ts, "grad.x", CCR_DTYPE_F32, 2, sh, dx, false);

    /* Gate exports (noise draws, importance, load, ...), copied: they point
     * into the gate. */
    ccr_gate *g = ccr_cond_gate(c);
    size_t n_exp = ccr_gate_n_exports(g);
    for (size_t i = 0; i < n_exp; i++) {
        const char *name;
        size_t rank, shape[4];
        const float *data;
        if ((s = ccr_gate_get_export(g, i, &name, &rank, shape, &data)) != CCR_OK)
            drv_fail(PROG, ctx, s, "gate export");
        size_t n = 1;
        for (size_t j = 0; j < rank; j++)
            n *= shape[j];
        float *copy = xmalloc(n, 1, sizeof *copy);
        memcpy(copy, data, n * sizeof *copy);
        add_tensor(&ts, name, CCR_DTYPE_F32, rank, shape, copy, true);
    }

    /* Parameters and their gradients, as param.<name> and grad.<name>. */
    size_t n_par = ccr_arena_count(arena);
    char (*names)[CCR_ARENA_MAX_NAME + 8] = xmalloc(2, n_par, sizeof *names);
    for (size_t i = 0; i < n_par; i++) {
        size_t n = ccr_arena_size(arena, i);
        float *val = xmalloc(n, 1, sizeof *val), *grad = xmalloc(n, 1, sizeof *grad);
        if ((s = ccr_arena_get(arena, i, val)) != CCR_OK ||
            (s = ccr_arena_get_grad(arena, i, grad)) != CCR_OK)
            drv_fail(PROG, ctx, s, "parameters");
        snprintf(names[2 * i], sizeof names[0], "param.%s", ccr_arena_name(arena, i));
        snprintf(names[2 * i + 1], sizeof names[0], "grad.%s", ccr_arena_name(arena, i));
        add_tensor(&ts, names[2 * i], CCR_DTYPE_F32, ccr_arena_rank(arena, i),
                   ccr_arena_shape(arena, i), val, true);
        add_tensor(&ts, names[2 * i + 1], CCR_DTYPE_F32, ccr_arena_rank(arena, i),
                   ccr_arena_shape(arena, i), grad, true);
    }

    const ccr_gate_config *gc = &o.cc.gate_cfg;
    meta m = {.n = 0};
    meta_str(&m, "driver", PROG);
    meta_str(&m, "ccr_version", ccr_version());
    meta_str(&m, "gate", o.cc.gate->name);
    meta_size(&m, "d_in", o.cc.d_in);
    meta_size(&m, "d_out", o.cc.d_out);
    meta_size(&m, "hidden", o.cc.hidden);
    meta_str(&m, "bank", o.cc.bank == CCR_BANK_LINEAR ? "linear" : "ffn");
    meta_size(&m, "experts", gc->n_experts);
    meta_size(&m, "k", gc->k);
    meta_size(&m, "groups", gc->n_groups);
    meta_size(&m, "k_groups", gc->k_groups);
    meta_size(&m, "k2", gc->k2);
    meta_size(&m, "depth", gc->depth);
    meta_str(&m, "combine", gc->combine == CCR_COMBINE_LEAF ? "leaf" : "path");
    meta_str(&m, "bits_from", gc->bits_from == CCR_BITS_INPUT ? "input" : "projection");
    meta_str(&m, "grad_mode", gc->grad_mode == CCR_GRAD_STE ? "ste" : "none");
    meta_double(&m, "capacity_factor", gc->capacity_factor);
    meta_double(&m, "eval_capacity_factor", gc->eval_capacity_factor);
    meta_double(&m, "w_importance", gc->w_importance);
    meta_double(&m, "w_load", gc->w_load);
    meta_double(&m, "aux_alpha", gc->aux_alpha);
    meta_double(&m, "z_loss", gc->z_loss);
    meta_double(&m, "noise_eps", gc->noise_eps);
    meta_size(&m, "batch", o.batch);
    meta_size(&m, "seed", (size_t)o.seed);
    meta_str(&m, "randomize", gc->randomize ? "true" : "false");
    meta_str(&m, "train", o.train ? "true" : "false");
    meta_str(&m, "residual", o.cc.residual ? "true" : "false");
    meta_str(&m, "out", o.out);
    meta_size(&m, "slots", slots);
    meta_size(&m, "n_matrices", r->n_matrices);
    meta_size(&m, "dropped", st.dropped);

    if ((s = ccr_safetensors_write(ctx, o.out, ts.t, ts.n, m.kv, m.n)) != CCR_OK)
        drv_fail(PROG, ctx, s, "write");
    fprintf(stderr, "%s: %s d_in %zu d_out %zu batch %zu%s: %zu tensors, aux_loss %.6g -> %s\n",
            PROG, o.cc.gate->name, o.cc.d_in, o.cc.d_out, B, o.train ? " train" : "", ts.n, st.aux_loss,
            o.out);

    for (size_t i = 0; i < ts.n; i++)
        if (ts.owned[i])
            free((void *)ts.t[i].data);
    free(names);
    free(x);
    free(dy);
    free(y);
    free(dx);
    free(ids);
    free(weights);
    ccr_arena_free(arena);
    ccr_cond_free(c);
    drv_teardown(PROG, ctx, be, rng, NULL, NULL);
    return 0;
}
