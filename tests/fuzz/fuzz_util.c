/*
 * fuzz_util.c - in-memory files for the fuzz targets (see fuzz_util.h).
 */
#define _GNU_SOURCE
#include "fuzz_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

const char *fuzz_file(int slot, const uint8_t *data, size_t size)
{
    static int fd[4] = {-1, -1, -1, -1};
    static char path[4][64];
    if (slot < 0 || slot > 3)
        return NULL;
    if (fd[slot] < 0) {
        fd[slot] = memfd_create("ccr-fuzz", 0);
        if (fd[slot] < 0)
            return NULL;
        snprintf(path[slot], sizeof path[slot], "/proc/self/fd/%d", fd[slot]);
    }
    if (ftruncate(fd[slot], 0) != 0)
        return NULL;
    size_t done = 0;
    while (done < size) {
        ssize_t w = pwrite(fd[slot], data + done, size - done, (off_t)done);
        if (w <= 0)
            return NULL;
        done += (size_t)w;
    }
    return path[slot];
}

void fuzz_fail(const char *file, int line, const char *cond, const char *msg)
{
    fprintf(stderr, "%s:%d: invariant '%s' broken: %s\n", file, line, cond, msg);
    abort();
}
