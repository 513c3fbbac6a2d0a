/*
 * pool.h - a small persistent thread pool (private to the library).
 *
 * A pool of T workers counts the caller as worker 0 and starts T-1
 * threads, which sleep on a condition variable between jobs.  One job runs
 * fn(arg, w) once on every worker w = 0..T-1 and returns when all have
 * finished; how the job splits its work is up to fn.  A pool serves one
 * caller at a time (the layer that owns it).
 */
#ifndef CCR_POOL_H
#define CCR_POOL_H

#include <stddef.h>

#include "ccr/ccr_ctx.h"
#include "ccr/ccr_status.h"

typedef struct ccr_pool ccr_pool;
typedef void (*ccr_pool_fn)(void *arg, size_t worker);

/* n_workers >= 1 (the caller included).  CCR_ENOMEM if memory or a thread
 * cannot be had (the threads already started are joined). */
ccr_status ccr_pool_create(ccr_ctx *ctx, size_t n_workers, ccr_pool **out);
/* Joins the threads; NULL is a no-op. */
void ccr_pool_free(ccr_pool *p);
size_t ccr_pool_size(const ccr_pool *p);
/* fn(arg, w) on every worker, the caller as w = 0; returns when all are done. */
void ccr_pool_run(ccr_pool *p, ccr_pool_fn fn, void *arg);

#endif /* CCR_POOL_H */
