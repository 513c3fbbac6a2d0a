/*
 * ccr-bench - the speed of one conditional layer against the machine's
 * limits (issue 10).
 *
 * One layer (--gate, its options, --d-in -> --hidden -> --d-out, batch
 * --batch), random gate weights (--randomize: zero weights would send every
 * example to the same experts), Adam on its arena.  Timed as medians over
 * --repeat rounds (one warm-up round first), every measurement once per
 * round, interleaved, so that drift on a shared machine hits them alike:
 *   seconds_fwd     ccr_cond_forward, eval mode
 *   seconds_fwdbwd  ccr_cond_forward (train mode) + ccr_cond_backward
 *   seconds_step    ccr_arena_zero_grad + forward + backward + ccr_optim_step
 * and, in the same rounds, the references:
 *   (a) cblas_sgemm on exactly the expert GEMM shapes the layer executed: per
 *       bank matrix m with n_m examples (ccr_route_counts on the routing
 *       table of the forward), the forward GEMMs ([n_m x d_in][d_in x h],
 *       [n_m x h][h x d_out] for an FFN bank, [n_m x d_in][d_in x d_out] for
 *       a linear one) and the backward ones (dH, dW2, dX, dW1 / dX, dW),
 *       reading the layer's own parameter block, so that the weights read
 *       are as many as the layer reads;
 *   (b) one square sgemm n^3 with the FLOPs of (a), forward + backward;
 *   (c) a dense FFN (gate none) whose hidden width gives the FLOPs of the
 *       expert GEMMs of the forward;
 *   (d) memcpy of a large buffer: the machine's copy bandwidth;
 *   (e) seconds_noise_draws: the N(0, 1) draws a noisy gate's training
 *       forward makes (noise_draws_per_example x batch, the gates' own
 *       gate_noise_fill on the run's RNG): serial under one caller-owned RNG, a floor under the
 *       gate's own time (0 draws for gates without noise).
 * Ratios are speeds relative to the layer: ratio_to_sgemm = time of (a) /
 * seconds_fwdbwd (1 = the layer runs as fast as its own GEMMs alone),
 * ratio_to_dense = time of (c) / seconds_fwdbwd.
 *
 * Phases of the training step (shares of seconds_step): the gate and the
 * optimiser (zero_grad + Adam) are measured alone on the same inputs; the
 * expert GEMMs are (a), measured alone; dispatch/sort + combine (and the
 * activation and the gate's backward) are the remainder, derived, not
 * measured.
 *
 * Sign-bit tree: per level l of a path tree (heap numbering, matrices
 * 2^l - 1 .. 2^(l+1) - 2; a leaf tree has one entry, its leaves) the
 * seconds the layer's own timing (ccr_cond_set_timing) gives during the
 * timed forward+backward rounds, means over the rounds: level_seconds_fwd,
 * level_seconds_bwd and level_seconds_dots (the straight-through sibling
 * evaluations), thread-seconds of group_threads threads running at once.
 * Two clock reads per node matrix and pass.  seconds_fwdbwd_mean is the
 * mean of the same rounds (the levels' means add up to less).
 *
 * --peer: PyTorch peers of the same layer (analysis/peer_torch.py, run by
 * /usr/bin/python3; --peer-script names the script, default the source
 * tree's analysis/peer_torch.py, CCR_PEER_SCRIPT), same sizes and
 * thread count, called once per timed round after ccr's measurements of that
 * round (so ccr's rounds alternate with the peer's), each call timing one
 * forward+backward per peer after its own warm-up.  Records per peer the
 * median seconds and ratio_to_peer_<name> = peer time / seconds_fwdbwd (> 1:
 * ccr faster); a gate the peer does not implement is recorded as
 * peer_supported false, without ratios.  Without python3 or torch, --peer is
 * a usage error (exit 2).
 *
 * --backend cuda: the layer runs on CUDA device 0 (x, dy and the packed
 * activations in device memory, every timed statement followed by a device
 * synchronisation), the references (a) and (b) are cuBLAS sgemm of the same
 * shapes through ccr_backend_gemm, (c) the dense FFN on the same device;
 * (d) and (e) stay on the host (the gates draw their noise on the host from
 * the caller's RNG, on either backend).  The gate alone (seconds_gate*) and
 * the per-level tree timing are CPU-only measurements (a gate's device half
 * has no public entry point): on CUDA the record has
 * phase_gate_dispatch_combine, the step minus expert GEMMs and optimiser.
 * --math tf32|bf16 lets cuBLAS use tensor cores (layer and references alike;
 * ccr_backend_set_math).
 * --peer times PyTorch on the CPU and is refused with --backend cuda.
 *
 * Under mpirun (P > 1): bench_ranks, the expert-parallel layer alone (no
 * references, no peers).
 *
 * A summary goes to stdout, one JSONL record per run to --out.
 */
#define _POSIX_C_SOURCE 200809L
#include <gsl/gsl_rng.h>
#include <math.h>
#include <stdint.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "arena_impl.h" // provides: ccr_arena_sparse_of (which tensors are banks)
#include "common.h"
#include "gate_util.h" // provides: gate_noise_fill (the noisy gates' draws)
#include "internal.h"  // provides: ccr_malloc3, ccr_mallocn, ccr_mul_ok, ccr_mul3_ok
#include "outputs.h"

#ifndef CCR_PEER_SCRIPT   /* set by experiments/meson.build: the source tree's copy */
#define CCR_PEER_SCRIPT "analysis/peer_torch.py"
#endif
#define PROG "ccr-bench"
#define MAXDIM ((size_t)1 << 20)
#define MAXBATCH ((size_t)1 << 24)

typedef struct opts {
    ccr_cond_config cc;
    size_t batch, threads, repeat, copy_mib;
    unsigned long seed;
    bool quick, peer, cuda;
    ccr_math math;
    const char *out, *peer_script;
} opts;

static void usage(void)
{
    printf("usage: ccr-bench [--gate NAME] [gate options] [--batch N] [--d-in N]\n"
           "                 [--hidden N] [--d-out N] [--threads N] [--repeat N]\n"
           "                 [--seed N] [--out FILE] [--peer] [--peer-script FILE]\n"
           "                 [--backend cpu|cuda] [--math fp32|tf32|bf16]\n"
           "                 [--quick] [--help]\n"
           "Times one conditional layer (forward, forward+backward, training step with\n"
           "Adam; medians over --repeat) against cblas_sgemm on the expert GEMM shapes it\n"
           "executed, a square sgemm of the same FLOPs, a dense FFN of equal FLOPs and a\n"
           "memcpy; phase shares of the step.  One JSONL record with --out.\n\n"
           "  --batch N    examples per batch [4096]\n"
           "  --d-in N     layer input width [512]\n"
           "  --hidden N   hidden width of an FFN expert [1024]\n"
           "  --d-out N    layer output width [512]\n"
           "  --threads N  OpenBLAS threads (default: OpenBLAS's own)\n"
           "  --repeat N   timed rounds, medians reported [5]\n"
           "  --seed N     GSL seed (parameters, inputs, noise) [1]\n"
           "  --out FILE   JSONL output\n"
           "  --peer       also time PyTorch peers of the layer (needs /usr/bin/python3\n"
           "               with torch; topk, dense, switch, hmoe over an FFN bank,\n"
           "               signtree (projection bits) over a linear bank): ratio_to_peer_*\n"
           "  --peer-script FILE  the peers' script [" CCR_PEER_SCRIPT "]\n"
           "  --backend NAME  cpu | cuda (device 0) [cpu]\n"
           "  --math NAME  GEMM arithmetic: fp32, or on CUDA tf32 | bf16 (tensor cores,\n"
           "               float storage) [fp32]\n"
           "  --quick      tiny sizes, a smoke run\n"
           "Gate options (gates: %s; defaults here: topk, E = 64, k = 4, --randomize):\n%s",
           ccr_gate_type_names(), drv_gate_usage);
}

static void parse(int argc, char **argv, opts *o)
{
    bool quick = drv_quick_requested(argc, argv), bank_set = false;
    *o = (opts){.batch = 4096, .repeat = 5, .seed = 1, .quick = quick, .copy_mib = 256,
                .peer_script = CCR_PEER_SCRIPT};
    o->cc = drv_gate_defaults();
    o->cc.gate = ccr_gate_type_find("topk");
    o->cc.d_in = o->cc.d_out = 512;
    o->cc.hidden = 1024;
    o->cc.gate_cfg.n_experts = 64;
    o->cc.gate_cfg.k = 4;
    o->cc.gate_cfg.randomize = true;
    if (quick) {
        o->batch = 64, o->repeat = 3, o->copy_mib = 8;
        o->cc.d_in = o->cc.d_out = o->cc.hidden = 16;
        o->cc.gate_cfg.n_experts = 8;
        o->cc.gate_cfg.k = 2;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool used_value;
        if (drv_parse_common(PROG, a, usage))
            continue;  /* --quick: applied above */
        if (drv_parse_gate_option(PROG, a, v, &o->cc, &used_value)) {
            bank_set |= strcmp(a, "--bank") == 0;
            i += used_value;
            continue;
        }
        if (strcmp(a, "--peer") == 0) {
            o->peer = true;
            continue;
        }
        if (drv_parse_backend(PROG, a, v, &o->cuda)) {
            i++;
            continue;
        }
        if (v == NULL)
            drv_bad_option(PROG, a, v);
        i++;
        if (strcmp(a, "--out") == 0) {
            if (v[0] == '\0')
                drv_usage_error(PROG, "--out needs a file name");
            o->out = v;
        } else if (strcmp(a, "--peer-script") == 0) {
            if (v[0] == '\0')
                drv_usage_error(PROG, "--peer-script needs a file name");
            o->peer_script = v;
        } else if (strcmp(a, "--math") == 0) {
            if (strcmp(v, "fp32") == 0) o->math = CCR_MATH_FP32;
            else if (strcmp(v, "tf32") == 0) o->math = CCR_MATH_TF32;
            else if (strcmp(v, "bf16") == 0) o->math = CCR_MATH_BF16;
            else drv_usage_error(PROG, "--math must be fp32, tf32 or bf16");
        } else if (strcmp(a, "--batch") == 0) o->batch = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--d-in") == 0) o->cc.d_in = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--d-out") == 0) o->cc.d_out = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--hidden") == 0) o->cc.hidden = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--threads") == 0) o->threads = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--repeat") == 0) o->repeat = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--seed") == 0) o->seed = drv_parse_seed(PROG, a, v);
        else drv_bad_option(PROG, a, v);
    }
    drv_gate_finish(PROG, &o->cc, bank_set);
    o->cc.gate_cfg.d_in = o->cc.d_in;
    if (o->batch > MAXBATCH)
        drv_usage_error(PROG, "--batch %zu is too large (at most %zu)", o->batch, MAXBATCH);
    if (o->cc.d_in > MAXDIM || o->cc.d_out > MAXDIM || o->cc.hidden > MAXDIM)
        drv_usage_error(PROG, "--d-in, --hidden and --d-out must be at most %zu", MAXDIM);
    if (o->threads > 1024)
        drv_usage_error(PROG, "--threads %zu is too large (at most 1024)", o->threads);
    if (o->repeat > 100000)
        drv_usage_error(PROG, "--repeat %zu is too large (at most 100000)", o->repeat);
    if (o->cuda && o->peer)
        drv_usage_error(PROG, "--peer times PyTorch on the CPU: not with --backend cuda");
    if (o->math != CCR_MATH_FP32 && !o->cuda)
        drv_usage_error(PROG, "--math tf32 and bf16 need --backend cuda");
}

/* Uniform with mean 0 and variance 1 (gsl_randist.h and cblas.h clash). */
static float unit(gsl_rng *rng)
{
    return (float)((2.0 * gsl_rng_uniform(rng) - 1.0) * 1.7320508075688772);
}

/* A layer with its own arena, initialised; optionally Adam on it. */
typedef struct layer {
    ccr_cond *c;
    ccr_arena *a;
    ccr_optim *opt;
} layer;

static void layer_free(layer *l)
{
    ccr_optim_free(l->opt);
    ccr_arena_free(l->a);
    ccr_cond_free(l->c);
    *l = (layer){0};
}

static ccr_status layer_make(ccr_backend *be, const ccr_cond_config *cc, size_t B, gsl_rng *rng,
                             bool adam, layer *l)
{
    *l = (layer){0};
    ccr_status s = ccr_cond_alloc(be, cc, B, &l->c);
    if (s == CCR_OK) s = ccr_arena_init(be, &l->a);
    if (s == CCR_OK) s = ccr_cond_declare(l->c, l->a, "");
    if (s == CCR_OK) s = ccr_arena_finalize(l->a);
    if (s == CCR_OK) s = ccr_cond_init_params(l->c, rng);
    if (s == CCR_OK && adam) {
        ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
        s = ccr_optim_init(l->a, &oc, &l->opt);
    }
    if (s != CCR_OK)
        layer_free(l);
    return s;
}

/* The expert GEMMs of one batch, as the bank executed them (counts per
 * matrix), on packed activations; weights and weight gradients are slices
 * of the layer's parameter and gradient blocks (matrix m at its own
 * offset, so all used matrices are read).  Returns the FLOPs. */
typedef struct shapes {
    ccr_backend *dev;      /* NULL: cblas_sgemm on host memory; else this backend's GEMM */
    ccr_status *err;       /* the first GEMM error on dev */
    const size_t *counts;
    size_t n_mat, d_in, h, d_out;
    bool ffn;
    const float *w;
    float *gw;
    size_t n_params;
    float *x, *hid, *y, *dhid, *dx;  /* packed, rows = routed pairs */
} shapes;

/* One row-major sgemm of (a): cblas on the CPU, the backend's GEMM (cuBLAS)
 * otherwise. */
static void sg(const shapes *s, bool ta, bool tb, int m, int n, int k, const float *a, int lda,
               const float *b, int ldb, float *c, int ldc)
{
    if (s->dev == NULL) {
        cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                    m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
        return;
    }
    ccr_status st = ccr_backend_gemm(s->dev, ta, tb, (size_t)m, (size_t)n, (size_t)k, 1.0f, a,
                                     (size_t)lda, b, (size_t)ldb, 0.0f, c, (size_t)ldc);
    if (*s->err == CCR_OK)
        *s->err = st;
}

static double gemm_shapes(const shapes *s, bool bwd)
{
    const int di = (int)s->d_in, h = (int)s->h, dout = (int)s->d_out;
    const size_t msize = s->ffn ? s->d_in * s->h + s->h * s->d_out : s->d_in * s->d_out;
    const size_t span = s->n_params >= msize ? s->n_params - msize + 1 : 1;
    double flops = 0;
    size_t row = 0;
    for (size_t m = 0; m < s->n_mat; m++) {
        const int n = (int)s->counts[m];
        if (n == 0)
            continue;
        const size_t off = (m * msize) % span;
        const float *w1 = s->w + off, *w2 = w1 + s->d_in * s->h;
        float *g1 = s->gw + off, *g2 = g1 + s->d_in * s->h;
        const float *x = s->x + row * s->d_in;
        float *y = s->y + row * s->d_out, *dx = s->dx + row * s->d_in;
        if (s->ffn) {
            float *hid = s->hid + row * s->h, *dh = s->dhid + row * s->h;
            sg(s, false, false, n, h, di, x, di, w1, h, hid, h);
            sg(s, false, false, n, dout, h, hid, h, w2, dout, y, dout);
            flops += 2.0 * n * ((double)di * h + (double)h * dout);
            if (bwd) {  /* y plays dY */
                sg(s, false, true, n, h, dout, y, dout, w2, dout, dh, h);
                sg(s, true, false, h, dout, n, hid, h, y, dout, g2, dout);
                sg(s, false, true, n, di, h, dh, h, w1, h, dx, di);
                sg(s, true, false, di, h, n, x, di, dh, h, g1, h);
                flops += 4.0 * n * ((double)di * h + (double)h * dout);
            }
        } else {
            sg(s, false, false, n, dout, di, x, di, w1, dout, y, dout);
            flops += 2.0 * n * (double)di * dout;
            if (bwd) {
                sg(s, false, true, n, di, dout, y, dout, w1, dout, dx, di);
                sg(s, true, false, di, dout, n, x, di, y, dout, g1, dout);
                flops += 4.0 * n * (double)di * dout;
            }
        }
        row += (size_t)n;
    }
    return flops;
}

/* --peer: the PyTorch peers (analysis/peer_torch.py). */
#define PEER_PY "/usr/bin/python3"
enum { PEER_N = 3 };
static const char *const peer_name[PEER_N] = {"conventional", "strong_autograd", "strong"};
static const char *const peer_sec_key[PEER_N] = {
    "seconds_peer_conventional", "seconds_peer_strong_autograd", "seconds_peer_strong"};
static const char *const peer_ratio_key[PEER_N] = {
    "ratio_to_peer_conventional", "ratio_to_peer_strong_autograd", "ratio_to_peer_strong"};

/* Whether the peers implement this layer. */
static bool peer_supported(const opts *o)
{
    static const char *const gates[] = {"topk", "dense", "switch", "hmoe"};
    if (strcmp(o->cc.gate->name, "signtree") == 0)
        return o->cc.bank == CCR_BANK_LINEAR && o->cc.gate_cfg.bits_from == CCR_BITS_PROJECTION;
    if (o->cc.bank != CCR_BANK_FFN)
        return false;
    for (size_t i = 0; i < sizeof gates / sizeof gates[0]; i++)
        if (strcmp(o->cc.gate->name, gates[i]) == 0)
            return true;
    return false;
}

/* Before any output: python3 with torch present, the script readable. */
static void peer_check(const opts *o)
{
    if (access(PEER_PY, X_OK) != 0)
        drv_usage_error(PROG, "--peer needs %s with PyTorch; %s is missing", PEER_PY, PEER_PY);
    if (strchr(o->peer_script, '\'') != NULL || access(o->peer_script, R_OK) != 0)
        drv_usage_error(PROG, "--peer: cannot read the peers' script %s (see --peer-script)",
                        o->peer_script);
    if (system(PEER_PY " -c 'import torch' >/dev/null 2>&1") != 0)
        drv_usage_error(PROG, "--peer needs PyTorch: '%s -c \"import torch\"' fails", PEER_PY);
}

/* One call of the peers' script (its own warm-up, then one timed forward +
 * backward per peer): seconds per peer.  False on any failure. */
static bool peer_run(const opts *o, size_t threads, double sec[PEER_N])
{
    char cmd[4096], line[4096];
    int n = snprintf(cmd, sizeof cmd,
                     PEER_PY " '%s' --gate %s --experts %zu --k %zu --groups %zu"
                     " --k-groups %zu --k2 %zu --capacity-factor %.17g --depth %zu --combine %s"
                     " --grad-mode %s --batch %zu --d-in %zu --hidden %zu --d-out %zu"
                     " --threads %zu --repeat 1 --seed %lu",
                     o->peer_script, o->cc.gate->name, o->cc.gate_cfg.n_experts,
                     o->cc.gate_cfg.k, o->cc.gate_cfg.n_groups, o->cc.gate_cfg.k_groups,
                     o->cc.gate_cfg.k2, o->cc.gate_cfg.capacity_factor, o->cc.gate_cfg.depth,
                     o->cc.gate_cfg.combine == CCR_COMBINE_LEAF ? "leaf" : "path",
                     o->cc.gate_cfg.grad_mode == CCR_GRAD_STE ? "ste" : "none", o->batch,
                     o->cc.d_in, o->cc.hidden, o->cc.d_out, threads, o->seed);
    if (n < 0 || (size_t)n >= sizeof cmd)
        return false;
    fflush(NULL);
    FILE *f = popen(cmd, "r");
    if (f == NULL)
        return false;
    bool got = fgets(line, sizeof line, f) != NULL;
    char rest[256];
    while (fgets(rest, sizeof rest, f) != NULL)
        ;
    if (pclose(f) != 0 || !got)
        return false;
    for (int k = 0; k < PEER_N; k++) {
        char key[64];
        snprintf(key, sizeof key, "\"%s\": ", peer_name[k]);
        const char *p = strstr(line, key);
        char *end;
        if (p == NULL)
            return false;
        p += strlen(key);
        sec[k] = strtod(p, &end);
        if (end == p || !isfinite(sec[k]) || sec[k] <= 0)
            return false;
    }
    return true;
}

/* Measurements, one slot per round each. */
enum {
    T_FWD, T_FWDBWD, T_STEP, T_GATE, T_GATE_TRAIN, T_ZERO, T_ADAM, T_SG_FWD, T_SG_FWDBWD,
    T_SQUARE, T_DENSE_FWD, T_DENSE_FWDBWD, T_COPY, T_DRAWS, T_COUNT
};
static const char *const t_name[T_COUNT] = {
    "seconds_fwd", "seconds_fwdbwd", "seconds_step", "seconds_gate", "seconds_gate_train",
    "seconds_zero_grad", "seconds_adam", "seconds_sgemm_shapes_fwd",
    "seconds_sgemm_shapes_fwdbwd", "seconds_sgemm_square", "seconds_dense_fwd",
    "seconds_dense_fwdbwd", "seconds_copy", "seconds_noise_draws"};

/* N(0, 1) draws per example of a noisy gate's training forward (topk: one
 * per expert; hmoe: the primary's a and the bs of each of its k selected
 * groups), 0 for the gates that draw nothing. */
static size_t noise_draws_per_example(const ccr_cond_config *cc)
{
    const ccr_gate_config *g = &cc->gate_cfg;
    if (strcmp(cc->gate->name, "topk") == 0)
        return g->n_experts;
    if (strcmp(cc->gate->name, "hmoe") == 0 && g->n_groups > 0)
        return g->n_groups + g->k_groups * (g->n_experts / g->n_groups);
    return 0;
}

/* Times stmt into slot; on CUDA the device is synchronised before the clock
 * stops (a failed synchronisation lands in s). */
#define TIMED(slot, stmt)                                   \
    do {                                                    \
        double t0_ = drv_now();                             \
        stmt;                                               \
        if (o.cuda) {                                       \
            ccr_status sync_ = ccr_backend_synchronize(be); \
            if (s == CCR_OK)                                \
                s = sync_;                                  \
        }                                                   \
        tv[(slot) * R + r] = drv_now() - t0_;               \
    } while (0)

/* Under mpirun (P > 1 processes): the expert-parallel layer alone.  Each
 * rank runs its share [lo, lo + b) of the global batch; every round times
 * the forward, forward + backward and the step (zero_grad, forward,
 * backward, the gate's gradients summed over the ranks, Adam), one
 * synchronised round after another (a fixed count: the ranks' collectives
 * pair up); the single-process references are not run.  Rank 0 records
 * ranks, the medians, GFLOP/s of the global batch and its own communication
 * per forward + backward. */
static void bench_ranks(const opts *o, ccr_ctx *ctx, ccr_backend *be, gsl_rng *rng,
                        ccr_comm *comm, ccr_jsonl *out, ccr_record *rec)
{
    const size_t P = (size_t)ccr_comm_size(comm), rk = (size_t)ccr_comm_rank(comm);
    const size_t B = o->batch, di = o->cc.d_in, dout = o->cc.d_out, R = o->repeat;
    const size_t lo = B * rk / P, b = B * (rk + 1) / P - lo;
    layer L = {0};
    ccr_status s = ccr_cond_alloc(be, &o->cc, b, &L.c);
    if (s == CCR_OK) s = ccr_cond_set_comm(L.c, comm);
    if (s == CCR_OK) s = ccr_arena_init(be, &L.a);
    if (s == CCR_OK) {  /* a rank owning no matrix of gate none: not empty */
        size_t one = 1, idx;
        s = ccr_arena_add(L.a, "pad", 1, &one, &idx);
    }
    if (s == CCR_OK) s = ccr_cond_declare(L.c, L.a, "");
    if (s == CCR_OK) s = ccr_arena_finalize(L.a);
    if (s == CCR_OK) s = ccr_cond_init_params(L.c, rng);
    ccr_optim_config oc = ccr_optim_defaults(CCR_OPTIM_ADAM);
    if (s == CCR_OK) s = ccr_optim_init(L.a, &oc, &L.opt);
    if (s != CCR_OK)
        drv_fail(PROG, ctx, s, "layer");
    size_t nx, ny;
    if (!ccr_mul_ok(B, di, &nx) || !ccr_mul_ok(B, dout, &ny))
        drv_fail(PROG, ctx, ccr_mem_check(ctx, SIZE_MAX, "buffers"), "buffers");
    float *hx = ccr_malloc3(nx, 1, sizeof *hx), *hdy = ccr_malloc3(ny, 1, sizeof *hdy);
    float *y = ccr_malloc3(b, dout, sizeof *y), *dx = ccr_malloc3(b, di, sizeof *dx);
    double *tv = ccr_malloc3(3, R, sizeof *tv), *cv = ccr_malloc3(4, R, sizeof *cv);
    if (!hx || !hdy || !y || !dx || !tv || !cv)
        drv_fail(PROG, ctx, CCR_ENOMEM, "buffers");
    for (size_t i = 0; i < nx; i++)  /* the global batch, the same on every rank */
        hx[i] = unit(rng);
    for (size_t i = 0; i < ny; i++)
        hdy[i] = unit(rng);
    const float *x = hx + lo * di, *dy = hdy + lo * dout;
    ccr_gate_stats st;
    const size_t g0 = ccr_arena_count(L.a);
    for (size_t round = 0; round <= R && s == CCR_OK; round++) {
        const size_t r = round == 0 ? 0 : round - 1;  /* round 0: warm-up */
        double t0 = drv_now();
        s = ccr_cond_forward(L.c, x, b, false, rng, y, &st);
        tv[r] = drv_now() - t0;
        ccr_comm_stats_reset(comm);
        t0 = drv_now();
        if (s == CCR_OK) s = ccr_cond_forward(L.c, x, b, true, rng, y, &st);
        if (s == CCR_OK) s = ccr_cond_backward(L.c, dy, dx);
        tv[R + r] = drv_now() - t0;
        ccr_comm_stats cs;
        ccr_comm_stats_get(comm, &cs);
        cv[r] = cs.alltoall_bytes, cv[R + r] = cs.allreduce_bytes;
        cv[2 * R + r] = cs.alltoall_seconds, cv[3 * R + r] = cs.allreduce_seconds;
        t0 = drv_now();
        if (s == CCR_OK) s = ccr_arena_zero_grad(L.a);
        if (s == CCR_OK) s = ccr_cond_forward(L.c, x, b, true, rng, y, &st);
        if (s == CCR_OK) s = ccr_cond_backward(L.c, dy, dx);
        /* The replicated tensors' gradients (all but the bank's) summed. */
        for (size_t i = 0; i < g0 && s == CCR_OK; i++)
            if (ccr_arena_sparse_of(L.a, i) == NULL)
                s = ccr_comm_allreduce_sum(comm, ccr_arena_grad(L.a, i), ccr_arena_size(L.a, i));
        if (s == CCR_OK) s = ccr_optim_step(L.opt);
        tv[2 * R + r] = drv_now() - t0;
    }
    if (s != CCR_OK)
        drv_fail(PROG, ctx, s, "timing");
    double t[3], c[4];
    for (int k = 0; k < 3; k++)
        t[k] = drv_median(tv + (size_t)k * R, R);
    for (int k = 0; k < 4; k++)
        c[k] = drv_median(cv + (size_t)k * R, R);
    const double f = (ccr_cond_flops(L.c, true) + ccr_cond_flops_bwd(L.c, true)) * (double)B;
    ccr_record_clear(rec);
    s = drv_record_base(rec, PROG, be, o->seed);
#define ADD_I(k, v) if (s == CCR_OK) s = ccr_record_add_int(rec, k, (int64_t)(v))
#define ADD_D(k, v) if (s == CCR_OK) s = ccr_record_add_double(rec, k, v)
    if (s == CCR_OK) s = drv_record_gate(rec, &o->cc);
    ADD_I("d_in", di);
    ADD_I("hidden", o->cc.hidden);
    ADD_I("d_out", dout);
    ADD_I("batch", B);
    ADD_I("ranks", P);
    ADD_I("repeat", R);
    if (s == CCR_OK) s = ccr_record_add_bool(rec, "quick", o->quick);
    ADD_I("params", ccr_cond_n_params(L.c));
    ADD_D("seconds_fwd", t[0]);
    ADD_D("seconds_fwdbwd", t[1]);
    ADD_D("seconds_step", t[2]);
    ADD_D("flops_fwdbwd", f);
    ADD_D("gflops", f / t[1] * 1e-9);
    ADD_D("alltoall_bytes_fwdbwd", c[0]);
    ADD_D("alltoall_bytes_per_step", c[0]);   /* the drivers' common names: */
    ADD_D("allreduce_bytes_per_step", c[1]);  /* one fwd+bwd is the step here */
    ADD_D("seconds_alltoall", c[2]);
    ADD_D("seconds_allreduce", c[3]);
    ADD_D("seconds_compute", t[1] - c[2] - c[3] > 0 ? t[1] - c[2] - c[3] : 0.0);
    ADD_D("allreduce_bytes_fwdbwd", c[1]);
    ADD_D("seconds_alltoall_fwdbwd", c[2]);
    ADD_D("seconds_allreduce_fwdbwd", c[3]);
#undef ADD_I
#undef ADD_D
    drv_write_record(PROG, ctx, s, out, rec);
    if (rk == 0) {
        printf("%s %s B=%zu (%zu ranks) d_in=%zu h=%zu d_out=%zu %s\n", PROG, o->cc.gate->name, B,
               P, di, o->cc.hidden, dout, ccr_backend_describe(be));
        printf("  fwd %.3f ms  fwd+bwd %.3f ms (%.1f GFLOP/s)  step %.3f ms; all-to-all %.3f ms, "
               "all-reduce %.3f ms of fwd+bwd (rank 0)\n", t[0] * 1e3, t[1] * 1e3,
               f / t[1] * 1e-9, t[2] * 1e3, c[2] * 1e3, c[3] * 1e3);
    }
    free(hx), free(hdy), free(y), free(dx), free(tv), free(cv);
    layer_free(&L);
}

int main(int argc, char **argv)
{
    opts o;
    parse(argc, argv, &o);
    const int P = drv_launcher_size();
    if (P > 1 && (o.cuda || o.peer))
        drv_usage_error(PROG, "under mpirun (%d processes): no --backend cuda, no --peer", P);
    if ((size_t)P > o.batch)
        drv_usage_error(PROG, "--batch %zu is smaller than the %d processes", o.batch, P);
    if (P > 1 && drv_launcher_rank() != 0)
        o.out = NULL;  /* rank 0 writes */
    drv_io_output("--out", o.out);
    drv_io_check(PROG);
    if (o.peer)
        peer_check(&o);
    ccr_ctx *ctx;
    ccr_backend *be;
    gsl_rng *rng;
    if (o.threads > 0)  /* before the backend, which describes the thread count */
        openblas_set_num_threads((int)o.threads);
    drv_setup(PROG, o.cuda, o.seed, &ctx, &be, &rng);
    ccr_comm *comm = drv_comm_start(PROG, ctx);  /* NULL in one process */
    if (comm != NULL) {
        ccr_jsonl *out;
        ccr_record *rec;
        drv_open_out(PROG, ctx, o.out, &rec, &out);
        bench_ranks(&o, ctx, be, rng, comm, out, rec);
        drv_comm_end(comm);
        drv_teardown(PROG, ctx, be, rng, out, rec);
        return 0;
    }
    ccr_status ms = ccr_backend_set_math(be, o.math);
    if (ms != CCR_OK)
        drv_fail(PROG, ctx, ms, "--math");
    const size_t B = o.batch, di = o.cc.d_in, dout = o.cc.d_out;
    const bool ffn = o.cc.bank == CCR_BANK_FFN;
    const size_t h = ffn ? o.cc.hidden : 0;

    /* Validate the configuration before any output exists. */
    ccr_cond *probe;
    ccr_status s = ccr_cond_alloc(be, &o.cc, B, &probe);
    if (s == CCR_EINVAL)
        drv_usage_error(PROG, "%s", ccr_ctx_errmsg(ctx));
    if (s != CCR_OK)
        drv_fail(PROG, ctx, s, "layer");
    ccr_cond_free(probe);

    ccr_jsonl *out;
    ccr_record *rec;
    drv_open_out(PROG, ctx, o.out, &rec, &out);

    layer L;
    if ((s = layer_make(be, &o.cc, B, rng, true, &L)) != CCR_OK)
        drv_fail(PROG, ctx, s, "layer");
    ccr_gate *g = ccr_cond_gate(L.c);
    const size_t n_mat = ccr_gate_n_matrices(g);
    const ccr_route *route = ccr_cond_route(L.c);

    /* Inputs and buffers. */
    size_t nx, ny;
    if (!ccr_mul_ok(B, di, &nx) || !ccr_mul_ok(B, dout, &ny))
        drv_fail(PROG, ctx, ccr_mem_check(ctx, SIZE_MAX, "buffers"), "buffers");
    float *hx = ccr_malloc3(nx, 1, sizeof *hx), *hdy = ccr_malloc3(ny, 1, sizeof *hdy);
    size_t *counts = ccr_malloc3(n_mat, 2, sizeof *counts);
    double *tv = ccr_malloc3(T_COUNT, o.repeat, sizeof *tv);
    double *pv = ccr_malloc3(PEER_N, o.repeat, sizeof *pv);
    if (!hx || !hdy || !counts || !tv || !pv)
        drv_fail(PROG, ctx, CCR_ENOMEM, "buffers");
    for (size_t i = 0; i < nx; i++)
        hx[i] = unit(rng);
    for (size_t i = 0; i < ny; i++)
        hdy[i] = unit(rng);
    /* The layer's inputs and outputs in backend memory (device on CUDA). */
    float *x = drv_backend_floats(PROG, ctx, be, nx, hx);
    float *dx = drv_backend_floats(PROG, ctx, be, nx, NULL);
    float *dy = drv_backend_floats(PROG, ctx, be, ny, hdy);
    float *y = drv_backend_floats(PROG, ctx, be, ny, NULL);

    /* The routing of this batch, eval and train mode: the shapes of (a). */
    ccr_gate_stats st;
    size_t *cnt_ev = counts, *cnt_tr = counts + n_mat, routed_ev = 0, routed_tr = 0;
    s = ccr_cond_forward(L.c, x, B, false, rng, y, &st);
    if (s == CCR_OK) s = ccr_route_counts(ctx, route, cnt_ev, n_mat, &routed_ev);
    if (s == CCR_OK) s = ccr_cond_forward(L.c, x, B, true, rng, y, &st);
    if (s == CCR_OK) s = ccr_route_counts(ctx, route, cnt_tr, n_mat, &routed_tr);
    if (s != CCR_OK)
        drv_fail(PROG, ctx, s, "routing");
    /* Packed activations of (a): rows = routed pairs. */
    const size_t slots_max = routed_ev > routed_tr ? routed_ev : routed_tr;
    size_t pmax;
    if (!ccr_mul_ok(slots_max, 2 * di + dout + 2 * h, &pmax))
        drv_fail(PROG, ctx, ccr_mem_check(ctx, SIZE_MAX, "packed rows"), "buffers");
    float *pk = ccr_malloc3(pmax > 0 ? pmax : 1, 1, sizeof *pk);
    if (pk == NULL)
        drv_fail(PROG, ctx, CCR_ENOMEM, "buffers");
    for (size_t i = 0; i < pmax; i++)
        pk[i] = 0.1f * unit(rng);
    float *pkd = o.cuda ? drv_backend_floats(PROG, ctx, be, pmax, pk) : pk;
    ccr_status gerr = CCR_OK;  /* the first error of a reference GEMM on CUDA */
    size_t used_ev = 0, max_ev = 0;
    for (size_t m = 0; m < n_mat; m++)
        used_ev += cnt_ev[m] > 0, max_ev = cnt_ev[m] > max_ev ? cnt_ev[m] : max_ev;
    shapes sh = {.dev = o.cuda ? be : NULL, .err = &gerr, .n_mat = n_mat, .d_in = di, .h = h,
                 .d_out = dout, .ffn = ffn, .w = ccr_arena_values(L.a), .gw = ccr_arena_grads(L.a),
                 .n_params = ccr_arena_n_params(L.a)};
    sh.x = pkd, sh.y = sh.x + slots_max * di, sh.dx = sh.y + slots_max * dout;
    sh.hid = sh.dx + slots_max * di, sh.dhid = sh.hid + slots_max * h;
    shapes sh_ev = sh, sh_tr = sh;
    sh_ev.counts = cnt_ev, sh_tr.counts = cnt_tr;
    const double f_sg_fwd = gemm_shapes(&sh_ev, false), f_sg_fwdbwd = gemm_shapes(&sh_tr, true);

    /* (b) a square sgemm of the FLOPs of (a), forward + backward. */
    size_t sq = (size_t)llround(cbrt(f_sg_fwdbwd / 2.0));
    sq = sq < 1 ? 1 : sq > 16384 ? 16384 : sq;
    size_t sq3 = 0;
    float *sa = ccr_mul3_ok(3, sq, sq, &sq3) ? ccr_mallocn(sq3, sizeof(float)) : NULL;
    /* (c) the dense FFN whose expert FLOPs equal those of the forward. */
    ccr_cond_config dc = ccr_cond_config_default();
    dc.gate = ccr_gate_type_find("none");
    dc.d_in = di, dc.d_out = dout, dc.gate_cfg.d_in = di;
    dc.bank = CCR_BANK_FFN;
    double hd = f_sg_fwd / (double)B / (2.0 * (double)(di + dout));
    dc.hidden = hd < 1 ? 1 : (size_t)llround(hd);
    layer D;
    if ((s = layer_make(be, &dc, B, rng, false, &D)) != CCR_OK)
        drv_fail(PROG, ctx, s, "dense layer");
    /* (e) the noisy gate's Gaussian draws alone (gsl_ran_gaussian_ziggurat,
     * as the gates draw them): B x draws per example, one RNG, in order. */
    const size_t dpe = noise_draws_per_example(&o.cc);
    size_t n_draws = 0;
    if (!ccr_mul_ok(B, dpe, &n_draws))
        drv_fail(PROG, ctx, ccr_mem_check(ctx, SIZE_MAX, "draws"), "buffers");
    float *draws = ccr_mallocn(n_draws > 0 ? n_draws : 1, sizeof *draws);
    if (draws == NULL)
        drv_fail(PROG, ctx, CCR_ENOMEM, "buffers");
    /* (d) a copy buffer. */
    const size_t copy_bytes = o.copy_mib << 20;
    char *cp = ccr_mallocn(2, copy_bytes);
    if (sa == NULL || cp == NULL)
        drv_fail(PROG, ctx, CCR_ENOMEM, "buffers");
    memset(cp, 1, 2 * copy_bytes);
    for (size_t i = 0; i < 2 * sq * sq; i++)
        sa[i] = (float)((i % 13) - 6) * 0.01f;
    float *sad = o.cuda ? drv_backend_floats(PROG, ctx, be, sq3, sa) : sa;

    fprintf(stderr, "%s: %s | %s | gate=%s B=%zu d_in=%zu h=%zu d_out=%zu repeat=%zu\n", PROG,
            ccr_backend_describe(be), drv_machine(), o.cc.gate->name, B, di, h, dout, o.repeat);
    const size_t R = o.repeat, isq = sq;
    /* Per-level timing of the sign-bit tree (see the header). */
    const bool tree = !o.cuda && strcmp(o.cc.gate->name, "signtree") == 0;
    const bool path = tree && o.cc.gate_cfg.combine == CCR_COMBINE_PATH;
    const size_t levels = path ? o.cc.gate_cfg.depth + 1 : 1; /* leaf: one, the leaves */
    double *tsec = tree ? ccr_malloc3(n_mat, 3, sizeof *tsec) : NULL;
    if (tree && tsec == NULL)
        drv_fail(PROG, ctx, CCR_ENOMEM, "buffers");
    if (tree)
        memset(tsec, 0, 3 * n_mat * sizeof *tsec);
    size_t group_threads = 0;
    const bool peer_on = o.peer && peer_supported(&o);
    const size_t peer_threads = o.threads > 0 ? o.threads : (size_t)ccr_blas_num_threads();
    double t_start = drv_now();
    for (size_t round = 0; round <= R && s == CCR_OK; round++) {
        const size_t r = round == 0 ? 0 : round - 1;  /* round 0: warm-up, overwritten */
        drv_progress("rounds", round, R + 1, t_start, o.cc.gate->name);
        TIMED(T_FWD, s = ccr_cond_forward(L.c, x, B, false, rng, y, &st));
        if (s == CCR_OK && tree && round > 0)
            s = ccr_cond_set_timing(L.c, tsec);
        if (s == CCR_OK) TIMED(T_FWDBWD, {
            s = ccr_cond_forward(L.c, x, B, true, rng, y, &st);
            if (s == CCR_OK) s = ccr_cond_backward(L.c, dy, dx);
        });
        if (s == CCR_OK && tree) {
            group_threads = ccr_cond_group_threads(L.c);
            s = ccr_cond_set_timing(L.c, NULL);
        }
        if (s == CCR_OK) TIMED(T_STEP, {
            s = ccr_arena_zero_grad(L.a);
            if (s == CCR_OK) s = ccr_cond_forward(L.c, x, B, true, rng, y, &st);
            if (s == CCR_OK) s = ccr_cond_backward(L.c, dy, dx);
            if (s == CCR_OK) s = ccr_optim_step(L.opt);
        });
        ccr_route rt;
        if (s == CCR_OK && !o.cuda)  /* the host gate on host memory: CPU only */
            TIMED(T_GATE, s = ccr_gate_forward(g, x, B, false, rng, &rt, &st));
        if (s == CCR_OK && !o.cuda)
            TIMED(T_GATE_TRAIN, s = ccr_gate_forward(g, x, B, true, rng, &rt, &st));
        if (s == CCR_OK) TIMED(T_ZERO, s = ccr_arena_zero_grad(L.a));
        if (s == CCR_OK) TIMED(T_ADAM, s = ccr_optim_step(L.opt));
        TIMED(T_SG_FWD, gemm_shapes(&sh_ev, false));
        TIMED(T_SG_FWDBWD, gemm_shapes(&sh_tr, true));
        TIMED(T_SQUARE, {
            for (int k = 0; k < 3; k++)  /* forward + backward: three products */
                sg(&sh, false, false, (int)isq, (int)isq, (int)isq, sad, (int)isq, sad + sq * sq,
                   (int)isq, sad + 2 * sq * sq, (int)isq);
        });
        if (s == CCR_OK) TIMED(T_DENSE_FWD, s = ccr_cond_forward(D.c, x, B, false, rng, y, &st));
        if (s == CCR_OK) TIMED(T_DENSE_FWDBWD, {
            s = ccr_cond_forward(D.c, x, B, true, rng, y, &st);
            if (s == CCR_OK) s = ccr_cond_backward(D.c, dy, dx);
        });
        TIMED(T_DRAWS, gate_noise_fill(draws, n_draws, rng));
        TIMED(T_COPY, memcpy(cp + (round % 2) * copy_bytes, cp + (1 - round % 2) * copy_bytes,
                             copy_bytes));
        double ps[PEER_N];
        if (s == CCR_OK && peer_on && round > 0) {  /* between ccr's rounds */
            if (!peer_run(&o, peer_threads, ps)) {
                drv_progress_end();
                fprintf(stderr, "%s: --peer: %s failed or printed no times\n", PROG,
                        o.peer_script);
                exit(1);
            }
            for (int k = 0; k < PEER_N; k++)
                pv[(size_t)k * R + r] = ps[k];
        }
    }
    drv_progress("rounds", R + 1, R + 1, t_start, "done");
    drv_progress_end();
    if (s != CCR_OK)
        drv_fail(PROG, ctx, s, "timing");
    if (gerr != CCR_OK)
        drv_fail(PROG, ctx, gerr, "reference GEMMs");
    double t[T_COUNT], tp[PEER_N] = {0};
    for (int k = 0; k < T_COUNT; k++)
        t[k] = drv_median(tv + (size_t)k * R, R);
    for (int k = 0; peer_on && k < PEER_N; k++)
        tp[k] = drv_median(pv + (size_t)k * R, R);
    /* The square sgemm did 3 sq^3 products of 2 FLOPs each. */
    const double f_sq = 6.0 * (double)sq * (double)sq * (double)sq;
    const double f_fwd = ccr_cond_flops(L.c, false) * (double)B;
    const double f_fwdbwd = (ccr_cond_flops(L.c, true) + ccr_cond_flops_bwd(L.c, true)) * (double)B;
    const double f_dense = (ccr_cond_flops(D.c, true) + ccr_cond_flops_bwd(D.c, true)) * (double)B;
    const double t_opt = t[T_ZERO] + t[T_ADAM];
    /* On CUDA the gate is not timed alone: the remainder includes it. */
    const double t_disp = t[T_STEP] - t[T_GATE_TRAIN] - t[T_SG_FWDBWD] - t_opt;

    ccr_record_clear(rec);
    s = drv_record_base(rec, PROG, be, o.seed);
#define ADD_I(k, v) if (s == CCR_OK) s = ccr_record_add_int(rec, k, (int64_t)(v))
#define ADD_D(k, v) if (s == CCR_OK) s = ccr_record_add_double(rec, k, v)
    if (s == CCR_OK) s = drv_record_gate(rec, &o.cc);
    ADD_I("d_in", di);
    ADD_I("hidden", o.cc.hidden);
    ADD_I("d_out", dout);
    ADD_I("batch", B);
    ADD_I("threads", o.threads);
    ADD_I("repeat", R);
    if (s == CCR_OK) s = ccr_record_add_bool(rec, "quick", o.quick);
    ADD_D("load_avg", drv_load_avg());
    ADD_I("params", ccr_cond_n_params(L.c));
    ADD_I("n_matrices", n_mat);
    ADD_I("matrices_used", used_ev);
    ADD_D("examples_per_matrix_mean", used_ev ? (double)routed_ev / (double)used_ev : 0.0);
    ADD_I("examples_per_matrix_max", max_ev);
    static const char *const math_name[] = {"fp32", "tf32", "bf16"};
    if (s == CCR_OK) s = ccr_record_add_str(rec, "math", math_name[o.math]);
    for (int k = 0; k < T_COUNT; k++)
        if (!o.cuda || (k != T_GATE && k != T_GATE_TRAIN))
            ADD_D(t_name[k], t[k]);
    ADD_D("flops_fwd", f_fwd);
    ADD_D("flops_fwdbwd", f_fwdbwd);
    ADD_D("flops_sgemm_shapes_fwd", f_sg_fwd);
    ADD_D("flops_sgemm_shapes_fwdbwd", f_sg_fwdbwd);
    ADD_I("sgemm_square_n", sq);
    ADD_I("dense_hidden", dc.hidden);
    ADD_D("gflops", f_fwdbwd / t[T_FWDBWD] * 1e-9);
    ADD_D("gflops_fwd", f_fwd / t[T_FWD] * 1e-9);
    ADD_D("gflops_sgemm_shapes", f_sg_fwdbwd / t[T_SG_FWDBWD] * 1e-9);
    ADD_D("gflops_sgemm_square", f_sq / t[T_SQUARE] * 1e-9);
    ADD_D("gflops_dense", f_dense / t[T_DENSE_FWDBWD] * 1e-9);
    ADD_D("ratio_to_sgemm", t[T_SG_FWDBWD] / t[T_FWDBWD]);
    ADD_D("ratio_to_sgemm_fwd", t[T_SG_FWD] / t[T_FWD]);
    ADD_D("ratio_to_sgemm_square", (f_sg_fwdbwd / f_sq) * t[T_SQUARE] / t[T_FWDBWD]);
    ADD_D("ratio_to_dense", t[T_DENSE_FWDBWD] / t[T_FWDBWD]);
    ADD_D("ratio_to_dense_fwd", t[T_DENSE_FWD] / t[T_FWD]);
    ADD_D("copy_bytes", (double)copy_bytes);
    ADD_D("copy_gbs", 2.0 * (double)copy_bytes / t[T_COPY] * 1e-9);
    ADD_I("noise_draws_per_example", dpe);
    if (!o.cuda) {
        ADD_D("phase_gate", t[T_GATE_TRAIN] / t[T_STEP]);
        ADD_D("phase_dispatch_combine", t_disp / t[T_STEP]);
    } else {
        ADD_D("phase_gate_dispatch_combine", t_disp / t[T_STEP]);
    }
    ADD_D("phase_expert_gemm", t[T_SG_FWDBWD] / t[T_STEP]);
    ADD_D("phase_optimiser", t_opt / t[T_STEP]);
    if (s == CCR_OK)
        s = ccr_record_add_str(rec, "phase_method",
                               o.cuda ? "expert GEMMs (cuBLAS sgemm on the executed shapes) and "
                                        "optimiser (zero_grad + Adam) timed alone; gate + "
                                        "dispatch/sort + combine = step minus those (derived)"
                                      : "gate (forward, train mode), expert GEMMs (sgemm on the "
                                        "executed shapes) and optimiser (zero_grad + Adam) timed "
                                        "alone; dispatch/sort + combine = step minus those "
                                        "(derived)");
    if (tree && s == CCR_OK) {
        double *lv = ccr_malloc3(levels, 3, sizeof *lv);
        if (lv == NULL)
            s = CCR_ENOMEM;
        for (size_t l = 0; s == CCR_OK && l < levels; l++) {
            double f = 0.0, b = 0.0, d = 0.0;
            size_t m0 = path ? ((size_t)1 << l) - 1 : 0, m1 = path ? ((size_t)2 << l) - 1 : n_mat;
            for (size_t m = m0; m < m1 && m < n_mat; m++)
                f += tsec[m], b += tsec[n_mat + m], d += tsec[2 * n_mat + m];
            lv[l] = f / (double)R, lv[levels + l] = b / (double)R;
            lv[2 * levels + l] = d / (double)R;
        }
        double mean = 0.0; /* the rounds' mean, beside the levels' means */
        for (size_t i = 0; i < R; i++)
            mean += tv[(size_t)T_FWDBWD * R + i] / (double)R;
        ADD_D("seconds_fwdbwd_mean", mean);
        if (s == CCR_OK) s = ccr_record_add_doubles(rec, "level_seconds_fwd", lv, levels);
        if (s == CCR_OK)
            s = ccr_record_add_doubles(rec, "level_seconds_bwd", lv + levels, levels);
        if (s == CCR_OK)
            s = ccr_record_add_doubles(rec, "level_seconds_dots", lv + 2 * levels, levels);
        ADD_I("group_threads", group_threads);
        free(lv);
    }
    if (s == CCR_OK) s = ccr_record_add_bool(rec, "peer", o.peer);
    if (o.peer && s == CCR_OK) s = ccr_record_add_bool(rec, "peer_supported", peer_on);
    if (peer_on) {
        ADD_I("peer_threads", peer_threads);
        for (int k = 0; k < PEER_N; k++) {
            ADD_D(peer_sec_key[k], tp[k]);
            ADD_D(peer_ratio_key[k], tp[k] / t[T_FWDBWD]);
        }
    } else if (o.peer && s == CCR_OK) {
        s = ccr_record_add_str(rec, "peer_unsupported",
                               "the PyTorch peers implement topk, dense, switch and hmoe "
                               "over an FFN bank, signtree (projection bits) over a "
                               "linear bank");
    }
#undef ADD_I
#undef ADD_D
    drv_write_record(PROG, ctx, s, out, rec);

    printf("%s %s B=%zu d_in=%zu h=%zu d_out=%zu %s%s\n", PROG, o.cc.gate->name, B, di, h, dout,
           ccr_backend_describe(be), o.math == CCR_MATH_TF32   ? " (TF32)"
                                     : o.math == CCR_MATH_BF16 ? " (BF16)" : "");
    printf("  fwd %.3f ms  fwd+bwd %.3f ms (%.1f GFLOP/s)  step %.3f ms\n", t[T_FWD] * 1e3,
           t[T_FWDBWD] * 1e3, f_fwdbwd / t[T_FWDBWD] * 1e-9, t[T_STEP] * 1e3);
    printf("  sgemm on its shapes %.3f ms (%.1f GFLOP/s): ratio %.2f; square n=%zu %.1f GFLOP/s\n",
           t[T_SG_FWDBWD] * 1e3, f_sg_fwdbwd / t[T_SG_FWDBWD] * 1e-9,
           t[T_SG_FWDBWD] / t[T_FWDBWD], sq, f_sq / t[T_SQUARE] * 1e-9);
    printf("  dense FFN h=%zu fwd+bwd %.3f ms: ratio %.2f; copy %.1f GB/s\n", dc.hidden,
           t[T_DENSE_FWDBWD] * 1e3, t[T_DENSE_FWDBWD] / t[T_FWDBWD],
           2.0 * (double)copy_bytes / t[T_COPY] * 1e-9);
    if (o.cuda)
        printf("  step shares: expert GEMMs %.3f  gate+dispatch+combine (derived) %.3f  "
               "optimiser %.3f\n", t[T_SG_FWDBWD] / t[T_STEP], t_disp / t[T_STEP],
               t_opt / t[T_STEP]);
    else
        printf("  step shares: gate %.3f  expert GEMMs %.3f  dispatch+combine (derived) %.3f  "
               "optimiser %.3f\n", t[T_GATE_TRAIN] / t[T_STEP], t[T_SG_FWDBWD] / t[T_STEP],
               t_disp / t[T_STEP], t_opt / t[T_STEP]);

    if (peer_on) {
        printf("  PyTorch peers fwd+bwd (threads %zu):", peer_threads);
        for (int k = 0; k < PEER_N; k++)
            printf("%s %s %.3f ms ratio %.2f", k ? ";" : "", peer_name[k], tp[k] * 1e3,
                   tp[k] / t[T_FWDBWD]);
        printf("\n");
    } else if (o.peer)
        printf("  PyTorch peers: none written for gate %s (no ratio)\n", o.cc.gate->name);

    if (o.cuda) {
        ccr_backend_free_buffer(be, pkd);
        ccr_backend_free_buffer(be, sad);
    }
    ccr_backend_free_buffer(be, x), ccr_backend_free_buffer(be, dx);
    ccr_backend_free_buffer(be, y), ccr_backend_free_buffer(be, dy);
    free(hx), free(hdy), free(pk), free(counts), free(tv), free(pv), free(sa), free(cp), free(tsec);
    free(draws);
    layer_free(&L);
    layer_free(&D);
    drv_teardown(PROG, ctx, be, rng, out, rec);
    return 0;
}
