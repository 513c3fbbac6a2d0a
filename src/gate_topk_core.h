/*
 * gate_topk_core.h - the noisy top-k building block shared by the topk and
 * hmoe gates (private).
 *
 * A tk_core holds `rows` independent gating problems of width n (an example
 * of the topk gate, or the primary or one secondary gate of an hmoe
 * example).  The caller writes the clean logits x W_g (and, in training, the
 * raw noise logits x W_noise) into a row, then tk_core_row_forward draws the
 * noise, selects the top k of H and computes the gate values and the smooth
 * load probabilities P(x, i) of Shazeer et al. 2017, eqs. 4-9.  Backward
 * takes dL/d(gate values) and dL/dP for a row and leaves dL/dclean and
 * dL/draw in the row's gradient buffers; the caller multiplies them into
 * its weight matrices.  Every buffer is allocated once, in tk_core_init.
 */
#ifndef CCR_GATE_TOPK_CORE_H
#define CCR_GATE_TOPK_CORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <gsl/gsl_rng.h>

#include "ccr/ccr_ctx.h"
#include "ccr/ccr_gate.h"
#include "ccr/ccr_status.h"

CCR_BEGIN_DECLS

typedef struct tk_core {
    size_t rows, n, k;
    size_t ntop;        /* entries kept in top: k + 1 if k < n (the thresholds), else k */
    double noise_eps;
    bool want_lse;      /* compute lse (true after init; callers clear it when
                           the z-loss is off: its exp per entry is then skipped) */
    /* [rows, n] unless noted; row r starts at r * n (top: r * ntop, gates: r * k) */
    float *clean;       /* x W_g (written by the caller) */
    float *raw;         /* x W_noise (written by the caller, train only) */
    float *std;         /* softplus(raw) + noise_eps in train, 0 in eval */
    double *sig;        /* sigmoid(raw) = dsoftplus/draw (train; kept for backward) */
    float *noise;       /* the N(0,1) draws (0 in eval) */
    float *h;           /* clean + noise * std */
    int32_t *top;       /* [rows, ntop] indices by decreasing H, ties to the lower index */
    float *gates;       /* [rows, k] softmax over H[top[0..k)] */
    double *p;          /* smooth load probabilities (train and k < n only) */
    double *lse;        /* [rows] logsumexp of the clean logits (z-loss); 0 if !want_lse */
    float *dclean;      /* backward results: dL/dclean */
    float *draw;        /* dL/draw (train only) */
    /* scratch of one row */
    float *hk, *dg, *dh;
    double *dstd;
    unsigned char *in_top;
} tk_core;

/* Allocates every buffer (zero-filled).  CCR_EINVAL on size overflow,
 * CCR_ENOMEM.  On failure nothing stays allocated. */
ccr_status tk_core_init(tk_core *c, ccr_ctx *ctx, size_t rows, size_t n, size_t k,
                        double noise_eps);
void tk_core_free(tk_core *c);

/* Whether a forward in this mode uses the smooth load (train and k < n). */
bool tk_core_smooth(const tk_core *c, bool train);

/* Forward of row r from its clean (and, if train, raw) logits: std, n draws
 * from rng (train; gate_noise_fill: gsl_ran_gaussian_ziggurat(rng, 1.0) in index order), H, top,
 * gates, lse (if want_lse, else 0) and, when smooth, P. */
void tk_core_row_forward(tk_core *c, size_t r, bool train, gsl_rng *rng);

/* The same with the row's draws already in c->noise (train; hmoe draws its
 * secondary rows in its documented order first, then batches their GEMMs). */
void tk_core_row_forward_drawn(tk_core *c, size_t r, bool train);

/* Backward of row r.  dg [k]: dL/d(gate value) in top order (NULL: none).
 * dload [n]: dL/dP(r, i), used only when smooth (NULL: none).  zcoef:
 * coefficient c of c * lse^2 (0: no z-loss).  Overwrites the row of dclean
 * and, in train, of draw. */
void tk_core_row_backward(tk_core *c, size_t r, bool train, const float *dg,
                          const double *dload, double zcoef);

/* dv[i] = coef * dCV^2/dv_i for t2t's CV^2 (population variance, +1e-10). */
void tk_cv2_grad(const double *v, size_t n, double coef, double *dv);

/* Checks the options common to topk and hmoe: loss weights and z_loss
 * finite and >= 0, noise_eps finite and >= 0.  CCR_EINVAL naming the option. */
ccr_status tk_check_common(ccr_ctx *ctx, const ccr_gate_config *cfg);

/* Fills the losses and the CV and max/mean diagnostics from Importance,
 * Load (smooth or counts) and the true counts, each of n entries; loss_z is
 * the z-loss already computed.  distinct is left to the caller. */
void tk_fill_stats(ccr_gate_stats *st, const ccr_gate_config *cfg, const double *imp,
                   const double *load, const double *counts, size_t n, double loss_z);

CCR_END_DECLS

#endif /* CCR_GATE_TOPK_CORE_H */
