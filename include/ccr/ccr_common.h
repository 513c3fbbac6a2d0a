/*
 * ccr_common.h - definitions shared by every public ccr header.
 *
 * Version macros, the C++ linkage guards and the small scalar typedefs that
 * the rest of the API uses.  Every public header includes this one first, so
 * each header compiles on its own (tests/meson.build checks that).
 */
#ifndef CCR_COMMON_H
#define CCR_COMMON_H

#include <stddef.h>
#include <stdint.h>

#define CCR_VERSION_MAJOR 0
#define CCR_VERSION_MINOR 1
#define CCR_VERSION_PATCH 0
#define CCR_VERSION "0.1.0"

#ifdef __cplusplus
#define CCR_BEGIN_DECLS extern "C" {
#define CCR_END_DECLS }
#else
#define CCR_BEGIN_DECLS
#define CCR_END_DECLS
#endif

CCR_BEGIN_DECLS

/* The library version as a string, "MAJOR.MINOR.PATCH"; never NULL. */
const char *ccr_version(void);

CCR_END_DECLS

#endif /* CCR_COMMON_H */
