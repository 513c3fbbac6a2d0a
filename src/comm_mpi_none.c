/* comm_mpi_none.c - ccr_comm_mpi_init in a build without MPI (meson option
 * mpi disabled or Open MPI not found). */
#include "comm_impl.h"
#include "internal.h"  // provides: CCR_FAIL

ccr_status ccr_comm_mpi_init(ccr_ctx *ctx, ccr_comm **out)
{
    CCR_CHECK_NULL(ctx, out);
    CCR_FAIL(ctx, CCR_EUNSUP, "ccr was built without MPI (meson -Dmpi=enabled needs "
             "libopenmpi-dev)");
}
