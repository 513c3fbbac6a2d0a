/*
 * ccr_arena.h - parameter and gradient arenas.
 *
 * A model declares its named tensors first, then the arena makes one backend
 * allocation for all values and one for all gradients and hands out pointers
 * into them (llm.c's malloc_and_point).  Optimisers walk the single block;
 * checkpoints write each named tensor (ccr_arena_save/load, safetensors).
 * Gradients *accumulate*: layers add into them, and ccr_arena_zero_grad
 * clears them before each step.
 *
 *     ccr_arena *p;
 *     ccr_arena_init(be, &p);
 *     size_t w, b;
 *     size_t shape_w[2] = {784, 256}, shape_b[1] = {256};
 *     ccr_arena_add(p, "layers.0.w", 2, shape_w, &w);
 *     ccr_arena_add(p, "layers.0.b", 1, shape_b, &b);
 *     ccr_arena_finalize(p);                        // one alloc each for values, grads
 *     float *wv = ccr_arena_value(p, w), *wg = ccr_arena_grad(p, w);
 *     ...
 *     ccr_arena_free(p);
 */
#ifndef CCR_ARENA_H
#define CCR_ARENA_H

#include "ccr_backend.h"
#include "ccr_common.h"
#include "ccr_status.h"

CCR_BEGIN_DECLS

#define CCR_ARENA_MAX_RANK 4
#define CCR_ARENA_MAX_NAME 64

typedef struct ccr_arena ccr_arena;

/* Creates an empty arena whose memory will come from `be`. */
ccr_status ccr_arena_init(ccr_backend *be, ccr_arena **out);

/* Releases the arena and its two blocks.  NULL is accepted. */
void ccr_arena_free(ccr_arena *a);

/* Declares a tensor before ccr_arena_finalize.  Shape has `rank` (1..4)
 * non-zero extents; the name (1..63 chars) must be unique.  *index receives
 * the tensor's index.  Returns CCR_EINVAL (bad rank, zero extent, name too
 * long or duplicate, arena already finalized) or CCR_ENOMEM. */
ccr_status ccr_arena_add(ccr_arena *a, const char *name, size_t rank,
                         const size_t *shape, size_t *index);

/* Allocates the value and gradient blocks (zero-filled).  Each tensor starts
 * on a 16-float boundary.  Returns CCR_EINVAL if already finalized or empty,
 * CCR_ENOMEM/CCR_EDEVMEM on failure. */
ccr_status ccr_arena_finalize(ccr_arena *a);

/* Number of tensors; total number of parameters (the sum of the tensor
 * sizes, padding excluded). */
size_t ccr_arena_count(const ccr_arena *a);
size_t ccr_arena_n_params(const ccr_arena *a);

/* Size in floats of the padded blocks (what optimisers iterate over; the
 * padding stays zero in values and gradients). */
size_t ccr_arena_block_len(const ccr_arena *a);

/* The value and gradient blocks (NULL before finalize). */
float *ccr_arena_values(const ccr_arena *a);
float *ccr_arena_grads(const ccr_arena *a);

/* Per-tensor facts; i < ccr_arena_count. Pointers are NULL before finalize;
 * NULL / 0 for a NULL arena or i out of range. */
const char *ccr_arena_name(const ccr_arena *a, size_t i);
size_t ccr_arena_rank(const ccr_arena *a, size_t i);
const size_t *ccr_arena_shape(const ccr_arena *a, size_t i);
size_t ccr_arena_size(const ccr_arena *a, size_t i);
float *ccr_arena_value(const ccr_arena *a, size_t i);
float *ccr_arena_grad(const ccr_arena *a, size_t i);

/* Copies host data (ccr_arena_size(a, i) floats) into tensor i's values /
 * tensor i's values or gradients to host memory.  CCR_EINVAL before finalize
 * or for i out of range; ccr_arena_set returns CCR_EDOM (naming the tensor
 * and element) if host holds NaN or infinity, and writes nothing. */
ccr_status ccr_arena_set(ccr_arena *a, size_t i, const float *host);
ccr_status ccr_arena_get(const ccr_arena *a, size_t i, float *host);
ccr_status ccr_arena_get_grad(const ccr_arena *a, size_t i, float *host);

/* Looks a tensor up by name; returns CCR_EINVAL if absent. */
ccr_status ccr_arena_find(const ccr_arena *a, const char *name, size_t *index);

/* Sets every gradient to zero.  The bank tensors of conditional layers
 * (ccr_cond.h) are cleared only in the matrices their backward passes wrote
 * since the last call (the others are zero already): O(parameters used),
 * not O(parameters).  Code that writes a bank gradient through
 * ccr_arena_grad/ccr_arena_grads by other means clears it itself. */
ccr_status ccr_arena_zero_grad(ccr_arena *a);

/* The global L2 norm of the gradient block, sqrt(sum g^2), summed in double
 * in block order (deterministic).  CCR_EINVAL for NULL or before finalize. */
ccr_status ccr_arena_grad_norm(const ccr_arena *a, double *norm);

/* Global-norm clipping (PyTorch's clip_grad_norm_): if the norm exceeds
 * max_norm (> 0), every gradient is multiplied by (float)(max_norm / norm).
 * *norm receives the norm before clipping (may be NULL).  Returns CCR_EDOM,
 * gradients untouched, if the norm is not finite; CCR_EINVAL for a bad
 * max_norm or before finalize. */
ccr_status ccr_arena_clip_grad_norm(ccr_arena *a, double max_norm, double *norm);

/* Writes every tensor as float32 under "param.<name>" (and "grad.<name>" if
 * with_grads) to a safetensors file, with metadata pairs meta[2i] = key,
 * meta[2i+1] = value (n_meta pairs).  Returns CCR_EIO on write failure. */
ccr_status ccr_arena_save(const ccr_arena *a, const char *path, int with_grads,
                          const char *const *meta, size_t n_meta);

/* Reads "param.<name>" for every tensor of a finalized arena from a
 * safetensors file.  Returns CCR_EIO (unreadable), CCR_EFORMAT (malformed,
 * missing tensor, wrong dtype or shape), CCR_EDOM (a tensor holds NaN or
 * infinity; the message names it).  On error the values are unchanged. */
ccr_status ccr_arena_load(ccr_arena *a, const char *path);

CCR_END_DECLS

#endif /* CCR_ARENA_H */
