/*
 * ccr_comm.h - communicators: the ranks of a job and their collectives, for
 * expert parallelism (Shazeer et al. 2017, section 3.1: the gate and the
 * dense layers data-parallel, each expert on one rank, examples exchanged
 * by all-to-all).
 *
 * Three implementations behind one interface, all on existing engines:
 *   self  one process, rank 0 of 1: every collective is a copy (always built);
 *   mpi   the ranks of MPI_COMM_WORLD (MPI processes on CPUs, host memory;
 *         meson option mpi, Debian's Open MPI; the caller runs MPI_Init and
 *         MPI_Finalize);
 *   nccl  one CUDA device per MPI rank, device memory, NCCL's collectives
 *         (meson option nccl; bootstrapped over MPI).
 * Without the engine compiled in, its init returns CCR_EUNSUP.
 *
 *     MPI_Init(&argc, &argv);                       // the caller's
 *     ccr_comm *comm;
 *     if (ccr_comm_mpi_init(ctx, &comm) != CCR_OK) ...
 *     printf("rank %d of %d\n", ccr_comm_rank(comm), ccr_comm_size(comm));
 *     ccr_comm_allreduce_sum(comm, grads, n);       // the same sum on every rank
 *     ccr_comm_free(comm);
 *     MPI_Finalize();
 *
 * Collectives are called by every rank in the same order with matching
 * sizes.  None waits for ever: each gives up after the communicator's
 * timeout (ccr_comm_set_timeout, default 300 s) with CCR_ECOMM and a
 * message naming the collective, so a job whose rank failed or diverged
 * ends with an error instead of hanging (a process that exits with an error
 * makes mpirun end the whole job).  Sizes are counts of elements;
 * per-peer counts above INT_MAX give CCR_EUNSUP (MPI's int counts).
 */
#ifndef CCR_COMM_H
#define CCR_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "ccr_backend.h"
#include "ccr_common.h"
#include "ccr_ctx.h"
#include "ccr_status.h"

CCR_BEGIN_DECLS

typedef struct ccr_comm ccr_comm;

/* One process: rank 0 of 1. */
ccr_status ccr_comm_self_init(ccr_ctx *ctx, ccr_comm **out);

/* The ranks of MPI_COMM_WORLD, host memory.  CCR_EUNSUP in a build without
 * MPI; CCR_EINVAL when MPI is not initialised (or already finalized). */
ccr_status ccr_comm_mpi_init(ccr_ctx *ctx, ccr_comm **out);

/* The ranks of MPI_COMM_WORLD, each with the CUDA device of backend be,
 * device memory, NCCL (its unique id broadcast over MPI).  CCR_EUNSUP in a
 * build without NCCL or for a non-CUDA backend; CCR_EINVAL without MPI. */
ccr_status ccr_comm_nccl_init(ccr_ctx *ctx, ccr_backend *be, ccr_comm **out);

/* Frees the communicator (not MPI itself).  NULL is accepted. */
void ccr_comm_free(ccr_comm *c);

/* This process's rank and the number of ranks (0 and 0 for NULL);
 * "self", "mpi" or "nccl" ("" for NULL). */
int ccr_comm_rank(const ccr_comm *c);
int ccr_comm_size(const ccr_comm *c);
const char *ccr_comm_name(const ccr_comm *c);

/* Seconds a collective may wait for the other ranks (> 0, finite).
 * CCR_EINVAL otherwise. */
ccr_status ccr_comm_set_timeout(ccr_comm *c, double seconds);

/* All-to-all of variable size: this rank sends send_counts[p] floats from
 * send + send_displs[p] to rank p and receives recv_counts[p] floats from
 * rank p at recv + recv_displs[p] (p = 0 .. size - 1; arrays of size
 * entries, host memory; the float buffers are the communicator's memory
 * kind).  Counts may be 0 (a buffer may then be NULL when all are).
 * recv_counts[p] must equal what rank p sends here: exchange the counts
 * first with ccr_comm_alltoall_counts. */
ccr_status ccr_comm_alltoallv(ccr_comm *c, const float *send, const size_t *send_counts,
                              const size_t *send_displs, float *recv, const size_t *recv_counts,
                              const size_t *recv_displs);

/* The same for int32 elements, on host memory on every implementation
 * (routing descriptors, indices). */
ccr_status ccr_comm_alltoallv_i32(ccr_comm *c, const int32_t *send, const size_t *send_counts,
                                  const size_t *send_displs, int32_t *recv,
                                  const size_t *recv_counts, const size_t *recv_displs);

/* recv[p] = what rank p passed as its send[rank] (size entries each, host
 * memory on every implementation). */
ccr_status ccr_comm_alltoall_counts(ccr_comm *c, const size_t *send, size_t *recv);

/* x[0..n) = the sum over ranks of their x[0..n), in place; identical bits
 * on every rank.  The float version works on the communicator's memory
 * kind, the double one on host memory (statistics, losses).  n = 0 is a
 * no-op. */
ccr_status ccr_comm_allreduce_sum(ccr_comm *c, float *x, size_t n);
ccr_status ccr_comm_allreduce_sum_f64(ccr_comm *c, double *x, size_t n);

/* Waits until every rank has called it (within the timeout). */
ccr_status ccr_comm_barrier(ccr_comm *c);

/* What this rank moved and how long it spent in collectives since
 * creation or the last reset: bytes sent to other ranks (its own share
 * excluded) and seconds, per kind. */
typedef struct ccr_comm_stats {
    double alltoall_bytes, alltoall_seconds;
    double allreduce_bytes, allreduce_seconds;
    size_t calls;
} ccr_comm_stats;
ccr_status ccr_comm_stats_get(const ccr_comm *c, ccr_comm_stats *st);
void ccr_comm_stats_reset(ccr_comm *c);

CCR_END_DECLS

#endif /* CCR_COMM_H */
