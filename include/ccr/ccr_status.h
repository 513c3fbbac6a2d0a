/*
 * ccr_status.h - status codes returned by every fallible ccr function.
 *
 * ccr never aborts, exits or prints.  A failing call returns one of the codes
 * below and leaves a human-readable message on the context it was given
 * (ccr_ctx_errmsg); outputs of a failing call are left untouched unless its
 * contract says otherwise.
 *
 *     ccr_status s = ccr_net_forward(net, x, batch, &logits);
 *     if (s != CCR_OK)
 *         fprintf(stderr, "%s: %s\n", ccr_strerror(s), ccr_ctx_errmsg(ctx));
 */
#ifndef CCR_STATUS_H
#define CCR_STATUS_H

#include "ccr_common.h"

CCR_BEGIN_DECLS

typedef enum ccr_status {
    CCR_OK = 0,        /* success */
    CCR_EINVAL,        /* invalid argument (NULL pointer, zero size, bad option value) */
    CCR_EBADLEN,       /* shape or length mismatch between arguments */
    CCR_EDOM,          /* NaN or infinity in an input that must be finite */
    CCR_ENOMEM,        /* host memory allocation failed */
    CCR_EDEVMEM,       /* device memory allocation failed */
    CCR_EUNSUP,        /* operation not supported by this build or backend */
    CCR_ENODEV,        /* no usable CUDA device */
    CCR_ECUDA,         /* a CUDA runtime call failed */
    CCR_ECUBLAS,       /* a cuBLAS call failed */
    CCR_EIO,           /* file cannot be opened, read or written */
    CCR_EFORMAT,       /* file content is malformed (bad magic, header, offsets, dtype) */
    CCR_EINTERNAL,     /* an internal invariant failed: a bug in ccr, please report */
    CCR_ECOMM,         /* a communication (MPI, NCCL) call failed or timed out */
    CCR_STATUS_COUNT   /* number of codes; not a status */
} ccr_status;

/* Static English text for a status code ("invalid argument", ...).  Never
 * NULL; unknown codes give "unknown status". */
const char *ccr_strerror(ccr_status status);

CCR_END_DECLS

#endif /* CCR_STATUS_H */
