/*
 * internal.h - private helpers shared by every ccr source file.
 *
 * The error discipline (docs/DESIGN.md, "Errors"): every failure goes through
 * ccr_fail(), which formats "func: message (file:line)" into the context and
 * returns the code, so one breakpoint on ccr_fail catches every error.
 * Nothing here aborts or prints.
 */
#ifndef CCR_INTERNAL_H
#define CCR_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ccr/ccr_ctx.h"
#include "ccr/ccr_status.h"

CCR_BEGIN_DECLS

#if defined(__GNUC__)
#define CCR_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define CCR_PRINTF(f, a)
#endif

#define CCR_UNUSED(x) ((void)(x))

/* Records the message on ctx (if not NULL) and returns code. */
ccr_status ccr_fail(ccr_ctx *ctx, ccr_status code, const char *func, const char *file,
                    int line, const char *fmt, ...) CCR_PRINTF(6, 7);

/* return ccr_fail(ctx, code, "fmt", ...) with the call site filled in. */
#define CCR_FAIL(ctx, code, ...) \
    return ccr_fail((ctx), (code), __func__, __FILE__, __LINE__, __VA_ARGS__)

/* Same, as an expression (for `s = CCR_FAIL_EXPR(...)` before cleanup). */
#define CCR_FAIL_EXPR(ctx, code, ...) \
    ccr_fail((ctx), (code), __func__, __FILE__, __LINE__, __VA_ARGS__)

/* Propagates a non-OK status (the callee already recorded the message). */
#define CCR_TRY(expr)                      \
    do {                                   \
        ccr_status ccr_try_s_ = (expr);    \
        if (ccr_try_s_ != CCR_OK)          \
            return ccr_try_s_;             \
    } while (0)

/* Fails with CCR_EINVAL naming the argument when ptr is NULL. */
#define CCR_CHECK_NULL(ctx, ptr) \
    do { if ((ptr) == NULL) CCR_FAIL((ctx), CCR_EINVAL, "%s is NULL", #ptr); } while (0)

/* a * b with overflow detection: returns false on overflow. */
static inline bool ccr_mul_ok(size_t a, size_t b, size_t *out)
{
    if (a != 0 && b > SIZE_MAX / a)
        return false;
    *out = a * b;
    return true;
}

/* a + b and a * b * c with overflow detection: false on overflow. */
static inline bool ccr_add_ok(size_t a, size_t b, size_t *out)
{
    if (b > SIZE_MAX - a)
        return false;
    *out = a + b;
    return true;
}

static inline bool ccr_mul3_ok(size_t a, size_t b, size_t c, size_t *out)
{
    size_t ab;
    return ccr_mul_ok(a, b, &ab) && ccr_mul_ok(ab, c, out);
}

/* The allocation rule (docs/DESIGN.md, "Memory"; tests/alloc_rule.sh): no
 * allocation takes an unchecked product.  Sizes are computed with the *_ok
 * helpers above, or the allocation goes through these, which return NULL when
 * n * size (a * b * size) overflows, and allocate at least one byte.
 * Defined in mem.c. */
void *ccr_mallocn(size_t n, size_t size);
void *ccr_malloc3(size_t a, size_t b, size_t size);
void *ccr_calloc3(size_t a, size_t b, size_t size);
void *ccr_reallocn(void *p, size_t n, size_t size);

/* Physical memory of this machine in bytes (sysconf), or 0 if unknown. */
size_t ccr_mem_physical(void);

/* Refuses up front a request that cannot fit: CCR_ENOMEM with "<what> needs
 * X GiB, this machine has Y GiB" when bytes exceeds physical memory (pass
 * SIZE_MAX for a size that overflowed).  CCR_OK otherwise.  Defined in mem.c. */
ccr_status ccr_mem_check_at(ccr_ctx *ctx, size_t bytes, const char *what, const char *func,
                            const char *file, int line);
#define ccr_mem_check(ctx, bytes, what) \
    ccr_mem_check_at((ctx), (bytes), (what), __func__, __FILE__, __LINE__)

/* Whether all n values are finite. */
bool ccr_all_finite(const float *v, size_t n);

/* Whether s[0..len) is well-formed UTF-8 (RFC 3629): no overlong forms, no
 * surrogates, nothing above U+10FFFF, no sequence cut off at len.  NUL bytes
 * count as valid ASCII; for a C string pass strlen(s).  s may be NULL only
 * when len is 0.  Defined in utf8.c. */
bool ccr_utf8_valid(const char *s, size_t len);

CCR_END_DECLS

#endif /* CCR_INTERNAL_H */
