/*
 * cond_impl.h - the layout of struct ccr_cond and the helpers its two
 * halves share (private): cond.c (the layer) and cond_ep.c (its expert-
 * parallel path, issue 12).
 */
#ifndef CCR_COND_IMPL_H
#define CCR_COND_IMPL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ccr/ccr_comm.h"
#include "ccr/ccr_cond.h"
#include "ccr/ccr_safetensors.h"
#include "cond_dev.h"  // provides: ccr_cond_dev
#include "pool.h"      // provides: ccr_pool

CCR_BEGIN_DECLS

typedef struct cond_ep cond_ep;  /* cond_ep.c's workspace */

struct ccr_cond {
    ccr_backend *be;
    ccr_ctx *ctx;
    ccr_cond_config cfg;
    ccr_gate *gate;
    ccr_cond_dev *dev;         /* the device half on a non-CPU backend, else NULL */
    char gate_prefix[CCR_ARENA_MAX_NAME]; /* where the gate declared (device bind) */
    char bank_prefix[CCR_ARENA_MAX_NAME]; /* the bank's names: prefix + "experts."/"tree." */
    size_t max_batch, slots, n_mat, h;
    bool tree;                 /* the bank is named "tree." */
    ccr_arena *arena;          /* where the bank lives (set by declare) */
    size_t p_w1, p_b1, p_w2, p_b2;  /* FFN: w1 b1 w2 b2; linear: w1 b1 only */
    size_t gate_first, gate_end;    /* the gate's tensors in the arena */
    /* workspace, one allocation */
    void *work;
    size_t work_bytes;
    uint32_t *cnt;             /* [n_mat] counting-sort counters, 0 between calls */
    int32_t *gid;              /* [G_max] group -> matrix id, ascending */
    uint32_t *goff;            /* [G_max + 1] group -> first sorted position */
    uint64_t *gsched;          /* [G_max] (rows, group) keys: the pool's order */
    int32_t *src;              /* [P] sorted position -> pair */
    int32_t *pos;              /* [P] pair -> sorted position, -1 if empty */
    double *acc;               /* [T, acc_n] per-worker column sums (bias grads) */
    size_t acc_n;
    float *xin;                /* [max_batch, d_in] copy of the forward input */
    float *xg, *hid, *out;     /* [P, d_in], [P, h], [P, d_out] in sorted order */
    float *g_out, *g_hid, *g_x;/* their gradients */
    float *dweights;           /* [P] dL/dw in pair order */
    float *eval_hid;           /* [h] scratch of eval_matrix */
    float *eval_out;           /* [d_out] the gate's scratch row */
    /* last forward */
    ccr_route route;
    size_t batch, n_pairs;     /* examples, used pairs */
    size_t n_groups;           /* non-empty groups */
    bool experts;              /* groups ran on the pool (CCR_COND_PAR_EXPERTS) */
    /* optional per-matrix timing (ccr_cond_set_timing): [3 n_mat] or NULL */
    double *tsec;
    /* threads */
    ccr_pool *pool;
    size_t T;                  /* pool workers, the caller included */
    const float *job_x, *job_dy; /* the running job's arguments */
    float *job_y;
    bool job_dx;
    atomic_size_t job_next;    /* next entry of gsched to take */
    atomic_int job_err;        /* first failing status, CCR_OK if none */
    /* eval_dots workspace (cond_dots_alloc), its own allocation */
    void *dots_work;
    size_t dots_cap;           /* pairs per chunk; 0: no eval_dots */
    size_t dots_blk;           /* rows per GEMM block */
    size_t *dots_cnt;          /* [n_mat + 1] counting sort by matrix */
    size_t *dots_ord;          /* [cap] chunk pairs in (matrix, pair) order */
    size_t *dots_row;          /* [cap] their rows, in the same order */
    size_t *dots_mats;         /* [min(n_mat, cap)] the chunk's non-empty matrices */
    float *dots_blocks;        /* T blocks, worker w's at w x blk x row floats: [blk,
                                  d_in], [blk, h], [blk, d_out], [blk, d_out] */
    /* the running eval_dots chunk (the pool's job arguments) */
    size_t dots_n_mats, dots_p0;
    const float *dots_xin, *dots_dyin;
    double *dots_out;
    /* expert parallelism (ccr_cond_set_comm, cond_ep.c): NULL = one process */
    ccr_comm *comm;
    size_t m0, m1;             /* this rank's bank matrices [m0, m1) (lrow NULL) */
    /* The sign-bit path tree's layout (cond_ep.c): the bank rows this rank
     * holds are not one block; lrow[m] is matrix m's row here or -1, and
     * n_local rows are held, the n_rep replicated ones first.  NULL: the
     * rows are matrices m0 .. m1 - 1. */
    const int32_t *lrow;
    size_t n_local, n_rep;
    cond_ep *ep;
};

static inline bool cond_ffn(const ccr_cond *c) { return c->cfg.bank == CCR_BANK_FFN; }

/* cond.c's steps, for cond_ep.c: the stable counting sort of the used
 * pairs by id; bank matrix m (local index) applied to n gathered rows; the
 * fused ReLU backward and bias gradient; the fixed-order double dot; the
 * bank's backward on one group's rows; the combine and dx gathers of the pool (arguments in c->job_*). */
ccr_status ccr_condi_sort(ccr_cond *c, const ccr_route *r, size_t P);
ccr_status ccr_condi_apply(ccr_cond *c, size_t m, const float *xg, float *hid, float *out,
                           size_t n);
void ccr_condi_relu_bwd_bias(float *g, const float *hid, size_t n, size_t cols, double *acc,
                             float *db);
double ccr_condi_dot(const float *a, const float *b, size_t n);
/* g_out = w dy and dweights = <dy, out> for the sorted positions [q0, q1). */
void ccr_condi_gout(ccr_cond *c, size_t q0, size_t q1, const float *dy);
ccr_status ccr_condi_bank_bwd(ccr_cond *c, size_t m, size_t n, const float *xg,
                              const float *hid, const float *gout, float *ghid, float *gx,
                              double *acc);
void ccr_condi_combine_job(void *arg, size_t w);
void ccr_condi_dx_job(void *arg, size_t w);

/* The bank as one process holds it (checkpoints under a communicator,
 * cond_ep.c): its 2 (linear) or 4 (FFN) tensors' names, shapes and floats
 * per matrix; data[t] is [n_mat, row[t]] on rank 0 after
 * ccr_condi_ep_gather_bank (one allocation, data[0]; free it), NULL
 * elsewhere. */
typedef struct ccr_bank_full {
    size_t n;
    char name[4][CCR_ARENA_MAX_NAME + 8];
    size_t rank[4], shape[4][3], row[4];
    size_t idx[4];       /* this rank's arena tensors, SIZE_MAX if none */
    float *data[4];
} ccr_bank_full;
void ccr_condi_bank_layout(const ccr_cond *c, ccr_bank_full *b);
/* Collective: every rank's rows to rank 0 (the replicated ones from rank 0
 * alone), placed at their matrix ids. */
ccr_status ccr_condi_ep_gather_bank(ccr_cond *c, ccr_bank_full *b);
/* This rank's rows from a checkpoint of the whole bank ("param." + name):
 * checked (present, F32, the whole bank's shape, finite) without write,
 * copied with it. */
ccr_status ccr_condi_load_bank(ccr_cond *c, const ccr_safetensors *f, const char *path,
                               bool write);

/* cond_ep.c: the layer spread over c->comm's ranks. */
ccr_status ccr_condi_ep_forward(ccr_cond *c, const float *x, size_t batch, bool train,
                                gsl_rng *rng, float *y, ccr_gate_stats *stats);
ccr_status ccr_condi_ep_backward(ccr_cond *c, const float *dy, float *dx);
void ccr_condi_ep_free(ccr_cond *c);

CCR_END_DECLS

#endif /* CCR_COND_IMPL_H */
