/* arena_impl.h - private arena accessors shared inside the library. */
#ifndef CCR_ARENA_IMPL_H
#define CCR_ARENA_IMPL_H

#include "ccr/ccr_arena.h"

/* The backend an arena allocates from. */
ccr_backend *ccr_arena_backend(const ccr_arena *a);

#endif /* CCR_ARENA_IMPL_H */
