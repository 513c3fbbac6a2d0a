/*
 * pool.c - the persistent thread pool of pool.h: a generation counter under
 * one mutex; workers wait on `start`, the caller on `done`.
 */
#include <pthread.h>
#include <stdlib.h>

#include "internal.h"  // provides: CCR_FAIL
#include "pool.h"

struct ccr_pool {
    size_t n;              /* workers, the caller included */
    size_t started;        /* threads running */
    pthread_t *th;
    pthread_mutex_t mu;
    pthread_cond_t start, done;
    unsigned long gen;     /* job generation */
    size_t pending;        /* threads still in the current job */
    int stop;
    ccr_pool_fn fn;
    void *arg;
};

typedef struct {
    ccr_pool *p;
    size_t w;
} pool_seat;

static void *pool_main(void *vs)
{
    pool_seat *s = vs;
    ccr_pool *p = s->p;
    size_t w = s->w;
    free(s);
    unsigned long seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->gen == seen)
            pthread_cond_wait(&p->start, &p->mu);
        if (p->stop)
            break;
        seen = p->gen;
        ccr_pool_fn fn = p->fn;
        void *arg = p->arg;
        pthread_mutex_unlock(&p->mu);
        fn(arg, w);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0)
            pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

ccr_status ccr_pool_create(ccr_ctx *ctx, size_t n_workers, ccr_pool **out)
{
    CCR_CHECK_NULL(ctx, out);
    if (n_workers == 0)
        CCR_FAIL(ctx, CCR_EINVAL, "a thread pool needs at least one worker");
    ccr_pool *p = calloc(1, sizeof *p);
    if (p == NULL)
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate a thread pool");
    p->n = n_workers;
    if (pthread_mutex_init(&p->mu, NULL) != 0) {
        free(p);
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot create the thread pool's mutex");
    }
    if (pthread_cond_init(&p->start, NULL) != 0) {
        pthread_mutex_destroy(&p->mu);
        free(p);
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot create the thread pool's condition variable");
    }
    if (pthread_cond_init(&p->done, NULL) != 0) {
        pthread_cond_destroy(&p->start);
        pthread_mutex_destroy(&p->mu);
        free(p);
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot create the thread pool's condition variable");
    }
    if (n_workers > 1) {
        p->th = calloc(n_workers - 1, sizeof *p->th);
        if (p->th == NULL) {
            ccr_pool_free(p);
            CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate %zu thread handles", n_workers - 1);
        }
    }
    for (size_t w = 1; w < n_workers; w++) {
        pool_seat *s = malloc(sizeof *s);
        if (s != NULL) {
            s->p = p;
            s->w = w;
        }
        if (s == NULL || pthread_create(&p->th[w - 1], NULL, pool_main, s) != 0) {
            free(s);
            ccr_pool_free(p);
            CCR_FAIL(ctx, CCR_ENOMEM, "cannot start thread %zu of %zu", w, n_workers - 1);
        }
        p->started++;
    }
    *out = p;
    return CCR_OK;
}

void ccr_pool_free(ccr_pool *p)
{
    if (p == NULL)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    for (size_t i = 0; i < p->started; i++)
        pthread_join(p->th[i], NULL);
    pthread_cond_destroy(&p->done);
    pthread_cond_destroy(&p->start);
    pthread_mutex_destroy(&p->mu);
    free(p->th);
    free(p);
}

size_t ccr_pool_size(const ccr_pool *p) { return p ? p->n : 0; }

void ccr_pool_run(ccr_pool *p, ccr_pool_fn fn, void *arg)
{
    if (p->n > 1) {
        pthread_mutex_lock(&p->mu);
        p->fn = fn;
        p->arg = arg;
        p->pending = p->n - 1;
        p->gen++;
        pthread_cond_broadcast(&p->start);
        pthread_mutex_unlock(&p->mu);
    }
    fn(arg, 0);
    if (p->n > 1) {
        pthread_mutex_lock(&p->mu);
        while (p->pending > 0)
            pthread_cond_wait(&p->done, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
}
