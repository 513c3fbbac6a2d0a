/*
 * example.c - ccr-example: the first things a researcher does with ccr, in
 * one file to copy and edit.  Only the public API (<ccr/ccr.h>) is used.
 *
 *   1. load Fashion-MNIST (or make a synthetic task if it is absent);
 *   2. build a network with a conditional layer:
 *          784 -> linear 64 -> relu -> cond(gate, 64 -> 64) -> relu -> linear 10
 *   3. train it with a hand-written loop (training-mode forward/backward,
 *      gradient clipping, Adam) and evaluate it;
 *   4. swap the gate by name - every gate in the registry, nothing else
 *      changed - and read parameters, FLOPs and the routing (examples per
 *      expert) of each;
 *   5. save a checkpoint, load it into a fresh network, check it agrees;
 *   6. use a gate on its own: route a batch and read the routing table.
 *
 *     ccr-example [--quick] [--steps N] [--n-train N] [--n-test N]
 *                 [--data DIR | --synthetic] [--seed N] OUTDIR
 *
 * OUTDIR receives the checkpoint (example.safetensors).  Exit status 0 on
 * success, 2 for a usage error, 1 for a runtime failure.
 *
 * Build your own copy against an installed ccr:
 *     cc -O2 example.c $(pkg-config --cflags --libs ccr) -o example
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ccr/ccr.h>

#define N_CLASSES 10
#define BATCH 64

typedef struct options {
    size_t steps;        /* training steps per gate */
    size_t n_train;      /* training examples used (0 = all) */
    size_t n_test;       /* test examples used (0 = all) */
    const char *data;    /* Fashion-MNIST directory, NULL for synthetic data */
    unsigned long seed;
    const char *outdir;
} options;

/* Every ccr call returns a ccr_status; the message is on the context. */
static ccr_ctx *ctx;
#define TRY(expr)                                                                     \
    do {                                                                              \
        ccr_status s_ = (expr);                                                       \
        if (s_ != CCR_OK) {                                                           \
            fprintf(stderr, "ccr-example: %s: %s\n", ccr_strerror(s_),                \
                    ccr_ctx_errmsg(ctx));                                             \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

static void usage_error(const char *msg)
{
    fprintf(stderr, "ccr-example: %s\nusage: ccr-example [--quick] [--steps N] [--n-train N] "
                    "[--n-test N] [--data DIR | --synthetic] [--seed N] OUTDIR\n", msg);
    exit(2);
}

static unsigned long parse_count(const char *flag, const char *v)
{
    char *end;
    errno = 0;
    if (v == NULL || *v < '0' || *v > '9')
        usage_error(flag);
    unsigned long n = strtoul(v, &end, 10);
    if (errno != 0 || *end != '\0')
        usage_error(flag);
    return n;
}

static options parse(int argc, char **argv)
{
    const char *env = getenv("CCR_FMNIST_DIR");
    options o = {.steps = 300, .data = env ? env : "/usr/share/datasets/fashion-mnist",
                 .seed = 1};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--quick") == 0) {
            o.steps = 40;
            o.n_train = 2000;
            o.n_test = 1000;
        } else if (strcmp(a, "--steps") == 0) {
            o.steps = parse_count(a, v);
            i++;
        } else if (strcmp(a, "--n-train") == 0) {
            o.n_train = parse_count(a, v);
            i++;
        } else if (strcmp(a, "--n-test") == 0) {
            o.n_test = parse_count(a, v);
            i++;
        } else if (strcmp(a, "--data") == 0 && v != NULL) {
            o.data = argv[++i];
        } else if (strcmp(a, "--synthetic") == 0) {
            o.data = NULL;
        } else if (strcmp(a, "--seed") == 0) {
            o.seed = parse_count(a, v);
            i++;
        } else if (a[0] != '-' && o.outdir == NULL) {
            o.outdir = a;
        } else {
            usage_error(a);
        }
    }
    if (o.outdir == NULL)
        usage_error("OUTDIR missing");
    return o;
}

/* ---- 1. data ---------------------------------------------------------------- */

/* Fashion-MNIST's train and test files, or NULL if they cannot be read. */
static bool load_fmnist(const char *dir, ccr_dataset **train, ccr_dataset **test)
{
    char img[4096], lab[4096];
    snprintf(img, sizeof img, "%s/train-images-idx3-ubyte.gz", dir);
    snprintf(lab, sizeof lab, "%s/train-labels-idx1-ubyte.gz", dir);
    if (ccr_dataset_load_idx(ctx, img, lab, train) != CCR_OK)
        return false;
    snprintf(img, sizeof img, "%s/t10k-images-idx3-ubyte.gz", dir);
    snprintf(lab, sizeof lab, "%s/t10k-labels-idx1-ubyte.gz", dir);
    if (ccr_dataset_load_idx(ctx, img, lab, test) != CCR_OK) {
        ccr_dataset_free(*train);
        return false;
    }
    return true;
}

/* A synthetic stand-in of the same shape: 10 classes, each a noisy copy of
 * its own random prototype in [0, 1]^784. */
static void make_synthetic(gsl_rng *rng, size_t n, ccr_dataset **out)
{
    static float proto[N_CLASSES][784];
    static bool made;
    if (!made) {
        for (size_t c = 0; c < N_CLASSES; c++)
            for (size_t j = 0; j < 784; j++)
                proto[c][j] = (float)gsl_rng_uniform(rng);
        made = true;
    }
    TRY(ccr_dataset_alloc(ctx, n, 784, N_CLASSES, out));
    for (size_t i = 0; i < n; i++) {
        int32_t c = (int32_t)gsl_rng_uniform_int(rng, N_CLASSES);
        (*out)->y[i] = c;
        for (size_t j = 0; j < 784; j++)
            (*out)->x[i * 784 + j] = proto[c][j] + 0.5f * (float)(gsl_rng_uniform(rng) - 0.5);
    }
}

/* ---- 2. the network ----------------------------------------------------------- */

/* One configuration for every gate: only the name changes.  Each gate reads
 * the fields of gate_cfg it uses and ignores the rest, and the defaults are
 * the drivers' (E = 8, k = 2, hmoe 2 groups x 4 experts with k_groups = 2,
 * k2 = 2, signtree depth 4 with its own linear bank, ...): set a field to
 * change it for the gates that read it. */
static ccr_cond_config cond_config(const char *gate)
{
    ccr_cond_config c = ccr_cond_config_default();
    c.gate_name = gate;          /* an unknown name fails, listing the valid ones */
    c.gate_cfg.n_experts = 8;    /* E */
    c.d_out = 64;
    c.hidden = 32;               /* FFN experts: 64 -> 32 -> 64 */
    return c;
}

static ccr_net *build_net(ccr_backend *be, const char *gate, gsl_rng *rng)
{
    ccr_net *net;
    ccr_cond_config c = cond_config(gate);
    TRY(ccr_net_init(be, 784, BATCH, &net));
    TRY(ccr_net_add_linear(net, 64));
    TRY(ccr_net_add_act(net, CCR_ACT_RELU));
    TRY(ccr_net_add_cond(net, &c));          /* layer 2 */
    TRY(ccr_net_add_act(net, CCR_ACT_RELU));
    TRY(ccr_net_add_linear(net, N_CLASSES));
    TRY(ccr_net_finalize(net, rng));         /* parameters drawn from rng */
    return net;
}
#define COND_LAYER 2

/* ---- 3. training ------------------------------------------------------------------ */

/* `steps` Adam steps on shuffled batches.  This is ccr_train_step spelled
 * out, with gradient clipping added: replace the loss or the update here. */
static double train(ccr_net *net, const ccr_dataset *ds, size_t n, size_t steps, gsl_rng *rng)
{
    ccr_arena *params = ccr_net_params(net);
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    ccr_optim *opt;
    TRY(ccr_optim_init(params, &oc, &opt));
    size_t *perm = calloc(n, sizeof *perm);            /* calloc checks n x size */
    float *x = calloc(ds->dim, BATCH * sizeof *x);     /* bounded: BATCH is a constant; calloc checks the rest */
    int32_t y[BATCH];
    if (perm == NULL || x == NULL) {
        fprintf(stderr, "ccr-example: out of memory\n");
        exit(1);
    }
    double loss = 0.0;
    for (size_t s = 0, off = n; s < steps; s++, off += BATCH) {
        if (off + BATCH > n) {                       /* new epoch */
            ccr_permutation(rng, perm, n);
            off = 0;
        }
        ccr_dataset_gather(ds, perm + off, BATCH, x, y);
        ccr_step_stats st;
        double norm;
        TRY(ccr_arena_zero_grad(params));
        /* Training mode: noisy gates draw from rng, aux losses are trained on. */
        TRY(ccr_net_loss_grad_mode(net, x, y, BATCH, CCR_MODE_TRAIN, rng, &st));
        TRY(ccr_arena_clip_grad_norm(params, 5.0, &norm));
        TRY(ccr_optim_step(opt));
        loss = st.loss;
    }
    free(x);
    free(perm);
    ccr_optim_free(opt);
    return loss;
}

/* ---- 4. reading a trained network --------------------------------------------------- */

/* Uses of each matrix of the conditional layer over the first n examples of
 * ds (evaluation mode), read from the routing table of each batch by
 * ccr_route_counts, the same for every gate: experts for the MoE gates,
 * every node on the root-to-leaf path for the sign-bit tree (node 0 is the
 * root).  counts and batch (scratch) hold n_matrices each. */
static void route_counts(ccr_net *net, const ccr_dataset *ds, size_t n, size_t *counts,
                         size_t *batch, size_t n_matrices)
{
    memset(counts, 0, n_matrices * sizeof *counts);
    for (size_t i0 = 0; i0 < n; i0 += BATCH) {
        size_t b = n - i0 < BATCH ? n - i0 : BATCH;
        const float *out;
        TRY(ccr_net_forward(net, ds->x + i0 * ds->dim, b, &out));
        ccr_cond *cond;
        TRY(ccr_net_cond(net, COND_LAYER, &cond, NULL));
        TRY(ccr_route_counts(ctx, ccr_cond_route(cond), batch, n_matrices, NULL));
        for (size_t m = 0; m < n_matrices; m++)
            counts[m] += batch[m];
    }
}

static void report(ccr_net *net, const ccr_dataset *test, size_t n_test, double train_loss)
{
    ccr_step_stats ev;
    TRY(ccr_net_eval(net, test->x, test->y, n_test, &ev));
    ccr_layer_info li;
    TRY(ccr_net_layer_info(net, COND_LAYER, &li));
    ccr_flops f = ccr_net_flops(net);
    printf("%-9s params %7zu (cond %6zu)  fwd FLOPs/example %8.0f (cond %7.0f)  "
           "train loss %.3f  test acc %.3f\n", li.kind, ccr_net_n_params(net), li.n_params,
           f.fwd, li.flops_fwd, train_loss, (double)ev.correct / (double)ev.batch);
    ccr_cond *cond;
    TRY(ccr_net_cond(net, COND_LAYER, &cond, NULL));
    size_t m = ccr_gate_n_matrices(ccr_cond_gate(cond));
    size_t *counts = calloc(m, sizeof *counts), *batch = calloc(m, sizeof *batch);
    if (counts == NULL || batch == NULL) {
        fprintf(stderr, "ccr-example: out of memory\n");
        exit(1);
    }
    route_counts(net, test, n_test, counts, batch, m);
    printf("          uses per matrix:");
    for (size_t i = 0; i < m; i++)
        printf(" %zu", counts[i]);
    printf("\n");
    free(batch);
    free(counts);
}

/* ---- 6. a gate on its own -------------------------------------------------------------- */

static void gate_alone(ccr_backend *be, const ccr_dataset *ds, gsl_rng *rng)
{
    ccr_gate_config gc = ccr_gate_config_default();
    gc.d_in = ds->dim;
    gc.n_experts = 4;
    gc.k = 2;
    gc.randomize = true;                 /* random gate weights instead of zeros */
    ccr_gate *g;
    ccr_arena *a;
    TRY(ccr_gate_alloc(ctx, ccr_gate_type_find("topk"), &gc, BATCH, &g));
    TRY(ccr_arena_init(be, &a));
    TRY(ccr_gate_declare(g, a, "gate."));
    TRY(ccr_arena_finalize(a));
    TRY(ccr_gate_init_params(g, rng));
    ccr_route r;
    ccr_gate_stats st;
    TRY(ccr_gate_forward(g, ds->x, 8, false, NULL, &r, &st));
    printf("topk gate alone on 8 examples (%zu slots each):\n", r.slots);
    for (size_t b = 0; b < r.batch; b++) {
        printf("  example %zu:", b);
        for (size_t s = 0; s < r.slots; s++)
            printf("  expert %d weight %.3f", (int)r.ids[b * r.slots + s],
                   (double)r.weights[b * r.slots + s]);
        printf("\n");
    }
    printf("  aux loss %.4f, CV(importance) %.3f, exports:", st.aux_loss, st.cv_importance);
    for (size_t i = 0; i < ccr_gate_n_exports(g); i++) {
        const char *name;
        size_t rank, shape[4];
        const float *data;
        TRY(ccr_gate_get_export(g, i, &name, &rank, shape, &data));
        printf(" %s", name);
    }
    printf("\n");
    ccr_arena_free(a);
    ccr_gate_free(g);
}

int main(int argc, char **argv)
{
    options o = parse(argc, argv);
    if (ccr_ctx_init(&ctx) != CCR_OK)
        return 1;
    ccr_backend *be;
    TRY(ccr_backend_cpu_init(ctx, &be));
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);     /* the library never owns an RNG */
    if (rng == NULL)
        return 1;
    gsl_rng_set(rng, o.seed);

    /* 1. data */
    ccr_dataset *train_set, *test_set;
    if (o.data != NULL && load_fmnist(o.data, &train_set, &test_set)) {
        printf("Fashion-MNIST from %s: %zu train, %zu test\n", o.data, train_set->n,
               test_set->n);
    } else {
        printf("Fashion-MNIST %s%s; synthetic data instead\n",
               o.data ? "not found in " : "not used", o.data ? o.data : "");
        make_synthetic(rng, o.n_train ? o.n_train : 6000, &train_set);
        make_synthetic(rng, o.n_test ? o.n_test : 1000, &test_set);
    }
    size_t n_train = o.n_train && o.n_train < train_set->n ? o.n_train : train_set->n;
    size_t n_test = o.n_test && o.n_test < test_set->n ? o.n_test : test_set->n;
    if (n_train < BATCH || n_test < 8) {
        fprintf(stderr, "ccr-example: too few examples (%zu train, %zu test)\n", n_train, n_test);
        return 1;
    }

    /* 2-4. every gate by name, nothing else changed */
    printf("gates: %s\n", ccr_gate_type_names());
    for (const ccr_gate_type *const *t = ccr_gate_types(); *t != NULL; t++) {
        ccr_net *net = build_net(be, (*t)->name, rng);
        double loss = train(net, train_set, n_train, o.steps, rng);
        report(net, test_set, n_test, loss);
        ccr_net_free(net);
    }

    /* 5. save, load into a fresh network (other initial values), compare */
    char path[4096];
    snprintf(path, sizeof path, "%s/example.safetensors", o.outdir);
    ccr_net *net = build_net(be, "topk", rng);
    train(net, train_set, n_train, o.steps, rng);
    TRY(ccr_net_save(net, path));
    ccr_net *copy = build_net(be, "topk", rng);
    TRY(ccr_net_load(copy, path));        /* CCR_EFORMAT if the architecture differs */
    ccr_step_stats a, b;
    TRY(ccr_net_eval(net, test_set->x, test_set->y, n_test, &a));
    TRY(ccr_net_eval(copy, test_set->x, test_set->y, n_test, &b));
    printf("checkpoint %s: test loss %.6f saved, %.6f loaded\n", path, a.loss, b.loss);
    int rc = a.loss == b.loss && a.correct == b.correct ? 0 : 1;
    if (rc != 0)
        fprintf(stderr, "ccr-example: the loaded network differs from the saved one\n");
    ccr_net_free(copy);
    ccr_net_free(net);

    /* 6. a gate without a network */
    gate_alone(be, test_set, rng);

    ccr_dataset_free(train_set);
    ccr_dataset_free(test_set);
    gsl_rng_free(rng);
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
    return rc;
}
