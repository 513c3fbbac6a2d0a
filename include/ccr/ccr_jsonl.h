/*
 * ccr_jsonl.h - JSON Lines results writer.
 *
 * Every experiment driver writes one JSON object per measurement, one per
 * line, so results can be appended, streamed and read by analysis/ with a
 * line-by-line parser.  A record is built field by field, then written;
 * field order is kept.  Non-finite doubles are written as null (JSON has no
 * NaN), so a reader can tell a failed measurement from a number.
 *
 *     ccr_jsonl *out;
 *     ccr_jsonl_open(ctx, "results.jsonl", false, &out);
 *     ccr_record *r;
 *     ccr_record_init(ctx, &r);
 *     ccr_record_add_str(r, "gate", "topk");
 *     ccr_record_add_int(r, "epoch", 3);
 *     ccr_record_add_double(r, "loss", 0.4321);
 *     ccr_jsonl_write(out, r);          // {"gate":"topk","epoch":3,"loss":0.4321}
 *     ccr_record_clear(r);              // reuse for the next line
 *     ...
 *     ccr_record_free(r);
 *     ccr_jsonl_close(out);   // now results.jsonl is replaced, all at once
 *
 * The file is replaced only when the writer is closed: until then the lines
 * go to a temporary, and a failed run (ccr_jsonl_abort) leaves them in
 * "results.jsonl.partial" with the previous results.jsonl untouched.
 */
#ifndef CCR_JSONL_H
#define CCR_JSONL_H

#include <stdbool.h>

#include "ccr_common.h"
#include "ccr_ctx.h"
#include "ccr_status.h"

CCR_BEGIN_DECLS

typedef struct ccr_record ccr_record;
typedef struct ccr_jsonl ccr_jsonl;

/* Creates an empty record.  Returns CCR_EINVAL or CCR_ENOMEM. */
ccr_status ccr_record_init(ccr_ctx *ctx, ccr_record **out);
void ccr_record_free(ccr_record *r);
/* Removes every field. */
void ccr_record_clear(ccr_record *r);

/* Adds a field.  A key already present is replaced in place.  Return
 * CCR_EINVAL for NULL/empty keys, NULL values and keys or strings that are
 * not valid UTF-8 (every line must be valid JSON), and CCR_ENOMEM. */
ccr_status ccr_record_add_str(ccr_record *r, const char *key, const char *value);
ccr_status ccr_record_add_int(ccr_record *r, const char *key, int64_t value);
ccr_status ccr_record_add_double(ccr_record *r, const char *key, double value);
ccr_status ccr_record_add_bool(ccr_record *r, const char *key, bool value);
/* An array of n doubles (non-finite entries become null). */
ccr_status ccr_record_add_doubles(ccr_record *r, const char *key, const double *v, size_t n);

/* The record as one line of JSON without the newline; the caller frees the
 * string with free().  Returns CCR_ENOMEM. */
ccr_status ccr_record_to_string(const ccr_record *r, char **out);

/* The suffix of the name that keeps a failed run's results. */
#define CCR_JSONL_PARTIAL_SUFFIX ".partial"

/* Opens a writer for path.  Nothing at path changes until
 * ccr_jsonl_close: the lines go to a new temporary file beside it,
 * "<path>.ccr-tmp.<pid>.<n>".  With append the temporary starts as a copy
 * of the existing file (up to its last full line).  A path that exists and
 * is not a regular file or directory (/dev/null, a FIFO) is written
 * directly.  Returns CCR_EIO if the temporary cannot be created (e.g. the
 * directory is not writable); a path naming a directory fails at close. */
ccr_status ccr_jsonl_open(ccr_ctx *ctx, const char *path, bool append, ccr_jsonl **out);

/* Writes the record as one line with a single write(2), so a crash loses at
 * most the line in progress.  Returns CCR_EIO on a write error (a full
 * disk); the file is then cut back to its last full line, so no half line
 * is ever kept, and the writer stays usable. */
ccr_status ccr_jsonl_write(ccr_jsonl *w, const ccr_record *r);

/* Commits: fsyncs the temporary, renames it over path and fsyncs the
 * directory, then frees the writer.  If that fails, the lines are kept in
 * "<path>.partial" (CCR_JSONL_PARTIAL_SUFFIX) where possible, the previous
 * file is untouched, and CCR_EIO says where the lines went.  NULL is
 * accepted (returns CCR_OK). */
ccr_status ccr_jsonl_close(ccr_jsonl *w);

/* For a run that failed or was interrupted: moves the lines written so far
 * to "<path>.partial" (replacing an older one), leaves path untouched and
 * frees the writer.  A writer that wrote no line makes no ".partial" (its
 * temporary is removed).  Returns CCR_EIO if the rename fails (the temporary is
 * then removed).  NULL is accepted (returns CCR_OK). */
ccr_status ccr_jsonl_abort(ccr_jsonl *w);

/* The temporary's path and the ".partial" path, fixed for the writer's
 * life, so a signal handler can rename(2) one to the other (rename is
 * async-signal-safe; every line in the temporary is complete).  NULL for a
 * NULL writer or one writing a device directly. */
const char *ccr_jsonl_temp_path(const ccr_jsonl *w);
const char *ccr_jsonl_partial_path(const ccr_jsonl *w);

/* Lines this writer has written (0 for NULL). */
size_t ccr_jsonl_lines(const ccr_jsonl *w);

CCR_END_DECLS

#endif /* CCR_JSONL_H */
