/*
 * status.c - ccr_strerror and the single error path, ccr_fail().
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>

#include "ccr/ccr_common.h"
#include "ctx_impl.h"  // provides: struct ccr_ctx
#include "internal.h"  // provides: ccr_fail

const char *ccr_version(void) { return CCR_VERSION; }

const char *ccr_strerror(ccr_status status)
{
    switch (status) {
    case CCR_OK: return "success";
    case CCR_EINVAL: return "invalid argument";
    case CCR_EBADLEN: return "shape or length mismatch";
    case CCR_EDOM: return "non-finite value in input";
    case CCR_ENOMEM: return "out of host memory";
    case CCR_EDEVMEM: return "out of device memory";
    case CCR_EUNSUP: return "operation not supported";
    case CCR_ENODEV: return "no CUDA device";
    case CCR_ECUDA: return "CUDA runtime error";
    case CCR_ECUBLAS: return "cuBLAS error";
    case CCR_EIO: return "input/output error";
    case CCR_EFORMAT: return "malformed file";
    case CCR_EINTERNAL: return "internal error";
    case CCR_ECOMM: return "communication error";
    case CCR_STATUS_COUNT: break;
    }
    return "unknown status";
}

ccr_status ccr_fail(ccr_ctx *ctx, ccr_status code, const char *func, const char *file,
                    int line, const char *fmt, ...)
{
    if (ctx == NULL)
        return code;
    /* "func: message (file:line)", truncated to the buffer if need be. */
    size_t cap = sizeof ctx->msg, w = 0;
    int r = snprintf(ctx->msg, cap, "%s: ", func);
    w = r < 0 ? 0 : ((size_t)r < cap ? (size_t)r : cap - 1);
    va_list ap;
    va_start(ap, fmt);
    r = vsnprintf(ctx->msg + w, cap - w, fmt, ap);
    va_end(ap);
    w = r < 0 ? w : (w + (size_t)r < cap ? w + (size_t)r : cap - 1);
    snprintf(ctx->msg + w, cap - w, " (%s:%d)", file, line);
    ctx->last = code;
    return code;
}

bool ccr_all_finite(const float *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(v[i]))
            return false;
    return true;
}
