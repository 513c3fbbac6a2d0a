/*
 * comm_nccl.cu - the NCCL communicator (built with meson option nccl: CUDA,
 * MPI and the toolkit's NCCL).
 *
 * One CUDA device per MPI rank: the backend's.  The NCCL communicator is
 * created from a unique id that rank 0 draws and broadcasts over MPI; its
 * state follows the MPI state (comm_impl.h, ccr_comm_mpi_world), so the
 * host-memory collectives (counts, double sums, barrier) are MPI's.  The
 * float collectives run on the backend's stream on device memory:
 * all-to-all-v as one group of ncclSend/ncclRecv pairs, the sum as
 * ncclAllReduce in place.  Each is waited for by polling the stream and
 * ncclCommGetAsyncError up to the communicator's timeout; on a timeout or an
 * asynchronous error the NCCL communicator is aborted (ncclCommAbort) and
 * marked broken.
 */
#include <cuda_runtime.h>
#include <nccl.h>
#include <string.h>
#include <time.h>

#include "comm_impl.h"
#include "comm_mpi.h"       // provides: ccr_mpi_state (our state's first member)
#include "cuda_common.cuh"  // provides: ccr_cuda (the backend's stream)

namespace {

struct nccl_state {
    ccr_mpi_state mpi;      /* first: the MPI functions see the state as theirs */
    ncclComm_t nccl;
    cudaStream_t stream;
    bool broken;
};

nccl_state *nst(ccr_comm *c) { return (nccl_state *)c->impl; }

double nccl_now()
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

ccr_status nccl_fail(ccr_comm *c, const char *what, ncclResult_t r)
{
    return ccr_fail(c->ctx, CCR_ECOMM, what, __FILE__, __LINE__, "NCCL error %d: %s", (int)r,
                    ncclGetErrorString(r));
}

/* Waits for the stream (and so the NCCL kernels on it) up to the timeout. */
ccr_status nccl_wait(ccr_comm *c, const char *what)
{
    nccl_state *s = nst(c);
    double t0 = nccl_now();
    for (;;) {
        cudaError_t e = cudaStreamQuery(s->stream);
        if (e == cudaSuccess)
            return CCR_OK;
        if (e != cudaErrorNotReady)
            return ccr_fail(c->ctx, CCR_ECUDA, what, __FILE__, __LINE__, "%s",
                            cudaGetErrorString(e));
        ncclResult_t async = ncclSuccess;
        ncclCommGetAsyncError(s->nccl, &async);
        if (async != ncclSuccess && async != ncclInProgress) {
            ncclCommAbort(s->nccl);
            s->broken = true;
            return nccl_fail(c, what, async);
        }
        if (nccl_now() - t0 > c->timeout) {
            ncclCommAbort(s->nccl);
            s->broken = true;
            return ccr_fail(c->ctx, CCR_ECOMM, what, __FILE__, __LINE__,
                            "no answer from the other ranks after %g s; NCCL communicator "
                            "aborted", c->timeout);
        }
        struct timespec nap = {0, 20000};
        nanosleep(&nap, NULL);
    }
}

ccr_status nccl_usable(ccr_comm *c, const char *what)
{
    if (nst(c)->broken)
        return ccr_fail(c->ctx, CCR_ECOMM, what, __FILE__, __LINE__,
                        "the NCCL communicator was aborted after an error or a timeout");
    return CCR_OK;
}

ccr_status nccl_alltoallv(ccr_comm *c, const float *send, const int *scounts,
                          const int *sdispls, float *recv, const int *rcounts,
                          const int *rdispls)
{
    CCR_TRY(nccl_usable(c, "alltoallv"));
    nccl_state *s = nst(c);
    ncclResult_t r = ncclGroupStart();
    for (int p = 0; p < c->size && r == ncclSuccess; p++) {
        if (scounts[p] > 0)
            r = ncclSend(send + sdispls[p], (size_t)scounts[p], ncclFloat, p, s->nccl,
                         s->stream);
        if (r == ncclSuccess && rcounts[p] > 0)
            r = ncclRecv(recv + rdispls[p], (size_t)rcounts[p], ncclFloat, p, s->nccl,
                         s->stream);
    }
    ncclResult_t end = ncclGroupEnd();
    if (r != ncclSuccess || end != ncclSuccess)
        return nccl_fail(c, "alltoallv", r != ncclSuccess ? r : end);
    return nccl_wait(c, "alltoallv");
}

ccr_status nccl_allreduce_f32(ccr_comm *c, float *x, size_t n)
{
    CCR_TRY(nccl_usable(c, "allreduce"));
    nccl_state *s = nst(c);
    ncclResult_t r = ncclAllReduce(x, x, n, ncclFloat, ncclSum, s->nccl, s->stream);
    if (r != ncclSuccess)
        return nccl_fail(c, "allreduce", r);
    return nccl_wait(c, "allreduce");
}

void nccl_free(ccr_comm *c)
{
    nccl_state *s = nst(c);
    if (s != NULL && s->nccl != NULL && !s->broken)
        ncclCommDestroy(s->nccl);
    ccr_comm_mpi_iface.free(c);  /* the MPI half, and the state */
}

/* The host-memory collectives are MPI's. */
ccr_status nccl_alltoallv_i32(ccr_comm *c, const int32_t *send, const int *scounts,
                              const int *sdispls, int32_t *recv, const int *rcounts,
                              const int *rdispls)
{
    return ccr_comm_mpi_iface.alltoallv_i32(c, send, scounts, sdispls, recv, rcounts, rdispls);
}

ccr_status nccl_counts(ccr_comm *c, const size_t *send, size_t *recv)
{
    return ccr_comm_mpi_iface.alltoall_counts(c, send, recv);
}

ccr_status nccl_allreduce_f64(ccr_comm *c, double *x, size_t n)
{
    return ccr_comm_mpi_iface.allreduce_f64(c, x, n);
}

ccr_status nccl_barrier(ccr_comm *c) { return ccr_comm_mpi_iface.barrier(c); }

const ccr_comm_i nccl_iface = {
    "nccl", nccl_free, nccl_alltoallv, nccl_alltoallv_i32, nccl_counts, nccl_allreduce_f32, nccl_allreduce_f64,
    nccl_barrier,
};

}  // namespace

extern "C" ccr_status ccr_comm_nccl_init(ccr_ctx *ctx, ccr_backend *be, ccr_comm **out)
{
    if (be == NULL || out == NULL)
        CCR_FAIL(ctx, CCR_EINVAL, "NULL backend or out");
    if (strcmp(ccr_backend_name(be), "cuda") != 0)
        CCR_FAIL(ctx, CCR_EUNSUP, "NCCL needs a CUDA backend, not %s", ccr_backend_name(be));
    ccr_comm *c;
    CCR_TRY(ccr_comm_mpi_world(ctx, &nccl_iface, sizeof(nccl_state), &c));
    nccl_state *s = nst(c);
    s->stream = ccr_cuda(be)->stream;
    ncclUniqueId id;
    ncclResult_t r = ncclSuccess;
    if (c->rank == 0)
        r = ncclGetUniqueId(&id);
    int ok = r == ncclSuccess, all_ok = 0;
    /* Every rank learns whether rank 0 drew an id before any waits on it. */
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, s->mpi.comm);
    if (all_ok && MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, s->mpi.comm) == MPI_SUCCESS)
        r = ncclCommInitRank(&s->nccl, c->size, id, c->rank);
    else if (r == ncclSuccess)
        r = ncclSystemError;
    if (r != ncclSuccess) {
        ccr_status st = nccl_fail(c, "ccr_comm_nccl_init", r);
        s->nccl = NULL;
        ccr_comm_free(c);
        return st;
    }
    *out = c;
    return CCR_OK;
}
