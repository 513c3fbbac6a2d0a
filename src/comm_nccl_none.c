/* comm_nccl_none.c - ccr_comm_nccl_init in a build without NCCL (meson
 * option nccl disabled, or no CUDA, MPI or NCCL found). */
#include "comm_impl.h"
#include "internal.h"  // provides: CCR_FAIL

ccr_status ccr_comm_nccl_init(ccr_ctx *ctx, ccr_backend *be, ccr_comm **out)
{
    CCR_CHECK_NULL(ctx, be);
    CCR_CHECK_NULL(ctx, out);
    CCR_FAIL(ctx, CCR_EUNSUP, "ccr was built without NCCL (meson -Dnccl=enabled needs CUDA, "
             "MPI and the toolkit's NCCL)");
}
