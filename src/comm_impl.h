/* comm_impl.h - the layout of struct ccr_comm and its implementations'
 * table (private; comm.c holds the generic half and the self communicator,
 * comm_mpi.c and cuda/comm_nccl.cu the engines; in a build without an
 * engine, comm_mpi_none.c / comm_nccl_none.c give its init, which refuses
 * with CCR_EUNSUP). */
#ifndef CCR_COMM_IMPL_H
#define CCR_COMM_IMPL_H

#include "ccr/ccr_comm.h"

CCR_BEGIN_DECLS

typedef struct ccr_comm_i {
    const char *name;
    void (*free)(ccr_comm *c);
    /* Arguments checked by comm.c (counts fit in int, sizes match). */
    ccr_status (*alltoallv)(ccr_comm *c, const float *send, const int *scounts,
                            const int *sdispls, float *recv, const int *rcounts,
                            const int *rdispls);
    /* int32 elements, host memory */
    ccr_status (*alltoallv_i32)(ccr_comm *c, const int32_t *send, const int *scounts,
                                const int *sdispls, int32_t *recv, const int *rcounts,
                                const int *rdispls);
    ccr_status (*alltoall_counts)(ccr_comm *c, const size_t *send, size_t *recv);
    ccr_status (*allreduce_f32)(ccr_comm *c, float *x, size_t n);
    ccr_status (*allreduce_f64)(ccr_comm *c, double *x, size_t n);
    ccr_status (*barrier)(ccr_comm *c);
} ccr_comm_i;

struct ccr_comm {
    const ccr_comm_i *iface;
    ccr_ctx *ctx;
    int rank, size;
    double timeout;       /* seconds a collective may wait */
    ccr_comm_stats stats;
    int *scratch;         /* [4 size] int counts and displacements */
    void *impl;           /* the engine's state */
};

/* A communicator of `size` ranks with its scratch, iface set; impl NULL. */
ccr_status ccr_comm_new(ccr_ctx *ctx, const ccr_comm_i *iface, int rank, int size,
                        ccr_comm **out);

/* With MPI (comm_mpi.c): a communicator over a duplicate of MPI_COMM_WORLD
 * whose impl is state_bytes (>= the MPI state, which comes first) of zeroed
 * memory, so that the NCCL communicator keeps its own state after it and
 * reuses the MPI functions below for its host-memory collectives. */
ccr_status ccr_comm_mpi_world(ccr_ctx *ctx, const ccr_comm_i *iface, size_t state_bytes,
                              ccr_comm **out);
extern const ccr_comm_i ccr_comm_mpi_iface;

CCR_END_DECLS

#endif /* CCR_COMM_IMPL_H */
