/*
 * gate_ref.c - fixtures, double-precision references and the finite-
 * difference harness shared by the gate test programs (gate_ref.h).
 */
#include "gate_ref.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gsl/gsl_cdf.h>

/* ---- finite differences ------------------------------------------------------ */

const float *ref_pert;
double ref_delta;

double ref_val(const float *p) { return (double)*p + (p == ref_pert ? ref_delta : 0.0); }

double gate_fd_init(gate_fd *f, gate_fd_loss_fn loss, void *u, const char *tag)
{
    f->loss = loss, f->u = u, f->tag = tag;
    f->total = f->skipped = 0;
    f->worst = 0.0;
    f->worst_what[0] = '\0';
    ref_pert = NULL;
    ref_delta = 0.0;
    return loss(u, f->base, &f->nbase);
}

static bool fd_same(const gate_fd *f, size_t n)
{
    return n == f->nbase && memcmp(f->sig, f->base, n * sizeof(int32_t)) == 0;
}

/* The reference loss with coordinate p moved by delta (in double). */
static double fd_eval(gate_fd *f, const float *p, double delta, bool *same)
{
    size_t n;
    ref_pert = p;
    ref_delta = delta;
    const double l = f->loss(f->u, f->sig, &n);
    ref_pert = NULL;
    ref_delta = 0.0;
    *same = *same && fd_same(f, n);
    return l;
}

/* Central differences at h and h/2 combined by one Richardson step (error
 * O(h^4) plus rounding ~1e-16 |L| / h); *same is false when a step changes
 * the routing signature. */
static double fd_numeric(gate_fd *f, const float *p, bool *same)
{
    const double h = GATE_FD_H * fmax(1.0, fabs((double)*p));
    *same = true;
    const double d1 = (fd_eval(f, p, h, same) - fd_eval(f, p, -h, same)) / (2.0 * h);
    const double d2 = (fd_eval(f, p, h / 2, same) - fd_eval(f, p, -h / 2, same)) / h;
    return (4.0 * d2 - d1) / 3.0;
}

/* One tensor: numeric derivatives of its n coordinates against ana [n]; the
 * tolerance is GATE_FD_TOL * FLT_EPSILON times the tensor's gradient scale
 * (the largest numeric |derivative|, at least GATE_FD_FLOOR). */
static void fd_tensor(gate_fd *f, float *v, const float *ana, size_t n, const char *what)
{
    double *num = malloc((n ? n : 1) * sizeof *num);
    bool *ok = malloc((n ? n : 1) * sizeof *ok);
    ck_assert(num != NULL && ok != NULL);
    double scale = GATE_FD_FLOOR;
    for (size_t j = 0; j < n; j++) {
        num[j] = fd_numeric(f, v + j, &ok[j]);
        f->total++;
        f->skipped += !ok[j];
        if (ok[j])
            scale = fmax(scale, fabs(num[j]));
    }
    const double tol = GATE_FD_TOL * FLT_EPSILON * scale;
    double worst = 0.0;
    size_t wj = 0;
    for (size_t j = 0; j < n; j++)
        if (ok[j] && fabs(num[j] - (double)ana[j]) / tol > worst)
            worst = fabs(num[j] - (double)ana[j]) / tol, wj = j;
    const char *rep = getenv("GATE_FD_REPORT");
    if (rep != NULL && strcmp(rep, "tensors") == 0)
        fprintf(stderr, "gate_fd: %s %s: worst |numeric - analytic| = %.3g x tolerance "
                "(%.3g x FLT_EPSILON x scale %.3g)\n", f->tag, what, worst,
                worst * GATE_FD_TOL, scale);
    if (worst > f->worst) {
        f->worst = worst;
        snprintf(f->worst_what, sizeof f->worst_what, "%s", what);
    }
    ck_assert_msg(worst <= 1.0 || (rep != NULL && strcmp(rep, "all") == 0), "%s[%zu] (%s): numeric %.9g analytic %.9g, %.3g x the tolerance "
                  "%.3g (%g x FLT_EPSILON x scale %.3g)", what, wj, f->tag, n ? num[wj] : 0.0,
                  n ? (double)ana[wj] : 0.0, worst, tol, (double)GATE_FD_TOL, scale);
    free(num);
    free(ok);
}

void gate_fd_sweep(gate_fd *f, ccr_arena *a, float *x, const float *dx, size_t nx,
                   const char *name)
{
    for (size_t i = 0; i < ccr_arena_count(a); i++) {
        const size_t n = ccr_arena_size(a, i);
        float *ana = malloc(n * sizeof(float));
        ck_assert(ana != NULL);
        memcpy(ana, ccr_arena_grad(a, i), n * sizeof(float));
        fd_tensor(f, ccr_arena_value(a, i), ana, n, ccr_arena_name(a, i));
        free(ana);
    }
    fd_tensor(f, x, dx, nx, "x");
    if (getenv("GATE_FD_REPORT") != NULL)
        fprintf(stderr, "gate_fd: sweep %s %s: worst %.4g x tolerance (%s), %zu of %zu skipped\n",
                name, f->tag, f->worst, f->worst_what, f->skipped, f->total);
    ck_assert_msg(f->skipped * 20 < f->total, "%s: %zu of %zu coordinates skipped", name,
                  f->skipped, f->total);
}

/* ---- topk and hmoe ----------------------------------------------------------- */

void env_open(env *v, const ccr_gate_type *t, const ccr_gate_config *cfg, size_t max_batch,
              unsigned long seed)
{
    v->ctx = ccr_test_ctx();
    CCR_CK_OK(v->ctx, ccr_backend_cpu_init(v->ctx, &v->be));
    CCR_CK_OK(v->ctx, ccr_arena_init(v->be, &v->a));
    CCR_CK_OK(v->ctx, ccr_gate_alloc(v->ctx, t, cfg, max_batch, &v->g));
    CCR_CK_OK(v->ctx, ccr_gate_declare(v->g, v->a, "gate."));
    CCR_CK_OK(v->ctx, ccr_arena_finalize(v->a));
    v->rng = ccr_test_rng(seed);
    CCR_CK_OK(v->ctx, ccr_gate_init_params(v->g, v->rng));
}

void env_close(env *v)
{
    ccr_gate_free(v->g);
    ccr_arena_free(v->a);
    ccr_backend_free(v->be);
    ccr_ctx_free(v->ctx);
    gsl_rng_free(v->rng);
}

float *env_param(env *v, const char *name)
{
    size_t i;
    CCR_CK_OK(v->ctx, ccr_arena_find(v->a, name, &i));
    return ccr_arena_value(v->a, i);
}

/* The export of g named want (aborts if there is none), its rank and shape. */
static const float *find_export(ccr_ctx *c, ccr_gate *g, const char *want, size_t *rank,
                                size_t shape[4])
{
    for (size_t i = 0; i < ccr_gate_n_exports(g); i++) {
        const char *name;
        const float *data;
        CCR_CK_OK(c, ccr_gate_get_export(g, i, &name, rank, shape, &data));
        if (strcmp(name, want) == 0)
            return data;
    }
    ck_abort_msg("no export %s", want);
    return NULL;
}

const float *env_export(env *v, const char *want, size_t *len)
{
    size_t rank, shape[4], l = 1;
    const float *data = find_export(v->ctx, v->g, want, &rank, shape);
    for (size_t r = 0; r < rank; r++)
        l *= shape[r];
    if (len)
        *len = l;
    return data;
}

ccr_gate_config topk_cfg(size_t d, size_t e, size_t k)
{
    ccr_gate_config c = base_cfg(d, e);
    c.k = k;
    return c;
}

ccr_gate_config hmoe_cfg(size_t d, size_t a, size_t bs, size_t k, size_t k2)
{
    ccr_gate_config c = topk_cfg(d, a * bs, 1);
    c.k_groups = k;
    c.n_groups = a;
    c.k2 = k2;
    return c;
}

void ref_mm(const float *x, const float *w, size_t d, size_t n, double *out)
{
    for (size_t j = 0; j < n; j++) {
        out[j] = 0.0;
        for (size_t i = 0; i < d; i++)
            out[j] += ref_val(x + i) * ref_val(w + i * n + j);
    }
}

void ref_top(const double *h, size_t n, size_t m, int *top)
{
    unsigned char used[MAXN] = {0};
    for (size_t s = 0; s < m; s++) {
        int best = -1;
        for (size_t i = 0; i < n; i++)
            if (!used[i] && (best < 0 || h[i] > h[best]))
                best = (int)i;
        top[s] = best;
        used[best] = 1;
    }
}

void ref_topk_row(const double *clean, const double *raw, const float *noise, size_t n, size_t k,
                  bool train, double eps, rrow *o)
{
    for (size_t i = 0; i < n; i++) {
        o->sd[i] = train ? log1p(exp(raw[i])) + eps : 0.0;
        o->h[i] = clean[i] + (train ? (double)noise[i] * o->sd[i] : 0.0);
    }
    ref_top(o->h, n, k < n ? k + 1 : k, o->top);
    double m = o->h[o->top[0]], z = 0.0;
    for (size_t s = 0; s < k; s++)
        z += exp(o->h[o->top[s]] - m);
    for (size_t s = 0; s < k; s++)
        o->g[s] = exp(o->h[o->top[s]] - m) / z;
    for (size_t i = 0; i < n; i++) {
        o->p[i] = 0.0;
        if (!train || k >= n)
            continue;
        bool in = false;
        for (size_t s = 0; s < k; s++)
            in = in || o->top[s] == (int)i;
        double thr = in ? o->h[o->top[k]] : o->h[o->top[k - 1]];
        o->p[i] = gsl_cdf_ugaussian_P((clean[i] - thr) / o->sd[i]);
    }
}

double ref_cv2(const double *v, size_t n)
{
    if (n <= 1)
        return 0.0;
    double m = 0.0, var = 0.0;
    for (size_t i = 0; i < n; i++)
        m += v[i] / (double)n;
    for (size_t i = 0; i < n; i++)
        var += (v[i] - m) * (v[i] - m) / (double)n;
    return var / (m * m + 1e-10);
}

void ck_close(double got, double want, double tol, const char *what)
{
    ck_assert_msg(fabs(got - want) <= tol * (1.0 + fabs(want)), "%s: got %.9g want %.9g", what,
                  got, want);
}

typedef struct gc {
    env v;
    const float *x;
    const float *r;
    const float *np, *ns; /* copies of the draws of the base forward */
    size_t batch, slots;
    bool train;
    unsigned long nseed;
} gc;

static double ref_lse(const double *z, size_t n)
{
    double m = z[0], s = 0.0;
    for (size_t i = 1; i < n; i++)
        m = z[i] > m ? z[i] : m;
    for (size_t i = 0; i < n; i++)
        s += exp(z[i] - m);
    return m + log(s);
}

/* The signature entries of one top-k row: its top k, and the (k+1)-th when
 * it sets a smooth-load threshold. */
static void gc_sig_row(const rrow *o, size_t n, size_t k, bool train, int32_t *sig, size_t *ns)
{
    const size_t m = train && k < n ? k + 1 : k;
    for (size_t s = 0; s < m; s++) {
        ck_assert_uint_lt(*ns, GATE_FD_SIGMAX);
        sig[(*ns)++] = o->top[s];
    }
}

/* L = sum r * weights + aux_loss of topk or hmoe, in double from the
 * equations (GATES.md), with the draws of the base forward: weights
 * (eqs. 3, 12), Importance and smooth Load (eqs. 6-10, 13-14), their CV^2
 * losses and the z-loss over the clean logits the gate evaluates. */
static double gc_loss(void *u, int32_t *sig, size_t *nsig)
{
    gc *t = u;
    const ccr_gate_config *c = ccr_gate_get_config(t->v.g);
    const bool hm = ccr_gate_get_type(t->v.g) == &ccr_gate_hmoe, train = t->train;
    const size_t d = c->d_in, k = hm ? c->k_groups : c->k, a = hm ? c->n_groups : c->n_experts;
    const size_t bs = hm ? c->n_experts / a : 1, k2 = hm ? c->k2 : 1, e = a * bs;
    const float *pg = env_param(&t->v, hm ? "gate.primary.w_g" : "gate.w_g");
    const float *pn = env_param(&t->v, hm ? "gate.primary.w_noise" : "gate.w_noise");
    const float *sg = hm ? env_param(&t->v, "gate.secondary.w_g") : NULL;
    const float *sn = hm ? env_param(&t->v, "gate.secondary.w_noise") : NULL;
    const bool sp = train && k < a, ss = train && k2 < bs;
    double lp[MAXN] = {0}, cnt[MAXN] = {0}, ls[MAXN] = {0}, cnt2[MAXN] = {0}, imp[MAXN] = {0};
    double load[MAXN], L = 0.0, z = 0.0;
    size_t n = 0;
    ck_assert_uint_le(e, MAXN);
    for (size_t b = 0; b < t->batch; b++) {
        double clean[MAXN], raw[MAXN];
        rrow o, o2;
        ref_mm(t->x + b * d, pg, d, a, clean);
        ref_mm(t->x + b * d, pn, d, a, raw);
        ref_topk_row(clean, raw, t->np + b * a, a, k, train, c->noise_eps, &o);
        gc_sig_row(&o, a, k, train, sig, &n);
        z += pow(ref_lse(clean, a), 2);
        for (size_t i = 0; i < a; i++)
            lp[i] += sp ? o.p[i] : 0.0;
        for (size_t p = 0; p < k; p++) {
            const size_t i = (size_t)o.top[p];
            cnt[i] += 1.0;
            if (!hm) {
                L += (double)t->r[b * k + p] * o.g[p];
                imp[i] += o.g[p];
                continue;
            }
            ref_mm(t->x + b * d, sg + i * d * bs, d, bs, clean);
            ref_mm(t->x + b * d, sn + i * d * bs, d, bs, raw);
            ref_topk_row(clean, raw, t->ns + (b * a + i) * bs, bs, k2, train, c->noise_eps, &o2);
            gc_sig_row(&o2, bs, k2, train, sig, &n);
            z += pow(ref_lse(clean, bs), 2);
            for (size_t q = 0; q < k2; q++) {
                const size_t id = i * bs + (size_t)o2.top[q];
                const double w = o.g[p] * o2.g[q];
                L += (double)t->r[b * k * k2 + p * k2 + q] * w;
                imp[id] += w;
                cnt2[id] += 1.0;
            }
            for (size_t j = 0; j < bs; j++)
                ls[i * bs + j] += ss ? o2.p[j] : 0.0;
        }
    }
    for (size_t i = 0; i < a; i++)
        for (size_t j = 0; j < bs; j++) {
            const double l1 = sp ? lp[i] : cnt[i];
            if (!hm)
                load[i] = l1;
            else /* eq. 14 */
                load[i * bs + j] = l1 * (ss ? ls[i * bs + j] : cnt2[i * bs + j]) / (cnt[i] + 1e-10);
        }
    L += c->w_importance * ref_cv2(imp, e) + c->w_load * ref_cv2(load, e);
    L += c->z_loss * z / (double)t->batch;
    *nsig = n;
    return L;
}

void noisy_grad_check(const ccr_gate_type *type, ccr_gate_config c, size_t batch, bool train,
                      unsigned long seed)
{
    c.randomize = true;
    c.w_importance = c.w_load = 0.5;
    gc t = {.batch = batch, .train = train, .nseed = seed * 7 + 1};
    env_open(&t.v, type, &c, batch, seed);
    t.slots = ccr_gate_slots(t.v.g);
    const bool hm = type == &ccr_gate_hmoe;
    const size_t nx = batch * c.d_in, nr = batch * t.slots;
    float *x = malloc(nx * sizeof(float)), *r = malloc(nr * sizeof(float));
    float *dx = calloc(nx, sizeof(float));
    gate_fd fd;
    ck_assert(x && r && dx);
    ccr_test_fill_uniform(t.v.rng, x, nx, -1, 1);
    ccr_test_fill_uniform(t.v.rng, r, nr, -1, 1);
    t.x = x;
    t.r = r;
    /* The gate's forward at the base point: its draws feed the reference. */
    ccr_route rt;
    ccr_gate_stats st;
    gsl_rng_set(t.v.rng, t.nseed);
    CCR_CK_OK(t.v.ctx, ccr_gate_forward(t.v.g, x, batch, train, t.v.rng, &rt, &st));
    size_t nnp, nns = 0;
    const float *np = env_export(&t.v, hm ? "noise.primary" : "noise", &nnp);
    const float *ns = hm ? env_export(&t.v, "noise.secondary", &nns) : NULL;
    float *npc = malloc((nnp + 1) * sizeof(float)), *nsc = malloc((nns + 1) * sizeof(float));
    ck_assert(npc && nsc);
    memcpy(npc, np, nnp * sizeof(float));
    if (ns)
        memcpy(nsc, ns, nns * sizeof(float));
    t.np = npc;
    t.ns = nsc;
    double task = st.aux_loss;
    for (size_t i = 0; i < nr; i++)
        task += (double)r[i] * (double)rt.weights[i];
    const double lref = gate_fd_init(&fd, gc_loss, &t, train ? "train" : "eval");
    ck_close(lref, task, 1e-5, "reference loss vs the gate's");
    CCR_CK_OK(t.v.ctx, ccr_arena_zero_grad(t.v.a));
    ccr_gate_bwd_args ba = {.x = x, .batch = batch, .dweights = r, .dx = dx};
    CCR_CK_OK(t.v.ctx, ccr_gate_backward(t.v.g, &ba));
    gate_fd_sweep(&fd, t.v.a, x, dx, nx, type->name);
    free(x);
    free(r);
    free(dx);
    free(npc);
    free(nsc);
    env_close(&t.v);
}

void noisy_expect_einval(const ccr_gate_type *t, ccr_gate_config c, const char *word)
{
    ccr_ctx *ectx = ccr_test_ctx();
    int marker;
    ccr_gate *g = (ccr_gate *)(void *)&marker;
    if (c.d_in == 0)
        c.d_in = 4;
    CCR_CK_STATUS(ectx, ccr_gate_alloc(ectx, t, &c, 8, &g), CCR_EINVAL);
    ck_assert_ptr_eq(g, (ccr_gate *)(void *)&marker);
    ck_assert_msg(strstr(ccr_ctx_errmsg(ectx), word) != NULL, "message '%s' lacks '%s'",
                  ccr_ctx_errmsg(ectx), word);
    ccr_ctx_free(ectx);
}

void noisy_determinism(const ccr_gate_type *t, ccr_gate_config c, const char *noise_name)
{
    const size_t B = 7;
    c.randomize = true;
    env v;
    env_open(&v, t, &c, B, 21);
    const size_t slots = ccr_gate_slots(v.g), nn = B * c.n_experts;
    float x[64], dw[64], n0[256], g0[512], dx0[64], dx[64];
    int32_t id0[64];
    float w0[64];
    ccr_test_fill_uniform(v.rng, x, B * c.d_in, -1, 1);
    ccr_test_fill_uniform(v.rng, dw, B * slots, -1, 1);
    double aux0 = 0.0;
    size_t nnoise;
    for (int rep = 0; rep < 3; rep++) {
        ccr_route r;
        ccr_gate_stats st;
        gsl_rng_set(v.rng, rep < 2 ? 5 : 6);
        CCR_CK_OK(v.ctx, ccr_gate_forward(v.g, x, B, true, v.rng, &r, &st));
        const float *noise = env_export(&v, noise_name, &nnoise);
        ck_assert_uint_le(nnoise, nn);
        memset(dx, 0, sizeof dx);
        CCR_CK_OK(v.ctx, ccr_arena_zero_grad(v.a));
        ccr_gate_bwd_args ba = {.x = x, .batch = B, .dweights = dw, .dx = dx};
        CCR_CK_OK(v.ctx, ccr_gate_backward(v.g, &ba));
        const size_t nb = ccr_arena_block_len(v.a);
        ck_assert_uint_le(nb, 512);
        if (rep == 0) {
            memcpy(id0, r.ids, B * slots * sizeof(int32_t));
            memcpy(w0, r.weights, B * slots * sizeof(float));
            memcpy(n0, noise, nnoise * sizeof(float));
            memcpy(g0, ccr_arena_grads(v.a), nb * sizeof(float));
            memcpy(dx0, dx, sizeof dx);
            aux0 = st.aux_loss;
        } else if (rep == 1) {
            ck_assert(memcmp(id0, r.ids, B * slots * sizeof(int32_t)) == 0);
            ck_assert(memcmp(w0, r.weights, B * slots * sizeof(float)) == 0);
            ck_assert(memcmp(n0, noise, nnoise * sizeof(float)) == 0);
            ck_assert(memcmp(&aux0, &st.aux_loss, sizeof aux0) == 0);
            ck_assert(memcmp(g0, ccr_arena_grads(v.a), nb * sizeof(float)) == 0);
            ck_assert(memcmp(dx0, dx, sizeof dx) == 0);
        } else {
            ck_assert(memcmp(n0, noise, nnoise * sizeof(float)) != 0);
        }
    }
    env_close(&v);
}

/* ---- none, dense and switch (the fixture serves signtree too) ---------------- */

ccr_ctx *ctx;
ccr_backend *be;
gsl_rng *rng;

void gate_fixture_open(unsigned long seed)
{
    ctx = ccr_test_ctx();
    CCR_CK_OK(ctx, ccr_backend_cpu_init(ctx, &be));
    rng = ccr_test_rng(seed);
}

void gate_fixture_close(void)
{
    gsl_rng_free(rng);
    ccr_backend_free(be);
    ccr_ctx_free(ctx);
}

void tgate_make(tgate *t, const ccr_gate_type *type, const ccr_gate_config *cfg,
                size_t max_batch, unsigned long seed)
{
    memset(t, 0, sizeof *t);
    CCR_CK_OK(ctx, ccr_gate_alloc(ctx, type, cfg, max_batch, &t->g));
    CCR_CK_OK(ctx, ccr_arena_init(be, &t->a));
    CCR_CK_OK(ctx, ccr_gate_declare(t->g, t->a, "gate."));
    t->d_in = cfg->d_in;
    t->n = ccr_gate_n_matrices(t->g);
    t->slots = ccr_gate_slots(t->g);
    if (ccr_arena_count(t->a) == 0)
        return;
    ck_assert_uint_eq(ccr_arena_count(t->a), 1);
    CCR_CK_OK(ctx, ccr_arena_finalize(t->a));
    gsl_rng *r = ccr_test_rng(seed);
    CCR_CK_OK(ctx, ccr_gate_init_params(t->g, r));
    gsl_rng_free(r);
    size_t idx;
    CCR_CK_OK(ctx, ccr_arena_find(t->a, "gate.w_g", &idx));
    ck_assert_uint_eq(ccr_arena_size(t->a, idx), t->d_in * t->n);
    t->w = ccr_arena_value(t->a, idx);
    t->dw = ccr_arena_grad(t->a, idx);
}

void tgate_free(tgate *t)
{
    ccr_gate_free(t->g);
    ccr_arena_free(t->a);
}

void ref_softmax_row(const tgate *t, const float *x, size_t b, double *p, double *lse)
{
    double z[16], m = -INFINITY, s = 0.0;
    ck_assert_uint_le(t->n, 16);
    ref_mm(x + b * t->d_in, t->w, t->d_in, t->n, z);
    for (size_t j = 0; j < t->n; j++)
        m = z[j] > m ? z[j] : m;
    for (size_t j = 0; j < t->n; j++)
        s += exp(z[j] - m);
    for (size_t j = 0; j < t->n; j++)
        p[j] = exp(z[j] - m) / s;
    *lse = m + log(s);
}

void fwd(tgate *t, const float *x, size_t batch, ccr_route *r, ccr_gate_stats *st)
{
    CCR_CK_OK(ctx, ccr_gate_forward(t->g, x, batch, true, rng, r, st));
    CCR_CK_OK(ctx, ccr_route_validate(ctx, r));
    ck_assert_uint_eq(r->batch, batch);
    ck_assert_uint_eq(r->slots, t->slots);
    ck_assert_uint_eq(r->n_matrices, t->n);
}

const float *export_of(const tgate *t, const char *want, size_t len)
{
    size_t rank, shape[4];
    const float *data = find_export(ctx, t->g, want, &rank, shape);
    ck_assert_uint_eq(rank, 1);
    ck_assert_uint_eq(shape[0], len);
    return data;
}

ccr_gate_config base_cfg(size_t d_in, size_t n)
{
    ccr_gate_config c = ccr_gate_config_default();
    c.d_in = d_in;
    c.n_experts = n;
    return c;
}

typedef struct tg_fd {
    tgate *t;
    const ccr_gate_type *type;
    const float *x;
    const double *r;
    const int32_t *ids; /* the gate's routing at the base point */
    bool importance;    /* the gate reported an importance loss */
    double w_importance, aux_alpha, z_loss;
} tg_fd;

/* L = sum_bs r_bs w_bs + aux_loss of dense or switch in double from the
 * equations: p = softmax(x W_g); dense: weights p (plus w_importance
 * CV^2(sum_b p) when the gate applies it); switch: weight p_{i*} when the
 * gate kept the example, loss_switch = alpha E sum_i f_i P_i; z-loss over
 * the logits.  The signature is the argmax (switch) or the ids (dense). */
static double tg_loss(void *u, int32_t *sig, size_t *nsig)
{
    tg_fd *f = u;
    const size_t n = f->t->n;
    const bool sw = f->type == &ccr_gate_switch;
    double L = 0.0, z = 0.0, imp[16] = {0}, cntf[16] = {0};
    ck_assert_uint_le(n, 16);
    for (size_t b = 0; b < FD_B; b++) {
        double p[16], lse;
        ref_softmax_row(f->t, f->x, b, p, &lse);
        z += lse * lse;
        for (size_t i = 0; i < n; i++)
            imp[i] += p[i];
        if (sw) {
            size_t best = 0;
            for (size_t i = 1; i < n; i++)
                best = p[i] > p[best] ? i : best;
            cntf[best] += 1.0;
            sig[b] = (int32_t)best;
            if (f->ids[b] >= 0)
                L += f->r[b] * p[best];
        } else {
            for (size_t i = 0; i < n; i++) {
                L += f->r[b * n + i] * p[i];
                sig[b * n + i] = (int32_t)i;
            }
        }
    }
    if (sw) {
        double fp = 0.0;
        for (size_t i = 0; i < n; i++)
            fp += (cntf[i] / FD_B) * (imp[i] / FD_B);
        L += f->aux_alpha * (double)n * fp;
    } else if (f->importance) {
        L += f->w_importance * ref_cv2(imp, n);
    }
    L += f->z_loss * z / FD_B;
    *nsig = sw ? FD_B : FD_B * n;
    return L;
}

void check_grad(const ccr_gate_type *type, size_t n, double cf, bool zero_r)
{
    ccr_gate_config c = base_cfg(FD_D, n);
    c.randomize = true;
    /* Without the task term, larger coefficients make the aux gradients dominate. */
    c.aux_alpha = zero_r ? 4.0 : 0.5;
    c.z_loss = zero_r ? 0.5 : 0.1;
    c.w_importance = zero_r ? 2.0 : 0.5; /* dense's importance loss */
    c.capacity_factor = cf;
    tgate t;
    tgate_make(&t, type, &c, FD_B, 11);
    /* Larger logits than the N(0, 1/d) init gives, for wider routing margins. */
    for (size_t i = 0; i < FD_D * n; i++)
        t.w[i] *= 3.0f;
    float x[FD_B * FD_D], dx[FD_B * FD_D];
    ccr_test_fill_uniform(rng, x, FD_B * FD_D, -1, 1);
    const size_t ns = FD_B * t.slots;
    double r[FD_B * 16];
    float rf[FD_B * 16];
    for (size_t i = 0; i < ns; i++) {
        r[i] = zero_r ? 0.0 : 2.0 * gsl_rng_uniform(rng) - 1.0;
        rf[i] = (float)r[i];
    }
    ccr_route rt;
    ccr_gate_stats st;
    CCR_CK_OK(ctx, ccr_gate_forward(t.g, x, FD_B, true, rng, &rt, &st));
    int32_t ids[FD_B * 16];
    memcpy(ids, rt.ids, ns * sizeof *ids);
    tg_fd u = {.t = &t, .type = type, .x = x, .r = r, .ids = ids,
               .importance = st.loss_importance != 0.0, .w_importance = c.w_importance,
               .aux_alpha = c.aux_alpha, .z_loss = c.z_loss};
    double task = st.aux_loss;
    for (size_t i = 0; i < ns; i++)
        task += r[i] * (double)rt.weights[i];
    gate_fd fd;
    ck_close(gate_fd_init(&fd, tg_loss, &u, type->name), task, 1e-5, "reference loss");
    for (size_t i = 0; i < ns; i++) /* the reference routes as the gate does */
        ck_assert(rt.ids[i] < 0 || rt.ids[i] == fd.base[i]);
    if (type == &ccr_gate_switch) {
        ck_assert_msg(st.dropped > 0 && st.dropped < FD_B, "dropped %zu", st.dropped);
        ck_assert(st.loss_switch > 0.0);
    }
    ck_assert(st.loss_z > 0.0);
    if (type == &ccr_gate_dense) /* the importance term is in the checked loss */
        ck_assert(st.loss_importance > 0.0);
    CCR_CK_OK(ctx, ccr_arena_zero_grad(t.a));
    memset(dx, 0, sizeof dx);
    ccr_gate_bwd_args ba = {.x = x, .batch = FD_B, .dweights = rf, .dx = dx};
    CCR_CK_OK(ctx, ccr_gate_backward(t.g, &ba));
    gate_fd_sweep(&fd, t.a, x, dx, FD_B * FD_D, type->name); /* t.a holds w_g only */

    /* Gradients accumulate: a second backward doubles them. */
    float dw1[FD_D * 16];
    memcpy(dw1, t.dw, FD_D * n * sizeof *dw1);
    CCR_CK_OK(ctx, ccr_gate_forward(t.g, x, FD_B, true, rng, &rt, &st));
    CCR_CK_OK(ctx, ccr_gate_backward(t.g, &ba));
    for (size_t i = 0; i < FD_D * n; i++)
        ck_assert_double_eq_tol(t.dw[i], 2.0 * dw1[i], 1e-5 * (1.0 + fabs(dw1[i])));
    tgate_free(&t);
}

void expect_einval(const ccr_gate_type *type, const ccr_gate_config *c, const char *opt)
{
    ccr_gate *sentinel = (ccr_gate *)&sentinel;
    ccr_gate *g = sentinel;
    CCR_CK_STATUS(ctx, ccr_gate_alloc(ctx, type, c, 8, &g), CCR_EINVAL);
    ck_assert_ptr_eq(g, sentinel);
    ck_assert_msg(strstr(ccr_ctx_errmsg(ctx), opt) != NULL, "%s: message '%s' lacks '%s'",
                  type->name, ccr_ctx_errmsg(ctx), opt);
}

void tgate_run_once(const ccr_gate_type *type, int32_t *ids, float *w, float *dw, float *dx)
{
    ccr_gate_config c = base_cfg(FD_D, 4);
    c.randomize = true;
    c.z_loss = 0.01;
    c.capacity_factor = 0.75;
    tgate t;
    tgate_make(&t, type, &c, FD_B, 99);
    gsl_rng *r = ccr_test_rng(5);
    float x[FD_B * FD_D], dwt[FD_B * 4];
    ccr_test_fill_uniform(r, x, FD_B * FD_D, -3, 3);
    ccr_test_fill_uniform(r, dwt, FD_B * 4, -1, 1);
    gsl_rng_free(r);
    ccr_route rt;
    ccr_gate_stats st;
    fwd(&t, x, FD_B, &rt, &st);
    memcpy(ids, rt.ids, FD_B * t.slots * sizeof *ids);
    memcpy(w, rt.weights, FD_B * t.slots * sizeof *w);
    memset(dx, 0, FD_B * FD_D * sizeof *dx);
    ccr_gate_bwd_args ba = {.x = x, .batch = FD_B, .dweights = dwt, .dx = dx};
    CCR_CK_OK(ctx, ccr_gate_backward(t.g, &ba));
    memcpy(dw, t.dw, FD_D * 4 * sizeof *dw);
    tgate_free(&t);
}

/* ---- a small linear bank for the straight-through tests --------------------- */

/* Output o of matrix m on x, in double. */
static double fake_out(const fake_bank *fb, size_t m, const float *x, size_t o)
{
    double v = fb->b[m * fb->d_out + o];
    for (size_t i = 0; i < fb->d_in; i++)
        v += (double)x[i] * fb->w[(m * fb->d_in + i) * fb->d_out + o];
    return v;
}

ccr_status fake_eval(void *bank, size_t m, const float *x, float *out)
{
    fake_bank *fb = bank;
    if (m >= fb->n)
        return CCR_EINVAL;
    fb->calls++;
    for (size_t o = 0; o < fb->d_out; o++)
        out[o] = (float)fake_out(fb, m, x, o);
    return CCR_OK;
}

double fake_dot(const fake_bank *fb, size_t m, const float *x, const float *dy)
{
    double acc = 0.0;
    for (size_t o = 0; o < fb->d_out; o++)
        acc += (double)dy[o] * fake_out(fb, m, x, o);
    return acc;
}

void fake_bank_init(fake_bank *fb, size_t n, size_t d_in, size_t d_out, gsl_rng *r)
{
    *fb = (fake_bank){.n = n, .d_in = d_in, .d_out = d_out};
    fb->w = malloc(n * d_in * d_out * sizeof *fb->w);
    fb->b = malloc(n * d_out * sizeof *fb->b);
    ck_assert(fb->w != NULL && fb->b != NULL);
    ccr_test_fill_uniform(r, fb->w, n * d_in * d_out, -1.0f, 1.0f);
    ccr_test_fill_uniform(r, fb->b, n * d_out, -1.0f, 1.0f);
}

void fake_bank_free(fake_bank *fb)
{
    free(fb->w);
    free(fb->b);
}

void tgate_assert_deterministic(const ccr_gate_type *type, size_t slots)
{
    int32_t ids[2][FD_B * 4];
    float w[2][FD_B * 4], dw[2][FD_D * 4], dx[2][FD_B * FD_D];
    for (int rep = 0; rep < 2; rep++)
        tgate_run_once(type, ids[rep], w[rep], dw[rep], dx[rep]);
    ck_assert(memcmp(ids[0], ids[1], FD_B * slots * sizeof(int32_t)) == 0);
    ck_assert(memcmp(w[0], w[1], FD_B * slots * sizeof(float)) == 0);
    ck_assert(memcmp(dw[0], dw[1], sizeof dw[0]) == 0);
    ck_assert(memcmp(dx[0], dx[1], sizeof dx[0]) == 0);
}
