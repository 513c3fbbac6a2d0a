/*
 * common.h - helpers shared by the experiment drivers (not part of libccr).
 *
 * Command-line parsing with one-line errors and exit code 2, a monotonic
 * timer, a progress line on stderr, and the fields every JSONL record carries
 * (driver, git revision, machine, OpenBLAS core, seed).
 */
#ifndef CCR_DRV_COMMON_H
#define CCR_DRV_COMMON_H

#include <stdbool.h>
#include <stddef.h>

#include "ccr/ccr.h"

/* Prints "PROG: message" and exits with status 2 (bad usage). */
void drv_usage_error(const char *prog, const char *fmt, ...)
    __attribute__((format(printf, 2, 3), noreturn));

/* Prints "PROG: what: ctx message" and exits with status 1 (run failure). */
void drv_fail(const char *prog, ccr_ctx *ctx, ccr_status s, const char *what)
    __attribute__((noreturn));

/* Parse a flag's value or exit 2 naming the flag. */
size_t drv_parse_size(const char *prog, const char *flag, const char *v, size_t min);
double drv_parse_double(const char *prog, const char *flag, const char *v, double min,
                        double max);
unsigned long drv_parse_seed(const char *prog, const char *flag, const char *v);

/* Parses "512,256" into out (at most cap values, each >= 1); returns count. */
size_t drv_parse_size_list(const char *prog, const char *flag, const char *v, size_t *out,
                           size_t cap);

/* Seconds from a monotonic clock. */
double drv_now(void);

/* One progress line on stderr, rewritten in place ("\r"), with rate and ETA. */
void drv_progress(const char *label, size_t done, size_t total, double t_start,
                  const char *extra);
/* Ends the progress line. */
void drv_progress_end(void);

/* The CPU model from /proc/cpuinfo and the host's core count, e.g.
 * "AMD EPYC 9B45 (2 cores)". */
const char *drv_machine(void);

/* Adds driver, version, git, machine, blas_core, blas_threads, backend and
 * seed fields to a record. */
ccr_status drv_record_base(ccr_record *r, const char *driver, const ccr_backend *be,
                           unsigned long seed);

/* Gate and bank options shared by the drivers (--gate --experts --k
 * --groups --k2 --depth --combine --bits-from --grad-mode --capacity-factor
 * --w-importance --w-load --aux-alpha --z-loss --noise-eps --randomize
 * --bank --expert-hidden).  If `flag` is one of them, parses `value` into
 * cfg (exiting 2 on a bad value), sets *used_value when the flag took the
 * value, and returns true. */
bool drv_parse_gate_option(const char *prog, const char *flag, const char *value,
                           ccr_cond_config *cfg, bool *used_value);

/* Usage lines for those options. */
extern const char drv_gate_usage[];

/* After parsing: fills the defaults that depend on the gate (bank: linear
 * for signtree, FFN otherwise; none: 1 expert). */
void drv_gate_finish(ccr_cond_config *cfg, bool bank_set);

/* Adds the gate configuration to a record under the flag names. */
ccr_status drv_record_gate(ccr_record *r, const ccr_cond_config *cfg);

#endif /* CCR_DRV_COMMON_H */
