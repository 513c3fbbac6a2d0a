/*
 * comm_mpi.c - the MPI communicator (built with meson option mpi).
 *
 * A duplicate of MPI_COMM_WORLD (ccr's messages never meet the caller's),
 * with MPI_ERRORS_RETURN, so that a failing call becomes CCR_ECOMM instead
 * of aborting the process.  Every collective is the nonblocking MPI one
 * (MPI_Ialltoallv, MPI_Iallreduce, ...) followed by a wait that polls
 * MPI_Test until the communicator's timeout: no rank waits for ever on a
 * peer that failed.  After a timeout the request cannot be cancelled (MPI
 * forbids it for collectives): the communicator is marked broken, every
 * later call fails at once, and ccr_comm_free gives the abandoned request
 * one more timeout to finish before freeing.
 *
 * Reductions are MPI_SUM on MPI's own schedule; the tests check that every
 * rank holds the same bits (Open MPI reduces each element in one fixed
 * order for a given rank count and size).
 */
#define _POSIX_C_SOURCE 200809L  // clock_gettime, nanosleep
#include <limits.h>
#include <mpi.h>
#include <stdlib.h>
#include <time.h>

#include "comm_impl.h"
#include "comm_mpi.h"  // provides: ccr_mpi_state
#include "internal.h"  // provides: CCR_FAIL, CCR_TRY

typedef ccr_mpi_state mpi_state;

static mpi_state *mst(ccr_comm *c) { return c->impl; }

static double mpi_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static ccr_status mpi_error(ccr_comm *c, const char *what, int rc)
{
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS)
        len = 0;
    msg[len < MPI_MAX_ERROR_STRING ? len : MPI_MAX_ERROR_STRING - 1] = '\0';
    CCR_FAIL(c->ctx, CCR_ECOMM, "%s: MPI error %d: %s", what, rc, msg);
}

/* Polls req until done, spinning first, then sleeping 50 us between tests;
 * CCR_ECOMM after the timeout (req kept as pending, the communicator
 * broken). */
static ccr_status mpi_wait(ccr_comm *c, MPI_Request *req, const char *what)
{
    mpi_state *s = mst(c);
    double t0 = mpi_now();
    for (unsigned spin = 0;; spin++) {
        int done = 0, rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS)
            return mpi_error(c, what, rc);
        if (done)
            return CCR_OK;
        if (mpi_now() - t0 > c->timeout) {
            s->pending = *req;
            s->broken = true;
            CCR_FAIL(c->ctx, CCR_ECOMM, "%s: no answer from the other ranks after %g s (a rank "
                     "failed, or the ranks called collectives in different orders); the "
                     "communicator is unusable", what, c->timeout);
        }
        if (spin > 2000) {
            struct timespec nap = {0, 50000};
            nanosleep(&nap, NULL);
        }
    }
}

static ccr_status mpi_usable(ccr_comm *c, const char *what)
{
    if (mst(c)->broken)
        CCR_FAIL(c->ctx, CCR_ECOMM, "%s: the communicator is unusable after a timeout", what);
    return CCR_OK;
}

static ccr_status mpi_alltoallv(ccr_comm *c, const float *send, const int *scounts,
                                const int *sdispls, float *recv, const int *rcounts,
                                const int *rdispls)
{
    CCR_TRY(mpi_usable(c, "alltoallv"));
    MPI_Request req;
    int rc = MPI_Ialltoallv(send, scounts, sdispls, MPI_FLOAT, recv, rcounts, rdispls,
                            MPI_FLOAT, mst(c)->comm, &req);
    if (rc != MPI_SUCCESS)
        return mpi_error(c, "alltoallv", rc);
    return mpi_wait(c, &req, "alltoallv");
}

static ccr_status mpi_alltoallv_i32(ccr_comm *c, const int32_t *send, const int *scounts,
                                    const int *sdispls, int32_t *recv, const int *rcounts,
                                    const int *rdispls)
{
    CCR_TRY(mpi_usable(c, "alltoallv_i32"));
    MPI_Request req;
    int rc = MPI_Ialltoallv(send, scounts, sdispls, MPI_INT32_T, recv, rcounts, rdispls,
                            MPI_INT32_T, mst(c)->comm, &req);
    if (rc != MPI_SUCCESS)
        return mpi_error(c, "alltoallv_i32", rc);
    return mpi_wait(c, &req, "alltoallv_i32");
}

static ccr_status mpi_alltoall_counts(ccr_comm *c, const size_t *send, size_t *recv)
{
    CCR_TRY(mpi_usable(c, "alltoall_counts"));
    MPI_Datatype t = sizeof(size_t) == sizeof(unsigned long) ? MPI_UNSIGNED_LONG
                                                             : MPI_UNSIGNED_LONG_LONG;
    MPI_Request req;
    int rc = MPI_Ialltoall(send, 1, t, recv, 1, t, mst(c)->comm, &req);
    if (rc != MPI_SUCCESS)
        return mpi_error(c, "alltoall_counts", rc);
    return mpi_wait(c, &req, "alltoall_counts");
}

/* In place, in chunks of at most 2^30 elements (int counts). */
static ccr_status mpi_allreduce(ccr_comm *c, void *x, size_t n, size_t elem, MPI_Datatype t)
{
    CCR_TRY(mpi_usable(c, "allreduce"));
    const size_t chunk = (size_t)1 << 30;
    for (size_t i = 0; i < n; i += chunk) {
        int m = (int)(n - i < chunk ? n - i : chunk);
        MPI_Request req;
        int rc = MPI_Iallreduce(MPI_IN_PLACE, (char *)x + i * elem, m, t, MPI_SUM, mst(c)->comm,
                                &req);
        if (rc != MPI_SUCCESS)
            return mpi_error(c, "allreduce", rc);
        CCR_TRY(mpi_wait(c, &req, "allreduce"));
    }
    return CCR_OK;
}

static ccr_status mpi_allreduce_f32(ccr_comm *c, float *x, size_t n)
{
    return mpi_allreduce(c, x, n, sizeof *x, MPI_FLOAT);
}

static ccr_status mpi_allreduce_f64(ccr_comm *c, double *x, size_t n)
{
    return mpi_allreduce(c, x, n, sizeof *x, MPI_DOUBLE);
}

static ccr_status mpi_barrier(ccr_comm *c)
{
    CCR_TRY(mpi_usable(c, "barrier"));
    MPI_Request req;
    int rc = MPI_Ibarrier(mst(c)->comm, &req);
    if (rc != MPI_SUCCESS)
        return mpi_error(c, "barrier", rc);
    return mpi_wait(c, &req, "barrier");
}

/* Also the NCCL communicator's last step (its state begins with ours). */
static void mpi_free(ccr_comm *c)
{
    mpi_state *s = mst(c);
    if (s == NULL)
        return;
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) {
        /* An abandoned request gets one more timeout to finish. */
        double t0 = mpi_now();
        int done = s->pending == MPI_REQUEST_NULL;
        while (!done && mpi_now() - t0 <= c->timeout)
            if (MPI_Test(&s->pending, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS)
                break;
        MPI_Comm_free(&s->comm);
    }
    free(s);
}

const ccr_comm_i ccr_comm_mpi_iface = {
    "mpi", mpi_free, mpi_alltoallv, mpi_alltoallv_i32, mpi_alltoall_counts,
    mpi_allreduce_f32, mpi_allreduce_f64,
    mpi_barrier,
};

ccr_status ccr_comm_mpi_world(ccr_ctx *ctx, const ccr_comm_i *iface, size_t state_bytes,
                              ccr_comm **out)
{
    int init = 0, fin = 0;
    MPI_Initialized(&init);
    MPI_Finalized(&fin);
    if (!init || fin)
        CCR_FAIL(ctx, CCR_EINVAL, "MPI is %s: call MPI_Init before ccr_comm_mpi_init",
                 fin ? "already finalized" : "not initialised");
    mpi_state *s = calloc(1, state_bytes > sizeof *s ? state_bytes : sizeof *s);
    if (s == NULL)
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate the MPI state");
    s->pending = MPI_REQUEST_NULL;
    int rank = 0, size = 0, rc = MPI_Comm_dup(MPI_COMM_WORLD, &s->comm);
    if (rc == MPI_SUCCESS)
        rc = MPI_Comm_set_errhandler(s->comm, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS)
        rc = MPI_Comm_rank(s->comm, &rank);
    if (rc == MPI_SUCCESS)
        rc = MPI_Comm_size(s->comm, &size);
    if (rc != MPI_SUCCESS) {
        free(s);
        CCR_FAIL(ctx, CCR_ECOMM, "MPI_Comm_dup of MPI_COMM_WORLD failed (MPI error %d)", rc);
    }
    ccr_status st = ccr_comm_new(ctx, iface, rank, size, out);
    if (st != CCR_OK) {
        MPI_Comm_free(&s->comm);
        free(s);
        return st;
    }
    (*out)->impl = s;
    return CCR_OK;
}

ccr_status ccr_comm_mpi_init(ccr_ctx *ctx, ccr_comm **out)
{
    CCR_CHECK_NULL(ctx, out);
    return ccr_comm_mpi_world(ctx, &ccr_comm_mpi_iface, sizeof(mpi_state), out);
}
