/* arena_impl.h - private arena accessors shared inside the library. */
#ifndef CCR_ARENA_IMPL_H
#define CCR_ARENA_IMPL_H

#include <stdbool.h>

#include "ccr/ccr_arena.h"
#include "ccr/ccr_safetensors.h"

CCR_BEGIN_DECLS

/* The backend an arena allocates from. */
ccr_backend *ccr_arena_backend(const ccr_arena *a);

/* ccr_arena_load from a file already read (path is for messages only);
 * with skip_sparse, the row-sparse tensors (banks) are neither checked nor
 * written (an expert-parallel rank loads its rows of them itself). */
ccr_status ccr_arena_load_from(ccr_arena *a, const ccr_safetensors *f, const char *path,
                               bool skip_sparse);

/* Host staging, for initialisers that write values through host pointers
 * (the gates' and the layers' init_params) on a device arena: copies the
 * values of tensors [first, end) (contiguous in the block) to a host buffer,
 * and until ccr_arena_unstage ccr_arena_value of those tensors points into
 * it.  ccr_arena_unstage uploads the buffer when upload is true and frees
 * it.  Works on any backend (a copy on the CPU).  CCR_EINVAL for a bad range,
 * an unfinalized arena or a staging already open. */
ccr_status ccr_arena_stage(ccr_arena *a, size_t first, size_t end);
ccr_status ccr_arena_unstage(ccr_arena *a, bool upload);

/* ---- row-sparse gradients (issue 10) -------------------------------------
 * A tensor marked row-sparse (before finalize) has its gradient rows (along
 * dim 0: one bank matrix each) written only by code that first calls
 * ccr_arena_touch_row.  ccr_arena_zero_grad then clears only the touched
 * rows of it (everything else in full), and a sparse optimiser
 * (ccr_optim_config.sparse) updates only those rows.  The touched lists are
 * reset by ccr_arena_zero_grad. */
typedef struct ccr_arena_sparse {
    size_t tensor;          /* arena index */
    size_t rows, row_len;   /* shape[0], floats per row */
    size_t base;            /* index of row 0 among all row-sparse rows */
    unsigned char *flag;    /* [rows] 1 if touched since the last zeroing */
    size_t *list;           /* [rows] the touched rows, n_touched of them */
    size_t n_touched;
} ccr_arena_sparse;

/* Calls fn(u, offset, len, row) for every range of the blocks whose gradient
 * may be non-zero since the last zeroing, in block order: the dense ranges
 * (row == SIZE_MAX, padding included) and each touched row of a row-sparse
 * tensor (row = its index among all row-sparse rows), rows in block order
 * too, so a sum over the ranges adds in the order of the whole block and,
 * the skipped gradients being zero, equals the sum over it.  Stops at and returns
 * the first error.  Requires a finalized arena. */
typedef ccr_status (*ccr_arena_range_fn)(void *u, size_t offset, size_t len, size_t row);
ccr_status ccr_arena_for_written(const ccr_arena *a, ccr_arena_range_fn fn, void *u);

/* The same ranges in the same order, but each row-sparse tensor's touched
 * rows in one call, rows(u, off, ids, n, row_len): n >= 1 block offsets and
 * row indices (among all row-sparse rows), in block order, in the arena's
 * scratch (valid during the call) - one kernel launch per tensor on a
 * device instead of one per row.  Dense ranges go to dense(u, offset, len,
 * SIZE_MAX). */
typedef ccr_status (*ccr_arena_rows_fn)(void *u, const size_t *off, const size_t *ids, size_t n,
                                        size_t row_len);
ccr_status ccr_arena_for_written_rows(const ccr_arena *a, ccr_arena_range_fn dense,
                                      ccr_arena_rows_fn rows, void *u);

ccr_status ccr_arena_set_row_sparse(ccr_arena *a, size_t i);
void ccr_arena_touch_row(ccr_arena *a, size_t i, size_t row);
size_t ccr_arena_n_sparse(const ccr_arena *a);     /* records, in block order */
size_t ccr_arena_sparse_rows(const ccr_arena *a);  /* rows over all records */
ccr_arena_sparse *ccr_arena_sparse_at(const ccr_arena *a, size_t k);
ccr_arena_sparse *ccr_arena_sparse_of(const ccr_arena *a, size_t i);  /* NULL if dense */

CCR_END_DECLS

#endif /* CCR_ARENA_IMPL_H */
