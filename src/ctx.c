/*
 * ctx.c - context lifecycle and the last-error accessors.
 */
#include <stdlib.h>

#include "ctx_impl.h"  // provides: struct ccr_ctx

ccr_status ccr_ctx_init(ccr_ctx **out)
{
    if (out == NULL)
        return CCR_EINVAL;
    ccr_ctx *ctx = calloc(1, sizeof *ctx);
    if (ctx == NULL)
        return CCR_ENOMEM;
    *out = ctx;
    return CCR_OK;
}

void ccr_ctx_free(ccr_ctx *ctx) { free(ctx); }

const char *ccr_ctx_errmsg(const ccr_ctx *ctx) { return ctx ? ctx->msg : ""; }

ccr_status ccr_ctx_last_status(const ccr_ctx *ctx) { return ctx ? ctx->last : CCR_OK; }

void ccr_ctx_clear_error(ccr_ctx *ctx)
{
    if (ctx) {
        ctx->last = CCR_OK;
        ctx->msg[0] = '\0';
    }
}
