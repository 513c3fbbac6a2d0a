/*
 * outputs.h - what the drivers do so that results and checkpoints are never
 * lost or overwritten by mistake (not part of libccr).
 *
 * A driver names, once its options are parsed, the files it reads
 * (drv_io_input, drv_io_input_fmnist) and the files it writes
 * (drv_io_output), then calls drv_io_check before any work.  That refuses
 * (exit 2) an output that is the same file as an input or as another
 * output, compared by device and inode (for an output that does not exist
 * yet: its directory's device and inode, and its name), an output that is a
 * directory, and an output whose directory cannot be written (a file is
 * created there and removed).  It also removes the temporaries that killed
 * runs left beside the outputs (tmpfile.h), and installs handlers for
 * SIGINT, SIGTERM and SIGHUP.
 *
 * The results writer, once watched (drv_open_out does it), is committed
 * only by drv_io_close: if the process exits any other way (drv_fail, a
 * usage error) or gets one of those signals, its lines are moved to
 * "<out>.partial" and the previous <out> stays as it was.
 */
#ifndef CCR_DRV_OUTPUTS_H
#define CCR_DRV_OUTPUTS_H

#include "ccr/ccr.h"

/* A file the run reads (flag names it in messages).  NULL is ignored; a
 * path that does not exist is skipped (loading it fails later). */
void drv_io_input(const char *flag, const char *path);

/* The Fashion-MNIST files fit_load_fmnist reads from dir (.gz and plain). */
void drv_io_input_fmnist(const char *flag, const char *dir);

/* A file the run writes.  NULL is ignored. */
void drv_io_output(const char *flag, const char *path);

/* The checks above; exits 2 with "PROG: ..." on the first problem. */
void drv_io_check(const char *prog);

/* Watches a results writer (NULL is ignored): moved to "<out>.partial" on
 * a signal or an exit before drv_io_close. */
void drv_io_watch(const char *prog, ccr_jsonl *w);

/* Commits a watched (or unwatched) writer with ccr_jsonl_close; NULL gives
 * CCR_OK. */
ccr_status drv_io_close(ccr_jsonl *w);

#endif /* CCR_DRV_OUTPUTS_H */
