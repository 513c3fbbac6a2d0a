/*
 * ccr.h - umbrella header of the ccr library.
 *
 * ccr is a C11 (+ CUDA) library for conditional computation research:
 * networks whose parameters are switched on per example by a gating module.
 * Link with `pkg-config --cflags --libs ccr`.
 *
 *     #include <ccr/ccr.h>
 *     ccr_ctx *ctx;  ccr_ctx_init(&ctx);
 *     ccr_backend *be;  ccr_backend_cpu_init(ctx, &be);
 *     ... build a ccr_net (ccr_nn.h), load data (ccr_data.h), train ...
 *     ccr_backend_free(be);  ccr_ctx_free(ctx);
 */
#ifndef CCR_H
#define CCR_H

#include "ccr_common.h"
#include "ccr_status.h"
#include "ccr_ctx.h"
#include "ccr_backend.h"
#include "ccr_tensor.h"
#include "ccr_arena.h"
#include "ccr_safetensors.h"
#include "ccr_jsonl.h"
#include "ccr_data.h"
#include "ccr_nn.h"
#include "ccr_gate.h"
#include "ccr_cond.h"

#endif /* CCR_H */
