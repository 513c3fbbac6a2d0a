/*
 * ops.c - src/ops.h: each call checks that the backend has the kernel and
 * dispatches through its table.  Empty ops (n == 0) do nothing.
 */
#include "ops.h"

#include "backend_impl.h"  // provides: struct ccr_backend, ccr_kernels
#include "internal.h"      // provides: CCR_FAIL

/* Returns CCR_EINVAL without a backend, CCR_EUNSUP when it lacks the op. */
#define OP_NEEDS(be, op)                                                                    \
    do {                                                                                    \
        if ((be) == NULL)                                                                   \
            return CCR_EINVAL;                                                              \
        if ((be)->k->op == NULL)                                                            \
            CCR_FAIL((be)->ctx, CCR_EUNSUP, "backend %s has no %s kernel",                  \
                     ccr_backend_name(be), #op);                                            \
    } while (0)

ccr_status ccr_ops_check(ccr_backend *be)
{
    OP_NEEDS(be, scale);
    OP_NEEDS(be, mul);
    OP_NEEDS(be, add);
    OP_NEEDS(be, bias_add);
    OP_NEEDS(be, bias_grad);
    OP_NEEDS(be, act_fwd);
    OP_NEEDS(be, act_bwd);
    OP_NEEDS(be, gather_rows);
    OP_NEEDS(be, segment_add_rows);
    OP_NEEDS(be, lstm_fwd);
    OP_NEEDS(be, lstm_bwd);
    OP_NEEDS(be, softmax_nll);
    OP_NEEDS(be, softmax_nll_bwd);
    if (be->iface->copy == NULL)
        CCR_FAIL(be->ctx, CCR_EUNSUP, "backend %s has no copy", ccr_backend_name(be));
    return CCR_OK;
}

ccr_status ccr_op_copy(ccr_backend *be, float *dst, const float *src, size_t n)
{
    if (be == NULL)
        return CCR_EINVAL;
    if (be->iface->copy == NULL)
        CCR_FAIL(be->ctx, CCR_EUNSUP, "backend %s has no copy", ccr_backend_name(be));
    return n ? be->iface->copy(be, dst, src, n * sizeof *dst) : CCR_OK; /* bounded: a buffer's length */
}

ccr_status ccr_op_scale(ccr_backend *be, float *x, size_t n, float k)
{
    OP_NEEDS(be, scale);
    return n ? be->k->scale(be, x, n, k) : CCR_OK;
}

ccr_status ccr_op_mul(ccr_backend *be, const float *a, const float *b, float *y, size_t n)
{
    OP_NEEDS(be, mul);
    return n ? be->k->mul(be, a, b, y, n) : CCR_OK;
}

ccr_status ccr_op_add(ccr_backend *be, const float *a, const float *b, float *y, size_t n)
{
    OP_NEEDS(be, add);
    return n ? be->k->add(be, a, b, y, n) : CCR_OK;
}

ccr_status ccr_op_bias_add(ccr_backend *be, float *y, const float *bias, size_t rows, size_t cols)
{
    OP_NEEDS(be, bias_add);
    return rows && cols ? be->k->bias_add(be, y, bias, rows, cols) : CCR_OK;
}

ccr_status ccr_op_bias_grad(ccr_backend *be, float *db, const float *dy, size_t rows, size_t cols)
{
    OP_NEEDS(be, bias_grad);
    return rows && cols ? be->k->bias_grad(be, db, dy, rows, cols) : CCR_OK;
}

ccr_status ccr_op_act_fwd(ccr_backend *be, ccr_act act, const float *x, float *y, size_t n)
{
    OP_NEEDS(be, act_fwd);
    return n ? be->k->act_fwd(be, act, x, y, n) : CCR_OK;
}

ccr_status ccr_op_act_bwd(ccr_backend *be, ccr_act act, const float *y, const float *dy,
                          float *dx, size_t n)
{
    OP_NEEDS(be, act_bwd);
    return n ? be->k->act_bwd(be, act, y, dy, dx, n) : CCR_OK;
}

ccr_status ccr_op_gather_rows(ccr_backend *be, const float *table, size_t d, const int32_t *ids,
                              size_t n, float *out)
{
    OP_NEEDS(be, gather_rows);
    return n && d ? be->k->gather_rows(be, table, d, ids, n, out) : CCR_OK;
}

ccr_status ccr_op_segment_add_rows(ccr_backend *be, float *dst, size_t d, const float *src,
                                   const int32_t *rows, const int32_t *start,
                                   const int32_t *seg_dst, size_t n_seg)
{
    OP_NEEDS(be, segment_add_rows);
    return n_seg && d ? be->k->segment_add_rows(be, dst, d, src, rows, start, seg_dst, n_seg)
                      : CCR_OK;
}

ccr_status ccr_op_lstm_fwd(ccr_backend *be, float *z, const float *c_prev, float *c, float *tc,
                           float *h, size_t batch, size_t d)
{
    OP_NEEDS(be, lstm_fwd);
    return batch && d ? be->k->lstm_fwd(be, z, c_prev, c, tc, h, batch, d) : CCR_OK;
}

ccr_status ccr_op_lstm_bwd(ccr_backend *be, const float *z, const float *c_prev, const float *tc,
                           const float *dh_out, const float *dh_rec, float *dc, float *dz,
                           size_t batch, size_t d)
{
    OP_NEEDS(be, lstm_bwd);
    return batch && d ? be->k->lstm_bwd(be, z, c_prev, tc, dh_out, dh_rec, dc, dz, batch, d)
                      : CCR_OK;
}

ccr_status ccr_op_softmax_nll(ccr_backend *be, float *z, const int32_t *tgt, size_t rows,
                              size_t cols, double *nll)
{
    OP_NEEDS(be, softmax_nll);
    if (rows && cols == 0)
        CCR_FAIL(be->ctx, CCR_EINVAL, "softmax over 0 columns");
    return rows ? be->k->softmax_nll(be, z, tgt, rows, cols, nll) : CCR_OK;
}

ccr_status ccr_op_softmax_nll_bwd(ccr_backend *be, float *z, const int32_t *tgt, size_t rows,
                                  size_t cols, float scale)
{
    OP_NEEDS(be, softmax_nll_bwd);
    return rows && cols ? be->k->softmax_nll_bwd(be, z, tgt, rows, cols, scale) : CCR_OK;
}
