/*
 * ccr_ctx.h - the context: owner of the last error message.
 *
 * Every ccr object is created against a context, and every failure records
 * "function: what went wrong (file:line)" on it, as SQLite keeps the message
 * on its handle.  A context is not thread-safe: use one per thread.  There is
 * no global state anywhere in ccr.
 *
 *     ccr_ctx *ctx;
 *     if (ccr_ctx_init(&ctx) != CCR_OK) return 1;     // only CCR_ENOMEM
 *     ccr_backend *cpu;
 *     if (ccr_backend_cpu_init(ctx, &cpu) != CCR_OK)
 *         fprintf(stderr, "%s\n", ccr_ctx_errmsg(ctx));
 *     ...
 *     ccr_backend_free(cpu);
 *     ccr_ctx_free(ctx);
 */
#ifndef CCR_CTX_H
#define CCR_CTX_H

#include "ccr_common.h"
#include "ccr_status.h"

CCR_BEGIN_DECLS

typedef struct ccr_ctx ccr_ctx;

/* Creates a context with no error recorded.  Returns CCR_EINVAL if out is
 * NULL and CCR_ENOMEM if allocation fails; *out is set only on success. */
ccr_status ccr_ctx_init(ccr_ctx **out);

/* Releases the context.  NULL is accepted. */
void ccr_ctx_free(ccr_ctx *ctx);

/* The message of the last failure recorded on ctx, or "" if none (or if ctx
 * is NULL).  The pointer stays valid until the next failure or ccr_ctx_free. */
const char *ccr_ctx_errmsg(const ccr_ctx *ctx);

/* The status of the last failure recorded on ctx (CCR_OK if none). */
ccr_status ccr_ctx_last_status(const ccr_ctx *ctx);

/* Forgets the last error. */
void ccr_ctx_clear_error(ccr_ctx *ctx);

CCR_END_DECLS

#endif /* CCR_CTX_H */
