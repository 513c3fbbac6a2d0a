/* arena_impl.h - private arena accessors shared inside the library. */
#ifndef CCR_ARENA_IMPL_H
#define CCR_ARENA_IMPL_H

#include "ccr/ccr_arena.h"
#include "ccr/ccr_safetensors.h"

CCR_BEGIN_DECLS

/* The backend an arena allocates from. */
ccr_backend *ccr_arena_backend(const ccr_arena *a);

/* ccr_arena_load from a file already read (path is for messages only). */
ccr_status ccr_arena_load_from(ccr_arena *a, const ccr_safetensors *f, const char *path);

CCR_END_DECLS

#endif /* CCR_ARENA_IMPL_H */
