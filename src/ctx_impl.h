/* ctx_impl.h - the layout of struct ccr_ctx (private). */
#ifndef CCR_CTX_IMPL_H
#define CCR_CTX_IMPL_H

#include "ccr/ccr_ctx.h"

#define CCR_CTX_MSG_MAX 512

struct ccr_ctx {
    ccr_status last;             /* status of the last failure, CCR_OK if none */
    char msg[CCR_CTX_MSG_MAX];   /* its message, "" if none */
};

#endif /* CCR_CTX_IMPL_H */
