/*
 * st_roundtrip.c - the C side of tests/torch_load.sh.
 *
 *   st_roundtrip write DIR   builds two networks from fixed seeds and writes
 *       DIR/mlp.safetensors   5 -> linear 7 -> relu -> linear 4 -> tanh -> linear 3
 *       DIR/cond.safetensors  6 -> linear 8 -> relu -> cond(topk, E 4, k 2) -> 3
 *       DIR/tree.safetensors  6 -> linear 8 -> relu -> cond(signtree, depth 2,
 *                             leaf combine, its default linear bank) -> 3
 *       DIR/values.txt        one line per tensor: "<file> <name> <n> v0 v1 ..."
 *                             (%.9g, exact for float32), plus the MLP's input
 *                             "mlp x" and evaluation-mode output "mlp y"
 *   st_roundtrip read DIR    loads DIR/mlp2.safetensors (written by PyTorch:
 *                             every parameter doubled) into the MLP with
 *                             ccr_net_load and checks each value is exactly
 *                             twice the original.
 * Exit 0 on success, 1 with a message otherwise.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ccr/ccr.h"

#define BATCH 6

static ccr_ctx *ctx;
static ccr_backend *be;

static int die(const char *what, ccr_status s)
{
    fprintf(stderr, "st_roundtrip: %s: %s: %s\n", what, ccr_strerror(s), ccr_ctx_errmsg(ctx));
    return 1;
}

#define TRY(what, expr)                              \
    do {                                             \
        ccr_status s_ = (expr);                      \
        if (s_ != CCR_OK)                            \
            return die(what, s_);                    \
    } while (0)

static int build_mlp(ccr_net **net)
{
    gsl_rng *r = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(r, 17);
    TRY("mlp", ccr_net_init(be, 5, BATCH, net));
    TRY("mlp", ccr_net_add_linear(*net, 7));
    TRY("mlp", ccr_net_add_act(*net, CCR_ACT_RELU));
    TRY("mlp", ccr_net_add_linear(*net, 4));
    TRY("mlp", ccr_net_add_act(*net, CCR_ACT_TANH));
    TRY("mlp", ccr_net_add_linear(*net, 3));
    TRY("mlp", ccr_net_finalize(*net, r));
    gsl_rng_free(r);
    return 0;
}

/* 6 -> linear 8 -> relu -> cond(gate) -> 3; the gate's options: topk E 4,
 * k 2; signtree depth 2, leaf combine (the rest the defaults). */
static int build_cond(ccr_net **net, const char *gate)
{
    gsl_rng *r = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(r, 18);
    ccr_cond_config c = ccr_cond_config_default();
    c.gate_name = gate;
    c.gate_cfg.n_experts = 4;
    c.gate_cfg.k = 2;
    c.gate_cfg.depth = 2;
    c.gate_cfg.combine = CCR_COMBINE_LEAF;
    c.gate_cfg.randomize = true;
    c.hidden = 5;
    c.d_out = 3;
    TRY("cond", ccr_net_init(be, 6, BATCH, net));
    TRY("cond", ccr_net_add_linear(*net, 8));
    TRY("cond", ccr_net_add_act(*net, CCR_ACT_RELU));
    TRY("cond", ccr_net_add_cond(*net, &c));
    TRY("cond", ccr_net_finalize(*net, r));
    gsl_rng_free(r);
    return 0;
}

static void dump(FILE *f, const char *file, const char *name, const float *v, size_t n)
{
    fprintf(f, "%s %s %zu", file, name, n);
    for (size_t i = 0; i < n; i++)
        fprintf(f, " %.9g", (double)v[i]);
    fputc('\n', f);
}

static void dump_params(FILE *f, const char *file, const ccr_net *net)
{
    ccr_arena *a = ccr_net_params(net);
    for (size_t t = 0; t < ccr_arena_count(a); t++)
        dump(f, file, ccr_arena_name(a, t), ccr_arena_value(a, t), ccr_arena_size(a, t));
}

static int write_all(const char *dir)
{
    char path[4096];
    ccr_net *mlp, *cond, *tree;
    if (build_mlp(&mlp) || build_cond(&cond, "topk") || build_cond(&tree, "signtree"))
        return 1;
    snprintf(path, sizeof path, "%s/mlp.safetensors", dir);
    TRY("save mlp", ccr_net_save(mlp, path));
    snprintf(path, sizeof path, "%s/cond.safetensors", dir);
    TRY("save cond", ccr_net_save(cond, path));
    snprintf(path, sizeof path, "%s/tree.safetensors", dir);
    TRY("save tree", ccr_net_save(tree, path));
    snprintf(path, sizeof path, "%s/values.txt", dir);
    FILE *f = fopen(path, "w");
    if (f == NULL) {
        perror(path);
        return 1;
    }
    dump_params(f, "mlp", mlp);
    dump_params(f, "cond", cond);
    dump_params(f, "tree", tree);
    float x[BATCH * 5];
    for (size_t i = 0; i < BATCH * 5; i++)
        x[i] = (float)((double)((i * 37) % 23) / 11.0 - 1.0);
    const float *y;
    TRY("forward", ccr_net_forward(mlp, x, BATCH, &y));
    dump(f, "mlp", "x", x, BATCH * 5);
    dump(f, "mlp", "y", y, BATCH * 3);
    if (fclose(f) != 0) {
        perror(path);
        return 1;
    }
    ccr_net_free(mlp);
    ccr_net_free(cond);
    ccr_net_free(tree);
    return 0;
}

static int read_back(const char *dir)
{
    char path[4096];
    ccr_net *mlp, *orig;
    if (build_mlp(&mlp) || build_mlp(&orig))
        return 1;
    snprintf(path, sizeof path, "%s/mlp2.safetensors", dir);
    TRY("load mlp2", ccr_net_load(mlp, path));
    ccr_arena *a = ccr_net_params(mlp), *b = ccr_net_params(orig);
    size_t n = 0;
    for (size_t t = 0; t < ccr_arena_count(a); t++)
        for (size_t i = 0; i < ccr_arena_size(a, t); i++, n++)
            if (ccr_arena_value(a, t)[i] != 2.0f * ccr_arena_value(b, t)[i]) {
                fprintf(stderr, "st_roundtrip: %s[%zu] = %.9g, want %.9g\n",
                        ccr_arena_name(a, t), i, (double)ccr_arena_value(a, t)[i],
                        2.0 * ccr_arena_value(b, t)[i]);
                return 1;
            }
    printf("st_roundtrip: %zu values read back from PyTorch\n", n);
    ccr_net_free(mlp);
    ccr_net_free(orig);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3 || (strcmp(argv[1], "write") != 0 && strcmp(argv[1], "read") != 0)) {
        fprintf(stderr, "usage: st_roundtrip write|read DIR\n");
        return 2;
    }
    if (ccr_ctx_init(&ctx) != CCR_OK)
        return 1;
    if (ccr_backend_cpu_init(ctx, &be) != CCR_OK)
        return die("backend", CCR_ENOMEM);
    int rc = strcmp(argv[1], "write") == 0 ? write_all(argv[2]) : read_back(argv[2]);
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
    return rc;
}
