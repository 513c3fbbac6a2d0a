/*
 * gate_ref.h - fixtures, double-precision references and the finite-
 * difference harness shared by the gate test programs (test_gate_topk,
 * test_gate_hmoe, test_gate_dense, test_gate_switch, test_gate_signtree).
 * Compiled into each of them as an extra source (tests/meson.build).
 */
#ifndef GATE_REF_H
#define GATE_REF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ccr_test.h"

/* ---- finite differences ------------------------------------------------------ */

/* The routing signature of one loss evaluation holds at most this many ids. */
#define GATE_FD_SIGMAX 1024

/* One evaluation of the loss at the current parameters and inputs; writes the
 * signature of the routing it took (the loss has a kink wherever that
 * changes) to sig[0 .. *nsig), *nsig <= GATE_FD_SIGMAX. */
typedef double (*gate_fd_loss_fn)(void *u, int32_t *sig, size_t *nsig);

typedef struct gate_fd {
    gate_fd_loss_fn loss;
    void *u;
    const char *tag; /* names the case in failure messages */
    size_t nbase, total, skipped;
    double worst;    /* largest |numeric - analytic| / tolerance seen */
    char worst_what[64]; /* the tensor it was seen in */
    int32_t base[GATE_FD_SIGMAX], sig[GATE_FD_SIGMAX];
} gate_fd;

/* The finite-difference loss is a double-precision reference of the gate's
 * loss built from the equations (not the float code under test).  It reads
 * every parameter and input through ref_val, which adds ref_delta to the one
 * coordinate at ref_pert: the harness moves a coordinate in double without
 * touching the float value the analytic gradient was computed at. */
extern const float *ref_pert;
extern double ref_delta;
double ref_val(const float *p);

/* Step (relative to max(1, |value|)), tolerance in units of FLT_EPSILON x
 * the tensor's gradient scale, and the smallest scale. */
#define GATE_FD_H 1e-5
#define GATE_FD_TOL 16.0
#define GATE_FD_FLOOR 1e-3

/* Evaluates the loss at the base point, records its signature and returns it. */
double gate_fd_init(gate_fd *f, gate_fd_loss_fn loss, void *u, const char *tag);

/* For every parameter tensor of a and for x [nx]: the reference loss's
 * derivative by central differences in double (steps h and h/2, h =
 * GATE_FD_H max(1, |v|), one Richardson step) against the float analytic
 * gradient in a and dx.  A coordinate is skipped when a step changes the
 * routing signature; the others must agree within GATE_FD_TOL x FLT_EPSILON
 * x the tensor's scale (its largest |numeric derivative|, at least
 * GATE_FD_FLOOR).  Fewer than 5% of the coordinates may be skipped.  With
 * GATE_FD_REPORT in the environment, each sweep's worst error (in units of
 * the tolerance) is printed to stderr; GATE_FD_REPORT=tensors prints each
 * tensor's too, GATE_FD_REPORT=all reports without failing (for
 * tests/gradcheck_mutants.sh). */
void gate_fd_sweep(gate_fd *f, ccr_arena *a, float *x, const float *dx, size_t nx,
                   const char *name);

/* ---- topk and hmoe: a gate in an arena of its own --------------------------- */

#define MAXN 32

typedef struct env {
    ccr_ctx *ctx;
    ccr_backend *be;
    ccr_arena *a;
    ccr_gate *g;
    gsl_rng *rng;
} env;

/* Allocates, declares under "gate.", finalizes and initialises from seed. */
void env_open(env *v, const ccr_gate_type *t, const ccr_gate_config *cfg, size_t max_batch,
              unsigned long seed);
void env_close(env *v);

/* The values of parameter name. */
float *env_param(env *v, const char *name);

/* The export named want (aborts if there is none); *len gets its size. */
const float *env_export(env *v, const char *want, size_t *len);

ccr_gate_config topk_cfg(size_t d, size_t e, size_t k);
ccr_gate_config hmoe_cfg(size_t d, size_t a, size_t bs, size_t k, size_t k2);

/* Independent reference, double precision, from the equations. */

/* out = x W for x [d], W [d, n]. */
void ref_mm(const float *x, const float *w, size_t d, size_t n, double *out);

/* The m largest of h by decreasing value, ties to the lower index. */
void ref_top(const double *h, size_t n, size_t m, int *top);

typedef struct rrow {
    int top[MAXN];
    double g[MAXN], p[MAXN], h[MAXN], sd[MAXN];
} rrow;

/* One noisy top-k row: eqs. 3-5 and 8-9 with t2t's thresholds. */
void ref_topk_row(const double *clean, const double *raw, const float *noise, size_t n, size_t k,
                  bool train, double eps, rrow *o);

/* CV^2 = variance / (mean^2 + 1e-10), 0 for n <= 1. */
double ref_cv2(const double *v, size_t n);

/* Asserts |got - want| <= tol (1 + |want|). */
void ck_close(double got, double want, double tol, const char *what);

/* Finite-difference check of L = sum r * weights + aux_loss against every
 * parameter and x (topk or hmoe), the noise re-drawn from a fixed seed. */
void noisy_grad_check(const ccr_gate_type *type, ccr_gate_config c, size_t batch, bool train,
                      unsigned long seed);

/* Allocation fails with CCR_EINVAL naming word and leaves the output alone. */
void noisy_expect_einval(const ccr_gate_type *t, ccr_gate_config c, const char *word);

/* Two train passes from one seed agree bitwise (routes, weights, the export
 * noise_name, aux loss, gradients); a third from another seed draws other noise. */
void noisy_determinism(const ccr_gate_type *t, ccr_gate_config c, const char *noise_name);

/* ---- none, dense, switch (and signtree): a per-test fixture ----------------- */

/* Made fresh for each test by gate_fixture_open (a checked fixture). */
extern ccr_ctx *ctx;
extern ccr_backend *be;
extern gsl_rng *rng; /* seeded with the fixture's seed */

void gate_fixture_open(unsigned long seed);
void gate_fixture_close(void);

/* A gate with its parameters declared in an arena of their own (none has
 * no parameters: its arena stays empty and is not finalized). */
typedef struct tgate {
    ccr_gate *g;
    ccr_arena *a;
    size_t d_in, n, slots;
    float *w;  /* gate.w_g values [d_in, E], or NULL */
    float *dw; /* its gradient */
} tgate;

void tgate_make(tgate *t, const ccr_gate_type *type, const ccr_gate_config *cfg,
                size_t max_batch, unsigned long seed);
void tgate_free(tgate *t);

/* Double logits of row b and its softmax / logsumexp. */
void ref_softmax_row(const tgate *t, const float *x, size_t b, double *p, double *lse);

/* A train forward, validated, with the route's shape checked. */
void fwd(tgate *t, const float *x, size_t batch, ccr_route *r, ccr_gate_stats *st);

/* The rank-1 export named want, asserting its length. */
const float *export_of(const tgate *t, const char *want, size_t len);

ccr_gate_config base_cfg(size_t d_in, size_t n);

#define FD_B 12
#define FD_D 5

/* Finite-difference check of L = sum r w + aux_loss against w_g and x
 * (zero_r: aux terms only), then that a second backward doubles dw. */
void check_grad(const ccr_gate_type *type, size_t n, double cf, bool zero_r);

/* Allocation fails with CCR_EINVAL naming opt and leaves the output alone. */
void expect_einval(const ccr_gate_type *type, const ccr_gate_config *c, const char *opt);

/* One forward and backward of a fixed case: its ids, weights, dW_g, dx. */
void tgate_run_once(const ccr_gate_type *type, int32_t *ids, float *w, float *dw, float *dx);

/* Runs tgate_run_once twice and asserts bitwise-identical routes (slots per
 * example), weights and gradients. */
void tgate_assert_deterministic(const ccr_gate_type *type, size_t slots);

/* ---- a small linear bank for the straight-through tests --------------------- */

typedef struct fake_bank {
    size_t n, d_in, d_out;
    float *w; /* [n, d_in, d_out] */
    float *b; /* [n, d_out] */
    size_t calls;
} fake_bank;

/* n matrices with U(-1, 1) entries drawn from r. */
void fake_bank_init(fake_bank *fb, size_t n, size_t d_in, size_t d_out, gsl_rng *r);
void fake_bank_free(fake_bank *fb);

/* The layer's eval_matrix callback: out = b_m + x W_m (CCR_EINVAL if m >= n). */
ccr_status fake_eval(void *bank, size_t m, const float *x, float *out);

/* dy . M_m(x), in double. */
double fake_dot(const fake_bank *fb, size_t m, const float *x, const float *dy);

#endif /* GATE_REF_H */
