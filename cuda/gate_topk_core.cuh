/*
 * gate_topk_core.cuh - the device half of src/gate_topk_core.h: noisy top-k
 * gating of `rows` independent rows of width n, shared by cuda/gate_topk.cu
 * and cuda/gate_hmoe.cu (Shazeer et al. 2017, eqs. 3-9).
 *
 * A tkd_core holds the same per-row arrays as the CPU's tk_core, in device
 * memory, every one allocated in tkd_core_init for `rows` rows.  The caller
 * writes the clean logits x W_g (and, in training, the raw noise logits
 * x W_noise and the N(0, 1) draws, drawn on the host in the CPU's order)
 * into the first nrows rows; tkd_core_forward then computes what
 * tk_core_row_forward_drawn computes for each of them, and
 * tkd_core_backward what tk_core_row_backward computes.
 *
 * Work split (the CPU does everything per row, in index order):
 *   - element-wise kernels over rows x n for the transcendental parts
 *     (softplus, sigmoid, H, the smooth load P, the load gradient terms);
 *   - one thread per row for what is sequential on the CPU and must stay
 *     exact: the top-k selection (gate_topk's insertion, ties to the lower
 *     index), the softmax over the kept k, and the float sums into the
 *     threshold entries of dL/dH in backward (index order, as on the CPU);
 *   - one warp per row for the log-sum-exp of the z-loss (a fixed
 *     reduction tree: the same every run, equal to the CPU's sequential sum
 *     to double rounding).
 */
#ifndef CCR_GATE_TOPK_CORE_CUH
#define CCR_GATE_TOPK_CORE_CUH

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "gate_dev_util.cuh"  // provides: gdev_alloc, gdev_host_alloc, gdev_stream

typedef struct tkd_core {
    ccr_backend *be;       /* the backend the buffers live on (NULL before init) */
    size_t rows, n, k;
    size_t ntop;           /* entries kept in top: k + 1 if k < n (the thresholds), else k */
    double noise_eps;
    bool want_lse;         /* compute lse (set after init, as the CPU gates do: z-loss on) */
    /* Device arrays, [rows, n] unless noted; row r starts at r n (top: r ntop,
     * gates: r k), as in tk_core. */
    float *clean;          /* x W_g (written by the caller) */
    float *raw;            /* x W_noise (written by the caller, train only) */
    float *std;            /* softplus(raw) + noise_eps in train, 0 in eval */
    double *sig;           /* sigmoid(raw) (train; kept for backward) */
    float *noise;          /* the N(0,1) draws (written by the caller in train; 0 in eval) */
    float *h;              /* clean + noise std */
    int32_t *top;          /* [rows, ntop] indices by decreasing H, ties to the lower index */
    float *gates;          /* [rows, k] softmax over H[top[0..k)] */
    double *p;             /* smooth load probabilities (train and k < n only) */
    double *lse;           /* [rows] logsumexp of the clean logits; 0 if !want_lse */
    unsigned char *in_top; /* 1 where the entry is in its row's top k (smooth only; the
                              CPU's tk_mark_top, kept per row from forward to backward) */
    float *dclean;         /* backward results: dL/dclean */
    float *draw;           /* dL/draw (train only) */
    float *dh;             /* backward scratch: dL/dH (the CPU's per-row dh) */
    double *tload;         /* backward scratch: the load term t of each entry (or 0) */
} tkd_core;

/* Allocates every device buffer for rows rows of width n, top k (zero-filled).
 * CCR_EINVAL on size overflow (as tk_core_init), CCR_ENOMEM / CCR_EDEVMEM.
 * On failure nothing stays allocated. */
ccr_status tkd_core_init(tkd_core *c, ccr_backend *be, size_t rows, size_t n, size_t k,
                         double noise_eps);
void tkd_core_free(tkd_core *c);

/* Whether a forward in this mode uses the smooth load (train and k < n), as
 * tk_core_smooth. */
static inline bool tkd_core_smooth(const tkd_core *c, bool train) { return train && c->k < c->n; }

/* tk_core_row_forward_drawn for rows 0 .. nrows-1: std, sig, H, top, gates,
 * lse (if want_lse, else 0) and, when smooth, in_top and P.  In train the
 * rows' clean, raw and noise are the caller's; in eval clean only (std and
 * noise are zeroed, as on the CPU).  Asynchronous on the backend's stream. */
ccr_status tkd_core_forward(tkd_core *c, size_t nrows, bool train);

/* tk_core_row_backward for rows 0 .. nrows-1 of the last forward (same
 * train).  dg [nrows, k]: dL/d(gate value) in top order (device; NULL: none).
 * dload: dL/dP (device doubles, used only when smooth; NULL: none); row r
 * reads dload[sel[r] n ..) when sel (device [nrows]) is not NULL, else
 * dload[0 .. n) (every row the same vector).  zcoef: c of c lse^2.  Writes
 * the rows of dclean and, in train, of draw. */
ccr_status tkd_core_backward(tkd_core *c, size_t nrows, bool train, const float *dg,
                             const double *dload, const int32_t *sel, double zcoef);

/* dst[j] = sum over r = 0 .. rows-1, in order, of src[r ld + j], j < cols
 * (device doubles): the CPU's per-expert `load[i] += p[b n + i]` loops, one
 * thread per column, so the sum is the CPU's to the last bit. */
ccr_status tkd_colsum_d(ccr_backend *be, const double *src, size_t rows, size_t cols, size_t ld,
                        double *dst);

/* Per-matrix sums of a routing table (device): imp[m] = sum of
 * (double)weights[b slots + s] and counts[m] = the number of entries with
 * ids[b slots + s] == m, over b then s in order (one thread per matrix), as
 * the CPU gates' `imp[id] += (double)w; counts[id] += 1.0` loops. */
ccr_status tkd_route_sums(ccr_backend *be, const int32_t *ids, const float *weights,
                          size_t batch, size_t slots, size_t n_matrices, double *imp,
                          double *counts);

/* ccr_gate_forward's check of the routing weights (every slot is used by
 * topk and hmoe): CCR_EDOM naming example, slot and value if one of
 * weights[batch slots] (device) is not finite.  flag: one device int. */
ccr_status tkd_check_weights(ccr_backend *be, const char *gate, const float *weights,
                             size_t batch, size_t slots, int *flag);

/* Allocation chains for the gates' init: nothing happens once *st is not
 * CCR_OK, so a list of calls ends in the first failure's status. */
static inline void *tkd_dev_buf(ccr_status *st, ccr_backend *be, size_t n, size_t size)
{
    void *p = NULL;
    if (*st == CCR_OK)
        *st = gdev_alloc(be, n, size, &p);
    return *st == CCR_OK ? p : NULL;
}

static inline void *tkd_host_buf(ccr_status *st, ccr_backend *be, size_t n, size_t size)
{
    void *p = NULL;
    if (*st == CCR_OK)
        *st = gdev_host_alloc(be, n, size, &p);
    return *st == CCR_OK ? p : NULL;
}

#endif /* CCR_GATE_TOPK_CORE_CUH */
