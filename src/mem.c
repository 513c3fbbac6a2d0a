/*
 * mem.c - overflow-checked allocation and the up-front memory check.
 *
 * Every allocation in ccr either computes its size with ccr_mul_ok and
 * friends or goes through ccr_mallocn / ccr_malloc3 / ccr_calloc3 /
 * ccr_reallocn (tests/alloc_rule.sh enforces it).  ccr_mem_check refuses a
 * request larger than the machine's physical memory before anything is
 * allocated, with a message that says how much it needs.
 */
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"  // provides: ccr_mul_ok, CCR_FAIL

void *ccr_mallocn(size_t n, size_t size)
{
    size_t bytes;
    if (!ccr_mul_ok(n, size, &bytes))
        return NULL;
    return malloc(bytes > 0 ? bytes : 1);
}

void *ccr_malloc3(size_t a, size_t b, size_t size)
{
    size_t bytes;
    if (!ccr_mul3_ok(a, b, size, &bytes))
        return NULL;
    return malloc(bytes > 0 ? bytes : 1);
}

void *ccr_calloc3(size_t a, size_t b, size_t size)
{
    size_t n;
    if (!ccr_mul_ok(a, b, &n) || (size != 0 && n > SIZE_MAX / size))
        return NULL;
    return calloc(n > 0 ? n : 1, size > 0 ? size : 1);
}

void *ccr_reallocn(void *p, size_t n, size_t size)
{
    size_t bytes;
    if (!ccr_mul_ok(n, size, &bytes))
        return NULL;
    return realloc(p, bytes > 0 ? bytes : 1);
}

size_t ccr_mem_physical(void)
{
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    size_t bytes;
    if (pages <= 0 || page <= 0)
        return 0;
    if (!ccr_mul_ok((size_t)pages, (size_t)page, &bytes))
        return SIZE_MAX;
    return bytes;
}

ccr_status ccr_mem_check_at(ccr_ctx *ctx, size_t bytes, const char *what, const char *func,
                            const char *file, int line)
{
    size_t phys = ccr_mem_physical();
    if (phys == 0 || bytes <= phys)
        return CCR_OK;
    const double gib = 1024.0 * 1024.0 * 1024.0;
    if (what == NULL)
        what = "request";
    if (bytes == SIZE_MAX)
        return ccr_fail(ctx, CCR_ENOMEM, func, file, line,
                        "%s needs more memory than can be addressed (a size overflows), "
                        "this machine has %.1f GiB", what, (double)phys / gib);
    return ccr_fail(ctx, CCR_ENOMEM, func, file, line,
                    "%s needs %.1f GiB, this machine has %.1f GiB", what, (double)bytes / gib,
                    (double)phys / gib);
}
