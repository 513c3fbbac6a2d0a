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
 *
 * The NULL-handle rule (every public function; tests/test_api.c walks them
 * all, tests/api_coverage.sh checks that none is missed):
 *   - Getters never crash.  For a NULL handle or an index out of range they
 *     return a neutral value: 0 for sizes and counts, 0.0 for FLOPs, NULL for
 *     pointers (ccr_arena_name, ccr_safetensors_at, ccr_cond_route ...), -1
 *     for ccr_corpus_lookup.  Strings meant for printing (ccr_version,
 *     ccr_strerror, ccr_ctx_errmsg, ccr_backend_name, ccr_backend_describe)
 *     are never NULL: "" for a NULL handle.
 *   - Fallible functions (returning ccr_status) return CCR_EINVAL for a NULL
 *     handle, a NULL required argument or an index out of range, before
 *     touching any output; the message goes to the handle's context when
 *     there is one.
 *   - A NULL ccr_ctx is accepted wherever a function takes one: the call
 *     works, and failures are reported by status only (no message).
 *   - *_free and ccr_record_clear accept NULL; void helpers
 *     (ccr_dataset_gather, ccr_permutation) do nothing on NULL arguments.
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
#include "ccr_comm.h"

#endif /* CCR_H */
