/*
 * ccr-capacity - capacity versus computation, the main job of issue 5.
 *
 * For each gate it sweeps the knob that adds parameters at fixed per-example
 * work - experts E for topk, hmoe and switch (k experts per example; switch
 * uses 1), depth d for the sign-bit tree (combine = path, d+1 node matrices
 * per example, and combine = leaf, one) - plus a dense baseline (gate
 * `none`: one FFN whose hidden width is swept, so its work grows with its
 * parameters).  Every point is a fresh conditional layer (d -> d, FFN
 * experts d -> h -> d, the tree on the linear bank d -> d), seeded,
 * nn.Linear-initialised, with *random* gate weights (N(0, 1/d)): zero gate
 * weights would send every example to the same experts or leaf in eval mode.
 *
 * Per point it measures: parameters; forward FLOPs per example, analytic and
 * counted from the routing table executed (they differ only by switch's
 * dropped examples, recorded); seconds per example of the forward (eval
 * mode) and of forward + backward (train mode: noise, aux losses, gradients
 * accumulated, no optimiser), each after a warm-up as the fastest of three
 * short windows on a pool of random batches; the gate alone in both modes;
 * the time of one full gradient zeroing (what a dense optimiser step adds
 * per batch, O(params)); the bank weights read per example; the capacity ratios
 * params / FLOPs and params / (params of a dense layer with the same FLOPs);
 * and, to explain the times, the per-matrix batch: matrices used per batch
 * and the mean, min and max examples each used matrix receives (Shazeer et
 * al. 2017, section 3.1, "shrinking batch").
 *
 * A markdown table goes to stdout, a progress line to stderr, one JSONL
 * record per point to --out.  Every configuration is validated (by
 * allocating its layer without parameters) before the file is opened, so
 * bad arguments exit 2 with one line and leave no file.  Points whose
 * parameter block would exceed --max-gib are skipped and listed.
 *
 * --backend cuda: the layers run on CUDA device 0 (the input pool, y and dx
 * in device memory; each timed run ends with a device synchronisation).  The
 * gate alone is a CPU-only measurement (a gate's device half has no public
 * entry point): on CUDA the gate_*_seconds_per_example fields are absent.
 *
 * Under mpirun (-np P > 1, MPI build) every point's layer is expert-parallel
 * (ccr_cond_set_comm): each rank runs its share of every batch, the timed
 * loops run a count agreed by all ranks, and seconds per example are those
 * of the global batch.  The routing statistics are rank 0's share's; the
 * gate is not timed alone.  Rank 0 prints and writes --out (ranks = P, and
 * its communication per fwd+bwd step: alltoall/allreduce_bytes_per_step,
 * seconds_alltoall/allreduce averaged over the loop's runs, seconds_compute
 * the fastest window's step time less those).
 */
#define _POSIX_C_SOURCE 200809L
#include <gsl/gsl_randist.h>
#include <gsl/gsl_rng.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "internal.h"  // provides: ccr_mallocn, ccr_malloc3, ccr_mul_ok
#include "outputs.h"

#define PROG "ccr-capacity"
#define MAXL 32
#define POOL 4
#define MAXP 256

enum { S_NONE, S_TOPK, S_HMOE, S_SWITCH, S_PATH, S_LEAF, S_DENSE, S_COUNT };
static const char *const series_name[S_COUNT] = {
    "none", "topk", "hmoe", "switch", "signtree-path", "signtree-leaf", "dense"};

typedef struct opts {
    size_t d, hidden, batch, k, k2;
    size_t experts[MAXL], n_experts, depths[MAXL], n_depths, dense_h[MAXL], n_dense;
    bool series[S_COUNT], cuda;
    int ranks;                 /* MPI processes (1: none) */
    double seconds, capacity_factor, eval_capacity_factor, max_gib;
    ccr_grad_mode grad_mode;   /* signtree */
    unsigned long seed;
    const char *out;
} opts;

typedef struct point {
    int series;
    size_t knob;  /* E, depth or hidden width */
    ccr_cond_config cc;
    size_t n_matrices, params;
    bool skip;    /* over --max-gib */
} point;

/* Routing statistics of one batch, accumulated over the pool. */
typedef struct route_stats {
    double used, mean, dropped, counted;
    size_t min, max;
} route_stats;

static void usage(void)
{
    printf(
        "usage: ccr-capacity [--gates LIST] [--experts LIST] [--depths LIST]\n"
        "                    [--dense-hidden LIST] [--d N] [--expert-hidden N] [--k N]\n"
        "                    [--k2 N] [--capacity-factor X] [--eval-capacity-factor X]\n"
        "                    [--grad-mode none|ste] [--batch N] [--seconds X]\n"
        "                    [--max-gib X] [--seed N] [--out FILE] [--backend cpu|cuda]\n"
        "                    [--quick] [--help]\n"
        "Sweeps each gate's capacity knob at fixed work per example and measures params,\n"
        "FLOPs/example (analytic and counted), forward and forward+backward seconds per\n"
        "example, the per-matrix batch, and the capacity ratios.  Markdown table on\n"
        "stdout, progress on stderr, one JSONL record per point with --out.\n\n"
        "  --gates LIST         of none, topk, hmoe, switch, signtree-path, signtree-leaf,\n"
        "                       dense; signtree = both trees, all = every one but dense\n"
        "                       [all]  (none is the dense baseline: one FFN, hidden swept)\n"
        "  --experts LIST       E for topk, hmoe, switch, dense [4,16,64,256,1024,4096]\n"
        "  --depths LIST        d for the trees [0,1,...,16]\n"
        "  --dense-hidden LIST  hidden widths of the none baseline [h,4h,16h,64h,256h]\n"
        "  --d N                layer input = output width [64]\n"
        "  --expert-hidden N    hidden width h of an FFN expert [256]\n"
        "  --k N                experts per example, topk and hmoe [4]\n"
        "  --k2 N               hmoe: experts per selected group (k/k2 groups) [2]\n"
        "  --capacity-factor X  switch capacity factor, training [1.25]\n"
        "  --eval-capacity-factor X  switch capacity factor, evaluation, 0 = no limit [0]\n"
        "  --grad-mode NAME     signtree: gradient through the sign bits, none | ste [ste]\n"
        "  --batch N            examples per batch [256]\n"
        "  --seconds X          timing window of each measurement [0.25]\n"
        "  --max-gib X          skip points whose parameters exceed X GiB [2.5]\n"
        "  --seed N             GSL seed (parameters, inputs, noise) [1]\n"
        "  --out FILE           JSONL output, one record per point\n"
        "  --backend NAME       cpu | cuda (device 0) [cpu]\n"
        "  --quick              tiny sizes, seconds-long smoke run\n");
}

/* A comma-separated list of sizes >= min. */
static size_t parse_list(const char *flag, const char *v, size_t *out, size_t min)
{
    drv_err e;
    size_t n;
    if (!drv_scan_size_list(flag, v, min, out, MAXL, &n, &e))
        drv_usage_error(PROG, "%s", e.msg);
    return n;
}

static void parse_gates(const char *v, bool *on)
{
    drv_span item[2 * S_COUNT];
    size_t n = drv_parse_list(PROG, "--gates", v, item, 2 * S_COUNT);
    memset(on, 0, S_COUNT * sizeof *on);
    for (size_t j = 0; j < n; j++) {
        bool found = false;
        for (int s = 0; s < S_COUNT; s++)
            if (drv_span_is(item[j], series_name[s]))
                on[s] = found = true;
        if (drv_span_is(item[j], "signtree"))
            on[S_PATH] = on[S_LEAF] = found = true;
        if (drv_span_is(item[j], "all")) {
            for (int s = 0; s < S_DENSE; s++)
                on[s] = true;
            found = true;
        }
        if (!found)
            drv_usage_error(PROG, "unknown gate '%.*s' in --gates (none, topk, hmoe, switch, "
                            "signtree, signtree-path, signtree-leaf, dense, all)",
                            (int)item[j].len, item[j].p);
    }
}

static void parse(int argc, char **argv, opts *o)
{
    bool quick = drv_quick_requested(argc, argv), dense_set = false;
    *o = (opts){.d = 64, .hidden = 256, .batch = 256, .k = 4, .k2 = 2, .seconds = 0.25,
                .capacity_factor = 1.25, .max_gib = 2.5, .seed = 1,
                .eval_capacity_factor = ccr_gate_config_default().eval_capacity_factor,
                .grad_mode = ccr_gate_config_default().grad_mode,
                .experts = {4, 16, 64, 256, 1024, 4096}, .n_experts = 6, .n_depths = 17};
    for (size_t i = 0; i < 17; i++)
        o->depths[i] = i;
    for (int s = 0; s < S_DENSE; s++)
        o->series[s] = true;
    if (quick) {
        o->d = 16, o->hidden = 16, o->batch = 32, o->seconds = 0.01;
        o->experts[0] = 4, o->experts[1] = 16, o->n_experts = 2, o->n_depths = 4;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (drv_parse_common(PROG, a, usage))
            continue;   /* --quick: applied above */
        if (v == NULL)
            drv_usage_error(PROG, "unknown option or missing value: '%s'", a);
        i++;
        if (drv_parse_backend(PROG, a, v, &o->cuda)) {
            /* o->cuda set */
        } else if (strcmp(a, "--gates") == 0) parse_gates(v, o->series);
        else if (strcmp(a, "--experts") == 0) o->n_experts = parse_list(a, v, o->experts, 1);
        else if (strcmp(a, "--depths") == 0) o->n_depths = parse_list(a, v, o->depths, 0);
        else if (strcmp(a, "--dense-hidden") == 0) {
            o->n_dense = parse_list(a, v, o->dense_h, 1);
            dense_set = true;
        } else if (strcmp(a, "--d") == 0) o->d = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--expert-hidden") == 0) o->hidden = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--k") == 0) o->k = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--k2") == 0) o->k2 = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--batch") == 0) o->batch = drv_parse_size(PROG, a, v, 1);
        else if (strcmp(a, "--seed") == 0) o->seed = drv_parse_seed(PROG, a, v);
        else if (strcmp(a, "--capacity-factor") == 0)
            o->capacity_factor = drv_parse_double(PROG, a, v, 1e-6, 1e6);
        else if (strcmp(a, "--eval-capacity-factor") == 0)
            o->eval_capacity_factor = drv_parse_double(PROG, a, v, 0, 1e6);
        else if (strcmp(a, "--grad-mode") == 0) {
            if (v != NULL && strcmp(v, "none") == 0) o->grad_mode = CCR_GRAD_NONE;
            else if (v != NULL && strcmp(v, "ste") == 0) o->grad_mode = CCR_GRAD_STE;
            else drv_usage_error(PROG, "--grad-mode must be none or ste");
        } else if (strcmp(a, "--seconds") == 0) o->seconds = drv_parse_double(PROG, a, v, 0, 600);
        else if (strcmp(a, "--max-gib") == 0) o->max_gib = drv_parse_double(PROG, a, v, 0, 1e6);
        else if (strcmp(a, "--out") == 0) {
            if (v[0] == '\0')
                drv_usage_error(PROG, "--out needs a file name");
            o->out = v;
        } else drv_usage_error(PROG, "unknown option '%s'", a);
    }
    if (!dense_set) {
        o->n_dense = quick ? 2 : 5;
        for (size_t i = 0; i < o->n_dense; i++)
            o->dense_h[i] = o->hidden << (2 * i);
    }
    if (o->batch > 0x7fffffff / 64)
        drv_usage_error(PROG, "--batch %zu is too large", o->batch);
    if (o->series[S_HMOE] && o->k % o->k2 != 0)
        drv_usage_error(PROG, "hmoe: --k2 %zu must divide --k %zu", o->k2, o->k);
}

/* hmoe groups for E experts: the divisor a of E nearest sqrt(E) that leaves
 * room for k/k2 groups of k2 experts; 0 if there is none. */
static size_t hmoe_groups(size_t E, size_t g, size_t k2)
{
    size_t best = 0;
    double dist = INFINITY;
    for (size_t a = 1; a <= E; a++) {
        if (E % a != 0 || a < g || E / a < k2)
            continue;
        double dd = fabs(log((double)a) - 0.5 * log((double)E));
        if (dd < dist - 1e-12)
            best = a, dist = dd;
    }
    return best;
}

/* Builds the list of points; each is validated by allocating its layer
 * (without parameters).  Exits 2 on a configuration the gates reject. */
static size_t build_points(const opts *o, ccr_backend *be, ccr_ctx *ctx, point *pts)
{
    size_t n = 0;
    for (int s = 0; s < S_COUNT; s++) {
        if (!o->series[s])
            continue;
        size_t nk = s == S_NONE ? o->n_dense : (s == S_PATH || s == S_LEAF) ? o->n_depths
                                                                          : o->n_experts;
        for (size_t i = 0; i < nk; i++) {
            if (n == MAXP)
                drv_usage_error(PROG, "more than %d points", MAXP);
            point *p = &pts[n++];
            ccr_cond_config *cc = &p->cc;
            ccr_gate_config *g = &cc->gate_cfg;
            *p = (point){.series = s};
            *cc = ccr_cond_config_default();
            cc->d_in = cc->d_out = o->d;
            cc->hidden = o->hidden;
            g->randomize = true;
            g->capacity_factor = o->capacity_factor;
            g->eval_capacity_factor = o->eval_capacity_factor;
            g->grad_mode = o->grad_mode;
            static const char *const type[S_COUNT] = {"none", "topk", "hmoe", "switch",
                                                      "signtree", "signtree", "dense"};
            cc->gate = ccr_gate_type_find(type[s]);
            cc->bank = ccr_cond_config_bank(cc);  /* the gate's own; signtree: linear */
            if (s == S_NONE) {
                p->knob = cc->hidden = o->dense_h[i];
            } else if (s == S_PATH || s == S_LEAF) {
                p->knob = g->depth = o->depths[i];
                g->combine = s == S_PATH ? CCR_COMBINE_PATH : CCR_COMBINE_LEAF;
                cc->bank = CCR_BANK_LINEAR;
            } else {
                p->knob = g->n_experts = o->experts[i];
                g->k = s == S_TOPK ? o->k : 1;
                if (s == S_DENSE)
                    g->k = g->n_experts;
                if (s == S_HMOE) {
                    g->k_groups = o->k / o->k2;
                    g->k2 = o->k2;
                    g->n_groups = hmoe_groups(g->n_experts, g->k_groups, g->k2);
                    if (g->n_groups == 0)
                        drv_usage_error(PROG, "hmoe: E=%zu has no group count for %zu groups "
                                        "of %zu experts per example", g->n_experts, g->k_groups,
                                        g->k2);
                }
            }
            ccr_cond *c;
            ccr_status st = ccr_cond_alloc(be, cc, o->batch, &c);
            if (st == CCR_EINVAL)
                drv_usage_error(PROG, "%s %zu: %s", series_name[s], p->knob, ccr_ctx_errmsg(ctx));
            if (st != CCR_OK)
                drv_fail(PROG, ctx, st, "layer");
            p->n_matrices = ccr_gate_n_matrices(ccr_cond_gate(c));
            size_t m = cc->bank == CCR_BANK_FFN
                           ? 2 * o->d * cc->hidden + cc->hidden + o->d : o->d * o->d + o->d;
            p->params = p->n_matrices * m;  /* bank only, for the memory limit */
            p->skip = (double)p->params * 4.0 > o->max_gib * 1073741824.0;
            ccr_cond_free(c);
        }
    }
    return n;
}

/* Per-matrix batch of the last routing table, added into rs. */
static void route_add(const ccr_route *r, size_t *counts, route_stats *rs)
{
    memset(counts, 0, r->n_matrices * sizeof *counts);
    size_t pairs = 0, used = 0, mn = (size_t)-1, mx = 0;
    for (size_t p = 0; p < r->batch * r->slots; p++) {
        if (r->ids[p] >= 0)
            counts[r->ids[p]]++, pairs++;
    }
    for (size_t m = 0; m < r->n_matrices; m++) {
        if (counts[m] == 0)
            continue;
        used++;
        mn = counts[m] < mn ? counts[m] : mn;
        mx = counts[m] > mx ? counts[m] : mx;
    }
    rs->used += (double)used / POOL;
    rs->mean += used ? (double)pairs / (double)used / POOL : 0.0;
    rs->min = mn < rs->min ? mn : rs->min;
    rs->max = mx > rs->max ? mx : rs->max;
}

/* Under mpirun every rank must run a timed statement (whose collectives
 * pair up across ranks) equally often: the runs of one window, from this
 * rank's time of one run, agreed as the largest over the ranks (one
 * all-reduce of a P-vector).  At least 1, at most 10^6. */
static size_t agreed_runs(ccr_comm *comm, double window, double t_one, ccr_status *s)
{
    double want = t_one > 0.0 ? ceil(window / t_one) : 1.0;
    want = want < 1.0 ? 1.0 : want > 1e6 ? 1e6 : want;
    const size_t P = (size_t)ccr_comm_size(comm);
    double *v = calloc(P, sizeof *v);
    if (v == NULL) {
        *s = CCR_ENOMEM;
        return 1;
    }
    v[ccr_comm_rank(comm)] = want;
    ccr_status st = ccr_comm_allreduce_sum_f64(comm, v, P);
    if (*s == CCR_OK)
        *s = st;
    double most = 1.0;
    for (size_t p = 0; p < P; p++)
        most = v[p] > most ? v[p] : most;
    free(v);
    return (size_t)most;
}

/* Runs the statement(s) once to warm up, then in three windows of
 * seconds/3 each (at least one run each; under mpirun, comm not NULL, a
 * run count agreed by all ranks, agreed_runs); stores in out the seconds
 * per run of the fastest window (the least disturbed by other processes on
 * a shared machine) and in reps the runs timed.  Each run ends with a
 * backend synchronisation (a no-op on the CPU; its error lands in s). */
#define TIME_LOOP(seconds, out, reps, ...)                            \
    do {                                                              \
        __VA_ARGS__;                                                  \
        (reps) = 0;                                                   \
        (out) = INFINITY;                                             \
        size_t fixed_ = 0;                                            \
        if (comm != NULL) {                                           \
            double t1_ = drv_now();                                   \
            __VA_ARGS__;                                              \
            fixed_ = agreed_runs(comm, (seconds) / 3.0, drv_now() - t1_, &s); \
        }                                                             \
        for (int w_ = 0; w_ < 3; w_++) {                              \
            size_t n_ = 0;                                            \
            double t0_ = drv_now(), el_;                              \
            do {                                                      \
                __VA_ARGS__;                                          \
                ccr_status sy_ = ccr_backend_synchronize(be);         \
                if (s == CCR_OK)                                      \
                    s = sy_;                                          \
                n_++;                                                 \
                el_ = drv_now() - t0_;                                \
            } while (fixed_ ? n_ < fixed_ : el_ < (seconds) / 3.0);   \
            (reps) += n_;                                             \
            (out) = el_ / (double)n_ < (out) ? el_ / (double)n_ : (out); \
        }                                                             \
    } while (0)

/* Parameters of a dense layer with F forward FLOPs per example: an FFN
 * d_in -> h' -> d_out (h' real-valued) for FFN banks, a linear layer
 * d_in -> w' for linear banks. */
static double dense_equal_params(const ccr_cond_config *cc, double F)
{
    double di = (double)cc->d_in, dout = (double)cc->d_out;
    if (cc->bank == CCR_BANK_FFN) {
        double h = (F - dout) / (2 * di + 2 * dout + 1);
        return h * (di + dout + 1) + dout;
    }
    return F / (2 * di + 1) * (di + 1);
}

typedef struct result {
    double params, f_fwd, f_fwd_cnt, f_train, f_train_cnt, f_bwd, f_gate, f_mat;
    double t_fwd, t_train, t_zero, t_setup, dense_eq, mpe, t_gate, t_gate_train;
    /* under mpirun: rank 0's communication per fwd+bwd step of the timed
     * layer (bytes, and seconds averaged over every run of that loop) */
    double a2a_bytes, ar_bytes, a2a_s, ar_s;
    size_t reps_fwd, reps_train;
    route_stats ev, tr;
} result;

static ccr_status measure(const opts *o, const point *p, ccr_backend *be, ccr_comm *comm,
                          gsl_rng *rng, const float *xs, const float *dys, float *y, float *dx,
                          result *res)
{
    ccr_cond *c = NULL;
    ccr_arena *a = NULL;
    /* This rank's share [lo, lo + b) of every batch (the whole of it in one
     * process); the pool's batches stay the global ones. */
    const size_t P = comm ? (size_t)ccr_comm_size(comm) : 1;
    const size_t rk = comm ? (size_t)ccr_comm_rank(comm) : 0;
    const size_t B = o->batch, d = o->d, lo = B * rk / P, b = B * (rk + 1) / P - lo;
    size_t *counts = calloc(p->n_matrices, sizeof *counts);
    double t0 = drv_now();
    ccr_status s = counts ? CCR_OK : CCR_ENOMEM;
    if (s == CCR_OK) s = ccr_cond_alloc(be, &p->cc, b, &c);
    if (s == CCR_OK && comm != NULL) s = ccr_cond_set_comm(c, comm);
    if (s == CCR_OK) s = ccr_arena_init(be, &a);
    if (s == CCR_OK && comm != NULL) {  /* a rank owning no matrix of gate none: not empty */
        size_t one = 1, idx;
        s = ccr_arena_add(a, "pad", 1, &one, &idx);
    }
    if (s == CCR_OK) s = ccr_cond_declare(c, a, "");
    if (s == CCR_OK) s = ccr_arena_finalize(a);
    if (s == CCR_OK) s = ccr_cond_init_params(c, rng);
    res->t_setup = drv_now() - t0;
    ccr_gate_stats st;
    res->ev = res->tr = (route_stats){.min = (size_t)-1};
    /* Routing statistics and counted FLOPs over the pool, eval then train. */
    for (int train = 0; train <= 1 && s == CCR_OK; train++) {
        route_stats *rs = train ? &res->tr : &res->ev;
        for (size_t j = 0; j < POOL && s == CCR_OK; j++) {
            s = ccr_cond_forward(c, xs + (j * B + lo) * d, b, train, rng, y, &st);
            if (s != CCR_OK)
                break;
            route_add(ccr_cond_route(c), counts, rs);
            rs->dropped += (double)st.dropped / POOL;
            rs->counted += st.flops_counted / POOL;
        }
    }
    if (s != CCR_OK)
        goto done;
    res->params = (double)ccr_cond_n_params(c);
    res->f_fwd = ccr_cond_flops(c, false);
    res->f_train = ccr_cond_flops(c, true);
    res->f_bwd = ccr_cond_flops_bwd(c, true);
    res->f_gate = ccr_gate_flops(ccr_cond_gate(c), false);
    res->f_mat = ccr_cond_matrix_flops(c);
    res->mpe = ccr_gate_matrices_per_example(ccr_cond_gate(c));
    res->f_fwd_cnt = res->ev.counted;
    res->f_train_cnt = res->tr.counted;
    res->dense_eq = dense_equal_params(&p->cc, res->f_fwd);
    size_t turn = 0, reps;
    TIME_LOOP(o->seconds, res->t_fwd, res->reps_fwd, {
        size_t j = turn++ % POOL;
        if (s == CCR_OK) s = ccr_cond_forward(c, xs + (j * B + lo) * d, b, false, rng, y, &st);
    });
    ccr_comm_stats_reset(comm);
    TIME_LOOP(o->seconds, res->t_train, res->reps_train, {
        size_t j = turn++ % POOL;
        if (s == CCR_OK) s = ccr_cond_forward(c, xs + (j * B + lo) * d, b, true, rng, y, &st);
        if (s == CCR_OK) s = ccr_cond_backward(c, dys + (j * B + lo) * d, dx);
    });
    if (comm != NULL) {  /* the loop ran reps + 2 steps: warm-up and calibration */
        ccr_comm_stats cs;
        ccr_status cg = ccr_comm_stats_get(comm, &cs);
        s = s == CCR_OK ? cg : s;
        double n = (double)(res->reps_train + 2);
        res->a2a_bytes = cs.alltoall_bytes / n, res->ar_bytes = cs.allreduce_bytes / n;
        res->a2a_s = cs.alltoall_seconds / n, res->ar_s = cs.allreduce_seconds / n;
    }
    TIME_LOOP(o->seconds / 4, res->t_zero, reps, if (s == CCR_OK) s = ccr_arena_zero_grad(a));
    /* The gate alone (its routing, noise, losses), in both modes: the host
     * gate on host memory, so on the CPU only. */
    ccr_gate *g = ccr_cond_gate(c);
    ccr_route r;
    res->t_gate = res->t_gate_train = NAN;
    if (!o->cuda && comm == NULL) {
        TIME_LOOP(o->seconds / 2, res->t_gate, reps, {
            size_t j = turn++ % POOL;
            if (s == CCR_OK) s = ccr_gate_forward(g, xs + (j * B + lo) * d, b, false, rng, &r, &st);
        });
        TIME_LOOP(o->seconds / 2, res->t_gate_train, reps, {
            size_t j = turn++ % POOL;
            if (s == CCR_OK) s = ccr_gate_forward(g, xs + (j * B + lo) * d, b, true, rng, &r, &st);
        });
    }
    res->t_gate /= (double)B;
    res->t_gate_train /= (double)B;
    res->t_fwd /= (double)B;
    res->t_train /= (double)B;
    res->t_zero /= (double)B;
done:
    ccr_arena_free(a);
    ccr_cond_free(c);
    free(counts);
    return s;
}

static ccr_status record(ccr_record *r, const opts *o, const point *p, const ccr_backend *be,
                         const result *x)
{
    ccr_record_clear(r);
    const char *knob = p->series == S_NONE ? "hidden"
                       : (p->series == S_PATH || p->series == S_LEAF) ? "depth" : "experts";
    ccr_status s = drv_record_base(r, PROG, be, o->seed);
#define ADD_I(k, v) if (s == CCR_OK) s = ccr_record_add_int(r, k, (int64_t)(v))
#define ADD_D(k, v) if (s == CCR_OK) s = ccr_record_add_double(r, k, v)
    if (s == CCR_OK) s = drv_record_gate(r, &p->cc);
    if (s == CCR_OK) s = ccr_record_add_str(r, "series", series_name[p->series]);
    if (s == CCR_OK) s = ccr_record_add_str(r, "knob", knob);
    ADD_I("knob_value", p->knob);
    ADD_I("d_in", p->cc.d_in);
    ADD_I("d_out", p->cc.d_out);
    ADD_I("batch", o->batch);
    ADD_I("n_matrices", p->n_matrices);
    ADD_D("matrices_per_example", x->mpe);
    ADD_I("params", x->params);
    ADD_I("params_gate", x->params - (double)p->params);
    ADD_D("flops_fwd_analytic", x->f_fwd);
    ADD_D("flops_fwd_counted", x->f_fwd_cnt);
    ADD_D("flops_gate", x->f_gate);
    ADD_D("flops_matrix", x->f_mat);
    ADD_D("dropped_per_batch", x->ev.dropped);
    ADD_D("flops_train_fwd_analytic", x->f_train);
    ADD_D("flops_train_fwd_counted", x->f_train_cnt);
    ADD_D("dropped_per_batch_train", x->tr.dropped);
    ADD_D("flops_bwd_analytic", x->f_bwd);
    ADD_D("fwd_seconds_per_example", x->t_fwd);
    ADD_D("fwdbwd_seconds_per_example", x->t_train);
    ADD_D("zero_grad_seconds_per_example", x->t_zero);
    ADD_I("ranks", o->ranks);
    if (o->ranks > 1) {
        /* one fwd+bwd step of the layer: the fastest window's time split by
         * the communication seconds averaged over the loop's runs */
        double step = x->t_train * (double)o->batch;
        ADD_D("alltoall_bytes_per_step", x->a2a_bytes);
        ADD_D("allreduce_bytes_per_step", x->ar_bytes);
        ADD_D("seconds_alltoall", x->a2a_s);
        ADD_D("seconds_allreduce", x->ar_s);
        ADD_D("seconds_compute", step - x->a2a_s - x->ar_s > 0 ? step - x->a2a_s - x->ar_s : 0.0);
    }
    if (!o->cuda && o->ranks == 1) {
        ADD_D("gate_fwd_seconds_per_example", x->t_gate);
        ADD_D("gate_train_fwd_seconds_per_example", x->t_gate_train);
    }
    ADD_D("setup_seconds", x->t_setup);
    ADD_D("load_avg", drv_load_avg());
    ADD_I("reps_fwd", x->reps_fwd);
    ADD_I("reps_fwdbwd", x->reps_train);
    ADD_D("fwd_gflops", x->f_fwd_cnt / x->t_fwd * 1e-9);
    ADD_D("fwdbwd_gflops", (x->f_train_cnt + x->f_bwd) / x->t_train * 1e-9);
    ADD_D("params_per_flop", x->params / x->f_fwd);
    ADD_D("dense_equal_flops_params", x->dense_eq);
    ADD_D("params_vs_dense", x->params / x->dense_eq);
    ADD_D("matrices_used", x->ev.used);
    ADD_D("examples_per_matrix_mean", x->ev.mean);
    ADD_I("examples_per_matrix_min", x->ev.min);
    ADD_I("examples_per_matrix_max", x->ev.max);
    ADD_D("matrices_used_train", x->tr.used);
    ADD_D("examples_per_matrix_mean_train", x->tr.mean);
    ADD_I("examples_per_matrix_min_train", x->tr.min);
    ADD_I("examples_per_matrix_max_train", x->tr.max);
    /* Bank weights read per example: used matrices x floats x 4 / batch. */
    double mbytes = 4.0 * (double)p->params / (double)p->n_matrices / (double)o->batch;
    ADD_D("weight_bytes_per_example", x->ev.used * mbytes);
    ADD_D("weight_bytes_per_example_train", x->tr.used * mbytes);
#undef ADD_I
#undef ADD_D
    return s;
}

int main(int argc, char **argv)
{
    opts o;
    parse(argc, argv, &o);
    o.ranks = drv_launcher_size();
    const bool lead = drv_launcher_rank() == 0;
    if (o.ranks > 1 && o.cuda)
        drv_usage_error(PROG, "--backend cuda under mpirun is not supported yet (%d processes)",
                        o.ranks);
    if ((size_t)o.ranks > o.batch)
        drv_usage_error(PROG, "--batch %zu is smaller than the %d processes", o.batch, o.ranks);
    if (!lead)
        o.out = NULL;  /* rank 0 writes */
    drv_io_output("--out", o.out);
    drv_io_check(PROG);
    ccr_ctx *ctx;
    ccr_backend *be;
    gsl_rng *rng;
    drv_setup(PROG, o.cuda, o.seed, &ctx, &be, &rng);
    ccr_comm *comm = drv_comm_start(PROG, ctx);  /* NULL in one process */
    ccr_status s;
    static point pts[MAXP];
    size_t np = build_points(&o, be, ctx, pts);
    if (np == 0)
        drv_usage_error(PROG, "nothing to measure");

    ccr_jsonl *out;
    ccr_record *rec;
    drv_open_out(PROG, ctx, o.out, &rec, &out);

    size_t nx;
    if (!ccr_mul3_ok(POOL, o.batch, o.d, &nx))
        drv_fail(PROG, ctx, ccr_mem_check(ctx, SIZE_MAX, "input pool"), "buffers");
    float *hxs = ccr_malloc3(2, nx, sizeof *hxs);
    if (hxs == NULL)
        drv_fail(PROG, ctx, CCR_ENOMEM, "buffers");
    for (size_t i = 0; i < 2 * nx; i++)  /* inputs x ~ N(0,1), then dy */
        hxs[i] = (float)gsl_ran_gaussian(rng, 1.0);
    /* The pool, y and dx in backend memory (device memory on CUDA); 2 nx
     * floats passed ccr_malloc3 above, and 2 batch d is less. */
    float *xs = drv_backend_floats(PROG, ctx, be, 2 * nx, hxs);
    float *y = drv_backend_floats(PROG, ctx, be, 2 * o.batch * o.d, NULL);
    free(hxs);

    /* Rank 0 prints; the others' errors still reach stderr. */
    if (!lead && freopen("/dev/null", "w", stdout) == NULL)
        drv_fail(PROG, ctx, CCR_EIO, "stdout");
    if (lead)
        fprintf(stderr, "%s: %s | %s | d=%zu h=%zu k=%zu batch=%zu ranks=%d\n", PROG,
                ccr_backend_describe(be), drv_machine(), o.d, o.hidden, o.k, o.batch, o.ranks);
    printf("| gate | knob | params | FLOPs/ex analytic | FLOPs/ex counted | fwd µs/ex | "
           "fwd+bwd µs/ex | params/FLOP | params ÷ dense@FLOPs | matrices used | "
           "ex/matrix mean | ex/matrix min | dropped |\n");
    printf("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    double t_start = drv_now();
    size_t skipped = 0;
    for (size_t i = 0; i < np; i++) {
        point *p = &pts[i];
        char label[64];
        snprintf(label, sizeof label, "%s %s=%zu", series_name[p->series],
                 p->series == S_NONE ? "h" : (p->series == S_PATH || p->series == S_LEAF)
                                                 ? "d" : "E", p->knob);
        if (lead)
            drv_progress("points", i, np, t_start, label);
        if (p->skip) {
            skipped++;
            continue;
        }
        result x;
        s = measure(&o, p, be, comm, rng, xs, xs + nx, y, y + o.batch * o.d, &x);
        if (s != CCR_OK)
            drv_fail(PROG, ctx, s, label);
        printf("| %s | %s | %.0f | %.4g | %.4g | %.3f | %.3f | %.3g | %.3g | %.1f | %.1f | "
               "%zu | %.1f |\n", series_name[p->series], strchr(label, ' ') + 1, x.params,
               x.f_fwd, x.f_fwd_cnt, x.t_fwd * 1e6, x.t_train * 1e6, x.params / x.f_fwd,
               x.params / x.dense_eq, x.ev.used, x.ev.mean, x.ev.min, x.ev.dropped);
        fflush(stdout);
        if ((s = record(rec, &o, p, be, &x)) != CCR_OK ||
            (out && (s = ccr_jsonl_write(out, rec)) != CCR_OK))
            drv_fail(PROG, ctx, s, "record");
    }
    if (lead) {
        drv_progress("points", np, np, t_start, "done");
        drv_progress_end();
    }
    if (skipped > 0) {
        printf("\nSkipped (parameters above --max-gib %.2f GiB):", o.max_gib);
        for (size_t i = 0; i < np; i++)
            if (pts[i].skip)
                printf(" %s %zu (%.2f GiB)", series_name[pts[i].series], pts[i].knob,
                       (double)pts[i].params * 4.0 / 1073741824.0);
        printf("\n");
    }
    if ((s = drv_io_close(out)) != CCR_OK)
        drv_fail(PROG, ctx, s, "close");
    ccr_backend_free_buffer(be, xs);
    ccr_backend_free_buffer(be, y);
    drv_comm_end(comm);
    drv_teardown(PROG, ctx, be, rng, NULL, rec);
    return 0;
}
