/*
 * fuzz_util.h - shared by the libFuzzer targets: the loaders under test take a
 * path, so each input is written to an anonymous in-memory file (memfd) and
 * passed as /proc/self/fd/N.  No file is left behind.
 */
#ifndef CCR_FUZZ_UTIL_H
#define CCR_FUZZ_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* The path of a memfd holding data[0..size), or NULL on failure.  slot 0..3
 * names separate files (a target that needs two inputs uses two slots).  The
 * path is valid until the next call with the same slot. */
const char *fuzz_file(int slot, const uint8_t *data, size_t size);

/* Aborts (a libFuzzer "crash") with msg when cond is false: an invariant the
 * code under test promises, beyond not crashing. */
#define FUZZ_ASSERT(cond, msg)                                                 \
    do {                                                                       \
        if (!(cond))                                                           \
            fuzz_fail(__FILE__, __LINE__, #cond, msg);                          \
    } while (0)
void fuzz_fail(const char *file, int line, const char *cond, const char *msg)
    __attribute__((noreturn));

#endif /* CCR_FUZZ_UTIL_H */
