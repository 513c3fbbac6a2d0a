/*
 * safetensors_impl.h - private pieces shared by the safetensors writer
 * (safetensors_write.c) and reader (safetensors_read.c): the format's limits
 * and reserved key, the cleanup-jump macro both use, the little-endian
 * helpers (the format stores the header length and all data little-endian
 * whatever the host) and the duplicate-name check applied to tensor names
 * and metadata keys.  Nothing here is part of the public API.
 */
#ifndef CCR_SAFETENSORS_IMPL_H
#define CCR_SAFETENSORS_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"  // provides: CCR_FAIL_EXPR

#define ST_ELEM_SIZE 4u                  /* bytes per element, F32 and I32 */
#define ST_MAX_INT 9007199254740992.0    /* 2^53: larger JSON numbers are inexact */
#define ST_META_KEY "__metadata__"

/* Records the failure in s and jumps to the function's cleanup. */
#define BAIL(code, ...) \
    do { s = CCR_FAIL_EXPR(ctx, (code), __VA_ARGS__); goto done; } while (0)

/* ---- byte order ---- */

static inline bool host_is_le(void)
{
    const uint32_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

static inline void swap32(unsigned char *p, size_t words)
{
    for (unsigned char *end = p + 4 * words, t; p < end; p += 4) {
        t = p[0], p[0] = p[3], p[3] = t;
        t = p[1], p[1] = p[2], p[2] = t;
    }
}

static inline uint64_t load_u64_le(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static inline void store_u64_le(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++, v >>= 8)
        p[i] = (unsigned char)(v & 0xffu);
}

/* Sorts the n pointers in place and returns the first repeated string, or
 * NULL when all are distinct.  Defined in safetensors_read.c. */
const char *ccr_st_sorted_duplicate(const char **names, size_t n);

#endif /* CCR_SAFETENSORS_IMPL_H */
