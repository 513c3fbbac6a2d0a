/*
 * tmpfile.c - temporary beside the target, fsync, rename, fsync the
 * directory (tmpfile.h).
 */
#define _POSIX_C_SOURCE 200809L

#include "tmpfile.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "ccr/ccr_jsonl.h"  // provides: CCR_JSONL_PARTIAL_SUFFIX
#include "internal.h"  // provides: CCR_FAIL, CCR_CHECK_NULL

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d != NULL)
        memcpy(d, s, n);
    return d;
}

/* The directory part of path ("." when there is none); caller frees. */
static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (slash == NULL)
        return dup_str(".");
    if (slash == path)
        return dup_str("/");
    size_t n = (size_t)(slash - path);
    char *d = malloc(n + 1);
    if (d != NULL) {
        memcpy(d, path, n);
        d[n] = '\0';
    }
    return d;
}

/* fsync on a directory: some file systems answer EINVAL, which is not a
 * failure of the data. */
static int fsync_dir(const char *path)
{
    char *dir = dir_of(path);
    if (dir == NULL)
        return ENOMEM;
    int err = 0;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        err = errno;
    else {
        if (fsync(fd) != 0 && errno != EINVAL)
            err = errno;
        close(fd);
    }
    free(dir);
    return err;
}

ccr_status ccr_tmp_create(ccr_ctx *ctx, const char *target, ccr_tmp *t)
{
    CCR_CHECK_NULL(ctx, t);
    *t = (ccr_tmp){.fd = -1};
    CCR_CHECK_NULL(ctx, target);
    if (target[0] == '\0')
        CCR_FAIL(ctx, CCR_EINVAL, "path is empty");
    struct stat st;
    bool exists = stat(target, &st) == 0;
    t->direct = exists && !S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode);
    size_t cap = strlen(target) + sizeof CCR_TMP_INFIX + 48;
    t->target = dup_str(target);
    t->tmp = malloc(cap);
    if (t->target == NULL || t->tmp == NULL) {
        ccr_tmp_release(t);
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate the temporary's name");
    }
    int err = 0;
    if (t->direct) {
        snprintf(t->tmp, cap, "%s", target);
        t->fd = open(target, O_WRONLY | O_CLOEXEC);
        err = t->fd < 0 ? errno : 0;
    } else {
        for (unsigned k = 0; k < 1000 && t->fd < 0 && (k == 0 || err == EEXIST); k++) {
            snprintf(t->tmp, cap, "%s" CCR_TMP_INFIX "%ld.%u", target, (long)getpid(), k);
            t->fd = open(t->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
            err = t->fd < 0 ? errno : 0;
        }
        t->live = t->fd >= 0;
        /* A replaced file keeps its permission bits (best effort). */
        if (t->live && exists && S_ISREG(st.st_mode))
            (void)fchmod(t->fd, st.st_mode & 07777);
    }
    if (t->fd < 0) {
        ccr_status s = ccr_fail(ctx, CCR_EIO, __func__, __FILE__, __LINE__,
                                "cannot create '%.200s': %s", t->tmp, strerror(err));
        ccr_tmp_release(t);
        return s;
    }
    return CCR_OK;
}

ccr_status ccr_tmp_write(ccr_ctx *ctx, ccr_tmp *t, const void *buf, size_t n)
{
    CCR_CHECK_NULL(ctx, t);
    if (t->fd < 0)
        CCR_FAIL(ctx, CCR_EINVAL, "the file is closed");
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(t->fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            CCR_FAIL(ctx, CCR_EIO, "cannot write '%.200s': %s", t->tmp,
                     w < 0 ? strerror(errno) : "nothing written");
        p += w;
        n -= (size_t)w;
    }
    return CCR_OK;
}

ccr_status ccr_tmp_commit(ccr_ctx *ctx, ccr_tmp *t, const char *dest)
{
    CCR_CHECK_NULL(ctx, t);
    if (t->tmp == NULL)
        CCR_FAIL(ctx, CCR_EINVAL, "nothing to commit");
    if (dest == NULL)
        dest = t->target;
    if (t->fd >= 0) {
        int err = 0;
        if (!t->direct && fsync(t->fd) != 0)
            err = errno;
        if (close(t->fd) != 0 && err == 0)
            err = errno;
        t->fd = -1;
        if (err != 0)
            CCR_FAIL(ctx, CCR_EIO, "cannot write '%.200s': %s", t->tmp, strerror(err));
    }
    if (t->direct)
        return CCR_OK;
    if (rename(t->tmp, dest) != 0)
        CCR_FAIL(ctx, CCR_EIO, "cannot rename '%.200s' to '%.200s': %s", t->tmp, dest,
                 strerror(errno));
    t->live = false;
    int err = fsync_dir(dest);
    if (err != 0)
        CCR_FAIL(ctx, CCR_EIO, "cannot sync the directory of '%.200s': %s", dest,
                 strerror(err));
    return CCR_OK;
}

void ccr_tmp_release(ccr_tmp *t)
{
    if (t == NULL)
        return;
    if (t->fd >= 0)
        close(t->fd);
    if (t->live && t->tmp != NULL)
        unlink(t->tmp);
    free(t->target);
    free(t->tmp);
    *t = (ccr_tmp){.fd = -1};
}

/* Splits "<target>.ccr-tmp.<pid>.<n>": *pid, and *prefix the length of
 * <target> (the last occurrence of the infix: a target may contain it). */
static bool tmp_name_split(const char *name, long *pid, size_t *prefix)
{
    const char *m = NULL;
    for (const char *p = strstr(name, CCR_TMP_INFIX); p != NULL;
         p = strstr(p + 1, CCR_TMP_INFIX))
        m = p;
    if (m == NULL || m == name)
        return false;
    const char *p = m + strlen(CCR_TMP_INFIX);
    long v = 0;
    size_t digits = 0;
    for (; *p >= '0' && *p <= '9' && digits < 18; p++, digits++)
        v = v * 10 + (*p - '0');
    if (digits == 0 || *p != '.' || v <= 0)
        return false;
    p++;
    if (*p < '0' || *p > '9')
        return false;
    while (*p >= '0' && *p <= '9')
        p++;
    if (*p != '\0')
        return false;
    if (pid != NULL)
        *pid = v;
    if (prefix != NULL)
        *prefix = (size_t)(m - name);
    return true;
}

bool ccr_tmp_parse_name(const char *name, long *pid)
{
    return tmp_name_split(name, pid, NULL);
}

/* Whether the open temporary fd holds JSON Lines: it starts with '{' and
 * its first 4 KiB hold no NUL byte (a safetensors file starts with an
 * 8-byte little-endian header length, whose high bytes are 0). */
static bool looks_like_jsonl(int fd)
{
    char buf[4096];
    ssize_t n = pread(fd, buf, sizeof buf, 0);
    if (n <= 0 || buf[0] != '{')
        return false;
    return memchr(buf, '\0', (size_t)n) == NULL;
}

/* The length of fd's content up to and including its last '\n' (0 if it
 * has none or cannot be read). */
static off_t last_full_line(int fd, off_t size)
{
    char buf[4096];
    for (off_t end = size; end > 0;) {
        off_t start = end > (off_t)sizeof buf ? end - (off_t)sizeof buf : 0;
        ssize_t n = pread(fd, buf, (size_t)(end - start), start);
        if (n != end - start)
            return 0;
        for (ssize_t i = n - 1; i >= 0; i--)
            if (buf[i] == '\n')
                return start + i + 1;
        end = start;
    }
    return 0;
}

/* Moves the stale JSONL temporary `name` (in dfd; its target's name is the
 * first `prefix` bytes) to "<target>.partial", or to
 * "<target>.partial.<pid>" if a .partial at least as new exists, after
 * cutting it back to its last full line.  *partial (malloc'd) gets the new
 * name relative to the directory.  Returns false (nothing moved) if the
 * file is not JSON Lines with a full line, or on any failure. */
static bool salvage_jsonl(int dfd, const char *name, size_t prefix, long pid, char **partial)
{
    *partial = NULL;
    int fd = openat(dfd, name, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return false;
    struct stat st, pst;
    bool ok = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && looks_like_jsonl(fd);
    off_t keep = ok ? last_full_line(fd, st.st_size) : 0;
    ok = keep > 0 && (keep == st.st_size || ftruncate(fd, keep) == 0) && fsync(fd) == 0;
    close(fd);
    size_t cap = prefix + sizeof CCR_JSONL_PARTIAL_SUFFIX + 24;
    char *dest = ok ? malloc(cap) : NULL;
    if (dest == NULL)
        return false;
    snprintf(dest, cap, "%.*s%s", (int)prefix, name, CCR_JSONL_PARTIAL_SUFFIX);
    bool newer = fstatat(dfd, dest, &pst, AT_SYMLINK_NOFOLLOW) == 0 &&
                 (pst.st_mtim.tv_sec > st.st_mtim.tv_sec ||
                  (pst.st_mtim.tv_sec == st.st_mtim.tv_sec &&
                   pst.st_mtim.tv_nsec >= st.st_mtim.tv_nsec));
    if (newer)
        snprintf(dest, cap, "%.*s%s.%ld", (int)prefix, name, CCR_JSONL_PARTIAL_SUFFIX, pid);
    if (renameat(dfd, name, dfd, dest) != 0) {
        free(dest);
        return false;
    }
    *partial = dest;
    return true;
}

ccr_status ccr_tmp_sweep(ccr_ctx *ctx, const char *target, size_t *removed,
                         ccr_tmp_kept_fn kept, void *arg)
{
    CCR_CHECK_NULL(ctx, target);
    if (removed != NULL)
        *removed = 0;
    char *dir = dir_of(target);
    if (dir == NULL)
        CCR_FAIL(ctx, CCR_ENOMEM, "cannot allocate the directory name");
    DIR *d = opendir(dir);
    if (d == NULL) {
        int err = errno;
        ccr_status s = ccr_fail(ctx, CCR_EIO, __func__, __FILE__, __LINE__,
                                "cannot read the directory '%.200s': %s", dir, strerror(err));
        free(dir);
        return s;
    }
    int dfd = dirfd(d);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        long pid;
        size_t prefix;
        if (!tmp_name_split(e->d_name, &pid, &prefix) || pid == (long)getpid())
            continue;
        if (kill((pid_t)pid, 0) == 0 || errno != ESRCH)
            continue;   /* alive, or not ours to judge */
        struct stat st;
        if (fstatat(dfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode))
            continue;
        char *partial;
        if (salvage_jsonl(dfd, e->d_name, prefix, pid, &partial)) {
            if (kept != NULL)
                kept(arg, dir, e->d_name, partial);
            free(partial);
        } else if (unlinkat(dfd, e->d_name, 0) == 0 && removed != NULL) {
            (*removed)++;
        }
    }
    closedir(d);
    free(dir);
    return CCR_OK;
}
