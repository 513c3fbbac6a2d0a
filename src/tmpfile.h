/*
 * tmpfile.h - replacing a file so that a reader never sees it half written
 * (private to libccr and the in-tree drivers).
 *
 * ccr_tmp_create opens "<target>.ccr-tmp.<pid>.<n>" in the target's
 * directory (created exclusively, so concurrent writers never share one;
 * it takes the permission bits of the file it will replace);
 * the caller writes it, then ccr_tmp_commit fsyncs it, renames it over the
 * destination and fsyncs the directory.  Until then the previous target is
 * untouched.  ccr_tmp_release closes and removes a temporary that was not
 * committed, so every failure path ends with it.  A run killed before it
 * could clean up leaves a temporary whose name carries its pid;
 * ccr_tmp_sweep clears those whose process no longer exists: a JSON Lines
 * temporary (results) is kept as "<target>.partial", cut back to its last
 * full line; any other (a checkpoint) is removed.
 *
 * A target that exists and is neither a regular file nor a directory (a
 * device such as /dev/null, a FIFO) is written directly: renaming over it
 * would replace the device node.  A directory as target is refused by
 * the rename in ccr_tmp_commit.
 */
#ifndef CCR_TMPFILE_H
#define CCR_TMPFILE_H

#include <stdbool.h>
#include <stddef.h>

#include "ccr/ccr_ctx.h"
#include "ccr/ccr_status.h"

CCR_BEGIN_DECLS

/* The infix of every temporary name: "<target>" CCR_TMP_INFIX "<pid>.<n>". */
#define CCR_TMP_INFIX ".ccr-tmp."

typedef struct ccr_tmp {
    int fd;          /* -1 once closed */
    bool direct;     /* writing the target itself (a device or FIFO) */
    bool live;       /* the temporary exists on disk */
    char *target;
    char *tmp;       /* the temporary's path (== target when direct) */
} ccr_tmp;

/* Creates the temporary for target.  On failure *t holds nothing to
 * release (releasing it anyway is harmless).  Returns CCR_EINVAL for an
 * empty path, CCR_ENOMEM, CCR_EIO naming the cause.  (A directory as target
 * fails at the rename.) */
ccr_status ccr_tmp_create(ccr_ctx *ctx, const char *target, ccr_tmp *t);

/* Writes all n bytes (retrying short writes and EINTR).  CCR_EIO names the
 * cause (e.g. "No space left on device"); the file may then hold part of
 * the data. */
ccr_status ccr_tmp_write(ccr_ctx *ctx, ccr_tmp *t, const void *buf, size_t n);

/* fsync, close, rename to dest (the target when dest is NULL), fsync the
 * directory.  On failure the temporary stays (closed) so the caller can
 * commit it elsewhere or release it.  Direct targets are only closed. */
ccr_status ccr_tmp_commit(ccr_ctx *ctx, ccr_tmp *t, const char *dest);

/* Closes and removes an uncommitted temporary, frees the names.  Safe on a
 * zeroed, released or committed ccr_tmp. */
void ccr_tmp_release(ccr_tmp *t);

/* Called for each stale temporary ccr_tmp_sweep kept: dir is the
 * directory, tmp its old and partial its new name (both within dir). */
typedef void (*ccr_tmp_kept_fn)(void *arg, const char *dir, const char *tmp,
                                const char *partial);

/* Clears, in the directory of target, every "<name>.ccr-tmp.<pid>.<n>"
 * regular file whose process is gone (kill(pid, 0) says ESRCH).  One that
 * holds JSON Lines (it starts with '{' and has no NUL byte in its first
 * 4 KiB) and at least one full line is cut back to its last full line and
 * renamed to "<name>.partial" (CCR_JSONL_PARTIAL_SUFFIX), or to
 * "<name>.partial.<pid>" if a "<name>.partial" at least as new exists;
 * kept (may be NULL) is told.  Every other one (a checkpoint, an empty or
 * lineless file) is removed; *removed (may be NULL) counts those.  Returns
 * CCR_EIO if the directory cannot be read. */
ccr_status ccr_tmp_sweep(ccr_ctx *ctx, const char *target, size_t *removed,
                         ccr_tmp_kept_fn kept, void *arg);

/* Whether name (a file name, no directory) is a ccr temporary; *pid gets
 * the pid it carries. */
bool ccr_tmp_parse_name(const char *name, long *pid);

CCR_END_DECLS

#endif /* CCR_TMPFILE_H */
