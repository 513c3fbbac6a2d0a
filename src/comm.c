/*
 * comm.c - communicators (ccr_comm.h): the checks and statistics every
 * implementation shares, and the single-process communicator "self".
 *
 * The public functions validate their arguments once, convert counts and
 * displacements to the int arrays MPI and NCCL take (refusing what does not
 * fit), time the call and count the bytes, then call the implementation.
 * Bytes: an all-to-all counts the floats this rank sends to other ranks; an
 * all-reduce of n elements counts 2 (P - 1) / P n elements, what each rank
 * sends in a ring all-reduce (the usual cost model; the engine may choose
 * another algorithm).
 */
#define _POSIX_C_SOURCE 200809L  // clock_gettime
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm_impl.h"
#include "internal.h"  // provides: CCR_FAIL, CCR_TRY, ccr_malloc3

static double comm_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

ccr_status ccr_comm_new(ccr_ctx *ctx, const ccr_comm_i *iface, int rank, int size,
                        ccr_comm **out)
{
    if (size < 1 || rank < 0 || rank >= size)
        CCR_FAIL(ctx, CCR_EINTERNAL, "rank %d of %d", rank, size);
    ccr_comm *c = calloc(1, sizeof *c);
    int *scratch = ccr_malloc3((size_t)size, 4, sizeof(int));
    if (c == NULL || scratch == NULL) {
        free(c);
        free(scratch);
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate a communicator of %d ranks", size);
    }
    *c = (ccr_comm){.iface = iface, .ctx = ctx, .rank = rank, .size = size, .timeout = 300.0,
                    .scratch = scratch};
    *out = c;
    return CCR_OK;
}

void ccr_comm_free(ccr_comm *c)
{
    if (c == NULL)
        return;
    if (c->iface->free != NULL)
        c->iface->free(c);
    free(c->scratch);
    free(c);
}

int ccr_comm_rank(const ccr_comm *c) { return c ? c->rank : 0; }
int ccr_comm_size(const ccr_comm *c) { return c ? c->size : 0; }
const char *ccr_comm_name(const ccr_comm *c) { return c ? c->iface->name : ""; }

ccr_status ccr_comm_set_timeout(ccr_comm *c, double seconds)
{
    if (c == NULL)
        return CCR_EINVAL;
    if (!(seconds > 0.0) || !isfinite(seconds))
        CCR_FAIL(c->ctx, CCR_EINVAL, "timeout %g s must be finite and > 0", seconds);
    c->timeout = seconds;
    return CCR_OK;
}

/* counts and displacements (size entries) to ints, each within INT_MAX;
 * *total = the largest displacement + count (the floats a buffer spans). */
static ccr_status comm_ints(ccr_comm *c, const char *what, const size_t *counts,
                            const size_t *displs, int *ic, int *id, size_t *total)
{
    *total = 0;
    for (int p = 0; p < c->size; p++) {
        if (counts[p] > INT_MAX || displs[p] > INT_MAX)
            CCR_FAIL(c->ctx, CCR_EUNSUP, "%s: count %zu or displacement %zu for rank %d above "
                     "INT_MAX (MPI's int counts)", what, counts[p], displs[p], p);
        ic[p] = (int)counts[p];
        id[p] = (int)displs[p];
        if (counts[p] > 0 && displs[p] + counts[p] > *total)
            *total = displs[p] + counts[p];
    }
    return CCR_OK;
}

/* The shared half of the all-to-alls (4-byte elements: floats, or int32
 * when i32): checks, int conversion, statistics. */
static ccr_status comm_alltoallv(ccr_comm *c, const void *send, const size_t *send_counts,
                                 const size_t *send_displs, void *recv,
                                 const size_t *recv_counts, const size_t *recv_displs,
                                 bool i32)
{
    if (c == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(c->ctx, send_counts);
    CCR_CHECK_NULL(c->ctx, send_displs);
    CCR_CHECK_NULL(c->ctx, recv_counts);
    CCR_CHECK_NULL(c->ctx, recv_displs);
    const int P = c->size;
    int *sc = c->scratch, *sd = sc + P, *rc = sd + P, *rd = rc + P;
    size_t s_total, r_total;
    CCR_TRY(comm_ints(c, "alltoallv send", send_counts, send_displs, sc, sd, &s_total));
    CCR_TRY(comm_ints(c, "alltoallv receive", recv_counts, recv_displs, rc, rd, &r_total));
    if ((s_total > 0 && send == NULL) || (r_total > 0 && recv == NULL))
        CCR_FAIL(c->ctx, CCR_EINVAL, "alltoallv: a NULL buffer with non-zero counts");
    double t0 = comm_now();
    if (i32)
        CCR_TRY(c->iface->alltoallv_i32(c, send, sc, sd, recv, rc, rd));
    else
        CCR_TRY(c->iface->alltoallv(c, send, sc, sd, recv, rc, rd));
    double bytes = 0.0;
    for (int p = 0; p < P; p++)
        if (p != c->rank)
            bytes += (double)send_counts[p] * 4.0;
    c->stats.alltoall_bytes += bytes;
    c->stats.alltoall_seconds += comm_now() - t0;
    c->stats.calls++;
    return CCR_OK;
}

ccr_status ccr_comm_alltoallv(ccr_comm *c, const float *send, const size_t *send_counts,
                              const size_t *send_displs, float *recv, const size_t *recv_counts,
                              const size_t *recv_displs)
{
    return comm_alltoallv(c, send, send_counts, send_displs, recv, recv_counts, recv_displs,
                          false);
}

ccr_status ccr_comm_alltoallv_i32(ccr_comm *c, const int32_t *send, const size_t *send_counts,
                                  const size_t *send_displs, int32_t *recv,
                                  const size_t *recv_counts, const size_t *recv_displs)
{
    return comm_alltoallv(c, send, send_counts, send_displs, recv, recv_counts, recv_displs,
                          true);
}

ccr_status ccr_comm_alltoall_counts(ccr_comm *c, const size_t *send, size_t *recv)
{
    if (c == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(c->ctx, send);
    CCR_CHECK_NULL(c->ctx, recv);
    double t0 = comm_now();
    CCR_TRY(c->iface->alltoall_counts(c, send, recv));
    c->stats.alltoall_bytes += (double)(c->size - 1) * sizeof(size_t);
    c->stats.alltoall_seconds += comm_now() - t0;
    c->stats.calls++;
    return CCR_OK;
}

static void comm_count_allreduce(ccr_comm *c, size_t n, size_t elem, double t0)
{
    c->stats.allreduce_bytes += 2.0 * (double)(c->size - 1) / (double)c->size * (double)n *
                                (double)elem;
    c->stats.allreduce_seconds += comm_now() - t0;
    c->stats.calls++;
}

/* The shared half of the sums: checks, statistics; f64: doubles. */
static ccr_status comm_allreduce(ccr_comm *c, void *x, size_t n, bool f64)
{
    if (c == NULL)
        return CCR_EINVAL;
    if (n == 0)
        return CCR_OK;
    CCR_CHECK_NULL(c->ctx, x);
    double t0 = comm_now();
    if (f64)
        CCR_TRY(c->iface->allreduce_f64(c, x, n));
    else
        CCR_TRY(c->iface->allreduce_f32(c, x, n));
    comm_count_allreduce(c, n, f64 ? sizeof(double) : sizeof(float), t0);
    return CCR_OK;
}

ccr_status ccr_comm_allreduce_sum(ccr_comm *c, float *x, size_t n)
{
    return comm_allreduce(c, x, n, false);
}

ccr_status ccr_comm_allreduce_sum_f64(ccr_comm *c, double *x, size_t n)
{
    return comm_allreduce(c, x, n, true);
}

ccr_status ccr_comm_barrier(ccr_comm *c)
{
    if (c == NULL)
        return CCR_EINVAL;
    return c->iface->barrier(c);
}

ccr_status ccr_comm_stats_get(const ccr_comm *c, ccr_comm_stats *st)
{
    if (c == NULL)
        return CCR_EINVAL;
    CCR_CHECK_NULL(c->ctx, st);
    *st = c->stats;
    return CCR_OK;
}

void ccr_comm_stats_reset(ccr_comm *c)
{
    if (c != NULL)
        c->stats = (ccr_comm_stats){0};
}

/* ---- self: one process, host memory ------------------------------------ */

static ccr_status self_alltoallv(ccr_comm *c, const float *send, const int *scounts,
                                 const int *sdispls, float *recv, const int *rcounts,
                                 const int *rdispls)
{
    if (scounts[0] != rcounts[0])
        CCR_FAIL(c->ctx, CCR_EBADLEN, "alltoallv: sends %d floats to itself but expects %d",
                 scounts[0], rcounts[0]);
    if (scounts[0] > 0)
        memmove(recv + rdispls[0], send + sdispls[0], (size_t)scounts[0] * sizeof *send);
    return CCR_OK;
}

static ccr_status self_alltoallv_i32(ccr_comm *c, const int32_t *send, const int *scounts,
                                     const int *sdispls, int32_t *recv, const int *rcounts,
                                     const int *rdispls)
{
    if (scounts[0] != rcounts[0])
        CCR_FAIL(c->ctx, CCR_EBADLEN, "alltoallv: sends %d ints to itself but expects %d",
                 scounts[0], rcounts[0]);
    if (scounts[0] > 0)
        memmove(recv + rdispls[0], send + sdispls[0], (size_t)scounts[0] * sizeof *send);
    return CCR_OK;
}

static ccr_status self_alltoall_counts(ccr_comm *c, const size_t *send, size_t *recv)
{
    CCR_UNUSED(c);
    recv[0] = send[0];
    return CCR_OK;
}

static ccr_status self_allreduce_f32(ccr_comm *c, float *x, size_t n)
{
    CCR_UNUSED(c), CCR_UNUSED(x), CCR_UNUSED(n);
    return CCR_OK;
}

static ccr_status self_allreduce_f64(ccr_comm *c, double *x, size_t n)
{
    CCR_UNUSED(c), CCR_UNUSED(x), CCR_UNUSED(n);
    return CCR_OK;
}

static ccr_status self_barrier(ccr_comm *c)
{
    CCR_UNUSED(c);
    return CCR_OK;
}

static const ccr_comm_i self_iface = {
    "self", NULL, self_alltoallv, self_alltoallv_i32, self_alltoall_counts,
    self_allreduce_f32, self_allreduce_f64,
    self_barrier,
};

ccr_status ccr_comm_self_init(ccr_ctx *ctx, ccr_comm **out)
{
    CCR_CHECK_NULL(ctx, out);
    return ccr_comm_new(ctx, &self_iface, 0, 1, out);
}
