/* comm_mpi.h - the MPI communicator's state (private): comm_mpi.c, and
 * cuda/comm_nccl.cu, whose state begins with it.  Only in MPI builds. */
#ifndef CCR_COMM_MPI_H
#define CCR_COMM_MPI_H

/* C only: Open MPI's (deprecated) C++ bindings stay out of the .cu files. */
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#include <mpi.h>
#include <stdbool.h>

typedef struct ccr_mpi_state {
    MPI_Comm comm;        /* a duplicate of MPI_COMM_WORLD */
    MPI_Request pending;  /* a request abandoned at a timeout, or MPI_REQUEST_NULL */
    bool broken;
} ccr_mpi_state;

#endif /* CCR_COMM_MPI_H */
